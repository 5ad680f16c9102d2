// SPDX-License-Identifier: MIT
// Design notes (the full argument is in docs/design/persistent-bitmaps.md)
//
// File: "<image>.bitmaps/<encoded name>.bitmap". A 4096-byte header made of
// two 2048-byte slots (each: magic, version, sequence, geometry, recording
// flag, name, CRC-32C); the valid slot with the higher sequence wins, and a
// header update always writes the other slot, so a torn header write leaves
// the previous state readable. Then the level-0 words, little-endian, in
// 4 KiB pages (page p holds words [512p, 512p+512)); the file is allocated to
// its full length when created. Creation writes a temporary file, fsyncs it,
// renames it into place without replacing, and fsyncs the directory.
//
// Ordering: mark() sets the bits in memory (bitmap_, which records the
// changed words), then one thread at a time (the committer) takes the
// changed words, pwrites the pages holding them, fdatasyncs, and only then
// copies the words it wrote into durable_. A mark returns when durable_
// covers its range, so the data write the caller issues next is always
// ordered after its bits are on stable storage. Marks arriving while a
// commit runs are written together by the next one (group commit); a range
// already durably dirty costs two bitmap lookups and no I/O.
//
// durable_ is exactly "these bits are on disk" for every word a commit wrote:
// commits copy the values they wrote, not the current ones, and at most one
// commit, sync_all or header write runs at a time. After a failed write or
// sync nobody knows what reached the disk, so durable_ is cleared (it claims
// nothing) and the error sticks: later marks return it, and the caller fails
// the data write instead of issuing it. The bitmap never needs an "in use" or
// "inconsistent" flag: at every instant the bits on disk are a superset of
// the granules whose data writes were issued.
#include "block/persistent_bitmap.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cassert>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <optional>
#include <span>

namespace fleeced::block {
namespace {

constexpr std::size_t kHeaderSize = 4096;
constexpr std::size_t kSlotSize = 2048;
constexpr std::size_t kPageSize = 4096;
constexpr std::size_t kWordsPerPage = kPageSize / 8;
constexpr std::size_t kMaxPagesPerWrite = 256;  // 1 MiB per pwrite
constexpr uint32_t kVersion = 1;
constexpr uint32_t kFlagRecording = 1u << 0;
constexpr std::size_t kMaxNameLength = 1023;
constexpr std::array<char, 8> kMagic = {'F', 'L', 'E', 'E', 'C', 'E', 'B', 'M'};
constexpr const char* kSuffix = ".bitmap";

// Field offsets inside a header slot (all little-endian).
constexpr std::size_t kOffMagic = 0;                 // 8 bytes
constexpr std::size_t kOffVersion = 8;               // u32
constexpr std::size_t kOffHeaderSize = 12;           // u32, 4096
constexpr std::size_t kOffSequence = 16;             // u64
constexpr std::size_t kOffDiskSize = 24;             // u64
constexpr std::size_t kOffGranularity = 32;          // u32
constexpr std::size_t kOffFlags = 36;                // u32
constexpr std::size_t kOffWordCount = 40;            // u64
constexpr std::size_t kOffDataOffset = 48;           // u64, 4096
constexpr std::size_t kOffNameLength = 56;           // u32
constexpr std::size_t kOffName = 64;                 // name bytes, up to 1023
constexpr std::size_t kOffChecksum = kSlotSize - 4;  // u32 CRC-32C of [0, kOffChecksum)

std::error_code errno_code(int err) { return {err, std::generic_category()}; }
std::error_code last_error() { return errno_code(errno); }
std::error_code corrupt() { return errno_code(EINVAL); }

uint64_t div_ceil(uint64_t value, uint64_t divisor) {
  return value / divisor + (value % divisor != 0 ? 1 : 0);
}

uint64_t word_count_for(uint64_t disk_size, uint32_t granularity) {
  return div_ceil(div_ceil(disk_size, granularity), 64);
}

uint64_t data_bytes_for(uint64_t words) { return div_ceil(words, kWordsPerPage) * kPageSize; }

bool valid_granularity(uint64_t granularity) {
  return granularity >= 512 && granularity <= (uint64_t{1} << 31) &&
         std::has_single_bit(granularity);
}

constexpr std::array<uint32_t, 256> make_crc32c_table() {
  std::array<uint32_t, 256> table{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t crc = i;
    for (int bit = 0; bit < 8; ++bit) crc = (crc >> 1) ^ ((crc & 1) ? 0x82f63b78u : 0);
    table[i] = crc;
  }
  return table;
}
constexpr std::array<uint32_t, 256> kCrc32cTable = make_crc32c_table();

uint32_t crc32c(std::span<const std::byte> data) {
  uint32_t crc = ~0u;
  for (std::byte b : data) {
    crc = (crc >> 8) ^ kCrc32cTable[(crc ^ static_cast<uint32_t>(b)) & 0xff];
  }
  return ~crc;
}

template <typename T>
void store_le(std::byte* at, T value) {
  for (std::size_t i = 0; i < sizeof(T); ++i) {
    at[i] = static_cast<std::byte>(static_cast<uint64_t>(value) >> (8 * i));
  }
}

template <typename T>
T load_le(const std::byte* at) {
  uint64_t value = 0;
  for (std::size_t i = 0; i < sizeof(T); ++i) {
    value |= static_cast<uint64_t>(at[i]) << (8 * i);
  }
  return static_cast<T>(value);
}

std::error_code pwrite_all(int fd, const std::byte* data, std::size_t length, uint64_t offset) {
  while (length > 0) {
    const ssize_t n = ::pwrite(fd, data, length, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      return last_error();
    }
    data += n;
    length -= static_cast<std::size_t>(n);
    offset += static_cast<uint64_t>(n);
  }
  return {};
}

// Errors: EINVAL if the file ends first (a truncated bitmap is corrupt).
std::error_code pread_all(int fd, std::byte* data, std::size_t length, uint64_t offset) {
  while (length > 0) {
    const ssize_t n = ::pread(fd, data, length, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      return last_error();
    }
    if (n == 0) return corrupt();
    data += n;
    length -= static_cast<std::size_t>(n);
    offset += static_cast<uint64_t>(n);
  }
  return {};
}

std::error_code fsync_directory(const std::string& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return last_error();
  std::error_code ec;
  if (::fsync(fd) != 0) ec = last_error();
  ::close(fd);
  return ec;
}

std::string parent_directory(const std::string& path) {
  const std::size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

std::string hex(std::string_view bytes) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string out;
  out.reserve(bytes.size() * 2);
  for (unsigned char c : bytes) {
    out.push_back(kDigits[c >> 4]);
    out.push_back(kDigits[c & 15]);
  }
  return out;
}

// File name for a bitmap name: the name in hex (any byte is safe), or for
// names over 100 bytes (hex would pass NAME_MAX) the hex of the first 100
// bytes, '-' and a 64-bit FNV-1a hash of the whole name. The header holds
// the real name; the file name is only a unique key.
std::string file_name_for(const std::string& name) {
  constexpr std::size_t kHexPrefix = 100;
  if (name.size() <= kHexPrefix) return hex(name) + kSuffix;
  uint64_t hash = 0xcbf29ce484222325ull;
  for (unsigned char c : name) hash = (hash ^ c) * 0x100000001b3ull;
  std::string hash_bytes(8, '\0');
  for (int i = 0; i < 8; ++i) hash_bytes[i] = static_cast<char>(hash >> (56 - 8 * i));
  return hex(std::string_view(name).substr(0, kHexPrefix)) + "-" + hex(hash_bytes) + kSuffix;
}

struct Header {
  uint64_t sequence = 0;
  uint64_t disk_size = 0;
  uint32_t granularity = 0;
  bool recording = true;
  std::string name;
};

void encode_slot(const Header& h, std::span<std::byte, kSlotSize> slot) {
  std::fill(slot.begin(), slot.end(), std::byte{0});
  std::memcpy(slot.data() + kOffMagic, kMagic.data(), kMagic.size());
  store_le<uint32_t>(slot.data() + kOffVersion, kVersion);
  store_le<uint32_t>(slot.data() + kOffHeaderSize, kHeaderSize);
  store_le<uint64_t>(slot.data() + kOffSequence, h.sequence);
  store_le<uint64_t>(slot.data() + kOffDiskSize, h.disk_size);
  store_le<uint32_t>(slot.data() + kOffGranularity, h.granularity);
  store_le<uint32_t>(slot.data() + kOffFlags, h.recording ? kFlagRecording : 0);
  store_le<uint64_t>(slot.data() + kOffWordCount, word_count_for(h.disk_size, h.granularity));
  store_le<uint64_t>(slot.data() + kOffDataOffset, kHeaderSize);
  store_le<uint32_t>(slot.data() + kOffNameLength, static_cast<uint32_t>(h.name.size()));
  std::memcpy(slot.data() + kOffName, h.name.data(), h.name.size());
  store_le<uint32_t>(slot.data() + kOffChecksum, crc32c(slot.first(kOffChecksum)));
}

// A slot that is valid in every field, or nothing.
std::optional<Header> decode_slot(std::span<const std::byte, kSlotSize> slot) {
  if (std::memcmp(slot.data() + kOffMagic, kMagic.data(), kMagic.size()) != 0) return {};
  if (load_le<uint32_t>(slot.data() + kOffChecksum) != crc32c(slot.first(kOffChecksum))) return {};
  if (load_le<uint32_t>(slot.data() + kOffVersion) != kVersion) return {};
  if (load_le<uint32_t>(slot.data() + kOffHeaderSize) != kHeaderSize) return {};
  if (load_le<uint64_t>(slot.data() + kOffDataOffset) != kHeaderSize) return {};
  Header h;
  h.sequence = load_le<uint64_t>(slot.data() + kOffSequence);
  h.disk_size = load_le<uint64_t>(slot.data() + kOffDiskSize);
  h.granularity = load_le<uint32_t>(slot.data() + kOffGranularity);
  const uint32_t flags = load_le<uint32_t>(slot.data() + kOffFlags);
  const uint32_t name_length = load_le<uint32_t>(slot.data() + kOffNameLength);
  if (!valid_granularity(h.granularity) || (flags & ~kFlagRecording) != 0) return {};
  if (name_length == 0 || name_length > kMaxNameLength) return {};
  if (load_le<uint64_t>(slot.data() + kOffWordCount) !=
      word_count_for(h.disk_size, h.granularity)) {
    return {};
  }
  h.recording = (flags & kFlagRecording) != 0;
  h.name.assign(reinterpret_cast<const char*>(slot.data() + kOffName), name_length);
  return h;
}

uint64_t slot_offset(uint64_t sequence) { return (sequence % 2) * kSlotSize; }

// Both slots, identical but for the sequence (the higher one is slot 1).
std::vector<std::byte> encode_header(Header h) {
  std::vector<std::byte> buf(kHeaderSize);
  for (uint64_t seq : {uint64_t{0}, uint64_t{1}}) {
    h.sequence = seq;
    encode_slot(h, std::span<std::byte, kSlotSize>(buf.data() + slot_offset(seq), kSlotSize));
  }
  return buf;
}

// Reads the words of [first, first + out.size()) from their pages.
std::error_code read_words_from(int fd, std::size_t first, std::span<uint64_t> out) {
  std::vector<std::byte> buf(kMaxPagesPerWrite * kPageSize);
  for (std::size_t done = 0; done < out.size();) {
    const std::size_t n = std::min(out.size() - done, buf.size() / 8);
    if (auto ec = pread_all(fd, buf.data(), n * 8, kHeaderSize + (first + done) * 8)) return ec;
    for (std::size_t i = 0; i < n; ++i) out[done + i] = load_le<uint64_t>(buf.data() + i * 8);
    done += n;
  }
  return {};
}

// Moves tmp to path unless path exists (EEXIST).
std::error_code rename_no_replace(const std::string& tmp, const std::string& path) {
  if (::renameat2(AT_FDCWD, tmp.c_str(), AT_FDCWD, path.c_str(), RENAME_NOREPLACE) == 0) return {};
  if (errno != EINVAL && errno != ENOSYS) return last_error();
  // Filesystems without RENAME_NOREPLACE: link() refuses to replace too.
  if (::link(tmp.c_str(), path.c_str()) != 0) return last_error();
  ::unlink(tmp.c_str());
  return {};
}

std::error_code write_new_file(const std::string& tmp, const Header& h) {
  const int fd = ::open(tmp.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return last_error();
  const std::vector<std::byte> header = encode_header(h);
  std::error_code ec = pwrite_all(fd, header.data(), header.size(), 0);
  // Allocate every page now: ENOSPC belongs to bitmap creation, not to a
  // later guest write.
  const uint64_t total = kHeaderSize + data_bytes_for(word_count_for(h.disk_size, h.granularity));
  if (!ec) {
    if (int err = ::posix_fallocate(fd, 0, static_cast<off_t>(total)); err != 0) {
      ec = errno_code(err);
    }
  }
  if (!ec && ::fsync(fd) != 0) ec = last_error();
  ::close(fd);
  return ec;
}

}  // namespace

std::string PersistentBitmap::directory_for(const std::string& image_path) {
  return image_path + ".bitmaps";
}

std::vector<std::string> PersistentBitmap::list(const std::string& image_path) {
  const std::string dir = directory_for(image_path);
  std::vector<std::string> paths;
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return paths;
  const std::string_view suffix = kSuffix;
  while (const dirent* e = ::readdir(d)) {
    const std::string_view file = e->d_name;
    // Temporary files of an interrupted create start with '.'.
    if (file.empty() || file[0] == '.' || !file.ends_with(suffix)) continue;
    paths.push_back(dir + "/" + std::string(file));
  }
  ::closedir(d);
  std::sort(paths.begin(), paths.end());
  return paths;
}

PersistentBitmap::PersistentBitmap(std::string path, std::string name, uint64_t disk_size,
                                   uint32_t granularity)
    : path_(std::move(path)),
      name_(std::move(name)),
      bitmap_(disk_size, granularity),
      durable_(disk_size, granularity) {}

std::unique_ptr<PersistentBitmap> PersistentBitmap::create(const std::string& image_path,
                                                           const std::string& name,
                                                           uint64_t disk_size, uint32_t granularity,
                                                           bool recording, std::error_code& ec) {
  ec.clear();
  if (name.empty() || name.size() > kMaxNameLength || !valid_granularity(granularity)) {
    ec = corrupt();
    return nullptr;
  }
  const std::string dir = directory_for(image_path);
  if (::mkdir(dir.c_str(), 0755) == 0) {
    if ((ec = fsync_directory(parent_directory(dir)))) return nullptr;
  } else if (errno != EEXIST) {
    ec = last_error();
    return nullptr;
  }
  const std::string file = file_name_for(name);
  const std::string path = dir + "/" + file;
  if (::access(path.c_str(), F_OK) == 0) {
    ec = errno_code(EEXIST);  // cheap early answer; the rename below decides
    return nullptr;
  }
  const std::string tmp = dir + "/." + file + "." + std::to_string(::getpid()) + ".tmp";
  ec = write_new_file(tmp, Header{0, disk_size, granularity, recording, name});
  if (!ec) ec = rename_no_replace(tmp, path);
  if (ec) {
    ::unlink(tmp.c_str());
    return nullptr;
  }
  if ((ec = fsync_directory(dir))) return nullptr;
  return open(path, ec);
}

std::unique_ptr<PersistentBitmap> PersistentBitmap::open(const std::string& path,
                                                         std::error_code& ec) {
  ec.clear();
  const int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) {
    ec = last_error();
    return nullptr;
  }
  auto fail = [&](std::error_code err) {
    ::close(fd);
    ec = err;
    return nullptr;
  };
  std::vector<std::byte> header(kHeaderSize);
  if (auto err = pread_all(fd, header.data(), header.size(), 0)) return fail(err);
  std::optional<Header> best;
  for (std::size_t slot = 0; slot < 2; ++slot) {
    auto h = decode_slot(
        std::span<const std::byte, kSlotSize>(header.data() + slot * kSlotSize, kSlotSize));
    if (h && (!best || h->sequence > best->sequence)) best = std::move(h);
  }
  if (!best) return fail(corrupt());
  const uint64_t words = word_count_for(best->disk_size, best->granularity);
  struct stat st {};
  if (::fstat(fd, &st) != 0) return fail(last_error());
  if (static_cast<uint64_t>(st.st_size) < kHeaderSize + data_bytes_for(words)) {
    return fail(corrupt());
  }
  std::unique_ptr<PersistentBitmap> pb(
      new PersistentBitmap(path, best->name, best->disk_size, best->granularity));
  // Pages written but not yet synced before a crash may sit in the page
  // cache; durable_ may claim them only once they are on stable storage.
  if (::fdatasync(fd) != 0) return fail(last_error());
  std::vector<uint64_t> bits(words);
  if (auto err = read_words_from(fd, 0, bits)) return fail(err);
  pb->bitmap_.load_words(bits);
  pb->durable_.load_words(bits);
  pb->bitmap_.track_changes(true);
  pb->fd_ = fd;
  pb->recording_ = best->recording;
  pb->header_seq_ = best->sequence;
  return pb;
}

PersistentBitmap::~PersistentBitmap() {
  if (fd_ < 0) return;
  // Best effort: changes made without a mark or sync_all (none in normal
  // use) reach the file. No marker is needed for a clean close.
  if (!removed_ && !sticky_error_) {
    (void)commit_pending(0, 0);
  }
  ::close(fd_);
}

bool PersistentBitmap::recording() const {
  std::lock_guard lock(mu_);
  return recording_;
}

uint64_t PersistentBitmap::commit_count() const {
  std::lock_guard lock(mu_);
  return commit_seq_;
}

void PersistentBitmap::begin_commit(std::unique_lock<std::mutex>& lock) {
  cv_.wait(lock, [&] { return !committing_; });
  committing_ = true;
}

void PersistentBitmap::end_commit(std::unique_lock<std::mutex>& lock, std::error_code ec,
                                  bool sticky) {
  assert(lock.owns_lock());
  (void)lock;  // only checked in debug builds
  committing_ = false;
  if (ec && sticky && !sticky_error_) {
    sticky_error_ = ec;
    // Unknown what reached the disk: claim nothing from now on.
    durable_.clear();
  }
  if (!ec && sticky) ++commit_seq_;
  cv_.notify_all();
}

std::error_code PersistentBitmap::set_recording(bool recording) {
  std::unique_lock lock(mu_);
  if (recording_ == recording) return {};
  begin_commit(lock);
  Header h{header_seq_ + 1, bitmap_.disk_size(), bitmap_.granularity(), recording, name_};
  lock.unlock();
  // The new state goes to the older slot; the newer one stays valid until
  // this write is durable.
  std::array<std::byte, kSlotSize> slot{};
  encode_slot(h, slot);
  std::error_code ec = pwrite_all(fd_, slot.data(), slot.size(), slot_offset(h.sequence));
  if (!ec && ::fdatasync(fd_) != 0) ec = last_error();
  lock.lock();
  if (!ec) {
    recording_ = recording;
    header_seq_ = h.sequence;
  }
  end_commit(lock, ec, false);
  return ec;
}

bool PersistentBitmap::is_durable(uint64_t offset, uint64_t length) const {
  // Both: durable_ alone may still hold bits that were cleared in memory
  // (clear without sync_all); the caller relies on bitmap_ being set too.
  return bitmap_.all_dirty(offset, length) && durable_.all_dirty(offset, length);
}

std::error_code PersistentBitmap::mark(uint64_t offset, uint64_t length) {
  if (is_durable(offset, length)) return {};
  bitmap_.set_range(offset, length);
  std::size_t first_word = 0;
  std::size_t end_word = 0;
  if (length > 0 && offset < bitmap_.disk_size()) {
    const uint64_t g = bitmap_.granularity();
    const uint64_t end = std::min(bitmap_.disk_size() - offset, length) + offset;
    first_word = offset / g / 64;
    end_word = div_ceil(div_ceil(end, g), 64);
  }
  std::unique_lock lock(mu_);
  for (;;) {
    if (sticky_error_) return sticky_error_;
    if (durable_.all_dirty(offset, length)) return {};
    if (committing_) {
      cv_.wait(lock);
      continue;
    }
    // Become the committer: write everything changed so far, our range too
    // (its bits may have been set by a caller that has not committed yet).
    committing_ = true;
    lock.unlock();
    std::error_code ec = commit_pending(first_word, end_word);
    lock.lock();
    end_commit(lock, ec, true);
  }
}

std::error_code PersistentBitmap::commit_pending(std::size_t first_word, std::size_t end_word) {
  // Take the changed list before reading the words: a set_range that lands
  // after this is listed again and goes to the next commit.
  std::vector<std::size_t> changed = bitmap_.take_changed_words();
  std::vector<std::size_t> pages;
  for (std::size_t w : changed) {
    // Changed words come in runs (a big write changes many in a row).
    if (pages.empty() || pages.back() != w / kWordsPerPage) pages.push_back(w / kWordsPerPage);
  }
  for (std::size_t p = first_word / kWordsPerPage; p < div_ceil(end_word, kWordsPerPage); ++p) {
    pages.push_back(p);
  }
  if (pages.empty()) return {};
  std::sort(pages.begin(), pages.end());
  pages.erase(std::unique(pages.begin(), pages.end()), pages.end());

  const std::size_t total_words = bitmap_.word_count();
  struct Written {
    std::size_t first;
    std::vector<uint64_t> words;
  };
  std::vector<Written> written;
  std::vector<std::byte> buf;
  for (std::size_t i = 0; i < pages.size();) {
    // A run of consecutive pages, at most kMaxPagesPerWrite.
    std::size_t j = i + 1;
    while (j < pages.size() && pages[j] == pages[j - 1] + 1 && j - i < kMaxPagesPerWrite) ++j;
    const std::size_t first = pages[i] * kWordsPerPage;
    const std::size_t count =
        std::min(pages[j - 1] * kWordsPerPage + kWordsPerPage, total_words) - first;
    Written run{first, std::vector<uint64_t>(count)};
    bitmap_.read_words(first, run.words);
    buf.assign((j - i) * kPageSize, std::byte{0});
    for (std::size_t k = 0; k < count; ++k) store_le<uint64_t>(buf.data() + k * 8, run.words[k]);
    if (auto ec = pwrite_all(fd_, buf.data(), buf.size(), kHeaderSize + first * 8)) return ec;
    written.push_back(std::move(run));
    i = j;
  }
  if (::fdatasync(fd_) != 0) return last_error();
  for (const Written& run : written) durable_.store_words(run.first, run.words);
  return {};
}

std::error_code PersistentBitmap::write_all() {
  (void)bitmap_.take_changed_words();  // all of them are written below
  const std::vector<uint64_t> words = bitmap_.snapshot_words();
  std::vector<std::byte> buf;
  for (std::size_t first = 0; first < words.size();) {
    const std::size_t count = std::min(words.size() - first, kMaxPagesPerWrite * kWordsPerPage);
    buf.assign(div_ceil(count, kWordsPerPage) * kPageSize, std::byte{0});
    for (std::size_t k = 0; k < count; ++k)
      store_le<uint64_t>(buf.data() + k * 8, words[first + k]);
    if (auto ec = pwrite_all(fd_, buf.data(), buf.size(), kHeaderSize + first * 8)) return ec;
    first += count;
  }
  if (::fdatasync(fd_) != 0) return last_error();
  durable_.load_words(words);
  return {};
}

std::error_code PersistentBitmap::sync_all() {
  std::unique_lock lock(mu_);
  begin_commit(lock);
  if (sticky_error_) {
    end_commit(lock, {}, false);
    return sticky_error_;
  }
  lock.unlock();
  std::error_code ec = write_all();
  lock.lock();
  end_commit(lock, ec, true);
  return ec;
}

std::error_code PersistentBitmap::remove_file() {
  {
    std::lock_guard lock(mu_);
    removed_ = true;
  }
  if (::unlink(path_.c_str()) != 0) return last_error();
  return fsync_directory(parent_directory(path_));
}

}  // namespace fleeced::block

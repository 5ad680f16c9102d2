// SPDX-License-Identifier: MIT
// Design notes
//
// File layout (all in clusters; facts from QEMU docs/interop/qcow2.txt):
//   0                      header, header extensions, backing file name (zeros until finish())
//   1 .. data_end-1        data clusters, in the order writers claimed them
//   then                   L2 tables (only those with a non-zero entry), L1 table,
//                          refcount table, refcount blocks
// The header is written last, after an fdatasync of everything else, so a crash before
// finish() completes leaves a file that no qcow2 reader accepts.
//
// Guest cluster state lives in l2_, one atomic word per guest cluster:
//   0            never written (unallocated: reads from the backing file, or zeros)
//   kZero        written as zeros (disk: zero flag with a backing file, else unallocated)
//   kClaimed     a write() is in progress (never a valid disk entry: bit 1 is reserved)
//   host | kCopied  a data cluster at host offset `host` with refcount 1
// A writer claims every cluster of its range with a compare-exchange from 0 before doing I/O,
// so a second write of a cluster is detected even when the two race. On an I/O error the
// claims are dropped; the host clusters already reserved stay unreferenced and get refcount 0.
//
// The header's size field is virtual_size rounded up to 512: QEMU (7.2) reads it as a sector
// count and would drop an unaligned tail; qemu-img create rounds up the same way.
//
// Refcounts are computed in finish() from what the metadata references, and each referenced
// cluster is checked to be referenced once: refcount 1 everywhere, so every L1/L2 entry
// carries the COPIED flag.
#include "backup/qcow2_writer.hpp"

#include <fcntl.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <system_error>

namespace fleece::backup {
namespace {

constexpr uint32_t kMagic = 0x514649fb;  // "QFI\xfb"
constexpr uint32_t kVersion = 3;
constexpr uint32_t kHeaderLength = 112;  // v3 header including compression_type (0 = zlib)
constexpr uint32_t kRefcountOrder = 4;   // 16-bit refcounts
constexpr uint32_t kExtEnd = 0;          // end of header extension area
constexpr uint32_t kExtBackingFormat = 0xe2792aca;       // backing file format name
constexpr uint64_t kMaxL1Bytes = 32ull << 20;            // QEMU's QCOW_MAX_L1_SIZE
constexpr uint64_t kMaxRefcountTableBytes = 8ull << 20;  // QEMU's QCOW_MAX_REFTABLE_SIZE
constexpr size_t kMaxBackingNameLength = 1023;
constexpr uint64_t kMaxVirtualSize = 1ull << 62;

constexpr uint64_t kCopied = 1ull << 63;                 // L1/L2 entry: refcount is exactly one
constexpr uint64_t kZero = 1;                            // L2 entry bit 0: reads as zeros (v3)
constexpr uint64_t kClaimed = 2;                         // in-memory only: write in progress
constexpr uint64_t kOffsetMask = 0x00fffffffffffe00ull;  // bits 9-55

constexpr size_t kBatchBytes = 4u << 20;  // metadata is written in chunks of about this size

void store_be16(unsigned char* p, uint16_t v) {
  p[0] = static_cast<unsigned char>(v >> 8);
  p[1] = static_cast<unsigned char>(v);
}

void store_be32(unsigned char* p, uint32_t v) {
  for (int i = 3; i >= 0; --i, v >>= 8) p[i] = static_cast<unsigned char>(v);
}

void store_be64(unsigned char* p, uint64_t v) {
  for (int i = 7; i >= 0; --i, v >>= 8) p[i] = static_cast<unsigned char>(v);
}

uint64_t div_round_up(uint64_t a, uint64_t b) { return a / b + (a % b != 0); }
uint64_t round_up8(uint64_t v) { return (v + 7) & ~uint64_t{7}; }

// Word-wise, 64 bytes per step, stopping at the first non-zero block.
bool is_zero(const unsigned char* p, size_t length) {
  size_t i = 0;
  for (; i + 64 <= length; i += 64) {
    uint64_t w[8];
    std::memcpy(w, p + i, sizeof w);
    if ((w[0] | w[1] | w[2] | w[3] | w[4] | w[5] | w[6] | w[7]) != 0) return false;
  }
  for (; i < length; ++i) {
    if (p[i] != 0) return false;
  }
  return true;
}

// Where finish() puts the metadata, in cluster indices.
struct Layout {
  uint64_t l2_index = 0;
  uint64_t l1_index = 0;
  uint64_t l1_clusters = 0;
  uint64_t refcount_table_index = 0;
  uint64_t refcount_table_clusters = 0;
  uint64_t refcount_block_index = 0;
  uint64_t refcount_blocks = 0;
  uint64_t total_clusters = 0;
};

Layout compute_layout(uint64_t data_end, uint64_t l2_tables, uint64_t l1_entries,
                      uint64_t cluster_size) {
  Layout l;
  l.l2_index = data_end;
  l.l1_index = l.l2_index + l2_tables;
  l.l1_clusters = div_round_up(l1_entries * 8, cluster_size);
  l.refcount_table_index = l.l1_index + l.l1_clusters;
  // The refcount structures count themselves: grow them until they cover everything.
  const uint64_t per_block = cluster_size * 8 / (1u << kRefcountOrder);
  uint64_t blocks = 1;
  uint64_t table_clusters = 1;
  for (;;) {
    const uint64_t total = l.refcount_table_index + table_clusters + blocks;
    const uint64_t need_blocks = div_round_up(total, per_block);
    const uint64_t need_table = div_round_up(need_blocks * 8, cluster_size);
    if (need_blocks <= blocks && need_table <= table_clusters) break;
    blocks = std::max(blocks, need_blocks);
    table_clusters = std::max(table_clusters, need_table);
  }
  l.refcount_table_clusters = table_clusters;
  l.refcount_block_index = l.refcount_table_index + table_clusters;
  l.refcount_blocks = blocks;
  l.total_clusters = l.refcount_block_index + blocks;
  return l;
}

// Bytes of cluster 0 used by the header, its extensions and the backing file name.
uint64_t header_bytes(const Qcow2Options& opts) {
  uint64_t n = kHeaderLength;
  if (!opts.backing_file.empty() && !opts.backing_format.empty()) {
    n += 8 + round_up8(opts.backing_format.size());
  }
  n += 8;  // end of extensions
  if (!opts.backing_file.empty()) n += opts.backing_file.size();
  return n;
}

// Throws std::invalid_argument unless QEMU can open an image with these options.
void validate(const std::string& path, const Qcow2Options& opts) {
  auto fail = [&](const std::string& why) {
    throw std::invalid_argument("qcow2 " + path + ": " + why);
  };
  if (opts.cluster_bits < 9 || opts.cluster_bits > 21) fail("cluster_bits must be 9..21");
  if (opts.virtual_size == 0 || opts.virtual_size > kMaxVirtualSize) fail("bad virtual size");
  const uint64_t cluster_size = uint64_t{1} << opts.cluster_bits;
  const std::string& name = opts.backing_file;
  if (name.size() > kMaxBackingNameLength) fail("backing file name longer than 1023 bytes");
  if (name.find('\0') != std::string::npos || opts.backing_format.find('\0') != std::string::npos) {
    fail("backing file name or format contains a NUL byte");
  }
  // QEMU reads the extensions and the backing file name from the first cluster only.
  if (header_bytes(opts) > cluster_size)
    fail("backing file name does not fit in the first cluster");
  // Worst case: every guest cluster stored, every L2 table present.
  const uint64_t guest_clusters = div_round_up(opts.virtual_size, cluster_size);
  const uint64_t l1_entries = div_round_up(guest_clusters, cluster_size / 8);
  if (l1_entries * 8 > kMaxL1Bytes) fail("virtual size too large for this cluster size (L1)");
  const Layout worst = compute_layout(1 + guest_clusters, l1_entries, l1_entries, cluster_size);
  if (worst.refcount_table_clusters * cluster_size > kMaxRefcountTableBytes) {
    fail("virtual size too large for this cluster size (refcount table)");
  }
}

// Accumulates consecutive metadata bytes and writes them in large chunks.
class BatchWriter {
 public:
  BatchWriter(uint64_t file_offset, std::function<void(const void*, size_t, uint64_t)> out)
      : offset_(file_offset), out_(std::move(out)) {
    buf_.reserve(kBatchBytes);
  }
  // Returns `length` zeroed bytes to fill in, valid until the next append(); length <= kBatchBytes.
  unsigned char* append(size_t length) {
    if (!buf_.empty() && buf_.size() + length > kBatchBytes) flush();
    buf_.resize(buf_.size() + length);
    unsigned char* p = buf_.data() + buf_.size() - length;
    std::memset(p, 0, length);
    return p;
  }
  void flush() {
    if (buf_.empty()) return;
    out_(buf_.data(), buf_.size(), offset_);
    offset_ += buf_.size();
    buf_.clear();
  }

 private:
  uint64_t offset_;
  std::function<void(const void*, size_t, uint64_t)> out_;
  std::vector<unsigned char> buf_;
};

}  // namespace

std::unique_ptr<Qcow2Writer> Qcow2Writer::create(const std::string& path,
                                                 const Qcow2Options& opts) {
  validate(path, opts);
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) {
    throw std::system_error(errno, std::generic_category(), "qcow2 " + path + ": cannot create");
  }
  try {
    return std::unique_ptr<Qcow2Writer>(new Qcow2Writer(path, opts, fd));
  } catch (...) {
    ::close(fd);
    ::unlink(path.c_str());
    throw;
  }
}

Qcow2Writer::Qcow2Writer(std::string path, const Qcow2Options& opts, int fd)
    : path_(std::move(path)),
      opts_(opts),
      cluster_size_(uint64_t{1} << opts.cluster_bits),
      header_size_((opts.virtual_size + 511) & ~uint64_t{511}),
      guest_clusters_(div_round_up(opts.virtual_size, cluster_size_)),
      zero_cluster_(cluster_size_, 0),
      l2_(guest_clusters_),
      next_host_index_(1),
      fd_(fd) {}

Qcow2Writer::~Qcow2Writer() {
  if (fd_ >= 0) ::close(fd_);
  if (!finished_) ::unlink(path_.c_str());
}

void Qcow2Writer::throw_io(int err, const char* what, uint64_t file_offset) const {
  throw std::system_error(
      err, std::generic_category(),
      "qcow2 " + path_ + ": " + what + " at offset " + std::to_string(file_offset));
}

std::pair<uint64_t, uint64_t> Qcow2Writer::check_range(uint64_t offset, uint64_t len) const {
  const uint64_t size = opts_.virtual_size;
  auto fail = [&](const char* why) {
    throw std::invalid_argument("qcow2 " + path_ + ": " + why + " (offset " +
                                std::to_string(offset) + ", length " + std::to_string(len) + ")");
  };
  if (offset % cluster_size_ != 0) fail("offset not cluster-aligned");
  if (len > size || offset > size - len) fail("range beyond the virtual size");
  if (len % cluster_size_ != 0 && offset + len != size) {
    fail("length not a multiple of the cluster size");
  }
  return {offset / cluster_size_, div_round_up(len, cluster_size_)};
}

void Qcow2Writer::claim(uint64_t first_index, uint64_t count) {
  for (uint64_t i = 0; i < count; ++i) {
    uint64_t expected = 0;
    if (!l2_[first_index + i].compare_exchange_strong(expected, kClaimed,
                                                      std::memory_order_acq_rel)) {
      release(first_index, i);
      throw std::invalid_argument("qcow2 " + path_ + ": guest cluster " +
                                  std::to_string(first_index + i) + " written twice");
    }
  }
}

void Qcow2Writer::release(uint64_t first_index, uint64_t count) {
  for (uint64_t i = 0; i < count; ++i) {
    l2_[first_index + i].store(0, std::memory_order_release);
  }
}

void Qcow2Writer::write(uint64_t offset, const void* data, size_t len) {
  const auto [first_index, count] = check_range(offset, len);
  if (count == 0) return;
  if (data == nullptr) throw std::invalid_argument("qcow2 " + path_ + ": null data");
  claim(first_index, count);
  try {
    write_data(first_index, static_cast<const unsigned char*>(data), len);
  } catch (...) {
    release(first_index, count);
    throw;
  }
}

void Qcow2Writer::write_data(uint64_t first_index, const unsigned char* data, size_t len) {
  const uint64_t count = div_round_up(len, cluster_size_);
  std::vector<bool> nonzero(count);
  uint64_t stored = 0;
  for (uint64_t i = 0; i < count; ++i) {
    const size_t at = i * cluster_size_;
    nonzero[i] = !is_zero(data + at, std::min<size_t>(cluster_size_, len - at));
    stored += nonzero[i];
  }
  uint64_t host_index = 0;
  if (stored > 0) {
    // One contiguous host run for all non-zero clusters, written with one pwritev.
    host_index = next_host_index_.fetch_add(stored, std::memory_order_relaxed);
    std::vector<iovec> iov;
    for (uint64_t i = 0; i < count; ++i) {
      if (!nonzero[i]) continue;
      const size_t at = i * cluster_size_;
      const size_t bytes = std::min<size_t>(cluster_size_, len - at);
      auto* base = const_cast<unsigned char*>(data + at);
      if (!iov.empty() &&
          static_cast<unsigned char*>(iov.back().iov_base) + iov.back().iov_len == base) {
        iov.back().iov_len += bytes;
      } else {
        iov.push_back({base, bytes});
      }
      if (bytes < cluster_size_) {
        iov.push_back({const_cast<unsigned char*>(zero_cluster_.data()), cluster_size_ - bytes});
      }
    }
    uint64_t file_offset = host_index * cluster_size_;
    size_t next = 0;
    while (next < iov.size()) {
      const int n = static_cast<int>(std::min<size_t>(iov.size() - next, IOV_MAX));
      const ssize_t r = ::pwritev(fd_, iov.data() + next, n, static_cast<off_t>(file_offset));
      if (r < 0 && errno == EINTR) continue;
      if (r < 0) throw_io(errno, "data write failed", file_offset);
      if (r == 0) throw_io(EIO, "data write made no progress", file_offset);
      // Short write: skip what went out and retry the rest.
      file_offset += static_cast<uint64_t>(r);
      for (size_t done = static_cast<size_t>(r); done > 0;) {
        const size_t take = std::min(done, iov[next].iov_len);
        iov[next].iov_base = static_cast<unsigned char*>(iov[next].iov_base) + take;
        iov[next].iov_len -= take;
        done -= take;
        if (iov[next].iov_len == 0) ++next;
      }
    }
    data_bytes_.fetch_add(stored * cluster_size_, std::memory_order_relaxed);
    window_.written(host_index * cluster_size_, stored * cluster_size_);
  }
  for (uint64_t i = 0; i < count; ++i) {
    uint64_t entry = kZero;
    if (nonzero[i]) entry = (host_index++ * cluster_size_) | kCopied;
    l2_[first_index + i].store(entry, std::memory_order_release);
  }
}

void Qcow2Writer::write_zeroes(uint64_t offset, uint64_t len) {
  const auto [first_index, count] = check_range(offset, len);
  claim(first_index, count);
  for (uint64_t i = 0; i < count; ++i) l2_[first_index + i].store(kZero, std::memory_order_release);
}

void Qcow2Writer::pwrite_all(const void* data, size_t len, uint64_t file_offset) {
  const auto* p = static_cast<const unsigned char*>(data);
  while (len > 0) {
    const ssize_t r = ::pwrite(fd_, p, len, static_cast<off_t>(file_offset));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) throw_io(errno, "metadata write failed", file_offset);
    if (r == 0) throw_io(EIO, "metadata write made no progress", file_offset);
    p += r;
    len -= static_cast<size_t>(r);
    file_offset += static_cast<uint64_t>(r);
  }
}

uint64_t Qcow2Writer::finish() {
  if (finished_ || fd_ < 0) throw std::logic_error("qcow2 " + path_ + ": finish() called twice");
  const uint64_t file_size = write_metadata();
  const int fd = fd_;
  fd_ = -1;
  if (::close(fd) != 0) throw_io(errno, "close failed", 0);
  finished_ = true;
  return file_size;
}

uint64_t Qcow2Writer::write_metadata() {
  const uint64_t cs = cluster_size_;
  const uint64_t per_l2 = cs / 8;
  const uint64_t l1_entries = div_round_up(guest_clusters_, per_l2);
  const bool has_backing = !opts_.backing_file.empty();
  auto disk_entry = [&](uint64_t index) {
    const uint64_t e = l2_[index].load(std::memory_order_acquire);
    if (e == kClaimed) {
      throw std::logic_error("qcow2 " + path_ + ": finish() while a write is in progress");
    }
    return e == kZero && !has_backing ? 0 : e;
  };

  // L2 tables whose entries are all 0 are left out (L1 entry 0).
  std::vector<uint64_t> l1(l1_entries, 0);
  uint64_t l2_tables = 0;
  for (uint64_t t = 0; t < l1_entries; ++t) {
    const uint64_t end = std::min(guest_clusters_, (t + 1) * per_l2);
    for (uint64_t i = t * per_l2; i < end; ++i) {
      if (disk_entry(i) != 0) {
        l1[t] = 1;
        ++l2_tables;
        break;
      }
    }
  }
  const Layout lay =
      compute_layout(next_host_index_.load(std::memory_order_acquire), l2_tables, l1_entries, cs);
  if (lay.total_clusters * cs > kOffsetMask) {
    throw std::runtime_error("qcow2 " + path_ + ": image too large");
  }

  // Every cluster that the metadata references, each exactly once.
  std::vector<uint8_t> used(lay.total_clusters, 0);
  auto mark = [&](uint64_t index) {
    if (index >= used.size() || used[index]) {
      throw std::logic_error("qcow2 " + path_ + ": host cluster " + std::to_string(index) +
                             " referenced twice");
    }
    used[index] = 1;
  };
  auto mark_range = [&](uint64_t first, uint64_t count) {
    for (uint64_t i = 0; i < count; ++i) mark(first + i);
  };
  mark(0);
  mark_range(lay.l1_index, lay.l1_clusters);
  mark_range(lay.refcount_table_index, lay.refcount_table_clusters);
  mark_range(lay.refcount_block_index, lay.refcount_blocks);

  auto out = [this](const void* p, size_t n, uint64_t at) { pwrite_all(p, n, at); };

  BatchWriter l2w(lay.l2_index * cs, out);
  uint64_t l2_index = lay.l2_index;
  for (uint64_t t = 0; t < l1_entries; ++t) {
    if (l1[t] == 0) continue;
    mark(l2_index);
    l1[t] = (l2_index++ * cs) | kCopied;
    unsigned char* p = l2w.append(cs);
    const uint64_t end = std::min(guest_clusters_, (t + 1) * per_l2);
    for (uint64_t i = t * per_l2; i < end; ++i) {
      const uint64_t e = disk_entry(i);
      if (e != 0 && e != kZero) mark((e & kOffsetMask) / cs);
      store_be64(p + 8 * (i - t * per_l2), e);
    }
  }
  l2w.flush();

  BatchWriter l1w(lay.l1_index * cs, out);
  unsigned char* l1_cluster = nullptr;
  for (uint64_t t = 0; t < l1_entries; ++t) {
    if (t % per_l2 == 0) l1_cluster = l1w.append(cs);
    store_be64(l1_cluster + 8 * (t % per_l2), l1[t]);
  }
  l1w.flush();

  const uint64_t per_block = cs * 8 / (1u << kRefcountOrder);
  BatchWriter rbw(lay.refcount_block_index * cs, out);
  for (uint64_t b = 0; b < lay.refcount_blocks; ++b) {
    unsigned char* p = rbw.append(cs);
    const uint64_t end = std::min(lay.total_clusters, (b + 1) * per_block);
    for (uint64_t i = b * per_block; i < end; ++i) {
      if (used[i]) store_be16(p + 2 * (i - b * per_block), 1);
    }
  }
  rbw.flush();

  BatchWriter rtw(lay.refcount_table_index * cs, out);
  unsigned char* rt_cluster = nullptr;
  for (uint64_t b = 0; b < lay.refcount_blocks; ++b) {
    if (b % per_l2 == 0) rt_cluster = rtw.append(cs);
    store_be64(rt_cluster + 8 * (b % per_l2), (lay.refcount_block_index + b) * cs);
  }
  rtw.flush();

  // Everything the header points to is durable before the header exists.
  if (::fdatasync(fd_) != 0) throw_io(errno, "fdatasync failed", 0);
  const std::vector<unsigned char> header = encode_header(
      lay.l1_index * cs, l1_entries, lay.refcount_table_index * cs, lay.refcount_table_clusters);
  pwrite_all(header.data(), header.size(), 0);
  if (::fdatasync(fd_) != 0) throw_io(errno, "fdatasync failed", 0);
  return lay.total_clusters * cs;
}

std::vector<unsigned char> Qcow2Writer::encode_header(uint64_t l1_offset, uint64_t l1_entries,
                                                      uint64_t refcount_table_offset,
                                                      uint64_t refcount_table_clusters) const {
  std::vector<unsigned char> h(cluster_size_, 0);
  unsigned char* p = h.data();
  store_be32(p + 0, kMagic);
  store_be32(p + 4, kVersion);
  store_be32(p + 20, opts_.cluster_bits);
  store_be64(p + 24, header_size_);
  // 32: crypt_method 0
  store_be32(p + 36, static_cast<uint32_t>(l1_entries));
  store_be64(p + 40, l1_offset);
  store_be64(p + 48, refcount_table_offset);
  store_be32(p + 56, static_cast<uint32_t>(refcount_table_clusters));
  // 60: nb_snapshots, 64: snapshots_offset, 72..95: feature bits, all 0
  store_be32(p + 96, kRefcountOrder);
  store_be32(p + 100, kHeaderLength);
  // 104: compression_type 0 (zlib) and padding
  size_t at = kHeaderLength;
  const std::string& name = opts_.backing_file;
  const std::string& format = opts_.backing_format;
  if (!name.empty() && !format.empty()) {
    store_be32(p + at, kExtBackingFormat);
    store_be32(p + at + 4, static_cast<uint32_t>(format.size()));
    std::memcpy(p + at + 8, format.data(), format.size());
    at += 8 + round_up8(format.size());
  }
  store_be32(p + at, kExtEnd);
  store_be32(p + at + 4, 0);
  at += 8;
  if (!name.empty()) {
    store_be64(p + 8, at);
    store_be32(p + 16, static_cast<uint32_t>(name.size()));
    std::memcpy(p + at, name.data(), name.size());
  }
  return h;
}

}  // namespace fleece::backup

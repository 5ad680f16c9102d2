// SPDX-License-Identifier: MIT
// Design notes
//
// One descriptor (fd_) is shared by every thread; all I/O is positional
// (pread/pwrite/preadv2/pwritev2), so no seek position is shared. Short
// transfers are continued and EINTR is retried. Reading past the end of a
// regular file (only if it shrank under us) yields zeroes up to size().
//
// Fast paths the kernel may refuse are tried optimistically and switched off
// for the life of the device (relaxed atomics) on EOPNOTSUPP: RWF_NOWAIT reads
// and writes, RWF_DSYNC, hole punching, FALLOC_FL_ZERO_RANGE, BLKZEROOUT.
// Measured on Linux 6.18 / ext4: buffered RWF_NOWAIT reads work (and return
// short counts when only part of the range is cached), buffered RWF_NOWAIT
// writes fail with EOPNOTSUPP, so try_write() turns into "always would block"
// after its first call there.
//
// try_read() and try_write() are all or nothing. A NOWAIT write that stops
// part-way has already changed some bytes; the caller then calls write() for
// the whole range, which rewrites the same bytes (writes are idempotent), so
// the result is the same as one write(). Concurrent readers may see the mix,
// as they may during any write in flight.
//
// O_DIRECT: requests whose offset, length or buffer are not 4 KiB aligned go
// through an aligned bounce buffer in windows of at most 1 MiB. An unaligned
// write is a read-modify-write of its first and last blocks; it holds
// direct_mu_ exclusively so it cannot undo a concurrent write to the same
// blocks, while aligned writes, zeroing and discards hold it shared. This is
// the only lock held across I/O; it serialises only the rare unaligned path.
// If size() is not a multiple of 4 KiB, the tail past the last aligned block
// goes through tail_fd_ (buffered), because O_DIRECT cannot write a partial
// block without extending the file. fdatasync on either descriptor covers
// the whole inode.
//
// Zeroing of regular files: punch a hole when may_trim, else
// FALLOC_FL_ZERO_RANGE (which keeps blocks allocated, as unwritten extents;
// note that SEEK_HOLE on ext4 reports unwritten extents as holes), else write
// zero buffers unless the caller asked for a fast zero (then ENOTSUP). Block
// devices: PUNCH_HOLE|KEEP_SIZE (the kernel's no-fallback zero-out, so it is
// fast when it works) for may_trim, then BLKZEROOUT, then zero buffers;
// BLKZEROOUT may itself fall back to writing zeroes, so it never serves fast.
#include "block/file_device.hpp"

#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <mutex>

namespace fleeced::block {
namespace {

constexpr uint64_t kDirectAlign = 4096;
constexpr size_t kChunk = 1 << 20;  // bounce window and zero-buffer chunk
constexpr size_t kMaxExtents = 1024;

// Zeroes for write_zero_buffer, aligned for O_DIRECT. Never written: not
// const so that it lives in .bss (mapped to the zero page) instead of adding
// 1 MiB to the binary.
alignas(kDirectAlign) std::byte zero_chunk[kChunk];

std::error_code errno_code(int err) { return {err, std::generic_category()}; }
std::error_code last_error() { return errno_code(errno); }
std::error_code would_block() { return std::make_error_code(std::errc::operation_would_block); }

bool in_range(uint64_t offset, uint64_t length, uint64_t size) {
  return length <= size && offset <= size - length;
}

bool is_unsupported(int err) { return err == EOPNOTSUPP || err == ENOSYS || err == ENOTTY; }

uint64_t align_down(uint64_t value, uint64_t align) { return value - value % align; }
uint64_t align_up(uint64_t value, uint64_t align) { return align_down(value + align - 1, align); }
bool is_aligned(uint64_t value) { return value % kDirectAlign == 0; }
bool is_aligned(const void* p) { return is_aligned(reinterpret_cast<uintptr_t>(p)); }

struct FreeDeleter {
  void operator()(std::byte* p) const { std::free(p); }
};
using AlignedBuffer = std::unique_ptr<std::byte, FreeDeleter>;

AlignedBuffer allocate_aligned(size_t length) {
  void* p = nullptr;
  if (posix_memalign(&p, kDirectAlign, length) != 0) return nullptr;
  return AlignedBuffer(static_cast<std::byte*>(p));
}

// Reads exactly length bytes; bytes past end of file read as zeroes. With
// O_DIRECT a short read cannot be continued at an unaligned offset, so it is
// taken as end of file at once.
std::error_code pread_full(int fd, std::byte* buf, size_t length, uint64_t offset, bool direct) {
  while (length > 0) {
    ssize_t n = ::pread(fd, buf, length, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      return last_error();
    }
    if (n == 0 || (direct && static_cast<size_t>(n) < length)) {
      std::memset(buf + n, 0, length - static_cast<size_t>(n));
      return {};
    }
    buf += n;
    length -= static_cast<size_t>(n);
    offset += static_cast<uint64_t>(n);
  }
  return {};
}

// Writes exactly length bytes with pwritev2(flags).
std::error_code pwrite_full(int fd, const std::byte* buf, size_t length, uint64_t offset,
                            int flags) {
  while (length > 0) {
    iovec iov{const_cast<std::byte*>(buf), length};
    ssize_t n = ::pwritev2(fd, &iov, 1, static_cast<off_t>(offset), flags);
    if (n < 0) {
      if (errno == EINTR) continue;
      return last_error();
    }
    if (n == 0) return errno_code(EIO);  // no progress; do not spin
    buf += n;
    length -= static_cast<size_t>(n);
    offset += static_cast<uint64_t>(n);
  }
  return {};
}

std::error_code sync_data(int fd) {
  while (::fdatasync(fd) != 0) {
    if (errno != EINTR) return last_error();
  }
  return {};
}

int fallocate_retry(int fd, int mode, uint64_t offset, uint64_t length) {
  int r;
  do {
    r = ::fallocate(fd, mode, static_cast<off_t>(offset), static_cast<off_t>(length));
  } while (r != 0 && errno == EINTR);
  return r;
}

int ioctl_range(int fd, unsigned long request, uint64_t offset, uint64_t length) {
  uint64_t range[2] = {offset, length};
  int r;
  do {
    r = ::ioctl(fd, request, range);
  } while (r != 0 && errno == EINTR);
  return r;
}

// Appends [offset, offset+length) with flags, merging with the previous
// extent if that one was appended by this call (index >= first).
void append_extent(std::vector<Extent>& out, size_t first, uint64_t offset, uint64_t length,
                   uint32_t flags) {
  if (out.size() > first) {
    Extent& last = out.back();
    if (last.flags == flags && last.offset + last.length == offset) {
      last.length += length;
      return;
    }
  }
  out.push_back(Extent{offset, length, flags});
}

// Opens a second, buffered descriptor on the file behind fd (same inode).
int reopen_buffered(const std::string& path, int fd, int flags, std::error_code& ec) {
  int tail = ::open(path.c_str(), (flags & ~O_DIRECT) | O_CLOEXEC);
  if (tail < 0) {
    ec = last_error();
    return -1;
  }
  struct stat a {};
  struct stat b {};
  if (::fstat(fd, &a) != 0 || ::fstat(tail, &b) != 0) {
    ec = last_error();
  } else if (a.st_dev != b.st_dev || a.st_ino != b.st_ino) {
    ec = errno_code(ESTALE);  // the path was replaced between the two opens
  }
  if (ec) {
    ::close(tail);
    return -1;
  }
  return tail;
}

}  // namespace

std::shared_ptr<FileDevice> FileDevice::open(const FileOptions& options, std::error_code& ec) {
  ec.clear();
  std::shared_ptr<FileDevice> dev(new FileDevice());
  dev->options_ = options;
  int flags = (options.writable ? O_RDWR : O_RDONLY) | O_CLOEXEC;
  if (options.direct) flags |= O_DIRECT;
  do {
    dev->fd_ = ::open(options.path.c_str(), flags);
  } while (dev->fd_ < 0 && errno == EINTR);
  if (dev->fd_ < 0) {
    ec = last_error();
    return nullptr;
  }
  struct stat st {};
  if (::fstat(dev->fd_, &st) != 0) {
    ec = last_error();
    return nullptr;
  }
  if (S_ISREG(st.st_mode)) {
    dev->size_ = static_cast<uint64_t>(st.st_size);
  } else if (S_ISBLK(st.st_mode)) {
    dev->is_block_device_ = true;
    int sector = 0;
    if (::ioctl(dev->fd_, BLKGETSIZE64, &dev->size_) != 0 ||
        ::ioctl(dev->fd_, BLKSSZGET, &sector) != 0) {
      ec = last_error();
      return nullptr;
    }
    if (sector > 0) dev->sector_size_ = static_cast<uint32_t>(sector);
  } else {
    ec = errno_code(S_ISDIR(st.st_mode) ? EISDIR : EINVAL);
    return nullptr;
  }
  if (options.direct) {
    dev->direct_limit_ = align_down(dev->size_, kDirectAlign);
    if (dev->direct_limit_ != dev->size_) {
      dev->tail_fd_ = reopen_buffered(options.path, dev->fd_, flags, ec);
      if (ec) return nullptr;
    }
  }
  Capabilities& caps = dev->caps_;
  caps.read_only = !options.writable;
  caps.can_flush = true;
  caps.can_fua = true;
  caps.can_trim = options.writable && options.discard;
  caps.can_zero = options.writable;
  caps.can_fast_zero = options.writable;
  caps.can_extents = !dev->is_block_device_;
  caps.can_cache = true;
  caps.can_multi_conn = true;
  caps.serial_writes = options.writable && !options.direct && !dev->is_block_device_;
  return dev;
}

FileDevice::~FileDevice() {
  if (tail_fd_ >= 0) ::close(tail_fd_);
  if (fd_ >= 0) ::close(fd_);
}

std::error_code FileDevice::read(uint64_t offset, std::span<std::byte> out) {
  if (!in_range(offset, out.size(), size_)) return errno_code(EINVAL);
  if (out.empty()) return {};
  if (options_.direct) return read_direct(offset, out);
  return pread_full(fd_, out.data(), out.size(), offset, false);
}

std::error_code FileDevice::try_read(uint64_t offset, std::span<std::byte> out) {
  if (!in_range(offset, out.size(), size_)) return errno_code(EINVAL);
  if (out.empty()) return {};
  // An O_DIRECT read always goes to storage; RWF_NOWAIT would not avoid that.
  if (options_.direct || !nowait_read_ok_.load(std::memory_order_relaxed)) return would_block();
  std::byte* buf = out.data();
  size_t length = out.size();
  while (length > 0) {
    iovec iov{buf, length};
    ssize_t n = ::preadv2(fd_, &iov, 1, static_cast<off_t>(offset), RWF_NOWAIT);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN) return would_block();
      if (errno == EOPNOTSUPP || errno == EINVAL) {
        nowait_read_ok_.store(false, std::memory_order_relaxed);
        return would_block();
      }
      return last_error();
    }
    if (n == 0) {  // end of file (the file shrank): zeroes, as read() gives
      std::memset(buf, 0, length);
      return {};
    }
    // A short count means only part is cached; asking again for the rest
    // either finds it now or says EAGAIN (all or nothing for the caller).
    buf += n;
    length -= static_cast<size_t>(n);
    offset += static_cast<uint64_t>(n);
  }
  return {};
}

std::error_code FileDevice::write(uint64_t offset, std::span<const std::byte> data, bool fua) {
  if (!options_.writable) return errno_code(EROFS);
  if (!in_range(offset, data.size(), size_)) return errno_code(ENOSPC);
  if (data.empty()) return fua ? flush() : std::error_code();
  if (!options_.direct) return write_buffered(fd_, offset, data, fua);
  std::error_code ec = write_direct(offset, data);
  if (!ec && fua) ec = flush();
  return ec;
}

std::error_code FileDevice::write_buffered(int fd, uint64_t offset, std::span<const std::byte> data,
                                           bool fua) {
  if (fua && dsync_ok_.load(std::memory_order_relaxed)) {
    std::error_code ec = pwrite_full(fd, data.data(), data.size(), offset, RWF_DSYNC);
    if (ec.value() != EOPNOTSUPP) return ec;
    dsync_ok_.store(false, std::memory_order_relaxed);
  }
  std::error_code ec = pwrite_full(fd, data.data(), data.size(), offset, 0);
  if (!ec && fua) ec = sync_data(fd);
  return ec;
}

std::error_code FileDevice::try_write(uint64_t offset, std::span<const std::byte> data) {
  if (!options_.writable) return errno_code(EROFS);
  if (!in_range(offset, data.size(), size_)) return errno_code(ENOSPC);
  if (data.empty()) return {};
  if (options_.direct || !nowait_write_ok_.load(std::memory_order_relaxed)) return would_block();
  const std::byte* buf = data.data();
  size_t length = data.size();
  while (length > 0) {
    iovec iov{const_cast<std::byte*>(buf), length};
    ssize_t n = ::pwritev2(fd_, &iov, 1, static_cast<off_t>(offset), RWF_NOWAIT);
    if (n < 0) {
      if (errno == EINTR) continue;
      // Bytes already written stay written; write() of the whole range
      // afterwards rewrites them (see Design notes).
      if (errno == EAGAIN) return would_block();
      if (errno == EOPNOTSUPP || errno == EINVAL) {
        nowait_write_ok_.store(false, std::memory_order_relaxed);
        return would_block();
      }
      return last_error();
    }
    if (n == 0) return would_block();
    buf += n;
    length -= static_cast<size_t>(n);
    offset += static_cast<uint64_t>(n);
  }
  return {};
}

std::error_code FileDevice::read_direct(uint64_t offset, std::span<std::byte> out) {
  uint64_t end = offset + out.size();
  if (end > direct_limit_) {
    uint64_t split = std::max(offset, direct_limit_);
    std::error_code ec =
        pread_full(tail_fd_, out.data() + (split - offset), end - split, split, false);
    if (ec || split == offset) return ec;
    out = out.first(split - offset);
    end = split;
  }
  if (is_aligned(offset) && is_aligned(out.size()) && is_aligned(out.data())) {
    return pread_full(fd_, out.data(), out.size(), offset, true);
  }
  uint64_t first = align_down(offset, kDirectAlign);
  uint64_t last = align_up(end, kDirectAlign);
  AlignedBuffer bounce = allocate_aligned(std::min<uint64_t>(kChunk, last - first));
  if (!bounce) return errno_code(ENOMEM);
  for (uint64_t pos = offset; pos < end;) {
    uint64_t window = align_down(pos, kDirectAlign);
    uint64_t window_end = std::min<uint64_t>(window + kChunk, last);
    std::error_code ec = pread_full(fd_, bounce.get(), window_end - window, window, true);
    if (ec) return ec;
    uint64_t copy_end = std::min(window_end, end);
    std::memcpy(out.data() + (pos - offset), bounce.get() + (pos - window), copy_end - pos);
    pos = copy_end;
  }
  return {};
}

std::error_code FileDevice::write_direct(uint64_t offset, std::span<const std::byte> data) {
  uint64_t end = offset + data.size();
  if (end > direct_limit_) {
    uint64_t split = std::max(offset, direct_limit_);
    std::error_code ec = write_buffered(tail_fd_, split, data.subspan(split - offset), false);
    if (ec || split == offset) return ec;
    data = data.first(split - offset);
    end = split;
  }
  bool aligned_range = is_aligned(offset) && is_aligned(data.size());
  if (aligned_range && is_aligned(data.data())) {
    std::shared_lock lock(direct_mu_);
    return pwrite_full(fd_, data.data(), data.size(), offset, 0);
  }
  uint64_t first = align_down(offset, kDirectAlign);
  uint64_t last = align_up(end, kDirectAlign);
  AlignedBuffer bounce = allocate_aligned(std::min<uint64_t>(kChunk, last - first));
  if (!bounce) return errno_code(ENOMEM);
  // Only a partial first or last block needs read-modify-write and the
  // exclusive lock; an unaligned buffer alone just needs copying.
  std::shared_lock<std::shared_mutex> shared;
  std::unique_lock<std::shared_mutex> exclusive;
  if (aligned_range) {
    shared = std::shared_lock(direct_mu_);
  } else {
    exclusive = std::unique_lock(direct_mu_);
  }
  for (uint64_t window = first; window < last; window += kChunk) {
    std::error_code ec = write_direct_window(window, offset, data, bounce.get());
    if (ec) return ec;
  }
  return {};
}

// Writes the aligned window [window, min(window + kChunk, end rounded up))
// through bounce, first reading back partially covered first/last blocks.
std::error_code FileDevice::write_direct_window(uint64_t window, uint64_t offset,
                                                std::span<const std::byte> data,
                                                std::byte* bounce) {
  uint64_t end = offset + data.size();
  uint64_t window_end = std::min<uint64_t>(window + kChunk, align_up(end, kDirectAlign));
  uint64_t copy_start = std::max(window, offset);
  uint64_t copy_end = std::min(window_end, end);
  if (copy_start > window) {
    std::error_code ec = pread_full(fd_, bounce, kDirectAlign, window, true);
    if (ec) return ec;
  }
  uint64_t last_block = window_end - kDirectAlign;
  if (copy_end < window_end && !(copy_start > window && last_block == window)) {
    std::error_code ec =
        pread_full(fd_, bounce + (last_block - window), kDirectAlign, last_block, true);
    if (ec) return ec;
  }
  std::memcpy(bounce + (copy_start - window), data.data() + (copy_start - offset),
              copy_end - copy_start);
  return pwrite_full(fd_, bounce, window_end - window, window, 0);
}

std::shared_lock<std::shared_mutex> FileDevice::direct_shared_lock() {
  if (!options_.direct) return {};
  return std::shared_lock(direct_mu_);
}

std::error_code FileDevice::write_zeroes(uint64_t offset, uint64_t length, ZeroFlags flags) {
  if (!options_.writable) return errno_code(EROFS);
  if (!in_range(offset, length, size_)) return errno_code(ENOSPC);
  std::error_code ec;
  if (length > 0) {
    ec = is_block_device_ ? zero_block_device(offset, length, flags)
                          : zero_regular(offset, length, flags);
  }
  if (!ec && flags.fua) ec = flush();
  return ec;
}

std::error_code FileDevice::zero_regular(uint64_t offset, uint64_t length, ZeroFlags flags) {
  if (flags.may_trim && punch_ok_.load(std::memory_order_relaxed)) {
    auto lock = direct_shared_lock();
    if (fallocate_retry(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0) {
      return {};
    }
    if (!is_unsupported(errno)) return last_error();
    punch_ok_.store(false, std::memory_order_relaxed);
  }
  if (zero_range_ok_.load(std::memory_order_relaxed)) {
    auto lock = direct_shared_lock();
    if (fallocate_retry(fd_, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length) == 0) {
      return {};
    }
    if (!is_unsupported(errno)) return last_error();
    zero_range_ok_.store(false, std::memory_order_relaxed);
  }
  if (flags.fast) return errno_code(ENOTSUP);
  return write_zero_buffer(offset, length);
}

std::error_code FileDevice::zero_block_device(uint64_t offset, uint64_t length, ZeroFlags flags) {
  bool aligned = (offset | length) % sector_size_ == 0;
  if (aligned && flags.may_trim && punch_ok_.load(std::memory_order_relaxed)) {
    // On a block device this is a zero-out that never falls back to writing.
    auto lock = direct_shared_lock();
    if (fallocate_retry(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0) {
      return {};
    }
    if (!is_unsupported(errno)) return last_error();
    punch_ok_.store(false, std::memory_order_relaxed);
  }
  if (flags.fast) return errno_code(ENOTSUP);
  if (aligned && zeroout_ok_.load(std::memory_order_relaxed)) {
    auto lock = direct_shared_lock();
    if (ioctl_range(fd_, BLKZEROOUT, offset, length) == 0) return {};
    if (!is_unsupported(errno)) return last_error();
    zeroout_ok_.store(false, std::memory_order_relaxed);
  }
  return write_zero_buffer(offset, length);
}

std::error_code FileDevice::write_zero_buffer(uint64_t offset, uint64_t length) {
  while (length > 0) {
    // Chunks after the first start on a kChunk boundary, so with O_DIRECT
    // they take the aligned path straight from the static zero page.
    uint64_t n = std::min<uint64_t>(length, kChunk - offset % kChunk);
    std::error_code ec = write(offset, std::span<const std::byte>(zero_chunk, n), false);
    if (ec) return ec;
    offset += n;
    length -= n;
  }
  return {};
}

std::error_code FileDevice::discard(uint64_t offset, uint64_t length, bool fua) {
  if (!options_.writable) return errno_code(EROFS);
  if (!in_range(offset, length, size_)) return errno_code(ENOSPC);
  if (options_.discard && length > 0) {
    auto lock = direct_shared_lock();
    if (is_block_device_) {
      // Discard is advisory: shrink to whole sectors and ignore "unsupported".
      uint64_t first = align_up(offset, sector_size_);
      uint64_t last = align_down(offset + length, sector_size_);
      if (first < last && ioctl_range(fd_, BLKDISCARD, first, last - first) != 0 &&
          !is_unsupported(errno)) {
        return last_error();
      }
    } else if (punch_ok_.load(std::memory_order_relaxed)) {
      if (fallocate_retry(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0) {
        if (!is_unsupported(errno)) return last_error();
        punch_ok_.store(false, std::memory_order_relaxed);
      }
    }
  }
  return fua ? flush() : std::error_code();
}

std::error_code FileDevice::flush() { return sync_data(fd_); }

std::error_code FileDevice::cache(uint64_t offset, uint64_t length) {
  if (offset >= size_) return {};
  length = std::min(length, size_ - offset);
  int err = ::posix_fadvise(fd_, static_cast<off_t>(offset), static_cast<off_t>(length),
                            POSIX_FADV_WILLNEED);
  return err == 0 ? std::error_code() : errno_code(err);
}

std::error_code FileDevice::extents(uint64_t offset, uint64_t length, std::vector<Extent>& out) {
  if (length == 0 || offset >= size_) return errno_code(EINVAL);
  length = std::min(length, size_ - offset);
  if (is_block_device_) {
    out.push_back(Extent{offset, length, 0});
    return {};
  }
  return extents_regular(offset, length, out);
}

// Walks SEEK_DATA/SEEK_HOLE. Both consult the page cache, so dirty data in
// unwritten extents is reported as data. A racing punch can make a data
// offset a hole between the two calls; the loop then simply asks again.
std::error_code FileDevice::extents_regular(uint64_t offset, uint64_t length,
                                            std::vector<Extent>& out) {
  constexpr uint32_t kHole = kExtentHole | kExtentZero;
  const size_t first = out.size();
  const uint64_t end = offset + length;
  uint64_t pos = offset;
  for (size_t steps = 0; pos < end && out.size() - first < kMaxExtents && steps < 4 * kMaxExtents;
       ++steps) {
    off_t data = ::lseek(fd_, static_cast<off_t>(pos), SEEK_DATA);
    if (data < 0) {
      if (errno != ENXIO) return last_error();
      data = static_cast<off_t>(end);  // hole up to end of file
    }
    uint64_t data_start = std::min(static_cast<uint64_t>(data), end);
    if (data_start > pos) {
      append_extent(out, first, pos, data_start - pos, kHole);
      pos = data_start;
      continue;
    }
    off_t hole = ::lseek(fd_, static_cast<off_t>(pos), SEEK_HOLE);
    if (hole < 0) {
      if (errno != ENXIO) return last_error();
      continue;  // the file shrank under us; SEEK_DATA will say hole
    }
    uint64_t hole_start = std::min(static_cast<uint64_t>(hole), end);
    if (hole_start > pos) {
      append_extent(out, first, pos, hole_start - pos, 0);
      pos = hole_start;
    }
  }
  if (out.size() == first) {
    // Only if the file kept changing under us: data is always a safe answer.
    out.push_back(Extent{offset, length, 0});
  }
  return {};
}

}  // namespace fleeced::block

// SPDX-License-Identifier: MIT
// FileDevice serves a raw image file or a block device through one shared
// file descriptor, so every connection sees one page cache (multi-conn safe).
// Thread-safe: all methods use positional I/O on the shared descriptor.
#pragma once

#include <atomic>
#include <memory>
#include <shared_mutex>
#include <string>
#include <system_error>
#include <vector>

#include "block/device.hpp"

namespace fleeced::block {

struct FileOptions {
  std::string path;
  bool writable = false;
  bool direct = false;  // O_DIRECT (unaligned requests use bounce buffers)
  bool discard = true;  // honour discard with hole punching
};

class FileDevice final : public Device {
 public:
  // Opens the file. Errors: the errno of open/fstat/ioctl.
  static std::shared_ptr<FileDevice> open(const FileOptions& options, std::error_code& ec);
  ~FileDevice() override;

  uint64_t size() const override { return size_; }
  Capabilities capabilities() const override { return caps_; }
  const std::string& path() const { return options_.path; }

  // Errors (all requests): EINVAL for reads and ENOSPC for changes past
  // size(); EROFS for changes on a read-only device (the fd is not touched).
  std::error_code read(uint64_t offset, std::span<std::byte> out) override;
  // preadv2(RWF_NOWAIT): succeeds only if every byte is in the page cache.
  // Always would_block with O_DIRECT.
  std::error_code try_read(uint64_t offset, std::span<std::byte> out) override;
  std::error_code write(uint64_t offset, std::span<const std::byte> data, bool fua) override;
  // pwritev2(RWF_NOWAIT). On would_block part of the range may already hold
  // the new data; write() of the whole range afterwards gives the same result
  // as one write(). Always would_block with O_DIRECT, and on filesystems
  // without buffered NOWAIT writes (ext4 on Linux 6.18).
  std::error_code try_write(uint64_t offset, std::span<const std::byte> data) override;
  // Punches a hole (flags.may_trim), else FALLOC_FL_ZERO_RANGE (BLKZEROOUT on
  // block devices), else writes zeroes. Errors: ENOTSUP with flags.fast when
  // only writing zeroes would do.
  std::error_code write_zeroes(uint64_t offset, uint64_t length, ZeroFlags flags) override;
  // Punches a hole (BLKDISCARD on block devices) if options.discard; success
  // if the filesystem cannot.
  std::error_code discard(uint64_t offset, uint64_t length, bool fua) override;
  std::error_code flush() override;
  std::error_code cache(uint64_t offset, uint64_t length) override;
  std::error_code extents(uint64_t offset, uint64_t length, std::vector<Extent>& out) override;

 private:
  FileDevice() = default;
  std::error_code read_direct(uint64_t offset, std::span<std::byte> out);
  std::error_code write_direct(uint64_t offset, std::span<const std::byte> data);
  std::error_code write_zero_buffer(uint64_t offset, uint64_t length);
  std::error_code write_buffered(int fd, uint64_t offset, std::span<const std::byte> data,
                                 bool fua);
  std::error_code write_direct_window(uint64_t window, uint64_t offset,
                                      std::span<const std::byte> data, std::byte* bounce);
  std::error_code zero_regular(uint64_t offset, uint64_t length, ZeroFlags flags);
  std::error_code zero_block_device(uint64_t offset, uint64_t length, ZeroFlags flags);
  std::error_code extents_regular(uint64_t offset, uint64_t length, std::vector<Extent>& out);
  std::shared_lock<std::shared_mutex> direct_shared_lock();

  // Immutable after open().
  FileOptions options_;
  int fd_ = -1;
  bool is_block_device_ = false;
  uint64_t size_ = 0;
  Capabilities caps_;
  uint32_t sector_size_ = 512;  // block devices: logical sector size (BLKSSZGET)
  // With O_DIRECT: [0, direct_limit_) is served through fd_, the unaligned tail
  // [direct_limit_, size_) through tail_fd_, a buffered descriptor on the same file.
  uint64_t direct_limit_ = 0;
  int tail_fd_ = -1;
  // With O_DIRECT: held shared by aligned writes, zeroing and discards, and
  // exclusively by read-modify-write of unaligned writes (the rare path).
  std::shared_mutex direct_mu_;
  // Cleared (relaxed atomics) when the kernel says a fast path is unsupported.
  std::atomic<bool> nowait_read_ok_{true};
  std::atomic<bool> nowait_write_ok_{true};
  std::atomic<bool> punch_ok_{true};
  std::atomic<bool> zero_range_ok_{true};
  std::atomic<bool> dsync_ok_{true};    // pwritev2(RWF_DSYNC)
  std::atomic<bool> zeroout_ok_{true};  // ioctl(BLKZEROOUT)
};

}  // namespace fleeced::block

// SPDX-License-Identifier: MIT
// The block device interface every export stands on (shape after nbdkit's
// struct backend): byte offsets and lengths, errors as errno values in a
// std::error_code (generic_category). Devices are shared by all connections
// of an export; every method is thread-safe unless noted.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <system_error>
#include <vector>

namespace fleeced::block {

// Allocation state of a range, as base:allocation reports it.
inline constexpr uint32_t kExtentHole = 1u << 0;  // not allocated
inline constexpr uint32_t kExtentZero = 1u << 1;  // reads as zeroes

struct Extent {
  uint64_t offset = 0;
  uint64_t length = 0;
  uint32_t flags = 0;  // kExtentHole | kExtentZero
};

struct ZeroFlags {
  bool may_trim = false;  // the range may be deallocated (no NO_HOLE)
  bool fast = false;      // fail with ENOTSUP unless zeroing is cheap
  bool fua = false;       // durable before returning
};

// Capabilities, asked once when an export is created.
struct Capabilities {
  bool read_only = false;
  bool can_flush = true;
  bool can_fua = true;
  bool can_trim = false;
  bool can_zero = false;
  bool can_fast_zero = false;
  bool can_extents = false;
  bool can_cache = false;
  bool can_multi_conn = true;  // all connections see one consistent state
  // Concurrent writes gain nothing and only contend (buffered writes to one
  // regular file all take its inode lock): a caller may run them one at a
  // time, which on a busy machine costs less CPU than threads spinning on
  // that lock.
  bool serial_writes = false;
};

class Device {
 public:
  virtual ~Device() = default;

  // Size in bytes; fixed for the life of the device.
  virtual uint64_t size() const = 0;
  virtual Capabilities capabilities() const = 0;

  // Reads out.size() bytes at offset. Errors: EIO, EINVAL (out of range).
  virtual std::error_code read(uint64_t offset, std::span<std::byte> out) = 0;
  // Like read, but returns std::errc::operation_would_block instead of
  // waiting for storage (e.g. data not in the page cache). Safe to call on
  // an event-loop thread. A short read is never reported: all or nothing.
  virtual std::error_code try_read(uint64_t offset, std::span<std::byte> out);

  // Writes data at offset; with fua, durable before returning.
  virtual std::error_code write(uint64_t offset, std::span<const std::byte> data, bool fua) = 0;
  // Non-blocking write attempt; operation_would_block if it might wait.
  virtual std::error_code try_write(uint64_t offset, std::span<const std::byte> data);

  // Makes [offset, offset+length) read as zeroes. Errors: ENOTSUP with
  // flags.fast when zeroing would be as slow as writing.
  virtual std::error_code write_zeroes(uint64_t offset, uint64_t length, ZeroFlags flags) = 0;
  // Advisory deallocation; contents afterwards are unspecified.
  virtual std::error_code discard(uint64_t offset, uint64_t length, bool fua) = 0;
  // Makes every completed write durable.
  virtual std::error_code flush() = 0;
  // Prefetch hint; failures are not errors for the client.
  virtual std::error_code cache(uint64_t offset, uint64_t length);

  // Appends extents describing [offset, offset+length): consecutive, starting
  // at offset, never past offset+length, at least one on success. May stop
  // before offset+length (the caller asks again).
  virtual std::error_code extents(uint64_t offset, uint64_t length, std::vector<Extent>& out);
};

using DevicePtr = std::shared_ptr<Device>;

}  // namespace fleeced::block

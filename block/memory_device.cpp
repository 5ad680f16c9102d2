// SPDX-License-Identifier: MIT
// MemoryDevice: a zero-filled byte vector behind one mutex. Allocation is not
// tracked separately: extents() reports every 4 KiB block that reads as all
// zeroes as a hole, so discard and write_zeroes (which zero the bytes) show up
// as holes, and so does a write of zeroes.
#include "block/memory_device.hpp"

#include <algorithm>
#include <cerrno>
#include <cstring>

namespace fleeced::block {
namespace {

constexpr uint64_t kBlockSize = 4096;
constexpr size_t kMaxExtents = 1024;

std::error_code errno_code(int err) { return {err, std::generic_category()}; }

bool in_range(uint64_t offset, uint64_t length, uint64_t size) {
  return length <= size && offset <= size - length;
}

bool all_zero(const std::byte* p, size_t length) {
  return std::all_of(p, p + length, [](std::byte b) { return b == std::byte{0}; });
}

}  // namespace

MemoryDevice::MemoryDevice(uint64_t size, bool read_only)
    : read_only_(read_only), data_(size, std::byte{0}) {}

Capabilities MemoryDevice::capabilities() const {
  Capabilities caps;
  caps.read_only = read_only_;
  caps.can_flush = true;
  caps.can_fua = true;
  caps.can_trim = !read_only_;
  caps.can_zero = !read_only_;
  caps.can_fast_zero = !read_only_;
  caps.can_extents = true;
  caps.can_cache = false;
  caps.can_multi_conn = true;
  return caps;
}

std::error_code MemoryDevice::read(uint64_t offset, std::span<std::byte> out) {
  if (!in_range(offset, out.size(), data_.size())) return errno_code(EINVAL);
  if (out.empty()) return {};
  std::lock_guard lock(mu_);
  std::memcpy(out.data(), data_.data() + offset, out.size());
  return {};
}

std::error_code MemoryDevice::try_read(uint64_t offset, std::span<std::byte> out) {
  return read(offset, out);  // never waits for storage
}

std::error_code MemoryDevice::write(uint64_t offset, std::span<const std::byte> data,
                                    bool /*fua*/) {
  if (read_only_) return errno_code(EROFS);
  if (!in_range(offset, data.size(), data_.size())) return errno_code(ENOSPC);
  if (data.empty()) return {};
  std::lock_guard lock(mu_);
  std::memcpy(data_.data() + offset, data.data(), data.size());
  return {};
}

std::error_code MemoryDevice::write_zeroes(uint64_t offset, uint64_t length, ZeroFlags /*flags*/) {
  if (read_only_) return errno_code(EROFS);
  if (!in_range(offset, length, data_.size())) return errno_code(ENOSPC);
  if (length == 0) return {};
  std::lock_guard lock(mu_);
  std::memset(data_.data() + offset, 0, length);
  return {};
}

std::error_code MemoryDevice::discard(uint64_t offset, uint64_t length, bool /*fua*/) {
  return write_zeroes(offset, length, ZeroFlags{.may_trim = true});
}

std::error_code MemoryDevice::extents(uint64_t offset, uint64_t length, std::vector<Extent>& out) {
  const uint64_t size = data_.size();
  if (length == 0 || offset >= size) return errno_code(EINVAL);
  const uint64_t end = offset + std::min(length, size - offset);
  const size_t first = out.size();
  std::lock_guard lock(mu_);
  for (uint64_t pos = offset; pos < end;) {
    // Classify the whole 4 KiB block containing pos, report its clipped part.
    uint64_t block = pos - pos % kBlockSize;
    uint64_t block_end = std::min(block + kBlockSize, size);
    uint32_t flags =
        all_zero(data_.data() + block, block_end - block) ? kExtentHole | kExtentZero : 0;
    uint64_t next = std::min(block_end, end);
    if (out.size() > first && out.back().flags == flags) {
      out.back().length += next - pos;
    } else if (out.size() - first == kMaxExtents) {
      break;  // the caller asks again from here
    } else {
      out.push_back(Extent{pos, next - pos, flags});
    }
    pos = next;
  }
  return {};
}

}  // namespace fleeced::block

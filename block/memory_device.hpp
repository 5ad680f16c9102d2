// SPDX-License-Identifier: MIT
// MemoryDevice keeps a disk in RAM (tests, demos), with zero tracking at 4 KiB
// granularity so extents report holes. Thread-safe (one mutex).
#pragma once

#include <mutex>
#include <vector>

#include "block/device.hpp"

namespace fleeced::block {

class MemoryDevice final : public Device {
 public:
  explicit MemoryDevice(uint64_t size, bool read_only = false);
  uint64_t size() const override { return data_.size(); }
  Capabilities capabilities() const override;

  std::error_code read(uint64_t offset, std::span<std::byte> out) override;
  std::error_code try_read(uint64_t offset, std::span<std::byte> out) override;
  std::error_code write(uint64_t offset, std::span<const std::byte> data, bool fua) override;
  std::error_code write_zeroes(uint64_t offset, uint64_t length, ZeroFlags flags) override;
  std::error_code discard(uint64_t offset, uint64_t length, bool fua) override;
  std::error_code flush() override { return {}; }
  std::error_code extents(uint64_t offset, uint64_t length, std::vector<Extent>& out) override;

 private:
  bool read_only_;
  mutable std::mutex mu_;
  std::vector<std::byte> data_;  // guarded by mu_ (size immutable)
};

}  // namespace fleeced::block

// SPDX-License-Identifier: MIT
// Default implementations for the optional parts of Device.
#include "block/device.hpp"

namespace fleeced::block {

std::error_code Device::try_read(uint64_t /*offset*/, std::span<std::byte> /*out*/) {
  return std::make_error_code(std::errc::operation_would_block);
}

std::error_code Device::try_write(uint64_t /*offset*/, std::span<const std::byte> /*data*/) {
  return std::make_error_code(std::errc::operation_would_block);
}

std::error_code Device::cache(uint64_t /*offset*/, uint64_t /*length*/) { return {}; }

std::error_code Device::extents(uint64_t offset, uint64_t length, std::vector<Extent>& out) {
  // Without allocation information everything is data (NBD "base:allocation"
  // permits reporting flags 0 for any range).
  out.push_back(Extent{offset, length, 0});
  return {};
}

}  // namespace fleeced::block

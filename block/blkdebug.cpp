// SPDX-License-Identifier: MIT
#include "block/blkdebug.hpp"

#include <algorithm>
#include <thread>

namespace fleeced::block {

BlkdebugDevice::BlkdebugDevice(DevicePtr inner, std::vector<InjectRule> rules,
                               std::chrono::milliseconds delay)
    : inner_(std::move(inner)), delay_(delay) {
  for (auto& r : rules) {
    auto rule = std::make_unique<Rule>();
    rule->rule = std::move(r);
    rules_.push_back(std::move(rule));
  }
}

std::error_code BlkdebugDevice::check(IoType type, uint64_t offset, uint64_t length) {
  if (type == IoType::write && delay_.count() > 0) std::this_thread::sleep_for(delay_);
  for (auto& r : rules_) {
    const InjectRule& rule = r->rule;
    if (!rule.types.empty() &&
        std::find(rule.types.begin(), rule.types.end(), type) == rule.types.end()) {
      continue;
    }
    if (rule.sector >= 0) {
      const uint64_t at = static_cast<uint64_t>(rule.sector) * 512;
      if (at < offset || at >= offset + std::max<uint64_t>(length, 1)) continue;
    }
    if (rule.once && r->fired.exchange(true)) continue;
    ++injected_;
    return {rule.error, std::generic_category()};
  }
  return {};
}

std::error_code BlkdebugDevice::read(uint64_t offset, std::span<std::byte> out) {
  if (std::error_code ec = check(IoType::read, offset, out.size())) return ec;
  return inner_->read(offset, out);
}

std::error_code BlkdebugDevice::write(uint64_t offset, std::span<const std::byte> data, bool fua) {
  if (std::error_code ec = check(IoType::write, offset, data.size())) return ec;
  return inner_->write(offset, data, fua);
}

std::error_code BlkdebugDevice::write_zeroes(uint64_t offset, uint64_t length, ZeroFlags flags) {
  if (std::error_code ec = check(IoType::write_zeroes, offset, length)) return ec;
  return inner_->write_zeroes(offset, length, flags);
}

std::error_code BlkdebugDevice::discard(uint64_t offset, uint64_t length, bool fua) {
  if (std::error_code ec = check(IoType::discard, offset, length)) return ec;
  return inner_->discard(offset, length, fua);
}

std::error_code BlkdebugDevice::flush() {
  if (std::error_code ec = check(IoType::flush, 0, 0)) return ec;
  return inner_->flush();
}

std::error_code BlkdebugDevice::extents(uint64_t offset, uint64_t length,
                                        std::vector<Extent>& out) {
  return inner_->extents(offset, length, out);
}

}  // namespace fleeced::block

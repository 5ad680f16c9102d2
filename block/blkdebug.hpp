// SPDX-License-Identifier: MIT
// BlkdebugDevice: a pass-through device that fails or delays chosen
// operations, for testing error paths with real clients (QMP blockdev-add
// driver "blkdebug", as QEMU's, with the subset of its inject-error rules
// documented in docs/control.md). Thread-safe.
#pragma once

#include <atomic>
#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "block/device.hpp"
#include "block/node_graph.hpp"

namespace fleeced::block {

enum class IoType { read, write, write_zeroes, discard, flush };

struct InjectRule {
  std::vector<IoType> types;  // empty = every type
  int error = 5;              // errno (EIO)
  int64_t sector = -1;        // only requests covering this 512-byte sector
  bool once = false;          // fire once, then stay quiet
};

class BlkdebugDevice final : public Device {
 public:
  BlkdebugDevice(DevicePtr inner, std::vector<InjectRule> rules, std::chrono::milliseconds delay);

  uint64_t size() const override { return inner_->size(); }
  Capabilities capabilities() const override { return inner_->capabilities(); }
  std::error_code read(uint64_t offset, std::span<std::byte> out) override;
  std::error_code write(uint64_t offset, std::span<const std::byte> data, bool fua) override;
  std::error_code write_zeroes(uint64_t offset, uint64_t length, ZeroFlags flags) override;
  std::error_code discard(uint64_t offset, uint64_t length, bool fua) override;
  std::error_code flush() override;
  std::error_code extents(uint64_t offset, uint64_t length, std::vector<Extent>& out) override;
  uint64_t injected() const { return injected_.load(); }

 private:
  // The error to inject for this request (and the delay for writes).
  std::error_code check(IoType type, uint64_t offset, uint64_t length);

  DevicePtr inner_;
  struct Rule {
    InjectRule rule;
    std::atomic<bool> fired{false};
  };
  std::vector<std::unique_ptr<Rule>> rules_;
  std::chrono::milliseconds delay_;
  std::atomic<uint64_t> injected_{0};
};

class BlkdebugNode final : public Node {
 public:
  BlkdebugNode(std::string name, NodePtr image, std::shared_ptr<BlkdebugDevice> device)
      : Node(std::move(name)), image_(std::move(image)), device_(std::move(device)) {}
  std::string driver() const override { return "blkdebug"; }
  DevicePtr device() override { return device_; }
  std::vector<NodePtr> children() const override { return {image_}; }

 private:
  NodePtr image_;
  std::shared_ptr<BlkdebugDevice> device_;
};

}  // namespace fleeced::block

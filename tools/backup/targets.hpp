// SPDX-License-Identifier: MIT
// Targets of a pull: a raw file or block device, a new qcow2 image, nothing.
#pragma once

#include <memory>
#include <string>

#include "backup/page_cache.hpp"
#include "backup/pull.hpp"

namespace fleece::backup {

class Qcow2Writer;

// A raw image file or block device, opened for writing.
class RawTarget final : public Target {
 public:
  // create: make the file if missing. fresh (regular files only): cut it to
  // `size` bytes of holes first, so zero areas need no writes.
  RawTarget(const std::string& path, uint64_t size, bool create, bool fresh);
  ~RawTarget() override;
  void write(uint64_t offset, const void* data, size_t length) override;
  void write_zeroes(uint64_t offset, uint64_t length) override;
  void sync();
  bool is_block_device() const { return block_device_; }
  // Size of an existing file or block device (0 if missing).
  static uint64_t size_of(const std::string& path, bool* exists);

 private:
  std::string path_;
  int fd_ = -1;
  bool block_device_ = false;
  PageCacheWindow window_{-1};
};

class NullTarget final : public Target {
 public:
  void write(uint64_t, const void*, size_t) override {}
  void write_zeroes(uint64_t, uint64_t) override {}
};

class Qcow2Target final : public Target {
 public:
  explicit Qcow2Target(Qcow2Writer& w) : w_(w) {}
  void write(uint64_t offset, const void* data, size_t length) override;
  void write_zeroes(uint64_t offset, uint64_t length) override;

 private:
  Qcow2Writer& w_;
};

}  // namespace fleece::backup

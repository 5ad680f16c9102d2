// SPDX-License-Identifier: MIT
// Buffer: an uninitialised byte buffer (no zero-fill on the data path).
// BufferPool: a connection-local free list so large request buffers are not
// re-mapped for every request. Not thread-safe: one connection's executor.
#pragma once

#include <cstddef>
#include <memory>
#include <new>
#include <span>
#include <vector>

namespace fleeced::server {

class Buffer {
 public:
  Buffer() = default;
  explicit Buffer(std::size_t size)
      : data_(new (std::nothrow) std::byte[size]), size_(data_ ? size : 0), capacity_(size_) {}
  bool ok() const { return data_ != nullptr; }
  std::byte* data() { return data_.get(); }
  const std::byte* data() const { return data_.get(); }
  std::size_t size() const { return size_; }
  std::size_t capacity() const { return capacity_; }
  void resize_within_capacity(std::size_t n) { size_ = n; }
  std::span<std::byte> span() { return {data_.get(), size_}; }
  std::span<const std::byte> span() const { return {data_.get(), size_}; }

 private:
  std::unique_ptr<std::byte[]> data_;
  std::size_t size_ = 0;
  std::size_t capacity_ = 0;
};

class BufferPool {
 public:
  // Returns a buffer of exactly `size` bytes (capacity may be larger); the
  // result's data() is null if memory ran out.
  Buffer get(std::size_t size) {
    for (std::size_t i = free_.size(); i-- > 0;) {
      if (free_[i].capacity() >= size && free_[i].capacity() <= size * 4 + 65536) {
        Buffer b = std::move(free_[i]);
        kept_bytes_ -= b.capacity();
        free_[i] = std::move(free_.back());
        free_.pop_back();
        b.resize_within_capacity(size);
        return b;
      }
    }
    Buffer b(size < 4096 ? 4096 : size);
    if (b.ok()) b.resize_within_capacity(size);
    return b;
  }
  void put(Buffer&& b) {
    if (b.capacity() == 0) return;
    if (free_.size() < kMaxFree && kept_bytes_ + b.capacity() <= kMaxKeptBytes) {
      kept_bytes_ += b.capacity();
      free_.push_back(std::move(b));
    }
  }

 private:
  // Enough for a full queue of default-sized requests (64 x 256 KiB) without
  // going back to the allocator, which maps and unmaps large blocks.
  static constexpr std::size_t kMaxFree = 128;
  static constexpr std::size_t kMaxKeptBytes = 64u << 20;
  std::vector<Buffer> free_;
  std::size_t kept_bytes_ = 0;
};

}  // namespace fleeced::server

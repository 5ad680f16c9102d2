// SPDX-License-Identifier: MIT
// ReferenceBitmap: a naive oracle for block::DirtyBitmap (one std::vector<bool>
// entry per granule, every query a linear scan), written from the semantics in
// control-api.md section 3.7 rather than from the real implementation.
// Header-only; one thread at a time.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "block/device.hpp"

namespace fleeced::test {

class ReferenceBitmap {
 public:
  ReferenceBitmap(uint64_t disk_size, uint32_t granularity)
      : disk_size_(disk_size),
        granularity_(granularity),
        bits_((disk_size + granularity - 1) / granularity, false) {}

  uint64_t disk_size() const { return disk_size_; }
  uint32_t granularity() const { return granularity_; }
  uint64_t granules() const { return bits_.size(); }
  bool granule(uint64_t index) const { return bits_[index]; }

  // Every granule the range touches (partial ones too), clipped at the disk end.
  void set_range(uint64_t offset, uint64_t length) {
    if (length == 0 || offset >= disk_size_) return;
    const uint64_t end = end_of(offset, length);
    for (uint64_t g = offset / granularity_; g * granularity_ < end; ++g) bits_[g] = true;
  }

  // Only granules whose whole in-disk part lies inside the range.
  void reset_range(uint64_t offset, uint64_t length) {
    if (length == 0 || offset >= disk_size_) return;
    const uint64_t end = end_of(offset, length);
    const uint64_t last = std::min<uint64_t>(bits_.size(), end / granularity_ + 1);
    for (uint64_t g = offset / granularity_; g < last; ++g) {
      const uint64_t start = g * granularity_;
      const uint64_t stop = std::min(start + granularity_, disk_size_);
      if (start >= offset && stop <= end) bits_[g] = false;
    }
  }

  void clear() { std::fill(bits_.begin(), bits_.end(), false); }

  // A dirty source granule dirties every target granule its bytes overlap.
  void merge_from(const ReferenceBitmap& other) {
    for (uint64_t g = 0; g < other.bits_.size(); ++g) {
      if (!other.bits_[g]) continue;
      const uint64_t start = g * other.granularity_;
      const uint64_t stop = std::min(start + other.granularity_, other.disk_size_);
      set_range(start, stop - start);
    }
  }

  bool is_dirty(uint64_t offset) const {
    return offset < disk_size_ && bits_[offset / granularity_];
  }

  uint64_t dirty_granules() const {
    return static_cast<uint64_t>(std::count(bits_.begin(), bits_.end(), true));
  }

  // Dirty bytes inside the disk (the last granule may be partial).
  uint64_t count_bytes() const {
    uint64_t n = 0;
    for (uint64_t g = 0; g < bits_.size(); ++g) {
      if (bits_[g]) n += std::min<uint64_t>(granularity_, disk_size_ - g * granularity_);
    }
    return n;
  }

  // First byte >= offset in the given state (offset itself if its granule is).
  uint64_t next_in_state(uint64_t offset, bool dirty) const {
    for (uint64_t pos = offset; pos < disk_size_;) {
      if (bits_[pos / granularity_] == dirty) return pos;
      pos = (pos / granularity_ + 1) * granularity_;
    }
    return disk_size_;
  }
  uint64_t next_dirty(uint64_t offset) const { return next_in_state(offset, true); }
  uint64_t next_clean(uint64_t offset) const { return next_in_state(offset, false); }

  // One granule at a time, merging equal neighbours.
  std::vector<block::Extent> extents(uint64_t offset, uint64_t length,
                                     std::size_t max_extents) const {
    std::vector<block::Extent> out;
    if (length == 0 || offset >= disk_size_) return out;
    const uint64_t end = end_of(offset, length);
    for (uint64_t pos = offset; pos < end;) {
      const uint64_t stop = std::min(end, (pos / granularity_ + 1) * granularity_);
      const uint32_t flags = bits_[pos / granularity_] ? 1 : 0;
      if (!out.empty() && out.back().flags == flags) {
        out.back().length += stop - pos;
      } else {
        if (out.size() == max_extents) break;
        out.push_back(block::Extent{pos, stop - pos, flags});
      }
      pos = stop;
    }
    return out;
  }

  // Level-0 words as DirtyBitmap::snapshot_words() lays them out.
  std::vector<uint64_t> words() const {
    std::vector<uint64_t> w((bits_.size() + 63) / 64, 0);
    for (uint64_t g = 0; g < bits_.size(); ++g) {
      if (bits_[g]) w[g / 64] |= uint64_t{1} << (g % 64);
    }
    return w;
  }

 private:
  uint64_t end_of(uint64_t offset, uint64_t length) const {
    return length > disk_size_ - offset ? disk_size_ : offset + length;
  }

  uint64_t disk_size_;
  uint32_t granularity_;
  std::vector<bool> bits_;
};

}  // namespace fleeced::test

// SPDX-License-Identifier: MIT
// DirtyBitmap records which granules of a disk changed. One bit per granule
// plus summary levels (one bit per word of the level below: "word not
// empty" and "word not full"), so finding the next dirty or clean granule
// costs time proportional to the distance, not the disk size.
// Thread-safe: one internal mutex, held for short critical sections only.
#pragma once

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <span>
#include <vector>

#include "block/device.hpp"

namespace fleeced::block {

class DirtyBitmap {
 public:
  // granularity: a power of two >= 512 (bytes per bit). Not validated here.
  DirtyBitmap(uint64_t disk_size, uint32_t granularity);

  uint64_t disk_size() const { return disk_size_; }
  uint32_t granularity() const { return granularity_; }
  uint64_t granules() const { return granules_; }

  // Marks every granule that [offset, offset+length) touches, partial
  // granules included. Clipped at the disk size. Returns the number of
  // granules that were clean before.
  uint64_t set_range(uint64_t offset, uint64_t length);
  // Clears every granule fully inside [offset, offset+length) (inward).
  void reset_range(uint64_t offset, uint64_t length);
  void clear();
  // Makes this bitmap's contents a copy of `other` (same geometry required).
  void copy_from(const DirtyBitmap& other);
  // ORs `other` in; granularities may differ (a source granule dirties every
  // target granule it overlaps). Disk sizes must match.
  void merge_from(const DirtyBitmap& other);

  bool is_dirty(uint64_t offset) const;
  // Dirty bytes inside the disk: dirty granules x granularity, the partial
  // last granule counted to the end of the disk (= sum of dirty extents).
  uint64_t count_bytes() const;
  uint64_t dirty_granules() const;
  // First dirty (or clean) byte offset >= offset: offset itself if its
  // granule is in that state, else the start of the next such granule;
  // disk_size if there is none.
  uint64_t next_dirty(uint64_t offset) const;
  uint64_t next_clean(uint64_t offset) const;
  // True if every granule that [offset, offset+length) touches is dirty
  // (true for an empty range or one past the end).
  bool all_dirty(uint64_t offset, uint64_t length) const;

  // Appends block-status extents for [offset, offset+length): consecutive
  // runs with flags 1 (dirty) or 0 (clean), boundaries at granule multiples,
  // clipped to the range, at most max_extents; at least one if length > 0.
  void extents(uint64_t offset, uint64_t length, std::size_t max_extents,
               std::vector<Extent>& out) const;

  // Raw level-0 words (bit i of word w = granule 64*w+i), for persistence.
  std::vector<uint64_t> snapshot_words() const;
  void load_words(std::span<const uint64_t> words);
  // Word indices changed since the last take_changed_words() (for batching
  // persistence); only tracked when enabled.
  void track_changes(bool on);
  std::vector<std::size_t> take_changed_words();
  // Level-0 words [first, first+out.size()) (persistence writes pages of
  // them) and the reverse; store_words masks bits past the last granule.
  void read_words(std::size_t first, std::span<uint64_t> out) const;
  void store_words(std::size_t first, std::span<const uint64_t> words);

  // Memory accounting (tests, benchmarks): level-0 words, summary words in
  // all levels, and the number of summary levels.
  std::size_t word_count() const { return words_.size(); }
  std::size_t summary_word_count() const;
  std::size_t summary_levels() const { return nonempty_.size(); }

 private:
  // REQUIRES: mu_ held.
  uint64_t valid_mask(std::size_t w) const;
  void word_changed(std::size_t w, uint64_t old_word);
  void set_word(std::size_t w, uint64_t value);
  uint64_t set_granules(uint64_t first, uint64_t last);
  void reset_granules(uint64_t first, uint64_t last);
  uint64_t find_next(uint64_t granule, bool dirty) const;
  uint64_t granule_offset(uint64_t granule) const;
  uint64_t clip_end(uint64_t offset, uint64_t length) const;
  void merge_locked(const DirtyBitmap& other);

  // Immutable after construction (the vector sizes too).
  uint64_t disk_size_;
  uint32_t granularity_;
  unsigned shift_;  // log2(granularity_): granule = offset >> shift_
  uint64_t granules_;
  // The rest is guarded by mu_.
  mutable std::mutex mu_;
  std::vector<uint64_t> words_;
  // nonempty_[k] / notfull_[k]: summary level k+1, one bit per word of the
  // level below (words_ for k == 0); the top level has one word.
  std::vector<std::vector<uint64_t>> nonempty_;
  std::vector<std::vector<uint64_t>> notfull_;
  uint64_t dirty_ = 0;
  bool track_ = false;
  std::vector<std::size_t> changed_;
  std::vector<uint64_t> changed_marks_;  // 1 bit per word: already in changed_
};

}  // namespace fleeced::block

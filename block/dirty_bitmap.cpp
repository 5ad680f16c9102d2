// SPDX-License-Identifier: MIT
// Design notes
//
// Level 0 (words_) has one bit per granule: bit i of word w is granule
// 64*w+i. Bits past the last granule are always 0. Above it sit two stacks of
// summary levels, each with one bit per word of the level below, until a
// level fits in one word (a bitmap of at most one word has no summaries):
//
//   nonempty_: bit = "the word below is not 0", i.e. it holds a dirty granule.
//   notfull_:  bit = "the word below has a clean granule". On the first
//              summary level that is word != valid_mask (the tail bits of the
//              last word count as dirty, so they are never reported clean);
//              higher up it is word != 0, like nonempty_.
//
// Summary words have 0 past their end, which reads as "nothing here" for
// both searches. find_next() climbs from the starting word until a level has
// a set bit at or after the position, then descends following the lowest set
// bit, so a search costs O(levels) words, about log64(granules), whatever the
// distance. Updates touch the summaries only for words whose "zero" or
// "full" state changed, and stop climbing as soon as a summary word keeps its
// zero-ness. Ranges are walked with find_next too, so set_range over an
// already dirty stretch (or reset_range over a clean one) skips it in
// O(levels) rather than word by word.
//
// Memory: words_ is granules/64 words rounded up; the summaries add about
// 2/63 of that (two stacks of 1/64 + 1/4096 + ...).
//
// Change tracking (for PersistentBitmap) records each level-0 word whose
// value changed, once until take_changed_words(); changed_marks_ is the
// one-bit-per-word "already listed" set.
//
// merge_from and copy_from lock both bitmaps with std::scoped_lock (deadlock
// avoidance for A.merge(B) racing B.merge(A)); merging a bitmap into itself
// is a no-op.
#include "block/dirty_bitmap.hpp"

#include <algorithm>
#include <bit>
#include <cassert>

namespace fleeced::block {
namespace {

constexpr uint64_t kAllOnes = ~uint64_t{0};

uint64_t div_ceil(uint64_t value, uint64_t divisor) {
  return value / divisor + (value % divisor != 0 ? 1 : 0);
}

// Bits [lo, hi) of a word; 0 <= lo < hi <= 64.
uint64_t bit_span(uint64_t lo, uint64_t hi) {
  const uint64_t upper = hi == 64 ? kAllOnes : (uint64_t{1} << hi) - 1;
  return upper & (kAllOnes << lo);
}

// Sets or clears bit `index` of a summary stack and climbs while the word's
// zero-ness changes.
void propagate(std::vector<std::vector<uint64_t>>& levels, uint64_t index, bool on) {
  for (auto& level : levels) {
    uint64_t& word = level[index / 64];
    const bool was_nonzero = word != 0;
    const uint64_t bit = uint64_t{1} << (index % 64);
    word = on ? (word | bit) : (word & ~bit);
    if ((word != 0) == was_nonzero) return;
    on = word != 0;
    index /= 64;
  }
}

}  // namespace

DirtyBitmap::DirtyBitmap(uint64_t disk_size, uint32_t granularity)
    : disk_size_(disk_size),
      granularity_(granularity),
      shift_(static_cast<unsigned>(std::countr_zero(granularity))),
      granules_(div_ceil(disk_size, granularity)),
      words_(div_ceil(granules_, 64), 0) {
  assert(granularity >= 512 && std::has_single_bit(granularity));
  // All clean: nonempty_ is all 0 and notfull_ has a 1 for every word below,
  // built level by level without scanning words_ (1 TiB at 512 B has 2^25).
  for (std::size_t below = words_.size(); below > 1; below = div_ceil(below, 64)) {
    const std::size_t n = div_ceil(below, 64);
    nonempty_.emplace_back(n, 0);
    std::vector<uint64_t> level(n, kAllOnes);
    if (below % 64 != 0) level.back() = bit_span(0, below % 64);
    notfull_.push_back(std::move(level));
  }
}

uint64_t DirtyBitmap::set_range(uint64_t offset, uint64_t length) {
  std::lock_guard lock(mu_);
  if (length == 0 || offset >= disk_size_) return 0;
  const uint64_t end = clip_end(offset, length);
  return set_granules(offset / granularity_, div_ceil(end, granularity_));
}

void DirtyBitmap::reset_range(uint64_t offset, uint64_t length) {
  std::lock_guard lock(mu_);
  if (length == 0 || offset >= disk_size_) return;
  const uint64_t end = clip_end(offset, length);
  // The last granule may be partial: reaching the disk end covers it.
  const uint64_t last = end == disk_size_ ? granules_ : end / granularity_;
  const uint64_t first = div_ceil(offset, granularity_);
  if (first < last) reset_granules(first, last);
}

void DirtyBitmap::clear() {
  std::lock_guard lock(mu_);
  reset_granules(0, granules_);
}

void DirtyBitmap::copy_from(const DirtyBitmap& other) {
  if (&other == this) return;
  std::scoped_lock lock(mu_, other.mu_);
  assert(other.disk_size_ == disk_size_ && other.granularity_ == granularity_);
  const std::size_t n = std::min(words_.size(), other.words_.size());
  for (std::size_t w = 0; w < n; ++w) {
    if (words_[w] != other.words_[w]) set_word(w, other.words_[w]);
  }
}

void DirtyBitmap::merge_from(const DirtyBitmap& other) {
  if (&other == this) return;
  std::scoped_lock lock(mu_, other.mu_);
  merge_locked(other);
}

void DirtyBitmap::merge_locked(const DirtyBitmap& other) {
  assert(other.disk_size_ == disk_size_);
  if (other.granularity_ == granularity_ && other.disk_size_ == disk_size_) {
    // Word at a time, visiting only the source's nonzero words.
    for (uint64_t g = other.find_next(0, true); g < other.granules_;
         g = other.find_next((g / 64 + 1) * 64, true)) {
      const std::size_t w = g / 64;
      const uint64_t merged = words_[w] | other.words_[w];
      if (merged != words_[w]) set_word(w, merged);
    }
    return;
  }
  // Each dirty run of the source dirties every target granule it overlaps.
  const uint64_t limit = std::min(disk_size_, other.disk_size_);
  for (uint64_t g = other.find_next(0, true); g < other.granules_;) {
    const uint64_t run_end = other.find_next(g, false);
    const uint64_t start = other.granule_offset(g);
    if (start >= limit) break;
    const uint64_t end = std::min(other.granule_offset(run_end), limit);
    set_granules(start / granularity_, div_ceil(end, granularity_));
    if (run_end >= other.granules_) break;
    g = other.find_next(run_end, true);
  }
}

bool DirtyBitmap::is_dirty(uint64_t offset) const {
  std::lock_guard lock(mu_);
  if (offset >= disk_size_) return false;
  const uint64_t g = offset / granularity_;
  return (words_[g / 64] >> (g % 64)) & 1;
}

uint64_t DirtyBitmap::count_bytes() const {
  std::lock_guard lock(mu_);
  // Dirty bytes inside the disk: the sum of the dirty extents' lengths, so a
  // backup tool's "bytes pulled" equals it. Only the last granule can be
  // partial; it counts up to the end of the disk.
  if (dirty_ == 0) return 0;
  const uint64_t last = granules_ - 1;
  const bool last_dirty = (words_[last / 64] >> (last % 64)) & 1;
  const uint64_t whole = last_dirty ? dirty_ - 1 : dirty_;
  return whole * granularity_ + (last_dirty ? disk_size_ - last * granularity_ : 0);
}

uint64_t DirtyBitmap::dirty_granules() const {
  std::lock_guard lock(mu_);
  return dirty_;
}

uint64_t DirtyBitmap::next_dirty(uint64_t offset) const {
  std::lock_guard lock(mu_);
  if (offset >= disk_size_) return disk_size_;
  return std::max(offset, granule_offset(find_next(offset / granularity_, true)));
}

uint64_t DirtyBitmap::next_clean(uint64_t offset) const {
  std::lock_guard lock(mu_);
  if (offset >= disk_size_) return disk_size_;
  return std::max(offset, granule_offset(find_next(offset / granularity_, false)));
}

bool DirtyBitmap::all_dirty(uint64_t offset, uint64_t length) const {
  std::lock_guard lock(mu_);
  if (length == 0 || offset >= disk_size_) return true;
  const uint64_t last = div_ceil(clip_end(offset, length), granularity_);
  return find_next(offset / granularity_, false) >= last;
}

void DirtyBitmap::extents(uint64_t offset, uint64_t length, std::size_t max_extents,
                          std::vector<Extent>& out) const {
  std::lock_guard lock(mu_);
  if (length == 0 || offset >= disk_size_ || max_extents == 0) return;
  const uint64_t end = clip_end(offset, length);
  uint64_t pos = offset;
  for (std::size_t n = 0; pos < end && n < max_extents; ++n) {
    const uint64_t g = pos >> shift_;
    const std::size_t w = g / 64;
    const bool dirty = (words_[w] >> (g % 64)) & 1;
    // Runs alternate, so the next boundary is the next granule in the other
    // state: look in the rest of this word first (short runs), then search
    // the summaries from the next word on.
    const uint64_t other = dirty ? (~words_[w] & valid_mask(w)) : words_[w];
    const uint64_t here = other & (kAllOnes << (g % 64));
    const uint64_t ng = here != 0 ? w * 64 + static_cast<uint64_t>(std::countr_zero(here))
                                  : find_next((w + 1) * 64, !dirty);
    const uint64_t next = std::min(end, granule_offset(ng));
    out.push_back(Extent{pos, next - pos, dirty ? 1u : 0u});
    pos = next;
  }
}

std::vector<uint64_t> DirtyBitmap::snapshot_words() const {
  std::lock_guard lock(mu_);
  return words_;
}

void DirtyBitmap::load_words(std::span<const uint64_t> words) {
  std::lock_guard lock(mu_);
  assert(words.size() == words_.size());
  const std::size_t n = std::min(words.size(), words_.size());
  for (std::size_t w = 0; w < n; ++w) {
    const uint64_t value = words[w] & valid_mask(w);
    if (value != words_[w]) set_word(w, value);
  }
}

void DirtyBitmap::read_words(std::size_t first, std::span<uint64_t> out) const {
  std::lock_guard lock(mu_);
  assert(first + out.size() <= words_.size());
  std::copy_n(words_.begin() + static_cast<std::ptrdiff_t>(first), out.size(), out.begin());
}

void DirtyBitmap::store_words(std::size_t first, std::span<const uint64_t> words) {
  std::lock_guard lock(mu_);
  assert(first + words.size() <= words_.size());
  for (std::size_t i = 0; i < words.size(); ++i) {
    const std::size_t w = first + i;
    const uint64_t value = words[i] & valid_mask(w);
    if (value != words_[w]) set_word(w, value);
  }
}

void DirtyBitmap::track_changes(bool on) {
  std::lock_guard lock(mu_);
  track_ = on;
  changed_.clear();
  changed_marks_.assign(on ? div_ceil(words_.size(), 64) : 0, 0);
}

std::vector<std::size_t> DirtyBitmap::take_changed_words() {
  std::lock_guard lock(mu_);
  std::vector<std::size_t> taken;
  taken.swap(changed_);
  for (std::size_t w : taken) changed_marks_[w / 64] &= ~(uint64_t{1} << (w % 64));
  return taken;
}

std::size_t DirtyBitmap::summary_word_count() const {
  std::lock_guard lock(mu_);
  std::size_t n = 0;
  for (const auto& level : nonempty_) n += level.size();
  for (const auto& level : notfull_) n += level.size();
  return n;
}

uint64_t DirtyBitmap::valid_mask(std::size_t w) const {
  const uint64_t tail = granules_ % 64;
  return (w + 1 == words_.size() && tail != 0) ? bit_span(0, tail) : kAllOnes;
}

void DirtyBitmap::word_changed(std::size_t w, uint64_t old_word) {
  const uint64_t now = words_[w];
  dirty_ += std::popcount(now);
  dirty_ -= std::popcount(old_word);
  if ((old_word != 0) != (now != 0)) propagate(nonempty_, w, now != 0);
  const uint64_t full = valid_mask(w);
  if ((old_word != full) != (now != full)) propagate(notfull_, w, now != full);
  if (track_) {
    uint64_t& mark = changed_marks_[w / 64];
    const uint64_t bit = uint64_t{1} << (w % 64);
    if ((mark & bit) == 0) {
      mark |= bit;
      changed_.push_back(w);
    }
  }
}

void DirtyBitmap::set_word(std::size_t w, uint64_t value) {
  const uint64_t old_word = words_[w];
  words_[w] = value;
  word_changed(w, old_word);
}

uint64_t DirtyBitmap::set_granules(uint64_t first, uint64_t last) {
  const uint64_t before = dirty_;
  // Jump from clean granule to clean granule: dirty stretches cost O(levels).
  for (uint64_t g = find_next(first, false); g < last; g = find_next(g, false)) {
    const uint64_t word_end = std::min(last, (g / 64 + 1) * 64);
    const std::size_t w = g / 64;
    set_word(w, words_[w] | bit_span(g % 64, word_end - w * 64));
    g = word_end;
    if (g >= last) break;
  }
  return dirty_ - before;
}

void DirtyBitmap::reset_granules(uint64_t first, uint64_t last) {
  for (uint64_t g = find_next(first, true); g < last; g = find_next(g, true)) {
    const uint64_t word_end = std::min(last, (g / 64 + 1) * 64);
    const std::size_t w = g / 64;
    set_word(w, words_[w] & ~bit_span(g % 64, word_end - w * 64));
    g = word_end;
    if (g >= last) break;
  }
}

// Smallest granule >= `granule` that is dirty (or clean); granules_ if none.
uint64_t DirtyBitmap::find_next(uint64_t granule, bool dirty) const {
  if (granule >= granules_) return granules_;
  const auto& sums = dirty ? nonempty_ : notfull_;
  auto word_at = [&](std::size_t level, std::size_t w) -> uint64_t {
    if (level == 0) return dirty ? words_[w] : (~words_[w] & valid_mask(w));
    return sums[level - 1][w];
  };
  auto words_at = [&](std::size_t level) {
    return level == 0 ? words_.size() : sums[level - 1].size();
  };
  std::size_t level = 0;
  uint64_t index = granule;
  for (;;) {
    const uint64_t w = index / 64;
    if (w >= words_at(level)) return granules_;
    const uint64_t bits = word_at(level, w) & (kAllOnes << (index % 64));
    if (bits != 0) {
      index = w * 64 + static_cast<uint64_t>(std::countr_zero(bits));
      break;
    }
    if (level == sums.size()) return granules_;  // the top level has one word
    index = w + 1;
    ++level;
  }
  while (level > 0) {
    --level;
    const uint64_t bits = word_at(level, index);
    assert(bits != 0);
    index = index * 64 + static_cast<uint64_t>(std::countr_zero(bits));
  }
  return index;
}

uint64_t DirtyBitmap::granule_offset(uint64_t granule) const {
  return granule >= granules_ ? disk_size_ : granule << shift_;
}

uint64_t DirtyBitmap::clip_end(uint64_t offset, uint64_t length) const {
  return length > disk_size_ - offset ? disk_size_ : offset + length;
}

}  // namespace fleeced::block

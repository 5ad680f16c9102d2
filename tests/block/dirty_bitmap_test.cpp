// SPDX-License-Identifier: MIT
// DirtyBitmap: differential tests against ReferenceBitmap, edge cases, the
// summary levels on big sparse bitmaps, memory, and concurrent use.
#include "block/dirty_bitmap.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <random>
#include <thread>
#include <tuple>
#include <vector>

#include "support/reference_bitmap.hpp"

namespace fleeced::block {
namespace {

using test::ReferenceBitmap;

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1024 * kKiB;
constexpr uint64_t kGiB = 1024 * kMiB;
constexpr uint64_t kTiB = 1024 * kGiB;
constexpr uint64_t kHuge = std::numeric_limits<uint64_t>::max();

uint64_t div_ceil(uint64_t a, uint64_t b) { return (a + b - 1) / b; }

// The naive oracle is ~10x slower under TSan; the random walk is about
// single-threaded correctness, so it takes fewer steps there.
#if defined(__SANITIZE_THREAD__)
constexpr int kStepDivisor = 4;
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
constexpr int kStepDivisor = 4;
#else
constexpr int kStepDivisor = 1;
#endif
#else
constexpr int kStepDivisor = 1;
#endif

using ExtentTuple = std::tuple<uint64_t, uint64_t, uint32_t>;

std::vector<ExtentTuple> tuples(const std::vector<Extent>& extents) {
  std::vector<ExtentTuple> out;
  for (const Extent& e : extents) out.emplace_back(e.offset, e.length, e.flags);
  return out;
}

std::vector<ExtentTuple> extents_of(const DirtyBitmap& bm, uint64_t offset, uint64_t length,
                                    std::size_t max_extents = 1 << 20) {
  std::vector<Extent> out;
  bm.extents(offset, length, max_extents, out);
  return tuples(out);
}

void expect_same(const DirtyBitmap& real, const ReferenceBitmap& ref) {
  ASSERT_EQ(real.snapshot_words(), ref.words());
  EXPECT_EQ(real.dirty_granules(), ref.dirty_granules());
  EXPECT_EQ(real.count_bytes(), ref.count_bytes());
}

// Offsets and lengths that hit the interesting cases often: granule and word
// boundaries, the disk end, zero, lengths that overflow offset + length.
class RangeMaker {
 public:
  RangeMaker(uint32_t seed, uint64_t disk_size, uint32_t granularity)
      : rng_(seed), disk_size_(disk_size), granularity_(granularity) {}

  uint64_t offset() {
    switch (pick(6)) {
      case 0:
        return pick(disk_size_ + 1);
      case 1:
        return pick(disk_size_ / granularity_ + 1) * granularity_;
      case 2:
        return pick(disk_size_ / granularity_ / 64 + 1) * 64 * granularity_;
      case 3:
        return disk_size_ - std::min<uint64_t>(disk_size_, pick(3 * granularity_));
      case 4:
        return disk_size_ + pick(2);
      default:
        return pick(disk_size_ / granularity_ + 1) * granularity_ + pick(granularity_);
    }
  }

  uint64_t length() {
    switch (pick(7)) {
      case 0:
        return 0;
      case 1:
        return 1 + pick(granularity_ * 2);
      case 2:
        return (1 + pick(200)) * granularity_;
      case 3:
        return pick(disk_size_ + 1);
      case 4:
        return kHuge - pick(3);
      case 5:
        return (1 + pick(3)) * 64 * granularity_ + pick(3);
      default:
        return 1 + pick(std::max<uint64_t>(1, disk_size_ / 8));
    }
  }

  uint64_t pick(uint64_t bound) { return bound == 0 ? 0 : rng_() % bound; }
  std::mt19937_64& rng() { return rng_; }

 private:
  std::mt19937_64 rng_;
  uint64_t disk_size_;
  uint32_t granularity_;
};

struct Geometry {
  uint64_t disk_size;
  uint32_t granularity;
  int steps;
  int runs = 2;  // each with its own seed
};

// Runs random operations on a DirtyBitmap and the oracle and compares every
// answer; the full contents are compared every few steps.
void run_differential(const Geometry& geo, uint32_t seed) {
  SCOPED_TRACE(testing::Message() << "disk_size=" << geo.disk_size
                                  << " granularity=" << geo.granularity << " seed=" << seed);
  DirtyBitmap real(geo.disk_size, geo.granularity);
  ReferenceBitmap ref(geo.disk_size, geo.granularity);
  RangeMaker r(seed, geo.disk_size, geo.granularity);
  const uint32_t other_granularities[] = {512, 1024, 4096, 65536, 1u << 20, 1u << 31};
  for (int step = 0; step < geo.steps / kStepDivisor; ++step) {
    const uint64_t offset = r.offset();
    const uint64_t length = r.length();
    SCOPED_TRACE(testing::Message()
                 << "step=" << step << " offset=" << offset << " length=" << length);
    switch (r.pick(20)) {
      case 0:
      case 1:
      case 2:
      case 3:
      case 4: {
        const uint64_t before = ref.dirty_granules();
        ref.set_range(offset, length);
        EXPECT_EQ(real.set_range(offset, length), ref.dirty_granules() - before);
        break;
      }
      case 5:
      case 6:
      case 7:
        real.reset_range(offset, length);
        ref.reset_range(offset, length);
        break;
      case 8:
        if (r.pick(8) == 0) {
          real.clear();
          ref.clear();
        }
        break;
      case 9: {
        const uint32_t g = other_granularities[r.pick(std::size(other_granularities))];
        DirtyBitmap other(geo.disk_size, g);
        ReferenceBitmap other_ref(geo.disk_size, g);
        RangeMaker r2(static_cast<uint32_t>(r.pick(1u << 30)), geo.disk_size, g);
        for (int i = 0, n = static_cast<int>(r.pick(6)); i < n; ++i) {
          const uint64_t o = r2.offset();
          const uint64_t l = r2.length() % (geo.disk_size / 4 + 1);
          other.set_range(o, l);
          other_ref.set_range(o, l);
        }
        real.merge_from(other);
        ref.merge_from(other_ref);
        break;
      }
      case 10:
      case 11:
        EXPECT_EQ(real.next_dirty(offset), ref.next_dirty(offset));
        EXPECT_EQ(real.next_clean(offset), ref.next_clean(offset));
        break;
      case 12:
      case 13:
      case 14: {
        const std::size_t max = r.pick(3) == 0 ? 1 + r.pick(3) : 100000;
        EXPECT_EQ(extents_of(real, offset, length, max), tuples(ref.extents(offset, length, max)));
        break;
      }
      case 15:
        EXPECT_EQ(real.is_dirty(offset), ref.is_dirty(offset));
        break;
      default:
        EXPECT_EQ(real.dirty_granules(), ref.dirty_granules());
        EXPECT_EQ(real.count_bytes(), ref.count_bytes());
        break;
    }
    if (step % 64 == 0) expect_same(real, ref);
    if (testing::Test::HasFailure()) return;
  }
  expect_same(real, ref);
}

TEST(DirtyBitmap, MatchesReferenceOnRandomOperations) {
  const Geometry geometries[] = {
      {512, 512, 300},                          // one granule
      {1000, 512, 300},                         // partial last granule
      {64 * 512, 512, 1000},                    // exactly one word
      {64 * 512 + 1, 512, 1000},                // one granule into a second word
      {3 * 64 * 4096 + 777, 4096, 2000},        // not a multiple of the granule or word
      {200 * 65536 + 12345, 65536, 2000},       // default granularity
      {8195 * 512 - 100, 512, 3000},            // three levels (129 words)
      {(64 * 64 + 1) * 64 * 512, 512, 200, 1},  // four levels (4097 words); the oracle is slow
      {5 * kMiB + 3, 1u << 20, 500},            // big granules
  };
  uint32_t seed = 1;
  for (const Geometry& geo : geometries) {
    for (int run = 0; run < geo.runs; ++run) {
      run_differential(geo, seed++);
      if (HasFailure()) return;
    }
  }
}

TEST(DirtyBitmap, SetRangeMarksPartialGranules) {
  DirtyBitmap bm(1 * kMiB, 65536);
  // A 2-byte write straddling the first granule boundary dirties both.
  EXPECT_EQ(bm.set_range(65535, 2), 2u);
  EXPECT_TRUE(bm.is_dirty(0));
  EXPECT_TRUE(bm.is_dirty(65536 + 65535));
  EXPECT_FALSE(bm.is_dirty(2 * 65536));
  EXPECT_EQ(bm.count_bytes(), 2 * 65536u);
  // Already dirty: nothing new.
  EXPECT_EQ(bm.set_range(100, 1), 0u);
}

TEST(DirtyBitmap, SetRangeAcrossWordBoundary) {
  DirtyBitmap bm(1000 * 512, 512);
  bm.set_range(60 * 512, 10 * 512);
  const auto words = bm.snapshot_words();
  EXPECT_EQ(words[0], ~uint64_t{0} << 60);
  EXPECT_EQ(words[1], (uint64_t{1} << 6) - 1);
  EXPECT_EQ(extents_of(bm, 0, 1000 * 512),
            (std::vector<ExtentTuple>{
                {0, 60 * 512, 0}, {60 * 512, 10 * 512, 1}, {70 * 512, 930 * 512, 0}}));
}

TEST(DirtyBitmap, ResetRangeClearsOnlyWholeGranules) {
  DirtyBitmap bm(10 * 4096, 4096);
  bm.set_range(0, kHuge);
  bm.reset_range(100, 3 * 4096);  // granules 1 and 2 only
  EXPECT_TRUE(bm.is_dirty(0));
  EXPECT_FALSE(bm.is_dirty(4096));
  EXPECT_FALSE(bm.is_dirty(2 * 4096));
  EXPECT_TRUE(bm.is_dirty(3 * 4096));
  bm.reset_range(4096 * 5, 4095);  // inside one granule: nothing
  EXPECT_TRUE(bm.is_dirty(4096 * 5));
}

TEST(DirtyBitmap, ResetRangeToDiskEndClearsPartialLastGranule) {
  DirtyBitmap bm(10 * 4096 + 100, 4096);
  bm.set_range(0, kHuge);
  EXPECT_EQ(bm.dirty_granules(), 11u);
  bm.reset_range(10 * 4096, 100);
  EXPECT_FALSE(bm.is_dirty(10 * 4096 + 50));
  EXPECT_EQ(bm.dirty_granules(), 10u);
}

TEST(DirtyBitmap, EdgeRangesAreClippedOrIgnored) {
  const uint64_t disk = 100 * 512 + 7;
  DirtyBitmap bm(disk, 512);
  EXPECT_EQ(bm.set_range(disk, 100), 0u);    // at the end
  EXPECT_EQ(bm.set_range(disk + 1, 1), 0u);  // past the end
  EXPECT_EQ(bm.set_range(0, 0), 0u);         // zero length
  EXPECT_EQ(bm.dirty_granules(), 0u);
  EXPECT_EQ(bm.next_dirty(0), disk);
  EXPECT_EQ(bm.next_clean(disk), disk);
  EXPECT_EQ(bm.next_dirty(kHuge), disk);
  EXPECT_FALSE(bm.is_dirty(disk));
  EXPECT_TRUE(bm.all_dirty(disk, 10));
  EXPECT_TRUE(bm.all_dirty(0, 0));
  // offset + length overflows: clipped at the disk end.
  EXPECT_EQ(bm.set_range(disk - 1, kHuge), 1u);
  EXPECT_EQ(bm.set_range(1, kHuge), 100u);
  EXPECT_EQ(bm.count_bytes(), disk);
  EXPECT_EQ(bm.next_clean(0), disk);  // never past the end
  std::vector<Extent> out;
  bm.extents(disk, 10, 10, out);
  bm.extents(0, 0, 10, out);
  bm.extents(0, 10, 0, out);
  EXPECT_TRUE(out.empty());
  EXPECT_EQ(extents_of(bm, 3, kHuge), (std::vector<ExtentTuple>{{3, disk - 3, 1}}));
  bm.reset_range(0, kHuge);
  EXPECT_EQ(bm.dirty_granules(), 0u);
}

TEST(DirtyBitmap, EmptyDiskHasNoGranules) {
  DirtyBitmap bm(0, 65536);
  EXPECT_EQ(bm.granules(), 0u);
  EXPECT_EQ(bm.word_count(), 0u);
  EXPECT_EQ(bm.set_range(0, 100), 0u);
  EXPECT_EQ(bm.next_dirty(0), 0u);
  EXPECT_EQ(bm.count_bytes(), 0u);
  bm.clear();
}

TEST(DirtyBitmap, CountBytesIsTheSumOfDirtyExtents) {
  // control-api.md 3.8 and 6.1: granules x granularity, the partial last
  // granule counted up to the end of the disk, so count == sum of extents.
  DirtyBitmap bm(100 * kKiB, 65536);
  bm.set_range(70 * kKiB, 1);  // the partial last granule alone
  EXPECT_EQ(bm.count_bytes(), 36 * kKiB);
  std::vector<Extent> ext;
  bm.extents(0, 100 * kKiB, 100, ext);
  uint64_t dirty = 0;
  for (const auto& e : ext) dirty += e.flags ? e.length : 0;
  EXPECT_EQ(dirty, 36 * kKiB);
  bm.set_range(0, 1);
  EXPECT_EQ(bm.count_bytes(), 100 * kKiB);
  bm.reset_range(64 * kKiB, 36 * kKiB);
  EXPECT_EQ(bm.count_bytes(), 64 * kKiB);
}

TEST(DirtyBitmap, NextDirtyAndNextCleanKeepOffsetInsideItsGranule) {
  DirtyBitmap bm(100 * 4096, 4096);
  bm.set_range(10 * 4096, 4096);
  EXPECT_EQ(bm.next_dirty(5), 10 * 4096u);
  EXPECT_EQ(bm.next_dirty(10 * 4096 + 7), 10 * 4096u + 7);
  EXPECT_EQ(bm.next_clean(10 * 4096 + 7), 11 * 4096u);
  EXPECT_EQ(bm.next_clean(3), 3u);
  EXPECT_EQ(bm.next_dirty(11 * 4096), 100 * 4096u);
}

TEST(DirtyBitmap, ExtentsStopAtMaxExtents) {
  DirtyBitmap bm(64 * 4096, 4096);
  for (uint64_t g = 0; g < 64; g += 2) bm.set_range(g * 4096, 1);
  EXPECT_EQ(extents_of(bm, 100, 64 * 4096, 3),
            (std::vector<ExtentTuple>{{100, 4096 - 100, 1}, {4096, 4096, 0}, {8192, 4096, 1}}));
}

TEST(DirtyBitmap, MergeFromFinerGranularityDirtiesOverlappedGranules) {
  const uint64_t disk = 10 * 65536 + 1000;
  DirtyBitmap target(disk, 65536);
  DirtyBitmap source(disk, 512);
  source.set_range(65536 - 512, 1024);  // two 512 B granules across a boundary
  source.set_range(disk - 1, 1);        // the last, partial granule
  target.merge_from(source);
  EXPECT_EQ(extents_of(target, 0, disk),
            (std::vector<ExtentTuple>{
                {0, 2 * 65536, 1}, {2 * 65536, 8 * 65536, 0}, {10 * 65536, 1000, 1}}));
}

TEST(DirtyBitmap, MergeFromCoarserGranularityDirtiesEveryCoveredGranule) {
  const uint64_t disk = 3 * 65536 + 1000;
  DirtyBitmap target(disk, 512);
  DirtyBitmap source(disk, 65536);
  source.set_range(disk - 1, 1);
  target.merge_from(source);
  EXPECT_EQ(target.dirty_granules(), div_ceil(1000, 512));
  EXPECT_EQ(target.next_dirty(0), 3 * 65536u);
}

TEST(DirtyBitmap, MergeFromSameGranularityIsAnOr) {
  DirtyBitmap a(1 * kMiB, 4096);
  DirtyBitmap b(1 * kMiB, 4096);
  a.set_range(0, 4096);
  b.set_range(500 * 1024, 8192);
  a.merge_from(b);
  EXPECT_EQ(a.dirty_granules(), 3u);
  EXPECT_EQ(b.dirty_granules(), 2u);
  a.merge_from(a);  // self-merge: no deadlock, no change
  EXPECT_EQ(a.dirty_granules(), 3u);
}

TEST(DirtyBitmap, CopyFromReplacesContents) {
  DirtyBitmap a(1 * kMiB, 4096);
  DirtyBitmap b(1 * kMiB, 4096);
  a.set_range(0, 40960);
  b.set_range(500 * 1024, 8192);
  a.copy_from(b);
  EXPECT_EQ(a.snapshot_words(), b.snapshot_words());
  EXPECT_EQ(a.dirty_granules(), 2u);
  EXPECT_EQ(a.next_dirty(0), 500 * 1024u);
  a.copy_from(a);
  EXPECT_EQ(a.dirty_granules(), 2u);
}

TEST(DirtyBitmap, LoadWordsMasksBitsPastTheEnd) {
  DirtyBitmap bm(70 * 512, 512);  // 70 granules: 6 valid bits in word 1
  const std::vector<uint64_t> words = {~uint64_t{0}, ~uint64_t{0}};
  bm.load_words(words);
  EXPECT_EQ(bm.dirty_granules(), 70u);
  EXPECT_EQ(bm.snapshot_words()[1], (uint64_t{1} << 6) - 1);
  EXPECT_EQ(bm.next_clean(0), 70 * 512u);
  DirtyBitmap copy(70 * 512, 512);
  copy.load_words(bm.snapshot_words());
  EXPECT_EQ(copy.snapshot_words(), bm.snapshot_words());
  std::vector<uint64_t> part(1);
  bm.read_words(1, part);
  EXPECT_EQ(part[0], (uint64_t{1} << 6) - 1);
  copy.store_words(0, std::vector<uint64_t>{0});
  EXPECT_EQ(copy.dirty_granules(), 6u);
  EXPECT_EQ(copy.next_dirty(0), 64 * 512u);
}

TEST(DirtyBitmap, TrackChangesListsEachChangedWordOnce) {
  DirtyBitmap bm(1000 * 64 * 512, 512);
  bm.set_range(0, 512);  // not tracked yet
  bm.track_changes(true);
  bm.set_range(0, 512);  // no change
  bm.set_range(64 * 512 * 5, 512);
  bm.set_range(64 * 512 * 5 + 1024, 512);
  bm.set_range(64 * 512 * 7 - 512, 1024);  // words 6 and 7
  bm.reset_range(0, 512);                  // word 0 changes
  auto changed = bm.take_changed_words();
  std::sort(changed.begin(), changed.end());
  EXPECT_EQ(changed, (std::vector<std::size_t>{0, 5, 6, 7}));
  EXPECT_TRUE(bm.take_changed_words().empty());
  bm.set_range(64 * 512 * 5 + 2048, 1);  // listed again after a take
  EXPECT_EQ(bm.take_changed_words(), (std::vector<std::size_t>{5}));
  bm.clear();
  changed = bm.take_changed_words();
  std::sort(changed.begin(), changed.end());
  EXPECT_EQ(changed, (std::vector<std::size_t>{5, 6, 7}));
  bm.track_changes(false);
  bm.set_range(0, 1);
  EXPECT_TRUE(bm.take_changed_words().empty());
}

TEST(DirtyBitmap, WordsCostOneBitPerGranulePlusSmallSummary) {
  const std::pair<uint64_t, uint32_t> cases[] = {
      {1, 512},           {64 * 512, 512},           {64 * 512 + 1, 512},
      {64 * kGiB, 65536}, {1 * kTiB + 12345, 65536}, {3 * kGiB + 1, 512}};
  for (auto [disk, gran] : cases) {
    DirtyBitmap bm(disk, gran);
    const uint64_t granules = div_ceil(disk, gran);
    EXPECT_EQ(bm.granules(), granules);
    EXPECT_EQ(bm.word_count(), div_ceil(granules, 64)) << disk;
    // Two summary stacks of ~1/64 each, plus at most one word per level.
    EXPECT_LE(bm.summary_word_count(), bm.word_count() / 30 + 2 * bm.summary_levels()) << disk;
  }
}

// Big sparse bitmaps: correct answers across long clean (or dirty)
// stretches, which the summary levels make cheap.
TEST(DirtyBitmap, SummaryLevelsOnBigSparseBitmaps) {
  const std::pair<uint64_t, uint32_t> cases[] = {{64 * kGiB, 65536}, {1 * kTiB, 512}};
  for (auto [disk, gran] : cases) {
    SCOPED_TRACE(testing::Message() << "disk=" << disk << " granularity=" << gran);
    DirtyBitmap bm(disk, gran);
    const uint64_t granules = disk / gran;
    EXPECT_EQ(bm.word_count(), div_ceil(granules, 64));
    std::size_t levels = 0;
    for (uint64_t n = bm.word_count(); n > 1; n = div_ceil(n, 64)) ++levels;
    EXPECT_EQ(bm.summary_levels(), levels);
    EXPECT_EQ(bm.next_dirty(0), disk);
    EXPECT_EQ(bm.next_clean(0), 0u);

    const uint64_t a = 3 * gran;
    const uint64_t b = disk / 3 / gran * gran;
    const uint64_t c = disk - gran;
    bm.set_range(a + 1, 1);
    bm.set_range(b + 5, 1);
    bm.set_range(disk - 1, 1);
    EXPECT_EQ(bm.count_bytes(), 3 * uint64_t{gran});
    EXPECT_EQ(bm.next_dirty(0), a);
    EXPECT_EQ(bm.next_dirty(a + gran), b);
    EXPECT_EQ(bm.next_dirty(b + gran), c);
    EXPECT_EQ(bm.next_clean(a), a + gran);
    EXPECT_EQ(bm.next_clean(c), disk);
    EXPECT_EQ(extents_of(bm, 0, disk), (std::vector<ExtentTuple>{{0, a, 0},
                                                                 {a, gran, 1},
                                                                 {a + gran, b - a - gran, 0},
                                                                 {b, gran, 1},
                                                                 {b + gran, c - b - gran, 0},
                                                                 {c, gran, 1}}));
    bm.reset_range(b, gran);
    EXPECT_EQ(bm.next_dirty(a + gran), c);

    // A long dirty stretch: next_clean must jump over it.
    const uint64_t start = disk / 2;
    bm.set_range(start, 1 * kGiB);
    EXPECT_EQ(bm.next_clean(start), start + 1 * kGiB);
    EXPECT_EQ(bm.next_dirty(start - gran), start);
    EXPECT_FALSE(bm.all_dirty(start, 1 * kGiB + 1));
    EXPECT_TRUE(bm.all_dirty(start, 1 * kGiB));
    bm.clear();
    EXPECT_EQ(bm.next_dirty(0), disk);
    EXPECT_EQ(bm.dirty_granules(), 0u);
  }
}

TEST(DirtyBitmap, NextCleanOnFullBitmapReturnsDiskSize) {
  for (uint64_t disk : {64 * 512u, 64 * 64 * 512u + 512 * 3 + 9, 64 * 64 * 64 * 512u}) {
    DirtyBitmap bm(disk, 512);
    bm.set_range(0, disk);
    EXPECT_EQ(bm.next_clean(0), disk);
    EXPECT_EQ(bm.next_clean(disk / 2 + 3), disk);
    EXPECT_EQ(bm.count_bytes(), disk);
    bm.reset_range(disk / 2 / 512 * 512, 512);
    EXPECT_EQ(bm.next_clean(0), disk / 2 / 512 * 512);
  }
}

TEST(DirtyBitmap, ConcurrentSetRangeEqualsUnion) {
  const uint64_t disk = 64 * kMiB + 1000;
  const uint32_t gran = 4096;
  DirtyBitmap bm(disk, gran);
  std::vector<ReferenceBitmap> refs(4, ReferenceBitmap(disk, gran));
  std::atomic<bool> done{false};
  std::vector<std::thread> writers;
  for (int t = 0; t < 4; ++t) {
    writers.emplace_back([&, t] {
      std::mt19937_64 rng(100 + t);
      for (int i = 0; i < 3000; ++i) {
        const uint64_t offset = rng() % disk;
        const uint64_t length = 1 + rng() % (256 * kKiB);
        bm.set_range(offset, length);
        refs[t].set_range(offset, length);
      }
    });
  }
  std::thread reader([&] {
    std::vector<Extent> out;
    while (!done.load()) {
      out.clear();
      bm.extents(0, disk, 64, out);
      (void)bm.next_clean(bm.next_dirty(disk / 2));
      (void)bm.count_bytes();
    }
  });
  for (auto& w : writers) w.join();
  done = true;
  reader.join();
  ReferenceBitmap all(disk, gran);
  for (const auto& ref : refs) all.merge_from(ref);
  expect_same(bm, all);
}

TEST(DirtyBitmap, ConcurrentCrossMergesDoNotDeadlock) {
  DirtyBitmap a(16 * kMiB, 4096);
  DirtyBitmap b(16 * kMiB, 65536);
  std::thread t1([&] {
    for (int i = 0; i < 300; ++i) {
      a.set_range(static_cast<uint64_t>(i) * 4096 * 7, 100);
      a.merge_from(b);
    }
  });
  std::thread t2([&] {
    for (int i = 0; i < 300; ++i) {
      b.set_range(static_cast<uint64_t>(i) * 65536 / 3, 100);
      b.merge_from(a);
    }
  });
  t1.join();
  t2.join();
  a.merge_from(b);
  // b holds a's last contents and more; after the final merge a covers b.
  DirtyBitmap check(16 * kMiB, 4096);
  check.merge_from(b);
  check.merge_from(a);
  EXPECT_EQ(check.snapshot_words(), a.snapshot_words());
}

}  // namespace
}  // namespace fleeced::block

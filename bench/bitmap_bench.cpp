// SPDX-License-Identifier: MIT
// Micro benchmark for block::DirtyBitmap: extents() enumeration over a 64 GiB
// disk with about 100k dirty extents (what an incremental backup's
// BLOCK_STATUS walk costs), and set_range() throughput. Not built by CMake;
// compile and run it from the repository root:
//
//   g++ -std=c++20 -O2 -DNDEBUG -I. -pthread -o /tmp/bitmap_bench
//       bench/bitmap_bench.cpp block/dirty_bitmap.cpp
//   /tmp/bitmap_bench
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <random>
#include <thread>
#include <vector>

#include "block/dirty_bitmap.hpp"

namespace {

using fleeced::block::DirtyBitmap;
using fleeced::block::Extent;
using Clock = std::chrono::steady_clock;

constexpr uint64_t kGiB = uint64_t{1} << 30;

double ms_since(Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

// The best of `runs` timings of fn(), in milliseconds.
template <typename Fn>
double best_of(int runs, Fn fn) {
  double best = 1e300;
  for (int i = 0; i < runs; ++i) {
    const auto start = Clock::now();
    fn();
    best = std::min(best, ms_since(start));
  }
  return best;
}

// `runs` dirty runs of 1-3 granules, spread evenly with random jitter, so
// dirty and clean extents alternate.
uint64_t fill(DirtyBitmap& bm, uint64_t runs, uint32_t seed) {
  std::mt19937_64 rng(seed);
  const uint64_t spacing = bm.granules() / runs;
  const uint64_t g = bm.granularity();
  for (uint64_t i = 0; i < runs; ++i) {
    const uint64_t start = i * spacing + rng() % (spacing / 2);
    bm.set_range(start * g, (1 + rng() % 3) * g);
  }
  std::vector<Extent> out;
  bm.extents(0, bm.disk_size(), SIZE_MAX, out);
  return std::count_if(out.begin(), out.end(), [](const Extent& e) { return e.flags == 1; });
}

void bench_extents(uint64_t disk, uint32_t granularity) {
  DirtyBitmap bm(disk, granularity);
  const uint64_t dirty_extents = fill(bm, 100000, 1);
  std::vector<Extent> out;
  out.reserve(300000);
  const double whole = best_of(10, [&] {
    out.clear();
    bm.extents(0, disk, SIZE_MAX, out);
  });
  const std::size_t total = out.size();
  // As an NBD client walks it: requests of up to 4 GiB, at most 1024
  // extents per reply, the next request starting where the reply ended.
  std::size_t calls = 0;
  const double chunked = best_of(10, [&] {
    calls = 0;
    for (uint64_t pos = 0; pos < disk;) {
      out.clear();
      bm.extents(pos, std::min<uint64_t>(disk - pos, 4 * kGiB - granularity), 1024, out);
      pos = out.back().offset + out.back().length;
      ++calls;
    }
  });
  uint64_t walked = 0;
  const double walk = best_of(10, [&] {
    walked = 0;
    for (uint64_t pos = bm.next_dirty(0); pos < disk; pos = bm.next_dirty(bm.next_clean(pos))) {
      ++walked;
    }
  });
  std::printf(
      "extents: disk %llu GiB, granularity %u, %llu dirty extents (%zu total): "
      "one call %.2f ms, 1024-extent calls (%zu) %.2f ms, next_dirty/next_clean walk %.2f ms "
      "(%.0f ns per extent)\n",
      static_cast<unsigned long long>(disk / kGiB), granularity,
      static_cast<unsigned long long>(dirty_extents), total, whole, calls, chunked, walk,
      whole * 1e6 / static_cast<double>(total));
  if (walked != dirty_extents)
    std::printf("  MISMATCH: walk found %llu\n", (unsigned long long)walked);
}

void bench_set_range(int threads, bool hot) {
  const uint64_t disk = 64 * kGiB;
  DirtyBitmap bm(disk, 65536);
  constexpr int kOps = 4'000'000;
  const auto start = Clock::now();
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      std::mt19937_64 rng(t + 7);
      for (int i = 0; i < kOps / threads; ++i) {
        const uint64_t offset = hot ? 4096 * (i % 16) : (rng() % (disk / 4096)) * 4096;
        bm.set_range(offset, 4096);
      }
    });
  }
  for (auto& th : pool) th.join();
  const double ms = ms_since(start);
  std::printf("set_range: %d thread(s), %s 4 KiB writes: %.1f M ops/s (%.0f ns/op), %llu dirty\n",
              threads, hot ? "hot (same granule)" : "random", kOps / ms / 1e3, ms * 1e6 / kOps,
              static_cast<unsigned long long>(bm.dirty_granules()));
}

void bench_big_range() {
  DirtyBitmap bm(1024 * kGiB, 512);  // 1 TiB at 512 B: 2^31 granules, 256 MiB
  const double set = best_of(1, [&] { bm.set_range(0, 1024 * kGiB); });
  const double again = best_of(3, [&] { bm.set_range(0, 1024 * kGiB); });
  const double clean = best_of(3, [&] { (void)bm.next_clean(0); });
  const double clear = best_of(1, [&] { bm.clear(); });
  std::printf(
      "1 TiB at 512 B: set whole disk %.1f ms, again (already dirty) %.4f ms, "
      "next_clean on full %.4f ms, clear %.1f ms\n",
      set, again, clean, clear);
}

}  // namespace

int main() {
  bench_extents(64 * kGiB, 65536);
  bench_extents(64 * kGiB, 4096);
  bench_extents(64 * kGiB, 512);
  for (int threads : {1, 4}) bench_set_range(threads, false);
  bench_set_range(1, true);
  bench_big_range();
  return 0;
}

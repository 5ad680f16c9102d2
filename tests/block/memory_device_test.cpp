// SPDX-License-Identifier: MIT
// MemoryDevice: contents, errors, and extents derived from zero blocks.
#include "block/memory_device.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cerrno>
#include <random>
#include <thread>
#include <vector>

namespace fleeced::block {
namespace {

constexpr uint64_t kKiB = 1024;
constexpr uint32_t kHoleZero = kExtentHole | kExtentZero;
const std::error_code kOk;

std::error_code errno_code(int err) { return {err, std::generic_category()}; }

std::vector<std::byte> pattern(size_t length, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<std::byte> v(length);
  for (auto& b : v) b = static_cast<std::byte>(rng() % 255 + 1);  // never zero
  return v;
}

std::vector<std::byte> read_back(Device& dev, uint64_t offset, size_t length) {
  std::vector<std::byte> v(length, std::byte{0x5a});
  EXPECT_EQ(dev.read(offset, v), kOk) << "offset=" << offset << " length=" << length;
  return v;
}

struct Want {
  uint64_t offset;
  uint64_t length;
  uint32_t flags;
};

void expect_extents(const std::vector<Extent>& got, const std::vector<Want>& want) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    EXPECT_EQ(got[i].offset, want[i].offset) << i;
    EXPECT_EQ(got[i].length, want[i].length) << i;
    EXPECT_EQ(got[i].flags, want[i].flags) << i;
  }
}

TEST(MemoryDevice, NewDeviceReadsZeroesAndIsOneHole) {
  MemoryDevice dev(64 * kKiB);
  EXPECT_EQ(dev.size(), 64 * kKiB);
  auto got = read_back(dev, 0, 64 * kKiB);
  EXPECT_TRUE(std::all_of(got.begin(), got.end(), [](std::byte b) { return b == std::byte{0}; }));
  std::vector<Extent> out;
  ASSERT_EQ(dev.extents(0, 64 * kKiB, out), kOk);
  expect_extents(out, {{0, 64 * kKiB, kHoleZero}});
}

TEST(MemoryDevice, ReportsCapabilities) {
  MemoryDevice rw(4096);
  Capabilities caps = rw.capabilities();
  EXPECT_FALSE(caps.read_only);
  EXPECT_TRUE(caps.can_flush);
  EXPECT_TRUE(caps.can_fua);
  EXPECT_TRUE(caps.can_trim);
  EXPECT_TRUE(caps.can_zero);
  EXPECT_TRUE(caps.can_fast_zero);
  EXPECT_TRUE(caps.can_extents);
  EXPECT_FALSE(caps.can_cache);
  EXPECT_TRUE(caps.can_multi_conn);
  MemoryDevice ro(4096, true);
  caps = ro.capabilities();
  EXPECT_TRUE(caps.read_only);
  EXPECT_FALSE(caps.can_trim);
  EXPECT_FALSE(caps.can_zero);
  EXPECT_FALSE(caps.can_fast_zero);
  EXPECT_TRUE(caps.can_extents);
}

TEST(MemoryDevice, ReadWriteRoundTripAtOddOffsets) {
  constexpr uint64_t kSize = 100 * kKiB + 7;
  MemoryDevice dev(kSize);
  std::vector<std::byte> model(kSize, std::byte{0});
  const std::pair<uint64_t, size_t> ops[] = {
      {1, 1}, {4095, 7}, {12345, 5000}, {kSize - 1, 1}, {kSize - 9000, 9000}, {0, 0}};
  uint32_t seed = 1;
  for (auto [offset, length] : ops) {
    auto data = pattern(length, seed++);
    ASSERT_EQ(dev.write(offset, data, seed % 2 == 0), kOk);
    std::copy(data.begin(), data.end(), model.begin() + static_cast<ptrdiff_t>(offset));
  }
  EXPECT_EQ(read_back(dev, 0, kSize), model);
  std::vector<std::byte> got(5000);
  ASSERT_EQ(dev.try_read(12345, got), kOk);
  EXPECT_TRUE(std::equal(got.begin(), got.end(), model.begin() + 12345));
  EXPECT_EQ(dev.flush(), kOk);
}

TEST(MemoryDevice, OutOfRangeRequestsFail) {
  MemoryDevice dev(8192);
  std::vector<std::byte> buf(2);
  EXPECT_EQ(dev.read(8191, buf), errno_code(EINVAL));
  EXPECT_EQ(dev.try_read(UINT64_MAX, buf), errno_code(EINVAL));
  EXPECT_EQ(dev.write(8191, buf, false), errno_code(ENOSPC));
  EXPECT_EQ(dev.write_zeroes(8192, 1, {}), errno_code(ENOSPC));
  EXPECT_EQ(dev.discard(UINT64_MAX, 2, false), errno_code(ENOSPC));
  std::vector<Extent> out;
  EXPECT_EQ(dev.extents(8192, 1, out), errno_code(EINVAL));
  EXPECT_EQ(dev.extents(0, 0, out), errno_code(EINVAL));
  EXPECT_TRUE(out.empty());
}

TEST(MemoryDevice, ReadOnlyRejectsWritesWithErofs) {
  MemoryDevice dev(8192, true);
  auto data = pattern(100, 2);
  EXPECT_EQ(dev.write(0, data, false), errno_code(EROFS));
  EXPECT_EQ(dev.write_zeroes(0, 100, {}), errno_code(EROFS));
  EXPECT_EQ(dev.discard(0, 100, false), errno_code(EROFS));
  EXPECT_EQ(read_back(dev, 0, 100), std::vector<std::byte>(100, std::byte{0}));
}

TEST(MemoryDevice, WriteZeroesZeroesOnlyTheRange) {
  MemoryDevice dev(16 * kKiB);
  auto model = pattern(16 * kKiB, 3);
  ASSERT_EQ(dev.write(0, model, false), kOk);
  ASSERT_EQ(dev.write_zeroes(100, 5000, {.fast = true}), kOk);
  std::fill_n(model.begin() + 100, 5000, std::byte{0});
  EXPECT_EQ(read_back(dev, 0, 16 * kKiB), model);
}

TEST(MemoryDevice, DiscardZeroesAndReportsHole) {
  MemoryDevice dev(32 * kKiB);
  ASSERT_EQ(dev.write(0, pattern(32 * kKiB, 4), false), kOk);
  ASSERT_EQ(dev.discard(8 * kKiB, 8 * kKiB, true), kOk);
  EXPECT_EQ(read_back(dev, 8 * kKiB, 8 * kKiB), std::vector<std::byte>(8 * kKiB, std::byte{0}));
  std::vector<Extent> out;
  ASSERT_EQ(dev.extents(0, 32 * kKiB, out), kOk);
  expect_extents(out,
                 {{0, 8 * kKiB, 0}, {8 * kKiB, 8 * kKiB, kHoleZero}, {16 * kKiB, 16 * kKiB, 0}});
}

TEST(MemoryDevice, ExtentsCoalesceAndClip) {
  MemoryDevice dev(8 * 4096 + 100);  // partial last block
  ASSERT_EQ(dev.write(4096 + 10, pattern(1, 5), false), kOk);
  ASSERT_EQ(dev.write(3 * 4096, pattern(4096, 6), false), kOk);
  ASSERT_EQ(dev.write(4 * 4096 + 4095, pattern(1, 7), false), kOk);
  ASSERT_EQ(dev.write(8 * 4096 + 99, pattern(1, 8), false), kOk);
  std::vector<Extent> out;
  ASSERT_EQ(dev.extents(0, UINT64_MAX, out), kOk);
  expect_extents(out, {{0, 4096, kHoleZero},
                       {4096, 4096, 0},
                       {8192, 4096, kHoleZero},
                       {12288, 8192, 0},
                       {20480, 12288, kHoleZero},
                       {32768, 100, 0}});
  // Clipped inside blocks, and existing entries are kept.
  out = {{1, 2, 3}};
  ASSERT_EQ(dev.extents(5000, 8000, out), kOk);
  expect_extents(out, {{1, 2, 3}, {5000, 3192, 0}, {8192, 4096, kHoleZero}, {12288, 712, 0}});
}

TEST(MemoryDevice, ExtentsStopAfterManyAndResume) {
  constexpr uint64_t kBlocks = 3000;
  MemoryDevice dev(kBlocks * 4096);
  for (uint64_t i = 0; i < kBlocks; i += 2)
    ASSERT_EQ(dev.write(i * 4096, pattern(1, 9), false), kOk);
  std::vector<Extent> out;
  ASSERT_EQ(dev.extents(0, kBlocks * 4096, out), kOk);
  EXPECT_EQ(out.size(), 1024u);
  uint64_t pos = out.back().offset + out.back().length;
  EXPECT_EQ(pos, 1024u * 4096);
  while (pos < kBlocks * 4096) {
    ASSERT_EQ(dev.extents(pos, kBlocks * 4096 - pos, out), kOk);
    pos = out.back().offset + out.back().length;
  }
  ASSERT_EQ(out.size(), kBlocks);
  for (uint64_t i = 0; i < kBlocks; ++i) {
    EXPECT_EQ(out[i].offset, i * 4096);
    EXPECT_EQ(out[i].flags, i % 2 == 0 ? 0u : kHoleZero);
  }
}

TEST(MemoryDevice, TryWriteWouldBlockAndCacheIsNoOp) {
  MemoryDevice dev(4096);
  auto data = pattern(10, 10);
  EXPECT_EQ(dev.try_write(0, data), std::make_error_code(std::errc::operation_would_block));
  EXPECT_EQ(dev.cache(0, 4096), kOk);
  EXPECT_EQ(read_back(dev, 0, 10), std::vector<std::byte>(10, std::byte{0}));
}

TEST(MemoryDevice, ConcurrentDisjointWritesAreAllKept) {
  constexpr int kThreads = 4;
  constexpr uint64_t kRegion = 50001;
  MemoryDevice dev(kThreads * kRegion);
  std::vector<std::vector<std::byte>> models;
  for (int t = 0; t < kThreads; ++t) models.push_back(pattern(kRegion, 20 + t));
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&dev, &models, t] {
      std::mt19937 rng(30 + t);
      for (int i = 0; i < 200; ++i) {
        uint64_t start = rng() % kRegion;
        uint64_t length = 1 + rng() % (kRegion - start);
        auto data = std::span(models[t]).subspan(start, length);
        EXPECT_EQ(dev.write(t * kRegion + start, data, false), kOk);
        std::vector<Extent> out;
        EXPECT_EQ(dev.extents(t * kRegion, kRegion, out), kOk);
      }
      EXPECT_EQ(dev.write(t * kRegion, models[t], false), kOk);
    });
  }
  for (auto& th : threads) th.join();
  for (int t = 0; t < kThreads; ++t) {
    EXPECT_EQ(read_back(dev, t * kRegion, kRegion), models[t]) << "thread " << t;
  }
}

}  // namespace
}  // namespace fleeced::block

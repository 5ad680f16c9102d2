// SPDX-License-Identifier: MIT
// CopyBeforeWrite and SnapshotAccess against in-memory devices: the snapshot
// keeps the point-in-time contents for every read size and alignment after
// writes, write-zeroes and discards; the target only holds copied data;
// bitmap-limited fleeces, copy failures (both policies), concurrency.
#include "fleece/copy_before_write.hpp"

#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <random>
#include <thread>

#include "block/memory_device.hpp"

namespace fleeced::fleece {
namespace {

using block::MemoryDevice;
using Bytes = std::vector<std::byte>;

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kCluster = 64 * kKiB;

Bytes pattern(std::size_t n, uint32_t seed) {
  Bytes b(n);
  std::mt19937 rng(seed);
  for (auto& x : b) x = std::byte(rng() % 255 + 1);  // never zero
  return b;
}

Bytes read_all(block::Device& d, uint64_t off, uint64_t len) {
  Bytes out(len);
  EXPECT_FALSE(d.read(off, out)) << "read " << off << "+" << len;
  return out;
}

// A target whose writes fail (or are counted) on demand.
class FaultyDevice final : public block::Device {
 public:
  explicit FaultyDevice(uint64_t size) : inner_(size) {}
  std::atomic<bool> fail{false};
  std::atomic<int> writes{0};
  std::atomic<int> delay_ms{0};
  std::atomic<bool> hold{false};  // writes wait while set (bounded: 10 s)
  bool all_data = false;          // extents: everything allocated (like a file of zeroes)
  uint64_t size() const override { return inner_.size(); }
  block::Capabilities capabilities() const override { return inner_.capabilities(); }
  std::error_code read(uint64_t o, std::span<std::byte> out) override {
    return inner_.read(o, out);
  }
  std::error_code write(uint64_t o, std::span<const std::byte> d, bool fua) override {
    ++writes;
    if (delay_ms > 0) std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms.load()));
    for (int i = 0; i < 10000 && hold; ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    if (fail) return {ENOSPC, std::generic_category()};
    return inner_.write(o, d, fua);
  }
  std::error_code write_zeroes(uint64_t o, uint64_t l, block::ZeroFlags f) override {
    return inner_.write_zeroes(o, l, f);
  }
  std::error_code discard(uint64_t o, uint64_t l, bool fua) override {
    return inner_.discard(o, l, fua);
  }
  std::error_code flush() override { return {}; }
  std::error_code extents(uint64_t o, uint64_t l, std::vector<block::Extent>& out) override {
    if (!all_data) return inner_.extents(o, l, out);
    out.push_back({o, l, 0});
    return {};
  }

 private:
  MemoryDevice inner_;
};

struct CbwTest : ::testing::Test {
  static constexpr uint64_t kSize = 2 * 1024 * kKiB + 5000;  // partial last cluster
  std::shared_ptr<MemoryDevice> source = std::make_shared<MemoryDevice>(kSize);
  std::shared_ptr<FaultyDevice> target = std::make_shared<FaultyDevice>(kSize);
  Bytes before;
  std::shared_ptr<CopyBeforeWrite> cbw;
  std::shared_ptr<SnapshotAccess> snap;

  void take(CbwOptions opt = {}) {
    if (opt.cluster_size == 0) opt.cluster_size = kCluster;  // the tests count 64 KiB clusters
    std::error_code ec;
    cbw = CopyBeforeWrite::create(source, target, opt, ec);
    ASSERT_TRUE(cbw) << ec.message();
    snap = std::make_shared<SnapshotAccess>(cbw);
  }
  void fill() {
    // Data everywhere except a zero island at [512K, 768K).
    before = pattern(kSize, 1);
    std::fill(before.begin() + 512 * kKiB, before.begin() + 768 * kKiB, std::byte{0});
    ASSERT_FALSE(source->write(0, before, false));
  }
  // Every read size/alignment of the snapshot returns `before`.
  void expect_point_in_time() {
    const std::pair<uint64_t, uint64_t> reads[] = {{0, kSize},          {1, 7},
                                                   {kCluster - 1, 2},   {kCluster, kCluster},
                                                   {100, 3 * kCluster}, {500 * kKiB, 300 * kKiB},
                                                   {kSize - 1, 1},      {kSize - 70000, 70000},
                                                   {12345, 1234567}};
    for (auto [off, len] : reads) {
      Bytes got = read_all(*snap, off, len);
      ASSERT_TRUE(std::equal(got.begin(), got.end(), before.begin() + off))
          << "snapshot read " << off << "+" << len << " is not the point in time";
    }
  }
};

TEST(CbwClusterSize, AutomaticSizeKeepsBitmapsSmall) {
  constexpr uint64_t GiB = uint64_t{1} << 30;
  EXPECT_EQ(CopyBeforeWrite::auto_cluster_size(1), 4096u);
  EXPECT_EQ(CopyBeforeWrite::auto_cluster_size(64 * GiB), 4096u);
  EXPECT_EQ(CopyBeforeWrite::auto_cluster_size(512 * GiB), 4096u);
  EXPECT_EQ(CopyBeforeWrite::auto_cluster_size(512 * GiB + 4096), 8192u);
  EXPECT_EQ(CopyBeforeWrite::auto_cluster_size(1024 * GiB), 8192u);
  EXPECT_EQ(CopyBeforeWrite::auto_cluster_size(64 * 1024 * GiB), 512u * 1024);
  // A small disk gets 4 KiB clusters: a 4 KiB write copies 4 KiB.
  auto src = std::make_shared<MemoryDevice>(1024 * kKiB);
  auto tgt = std::make_shared<MemoryDevice>(1024 * kKiB);
  ASSERT_FALSE(src->write(0, pattern(1024 * kKiB, 1), false));
  std::error_code ec;
  auto cbw = CopyBeforeWrite::create(src, tgt, {}, ec);
  ASSERT_TRUE(cbw);
  EXPECT_EQ(cbw->cluster_size(), 4096u);
  ASSERT_FALSE(cbw->write(8192, pattern(4096, 2), false));
  EXPECT_EQ(cbw->stats().copied_bytes, 4096u);
}

TEST_F(CbwTest, RejectsSmallTargetBadClusterAndWrongBitmapSize) {
  std::error_code ec;
  auto small = std::make_shared<MemoryDevice>(kSize - 1);
  EXPECT_FALSE(CopyBeforeWrite::create(source, small, {}, ec));
  EXPECT_EQ(ec, std::errc::invalid_argument);
  auto ro = std::make_shared<MemoryDevice>(kSize, true);
  EXPECT_FALSE(CopyBeforeWrite::create(source, ro, {}, ec));
  EXPECT_FALSE(CopyBeforeWrite::create(source, target, {.cluster_size = 3000}, ec));
  block::DirtyBitmap other(kSize + 1, 65536);
  EXPECT_FALSE(CopyBeforeWrite::create(source, target, {.bitmap = &other}, ec));
}

TEST_F(CbwTest, WritesZeroesAndDiscardsKeepThePointInTime) {
  fill();
  take();
  // Live changes: unaligned write, write across clusters, zeroes, discard,
  // a write into the zero island, the partial last cluster.
  ASSERT_FALSE(cbw->write(3, pattern(10, 2), false));
  ASSERT_FALSE(cbw->write(kCluster - 5, pattern(kCluster + 10, 3), false));
  ASSERT_FALSE(cbw->write_zeroes(300 * kKiB, 200 * kKiB, {.may_trim = true}));
  ASSERT_FALSE(cbw->discard(1024 * kKiB, 2 * kCluster, false));
  ASSERT_FALSE(cbw->write(600 * kKiB, pattern(4096, 4), false));
  ASSERT_FALSE(cbw->write(kSize - 10, pattern(10, 5), false));
  expect_point_in_time();
  // The live disk has the new data.
  EXPECT_EQ(read_all(*cbw, 3, 10), pattern(10, 2));
  EXPECT_EQ(read_all(*source, kSize - 10, 10), pattern(10, 5));
  Bytes z = read_all(*source, 300 * kKiB, 200 * kKiB);
  EXPECT_TRUE(std::all_of(z.begin(), z.end(), [](std::byte b) { return b == std::byte{0}; }));
}

TEST_F(CbwTest, CopiesEachClusterOnceAndSkipsZeroClusters) {
  fill();
  take();
  ASSERT_FALSE(cbw->write(0, pattern(100, 2), false));
  CbwStats s = cbw->stats();
  EXPECT_EQ(s.copied_bytes, kCluster);
  EXPECT_EQ(s.target_bytes, kCluster);
  // Second write to the same cluster goes straight through.
  const int writes = target->writes;
  ASSERT_FALSE(cbw->write(200, pattern(100, 3), false));
  EXPECT_EQ(target->writes, writes);
  EXPECT_EQ(cbw->stats().copied_bytes, kCluster);
  // A write over the zero island copies nothing into the target.
  ASSERT_FALSE(cbw->write(512 * kKiB, pattern(256 * kKiB, 4), false));
  s = cbw->stats();
  EXPECT_EQ(s.copied_bytes, kCluster + 256 * kKiB);
  EXPECT_EQ(s.target_bytes, kCluster);
  // A multi-cluster write is copied in one batch.
  const uint64_t ops = s.copy_ops;
  ASSERT_FALSE(cbw->write(kCluster, pattern(4 * kCluster, 5), false));
  EXPECT_EQ(cbw->stats().copy_ops, ops + 1);
  expect_point_in_time();
}

TEST_F(CbwTest, SnapshotAllocationIsThePointInTime) {
  // Source: data in cluster 0 only. Then the live disk zeroes it and writes
  // cluster 5: the snapshot still reports data at 0 and a hole at 5.
  ASSERT_FALSE(source->write(0, pattern(kCluster, 1), false));
  take();
  ASSERT_FALSE(cbw->write_zeroes(0, kCluster, {.may_trim = true}));
  ASSERT_FALSE(cbw->write(5 * kCluster, pattern(kCluster, 2), false));
  std::vector<block::Extent> ext;
  ASSERT_FALSE(snap->extents(0, kSize, ext));
  ASSERT_GE(ext.size(), 2u);
  EXPECT_EQ(ext[0].offset, 0u);
  EXPECT_EQ(ext[0].length, kCluster);
  EXPECT_EQ(ext[0].flags, 0u);
  uint64_t pos = 0;
  for (const auto& e : ext) {
    EXPECT_EQ(e.offset, pos);
    if (e.offset >= kCluster) {
      EXPECT_EQ(e.flags, block::kExtentHole | block::kExtentZero) << "at " << e.offset;
    }
    pos += e.length;
  }
  EXPECT_LE(pos, kSize);
  EXPECT_EQ(read_all(*snap, 0, kCluster), pattern(kCluster, 1));
}

// Allocated zeroes at the point in time stay "data" in the snapshot's
// allocation after the live disk overwrites them (they are not stored in
// the target either); unallocated zeroes stay holes.
TEST(CbwAllocation, AllocatedZeroesStayDataHolesStayHoles) {
  constexpr uint64_t size = 8 * kCluster;
  auto src = std::make_shared<FaultyDevice>(size);
  src->all_data = true;
  auto tgt = std::make_shared<MemoryDevice>(size);
  std::error_code ec;
  auto cbw = CopyBeforeWrite::create(src, tgt, {}, ec);
  ASSERT_TRUE(cbw);
  SnapshotAccess snap(cbw);
  ASSERT_FALSE(cbw->write(10, pattern(1, 1), false));  // cluster 0: allocated zeroes
  EXPECT_EQ(cbw->stats().target_bytes, 0u);
  std::vector<block::Extent> ext;
  ASSERT_FALSE(snap.extents(0, kCluster, ext));
  ASSERT_EQ(ext.size(), 1u);
  EXPECT_EQ(ext[0].flags, 0u) << "allocated zeroes reported as a hole";
  EXPECT_EQ(read_all(snap, 0, kCluster), Bytes(kCluster, std::byte{0}));

  auto src2 = std::make_shared<MemoryDevice>(size);  // reports zero blocks as holes
  auto cbw2 = CopyBeforeWrite::create(src2, tgt, {}, ec);
  ASSERT_TRUE(cbw2);
  SnapshotAccess snap2(cbw2);
  ASSERT_FALSE(cbw2->write(10, pattern(1, 1), false));
  ext.clear();
  ASSERT_FALSE(snap2.extents(0, kCluster, ext));
  ASSERT_EQ(ext.size(), 1u);
  EXPECT_EQ(ext[0].flags, block::kExtentHole | block::kExtentZero);
}

TEST_F(CbwTest, BitmapLimitsWhatIsCopiedAndReadable) {
  fill();
  block::DirtyBitmap bm(kSize, 65536);
  bm.set_range(2 * kCluster, kCluster);  // only cluster 2
  take({.bitmap = &bm});
  ASSERT_FALSE(cbw->write(0, pattern(4 * kCluster, 9), false));
  EXPECT_EQ(cbw->stats().copied_bytes, kCluster);
  Bytes out(kCluster);
  EXPECT_EQ(snap->read(2 * kCluster, out), std::error_code());
  EXPECT_TRUE(std::equal(out.begin(), out.end(), before.begin() + 2 * kCluster));
  EXPECT_EQ(snap->read(0, out), std::errc::permission_denied);
  EXPECT_EQ(snap->read(2 * kCluster + 10, out), std::errc::permission_denied);
  std::vector<block::Extent> ext;
  EXPECT_EQ(snap->extents(0, kCluster, ext), std::errc::permission_denied);
}

TEST_F(CbwTest, BreakGuestWriteFailsTheLiveWriteAndKeepsTheSnapshot) {
  fill();
  take();
  target->fail = true;
  EXPECT_EQ(cbw->write(0, pattern(10, 2), false), std::errc::no_space_on_device);
  EXPECT_EQ(read_all(*source, 0, 10), Bytes(before.begin(), before.begin() + 10));
  target->fail = false;
  expect_point_in_time();
}

TEST_F(CbwTest, BreakSnapshotLetsTheWriteThroughAndFailsLaterReads) {
  fill();
  take({.on_error = OnCbwError::break_snapshot});
  target->fail = true;
  EXPECT_FALSE(cbw->write(0, pattern(10, 2), false));
  EXPECT_EQ(read_all(*source, 0, 10), pattern(10, 2));
  Bytes out(100);
  EXPECT_EQ(snap->read(kCluster * 3, out), std::errc::io_error);
  std::vector<block::Extent> ext;
  EXPECT_EQ(snap->extents(0, 100, ext), std::errc::io_error);
  EXPECT_TRUE(cbw->stats().broken);
  // Live writes keep working without copies.
  target->fail = false;
  const int writes = target->writes;
  EXPECT_FALSE(cbw->write(5 * kCluster, pattern(10, 3), false));
  EXPECT_EQ(target->writes, writes);
}

// The target blocks until released: a live write with cbw-timeout must come
// back while the copy is still stuck (no wall-clock assertions: the stuck
// copy is what proves the write did not wait for it).
void write_while_target_hangs(CbwTest& t, OnCbwError policy, std::error_code& result) {
  t.fill();
  t.take({.on_error = policy, .timeout = std::chrono::milliseconds(20)});
  t.target->hold = true;
  std::atomic<bool> done{false};
  std::thread writer([&] {
    result = t.cbw->write(0, pattern(10, 2), false);
    done = true;
  });
  for (int i = 0; i < 5000 && !done; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  EXPECT_TRUE(done) << "the live write waited for a copy that cannot finish";
  EXPECT_TRUE(t.target->hold) << "the copy was released before the write returned";
  t.target->hold = false;  // let the background copy finish
  writer.join();
}

TEST_F(CbwTest, TimeoutBreaksTheSnapshotWithoutWaitingForTheCopy) {
  std::error_code ec;
  write_while_target_hangs(*this, OnCbwError::break_snapshot, ec);
  EXPECT_FALSE(ec);
  EXPECT_TRUE(cbw->stats().broken);
  EXPECT_EQ(read_all(*source, 0, 10), pattern(10, 2));
  Bytes out(10);
  EXPECT_EQ(snap->read(0, out), std::errc::io_error);
}

TEST_F(CbwTest, TimeoutFailsTheGuestWriteWithEio) {
  std::error_code ec;
  write_while_target_hangs(*this, OnCbwError::break_guest_write, ec);
  EXPECT_EQ(ec, std::errc::io_error);
  EXPECT_EQ(read_all(*source, 0, 10), Bytes(before.begin(), before.begin() + 10));
  // The copy finished in the background: the snapshot is intact and a
  // retried write goes through.
  for (int i = 0; i < 5000 && cbw->stats().copied_bytes == 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  EXPECT_FALSE(cbw->write(0, pattern(10, 2), false));
  expect_point_in_time();
}

TEST_F(CbwTest, ReleasePunchesTheTargetAndEndsTheSnapshot) {
  fill();
  take();
  ASSERT_FALSE(cbw->write(0, pattern(3 * kCluster, 2), false));
  Bytes t = read_all(*target, 0, kCluster);
  EXPECT_TRUE(std::equal(t.begin(), t.end(), before.begin()));
  cbw->release();
  t = read_all(*target, 0, 3 * kCluster);
  EXPECT_TRUE(std::all_of(t.begin(), t.end(), [](std::byte b) { return b == std::byte{0}; }));
  Bytes out(10);
  EXPECT_EQ(snap->read(0, out), std::errc::io_error);
  EXPECT_FALSE(cbw->write(5 * kCluster, pattern(10, 3), false));
}

// A copy-before-write may read old data from storage before each write, so
// it never asks for its writes to run one at a time, even over a source
// that would.
TEST_F(CbwTest, WritesAreNotSerialEvenOverASerialSource) {
  struct SerialSource final : block::Device {
    MemoryDevice inner{kSize};
    uint64_t size() const override { return inner.size(); }
    block::Capabilities capabilities() const override {
      block::Capabilities c = inner.capabilities();
      c.serial_writes = true;
      return c;
    }
    std::error_code read(uint64_t o, std::span<std::byte> out) override {
      return inner.read(o, out);
    }
    std::error_code write(uint64_t o, std::span<const std::byte> d, bool fua) override {
      return inner.write(o, d, fua);
    }
    std::error_code write_zeroes(uint64_t o, uint64_t l, block::ZeroFlags f) override {
      return inner.write_zeroes(o, l, f);
    }
    std::error_code discard(uint64_t o, uint64_t l, bool fua) override {
      return inner.discard(o, l, fua);
    }
    std::error_code flush() override { return inner.flush(); }
  };
  auto serial = std::make_shared<SerialSource>();
  ASSERT_TRUE(serial->capabilities().serial_writes);
  std::error_code ec;
  auto filter = CopyBeforeWrite::create(serial, target, {.cluster_size = kCluster}, ec);
  ASSERT_TRUE(filter) << ec.message();
  EXPECT_FALSE(filter->capabilities().serial_writes);
  EXPECT_FALSE(filter->capabilities().read_only);
}

TEST_F(CbwTest, SnapshotRejectsWritesAndOutOfRange) {
  take();
  EXPECT_TRUE(snap->capabilities().read_only);
  EXPECT_TRUE(snap->capabilities().can_multi_conn);
  EXPECT_EQ(snap->write(0, pattern(1, 1), false), std::errc::operation_not_permitted);
  Bytes out(2);
  EXPECT_EQ(snap->read(kSize - 1, out), std::errc::invalid_argument);
}

TEST_F(CbwTest, TryReadNeverBlocksOnAHeldRange) {
  fill();
  take();
  target->delay_ms = 200;
  std::thread writer([&] { EXPECT_FALSE(cbw->write(0, pattern(10, 2), false)); });
  // Wait (bounded) until the copy holds cluster 0.
  for (int i = 0; i < 200 && target->writes == 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  Bytes out(10);
  EXPECT_EQ(snap->try_read(0, out), std::errc::operation_would_block);
  // A blocking read waits for the copy and returns the old data.
  EXPECT_FALSE(snap->read(0, out));
  EXPECT_TRUE(std::equal(out.begin(), out.end(), before.begin()));
  writer.join();
}

// Many writers and readers at once: every snapshot read is the point in
// time, every cluster is copied at most once, the live disk ends as written.
TEST_F(CbwTest, ConcurrentWritersAndReadersSeeThePointInTime) {
  fill();
  take();
  std::atomic<bool> bad{false};
  std::vector<std::thread> threads;
  for (int w = 0; w < 4; ++w) {
    threads.emplace_back([&, w] {
      std::mt19937_64 rng(w);
      for (int i = 0; i < 300; ++i) {
        const uint64_t len = rng() % (3 * kCluster) + 1;
        const uint64_t off = rng() % (kSize - len);
        switch (rng() % 3) {
          case 0:
            if (cbw->write(off, pattern(len, i), false)) bad = true;
            break;
          case 1:
            if (cbw->write_zeroes(off, len, {.may_trim = true})) bad = true;
            break;
          default:
            if (cbw->discard(off, len, false)) bad = true;
        }
      }
    });
  }
  for (int r = 0; r < 3; ++r) {
    threads.emplace_back([&, r] {
      std::mt19937_64 rng(100 + r);
      Bytes out;
      for (int i = 0; i < 300; ++i) {
        const uint64_t len = rng() % (4 * kCluster) + 1;
        const uint64_t off = rng() % (kSize - len);
        out.resize(len);
        std::error_code ec = (i % 2) ? snap->read(off, out) : snap->try_read(off, out);
        if (ec == std::errc::operation_would_block) continue;
        if (ec || !std::equal(out.begin(), out.end(), before.begin() + off)) bad = true;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_FALSE(bad);
  EXPECT_LE(cbw->stats().copied_bytes, kSize);
  expect_point_in_time();
}

}  // namespace
}  // namespace fleeced::fleece

// SPDX-License-Identifier: MIT
// FileDevice against real files in a private mkdtemp directory (ext4 with
// 4 KiB blocks on the CI box; tests that depend on the filesystem say so).
// Block devices are tested only when FLEECED_TEST_BLOCK_DEVICE names one
// whose contents may be destroyed.
#include "block/file_device.hpp"

#include <fcntl.h>
#include <linux/magic.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cerrno>
#include <cstdlib>
#include <filesystem>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace fleeced::block {
namespace {

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1024 * kKiB;
constexpr uint32_t kHoleZero = kExtentHole | kExtentZero;
const std::error_code kOk;
const std::error_code kWouldBlock = std::make_error_code(std::errc::operation_would_block);

std::error_code errno_code(int err) { return {err, std::generic_category()}; }

// A private directory under base (default $TMPDIR or /tmp), removed with
// everything in it.
class TempDir {
 public:
  explicit TempDir(std::string base = "") {
    if (base.empty()) {
      const char* tmp = std::getenv("TMPDIR");
      base = tmp != nullptr ? tmp : "/tmp";
    }
    std::string templ = base + "/fleeced-block-XXXXXX";
    if (::mkdtemp(templ.data()) != nullptr) path_ = templ;
  }
  ~TempDir() {
    std::error_code ec;
    if (!path_.empty()) std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  bool ok() const { return !path_.empty(); }
  std::string file(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// Creates a sparse file of the given size; returns its path ("" on failure).
std::string make_file(const TempDir& dir, const std::string& name, uint64_t size) {
  std::string path = dir.file(name);
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) return "";
  bool ok = ::ftruncate(fd, static_cast<off_t>(size)) == 0;
  ::close(fd);
  return ok ? path : "";
}

std::shared_ptr<FileDevice> open_device(const std::string& path, bool writable, bool direct = false,
                                        bool discard = true) {
  std::error_code ec;
  auto dev = FileDevice::open(FileOptions{path, writable, direct, discard}, ec);
  EXPECT_EQ(ec, kOk) << path;
  return dev;
}

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

bool all_zero(const std::vector<std::byte>& v) {
  return std::all_of(v.begin(), v.end(), [](std::byte b) { return b == std::byte{0}; });
}

uint64_t allocated_bytes(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return UINT64_MAX;
  return static_cast<uint64_t>(st.st_blocks) * 512;
}

// Asks for extents until [offset, offset+length) is covered, checking that
// each answer is contiguous and within bounds.
std::vector<Extent> all_extents(Device& dev, uint64_t offset, uint64_t length,
                                size_t* calls = nullptr) {
  std::vector<Extent> all;
  uint64_t pos = offset;
  const uint64_t end = offset + length;
  size_t n = 0;
  while (pos < end) {
    std::vector<Extent> part;
    EXPECT_EQ(dev.extents(pos, end - pos, part), kOk);
    EXPECT_FALSE(part.empty());
    if (part.empty()) break;
    for (const Extent& e : part) {
      EXPECT_EQ(e.offset, pos);
      EXPECT_GT(e.length, 0u);
      EXPECT_LE(e.offset + e.length, end);
      if (!all.empty() && all.back().flags == e.flags &&
          all.back().offset + all.back().length == e.offset) {
        all.back().length += e.length;  // merge across calls only
      } else {
        all.push_back(e);
      }
      pos = e.offset + e.length;
    }
    ++n;
  }
  if (calls != nullptr) *calls = n;
  return all;
}

std::string describe(const std::vector<Extent>& extents) {
  std::string s;
  for (const Extent& e : extents) {
    s += "[" + std::to_string(e.offset) + "+" + std::to_string(e.length) + " f" +
         std::to_string(e.flags) + "] ";
  }
  return s;
}

bool same_extents(const std::vector<Extent>& a, const std::vector<Extent>& b) {
  return std::equal(a.begin(), a.end(), b.begin(), b.end(), [](const Extent& x, const Extent& y) {
    return x.offset == y.offset && x.length == y.length && x.flags == y.flags;
  });
}

// Flags of the single extent covering [offset, offset+length), or ~0u.
uint32_t flags_of(Device& dev, uint64_t offset, uint64_t length) {
  auto extents = all_extents(dev, offset, length);
  return extents.size() == 1 ? extents[0].flags : ~0u;
}

// Opens with O_DIRECT; sets *skip when the filesystem refuses it.
std::shared_ptr<FileDevice> open_direct(const std::string& path, bool* skip) {
  std::error_code ec;
  auto dev = FileDevice::open(FileOptions{path, true, true, true}, ec);
  *skip = ec == std::errc::invalid_argument;
  if (!*skip) {
    EXPECT_EQ(ec, kOk);
  }
  return dev;
}

TEST(FileDevice, OpenMissingFileFailsWithEnoent) {
  TempDir dir;
  ASSERT_TRUE(dir.ok());
  std::error_code ec;
  auto dev = FileDevice::open(FileOptions{dir.file("missing"), true}, ec);
  EXPECT_EQ(dev, nullptr);
  EXPECT_EQ(ec, errno_code(ENOENT));
}

TEST(FileDevice, OpenDirectoryFailsWithEisdir) {
  TempDir dir;
  ASSERT_TRUE(dir.ok());
  std::error_code ec;
  auto dev = FileDevice::open(FileOptions{dir.file("."), false}, ec);
  EXPECT_EQ(dev, nullptr);
  EXPECT_EQ(ec, errno_code(EISDIR));
}

TEST(FileDevice, ReportsSizeAndWritableCapabilities) {
  TempDir dir;
  auto path = make_file(dir, "disk", 3 * kMiB + 512);
  auto dev = open_device(path, true);
  ASSERT_NE(dev, nullptr);
  EXPECT_EQ(dev->size(), 3 * kMiB + 512);
  EXPECT_EQ(dev->path(), path);
  Capabilities caps = dev->capabilities();
  EXPECT_FALSE(caps.read_only);
  EXPECT_TRUE(caps.can_flush);
  EXPECT_TRUE(caps.can_fua);
  EXPECT_TRUE(caps.can_trim);
  EXPECT_TRUE(caps.can_zero);
  EXPECT_TRUE(caps.can_fast_zero);
  EXPECT_TRUE(caps.can_extents);
  EXPECT_TRUE(caps.can_cache);
  EXPECT_TRUE(caps.can_multi_conn);
  EXPECT_TRUE(caps.serial_writes);  // buffered writes to one file share its inode lock
}

TEST(FileDevice, ReportsReadOnlyCapabilities) {
  TempDir dir;
  auto dev = open_device(make_file(dir, "disk", kMiB), false);
  ASSERT_NE(dev, nullptr);
  Capabilities caps = dev->capabilities();
  EXPECT_TRUE(caps.read_only);
  EXPECT_FALSE(caps.can_trim);
  EXPECT_FALSE(caps.can_zero);
  EXPECT_FALSE(caps.can_fast_zero);
  EXPECT_TRUE(caps.can_extents);
  EXPECT_FALSE(caps.serial_writes);
}

// O_DIRECT writes to a file can run side by side: no serial_writes.
TEST(FileDevice, DirectWritesAreNotSerial) {
  TempDir dir;
  bool skip = false;
  auto dev = open_direct(make_file(dir, "disk", kMiB), &skip);
  if (skip) {
    GTEST_SKIP() << "O_DIRECT not supported here";
  }
  ASSERT_NE(dev, nullptr);
  EXPECT_FALSE(dev->capabilities().serial_writes);
}

TEST(FileDevice, NoDiscardOptionDisablesTrim) {
  TempDir dir;
  auto path = make_file(dir, "disk", kMiB);
  auto dev = open_device(path, true, false, /*discard=*/false);
  ASSERT_NE(dev, nullptr);
  EXPECT_FALSE(dev->capabilities().can_trim);
  auto data = pattern(64 * kKiB, 1);
  ASSERT_EQ(dev->write(0, data, false), kOk);
  // Discard is advisory: with discard off it succeeds and changes nothing.
  EXPECT_EQ(dev->discard(0, 64 * kKiB, false), kOk);
  EXPECT_EQ(read_back(*dev, 0, data.size()), data);
}

TEST(FileDevice, ReadWriteRoundTripAtOddOffsets) {
  TempDir dir;
  constexpr uint64_t kSize = 2 * kMiB + 123;
  auto dev = open_device(make_file(dir, "disk", kSize), true);
  ASSERT_NE(dev, nullptr);
  std::vector<std::byte> model(kSize, std::byte{0});
  struct Op {
    uint64_t offset;
    size_t length;
  };
  const Op ops[] = {
      {1, 1},   {4095, 7}, {12345, 5000}, {kMiB - 3, 70000}, {kSize - 1, 1}, {kSize - 9000, 9000},
      {0, 4096}};
  uint32_t seed = 10;
  for (const Op& op : ops) {
    auto data = pattern(op.length, seed++);
    ASSERT_EQ(dev->write(op.offset, data, false), kOk) << op.offset;
    std::copy(data.begin(), data.end(), model.begin() + static_cast<ptrdiff_t>(op.offset));
  }
  EXPECT_EQ(read_back(*dev, 0, kSize), model);
  for (const Op& op : ops) {
    auto got = read_back(*dev, op.offset, op.length);
    EXPECT_TRUE(
        std::equal(got.begin(), got.end(), model.begin() + static_cast<ptrdiff_t>(op.offset)))
        << op.offset;
  }
}

TEST(FileDevice, WriteWithFuaIsReadBack) {
  TempDir dir;
  auto path = make_file(dir, "disk", kMiB);
  auto dev = open_device(path, true);
  ASSERT_NE(dev, nullptr);
  auto data = pattern(10000, 2);
  ASSERT_EQ(dev->write(777, data, true), kOk);
  EXPECT_EQ(dev->flush(), kOk);
  // A fresh descriptor sees the same bytes.
  auto other = open_device(path, false);
  ASSERT_NE(other, nullptr);
  EXPECT_EQ(read_back(*other, 777, data.size()), data);
}

TEST(FileDevice, OutOfRangeRequestsFail) {
  TempDir dir;
  auto dev = open_device(make_file(dir, "disk", 64 * kKiB), true);
  ASSERT_NE(dev, nullptr);
  std::vector<std::byte> buf(2);
  EXPECT_EQ(dev->read(64 * kKiB - 1, buf), errno_code(EINVAL));
  EXPECT_EQ(dev->try_read(64 * kKiB - 1, buf), errno_code(EINVAL));
  EXPECT_EQ(dev->read(UINT64_MAX, buf), errno_code(EINVAL));
  EXPECT_EQ(dev->write(64 * kKiB - 1, buf, false), errno_code(ENOSPC));
  EXPECT_EQ(dev->try_write(64 * kKiB - 1, buf), errno_code(ENOSPC));
  EXPECT_EQ(dev->write_zeroes(64 * kKiB, 1, {}), errno_code(ENOSPC));
  EXPECT_EQ(dev->discard(UINT64_MAX, 2, false), errno_code(ENOSPC));
  std::vector<Extent> out;
  EXPECT_EQ(dev->extents(64 * kKiB, 1, out), errno_code(EINVAL));
  EXPECT_EQ(dev->extents(0, 0, out), errno_code(EINVAL));
  EXPECT_TRUE(out.empty());
}

TEST(FileDevice, ReadOnlyRejectsWritesWithErofs) {
  TempDir dir;
  auto path = make_file(dir, "disk", kMiB);
  {
    auto rw = open_device(path, true);
    ASSERT_NE(rw, nullptr);
    ASSERT_EQ(rw->write(0, pattern(8192, 3), false), kOk);
  }
  auto dev = open_device(path, false);
  ASSERT_NE(dev, nullptr);
  auto data = pattern(100, 4);
  EXPECT_EQ(dev->write(0, data, false), errno_code(EROFS));
  EXPECT_EQ(dev->try_write(0, data), errno_code(EROFS));
  EXPECT_EQ(dev->write_zeroes(0, 4096, {.may_trim = true}), errno_code(EROFS));
  EXPECT_EQ(dev->discard(0, 4096, false), errno_code(EROFS));
  EXPECT_EQ(read_back(*dev, 0, 8192), pattern(8192, 3));
  EXPECT_EQ(dev->flush(), kOk);
}

TEST(FileDevice, PunchHoleReadsZeroes) {
  TempDir dir;
  auto path = make_file(dir, "disk", kMiB);
  auto dev = open_device(path, true);
  ASSERT_NE(dev, nullptr);
  auto data = pattern(256 * kKiB, 5);
  ASSERT_EQ(dev->write(0, data, true), kOk);
  const uint64_t before = allocated_bytes(path);
  ASSERT_EQ(dev->write_zeroes(64 * kKiB, 128 * kKiB, {.may_trim = true}), kOk);
  EXPECT_TRUE(all_zero(read_back(*dev, 64 * kKiB, 128 * kKiB)));
  auto head = read_back(*dev, 0, 64 * kKiB);
  EXPECT_TRUE(std::equal(head.begin(), head.end(), data.begin()));
  auto tail = read_back(*dev, 192 * kKiB, 64 * kKiB);
  EXPECT_TRUE(std::equal(tail.begin(), tail.end(), data.begin() + 192 * kKiB));
  EXPECT_EQ(flags_of(*dev, 64 * kKiB, 128 * kKiB), kHoleZero);
  EXPECT_EQ(allocated_bytes(path), before - 128 * kKiB);
}

TEST(FileDevice, ZeroWithoutTrimKeepsAllocation) {
  TempDir dir;
  auto path = make_file(dir, "disk", kMiB);
  auto dev = open_device(path, true);
  ASSERT_NE(dev, nullptr);
  ASSERT_EQ(dev->write(0, pattern(256 * kKiB, 6), true), kOk);
  const uint64_t before = allocated_bytes(path);
  ASSERT_EQ(dev->write_zeroes(64 * kKiB, 128 * kKiB, {.may_trim = false}), kOk);
  EXPECT_TRUE(all_zero(read_back(*dev, 64 * kKiB, 128 * kKiB)));
  // NO_HOLE: the blocks stay allocated. ext4 keeps them as unwritten extents,
  // which SEEK_HOLE reports as holes, so extents must at least say "zero" (or
  // "data" where zeroes were written).
  EXPECT_EQ(allocated_bytes(path), before);
  for (const Extent& e : all_extents(*dev, 64 * kKiB, 128 * kKiB)) {
    EXPECT_TRUE(e.flags == kHoleZero || e.flags == 0) << e.flags;
  }
  EXPECT_EQ(flags_of(*dev, 0, 64 * kKiB), 0u);
}

TEST(FileDevice, UnalignedZeroesKeepNeighbours) {
  TempDir dir;
  auto dev = open_device(make_file(dir, "disk", kMiB), true);
  ASSERT_NE(dev, nullptr);
  auto data = pattern(kMiB, 7);
  ASSERT_EQ(dev->write(0, data, false), kOk);
  std::vector<std::byte> model = data;
  struct Zero {
    uint64_t offset;
    uint64_t length;
    bool may_trim;
  };
  const Zero zeroes[] = {
      {100, 50, true}, {5000, 10000, true}, {30001, 4095, false}, {70000, 200000, false}};
  for (const Zero& z : zeroes) {
    ASSERT_EQ(dev->write_zeroes(z.offset, z.length, {.may_trim = z.may_trim, .fua = true}), kOk);
    std::fill_n(model.begin() + static_cast<ptrdiff_t>(z.offset), z.length, std::byte{0});
  }
  EXPECT_EQ(read_back(*dev, 0, kMiB), model);
}

TEST(FileDevice, FastZeroZeroesOrRefuses) {
  TempDir dir;
  auto dev = open_device(make_file(dir, "disk", kMiB), true);
  ASSERT_NE(dev, nullptr);
  auto data = pattern(128 * kKiB, 8);
  ASSERT_EQ(dev->write(0, data, false), kOk);
  std::error_code ec = dev->write_zeroes(4096, 64 * kKiB, {.fast = true});
  ASSERT_TRUE(ec == kOk || ec == errno_code(ENOTSUP)) << ec.message();
  auto got = read_back(*dev, 0, 128 * kKiB);
  if (ec == kOk) std::fill_n(data.begin() + 4096, 64 * kKiB, std::byte{0});
  EXPECT_EQ(got, data);  // a refused fast zero leaves the data alone
}

TEST(FileDevice, ZeroFallsBackToWritingOnTmpfs) {
  // tmpfs punches holes but has no FALLOC_FL_ZERO_RANGE: zeroing without trim
  // writes zero buffers, and a fast zero without trim is refused.
  struct statfs fs {};
  if (::statfs("/dev/shm", &fs) != 0 || fs.f_type != TMPFS_MAGIC) {
    GTEST_SKIP() << "no tmpfs at /dev/shm";
  }
  TempDir dir("/dev/shm");
  ASSERT_TRUE(dir.ok());
  constexpr uint64_t kSize = 3 * kMiB + 100;
  auto dev = open_device(make_file(dir, "disk", kSize), true);
  ASSERT_NE(dev, nullptr);
  auto model = pattern(kSize, 9);
  ASSERT_EQ(dev->write(0, model, false), kOk);
  EXPECT_EQ(dev->write_zeroes(0, 8192, {.fast = true}), errno_code(ENOTSUP));
  EXPECT_EQ(read_back(*dev, 0, kSize), model);
  ASSERT_EQ(dev->write_zeroes(1000, 2 * kMiB + 5000, {.fua = true}), kOk);
  std::fill_n(model.begin() + 1000, 2 * kMiB + 5000, std::byte{0});
  ASSERT_EQ(dev->write_zeroes(kSize - 50, 50, {.may_trim = true, .fast = true}), kOk);
  std::fill_n(model.end() - 50, 50, std::byte{0});
  EXPECT_EQ(read_back(*dev, 0, kSize), model);
}

TEST(FileDevice, DiscardPunchesHole) {
  TempDir dir;
  auto path = make_file(dir, "disk", kMiB);
  auto dev = open_device(path, true);
  ASSERT_NE(dev, nullptr);
  ASSERT_EQ(dev->write(0, pattern(kMiB, 10), true), kOk);
  const uint64_t before = allocated_bytes(path);
  ASSERT_EQ(dev->discard(256 * kKiB, 512 * kKiB, true), kOk);
  EXPECT_EQ(allocated_bytes(path), before - 512 * kKiB);
  EXPECT_EQ(flags_of(*dev, 256 * kKiB, 512 * kKiB), kHoleZero);
  EXPECT_EQ(flags_of(*dev, 0, 256 * kKiB), 0u);
  EXPECT_EQ(flags_of(*dev, 768 * kKiB, 256 * kKiB), 0u);
}

TEST(FileDevice, ExtentsOnSparseFile) {
  TempDir dir;
  auto path = make_file(dir, "disk", kMiB);
  auto dev = open_device(path, true);
  ASSERT_NE(dev, nullptr);
  ASSERT_EQ(dev->write(64 * kKiB, pattern(4 * kKiB, 11), false), kOk);
  ASSERT_EQ(dev->write(200 * kKiB, pattern(8 * kKiB, 12), false), kOk);
  ASSERT_EQ(dev->write(500000, pattern(1, 13), false), kOk);  // block 499712..503808
  const std::vector<Extent> want = {
      {0, 64 * kKiB, kHoleZero},
      {64 * kKiB, 4 * kKiB, 0},
      {68 * kKiB, 132 * kKiB, kHoleZero},
      {200 * kKiB, 8 * kKiB, 0},
      {208 * kKiB, 499712 - 208 * kKiB, kHoleZero},
      {499712, 4096, 0},
      {503808, kMiB - 503808, kHoleZero},
  };
  // Dirty data (delayed allocation) and synced data report the same.
  auto dirty = all_extents(*dev, 0, kMiB);
  EXPECT_TRUE(same_extents(dirty, want)) << describe(dirty);
  ASSERT_EQ(dev->flush(), kOk);
  auto synced = all_extents(*dev, 0, kMiB);
  EXPECT_TRUE(same_extents(synced, want)) << describe(synced);

  // One call, clipped to the request and coalesced.
  std::vector<Extent> out = {{1, 2, 3}};  // existing entries are left alone
  ASSERT_EQ(dev->extents(70 * kKiB, 140 * kKiB, out), kOk);
  const std::vector<Extent> clipped = {{1, 2, 3},
                                       {70 * kKiB, 130 * kKiB, kHoleZero},
                                       {200 * kKiB, 8 * kKiB, 0},
                                       {208 * kKiB, 2 * kKiB, kHoleZero}};
  EXPECT_TRUE(same_extents(out, clipped)) << describe(out);
}

TEST(FileDevice, ExtentsOfEmptySparseFileIsOneHole) {
  TempDir dir;
  auto dev = open_device(make_file(dir, "disk", 5 * kMiB + 7), false);
  ASSERT_NE(dev, nullptr);
  std::vector<Extent> out;
  ASSERT_EQ(dev->extents(0, UINT64_MAX, out), kOk);  // clipped to size
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0].offset, 0u);
  EXPECT_EQ(out[0].length, 5 * kMiB + 7);
  EXPECT_EQ(out[0].flags, kHoleZero);
}

TEST(FileDevice, ExtentsStopEarlyAndResume) {
  // 1500 data islands: more extents than one call returns.
  TempDir dir;
  constexpr uint64_t kIslands = 1500;
  constexpr uint64_t kSize = kIslands * 8 * kKiB;
  auto dev = open_device(make_file(dir, "disk", kSize), true);
  ASSERT_NE(dev, nullptr);
  auto data = pattern(4096, 14);
  for (uint64_t i = 0; i < kIslands; ++i) {
    ASSERT_EQ(dev->write(i * 8 * kKiB, data, false), kOk);
  }
  std::vector<Extent> first;
  ASSERT_EQ(dev->extents(0, kSize, first), kOk);
  EXPECT_LE(first.size(), 1024u);
  EXPECT_LT(first.back().offset + first.back().length, kSize);
  size_t calls = 0;
  auto extents = all_extents(*dev, 0, kSize, &calls);
  EXPECT_GE(calls, 2u);
  ASSERT_EQ(extents.size(), 2 * kIslands);
  for (size_t i = 0; i < extents.size(); ++i) {
    EXPECT_EQ(extents[i].offset, i * 4 * kKiB);
    EXPECT_EQ(extents[i].length, 4 * kKiB);
    EXPECT_EQ(extents[i].flags, i % 2 == 0 ? 0u : kHoleZero);
  }
}

TEST(FileDevice, TryReadCachedDataSucceeds) {
  TempDir dir;
  auto dev = open_device(make_file(dir, "disk", kMiB), true);
  ASSERT_NE(dev, nullptr);
  auto data = pattern(100000, 15);
  ASSERT_EQ(dev->write(1234, data, false), kOk);
  ASSERT_EQ(read_back(*dev, 1234, data.size()), data);
  std::vector<std::byte> got(data.size());
  ASSERT_EQ(dev->try_read(1234, got), kOk);
  EXPECT_EQ(got, data);
}

TEST(FileDevice, TryReadFreshSparseFileIsOkOrWouldBlock) {
  TempDir dir;
  auto dev = open_device(make_file(dir, "disk", 4 * kMiB), false);
  ASSERT_NE(dev, nullptr);
  std::vector<std::byte> got(kMiB, std::byte{1});
  std::error_code ec = dev->try_read(kMiB + 3, got);
  ASSERT_TRUE(ec == kOk || ec == kWouldBlock) << ec.message();
  if (ec == kOk) {
    EXPECT_TRUE(all_zero(got));
  }
}

TEST(FileDevice, TryReadUncachedDataIsOkOrWouldBlock) {
  TempDir dir;
  auto path = make_file(dir, "disk", 4 * kMiB);
  auto dev = open_device(path, true);
  ASSERT_NE(dev, nullptr);
  auto data = pattern(2 * kMiB, 16);
  ASSERT_EQ(dev->write(0, data, true), kOk);
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  ASSERT_GE(fd, 0);
  EXPECT_EQ(::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED), 0);
  std::vector<std::byte> small(4096);
  EXPECT_EQ(::pread(fd, small.data(), small.size(), 0), 4096);  // part cached again
  ::close(fd);
  std::vector<std::byte> got(data.size());
  std::error_code ec = dev->try_read(0, got);
  ASSERT_TRUE(ec == kOk || ec == kWouldBlock) << ec.message();
  if (ec == kOk) {
    EXPECT_EQ(got, data);
  }
  EXPECT_EQ(read_back(*dev, 0, data.size()), data);  // the fallback callers use
}

TEST(FileDevice, TryWriteIsAllOrNothing) {
  // Buffered RWF_NOWAIT writes are EOPNOTSUPP on ext4 (Linux 6.18), so this
  // usually exercises would_block followed by the write() fallback.
  TempDir dir;
  auto dev = open_device(make_file(dir, "disk", kMiB), true);
  ASSERT_NE(dev, nullptr);
  ASSERT_EQ(dev->write(0, pattern(kMiB, 17), true), kOk);
  for (int round = 0; round < 2; ++round) {
    auto data = pattern(300000, 18 + round);
    std::error_code ec = dev->try_write(4321, data);
    ASSERT_TRUE(ec == kOk || ec == kWouldBlock) << ec.message();
    if (ec == kWouldBlock) {
      ASSERT_EQ(dev->write(4321, data, false), kOk);
    }
    EXPECT_EQ(read_back(*dev, 4321, data.size()), data);
  }
}

TEST(FileDevice, ReadPastEndOfShrunkFileReadsZeroes) {
  TempDir dir;
  auto path = make_file(dir, "disk", 64 * kKiB);
  auto dev = open_device(path, true);
  ASSERT_NE(dev, nullptr);
  ASSERT_EQ(dev->write(0, pattern(64 * kKiB, 20), false), kOk);
  ASSERT_EQ(::truncate(path.c_str(), 10000), 0);  // behind the device's back
  auto got = read_back(*dev, 8192, 56 * kKiB);
  auto want = pattern(64 * kKiB, 20);
  EXPECT_TRUE(std::equal(got.begin(), got.begin() + (10000 - 8192), want.begin() + 8192));
  EXPECT_TRUE(std::all_of(got.begin() + (10000 - 8192), got.end(),
                          [](std::byte b) { return b == std::byte{0}; }));
  std::vector<std::byte> tried(4096, std::byte{1});
  std::error_code ec = dev->try_read(32 * kKiB, tried);
  ASSERT_TRUE(ec == kOk || ec == kWouldBlock) << ec.message();
  if (ec == kOk) {
    EXPECT_TRUE(all_zero(tried));
  }
  std::vector<Extent> out;
  ASSERT_EQ(dev->extents(32 * kKiB, 32 * kKiB, out), kOk);
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0].flags, kHoleZero);
}

TEST(FileDevice, DirectIoHandlesUnalignedRequests) {
  TempDir dir;
  constexpr uint64_t kSize = 3 * kMiB + 1000;  // unaligned tail
  auto path = make_file(dir, "disk", kSize);
  bool skip = false;
  auto dev = open_direct(path, &skip);
  if (skip) {
    GTEST_SKIP() << "O_DIRECT not supported here";
  }
  ASSERT_NE(dev, nullptr);
  std::vector<std::byte> model(kSize, std::byte{0});
  std::mt19937 rng(21);
  for (int i = 0; i < 60; ++i) {
    uint64_t length = 1 + rng() % (i % 10 == 0 ? 2 * kMiB : 20000);
    uint64_t offset = i % 3 == 0 ? (rng() % (kSize / 4096)) * 4096 : rng() % kSize;
    if (i % 5 == 0) length = (length + 4095) / 4096 * 4096;
    length = std::min(length, kSize - offset);
    // Misalign the buffer by one byte every other time.
    std::vector<std::byte> storage = pattern(length + 1, 100 + i);
    std::span<const std::byte> data(storage.data() + i % 2, length);
    ASSERT_EQ(dev->write(offset, data, i % 7 == 0), kOk) << offset << "+" << length;
    std::copy(data.begin(), data.end(), model.begin() + static_cast<ptrdiff_t>(offset));
  }
  for (int i = 0; i < 40; ++i) {
    uint64_t offset = rng() % kSize;
    uint64_t length = std::min<uint64_t>(1 + rng() % 1500000, kSize - offset);
    std::vector<std::byte> storage(length + 1);
    std::span<std::byte> out(storage.data() + i % 2, length);
    ASSERT_EQ(dev->read(offset, out), kOk);
    EXPECT_TRUE(std::equal(out.begin(), out.end(), model.begin() + static_cast<ptrdiff_t>(offset)))
        << offset << "+" << length;
  }
  ASSERT_EQ(dev->write_zeroes(5, 10000, {.may_trim = true}), kOk);
  std::fill_n(model.begin() + 5, 10000, std::byte{0});
  ASSERT_EQ(dev->write_zeroes(kSize - 3000, 3000, {}), kOk);
  std::fill_n(model.end() - 3000, 3000, std::byte{0});
  EXPECT_EQ(read_back(*dev, 0, kSize), model);
  std::vector<std::byte> buf(4096);
  EXPECT_EQ(dev->try_read(0, buf), kWouldBlock);
  EXPECT_EQ(dev->try_write(0, buf), kWouldBlock);
  // A buffered view of the file agrees.
  auto buffered = open_device(path, false);
  ASSERT_NE(buffered, nullptr);
  EXPECT_EQ(read_back(*buffered, 0, kSize), model);
}

TEST(FileDevice, DirectIoZeroFallbackOnTmpfs) {
  struct statfs fs {};
  if (::statfs("/dev/shm", &fs) != 0 || fs.f_type != TMPFS_MAGIC) {
    GTEST_SKIP() << "no tmpfs at /dev/shm";
  }
  TempDir dir("/dev/shm");
  ASSERT_TRUE(dir.ok());
  constexpr uint64_t kSize = 2 * kMiB + 300;
  bool skip = false;
  auto dev = open_direct(make_file(dir, "disk", kSize), &skip);
  if (skip) {
    GTEST_SKIP() << "O_DIRECT not supported on this tmpfs";
  }
  ASSERT_NE(dev, nullptr);
  auto model = pattern(kSize, 22);
  ASSERT_EQ(dev->write(0, model, false), kOk);
  // Writes zero buffers through the O_DIRECT path: unaligned head, aligned
  // 1 MiB chunks from the static zero page, buffered tail.
  ASSERT_EQ(dev->write_zeroes(77, kSize - 77, {.fua = true}), kOk);
  std::fill(model.begin() + 77, model.end(), std::byte{0});
  EXPECT_EQ(read_back(*dev, 0, kSize), model);
}

// Each thread owns a region whose ends are not block aligned, so with
// O_DIRECT neighbours read-modify-write the same boundary blocks.
void concurrent_disjoint_writes(FileDevice& dev, uint64_t region) {
  constexpr int kThreads = 4;
  std::vector<std::vector<std::byte>> models;
  for (int t = 0; t < kThreads; ++t) models.push_back(pattern(region, 30 + t));
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&dev, &models, region, t] {
      std::mt19937 rng(40 + t);
      const auto& model = models[t];
      for (int i = 0; i < 50; ++i) {
        uint64_t start = rng() % region;
        uint64_t length = 1 + rng() % std::min<uint64_t>(region - start, 30000);
        auto data = std::span(model).subspan(start, length);
        EXPECT_EQ(dev.write(t * region + start, data, false), kOk);
      }
      EXPECT_EQ(dev.write(t * region, model, false), kOk);  // the final state
    });
  }
  for (auto& th : threads) th.join();
  for (int t = 0; t < kThreads; ++t) {
    EXPECT_EQ(read_back(dev, t * region, region), models[t]) << "thread " << t;
  }
}

TEST(FileDevice, ConcurrentDisjointWritesAreAllKept) {
  TempDir dir;
  constexpr uint64_t kRegion = 100001;
  auto dev = open_device(make_file(dir, "disk", 4 * kRegion), true);
  ASSERT_NE(dev, nullptr);
  concurrent_disjoint_writes(*dev, kRegion);
}

TEST(FileDevice, DirectIoConcurrentUnalignedWritesAreAllKept) {
  TempDir dir;
  constexpr uint64_t kRegion = 100001;
  bool skip = false;
  auto dev = open_direct(make_file(dir, "disk", 4 * kRegion), &skip);
  if (skip) {
    GTEST_SKIP() << "O_DIRECT not supported here";
  }
  ASSERT_NE(dev, nullptr);
  concurrent_disjoint_writes(*dev, kRegion);
}

TEST(FileDevice, CacheAndFlushSucceed) {
  TempDir dir;
  auto dev = open_device(make_file(dir, "disk", kMiB), true);
  ASSERT_NE(dev, nullptr);
  EXPECT_EQ(dev->cache(0, kMiB), kOk);
  EXPECT_EQ(dev->cache(kMiB - 10, 1000), kOk);  // clipped to size
  EXPECT_EQ(dev->flush(), kOk);
}

TEST(FileDevice, BlockDeviceRoundTrip) {
  // Destroys the device's contents: opt in with FLEECED_TEST_BLOCK_DEVICE.
  const char* path = std::getenv("FLEECED_TEST_BLOCK_DEVICE");
  if (path == nullptr) {
    GTEST_SKIP() << "FLEECED_TEST_BLOCK_DEVICE not set";
  }
  for (bool direct : {false, true}) {
    auto dev = open_device(path, true, direct);
    ASSERT_NE(dev, nullptr);
    Capabilities caps = dev->capabilities();
    EXPECT_FALSE(caps.can_extents);
    const uint64_t size = std::min<uint64_t>(dev->size(), 8 * kMiB);
    ASSERT_GE(size, kMiB);
    auto model = pattern(size, direct ? 50 : 51);
    ASSERT_EQ(dev->write(0, model, true), kOk);
    ASSERT_EQ(dev->write(333, std::span(model).subspan(1, 5000), false), kOk);
    std::copy_n(model.begin() + 1, 5000, model.begin() + 333);
    ASSERT_EQ(dev->write_zeroes(4096, 64 * kKiB, {}), kOk);
    std::fill_n(model.begin() + 4096, 64 * kKiB, std::byte{0});
    ASSERT_EQ(dev->write_zeroes(100000, 777, {.may_trim = true}), kOk);
    std::fill_n(model.begin() + 100000, 777, std::byte{0});
    std::error_code ec = dev->write_zeroes(kMiB, 64 * kKiB, {.may_trim = true, .fast = true});
    ASSERT_TRUE(ec == kOk || ec == errno_code(ENOTSUP)) << ec.message();
    if (ec == kOk) std::fill_n(model.begin() + kMiB, 64 * kKiB, std::byte{0});
    EXPECT_EQ(dev->write_zeroes(0, 512, {.fast = true}), errno_code(ENOTSUP));
    EXPECT_EQ(read_back(*dev, 0, size), model);
    EXPECT_EQ(dev->discard(0, 4096, true), kOk);
    std::vector<Extent> out;
    ASSERT_EQ(dev->extents(0, size, out), kOk);
    ASSERT_EQ(out.size(), 1u);
    EXPECT_EQ(out[0].length, size);
    EXPECT_EQ(out[0].flags, 0u);
  }
}

}  // namespace
}  // namespace fleeced::block

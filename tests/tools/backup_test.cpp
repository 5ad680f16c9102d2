// SPDX-License-Identifier: MIT
// fleece-backup's pure parts: chunk alignment of the pull plan, URIs,
// digests, the manifest round trip and its validation; the page-cache window.
#include <gtest/gtest.h>

#include <fcntl.h>
#include <linux/magic.h>
#include <sys/mman.h>
#include <sys/statfs.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "backup/manifest.hpp"
#include "backup/pull.hpp"
#include "backup/targets.hpp"

namespace fleece::backup {
namespace {

using detail::Range;
constexpr uint64_t K = 1024;

TEST(AlignToChunks, DataGrowsToWholeChunksAndMerges) {
  const std::vector<Range> in = {
      {4 * K, 4 * K, true}, {70 * K, 2 * K, true}, {200 * K, 8 * K, false}};
  const auto out = detail::align_to_chunks(in, 64 * K, 1024 * K);
  const std::vector<Range> want = {{0, 128 * K, true}, {192 * K, 64 * K, false}};
  EXPECT_EQ(out, want);
}

TEST(AlignToChunks, ZeroGivesWayToDataInTheSameChunk) {
  // [0,60K) zero, [60K,64K) data, [64K,192K) zero, [192K,196K) data.
  const std::vector<Range> in = {
      {0, 60 * K, false}, {60 * K, 4 * K, true}, {64 * K, 128 * K, false}, {192 * K, 4 * K, true}};
  const auto out = detail::align_to_chunks(in, 64 * K, 256 * K);
  const std::vector<Range> want = {
      {0, 64 * K, true}, {64 * K, 128 * K, false}, {192 * K, 64 * K, true}};
  EXPECT_EQ(out, want);
}

TEST(AlignToChunks, LastChunkEndsAtTheDiskSize) {
  const uint64_t size = 100 * K + 123;
  const std::vector<Range> in = {{100 * K, 123, true}};
  const auto out = detail::align_to_chunks(in, 64 * K, size);
  const std::vector<Range> want = {{64 * K, size - 64 * K, true}};
  EXPECT_EQ(out, want);
}

TEST(AlignToChunks, AlignedInputIsUnchanged) {
  const std::vector<Range> in = {
      {0, 64 * K, true}, {128 * K, 64 * K, false}, {256 * K, 128 * K, true}};
  EXPECT_EQ(detail::align_to_chunks(in, 64 * K, 1024 * K), in);
}

TEST(UriWithExport, InsertsOrReplacesTheName) {
  EXPECT_EQ(uri_with_export("nbd+unix:///?socket=/run/s.sock", "fleece"),
            "nbd+unix:///fleece?socket=/run/s.sock");
  EXPECT_EQ(uri_with_export("nbd+unix:///old?socket=/s", "new"), "nbd+unix:///new?socket=/s");
  EXPECT_EQ(uri_with_export("nbd://127.0.0.1:10809", "x"), "nbd://127.0.0.1:10809/x");
  EXPECT_EQ(uri_with_export("nbds://alice@host/", "x"), "nbds://alice@host/x");
  EXPECT_EQ(uri_with_export("nbds+unix://alice@/?socket=/s&tls-psk-file=/k", "e"),
            "nbds+unix://alice@/e?socket=/s&tls-psk-file=/k");
  EXPECT_THROW(uri_with_export("/not/a/uri", "x"), std::invalid_argument);
}

TEST(Digest, DependsOnContentAndLength) {
  const std::vector<unsigned char> a(4096, 0), b(8192, 0);
  EXPECT_EQ(digest_of(a.data(), a.size()), zero_digest(4096));
  EXPECT_NE(zero_digest(4096), zero_digest(8192));
  std::vector<unsigned char> c = a;
  c[100] = 1;
  EXPECT_NE(digest_of(c.data(), c.size()), zero_digest(4096));
  const std::vector<Digest> t1 = {zero_digest(4096), zero_digest(4096)};
  std::vector<Digest> t2 = t1;
  t2[1] = digest_of(c.data(), c.size());
  EXPECT_EQ(disk_digest(t1).size(), 32u);
  EXPECT_NE(disk_digest(t1), disk_digest(t2));
}

class ManifestTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/fleece-manifest.XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  void write(const std::string& text) { std::ofstream(dir_ + "/manifest.json") << text; }
  std::string dir_;
};

Manifest sample() {
  Manifest m;
  m.node = "disk0";
  m.size = 1ull << 30;
  m.chunk_size = 65536;
  m.granularity = 65536;
  m.chain = "abcd1234";
  m.active_bitmap = "fleece-backup.abcd1234.1";
  m.next_serial = 2;
  BackupEntry f;
  f.index = 0;
  f.kind = "full";
  f.file = "0000.full.qcow2";
  f.sums = "0000.sums";
  f.checkpoint = "fleece-backup.abcd1234.0";
  f.started = f.cut = f.finished = "2026-12-05T10:00:00.000Z";
  f.seconds = 1.5;
  f.pull_seconds = 1.25;
  f.bytes_pulled = 123456;
  f.file_size = 200000;
  f.digest = "00112233445566778899aabbccddeeff";
  BackupEntry i = f;
  i.index = 1;
  i.kind = "incremental";
  i.file = "0001.inc.qcow2";
  i.sums = "0001.sums";
  i.checkpoint = "fleece-backup.abcd1234.1";
  i.bitmap = "fleece-backup.abcd1234.0";
  i.dirty_bytes = 131072;
  i.bytes_zeroed = 65536;
  i.bytes_pulled = 65536;
  m.backups = {f, i};
  return m;
}

TEST_F(ManifestTest, RoundTrip) {
  const Manifest m = sample();
  m.save(dir_);
  EXPECT_TRUE(manifest_exists(dir_));
  const Manifest r = Manifest::load(dir_);
  EXPECT_EQ(r.to_json(), m.to_json());
  ASSERT_EQ(r.backups.size(), 2u);
  EXPECT_EQ(r.backups[1].bitmap, "fleece-backup.abcd1234.0");
  EXPECT_EQ(r.backups[1].dirty_bytes, 131072u);
  EXPECT_DOUBLE_EQ(r.backups[0].pull_seconds, 1.25);
  EXPECT_EQ(r.active_bitmap, "fleece-backup.abcd1234.1");
  EXPECT_EQ(r.next_serial, 2u);
}

TEST_F(ManifestTest, RejectsBrokenManifests) {
  write("not json");
  EXPECT_THROW(Manifest::load(dir_), std::runtime_error);
  std::string good = sample().to_json();
  auto replaced = [&](const std::string& from, const std::string& to) {
    std::string s = good;
    s.replace(s.find(from), from.size(), to);
    return s;
  };
  write(replaced("fleece-backup/1", "fleece-backup/9"));
  EXPECT_THROW(Manifest::load(dir_), std::runtime_error);
  write(replaced("\"0001.inc.qcow2\"", "\"../0001.inc.qcow2\""));
  EXPECT_THROW(Manifest::load(dir_), std::runtime_error);
  write(replaced("\"index\":1", "\"index\":5"));
  EXPECT_THROW(Manifest::load(dir_), std::runtime_error);
  write(replaced("\"chunk_size\":65536", "\"chunk_size\":65537"));
  EXPECT_THROW(Manifest::load(dir_), std::runtime_error);
  write(replaced("\"kind\":\"full\"", "\"kind\":\"incremental\""));
  EXPECT_THROW(Manifest::load(dir_), std::runtime_error);
  write(good);
  EXPECT_NO_THROW(Manifest::load(dir_));
}

TEST_F(ManifestTest, SumsMustMatchTheDiskSize) {
  std::vector<Digest> sums(16, zero_digest(65536));
  sums[3] = digest_of("x", 1);
  save_sums(dir_ + "/s", sums);
  EXPECT_EQ(load_sums(dir_ + "/s", 16), sums);
  EXPECT_THROW(load_sums(dir_ + "/s", 15), std::runtime_error);
  EXPECT_THROW(load_sums(dir_ + "/s", 17), std::runtime_error);
  EXPECT_THROW(load_sums(dir_ + "/missing", 1), std::runtime_error);
}

// Pages of `path` in [offset, offset + length) that are in the page cache.
size_t resident_pages(const std::string& path, uint64_t offset, uint64_t length) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return SIZE_MAX;
  void* map = ::mmap(nullptr, length, PROT_READ, MAP_SHARED, fd, static_cast<off_t>(offset));
  ::close(fd);
  if (map == MAP_FAILED) return SIZE_MAX;
  const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  std::vector<unsigned char> vec((length + page - 1) / page);
  size_t n = SIZE_MAX;
  if (::mincore(map, length, vec.data()) == 0) {
    n = 0;
    for (unsigned char v : vec) n += v & 1;
  }
  ::munmap(map, length);
  return n;
}

// A raw target keeps only a window of the file in the page cache: what was
// written 16 MiB or more before the last write has been written out and
// dropped, the data reads back intact, and the last blocks are still cached.
TEST(PageCacheWindow, RawTargetDropsWhatIsFarBehind) {
  char tmpl[] = "/var/tmp/fleece-window.XXXXXX";
  ASSERT_NE(::mkdtemp(tmpl), nullptr);
  const std::string dir = tmpl;
  struct statfs fs {};
  ASSERT_EQ(::statfs(dir.c_str(), &fs), 0);
  if (fs.f_type == TMPFS_MAGIC) {
    std::filesystem::remove_all(dir);
    GTEST_SKIP() << "tmpfs keeps every page in memory";
  }
  const std::string path = dir + "/disk.raw";
  constexpr uint64_t kSize = 48ull << 20, kPiece = 1ull << 20;
  std::vector<unsigned char> piece(kPiece);
  {
    RawTarget t(path, kSize, true, true);
    for (uint64_t o = 0; o < kSize; o += kPiece) {
      for (size_t i = 0; i < piece.size(); i += 4096)
        piece[i] = static_cast<unsigned char>(o >> 20);
      piece[1] = 0xa5;
      t.write(o, piece.data(), piece.size());
    }
    t.sync();
  }
  // Blocks ending at or before 48 - 16 MiB were dropped: none of the first
  // 16 MiB is cached. The last 2 MiB were never asked to be dropped.
  EXPECT_EQ(resident_pages(path, 0, 16ull << 20), 0u);
  const size_t tail = resident_pages(path, kSize - (2ull << 20), 2ull << 20);
  EXPECT_EQ(tail, (2ull << 20) / static_cast<size_t>(::sysconf(_SC_PAGESIZE)));
  std::ifstream in(path, std::ios::binary);
  std::vector<char> back(kPiece);
  for (uint64_t o = 0; o < kSize; o += kPiece) {
    ASSERT_TRUE(in.read(back.data(), static_cast<std::streamsize>(back.size())));
    EXPECT_EQ(static_cast<unsigned char>(back[0]), o >> 20) << "at " << o;
    EXPECT_EQ(static_cast<unsigned char>(back[1]), 0xa5) << "at " << o;
    EXPECT_EQ(static_cast<unsigned char>(back[4096]), o >> 20) << "at " << o;
  }
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace fleece::backup

// SPDX-License-Identifier: MIT
// Qcow2Writer: header bytes checked field by field, and images checked by the real qemu-img
// (check, compare against a raw reference, info --backing-chain). Each test works in its own
// mkdtemp directory under /tmp, removed at the end; every qemu-img run is bounded by timeout(1).
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "backup/qcow2_writer.hpp"

namespace {

using fleece::backup::Qcow2Options;
using fleece::backup::Qcow2Writer;
using Bytes = std::vector<unsigned char>;

constexpr uint64_t KiB = 1024;
constexpr uint64_t MiB = 1024 * KiB;
constexpr uint64_t GiB = 1024 * MiB;

class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/qcow2_writer_test.XXXXXX";
    if (::mkdtemp(tmpl) == nullptr) throw std::system_error(errno, std::generic_category());
    path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  std::string file(const std::string& name) const { return path_ + "/" + name; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

struct CommandResult {
  int status = -1;
  std::string output;
};

// Runs a shell command (stderr folded into stdout) with a time limit.
CommandResult run_command(const std::string& command) {
  CommandResult r;
  FILE* f = ::popen(("timeout 120 " + command + " 2>&1").c_str(), "r");
  if (f == nullptr) return r;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) r.output.append(buf, n);
  const int st = ::pclose(f);
  r.status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return r;
}

bool have_qemu_img() { return ::access("/usr/bin/qemu-img", X_OK) == 0; }

#define REQUIRE_QEMU_IMG()                                                                \
  ASSERT_TRUE(have_qemu_img()) << "qemu-img is needed (scripts/install-deps.sh installs " \
                                  "qemu-utils)"

Bytes read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return Bytes(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void write_file(const std::string& path, const Bytes& data) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size()));
  ASSERT_TRUE(out.good()) << path;
}

// A sparse raw reference file of `size` bytes holding `chunks` (offset, data).
void write_sparse_raw(const std::string& path, uint64_t size,
                      const std::vector<std::pair<uint64_t, Bytes>>& chunks) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  for (const auto& [offset, data] : chunks) {
    out.seekp(static_cast<std::streamoff>(offset));
    out.write(reinterpret_cast<const char*>(data.data()),
              static_cast<std::streamsize>(data.size()));
  }
  out.close();
  std::filesystem::resize_file(path, size);
}

uint64_t be64(const Bytes& b, size_t at) {
  uint64_t v = 0;
  for (size_t i = 0; i < 8; ++i) v = (v << 8) | b.at(at + i);
  return v;
}

uint32_t be32(const Bytes& b, size_t at) {
  uint32_t v = 0;
  for (size_t i = 0; i < 4; ++i) v = (v << 8) | b.at(at + i);
  return v;
}

uint16_t be16(const Bytes& b, size_t at) {
  return static_cast<uint16_t>((b.at(at) << 8) | b.at(at + 1));
}

Bytes random_bytes(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  Bytes out(n);
  for (size_t i = 0; i < n; i += 8) {
    const uint64_t v = rng();
    std::memcpy(out.data() + i, &v, std::min<size_t>(8, n - i));
  }
  return out;
}

std::string check_image(const std::string& path) {
  const CommandResult r = run_command("qemu-img check -f qcow2 " + path);
  return r.status == 0 ? "" : "qemu-img check exit " + std::to_string(r.status) + ":\n" + r.output;
}

int compare_with_raw(const std::string& image, const std::string& raw, std::string* output) {
  const CommandResult r = run_command("qemu-img compare -f qcow2 -F raw " + image + " " + raw);
  if (output != nullptr) *output = r.output;
  return r.status;
}

// ---- Header golden checks ----

TEST(Qcow2Writer, HeaderFieldsWithoutBacking) {
  TempDir dir;
  const std::string path = dir.file("a.qcow2");
  Qcow2Options opts;
  opts.virtual_size = 10 * MiB + 1234;
  auto w = Qcow2Writer::create(path, opts);
  EXPECT_EQ(w->cluster_size(), 64 * KiB);
  const uint64_t file_size = w->finish();
  const Bytes b = read_file(path);
  ASSERT_EQ(b.size(), file_size);

  EXPECT_EQ(be32(b, 0), 0x514649fbu);       // magic
  EXPECT_EQ(be32(b, 4), 3u);                // version
  EXPECT_EQ(be64(b, 8), 0u);                // backing_file_offset
  EXPECT_EQ(be32(b, 16), 0u);               // backing_file_size
  EXPECT_EQ(be32(b, 20), 16u);              // cluster_bits
  EXPECT_EQ(be64(b, 24), 10 * MiB + 1536);  // size, rounded up to 512 like qemu-img create
  EXPECT_EQ(be32(b, 32), 0u);               // crypt_method
  EXPECT_EQ(be32(b, 36), 1u);               // l1_size: 161 clusters fit in one L2 table
  EXPECT_EQ(be32(b, 60), 0u);               // nb_snapshots
  EXPECT_EQ(be64(b, 64), 0u);               // snapshots_offset
  EXPECT_EQ(be64(b, 72), 0u);               // incompatible_features
  EXPECT_EQ(be64(b, 80), 0u);               // compatible_features
  EXPECT_EQ(be64(b, 88), 0u);               // autoclear_features
  EXPECT_EQ(be32(b, 96), 4u);               // refcount_order
  EXPECT_EQ(be32(b, 100), 112u);            // header_length
  EXPECT_EQ(b.at(104), 0u);                 // compression_type zlib
  EXPECT_EQ(be64(b, 112), 0u);              // end of header extensions

  // Empty image: header, L1 (one cluster, entry 0), refcount table, one refcount block.
  const uint64_t cs = 64 * KiB;
  EXPECT_EQ(file_size, 4 * cs);
  EXPECT_EQ(be64(b, 40), 1 * cs);      // l1_table_offset
  EXPECT_EQ(be64(b, cs), 0u);          // L1[0]: no L2 table
  EXPECT_EQ(be64(b, 48), 2 * cs);      // refcount_table_offset
  EXPECT_EQ(be32(b, 56), 1u);          // refcount_table_clusters
  EXPECT_EQ(be64(b, 2 * cs), 3 * cs);  // refcount table[0] -> block
  EXPECT_EQ(be64(b, 2 * cs + 8), 0u);
  for (uint64_t i = 0; i < 4; ++i) EXPECT_EQ(be16(b, 3 * cs + 2 * i), 1u) << "cluster " << i;
  EXPECT_EQ(be16(b, 3 * cs + 8), 0u);

  REQUIRE_QEMU_IMG();
  EXPECT_EQ(check_image(path), "");
  const CommandResult info = run_command("qemu-img info --output=json " + path);
  EXPECT_EQ(info.status, 0) << info.output;
  EXPECT_NE(info.output.find("\"virtual-size\": 10487296"), std::string::npos) << info.output;
}

TEST(Qcow2Writer, HeaderFieldsWithBacking) {
  TempDir dir;
  const std::string path = dir.file("b.qcow2");
  Qcow2Options opts;
  opts.virtual_size = 1 * MiB;
  opts.cluster_bits = 12;
  opts.backing_file = "base.qcow2";
  opts.backing_format = "qcow2";
  auto w = Qcow2Writer::create(path, opts);
  w->write_zeroes(0, 4096);  // one zero cluster: needs an L2 table with a backing file
  const uint64_t file_size = w->finish();
  const Bytes b = read_file(path);
  ASSERT_EQ(b.size(), file_size);
  EXPECT_EQ(be32(b, 20), 12u);
  EXPECT_EQ(be64(b, 24), 1 * MiB);
  EXPECT_EQ(be32(b, 36), 1u);  // 256 clusters, 512 entries per L2 table
  // Backing format extension, padded to 8 bytes, then the end marker, then the name.
  EXPECT_EQ(be32(b, 112), 0xe2792acau);
  EXPECT_EQ(be32(b, 116), 5u);
  EXPECT_EQ(std::string(b.begin() + 120, b.begin() + 125), "qcow2");
  EXPECT_EQ(be32(b, 125) >> 8, 0u);  // padding
  EXPECT_EQ(be64(b, 128), 0u);       // end of extensions
  EXPECT_EQ(be64(b, 8), 136u);       // backing_file_offset
  EXPECT_EQ(be32(b, 16), 10u);       // backing_file_size
  EXPECT_EQ(std::string(b.begin() + 136, b.begin() + 146), "base.qcow2");

  // Layout: header, L2, L1, refcount table, refcount block; the L2 entry is a zero cluster.
  const uint64_t cs = 4096;
  EXPECT_EQ(file_size, 5 * cs);
  EXPECT_EQ(be64(b, 40), 2 * cs);
  EXPECT_EQ(be64(b, 2 * cs), (1 * cs) | (1ull << 63));  // L1[0], COPIED
  EXPECT_EQ(be64(b, 1 * cs), 1u);                       // L2[0]: zero flag, no offset
  EXPECT_EQ(be64(b, 1 * cs + 8), 0u);                   // L2[1]: unallocated
  EXPECT_EQ(w->data_bytes_stored(), 0u);
}

TEST(Qcow2Writer, DataEntriesCarryCopiedFlag) {
  TempDir dir;
  const std::string path = dir.file("c.qcow2");
  Qcow2Options opts;
  opts.virtual_size = 64 * KiB;
  opts.cluster_bits = 12;
  auto w = Qcow2Writer::create(path, opts);
  Bytes data(8192, 0);
  data[4096] = 0xab;  // cluster 0 all zero, cluster 1 not
  w->write(4096, data.data(), data.size());
  EXPECT_EQ(w->data_bytes_stored(), 4096u);
  const uint64_t file_size = w->finish();
  const Bytes b = read_file(path);
  ASSERT_EQ(b.size(), file_size);
  const uint64_t cs = 4096;
  // Header, one data cluster (guest cluster 2 at host cluster 1), L2, L1, refcounts.
  EXPECT_EQ(file_size, 6 * cs);
  EXPECT_EQ(be64(b, 40), 3 * cs);
  EXPECT_EQ(be64(b, 3 * cs), (2 * cs) | (1ull << 63));
  EXPECT_EQ(be64(b, 2 * cs + 8), 0u);                        // guest 1: zero, no backing
  EXPECT_EQ(be64(b, 2 * cs + 16), (1 * cs) | (1ull << 63));  // guest 2
  EXPECT_EQ(b.at(1 * cs), 0xab);
  for (uint64_t i = 0; i < 6; ++i) EXPECT_EQ(be16(b, 5 * cs + 2 * i), 1u) << "cluster " << i;
}

// ---- Round trips through qemu-img ----

// Writes a pattern of random, all-zero, write_zeroes and unwritten clusters plus a partial last
// cluster; returns the chunks of non-zero data for the raw reference.
std::vector<std::pair<uint64_t, Bytes>> write_pattern(Qcow2Writer& w, uint64_t size, uint64_t seed,
                                                      uint64_t* stored) {
  const uint64_t cs = w.cluster_size();
  const uint64_t clusters = (size + cs - 1) / cs;
  std::vector<std::pair<uint64_t, Bytes>> chunks;
  *stored = 0;
  std::mt19937_64 rng(seed);
  for (uint64_t c = 0; c < clusters;) {
    const uint64_t run_clusters = std::min<uint64_t>(clusters - c, 1 + rng() % 5);
    const uint64_t offset = c * cs;
    const uint64_t len = std::min(run_clusters * cs, size - offset);
    switch (rng() % 4) {
      case 0: {  // random data with an all-zero cluster in the middle when long enough
        Bytes data = random_bytes(len, rng());
        uint64_t zeroed = 0;
        if (run_clusters >= 3) {
          std::memset(data.data() + cs, 0, cs);
          zeroed = 1;
        }
        w.write(offset, data.data(), data.size());
        *stored += (run_clusters - zeroed) * cs;
        chunks.emplace_back(offset, std::move(data));
        break;
      }
      case 1: {  // all zero data through write()
        Bytes data(len, 0);
        w.write(offset, data.data(), data.size());
        break;
      }
      case 2:
        w.write_zeroes(offset, len);
        break;
      default:  // left unwritten
        break;
    }
    c += run_clusters;
  }
  return chunks;
}

void round_trip(uint32_t cluster_bits, uint64_t size, uint64_t seed) {
  TempDir dir;
  const std::string image = dir.file("img.qcow2");
  const std::string raw = dir.file("ref.raw");
  Qcow2Options opts;
  opts.virtual_size = size;
  opts.cluster_bits = cluster_bits;
  auto w = Qcow2Writer::create(image, opts);
  uint64_t stored = 0;
  const auto chunks = write_pattern(*w, size, seed, &stored);
  EXPECT_EQ(w->data_bytes_stored(), stored);
  const uint64_t file_size = w->finish();
  EXPECT_EQ(std::filesystem::file_size(image), file_size);
  write_sparse_raw(raw, size, chunks);

  ASSERT_TRUE(have_qemu_img());
  EXPECT_EQ(check_image(image), "");
  std::string out;
  EXPECT_EQ(compare_with_raw(image, raw, &out), 0) << out;
}

TEST(Qcow2Writer, RoundTripScatteredWithPartialLastCluster) {
  REQUIRE_QEMU_IMG();
  TempDir dir;
  const std::string image = dir.file("img.qcow2");
  const std::string raw = dir.file("ref.raw");
  const uint64_t size = 10 * MiB + 1234;
  const uint64_t cs = 64 * KiB;
  Qcow2Options opts;
  opts.virtual_size = size;
  auto w = Qcow2Writer::create(image, opts);
  uint64_t stored = 0;
  auto chunks = write_pattern(*w, size - size % cs, 42, &stored);
  // Partial last cluster: 1234 bytes of data, padded with zeros in the image.
  const Bytes tail = random_bytes(size % cs, 7);
  w->write(size - size % cs, tail.data(), tail.size());
  chunks.emplace_back(size - size % cs, tail);
  stored += cs;
  EXPECT_EQ(w->data_bytes_stored(), stored);
  const uint64_t file_size = w->finish();
  EXPECT_EQ(std::filesystem::file_size(image), file_size);
  write_sparse_raw(raw, size, chunks);

  EXPECT_EQ(check_image(image), "");
  std::string out;
  EXPECT_EQ(compare_with_raw(image, raw, &out), 0) << out;
  EXPECT_NE(out.find("Images are identical"), std::string::npos) << out;

  // A single changed byte, in the data or in the partial tail, is found.
  std::fstream f(raw, std::ios::in | std::ios::out | std::ios::binary);
  f.seekp(static_cast<std::streamoff>(size - 1));
  f.put(static_cast<char>(tail.back() ^ 0x01));
  f.close();
  EXPECT_EQ(compare_with_raw(image, raw, &out), 1) << out;
  EXPECT_NE(out.find("Content mismatch"), std::string::npos) << out;
}

TEST(Qcow2Writer, CompareDetectsDifferenceInStoredCluster) {
  REQUIRE_QEMU_IMG();
  TempDir dir;
  const std::string image = dir.file("img.qcow2");
  const std::string raw = dir.file("ref.raw");
  Qcow2Options opts;
  opts.virtual_size = 4 * MiB;
  auto w = Qcow2Writer::create(image, opts);
  const Bytes data = random_bytes(128 * KiB, 3);
  w->write(1 * MiB, data.data(), data.size());
  w->finish();
  Bytes changed = data;
  changed[70000] ^= 0x80;
  write_sparse_raw(raw, 4 * MiB, {{1 * MiB, changed}});
  std::string out;
  EXPECT_EQ(compare_with_raw(image, raw, &out), 1) << out;
  EXPECT_NE(out.find("Content mismatch at offset 1118208"), std::string::npos) << out;
  // And a zero cluster that should hold data.
  write_sparse_raw(raw, 4 * MiB, {{1 * MiB, data}, {3 * MiB, Bytes(512, 1)}});
  EXPECT_EQ(compare_with_raw(image, raw, &out), 1) << out;
}

class Qcow2WriterClusterSize : public ::testing::TestWithParam<uint32_t> {};

TEST_P(Qcow2WriterClusterSize, RoundTrip) {
  REQUIRE_QEMU_IMG();
  round_trip(GetParam(), 8 * MiB, GetParam());
}

TEST_P(Qcow2WriterClusterSize, RoundTripUnalignedSize) {
  REQUIRE_QEMU_IMG();
  round_trip(GetParam(), 6 * MiB + 1234, GetParam() + 100);
}

INSTANTIATE_TEST_SUITE_P(Sizes, Qcow2WriterClusterSize, ::testing::Values(9u, 12u, 16u, 21u),
                         [](const auto& p) { return std::to_string(1u << p.param) + "B"; });

// ---- Backing chain ----

TEST(Qcow2Writer, BackingChainOverlayReadsAsExpected) {
  REQUIRE_QEMU_IMG();
  TempDir dir;
  const uint64_t size = 16 * MiB;
  const uint64_t cs = 64 * KiB;
  // Base: clusters 0..127 random (8 MiB), the rest unallocated.
  Bytes expected = random_bytes(8 * MiB, 11);
  expected.resize(size, 0);
  {
    Qcow2Options opts;
    opts.virtual_size = size;
    auto base = Qcow2Writer::create(dir.file("base.qcow2"), opts);
    base->write(0, expected.data(), 8 * MiB);
    base->finish();
  }
  Qcow2Options opts;
  opts.virtual_size = size;
  opts.backing_file = "base.qcow2";
  opts.backing_format = "qcow2";
  auto overlay = Qcow2Writer::create(dir.file("inc1.qcow2"), opts);
  // New data over base data and over unallocated base space.
  const Bytes a = random_bytes(3 * cs, 12);
  overlay->write(10 * cs, a.data(), a.size());
  std::memcpy(expected.data() + 10 * cs, a.data(), a.size());
  const Bytes b = random_bytes(2 * cs, 13);
  overlay->write(200 * cs, b.data(), b.size());
  std::memcpy(expected.data() + 200 * cs, b.data(), b.size());
  // Zeroes over base data: through write() with zero data and through write_zeroes().
  const Bytes zeros(4 * cs, 0);
  overlay->write(20 * cs, zeros.data(), zeros.size());
  std::memset(expected.data() + 20 * cs, 0, 4 * cs);
  overlay->write_zeroes(100 * cs, 5 * cs);
  std::memset(expected.data() + 100 * cs, 0, 5 * cs);
  // A mixed run: data, zero, data over base data.
  Bytes mixed = random_bytes(3 * cs, 14);
  std::memset(mixed.data() + cs, 0, cs);
  overlay->write(50 * cs, mixed.data(), mixed.size());
  std::memcpy(expected.data() + 50 * cs, mixed.data(), mixed.size());
  EXPECT_EQ(overlay->data_bytes_stored(), 7 * cs);
  overlay->finish();
  write_file(dir.file("expected.raw"), expected);

  EXPECT_EQ(check_image(dir.file("base.qcow2")), "");
  EXPECT_EQ(check_image(dir.file("inc1.qcow2")), "");
  std::string out;
  EXPECT_EQ(compare_with_raw(dir.file("inc1.qcow2"), dir.file("expected.raw"), &out), 0) << out;
  // The base alone still has the old data where the overlay wrote zeros.
  EXPECT_EQ(compare_with_raw(dir.file("base.qcow2"), dir.file("expected.raw"), &out), 1) << out;

  const CommandResult info =
      run_command("qemu-img info --backing-chain --output=json " + dir.file("inc1.qcow2"));
  ASSERT_EQ(info.status, 0) << info.output;
  EXPECT_NE(info.output.find("\"filename\": \"" + dir.file("inc1.qcow2") + "\""), std::string::npos)
      << info.output;
  EXPECT_NE(info.output.find("\"filename\": \"" + dir.file("base.qcow2") + "\""), std::string::npos)
      << info.output;
  EXPECT_NE(info.output.find("\"backing-filename\": \"base.qcow2\""), std::string::npos)
      << info.output;
  EXPECT_NE(info.output.find("\"backing-filename-format\": \"qcow2\""), std::string::npos)
      << info.output;
  EXPECT_NE(info.output.find("\"full-backing-filename\": \"" + dir.file("base.qcow2") + "\""),
            std::string::npos)
      << info.output;
}

TEST(Qcow2Writer, BackingChainOverRawBase) {
  REQUIRE_QEMU_IMG();
  TempDir dir;
  const uint64_t size = 2 * MiB;
  Bytes expected = random_bytes(size, 21);
  write_file(dir.file("base.raw"), expected);
  Qcow2Options opts;
  opts.virtual_size = size;
  opts.cluster_bits = 12;
  opts.backing_file = "base.raw";
  opts.backing_format = "raw";
  auto overlay = Qcow2Writer::create(dir.file("top.qcow2"), opts);
  overlay->write_zeroes(8192, 8192);
  std::memset(expected.data() + 8192, 0, 8192);
  overlay->finish();
  write_file(dir.file("expected.raw"), expected);
  EXPECT_EQ(check_image(dir.file("top.qcow2")), "");
  std::string out;
  EXPECT_EQ(compare_with_raw(dir.file("top.qcow2"), dir.file("expected.raw"), &out), 0) << out;
  const CommandResult info =
      run_command("qemu-img info --backing-chain --output=json " + dir.file("top.qcow2"));
  EXPECT_NE(info.output.find("\"backing-filename-format\": \"raw\""), std::string::npos)
      << info.output;
}

// ---- Concurrency ----

TEST(Qcow2Writer, FourThreadsWriteDisjointRanges) {
  REQUIRE_QEMU_IMG();
  TempDir dir;
  const uint64_t size = 32 * MiB + 1234;
  const uint64_t cs = 64 * KiB;
  const uint64_t chunk = 256 * KiB;
  Bytes expected = random_bytes(size, 31);
  // Every fifth chunk all zero, and one all-zero cluster inside every third chunk.
  const uint64_t chunks = (size + chunk - 1) / chunk;
  for (uint64_t c = 0; c < chunks; ++c) {
    const uint64_t end = std::min(size, (c + 1) * chunk);
    if (c % 5 == 0) std::memset(expected.data() + c * chunk, 0, end - c * chunk);
    if (c % 3 == 0 && end - c * chunk > 2 * cs)
      std::memset(expected.data() + c * chunk + cs, 0, cs);
  }
  Qcow2Options opts;
  opts.virtual_size = size;
  auto w = Qcow2Writer::create(dir.file("img.qcow2"), opts);
  std::vector<std::thread> threads;
  for (uint64_t t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (uint64_t c = t; c < chunks; c += 4) {
        const uint64_t end = std::min(size, (c + 1) * chunk);
        if (c % 7 == 6) {
          w->write_zeroes(c * chunk, end - c * chunk);
        } else {
          w->write(c * chunk, expected.data() + c * chunk, end - c * chunk);
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  for (uint64_t c = 6; c < chunks; c += 7) {
    std::memset(expected.data() + c * chunk, 0, std::min(size, (c + 1) * chunk) - c * chunk);
  }
  w->finish();
  write_file(dir.file("expected.raw"), expected);
  EXPECT_EQ(check_image(dir.file("img.qcow2")), "");
  std::string out;
  EXPECT_EQ(compare_with_raw(dir.file("img.qcow2"), dir.file("expected.raw"), &out), 0) << out;
}

// ---- Large sparse image: several L2 tables, refcount blocks, refcount table clusters ----

class Qcow2WriterLarge : public ::testing::TestWithParam<uint32_t> {};

TEST_P(Qcow2WriterLarge, SparseThreeGiB) {
  REQUIRE_QEMU_IMG();
  TempDir dir;
  const uint64_t size = 3 * GiB + 4096 + 1234;
  Qcow2Options opts;
  opts.virtual_size = size;
  opts.cluster_bits = GetParam();
  auto w = Qcow2Writer::create(dir.file("big.qcow2"), opts);
  std::vector<std::pair<uint64_t, Bytes>> chunks;
  const uint64_t places[] = {0, 1 * GiB + 2 * MiB, 2 * GiB + 512 * MiB};
  for (uint64_t i = 0; i < 3; ++i) {
    chunks.emplace_back(places[i], random_bytes(4 * MiB, 40 + i));
    w->write(places[i], chunks.back().second.data(), chunks.back().second.size());
  }
  const uint64_t cs = w->cluster_size();
  const uint64_t tail_offset = (size - 1) / cs * cs - 2 * cs;  // the last three clusters
  chunks.emplace_back(tail_offset, random_bytes(size - tail_offset, 50));
  w->write(tail_offset, chunks.back().second.data(), chunks.back().second.size());
  const uint64_t file_size = w->finish();
  EXPECT_LT(file_size, 64 * MiB);
  write_sparse_raw(dir.file("ref.raw"), size, chunks);

  const Bytes head = read_file(dir.file("big.qcow2"));
  EXPECT_GT(be32(head, 36), 1u);  // several L1 entries
  EXPECT_EQ(check_image(dir.file("big.qcow2")), "");
  std::string out;
  EXPECT_EQ(compare_with_raw(dir.file("big.qcow2"), dir.file("ref.raw"), &out), 0) << out;
}

// 512 B clusters: 256 clusters per refcount block and 64 blocks per refcount table cluster, so
// 12 MiB of data needs about 100 refcount blocks and a two-cluster refcount table. 4 KiB:
// several refcount blocks. 64 KiB: several L2 tables.
INSTANTIATE_TEST_SUITE_P(Sizes, Qcow2WriterLarge, ::testing::Values(9u, 12u, 16u),
                         [](const auto& p) { return std::to_string(1u << p.param) + "B"; });

TEST(Qcow2Writer, SmallClustersUseMultiClusterRefcountTable) {
  TempDir dir;
  Qcow2Options opts;
  opts.virtual_size = 64 * MiB;
  opts.cluster_bits = 9;
  auto w = Qcow2Writer::create(dir.file("x.qcow2"), opts);
  const Bytes data = random_bytes(12 * MiB, 5);
  w->write(0, data.data(), data.size());
  w->finish();
  const Bytes b = read_file(dir.file("x.qcow2"));
  EXPECT_GE(be32(b, 56), 2u);  // refcount_table_clusters
  REQUIRE_QEMU_IMG();
  EXPECT_EQ(check_image(dir.file("x.qcow2")), "");
}

// ---- Errors ----

TEST(Qcow2Writer, RejectsMisalignedAndOutOfRange) {
  TempDir dir;
  Qcow2Options opts;
  opts.virtual_size = 1 * MiB + 100;
  opts.cluster_bits = 12;
  auto w = Qcow2Writer::create(dir.file("e.qcow2"), opts);
  const Bytes data(8192, 1);
  EXPECT_THROW(w->write(512, data.data(), 4096), std::invalid_argument);
  EXPECT_THROW(w->write(0, data.data(), 4095), std::invalid_argument);
  EXPECT_THROW(w->write(1 * MiB, data.data(), 4096), std::invalid_argument);  // past the end
  EXPECT_THROW(w->write_zeroes(100, 4096), std::invalid_argument);
  EXPECT_THROW(w->write_zeroes(1 * MiB, 101), std::invalid_argument);
  EXPECT_NO_THROW(w->write(1 * MiB, data.data(), 100));  // ends exactly at virtual_size
  EXPECT_EQ(w->data_bytes_stored(), 4096u);
}

TEST(Qcow2Writer, RejectsSecondWriteOfACluster) {
  REQUIRE_QEMU_IMG();
  TempDir dir;
  Qcow2Options opts;
  opts.virtual_size = 1 * MiB;
  opts.cluster_bits = 12;
  auto w = Qcow2Writer::create(dir.file("d.qcow2"), opts);
  const Bytes first = random_bytes(8192, 1);
  const Bytes second = random_bytes(12288, 2);
  w->write(4096, first.data(), first.size());
  EXPECT_THROW(w->write(8192, second.data(), 4096), std::invalid_argument);
  EXPECT_THROW(w->write(0, second.data(), second.size()), std::invalid_argument);
  EXPECT_THROW(w->write_zeroes(4096, 4096), std::invalid_argument);
  w->write_zeroes(65536, 4096);
  EXPECT_THROW(w->write(65536, second.data(), 4096), std::invalid_argument);
  // A rejected write leaves its other clusters free: cluster 0 of the failed 3-cluster write.
  w->write(0, second.data(), 4096);
  w->finish();
  write_sparse_raw(dir.file("ref.raw"), 1 * MiB,
                   {{0, Bytes(second.begin(), second.begin() + 4096)}, {4096, first}});
  EXPECT_EQ(check_image(dir.file("d.qcow2")), "");
  std::string out;
  EXPECT_EQ(compare_with_raw(dir.file("d.qcow2"), dir.file("ref.raw"), &out), 0) << out;
}

TEST(Qcow2Writer, RefusesToOverwriteAnExistingFile) {
  TempDir dir;
  const std::string path = dir.file("exists.qcow2");
  write_file(path, Bytes{'k', 'e', 'e', 'p'});
  Qcow2Options opts;
  opts.virtual_size = 1 * MiB;
  try {
    Qcow2Writer::create(path, opts);
    FAIL() << "create over an existing file succeeded";
  } catch (const std::system_error& e) {
    EXPECT_EQ(e.code().value(), EEXIST);
    EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
  }
  EXPECT_EQ(read_file(path), (Bytes{'k', 'e', 'e', 'p'}));
}

TEST(Qcow2Writer, RejectsBadOptionsWithoutCreatingAFile) {
  TempDir dir;
  const std::string path = dir.file("bad.qcow2");
  Qcow2Options opts;
  opts.virtual_size = 1 * MiB;
  opts.cluster_bits = 8;
  EXPECT_THROW(Qcow2Writer::create(path, opts), std::invalid_argument);
  opts.cluster_bits = 22;
  EXPECT_THROW(Qcow2Writer::create(path, opts), std::invalid_argument);
  opts.cluster_bits = 16;
  opts.virtual_size = 0;
  EXPECT_THROW(Qcow2Writer::create(path, opts), std::invalid_argument);
  opts.virtual_size = 1 * MiB;
  opts.backing_file = std::string(1024, 'x');
  EXPECT_THROW(Qcow2Writer::create(path, opts), std::invalid_argument);
  // 512 B clusters: the name must fit in the first cluster after the header.
  opts.cluster_bits = 9;
  opts.backing_file = std::string(400, 'x');
  EXPECT_THROW(Qcow2Writer::create(path, opts), std::invalid_argument);
  opts.cluster_bits = 9;
  opts.virtual_size = 1 * GiB * 1024;  // L1 for 512 B clusters tops out at 128 GiB
  opts.backing_file.clear();
  EXPECT_THROW(Qcow2Writer::create(path, opts), std::invalid_argument);
  EXPECT_FALSE(std::filesystem::exists(path));
}

TEST(Qcow2Writer, UnfinishedImageIsRemoved) {
  TempDir dir;
  const std::string path = dir.file("partial.qcow2");
  Qcow2Options opts;
  opts.virtual_size = 1 * MiB;
  {
    auto w = Qcow2Writer::create(path, opts);
    const Bytes data = random_bytes(64 * KiB, 9);
    w->write(0, data.data(), data.size());
    EXPECT_TRUE(std::filesystem::exists(path));
  }
  EXPECT_FALSE(std::filesystem::exists(path));
}

TEST(Qcow2Writer, FinishTwiceThrows) {
  TempDir dir;
  Qcow2Options opts;
  opts.virtual_size = 1 * MiB;
  auto w = Qcow2Writer::create(dir.file("f.qcow2"), opts);
  w->finish();
  EXPECT_THROW(w->finish(), std::logic_error);
  EXPECT_TRUE(std::filesystem::exists(dir.file("f.qcow2")));
}

// A file size limit turns the data write into a short write and then EFBIG; the failed range
// can be written again and the image stays consistent (unreferenced clusters, no leaks).
TEST(Qcow2Writer, IoErrorCarriesErrnoAndPathAndReleasesTheRange) {
  REQUIRE_QEMU_IMG();
  TempDir dir;
  const std::string path = dir.file("io.qcow2");
  Qcow2Options opts;
  opts.virtual_size = 8 * MiB;
  auto w = Qcow2Writer::create(path, opts);
  const Bytes data = random_bytes(2 * MiB, 77);

  struct rlimit old {};
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &old), 0);
  auto old_handler = std::signal(SIGXFSZ, SIG_IGN);
  struct rlimit limited = old;
  limited.rlim_cur = 1 * MiB;
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &limited), 0);
  try {
    w->write(0, data.data(), data.size());
    ADD_FAILURE() << "write past RLIMIT_FSIZE succeeded";
  } catch (const std::system_error& e) {
    EXPECT_EQ(e.code().value(), EFBIG);
    EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
  }
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &old), 0);
  std::signal(SIGXFSZ, old_handler);
  EXPECT_EQ(w->data_bytes_stored(), 0u);

  w->write(0, data.data(), data.size());
  w->finish();
  write_sparse_raw(dir.file("ref.raw"), 8 * MiB, {{0, data}});
  EXPECT_EQ(check_image(path), "");
  std::string out;
  EXPECT_EQ(compare_with_raw(path, dir.file("ref.raw"), &out), 0) << out;
}

}  // namespace

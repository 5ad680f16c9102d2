// SPDX-License-Identifier: MIT
// PersistentBitmap against real files in a private mkdtemp directory: the
// file format round trip, corrupt files, durability of marks (checked through
// a second open while the first is alive), group commit, sticky errors, and
// SIGKILL of a child process under mark load.
#include "block/persistent_bitmap.hpp"

#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cerrno>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "support/reference_bitmap.hpp"

namespace fleeced::block {
namespace {

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1024 * kKiB;
const std::error_code kOk;

std::error_code errno_code(int err) { return {err, std::generic_category()}; }

class PersistentBitmapTest : public testing::Test {
 protected:
  void SetUp() override {
    const char* tmp = std::getenv("TMPDIR");
    std::string templ = std::string(tmp != nullptr ? tmp : "/tmp") + "/fleeced-pbitmap-XXXXXX";
    ASSERT_NE(::mkdtemp(templ.data()), nullptr);
    dir_ = templ;
    image_ = dir_ + "/disk0.raw";
  }
  void TearDown() override {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }

  std::unique_ptr<PersistentBitmap> create(const std::string& name, uint64_t disk_size,
                                           uint32_t granularity = 65536, bool recording = true) {
    std::error_code ec;
    auto pb = PersistentBitmap::create(image_, name, disk_size, granularity, recording, ec);
    EXPECT_EQ(ec, kOk) << name;
    return pb;
  }

  static std::unique_ptr<PersistentBitmap> reopen(const std::string& path) {
    std::error_code ec;
    auto pb = PersistentBitmap::open(path, ec);
    EXPECT_EQ(ec, kOk) << path;
    return pb;
  }

  static std::error_code open_error(const std::string& path) {
    std::error_code ec;
    auto pb = PersistentBitmap::open(path, ec);
    EXPECT_EQ(pb == nullptr, static_cast<bool>(ec));
    return ec;
  }

  static void flip_byte(const std::string& path, uint64_t offset) {
    std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(static_cast<std::streamoff>(offset));
    char c = 0;
    f.read(&c, 1);
    c = static_cast<char>(c ^ 0x40);
    f.seekp(static_cast<std::streamoff>(offset));
    f.write(&c, 1);
  }

  std::string dir_;
  std::string image_;
};

TEST_F(PersistentBitmapTest, CreateThenOpenRoundTripsEverything) {
  const uint64_t disk = 10 * kMiB + 5;
  std::string path;
  std::vector<uint64_t> words;
  {
    auto pb = create("b0", disk, 4096, false);
    ASSERT_NE(pb, nullptr);
    EXPECT_EQ(pb->name(), "b0");
    EXPECT_FALSE(pb->recording());
    path = pb->path();
    EXPECT_EQ(path, PersistentBitmap::directory_for(image_) + "/6230.bitmap");
    EXPECT_EQ(PersistentBitmap::list(image_), std::vector<std::string>{path});
    EXPECT_EQ(pb->mark(4095, 2), kOk);
    EXPECT_EQ(pb->mark(disk - 1, 1), kOk);
    EXPECT_EQ(pb->mark(3 * kMiB, 1 * kMiB), kOk);
    words = pb->bitmap().snapshot_words();
  }
  auto pb = reopen(path);
  ASSERT_NE(pb, nullptr);
  EXPECT_EQ(pb->name(), "b0");
  EXPECT_FALSE(pb->recording());
  EXPECT_EQ(pb->bitmap().disk_size(), disk);
  EXPECT_EQ(pb->bitmap().granularity(), 4096u);
  EXPECT_EQ(pb->bitmap().snapshot_words(), words);
  EXPECT_EQ(pb->bitmap().dirty_granules(), 2u + 1 + 256);
  EXPECT_TRUE(pb->is_durable(3 * kMiB, 1 * kMiB));
}

TEST_F(PersistentBitmapTest, NamesAreEncodedSafely) {
  const std::string names[] = {"a/b", std::string("\xff\x00..", 4), std::string(1023, 'x'),
                               std::string(1022, 'x') + "y"};
  std::vector<std::string> paths;
  for (const std::string& name : names) {
    auto pb = create(name, 1 * kMiB);
    ASSERT_NE(pb, nullptr);
    paths.push_back(pb->path());
    EXPECT_EQ(pb->path().find('/', PersistentBitmap::directory_for(image_).size() + 1),
              std::string::npos);
  }
  std::sort(paths.begin(), paths.end());
  EXPECT_EQ(PersistentBitmap::list(image_), paths);
  std::vector<std::string> seen;
  for (const std::string& path : paths) {
    auto pb = reopen(path);
    ASSERT_NE(pb, nullptr);
    seen.push_back(pb->name());
  }
  std::sort(seen.begin(), seen.end());
  std::vector<std::string> want(std::begin(names), std::end(names));
  std::sort(want.begin(), want.end());
  EXPECT_EQ(seen, want);
}

TEST_F(PersistentBitmapTest, CreateRejectsDuplicatesAndBadArguments) {
  auto pb = create("b0", 1 * kMiB);
  std::error_code ec;
  EXPECT_EQ(PersistentBitmap::create(image_, "b0", 1 * kMiB, 65536, true, ec), nullptr);
  EXPECT_EQ(ec, errno_code(EEXIST));
  for (uint32_t gran : {0u, 256u, 65535u, 196608u}) {
    EXPECT_EQ(PersistentBitmap::create(image_, "g", 1 * kMiB, gran, true, ec), nullptr);
    EXPECT_EQ(ec, errno_code(EINVAL)) << gran;
  }
  EXPECT_EQ(PersistentBitmap::create(image_, "", 1 * kMiB, 65536, true, ec), nullptr);
  EXPECT_EQ(ec, errno_code(EINVAL));
  EXPECT_EQ(PersistentBitmap::create(image_, std::string(1024, 'n'), 1 * kMiB, 65536, true, ec),
            nullptr);
  EXPECT_EQ(ec, errno_code(EINVAL));
  auto big = PersistentBitmap::create(image_, "big", 8 * kMiB, 1u << 31, true, ec);
  EXPECT_EQ(ec, kOk);
  EXPECT_EQ(PersistentBitmap::list(image_).size(), 2u);
}

TEST_F(PersistentBitmapTest, ListSkipsTemporaryAndForeignFiles) {
  EXPECT_TRUE(PersistentBitmap::list(image_).empty());  // no directory yet
  auto pb = create("b0", 1 * kMiB);
  const std::string dir = PersistentBitmap::directory_for(image_);
  std::ofstream(dir + "/.6231.bitmap.123.tmp") << "x";
  std::ofstream(dir + "/notes.txt") << "x";
  EXPECT_EQ(PersistentBitmap::list(image_), std::vector<std::string>{pb->path()});
}

TEST_F(PersistentBitmapTest, CorruptHeaderIsEinval) {
  std::string path = create("b0", 1 * kMiB)->path();
  // One bad slot: the other copy still opens.
  flip_byte(path, 2048 + 30);
  EXPECT_EQ(open_error(path), kOk);
  // Both bad.
  flip_byte(path, 30);
  EXPECT_EQ(open_error(path), errno_code(EINVAL));

  path = create("b1", 1 * kMiB)->path();
  flip_byte(path, 0);
  flip_byte(path, 2048);
  EXPECT_EQ(open_error(path), errno_code(EINVAL));  // bad magic

  path = create("b2", 64 * kMiB, 512)->path();
  std::filesystem::resize_file(path, 4096 + 4096);  // data pages missing
  EXPECT_EQ(open_error(path), errno_code(EINVAL));
  std::filesystem::resize_file(path, 100);  // header cut short
  EXPECT_EQ(open_error(path), errno_code(EINVAL));
  std::filesystem::resize_file(path, 0);
  EXPECT_EQ(open_error(path), errno_code(EINVAL));
  EXPECT_EQ(open_error(dir_ + "/missing.bitmap"), errno_code(ENOENT));
}

TEST_F(PersistentBitmapTest, MarkIsOnDiskBeforeItReturns) {
  auto pb = create("b0", 100 * kMiB + 3, 65536);
  EXPECT_EQ(pb->mark(65535, 2), kOk);
  EXPECT_EQ(pb->mark(100 * kMiB, 3), kOk);
  // Read through a second open while the first is alive: nothing depends on
  // close or the destructor.
  auto other = reopen(pb->path());
  ASSERT_NE(other, nullptr);
  EXPECT_EQ(other->bitmap().snapshot_words(), pb->bitmap().snapshot_words());
  EXPECT_EQ(other->bitmap().dirty_granules(), 3u);
}

TEST_F(PersistentBitmapTest, WholeDiskMarkWritesEveryPage) {
  const uint64_t disk = 300 * kMiB + 1;  // 600 KiB + 1 granule of bits: 19 pages
  auto pb = create("b0", disk, 512);
  EXPECT_EQ(pb->mark(0, std::numeric_limits<uint64_t>::max()), kOk);
  auto other = reopen(pb->path());
  ASSERT_NE(other, nullptr);
  EXPECT_EQ(other->bitmap().count_bytes(), disk);
  EXPECT_EQ(other->bitmap().next_clean(0), disk);
}

TEST_F(PersistentBitmapTest, IsDurableMeansDirtyInMemoryAndOnDisk) {
  auto pb = create("b0", 10 * kMiB, 65536);
  EXPECT_FALSE(pb->is_durable(0, 1));
  EXPECT_TRUE(pb->is_durable(0, 0));
  EXPECT_TRUE(pb->is_durable(10 * kMiB, 5));
  // Set in memory only (as a merge would before sync_all): not durable.
  pb->bitmap().set_range(1 * kMiB, 1);
  EXPECT_FALSE(pb->is_durable(1 * kMiB, 1));
  EXPECT_EQ(pb->mark(0, 65536 + 1), kOk);
  EXPECT_TRUE(pb->is_durable(0, 2 * 65536));
  EXPECT_TRUE(pb->is_durable(1 * kMiB, 1));  // committed with the same page
  EXPECT_FALSE(pb->is_durable(0, 2 * 65536 + 1));
  // Cleared in memory but still set on disk: not durable, because the live
  // bitmap lost the bits.
  pb->bitmap().clear();
  EXPECT_FALSE(pb->is_durable(0, 1));
  EXPECT_EQ(pb->sync_all(), kOk);
  EXPECT_FALSE(pb->is_durable(0, 1));
  EXPECT_EQ(pb->mark(0, 1), kOk);
  EXPECT_TRUE(pb->is_durable(0, 1));
}

TEST_F(PersistentBitmapTest, HotGranuleCostsNoCommitAfterTheFirst) {
  auto pb = create("b0", 10 * kMiB, 65536);
  EXPECT_EQ(pb->mark(4096, 4096), kOk);
  const uint64_t commits = pb->commit_count();
  EXPECT_GE(commits, 1u);
  for (int i = 0; i < 1000; ++i) EXPECT_EQ(pb->mark(4096 + i % 100, 512), kOk);
  EXPECT_EQ(pb->commit_count(), commits);
}

TEST_F(PersistentBitmapTest, ConcurrentMarksAreAllDurable) {
  const uint64_t disk = 256 * kMiB + 512;
  const uint32_t gran = 4096;
  auto pb = create("b0", disk, gran);
  constexpr int kThreads = 8;
  constexpr int kMarks = 100;
  std::vector<test::ReferenceBitmap> refs(kThreads, test::ReferenceBitmap(disk, gran));
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(t + 1);
      for (int i = 0; i < kMarks; ++i) {
        const uint64_t offset = rng() % disk;
        const uint64_t length = 1 + rng() % (64 * kKiB);
        EXPECT_EQ(pb->mark(offset, length), kOk);
        EXPECT_TRUE(pb->is_durable(offset, length));
        refs[t].set_range(offset, length);
      }
    });
  }
  for (auto& t : threads) t.join();
  test::ReferenceBitmap all(disk, gran);
  for (const auto& ref : refs) all.merge_from(ref);
  auto other = reopen(pb->path());
  ASSERT_NE(other, nullptr);
  EXPECT_EQ(other->bitmap().snapshot_words(), all.words());
  EXPECT_EQ(pb->bitmap().snapshot_words(), all.words());
  EXPECT_LE(pb->commit_count(), static_cast<uint64_t>(kThreads * kMarks));
  RecordProperty("commits", std::to_string(pb->commit_count()));
}

TEST_F(PersistentBitmapTest, SyncAllPersistsClearAndMerge) {
  auto pb = create("b0", 4 * kMiB + 100, 65536);
  EXPECT_EQ(pb->mark(0, 4 * kMiB), kOk);
  pb->bitmap().clear();
  EXPECT_EQ(pb->sync_all(), kOk);
  EXPECT_EQ(reopen(pb->path())->bitmap().dirty_granules(), 0u);

  DirtyBitmap source(4 * kMiB + 100, 512);
  source.set_range(4 * kMiB + 99, 1);
  source.set_range(70000, 1);
  pb->bitmap().merge_from(source);
  EXPECT_EQ(pb->sync_all(), kOk);
  EXPECT_TRUE(pb->is_durable(4 * kMiB, 100));
  auto other = reopen(pb->path());
  EXPECT_EQ(other->bitmap().snapshot_words(), pb->bitmap().snapshot_words());
  EXPECT_EQ(other->bitmap().dirty_granules(), 2u);
}

TEST_F(PersistentBitmapTest, SetRecordingIsPersisted) {
  auto pb = create("b0", 1 * kMiB, 65536, true);
  const std::string path = pb->path();
  EXPECT_EQ(pb->set_recording(false), kOk);
  EXPECT_FALSE(pb->recording());
  EXPECT_FALSE(reopen(path)->recording());
  EXPECT_EQ(pb->set_recording(true), kOk);
  EXPECT_TRUE(reopen(path)->recording());
  EXPECT_EQ(pb->set_recording(false), kOk);
  EXPECT_FALSE(reopen(path)->recording());
  EXPECT_EQ(pb->set_recording(false), kOk);  // no-op
  EXPECT_EQ(pb->mark(0, 1), kOk);
  // A torn header write damages only the slot being written; the previous
  // state comes back. The last update (sequence 4) went to slot 0.
  flip_byte(path, 40);
  auto old = reopen(path);
  ASSERT_NE(old, nullptr);
  EXPECT_TRUE(old->recording());
  EXPECT_TRUE(old->is_durable(0, 1));
}

TEST_F(PersistentBitmapTest, RemoveFileDeletesIt) {
  auto pb = create("b0", 1 * kMiB);
  auto keep = create("b1", 1 * kMiB);
  EXPECT_EQ(pb->remove_file(), kOk);
  EXPECT_EQ(PersistentBitmap::list(image_), std::vector<std::string>{keep->path()});
  EXPECT_EQ(open_error(pb->path()), errno_code(ENOENT));
  EXPECT_EQ(pb->mark(0, 1), kOk);  // still usable in memory; writes go nowhere
  pb.reset();
  EXPECT_EQ(PersistentBitmap::list(image_).size(), 1u);
}

// Runs `body` in a child process and returns its exit status (0 = passed).
template <typename Body>
int in_child(Body body) {
  const pid_t pid = ::fork();
  if (pid == 0) ::_exit(body());
  int status = 0;
  ::waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 100 + WTERMSIG(status);
}

TEST_F(PersistentBitmapTest, FailedCommitErrorSticks) {
  const std::string path = create("b0", 64 * kMiB, 65536)->path();
  // In a child: a file size limit makes the page writes fail with EFBIG.
  const int status = in_child([&] {
    ::signal(SIGXFSZ, SIG_IGN);
    std::error_code ec;
    auto pb = PersistentBitmap::open(path, ec);
    if (!pb) return 1;
    if (::truncate(path.c_str(), 4096) != 0) return 2;
    const rlimit limit{4096, 4096};
    if (::setrlimit(RLIMIT_FSIZE, &limit) != 0) return 3;
    if (pb->mark(0, 1) != errno_code(EFBIG)) return 4;
    if (pb->mark(32 * kMiB, 1) != errno_code(EFBIG)) return 5;  // sticky
    if (pb->is_durable(0, 1)) return 6;
    if (pb->sync_all() != errno_code(EFBIG)) return 7;
    if (!pb->bitmap().is_dirty(0)) return 8;  // extra dirty bits are fine
    std::_Exit(0);                            // skip the destructor's best-effort write
  });
  EXPECT_EQ(status, 0);
}

struct LoggedRange {
  uint64_t offset;
  uint64_t length;
};

// Child: marks random ranges from four threads; after each mark() returns
// the range goes into the pipe. Runs until killed (or the pipe breaks).
[[noreturn]] void mark_until_killed(const std::string& path, int log_fd, uint64_t seed) {
  ::signal(SIGPIPE, SIG_DFL);
  std::error_code ec;
  auto pb = PersistentBitmap::open(path, ec);
  if (!pb) ::_exit(2);
  const uint64_t disk = pb->bitmap().disk_size();
  std::vector<std::thread> threads;
  for (uint64_t t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(seed * 8 + t);
      for (;;) {
        LoggedRange r{rng() % disk, 1 + rng() % (256 * kKiB)};
        if (pb->mark(r.offset, r.length)) ::_exit(3);
        if (::write(log_fd, &r, sizeof r) != static_cast<ssize_t>(sizeof r)) ::_exit(4);
      }
    });
  }
  for (auto& t : threads) t.join();
  ::_exit(0);
}

std::vector<LoggedRange> read_log(int fd, std::size_t want) {
  std::vector<LoggedRange> log;
  LoggedRange r{};
  while (log.size() < want) {
    const ssize_t n = ::read(fd, &r, sizeof r);  // pipe writes of 16 bytes are atomic
    if (n < 0 && errno == EINTR) continue;
    if (n != static_cast<ssize_t>(sizeof r)) break;
    log.push_back(r);
  }
  return log;
}

TEST_F(PersistentBitmapTest, EveryAcknowledgedMarkSurvivesSigkill) {
  std::mt19937_64 rng(42);
  std::size_t logged = 0;
  for (int iter = 0; iter < 20; ++iter) {
    const uint64_t disk = (1 + rng() % 256) * kMiB + rng() % 4096;
    const uint32_t gran = 512u << (rng() % 9);
    SCOPED_TRACE(testing::Message() << "iter=" << iter << " disk=" << disk << " gran=" << gran);
    const std::string path = create("crash" + std::to_string(iter), disk, gran)->path();
    int fds[2];
    ASSERT_EQ(::pipe(fds), 0);
    const pid_t pid = ::fork();
    if (pid == 0) {
      ::close(fds[0]);
      mark_until_killed(path, fds[1], iter);
    }
    ::close(fds[1]);
    // Kill at a random moment: after a random number of logged marks plus a
    // random delay, so marks are caught mid-write and mid-fdatasync.
    std::vector<LoggedRange> log = read_log(fds[0], rng() % 60);
    ::usleep(static_cast<useconds_t>(rng() % 3000));
    ::kill(pid, SIGKILL);
    int status = 0;
    ::waitpid(pid, &status, 0);
    EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) << "status=" << status;
    for (const LoggedRange& r : read_log(fds[0], SIZE_MAX)) log.push_back(r);
    ::close(fds[0]);
    logged += log.size();

    auto pb = reopen(path);
    ASSERT_NE(pb, nullptr);
    EXPECT_TRUE(pb->recording());
    for (const LoggedRange& r : log) {
      EXPECT_TRUE(pb->bitmap().all_dirty(r.offset, r.length))
          << "offset=" << r.offset << " length=" << r.length;
    }
    if (HasFailure()) return;
  }
  RecordProperty("logged_marks", std::to_string(logged));
}

}  // namespace
}  // namespace fleeced::block

// SPDX-License-Identifier: MIT
// SerialQueue and the offload helpers of server/io_pool.hpp.
#include "server/io_pool.hpp"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <thread>
#include <vector>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>

namespace fleeced::server {
namespace {

// Polls `done` for up to 10 s.
bool wait_for(const std::atomic<bool>& done) {
  for (int i = 0; i < 10000 && !done; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  return done;
}

// Jobs posted from several threads never overlap, and each poster's jobs
// run in the order it posted them, although the pool has four threads.
TEST(SerialQueue, RunsJobsOneAtATimeInOrder) {
  asio::thread_pool pool(4);
  auto queue = std::make_shared<SerialQueue>();
  constexpr int kPosters = 4, kJobs = 200;
  std::atomic<int> running{0}, overlaps{0}, finished{0};
  std::vector<std::vector<int>> seen(kPosters);  // touched only inside jobs
  std::atomic<bool> done{false};
  std::vector<std::thread> posters;
  for (int p = 0; p < kPosters; ++p) {
    posters.emplace_back([&, p] {
      for (int j = 0; j < kJobs; ++j) {
        queue->post(pool, [&, p, j] {
          if (running.fetch_add(1) != 0) ++overlaps;
          seen[p].push_back(j);
          std::this_thread::yield();
          running.fetch_sub(1);
          if (finished.fetch_add(1) + 1 == kPosters * kJobs) done = true;
        });
      }
    });
  }
  for (auto& t : posters) t.join();
  ASSERT_TRUE(wait_for(done));
  pool.join();
  EXPECT_EQ(overlaps.load(), 0);
  for (int p = 0; p < kPosters; ++p) {
    ASSERT_EQ(seen[p].size(), size_t{kJobs}) << "poster " << p;
    for (int j = 0; j < kJobs; ++j) EXPECT_EQ(seen[p][j], j) << "poster " << p;
  }
}

// A coroutine offloading through a queue gets the job's result back on its
// own executor.
TEST(SerialQueue, OffloadResumesTheCoroutineWithTheResult) {
  asio::thread_pool pool(2);
  asio::io_context io;
  auto queue = std::make_shared<SerialQueue>();
  int got = 0;
  std::thread::id job_thread, resumed_thread;
  auto job = [&] {
    job_thread = std::this_thread::get_id();
    return 42;
  };
  auto body = [&]() -> asio::awaitable<void> {
    got = co_await async_offload_serial(pool, *queue, job);
    resumed_thread = std::this_thread::get_id();
  };
  asio::co_spawn(io, body, asio::detached);
  io.run_for(std::chrono::seconds(10));
  pool.join();
  EXPECT_EQ(got, 42);
  EXPECT_NE(job_thread, std::this_thread::get_id());
  EXPECT_EQ(resumed_thread, std::this_thread::get_id());
}

// Unlike an asio::strand, a queue may be destroyed after its pool (an
// export's state can outlive the server's pool at shutdown).
TEST(SerialQueue, MayOutliveThePool) {
  auto queue = std::make_shared<SerialQueue>();
  std::atomic<bool> done{false};
  {
    asio::thread_pool pool(2);
    queue->post(pool, [&] { done = true; });
    ASSERT_TRUE(wait_for(done));
    pool.join();
  }
  queue.reset();
  SUCCEED();
}

// A job the test owns: counts its runs and drops.
class CountingJob final : public PoolJob {
 public:
  void run() noexcept override { runs.fetch_add(1); }
  void drop() noexcept override { drops.fetch_add(1); }
  std::atomic<int> runs{0};
  std::atomic<int> drops{0};
};

// Caller-owned jobs run once each, one at a time in order, and can be
// posted again once they have run (connections reuse their write jobs).
TEST(SerialQueue, CallerOwnedJobsRunInOrderAndCanBeReposted) {
  asio::thread_pool pool(4);
  auto queue = std::make_shared<SerialQueue>();
  std::vector<int> order;  // touched only inside jobs
  struct Recording final : PoolJob {
    std::vector<int>* order = nullptr;
    std::atomic<int>* finished = nullptr;
    int id = 0;
    void run() noexcept override {
      order->push_back(id);
      finished->fetch_add(1);
    }
    void drop() noexcept override {}
  };
  std::atomic<int> finished{0};
  std::vector<Recording> jobs(50);
  for (int round = 0; round < 3; ++round) {
    const int before = finished.load();
    for (int i = 0; i < 50; ++i) {
      jobs[i].order = &order;
      jobs[i].finished = &finished;
      jobs[i].id = round * 50 + i;
      queue->post_job(pool, &jobs[i]);
    }
    for (int t = 0; t < 10000 && finished.load() < before + 50; ++t)
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    ASSERT_EQ(finished.load(), before + 50) << "round " << round;
  }
  pool.join();
  ASSERT_EQ(order.size(), 150u);
  for (int i = 0; i < 150; ++i) EXPECT_EQ(order[i], i);
}

// Jobs still queued when the queue is destroyed (its pool is gone) are
// dropped, never run, and each exactly once.
TEST(SerialQueue, QueuedJobsAreDroppedWithTheQueue) {
  CountingJob first, second, third;
  auto queue = std::make_shared<SerialQueue>();
  {
    asio::thread_pool pool(1);
    std::atomic<bool> release{false}, entered{false};
    // Keep the only pool thread busy so nothing posted after this runs.
    asio::post(pool, [&] {
      entered = true;
      for (int i = 0; i < 10000 && !release; ++i)
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
    });
    ASSERT_TRUE(wait_for(entered));
    queue->post_job(pool, &first);
    queue->post_job(pool, &second);
    queue->post_job(pool, &third);
    pool.stop();  // the queue's drain never starts
    release = true;
    pool.join();
  }
  queue.reset();
  for (CountingJob* j : {&first, &second, &third}) {
    EXPECT_EQ(j->runs.load(), 0);
    EXPECT_EQ(j->drops.load(), 1);
  }
}

}  // namespace
}  // namespace fleeced::server

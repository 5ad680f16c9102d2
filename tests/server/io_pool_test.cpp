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

}  // namespace
}  // namespace fleeced::server

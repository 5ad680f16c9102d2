// SPDX-License-Identifier: MIT
// The I/O pool runs blocking device calls off the event-loop threads.
// async_offload(pool, f) runs f() on the pool and resumes the awaiting
// coroutine on its own executor with f's result. async_offload_serial(pool,
// queue, f) does the same through a SerialQueue: its jobs run one at a time,
// in order. Thread-safe.
#pragma once

#include <deque>
#include <memory>
#include <mutex>
#include <type_traits>
#include <utility>

#include <boost/asio/associated_executor.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/thread_pool.hpp>
#include <boost/asio/use_awaitable.hpp>

namespace fleeced::server {

namespace asio = boost::asio;

// Jobs posted here run on a thread pool one at a time, in the order posted;
// one pool thread runs them back to back while more keep coming, so a busy
// queue costs no wake-up per job. Unlike an asio::strand it holds no state of
// the pool's, so it may outlive the pool (queued jobs are then dropped).
// Thread-safe. Owned through a shared_ptr: a running pool thread keeps it.
class SerialQueue : public std::enable_shared_from_this<SerialQueue> {
 public:
  template <typename Task>
  void post(asio::thread_pool& pool, Task task) {
    auto job = std::make_unique<Job<Task>>(std::move(task));
    {
      std::lock_guard lock(mu_);
      jobs_.push_back(std::move(job));
      if (running_) return;
      running_ = true;
    }
    asio::post(pool, [self = shared_from_this()] { self->drain(); });
  }

 private:
  struct JobBase {
    virtual ~JobBase() = default;
    virtual void run() = 0;
  };
  template <typename T>
  struct Job final : JobBase {
    explicit Job(T t) : task(std::move(t)) {}
    void run() override { task(); }
    T task;
  };

  void drain() {
    for (;;) {
      std::unique_ptr<JobBase> job;
      {
        std::lock_guard lock(mu_);
        if (jobs_.empty()) {
          running_ = false;
          return;
        }
        job = std::move(jobs_.front());
        jobs_.pop_front();
      }
      job->run();
    }
  }

  std::mutex mu_;
  std::deque<std::unique_ptr<JobBase>> jobs_;
  bool running_ = false;  // a pool thread is in drain()
};

namespace detail {

// post(task) must run task() once on some pool thread.
template <typename Post, typename F>
auto offload_with(Post post, F f) {
  using R = std::invoke_result_t<F&>;
  static_assert(!std::is_void_v<R>, "offloaded functions return a value");
  return asio::async_initiate<const asio::use_awaitable_t<>&, void(R)>(
      [post](auto handler, F fn) mutable {
        auto work = asio::make_work_guard(asio::get_associated_executor(handler));
        post([h = std::move(handler), fn = std::move(fn), work = std::move(work)]() mutable {
          R result = fn();
          auto ex = work.get_executor();
          asio::post(ex, [h = std::move(h), result = std::move(result)]() mutable {
            std::move(h)(std::move(result));
          });
          work.reset();
        });
      },
      asio::use_awaitable, std::move(f));
}

}  // namespace detail

template <typename F>
auto async_offload(asio::thread_pool& pool, F f) {
  return detail::offload_with([&pool](auto task) { asio::post(pool, std::move(task)); },
                              std::move(f));
}

template <typename F>
auto async_offload_serial(asio::thread_pool& pool, SerialQueue& queue, F f) {
  return detail::offload_with([&pool, &queue](auto task) { queue.post(pool, std::move(task)); },
                              std::move(f));
}

}  // namespace fleeced::server

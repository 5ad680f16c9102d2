// SPDX-License-Identifier: MIT
// The I/O pool runs blocking device calls off the event-loop threads.
// async_offload(pool, f) runs f() on the pool and resumes the awaiting
// coroutine on its own executor with f's result. async_offload_serial(pool,
// queue, f) does the same through a SerialQueue: its jobs run one at a time,
// in order. Thread-safe.
#pragma once

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

// A unit of work for the I/O pool that the poster allocates (and may reuse),
// so queueing it costs no allocation. A SerialQueue links queued jobs through
// next_; a job is in at most one queue at a time.
class PoolJob {
 public:
  // Runs the job on a pool thread.
  virtual void run() noexcept = 0;
  // The job will never run (its queue is being destroyed): release it.
  virtual void drop() noexcept = 0;

  virtual ~PoolJob() = default;

 private:
  friend class SerialQueue;
  PoolJob* next_ = nullptr;
};

// Jobs posted here run on a thread pool one at a time, in the order posted;
// one pool thread runs them back to back while more keep coming, so a busy
// queue costs no wake-up per job. Unlike an asio::strand it holds no state of
// the pool's, so it may outlive the pool (queued jobs are then dropped).
// Thread-safe. Owned through a shared_ptr: a running pool thread keeps it.
class SerialQueue : public std::enable_shared_from_this<SerialQueue> {
 public:
  SerialQueue() = default;
  SerialQueue(const SerialQueue&) = delete;
  SerialQueue& operator=(const SerialQueue&) = delete;
  ~SerialQueue() {
    while (PoolJob* job = head_) {
      head_ = job->next_;
      job->drop();
    }
  }

  // Queues `job`, which must stay valid until it has run or been dropped.
  void post_job(asio::thread_pool& pool, PoolJob* job) {
    job->next_ = nullptr;
    {
      std::lock_guard lock(mu_);
      if (tail_) {
        tail_->next_ = job;
      } else {
        head_ = job;
      }
      tail_ = job;
      if (running_) return;
      running_ = true;
    }
    asio::post(pool, [self = shared_from_this()] { self->drain(); });
  }

  // Queues task(), allocating a job for it.
  template <typename Task>
  void post(asio::thread_pool& pool, Task task) {
    post_job(pool, new HeapJob<Task>(std::move(task)));
  }

 private:
  template <typename T>
  class HeapJob final : public PoolJob {
   public:
    explicit HeapJob(T t) : task_(std::move(t)) {}
    void run() noexcept override {
      task_();
      delete this;
    }
    void drop() noexcept override { delete this; }

   private:
    T task_;
  };

  void drain() {
    for (;;) {
      PoolJob* job;
      {
        std::lock_guard lock(mu_);
        job = head_;
        if (!job) {
          running_ = false;
          return;
        }
        head_ = job->next_;
        if (!head_) tail_ = nullptr;
      }
      job->run();
    }
  }

  std::mutex mu_;
  PoolJob* head_ = nullptr;  // guarded by mu_
  PoolJob* tail_ = nullptr;  // guarded by mu_
  bool running_ = false;     // guarded by mu_: a pool thread is in drain()
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

// SPDX-License-Identifier: MIT
// The I/O pool runs blocking device calls off the event-loop threads.
// async_offload(pool, f) runs f() on the pool and resumes the awaiting
// coroutine on its own executor with f's result; async_offload_on(executor, f)
// does the same on any executor of the pool (a strand). Thread-safe.
#pragma once

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

// Runs f() on `executor`: the pool's, or a strand on it.
template <typename Executor, typename F>
auto async_offload_on(Executor executor, F f) {
  using R = std::invoke_result_t<F&>;
  static_assert(!std::is_void_v<R>, "offloaded functions return a value");
  return asio::async_initiate<const asio::use_awaitable_t<>&, void(R)>(
      [executor](auto handler, F fn) {
        auto work = asio::make_work_guard(asio::get_associated_executor(handler));
        asio::post(executor,
                   [h = std::move(handler), fn = std::move(fn), work = std::move(work)]() mutable {
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

template <typename F>
auto async_offload(asio::thread_pool& pool, F f) {
  return async_offload_on(pool.get_executor(), std::move(f));
}

}  // namespace fleeced::server

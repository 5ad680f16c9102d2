// SPDX-License-Identifier: MIT
// Server owns the event loops (one io_context per thread; each connection
// lives on one of them), the I/O pool, the listeners and the set of live
// connections. Created and run from main(); stop() may be called from any
// thread, including a signal handler's completion on a loop.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/thread_pool.hpp>

#include "server/connection.hpp"
#include "server/export_registry.hpp"

namespace fleeced::server {

struct ListenAddress {
  enum class Kind { unix_socket, tcp } kind = Kind::unix_socket;
  std::string path;   // unix
  std::string host;   // tcp
  uint16_t port = 0;  // tcp
  std::string to_string() const;
};

// Parses "unix:PATH" or "tcp:HOST:PORT" ("tcp:[::1]:PORT" for IPv6).
bool parse_listen_address(std::string_view text, ListenAddress& out, std::string& error);

struct ServerOptions {
  unsigned threads = 0;            // 0 = number of CPUs
  unsigned io_threads = 0;         // 0 = max(4, 2 * CPUs)
  unsigned max_connections = 100;  // 0 = unlimited
  ConnectionLimits limits;
  std::chrono::milliseconds shutdown_grace{5000};
};

class Server {
 public:
  Server(const ServerOptions& options, ExportRegistry& registry);
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Binds and listens now (before run()); connections on it follow `tls`
  // (null: TLS off). Errors: bind/listen errno.
  std::error_code listen(const ListenAddress& address,
                         std::shared_ptr<const TlsPolicy> tls = nullptr);
  // Serves one connection on the given descriptors; the server stops when it ends.
  void serve_stdio(int in_fd, int out_fd);
  // Runs until stop() and every connection has ended (or the grace period
  // passed). Handles SIGINT/SIGTERM as stop(). Returns the exit status.
  int run();
  // Graceful stop: close listeners, let in-flight replies go out.
  void stop();

  // While running: binds, listens and accepts at once. Thread-safe.
  std::error_code listen_now(const ListenAddress& address,
                             std::shared_ptr<const TlsPolicy> tls = nullptr);
  // While running: stops accepting on `address` and removes its socket file.
  void close_listener(const ListenAddress& address);
  // Closes every connection serving the export with this state. Thread-safe.
  void disconnect_export(const ExportState* state);
  void set_max_connections(unsigned n) { max_connections_.store(n); }
  unsigned max_connections() const { return max_connections_.load(); }
  // Called (on the I/O pool) for every SIGHUP while running. Before run().
  void set_reload_handler(std::function<void()> fn) { on_reload_ = std::move(fn); }

  std::size_t active_connections() const { return active_.load(); }
  // Live connections on each event loop (index 0 runs the listeners).
  std::vector<unsigned> loop_connection_counts() const;
  ServerContext& context() { return context_; }
  boost::asio::io_context& control_loop() { return *loops_.front(); }

 private:
  struct Listener;
  unsigned least_loaded_loop() const;
  void spawn_connection(unsigned loop_index, std::unique_ptr<Stream> stream,
                        std::shared_ptr<const TlsPolicy> tls);
  void start_accepting(Listener& l);
  void finish_stop();
  void wait_for_sighup(boost::asio::signal_set& hup);

  ServerOptions options_;
  ExportRegistry& registry_;
  boost::asio::thread_pool io_pool_;
  ServerContext context_;
  std::vector<std::unique_ptr<boost::asio::io_context>> loops_;
  std::vector<boost::asio::executor_work_guard<boost::asio::io_context::executor_type>> guards_;
  std::vector<std::unique_ptr<Listener>> listeners_;          // loop 0 only
  std::vector<std::unique_ptr<Listener>> retired_listeners_;  // loop 0 only
  // Live connections per loop, indexed like loops_.
  std::unique_ptr<std::atomic<unsigned>[]> loop_connections_;
  std::atomic<uint64_t> next_id_{1};
  std::atomic<std::size_t> active_{0};
  std::atomic<bool> stopping_{false};
  std::atomic<unsigned> max_connections_{100};
  bool stdio_mode_ = false;
  std::function<void()> on_reload_;  // set before run()

  std::mutex mu_;
  std::condition_variable cv_;
  bool finished_ = false;  // guarded by mu_
  // Live connections and the loop each runs on; guarded by mu_.
  std::map<uint64_t, std::pair<std::weak_ptr<Connection>, boost::asio::io_context*>> connections_;
};

}  // namespace fleeced::server

// SPDX-License-Identifier: MIT
#include "server/server.hpp"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <future>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/basic_socket_acceptor.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/generic/stream_protocol.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>

#include "server/log.hpp"
#include "server/tls_authz.hpp"

namespace fleeced::server {

namespace {

unsigned cpu_count() {
  unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 2 : n;
}

// Re-registers an accepted socket with another loop's reactor. On failure the
// descriptor is closed or left with `socket`, which closes it.
boost::system::error_code move_to_loop(boost::asio::generic::stream_protocol::socket& socket,
                                       const boost::asio::generic::stream_protocol& protocol,
                                       boost::asio::io_context& loop) {
  boost::system::error_code ec;
  int fd = socket.release(ec);
  if (ec) return ec;
  socket = boost::asio::generic::stream_protocol::socket(loop);
  socket.assign(protocol, fd, ec);
  if (ec) ::close(fd);
  return ec;
}

// " (TLS required, x509:DIR verify-peer=on)" for the listening log line.
std::string describe_tls(const TlsPolicy* tls) {
  if (!tls || tls->mode == TlsMode::off || !tls->creds) return "";
  std::string out = tls->mode == TlsMode::require ? " (TLS required, " : " (TLS offered, ";
  out += tls->creds->get()->describe();
  if (tls->authz) out += ", allow-list of " + std::to_string(tls->authz->rules().size());
  return out + ")";
}

}  // namespace

std::string ListenAddress::to_string() const {
  if (kind == Kind::unix_socket) return "unix:" + path;
  if (host.find(':') != std::string::npos) return "tcp:[" + host + "]:" + std::to_string(port);
  return "tcp:" + host + ":" + std::to_string(port);
}

bool parse_listen_address(std::string_view text, ListenAddress& out, std::string& error) {
  if (text.starts_with("unix:")) {
    out.kind = ListenAddress::Kind::unix_socket;
    out.path = std::string(text.substr(5));
    if (out.path.empty()) {
      error = "unix: needs a socket path";
      return false;
    }
    if (out.path.size() >= sizeof(sockaddr_un{}.sun_path)) {
      error = "unix socket path too long: " + out.path;
      return false;
    }
    return true;
  }
  if (text.starts_with("tcp:")) {
    std::string_view rest = text.substr(4);
    std::string_view host, port;
    if (rest.starts_with("[")) {
      auto close = rest.find("]:");
      if (close == std::string_view::npos) {
        error = "expected tcp:[ADDR]:PORT, got '" + std::string(text) + "'";
        return false;
      }
      host = rest.substr(1, close - 1);
      port = rest.substr(close + 2);
    } else {
      auto colon = rest.rfind(':');
      if (colon == std::string_view::npos) {
        error = "expected tcp:HOST:PORT, got '" + std::string(text) + "'";
        return false;
      }
      host = rest.substr(0, colon);
      port = rest.substr(colon + 1);
    }
    unsigned value = 0;
    auto [ptr, ec] = std::from_chars(port.data(), port.data() + port.size(), value);
    if (port.empty() || ec != std::errc() || ptr != port.data() + port.size() || value > 65535 ||
        host.empty()) {
      error = "bad TCP address '" + std::string(text) + "'";
      return false;
    }
    out.kind = ListenAddress::Kind::tcp;
    out.host = std::string(host);
    out.port = static_cast<uint16_t>(value);
    return true;
  }
  error = "listen address must start with unix: or tcp:, got '" + std::string(text) + "'";
  return false;
}

struct Server::Listener {
  ListenAddress address;
  std::shared_ptr<const TlsPolicy> tls;
  boost::asio::basic_socket_acceptor<boost::asio::generic::stream_protocol> acceptor;
  boost::asio::generic::stream_protocol protocol{AF_UNIX, 0};  // of accepted sockets
  explicit Listener(boost::asio::io_context& loop) : acceptor(loop) {}
};

Server::Server(const ServerOptions& options, ExportRegistry& registry)
    : options_(options),
      registry_(registry),
      io_pool_(options.io_threads ? options.io_threads : std::max(4u, 2 * cpu_count())) {
  unsigned threads = options.threads ? options.threads : cpu_count();
  for (unsigned i = 0; i < threads; ++i) {
    loops_.push_back(std::make_unique<boost::asio::io_context>(1));
    guards_.push_back(boost::asio::make_work_guard(*loops_.back()));
  }
  loop_connections_ = std::make_unique<std::atomic<unsigned>[]>(loops_.size());
  max_connections_.store(options.max_connections);
  context_.registry = &registry_;
  context_.io_pool = &io_pool_;
  context_.limits = options.limits;
}

Server::~Server() {
  for (auto& g : guards_) g.reset();
  for (auto& l : loops_) l->stop();
  io_pool_.join();
}

unsigned Server::least_loaded_loop() const {
  // Ties go to the lowest index: loop 0 runs the acceptors, so a connection
  // that stays there starts without a wake-up of another thread.
  unsigned best = 0;
  unsigned best_count = loop_connections_[0].load(std::memory_order_relaxed);
  for (unsigned i = 1; i < loops_.size(); ++i) {
    unsigned n = loop_connections_[i].load(std::memory_order_relaxed);
    if (n < best_count) {
      best = i;
      best_count = n;
    }
  }
  return best;
}

std::vector<unsigned> Server::loop_connection_counts() const {
  std::vector<unsigned> out(loops_.size());
  for (std::size_t i = 0; i < out.size(); ++i) out[i] = loop_connections_[i].load();
  return out;
}

std::error_code Server::listen(const ListenAddress& address, std::shared_ptr<const TlsPolicy> tls) {
  auto l = std::make_unique<Listener>(*loops_.front());
  l->address = address;
  l->tls = std::move(tls);
  boost::system::error_code ec;
  boost::asio::generic::stream_protocol::endpoint endpoint;
  if (address.kind == ListenAddress::Kind::unix_socket) {
    struct stat st {};
    if (::lstat(address.path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode)) {
      ::unlink(address.path.c_str());  // a stale socket from an earlier run
    }
    endpoint = boost::asio::local::stream_protocol::endpoint(address.path);
  } else {
    auto ip =
        boost::asio::ip::make_address(address.host == "localhost" ? "127.0.0.1" : address.host, ec);
    if (ec) return std::make_error_code(std::errc::invalid_argument);
    endpoint = boost::asio::ip::tcp::endpoint(ip, address.port);
  }
  l->protocol = endpoint.protocol();
  l->acceptor.open(endpoint.protocol(), ec);
  if (!ec && address.kind == ListenAddress::Kind::tcp) {
    l->acceptor.set_option(boost::asio::socket_base::reuse_address(true), ec);
  }
  if (!ec) l->acceptor.bind(endpoint, ec);
  if (!ec) l->acceptor.listen(boost::asio::socket_base::max_listen_connections, ec);
  if (ec) return ec;
  log().info("listening on {}{}", address.to_string(), describe_tls(l->tls.get()));
  listeners_.push_back(std::move(l));
  return {};
}

void Server::start_accepting(Listener& l) {
  boost::asio::co_spawn(
      *loops_.front(),
      [this, &l]() -> boost::asio::awaitable<void> {
        boost::asio::steady_timer backoff(*loops_.front());
        while (!stopping_) {
          // Accepted onto loop 0's context; the connection's own loop is
          // chosen once the socket exists (connections may have ended
          // meanwhile), and the socket moves there.
          auto [ec, socket] =
              co_await l.acceptor.async_accept(boost::asio::as_tuple(boost::asio::use_awaitable));
          if (ec) {
            if (ec == boost::asio::error::operation_aborted || stopping_) break;
            log().warn("accept on {} failed: {}", l.address.to_string(), ec.message());
            backoff.expires_after(std::chrono::milliseconds(100));  // e.g. EMFILE
            co_await backoff.async_wait(boost::asio::as_tuple(boost::asio::use_awaitable));
            continue;
          }
          const unsigned max = max_connections_.load();
          if (max && active_.load() >= max) {
            log().warn("refusing connection on {}: {} connections already (max-connections)",
                       l.address.to_string(), active_.load());
            boost::system::error_code ignored;
            socket.close(ignored);
            continue;
          }
          const unsigned index = least_loaded_loop();
          if (index != 0) {
            boost::system::error_code mec = move_to_loop(socket, l.protocol, *loops_[index]);
            if (mec) {
              log().warn("accept on {}: cannot move the socket to loop {}: {}",
                         l.address.to_string(), index, mec.message());
              continue;  // the socket (if still open) closes as it goes out of scope
            }
          }
          spawn_connection(index, std::make_unique<SocketStream>(std::move(socket)), l.tls);
        }
      },
      boost::asio::detached);
}

void Server::spawn_connection(unsigned loop_index, std::unique_ptr<Stream> stream,
                              std::shared_ptr<const TlsPolicy> tls) {
  boost::asio::io_context& loop = *loops_[loop_index];
  uint64_t id = next_id_.fetch_add(1);
  ServerContext context = context_;
  context.tls = std::move(tls);
  auto conn = std::make_shared<Connection>(loop.get_executor(), std::move(stream), context, id);
  ++active_;
  loop_connections_[loop_index].fetch_add(1, std::memory_order_relaxed);
  {
    std::lock_guard lock(mu_);
    connections_[id] = {conn, &loop};
  }
  // The lambda keeps the connection alive for as long as its coroutine runs.
  boost::asio::co_spawn(
      loop, [conn] { return conn->async_run(); },
      [this, id, loop_index](std::exception_ptr e) {
        if (e) {
          try {
            std::rethrow_exception(e);
          } catch (const std::exception& ex) {
            log().error("conn {}: ended by exception: {}", id, ex.what());
          }
        }
        {
          std::lock_guard lock(mu_);
          connections_.erase(id);
        }
        loop_connections_[loop_index].fetch_sub(1, std::memory_order_relaxed);
        --active_;
        if (stdio_mode_) stop();
      });
}

std::error_code Server::listen_now(const ListenAddress& address,
                                   std::shared_ptr<const TlsPolicy> tls) {
  std::promise<std::error_code> done;
  auto result = done.get_future();
  boost::asio::post(*loops_.front(), [this, &address, &done, &tls] {
    std::error_code ec = listen(address, tls);
    if (!ec) start_accepting(*listeners_.back());
    done.set_value(ec);
  });
  return result.get();
}

void Server::close_listener(const ListenAddress& address) {
  std::promise<void> done;
  auto result = done.get_future();
  boost::asio::post(*loops_.front(), [this, &address, &done] {
    for (auto it = listeners_.begin(); it != listeners_.end(); ++it) {
      if ((*it)->address.to_string() != address.to_string()) continue;
      boost::system::error_code ignored;
      (*it)->acceptor.close(ignored);
      if (address.kind == ListenAddress::Kind::unix_socket) ::unlink(address.path.c_str());
      // The accept loop holds a reference until its aborted accept completes.
      retired_listeners_.push_back(std::move(*it));
      listeners_.erase(it);
      break;
    }
    done.set_value();
  });
  result.get();
}

void Server::disconnect_export(const ExportState* state) {
  std::vector<std::pair<std::shared_ptr<Connection>, boost::asio::io_context*>> live;
  {
    std::lock_guard lock(mu_);
    for (auto& [id, entry] : connections_) {
      if (auto c = entry.first.lock()) live.emplace_back(std::move(c), entry.second);
    }
  }
  for (auto& [conn, loop] : live) {
    boost::asio::post(*loop, [conn = conn, state] {
      if (conn->export_state() == state) conn->close_now();
    });
  }
}

void Server::serve_stdio(int in_fd, int out_fd) {
  stdio_mode_ = true;
  auto& loop = *loops_.front();
  spawn_connection(0, std::make_unique<StdioStream>(loop.get_executor(), in_fd, out_fd), nullptr);
}

void Server::stop() {
  if (stopping_.exchange(true)) return;
  boost::asio::post(*loops_.front(), [this] {
    log().info("shutting down: {} connection(s) open", active_.load());
    for (auto& l : listeners_) {
      boost::system::error_code ignored;
      l->acceptor.close(ignored);
      if (l->address.kind == ListenAddress::Kind::unix_socket) ::unlink(l->address.path.c_str());
    }
    std::vector<std::pair<std::shared_ptr<Connection>, boost::asio::io_context*>> live;
    {
      std::lock_guard lock(mu_);
      for (auto& [id, entry] : connections_) {
        if (auto c = entry.first.lock()) live.emplace_back(std::move(c), entry.second);
      }
    }
    for (auto& [conn, loop] : live) {
      boost::asio::post(*loop, [conn = conn] { conn->stop(); });
    }
    // Wait for connections to drain, then stop the loops.
    auto timer = std::make_shared<boost::asio::steady_timer>(*loops_.front());
    auto deadline = std::chrono::steady_clock::now() + options_.shutdown_grace;
    auto poll = std::make_shared<std::function<void()>>();
    *poll = [this, timer, deadline, poll] {
      if (active_.load() == 0 || std::chrono::steady_clock::now() >= deadline) {
        if (active_.load() > 0) {
          log().warn("shutdown grace period over: dropping {} connection(s)", active_.load());
        }
        finish_stop();
        *poll = nullptr;  // break the self-reference
        return;
      }
      timer->expires_after(std::chrono::milliseconds(20));
      timer->async_wait([poll](const boost::system::error_code&) {
        if (*poll) (*poll)();
      });
    };
    (*poll)();
  });
}

void Server::wait_for_sighup(boost::asio::signal_set& hup) {
  hup.async_wait([this, &hup](const boost::system::error_code& ec, int) {
    if (ec) return;
    log().info("received SIGHUP: reloading TLS credentials");
    if (on_reload_) boost::asio::post(io_pool_, on_reload_);
    wait_for_sighup(hup);
  });
}

void Server::finish_stop() {
  std::lock_guard lock(mu_);
  finished_ = true;
  cv_.notify_all();
}

int Server::run() {
  boost::asio::signal_set signals(*loops_.front(), SIGINT, SIGTERM);
  signals.async_wait([this](const boost::system::error_code& ec, int sig) {
    if (ec) return;
    log().info("received signal {}", sig);
    stop();
  });
  boost::asio::signal_set hup(*loops_.front(), SIGHUP);
  wait_for_sighup(hup);
  for (auto& l : listeners_) start_accepting(*l);
  std::vector<std::thread> threads;
  for (auto& loop : loops_) {
    threads.emplace_back([&loop] { loop->run(); });
  }
  {
    std::unique_lock lock(mu_);
    cv_.wait(lock, [this] { return finished_; });
  }
  boost::system::error_code ignored;
  signals.cancel(ignored);
  hup.cancel(ignored);
  for (auto& g : guards_) g.reset();
  for (auto& l : loops_) l->stop();
  for (auto& t : threads) t.join();
  io_pool_.join();
  {
    std::lock_guard lock(mu_);
    connections_.clear();
  }
  return 0;
}

}  // namespace fleeced::server

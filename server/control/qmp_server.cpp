// SPDX-License-Identifier: MIT
// Design notes
//
// Everything below runs on the control thread except listen(), start(),
// stop() and the thread-safe entry points, which post onto it. One coroutine
// accepts a client and serves it to the end before accepting the next. The
// serving coroutine reads, feeds the Session and queues its output; a
// callback chain writes the queue, so output produced between reads (events
// from other threads) goes out in order with the responses. A client ends on
// EOF, a read or write error, or input the Session cannot recover from; its
// remaining output is then given up to kDrainTimeout to go out before the
// socket closes. stop() shuts down the reading side of the client's socket
// (its read sees EOF), so a response being written, such as quit's, still
// reaches the client.
#include "server/control/qmp_server.hpp"

#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <exception>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>

#include "server/log.hpp"

namespace fleeced::server::control {

namespace asio = boost::asio;
using Socket = asio::local::stream_protocol::socket;

namespace {

constexpr auto kDrainTimeout = std::chrono::seconds(1);
constexpr auto kAcceptRetryDelay = std::chrono::milliseconds(100);
constexpr int kBacklog = 16;

// True if a server accepts connections at `path` (the socket is not stale).
bool socket_is_live(const std::string& path) {
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  path.copy(addr.sun_path, sizeof(addr.sun_path) - 1);
  const bool live = ::connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) == 0;
  ::close(fd);
  return live;
}

}  // namespace

struct QmpServer::Client {
  Client(Socket s, const CommandTable& commands, json::object version)
      : socket(std::move(s)), session(commands, std::move(version)), timer(socket.get_executor()) {}

  Socket socket;
  Session session;
  std::array<char, 16384> input;
  std::string pending;    // output not yet handed to async_write
  std::string in_flight;  // the output async_write is sending
  bool writing = false;
  bool draining = false;  // no more input; close once the output is out
  bool closed = false;
  asio::steady_timer timer;  // the drain deadline; cancelled by close_client()
};

QmpServer::QmpServer(const CommandTable& commands, json::object version)
    : commands_(commands), version_(std::move(version)), acceptor_(io_) {}

QmpServer::~QmpServer() {
  stop();
  if (thread_.joinable()) {
    // Only when destroyed on its own thread, which stop() cannot join.
    thread_.detach();
  }
}

std::error_code QmpServer::listen(const std::string& path) {
  if (path.empty() || path.size() >= sizeof(sockaddr_un{}.sun_path)) {
    return std::make_error_code(std::errc::filename_too_long);
  }
  struct stat st {};
  if (::lstat(path.c_str(), &st) == 0) {
    // Replace only a socket nobody answers on: never a file, never the
    // socket of a running server.
    if (!S_ISSOCK(st.st_mode) || socket_is_live(path)) {
      return std::make_error_code(std::errc::address_in_use);
    }
    ::unlink(path.c_str());
  }
  boost::system::error_code ec;
  asio::local::stream_protocol::endpoint endpoint(path);
  acceptor_.open(endpoint.protocol(), ec);
  if (!ec) acceptor_.bind(endpoint, ec);
  if (!ec) acceptor_.listen(kBacklog, ec);
  if (ec) {
    boost::system::error_code ignored;
    acceptor_.close(ignored);
    return ec;
  }
  path_ = path;
  return {};
}

void QmpServer::start() {
  if (thread_.joinable() || stopped_ || !acceptor_.is_open()) return;
  auto on_done = [](std::exception_ptr e) {
    if (!e) return;
    try {
      std::rethrow_exception(e);
    } catch (const std::exception& ex) {
      log().error("QMP listener failed: {}", ex.what());
    }
  };
  asio::co_spawn(io_, async_accept_loop(), std::move(on_done));
  thread_ = std::thread([this] {
    for (;;) {
      try {
        io_.run();
        return;
      } catch (const std::exception& e) {  // from a post()ed function
        log().error("QMP control thread: {}", e.what());
      }
    }
  });
}

void QmpServer::stop() {
  if (!stopped_.exchange(true)) {
    if (thread_.joinable()) {
      asio::post(io_, [this] { begin_shutdown(); });
    } else {
      boost::system::error_code ignored;
      acceptor_.close(ignored);
    }
  }
  if (on_control_thread()) return;
  if (thread_.joinable()) thread_.join();
  if (!path_.empty()) {
    ::unlink(path_.c_str());
    path_.clear();
  }
}

bool QmpServer::on_control_thread() const { return io_.get_executor().running_in_this_thread(); }

void QmpServer::post(std::function<void()> fn) { asio::post(io_, std::move(fn)); }

void QmpServer::emit_event(std::string name, json::object data) {
  if (on_control_thread()) {
    deliver_event(name, std::move(data));
    return;
  }
  auto deliver = [this, name = std::move(name), data = std::move(data)]() mutable {
    deliver_event(name, std::move(data));
  };
  asio::post(io_, std::move(deliver));
}

void QmpServer::deliver_event(const std::string& name, json::object data) {
  if (!client_ || client_->closed || client_->draining) return;
  client_->session.emit(name, std::move(data));
  queue_output(client_, client_->session.take_output());
}

void QmpServer::begin_shutdown() {
  stopping_ = true;
  boost::system::error_code ignored;
  acceptor_.close(ignored);
  // The client's pending read sees EOF; its pending output still goes out.
  if (client_ && !client_->closed) {
    client_->socket.shutdown(asio::socket_base::shutdown_receive, ignored);
  }
}

asio::awaitable<void> QmpServer::async_accept_loop() {
  while (!stopping_) {
    boost::system::error_code ec;
    Socket socket(io_);
    co_await acceptor_.async_accept(socket, asio::redirect_error(asio::use_awaitable, ec));
    if (ec) {
      if (stopping_ || ec == asio::error::operation_aborted) break;
      log().warn("QMP accept failed: {}", ec.message());
      asio::steady_timer pause(io_, kAcceptRetryDelay);  // EMFILE and friends
      co_await pause.async_wait(asio::redirect_error(asio::use_awaitable, ec));
      continue;
    }
    if (stopping_) break;
    auto client = std::make_shared<Client>(std::move(socket), commands_, version_);
    client_ = client;
    log().info("QMP client connected");
    try {
      co_await async_serve(client);
    } catch (const std::exception& e) {
      log().error("QMP client: {}", e.what());
    }
    close_client(client);
    client_.reset();
    log().info("QMP client disconnected");
  }
}

asio::awaitable<void> QmpServer::async_serve(const std::shared_ptr<Client>& client) {
  Client& c = *client;
  queue_output(client, c.session.greeting());
  while (!c.closed) {
    boost::system::error_code ec;
    const std::size_t n = co_await c.socket.async_read_some(
        asio::buffer(c.input), asio::redirect_error(asio::use_awaitable, ec));
    if (ec) break;  // EOF (also after stop()), reset, or closed after a write error
    const bool ok = c.session.feed(std::string_view(c.input.data(), n));
    queue_output(client, c.session.take_output());
    if (!ok) {
      log().warn("QMP client sent a JSON value over {} bytes; closing", Session::kMaxValueBytes);
      break;
    }
  }
  close_when_drained(client);
  if (!c.closed) {
    c.timer.expires_after(kDrainTimeout);
    boost::system::error_code ec;
    co_await c.timer.async_wait(asio::redirect_error(asio::use_awaitable, ec));
  }
}

void QmpServer::queue_output(const std::shared_ptr<Client>& client, std::string text) {
  if (text.empty() || client->closed) return;
  client->pending += text;
  start_write(client);
}

void QmpServer::start_write(const std::shared_ptr<Client>& client) {
  if (client->writing || client->pending.empty()) return;
  client->writing = true;
  client->in_flight = std::move(client->pending);
  client->pending.clear();
  auto on_written = [this, client](const boost::system::error_code& ec, std::size_t) {
    client->writing = false;
    if (ec) {
      close_client(client);
    } else if (!client->pending.empty()) {
      start_write(client);
    } else if (client->draining) {
      close_client(client);
    }
  };
  asio::async_write(client->socket, asio::buffer(client->in_flight), std::move(on_written));
}

void QmpServer::close_when_drained(const std::shared_ptr<Client>& client) {
  client->draining = true;
  if (!client->writing) close_client(client);
}

void QmpServer::close_client(const std::shared_ptr<Client>& client) {
  if (client->closed) return;
  client->closed = true;
  boost::system::error_code ignored;
  client->socket.shutdown(asio::socket_base::shutdown_both, ignored);
  client->socket.close(ignored);
  client->timer.cancel();
}

}  // namespace fleeced::server::control

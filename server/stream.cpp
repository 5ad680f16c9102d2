// SPDX-License-Identifier: MIT
#include "server/stream.hpp"

#include <algorithm>
#include <array>
#include <cerrno>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#include <boost/asio/read.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>

#include "server/tls_stream.hpp"

namespace fleeced::server {

namespace {

// "unix:pid=N", "tcp:HOST:PORT" or "unknown"; `family` gets the address family
// (AF_UNSPEC if unknown).
std::string describe_peer(asio::generic::stream_protocol::socket& socket, int& family) {
  family = AF_UNSPEC;
  boost::system::error_code ec;
  auto endpoint = socket.remote_endpoint(ec);
  if (ec) return "unknown";
  const sockaddr* sa = endpoint.data();
  family = sa->sa_family;
  if (sa->sa_family == AF_UNIX) {
    ucred cred{};
    socklen_t len = sizeof cred;
    if (::getsockopt(socket.native_handle(), SOL_SOCKET, SO_PEERCRED, &cred, &len) == 0) {
      return "unix:pid=" + std::to_string(cred.pid);
    }
    return "unix";
  }
  char host[INET6_ADDRSTRLEN] = {};
  unsigned port = 0;
  if (sa->sa_family == AF_INET) {
    auto* in = reinterpret_cast<const sockaddr_in*>(sa);
    ::inet_ntop(AF_INET, &in->sin_addr, host, sizeof host);
    port = ntohs(in->sin_port);
    return "tcp:" + std::string(host) + ":" + std::to_string(port);
  }
  if (sa->sa_family == AF_INET6) {
    auto* in6 = reinterpret_cast<const sockaddr_in6*>(sa);
    ::inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof host);
    port = ntohs(in6->sin6_port);
    return "tcp:[" + std::string(host) + "]:" + std::to_string(port);
  }
  return "unknown";
}

}  // namespace

std::unique_ptr<TlsStream> Stream::start_tls(std::shared_ptr<const TlsCredentials>) {
  return nullptr;
}

asio::awaitable<void> Stream::async_shutdown() { co_return; }

std::size_t Stream::try_write(std::span<const asio::const_buffer>, std::error_code& ec) {
  ec = std::make_error_code(std::errc::operation_would_block);
  return 0;
}

SocketStream::SocketStream(asio::generic::stream_protocol::socket socket)
    : socket_(std::move(socket)) {
  int family = AF_UNSPEC;
  peer_ = describe_peer(socket_, family);
  if (family == AF_UNIX) {
    // A unix stream socket queues at most its sender's SO_SNDBUF (default
    // 208 KiB): a 256 KiB read reply then needs several send / wait-for-room
    // rounds, each waking the client and this loop. Ask for 1 MiB (the
    // kernel doubles it, within net.core.wmem_max); TCP keeps autotuning.
    int bytes = kUnixSendBufferBytes;
    ::setsockopt(socket_.native_handle(), SOL_SOCKET, SO_SNDBUF, &bytes, sizeof bytes);
  }
  // The spec asks both sides to set TCP_NODELAY (TCP only).
  if (family == AF_INET || family == AF_INET6) {
    int one = 1;
    ::setsockopt(socket_.native_handle(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  }
}

asio::awaitable<std::size_t> SocketStream::async_read_some(asio::mutable_buffer buffer,
                                                           std::error_code& ec) {
  boost::system::error_code bec;
  std::size_t n =
      co_await socket_.async_read_some(buffer, asio::redirect_error(asio::use_awaitable, bec));
  ec = bec;
  co_return n;
}

asio::awaitable<void> SocketStream::async_write_all(std::span<const asio::const_buffer> buffers,
                                                    std::error_code& ec) {
  boost::system::error_code bec;
  // Asio's default completion condition caps each sendmsg at 64 KiB; a
  // 256 KiB read reply would take four syscalls and four loop turns.
  auto no_cap = [](const boost::system::error_code& e, std::size_t) -> std::size_t {
    return e ? 0 : std::size_t{1} << 30;
  };
  co_await asio::async_write(socket_, buffers, no_cap,
                             asio::redirect_error(asio::use_awaitable, bec));
  ec = bec;
}

std::size_t SocketStream::try_write(std::span<const asio::const_buffer> buffers,
                                    std::error_code& ec) {
  ec.clear();
  std::array<iovec, 64> iov;
  std::size_t count = std::min(buffers.size(), iov.size());
  for (std::size_t i = 0; i < count; ++i) {
    iov[i].iov_base = const_cast<void*>(buffers[i].data());
    iov[i].iov_len = buffers[i].size();
  }
  msghdr msg{};
  msg.msg_iov = iov.data();
  msg.msg_iovlen = count;
  for (;;) {
    ssize_t n = ::sendmsg(socket_.native_handle(), &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n >= 0) return static_cast<std::size_t>(n);
    if (errno == EINTR) continue;
    ec = std::error_code(errno == EWOULDBLOCK ? EAGAIN : errno, std::generic_category());
    if (ec.value() == EAGAIN) ec = std::make_error_code(std::errc::operation_would_block);
    return 0;
  }
}

std::unique_ptr<TlsStream> SocketStream::start_tls(std::shared_ptr<const TlsCredentials> creds) {
  return std::make_unique<TlsStream>(std::move(socket_), std::move(creds), peer_);
}

void SocketStream::shutdown_receive() {
  boost::system::error_code ignored;
  socket_.shutdown(asio::socket_base::shutdown_receive, ignored);
}

void SocketStream::close() {
  boost::system::error_code ignored;
  socket_.shutdown(asio::socket_base::shutdown_both, ignored);
  socket_.close(ignored);
}

StdioStream::StdioStream(const asio::any_io_executor& executor, int in_fd, int out_fd)
    : in_(executor, ::dup(in_fd)), out_(executor, ::dup(out_fd)) {}

asio::awaitable<std::size_t> StdioStream::async_read_some(asio::mutable_buffer buffer,
                                                          std::error_code& ec) {
  boost::system::error_code bec;
  std::size_t n =
      co_await in_.async_read_some(buffer, asio::redirect_error(asio::use_awaitable, bec));
  ec = bec;
  co_return n;
}

asio::awaitable<void> StdioStream::async_write_all(std::span<const asio::const_buffer> buffers,
                                                   std::error_code& ec) {
  boost::system::error_code bec;
  co_await asio::async_write(out_, buffers, asio::redirect_error(asio::use_awaitable, bec));
  ec = bec;
}

void StdioStream::shutdown_receive() {
  boost::system::error_code ignored;
  in_.close(ignored);
}

void StdioStream::close() {
  boost::system::error_code ignored;
  in_.close(ignored);
  out_.close(ignored);
}

}  // namespace fleeced::server

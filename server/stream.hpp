// SPDX-License-Identifier: MIT
// Stream is the byte transport under one NBD connection: a unix or TCP socket,
// stdin/stdout, or a TLS stream (server/tls_stream.hpp) that takes over a
// socket after NBD_OPT_STARTTLS. A Stream belongs to one connection and is
// used only on that connection's executor.
#pragma once

#include <cstddef>
#include <memory>
#include <span>
#include <string>
#include <system_error>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/buffer.hpp>
#include <boost/asio/generic/stream_protocol.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>

namespace fleeced::server {

namespace asio = boost::asio;

class TlsCredentials;
class TlsStream;

class Stream {
 public:
  virtual ~Stream() = default;
  // Reads at least one byte; EOF and errors come back in ec.
  virtual asio::awaitable<std::size_t> async_read_some(asio::mutable_buffer buffer,
                                                       std::error_code& ec) = 0;
  // Writes every byte of every buffer, or fails with ec.
  virtual asio::awaitable<void> async_write_all(std::span<const asio::const_buffer> buffers,
                                                std::error_code& ec) = 0;
  // Writes what the transport takes right now without waiting and returns
  // the byte count (possibly a prefix of a buffer). A transport that cannot
  // take bytes now, or cannot write without waiting at all (the default),
  // returns 0 with ec = operation_would_block; other errors are real. Must
  // not be called while an async_write_all is in progress.
  virtual std::size_t try_write(std::span<const asio::const_buffer> buffers, std::error_code& ec);
  // Makes a pending or later read end with EOF; writes still go out.
  virtual void shutdown_receive() = 0;
  // Closes both directions; pending operations complete with an error.
  virtual void close() = 0;
  // "unix:/path", "tcp:1.2.3.4:5678" or "stdio", for logs.
  virtual std::string peer() const = 0;
  // Hands the transport over to a TLS server stream (handshake not done
  // yet); this stream is left without a transport. Null if the transport
  // cannot carry TLS (stdio).
  virtual std::unique_ptr<TlsStream> start_tls(std::shared_ptr<const TlsCredentials> creds);
  // Ends the session politely (a TLS close_notify), bounded in time; plain
  // streams have nothing to say.
  virtual asio::awaitable<void> async_shutdown();
};

// A connected unix or TCP socket.
class SocketStream final : public Stream {
 public:
  // SO_SNDBUF asked for on unix sockets (see the constructor).
  static constexpr int kUnixSendBufferBytes = 1 << 20;
  explicit SocketStream(asio::generic::stream_protocol::socket socket);
  asio::awaitable<std::size_t> async_read_some(asio::mutable_buffer buffer,
                                               std::error_code& ec) override;
  asio::awaitable<void> async_write_all(std::span<const asio::const_buffer> buffers,
                                        std::error_code& ec) override;
  // One non-blocking sendmsg.
  std::size_t try_write(std::span<const asio::const_buffer> buffers, std::error_code& ec) override;
  void shutdown_receive() override;
  void close() override;
  std::string peer() const override { return peer_; }
  std::unique_ptr<TlsStream> start_tls(std::shared_ptr<const TlsCredentials> creds) override;
  asio::generic::stream_protocol::socket& socket() { return socket_; }

 private:
  asio::generic::stream_protocol::socket socket_;
  std::string peer_;
};

// Standard input for reading and standard output for writing (--stdin mode).
class StdioStream final : public Stream {
 public:
  StdioStream(const asio::any_io_executor& executor, int in_fd, int out_fd);
  asio::awaitable<std::size_t> async_read_some(asio::mutable_buffer buffer,
                                               std::error_code& ec) override;
  asio::awaitable<void> async_write_all(std::span<const asio::const_buffer> buffers,
                                        std::error_code& ec) override;
  void shutdown_receive() override;
  void close() override;
  std::string peer() const override { return "stdio"; }

 private:
  asio::posix::stream_descriptor in_;
  asio::posix::stream_descriptor out_;
};

}  // namespace fleeced::server

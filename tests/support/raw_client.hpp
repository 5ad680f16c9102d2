// SPDX-License-Identifier: MIT
// RawClient: a small blocking NBD client that speaks bytes over a connected
// socket (one end of a socketpair, a unix socket), for server tests. It uses
// the encoders and decoders of protocol/codec.hpp, so a test states exactly
// what goes on the wire. Every read and write is bounded by a timeout (poll):
// a server that stops answering makes the test fail with RawClientError
// instead of hanging. Header-only, no Asio. One thread at a time.
#pragma once

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include "protocol/codec.hpp"
#include "protocol/nbd.hpp"

namespace fleeced::test {

using Bytes = std::vector<std::byte>;

// Thrown on timeout, EOF or a malformed reply; GoogleTest reports it as a failure.
class RawClientError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// ---- Payload builders and readers for tests ----

inline void put_be16(Bytes& out, uint16_t v) {
  std::byte b[2];
  protocol::store_be16(b, v);
  out.insert(out.end(), b, b + 2);
}

inline void put_be32(Bytes& out, uint32_t v) {
  std::byte b[4];
  protocol::store_be32(b, v);
  out.insert(out.end(), b, b + 4);
}

inline void put_be64(Bytes& out, uint64_t v) {
  std::byte b[8];
  protocol::store_be64(b, v);
  out.insert(out.end(), b, b + 8);
}

inline void put_text(Bytes& out, std::string_view s) {
  for (char c : s) out.push_back(static_cast<std::byte>(c));
}

inline Bytes to_bytes(std::string_view s) {
  Bytes out;
  put_text(out, s);
  return out;
}

inline std::string to_text(std::span<const std::byte> in) {
  std::string out;
  out.reserve(in.size());
  for (std::byte b : in) out.push_back(static_cast<char>(b));
  return out;
}

// NBD_OPT_INFO / NBD_OPT_GO payload.
inline Bytes info_payload(std::string_view name, std::initializer_list<uint16_t> types = {}) {
  Bytes out;
  put_be32(out, static_cast<uint32_t>(name.size()));
  put_text(out, name);
  put_be16(out, static_cast<uint16_t>(types.size()));
  for (uint16_t t : types) put_be16(out, t);
  return out;
}

// NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT payload.
inline Bytes meta_context_payload(std::string_view name,
                                  std::initializer_list<std::string_view> queries = {}) {
  Bytes out;
  put_be32(out, static_cast<uint32_t>(name.size()));
  put_text(out, name);
  put_be32(out, static_cast<uint32_t>(queries.size()));
  for (std::string_view q : queries) {
    put_be32(out, static_cast<uint32_t>(q.size()));
    put_text(out, q);
  }
  return out;
}

// A pattern that differs at every offset, so misplaced data shows.
inline Bytes pattern(std::size_t length, uint8_t seed) {
  Bytes out(length);
  for (std::size_t i = 0; i < length; ++i) {
    out[i] = static_cast<std::byte>((i * 31 + seed + (i >> 8)) & 0xff);
  }
  return out;
}

class RawClient {
 public:
  struct OptionReply {
    protocol::OptionReplyHeader header;
    Bytes payload;
    protocol::OptionReply type() const { return static_cast<protocol::OptionReply>(header.type); }
    std::string text() const { return to_text(payload); }
  };
  struct Chunk {
    protocol::ChunkHeader header;
    Bytes payload;
    bool done() const { return header.flags & protocol::kReplyFlagDone; }
    protocol::Chunk type() const { return static_cast<protocol::Chunk>(header.type); }
  };

  // Takes ownership of `fd` (made non-blocking).
  explicit RawClient(int fd, std::chrono::milliseconds timeout = std::chrono::seconds(5))
      : fd_(fd), timeout_(timeout) {
    int flags = ::fcntl(fd_, F_GETFL);
    ::fcntl(fd_, F_SETFL, flags | O_NONBLOCK);
  }
  ~RawClient() { close(); }
  RawClient(const RawClient&) = delete;
  RawClient& operator=(const RawClient&) = delete;

  int fd() const { return fd_; }
  std::chrono::milliseconds timeout() const { return timeout_; }
  void close() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }
  void shutdown_write() { ::shutdown(fd_, SHUT_WR); }

  // ---- Raw bytes ----

  void write_all(std::span<const std::byte> data) {
    const auto deadline = std::chrono::steady_clock::now() + timeout_;
    std::size_t done = 0;
    while (done < data.size()) {
      ssize_t n = ::send(fd_, data.data() + done, data.size() - done, MSG_NOSIGNAL);
      if (n > 0) {
        done += static_cast<std::size_t>(n);
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        wait_for(POLLOUT, deadline, "write");
        continue;
      }
      throw RawClientError("write failed after " + std::to_string(done) + " of " +
                           std::to_string(data.size()) + " bytes: " + std::strerror(errno));
    }
  }

  void read_exact(std::span<std::byte> out) {
    const auto deadline = std::chrono::steady_clock::now() + timeout_;
    std::size_t done = 0;
    while (done < out.size()) {
      ssize_t n = ::recv(fd_, out.data() + done, out.size() - done, 0);
      if (n > 0) {
        done += static_cast<std::size_t>(n);
        continue;
      }
      if (n == 0) {
        throw RawClientError("EOF after " + std::to_string(done) + " of " +
                             std::to_string(out.size()) + " bytes");
      }
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        wait_for(POLLIN, deadline, "read of " + std::to_string(out.size()) + " bytes");
        continue;
      }
      throw RawClientError("read failed after " + std::to_string(done) + " of " +
                           std::to_string(out.size()) + " bytes: " + std::strerror(errno));
    }
  }

  Bytes read_exact(std::size_t n) {
    Bytes out(n);
    read_exact(std::span(out));
    return out;
  }

  // Succeeds when the server closes the connection (EOF or reset) within the
  // timeout, without sending anything more first.
  ::testing::AssertionResult expect_closed() {
    const auto deadline = std::chrono::steady_clock::now() + timeout_;
    for (;;) {
      std::byte b[256];
      ssize_t n = ::recv(fd_, b, sizeof b, 0);
      if (n == 0) return ::testing::AssertionSuccess() << "EOF";
      if (n > 0) {
        return ::testing::AssertionFailure()
               << "expected the connection to close, got " << n << " more bytes";
      }
      if (errno == ECONNRESET || errno == EPIPE) return ::testing::AssertionSuccess() << "reset";
      if (errno == EINTR) continue;
      if (errno != EAGAIN && errno != EWOULDBLOCK) {
        return ::testing::AssertionFailure() << "recv failed: " << std::strerror(errno);
      }
      if (!poll_once(POLLIN, deadline)) {
        return ::testing::AssertionFailure()
               << "connection still open after " << timeout_.count() << " ms";
      }
    }
  }

  // ---- Handshake ----

  uint16_t read_greeting() {
    Bytes g = read_exact(protocol::kGreetingSize);
    uint16_t flags = 0;
    if (protocol::decode_greeting(g, flags)) throw RawClientError("bad greeting magic");
    return flags;
  }

  void send_client_flags(uint32_t flags) {
    std::byte b[protocol::kClientFlagsSize];
    (void)protocol::encode_client_flags(b, flags);
    write_all(b);
  }

  void send_option(uint32_t option, std::span<const std::byte> payload = {}) {
    send_option_header(option, static_cast<uint32_t>(payload.size()));
    write_all(payload);
  }
  void send_option(protocol::Option option, std::span<const std::byte> payload = {}) {
    send_option(static_cast<uint32_t>(option), payload);
  }
  // Only the header: the length may disagree with what follows.
  void send_option_header(uint32_t option, uint32_t length) {
    std::byte h[protocol::kOptionHeaderSize];
    (void)protocol::encode_option_header(h, protocol::OptionHeader{option, length});
    write_all(h);
  }

  OptionReply read_option_reply() {
    OptionReply r;
    Bytes h = read_exact(protocol::kOptionReplyHeaderSize);
    if (protocol::decode_option_reply_header(h, r.header)) {
      throw RawClientError("bad option reply magic");
    }
    if (r.header.length > (1u << 20)) {
      throw RawClientError("option reply length " + std::to_string(r.header.length));
    }
    r.payload = read_exact(r.header.length);
    return r;
  }

  // ---- Transmission ----

  void send_request(const protocol::RequestHeader& h, std::span<const std::byte> payload = {}) {
    std::byte b[protocol::kRequestHeaderSize];
    (void)protocol::encode_request_header(b, h);
    write_all(b);
    write_all(payload);
  }

  protocol::SimpleReply read_simple_reply() {
    Bytes b = read_exact(protocol::kSimpleReplyHeaderSize);
    protocol::SimpleReply r;
    if (protocol::decode_simple_reply(b, r)) throw RawClientError("bad simple reply magic");
    return r;
  }

  Chunk read_chunk() {
    Chunk c;
    Bytes b = read_exact(protocol::kChunkHeaderSize);
    if (protocol::decode_chunk_header(b, c.header)) throw RawClientError("bad chunk magic");
    if (c.header.length > (64u << 20)) {
      throw RawClientError("chunk length " + std::to_string(c.header.length));
    }
    c.payload = read_exact(c.header.length);
    return c;
  }

  // Reads the 4-byte magic that starts every transmission reply, leaving the
  // rest unread: kSimpleReplyMagic or kStructuredReplyMagic.
  uint32_t peek_reply_magic() {
    const auto deadline = std::chrono::steady_clock::now() + timeout_;
    for (;;) {
      std::byte b[4];
      ssize_t n = ::recv(fd_, b, sizeof b, MSG_PEEK);
      if (n == 4) return protocol::load_be32(b);
      if (n == 0) throw RawClientError("EOF while waiting for a reply");
      if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
        throw RawClientError(std::string("recv failed: ") + std::strerror(errno));
      }
      wait_for(POLLIN, deadline, "reply magic");
    }
  }

 private:
  bool poll_once(short events, std::chrono::steady_clock::time_point deadline) {
    for (;;) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
          deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0) return false;
      pollfd p{fd_, events, 0};
      int r = ::poll(&p, 1, static_cast<int>(left.count()));
      if (r > 0) return true;
      if (r < 0 && errno != EINTR) return true;  // let the caller see the error
    }
  }
  void wait_for(short events, std::chrono::steady_clock::time_point deadline,
                const std::string& what) {
    if (!poll_once(events, deadline)) {
      throw RawClientError("timed out after " + std::to_string(timeout_.count()) + " ms in " +
                           what);
    }
  }

  int fd_;
  std::chrono::milliseconds timeout_;
};

}  // namespace fleeced::test

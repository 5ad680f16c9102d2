// SPDX-License-Identifier: MIT
// TlsTunnel: the client end of a TLS session for server tests. It runs the
// OpenSSL client handshake on a connected socket (after the test read the
// server's STARTTLS ACK there) and then relays plaintext between the TLS
// session and a fresh socketpair, so the test keeps speaking NBD with a
// RawClient while the bytes on the real socket are TLS. One relay thread;
// closing the RawClient ends the session (close_notify), and the server
// closing ends the RawClient's stream (EOF). Header-only.
#pragma once

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <csignal>

#include <atomic>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <openssl/err.h>
#include <openssl/ssl.h>

#include "support/raw_client.hpp"

namespace fleeced::test {

// A client SSL_CTX offering one PSK identity (TLS 1.2 and 1.3).
class PskClientContext {
 public:
  PskClientContext(std::string identity, std::vector<unsigned char> key)
      : identity_(std::move(identity)),
        key_(std::move(key)),
        ctx_(SSL_CTX_new(TLS_client_method())) {
    SSL_CTX_set_min_proto_version(ctx_, TLS1_2_VERSION);
    SSL_CTX_set_ex_data(ctx_, index(), this);
    SSL_CTX_set_psk_client_callback(ctx_, &PskClientContext::callback);
    SSL_CTX_set_cipher_list(ctx_, "PSK-AES128-GCM-SHA256:DHE-PSK-AES128-GCM-SHA256");
  }
  ~PskClientContext() { SSL_CTX_free(ctx_); }
  PskClientContext(const PskClientContext&) = delete;
  PskClientContext& operator=(const PskClientContext&) = delete;
  SSL_CTX* get() const { return ctx_; }
  void set_max_version(int version) { SSL_CTX_set_max_proto_version(ctx_, version); }

 private:
  static int index() {
    static const int i = SSL_CTX_get_ex_new_index(0, nullptr, nullptr, nullptr, nullptr);
    return i;
  }
  static unsigned int callback(SSL* ssl, const char*, char* identity, unsigned int max_identity,
                               unsigned char* psk, unsigned int max_psk) {
    auto* self = static_cast<PskClientContext*>(SSL_CTX_get_ex_data(SSL_get_SSL_CTX(ssl), index()));
    if (self->identity_.size() + 1 > max_identity || self->key_.size() > max_psk) return 0;
    std::memcpy(identity, self->identity_.c_str(), self->identity_.size() + 1);
    std::memcpy(psk, self->key_.data(), self->key_.size());
    return static_cast<unsigned int>(self->key_.size());
  }

  std::string identity_;
  std::vector<unsigned char> key_;
  SSL_CTX* ctx_;
};

class TlsTunnel {
 public:
  // Handshakes as a client on `fd` (borrowed: the caller's RawClient keeps
  // owning it). Throws RawClientError if the handshake fails.
  TlsTunnel(int fd, SSL_CTX* ctx) : fd_(fd), ssl_(SSL_new(ctx)) {
    ::signal(SIGPIPE, SIG_IGN);  // OpenSSL writes to a socket the server may close
    ::fcntl(fd_, F_SETFL, ::fcntl(fd_, F_GETFL) & ~O_NONBLOCK);
    timeval tv{5, 0};  // a silent server fails the test instead of hanging it
    ::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    ::setsockopt(fd_, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    SSL_set_fd(ssl_, fd_);
    if (SSL_connect(ssl_) != 1) {
      unsigned long e = ERR_get_error();
      std::string why = e ? ERR_reason_error_string(e) : "connection closed";
      SSL_free(ssl_);
      throw RawClientError("TLS handshake failed: " + why);
    }
    int pair[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) != 0) {
      SSL_free(ssl_);
      throw RawClientError("socketpair failed");
    }
    local_ = pair[0];
    client_ = std::make_unique<RawClient>(pair[1]);
    thread_ = std::thread([this] { relay(); });
  }
  ~TlsTunnel() {
    client_->close();
    stop_ = true;
    if (thread_.joinable()) thread_.join();
    ::close(local_);
    SSL_free(ssl_);
  }
  TlsTunnel(const TlsTunnel&) = delete;
  TlsTunnel& operator=(const TlsTunnel&) = delete;

  // The plaintext side: speak NBD here.
  RawClient& client() { return *client_; }
  std::string cipher() const { return SSL_get_cipher_name(ssl_); }
  std::string version() const { return SSL_get_version(ssl_); }

 private:
  void relay() {
    std::vector<char> buf(1 << 16);
    while (!stop_) {
      pollfd p[2] = {{fd_, POLLIN, 0}, {local_, POLLIN, 0}};
      int ready = SSL_pending(ssl_) > 0 ? 1 : ::poll(p, 2, 100);
      if (ready < 0) break;
      if (SSL_pending(ssl_) > 0 || (p[0].revents & (POLLIN | POLLHUP | POLLERR))) {
        int n = SSL_read(ssl_, buf.data(), static_cast<int>(buf.size()));
        if (n <= 0) break;  // the server closed (or failed)
        if (!write_all(local_, buf.data(), static_cast<std::size_t>(n))) break;
      }
      if (p[1].revents & (POLLIN | POLLHUP | POLLERR)) {
        ssize_t n = ::read(local_, buf.data(), buf.size());
        if (n <= 0) {
          SSL_shutdown(ssl_);  // the test closed its client
          break;
        }
        if (SSL_write(ssl_, buf.data(), static_cast<int>(n)) != n) break;
      }
    }
    ::shutdown(local_, SHUT_RDWR);
  }
  static bool write_all(int fd, const char* data, std::size_t length) {
    while (length > 0) {
      ssize_t n = ::send(fd, data, length, MSG_NOSIGNAL);
      if (n <= 0) return false;
      data += n;
      length -= static_cast<std::size_t>(n);
    }
    return true;
  }

  int fd_;
  SSL* ssl_;
  int local_ = -1;
  std::unique_ptr<RawClient> client_;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

}  // namespace fleeced::test

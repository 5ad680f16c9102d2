// SPDX-License-Identifier: MIT
// TlsStream: the server end of a TLS session (OpenSSL) over a connection's
// socket, driven by Asio readiness waits; created by NBD_OPT_STARTTLS from
// the plain SocketStream. It keeps the credentials it started with alive, so
// a reload never disturbs a running session. Owned by one connection and
// used only on its executor; one read and one write may be in flight at once.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <openssl/ssl.h>
#include <boost/asio/generic/stream_protocol.hpp>

#include "server/stream.hpp"
#include "server/tls_credentials.hpp"

namespace fleeced::server {

class TlsStream final : public Stream {
 public:
  using Socket = asio::generic::stream_protocol::socket;
  TlsStream(Socket socket, TlsCredentialsPtr creds, std::string peer);
  ~TlsStream() override;
  TlsStream(const TlsStream&) = delete;
  TlsStream& operator=(const TlsStream&) = delete;

  // Before the handshake: ask for a client certificate signed by the CA and
  // fail without one, whatever the credentials' verify-peer says.
  void require_client_certificate();
  // The server side of the handshake. Errors: ec; handshake_error() says
  // why in words (unknown PSK identity, certificate not signed by the CA...).
  asio::awaitable<void> async_handshake(std::error_code& ec);
  std::string handshake_error() const;
  // After the handshake: the PSK user name, or the client certificate's
  // subject DN (RFC 4514); empty when the client showed no certificate.
  const std::string& identity() const { return identity_; }
  // "TLSv1.3 TLS_AES_128_GCM_SHA256", for logs.
  std::string session_description() const;
  const TlsCredentials& credentials() const { return *creds_; }

  asio::awaitable<std::size_t> async_read_some(asio::mutable_buffer buffer,
                                               std::error_code& ec) override;
  asio::awaitable<void> async_write_all(std::span<const asio::const_buffer> buffers,
                                        std::error_code& ec) override;
  void shutdown_receive() override;
  void close() override;
  std::string peer() const override { return peer_; }
  asio::awaitable<void> async_shutdown() override;

 private:
  static unsigned int psk_callback(SSL* ssl, const char* identity, unsigned char* psk,
                                   unsigned int max_psk_len);
  static int out_bio_write(BIO* bio, const char* data, int length);
  // Encrypts `length` bytes into out_ (never blocks). Errors: ec.
  void encrypt(const std::byte* data, std::size_t length, std::error_code& ec);
  // Sends everything in out_. Errors: ec (the connection is over).
  asio::awaitable<void> async_flush(std::error_code& ec);
  // Waits until the socket is readable. Errors: ec (closed, cancelled).
  asio::awaitable<void> async_wait_readable(std::error_code& ec);
  // The error of a failed SSL call, as the connection sees it.
  std::error_code ssl_error(int result);

  TlsCredentialsPtr creds_;  // immutable; outlives the SSL that points into it
  Socket socket_;
  SSL* ssl_ = nullptr;  // owned; reads the socket itself, writes into out_
  std::string peer_;
  std::string identity_;
  std::string refusal_;  // why the PSK callback said no
  std::error_code handshake_failure_;
  unsigned long handshake_ssl_error_ = 0;  // first OpenSSL error of a failed handshake
  std::vector<std::byte> staging_;         // small pieces gathered into one record
  std::vector<std::byte> out_;             // ciphertext not sent yet
  std::vector<std::byte> sending_;         // ciphertext being sent
  bool handshake_done_ = false;
  bool shut_down_ = false;
};

}  // namespace fleeced::server

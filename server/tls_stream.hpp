// SPDX-License-Identifier: MIT
// TlsStream: the server end of a TLS session over a connection's socket
// (OpenSSL through Asio's ssl::stream), created by NBD_OPT_STARTTLS from the
// plain SocketStream. It keeps the credentials it started with alive, so a
// reload never disturbs a running session. Owned by one connection and used
// only on its executor; one read and one write may be in flight at once.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <boost/asio/generic/stream_protocol.hpp>
#include <boost/asio/ssl/stream.hpp>

#include "server/stream.hpp"
#include "server/tls_credentials.hpp"

namespace fleeced::server {

class TlsStream final : public Stream {
 public:
  using Socket = asio::generic::stream_protocol::socket;
  TlsStream(Socket socket, TlsCredentialsPtr creds, std::string peer);
  ~TlsStream() override;

  // The server side of the handshake. Errors: ec; handshake_error() says
  // why in words (unknown PSK identity, certificate not signed by the CA...).
  asio::awaitable<void> async_handshake(std::error_code& ec);
  std::string handshake_error() const;
  // Before the handshake: ask for a client certificate signed by the CA and
  // fail without one, whatever the credentials' verify-peer says.
  void require_client_certificate();
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
  asio::awaitable<void> async_write_plain(const std::byte* data, std::size_t length,
                                          std::error_code& ec);
  asio::awaitable<void> async_flush_staging(std::error_code& ec);

  TlsCredentialsPtr creds_;  // immutable; outlives the SSL that points into it
  asio::ssl::stream<Socket> ssl_;
  SSL* native_;  // ssl_'s, for const accessors
  std::string peer_;
  std::string identity_;
  std::string refusal_;  // why the PSK callback said no
  boost::system::error_code handshake_failure_;
  std::vector<std::byte> staging_;  // small pieces gathered into one record
  bool handshake_done_ = false;
  bool shut_down_ = false;
};

}  // namespace fleeced::server

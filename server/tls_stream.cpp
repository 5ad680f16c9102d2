// SPDX-License-Identifier: MIT
// Design notes
// - Writes: OpenSSL turns each SSL_write into records of at most 16 KiB, and
//   Asio's engine sends each record with its own socket write. A batch of
//   replies is therefore cut into full records: small pieces (reply headers,
//   short replies) are copied into a record-sized staging buffer, and runs of
//   whole records inside a large piece (read data) go to SSL_write from where
//   they are, without a plaintext copy. A batch of 4 KiB read replies costs
//   one record per four replies instead of two records per reply.
// - Reads: SSL_read decrypts straight into the caller's buffer (the
//   connection's read buffer, or a WRITE payload for large payloads).
// - Shutdown sends close_notify without waiting for the client's (the NBD
//   session is over either way), bounded by a timer.
#include "server/tls_stream.hpp"

#include <algorithm>
#include <chrono>
#include <cstring>

#include <openssl/err.h>
#include <openssl/x509.h>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>

namespace fleeced::server {

namespace {

// Plaintext bytes per TLS record (the protocol's maximum).
constexpr std::size_t kRecordSize = 16384;
constexpr auto kShutdownTimeout = std::chrono::seconds(2);

// Slot on each SSL that points back at its TlsStream (Asio uses app data).
int stream_index() {
  static const int index = SSL_get_ex_new_index(0, nullptr, nullptr, nullptr, nullptr);
  return index;
}

SSL* new_ssl(const TlsCredentials& creds) {
  SSL* ssl = SSL_new(creds.native_context());
  if (!ssl) throw std::bad_alloc();
  return ssl;
}

std::string subject_dn(X509* cert) {
  BIO* bio = BIO_new(BIO_s_mem());
  if (!bio) return {};
  // RFC 4514 order and escaping, but UTF-8 kept as is (like GnuTLS, which
  // QEMU uses to print DNs for tls-authz).
  X509_NAME_print_ex(bio, X509_get_subject_name(cert), 0, XN_FLAG_RFC2253 & ~ASN1_STRFLGS_ESC_MSB);
  char* data = nullptr;
  long n = BIO_get_mem_data(bio, &data);
  std::string out(data, n > 0 ? static_cast<std::size_t>(n) : 0);
  BIO_free(bio);
  return out;
}

}  // namespace

TlsStream::TlsStream(Socket socket, TlsCredentialsPtr creds, std::string peer)
    : creds_(std::move(creds)),
      ssl_(std::move(socket), new_ssl(*creds_)),
      native_(ssl_.native_handle()),
      peer_(std::move(peer)) {
  SSL* ssl = native_;
  // Asio asks OpenSSL to free its record buffers whenever they are empty;
  // on a busy data path that is an allocation per record.
  SSL_clear_mode(ssl, SSL_MODE_RELEASE_BUFFERS);
  SSL_set_ex_data(ssl, stream_index(), this);
  if (creds_->options().kind == TlsCredsOptions::Kind::psk) {
    SSL_set_psk_server_callback(ssl, &TlsStream::psk_callback);
  }
  staging_.reserve(kRecordSize);
}

TlsStream::~TlsStream() { SSL_set_ex_data(native_, stream_index(), nullptr); }

unsigned int TlsStream::psk_callback(SSL* ssl, const char* identity, unsigned char* psk,
                                     unsigned int max_psk_len) {
  auto* self = static_cast<TlsStream*>(SSL_get_ex_data(ssl, stream_index()));
  if (!self || !identity) return 0;
  const std::vector<unsigned char>* key = self->creds_->psk_key(identity);
  if (!key) {
    self->refusal_ = "unknown PSK identity '" + std::string(identity) + "'";
    return 0;
  }
  if (key->size() > max_psk_len) {
    self->refusal_ = "PSK of '" + std::string(identity) + "' is too long";
    return 0;
  }
  std::memcpy(psk, key->data(), key->size());
  self->identity_ = identity;
  return static_cast<unsigned int>(key->size());
}

asio::awaitable<void> TlsStream::async_handshake(std::error_code& ec) {
  boost::system::error_code bec;
  ERR_clear_error();
  co_await ssl_.async_handshake(asio::ssl::stream_base::server,
                                asio::redirect_error(asio::use_awaitable, bec));
  ec = bec;
  if (ec) {
    handshake_failure_ = bec;
    co_return;
  }
  handshake_done_ = true;
  if (X509* cert = SSL_get0_peer_certificate(native_)) {
    identity_ = subject_dn(cert);
  }
}

void TlsStream::require_client_certificate() {
  SSL_set_verify(native_, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, nullptr);
}

std::string TlsStream::handshake_error() const {
  if (!refusal_.empty()) return refusal_;
  const boost::system::error_code& ec = handshake_failure_;
  const long verify = SSL_get_verify_result(native_);
  if (verify != X509_V_OK) {
    return std::string("client certificate rejected: ") + X509_verify_cert_error_string(verify);
  }
  if (ec == asio::ssl::error::stream_truncated || ec == asio::error::eof) {
    return "client closed the connection during the handshake";
  }
  if (ec.category() == asio::error::get_ssl_category()) {
    const char* reason = ERR_reason_error_string(static_cast<unsigned long>(ec.value()));
    std::string text = reason ? reason : ec.message();
    if (text == "binder does not verify") text += " (wrong PSK for '" + identity_ + "'?)";
    return text;
  }
  return ec.message();
}

std::string TlsStream::session_description() const {
  return std::string(SSL_get_version(native_)) + " " + SSL_get_cipher_name(native_);
}

asio::awaitable<std::size_t> TlsStream::async_read_some(asio::mutable_buffer buffer,
                                                        std::error_code& ec) {
  boost::system::error_code bec;
  std::size_t n =
      co_await ssl_.async_read_some(buffer, asio::redirect_error(asio::use_awaitable, bec));
  ec = bec;
  co_return n;
}

asio::awaitable<void> TlsStream::async_write_plain(const std::byte* data, std::size_t length,
                                                   std::error_code& ec) {
  boost::system::error_code bec;
  co_await asio::async_write(ssl_, asio::buffer(data, length),
                             asio::redirect_error(asio::use_awaitable, bec));
  ec = bec;
}

asio::awaitable<void> TlsStream::async_flush_staging(std::error_code& ec) {
  if (staging_.empty()) co_return;
  co_await async_write_plain(staging_.data(), staging_.size(), ec);
  staging_.clear();
}

asio::awaitable<void> TlsStream::async_write_all(std::span<const asio::const_buffer> buffers,
                                                 std::error_code& ec) {
  ec.clear();
  staging_.clear();
  for (const asio::const_buffer& b : buffers) {
    const auto* data = static_cast<const std::byte*>(b.data());
    std::size_t left = b.size();
    while (left > 0) {
      if (!staging_.empty() || left < kRecordSize) {
        // Fill the current record; send it once full.
        std::size_t take = std::min(left, kRecordSize - staging_.size());
        staging_.insert(staging_.end(), data, data + take);
        data += take;
        left -= take;
        if (staging_.size() == kRecordSize) {
          co_await async_flush_staging(ec);
          if (ec) co_return;
        }
        continue;
      }
      // Whole records straight from the caller's buffer.
      std::size_t whole = left - left % kRecordSize;
      co_await async_write_plain(data, whole, ec);
      if (ec) co_return;
      data += whole;
      left -= whole;
    }
  }
  co_await async_flush_staging(ec);
}

void TlsStream::shutdown_receive() {
  boost::system::error_code ignored;
  ssl_.next_layer().shutdown(asio::socket_base::shutdown_receive, ignored);
}

void TlsStream::close() {
  boost::system::error_code ignored;
  ssl_.next_layer().shutdown(asio::socket_base::shutdown_both, ignored);
  ssl_.next_layer().close(ignored);
}

asio::awaitable<void> TlsStream::async_shutdown() {
  if (!handshake_done_ || shut_down_ || !ssl_.next_layer().is_open()) co_return;
  shut_down_ = true;
  // Pretend the client's close_notify has arrived: SSL_shutdown then only
  // sends ours instead of waiting for an answer that may never come.
  SSL_set_shutdown(native_, SSL_RECEIVED_SHUTDOWN);
  asio::steady_timer timer(ssl_.get_executor());
  timer.expires_after(kShutdownTimeout);
  auto armed = std::make_shared<bool>(true);
  auto on_timeout = [this, armed](const boost::system::error_code& e) {
    if (!e && *armed) close();  // the client does not read: give up
  };
  timer.async_wait(on_timeout);
  boost::system::error_code ignored;
  co_await ssl_.async_shutdown(asio::redirect_error(asio::use_awaitable, ignored));
  *armed = false;
  timer.cancel();
}

}  // namespace fleeced::server

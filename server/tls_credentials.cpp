// SPDX-License-Identifier: MIT
// Design notes
// - One SSL_CTX per load. TLS 1.2 is the floor (the NBD spec's minimum);
//   TLS 1.3 is preferred. Cipher order puts AES-128-GCM first: AES-NI makes
//   it the cheapest AEAD, and it is the TLS 1.3 suite an external PSK with
//   SHA-256 (what GnuTLS clients use) must run with.
// - No session resumption (no tickets, no cache): NBD clients open few,
//   long connections, and a reload must not let an old session back in.
// - PSK: one server callback serves both TLS 1.2 and TLS 1.3 (OpenSSL builds
//   a TLS_AES_128_GCM_SHA256 session from it for 1.3), which is what libnbd
//   and QEMU (both GnuTLS) negotiate. TlsStream installs it per connection
//   and looks identities up in the credentials that connection started with.
#include "server/tls_credentials.hpp"

#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include "server/log.hpp"

namespace fleeced::server {

namespace {

constexpr const char* kTls13Suites =
    "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256";
constexpr const char* kX509Ciphers =
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
    "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384";
constexpr const char* kPskCiphers =
    "DHE-PSK-AES128-GCM-SHA256:DHE-PSK-AES256-GCM-SHA384:ECDHE-PSK-CHACHA20-POLY1305:"
    "DHE-PSK-CHACHA20-POLY1305:PSK-AES128-GCM-SHA256:PSK-AES256-GCM-SHA384";

// The most useful OpenSSL error on the queue (the last one), and clears it.
std::string openssl_error() {
  unsigned long code = 0, last = 0;
  while ((code = ERR_get_error()) != 0) last = code;
  if (last == 0) return "unknown error";
  const char* reason = ERR_reason_error_string(last);
  return reason ? reason : "error " + std::to_string(last);
}

// QEMU's wording for a credentials file that cannot be opened.
bool accessible(const std::string& path, std::string& error) {
  if (::access(path.c_str(), R_OK) == 0) return true;
  error = "Unable to access credentials " + path + ": " + std::strerror(errno);
  return false;
}

bool file_exists(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0;
}

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// Loads DIR/dh-params.pem if present (for DHE suites); otherwise OpenSSL's
// built-in groups sized to the certificate.
bool load_dh_params(SSL_CTX* ctx, const std::string& dir, std::string& error) {
  SSL_CTX_set_dh_auto(ctx, 1);
  const std::string path = dir + "/dh-params.pem";
  if (!file_exists(path)) return true;
  if (!accessible(path, error)) return false;
  BIO* bio = BIO_new_file(path.c_str(), "r");
  EVP_PKEY* params = bio ? PEM_read_bio_Parameters(bio, nullptr) : nullptr;
  BIO_free(bio);
  if (!params || SSL_CTX_set0_tmp_dh_pkey(ctx, params) != 1) {
    EVP_PKEY_free(params);
    error = "Cannot load DH parameters " + path + ": " + openssl_error();
    return false;
  }
  SSL_CTX_set_dh_auto(ctx, 0);
  return true;
}

}  // namespace

bool parse_psk_line(std::string_view line, std::string& identity, std::vector<unsigned char>& key) {
  auto colon = line.find(':');
  if (colon == std::string_view::npos || colon == 0) return false;
  std::string_view hex = line.substr(colon + 1);
  if (hex.empty() || hex.size() % 2 != 0) return false;
  key.clear();
  for (std::size_t i = 0; i < hex.size(); i += 2) {
    int hi = hex_value(hex[i]), lo = hex_value(hex[i + 1]);
    if (hi < 0 || lo < 0) return false;
    key.push_back(static_cast<unsigned char>(hi * 16 + lo));
  }
  identity = std::string(line.substr(0, colon));
  return true;
}

TlsCredentials::TlsCredentials(TlsCredsOptions options, SSL_CTX* ctx)
    : options_(std::move(options)), ctx_(ctx) {}

TlsCredentials::~TlsCredentials() { SSL_CTX_free(ctx_); }

std::shared_ptr<const TlsCredentials> TlsCredentials::load(const TlsCredsOptions& options,
                                                           std::string& error) {
  ERR_clear_error();
  SSL_CTX* ctx = SSL_CTX_new(TLS_server_method());
  if (!ctx) {
    error = "Cannot create a TLS context: " + openssl_error();
    return nullptr;
  }
  std::shared_ptr<TlsCredentials> creds(new TlsCredentials(options, ctx));
  SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
  SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_CIPHER_SERVER_PREFERENCE |
                               SSL_OP_NO_TICKET | SSL_OP_IGNORE_UNEXPECTED_EOF |
                               SSL_OP_NO_COMPRESSION);
  SSL_CTX_set_num_tickets(ctx, 0);
  SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
  // Big records in, no buffer release between records: the data path
  // reuses the same buffers for every record.
  SSL_CTX_clear_mode(ctx, SSL_MODE_RELEASE_BUFFERS);
  static const unsigned char kSessionContext[] = "fleeced";
  SSL_CTX_set_session_id_context(ctx, kSessionContext, sizeof kSessionContext - 1);
  if (SSL_CTX_set_ciphersuites(ctx, kTls13Suites) != 1) {
    error = "Cannot set TLS 1.3 cipher suites: " + openssl_error();
    return nullptr;
  }
  bool ok =
      options.kind == TlsCredsOptions::Kind::psk ? creds->load_psk(error) : creds->load_x509(error);
  if (!ok) return nullptr;
  return creds;
}

bool TlsCredentials::load_psk(std::string& error) {
  const std::string path = options_.dir + "/keys.psk";
  if (!accessible(path, error)) return false;
  std::ifstream in(path);
  if (!in) {
    error = "Unable to access credentials " + path + ": " + std::strerror(errno);
    return false;
  }
  std::string line;
  unsigned line_no = 0;
  while (std::getline(in, line)) {
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty() || line[0] == '#') continue;
    std::string identity;
    std::vector<unsigned char> key;
    if (!parse_psk_line(line, identity, key)) {
      error = "Malformed PSK entry at " + path + ":" + std::to_string(line_no) +
              " (expected username:hexkey)";
      return false;
    }
    if (key.size() > PSK_MAX_PSK_LEN || identity.size() > PSK_MAX_IDENTITY_LEN) {
      error = "PSK entry too long at " + path + ":" + std::to_string(line_no);
      return false;
    }
    psk_keys_.insert_or_assign(std::move(identity), std::move(key));
  }
  if (psk_keys_.empty()) {
    error = "No PSK identities in " + path;
    return false;
  }
  if (SSL_CTX_set_cipher_list(ctx_, kPskCiphers) != 1) {
    error = "Cannot set PSK cipher list: " + openssl_error();
    return false;
  }
  // TlsStream installs the PSK callback on each SSL: it knows the connection.
  return load_dh_params(ctx_, options_.dir, error);
}

bool TlsCredentials::load_x509(std::string& error) {
  const std::string ca = options_.dir + "/ca-cert.pem";
  const std::string cert = options_.dir + "/server-cert.pem";
  const std::string key = options_.dir + "/server-key.pem";
  const std::string crl = options_.dir + "/ca-crl.pem";
  for (const auto& path : {ca, cert, key}) {
    if (!accessible(path, error)) return false;
  }
  if (SSL_CTX_use_certificate_chain_file(ctx_, cert.c_str()) != 1) {
    error = "Cannot load certificate " + cert + ": " + openssl_error();
    return false;
  }
  if (SSL_CTX_use_PrivateKey_file(ctx_, key.c_str(), SSL_FILETYPE_PEM) != 1) {
    error = "Cannot load private key " + key + ": " + openssl_error();
    return false;
  }
  if (SSL_CTX_check_private_key(ctx_) != 1) {
    error = "Private key " + key + " does not match certificate " + cert;
    return false;
  }
  if (SSL_CTX_load_verify_locations(ctx_, ca.c_str(), nullptr) != 1) {
    error = "Cannot load CA certificate " + ca + ": " + openssl_error();
    return false;
  }
  if (file_exists(crl)) {
    X509_STORE* store = SSL_CTX_get_cert_store(ctx_);
    if (X509_STORE_load_file(store, crl.c_str()) != 1) {
      error = "Cannot load CRL " + crl + ": " + openssl_error();
      return false;
    }
    X509_STORE_set_flags(store, X509_V_FLAG_CRL_CHECK);
  }
  // Tells clients which CA to pick a certificate for, when one is asked for
  // (verify-peer, or per connection when an allow-list needs one).
  if (STACK_OF(X509_NAME)* names = SSL_load_client_CA_file(ca.c_str())) {
    SSL_CTX_set_client_CA_list(ctx_, names);
  }
  if (options_.verify_peer) {
    SSL_CTX_set_verify(ctx_, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, nullptr);
  } else {
    SSL_CTX_set_verify(ctx_, SSL_VERIFY_NONE, nullptr);
  }
  if (SSL_CTX_set_cipher_list(ctx_, kX509Ciphers) != 1) {
    error = "Cannot set cipher list: " + openssl_error();
    return false;
  }
  return load_dh_params(ctx_, options_.dir, error);
}

const std::vector<unsigned char>* TlsCredentials::psk_key(std::string_view identity) const {
  auto it = psk_keys_.find(identity);
  return it == psk_keys_.end() ? nullptr : &it->second;
}

std::string TlsCredentials::describe() const {
  if (options_.kind == TlsCredsOptions::Kind::psk) {
    const std::size_t n = psk_keys_.size();
    return "psk:" + options_.dir + " (" + std::to_string(n) +
           (n == 1 ? " identity)" : " identities)");
  }
  return "x509:" + options_.dir + (options_.verify_peer ? " verify-peer=on" : " verify-peer=off");
}

TlsCredentialsPtr TlsCredsHandle::get() const {
  std::lock_guard lock(mu_);
  return current_;
}

bool TlsCredsHandle::reload(std::string& error) {
  TlsCredentialsPtr fresh = TlsCredentials::load(options_, error);
  if (!fresh) return false;
  std::lock_guard lock(mu_);
  current_ = std::move(fresh);
  return true;
}

}  // namespace fleeced::server

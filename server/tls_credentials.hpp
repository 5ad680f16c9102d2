// SPDX-License-Identifier: MIT
// TLS credentials for the NBD server: loaded from a directory laid out as
// QEMU's tls-creds-psk (keys.psk) or tls-creds-x509 (ca-cert.pem,
// server-cert.pem, server-key.pem, optional ca-crl.pem and dh-params.pem)
// into an OpenSSL server context. TlsCredentials is immutable once loaded and
// shared by every connection that handshook with it; TlsCredsHandle is the
// named, reloadable slot that listeners hold (any thread may swap it).
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <openssl/ssl.h>

namespace fleeced::server {

class TlsAuthz;

// nbdkit's --tls values: off = STARTTLS is refused (NBD_REP_ERR_POLICY), on =
// offered but plaintext still served (SELECTIVETLS with nothing TLS-only),
// require = every option but STARTTLS and ABORT needs TLS first (FORCEDTLS;
// what QEMU does when it has tls-creds).
enum class TlsMode { off, on, require };

struct TlsCredsOptions {
  enum class Kind { psk, x509 };
  Kind kind = Kind::psk;
  std::string dir;
  bool verify_peer = false;  // x509: a client certificate signed by the CA is required
};

class TlsCredentials {
 public:
  // Reads the files of options.dir and builds the server context.
  // Errors: false with `error` set to one line naming the file
  // ("Unable to access credentials DIR/keys.psk: No such file or directory").
  static std::shared_ptr<const TlsCredentials> load(const TlsCredsOptions& options,
                                                    std::string& error);
  ~TlsCredentials();
  TlsCredentials(const TlsCredentials&) = delete;
  TlsCredentials& operator=(const TlsCredentials&) = delete;

  const TlsCredsOptions& options() const { return options_; }
  // For SSL_new; the context must not be changed. Thread: any.
  SSL_CTX* native_context() const { return ctx_; }
  // PSK: the key of `identity`, or null if keys.psk does not list it.
  const std::vector<unsigned char>* psk_key(std::string_view identity) const;
  std::size_t psk_identities() const { return psk_keys_.size(); }
  // "psk:DIR (2 identities)" or "x509:DIR verify-peer=on", for logs.
  std::string describe() const;

 private:
  TlsCredentials(TlsCredsOptions options, SSL_CTX* ctx);
  bool load_psk(std::string& error);
  bool load_x509(std::string& error);

  TlsCredsOptions options_;
  SSL_CTX* ctx_;  // owned
  std::map<std::string, std::vector<unsigned char>, std::less<>> psk_keys_;
};

using TlsCredentialsPtr = std::shared_ptr<const TlsCredentials>;

// Parses one keys.psk line ("user:hexkey", as psktool writes); false on a
// malformed line. Exposed for tests.
bool parse_psk_line(std::string_view line, std::string& identity, std::vector<unsigned char>& key);

// A credentials object that can be reloaded in place: connections take the
// current credentials when they start TLS and keep them for their lifetime,
// so a reload affects new handshakes only. Thread-safe.
class TlsCredsHandle {
 public:
  explicit TlsCredsHandle(TlsCredentialsPtr creds)
      : options_(creds->options()), current_(std::move(creds)) {}
  TlsCredentialsPtr get() const;
  const TlsCredsOptions& options() const { return options_; }
  // Reads the directory again; on failure the current credentials stay.
  bool reload(std::string& error);

 private:
  const TlsCredsOptions options_;  // immutable
  mutable std::mutex mu_;
  TlsCredentialsPtr current_;  // guarded by mu_; never null
};

// What a listener offers: the mode, the credentials and who may use them.
struct TlsPolicy {
  TlsMode mode = TlsMode::off;
  std::shared_ptr<TlsCredsHandle> creds;  // set unless mode is off
  std::shared_ptr<const TlsAuthz> authz;  // null: anyone the credentials admit
};

}  // namespace fleeced::server

// SPDX-License-Identifier: MIT
// TlsAuthz: who may use a TLS listener once the handshake succeeded, by the
// client's identity: its certificate's subject DN in RFC 4514 form
// ("CN=client,O=Example,C=GB", as QEMU prints it) or its PSK user name. The
// rules are QEMU's authz-list: checked in order, the first match decides,
// otherwise the default policy. Immutable once built; any thread.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace fleeced::server {

class TlsAuthz {
 public:
  struct Rule {
    std::string match;
    bool allow = true;
    bool glob = false;  // fnmatch pattern instead of an exact string
  };
  TlsAuthz(std::vector<Rule> rules, bool default_allow)
      : rules_(std::move(rules)), default_allow_(default_allow) {}

  bool allows(std::string_view identity) const;
  const std::vector<Rule>& rules() const { return rules_; }

  // Reads an allow-list file: one identity per line, exact match; blank
  // lines and lines starting with '#' are skipped; anyone else is denied.
  // Errors: null with `error` naming the file.
  static std::shared_ptr<const TlsAuthz> load_list_file(const std::string& path,
                                                        std::string& error);

 private:
  std::vector<Rule> rules_;
  bool default_allow_;
};

}  // namespace fleeced::server

// SPDX-License-Identifier: MIT
#include "server/tls_authz.hpp"

#include <fnmatch.h>

#include <cerrno>
#include <cstring>
#include <fstream>

namespace fleeced::server {

bool TlsAuthz::allows(std::string_view identity) const {
  const std::string id(identity);
  for (const Rule& r : rules_) {
    bool hit = r.glob ? ::fnmatch(r.match.c_str(), id.c_str(), 0) == 0 : r.match == id;
    if (hit) return r.allow;
  }
  return default_allow_;
}

std::shared_ptr<const TlsAuthz> TlsAuthz::load_list_file(const std::string& path,
                                                         std::string& error) {
  std::ifstream in(path);
  if (!in) {
    error = "Cannot read TLS authorization list " + path + ": " + std::strerror(errno);
    return nullptr;
  }
  std::vector<Rule> rules;
  std::string line;
  while (std::getline(in, line)) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    auto first = line.find_first_not_of(" \t");
    if (first == std::string::npos || line[first] == '#') continue;
    auto last = line.find_last_not_of(" \t");
    rules.push_back(Rule{line.substr(first, last - first + 1), true, false});
  }
  return std::make_shared<const TlsAuthz>(std::move(rules), false);
}

}  // namespace fleeced::server

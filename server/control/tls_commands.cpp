// SPDX-License-Identifier: MIT
// TLS objects on the control socket (shared control-api.md §3.11): object-add
// and object-del of tls-creds-psk, tls-creds-x509 and the authz-simple,
// authz-list and authz-listfile allow-lists; x-fleeced-tls-reload, which
// re-reads a credentials directory in place (rotation: new handshakes use
// the new files, sessions already up keep theirs); and the TLS policy that
// nbd-server-start builds from tls-creds and tls-authz. Error texts follow
// QEMU 7.2. Control thread only.
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>

#include "server/control/control_plane.hpp"
#include "server/log.hpp"
#include "server/tls_authz.hpp"
#include "server/tls_credentials.hpp"

namespace fleeced::server::control {

// Objects by id (QEMU's /objects container: one namespace for all types).
struct TlsObjects {
  struct Object {
    std::string qom_type;
    bool server_endpoint = false;
    std::shared_ptr<TlsCredsHandle> creds;  // tls-creds-* with endpoint "server"
    std::shared_ptr<const TlsAuthz> authz;  // authz-*
  };
  std::map<std::string, Object> by_id;
};

namespace {

bool is_creds(const TlsObjects::Object& o) { return o.qom_type.starts_with("tls-creds-"); }

// authz-list rules ({"match", "policy", "format"}); null with `err` set.
std::optional<std::vector<TlsAuthz::Rule>> parse_rules(const json::array& rules, QmpError& err) {
  std::vector<TlsAuthz::Rule> out;
  for (std::size_t i = 0; i < rules.size(); ++i) {
    const std::string prefix = "rules[" + std::to_string(i) + "].";
    if (!rules[i].is_object()) {
      err.desc = "Invalid parameter type for 'rules[" + std::to_string(i) + "]', expected: object";
      return std::nullopt;
    }
    Args r(&rules[i].as_object(), prefix);
    auto match = r.string("match", true);
    auto policy = r.enumeration("policy", {"deny", "allow"}, true);
    auto format = r.enumeration("format", {"exact", "glob"}, false);
    if (!r.finish()) {
      err = r.error();
      return std::nullopt;
    }
    out.push_back({*match, *policy == "allow", format.value_or("exact") == "glob"});
  }
  return out;
}

// An authz-list body: {"policy": "deny"|"allow", "rules": [...]}.
std::shared_ptr<const TlsAuthz> authz_from_list(Args& a, QmpError& err) {
  auto policy = a.enumeration("policy", {"deny", "allow"}, false);
  const json::array* rules = a.array("rules", false);
  if (!a.ok()) {
    err = a.error();
    return nullptr;
  }
  std::vector<TlsAuthz::Rule> parsed;
  if (rules) {
    auto r = parse_rules(*rules, err);
    if (!r) return nullptr;
    parsed = std::move(*r);
  }
  return std::make_shared<const TlsAuthz>(std::move(parsed), policy.value_or("deny") == "allow");
}

// authz-listfile: the same body as authz-list, as JSON in a file.
std::shared_ptr<const TlsAuthz> authz_from_file(const std::string& filename, QmpError& err) {
  std::ifstream in(filename);
  if (!in) {
    err.desc = "Unable to read '" + filename + "': " + std::strerror(errno);
    return nullptr;
  }
  std::stringstream text;
  text << in.rdbuf();
  boost::system::error_code ec;
  json::value v = json::parse(text.str(), ec);
  if (ec || !v.is_object()) {
    err.desc = "Unable to parse '" + filename + "': expected a JSON object";
    return nullptr;
  }
  Args body(&v.as_object());
  auto authz = authz_from_list(body, err);
  if (authz && !body.finish()) {
    err = body.error();
    return nullptr;
  }
  return authz;
}

}  // namespace

void ControlPlane::register_tls_commands(CommandTable& table) {
  if (!tls_objects_) tls_objects_ = std::make_shared<TlsObjects>();
  table.add("object-add", [this](Args& a, EventSink&) { return cmd_object_add(a); });
  table.add("object-del", [this](Args& a, EventSink&) { return cmd_object_del(a); });
  table.add("x-fleeced-tls-reload", [this](Args& a, EventSink&) { return cmd_tls_reload(a); });
}

CommandResult ControlPlane::cmd_object_add(Args& a) {
  auto type = a.enumeration(
      "qom-type",
      {"tls-creds-psk", "tls-creds-x509", "authz-simple", "authz-list", "authz-listfile"}, true);
  auto id = a.string("id", true);
  if (!a.ok()) return {json::object(), a.error()};
  TlsObjects::Object obj;
  obj.qom_type = *type;
  QmpError err;
  if (type->starts_with("tls-creds-")) {
    const bool x509 = *type == "tls-creds-x509";
    auto dir = a.string("dir", false);
    auto endpoint = a.enumeration("endpoint", {"client", "server"}, false);
    auto verify_peer = a.boolean("verify-peer", false);
    auto priority = a.string("priority", false);
    a.string("username", false);  // the client's user name: no meaning for a server
    a.boolean("loaded", false);
    std::optional<std::string> passwordid;
    if (x509) {
      a.boolean("sanity-check", false);
      passwordid = a.string("passwordid", false);
    }
    if (!a.finish()) return {json::object(), a.error()};
    if (passwordid) {
      return CommandResult::fail("passwordid is not supported: use an unencrypted server-key.pem");
    }
    if (!dir) return CommandResult::fail("Missing 'dir' property value");
    if (tls_objects_->by_id.count(*id)) {
      return CommandResult::fail("attempt to add duplicate property '" + *id +
                                 "' to object (type 'container')");
    }
    // QEMU's default endpoint is "client", and verify-peer defaults to true.
    obj.server_endpoint = endpoint.value_or("client") == "server";
    TlsCredsOptions options{x509 ? TlsCredsOptions::Kind::x509 : TlsCredsOptions::Kind::psk, *dir,
                            x509 && verify_peer.value_or(true)};
    if (obj.server_endpoint) {
      std::string error;
      TlsCredentialsPtr creds = TlsCredentials::load(options, error);
      if (!creds) return CommandResult::fail(error);
      obj.creds = std::make_shared<TlsCredsHandle>(creds);
      log().info("object-add: TLS credentials '{}': {}", *id, creds->describe());
    } else {
      // A client endpoint is only kept so that nbd-server-start can refuse it
      // as QEMU does; check its main file the way QEMU would.
      std::string path = *dir + (x509 ? "/ca-cert.pem" : "/keys.psk");
      if (::access(path.c_str(), R_OK) != 0) {
        return CommandResult::fail("Unable to access credentials " + path + ": " +
                                   std::strerror(errno));
      }
    }
    if (priority) log().warn("object-add: '{}': priority strings are ignored", *id);
  } else {
    if (*type == "authz-simple") {
      auto identity = a.string("identity", true);
      if (!a.finish()) return {json::object(), a.error()};
      obj.authz = std::make_shared<const TlsAuthz>(
          std::vector<TlsAuthz::Rule>{{*identity, true, false}}, false);
    } else if (*type == "authz-list") {
      obj.authz = authz_from_list(a, err);
      if (!obj.authz) return {json::object(), err};
      if (!a.finish()) return {json::object(), a.error()};
    } else {
      auto filename = a.string("filename", true);
      a.boolean("refresh", false);
      if (!a.finish()) return {json::object(), a.error()};
      obj.authz = authz_from_file(*filename, err);
      if (!obj.authz) return {json::object(), err};
    }
    if (tls_objects_->by_id.count(*id)) {
      return CommandResult::fail("attempt to add duplicate property '" + *id +
                                 "' to object (type 'container')");
    }
    log().info("object-add: {} '{}' with {} rule(s)", *type, *id, obj.authz->rules().size());
  }
  tls_objects_->by_id.emplace(*id, std::move(obj));
  return CommandResult::ok();
}

CommandResult ControlPlane::cmd_object_del(Args& a) {
  auto id = a.string("id", true);
  if (!a.finish()) return {json::object(), a.error()};
  auto it = tls_objects_->by_id.find(*id);
  if (it == tls_objects_->by_id.end()) return CommandResult::fail("object '" + *id + "' not found");
  // Like QEMU, a running NBD server keeps the credentials it started with.
  tls_objects_->by_id.erase(it);
  log().info("object-del: '{}'", *id);
  return CommandResult::ok();
}

CommandResult ControlPlane::cmd_tls_reload(Args& a) {
  auto id = a.string("id", true);
  if (!a.finish()) return {json::object(), a.error()};
  QmpError err;
  std::shared_ptr<TlsCredsHandle> creds = server_creds_or_error(*id, err);
  if (!creds) return {json::object(), err};
  std::string error;
  if (!creds->reload(error)) {
    log().error("x-fleeced-tls-reload: '{}' not reloaded (the old credentials stay): {}", *id,
                error);
    return CommandResult::fail(error);
  }
  log().info("x-fleeced-tls-reload: TLS credentials '{}' reloaded: {}", *id,
             creds->get()->describe());
  return CommandResult::ok();
}

std::shared_ptr<TlsCredsHandle> ControlPlane::server_creds_or_error(const std::string& id,
                                                                    QmpError& err) const {
  auto it = tls_objects_->by_id.find(id);
  if (it == tls_objects_->by_id.end()) {
    err.desc = "No TLS credentials with id '" + id + "'";
    return nullptr;
  }
  if (!is_creds(it->second)) {
    err.desc = "Object with id '" + id + "' is not TLS credentials";
    return nullptr;
  }
  if (!it->second.server_endpoint) {
    err.desc = "Expecting TLS credentials with a server endpoint";
    return nullptr;
  }
  return it->second.creds;
}

std::optional<QmpError> ControlPlane::tls_policy(const std::optional<std::string>& creds_id,
                                                 const std::optional<std::string>& authz_id,
                                                 std::shared_ptr<const TlsPolicy>& out) const {
  out.reset();
  if (!creds_id) {
    if (authz_id) return QmpError{"GenericError", "tls-authz is not supported without tls-creds"};
    return std::nullopt;
  }
  QmpError err;
  auto policy = std::make_shared<TlsPolicy>();
  policy->mode = TlsMode::require;  // QEMU with tls-creds: FORCEDTLS
  policy->creds = server_creds_or_error(*creds_id, err);
  if (!policy->creds) return err;
  if (authz_id) {
    // QEMU looks the object up per connection and refuses everyone while it
    // is missing; fleeced checks once, here.
    auto it = tls_objects_->by_id.find(*authz_id);
    if (it == tls_objects_->by_id.end() || !it->second.authz) {
      return QmpError{"GenericError", "No authorization object with id '" + *authz_id + "'"};
    }
    policy->authz = it->second.authz;
  }
  out = std::move(policy);
  return std::nullopt;
}

void ControlPlane::reload_tls_objects() {
  if (!tls_objects_) return;
  for (auto& [id, obj] : tls_objects_->by_id) {
    if (!obj.creds) continue;
    std::string error;
    if (obj.creds->reload(error)) {
      log().info("TLS credentials '{}' reloaded: {}", id, obj.creds->get()->describe());
    } else {
      log().error("TLS credentials '{}' not reloaded (the old ones stay): {}", id, error);
    }
  }
}

}  // namespace fleeced::server::control

// SPDX-License-Identifier: MIT
#include "server/options.hpp"

#include <charconv>
#include <set>

namespace fleeced::server {

namespace {

// Splits on single commas; ",," stands for a literal comma.
std::vector<std::string> split_options(std::string_view text) {
  std::vector<std::string> parts(1);
  for (std::size_t i = 0; i < text.size(); ++i) {
    if (text[i] == ',') {
      if (i + 1 < text.size() && text[i + 1] == ',') {
        parts.back() += ',';
        ++i;
      } else {
        parts.emplace_back();
      }
    } else {
      parts.back() += text[i];
    }
  }
  return parts;
}

bool parse_bool(std::string_view key, std::string_view value, bool& out, std::string& error) {
  if (value == "on" || value == "true" || value == "yes" || value == "1") {
    out = true;
    return true;
  }
  if (value == "off" || value == "false" || value == "no" || value == "0") {
    out = false;
    return true;
  }
  error = "bad value '" + std::string(value) + "' for " + std::string(key) + " (use on or off)";
  return false;
}

bool parse_unsigned(std::string_view option, std::string_view text, unsigned max, unsigned& out,
                    std::string& error) {
  unsigned value = 0;
  auto [ptr, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc() || ptr != text.data() + text.size() || value > max) {
    error = std::string(option) + " expects a number from 0 to " + std::to_string(max) + ", got '" +
            std::string(text) + "'";
    return false;
  }
  out = value;
  return true;
}

}  // namespace

bool parse_export_spec(std::string_view text, ExportSpec& out, std::string& error) {
  out = ExportSpec{};
  bool have_name = false;
  std::set<std::string> seen;
  for (const std::string& part : split_options(text)) {
    auto eq = part.find('=');
    if (eq == std::string::npos) {
      error = "--export: expected key=value, got '" + part + "'";
      return false;
    }
    std::string key = part.substr(0, eq);
    std::string value = part.substr(eq + 1);
    if (!seen.insert(key).second) {
      error = "--export: '" + key + "' given twice";
      return false;
    }
    if (key == "name") {
      out.name = value;
      have_name = true;
    } else if (key == "file") {
      out.file = value;
    } else if (key == "description") {
      out.description = value;
    } else if (key == "writable") {
      if (!parse_bool("writable", value, out.writable, error)) return false;
    } else if (key == "direct") {
      if (!parse_bool("direct", value, out.direct, error)) return false;
    } else if (key == "discard") {
      if (!parse_bool("discard", value, out.discard, error)) return false;
    } else {
      error = "--export: unknown key '" + key + "'";
      return false;
    }
  }
  if (!have_name) {
    error = "--export: name= is required";
    return false;
  }
  if (out.name.size() > 4096 || out.description.size() > 4096) {
    error = "--export: name and description must be at most 4096 bytes";
    return false;
  }
  if (out.file.empty()) {
    error = "--export: file= is required";
    return false;
  }
  return true;
}

bool parse_tls_creds(std::string_view text, TlsCredsOptions& out, std::string& error) {
  out = TlsCredsOptions{};
  std::string_view rest;
  if (text.starts_with("psk:")) {
    out.kind = TlsCredsOptions::Kind::psk;
    rest = text.substr(4);
  } else if (text.starts_with("x509:")) {
    out.kind = TlsCredsOptions::Kind::x509;
    rest = text.substr(5);
  } else {
    error =
        "--tls-creds expects psk:DIR or x509:DIR[,verify-peer=on], got '" + std::string(text) + "'";
    return false;
  }
  std::vector<std::string> parts = split_options(rest);
  out.dir = parts[0];
  if (out.dir.empty()) {
    error = "--tls-creds: the credentials directory is missing";
    return false;
  }
  for (std::size_t i = 1; i < parts.size(); ++i) {
    const std::string& part = parts[i];
    auto eq = part.find('=');
    std::string key = part.substr(0, eq);
    if (key != "verify-peer" || eq == std::string::npos) {
      error = "--tls-creds: unknown option '" + part + "' (only verify-peer=on|off)";
      return false;
    }
    if (out.kind != TlsCredsOptions::Kind::x509) {
      error = "--tls-creds: verify-peer applies to x509 credentials only";
      return false;
    }
    if (!parse_bool("verify-peer", part.substr(eq + 1), out.verify_peer, error)) return false;
  }
  return true;
}

bool parse_command_line(const std::vector<std::string>& args, CommandLine& out,
                        std::string& error) {
  out = CommandLine{};
  std::optional<TlsMode> tls_mode;
  for (std::size_t i = 0; i < args.size(); ++i) {
    std::string arg = args[i];
    std::string value;
    bool has_inline = false;
    if (arg.starts_with("--")) {
      auto eq = arg.find('=');
      if (eq != std::string::npos) {
        value = arg.substr(eq + 1);
        arg = arg.substr(0, eq);
        has_inline = true;
      }
    }
    auto need_value = [&]() -> bool {
      if (has_inline) return true;
      if (i + 1 >= args.size()) {
        error = arg + " needs a value";
        return false;
      }
      value = args[++i];
      return true;
    };
    auto no_value = [&]() -> bool {
      if (has_inline) {
        error = arg + " takes no value";
        return false;
      }
      return true;
    };
    if (arg == "--help" || arg == "-h") {
      if (!no_value()) return false;
      out.help = true;
    } else if (arg == "--version" || arg == "-V") {
      if (!no_value()) return false;
      out.version = true;
    } else if (arg == "--stdin") {
      if (!no_value()) return false;
      out.stdin_mode = true;
    } else if (arg == "--export") {
      if (!need_value()) return false;
      ExportSpec spec;
      if (!parse_export_spec(value, spec, error)) return false;
      for (const auto& e : out.exports) {
        if (e.name == spec.name) {
          error = "--export: duplicate export name '" + spec.name + "'";
          return false;
        }
      }
      out.exports.push_back(std::move(spec));
    } else if (arg == "--listen") {
      if (!need_value()) return false;
      ListenAddress address;
      if (!parse_listen_address(value, address, error)) return false;
      out.listens.push_back(std::move(address));
    } else if (arg == "--threads") {
      if (!need_value() || !parse_unsigned(arg, value, 256, out.server.threads, error))
        return false;
    } else if (arg == "--io-threads") {
      if (!need_value() || !parse_unsigned(arg, value, 1024, out.server.io_threads, error))
        return false;
    } else if (arg == "--max-connections") {
      if (!need_value() || !parse_unsigned(arg, value, 1000000, out.server.max_connections, error))
        return false;
    } else if (arg == "--max-requests") {
      unsigned n = 0;
      if (!need_value() || !parse_unsigned(arg, value, 4096, n, error)) return false;
      if (n == 0) {
        error = "--max-requests must be at least 1";
        return false;
      }
      out.server.limits.max_requests = n;
    } else if (arg == "--handshake-timeout") {
      unsigned n = 0;
      if (!need_value() || !parse_unsigned(arg, value, 86400, n, error)) return false;
      out.server.limits.handshake_timeout = std::chrono::seconds(n);
    } else if (arg == "--log-level") {
      if (!need_value()) return false;
      static const std::set<std::string> levels{"trace", "debug", "info", "warn", "error", "off"};
      if (!levels.count(value)) {
        error = "--log-level must be one of trace, debug, info, warn, error, off";
        return false;
      }
      out.log_level = value;
    } else if (arg == "--qmp") {
      if (!need_value()) return false;
      if (!value.starts_with("unix:") || value.size() == 5) {
        error = "--qmp expects unix:PATH, got '" + value + "'";
        return false;
      }
      out.qmp_path = value.substr(5);
    } else if (arg == "--tls-creds") {
      if (!need_value()) return false;
      TlsCredsOptions creds;
      if (!parse_tls_creds(value, creds, error)) return false;
      out.tls_creds = std::move(creds);
    } else if (arg == "--tls") {
      if (!need_value()) return false;
      if (value == "off") {
        tls_mode = TlsMode::off;
      } else if (value == "on") {
        tls_mode = TlsMode::on;
      } else if (value == "require") {
        tls_mode = TlsMode::require;
      } else {
        error = "--tls must be require, on or off, got '" + value + "'";
        return false;
      }
    } else if (arg == "--tls-authz") {
      if (!need_value()) return false;
      out.tls_authz = value;
    } else if (arg == "--pidfile") {
      if (!need_value()) return false;
      out.pidfile = value;
    } else {
      error = "unknown argument '" + args[i] + "' (see --help)";
      return false;
    }
  }
  if (out.help || out.version) return true;
  if (out.exports.empty() && out.qmp_path.empty()) {
    error = "nothing to serve: give --export or --qmp (see --help)";
    return false;
  }
  if (out.stdin_mode && !out.listens.empty()) {
    error = "--stdin and --listen cannot be combined";
    return false;
  }
  if (!out.stdin_mode && out.listens.empty() && out.qmp_path.empty()) {
    error = "no --listen address given (see --help)";
    return false;
  }
  // Like QEMU and nbdkit: credentials alone mean TLS is required.
  out.tls_mode = tls_mode.value_or(out.tls_creds ? TlsMode::require : TlsMode::off);
  if (out.tls_mode != TlsMode::off && !out.tls_creds) {
    error = "--tls=" + std::string(out.tls_mode == TlsMode::on ? "on" : "require") +
            " needs --tls-creds";
    return false;
  }
  if (!out.tls_authz.empty() && (!out.tls_creds || out.tls_mode == TlsMode::off)) {
    error = "--tls-authz needs --tls-creds";
    return false;
  }
  if (out.stdin_mode && out.tls_mode != TlsMode::off) {
    error = "--stdin cannot be combined with TLS";
    return false;
  }
  return true;
}

std::string usage_text() {
  return R"(Usage: fleeced [OPTIONS]

Serve raw disk images over NBD.

Exports:
  --export name=NAME,file=PATH[,writable=on|off][,description=TEXT]
           [,direct=on|off][,discard=on|off]
                          export a raw image or block device (repeatable);
                          write ",," for a literal comma in a value
Listening:
  --listen unix:PATH      listen on a unix socket (repeatable)
  --listen tcp:HOST:PORT  listen on TCP, e.g. tcp:127.0.0.1:10809 (repeatable)
  --stdin                 serve one connection on stdin/stdout, then exit
Limits:
  --threads N             event-loop threads (default: number of CPUs)
  --io-threads N          threads for blocking I/O (default: max(4, 2 x CPUs))
  --max-connections N     concurrent connections, 0 = unlimited (default 100)
  --max-requests N        requests in flight per connection (default 64)
  --handshake-timeout S   close clients that have not finished negotiating
                          after S seconds, 0 = never (default 10)
TLS (for the --listen addresses):
  --tls-creds psk:DIR     PSK user names and keys from DIR/keys.psk (psktool)
  --tls-creds x509:DIR[,verify-peer=on]
                          X.509 from DIR/ca-cert.pem, server-cert.pem,
                          server-key.pem (QEMU's layout); verify-peer=on
                          requires a client certificate signed by the CA
  --tls=require|on|off    require TLS (the default with --tls-creds), offer
                          it but still serve plaintext, or refuse STARTTLS
  --tls-authz FILE        only these clients (one certificate DN, RFC 4514
                          form, or PSK user name per line) may use TLS
                          (SIGHUP reloads credentials, not this list)
Control:
  --qmp unix:PATH         QMP control socket (QEMU-compatible subset: block
                          nodes, dirty bitmaps, NBD server and exports, TLS
                          credential objects)
Other:
  --log-level LEVEL       trace, debug, info, warn, error or off (default info)
  --pidfile PATH          write the PID here once every listener is ready
  --help, --version

Example:
  fleeced --export name=disk0,file=disk.raw,writable=on --listen unix:/tmp/nbd.sock
  nbdinfo 'nbd+unix:///disk0?socket=/tmp/nbd.sock'
)";
}

}  // namespace fleeced::server

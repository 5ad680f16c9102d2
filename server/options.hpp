// SPDX-License-Identifier: MIT
// Command-line parsing for fleeced: pure (no I/O), so tests can feed argv
// vectors. Errors come back as one human-readable line.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "server/server.hpp"
#include "server/tls_credentials.hpp"

namespace fleeced::server {

struct ExportSpec {
  std::string name;
  std::string file;
  std::string description;
  bool writable = false;
  bool direct = false;
  bool discard = true;
};

struct CommandLine {
  std::vector<ExportSpec> exports;
  std::vector<ListenAddress> listens;
  bool stdin_mode = false;
  bool help = false;
  bool version = false;
  std::string log_level = "info";
  std::string pidfile;
  std::string qmp_path;                      // --qmp unix:PATH
  std::optional<TlsCredsOptions> tls_creds;  // --tls-creds psk:DIR | x509:DIR[,verify-peer=on]
  TlsMode tls_mode = TlsMode::off;           // --tls; require when --tls-creds is given alone
  std::string tls_authz;                     // --tls-authz FILE (allow-list)
  ServerOptions server;
};

// Parses "psk:DIR" or "x509:DIR[,verify-peer=on|off]" (",," for a comma in DIR).
bool parse_tls_creds(std::string_view text, TlsCredsOptions& out, std::string& error);

// Parses "name=N,file=F[,writable=on|off][,description=D][,direct=on|off][,discard=on|off]".
// A literal comma inside a value is written ",," (as in QEMU).
bool parse_export_spec(std::string_view text, ExportSpec& out, std::string& error);

// Parses argv (without argv[0]). Returns false with `error` set on bad input.
bool parse_command_line(const std::vector<std::string>& args, CommandLine& out, std::string& error);

// The --help text.
std::string usage_text();

}  // namespace fleeced::server

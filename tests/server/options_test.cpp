// SPDX-License-Identifier: MIT
// Command-line parsing (server/options.cpp) and listen addresses
// (parse_listen_address in server/server.cpp): every accepted form and every
// error, with the exact message where a user would read it.
#include "server/options.hpp"

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "server/server.hpp"

namespace fleeced::server {
namespace {

using Args = std::vector<std::string>;

// Parses args expecting failure; returns the error text.
std::string command_line_error(const Args& args) {
  CommandLine cl;
  std::string error;
  EXPECT_FALSE(parse_command_line(args, cl, error));
  return error;
}

std::string export_error(std::string_view text) {
  ExportSpec spec;
  std::string error;
  EXPECT_FALSE(parse_export_spec(text, spec, error));
  return error;
}

std::string listen_error(std::string_view text) {
  ListenAddress address;
  std::string error;
  EXPECT_FALSE(parse_listen_address(text, address, error)) << text;
  return error;
}

// ---- parse_export_spec ----

TEST(ParseExportSpec, NameAndFileWithDefaults) {
  ExportSpec spec;
  std::string error;
  ASSERT_TRUE(parse_export_spec("name=disk0,file=/tmp/disk.raw", spec, error)) << error;
  EXPECT_EQ(spec.name, "disk0");
  EXPECT_EQ(spec.file, "/tmp/disk.raw");
  EXPECT_EQ(spec.description, "");
  EXPECT_FALSE(spec.writable);
  EXPECT_FALSE(spec.direct);
  EXPECT_TRUE(spec.discard);
}

TEST(ParseExportSpec, EveryKeyInAnyOrder) {
  ExportSpec spec;
  std::string error;
  ASSERT_TRUE(parse_export_spec(
      "discard=off,direct=on,description=Main disk,writable=on,file=d.img,name=x", spec, error))
      << error;
  EXPECT_EQ(spec.name, "x");
  EXPECT_EQ(spec.file, "d.img");
  EXPECT_EQ(spec.description, "Main disk");
  EXPECT_TRUE(spec.writable);
  EXPECT_TRUE(spec.direct);
  EXPECT_FALSE(spec.discard);
}

TEST(ParseExportSpec, BooleanSpellings) {
  for (const char* on : {"on", "true", "yes", "1"}) {
    ExportSpec spec;
    std::string error;
    ASSERT_TRUE(parse_export_spec(std::string("name=a,file=f,writable=") + on, spec, error)) << on;
    EXPECT_TRUE(spec.writable) << on;
  }
  for (const char* off : {"off", "false", "no", "0"}) {
    ExportSpec spec;
    std::string error;
    ASSERT_TRUE(parse_export_spec(std::string("name=a,file=f,discard=") + off, spec, error)) << off;
    EXPECT_FALSE(spec.discard) << off;
  }
}

TEST(ParseExportSpec, DoubleCommaIsLiteralComma) {
  ExportSpec spec;
  std::string error;
  ASSERT_TRUE(parse_export_spec("name=a,,b,file=/p,,q,description=x,,,,y,,", spec, error)) << error;
  EXPECT_EQ(spec.name, "a,b");
  EXPECT_EQ(spec.file, "/p,q");
  EXPECT_EQ(spec.description, "x,,y,");
}

TEST(ParseExportSpec, OddCommaRunEndsValue) {
  // ",,," is a literal comma followed by a separator.
  ExportSpec spec;
  std::string error;
  ASSERT_TRUE(parse_export_spec("name=a,,,file=f", spec, error)) << error;
  EXPECT_EQ(spec.name, "a,");
  EXPECT_EQ(spec.file, "f");
}

TEST(ParseExportSpec, ValueMayContainEquals) {
  ExportSpec spec;
  std::string error;
  ASSERT_TRUE(parse_export_spec("name=a=b,file=f", spec, error)) << error;
  EXPECT_EQ(spec.name, "a=b");
}

TEST(ParseExportSpec, EmptyNameIsAllowed) {
  // NBD's default export is the empty name.
  ExportSpec spec;
  std::string error;
  ASSERT_TRUE(parse_export_spec("name=,file=f", spec, error)) << error;
  EXPECT_EQ(spec.name, "");
}

TEST(ParseExportSpec, RejectsMissingName) {
  EXPECT_EQ(export_error("file=f"), "--export: name= is required");
}

TEST(ParseExportSpec, RejectsMissingOrEmptyFile) {
  EXPECT_EQ(export_error("name=a"), "--export: file= is required");
  EXPECT_EQ(export_error("name=a,file="), "--export: file= is required");
}

TEST(ParseExportSpec, RejectsPartWithoutEquals) {
  EXPECT_EQ(export_error("name=a,file=f,readonly"), "--export: expected key=value, got 'readonly'");
  EXPECT_EQ(export_error(""), "--export: expected key=value, got ''");
  EXPECT_EQ(export_error("name=a,file=f,"), "--export: expected key=value, got ''");
}

TEST(ParseExportSpec, RejectsUnknownKey) {
  EXPECT_EQ(export_error("name=a,file=f,size=1G"), "--export: unknown key 'size'");
}

TEST(ParseExportSpec, RejectsRepeatedKey) {
  EXPECT_EQ(export_error("name=a,file=f,name=b"), "--export: 'name' given twice");
  EXPECT_EQ(export_error("name=a,file=f,writable=on,writable=off"),
            "--export: 'writable' given twice");
}

TEST(ParseExportSpec, RejectsBadBoolean) {
  EXPECT_EQ(export_error("name=a,file=f,writable=maybe"),
            "bad value 'maybe' for writable (use on or off)");
  EXPECT_EQ(export_error("name=a,file=f,direct="), "bad value '' for direct (use on or off)");
  EXPECT_EQ(export_error("name=a,file=f,discard=ON"), "bad value 'ON' for discard (use on or off)");
}

TEST(ParseExportSpec, NameAndDescriptionAtMost4096Bytes) {
  ExportSpec spec;
  std::string error;
  EXPECT_TRUE(parse_export_spec("name=" + std::string(4096, 'n') + ",file=f", spec, error));
  EXPECT_EQ(export_error("name=" + std::string(4097, 'n') + ",file=f"),
            "--export: name and description must be at most 4096 bytes");
  EXPECT_EQ(export_error("name=a,file=f,description=" + std::string(4097, 'd')),
            "--export: name and description must be at most 4096 bytes");
}

// ---- parse_command_line ----

TEST(ParseCommandLine, ExportAndUnixListen) {
  CommandLine cl;
  std::string error;
  ASSERT_TRUE(parse_command_line(
      {"--export", "name=a,file=/a.img,writable=on", "--listen", "unix:/tmp/nbd.sock"}, cl, error))
      << error;
  ASSERT_EQ(cl.exports.size(), 1u);
  EXPECT_EQ(cl.exports[0].name, "a");
  EXPECT_EQ(cl.exports[0].file, "/a.img");
  EXPECT_TRUE(cl.exports[0].writable);
  ASSERT_EQ(cl.listens.size(), 1u);
  EXPECT_EQ(cl.listens[0].kind, ListenAddress::Kind::unix_socket);
  EXPECT_EQ(cl.listens[0].path, "/tmp/nbd.sock");
  EXPECT_FALSE(cl.stdin_mode);
  EXPECT_FALSE(cl.help);
  EXPECT_FALSE(cl.version);
}

TEST(ParseCommandLine, Defaults) {
  CommandLine cl;
  std::string error;
  ASSERT_TRUE(parse_command_line({"--export", "name=a,file=f", "--stdin"}, cl, error)) << error;
  EXPECT_EQ(cl.log_level, "info");
  EXPECT_EQ(cl.pidfile, "");
  EXPECT_EQ(cl.server.threads, 0u);
  EXPECT_EQ(cl.server.io_threads, 0u);
  EXPECT_EQ(cl.server.max_connections, 100u);
  EXPECT_EQ(cl.server.limits.max_requests, 64u);
  EXPECT_EQ(cl.server.limits.handshake_timeout, std::chrono::seconds(10));
}

TEST(ParseCommandLine, InlineValuesAndRepeats) {
  CommandLine cl;
  std::string error;
  ASSERT_TRUE(parse_command_line({"--export=name=a,file=f1", "--export", "name=b,file=f2",
                                  "--listen=unix:/s", "--listen", "tcp:127.0.0.1:10809"},
                                 cl, error))
      << error;
  ASSERT_EQ(cl.exports.size(), 2u);
  EXPECT_EQ(cl.exports[0].name, "a");
  EXPECT_EQ(cl.exports[1].name, "b");
  ASSERT_EQ(cl.listens.size(), 2u);
  EXPECT_EQ(cl.listens[0].path, "/s");
  EXPECT_EQ(cl.listens[1].kind, ListenAddress::Kind::tcp);
  EXPECT_EQ(cl.listens[1].host, "127.0.0.1");
  EXPECT_EQ(cl.listens[1].port, 10809);
}

TEST(ParseCommandLine, EveryNumericOptionAndOthers) {
  CommandLine cl;
  std::string error;
  ASSERT_TRUE(parse_command_line(
      {"--export", "name=a,file=f", "--stdin", "--threads", "3", "--io-threads=7",
       "--max-connections", "0", "--max-requests", "4096", "--handshake-timeout", "0",
       "--log-level", "debug", "--pidfile", "/run/f.pid"},
      cl, error))
      << error;
  EXPECT_TRUE(cl.stdin_mode);
  EXPECT_EQ(cl.server.threads, 3u);
  EXPECT_EQ(cl.server.io_threads, 7u);
  EXPECT_EQ(cl.server.max_connections, 0u);
  EXPECT_EQ(cl.server.limits.max_requests, 4096u);
  EXPECT_EQ(cl.server.limits.handshake_timeout, std::chrono::seconds(0));
  EXPECT_EQ(cl.log_level, "debug");
  EXPECT_EQ(cl.pidfile, "/run/f.pid");
}

TEST(ParseCommandLine, NumericMaximaAccepted) {
  CommandLine cl;
  std::string error;
  ASSERT_TRUE(parse_command_line(
      {"--export", "name=a,file=f", "--stdin", "--threads", "256", "--io-threads", "1024",
       "--max-connections", "1000000", "--handshake-timeout", "86400"},
      cl, error))
      << error;
  EXPECT_EQ(cl.server.threads, 256u);
  EXPECT_EQ(cl.server.io_threads, 1024u);
  EXPECT_EQ(cl.server.max_connections, 1000000u);
  EXPECT_EQ(cl.server.limits.handshake_timeout, std::chrono::seconds(86400));
}

TEST(ParseCommandLine, HelpAndVersionNeedNothingElse) {
  for (const char* flag : {"--help", "-h"}) {
    CommandLine cl;
    std::string error;
    ASSERT_TRUE(parse_command_line({flag}, cl, error)) << flag << ": " << error;
    EXPECT_TRUE(cl.help);
  }
  for (const char* flag : {"--version", "-V"}) {
    CommandLine cl;
    std::string error;
    ASSERT_TRUE(parse_command_line({flag}, cl, error)) << flag << ": " << error;
    EXPECT_TRUE(cl.version);
  }
}

TEST(ParseCommandLine, ResetsOutputOnEveryCall) {
  CommandLine cl;
  std::string error;
  ASSERT_TRUE(parse_command_line({"--export", "name=a,file=f", "--stdin"}, cl, error));
  ASSERT_TRUE(parse_command_line({"--export", "name=b,file=g", "--listen", "unix:/s"}, cl, error));
  ASSERT_EQ(cl.exports.size(), 1u);
  EXPECT_EQ(cl.exports[0].name, "b");
  EXPECT_FALSE(cl.stdin_mode);
}

TEST(ParseCommandLine, RejectsUnknownArgument) {
  EXPECT_EQ(command_line_error({"--export", "name=a,file=f", "--stdin", "--bogus"}),
            "unknown argument '--bogus' (see --help)");
  EXPECT_EQ(command_line_error({"--bogus=1"}), "unknown argument '--bogus=1' (see --help)");
  EXPECT_EQ(command_line_error({"disk.img"}), "unknown argument 'disk.img' (see --help)");
  EXPECT_EQ(command_line_error({"-x"}), "unknown argument '-x' (see --help)");
}

TEST(ParseCommandLine, RejectsMissingValue) {
  for (const char* opt : {"--export", "--listen", "--threads", "--io-threads", "--max-connections",
                          "--max-requests", "--handshake-timeout", "--log-level", "--pidfile"}) {
    EXPECT_EQ(command_line_error({opt}), std::string(opt) + " needs a value");
  }
}

TEST(ParseCommandLine, RejectsValueOnFlag) {
  EXPECT_EQ(command_line_error({"--help=yes"}), "--help takes no value");
  EXPECT_EQ(command_line_error({"--version=1"}), "--version takes no value");
  EXPECT_EQ(command_line_error({"--export", "name=a,file=f", "--stdin=1"}),
            "--stdin takes no value");
}

TEST(ParseCommandLine, RejectsBadNumbers) {
  const Args base{"--export", "name=a,file=f", "--stdin"};
  auto with = [&](std::string opt, std::string value) {
    Args a = base;
    a.push_back(std::move(opt));
    a.push_back(std::move(value));
    return command_line_error(a);
  };
  EXPECT_EQ(with("--threads", "abc"), "--threads expects a number from 0 to 256, got 'abc'");
  EXPECT_EQ(with("--threads", "257"), "--threads expects a number from 0 to 256, got '257'");
  EXPECT_EQ(with("--threads", "-1"), "--threads expects a number from 0 to 256, got '-1'");
  EXPECT_EQ(with("--threads", "4x"), "--threads expects a number from 0 to 256, got '4x'");
  EXPECT_EQ(with("--threads", ""), "--threads expects a number from 0 to 256, got ''");
  EXPECT_EQ(with("--threads", " 4"), "--threads expects a number from 0 to 256, got ' 4'");
  EXPECT_EQ(with("--threads", "99999999999999999999"),
            "--threads expects a number from 0 to 256, got '99999999999999999999'");
  EXPECT_EQ(with("--io-threads", "1025"),
            "--io-threads expects a number from 0 to 1024, got '1025'");
  EXPECT_EQ(with("--max-connections", "1000001"),
            "--max-connections expects a number from 0 to 1000000, got '1000001'");
  EXPECT_EQ(with("--max-requests", "4097"),
            "--max-requests expects a number from 0 to 4096, got '4097'");
  EXPECT_EQ(with("--max-requests", "0"), "--max-requests must be at least 1");
  EXPECT_EQ(with("--handshake-timeout", "86401"),
            "--handshake-timeout expects a number from 0 to 86400, got '86401'");
  EXPECT_EQ(command_line_error({"--export", "name=a,file=f", "--stdin", "--threads=2.5"}),
            "--threads expects a number from 0 to 256, got '2.5'");
}

TEST(ParseCommandLine, RejectsBadLogLevel) {
  EXPECT_EQ(command_line_error({"--export", "name=a,file=f", "--stdin", "--log-level", "verbose"}),
            "--log-level must be one of trace, debug, info, warn, error, off");
}

TEST(ParseCommandLine, AcceptsEveryLogLevel) {
  for (const char* level : {"trace", "debug", "info", "warn", "error", "off"}) {
    CommandLine cl;
    std::string error;
    ASSERT_TRUE(parse_command_line({"--export", "name=a,file=f", "--stdin", "--log-level", level},
                                   cl, error))
        << level << ": " << error;
    EXPECT_EQ(cl.log_level, level);
  }
}

TEST(ParseCommandLine, RejectsDuplicateExportNames) {
  EXPECT_EQ(command_line_error({"--export", "name=a,file=f1", "--export", "name=a,file=f2",
                                "--listen", "unix:/s"}),
            "--export: duplicate export name 'a'");
}

TEST(ParseCommandLine, PassesExportSpecErrorsThrough) {
  EXPECT_EQ(command_line_error({"--export", "file=f", "--listen", "unix:/s"}),
            "--export: name= is required");
  EXPECT_EQ(command_line_error({"--export", "name=a", "--listen", "unix:/s"}),
            "--export: file= is required");
  EXPECT_EQ(command_line_error({"--export=", "--listen", "unix:/s"}),
            "--export: expected key=value, got ''");
}

TEST(ParseCommandLine, PassesListenErrorsThrough) {
  EXPECT_EQ(command_line_error({"--export", "name=a,file=f", "--listen", "tcp:host:99999"}),
            "bad TCP address 'tcp:host:99999'");
}

TEST(ParseCommandLine, RequiresAnExportOrQmp) {
  EXPECT_EQ(command_line_error({"--listen", "unix:/s"}),
            "nothing to serve: give --export or --qmp (see --help)");
  EXPECT_EQ(command_line_error({}), "nothing to serve: give --export or --qmp (see --help)");
}

TEST(ParseCommandLine, QmpAloneIsEnough) {
  CommandLine cl;
  std::string error;
  ASSERT_TRUE(parse_command_line({"--qmp", "unix:/run/fleeced.qmp"}, cl, error)) << error;
  EXPECT_EQ(cl.qmp_path, "/run/fleeced.qmp");
  EXPECT_TRUE(cl.exports.empty());
  EXPECT_TRUE(cl.listens.empty());
}

TEST(ParseCommandLine, QmpWithExportNeedsNoListen) {
  CommandLine cl;
  std::string error;
  ASSERT_TRUE(parse_command_line({"--export", "name=a,file=f", "--qmp=unix:q.sock"}, cl, error))
      << error;
  EXPECT_EQ(cl.qmp_path, "q.sock");
  EXPECT_EQ(cl.exports.size(), 1u);
}

TEST(ParseCommandLine, RejectsQmpWithoutUnixPath) {
  EXPECT_EQ(command_line_error({"--qmp", "tcp:h:1"}), "--qmp expects unix:PATH, got 'tcp:h:1'");
  EXPECT_EQ(command_line_error({"--qmp", "unix:"}), "--qmp expects unix:PATH, got 'unix:'");
  EXPECT_EQ(command_line_error({"--qmp", "/run/q"}), "--qmp expects unix:PATH, got '/run/q'");
  EXPECT_EQ(command_line_error({"--qmp"}), "--qmp needs a value");
}

TEST(ParseCommandLine, RequiresListenOrStdin) {
  EXPECT_EQ(command_line_error({"--export", "name=a,file=f"}),
            "no --listen address given (see --help)");
}

TEST(ParseCommandLine, RejectsStdinWithListen) {
  EXPECT_EQ(command_line_error({"--export", "name=a,file=f", "--stdin", "--listen", "unix:/s"}),
            "--stdin and --listen cannot be combined");
  EXPECT_EQ(command_line_error({"--listen", "unix:/s", "--export", "name=a,file=f", "--stdin"}),
            "--stdin and --listen cannot be combined");
}

// ---- TLS options ----

TEST(ParseTlsCreds, PskAndX509WithVerifyPeer) {
  TlsCredsOptions o;
  std::string error;
  ASSERT_TRUE(parse_tls_creds("psk:/etc/keys", o, error)) << error;
  EXPECT_EQ(o.kind, TlsCredsOptions::Kind::psk);
  EXPECT_EQ(o.dir, "/etc/keys");
  EXPECT_FALSE(o.verify_peer);
  ASSERT_TRUE(parse_tls_creds("x509:/pki,verify-peer=on", o, error)) << error;
  EXPECT_EQ(o.kind, TlsCredsOptions::Kind::x509);
  EXPECT_EQ(o.dir, "/pki");
  EXPECT_TRUE(o.verify_peer);
  ASSERT_TRUE(parse_tls_creds("x509:/a,,b", o, error)) << error;
  EXPECT_EQ(o.dir, "/a,b");
  EXPECT_FALSE(o.verify_peer);
}

TEST(ParseTlsCreds, RejectsBadForms) {
  TlsCredsOptions o;
  std::string error;
  EXPECT_FALSE(parse_tls_creds("/dir", o, error));
  EXPECT_EQ(error, "--tls-creds expects psk:DIR or x509:DIR[,verify-peer=on], got '/dir'");
  EXPECT_FALSE(parse_tls_creds("psk:", o, error));
  EXPECT_EQ(error, "--tls-creds: the credentials directory is missing");
  EXPECT_FALSE(parse_tls_creds("psk:/d,verify-peer=on", o, error));
  EXPECT_EQ(error, "--tls-creds: verify-peer applies to x509 credentials only");
  EXPECT_FALSE(parse_tls_creds("x509:/d,priority=NORMAL", o, error));
  EXPECT_EQ(error, "--tls-creds: unknown option 'priority=NORMAL' (only verify-peer=on|off)");
  EXPECT_FALSE(parse_tls_creds("x509:/d,verify-peer=maybe", o, error));
}

TEST(ParseCommandLine, TlsCredsAloneMeanRequire) {
  CommandLine cl;
  std::string error;
  ASSERT_TRUE(parse_command_line(
      {"--export", "name=a,file=f", "--listen", "unix:/s", "--tls-creds", "psk:/k"}, cl, error))
      << error;
  ASSERT_TRUE(cl.tls_creds);
  EXPECT_EQ(cl.tls_mode, TlsMode::require);
  ASSERT_TRUE(parse_command_line({"--export", "name=a,file=f", "--listen", "unix:/s",
                                  "--tls-creds=x509:/p", "--tls=on", "--tls-authz", "/allow"},
                                 cl, error))
      << error;
  EXPECT_EQ(cl.tls_mode, TlsMode::on);
  EXPECT_EQ(cl.tls_authz, "/allow");
  ASSERT_TRUE(parse_command_line(
      {"--export", "name=a,file=f", "--listen", "unix:/s", "--tls-creds=psk:/k", "--tls=off"}, cl,
      error))
      << error;
  EXPECT_EQ(cl.tls_mode, TlsMode::off);
  ASSERT_TRUE(parse_command_line({"--export", "name=a,file=f", "--listen", "unix:/s"}, cl, error));
  EXPECT_EQ(cl.tls_mode, TlsMode::off);
  EXPECT_FALSE(cl.tls_creds);
}

TEST(ParseCommandLine, RejectsInconsistentTls) {
  const Args base = {"--export", "name=a,file=f", "--listen", "unix:/s"};
  auto with = [&](std::initializer_list<std::string> extra) {
    Args a = base;
    a.insert(a.end(), extra);
    return a;
  };
  EXPECT_EQ(command_line_error(with({"--tls=require"})), "--tls=require needs --tls-creds");
  EXPECT_EQ(command_line_error(with({"--tls=on"})), "--tls=on needs --tls-creds");
  EXPECT_EQ(command_line_error(with({"--tls=sometimes", "--tls-creds=psk:/k"})),
            "--tls must be require, on or off, got 'sometimes'");
  EXPECT_EQ(command_line_error(with({"--tls-authz=/allow"})), "--tls-authz needs --tls-creds");
  EXPECT_EQ(command_line_error({"--export", "name=a,file=f", "--stdin", "--tls-creds=psk:/k"}),
            "--stdin cannot be combined with TLS");
}

TEST(UsageText, MentionsEveryOption) {
  const std::string text = usage_text();
  for (const char* opt :
       {"--export", "--listen", "--stdin", "--threads", "--io-threads", "--max-connections",
        "--max-requests", "--handshake-timeout", "--log-level", "--pidfile", "--qmp", "--help",
        "--version", "--tls-creds", "--tls=", "--tls-authz"}) {
    EXPECT_NE(text.find(opt), std::string::npos) << opt;
  }
}

// ---- parse_listen_address ----

TEST(ParseListenAddress, UnixSocket) {
  ListenAddress a;
  std::string error;
  ASSERT_TRUE(parse_listen_address("unix:/run/fleeced.sock", a, error)) << error;
  EXPECT_EQ(a.kind, ListenAddress::Kind::unix_socket);
  EXPECT_EQ(a.path, "/run/fleeced.sock");
  EXPECT_EQ(a.to_string(), "unix:/run/fleeced.sock");
}

TEST(ParseListenAddress, UnixPathLengthLimit) {
  // sun_path holds 108 bytes including the terminating NUL.
  ListenAddress a;
  std::string error;
  EXPECT_TRUE(parse_listen_address("unix:/" + std::string(106, 'p'), a, error)) << error;
  const std::string too_long = "/" + std::string(107, 'p');
  EXPECT_EQ(listen_error("unix:" + too_long), "unix socket path too long: " + too_long);
}

TEST(ParseListenAddress, RejectsEmptyUnixPath) {
  EXPECT_EQ(listen_error("unix:"), "unix: needs a socket path");
}

TEST(ParseListenAddress, TcpIpv4AndName) {
  ListenAddress a;
  std::string error;
  ASSERT_TRUE(parse_listen_address("tcp:127.0.0.1:10809", a, error)) << error;
  EXPECT_EQ(a.kind, ListenAddress::Kind::tcp);
  EXPECT_EQ(a.host, "127.0.0.1");
  EXPECT_EQ(a.port, 10809);
  EXPECT_EQ(a.to_string(), "tcp:127.0.0.1:10809");

  ASSERT_TRUE(parse_listen_address("tcp:localhost:0", a, error)) << error;
  EXPECT_EQ(a.host, "localhost");
  EXPECT_EQ(a.port, 0);
  ASSERT_TRUE(parse_listen_address("tcp:0.0.0.0:65535", a, error)) << error;
  EXPECT_EQ(a.port, 65535);
}

TEST(ParseListenAddress, TcpIpv6InBrackets) {
  ListenAddress a;
  std::string error;
  ASSERT_TRUE(parse_listen_address("tcp:[::1]:10809", a, error)) << error;
  EXPECT_EQ(a.kind, ListenAddress::Kind::tcp);
  EXPECT_EQ(a.host, "::1");
  EXPECT_EQ(a.port, 10809);
  EXPECT_EQ(a.to_string(), "tcp:[::1]:10809");

  ASSERT_TRUE(parse_listen_address("tcp:[fe80::1:2]:1", a, error)) << error;
  EXPECT_EQ(a.host, "fe80::1:2");
  EXPECT_EQ(a.port, 1);
}

TEST(ParseListenAddress, RejectsIpv6WithoutPort) {
  EXPECT_EQ(listen_error("tcp:[::1]"), "expected tcp:[ADDR]:PORT, got 'tcp:[::1]'");
  EXPECT_EQ(listen_error("tcp:[::1]10809"), "expected tcp:[ADDR]:PORT, got 'tcp:[::1]10809'");
  EXPECT_EQ(listen_error("tcp:[::1]:"), "bad TCP address 'tcp:[::1]:'");
  EXPECT_EQ(listen_error("tcp:[]:80"), "bad TCP address 'tcp:[]:80'");
}

TEST(ParseListenAddress, RejectsTcpWithoutPort) {
  EXPECT_EQ(listen_error("tcp:localhost"), "expected tcp:HOST:PORT, got 'tcp:localhost'");
  EXPECT_EQ(listen_error("tcp:"), "expected tcp:HOST:PORT, got 'tcp:'");
}

TEST(ParseListenAddress, RejectsBadPorts) {
  for (const char* text : {"tcp:h:65536", "tcp:h:", "tcp:h:12ab", "tcp:h:-1", "tcp:h:0x50",
                           "tcp:h:99999999999999999999", "tcp:[::1]:70000"}) {
    EXPECT_EQ(listen_error(text), "bad TCP address '" + std::string(text) + "'");
  }
}

TEST(ParseListenAddress, RejectsPortWithSignOrSpace) {
  // Every other number on the command line must be plain digits (from_chars);
  // the port goes through strtoul, which also takes a sign and leading
  // whitespace.
  for (const char* text : {"tcp:h:+80", "tcp:h: 80", "tcp:h:-0"}) {
    EXPECT_EQ(listen_error(text), "bad TCP address '" + std::string(text) + "'");
  }
}

TEST(ParseListenAddress, RejectsEmptyHost) {
  EXPECT_EQ(listen_error("tcp::10809"), "bad TCP address 'tcp::10809'");
}

TEST(ParseListenAddress, RejectsUnknownScheme) {
  EXPECT_EQ(listen_error("udp:h:1"), "listen address must start with unix: or tcp:, got 'udp:h:1'");
  EXPECT_EQ(listen_error("/tmp/sock"),
            "listen address must start with unix: or tcp:, got '/tmp/sock'");
  EXPECT_EQ(listen_error(""), "listen address must start with unix: or tcp:, got ''");
}

}  // namespace
}  // namespace fleeced::server

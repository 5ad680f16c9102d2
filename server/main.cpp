// SPDX-License-Identifier: MIT
// fleeced: parse the command line, open the exports, listen, run.
#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <iostream>

#include <spdlog/spdlog.h>

#include "server/control/control_plane.hpp"
#include "server/control/qmp_server.hpp"
#include "server/export_registry.hpp"
#include "server/log.hpp"
#include "server/options.hpp"
#include "server/server.hpp"
#include "server/tls_authz.hpp"

#ifndef FLEECED_VERSION
#define FLEECED_VERSION "0.0.0"
#endif

namespace {

using namespace fleeced;

int usage_error(const std::string& message) {
  std::fprintf(stderr, "fleeced: error: %s\n", message.c_str());
  return 2;
}

// The TLS policy of the --listen addresses, or null when TLS is off.
// Errors: null with `error` set.
std::shared_ptr<const server::TlsPolicy> command_line_tls(const server::CommandLine& cl,
                                                          std::string& error) {
  if (cl.tls_mode == server::TlsMode::off || !cl.tls_creds) return nullptr;
  auto creds = server::TlsCredentials::load(*cl.tls_creds, error);
  if (!creds) return nullptr;
  auto policy = std::make_shared<server::TlsPolicy>();
  policy->mode = cl.tls_mode;
  policy->creds = std::make_shared<server::TlsCredsHandle>(creds);
  if (!cl.tls_authz.empty()) {
    policy->authz = server::TlsAuthz::load_list_file(cl.tls_authz, error);
    if (!policy->authz) return nullptr;
  }
  return policy;
}

bool write_pidfile(const std::string& path) {
  std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp);
    f << ::getpid() << "\n";
    if (!f) return false;
  }
  return ::rename(tmp.c_str(), path.c_str()) == 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  server::CommandLine cl;
  std::string error;
  if (!server::parse_command_line(args, cl, error)) return usage_error(error);
  if (cl.help) {
    std::cout << server::usage_text();
    return 0;
  }
  if (cl.version) {
    std::cout << "fleeced " << FLEECED_VERSION << "\n";
    return 0;
  }
  spdlog::set_level(spdlog::level::from_str(cl.log_level));
  server::log().set_level(spdlog::level::from_str(cl.log_level));
  ::signal(SIGPIPE, SIG_IGN);

  std::shared_ptr<const server::TlsPolicy> tls = command_line_tls(cl, error);
  if (!tls && !error.empty()) {
    std::fprintf(stderr, "fleeced: error: %s\n", error.c_str());
    return 1;
  }

  server::ExportRegistry registry;
  server::Server srv(cl.server, registry);
  server::control::ControlPlane control(srv, registry);
  for (const auto& spec : cl.exports) {
    std::error_code ec;
    // Command-line exports are ordinary nodes ("NAME-file" and "NAME"), so
    // the control socket can put bitmaps on them.
    auto device = control.add_command_line_disk(spec.name, spec.file, spec.writable, spec.direct,
                                                spec.discard, ec);
    if (!device) {
      std::fprintf(stderr, "fleeced: error: cannot open '%s' for export '%s': %s\n",
                   spec.file.c_str(), spec.name.c_str(), ec.message().c_str());
      return 1;
    }
    auto e = std::make_shared<server::Export>();
    e->name = spec.name;
    e->description = spec.description;
    e->device = device;
    e->writable = spec.writable;
    (void)registry.add(e);
    control.adopt_command_line_export(e);
    server::log().info("export '{}': {} ({} bytes, {})", spec.name, spec.file, device->size(),
                       spec.writable ? "writable" : "read-only");
  }

  if (cl.stdin_mode) {
    // Logs go to stderr; stdout carries the protocol.
    srv.serve_stdio(STDIN_FILENO, STDOUT_FILENO);
  }
  for (const auto& address : cl.listens) {
    if (std::error_code ec = srv.listen(address, tls)) {
      std::fprintf(stderr, "fleeced: error: cannot listen on %s: %s\n", address.to_string().c_str(),
                   ec.message().c_str());
      return 1;
    }
  }
  // Like qemu-storage-daemon's --nbd-server: exports added over QMP are
  // served on the command-line listeners too, without nbd-server-start.
  control.set_command_line_listeners(!cl.listens.empty());
  server::control::CommandTable commands;
  control.register_commands(commands, [&srv] { srv.stop(); });
  std::unique_ptr<server::control::QmpServer> qmp;
  if (!cl.qmp_path.empty()) {
    boost::json::object version{
        {"qemu", boost::json::object{{"major", 7}, {"minor", 2}, {"micro", 0}}},
        {"package", "fleeced " FLEECED_VERSION}};
    qmp = std::make_unique<server::control::QmpServer>(commands, version);
    if (std::error_code ec = qmp->listen(cl.qmp_path)) {
      std::fprintf(stderr, "fleeced: error: cannot listen on unix:%s (QMP): %s\n",
                   cl.qmp_path.c_str(), ec.message().c_str());
      return 1;
    }
    qmp->start();
  }
  srv.set_reload_handler([&tls, &qmp, &control] {
    std::string reload_error;
    if (tls && !tls->creds->reload(reload_error)) {
      server::log().error("TLS credentials not reloaded (the old ones stay): {}", reload_error);
    } else if (tls) {
      server::log().info("TLS credentials reloaded: {}", tls->creds->get()->describe());
    }
    if (qmp) qmp->post([&control] { control.reload_tls_objects(); });
  });
  if (!cl.pidfile.empty() && !write_pidfile(cl.pidfile)) {
    std::fprintf(stderr, "fleeced: error: cannot write pidfile '%s'\n", cl.pidfile.c_str());
    return 1;
  }
  int status = srv.run();
  if (qmp) qmp->stop();
  if (!cl.pidfile.empty()) ::unlink(cl.pidfile.c_str());
  server::log().info("exited cleanly");
  return status;
}

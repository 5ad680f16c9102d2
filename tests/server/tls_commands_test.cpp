// SPDX-License-Identifier: MIT
// The control socket's TLS objects (server/control/tls_commands.cpp):
// object-add / object-del of credentials and allow-lists, nbd-server-start's
// tls-creds and tls-authz checks and x-fleeced-tls-reload, called through the
// command table with QEMU 7.2's error texts. No listener is opened: every
// nbd-server-start here fails before it binds.
#include <unistd.h>

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "server/control/control_plane.hpp"
#include "server/control/qmp.hpp"
#include "server/export_registry.hpp"
#include "server/server.hpp"

namespace fleeced::server::control {
namespace {

class NullEvents : public EventSink {
 public:
  void emit(std::string_view, json::object) override {}
};

class TlsCommands : public ::testing::Test {
 protected:
  TlsCommands() : server_(options(), registry_), control_(server_, registry_) {
    control_.register_commands(table_, [] {});
    char tmpl[] = "/tmp/fleeced-tlscmd-test.XXXXXX";
    dir_ = ::mkdtemp(tmpl);
    std::ofstream(dir_ + "/keys.psk") << "alice:00112233445566778899aabbccddeeff\n";
  }
  ~TlsCommands() override { std::filesystem::remove_all(dir_); }

  static ServerOptions options() {
    ServerOptions o;
    o.threads = 1;
    o.io_threads = 1;
    return o;
  }

  // Runs `command` with `arguments` (JSON text); returns "" or the error desc.
  std::string run(const std::string& command, const std::string& arguments) {
    const Handler* h = table_.find(command);
    if (!h) return "no such command";
    json::value v = json::parse(arguments);
    Args a(&v.as_object());
    NullEvents events;
    CommandResult r = (*h)(a, events);
    return r.error ? r.error->desc : "";
  }

  std::string add_psk(const std::string& id, const std::string& dir,
                      const std::string& endpoint = "server") {
    return run("object-add", R"({"qom-type": "tls-creds-psk", "id": ")" + id +
                                 R"(", "endpoint": ")" + endpoint + R"(", "dir": ")" + dir +
                                 R"("})");
  }

  std::string start(const std::string& tls) {
    return run("nbd-server-start", R"({"addr": {"type": "unix", "data": {"path": ")" + dir_ +
                                       R"(/nbd.sock"}})" + (tls.empty() ? "" : ", " + tls) + "}");
  }

  ExportRegistry registry_;
  Server server_;
  ControlPlane control_;
  CommandTable table_;
  std::string dir_;
};

TEST_F(TlsCommands, ObjectAddPskAndDuplicateId) {
  EXPECT_EQ(add_psk("tls0", dir_), "");
  EXPECT_EQ(add_psk("tls0", dir_),
            "attempt to add duplicate property 'tls0' to object (type 'container')");
  EXPECT_EQ(run("object-add", R"({"qom-type": "authz-simple", "id": "tls0", "identity": "a"})"),
            "attempt to add duplicate property 'tls0' to object (type 'container')");
}

TEST_F(TlsCommands, ObjectAddMissingDirectoryUsesQemuWording) {
  EXPECT_EQ(add_psk("tls0", "/no/such/dir"),
            "Unable to access credentials /no/such/dir/keys.psk: No such file or directory");
  EXPECT_EQ(run("object-add", R"({"qom-type": "tls-creds-x509", "id": "x", "endpoint": "server",
                                  "dir": "/no/such/dir"})"),
            "Unable to access credentials /no/such/dir/ca-cert.pem: No such file or directory");
  EXPECT_EQ(add_psk("tls0", dir_), "") << "nothing was added by the failures";
}

TEST_F(TlsCommands, ObjectAddValidatesArguments) {
  EXPECT_EQ(run("object-add", R"({"qom-type": "secret", "id": "s"})"),
            "Parameter 'qom-type' does not accept value 'secret'");
  EXPECT_EQ(run("object-add", R"({"qom-type": "tls-creds-psk", "endpoint": "server"})"),
            "Parameter 'id' is missing");
  EXPECT_EQ(run("object-add", R"({"qom-type": "tls-creds-psk", "id": "a", "endpoint": "both",
                                  "dir": "/"})"),
            "Parameter 'endpoint' does not accept value 'both'");
  EXPECT_EQ(run("object-add", R"({"qom-type": "tls-creds-psk", "id": "a", "endpoint": "server"})"),
            "Missing 'dir' property value");
  EXPECT_EQ(run("object-add", R"({"qom-type": "authz-list", "id": "z",
                                  "rules": [{"match": "x", "policy": "maybe"}]})"),
            "Parameter 'rules[0].policy' does not accept value 'maybe'");
}

TEST_F(TlsCommands, NbdServerStartChecksCredentials) {
  ASSERT_EQ(add_psk("client", dir_, "client"), "");
  ASSERT_EQ(run("object-add", R"({"qom-type": "authz-simple", "id": "auth", "identity": "a"})"),
            "");
  EXPECT_EQ(start(R"("tls-creds": "nope")"), "No TLS credentials with id 'nope'");
  EXPECT_EQ(start(R"("tls-creds": "auth")"), "Object with id 'auth' is not TLS credentials");
  EXPECT_EQ(start(R"("tls-creds": "client")"), "Expecting TLS credentials with a server endpoint");
  EXPECT_EQ(start(R"("tls-authz": "auth")"), "tls-authz is not supported without tls-creds");
  ASSERT_EQ(add_psk("tls0", dir_), "");
  EXPECT_EQ(start(R"("tls-creds": "tls0", "tls-authz": "nope")"),
            "No authorization object with id 'nope'");
}

TEST_F(TlsCommands, ReloadKeepsOldCredentialsOnFailure) {
  ASSERT_EQ(add_psk("tls0", dir_), "");
  EXPECT_EQ(run("x-fleeced-tls-reload", R"({"id": "tls0"})"), "");
  std::filesystem::remove(dir_ + "/keys.psk");
  EXPECT_EQ(run("x-fleeced-tls-reload", R"({"id": "tls0"})"),
            "Unable to access credentials " + dir_ + "/keys.psk: No such file or directory");
  EXPECT_EQ(run("x-fleeced-tls-reload", R"({"id": "nope"})"), "No TLS credentials with id 'nope'");
}

TEST_F(TlsCommands, ObjectDel) {
  ASSERT_EQ(add_psk("tls0", dir_), "");
  EXPECT_EQ(run("object-del", R"({"id": "tls0"})"), "");
  EXPECT_EQ(run("object-del", R"({"id": "tls0"})"), "object 'tls0' not found");
  EXPECT_EQ(add_psk("tls0", dir_), "") << "the id is free again";
}

}  // namespace
}  // namespace fleeced::server::control

// SPDX-License-Identifier: MIT
// Loading TLS credentials (server/tls_credentials.cpp): keys.psk parsing,
// QEMU's error texts for missing files, X.509 files that do not fit, and the
// allow-list (server/tls_authz.cpp).
#include "server/tls_credentials.hpp"

#include <unistd.h>

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "server/tls_authz.hpp"

namespace fleeced::server {
namespace {

class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/fleeced-creds-test.XXXXXX";
    path_ = ::mkdtemp(tmpl);
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  const std::string& path() const { return path_; }
  void write(const std::string& name, const std::string& text) const {
    std::ofstream(path_ + "/" + name) << text;
  }

 private:
  std::string path_;
};

TEST(ParsePskLine, UserAndHexKey) {
  std::string id;
  std::vector<unsigned char> key;
  ASSERT_TRUE(parse_psk_line("alice:00ff10Ab", id, key));
  EXPECT_EQ(id, "alice");
  EXPECT_EQ(key, (std::vector<unsigned char>{0x00, 0xff, 0x10, 0xab}));
}

TEST(ParsePskLine, RejectsMalformedLines) {
  std::string id;
  std::vector<unsigned char> key;
  for (const char* bad :
       {"alice", ":0102", "alice:", "alice:012", "alice:zz", "alice:01 02", "a:b:0102"}) {
    EXPECT_FALSE(parse_psk_line(bad, id, key)) << bad;
  }
}

TEST(TlsCredentials, LoadsPskKeysSkippingCommentsAndBlankLines) {
  TempDir dir;
  dir.write("keys.psk", "# rotated 2024\nalice:0102030405060708\n\nbob:a0a1a2a3\r\n");
  std::string error;
  auto creds = TlsCredentials::load({TlsCredsOptions::Kind::psk, dir.path(), false}, error);
  ASSERT_TRUE(creds) << error;
  EXPECT_EQ(creds->psk_identities(), 2u);
  ASSERT_TRUE(creds->psk_key("bob"));
  EXPECT_EQ(*creds->psk_key("bob"), (std::vector<unsigned char>{0xa0, 0xa1, 0xa2, 0xa3}));
  EXPECT_EQ(creds->psk_key("carol"), nullptr);
  EXPECT_EQ(creds->describe(), "psk:" + dir.path() + " (2 identities)");
}

TEST(TlsCredentials, MissingPskFileUsesQemuWording) {
  std::string error;
  EXPECT_FALSE(TlsCredentials::load({TlsCredsOptions::Kind::psk, "/no/such/dir", false}, error));
  EXPECT_EQ(error, "Unable to access credentials /no/such/dir/keys.psk: No such file or directory");
}

TEST(TlsCredentials, MalformedOrEmptyPskFileIsRefused) {
  TempDir dir;
  dir.write("keys.psk", "alice:0102\nbob\n");
  std::string error;
  EXPECT_FALSE(TlsCredentials::load({TlsCredsOptions::Kind::psk, dir.path(), false}, error));
  EXPECT_EQ(error,
            "Malformed PSK entry at " + dir.path() + "/keys.psk:2 (expected username:hexkey)");
  dir.write("keys.psk", "# nothing\n");
  EXPECT_FALSE(TlsCredentials::load({TlsCredsOptions::Kind::psk, dir.path(), false}, error));
  EXPECT_EQ(error, "No PSK identities in " + dir.path() + "/keys.psk");
}

TEST(TlsCredentials, MissingX509FilesAreNamedInOrder) {
  TempDir dir;
  std::string error;
  const TlsCredsOptions x509{TlsCredsOptions::Kind::x509, dir.path(), true};
  EXPECT_FALSE(TlsCredentials::load(x509, error));
  EXPECT_EQ(error, "Unable to access credentials " + dir.path() +
                       "/ca-cert.pem: No such file or directory");
  dir.write("ca-cert.pem", "junk");
  EXPECT_FALSE(TlsCredentials::load(x509, error));
  EXPECT_EQ(error, "Unable to access credentials " + dir.path() +
                       "/server-cert.pem: No such file or directory");
  dir.write("server-cert.pem", "junk");
  dir.write("server-key.pem", "junk");
  EXPECT_FALSE(TlsCredentials::load(x509, error));
  EXPECT_EQ(error.rfind("Cannot load certificate " + dir.path() + "/server-cert.pem: ", 0), 0u)
      << error;
}

TEST(TlsAuthz, FirstMatchingRuleDecides) {
  TlsAuthz authz({{"CN=admin,O=Example", false, false},
                  {"CN=*,O=Example", true, true},
                  {"alice", true, false}},
                 false);
  EXPECT_FALSE(authz.allows("CN=admin,O=Example"));
  EXPECT_TRUE(authz.allows("CN=backup1,O=Example"));
  EXPECT_TRUE(authz.allows("alice"));
  EXPECT_FALSE(authz.allows("CN=backup1,O=Other"));
  EXPECT_FALSE(authz.allows(""));
  EXPECT_TRUE(TlsAuthz({}, true).allows("anyone"));
}

TEST(TlsAuthz, ListFileHoldsExactIdentities) {
  TempDir dir;
  dir.write("allow", "# backup hosts\nCN=client1,O=fleeced test,C=GB\n\n  alice  \n");
  std::string error;
  auto authz = TlsAuthz::load_list_file(dir.path() + "/allow", error);
  ASSERT_TRUE(authz) << error;
  EXPECT_EQ(authz->rules().size(), 2u);
  EXPECT_TRUE(authz->allows("CN=client1,O=fleeced test,C=GB"));
  EXPECT_TRUE(authz->allows("alice"));
  EXPECT_FALSE(authz->allows("CN=client2,O=fleeced test,C=GB"));
  EXPECT_FALSE(TlsAuthz::load_list_file(dir.path() + "/none", error));
  EXPECT_EQ(error, "Cannot read TLS authorization list " + dir.path() +
                       "/none: No such file or directory");
}

}  // namespace
}  // namespace fleeced::server

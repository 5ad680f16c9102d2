// SPDX-License-Identifier: MIT
// NBD_OPT_STARTTLS end to end, in process: real Connection objects over a
// socketpair with a TLS policy (PSK credentials written to a temp dir), the
// client a RawClient that switches to a TlsTunnel (OpenSSL client) after the
// STARTTLS ACK. Covers the spec's TLS rules (FORCEDTLS refusals, forgetting
// plaintext state, STARTTLS twice), handshake failures, the allow-list,
// credential reload and transmission through the TLS writer.
#include <sys/socket.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/generic/stream_protocol.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/thread_pool.hpp>

#include "block/memory_device.hpp"
#include "protocol/codec.hpp"
#include "protocol/nbd.hpp"
#include "server/connection.hpp"
#include "server/export_registry.hpp"
#include "server/tls_authz.hpp"
#include "server/tls_credentials.hpp"
#include "support/raw_client.hpp"
#include "support/tls_tunnel.hpp"

namespace fleeced::server {
namespace {

namespace p = fleeced::protocol;
using namespace std::chrono_literals;
using test::Bytes;
using test::PskClientContext;
using test::RawClient;
using test::RawClientError;
using test::TlsTunnel;

constexpr auto kTimeout = 5s;
constexpr uint64_t kDiskSize = 4u << 20;
constexpr uint32_t kAllFlagsClient = p::kClientFlagFixedNewstyle | p::kClientFlagNoZeroes;
const std::vector<unsigned char> kAliceKey = {0x3d, 0x75, 0x7c, 0x8f, 0x2c, 0x8d, 0x48, 0xba,
                                              0x4f, 0x22, 0xdc, 0xfe, 0x89, 0x69, 0xf8, 0xe7};
const std::vector<unsigned char> kBobKey = {0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08,
                                            0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x0e, 0x0f, 0x10};

uint32_t u32(p::Option o) { return static_cast<uint32_t>(o); }
uint16_t u16(p::Command c) { return static_cast<uint16_t>(c); }

std::string hex(const std::vector<unsigned char>& key) {
  static const char* digits = "0123456789abcdef";
  std::string out;
  for (unsigned char c : key) {
    out += digits[c >> 4];
    out += digits[c & 15];
  }
  return out;
}

class TlsNegotiation : public ::testing::Test {
 protected:
  struct Done {
    std::mutex mu;
    std::condition_variable cv;
    bool done = false;
    bool wait(std::chrono::milliseconds timeout) {
      std::unique_lock lock(mu);
      return cv.wait_for(lock, timeout, [&] { return done; });
    }
  };
  struct Session {
    std::shared_ptr<Connection> conn;
    std::shared_ptr<Done> done;
    std::unique_ptr<RawClient> raw;  // the socket itself
    std::unique_ptr<TlsTunnel> tls;  // after STARTTLS
    RawClient& c() { return tls ? tls->client() : *raw; }
  };

  TlsNegotiation() : pool_(2), guard_(asio::make_work_guard(io_)) {}

  void SetUp() override {
    disk_ = std::make_shared<block::MemoryDevice>(kDiskSize);
    auto e = std::make_shared<Export>();
    e->name = "disk";
    e->device = disk_;
    e->writable = true;
    ASSERT_FALSE(registry_.add(std::move(e)));
    char tmpl[] = "/tmp/fleeced-tls-test.XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    write_keys({{"alice", kAliceKey}, {"bob", kBobKey}});
    std::string error;
    auto creds = TlsCredentials::load({TlsCredsOptions::Kind::psk, dir_, false}, error);
    ASSERT_TRUE(creds) << error;
    creds_ = std::make_shared<TlsCredsHandle>(creds);
    io_thread_ = std::thread([this] { io_.run(); });
  }

  void TearDown() override {
    for (auto& s : sessions_) {
      s->tls.reset();
      s->raw->close();
      EXPECT_TRUE(s->done->wait(kTimeout)) << "connection did not end after the client closed";
    }
    guard_.reset();
    io_.stop();
    if (io_thread_.joinable()) io_thread_.join();
    pool_.join();
    std::filesystem::remove_all(dir_);
  }

  void write_keys(const std::vector<std::pair<std::string, std::vector<unsigned char>>>& keys) {
    std::ofstream out(dir_ + "/keys.psk");
    for (const auto& [user, key] : keys) out << user << ":" << hex(key) << "\n";
  }

  std::shared_ptr<const TlsPolicy> policy(TlsMode mode,
                                          std::shared_ptr<const TlsAuthz> authz = nullptr) {
    auto out = std::make_shared<TlsPolicy>();
    out->mode = mode;
    out->creds = creds_;
    out->authz = std::move(authz);
    return out;
  }

  Session& start(std::shared_ptr<const TlsPolicy> tls, ConnectionLimits limits = {}) {
    int fds[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) {
      throw RawClientError("socketpair failed");
    }
    asio::generic::stream_protocol::socket socket(
        io_, asio::generic::stream_protocol(AF_UNIX, SOCK_STREAM), fds[0]);
    ServerContext context{&registry_, &pool_, limits, std::move(tls)};
    auto s = std::make_unique<Session>();
    s->raw = std::make_unique<RawClient>(fds[1]);
    s->conn = std::make_shared<Connection>(io_.get_executor(),
                                           std::make_unique<SocketStream>(std::move(socket)),
                                           context, sessions_.size() + 1);
    s->done = std::make_shared<Done>();
    auto conn = s->conn;
    auto on_done = [done = s->done](std::exception_ptr) {
      std::lock_guard lock(done->mu);
      done->done = true;
      done->cv.notify_all();
    };
    asio::co_spawn(
        io_, [conn] { return conn->async_run(); }, std::move(on_done));
    sessions_.push_back(std::move(s));
    Session& out = *sessions_.back();
    EXPECT_EQ(out.raw->read_greeting(), p::kFlagFixedNewstyle | p::kFlagNoZeroes);
    out.raw->send_client_flags(kAllFlagsClient);
    return out;
  }

  // Sends an option and returns the one reply it gets.
  static RawClient::OptionReply ask(RawClient& c, uint32_t option, const Bytes& payload = {}) {
    c.send_option(option, payload);
    RawClient::OptionReply r = c.read_option_reply();
    EXPECT_EQ(r.header.option, option);
    return r;
  }

  // STARTTLS, ACK, handshake: afterwards s.c() speaks through TLS.
  static void start_tls(Session& s, const PskClientContext& client) {
    RawClient::OptionReply r = ask(*s.raw, u32(p::Option::starttls));
    ASSERT_EQ(r.type(), p::OptionReply::ack) << r.text();
    s.tls = std::make_unique<TlsTunnel>(s.raw->fd(), client.get());
  }

  // GO; returns the transmission flags (throws unless it ends in ACK).
  static uint16_t go(RawClient& c, std::string_view name = "disk") {
    c.send_option(p::Option::go, test::info_payload(name));
    uint16_t flags = 0;
    for (;;) {
      RawClient::OptionReply r = c.read_option_reply();
      if (r.type() == p::OptionReply::ack) return flags;
      if (r.header.type & p::kRepErrorBit) throw RawClientError("GO failed: " + r.text());
      if (r.type() == p::OptionReply::info && r.payload.size() == 12 &&
          p::load_be16(r.payload.data()) == static_cast<uint16_t>(p::Info::export_info)) {
        flags = p::load_be16(r.payload.data() + 10);
      }
    }
  }

  p::RequestHeader request(p::Command cmd, uint64_t offset, uint32_t length) {
    return p::RequestHeader{0, u16(cmd), next_cookie_++, offset, length};
  }

  asio::io_context io_{1};
  asio::thread_pool pool_;
  asio::executor_work_guard<asio::io_context::executor_type> guard_;
  std::thread io_thread_;
  ExportRegistry registry_;
  std::shared_ptr<block::MemoryDevice> disk_;
  std::string dir_;
  std::shared_ptr<TlsCredsHandle> creds_;
  std::vector<std::unique_ptr<Session>> sessions_;
  PskClientContext alice_{"alice", kAliceKey};
  uint64_t next_cookie_ = 0x2000;
};

TEST_F(TlsNegotiation, RequireModeRefusesEveryOptionBeforeStartTls) {
  Session& s = start(policy(TlsMode::require));
  const std::vector<std::pair<uint32_t, Bytes>> options = {
      {u32(p::Option::list), {}},
      {u32(p::Option::structured_reply), {}},
      {u32(p::Option::info), test::info_payload("disk")},
      {u32(p::Option::go), test::info_payload("disk")},
      {u32(p::Option::list_meta_context), test::meta_context_payload("disk")},
      {0x1234, test::to_bytes("unknown option")},
  };
  for (const auto& [option, payload] : options) {
    RawClient::OptionReply r = ask(s.c(), option, payload);
    EXPECT_EQ(r.type(), p::OptionReply::err_tls_reqd) << "option " << option;
    EXPECT_EQ(r.text(), "TLS is required (send NBD_OPT_STARTTLS first)");
  }
  start_tls(s, alice_);
  EXPECT_NE(go(s.c()), 0);
}

TEST_F(TlsNegotiation, RequireModeExportNameBeforeTlsEndsSession) {
  Session& s = start(policy(TlsMode::require));
  s.c().send_option(p::Option::export_name, test::to_bytes("disk"));
  EXPECT_TRUE(s.c().expect_closed());
}

TEST_F(TlsNegotiation, RequireModeAbortIsAcknowledged) {
  Session& s = start(policy(TlsMode::require));
  EXPECT_EQ(ask(s.c(), u32(p::Option::abort)).type(), p::OptionReply::ack);
  EXPECT_TRUE(s.c().expect_closed());
}

TEST_F(TlsNegotiation, StartTlsWithPayloadIsInvalid) {
  Session& s = start(policy(TlsMode::require));
  RawClient::OptionReply r = ask(s.c(), u32(p::Option::starttls), test::to_bytes("x"));
  EXPECT_EQ(r.type(), p::OptionReply::err_invalid);
  start_tls(s, alice_);
  EXPECT_NE(go(s.c()), 0);
}

TEST_F(TlsNegotiation, StartTlsTwiceIsInvalid) {
  Session& s = start(policy(TlsMode::require));
  start_tls(s, alice_);
  RawClient::OptionReply r = ask(s.c(), u32(p::Option::starttls));
  EXPECT_EQ(r.type(), p::OptionReply::err_invalid);
  EXPECT_EQ(r.text(), "TLS already negotiated");
  EXPECT_NE(go(s.c()), 0);
}

TEST_F(TlsNegotiation, OffModeAnswersPolicy) {
  Session& s = start(nullptr);
  RawClient::OptionReply r = ask(s.c(), u32(p::Option::starttls));
  EXPECT_EQ(r.type(), p::OptionReply::err_policy);
  EXPECT_EQ(r.text(), "TLS not configured");
  EXPECT_NE(go(s.c()), 0);
}

TEST_F(TlsNegotiation, OnModeStillServesPlaintext) {
  Session& s = start(policy(TlsMode::on));
  EXPECT_NE(go(s.c()), 0);
  Bytes data = test::pattern(4096, 7);
  s.c().send_request(request(p::Command::write, 0, 4096), data);
  EXPECT_EQ(s.c().read_simple_reply().error, 0u);
}

// CVE-2021-3716: what was negotiated in plaintext must not survive STARTTLS.
TEST_F(TlsNegotiation, PlaintextNegotiationIsForgottenAfterStartTls) {
  Session& s = start(policy(TlsMode::on));
  EXPECT_EQ(ask(s.c(), u32(p::Option::structured_reply)).type(), p::OptionReply::ack);
  s.c().send_option(p::Option::set_meta_context,
                    test::meta_context_payload("disk", {"base:allocation"}));
  EXPECT_EQ(s.c().read_option_reply().type(), p::OptionReply::meta_context);
  EXPECT_EQ(s.c().read_option_reply().type(), p::OptionReply::ack);
  start_tls(s, alice_);
  const uint16_t flags = go(s.c());
  EXPECT_EQ(flags & p::kFlagSendDf, 0) << "DF is only offered with structured replies";
  // A READ gets a simple reply, BLOCK_STATUS is refused: no structured
  // replies and no meta context were negotiated over TLS.
  p::RequestHeader rd = request(p::Command::read, 0, 512);
  s.c().send_request(rd);
  EXPECT_EQ(s.c().peek_reply_magic(), p::kSimpleReplyMagic);
  p::SimpleReply r = s.c().read_simple_reply();
  EXPECT_EQ(r.cookie, rd.cookie);
  EXPECT_EQ(r.error, 0u);
  (void)s.c().read_exact(512);
  s.c().send_request(request(p::Command::block_status, 0, 4096));
  EXPECT_EQ(s.c().read_simple_reply().error, static_cast<uint32_t>(p::Error::inval));
}

TEST_F(TlsNegotiation, StructuredRepliesNegotiatedOverTlsWork) {
  Session& s = start(policy(TlsMode::require));
  start_tls(s, alice_);
  EXPECT_EQ(ask(s.c(), u32(p::Option::structured_reply)).type(), p::OptionReply::ack);
  EXPECT_NE(go(s.c()) & p::kFlagSendDf, 0);
  s.c().send_request(request(p::Command::read, 0, 512));
  EXPECT_EQ(s.c().peek_reply_magic(), p::kStructuredReplyMagic);
}

TEST_F(TlsNegotiation, BytesSentAfterStartTlsBeforeItsReplyEndConnection) {
  Session& s = start(policy(TlsMode::require));
  Bytes both(p::kOptionHeaderSize * 2);
  (void)p::encode_option_header(std::span(both).first(p::kOptionHeaderSize),
                                {u32(p::Option::starttls), 0});
  (void)p::encode_option_header(std::span(both).subspan(p::kOptionHeaderSize),
                                {u32(p::Option::go), 0});
  s.c().write_all(both);
  EXPECT_TRUE(s.c().expect_closed());
}

TEST_F(TlsNegotiation, UnknownPskIdentityFailsHandshakeAndOthersCarryOn) {
  Session& good = start(policy(TlsMode::require));
  start_tls(good, alice_);
  Session& bad = start(policy(TlsMode::require));
  PskClientContext carol("carol", kAliceKey);
  EXPECT_EQ(ask(*bad.raw, u32(p::Option::starttls)).type(), p::OptionReply::ack);
  EXPECT_THROW(TlsTunnel(bad.raw->fd(), carol.get()), RawClientError);
  EXPECT_TRUE(bad.done->wait(kTimeout));
  EXPECT_NE(go(good.c()), 0);
}

TEST_F(TlsNegotiation, WrongPskFailsHandshake) {
  Session& s = start(policy(TlsMode::require));
  PskClientContext wrong("alice", kBobKey);
  EXPECT_EQ(ask(*s.raw, u32(p::Option::starttls)).type(), p::OptionReply::ack);
  EXPECT_THROW(TlsTunnel(s.raw->fd(), wrong.get()), RawClientError);
  EXPECT_TRUE(s.done->wait(kTimeout));
}

TEST_F(TlsNegotiation, Tls12WithPskWorks) {
  Session& s = start(policy(TlsMode::require));
  PskClientContext old("bob", kBobKey);
  old.set_max_version(TLS1_2_VERSION);
  start_tls(s, old);
  EXPECT_EQ(s.tls->version(), "TLSv1.2");
  EXPECT_EQ(s.tls->cipher(), "DHE-PSK-AES128-GCM-SHA256");  // forward secrecy first
  EXPECT_NE(go(s.c()), 0);
}

TEST_F(TlsNegotiation, AllowListRefusesOtherIdentitiesWithPolicy) {
  auto authz =
      std::make_shared<const TlsAuthz>(std::vector<TlsAuthz::Rule>{{"alice", true, false}}, false);
  Session& s = start(policy(TlsMode::require, authz));
  PskClientContext bob("bob", kBobKey);
  start_tls(s, bob);
  s.c().send_option(p::Option::go, test::info_payload("disk"));
  RawClient::OptionReply r = s.c().read_option_reply();
  EXPECT_EQ(r.type(), p::OptionReply::err_policy);
  EXPECT_EQ(r.text(), "TLS client 'bob' is not authorized");
  s.c().send_option(p::Option::export_name, test::to_bytes("disk"));
  EXPECT_TRUE(s.c().expect_closed());

  Session& ok = start(policy(TlsMode::require, authz));
  start_tls(ok, alice_);
  EXPECT_NE(go(ok.c()), 0);
}

TEST_F(TlsNegotiation, HandshakeTimeoutCoversTlsHandshake) {
  ConnectionLimits limits;
  limits.handshake_timeout = 1s;
  Session& s = start(policy(TlsMode::require), limits);
  EXPECT_EQ(ask(*s.raw, u32(p::Option::starttls)).type(), p::OptionReply::ack);
  // No ClientHello: the server must give up by itself.
  EXPECT_TRUE(s.raw->expect_closed());
}

TEST_F(TlsNegotiation, ReloadAffectsNewSessionsOnly) {
  Session& before = start(policy(TlsMode::require));
  start_tls(before, alice_);
  EXPECT_NE(go(before.c()), 0);

  const std::vector<unsigned char> rotated = {9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 1, 2, 3, 4, 5, 6};
  write_keys({{"alice", rotated}});
  std::string error;
  ASSERT_TRUE(creds_->reload(error)) << error;

  Session& stale = start(policy(TlsMode::require));
  EXPECT_EQ(ask(*stale.raw, u32(p::Option::starttls)).type(), p::OptionReply::ack);
  EXPECT_THROW(TlsTunnel(stale.raw->fd(), alice_.get()), RawClientError);

  Session& fresh = start(policy(TlsMode::require));
  PskClientContext alice2("alice", rotated);
  start_tls(fresh, alice2);
  EXPECT_NE(go(fresh.c()), 0);

  // The session from before the reload still works.
  Bytes data = test::pattern(8192, 3);
  before.c().send_request(request(p::Command::write, 4096, 8192), data);
  EXPECT_EQ(before.c().read_simple_reply().error, 0u);
}

TEST_F(TlsNegotiation, FailedReloadKeepsCurrentCredentials) {
  std::filesystem::remove(dir_ + "/keys.psk");
  std::string error;
  EXPECT_FALSE(creds_->reload(error));
  EXPECT_EQ(error, "Unable to access credentials " + dir_ + "/keys.psk: No such file or directory");
  Session& s = start(policy(TlsMode::require));
  start_tls(s, alice_);
  EXPECT_NE(go(s.c()), 0);
}

// The batched writer over TLS: large replies cut into records, many small
// pipelined replies gathered into records, write payloads read through TLS.
TEST_F(TlsNegotiation, TransmissionOverTlsMovesDataIntact) {
  Session& s = start(policy(TlsMode::require));
  start_tls(s, alice_);
  EXPECT_EQ(ask(s.c(), u32(p::Option::structured_reply)).type(), p::OptionReply::ack);
  (void)go(s.c());
  const Bytes data = test::pattern(1 << 20, 11);
  for (uint32_t off = 0; off < data.size(); off += 256 * 1024) {
    p::RequestHeader w = request(p::Command::write, off, 256 * 1024);
    s.c().send_request(w, std::span(data).subspan(off, 256 * 1024));
    p::SimpleReply r = s.c().read_simple_reply();
    EXPECT_EQ(r.cookie, w.cookie);
    EXPECT_EQ(r.error, 0u);
  }
  // One 1 MiB read: OFFSET_DATA chunks carrying every byte.
  p::RequestHeader big = request(p::Command::read, 0, 1 << 20);
  s.c().send_request(big);
  Bytes got(1 << 20);
  for (;;) {
    RawClient::Chunk c = s.c().read_chunk();
    EXPECT_EQ(c.header.cookie, big.cookie);
    ASSERT_EQ(c.type(), p::Chunk::offset_data);
    uint64_t off = p::load_be64(c.payload.data());
    std::copy(c.payload.begin() + 8, c.payload.end(), got.begin() + static_cast<long>(off));
    if (c.done()) break;
  }
  EXPECT_EQ(got, data);
  // 32 pipelined 4 KiB reads, answered in any order.
  std::map<uint64_t, uint64_t> offsets;
  for (int i = 0; i < 32; ++i) {
    p::RequestHeader h = request(p::Command::read, static_cast<uint64_t>(i) * 12288, 4096);
    offsets[h.cookie] = h.offset;
    s.c().send_request(h);
  }
  for (int i = 0; i < 32; ++i) {
    RawClient::Chunk c = s.c().read_chunk();
    ASSERT_TRUE(offsets.count(c.header.cookie));
    ASSERT_EQ(c.type(), p::Chunk::offset_data);
    const uint64_t off = offsets[c.header.cookie];
    EXPECT_EQ(p::load_be64(c.payload.data()), off);
    EXPECT_TRUE(
        std::equal(c.payload.begin() + 8, c.payload.end(), data.begin() + static_cast<long>(off)));
    offsets.erase(c.header.cookie);
  }
}

}  // namespace
}  // namespace fleeced::server

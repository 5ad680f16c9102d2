// SPDX-License-Identifier: MIT
// Real Connection objects driven in-process over a socketpair: the server end
// is a SocketStream on an io_context running on one background thread (device
// calls on a 4-thread asio::thread_pool), the client end is a RawClient on the
// test thread that writes and checks wire bytes, every read bounded by a
// timeout. Negotiation tests cover server/negotiation.cpp, transmission tests
// server/connection.cpp.
#include "server/connection.hpp"

#include <sys/socket.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <ostream>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/generic/stream_protocol.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/thread_pool.hpp>

#include "block/memory_device.hpp"
#include "protocol/codec.hpp"
#include "protocol/names.hpp"
#include "protocol/nbd.hpp"
#include "server/export_registry.hpp"
#include "server/stream.hpp"
#include "support/raw_client.hpp"

namespace fleeced::server {
namespace {

namespace p = fleeced::protocol;
using namespace std::chrono_literals;
using test::Bytes;
using test::RawClient;
using test::RawClientError;

constexpr auto kTimeout = 5s;
// Not a multiple of 4 KiB, so the last block is partial.
constexpr uint64_t kDiskSize = (1u << 20) + 512;
constexpr uint32_t kAllFlagsClient = p::kClientFlagFixedNewstyle | p::kClientFlagNoZeroes;
// Transmission flags documented in Export::transmission_flags.
constexpr uint16_t kWritableFlags = 0x0d6d;  // + DF with structured replies
constexpr uint16_t kReadOnlyFlags = 0x050f;  // + DF with structured replies
constexpr uint32_t kHoleZero = p::kStateHole | p::kStateZero;

uint32_t u32(p::Option o) { return static_cast<uint32_t>(o); }
uint16_t u16(p::Command c) { return static_cast<uint16_t>(c); }
uint32_t u32(p::Error e) { return static_cast<uint32_t>(e); }

void require(bool ok, const std::string& what) {
  if (!ok) throw RawClientError(what);
}

// Holds device writes until opened, counting the writes waiting.
class Gate {
 public:
  void close() {
    std::lock_guard lock(mu_);
    closed_ = true;
    entered_ = 0;
  }
  void open() {
    std::lock_guard lock(mu_);
    closed_ = false;
    cv_.notify_all();
  }
  void pass() {
    std::unique_lock lock(mu_);
    if (!closed_) return;
    ++entered_;
    cv_.notify_all();
    cv_.wait_for(lock, 10s, [&] { return !closed_; });
  }
  bool wait_entered(int n) {
    std::unique_lock lock(mu_);
    return cv_.wait_for(lock, kTimeout, [&] { return entered_ >= n; });
  }
  int entered() {
    std::lock_guard lock(mu_);
    return entered_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool closed_ = false;
  int entered_ = 0;
};

// A SocketStream whose try_write takes at most `limit` bytes per call, as a
// nearly full socket would: the writer coroutine has to go on from the
// middle of a reply. Counts the calls that were cut short.
class ChoppyStream final : public Stream {
 public:
  ChoppyStream(std::unique_ptr<SocketStream> inner, std::size_t limit,
               std::shared_ptr<std::atomic<int>> cut)
      : inner_(std::move(inner)), limit_(limit), cut_(std::move(cut)) {}
  asio::awaitable<std::size_t> async_read_some(asio::mutable_buffer buffer,
                                               std::error_code& ec) override {
    std::size_t n = co_await inner_->async_read_some(buffer, ec);
    co_return n;
  }
  asio::awaitable<void> async_write_all(std::span<const asio::const_buffer> buffers,
                                        std::error_code& ec) override {
    co_await inner_->async_write_all(buffers, ec);
  }
  std::size_t try_write(std::span<const asio::const_buffer> buffers, std::error_code& ec) override {
    std::vector<asio::const_buffer> part;
    std::size_t room = limit_;
    for (const auto& b : buffers) {
      if (room == 0) break;
      part.emplace_back(b.data(), std::min(room, b.size()));
      room -= part.back().size();
    }
    std::size_t total = 0;
    for (const auto& b : buffers) total += b.size();
    if (total > limit_) cut_->fetch_add(1);
    return inner_->try_write(part, ec);
  }
  void shutdown_receive() override { inner_->shutdown_receive(); }
  void close() override { inner_->close(); }
  std::string peer() const override { return inner_->peer(); }

 private:
  std::unique_ptr<SocketStream> inner_;
  std::size_t limit_;
  std::shared_ptr<std::atomic<int>> cut_;
};

// Forwards to a MemoryDevice but never completes try_read/try_write inline
// (the Device defaults say "would block"), so every read and write runs on
// the I/O pool, as a FileDevice's do on a page-cache miss; this is also the
// only path that asks for extents before a large read. Writes pass a Gate.
class PoolDevice final : public block::Device {
 public:
  explicit PoolDevice(uint64_t size) : inner_(std::make_shared<block::MemoryDevice>(size)) {}
  uint64_t size() const override { return inner_->size(); }
  block::Capabilities capabilities() const override {
    block::Capabilities c = inner_->capabilities();
    c.serial_writes = serial;
    return c;
  }
  std::error_code read(uint64_t offset, std::span<std::byte> out) override {
    if (std::error_code ec = injected()) return ec;
    return inner_->read(offset, out);
  }
  std::error_code write(uint64_t offset, std::span<const std::byte> data, bool fua) override {
    gate.pass();
    if (std::error_code ec = injected()) return ec;
    return inner_->write(offset, data, fua);
  }
  std::error_code write_zeroes(uint64_t offset, uint64_t length, block::ZeroFlags f) override {
    return inner_->write_zeroes(offset, length, f);
  }
  std::error_code discard(uint64_t offset, uint64_t length, bool fua) override {
    return inner_->discard(offset, length, fua);
  }
  std::error_code flush() override { return inner_->flush(); }
  std::error_code extents(uint64_t offset, uint64_t length,
                          std::vector<block::Extent>& out) override {
    if (std::error_code ec = injected()) return ec;
    return inner_->extents(offset, length, out);
  }
  block::MemoryDevice& inner() { return *inner_; }

  Gate gate;
  std::atomic<int> fail_errno{0};   // read, write and extents fail with it when set
  std::atomic<bool> serial{false};  // Capabilities::serial_writes

 private:
  std::error_code injected() const {
    int e = fail_errno.load();
    return e ? std::error_code(e, std::generic_category()) : std::error_code();
  }

  std::shared_ptr<block::MemoryDevice> inner_;
};

// One BLOCK_STATUS descriptor.
struct Ext {
  uint32_t length = 0;
  uint32_t flags = 0;
  bool operator==(const Ext&) const = default;
};
std::ostream& operator<<(std::ostream& os, const Ext& e) {
  return os << "{" << e.length << ", " << e.flags << "}";
}

struct BlockStatus {
  uint32_t context_id = 0;
  std::vector<Ext> extents;
};

BlockStatus parse_block_status(const RawClient::Chunk& c) {
  require(c.type() == p::Chunk::block_status, "expected a BLOCK_STATUS chunk");
  require(c.payload.size() >= 4 && (c.payload.size() - 4) % 8 == 0, "bad BLOCK_STATUS length");
  BlockStatus out;
  out.context_id = p::load_be32(c.payload.data());
  for (std::size_t at = 4; at < c.payload.size(); at += 8) {
    out.extents.push_back(
        {p::load_be32(c.payload.data() + at), p::load_be32(c.payload.data() + at + 4)});
  }
  return out;
}

// What NBD_REP_INFO replies said.
struct InfoReplies {
  bool have_export = false;
  uint64_t size = 0;
  uint16_t flags = 0;
  bool have_block_size = false;
  uint32_t min_block = 0, preferred_block = 0, max_block = 0;
  bool have_name = false;
  std::string name;
  bool have_description = false;
  std::string description;
  int count = 0;
};

void parse_info(const RawClient::OptionReply& r, InfoReplies& out) {
  require(r.payload.size() >= 2, "short NBD_REP_INFO");
  const std::byte* b = r.payload.data();
  ++out.count;
  switch (static_cast<p::Info>(p::load_be16(b))) {
    case p::Info::export_info:
      require(r.payload.size() == 12, "NBD_INFO_EXPORT length");
      require(!out.have_export, "NBD_INFO_EXPORT twice");
      out.have_export = true;
      out.size = p::load_be64(b + 2);
      out.flags = p::load_be16(b + 10);
      break;
    case p::Info::block_size:
      require(r.payload.size() == 14, "NBD_INFO_BLOCK_SIZE length");
      require(!out.have_block_size, "NBD_INFO_BLOCK_SIZE twice");
      out.have_block_size = true;
      out.min_block = p::load_be32(b + 2);
      out.preferred_block = p::load_be32(b + 6);
      out.max_block = p::load_be32(b + 10);
      break;
    case p::Info::name:
      require(!out.have_name, "NBD_INFO_NAME twice");
      out.have_name = true;
      out.name = test::to_text(std::span(r.payload).subspan(2));
      break;
    case p::Info::description:
      require(!out.have_description, "NBD_INFO_DESCRIPTION twice");
      out.have_description = true;
      out.description = test::to_text(std::span(r.payload).subspan(2));
      break;
    default:
      throw RawClientError("unknown NBD_INFO type");
  }
}

// Reads option replies up to the final one (ACK or an error): returns the
// final reply, INFO replies parsed into `info`, others kept in `others`.
RawClient::OptionReply read_until_final(RawClient& c, uint32_t option, InfoReplies* info = nullptr,
                                        std::vector<RawClient::OptionReply>* others = nullptr) {
  for (;;) {
    RawClient::OptionReply r = c.read_option_reply();
    require(r.header.option == option, "option reply for option " +
                                           std::to_string(r.header.option) + ", expected " +
                                           std::to_string(option));
    if (r.type() == p::OptionReply::ack || (r.header.type & p::kRepErrorBit)) return r;
    if (r.type() == p::OptionReply::info && info) {
      parse_info(r, *info);
    } else if (others) {
      others->push_back(std::move(r));
    } else {
      throw RawClientError("unexpected option reply type " + std::to_string(r.header.type));
    }
  }
}

std::vector<std::string> chunk_names(std::initializer_list<p::Chunk> types) {
  std::vector<std::string> out;
  for (p::Chunk t : types) out.emplace_back(p::chunk_name(static_cast<uint16_t>(t)));
  return out;
}

// Structured READ result, checked chunk by chunk.
struct StructuredRead {
  Bytes data;                            // assembled (holes as zeroes)
  std::vector<RawClient::Chunk> chunks;  // every chunk, in order
  std::vector<std::string> types;        // their names (chunk_name)
  uint32_t error = 0;                    // from an ERROR chunk
};

// ---- The harness ----

class ConnectionHarness : public ::testing::Test {
 protected:
  struct Done {
    std::mutex mu;
    std::condition_variable cv;
    bool done = false;
    std::exception_ptr error;
    bool wait(std::chrono::milliseconds timeout) {
      std::unique_lock lock(mu);
      return cv.wait_for(lock, timeout, [&] { return done; });
    }
  };
  struct Session {
    std::shared_ptr<Connection> conn;
    std::shared_ptr<Done> done;
    std::unique_ptr<RawClient> client;
    RawClient& c() { return *client; }
  };
  struct OpenOptions {
    std::string export_name = "disk";
    bool structured = false;
    bool base_allocation = false;
    ConnectionLimits limits = {};
    std::size_t try_write_limit = 0;  // > 0: a ChoppyStream with this limit
  };

  ConnectionHarness() : pool_(4), guard_(asio::make_work_guard(io_)) {}

  void SetUp() override {
    disk_ = std::make_shared<block::MemoryDevice>(kDiskSize);
    add_export("disk", disk_, true, "test disk");
    ro_ = std::make_shared<block::MemoryDevice>(kDiskSize, true);
    add_export("ro", ro_, false, "");
    slow_ = std::make_shared<PoolDevice>(kDiskSize);
    add_export("slow", slow_, true, "through the I/O pool");
    add_bitmap_export();
    io_thread_ = std::thread([this] { io_.run(); });
  }

  void TearDown() override {
    slow_->gate.open();
    for (auto& s : sessions_) {
      s->client->close();
      EXPECT_TRUE(s->done->wait(kTimeout)) << "connection did not end after the client closed";
      if (s->done->error) {
        try {
          std::rethrow_exception(s->done->error);
        } catch (const std::exception& e) {
          ADD_FAILURE() << "async_run ended with an exception: " << e.what();
        }
      }
    }
    guard_.reset();
    io_.stop();
    if (io_thread_.joinable()) io_thread_.join();
    pool_.join();
  }

  void add_export(std::string name, block::DevicePtr device, bool writable,
                  std::string description) {
    auto e = std::make_shared<Export>();
    e->name = std::move(name);
    e->description = std::move(description);
    e->device = std::move(device);
    e->writable = writable;
    ASSERT_FALSE(registry_.add(std::move(e)));
  }

  // "bitmap": a MemoryDevice plus context qemu:dirty-bitmap:b0 that reports
  // [0, 64 KiB) dirty and the rest clean; its clean extent deliberately runs
  // past the range asked for, which the connection must clip.
  void add_bitmap_export() {
    auto e = std::make_shared<Export>();
    e->name = "bitmap";
    e->device = std::make_shared<block::MemoryDevice>(kDiskSize);
    e->writable = true;
    MetaContextSource source;
    source.name = "qemu:dirty-bitmap:b0";
    source.extents = [](uint64_t offset, uint64_t length, std::vector<block::Extent>& out) {
      constexpr uint64_t kDirtyEnd = 64 * 1024;
      if (offset < kDirtyEnd) {
        out.push_back({offset, std::min(kDirtyEnd, offset + length) - offset, p::kStateDirty});
      } else {
        out.push_back({offset, uint64_t{1} << 40, 0});
      }
      return std::error_code();
    };
    auto releases = releases_;
    source.on_release = [releases] { releases->fetch_add(1); };
    e->meta_contexts.push_back(std::move(source));
    ASSERT_FALSE(registry_.add(std::move(e)));
  }

  // Runs f() on the event loop and returns its result.
  template <typename F>
  auto on_io(F f) {
    std::packaged_task<std::invoke_result_t<F&>()> task(std::move(f));
    auto result = task.get_future();
    asio::post(io_, [&task] { task(); });
    if (result.wait_for(kTimeout) != std::future_status::ready) {
      throw RawClientError("event loop did not run a posted task");
    }
    return result.get();
  }

  // A new connection; the client has not read the greeting yet.
  Session& start(const ConnectionLimits& limits = {}, std::size_t try_write_limit = 0) {
    int fds[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) {
      throw RawClientError(std::string("socketpair: ") + std::strerror(errno));
    }
    asio::generic::stream_protocol::socket socket(
        io_, asio::generic::stream_protocol(AF_UNIX, SOCK_STREAM), fds[0]);
    ServerContext context{&registry_, &pool_, limits, nullptr};
    auto s = std::make_unique<Session>();
    s->client = std::make_unique<RawClient>(fds[1]);
    std::unique_ptr<Stream> stream = std::make_unique<SocketStream>(std::move(socket));
    if (try_write_limit > 0) {
      stream = std::make_unique<ChoppyStream>(
          std::make_unique<SocketStream>(std::move(static_cast<SocketStream&>(*stream).socket())),
          try_write_limit, cut_writes_);
    }
    s->conn = std::make_shared<Connection>(io_.get_executor(), std::move(stream), context,
                                           sessions_.size() + 1);
    s->done = std::make_shared<Done>();
    auto conn = s->conn;
    auto on_done = [done = s->done](std::exception_ptr e) {
      std::lock_guard lock(done->mu);
      done->done = true;
      done->error = e;
      done->cv.notify_all();
    };
    asio::co_spawn(
        io_, [conn] { return conn->async_run(); }, std::move(on_done));
    sessions_.push_back(std::move(s));
    return *sessions_.back();
  }

  // Reads the greeting and sends client flags.
  static void handshake(RawClient& c, uint32_t flags = kAllFlagsClient) {
    EXPECT_EQ(c.read_greeting(), p::kFlagFixedNewstyle | p::kFlagNoZeroes);
    c.send_client_flags(flags);
  }

  static void enable_structured(RawClient& c) {
    c.send_option(p::Option::structured_reply);
    RawClient::OptionReply r = c.read_option_reply();
    require(r.header.option == u32(p::Option::structured_reply) &&
                r.type() == p::OptionReply::ack && r.payload.empty(),
            "STRUCTURED_REPLY not acknowledged");
  }

  static void select_base_allocation(RawClient& c, std::string_view export_name) {
    c.send_option(p::Option::set_meta_context,
                  test::meta_context_payload(export_name, {"base:allocation"}));
    std::vector<RawClient::OptionReply> contexts;
    RawClient::OptionReply r =
        read_until_final(c, u32(p::Option::set_meta_context), nullptr, &contexts);
    require(r.type() == p::OptionReply::ack && contexts.size() == 1,
            "SET_META_CONTEXT base:allocation failed");
  }

  // GO; throws unless it ends in ACK.
  static InfoReplies go(RawClient& c, std::string_view name,
                        std::initializer_list<uint16_t> types = {}) {
    c.send_option(p::Option::go, test::info_payload(name, types));
    InfoReplies info;
    RawClient::OptionReply r = read_until_final(c, u32(p::Option::go), &info);
    require(r.type() == p::OptionReply::ack, "GO failed: " + r.text());
    return info;
  }

  // A connection in transmission.
  Session& open(const OpenOptions& o) {
    Session& s = start(o.limits, o.try_write_limit);
    handshake(s.c());
    if (o.structured) enable_structured(s.c());
    if (o.base_allocation) select_base_allocation(s.c(), o.export_name);
    (void)go(s.c(), o.export_name);
    return s;
  }
  Session& open() { return open(OpenOptions{}); }

  void stop(Session& s) {
    asio::post(io_, [conn = s.conn] { conn->stop(); });
  }

  // Returns once the event loop has finished everything queued before.
  void sync_io() {
    auto done = std::make_shared<Done>();
    asio::post(io_, [done] {
      std::lock_guard lock(done->mu);
      done->done = true;
      done->cv.notify_all();
    });
    ASSERT_TRUE(done->wait(kTimeout));
  }

  // ---- Transmission helpers ----

  p::RequestHeader request(p::Command cmd, uint64_t offset, uint32_t length, uint16_t flags = 0) {
    return p::RequestHeader{flags, u16(cmd), next_cookie_++, offset, length};
  }

  // Sends a request (with payload for WRITE) and reads a simple reply, which
  // must echo the cookie; returns its error.
  uint32_t simple(RawClient& c, const p::RequestHeader& h,
                  std::span<const std::byte> payload = {}) {
    c.send_request(h, payload);
    p::SimpleReply r = c.read_simple_reply();
    EXPECT_EQ(r.cookie, h.cookie);
    return r.error;
  }

  void write(RawClient& c, uint64_t offset, const Bytes& data) {
    EXPECT_EQ(
        simple(c, request(p::Command::write, offset, static_cast<uint32_t>(data.size())), data),
        0u);
  }

  Bytes read_simple(RawClient& c, uint64_t offset, uint32_t length) {
    EXPECT_EQ(simple(c, request(p::Command::read, offset, length)), 0u);
    return c.read_exact(length);
  }

  // Reads the chunks of one structured READ reply (already sent), checking
  // cookies, DONE only on the last chunk, ranges and overlap.
  static StructuredRead read_structured_reply(RawClient& c, const p::RequestHeader& h) {
    StructuredRead out;
    out.data.assign(h.length, std::byte{0x5a});
    std::vector<bool> covered(h.length, false);
    for (;;) {
      RawClient::Chunk chunk = c.read_chunk();
      EXPECT_EQ(chunk.header.cookie, h.cookie);
      out.types.emplace_back(p::chunk_name(chunk.header.type));
      switch (chunk.type()) {
        case p::Chunk::offset_data:
        case p::Chunk::offset_hole: {
          const bool hole = chunk.type() == p::Chunk::offset_hole;
          require(chunk.payload.size() >= (hole ? 12u : 9u), "short data/hole chunk");
          uint64_t offset = p::load_be64(chunk.payload.data());
          uint64_t length =
              hole ? p::load_be32(chunk.payload.data() + 8) : chunk.payload.size() - 8;
          if (hole) require(chunk.payload.size() == 12, "hole chunk length");
          require(
              offset >= h.offset && length <= h.length && offset - h.offset <= h.length - length,
              "chunk outside the requested range");
          for (uint64_t i = 0; i < length; ++i) {
            std::size_t at = static_cast<std::size_t>(offset - h.offset + i);
            require(!covered[at], "chunks overlap");
            covered[at] = true;
            out.data[at] = hole ? std::byte{0} : chunk.payload[8 + i];
          }
          break;
        }
        case p::Chunk::error: {
          require(chunk.payload.size() >= 6, "short ERROR chunk");
          out.error = p::load_be32(chunk.payload.data());
          uint16_t message_length = p::load_be16(chunk.payload.data() + 4);
          EXPECT_EQ(chunk.payload.size(), 6u + message_length);
          break;
        }
        case p::Chunk::none:
          EXPECT_TRUE(chunk.payload.empty());
          break;
        default:
          throw RawClientError("unexpected chunk type " + std::to_string(chunk.header.type));
      }
      const bool done = chunk.done();
      out.chunks.push_back(std::move(chunk));
      if (done) break;
    }
    if (out.error == 0) {
      EXPECT_TRUE(std::all_of(covered.begin(), covered.end(), [](bool b) { return b; }))
          << "successful read did not cover every byte";
    }
    return out;
  }

  StructuredRead read_structured(RawClient& c, uint64_t offset, uint32_t length,
                                 uint16_t flags = 0) {
    p::RequestHeader h = request(p::Command::read, offset, length, flags);
    c.send_request(h);
    return read_structured_reply(c, h);
  }

  // BLOCK_STATUS with one selected context: the single chunk's contents.
  BlockStatus block_status(RawClient& c, uint64_t offset, uint32_t length, uint16_t flags = 0) {
    p::RequestHeader h = request(p::Command::block_status, offset, length, flags);
    c.send_request(h);
    RawClient::Chunk chunk = c.read_chunk();
    EXPECT_EQ(chunk.header.cookie, h.cookie);
    EXPECT_TRUE(chunk.done());
    return parse_block_status(chunk);
  }

  // An error reply in either form (simple, or a structured ERROR chunk with
  // DONE); returns the error after checking the cookie.
  static uint32_t read_error_reply(RawClient& c, uint64_t cookie) {
    if (c.peek_reply_magic() == p::kSimpleReplyMagic) {
      p::SimpleReply r = c.read_simple_reply();
      EXPECT_EQ(r.cookie, cookie);
      return r.error;
    }
    RawClient::Chunk chunk = c.read_chunk();
    EXPECT_EQ(chunk.header.cookie, cookie);
    EXPECT_EQ(chunk.type(), p::Chunk::error);
    EXPECT_TRUE(chunk.done());
    require(chunk.payload.size() >= 6, "short ERROR chunk");
    return p::load_be32(chunk.payload.data());
  }

  // A round trip proving the connection still works.
  void expect_alive(RawClient& c) { EXPECT_EQ(simple(c, request(p::Command::flush, 0, 0)), 0u); }

  asio::io_context io_{1};
  asio::thread_pool pool_;
  asio::executor_work_guard<asio::io_context::executor_type> guard_;
  std::thread io_thread_;
  ExportRegistry registry_;
  std::shared_ptr<block::MemoryDevice> disk_;
  std::shared_ptr<block::MemoryDevice> ro_;
  std::shared_ptr<PoolDevice> slow_;
  std::vector<std::unique_ptr<Session>> sessions_;
  std::shared_ptr<std::atomic<int>> releases_ = std::make_shared<std::atomic<int>>(0);
  std::shared_ptr<std::atomic<int>> cut_writes_ = std::make_shared<std::atomic<int>>(0);
  uint64_t next_cookie_ = 0x1000;
};

class Negotiation : public ConnectionHarness {};
class Transmission : public ConnectionHarness {};

// =================== Negotiation ===================

TEST_F(Negotiation, SendsGreetingBytesExactly) {
  RawClient& c = start().c();
  const Bytes expected = {std::byte{'N'},  std::byte{'B'}, std::byte{'D'}, std::byte{'M'},
                          std::byte{'A'},  std::byte{'G'}, std::byte{'I'}, std::byte{'C'},
                          std::byte{'I'},  std::byte{'H'}, std::byte{'A'}, std::byte{'V'},
                          std::byte{'E'},  std::byte{'O'}, std::byte{'P'}, std::byte{'T'},
                          std::byte{0x00}, std::byte{0x03}};
  EXPECT_EQ(c.read_exact(18), expected);
}

TEST_F(Negotiation, UnknownClientFlagsCloseConnection) {
  RawClient& c = start().c();
  handshake(c, p::kClientFlagFixedNewstyle | 0x4);
  EXPECT_TRUE(c.expect_closed());
}

TEST_F(Negotiation, HighClientFlagClosesConnection) {
  RawClient& c = start().c();
  handshake(c, 0x80000000u);
  EXPECT_TRUE(c.expect_closed());
}

TEST_F(Negotiation, BadOptionMagicClosesConnection) {
  RawClient& c = start().c();
  handshake(c);
  Bytes bad(16, std::byte{0});
  c.write_all(bad);
  EXPECT_TRUE(c.expect_closed());
}

TEST_F(Negotiation, ListNamesEveryExportThenAck) {
  RawClient& c = start().c();
  handshake(c);
  c.send_option(p::Option::list);
  std::vector<RawClient::OptionReply> servers;
  RawClient::OptionReply last = read_until_final(c, u32(p::Option::list), nullptr, &servers);
  EXPECT_EQ(last.type(), p::OptionReply::ack);
  EXPECT_TRUE(last.payload.empty());
  std::vector<std::pair<std::string, std::string>> got;
  for (const auto& r : servers) {
    ASSERT_EQ(r.type(), p::OptionReply::server);
    ASSERT_GE(r.payload.size(), 4u);
    uint32_t name_length = p::load_be32(r.payload.data());
    ASSERT_LE(name_length, r.payload.size() - 4);
    got.emplace_back(test::to_text(std::span(r.payload).subspan(4, name_length)),
                     test::to_text(std::span(r.payload).subspan(4 + name_length)));
  }
  const std::vector<std::pair<std::string, std::string>> expected = {
      {"disk", "test disk"}, {"ro", ""}, {"slow", "through the I/O pool"}, {"bitmap", ""}};
  EXPECT_EQ(got, expected);
}

TEST_F(Negotiation, ListWithPayloadIsInvalid) {
  RawClient& c = start().c();
  handshake(c);
  c.send_option(p::Option::list, test::to_bytes("x"));
  RawClient::OptionReply r = c.read_option_reply();
  EXPECT_EQ(r.type(), p::OptionReply::err_invalid);
  EXPECT_EQ(r.header.option, u32(p::Option::list));
  (void)go(c, "disk");
}

TEST_F(Negotiation, InfoForUnknownExportIsErrUnknown) {
  RawClient& c = start().c();
  handshake(c);
  c.send_option(p::Option::info, test::info_payload("nope"));
  RawClient::OptionReply r = c.read_option_reply();
  EXPECT_EQ(r.header.option, u32(p::Option::info));
  EXPECT_EQ(r.type(), p::OptionReply::err_unknown);
  EXPECT_EQ(r.text(), "export 'nope' not present");
  // Still negotiating: ABORT is acknowledged, then the server hangs up.
  c.send_option(p::Option::abort);
  RawClient::OptionReply a = c.read_option_reply();
  EXPECT_EQ(a.header.option, u32(p::Option::abort));
  EXPECT_EQ(a.type(), p::OptionReply::ack);
  EXPECT_TRUE(c.expect_closed());
}

TEST_F(Negotiation, GoForUnknownExportIsErrUnknownAndNegotiationContinues) {
  RawClient& c = start().c();
  handshake(c);
  c.send_option(p::Option::go, test::info_payload("nope"));
  RawClient::OptionReply r = c.read_option_reply();
  EXPECT_EQ(r.header.option, u32(p::Option::go));
  EXPECT_EQ(r.type(), p::OptionReply::err_unknown);
  InfoReplies info = go(c, "disk");
  EXPECT_EQ(info.size, kDiskSize);
}

TEST_F(Negotiation, MalformedGoIsInvalid) {
  RawClient& c = start().c();
  handshake(c);
  Bytes payload = test::info_payload("disk", {1, 1});  // duplicate info type
  c.send_option(p::Option::go, payload);
  RawClient::OptionReply r = c.read_option_reply();
  EXPECT_EQ(r.type(), p::OptionReply::err_invalid);
  (void)go(c, "disk");
}

TEST_F(Negotiation, GoReportsBlockSizeExportAndDescription) {
  Session& s = start();
  RawClient& c = s.c();
  handshake(c);
  InfoReplies info = go(c, "disk");
  ASSERT_TRUE(info.have_block_size);
  EXPECT_EQ(info.min_block, 1u);
  EXPECT_EQ(info.preferred_block, 4096u);
  EXPECT_EQ(info.max_block, 32u << 20);
  ASSERT_TRUE(info.have_export);
  EXPECT_EQ(info.size, kDiskSize);
  EXPECT_EQ(info.flags, kWritableFlags);
  EXPECT_TRUE(info.have_description);
  EXPECT_EQ(info.description, "test disk");
  EXPECT_FALSE(info.have_name);  // not requested
  EXPECT_EQ(info.count, 3);
  expect_alive(c);
}

TEST_F(Negotiation, GoOnReadOnlyExportAdvertisesReadOnlyFlags) {
  RawClient& c = start().c();
  handshake(c);
  InfoReplies info = go(c, "ro");
  EXPECT_EQ(info.size, kDiskSize);
  EXPECT_EQ(info.flags, kReadOnlyFlags);
  EXPECT_FALSE(info.have_description);  // empty descriptions are not sent
  EXPECT_EQ(info.count, 2);
}

TEST_F(Negotiation, StructuredRepliesAddDfFlag) {
  RawClient& c1 = start().c();
  handshake(c1);
  enable_structured(c1);
  EXPECT_EQ(go(c1, "disk").flags, kWritableFlags | p::kFlagSendDf);

  RawClient& c2 = start().c();
  handshake(c2);
  enable_structured(c2);
  EXPECT_EQ(go(c2, "ro").flags, kReadOnlyFlags | p::kFlagSendDf);
}

TEST_F(Negotiation, GoSendsNameWhenRequested) {
  RawClient& c = start().c();
  handshake(c);
  InfoReplies info =
      go(c, "slow",
         {static_cast<uint16_t>(p::Info::name), static_cast<uint16_t>(p::Info::block_size)});
  EXPECT_TRUE(info.have_name);
  EXPECT_EQ(info.name, "slow");
  EXPECT_TRUE(info.have_block_size);
  EXPECT_TRUE(info.have_export);
  EXPECT_EQ(info.description, "through the I/O pool");
}

TEST_F(Negotiation, InfoAnswersLikeGoButNegotiationContinues) {
  RawClient& c = start().c();
  handshake(c);
  c.send_option(p::Option::info, test::info_payload("ro", {static_cast<uint16_t>(p::Info::name)}));
  InfoReplies info;
  RawClient::OptionReply r = read_until_final(c, u32(p::Option::info), &info);
  EXPECT_EQ(r.type(), p::OptionReply::ack);
  EXPECT_EQ(info.name, "ro");
  EXPECT_EQ(info.size, kDiskSize);
  EXPECT_EQ(info.flags, kReadOnlyFlags);
  InfoReplies g = go(c, "disk");
  EXPECT_EQ(g.flags, kWritableFlags);
  expect_alive(c);
}

TEST_F(Negotiation, StructuredReplyTwiceIsInvalid) {
  RawClient& c = start().c();
  handshake(c);
  enable_structured(c);
  c.send_option(p::Option::structured_reply);
  RawClient::OptionReply r = c.read_option_reply();
  EXPECT_EQ(r.header.option, u32(p::Option::structured_reply));
  EXPECT_EQ(r.type(), p::OptionReply::err_invalid);
  EXPECT_EQ(r.text(), "structured replies already negotiated");
  // Still structured afterwards.
  EXPECT_EQ(go(c, "disk").flags, kWritableFlags | p::kFlagSendDf);
}

TEST_F(Negotiation, StructuredReplyWithPayloadIsInvalid) {
  RawClient& c = start().c();
  handshake(c);
  c.send_option(p::Option::structured_reply, test::to_bytes("zz"));
  RawClient::OptionReply r = c.read_option_reply();
  EXPECT_EQ(r.type(), p::OptionReply::err_invalid);
  EXPECT_EQ(go(c, "disk").flags, kWritableFlags);  // not negotiated
}

TEST_F(Negotiation, SetMetaContextBeforeStructuredIsInvalid) {
  RawClient& c = start().c();
  handshake(c);
  c.send_option(p::Option::set_meta_context,
                test::meta_context_payload("disk", {"base:allocation"}));
  RawClient::OptionReply r = c.read_option_reply();
  EXPECT_EQ(r.header.option, u32(p::Option::set_meta_context));
  EXPECT_EQ(r.type(), p::OptionReply::err_invalid);
  EXPECT_EQ(r.text(), "SET_META_CONTEXT requires structured replies");
}

TEST_F(Negotiation, ListMetaContextWithoutQueriesListsBaseAllocation) {
  RawClient& c = start().c();
  handshake(c);
  enable_structured(c);
  c.send_option(p::Option::list_meta_context, test::meta_context_payload("disk"));
  std::vector<RawClient::OptionReply> contexts;
  RawClient::OptionReply r =
      read_until_final(c, u32(p::Option::list_meta_context), nullptr, &contexts);
  EXPECT_EQ(r.type(), p::OptionReply::ack);
  ASSERT_EQ(contexts.size(), 1u);
  EXPECT_EQ(contexts[0].type(), p::OptionReply::meta_context);
  ASSERT_EQ(contexts[0].payload.size(), 4u + 15u);
  EXPECT_EQ(p::load_be32(contexts[0].payload.data()), 0u);
  EXPECT_EQ(test::to_text(std::span(contexts[0].payload).subspan(4)), "base:allocation");
}

TEST_F(Negotiation, ListMetaContextUnknownExportIsErrUnknown) {
  RawClient& c = start().c();
  handshake(c);
  enable_structured(c);
  c.send_option(p::Option::list_meta_context, test::meta_context_payload("nope"));
  RawClient::OptionReply r = c.read_option_reply();
  EXPECT_EQ(r.type(), p::OptionReply::err_unknown);
}

TEST_F(Negotiation, SetMetaContextBaseAllocationReturnsOneContext) {
  RawClient& c = start().c();
  handshake(c);
  enable_structured(c);
  c.send_option(p::Option::set_meta_context,
                test::meta_context_payload("disk", {"base:allocation", "qemu:dirty-bitmap:none"}));
  std::vector<RawClient::OptionReply> contexts;
  RawClient::OptionReply r =
      read_until_final(c, u32(p::Option::set_meta_context), nullptr, &contexts);
  EXPECT_EQ(r.type(), p::OptionReply::ack);
  ASSERT_EQ(contexts.size(), 1u);
  EXPECT_EQ(contexts[0].header.option, u32(p::Option::set_meta_context));
  EXPECT_EQ(contexts[0].type(), p::OptionReply::meta_context);
  ASSERT_GE(contexts[0].payload.size(), 4u);
  EXPECT_EQ(p::load_be32(contexts[0].payload.data()), 0u);
  EXPECT_EQ(test::to_text(std::span(contexts[0].payload).subspan(4)), "base:allocation");
}

TEST_F(Negotiation, StartTlsIsRefusedByPolicy) {
  RawClient& c = start().c();
  handshake(c);
  c.send_option(p::Option::starttls);
  RawClient::OptionReply r = c.read_option_reply();
  EXPECT_EQ(r.header.option, u32(p::Option::starttls));
  EXPECT_EQ(r.type(), p::OptionReply::err_policy);
  EXPECT_EQ(r.text(), "TLS not configured");
  (void)go(c, "disk");
}

TEST_F(Negotiation, ExtendedHeadersAreUnsupported) {
  RawClient& c = start().c();
  handshake(c);
  c.send_option(p::Option::extended_headers);
  RawClient::OptionReply r = c.read_option_reply();
  EXPECT_EQ(r.header.option, u32(p::Option::extended_headers));
  EXPECT_EQ(r.type(), p::OptionReply::err_unsup);
  (void)go(c, "disk");
}

TEST_F(Negotiation, UnknownOptionIsUnsupportedAndNextOptionWorks) {
  RawClient& c = start().c();
  handshake(c);
  c.send_option(0x1234, test::to_bytes("ignored payload"));
  RawClient::OptionReply r = c.read_option_reply();
  EXPECT_EQ(r.header.option, 0x1234u);
  EXPECT_EQ(r.type(), p::OptionReply::err_unsup);
  EXPECT_LE(r.payload.size(), 4096u);
  c.send_option(p::Option::list);
  std::vector<RawClient::OptionReply> servers;
  EXPECT_EQ(read_until_final(c, u32(p::Option::list), nullptr, &servers).type(),
            p::OptionReply::ack);
  EXPECT_EQ(servers.size(), 4u);
}

TEST_F(Negotiation, OptionOfExactlyOneMebibyteIsRead) {
  RawClient& c = start().c();
  handshake(c);
  Bytes payload(1u << 20, std::byte{0x41});
  c.send_option(0x1234, payload);
  RawClient::OptionReply r = c.read_option_reply();
  EXPECT_EQ(r.header.option, 0x1234u);
  EXPECT_EQ(r.type(), p::OptionReply::err_unsup);
  (void)go(c, "disk");
}

TEST_F(Negotiation, OptionLongerThanOneMebibyteClosesConnection) {
  RawClient& c = start().c();
  handshake(c);
  c.send_option_header(u32(p::Option::list), (1u << 20) + 1);
  EXPECT_TRUE(c.expect_closed());
}

TEST_F(Negotiation, ExportNameForUnknownExportClosesConnection) {
  RawClient& c = start().c();
  handshake(c);
  c.send_option(p::Option::export_name, test::to_bytes("nope"));
  EXPECT_TRUE(c.expect_closed());
}

TEST_F(Negotiation, ExportNameSendsSizeFlagsAndZeroes) {
  RawClient& c = start().c();
  handshake(c, p::kClientFlagFixedNewstyle);  // no NO_ZEROES
  c.send_option(p::Option::export_name, test::to_bytes("disk"));
  Bytes reply = c.read_exact(10 + 124);
  EXPECT_EQ(p::load_be64(reply.data()), kDiskSize);
  EXPECT_EQ(p::load_be16(reply.data() + 8), kWritableFlags);
  EXPECT_TRUE(
      std::all_of(reply.begin() + 10, reply.end(), [](std::byte b) { return b == std::byte{0}; }));
  // Transmission follows immediately: the next bytes are a request's reply.
  expect_alive(c);
}

TEST_F(Negotiation, ExportNameWithNoZeroesSendsTenBytes) {
  RawClient& c = start().c();
  handshake(c);
  c.send_option(p::Option::export_name, test::to_bytes("ro"));
  Bytes reply = c.read_exact(10);
  EXPECT_EQ(p::load_be64(reply.data()), kDiskSize);
  EXPECT_EQ(p::load_be16(reply.data() + 8), kReadOnlyFlags);
  expect_alive(c);
}

TEST_F(Negotiation, PlainNewstyleClientMayOnlyUseExportName) {
  RawClient& c1 = start().c();
  handshake(c1, 0);
  c1.send_option(p::Option::list);
  EXPECT_TRUE(c1.expect_closed());

  RawClient& c2 = start().c();
  handshake(c2, 0);
  c2.send_option(p::Option::export_name, test::to_bytes("disk"));
  Bytes reply = c2.read_exact(10 + 124);
  EXPECT_EQ(p::load_be64(reply.data()), kDiskSize);
  expect_alive(c2);
}

TEST_F(Negotiation, AbortIsAcknowledgedThenClosed) {
  RawClient& c = start().c();
  handshake(c);
  c.send_option(p::Option::abort);
  RawClient::OptionReply r = c.read_option_reply();
  EXPECT_EQ(r.header.option, u32(p::Option::abort));
  EXPECT_EQ(r.type(), p::OptionReply::ack);
  EXPECT_TRUE(c.expect_closed());
}

TEST_F(Negotiation, ClientVanishingEndsConnection) {
  Session& s = start();
  handshake(s.c());
  s.c().close();
  EXPECT_TRUE(s.done->wait(kTimeout));
}

TEST_F(Negotiation, HandshakeTimeoutClosesConnection) {
  ConnectionLimits limits;
  limits.handshake_timeout = 1s;
  Session& s = start(limits);
  handshake(s.c());
  EXPECT_TRUE(s.c().expect_closed());
  EXPECT_TRUE(s.done->wait(kTimeout));
}

TEST_F(Negotiation, StopDuringNegotiationClosesConnection) {
  Session& s = start();
  handshake(s.c());
  stop(s);
  EXPECT_TRUE(s.c().expect_closed());
  EXPECT_TRUE(s.done->wait(kTimeout));
}

TEST_F(Negotiation, SetMetaContextForOtherExportIsDroppedAtGo) {
  RawClient& c = start().c();
  handshake(c);
  enable_structured(c);
  select_base_allocation(c, "ro");
  (void)go(c, "disk");
  // base:allocation was selected for "ro", so "disk" has no context.
  p::RequestHeader h = request(p::Command::block_status, 0, 4096);
  c.send_request(h);
  EXPECT_EQ(read_error_reply(c, h.cookie), u32(p::Error::inval));
  expect_alive(c);
}

TEST_F(Negotiation, ListMetaContextWildcardListsBitmaps) {
  RawClient& c = start().c();
  handshake(c);
  enable_structured(c);
  c.send_option(p::Option::list_meta_context, test::meta_context_payload("bitmap", {"qemu:"}));
  std::vector<RawClient::OptionReply> contexts;
  EXPECT_EQ(read_until_final(c, u32(p::Option::list_meta_context), nullptr, &contexts).type(),
            p::OptionReply::ack);
  ASSERT_EQ(contexts.size(), 1u);
  EXPECT_EQ(test::to_text(std::span(contexts[0].payload).subspan(4)), "qemu:dirty-bitmap:b0");
}

TEST_F(Negotiation, SetMetaContextTwoContextsGetDistinctIds) {
  RawClient& c = start().c();
  handshake(c);
  enable_structured(c);
  c.send_option(p::Option::set_meta_context,
                test::meta_context_payload("bitmap", {"qemu:dirty-bitmap:b0", "base:allocation"}));
  std::vector<RawClient::OptionReply> contexts;
  EXPECT_EQ(read_until_final(c, u32(p::Option::set_meta_context), nullptr, &contexts).type(),
            p::OptionReply::ack);
  ASSERT_EQ(contexts.size(), 2u);
  std::map<std::string, uint32_t> ids;
  for (const auto& r : contexts) {
    ASSERT_GE(r.payload.size(), 4u);
    ids[test::to_text(std::span(r.payload).subspan(4))] = p::load_be32(r.payload.data());
  }
  ASSERT_EQ(ids.size(), 2u);
  EXPECT_NE(ids["base:allocation"], ids["qemu:dirty-bitmap:b0"]);
}

TEST_F(Negotiation, FailedSetMetaContextClearsSelection) {
  RawClient& c = start().c();
  handshake(c);
  enable_structured(c);
  select_base_allocation(c, "disk");
  c.send_option(p::Option::set_meta_context,
                test::meta_context_payload("nope", {"base:allocation"}));
  EXPECT_EQ(c.read_option_reply().type(), p::OptionReply::err_unknown);
  (void)go(c, "disk");
  p::RequestHeader h = request(p::Command::block_status, 0, 4096);
  c.send_request(h);
  EXPECT_EQ(read_error_reply(c, h.cookie), u32(p::Error::inval));
}

TEST_F(Negotiation, ExportStateIsSetOnlyInTransmission) {
  Session& s = start();
  handshake(s.c());
  auto conn = s.conn;
  EXPECT_EQ(on_io([conn] { return conn->export_state(); }), nullptr);
  (void)go(s.c(), "ro");
  expect_alive(s.c());
  EXPECT_EQ(on_io([conn] { return conn->export_state(); }), registry_.find("ro")->state.get());
}

// =================== Transmission ===================

TEST_F(Transmission, WriteThenReadBackSimpleReplies) {
  RawClient& c = open().c();
  const Bytes data = test::pattern(8192 + 3, 7);
  write(c, 4096 + 100, data);
  EXPECT_EQ(read_simple(c, 4096 + 100, static_cast<uint32_t>(data.size())), data);
  // The bytes around it are untouched.
  Bytes around = read_simple(c, 4096, 100);
  EXPECT_EQ(around, Bytes(100, std::byte{0}));
  Bytes direct(data.size());
  ASSERT_FALSE(disk_->read(4096 + 100, direct));
  EXPECT_EQ(direct, data);
}

TEST_F(Transmission, WriteThenReadBackStructuredOffsetData) {
  RawClient& c = open({.structured = true}).c();
  const Bytes data = test::pattern(12288, 9);
  write(c, 65536, data);
  p::RequestHeader h = request(p::Command::read, 65536, 12288);
  c.send_request(h);
  RawClient::Chunk chunk = c.read_chunk();
  EXPECT_EQ(chunk.header.cookie, h.cookie);
  EXPECT_EQ(chunk.type(), p::Chunk::offset_data);
  EXPECT_TRUE(chunk.done());
  ASSERT_EQ(chunk.payload.size(), 8u + 12288u);
  EXPECT_EQ(p::load_be64(chunk.payload.data()), 65536u);
  EXPECT_EQ(Bytes(chunk.payload.begin() + 8, chunk.payload.end()), data);
}

TEST_F(Transmission, WriteThenReadBackThroughIoPool) {
  RawClient& c = open({.export_name = "slow", .structured = true}).c();
  const Bytes data = test::pattern(70000, 11);
  write(c, 1000, data);
  StructuredRead r = read_structured(c, 1000, 70000);
  EXPECT_EQ(r.error, 0u);
  EXPECT_EQ(r.data, data);
}

TEST_F(Transmission, ZeroLengthReadIsAnswered) {
  RawClient& c1 = open().c();
  EXPECT_EQ(read_simple(c1, 0, 0), Bytes{});
  RawClient& c2 = open({.structured = true}).c();
  StructuredRead r = read_structured(c2, 0, 0);
  EXPECT_EQ(r.error, 0u);
  EXPECT_EQ(r.types, chunk_names({p::Chunk::none}));
}

// Reads that complete inline (MemoryDevice::try_read never blocks) and find
// only zeroes are answered with one OFFSET_HOLE from 64 KiB up.
TEST_F(Transmission, LargeReadOfZeroRegionIsOneHole) {
  RawClient& c = open({.structured = true}).c();
  write(c, 60 * 1024, test::pattern(4096, 3));  // data just before the range
  for (uint32_t length : {64u * 1024, 256u * 1024}) {
    SCOPED_TRACE("length " + std::to_string(length));
    StructuredRead r = read_structured(c, 64 * 1024, length);
    EXPECT_EQ(r.error, 0u);
    ASSERT_EQ(r.types, chunk_names({p::Chunk::offset_hole}));
    EXPECT_TRUE(r.chunks[0].done());
    EXPECT_EQ(p::load_be64(r.chunks[0].payload.data()), 64u * 1024);
    EXPECT_EQ(p::load_be32(r.chunks[0].payload.data() + 8), length);
    EXPECT_EQ(r.data, Bytes(length, std::byte{0}));
  }
}

TEST_F(Transmission, ZeroesInSimpleReplyAreData) {
  RawClient& c = open().c();
  EXPECT_EQ(read_simple(c, 0, 128 * 1024), Bytes(128 * 1024, std::byte{0}));
  expect_alive(c);
}

TEST_F(Transmission, LargeInlineReadMixingDataAndZeroes) {
  RawClient& c = open({.structured = true}).c();
  const Bytes data = test::pattern(4096, 3);
  write(c, 68 * 1024, data);
  StructuredRead r = read_structured(c, 0, 128 * 1024);  // checks cover/overlap/DONE
  EXPECT_EQ(r.error, 0u);
  Bytes expected(128 * 1024, std::byte{0});
  std::copy(data.begin(), data.end(), expected.begin() + 68 * 1024);
  EXPECT_EQ(r.data, expected);
  EXPECT_NE(std::find(r.types.begin(), r.types.end(),
                      p::chunk_name(static_cast<uint16_t>(p::Chunk::offset_data))),
            r.types.end())
      << "no OFFSET_DATA chunk";
}

TEST_F(Transmission, LargeReadOfZeroRegionThroughIoPoolSendsHoles) {
  RawClient& c = open({.export_name = "slow", .structured = true}).c();
  const Bytes data = test::pattern(4096, 3);
  write(c, 68 * 1024, data);
  StructuredRead r = read_structured(c, 0, 128 * 1024);
  EXPECT_EQ(r.error, 0u);
  Bytes expected(128 * 1024, std::byte{0});
  std::copy(data.begin(), data.end(), expected.begin() + 68 * 1024);
  EXPECT_EQ(r.data, expected);
  ASSERT_EQ(r.types,
            chunk_names({p::Chunk::offset_hole, p::Chunk::offset_data, p::Chunk::offset_hole}));
  // Exact chunk boundaries.
  EXPECT_EQ(p::load_be64(r.chunks[0].payload.data()), 0u);
  EXPECT_EQ(p::load_be32(r.chunks[0].payload.data() + 8), 68u * 1024);
  EXPECT_EQ(p::load_be64(r.chunks[1].payload.data()), 68u * 1024);
  EXPECT_EQ(r.chunks[1].payload.size(), 8u + 4096);
  EXPECT_EQ(p::load_be64(r.chunks[2].payload.data()), 72u * 1024);
  EXPECT_EQ(p::load_be32(r.chunks[2].payload.data() + 8), 56u * 1024);
}

TEST_F(Transmission, AllZero64KibReadThroughIoPoolIsOneHole) {
  RawClient& c = open({.export_name = "slow", .structured = true}).c();
  StructuredRead r = read_structured(c, 128 * 1024, 64 * 1024);
  EXPECT_EQ(r.error, 0u);
  ASSERT_EQ(r.types, chunk_names({p::Chunk::offset_hole}));
  EXPECT_EQ(p::load_be64(r.chunks[0].payload.data()), 128u * 1024);
  EXPECT_EQ(p::load_be32(r.chunks[0].payload.data() + 8), 64u * 1024);
}

TEST_F(Transmission, DfReadIsOneDataChunkEvenOverHoles) {
  RawClient& c = open({.export_name = "slow", .structured = true}).c();
  StructuredRead r = read_structured(c, 0, 128 * 1024, p::kCmdFlagDf);
  EXPECT_EQ(r.error, 0u);
  EXPECT_EQ(r.types, chunk_names({p::Chunk::offset_data}));
  EXPECT_EQ(r.data, Bytes(128 * 1024, std::byte{0}));
}

TEST_F(Transmission, ReadOfTailUpToExportEnd) {
  RawClient& c = open({.export_name = "slow", .structured = true}).c();
  const Bytes data = test::pattern(512, 5);
  write(c, kDiskSize - 512, data);
  StructuredRead r = read_structured(c, kDiskSize - 96 * 1024, 96 * 1024);
  EXPECT_EQ(r.error, 0u);
  EXPECT_TRUE(std::equal(data.begin(), data.end(), r.data.end() - 512));
}

TEST_F(Transmission, BlockStatusReportsAllocation) {
  RawClient& c = open({.structured = true, .base_allocation = true}).c();
  write(c, 8192, test::pattern(4096, 1));
  BlockStatus bs = block_status(c, 0, 65536);
  EXPECT_EQ(bs.context_id, 0u);
  EXPECT_EQ(bs.extents, (std::vector<Ext>{{8192, kHoleZero}, {4096, 0}, {53248, kHoleZero}}));
}

TEST_F(Transmission, BlockStatusReqOneReturnsOneExtent) {
  RawClient& c = open({.structured = true, .base_allocation = true}).c();
  write(c, 8192, test::pattern(4096, 1));
  EXPECT_EQ(block_status(c, 0, 65536, p::kCmdFlagReqOne).extents,
            (std::vector<Ext>{{8192, kHoleZero}}));
  EXPECT_EQ(block_status(c, 8192, 65536, p::kCmdFlagReqOne).extents, (std::vector<Ext>{{4096, 0}}));
  EXPECT_EQ(block_status(c, 10000, 100, p::kCmdFlagReqOne).extents, (std::vector<Ext>{{100, 0}}));
}

TEST_F(Transmission, BlockStatusNeverPastRequestEnd) {
  RawClient& c = open({.structured = true, .base_allocation = true}).c();
  write(c, 8192, test::pattern(4096, 1));
  write(c, kDiskSize - 100, test::pattern(100, 2));
  struct Case {
    uint64_t offset;
    uint32_t length;
    std::vector<Ext> expected;  // without REQ_ONE
  };
  const std::vector<Case> cases = {
      {2048, 1024, {{1024, kHoleZero}}},
      {6144, 4096, {{2048, kHoleZero}, {2048, 0}}},
      {9000, 1, {{1, 0}}},
      {12287, 2, {{1, 0}, {1, kHoleZero}}},
      {kDiskSize - 4608, 4096, {{4096, kHoleZero}}},
      {kDiskSize - 512, 512, {{512, 0}}},
      {kDiskSize - 5000, 5000, {{4488, kHoleZero}, {512, 0}}},
  };
  for (const Case& k : cases) {
    SCOPED_TRACE("offset " + std::to_string(k.offset) + " length " + std::to_string(k.length));
    EXPECT_EQ(block_status(c, k.offset, k.length).extents, k.expected);
    std::vector<Ext> one = block_status(c, k.offset, k.length, p::kCmdFlagReqOne).extents;
    ASSERT_EQ(one.size(), 1u);
    EXPECT_EQ(one[0], k.expected[0]);
  }
}

TEST_F(Transmission, BlockStatusWholeDiskCoversExactly) {
  RawClient& c = open({.export_name = "slow", .structured = true, .base_allocation = true}).c();
  for (uint64_t off = 0; off < kDiskSize; off += 40960) write(c, off, test::pattern(10, 1));
  BlockStatus bs = block_status(c, 0, static_cast<uint32_t>(kDiskSize));
  uint64_t total = 0;
  for (const Ext& e : bs.extents) {
    EXPECT_GT(e.length, 0u);
    total += e.length;
  }
  EXPECT_EQ(total, kDiskSize);
  EXPECT_EQ(bs.extents.front(), (Ext{4096, 0}));
}

TEST_F(Transmission, BlockStatusErrors) {
  RawClient& c = open({.structured = true, .base_allocation = true}).c();
  p::RequestHeader past = request(p::Command::block_status, kDiskSize - 10, 11);
  c.send_request(past);
  EXPECT_EQ(read_error_reply(c, past.cookie), u32(p::Error::inval));
  p::RequestHeader empty = request(p::Command::block_status, 0, 0);
  c.send_request(empty);
  EXPECT_EQ(read_error_reply(c, empty.cookie), u32(p::Error::inval));
  expect_alive(c);
}

TEST_F(Transmission, BlockStatusWithoutMetaContextIsEinval) {
  RawClient& c = open({.structured = true}).c();
  p::RequestHeader h = request(p::Command::block_status, 0, 4096);
  c.send_request(h);
  EXPECT_EQ(read_error_reply(c, h.cookie), u32(p::Error::inval));
  expect_alive(c);
}

TEST_F(Transmission, ReadPastEndIsEinvalWithCookieEchoed) {
  RawClient& c = open().c();
  p::RequestHeader h = request(p::Command::read, kDiskSize - 100, 200);
  h.cookie = 0xfeedface12345678;
  EXPECT_EQ(simple(c, h), u32(p::Error::inval));
  // No data follows an error: the next reply comes straight after.
  expect_alive(c);
  p::RequestHeader wrap = request(p::Command::read, UINT64_MAX - 10, 100);
  EXPECT_EQ(simple(c, wrap), u32(p::Error::inval));
  expect_alive(c);
}

TEST_F(Transmission, StructuredReadPastEndIsErrorChunk) {
  RawClient& c = open({.structured = true}).c();
  p::RequestHeader h = request(p::Command::read, kDiskSize, 1);
  h.cookie = 0x0102030405060708;
  c.send_request(h);
  StructuredRead r = read_structured_reply(c, h);
  EXPECT_EQ(r.error, u32(p::Error::inval));
  EXPECT_EQ(r.types, chunk_names({p::Chunk::error}));
  expect_alive(c);
}

TEST_F(Transmission, WriteToReadOnlyExportIsEperm) {
  RawClient& c = open({.export_name = "ro"}).c();
  const Bytes data = test::pattern(4096, 1);
  EXPECT_EQ(simple(c, request(p::Command::write, 0, 4096), data), u32(p::Error::perm));
  EXPECT_EQ(simple(c, request(p::Command::trim, 0, 4096)), u32(p::Error::perm));
  EXPECT_EQ(simple(c, request(p::Command::write_zeroes, 0, 4096)), u32(p::Error::perm));
  // The payload was drained: the next request is understood.
  expect_alive(c);
  EXPECT_EQ(read_simple(c, 0, 4096), Bytes(4096, std::byte{0}));
}

TEST_F(Transmission, WritePastEndIsRejectedAndPayloadDrained) {
  RawClient& c = open().c();
  const Bytes data = test::pattern(40000, 1);  // larger than the 16 KiB direct-read threshold
  EXPECT_EQ(simple(c, request(p::Command::write, kDiskSize - 100, 40000), data),
            u32(p::Error::inval));
  expect_alive(c);
}

TEST_F(Transmission, UnknownCommandIsEinval) {
  RawClient& c = open().c();
  p::RequestHeader h{0, 99, 0xabcdef, 0, 0};
  EXPECT_EQ(simple(c, h), u32(p::Error::inval));
  expect_alive(c);
}

TEST_F(Transmission, UnadvertisedFlagIsEinval) {
  RawClient& c = open().c();
  // DF without structured replies.
  EXPECT_EQ(simple(c, request(p::Command::read, 0, 512, p::kCmdFlagDf)), u32(p::Error::inval));
  expect_alive(c);
}

TEST_F(Transmission, OversizedWriteGetsErrorThenClose) {
  RawClient& c = open().c();
  p::RequestHeader h = request(p::Command::write, 0, 64u << 20);
  c.send_request(h);  // the 64 MiB payload is never sent
  p::SimpleReply r = c.read_simple_reply();
  EXPECT_EQ(r.cookie, h.cookie);
  EXPECT_EQ(r.error, u32(p::Error::inval));
  EXPECT_TRUE(c.expect_closed());
}

TEST_F(Transmission, BadRequestMagicClosesConnection) {
  RawClient& c = open().c();
  c.write_all(Bytes(28, std::byte{0x11}));
  EXPECT_TRUE(c.expect_closed());
}

TEST_F(Transmission, OtherCommandsSucceed) {
  RawClient& c = open({.structured = true, .base_allocation = true}).c();
  write(c, 0, test::pattern(16384, 4));
  EXPECT_EQ(
      simple(c, request(p::Command::write, 16384, 4096, p::kCmdFlagFua), test::pattern(4096, 5)),
      0u);
  EXPECT_EQ(simple(c, request(p::Command::flush, 0, 0)), 0u);
  EXPECT_EQ(simple(c, request(p::Command::cache, 0, 8192)), 0u);
  EXPECT_EQ(simple(c, request(p::Command::trim, 0, 4096)), 0u);
  EXPECT_EQ(simple(c, request(p::Command::write_zeroes, 4096, 4096, p::kCmdFlagNoHole)), 0u);
  EXPECT_EQ(simple(c, request(p::Command::write_zeroes, 8192, 4096, p::kCmdFlagFastZero)), 0u);
  StructuredRead r = read_structured(c, 0, 16384);
  Bytes expected(16384, std::byte{0});
  Bytes tail = test::pattern(16384, 4);
  std::copy(tail.begin() + 12288, tail.end(), expected.begin() + 12288);
  EXPECT_EQ(r.data, expected);
  EXPECT_EQ(block_status(c, 0, 20480).extents, (std::vector<Ext>{{12288, kHoleZero}, {8192, 0}}));
}

TEST_F(Transmission, PipelinedRequestsAllAnswered) {
  RawClient& c = open({.structured = true}).c();
  constexpr int kReads = 16;
  constexpr int kWrites = 16;
  constexpr uint32_t kLen = 4096;
  for (int i = 0; i < kReads; ++i) write(c, uint64_t(i) * kLen, test::pattern(kLen, uint8_t(i)));
  // 32 requests before reading any reply.
  std::map<uint64_t, p::RequestHeader> pending;
  for (int i = 0; i < kReads + kWrites; ++i) {
    if (i % 2 == 0) {
      p::RequestHeader h = request(p::Command::read, uint64_t(i / 2) * kLen, kLen);
      c.send_request(h);
      pending[h.cookie] = h;
    } else {
      uint64_t off = (512u << 10) + uint64_t(i / 2) * kLen;
      p::RequestHeader h = request(p::Command::write, off, kLen);
      c.send_request(h, test::pattern(kLen, uint8_t(100 + i / 2)));
      pending[h.cookie] = h;
    }
  }
  std::set<uint64_t> seen;
  for (int n = 0; n < kReads + kWrites; ++n) {
    if (c.peek_reply_magic() == p::kSimpleReplyMagic) {
      p::SimpleReply r = c.read_simple_reply();
      ASSERT_TRUE(pending.count(r.cookie)) << "unknown cookie " << r.cookie;
      EXPECT_EQ(pending[r.cookie].type, u16(p::Command::write));
      EXPECT_EQ(r.error, 0u);
      EXPECT_TRUE(seen.insert(r.cookie).second) << "cookie answered twice";
    } else {
      RawClient::Chunk chunk = c.read_chunk();
      ASSERT_TRUE(pending.count(chunk.header.cookie)) << "unknown cookie " << chunk.header.cookie;
      const p::RequestHeader& h = pending[chunk.header.cookie];
      ASSERT_EQ(h.type, u16(p::Command::read));
      EXPECT_EQ(chunk.type(), p::Chunk::offset_data);
      EXPECT_TRUE(chunk.done());
      ASSERT_EQ(chunk.payload.size(), 8u + kLen);
      EXPECT_EQ(p::load_be64(chunk.payload.data()), h.offset);
      EXPECT_EQ(Bytes(chunk.payload.begin() + 8, chunk.payload.end()),
                test::pattern(kLen, uint8_t(h.offset / kLen)));
      EXPECT_TRUE(seen.insert(chunk.header.cookie).second) << "cookie answered twice";
    }
  }
  EXPECT_EQ(seen.size(), pending.size());
  for (int i = 0; i < kWrites; ++i) {
    Bytes got(kLen);
    ASSERT_FALSE(disk_->read((512u << 10) + uint64_t(i) * kLen, got));
    EXPECT_EQ(got, test::pattern(kLen, uint8_t(100 + i))) << "write " << i;
  }
}

// A burst of large page-cache reads holds more read data than the server
// lets wait in its send queue (1 MiB): the reads wait for the writer, and
// every reply still arrives, with the right data, even when the client only
// starts reading replies after the socket has filled up.
TEST_F(Transmission, LargeReadBurstIsAnsweredInFull) {
  RawClient& c = open().c();
  const Bytes disk = test::pattern(1u << 20, 7);
  write(c, 0, disk);
  constexpr uint32_t kLen = 256u << 10;
  constexpr int kReads = 24;  // 6 MiB of replies
  std::map<uint64_t, uint64_t> offset_of;
  for (int i = 0; i < kReads; ++i) {
    p::RequestHeader h = request(p::Command::read, uint64_t(i % 4) * kLen, kLen);
    c.send_request(h);
    offset_of[h.cookie] = h.offset;
  }
  // A write after the burst is still read and answered.
  p::RequestHeader w = request(p::Command::write, 1u << 20, 512);
  c.send_request(w, test::pattern(512, 9));
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  int reads = 0, writes = 0;
  for (int n = 0; n < kReads + 1; ++n) {
    p::SimpleReply r = c.read_simple_reply();
    ASSERT_EQ(r.error, 0u);
    if (r.cookie == w.cookie) {
      ++writes;
      continue;
    }
    auto it = offset_of.find(r.cookie);
    ASSERT_NE(it, offset_of.end()) << "unknown or repeated cookie " << r.cookie;
    const Bytes got = c.read_exact(kLen);
    ASSERT_TRUE(std::equal(got.begin(), got.end(), disk.begin() + static_cast<long>(it->second)))
        << "data of the read at " << it->second;
    offset_of.erase(it);
    ++reads;
  }
  EXPECT_EQ(reads, kReads);
  EXPECT_EQ(writes, 1);
  EXPECT_EQ(read_simple(c, 1u << 20, 512), test::pattern(512, 9));
}

// Reads waiting for room in the send queue do not keep a closed connection
// alive: close_now() ends it while the client reads nothing.
TEST_F(Transmission, CloseNowWhileReadsWaitForTheWriter) {
  Session& s = open();
  RawClient& c = s.c();
  for (int i = 0; i < 24; ++i) c.send_request(request(p::Command::read, 0, 256u << 10));
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  asio::post(io_, [conn = s.conn] { conn->close_now(); });
  EXPECT_TRUE(s.done->wait(kTimeout));
}

TEST_F(Transmission, PipelinedBeyondRequestLimitThroughIoPool) {
  ConnectionLimits limits;
  limits.max_requests = 4;
  RawClient& c = open({.export_name = "slow", .limits = limits}).c();
  std::set<uint64_t> cookies;
  for (int i = 0; i < 32; ++i) {
    p::RequestHeader h = request(p::Command::write, uint64_t(i) * 4096, 4096);
    c.send_request(h, test::pattern(4096, uint8_t(i)));
    cookies.insert(h.cookie);
  }
  for (int i = 0; i < 32; ++i) {
    p::SimpleReply r = c.read_simple_reply();
    EXPECT_EQ(r.error, 0u);
    EXPECT_EQ(cookies.erase(r.cookie), 1u) << "unexpected or repeated cookie " << r.cookie;
  }
  EXPECT_TRUE(cookies.empty());
  for (int i = 0; i < 32; ++i) {
    EXPECT_EQ(read_simple(c, uint64_t(i) * 4096, 4096), test::pattern(4096, uint8_t(i)));
  }
}

TEST_F(Transmission, DiscAfterInFlightRequestsStillDeliversReplies) {
  Session& s = open({.export_name = "slow"});
  RawClient& c = s.c();
  slow_->gate.close();
  std::set<uint64_t> cookies;
  for (int i = 0; i < 4; ++i) {
    p::RequestHeader h = request(p::Command::write, uint64_t(i) * 4096, 4096);
    c.send_request(h, test::pattern(4096, uint8_t(i)));
    cookies.insert(h.cookie);
  }
  ASSERT_TRUE(slow_->gate.wait_entered(4)) << "writes did not reach the device";
  c.send_request(request(p::Command::disc, 0, 0));
  slow_->gate.open();
  for (int i = 0; i < 4; ++i) {
    p::SimpleReply r = c.read_simple_reply();
    EXPECT_EQ(r.error, 0u);
    EXPECT_EQ(cookies.erase(r.cookie), 1u);
  }
  EXPECT_TRUE(c.expect_closed());
  EXPECT_TRUE(s.done->wait(kTimeout));
  Bytes got(4096);
  ASSERT_FALSE(slow_->inner().read(3 * 4096, got));
  EXPECT_EQ(got, test::pattern(4096, 3));
}

TEST_F(Transmission, StopLetsInFlightRepliesGoOut) {
  Session& s = open({.export_name = "slow", .structured = true});
  RawClient& c = s.c();
  slow_->gate.close();
  std::set<uint64_t> cookies;
  for (int i = 0; i < 4; ++i) {
    p::RequestHeader h = request(p::Command::write, uint64_t(i) * 4096, 4096);
    c.send_request(h, test::pattern(4096, uint8_t(i)));
    cookies.insert(h.cookie);
  }
  ASSERT_TRUE(slow_->gate.wait_entered(4)) << "writes did not reach the device";
  stop(s);
  slow_->gate.open();
  for (int i = 0; i < 4; ++i) {
    p::SimpleReply r = c.read_simple_reply();
    EXPECT_EQ(r.error, 0u);
    EXPECT_EQ(cookies.erase(r.cookie), 1u);
  }
  EXPECT_TRUE(c.expect_closed());
  EXPECT_TRUE(s.done->wait(kTimeout));
}

TEST_F(Transmission, StopWhileIdleClosesConnection) {
  Session& s = open();
  expect_alive(s.c());
  stop(s);
  EXPECT_TRUE(s.c().expect_closed());
  EXPECT_TRUE(s.done->wait(kTimeout));
}

TEST_F(Transmission, ClientVanishingWithRequestsInFlightEndsConnection) {
  Session& s = open({.export_name = "slow"});
  slow_->gate.close();
  for (int i = 0; i < 4; ++i) {
    s.c().send_request(request(p::Command::write, uint64_t(i) * 4096, 4096),
                       test::pattern(4096, 1));
  }
  ASSERT_TRUE(slow_->gate.wait_entered(4));
  s.c().close();
  slow_->gate.open();
  EXPECT_TRUE(s.done->wait(kTimeout));
}

TEST_F(Transmission, DeletedExportEndsConnectionAtNextRequest) {
  Session& s = open();
  expect_alive(s.c());
  ExportPtr e = registry_.remove("disk");
  ASSERT_NE(e, nullptr);
  e->state->closing.store(true);
  s.c().send_request(request(p::Command::flush, 0, 0));
  EXPECT_TRUE(s.c().expect_closed());
}

TEST_F(Transmission, ClientCountFollowsConnection) {
  ExportPtr e = registry_.find("disk");
  Session& s = open();
  expect_alive(s.c());
  EXPECT_EQ(e->state->clients.load(), 1);
  s.c().send_request(request(p::Command::disc, 0, 0));
  EXPECT_TRUE(s.c().expect_closed());
  ASSERT_TRUE(s.done->wait(kTimeout));
  sync_io();       // the coroutine frame has released its reference
  s.conn.reset();  // and so has the test
  EXPECT_EQ(e->state->clients.load(), 0);
}

TEST_F(Transmission, BlockStatusWithTwoContextsSendsOneChunkEach) {
  Session& s = start();
  RawClient& c = s.c();
  handshake(c);
  enable_structured(c);
  c.send_option(p::Option::set_meta_context,
                test::meta_context_payload("bitmap", {"base:allocation", "qemu:dirty-bitmap:b0"}));
  std::vector<RawClient::OptionReply> contexts;
  ASSERT_EQ(read_until_final(c, u32(p::Option::set_meta_context), nullptr, &contexts).type(),
            p::OptionReply::ack);
  ASSERT_EQ(contexts.size(), 2u);
  std::map<uint32_t, std::string> names;
  for (const auto& r : contexts) {
    names[p::load_be32(r.payload.data())] = test::to_text(std::span(r.payload).subspan(4));
  }
  (void)go(c, "bitmap");
  write(c, 0, test::pattern(4096, 1));

  for (uint16_t flags : {uint16_t{0}, p::kCmdFlagReqOne}) {
    SCOPED_TRACE(flags ? "REQ_ONE" : "all extents");
    p::RequestHeader h = request(p::Command::block_status, 32 * 1024, 64 * 1024, flags);
    c.send_request(h);
    std::map<std::string, std::vector<Ext>> got;
    for (int i = 0; i < 2; ++i) {
      RawClient::Chunk chunk = c.read_chunk();
      EXPECT_EQ(chunk.header.cookie, h.cookie);
      EXPECT_EQ(chunk.done(), i == 1) << "DONE belongs on the last chunk only";
      BlockStatus bs = parse_block_status(chunk);
      ASSERT_TRUE(names.count(bs.context_id)) << "unknown context id " << bs.context_id;
      got[names[bs.context_id]] = bs.extents;
    }
    EXPECT_EQ(got["base:allocation"], (std::vector<Ext>{{64 * 1024, kHoleZero}}));
    if (flags) {
      EXPECT_EQ(got["qemu:dirty-bitmap:b0"], (std::vector<Ext>{{32 * 1024, p::kStateDirty}}));
    } else {
      EXPECT_EQ(got["qemu:dirty-bitmap:b0"],
                (std::vector<Ext>{{32 * 1024, p::kStateDirty}, {32 * 1024, 0}}));
    }
  }
}

// MetaContextSource::on_release: "called once per connection that selects
// this context, and on disconnect".
TEST_F(Transmission, SelectedContextIsReleasedOnDisconnect) {
  {
    Session& t = start();
    handshake(t.c());
    enable_structured(t.c());
    t.c().send_option(p::Option::set_meta_context,
                      test::meta_context_payload("bitmap", {"qemu:dirty-bitmap:b0"}));
    std::vector<RawClient::OptionReply> contexts;
    ASSERT_EQ(read_until_final(t.c(), u32(p::Option::set_meta_context), nullptr, &contexts).type(),
              p::OptionReply::ack);
    ASSERT_EQ(contexts.size(), 1u);
    (void)go(t.c(), "bitmap");
    expect_alive(t.c());
    t.c().send_request(request(p::Command::disc, 0, 0));
    EXPECT_TRUE(t.c().expect_closed());
    ASSERT_TRUE(t.done->wait(kTimeout));
    sync_io();
    t.conn.reset();
  }
  EXPECT_EQ(releases_->load(), 1) << "on_release was not called for the connection that selected "
                                     "qemu:dirty-bitmap:b0";
}

TEST_F(Transmission, DeviceErrorsBecomeNbdErrors) {
  RawClient& c = open({.export_name = "slow", .structured = true, .base_allocation = true}).c();
  slow_->fail_errno = EIO;
  StructuredRead small = read_structured(c, 0, 4096);
  EXPECT_EQ(small.error, u32(p::Error::io));
  EXPECT_EQ(small.types, chunk_names({p::Chunk::error}));
  StructuredRead large = read_structured(c, 0, 128 * 1024);  // the sparse-read path
  EXPECT_EQ(large.error, u32(p::Error::io));
  EXPECT_EQ(large.types, chunk_names({p::Chunk::error}));
  EXPECT_EQ(simple(c, request(p::Command::write, 0, 512), test::pattern(512, 1)),
            u32(p::Error::io));
  p::RequestHeader bs = request(p::Command::block_status, 0, 4096);
  c.send_request(bs);
  EXPECT_EQ(read_error_reply(c, bs.cookie), u32(p::Error::io));

  slow_->fail_errno = ENOSPC;
  EXPECT_EQ(simple(c, request(p::Command::write, 0, 512), test::pattern(512, 1)),
            u32(p::Error::nospc));
  slow_->fail_errno = EROFS;
  EXPECT_EQ(simple(c, request(p::Command::write, 0, 512), test::pattern(512, 1)),
            u32(p::Error::perm));
  slow_->fail_errno = EBADF;  // unknown errnos become EINVAL
  EXPECT_EQ(simple(c, request(p::Command::write, 0, 512), test::pattern(512, 1)),
            u32(p::Error::inval));

  slow_->fail_errno = 0;
  expect_alive(c);
  EXPECT_EQ(read_structured(c, 0, 4096).error, 0u);
}

// A device with serial_writes gets its writes one at a time, from every
// connection of the export, although the pool has four threads (the
// pipelined writes of CloseNowDropsInFlightReplies enter together).
TEST_F(Transmission, SerialWritesRunOneAtATime) {
  slow_->serial = true;
  Session& a = open({.export_name = "slow"});
  Session& b = open({.export_name = "slow"});
  slow_->gate.close();
  std::set<uint64_t> cookies_a, cookies_b;
  for (int i = 0; i < 4; ++i) {
    Session& s = i % 2 ? b : a;
    p::RequestHeader h = request(p::Command::write, uint64_t(i) * 4096, 4096);
    s.c().send_request(h, test::pattern(4096, uint8_t(40 + i)));
    (i % 2 ? cookies_b : cookies_a).insert(h.cookie);
  }
  ASSERT_TRUE(slow_->gate.wait_entered(1));
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  EXPECT_EQ(slow_->gate.entered(), 1) << "a second write ran beside the first";
  slow_->gate.open();
  for (int i = 0; i < 2; ++i) {
    p::SimpleReply r = a.c().read_simple_reply();
    EXPECT_EQ(r.error, 0u);
    EXPECT_EQ(cookies_a.erase(r.cookie), 1u);
    r = b.c().read_simple_reply();
    EXPECT_EQ(r.error, 0u);
    EXPECT_EQ(cookies_b.erase(r.cookie), 1u);
  }
  for (int i = 0; i < 4; ++i) {
    Bytes got(4096);
    ASSERT_FALSE(slow_->inner().read(uint64_t(i) * 4096, got));
    EXPECT_EQ(got, test::pattern(4096, uint8_t(40 + i))) << "write " << i;
  }
}

// Writes that go through the pool come back in batches: with the device
// held, 32 pipelined writes pile up, and when it opens they finish together.
// Every write is answered exactly once with its own cookie, three times over
// (the connection reuses its write jobs), and the data lands.
TEST_F(Transmission, PoolWritesFinishingTogetherAreEachAnsweredOnce) {
  slow_->serial = true;
  RawClient& c = open({.export_name = "slow", .structured = true}).c();
  constexpr int kWrites = 32;
  constexpr uint32_t kLen = 4096;
  for (int round = 0; round < 3; ++round) {
    slow_->gate.close();
    std::set<uint64_t> cookies;
    for (int i = 0; i < kWrites; ++i) {
      p::RequestHeader h = request(p::Command::write, uint64_t(i) * kLen, kLen);
      c.send_request(h, test::pattern(kLen, uint8_t(round * kWrites + i)));
      cookies.insert(h.cookie);
    }
    ASSERT_TRUE(slow_->gate.wait_entered(1));
    slow_->gate.open();
    for (int i = 0; i < kWrites; ++i) {
      p::SimpleReply r = c.read_simple_reply();
      EXPECT_EQ(r.error, 0u);
      EXPECT_EQ(cookies.erase(r.cookie), 1u) << "round " << round << " reply " << i;
    }
    EXPECT_TRUE(cookies.empty());
    for (int i = 0; i < kWrites; ++i) {
      Bytes got(kLen);
      ASSERT_FALSE(slow_->inner().read(uint64_t(i) * kLen, got));
      EXPECT_EQ(got, test::pattern(kLen, uint8_t(round * kWrites + i)))
          << "round " << round << " write " << i;
    }
  }
  expect_alive(c);
}

// A write reply that the socket takes only in part (try_write cut to 5
// bytes) is finished by the writer from where the socket stopped: every
// reply arrives whole, in a stream that stays in step, and the cut path ran.
TEST_F(Transmission, RepliesTheSocketTakesInPartArriveWhole) {
  RawClient& c = open({.export_name = "slow", .structured = true, .try_write_limit = 5}).c();
  constexpr int kRounds = 8;
  constexpr uint32_t kLen = 4096;
  for (int round = 0; round < kRounds; ++round) {
    std::map<uint64_t, p::RequestHeader> pending;
    for (int i = 0; i < 4; ++i) {
      p::RequestHeader w = request(p::Command::write, uint64_t(i) * kLen, kLen);
      c.send_request(w, test::pattern(kLen, uint8_t(round * 4 + i)));
      pending[w.cookie] = w;
    }
    for (int i = 0; i < 4; ++i) {
      p::SimpleReply r = c.read_simple_reply();
      EXPECT_EQ(r.error, 0u);
      EXPECT_EQ(pending.erase(r.cookie), 1u) << "round " << round;
    }
    StructuredRead back = read_structured(c, 0, 4 * kLen);
    ASSERT_EQ(back.error, 0u);
    for (int i = 0; i < 4; ++i) {
      EXPECT_EQ(Bytes(back.data.begin() + i * kLen, back.data.begin() + (i + 1) * kLen),
                test::pattern(kLen, uint8_t(round * 4 + i)))
          << "round " << round << " write " << i;
    }
  }
  EXPECT_GT(cut_writes_->load(), 0) << "no reply was cut short";
  expect_alive(c);
}

// A write finishing on the pool after its connection's event loop has
// stopped (server shutdown after the grace period) posts its completion to
// a loop that never runs it. Destroying that loop must still free the
// connection: the finished job's hold on it is let go.
TEST_F(Transmission, WriteFinishingAfterTheLoopStoppedDoesNotLeakTheConnection) {
  auto io = std::make_unique<asio::io_context>(1);
  int fds[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds), 0);
  asio::generic::stream_protocol::socket socket(
      *io, asio::generic::stream_protocol(AF_UNIX, SOCK_STREAM), fds[0]);
  RawClient c(fds[1]);
  ServerContext context{&registry_, &pool_, {}, nullptr};
  auto conn = std::make_shared<Connection>(
      io->get_executor(), std::make_unique<SocketStream>(std::move(socket)), context, 99);
  std::weak_ptr<Connection> weak = conn;
  asio::co_spawn(
      *io, [conn] { return conn->async_run(); }, asio::detached);
  conn.reset();
  std::thread loop([&io] { io->run(); });
  handshake(c);
  (void)go(c, "slow");
  slow_->gate.close();
  c.send_request(request(p::Command::write, 0, 4096), test::pattern(4096, 3));
  ASSERT_TRUE(slow_->gate.wait_entered(1));
  io->stop();
  loop.join();
  slow_->gate.open();
  pool_.join();  // the write has finished and posted its completion
  EXPECT_FALSE(weak.expired()) << "nothing should free the connection before its loop goes";
  io.reset();
  EXPECT_TRUE(weak.expired()) << "the connection outlived its event loop";
}

TEST_F(Transmission, CloseNowDropsInFlightReplies) {
  Session& s = open({.export_name = "slow"});
  RawClient& c = s.c();
  slow_->gate.close();
  for (int i = 0; i < 4; ++i) {
    c.send_request(request(p::Command::write, uint64_t(i) * 4096, 4096), test::pattern(4096, 1));
  }
  ASSERT_TRUE(slow_->gate.wait_entered(4));
  asio::post(io_, [conn = s.conn] { conn->close_now(); });
  EXPECT_TRUE(c.expect_closed());
  slow_->gate.open();
  EXPECT_TRUE(s.done->wait(kTimeout));
}

}  // namespace
}  // namespace fleeced::server

// SPDX-License-Identifier: MIT
// One NBD client connection: fixed-newstyle negotiation (negotiation.cpp),
// then transmission (connection.cpp): a reader that decodes and validates
// requests, request coroutines that run device calls (inline when they cannot
// block, on the I/O pool otherwise) and a single writer that batches replies.
// Every member is touched only on the connection's executor (one thread of an
// io_context), except the done list of finished pool writes (done_mu_).
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/thread_pool.hpp>

#include "protocol/codec.hpp"
#include "server/buffer.hpp"
#include "server/export_registry.hpp"
#include "server/stream.hpp"
#include "server/tls_credentials.hpp"

namespace fleeced::server {

struct ConnectionLimits {
  uint32_t max_requests = 64;                  // in flight per connection
  uint64_t max_inflight_bytes = 256ull << 20;  // payload + read data in flight
  std::chrono::seconds handshake_timeout{10};  // 0 = unlimited
};

// What every connection shares; outlives all connections.
struct ServerContext {
  ExportRegistry* registry = nullptr;
  asio::thread_pool* io_pool = nullptr;
  ConnectionLimits limits;
  std::shared_ptr<const TlsPolicy> tls;  // the listener's; null = TLS off
};

// Wire bytes of one reply: `meta` holds headers and small payloads, `data`
// holds read data; `pieces` (if not empty) interleaves the two. A reply that
// is one simple reply header keeps it in `simple` instead (no allocation).
struct Reply {
  struct Piece {
    bool from_data = false;
    std::size_t offset = 0;
    std::size_t length = 0;
  };
  std::array<std::byte, 16> simple{};  // used when simple_only
  bool simple_only = false;
  std::vector<std::byte> meta;
  Buffer data;
  std::vector<Piece> pieces;
  uint64_t charged_bytes = 0;  // released from the in-flight budget when sent
  bool counts_request = true;  // decrements the in-flight request count
};

class Connection : public std::enable_shared_from_this<Connection> {
 public:
  Connection(asio::any_io_executor executor, std::unique_ptr<Stream> stream,
             const ServerContext& context, uint64_t id);
  ~Connection();

  // Serves the connection until the client leaves or it is stopped.
  asio::awaitable<void> async_run();
  // Graceful stop: no new requests, in-flight replies still go out.
  // Thread: the connection's executor.
  void stop();
  // Hard stop: closes the stream now; in-flight replies are dropped.
  // Thread: the connection's executor.
  void close_now();
  // The chosen export's state, or null before transmission.
  // Thread: the connection's executor.
  const ExportState* export_state() const { return export_ ? export_->state.get() : nullptr; }

  uint64_t id() const { return id_; }
  const std::string& peer() const { return peer_; }

 private:
  // --- negotiation.cpp ---
  // Returns true when transmission should start (export chosen).
  asio::awaitable<bool> async_negotiate();
  asio::awaitable<bool> async_handle_option(uint32_t option, std::vector<std::byte>& payload,
                                            bool& done);
  asio::awaitable<bool> async_option_info(uint32_t option, std::span<const std::byte> payload,
                                          bool& done);
  asio::awaitable<bool> async_option_meta_context(uint32_t option,
                                                  std::span<const std::byte> payload);
  asio::awaitable<bool> async_option_list(std::span<const std::byte> payload);
  asio::awaitable<bool> async_option_export_name(std::span<const std::byte> payload);
  asio::awaitable<bool> async_option_starttls(std::span<const std::byte> payload);
  asio::awaitable<bool> async_start_tls();
  bool tls_required() const;
  asio::awaitable<bool> async_send_now(const std::vector<std::byte>& bytes);
  void choose_export(ExportPtr e);
  // Counts this connection as a client of e; false if e is being deleted.
  bool claim_export(const ExportPtr& e);

  // --- connection.cpp: buffered reading ---
  asio::awaitable<bool> async_read_exact(std::span<std::byte> out);
  asio::awaitable<bool> async_discard_input(uint64_t length);

  // --- connection.cpp: transmission ---
  asio::awaitable<void> async_transmission();
  asio::awaitable<void> async_handle_request(protocol::RequestHeader h, Buffer payload);
  asio::awaitable<void> async_do_read(const protocol::RequestHeader& h, Reply& r);
  asio::awaitable<void> async_do_block_status(const protocol::RequestHeader& h, Reply& r);
  asio::awaitable<void> async_do_simple_op(const protocol::RequestHeader& h, Reply& r);
  // WRITE that must go to the I/O pool: no coroutine, a reusable job object
  // and a completion mailbox, so the hot write path allocates nothing.
  struct WriteJob;
  struct DrainHandler;
  void start_write(const protocol::RequestHeader& h, Buffer payload);
  void start_pool_write(const protocol::RequestHeader& h, Buffer payload);
  // Pool thread: hands a finished job back to the connection's executor.
  void post_write_done(WriteJob* job);
  void drain_write_done();
  // Empties the done list (newest first) and clears done_posted_.
  WriteJob* take_write_done();
  // The posted drain was destroyed unrun (the event loop stopped first):
  // lets go of the finished jobs' hold on this connection. Any thread.
  void abandon_write_done();
  void finish_write(WriteJob* job);
  // The reply to a WRITE that ended with ec (logged here).
  Reply write_reply(const protocol::RequestHeader& h, const std::error_code& ec);
  void reply_error(const protocol::RequestHeader& h, protocol::Error err, std::string_view message,
                   Reply& r);
  void reply_ok(const protocol::RequestHeader& h, Reply& r);
  // A simple reply with no error, kept in r.simple.
  void reply_simple_ok(const protocol::RequestHeader& h, Reply& r);
  void log_request(const protocol::RequestHeader& h, const std::error_code& ec) const;

  // --- connection.cpp: writer ---
  // Queues a reply; the writer coroutine sends it (batched with others).
  void send(Reply r);
  // Sends what is queued now if the socket takes it all; otherwise (or if
  // the writer is busy) leaves it to the writer coroutine.
  void flush_now();
  // Releases a sent (or dropped) reply's budget and buffers.
  void account_sent(Reply& r);
  asio::awaitable<void> async_writer();
  void wake();
  asio::awaitable<void> async_wait_wake();
  // Waits while the replies waiting to be sent hold a lot of read data.
  asio::awaitable<void> async_wait_queue_room();
  void fail(std::string_view reason);

  asio::any_io_executor executor_;
  std::unique_ptr<Stream> stream_;
  ServerContext context_;
  uint64_t id_;
  std::string peer_;

  // Read buffering.
  Buffer rbuf_;
  std::size_t rpos_ = 0;
  std::size_t rend_ = 0;

  // Negotiation state (reset by STARTTLS).
  bool fixed_newstyle_ = false;
  bool no_zeroes_ = false;
  bool tls_active_ = false;  // STARTTLS succeeded; stream_ is a TlsStream
  std::string tls_refused_;  // TLS identity the listener's authz denied
  bool structured_ = false;
  ExportPtr meta_export_;                // export named by the last SET_META_CONTEXT
  std::vector<uint32_t> meta_selected_;  // indices into meta_export_->context_names()
  asio::steady_timer handshake_timer_;
  bool handshake_expired_ = false;

  // Transmission state.
  ExportPtr export_;
  uint16_t transmission_flags_ = 0;
  std::vector<uint32_t> selected_;  // context indices for BLOCK_STATUS
  BufferPool buffers_;
  std::deque<Reply> queue_;
  std::size_t front_sent_ = 0;  // bytes of queue_'s front replies already sent
  std::vector<asio::const_buffer> flush_buffers_;
  bool writing_ = false;
  bool stopping_ = false;
  bool failed_ = false;
  bool in_transmission_ = false;
  ExportPtr claimed_;  // counted in its state->clients (GO/EXPORT_NAME chosen)
  uint32_t in_flight_ = 0;
  uint64_t in_flight_bytes_ = 0;
  uint64_t queued_data_bytes_ = 0;  // read data in replies not yet sent
  asio::steady_timer wake_timer_;
  asio::steady_timer drained_timer_;  // cancelled when the writer has sent a batch

  // Write jobs: all ever made (owned here) and the idle ones.
  std::vector<std::unique_ptr<WriteJob>> write_jobs_;
  std::vector<WriteJob*> idle_write_jobs_;
  // Finished write jobs on their way back from the pool (a LIFO list,
  // reversed when drained). Guarded by done_mu_; the only members that pool
  // threads touch.
  std::mutex done_mu_;
  WriteJob* done_head_ = nullptr;
  bool done_posted_ = false;  // a drain_write_done() is queued on executor_
};

}  // namespace fleeced::server

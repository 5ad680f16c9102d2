// SPDX-License-Identifier: MIT
// Design notes
// - Reader: one coroutine reads request headers through a 64 KiB buffer (so a
//   burst of pipelined requests costs one syscall), validates them with
//   protocol::validate, reads the WRITE payload (or drains it when rejected)
//   and spawns a request coroutine. It pauses while the connection has
//   max_requests requests or max_inflight_bytes bytes in flight; a request
//   leaves the budget when its reply has been written.
// - Requests: device calls that cannot block (page-cache hits through
//   RWF_NOWAIT) run inline on the event loop; everything else runs on the I/O
//   pool and resumes here. Replies complete out of order.
// - WRITEs that need the pool skip the coroutine: the reader hands the
//   request to a reusable WriteJob, the pool thread runs it and pushes it on
//   a mutex-guarded done list, and one posted drain_write_done() answers every
//   job finished by then and sends the replies at once. No allocation of its
//   own per request; waking the serial queue and posting the drain happen
//   only when their target was idle, so a burst of writes shares them.
// - Writer: replies go into a queue; one writer coroutine sends everything
//   queued with one gathered write, so replies are never interleaved.
#include "server/connection.hpp"

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <utility>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/use_awaitable.hpp>

#include "protocol/names.hpp"
#include "protocol/nbd.hpp"
#include "protocol/validate.hpp"
#include "server/io_pool.hpp"
#include "server/log.hpp"

namespace fleeced::server {

namespace p = fleeced::protocol;

namespace {

constexpr std::size_t kReadBufferSize = 64 * 1024;
// Payloads at least this large are read straight into their buffer.
constexpr std::size_t kDirectReadThreshold = 16 * 1024;
// Reads at least this large ask for extents first, to send holes as holes.
constexpr uint32_t kSparseReadThreshold = 64 * 1024;
// Replies gathered into one write at most.
constexpr std::size_t kMaxBatch = 64;
// Page-cache reads wait while this much read data waits to be sent. Without
// it every request of a burst is read before the first reply goes out: the
// client idles during the burst, and the data is cold in the CPU caches by
// the time it is copied into the socket (64 x 256 KiB per connection).
constexpr uint64_t kMaxQueuedReadBytes = 1u << 20;

bool would_block(const std::error_code& ec) {
  return ec == std::errc::operation_would_block || ec == std::errc::resource_unavailable_try_again;
}

void append_simple(std::vector<std::byte>& out, uint32_t error, uint64_t cookie) {
  std::size_t at = out.size();
  out.resize(at + p::kSimpleReplyHeaderSize);
  (void)p::encode_simple_reply(std::span(out).subspan(at), error, cookie);
}

void append_offset_data_prefix(std::vector<std::byte>& out, uint16_t flags, uint64_t cookie,
                               uint64_t offset, uint32_t length) {
  std::size_t at = out.size();
  out.resize(at + p::kOffsetDataPrefixSize);
  (void)p::encode_offset_data_prefix(std::span(out).subspan(at), flags, cookie, offset, length);
}

void append_offset_hole(std::vector<std::byte>& out, uint16_t flags, uint64_t cookie,
                        uint64_t offset, uint32_t length) {
  std::size_t at = out.size();
  out.resize(at + p::kOffsetHoleChunkSize);
  (void)p::encode_offset_hole(std::span(out).subspan(at), flags, cookie, offset, length);
}

// True if every byte is zero; stops at the first non-zero word.
bool is_all_zero(std::span<const std::byte> data) {
  std::size_t i = 0;
  for (; i + 8 <= data.size(); i += 8) {
    uint64_t w;
    std::memcpy(&w, data.data() + i, 8);
    if (w != 0) return false;
  }
  for (; i < data.size(); ++i) {
    if (data[i] != std::byte{0}) return false;
  }
  return true;
}

// Fills `out` with extents covering [offset, offset+length), asking `source`
// repeatedly; stops after max_extents. Runs on the I/O pool.
template <typename Source>
std::error_code collect_extents(Source&& source, uint64_t offset, uint64_t length,
                                std::size_t max_extents, std::vector<block::Extent>& out) {
  const uint64_t end = offset + length;
  uint64_t pos = offset;
  while (pos < end && out.size() < max_extents) {
    std::size_t before = out.size();
    if (std::error_code ec = source(pos, end - pos, out)) return ec;
    if (out.size() == before) return std::make_error_code(std::errc::io_error);
    uint64_t next = out.back().offset + out.back().length;
    if (next <= pos) return std::make_error_code(std::errc::io_error);
    pos = std::min(next, end);
  }
  return {};
}

// Appends the wire bytes of each reply, in order, to out.
template <typename It>
void append_wire_buffers(It first, It last, std::vector<asio::const_buffer>& out) {
  for (; first != last; ++first) {
    Reply& r = *first;
    if (r.simple_only) {
      out.emplace_back(r.simple.data(), r.simple.size());
      continue;
    }
    if (r.pieces.empty()) {
      out.emplace_back(r.meta.data(), r.meta.size());
      continue;
    }
    for (const auto& piece : r.pieces) {
      const std::byte* base = piece.from_data ? r.data.data() : r.meta.data();
      out.emplace_back(base + piece.offset, piece.length);
    }
  }
}

}  // namespace

// The drain posted to the connection's executor. If the event loop stops
// before running it, destroying it unrun breaks the cycle of finished jobs
// holding the connection that owns them (the connection is then freed with
// the loop, as a request coroutine's frame would be).
struct Connection::DrainHandler {
  std::shared_ptr<Connection> self;
  bool ran = false;

  explicit DrainHandler(std::shared_ptr<Connection> s) : self(std::move(s)) {}
  DrainHandler(DrainHandler&& o) noexcept : self(std::move(o.self)), ran(o.ran) {}
  DrainHandler& operator=(DrainHandler&&) = delete;
  ~DrainHandler() {
    if (self && !ran) self->abandon_write_done();
  }
  void operator()() {
    ran = true;
    self->drain_write_done();
  }
};

// One WRITE on its way through the I/O pool. Reused: idle jobs wait in
// idle_write_jobs_. While in flight it holds the connection (keep), so the
// connection, its export and the device outlive it.
struct Connection::WriteJob final : PoolJob {
  std::shared_ptr<Connection> keep;  // the owner; set while in flight
  block::Device* dev = nullptr;
  p::RequestHeader h{};
  Buffer payload;
  std::error_code ec;
  WriteJob* next_done = nullptr;  // the done list; guarded by keep->done_mu_

  void run() noexcept override {
    ec = dev->write(h.offset, payload.span(), h.flags & p::kCmdFlagFua);
    keep->post_write_done(this);
  }
  void drop() noexcept override {
    // The pool is gone (server teardown): nobody waits for this reply. The
    // last reference may destroy the connection, which owns this job.
    auto last = std::move(keep);
  }
};

Connection::Connection(asio::any_io_executor executor, std::unique_ptr<Stream> stream,
                       const ServerContext& context, uint64_t id)
    : executor_(executor),
      stream_(std::move(stream)),
      context_(context),
      id_(id),
      peer_(stream_->peer()),
      rbuf_(kReadBufferSize),
      handshake_timer_(executor),
      wake_timer_(executor),
      drained_timer_(executor) {
  drained_timer_.expires_at(asio::steady_timer::time_point::max());
}

Connection::~Connection() {
  if (claimed_) claimed_->state->clients.fetch_sub(1);
  if (!export_) return;
  for (uint32_t index : selected_) {
    if (index == 0) continue;  // base:allocation has no owner to tell
    const auto& release = export_->meta_contexts[index - 1].on_release;
    if (release) release();
  }
}

void Connection::stop() {
  if (stopping_) return;
  stopping_ = true;
  if (in_transmission_) {
    stream_->shutdown_receive();  // the reader sees EOF, replies still go out
  } else {
    stream_->close();
  }
  wake();
}

void Connection::close_now() {
  stopping_ = true;
  fail("export deleted");
}

asio::awaitable<void> Connection::async_run() {
  auto self = shared_from_this();
  log().debug("conn {} {}: connected", id_, peer_);
  if (context_.limits.handshake_timeout.count() > 0) {
    handshake_timer_.expires_after(context_.limits.handshake_timeout);
    handshake_timer_.async_wait([self](const boost::system::error_code& ec) {
      if (ec) return;  // cancelled: negotiation finished
      self->handshake_expired_ = true;
      log().info("conn {} {}: closing: negotiation not finished within {} s", self->id_,
                 self->peer_, self->context_.limits.handshake_timeout.count());
      self->stream_->close();
    });
  }
  bool go = co_await async_negotiate();
  handshake_timer_.cancel();
  if (!go || handshake_expired_ || stopping_) {
    co_await stream_->async_shutdown();  // TLS close_notify, if TLS is up
    stream_->close();
    co_return;
  }
  log().debug("conn {} {}: transmission on export '{}' structured={} contexts={}", id_, peer_,
              export_->name, structured_, selected_.size());
  in_transmission_ = true;
  co_await async_transmission();
  if (!failed_) co_await stream_->async_shutdown();
  stream_->close();
  log().debug("conn {} {}: closed", id_, peer_);
}

// ---- Buffered reading ----

asio::awaitable<bool> Connection::async_read_exact(std::span<std::byte> out) {
  std::size_t done = 0;
  while (done < out.size()) {
    if (rpos_ < rend_) {
      std::size_t n = std::min(rend_ - rpos_, out.size() - done);
      std::copy_n(rbuf_.data() + rpos_, n, out.data() + done);
      rpos_ += n;
      done += n;
      continue;
    }
    std::error_code ec;
    std::size_t want = out.size() - done;
    if (want >= kDirectReadThreshold) {
      done += co_await stream_->async_read_some(asio::buffer(out.data() + done, want), ec);
    } else {
      rpos_ = 0;
      rend_ = co_await stream_->async_read_some(asio::buffer(rbuf_.data(), rbuf_.size()), ec);
    }
    if (ec) {
      if (done > 0 || !in_transmission_) {
        log().debug("conn {} {}: read ended after {} of {} bytes: {}", id_, peer_, done, out.size(),
                    ec.message());
      }
      co_return false;
    }
  }
  co_return true;
}

asio::awaitable<bool> Connection::async_discard_input(uint64_t length) {
  std::array<std::byte, 16384> sink;
  while (length > 0) {
    std::size_t n = static_cast<std::size_t>(std::min<uint64_t>(length, sink.size()));
    if (!co_await async_read_exact(std::span(sink.data(), n))) co_return false;
    length -= n;
  }
  co_return true;
}

// ---- Transmission ----

asio::awaitable<void> Connection::async_transmission() {
  auto self = shared_from_this();
  const p::RequestContext rctx{
      .export_size = export_->size(),
      .transmission_flags = transmission_flags_,
      .structured_replies = structured_,
      .meta_contexts = static_cast<uint32_t>(selected_.size()),
      .max_payload = p::kMaxPayloadSize,
  };
  const auto& limits = context_.limits;
  while (!stopping_ && !failed_) {
    while ((in_flight_ >= limits.max_requests || in_flight_bytes_ >= limits.max_inflight_bytes) &&
           !failed_) {
      co_await async_wait_wake();
    }
    if (failed_) break;
    std::array<std::byte, p::kRequestHeaderSize> hb;
    if (!co_await async_read_exact(hb)) break;
    p::RequestHeader h;
    if (p::decode_request_header(hb, h)) {
      log().info("conn {} {}: closing: bad request magic", id_, peer_);
      failed_ = true;
      break;
    }
    if (h.type == static_cast<uint16_t>(p::Command::disc)) {
      log().debug("conn {} {}: NBD_CMD_DISC", id_, peer_);
      break;
    }
    if (export_->state->closing.load(std::memory_order_relaxed)) {
      log().info("conn {} {}: closing: export '{}' was deleted", id_, peer_, export_->name);
      break;
    }
    const bool is_write = h.type == static_cast<uint16_t>(p::Command::write);
    const p::Validation v = p::validate(h, rctx);
    uint64_t charge = is_write || h.type == static_cast<uint16_t>(p::Command::read) ? h.length : 0;
    ++in_flight_;
    if (v.error != p::Error::ok) {
      charge = 0;
      Reply r;
      reply_error(h, v.error, v.message, r);
      log().debug("conn {} {}: cookie={} cmd={} offset={} length={} -> {} ({})", id_, peer_,
                  h.cookie, p::command_name(h.type), h.offset, h.length,
                  p::error_name(static_cast<uint32_t>(v.error)), v.message);
      if (is_write && v.drop_connection) {
        send(std::move(r));
        log().info("conn {} {}: closing: write payload of {} bytes cannot be consumed", id_, peer_,
                   h.length);
        break;
      }
      if (is_write && !co_await async_discard_input(h.length)) {
        --in_flight_;
        break;
      }
      send(std::move(r));
      continue;
    }
    Buffer payload;
    if (is_write) {
      payload = buffers_.get(h.length);
      if (!payload.ok()) {
        // Out of memory for this request: drain it and answer ENOMEM.
        Reply r;
        reply_error(h, p::Error::nomem, "out of memory", r);
        if (!co_await async_discard_input(h.length)) {
          --in_flight_;
          break;
        }
        send(std::move(r));
        continue;
      }
      if (!co_await async_read_exact(payload.span())) {
        --in_flight_;
        break;
      }
    }
    in_flight_bytes_ += charge;
    if (is_write) {
      start_write(h, std::move(payload));
      continue;
    }
    auto request = [self, h, payload = std::move(payload)]() mutable -> asio::awaitable<void> {
      co_await self->async_handle_request(h, std::move(payload));
    };
    auto on_done = [self](std::exception_ptr e) {
      if (!e) return;
      try {
        std::rethrow_exception(e);
      } catch (const std::exception& ex) {
        log().error("conn {} {}: request failed: {}", self->id_, self->peer_, ex.what());
      }
      self->fail("internal error");
    };
    asio::co_spawn(executor_, std::move(request), std::move(on_done));
  }
  // Let in-flight requests finish and their replies go out.
  while ((in_flight_ > 0 || writing_ || !queue_.empty()) && !failed_) {
    co_await async_wait_wake();
  }
  while (in_flight_ > 0) co_await async_wait_wake();  // failed: wait for handlers to drop
}

void Connection::reply_error(const p::RequestHeader& h, p::Error err, std::string_view message,
                             Reply& r) {
  r.simple_only = false;
  r.meta.clear();
  r.pieces.clear();
  if (structured_ && h.type == static_cast<uint16_t>(p::Command::read)) {
    p::append_error_chunk(r.meta, p::kReplyFlagDone, h.cookie, static_cast<uint32_t>(err), message);
  } else {
    append_simple(r.meta, static_cast<uint32_t>(err), h.cookie);
  }
}

void Connection::reply_ok(const p::RequestHeader& h, Reply& r) {
  append_simple(r.meta, 0, h.cookie);
}

void Connection::reply_simple_ok(const p::RequestHeader& h, Reply& r) {
  (void)p::encode_simple_reply(r.simple, 0, h.cookie);
  r.simple_only = true;
}

void Connection::log_request(const p::RequestHeader& h, const std::error_code& ec) const {
  if (!log().should_log(spdlog::level::debug)) return;
  log().debug("conn {} {}: cookie={} cmd={} offset={} length={} flags={:#x} -> {}", id_, peer_,
              h.cookie, p::command_name(h.type), h.offset, h.length, h.flags,
              ec ? ec.message() : "ok");
}

asio::awaitable<void> Connection::async_handle_request(p::RequestHeader h, Buffer payload) {
  Reply r;
  r.charged_bytes = (h.type == static_cast<uint16_t>(p::Command::read) ||
                     h.type == static_cast<uint16_t>(p::Command::write))
                        ? h.length
                        : 0;
  switch (static_cast<p::Command>(h.type)) {
    case p::Command::read:
      co_await async_do_read(h, r);
      break;
    case p::Command::block_status:
      co_await async_do_block_status(h, r);
      break;
    default:
      co_await async_do_simple_op(h, r);
      break;
  }
  if (payload.capacity() > 0) buffers_.put(std::move(payload));
  send(std::move(r));
}

asio::awaitable<void> Connection::async_do_read(const p::RequestHeader& h, Reply& r) {
  block::DevicePtr dev = export_->device;
  const bool df = h.flags & p::kCmdFlagDf;
  if (h.length == 0) {
    if (structured_) {
      p::append_none_chunk(r.meta, p::kReplyFlagDone, h.cookie);
    } else {
      reply_ok(h, r);
    }
    co_return;
  }
  co_await async_wait_queue_room();
  Buffer buf = buffers_.get(h.length);
  if (!buf.ok()) {
    reply_error(h, p::Error::nomem, "out of memory", r);
    co_return;
  }
  std::error_code ec = dev->try_read(h.offset, buf.span());
  std::vector<block::Extent> extents;
  if (would_block(ec)) {
    const bool sparse =
        structured_ && !df && h.length >= kSparseReadThreshold && dev->capabilities().can_extents;
    struct Result {
      std::error_code ec;
      Buffer buf;
      std::vector<block::Extent> extents;
    };
    // Named, not a temporary in the co_await expression: GCC 12 destroys such
    // temporaries twice (the lambda's shared_ptr captures would be released twice).
    auto job = [dev, sparse, off = h.offset, buf = std::move(buf)]() mutable -> Result {
      Result out;
      if (sparse) {
        auto src = [&](uint64_t o, uint64_t l, std::vector<block::Extent>& v) {
          return dev->extents(o, l, v);
        };
        if (collect_extents(src, off, buf.size(), 4096, out.extents) || out.extents.empty() ||
            out.extents.back().offset + out.extents.back().length < off + buf.size()) {
          out.extents.clear();  // fall back to reading everything
        }
      }
      if (out.extents.empty()) {
        out.ec = dev->read(off, buf.span());
      } else {
        for (const auto& e : out.extents) {
          if (e.flags & block::kExtentZero) continue;
          out.ec = dev->read(e.offset, buf.span().subspan(e.offset - off, e.length));
          if (out.ec) break;
        }
      }
      out.buf = std::move(buf);
      return out;
    };
    Result res = co_await async_offload(*context_.io_pool, std::move(job));
    ec = res.ec;
    buf = std::move(res.buf);
    extents = std::move(res.extents);
  }
  log_request(h, ec);
  if (ec) {
    buffers_.put(std::move(buf));
    reply_error(h, p::to_nbd_error(ec.value(), h.flags), ec.message(), r);
    co_return;
  }
  if (!structured_) {
    reply_ok(h, r);
    r.data = std::move(buf);
    r.pieces = {{false, 0, r.meta.size()}, {true, 0, r.data.size()}};
    co_return;
  }
  if (extents.empty() && !df && h.length >= kSparseReadThreshold && is_all_zero(buf.span())) {
    // A page-cache read of a hole: say so instead of sending zeroes.
    buffers_.put(std::move(buf));
    append_offset_hole(r.meta, p::kReplyFlagDone, h.cookie, h.offset, h.length);
    co_return;
  }
  if (extents.empty()) {
    append_offset_data_prefix(r.meta, p::kReplyFlagDone, h.cookie, h.offset, h.length);
    r.data = std::move(buf);
    r.pieces = {{false, 0, r.meta.size()}, {true, 0, r.data.size()}};
    co_return;
  }
  // Sparse reply: merge neighbouring data extents, send zero extents as holes.
  struct Run {
    uint64_t offset, length;
    bool hole;
  };
  std::vector<Run> runs;
  for (const auto& e : extents) {
    bool hole = e.flags & block::kExtentZero;
    if (!runs.empty() && runs.back().hole == hole) {
      runs.back().length += e.length;
    } else {
      runs.push_back({e.offset, e.length, hole});
    }
  }
  for (std::size_t i = 0; i < runs.size(); ++i) {
    const Run& run = runs[i];
    uint16_t flags = i + 1 == runs.size() ? p::kReplyFlagDone : 0;
    auto len32 = static_cast<uint32_t>(run.length);
    if (run.hole) {
      std::size_t at = r.meta.size();
      append_offset_hole(r.meta, flags, h.cookie, run.offset, len32);
      r.pieces.push_back({false, at, r.meta.size() - at});
    } else {
      std::size_t at = r.meta.size();
      append_offset_data_prefix(r.meta, flags, h.cookie, run.offset, len32);
      r.pieces.push_back({false, at, r.meta.size() - at});
      r.pieces.push_back({true, static_cast<std::size_t>(run.offset - h.offset), len32});
    }
  }
  r.data = std::move(buf);
}

void Connection::start_write(const p::RequestHeader& h, Buffer payload) {
  block::Device* dev = export_->device.get();
  std::error_code ec = std::make_error_code(std::errc::operation_would_block);
  if (!(h.flags & p::kCmdFlagFua)) ec = dev->try_write(h.offset, payload.span());
  if (would_block(ec)) {
    start_pool_write(h, std::move(payload));
    return;
  }
  buffers_.put(std::move(payload));
  send(write_reply(h, ec));
}

Reply Connection::write_reply(const p::RequestHeader& h, const std::error_code& ec) {
  log_request(h, ec);
  Reply r;
  r.charged_bytes = h.length;
  if (ec) {
    reply_error(h, p::to_nbd_error(ec.value(), h.flags), ec.message(), r);
  } else {
    reply_simple_ok(h, r);
  }
  return r;
}

void Connection::start_pool_write(const p::RequestHeader& h, Buffer payload) {
  WriteJob* job;
  if (idle_write_jobs_.empty()) {
    write_jobs_.push_back(std::make_unique<WriteJob>());
    job = write_jobs_.back().get();
  } else {
    job = idle_write_jobs_.back();
    idle_write_jobs_.pop_back();
  }
  job->keep = shared_from_this();
  job->dev = export_->device.get();
  job->h = h;
  job->payload = std::move(payload);
  job->ec.clear();
  if (job->dev->capabilities().serial_writes) {
    export_->state->write_queue->post_job(*context_.io_pool, job);
  } else {
    asio::post(*context_.io_pool, [job] { job->run(); });
  }
}

void Connection::post_write_done(WriteJob* job) {
  bool post;
  {
    std::lock_guard lock(done_mu_);
    job->next_done = done_head_;
    done_head_ = job;
    post = !done_posted_;
    done_posted_ = true;
  }
  // Until the drain posted here runs, nothing takes `job` off the list, so
  // job->keep is still set. No work guard is needed: the reader keeps a read
  // or a timer pending until in_flight_ (which counts this job) is zero.
  if (!post) return;
  if (auto* ex = executor_.target<asio::io_context::executor_type>()) {
    asio::post(*ex, DrainHandler{job->keep});
  } else {
    asio::post(executor_, DrainHandler{job->keep});
  }
}

Connection::WriteJob* Connection::take_write_done() {
  std::lock_guard lock(done_mu_);
  done_posted_ = false;
  return std::exchange(done_head_, nullptr);
}

void Connection::abandon_write_done() {
  WriteJob* list = take_write_done();
  for (; list; list = list->next_done) list->keep.reset();  // the caller holds one
}

void Connection::drain_write_done() {
  WriteJob* list = take_write_done();
  WriteJob* ordered = nullptr;  // oldest first
  while (list) {
    WriteJob* next = list->next_done;
    list->next_done = ordered;
    ordered = list;
    list = next;
  }
  while (ordered) {
    WriteJob* next = ordered->next_done;
    finish_write(ordered);
    ordered = next;
  }
  flush_now();
}

void Connection::finish_write(WriteJob* job) {
  Reply r = write_reply(job->h, job->ec);
  buffers_.put(std::move(job->payload));
  job->keep.reset();  // the caller holds the connection
  idle_write_jobs_.push_back(job);
  if (failed_) {
    send(std::move(r));  // releases its budget
    return;
  }
  queued_data_bytes_ += r.data.size();
  queue_.push_back(std::move(r));  // the caller flushes
}

asio::awaitable<void> Connection::async_do_simple_op(const p::RequestHeader& h, Reply& r) {
  block::DevicePtr dev = export_->device;
  const bool fua = h.flags & p::kCmdFlagFua;
  auto job = [dev, h, fua]() -> std::error_code {
    switch (static_cast<p::Command>(h.type)) {
      case p::Command::flush:
        return dev->flush();
      case p::Command::trim:
        return dev->discard(h.offset, h.length, fua);
      case p::Command::write_zeroes:
        return dev->write_zeroes(h.offset, h.length,
                                 block::ZeroFlags{.may_trim = !(h.flags & p::kCmdFlagNoHole),
                                                  .fast = bool(h.flags & p::kCmdFlagFastZero),
                                                  .fua = fua});
      case p::Command::cache:
        (void)dev->cache(h.offset, h.length);  // a hint: never an error
        return {};
      default:
        return std::make_error_code(std::errc::invalid_argument);
    }
  };
  std::error_code ec = co_await async_offload(*context_.io_pool, std::move(job));
  log_request(h, ec);
  if (ec) {
    reply_error(h, p::to_nbd_error(ec.value(), h.flags), ec.message(), r);
  } else {
    reply_simple_ok(h, r);
  }
}

asio::awaitable<void> Connection::async_do_block_status(const p::RequestHeader& h, Reply& r) {
  const bool req_one = h.flags & p::kCmdFlagReqOne;
  const std::size_t max_extents = req_one ? 1 : p::kMaxExtentsPerChunk;
  struct Result {
    std::error_code ec;
    std::vector<std::vector<block::Extent>> per_context;
  };
  ExportPtr e = export_;
  std::vector<uint32_t> selected = selected_;
  auto job = [e, selected, h, max_extents]() -> Result {
    Result out;
    for (uint32_t index : selected) {
      std::vector<block::Extent> extents;
      std::error_code ec;
      if (index == 0) {
        auto src = [&](uint64_t o, uint64_t l, std::vector<block::Extent>& v) {
          return e->device->extents(o, l, v);
        };
        ec = collect_extents(src, h.offset, h.length, max_extents, extents);
      } else {
        ec = collect_extents(e->meta_contexts[index - 1].extents, h.offset, h.length, max_extents,
                             extents);
      }
      if (ec) {
        out.ec = ec;
        return out;
      }
      out.per_context.push_back(std::move(extents));
    }
    return out;
  };
  // In-memory contexts (dirty bitmaps) are cheap and never block: answer
  // them here instead of paying two thread hops per request.
  bool inline_ok = true;
  for (uint32_t index : selected) {
    if (index == 0 || !e->meta_contexts[index - 1].nonblocking) inline_ok = false;
  }
  Result res;
  if (inline_ok) {
    res = job();
  } else {
    res = co_await async_offload(*context_.io_pool, std::move(job));
  }
  log_request(h, res.ec);
  if (res.ec) {
    reply_error(h, p::to_nbd_error(res.ec.value(), h.flags), res.ec.message(), r);
    co_return;
  }
  const uint64_t end = h.offset + h.length;
  std::size_t total = 0;
  for (const auto& v : res.per_context) total += v.size();
  r.meta.reserve(r.meta.size() + selected.size() * (p::kChunkHeaderSize + 4) + 8 * total);
  std::vector<p::BlockStatusExtent> descriptors;
  for (std::size_t c = 0; c < selected.size(); ++c) {
    descriptors.clear();
    descriptors.reserve(res.per_context[c].size());
    uint64_t pos = h.offset;
    for (const auto& x : res.per_context[c]) {
      uint64_t x_end = std::min(x.offset + x.length, end);
      if (x_end <= pos) continue;
      auto len = static_cast<uint32_t>(x_end - pos);  // <= request length
      if (!descriptors.empty() && descriptors.back().flags == x.flags &&
          uint64_t{descriptors.back().length} + len <= UINT32_MAX) {
        descriptors.back().length += len;
      } else {
        if (descriptors.size() == max_extents) break;
        descriptors.push_back({len, x.flags});
      }
      pos = x_end;
      if (pos >= end) break;
    }
    if (descriptors.empty()) {
      descriptors.push_back({h.length, 0});  // status 0 is always a safe answer
    }
    uint16_t flags = c + 1 == selected.size() ? p::kReplyFlagDone : 0;
    p::append_block_status_chunk(r.meta, flags, h.cookie, selected[c], descriptors);
  }
}

// ---- Writer ----

void Connection::send(Reply r) {
  if (failed_) {
    in_flight_bytes_ -= std::min(in_flight_bytes_, r.charged_bytes);
    if (r.counts_request && in_flight_ > 0) --in_flight_;
    wake();
    return;
  }
  queued_data_bytes_ += r.data.size();
  queue_.push_back(std::move(r));
  if (!writing_) {
    writing_ = true;
    asio::co_spawn(
        executor_, [self = shared_from_this()] { return self->async_writer(); }, asio::detached);
  }
}

asio::awaitable<void> Connection::async_writer() {
  auto self = shared_from_this();
  std::vector<Reply> batch;
  std::vector<asio::const_buffer> buffers;
  while (!queue_.empty() && !failed_) {
    batch.clear();
    buffers.clear();
    while (!queue_.empty() && batch.size() < kMaxBatch) {
      batch.push_back(std::move(queue_.front()));
      queue_.pop_front();
    }
    append_wire_buffers(batch.begin(), batch.end(), buffers);
    if (front_sent_ > 0) {
      // flush_now() sent the start of these replies.
      std::size_t skip = std::exchange(front_sent_, 0);
      std::size_t whole = 0;
      while (whole < buffers.size() && buffers[whole].size() <= skip) {
        skip -= buffers[whole].size();
        ++whole;
      }
      buffers.erase(buffers.begin(), buffers.begin() + static_cast<std::ptrdiff_t>(whole));
      if (skip > 0) buffers.front() += skip;
    }
    std::error_code ec;
    co_await stream_->async_write_all(buffers, ec);
    for (Reply& r : batch) account_sent(r);
    drained_timer_.cancel();
    if (ec) {
      fail("write failed: " + ec.message());
      break;
    }
    wake();
  }
  // Anything left (after a failure) is dropped.
  while (!queue_.empty()) {
    Reply& r = queue_.front();
    in_flight_bytes_ -= std::min(in_flight_bytes_, r.charged_bytes);
    if (r.counts_request && in_flight_ > 0) --in_flight_;
    queue_.pop_front();
  }
  queued_data_bytes_ = 0;
  front_sent_ = 0;
  writing_ = false;
  drained_timer_.cancel();
  wake();
}

void Connection::account_sent(Reply& r) {
  in_flight_bytes_ -= std::min(in_flight_bytes_, r.charged_bytes);
  if (r.counts_request && in_flight_ > 0) --in_flight_;
  queued_data_bytes_ -= std::min(queued_data_bytes_, uint64_t{r.data.size()});
  if (r.data.capacity() > 0) buffers_.put(std::move(r.data));
}

void Connection::flush_now() {
  if (writing_ || queue_.empty()) return;
  if (!failed_) {
    const std::size_t n = std::min(queue_.size(), kMaxBatch);
    flush_buffers_.clear();
    append_wire_buffers(queue_.begin(), queue_.begin() + static_cast<std::ptrdiff_t>(n),
                        flush_buffers_);
    std::size_t total = 0;
    for (const auto& b : flush_buffers_) total += b.size();
    std::error_code ec;
    const std::size_t sent = stream_->try_write(flush_buffers_, ec);
    if (sent == total) {
      for (std::size_t i = 0; i < n; ++i) {
        account_sent(queue_.front());
        queue_.pop_front();
      }
      drained_timer_.cancel();
      wake();
      if (queue_.empty()) return;
    } else if (ec && !would_block(ec)) {
      fail("write failed: " + ec.message());
    } else {
      front_sent_ = sent;  // the writer goes on from here
    }
  }
  // The writer sends the rest, or drops it all after a failure.
  writing_ = true;
  asio::co_spawn(
      executor_, [self = shared_from_this()] { return self->async_writer(); }, asio::detached);
}

void Connection::wake() { wake_timer_.cancel(); }

asio::awaitable<void> Connection::async_wait_queue_room() {
  // Only the writer and flush_now() empty the queue; the writer runs while
  // the queue is not empty, and every batch either sends (and the writer's
  // exit) cancels drained_timer_.
  // Bounded: each turn waits for a batch to go out or the writer to stop.
  while (queued_data_bytes_ >= kMaxQueuedReadBytes && writing_ && !failed_) {
    boost::system::error_code ec;
    co_await drained_timer_.async_wait(asio::redirect_error(asio::use_awaitable, ec));
  }
}

asio::awaitable<void> Connection::async_wait_wake() {
  wake_timer_.expires_at(asio::steady_timer::time_point::max());
  boost::system::error_code ec;
  co_await wake_timer_.async_wait(asio::redirect_error(asio::use_awaitable, ec));
}

void Connection::fail(std::string_view reason) {
  if (failed_) return;
  failed_ = true;
  log().info("conn {} {}: closing: {}", id_, peer_, reason);
  stream_->close();
  wake();
}

}  // namespace fleeced::server

// SPDX-License-Identifier: MIT
// Fixed-newstyle option haggling (NBD spec, "Newstyle negotiation") and
// STARTTLS (spec, "TLS support"). Every function here returns false when the
// connection must end; option errors that the client can recover from are
// answered with NBD_REP_ERR_* and return true.
#include <array>
#include <string_view>

#include <boost/asio/redirect_error.hpp>
#include <boost/asio/use_awaitable.hpp>

#include "protocol/codec.hpp"
#include "protocol/names.hpp"
#include "protocol/nbd.hpp"
#include "server/connection.hpp"
#include "server/log.hpp"
#include "server/tls_authz.hpp"
#include "server/tls_stream.hpp"

namespace fleeced::server {

namespace p = fleeced::protocol;

namespace {

// Echo at most this much of a client-supplied name in messages (the
// CVE-2020-10761 lesson: never let an echo outgrow the message limit).
constexpr std::size_t kMaxEchoedName = 80;

std::string quoted(std::string_view name) {
  if (name.size() > kMaxEchoedName)
    return "'" + std::string(name.substr(0, kMaxEchoedName)) + "...'";
  return "'" + std::string(name) + "'";
}

uint32_t u32(p::Option o) { return static_cast<uint32_t>(o); }

// "NBD_OPT_GO", or "option 0x99" for one the name table does not know.
std::string option_label(uint32_t option) {
  std::string_view name = p::option_name(option);
  if (name.starts_with("NBD_")) return std::string(name);
  return fmt::format("option {:#x}", option);
}

}  // namespace

asio::awaitable<bool> Connection::async_send_now(const std::vector<std::byte>& bytes) {
  std::array<asio::const_buffer, 1> b{asio::buffer(bytes.data(), bytes.size())};
  std::error_code ec;
  co_await stream_->async_write_all(b, ec);
  if (ec) {
    log().debug("conn {} {}: write failed during negotiation: {}", id_, peer_, ec.message());
    co_return false;
  }
  co_return true;
}

bool Connection::claim_export(const ExportPtr& e) {
  // Counted before the reply goes out, so a safe block-export-del racing
  // with this client either sees it (and refuses) or has already marked the
  // export closing, which this check sees (seq_cst on both sides).
  e->state->clients.fetch_add(1);
  if (e->state->closing.load()) {
    e->state->clients.fetch_sub(1);
    return false;
  }
  claimed_ = e;
  return true;
}

void Connection::choose_export(ExportPtr e) {
  // The selection counts only if the last SET_META_CONTEXT named this export.
  if (meta_export_ != e) meta_selected_.clear();
  selected_ = meta_selected_;
  export_ = std::move(e);
  transmission_flags_ = export_->transmission_flags(structured_);
}

asio::awaitable<bool> Connection::async_negotiate() {
  std::array<std::byte, p::kGreetingSize> greeting{};
  (void)p::encode_greeting(greeting, p::kFlagFixedNewstyle | p::kFlagNoZeroes);
  if (!co_await async_send_now(std::vector<std::byte>(greeting.begin(), greeting.end())))
    co_return false;

  std::array<std::byte, p::kClientFlagsSize> flag_bytes{};
  if (!co_await async_read_exact(flag_bytes)) co_return false;
  uint32_t client_flags = 0;
  (void)p::decode_client_flags(flag_bytes, client_flags);
  if (client_flags & ~(p::kClientFlagFixedNewstyle | p::kClientFlagNoZeroes)) {
    log().info("conn {} {}: closing: unknown client flags {:#x}", id_, peer_, client_flags);
    co_return false;
  }
  fixed_newstyle_ = client_flags & p::kClientFlagFixedNewstyle;
  no_zeroes_ = client_flags & p::kClientFlagNoZeroes;

  for (;;) {
    std::array<std::byte, p::kOptionHeaderSize> hdr_bytes{};
    if (!co_await async_read_exact(hdr_bytes)) co_return false;
    p::OptionHeader hdr;
    if (p::decode_option_header(hdr_bytes, hdr)) {
      log().info("conn {} {}: closing: bad option magic", id_, peer_);
      co_return false;
    }
    if (hdr.length > p::kMaxOptionLength) {
      log().info("conn {} {}: closing: {} with oversized length {}", id_, peer_,
                 p::option_name(hdr.option), hdr.length);
      co_return false;
    }
    std::vector<std::byte> payload(hdr.length);
    if (!co_await async_read_exact(payload)) co_return false;
    log().debug("conn {} {}: option {} length {}", id_, peer_, p::option_name(hdr.option),
                hdr.length);
    if (!fixed_newstyle_ && hdr.option != u32(p::Option::export_name)) {
      // Plain newstyle clients cannot read option replies.
      log().info("conn {} {}: closing: {} from a non-fixed-newstyle client", id_, peer_,
                 p::option_name(hdr.option));
      co_return false;
    }
    bool done = false;
    if (!co_await async_handle_option(hdr.option, payload, done)) co_return false;
    if (done) co_return true;
  }
}

bool Connection::tls_required() const {
  return context_.tls && context_.tls->mode == TlsMode::require && !tls_active_;
}

asio::awaitable<bool> Connection::async_handle_option(uint32_t option,
                                                      std::vector<std::byte>& payload, bool& done) {
  std::vector<std::byte> out;
  const bool gated = option != u32(p::Option::abort) && option != u32(p::Option::starttls);
  if (gated && (tls_required() || !tls_refused_.empty())) {
    const bool refused = !tls_refused_.empty();
    const std::string why = refused ? "TLS client " + quoted(tls_refused_) + " is not authorized"
                                    : "TLS is required (send NBD_OPT_STARTTLS first)";
    if (option == u32(p::Option::export_name)) {
      // EXPORT_NAME has no error reply: the spec says to end the session.
      log().info("conn {} {}: closing: NBD_OPT_EXPORT_NAME refused: {}", id_, peer_, why);
      co_return false;
    }
    log().info("conn {} {}: refusing {}: {}", id_, peer_, option_label(option), why);
    p::append_reply_error(out, option,
                          refused ? p::OptionReply::err_policy : p::OptionReply::err_tls_reqd, why);
    co_return co_await async_send_now(out);
  }
  switch (static_cast<p::Option>(option)) {
    case p::Option::export_name:
      done = true;
      co_return co_await async_option_export_name(payload);
    case p::Option::abort:
      p::append_reply_ack(out, option);
      (void)co_await async_send_now(out);  // the client may already be gone
      log().debug("conn {} {}: client aborted negotiation", id_, peer_);
      co_return false;
    case p::Option::list:
      co_return co_await async_option_list(payload);
    case p::Option::starttls:
      co_return co_await async_option_starttls(payload);
    case p::Option::info:
    case p::Option::go:
      co_return co_await async_option_info(option, payload, done);
    case p::Option::structured_reply:
      if (!payload.empty()) {
        p::append_reply_error(out, option, p::OptionReply::err_invalid,
                              "STRUCTURED_REPLY takes no payload");
      } else if (structured_) {
        p::append_reply_error(out, option, p::OptionReply::err_invalid,
                              "structured replies already negotiated");
      } else {
        structured_ = true;
        p::append_reply_ack(out, option);
      }
      co_return co_await async_send_now(out);
    case p::Option::list_meta_context:
    case p::Option::set_meta_context:
      co_return co_await async_option_meta_context(option, payload);
    case p::Option::extended_headers:
    case p::Option::peek_export:
    default:
      p::append_reply_error(
          out, option, p::OptionReply::err_unsup,
          std::string("option ") + std::string(p::option_name(option)) + " not supported");
      co_return co_await async_send_now(out);
  }
}

asio::awaitable<bool> Connection::async_option_export_name(std::span<const std::byte> payload) {
  std::string name;
  if (p::decode_export_name(payload, name)) {
    log().info("conn {} {}: closing: malformed NBD_OPT_EXPORT_NAME", id_, peer_);
    co_return false;
  }
  ExportPtr e = context_.registry->find(name);
  if (!e || !claim_export(e)) {
    // EXPORT_NAME cannot carry an error: the spec says to end the session.
    log().info("conn {} {}: closing: NBD_OPT_EXPORT_NAME for unknown export {}", id_, peer_,
               quoted(name));
    co_return false;
  }
  choose_export(std::move(e));
  std::vector<std::byte> out;
  p::append_export_name_reply(out, export_->size(), transmission_flags_, no_zeroes_);
  co_return co_await async_send_now(out);
}

asio::awaitable<bool> Connection::async_option_starttls(std::span<const std::byte> payload) {
  std::vector<std::byte> out;
  const uint32_t option = u32(p::Option::starttls);
  const TlsPolicy* tls = context_.tls.get();
  if (tls_active_) {
    p::append_reply_error(out, option, p::OptionReply::err_invalid, "TLS already negotiated");
  } else if (!payload.empty()) {
    p::append_reply_error(out, option, p::OptionReply::err_invalid, "STARTTLS takes no payload");
  } else if (!tls || tls->mode == TlsMode::off || !tls->creds) {
    p::append_reply_error(out, option, p::OptionReply::err_policy, "TLS not configured");
  } else if (rpos_ < rend_) {
    // The client must wait for our reply before its ClientHello; bytes
    // already here were sent in plaintext after STARTTLS.
    log().info("conn {} {}: closing: {} bytes sent after NBD_OPT_STARTTLS before its reply", id_,
               peer_, rend_ - rpos_);
    co_return false;
  } else {
    co_return co_await async_start_tls();
  }
  co_return co_await async_send_now(out);
}

asio::awaitable<bool> Connection::async_start_tls() {
  const TlsPolicy& tls = *context_.tls;
  TlsCredentialsPtr creds = tls.creds->get();
  std::vector<std::byte> out;
  p::append_reply_ack(out, u32(p::Option::starttls));
  if (!co_await async_send_now(out)) co_return false;
  std::unique_ptr<TlsStream> upgraded = stream_->start_tls(creds);
  if (!upgraded) {
    log().error("conn {} {}: closing: this transport cannot carry TLS", id_, peer_);
    co_return false;
  }
  TlsStream& t = *upgraded;
  stream_ = std::move(upgraded);
  if (tls.authz && creds->options().kind == TlsCredsOptions::Kind::x509) {
    t.require_client_certificate();  // the allow-list names certificates
  }
  std::error_code ec;
  co_await t.async_handshake(ec);
  if (ec) {
    if (!handshake_expired_ && !stopping_) {
      log().info("conn {} {}: closing: TLS handshake failed: {}", id_, peer_, t.handshake_error());
    }
    co_return false;
  }
  tls_active_ = true;
  // Everything negotiated in plaintext is forgotten (spec; nbdkit's
  // CVE-2021-3716 honoured a STRUCTURED_REPLY injected before STARTTLS).
  structured_ = false;
  meta_export_.reset();
  meta_selected_.clear();
  if (tls.authz && !tls.authz->allows(t.identity())) {
    tls_refused_ = t.identity().empty() ? "(anonymous)" : t.identity();
    log().info("conn {} {}: TLS client {} is not authorized: refusing every option", id_, peer_,
               quoted(tls_refused_));
  } else {
    log().debug("conn {} {}: TLS established: {}, client {}", id_, peer_, t.session_description(),
                t.identity().empty() ? "anonymous" : quoted(t.identity()));
  }
  co_return true;
}

asio::awaitable<bool> Connection::async_option_list(std::span<const std::byte> payload) {
  std::vector<std::byte> out;
  const uint32_t option = u32(p::Option::list);
  if (!payload.empty()) {
    p::append_reply_error(out, option, p::OptionReply::err_invalid, "LIST takes no payload");
  } else {
    for (const auto& e : context_.registry->list()) {
      p::append_reply_server(out, e->name, e->description);
    }
    p::append_reply_ack(out, option);
  }
  co_return co_await async_send_now(out);
}

asio::awaitable<bool> Connection::async_option_info(uint32_t option,
                                                    std::span<const std::byte> payload,
                                                    bool& done) {
  std::vector<std::byte> out;
  p::InfoRequest req;
  if (std::error_code ec = p::decode_info_request(payload, req)) {
    p::append_reply_error(out, option, p::OptionReply::err_invalid,
                          "malformed " + std::string(p::option_name(option)) + ": " + ec.message());
    co_return co_await async_send_now(out);
  }
  ExportPtr e = context_.registry->find(req.name);
  if (!e || (option == u32(p::Option::go) && !claim_export(e))) {
    p::append_reply_error(out, option, p::OptionReply::err_unknown,
                          "export " + quoted(req.name) + " not present");
    co_return co_await async_send_now(out);
  }
  bool want_name = false;
  for (uint16_t t : req.info_types) {
    if (t == static_cast<uint16_t>(p::Info::name)) want_name = true;
  }
  if (want_name) p::append_info_name(out, option, e->name);
  if (!e->description.empty()) p::append_info_description(out, option, e->description);
  p::append_info_block_size(out, option, p::kMinimumBlockSize, p::kPreferredBlockSize,
                            p::kMaxPayloadSize);
  p::append_info_export(out, option, e->size(), e->transmission_flags(structured_));
  p::append_reply_ack(out, option);
  if (option == u32(p::Option::go)) {
    choose_export(std::move(e));
    done = true;
  }
  co_return co_await async_send_now(out);
}

asio::awaitable<bool> Connection::async_option_meta_context(uint32_t option,
                                                            std::span<const std::byte> payload) {
  std::vector<std::byte> out;
  const bool is_list = option == u32(p::Option::list_meta_context);
  if (!is_list) {
    // SET replaces the previous selection even when it fails.
    meta_export_.reset();
    meta_selected_.clear();
  }
  if (!is_list && !structured_) {
    p::append_reply_error(out, option, p::OptionReply::err_invalid,
                          "SET_META_CONTEXT requires structured replies");
    co_return co_await async_send_now(out);
  }
  p::MetaContextRequest req;
  if (std::error_code ec = p::decode_meta_context_request(payload, req)) {
    p::append_reply_error(out, option, p::OptionReply::err_invalid,
                          "malformed " + std::string(p::option_name(option)) + ": " + ec.message());
    co_return co_await async_send_now(out);
  }
  ExportPtr e = context_.registry->find(req.export_name);
  if (!e) {
    p::append_reply_error(out, option, p::OptionReply::err_unknown,
                          "export " + quoted(req.export_name) + " not present");
    co_return co_await async_send_now(out);
  }
  const std::vector<std::string> available = e->context_names();
  std::vector<std::string> matched;
  if (req.queries.empty()) {
    if (is_list) matched = available;  // LIST with no query lists everything
  } else {
    for (const auto& q : req.queries) p::match_meta_context(q, available, is_list, matched);
  }
  std::vector<uint32_t> ids;
  for (const auto& name : matched) {
    for (uint32_t i = 0; i < available.size(); ++i) {
      if (available[i] == name) {
        ids.push_back(i);
        break;
      }
    }
  }
  for (uint32_t id : ids) {
    p::append_reply_meta_context(out, option, is_list ? 0 : id, available[id]);
  }
  p::append_reply_ack(out, option);
  if (!is_list) {
    meta_export_ = e;
    meta_selected_ = std::move(ids);
  }
  co_return co_await async_send_now(out);
}

}  // namespace fleeced::server

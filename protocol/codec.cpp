// SPDX-License-Identifier: MIT
// Design notes: decoders walk client bytes with a Reader that checks the bytes
// left before every read, and compare a length field with what remains
// (`len > remaining`) instead of adding to a position, so no 32-bit length
// (0xffffffff included, CVE-2022-26495) can wrap or overrun. Counts are bounded
// by the bytes left before anything is reserved. Decoders fill a local value
// and move it into the output only on success. Encoders write big-endian
// fields exactly as doc/proto.md lays them out.
#include "protocol/codec.hpp"

#include <algorithm>
#include <bitset>
#include <utility>

namespace fleeced::protocol {
namespace {

class ProtocolCategory final : public std::error_category {
 public:
  const char* name() const noexcept override { return "nbd-protocol"; }

  std::string message(int value) const override {
    switch (static_cast<Errc>(value)) {
      case Errc::ok:
        return "success";
      case Errc::short_input:
        return "input too short";
      case Errc::bad_magic:
        return "bad magic";
      case Errc::bad_length:
        return "length field disagrees with framing";
      case Errc::string_too_long:
        return "string longer than 4096 bytes";
      case Errc::embedded_nul:
        return "string contains NUL";
      case Errc::trailing_data:
        return "trailing data after structure";
      case Errc::duplicate_info:
        return "info type requested twice";
      case Errc::output_too_small:
        return "output buffer too small";
    }
    return "unknown protocol error";
  }
};

// Cursor over client bytes; every read checks what is left first.
class Reader {
 public:
  explicit Reader(std::span<const std::byte> in) : in_(in) {}

  std::size_t remaining() const { return in_.size() - pos_; }

  bool read_be16(uint16_t& v) {
    if (remaining() < 2) return false;
    v = load_be16(in_.data() + pos_);
    pos_ += 2;
    return true;
  }

  bool read_be32(uint32_t& v) {
    if (remaining() < 4) return false;
    v = load_be32(in_.data() + pos_);
    pos_ += 4;
    return true;
  }

  // REQUIRES: n <= remaining().
  std::span<const std::byte> take(std::size_t n) {
    std::span<const std::byte> s = in_.subspan(pos_, n);
    pos_ += n;
    return s;
  }

 private:
  std::span<const std::byte> in_;
  std::size_t pos_ = 0;
};

// Checks an NBD string (doc/proto.md "Conventions": at most 4096 bytes, no
// NUL) and copies it into `out` only when it is valid.
std::error_code to_string(std::span<const std::byte> bytes, std::string& out) {
  if (bytes.size() > kMaxStringLength) return Errc::string_too_long;
  if (std::find(bytes.begin(), bytes.end(), std::byte{0}) != bytes.end()) {
    return Errc::embedded_nul;
  }
  out.assign(reinterpret_cast<const char*>(bytes.data()), bytes.size());
  return {};
}

// Reads "u32 length, string" where the length must fit in what remains.
std::error_code read_sized_string(Reader& r, std::string& out) {
  uint32_t length = 0;
  if (!r.read_be32(length)) return Errc::bad_length;
  if (length > r.remaining()) return Errc::bad_length;
  return to_string(r.take(length), out);
}

// Cuts a message to kMaxStringLength without splitting a UTF-8 sequence
// (at most 3 continuation bytes; invalid UTF-8 is simply cut).
std::string_view truncate_message(std::string_view message) {
  if (message.size() <= kMaxStringLength) return message;
  std::size_t cut = kMaxStringLength;
  auto is_continuation = [&](std::size_t i) {
    return (static_cast<unsigned char>(message[i]) & 0xc0u) == 0x80u;
  };
  while (cut > kMaxStringLength - 3 && is_continuation(cut)) --cut;
  return message.substr(0, cut);
}

void put_be16(std::vector<std::byte>& out, uint16_t v) {
  std::byte b[2];
  store_be16(b, v);
  out.insert(out.end(), b, b + 2);
}

void put_be32(std::vector<std::byte>& out, uint32_t v) {
  std::byte b[4];
  store_be32(b, v);
  out.insert(out.end(), b, b + 4);
}

void put_be64(std::vector<std::byte>& out, uint64_t v) {
  std::byte b[8];
  store_be64(b, v);
  out.insert(out.end(), b, b + 8);
}

void put_string(std::vector<std::byte>& out, std::string_view s) {
  const auto* p = reinterpret_cast<const std::byte*>(s.data());
  out.insert(out.end(), p, p + s.size());
}

void put_option_reply_header(std::vector<std::byte>& out, uint32_t option, OptionReply type,
                             std::size_t payload_length) {
  put_be64(out, kOptionReplyMagic);
  put_be32(out, option);
  put_be32(out, static_cast<uint32_t>(type));
  put_be32(out, static_cast<uint32_t>(payload_length));
}

// An NBD_REP_INFO reply whose payload is the info type and a string.
void put_info_string(std::vector<std::byte>& out, uint32_t option, Info info, std::string_view s) {
  put_option_reply_header(out, option, OptionReply::info, 2 + s.size());
  put_be16(out, static_cast<uint16_t>(info));
  put_string(out, s);
}

void put_chunk_header(std::vector<std::byte>& out, uint16_t flags, Chunk type, uint64_t cookie,
                      std::size_t payload_length) {
  std::byte b[kChunkHeaderSize];
  (void)encode_chunk_header(b, flags, type, cookie, static_cast<uint32_t>(payload_length));
  out.insert(out.end(), b, b + kChunkHeaderSize);
}

}  // namespace

const std::error_category& protocol_category() noexcept {
  static const ProtocolCategory category;
  return category;
}

std::error_code make_error_code(Errc e) noexcept {
  return {static_cast<int>(e), protocol_category()};
}

// ---- Big-endian helpers ----

uint16_t load_be16(const std::byte* p) noexcept {
  return static_cast<uint16_t>(std::to_integer<unsigned>(p[0]) << 8 |
                               std::to_integer<unsigned>(p[1]));
}

uint32_t load_be32(const std::byte* p) noexcept {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v = v << 8 | std::to_integer<uint32_t>(p[i]);
  return v;
}

uint64_t load_be64(const std::byte* p) noexcept {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v = v << 8 | std::to_integer<uint64_t>(p[i]);
  return v;
}

void store_be16(std::byte* p, uint16_t v) noexcept {
  p[0] = static_cast<std::byte>(v >> 8);
  p[1] = static_cast<std::byte>(v & 0xffu);
}

void store_be32(std::byte* p, uint32_t v) noexcept {
  for (int i = 3; i >= 0; --i, v >>= 8) p[i] = static_cast<std::byte>(v & 0xffu);
}

void store_be64(std::byte* p, uint64_t v) noexcept {
  for (int i = 7; i >= 0; --i, v >>= 8) p[i] = static_cast<std::byte>(v & 0xffu);
}

// ---- Handshake ----

std::error_code encode_greeting(std::span<std::byte> out, uint16_t handshake_flags) {
  if (out.size() < kGreetingSize) return Errc::output_too_small;
  store_be64(out.data(), kNbdMagic);
  store_be64(out.data() + 8, kIHaveOpt);
  store_be16(out.data() + 16, handshake_flags);
  return {};
}

std::error_code decode_greeting(std::span<const std::byte> in, uint16_t& handshake_flags) {
  if (in.size() < kGreetingSize) return Errc::short_input;
  if (load_be64(in.data()) != kNbdMagic || load_be64(in.data() + 8) != kIHaveOpt) {
    return Errc::bad_magic;
  }
  handshake_flags = load_be16(in.data() + 16);
  return {};
}

std::error_code encode_client_flags(std::span<std::byte> out, uint32_t flags) {
  if (out.size() < kClientFlagsSize) return Errc::output_too_small;
  store_be32(out.data(), flags);
  return {};
}

std::error_code decode_client_flags(std::span<const std::byte> in, uint32_t& flags) {
  if (in.size() < kClientFlagsSize) return Errc::short_input;
  flags = load_be32(in.data());
  return {};
}

std::error_code encode_option_header(std::span<std::byte> out, const OptionHeader& h) {
  if (out.size() < kOptionHeaderSize) return Errc::output_too_small;
  store_be64(out.data(), kIHaveOpt);
  store_be32(out.data() + 8, h.option);
  store_be32(out.data() + 12, h.length);
  return {};
}

std::error_code decode_option_header(std::span<const std::byte> in, OptionHeader& out) {
  if (in.size() < kOptionHeaderSize) return Errc::short_input;
  if (load_be64(in.data()) != kIHaveOpt) return Errc::bad_magic;
  out.option = load_be32(in.data() + 8);
  out.length = load_be32(in.data() + 12);
  return {};
}

std::error_code decode_info_request(std::span<const std::byte> in, InfoRequest& out) {
  Reader r(in);
  uint32_t name_length = 0;
  if (!r.read_be32(name_length)) return Errc::short_input;
  // doc/proto.md NBD_OPT_INFO: the name length must leave room for the
  // 2-byte count (CVE-2022-26496 trusted it).
  if (name_length > r.remaining()) return Errc::bad_length;
  InfoRequest req;
  if (std::error_code ec = to_string(r.take(name_length), req.name)) return ec;
  uint16_t count = 0;
  if (!r.read_be16(count)) return Errc::bad_length;
  if (r.remaining() != std::size_t{count} * 2) return Errc::bad_length;
  // "The client MUST NOT list the same info type twice"; a bitset keeps the
  // check linear for 65535 entries.
  std::bitset<65536> seen;
  req.info_types.reserve(count);
  for (uint16_t type = 0; r.read_be16(type);) {
    if (seen.test(type)) return Errc::duplicate_info;
    seen.set(type);
    req.info_types.push_back(type);
  }
  out = std::move(req);
  return {};
}

std::error_code decode_meta_context_request(std::span<const std::byte> in,
                                            MetaContextRequest& out) {
  Reader r(in);
  uint32_t name_length = 0;
  if (!r.read_be32(name_length)) return Errc::short_input;
  if (name_length > r.remaining()) return Errc::bad_length;
  MetaContextRequest req;
  if (std::error_code ec = to_string(r.take(name_length), req.export_name)) return ec;
  uint32_t count = 0;
  if (!r.read_be32(count)) return Errc::bad_length;
  // Every query takes at least its 4-byte length, so a larger count cannot be
  // honest; rejecting it here bounds the loop and the reserve.
  if (count > r.remaining() / 4) return Errc::bad_length;
  req.queries.reserve(count);
  for (uint32_t i = 0; i < count; ++i) {
    std::string query;
    if (std::error_code ec = read_sized_string(r, query)) return ec;
    req.queries.push_back(std::move(query));
  }
  if (r.remaining() != 0) return Errc::bad_length;
  out = std::move(req);
  return {};
}

std::error_code decode_export_name(std::span<const std::byte> in, std::string& out) {
  return to_string(in, out);
}

void append_option_reply(std::vector<std::byte>& out, uint32_t option, OptionReply type,
                         std::span<const std::byte> payload) {
  put_option_reply_header(out, option, type, payload.size());
  out.insert(out.end(), payload.begin(), payload.end());
}

void append_reply_ack(std::vector<std::byte>& out, uint32_t option) {
  put_option_reply_header(out, option, OptionReply::ack, 0);
}

void append_reply_error(std::vector<std::byte>& out, uint32_t option, OptionReply type,
                        std::string_view message) {
  message = truncate_message(message);
  put_option_reply_header(out, option, type, message.size());
  put_string(out, message);
}

void append_reply_server(std::vector<std::byte>& out, std::string_view name,
                         std::string_view description) {
  put_option_reply_header(out, static_cast<uint32_t>(Option::list), OptionReply::server,
                          4 + name.size() + description.size());
  put_be32(out, static_cast<uint32_t>(name.size()));
  put_string(out, name);
  put_string(out, description);
}

void append_info_export(std::vector<std::byte>& out, uint32_t option, uint64_t size,
                        uint16_t transmission_flags) {
  put_option_reply_header(out, option, OptionReply::info, 12);
  put_be16(out, static_cast<uint16_t>(Info::export_info));
  put_be64(out, size);
  put_be16(out, transmission_flags);
}

void append_info_name(std::vector<std::byte>& out, uint32_t option, std::string_view name) {
  put_info_string(out, option, Info::name, name);
}

void append_info_description(std::vector<std::byte>& out, uint32_t option,
                             std::string_view description) {
  put_info_string(out, option, Info::description, description);
}

void append_info_block_size(std::vector<std::byte>& out, uint32_t option, uint32_t minimum,
                            uint32_t preferred, uint32_t maximum) {
  put_option_reply_header(out, option, OptionReply::info, 14);
  put_be16(out, static_cast<uint16_t>(Info::block_size));
  put_be32(out, minimum);
  put_be32(out, preferred);
  put_be32(out, maximum);
}

void append_reply_meta_context(std::vector<std::byte>& out, uint32_t option, uint32_t context_id,
                               std::string_view name) {
  put_option_reply_header(out, option, OptionReply::meta_context, 4 + name.size());
  put_be32(out, context_id);
  put_string(out, name);
}

void append_export_name_reply(std::vector<std::byte>& out, uint64_t size,
                              uint16_t transmission_flags, bool no_zeroes) {
  put_be64(out, size);
  put_be16(out, transmission_flags);
  if (!no_zeroes) out.insert(out.end(), kExportNameReplyPadding, std::byte{0});
}

std::error_code decode_option_reply_header(std::span<const std::byte> in, OptionReplyHeader& out) {
  if (in.size() < kOptionReplyHeaderSize) return Errc::short_input;
  if (load_be64(in.data()) != kOptionReplyMagic) return Errc::bad_magic;
  out.option = load_be32(in.data() + 8);
  out.type = load_be32(in.data() + 12);
  out.length = load_be32(in.data() + 16);
  return {};
}

// ---- Transmission ----

std::error_code decode_request_header(std::span<const std::byte> in, RequestHeader& out) {
  if (in.size() < kRequestHeaderSize) return Errc::short_input;
  if (load_be32(in.data()) != kRequestMagic) return Errc::bad_magic;
  out.flags = load_be16(in.data() + 4);
  out.type = load_be16(in.data() + 6);
  out.cookie = load_be64(in.data() + 8);
  out.offset = load_be64(in.data() + 16);
  out.length = load_be32(in.data() + 24);
  return {};
}

std::error_code encode_request_header(std::span<std::byte> out, const RequestHeader& h) {
  if (out.size() < kRequestHeaderSize) return Errc::output_too_small;
  store_be32(out.data(), kRequestMagic);
  store_be16(out.data() + 4, h.flags);
  store_be16(out.data() + 6, h.type);
  store_be64(out.data() + 8, h.cookie);
  store_be64(out.data() + 16, h.offset);
  store_be32(out.data() + 24, h.length);
  return {};
}

std::error_code encode_simple_reply(std::span<std::byte> out, uint32_t error, uint64_t cookie) {
  if (out.size() < kSimpleReplyHeaderSize) return Errc::output_too_small;
  store_be32(out.data(), kSimpleReplyMagic);
  store_be32(out.data() + 4, error);
  store_be64(out.data() + 8, cookie);
  return {};
}

std::error_code decode_simple_reply(std::span<const std::byte> in, SimpleReply& out) {
  if (in.size() < kSimpleReplyHeaderSize) return Errc::short_input;
  if (load_be32(in.data()) != kSimpleReplyMagic) return Errc::bad_magic;
  out.error = load_be32(in.data() + 4);
  out.cookie = load_be64(in.data() + 8);
  return {};
}

std::error_code encode_chunk_header(std::span<std::byte> out, uint16_t flags, Chunk type,
                                    uint64_t cookie, uint32_t payload_length) {
  if (out.size() < kChunkHeaderSize) return Errc::output_too_small;
  store_be32(out.data(), kStructuredReplyMagic);
  store_be16(out.data() + 4, flags);
  store_be16(out.data() + 6, static_cast<uint16_t>(type));
  store_be64(out.data() + 8, cookie);
  store_be32(out.data() + 16, payload_length);
  return {};
}

std::error_code decode_chunk_header(std::span<const std::byte> in, ChunkHeader& out) {
  if (in.size() < kChunkHeaderSize) return Errc::short_input;
  if (load_be32(in.data()) != kStructuredReplyMagic) return Errc::bad_magic;
  out.flags = load_be16(in.data() + 4);
  out.type = load_be16(in.data() + 6);
  out.cookie = load_be64(in.data() + 8);
  out.length = load_be32(in.data() + 16);
  return {};
}

std::error_code encode_offset_data_prefix(std::span<std::byte> out, uint16_t flags, uint64_t cookie,
                                          uint64_t offset, uint32_t data_length) {
  if (out.size() < kOffsetDataPrefixSize) return Errc::output_too_small;
  // The chunk length counts the offset too and is only 32 bits wide.
  if (data_length > UINT32_MAX - 8) return Errc::bad_length;
  (void)encode_chunk_header(out, flags, Chunk::offset_data, cookie, 8 + data_length);
  store_be64(out.data() + kChunkHeaderSize, offset);
  return {};
}

std::error_code encode_offset_hole(std::span<std::byte> out, uint16_t flags, uint64_t cookie,
                                   uint64_t offset, uint32_t hole_length) {
  if (out.size() < kOffsetHoleChunkSize) return Errc::output_too_small;
  (void)encode_chunk_header(out, flags, Chunk::offset_hole, cookie, 12);
  store_be64(out.data() + kChunkHeaderSize, offset);
  store_be32(out.data() + kChunkHeaderSize + 8, hole_length);
  return {};
}

void append_block_status_chunk(std::vector<std::byte>& out, uint16_t flags, uint64_t cookie,
                               uint32_t context_id, std::span<const BlockStatusExtent> extents) {
  put_chunk_header(out, flags, Chunk::block_status, cookie, 4 + 8 * extents.size());
  // One resize, then stores in place: a reply can hold 131072 descriptors.
  const std::size_t at = out.size();
  out.resize(at + 4 + 8 * extents.size());
  std::byte* p = out.data() + at;
  store_be32(p, context_id);
  p += 4;
  for (const BlockStatusExtent& e : extents) {
    store_be32(p, e.length);
    store_be32(p + 4, e.flags);
    p += 8;
  }
}

void append_error_chunk(std::vector<std::byte>& out, uint16_t flags, uint64_t cookie,
                        uint32_t error, std::string_view message) {
  message = truncate_message(message);
  put_chunk_header(out, flags, Chunk::error, cookie, 6 + message.size());
  put_be32(out, error);
  put_be16(out, static_cast<uint16_t>(message.size()));
  put_string(out, message);
}

void append_none_chunk(std::vector<std::byte>& out, uint16_t flags, uint64_t cookie) {
  put_chunk_header(out, flags, Chunk::none, cookie, 0);
}

// ---- Meta contexts ----

bool split_context_name(std::string_view name, std::string_view& ns, std::string_view& leaf) {
  std::size_t colon = name.find(':');
  if (colon == std::string_view::npos || colon == 0) return false;
  ns = name.substr(0, colon);
  leaf = name.substr(colon + 1);
  return true;
}

void match_meta_context(std::string_view query, std::span<const std::string> available,
                        bool is_list, std::vector<std::string>& out) {
  std::string_view ns;
  std::string_view leaf;
  if (!split_context_name(query, ns, leaf)) return;
  // doc/proto.md "Metadata querying": an empty leaf is a wildcard on LIST and
  // selects nothing on SET; QEMU's registry adds "qemu:dirty-bitmap:".
  const bool wildcard = is_list && (leaf.empty() || query == kContextDirtyBitmapPrefix);
  for (const std::string& name : available) {
    const bool selected = wildcard ? name.starts_with(query) : name == query;
    if (selected && std::find(out.begin(), out.end(), name) == out.end()) out.push_back(name);
  }
}

}  // namespace fleeced::protocol

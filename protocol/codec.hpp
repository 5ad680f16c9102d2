// SPDX-License-Identifier: MIT
// Pure encoders and decoders for every NBD wire structure fleeced sends or
// receives. No I/O, no allocation on decode paths beyond the output strings,
// never throws or asserts on input: decoders return a protocol::Errc.
// Stateless; safe from any thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include "protocol/nbd.hpp"

namespace fleeced::protocol {

enum class Errc {
  ok = 0,
  short_input = 1,   // fewer bytes than the structure needs
  bad_magic,         // IHAVEOPT or request magic mismatch
  bad_length,        // a length field disagrees with the framing
  string_too_long,   // a string exceeds kMaxStringLength
  embedded_nul,      // a string contains NUL
  trailing_data,     // bytes left over after a complete structure
  duplicate_info,    // an info type listed twice
  output_too_small,  // encode target span too small
};
const std::error_category& protocol_category() noexcept;
std::error_code make_error_code(Errc e) noexcept;

// ---- Big-endian helpers (for fixed structures) ----
uint16_t load_be16(const std::byte* p) noexcept;
uint32_t load_be32(const std::byte* p) noexcept;
uint64_t load_be64(const std::byte* p) noexcept;
void store_be16(std::byte* p, uint16_t v) noexcept;
void store_be32(std::byte* p, uint32_t v) noexcept;
void store_be64(std::byte* p, uint64_t v) noexcept;

// ---- Handshake ----

// Writes the 18-byte server greeting (NBDMAGIC, IHAVEOPT, handshake flags).
std::error_code encode_greeting(std::span<std::byte> out, uint16_t handshake_flags);
// Reads the 18-byte greeting (clients and tests); bad_magic if either magic is wrong.
std::error_code decode_greeting(std::span<const std::byte> in, uint16_t& handshake_flags);
// Reads the 4-byte client flags.
std::error_code decode_client_flags(std::span<const std::byte> in, uint32_t& flags);
// Writes the 4-byte client flags (clients and tests).
std::error_code encode_client_flags(std::span<std::byte> out, uint32_t flags);

struct OptionHeader {
  uint32_t option = 0;  // an Option value, possibly unknown
  uint32_t length = 0;  // payload length that follows
};
// Decodes the 16-byte option header; bad_magic if IHAVEOPT is wrong.
std::error_code decode_option_header(std::span<const std::byte> in, OptionHeader& out);
// Writes the 16-byte option header (clients and tests).
std::error_code encode_option_header(std::span<std::byte> out, const OptionHeader& h);

// Payload decoders below take exactly the option payload. Errors (all mean
// NBD_REP_ERR_INVALID for the client): short_input if the payload ends inside
// the leading u32 name length; bad_length if a length or count disagrees with
// the bytes present (overrun, missing field, leftover bytes);
// string_too_long / embedded_nul for a bad name or query. `out` is only
// written on success.

// NBD_OPT_INFO / NBD_OPT_GO payload. Also duplicate_info if a type repeats.
struct InfoRequest {
  std::string name;
  std::vector<uint16_t> info_types;
};
std::error_code decode_info_request(std::span<const std::byte> in, InfoRequest& out);

// NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT payload.
struct MetaContextRequest {
  std::string export_name;
  std::vector<std::string> queries;
};
std::error_code decode_meta_context_request(std::span<const std::byte> in, MetaContextRequest& out);

// NBD_OPT_EXPORT_NAME payload: the whole payload is the name (may be empty).
std::error_code decode_export_name(std::span<const std::byte> in, std::string& out);

// Appends a complete option reply (20-byte header + payload) to `out`.
void append_option_reply(std::vector<std::byte>& out, uint32_t option, OptionReply type,
                         std::span<const std::byte> payload = {});
void append_reply_ack(std::vector<std::byte>& out, uint32_t option);
// Error replies carry a human-readable message (truncated to kMaxStringLength).
void append_reply_error(std::vector<std::byte>& out, uint32_t option, OptionReply type,
                        std::string_view message);
// NBD_REP_SERVER: u32 name length, name, description.
void append_reply_server(std::vector<std::byte>& out, std::string_view name,
                         std::string_view description);
void append_info_export(std::vector<std::byte>& out, uint32_t option, uint64_t size,
                        uint16_t transmission_flags);
void append_info_name(std::vector<std::byte>& out, uint32_t option, std::string_view name);
void append_info_description(std::vector<std::byte>& out, uint32_t option,
                             std::string_view description);
void append_info_block_size(std::vector<std::byte>& out, uint32_t option, uint32_t minimum,
                            uint32_t preferred, uint32_t maximum);
void append_reply_meta_context(std::vector<std::byte>& out, uint32_t option, uint32_t context_id,
                               std::string_view name);
// Reply to NBD_OPT_EXPORT_NAME: size, flags, and 124 zeroes unless no_zeroes.
void append_export_name_reply(std::vector<std::byte>& out, uint64_t size,
                              uint16_t transmission_flags, bool no_zeroes);

// Option reply header, for clients and tests.
struct OptionReplyHeader {
  uint32_t option = 0;
  uint32_t type = 0;  // an OptionReply value, possibly unknown
  uint32_t length = 0;
};
// Decodes the 20-byte option reply header; bad_magic if the magic is wrong.
std::error_code decode_option_reply_header(std::span<const std::byte> in, OptionReplyHeader& out);

// ---- Transmission ----

struct RequestHeader {
  uint16_t flags = 0;
  uint16_t type = 0;  // a Command value, possibly unknown
  uint64_t cookie = 0;
  uint64_t offset = 0;
  uint32_t length = 0;
};
// Decodes the 28-byte request header; bad_magic if the magic is wrong.
std::error_code decode_request_header(std::span<const std::byte> in, RequestHeader& out);
// Encodes a request header (used by tests and tools).
std::error_code encode_request_header(std::span<std::byte> out, const RequestHeader& h);

// 16-byte simple reply header.
std::error_code encode_simple_reply(std::span<std::byte> out, uint32_t error, uint64_t cookie);
struct SimpleReply {
  uint32_t error = 0;
  uint64_t cookie = 0;
};
// Decodes a simple reply header (clients and tests); bad_magic on a wrong magic.
std::error_code decode_simple_reply(std::span<const std::byte> in, SimpleReply& out);
// 20-byte structured reply chunk header.
std::error_code encode_chunk_header(std::span<std::byte> out, uint16_t flags, Chunk type,
                                    uint64_t cookie, uint32_t payload_length);
struct ChunkHeader {
  uint16_t flags = 0;
  uint16_t type = 0;  // a Chunk value, possibly unknown
  uint64_t cookie = 0;
  uint32_t length = 0;
};
// Decodes a chunk header (clients and tests); bad_magic on a wrong magic.
std::error_code decode_chunk_header(std::span<const std::byte> in, ChunkHeader& out);
// OFFSET_DATA chunk header + 8-byte offset (28 bytes); the data follows.
// bad_length if 8 + data_length does not fit the 32-bit chunk length.
inline constexpr std::size_t kOffsetDataPrefixSize = kChunkHeaderSize + 8;
std::error_code encode_offset_data_prefix(std::span<std::byte> out, uint16_t flags, uint64_t cookie,
                                          uint64_t offset, uint32_t data_length);
// Complete OFFSET_HOLE chunk (32 bytes).
inline constexpr std::size_t kOffsetHoleChunkSize = kChunkHeaderSize + 12;
std::error_code encode_offset_hole(std::span<std::byte> out, uint16_t flags, uint64_t cookie,
                                   uint64_t offset, uint32_t hole_length);

struct BlockStatusExtent {
  uint32_t length = 0;
  uint32_t flags = 0;
};
// Appends a complete BLOCK_STATUS chunk (header, context id, descriptors).
// REQUIRES: extents.size() <= kMaxExtentsPerChunk.
void append_block_status_chunk(std::vector<std::byte>& out, uint16_t flags, uint64_t cookie,
                               uint32_t context_id, std::span<const BlockStatusExtent> extents);
// Appends a complete ERROR chunk with a message (truncated to kMaxStringLength).
void append_error_chunk(std::vector<std::byte>& out, uint16_t flags, uint64_t cookie,
                        uint32_t error, std::string_view message);
// Appends a complete NONE chunk (no payload).
void append_none_chunk(std::vector<std::byte>& out, uint16_t flags, uint64_t cookie);

// ---- Meta contexts ----

// Splits "namespace:leaf"; false if there is no colon or the namespace is empty.
bool split_context_name(std::string_view name, std::string_view& ns, std::string_view& leaf);
// Appends to `out` the names among `available` that `query` selects. On LIST a
// query whose leaf is empty ("base:", "qemu:", "qemu:dirty-bitmap:") selects
// every available name with that prefix; on SET only exact names select.
// Queries in unknown namespaces or without a namespace select nothing.
void match_meta_context(std::string_view query, std::span<const std::string> available,
                        bool is_list, std::vector<std::string>& out);

}  // namespace fleeced::protocol

namespace std {
template <>
struct is_error_code_enum<fleeced::protocol::Errc> : true_type {};
}  // namespace std

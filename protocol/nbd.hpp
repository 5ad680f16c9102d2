// SPDX-License-Identifier: MIT
// NBD protocol constants: magics, option/reply/info/command codes, flags and
// error values, with the spec's names beside ours (NetworkBlockDevice/nbd
// doc/proto.md). Header-only, no state; safe from any thread.
#pragma once

#include <cstddef>
#include <cstdint>

namespace fleeced::protocol {

// Magics.
inline constexpr uint64_t kNbdMagic = 0x4e42444d41474943;       // NBDMAGIC
inline constexpr uint64_t kIHaveOpt = 0x49484156454F5054;       // IHAVEOPT
inline constexpr uint64_t kOptionReplyMagic = 0x3e889045565a9;  // option reply
inline constexpr uint32_t kRequestMagic = 0x25609513;           // NBD_REQUEST_MAGIC
inline constexpr uint32_t kSimpleReplyMagic = 0x67446698;       // NBD_SIMPLE_REPLY_MAGIC
inline constexpr uint32_t kStructuredReplyMagic = 0x668e33ef;   // NBD_STRUCTURED_REPLY_MAGIC

// Fixed sizes of wire structures, in bytes.
inline constexpr std::size_t kGreetingSize = 18;  // magic, IHAVEOPT, flags
inline constexpr std::size_t kClientFlagsSize = 4;
inline constexpr std::size_t kOptionHeaderSize = 16;       // IHAVEOPT, option, length
inline constexpr std::size_t kOptionReplyHeaderSize = 20;  // magic, option, type, length
inline constexpr std::size_t kExportNameReplySize = 10;    // size, flags (+124 zeroes)
inline constexpr std::size_t kExportNameReplyPadding = 124;
inline constexpr std::size_t kRequestHeaderSize = 28;
inline constexpr std::size_t kSimpleReplyHeaderSize = 16;
inline constexpr std::size_t kChunkHeaderSize = 20;  // structured reply chunk

// Limits we enforce.
inline constexpr uint32_t kMaxStringLength = 4096;      // names, messages, contexts
inline constexpr uint32_t kMaxOptionLength = 1u << 20;  // larger options end the connection
inline constexpr uint32_t kMaxPayloadSize = 32u << 20;  // advertised maximum block size
inline constexpr uint32_t kPreferredBlockSize = 4096;
inline constexpr uint32_t kMinimumBlockSize = 1;
inline constexpr uint32_t kMaxExtentsPerChunk = 1u << 20 >> 3;  // 131072 descriptors

// Handshake flags (server, 16 bit).
inline constexpr uint16_t kFlagFixedNewstyle = 1u << 0;  // NBD_FLAG_FIXED_NEWSTYLE
inline constexpr uint16_t kFlagNoZeroes = 1u << 1;       // NBD_FLAG_NO_ZEROES

// Client flags (32 bit).
inline constexpr uint32_t kClientFlagFixedNewstyle = 1u << 0;  // NBD_FLAG_C_FIXED_NEWSTYLE
inline constexpr uint32_t kClientFlagNoZeroes = 1u << 1;       // NBD_FLAG_C_NO_ZEROES

enum class Option : uint32_t {
  export_name = 1,        // NBD_OPT_EXPORT_NAME
  abort = 2,              // NBD_OPT_ABORT
  list = 3,               // NBD_OPT_LIST
  peek_export = 4,        // NBD_OPT_PEEK_EXPORT (withdrawn)
  starttls = 5,           // NBD_OPT_STARTTLS
  info = 6,               // NBD_OPT_INFO
  go = 7,                 // NBD_OPT_GO
  structured_reply = 8,   // NBD_OPT_STRUCTURED_REPLY
  list_meta_context = 9,  // NBD_OPT_LIST_META_CONTEXT
  set_meta_context = 10,  // NBD_OPT_SET_META_CONTEXT
  extended_headers = 11,  // NBD_OPT_EXTENDED_HEADERS
};

inline constexpr uint32_t kRepErrorBit = 1u << 31;
enum class OptionReply : uint32_t {
  ack = 1,                                  // NBD_REP_ACK
  server = 2,                               // NBD_REP_SERVER
  info = 3,                                 // NBD_REP_INFO
  meta_context = 4,                         // NBD_REP_META_CONTEXT
  err_unsup = kRepErrorBit | 1,             // NBD_REP_ERR_UNSUP
  err_policy = kRepErrorBit | 2,            // NBD_REP_ERR_POLICY
  err_invalid = kRepErrorBit | 3,           // NBD_REP_ERR_INVALID
  err_platform = kRepErrorBit | 4,          // NBD_REP_ERR_PLATFORM
  err_tls_reqd = kRepErrorBit | 5,          // NBD_REP_ERR_TLS_REQD
  err_unknown = kRepErrorBit | 6,           // NBD_REP_ERR_UNKNOWN
  err_shutdown = kRepErrorBit | 7,          // NBD_REP_ERR_SHUTDOWN
  err_block_size_reqd = kRepErrorBit | 8,   // NBD_REP_ERR_BLOCK_SIZE_REQD
  err_too_big = kRepErrorBit | 9,           // NBD_REP_ERR_TOO_BIG
  err_ext_header_reqd = kRepErrorBit | 10,  // NBD_REP_ERR_EXT_HEADER_REQD
};

enum class Info : uint16_t {
  export_info = 0,  // NBD_INFO_EXPORT
  name = 1,         // NBD_INFO_NAME
  description = 2,  // NBD_INFO_DESCRIPTION
  block_size = 3,   // NBD_INFO_BLOCK_SIZE
};

// Transmission flags (16 bit).
inline constexpr uint16_t kFlagHasFlags = 1u << 0;         // NBD_FLAG_HAS_FLAGS
inline constexpr uint16_t kFlagReadOnly = 1u << 1;         // NBD_FLAG_READ_ONLY
inline constexpr uint16_t kFlagSendFlush = 1u << 2;        // NBD_FLAG_SEND_FLUSH
inline constexpr uint16_t kFlagSendFua = 1u << 3;          // NBD_FLAG_SEND_FUA
inline constexpr uint16_t kFlagRotational = 1u << 4;       // NBD_FLAG_ROTATIONAL
inline constexpr uint16_t kFlagSendTrim = 1u << 5;         // NBD_FLAG_SEND_TRIM
inline constexpr uint16_t kFlagSendWriteZeroes = 1u << 6;  // NBD_FLAG_SEND_WRITE_ZEROES
inline constexpr uint16_t kFlagSendDf = 1u << 7;           // NBD_FLAG_SEND_DF
inline constexpr uint16_t kFlagCanMultiConn = 1u << 8;     // NBD_FLAG_CAN_MULTI_CONN
inline constexpr uint16_t kFlagSendResize = 1u << 9;       // NBD_FLAG_SEND_RESIZE
inline constexpr uint16_t kFlagSendCache = 1u << 10;       // NBD_FLAG_SEND_CACHE
inline constexpr uint16_t kFlagSendFastZero = 1u << 11;    // NBD_FLAG_SEND_FAST_ZERO

enum class Command : uint16_t {
  read = 0,          // NBD_CMD_READ
  write = 1,         // NBD_CMD_WRITE
  disc = 2,          // NBD_CMD_DISC
  flush = 3,         // NBD_CMD_FLUSH
  trim = 4,          // NBD_CMD_TRIM
  cache = 5,         // NBD_CMD_CACHE
  write_zeroes = 6,  // NBD_CMD_WRITE_ZEROES
  block_status = 7,  // NBD_CMD_BLOCK_STATUS
};

// Command flags (16 bit).
inline constexpr uint16_t kCmdFlagFua = 1u << 0;       // NBD_CMD_FLAG_FUA
inline constexpr uint16_t kCmdFlagNoHole = 1u << 1;    // NBD_CMD_FLAG_NO_HOLE
inline constexpr uint16_t kCmdFlagDf = 1u << 2;        // NBD_CMD_FLAG_DF
inline constexpr uint16_t kCmdFlagReqOne = 1u << 3;    // NBD_CMD_FLAG_REQ_ONE
inline constexpr uint16_t kCmdFlagFastZero = 1u << 4;  // NBD_CMD_FLAG_FAST_ZERO

// Structured reply chunk flags and types.
inline constexpr uint16_t kReplyFlagDone = 1u << 0;  // NBD_REPLY_FLAG_DONE
enum class Chunk : uint16_t {
  none = 0,                       // NBD_REPLY_TYPE_NONE
  offset_data = 1,                // NBD_REPLY_TYPE_OFFSET_DATA
  offset_hole = 2,                // NBD_REPLY_TYPE_OFFSET_HOLE
  block_status = 5,               // NBD_REPLY_TYPE_BLOCK_STATUS
  error = (1u << 15) + 1,         // NBD_REPLY_TYPE_ERROR
  error_offset = (1u << 15) + 2,  // NBD_REPLY_TYPE_ERROR_OFFSET
};

// base:allocation extent flags.
inline constexpr uint32_t kStateHole = 1u << 0;  // NBD_STATE_HOLE
inline constexpr uint32_t kStateZero = 1u << 1;  // NBD_STATE_ZERO
// qemu:dirty-bitmap extent flag.
inline constexpr uint32_t kStateDirty = 1u << 0;  // NBD_STATE_DIRTY

// Error values carried in replies.
enum class Error : uint32_t {
  ok = 0,
  perm = 1,        // NBD_EPERM
  io = 5,          // NBD_EIO
  nomem = 12,      // NBD_ENOMEM
  inval = 22,      // NBD_EINVAL
  nospc = 28,      // NBD_ENOSPC
  overflow = 75,   // NBD_EOVERFLOW
  notsup = 95,     // NBD_ENOTSUP
  shutdown = 108,  // NBD_ESHUTDOWN
};

inline constexpr const char* kContextBaseAllocation = "base:allocation";
inline constexpr const char* kContextDirtyBitmapPrefix = "qemu:dirty-bitmap:";

}  // namespace fleeced::protocol

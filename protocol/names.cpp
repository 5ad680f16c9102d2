// SPDX-License-Identifier: MIT
// One table per kind of code (QEMU nbd/common.c nbd_*_lookup, nbdkit
// protostrings); lookups scan the table, so adding a code is one line.
#include "protocol/names.hpp"

#include <array>

#include "protocol/nbd.hpp"

namespace fleeced::protocol {
namespace {

template <typename Enum>
struct Name {
  Enum value;
  std::string_view name;
};

template <typename Enum, std::size_t N, typename Raw>
constexpr std::string_view lookup(const std::array<Name<Enum>, N>& table, Raw raw) {
  for (const Name<Enum>& entry : table) {
    if (static_cast<Raw>(entry.value) == raw) return entry.name;
  }
  return "unknown";
}

constexpr std::array kOptionNames{
    Name<Option>{Option::export_name, "NBD_OPT_EXPORT_NAME"},
    Name<Option>{Option::abort, "NBD_OPT_ABORT"},
    Name<Option>{Option::list, "NBD_OPT_LIST"},
    Name<Option>{Option::peek_export, "NBD_OPT_PEEK_EXPORT"},
    Name<Option>{Option::starttls, "NBD_OPT_STARTTLS"},
    Name<Option>{Option::info, "NBD_OPT_INFO"},
    Name<Option>{Option::go, "NBD_OPT_GO"},
    Name<Option>{Option::structured_reply, "NBD_OPT_STRUCTURED_REPLY"},
    Name<Option>{Option::list_meta_context, "NBD_OPT_LIST_META_CONTEXT"},
    Name<Option>{Option::set_meta_context, "NBD_OPT_SET_META_CONTEXT"},
    Name<Option>{Option::extended_headers, "NBD_OPT_EXTENDED_HEADERS"},
};

constexpr std::array kOptionReplyNames{
    Name<OptionReply>{OptionReply::ack, "NBD_REP_ACK"},
    Name<OptionReply>{OptionReply::server, "NBD_REP_SERVER"},
    Name<OptionReply>{OptionReply::info, "NBD_REP_INFO"},
    Name<OptionReply>{OptionReply::meta_context, "NBD_REP_META_CONTEXT"},
    Name<OptionReply>{OptionReply::err_unsup, "NBD_REP_ERR_UNSUP"},
    Name<OptionReply>{OptionReply::err_policy, "NBD_REP_ERR_POLICY"},
    Name<OptionReply>{OptionReply::err_invalid, "NBD_REP_ERR_INVALID"},
    Name<OptionReply>{OptionReply::err_platform, "NBD_REP_ERR_PLATFORM"},
    Name<OptionReply>{OptionReply::err_tls_reqd, "NBD_REP_ERR_TLS_REQD"},
    Name<OptionReply>{OptionReply::err_unknown, "NBD_REP_ERR_UNKNOWN"},
    Name<OptionReply>{OptionReply::err_shutdown, "NBD_REP_ERR_SHUTDOWN"},
    Name<OptionReply>{OptionReply::err_block_size_reqd, "NBD_REP_ERR_BLOCK_SIZE_REQD"},
    Name<OptionReply>{OptionReply::err_too_big, "NBD_REP_ERR_TOO_BIG"},
    Name<OptionReply>{OptionReply::err_ext_header_reqd, "NBD_REP_ERR_EXT_HEADER_REQD"},
};

constexpr std::array kInfoNames{
    Name<Info>{Info::export_info, "NBD_INFO_EXPORT"},
    Name<Info>{Info::name, "NBD_INFO_NAME"},
    Name<Info>{Info::description, "NBD_INFO_DESCRIPTION"},
    Name<Info>{Info::block_size, "NBD_INFO_BLOCK_SIZE"},
};

constexpr std::array kCommandNames{
    Name<Command>{Command::read, "NBD_CMD_READ"},
    Name<Command>{Command::write, "NBD_CMD_WRITE"},
    Name<Command>{Command::disc, "NBD_CMD_DISC"},
    Name<Command>{Command::flush, "NBD_CMD_FLUSH"},
    Name<Command>{Command::trim, "NBD_CMD_TRIM"},
    Name<Command>{Command::cache, "NBD_CMD_CACHE"},
    Name<Command>{Command::write_zeroes, "NBD_CMD_WRITE_ZEROES"},
    Name<Command>{Command::block_status, "NBD_CMD_BLOCK_STATUS"},
};

constexpr std::array kChunkNames{
    Name<Chunk>{Chunk::none, "NBD_REPLY_TYPE_NONE"},
    Name<Chunk>{Chunk::offset_data, "NBD_REPLY_TYPE_OFFSET_DATA"},
    Name<Chunk>{Chunk::offset_hole, "NBD_REPLY_TYPE_OFFSET_HOLE"},
    Name<Chunk>{Chunk::block_status, "NBD_REPLY_TYPE_BLOCK_STATUS"},
    Name<Chunk>{Chunk::error, "NBD_REPLY_TYPE_ERROR"},
    Name<Chunk>{Chunk::error_offset, "NBD_REPLY_TYPE_ERROR_OFFSET"},
};

constexpr std::array kErrorNames{
    Name<Error>{Error::ok, "NBD_SUCCESS"},
    Name<Error>{Error::perm, "NBD_EPERM"},
    Name<Error>{Error::io, "NBD_EIO"},
    Name<Error>{Error::nomem, "NBD_ENOMEM"},
    Name<Error>{Error::inval, "NBD_EINVAL"},
    Name<Error>{Error::nospc, "NBD_ENOSPC"},
    Name<Error>{Error::overflow, "NBD_EOVERFLOW"},
    Name<Error>{Error::notsup, "NBD_ENOTSUP"},
    Name<Error>{Error::shutdown, "NBD_ESHUTDOWN"},
};

}  // namespace

std::string_view option_name(uint32_t option) { return lookup(kOptionNames, option); }

std::string_view option_reply_name(uint32_t reply) { return lookup(kOptionReplyNames, reply); }

std::string_view info_name(uint16_t info) { return lookup(kInfoNames, info); }

std::string_view command_name(uint16_t command) { return lookup(kCommandNames, command); }

std::string_view chunk_name(uint16_t chunk) { return lookup(kChunkNames, chunk); }

std::string_view error_name(uint32_t error) { return lookup(kErrorNames, error); }

}  // namespace fleeced::protocol

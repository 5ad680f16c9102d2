// SPDX-License-Identifier: MIT
// protocol/names.cpp: every known code has its spec name, unknown codes give
// "unknown".
#include "protocol/names.hpp"

#include <gtest/gtest.h>

#include <cstdint>

#include "protocol/nbd.hpp"

namespace fleeced::protocol {
namespace {

uint32_t raw(Option o) { return static_cast<uint32_t>(o); }
uint32_t raw(OptionReply r) { return static_cast<uint32_t>(r); }
uint16_t raw(Info i) { return static_cast<uint16_t>(i); }
uint16_t raw(Command c) { return static_cast<uint16_t>(c); }
uint16_t raw(Chunk c) { return static_cast<uint16_t>(c); }
uint32_t raw(Error e) { return static_cast<uint32_t>(e); }

TEST(OptionName, NamesEveryOption) {
  EXPECT_EQ(option_name(raw(Option::export_name)), "NBD_OPT_EXPORT_NAME");
  EXPECT_EQ(option_name(raw(Option::abort)), "NBD_OPT_ABORT");
  EXPECT_EQ(option_name(raw(Option::list)), "NBD_OPT_LIST");
  EXPECT_EQ(option_name(raw(Option::peek_export)), "NBD_OPT_PEEK_EXPORT");
  EXPECT_EQ(option_name(raw(Option::starttls)), "NBD_OPT_STARTTLS");
  EXPECT_EQ(option_name(raw(Option::info)), "NBD_OPT_INFO");
  EXPECT_EQ(option_name(raw(Option::go)), "NBD_OPT_GO");
  EXPECT_EQ(option_name(raw(Option::structured_reply)), "NBD_OPT_STRUCTURED_REPLY");
  EXPECT_EQ(option_name(raw(Option::list_meta_context)), "NBD_OPT_LIST_META_CONTEXT");
  EXPECT_EQ(option_name(raw(Option::set_meta_context)), "NBD_OPT_SET_META_CONTEXT");
  EXPECT_EQ(option_name(raw(Option::extended_headers)), "NBD_OPT_EXTENDED_HEADERS");
}

TEST(OptionName, GivesUnknownForOtherValues) {
  EXPECT_EQ(option_name(0), "unknown");
  EXPECT_EQ(option_name(12), "unknown");
  EXPECT_EQ(option_name(0xffffffff), "unknown");
}

TEST(OptionReplyName, NamesEveryReply) {
  EXPECT_EQ(option_reply_name(raw(OptionReply::ack)), "NBD_REP_ACK");
  EXPECT_EQ(option_reply_name(raw(OptionReply::server)), "NBD_REP_SERVER");
  EXPECT_EQ(option_reply_name(raw(OptionReply::info)), "NBD_REP_INFO");
  EXPECT_EQ(option_reply_name(raw(OptionReply::meta_context)), "NBD_REP_META_CONTEXT");
  EXPECT_EQ(option_reply_name(raw(OptionReply::err_unsup)), "NBD_REP_ERR_UNSUP");
  EXPECT_EQ(option_reply_name(raw(OptionReply::err_policy)), "NBD_REP_ERR_POLICY");
  EXPECT_EQ(option_reply_name(raw(OptionReply::err_invalid)), "NBD_REP_ERR_INVALID");
  EXPECT_EQ(option_reply_name(raw(OptionReply::err_platform)), "NBD_REP_ERR_PLATFORM");
  EXPECT_EQ(option_reply_name(raw(OptionReply::err_tls_reqd)), "NBD_REP_ERR_TLS_REQD");
  EXPECT_EQ(option_reply_name(raw(OptionReply::err_unknown)), "NBD_REP_ERR_UNKNOWN");
  EXPECT_EQ(option_reply_name(raw(OptionReply::err_shutdown)), "NBD_REP_ERR_SHUTDOWN");
  EXPECT_EQ(option_reply_name(raw(OptionReply::err_block_size_reqd)),
            "NBD_REP_ERR_BLOCK_SIZE_REQD");
  EXPECT_EQ(option_reply_name(raw(OptionReply::err_too_big)), "NBD_REP_ERR_TOO_BIG");
  EXPECT_EQ(option_reply_name(raw(OptionReply::err_ext_header_reqd)),
            "NBD_REP_ERR_EXT_HEADER_REQD");
}

TEST(OptionReplyName, UsesTheFullErrorValue) {
  EXPECT_EQ(option_reply_name(0x80000006), "NBD_REP_ERR_UNKNOWN");
  EXPECT_EQ(option_reply_name(6), "unknown");
  EXPECT_EQ(option_reply_name(0x80000000), "unknown");
  EXPECT_EQ(option_reply_name(0x8000000b), "unknown");
}

TEST(InfoName, NamesEveryInfoType) {
  EXPECT_EQ(info_name(raw(Info::export_info)), "NBD_INFO_EXPORT");
  EXPECT_EQ(info_name(raw(Info::name)), "NBD_INFO_NAME");
  EXPECT_EQ(info_name(raw(Info::description)), "NBD_INFO_DESCRIPTION");
  EXPECT_EQ(info_name(raw(Info::block_size)), "NBD_INFO_BLOCK_SIZE");
  EXPECT_EQ(info_name(4), "unknown");
  EXPECT_EQ(info_name(0xffff), "unknown");
}

TEST(CommandName, NamesEveryCommand) {
  EXPECT_EQ(command_name(raw(Command::read)), "NBD_CMD_READ");
  EXPECT_EQ(command_name(raw(Command::write)), "NBD_CMD_WRITE");
  EXPECT_EQ(command_name(raw(Command::disc)), "NBD_CMD_DISC");
  EXPECT_EQ(command_name(raw(Command::flush)), "NBD_CMD_FLUSH");
  EXPECT_EQ(command_name(raw(Command::trim)), "NBD_CMD_TRIM");
  EXPECT_EQ(command_name(raw(Command::cache)), "NBD_CMD_CACHE");
  EXPECT_EQ(command_name(raw(Command::write_zeroes)), "NBD_CMD_WRITE_ZEROES");
  EXPECT_EQ(command_name(raw(Command::block_status)), "NBD_CMD_BLOCK_STATUS");
  EXPECT_EQ(command_name(8), "unknown");
  EXPECT_EQ(command_name(0x55), "unknown");
}

TEST(ChunkName, NamesEveryChunkType) {
  EXPECT_EQ(chunk_name(raw(Chunk::none)), "NBD_REPLY_TYPE_NONE");
  EXPECT_EQ(chunk_name(raw(Chunk::offset_data)), "NBD_REPLY_TYPE_OFFSET_DATA");
  EXPECT_EQ(chunk_name(raw(Chunk::offset_hole)), "NBD_REPLY_TYPE_OFFSET_HOLE");
  EXPECT_EQ(chunk_name(raw(Chunk::block_status)), "NBD_REPLY_TYPE_BLOCK_STATUS");
  EXPECT_EQ(chunk_name(raw(Chunk::error)), "NBD_REPLY_TYPE_ERROR");
  EXPECT_EQ(chunk_name(raw(Chunk::error_offset)), "NBD_REPLY_TYPE_ERROR_OFFSET");
  EXPECT_EQ(chunk_name(3), "unknown");
  EXPECT_EQ(chunk_name(0x8000), "unknown");
}

TEST(ErrorName, NamesEveryError) {
  EXPECT_EQ(error_name(raw(Error::ok)), "NBD_SUCCESS");
  EXPECT_EQ(error_name(raw(Error::perm)), "NBD_EPERM");
  EXPECT_EQ(error_name(raw(Error::io)), "NBD_EIO");
  EXPECT_EQ(error_name(raw(Error::nomem)), "NBD_ENOMEM");
  EXPECT_EQ(error_name(raw(Error::inval)), "NBD_EINVAL");
  EXPECT_EQ(error_name(raw(Error::nospc)), "NBD_ENOSPC");
  EXPECT_EQ(error_name(raw(Error::overflow)), "NBD_EOVERFLOW");
  EXPECT_EQ(error_name(raw(Error::notsup)), "NBD_ENOTSUP");
  EXPECT_EQ(error_name(raw(Error::shutdown)), "NBD_ESHUTDOWN");
  EXPECT_EQ(error_name(2), "unknown");
  EXPECT_EQ(error_name(13), "unknown");
}

}  // namespace
}  // namespace fleeced::protocol

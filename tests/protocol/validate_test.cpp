// SPDX-License-Identifier: MIT
// validate() and to_nbd_error(), one table row per rule (doc/proto.md
// "Request message", "Error values"; control-api.md section 7.3).
#include "protocol/validate.hpp"

#include <gtest/gtest.h>

#include <cerrno>
#include <cstdint>
#include <ostream>

namespace fleeced::protocol {
namespace {

constexpr uint64_t kSize = uint64_t{8} << 30;  // 8 GiB: effect lengths of 4 GiB fit
constexpr uint16_t kWritableFlags = kFlagHasFlags | kFlagSendFlush | kFlagSendFua | kFlagSendTrim |
                                    kFlagSendWriteZeroes | kFlagSendDf | kFlagSendCache |
                                    kFlagSendFastZero | kFlagCanMultiConn;
constexpr uint16_t kReadOnlyFlags =
    kFlagHasFlags | kFlagReadOnly | kFlagSendFlush | kFlagSendFua | kFlagSendDf | kFlagSendCache;

// Structured replies, one meta context, everything advertised.
constexpr RequestContext kWritable{kSize, kWritableFlags, true, 1, kMaxPayloadSize};
// What a read-only export advertises: no TRIM, WRITE_ZEROES or FAST_ZERO.
constexpr RequestContext kReadOnly{kSize, kReadOnlyFlags, true, 1, kMaxPayloadSize};
// Simple replies: no DF, no FAST_ZERO, no meta contexts.
constexpr RequestContext kSimple{
    kSize, kFlagHasFlags | kFlagSendFlush | kFlagSendFua | kFlagSendTrim | kFlagSendWriteZeroes,
    false, 0, kMaxPayloadSize};
// Nothing optional advertised.
constexpr RequestContext kBare{kSize, kFlagHasFlags, false, 0, kMaxPayloadSize};
constexpr RequestContext kDfWithoutStructured{kSize, kFlagHasFlags | kFlagSendDf, false, 0,
                                              kMaxPayloadSize};
constexpr RequestContext kNoContexts{kSize, kWritableFlags, true, 0, kMaxPayloadSize};
constexpr RequestContext kSmallPayload{kSize, kWritableFlags, true, 1, 65536};
constexpr RequestContext kEmptyExport{0, kWritableFlags, true, 1, kMaxPayloadSize};

constexpr uint16_t kRead = 0;
constexpr uint16_t kWrite = 1;
constexpr uint16_t kDisc = 2;
constexpr uint16_t kFlush = 3;
constexpr uint16_t kTrim = 4;
constexpr uint16_t kCache = 5;
constexpr uint16_t kWriteZeroes = 6;
constexpr uint16_t kBlockStatus = 7;

constexpr uint64_t kU64Max = ~uint64_t{0};
constexpr uint32_t kU32Max = ~uint32_t{0};
constexpr uint32_t kMax = kMaxPayloadSize;

struct Row {
  const char* name;
  uint16_t type;
  uint16_t flags;
  uint64_t offset;
  uint32_t length;
  const RequestContext* ctx;
  Error error;
  bool drop_connection;
};

std::ostream& operator<<(std::ostream& os, const Row& r) { return os << r.name; }

const Row kRows[] = {
    // Unknown commands.
    {"UnknownCommand8", 8, 0, 0, 0, &kWritable, Error::inval, false},
    {"UnknownCommand0x55", 0x55, 0, 0, 512, &kWritable, Error::inval, false},
    {"UnknownCommandFfff", 0xffff, 0, 0, 0, &kWritable, Error::inval, false},
    {"UnknownCommandWithHugeLength", 9, 0, 0, kU32Max, &kWritable, Error::inval, false},
    // Plain commands inside the export.
    {"Read", kRead, 0, 4096, 4096, &kWritable, Error::ok, false},
    {"Write", kWrite, 0, 4096, 4096, &kWritable, Error::ok, false},
    {"Disc", kDisc, 0, 0, 0, &kWritable, Error::ok, false},
    {"Flush", kFlush, 0, 0, 0, &kWritable, Error::ok, false},
    {"Trim", kTrim, 0, 0, 4096, &kWritable, Error::ok, false},
    {"Cache", kCache, 0, 0, 4096, &kWritable, Error::ok, false},
    {"WriteZeroes", kWriteZeroes, 0, 0, 4096, &kWritable, Error::ok, false},
    {"BlockStatus", kBlockStatus, 0, 0, 4096, &kWritable, Error::ok, false},
    {"CacheNotAdvertised", kCache, 0, 0, 4096, &kBare, Error::ok, false},
    {"FlushNotAdvertised", kFlush, 0, 0, 0, &kBare, Error::ok, false},
    // FUA: any command once advertised.
    {"ReadWithFua", kRead, kCmdFlagFua, 0, 512, &kWritable, Error::ok, false},
    {"WriteWithFua", kWrite, kCmdFlagFua, 0, 512, &kWritable, Error::ok, false},
    {"FlushWithFua", kFlush, kCmdFlagFua, 0, 0, &kWritable, Error::ok, false},
    {"DiscWithFua", kDisc, kCmdFlagFua, 0, 0, &kWritable, Error::ok, false},
    {"BlockStatusWithFua", kBlockStatus, kCmdFlagFua, 0, 512, &kWritable, Error::ok, false},
    {"WriteWithFuaNotAdvertised", kWrite, kCmdFlagFua, 0, 512, &kBare, Error::inval, false},
    {"ReadWithFuaNotAdvertised", kRead, kCmdFlagFua, 0, 512, &kBare, Error::inval, false},
    // DF: READ only, with structured replies and SEND_DF.
    {"ReadWithDf", kRead, kCmdFlagDf, 0, 512, &kWritable, Error::ok, false},
    {"ReadWithDfAndFua", kRead, kCmdFlagDf | kCmdFlagFua, 0, 512, &kWritable, Error::ok, false},
    {"ReadWithDfNotAdvertised", kRead, kCmdFlagDf, 0, 512, &kSimple, Error::inval, false},
    {"ReadWithDfWithoutStructured", kRead, kCmdFlagDf, 0, 512, &kDfWithoutStructured, Error::inval,
     false},
    {"WriteWithDf", kWrite, kCmdFlagDf, 0, 512, &kWritable, Error::inval, false},
    {"BlockStatusWithDf", kBlockStatus, kCmdFlagDf, 0, 512, &kWritable, Error::inval, false},
    // NO_HOLE and FAST_ZERO: WRITE_ZEROES only.
    {"WriteZeroesWithNoHole", kWriteZeroes, kCmdFlagNoHole, 0, 512, &kWritable, Error::ok, false},
    {"WriteZeroesWithNoHoleSimple", kWriteZeroes, kCmdFlagNoHole, 0, 512, &kSimple, Error::ok,
     false},
    {"WriteZeroesWithFastZero", kWriteZeroes, kCmdFlagFastZero, 0, 512, &kWritable, Error::ok,
     false},
    {"WriteZeroesWithAllFlags", kWriteZeroes, kCmdFlagFua | kCmdFlagNoHole | kCmdFlagFastZero, 0,
     512, &kWritable, Error::ok, false},
    {"WriteZeroesWithFastZeroNotAdvertised", kWriteZeroes, kCmdFlagFastZero, 0, 512, &kSimple,
     Error::inval, false},
    {"WriteWithNoHole", kWrite, kCmdFlagNoHole, 0, 512, &kWritable, Error::inval, false},
    {"TrimWithNoHole", kTrim, kCmdFlagNoHole, 0, 512, &kWritable, Error::inval, false},
    {"TrimWithFastZero", kTrim, kCmdFlagFastZero, 0, 512, &kWritable, Error::inval, false},
    {"FlushWithNoHole", kFlush, kCmdFlagNoHole, 0, 0, &kWritable, Error::inval, false},
    // REQ_ONE: BLOCK_STATUS only.
    {"BlockStatusWithReqOne", kBlockStatus, kCmdFlagReqOne, 0, 512, &kWritable, Error::ok, false},
    {"ReadWithReqOne", kRead, kCmdFlagReqOne, 0, 512, &kWritable, Error::inval, false},
    // Undefined bits.
    {"ReadWithBit5", kRead, 1u << 5, 0, 512, &kWritable, Error::inval, false},
    {"ReadWithBit15", kRead, 1u << 15, 0, 512, &kWritable, Error::inval, false},
    {"DiscWithAllBits", kDisc, 0xffff, 0, 0, &kWritable, Error::inval, false},
    {"WriteZeroesWithBit5", kWriteZeroes, 1u << 5, 0, 512, &kWritable, Error::inval, false},
    // DISC and FLUSH are not range checked.
    {"DiscWithRange", kDisc, 0, kU64Max, kU32Max, &kWritable, Error::ok, false},
    {"FlushBeyondEnd", kFlush, 0, kSize, 4096, &kWritable, Error::ok, false},
    {"FlushOnReadOnly", kFlush, 0, 0, 0, &kReadOnly, Error::ok, false},
    {"DiscOnReadOnly", kDisc, 0, 0, 0, &kReadOnly, Error::ok, false},
    // Read-only exports: EPERM, before flag, advertisement and range checks.
    {"WriteOnReadOnly", kWrite, 0, 0, 512, &kReadOnly, Error::perm, false},
    {"WriteZeroesOnReadOnly", kWriteZeroes, 0, 0, 512, &kReadOnly, Error::perm, false},
    {"TrimOnReadOnly", kTrim, 0, 0, 512, &kReadOnly, Error::perm, false},
    {"WriteZeroesFastZeroOnReadOnly", kWriteZeroes, kCmdFlagFastZero, 0, 512, &kReadOnly,
     Error::perm, false},
    {"WriteBeyondEndOnReadOnly", kWrite, 0, kSize, 512, &kReadOnly, Error::perm, false},
    {"ZeroLengthWriteOnReadOnly", kWrite, 0, 0, 0, &kReadOnly, Error::perm, false},
    {"ReadOnReadOnly", kRead, 0, 0, 512, &kReadOnly, Error::ok, false},
    {"CacheOnReadOnly", kCache, 0, 0, 512, &kReadOnly, Error::ok, false},
    {"BlockStatusOnReadOnly", kBlockStatus, 0, 0, 512, &kReadOnly, Error::ok, false},
    // Commands that were not advertised.
    {"TrimNotAdvertised", kTrim, 0, 0, 512, &kBare, Error::inval, false},
    {"WriteZeroesNotAdvertised", kWriteZeroes, 0, 0, 512, &kBare, Error::inval, false},
    // Payload size limits.
    {"ReadOfMaxPayload", kRead, 0, 0, kMax, &kWritable, Error::ok, false},
    {"ReadAboveMaxPayload", kRead, 0, 0, kMax + 1, &kWritable, Error::inval, false},
    {"ReadOf64MiB", kRead, 0, 0, 64u << 20, &kWritable, Error::inval, false},
    {"DfReadAboveMaxPayload", kRead, kCmdFlagDf, 0, kMax + 1, &kWritable, Error::overflow, false},
    {"DfReadOfMaxPayload", kRead, kCmdFlagDf, 0, kMax, &kWritable, Error::ok, false},
    {"WriteOfMaxPayload", kWrite, 0, 0, kMax, &kWritable, Error::ok, false},
    {"WriteAboveMaxPayload", kWrite, 0, 0, kMax + 1, &kWritable, Error::inval, true},
    {"WriteOf64MiB", kWrite, 0, 0, 64u << 20, &kWritable, Error::inval, true},
    {"WriteOf4GiB", kWrite, 0, 0, kU32Max, &kWritable, Error::inval, true},
    {"WriteAboveMaxPayloadOnReadOnly", kWrite, 0, 0, kMax + 1, &kReadOnly, Error::perm, true},
    {"WriteAboveMaxPayloadWithBadFlag", kWrite, kCmdFlagDf, 0, kMax + 1, &kWritable, Error::inval,
     true},
    {"WriteAboveMaxPayloadBeyondEnd", kWrite, 0, kSize, kMax + 1, &kWritable, Error::inval, true},
    {"CacheAboveMaxPayload", kCache, 0, 0, kMax + 1, &kWritable, Error::inval, false},
    {"ReadAboveSmallMaxPayload", kRead, 0, 0, 65537, &kSmallPayload, Error::inval, false},
    {"WriteAboveSmallMaxPayload", kWrite, 0, 0, 65537, &kSmallPayload, Error::inval, true},
    {"WriteOfSmallMaxPayload", kWrite, 0, 0, 65536, &kSmallPayload, Error::ok, false},
    // Effect lengths are not payloads.
    {"TrimOf4GiB", kTrim, 0, 0, kU32Max, &kWritable, Error::ok, false},
    {"WriteZeroesOf4GiB", kWriteZeroes, 0, 0, kU32Max, &kWritable, Error::ok, false},
    {"BlockStatusOf4GiB", kBlockStatus, 0, 0, kU32Max, &kWritable, Error::ok, false},
    // Block status prerequisites.
    {"BlockStatusWithoutStructuredReplies", kBlockStatus, 0, 0, 512, &kSimple, Error::inval, false},
    {"BlockStatusWithoutContexts", kBlockStatus, 0, 0, 512, &kNoContexts, Error::inval, false},
    {"BlockStatusZeroLength", kBlockStatus, 0, 0, 0, &kWritable, Error::inval, false},
    {"BlockStatusZeroLengthAtEnd", kBlockStatus, 0, kSize, 0, &kWritable, Error::inval, false},
    {"BlockStatusToEnd", kBlockStatus, 0, kSize - 512, 512, &kWritable, Error::ok, false},
    {"BlockStatusBeyondEnd", kBlockStatus, 0, kSize - 512, 513, &kWritable, Error::inval, false},
    // Ranges.
    {"ReadToExactEnd", kRead, 0, kSize - 512, 512, &kWritable, Error::ok, false},
    {"ReadStraddlingEnd", kRead, 0, kSize - 512, 1024, &kWritable, Error::inval, false},
    {"ReadAtEnd", kRead, 0, kSize, 512, &kWritable, Error::inval, false},
    {"ZeroLengthReadAtEnd", kRead, 0, kSize, 0, &kWritable, Error::ok, false},
    {"ZeroLengthReadPastEnd", kRead, 0, kSize + 1, 0, &kWritable, Error::inval, false},
    {"ZeroLengthRead", kRead, 0, 0, 0, &kWritable, Error::ok, false},
    {"ZeroLengthWrite", kWrite, 0, 4096, 0, &kWritable, Error::ok, false},
    {"ZeroLengthTrim", kTrim, 0, 0, 0, &kWritable, Error::ok, false},
    {"ZeroLengthWriteZeroes", kWriteZeroes, 0, 0, 0, &kWritable, Error::ok, false},
    {"ReadAt2Pow63", kRead, 0, uint64_t{1} << 63, 512, &kWritable, Error::inval, false},
    {"ReadWhoseEndWraps", kRead, 0, kU64Max - 255, 512, &kWritable, Error::inval, false},
    {"ReadAtMaxOffset", kRead, 0, kU64Max, 1, &kWritable, Error::inval, false},
    {"WriteToExactEnd", kWrite, 0, kSize - 512, 512, &kWritable, Error::ok, false},
    {"WriteStraddlingEnd", kWrite, 0, kSize - 512, 1024, &kWritable, Error::inval, false},
    {"WriteWhoseEndWraps", kWrite, 0, kU64Max - 255, 512, &kWritable, Error::inval, false},
    {"WriteZeroesBeyondEnd", kWriteZeroes, 0, kSize, 1, &kWritable, Error::inval, false},
    {"WriteZeroesOf4GiBWraps", kWriteZeroes, 0, kU64Max, kU32Max, &kWritable, Error::inval, false},
    {"TrimBeyondEnd", kTrim, 0, kSize - 1, 2, &kWritable, Error::inval, false},
    {"CacheBeyondEnd", kCache, 0, kSize, 512, &kWritable, Error::inval, false},
    {"ReadOnEmptyExport", kRead, 0, 0, 1, &kEmptyExport, Error::inval, false},
    {"ZeroLengthReadOnEmptyExport", kRead, 0, 0, 0, &kEmptyExport, Error::ok, false},
    {"WriteOnEmptyExport", kWrite, 0, 0, 1, &kEmptyExport, Error::inval, false},
};

class Validate : public ::testing::TestWithParam<Row> {};

TEST_P(Validate, MatchesRow) {
  const Row& row = GetParam();
  const RequestHeader h{row.flags, row.type, 0x1234, row.offset, row.length};
  const Validation v = validate(h, *row.ctx);
  EXPECT_EQ(v.error, row.error);
  EXPECT_EQ(v.drop_connection, row.drop_connection);
  EXPECT_EQ(v.message.empty(), row.error == Error::ok) << v.message;
}

INSTANTIATE_TEST_SUITE_P(Table, Validate, ::testing::ValuesIn(kRows),
                         [](const ::testing::TestParamInfo<Row>& p) {
                           return std::string(p.param.name);
                         });

Validation check(uint16_t type, uint16_t flags, uint64_t offset, uint32_t length,
                 const RequestContext& ctx) {
  return validate(RequestHeader{flags, type, 0, offset, length}, ctx);
}

TEST(ValidateMessage, NamesTheRuleThatFailed) {
  EXPECT_EQ(check(0x55, 0, 0, 0, kWritable).message, "unknown command");
  EXPECT_EQ(check(kBlockStatus, 0, 0, 0, kWritable).message, "need non-zero length");
  EXPECT_EQ(check(kWrite, 0, 0, 1, kReadOnly).message, "write to read-only export");
  EXPECT_EQ(check(kRead, kCmdFlagFua, 0, 1, kBare).message, "FUA flag not advertised");
  EXPECT_EQ(check(kRead, 0, kSize, 1, kWritable).message, "request beyond end of export");
  EXPECT_EQ(check(kWrite, 0, kSize, 1, kWritable).message, "write beyond end of export");
}

TEST(ValidateMessage, IsEmptyWhenValid) {
  EXPECT_EQ(check(kRead, 0, 0, 512, kWritable).message, "");
}

struct ErrnoRow {
  const char* name;
  int err;
  uint16_t flags;
  Error expected;
};

std::ostream& operator<<(std::ostream& os, const ErrnoRow& r) { return os << r.name; }

const ErrnoRow kErrnoRows[] = {
    {"Success", 0, 0, Error::ok},
    {"SuccessWithFlags", 0, kCmdFlagDf | kCmdFlagFastZero, Error::ok},
    {"Eperm", EPERM, 0, Error::perm},
    {"Erofs", EROFS, 0, Error::perm},
    {"Eio", EIO, 0, Error::io},
    {"EioWithFua", EIO, kCmdFlagFua, Error::io},
    {"Enomem", ENOMEM, 0, Error::nomem},
    {"Enospc", ENOSPC, 0, Error::nospc},
    {"Edquot", EDQUOT, 0, Error::nospc},
    {"Efbig", EFBIG, 0, Error::nospc},
    {"Eoverflow", EOVERFLOW, 0, Error::inval},
    {"EoverflowWithDf", EOVERFLOW, kCmdFlagDf, Error::overflow},
    {"EoverflowWithFastZero", EOVERFLOW, kCmdFlagFastZero, Error::inval},
    {"Enotsup", ENOTSUP, 0, Error::inval},
    {"EnotsupWithFastZero", ENOTSUP, kCmdFlagFastZero, Error::notsup},
    {"EnotsupWithDf", ENOTSUP, kCmdFlagDf, Error::inval},
    {"EnotsupWithNoHole", ENOTSUP, kCmdFlagNoHole, Error::inval},
    {"Eopnotsupp", EOPNOTSUPP, 0, Error::inval},
    {"EopnotsuppWithFastZero", EOPNOTSUPP, kCmdFlagFastZero | kCmdFlagNoHole, Error::notsup},
    {"Eshutdown", ESHUTDOWN, 0, Error::shutdown},
    {"Einval", EINVAL, 0, Error::inval},
    {"Eacces", EACCES, 0, Error::inval},
    {"Eagain", EAGAIN, 0, Error::inval},
    {"Enoent", ENOENT, 0, Error::inval},
    {"Ebadf", EBADF, 0, Error::inval},
    {"Eintr", EINTR, 0, Error::inval},
    {"NegativeEio", -EIO, 0, Error::inval},
    {"Huge", 100000, 0, Error::inval},
};

class ToNbdError : public ::testing::TestWithParam<ErrnoRow> {};

TEST_P(ToNbdError, MatchesRow) {
  const ErrnoRow& row = GetParam();
  EXPECT_EQ(to_nbd_error(row.err, row.flags), row.expected);
}

INSTANTIATE_TEST_SUITE_P(Table, ToNbdError, ::testing::ValuesIn(kErrnoRows),
                         [](const ::testing::TestParamInfo<ErrnoRow>& p) {
                           return std::string(p.param.name);
                         });

}  // namespace
}  // namespace fleeced::protocol

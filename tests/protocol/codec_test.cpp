// SPDX-License-Identifier: MIT
// Golden byte arrays for every encoder and decoder in protocol/codec.hpp, in
// both directions, plus truncated inputs at every length and hostile lengths.
#include "protocol/codec.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <initializer_list>
#include <string>
#include <string_view>
#include <vector>

namespace fleeced::protocol {
namespace {

using Bytes = std::vector<std::byte>;

Bytes bytes(std::initializer_list<unsigned> values) {
  Bytes out;
  for (unsigned v : values) out.push_back(static_cast<std::byte>(v));
  return out;
}

Bytes text(std::string_view s) {
  Bytes out;
  for (char c : s) out.push_back(static_cast<std::byte>(c));
  return out;
}

Bytes cat(std::initializer_list<Bytes> parts) {
  Bytes out;
  for (const Bytes& p : parts) out.insert(out.end(), p.begin(), p.end());
  return out;
}

Bytes be32(uint32_t v) {
  Bytes out(4);
  store_be32(out.data(), v);
  return out;
}

Bytes be16(uint16_t v) {
  Bytes out(2);
  store_be16(out.data(), v);
  return out;
}

// Hex dump so a failing comparison shows where bytes differ.
std::string hex(std::span<const std::byte> in) {
  std::string out;
  for (std::byte b : in) {
    char buf[4];
    std::snprintf(buf, sizeof buf, "%02x ", std::to_integer<unsigned>(b));
    out += buf;
  }
  return out;
}

std::span<const std::byte> prefix(const Bytes& b, std::size_t n) {
  return std::span<const std::byte>(b).first(n);
}

const Bytes kReplyMagic = bytes({0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9});
const Bytes kIHaveOptBytes = text("IHAVEOPT");
const Bytes kCookie = bytes({0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08});
constexpr uint64_t kCookieValue = 0x0102030405060708;

// ---- Errors ----

TEST(ProtocolCategory, NamesAndDescribesErrors) {
  std::error_code ec = Errc::bad_magic;
  EXPECT_EQ(std::string_view(ec.category().name()), "nbd-protocol");
  EXPECT_EQ(ec.message(), "bad magic");
  EXPECT_EQ(make_error_code(Errc::string_too_long).message(), "string longer than 4096 bytes");
  EXPECT_FALSE(make_error_code(Errc::ok));
  EXPECT_TRUE(make_error_code(Errc::short_input));
}

TEST(ProtocolCategory, GivesEveryErrorItsOwnMessage) {
  std::vector<std::string> seen;
  for (int e = 0; e <= static_cast<int>(Errc::output_too_small); ++e) {
    std::string m = make_error_code(static_cast<Errc>(e)).message();
    EXPECT_EQ(std::count(seen.begin(), seen.end(), m), 0) << m;
    seen.push_back(m);
  }
  EXPECT_EQ(make_error_code(static_cast<Errc>(99)).message(), "unknown protocol error");
}

// ---- Big-endian helpers ----

TEST(BigEndian, StoresMostSignificantByteFirst) {
  std::array<std::byte, 8> buf{};
  store_be16(buf.data(), 0x1234);
  EXPECT_EQ(hex(std::span(buf).first(2)), "12 34 ");
  store_be32(buf.data(), 0x01020304);
  EXPECT_EQ(hex(std::span(buf).first(4)), "01 02 03 04 ");
  store_be64(buf.data(), 0x0102030405060708);
  EXPECT_EQ(hex(buf), "01 02 03 04 05 06 07 08 ");
}

TEST(BigEndian, LoadsMostSignificantByteFirst) {
  const Bytes b = bytes({0xfe, 0xdc, 0xba, 0x98, 0x76, 0x54, 0x32, 0x10});
  EXPECT_EQ(load_be16(b.data()), 0xfedc);
  EXPECT_EQ(load_be32(b.data()), 0xfedcba98u);
  EXPECT_EQ(load_be64(b.data()), 0xfedcba9876543210u);
}

// ---- Greeting and client flags ----

const Bytes kGreeting = cat({text("NBDMAGIC"), text("IHAVEOPT"), bytes({0x00, 0x03})});

TEST(EncodeGreeting, WritesGoldenBytes) {
  std::array<std::byte, kGreetingSize> buf{};
  ASSERT_FALSE(encode_greeting(buf, kFlagFixedNewstyle | kFlagNoZeroes));
  EXPECT_EQ(hex(buf), hex(kGreeting));
}

TEST(EncodeGreeting, RejectsEveryShortOutput) {
  std::array<std::byte, kGreetingSize> buf{};
  for (std::size_t n = 0; n < kGreetingSize; ++n) {
    EXPECT_EQ(encode_greeting(std::span(buf).first(n), 0), Errc::output_too_small) << n;
  }
}

TEST(DecodeGreeting, ReadsGoldenBytes) {
  uint16_t flags = 0;
  ASSERT_FALSE(decode_greeting(kGreeting, flags));
  EXPECT_EQ(flags, 3);
}

TEST(DecodeGreeting, RejectsBadMagic) {
  for (std::size_t i : {0u, 7u, 8u, 15u}) {
    Bytes b = kGreeting;
    b[i] ^= std::byte{0x20};
    uint16_t flags = 0;
    EXPECT_EQ(decode_greeting(b, flags), Errc::bad_magic) << i;
  }
}

TEST(DecodeGreeting, RejectsEveryTruncation) {
  for (std::size_t n = 0; n < kGreeting.size(); ++n) {
    uint16_t flags = 0;
    EXPECT_EQ(decode_greeting(prefix(kGreeting, n), flags), Errc::short_input) << n;
  }
}

TEST(ClientFlags, RoundTripsGoldenBytes) {
  const Bytes golden = bytes({0x00, 0x00, 0x00, 0x03});
  uint32_t flags = 0;
  ASSERT_FALSE(decode_client_flags(golden, flags));
  EXPECT_EQ(flags, kClientFlagFixedNewstyle | kClientFlagNoZeroes);
  std::array<std::byte, 4> buf{};
  ASSERT_FALSE(encode_client_flags(buf, flags));
  EXPECT_EQ(hex(buf), hex(golden));
}

TEST(DecodeClientFlags, KeepsUnknownBitsForTheCaller) {
  uint32_t flags = 0;
  ASSERT_FALSE(decode_client_flags(bytes({0xff, 0xff, 0xff, 0xf0}), flags));
  EXPECT_EQ(flags, 0xfffffff0u);
}

TEST(DecodeClientFlags, RejectsEveryTruncation) {
  const Bytes golden = bytes({0, 0, 0, 1});
  for (std::size_t n = 0; n < golden.size(); ++n) {
    uint32_t flags = 7;
    EXPECT_EQ(decode_client_flags(prefix(golden, n), flags), Errc::short_input) << n;
    EXPECT_EQ(flags, 7u);
  }
  std::array<std::byte, 4> buf{};
  for (std::size_t n = 0; n < buf.size(); ++n) {
    EXPECT_EQ(encode_client_flags(std::span(buf).first(n), 1), Errc::output_too_small) << n;
  }
}

// ---- Option header ----

const Bytes kOptionHeaderGo = cat({kIHaveOptBytes, bytes({0, 0, 0, 7}), bytes({0, 0, 0, 0x0a})});

TEST(DecodeOptionHeader, ReadsGoldenBytes) {
  OptionHeader h;
  ASSERT_FALSE(decode_option_header(kOptionHeaderGo, h));
  EXPECT_EQ(h.option, 7u);
  EXPECT_EQ(h.length, 10u);
}

TEST(EncodeOptionHeader, WritesGoldenBytes) {
  std::array<std::byte, kOptionHeaderSize> buf{};
  ASSERT_FALSE(encode_option_header(buf, OptionHeader{7, 10}));
  EXPECT_EQ(hex(buf), hex(kOptionHeaderGo));
  for (std::size_t n = 0; n < buf.size(); ++n) {
    EXPECT_EQ(encode_option_header(std::span(buf).first(n), {}), Errc::output_too_small) << n;
  }
}

TEST(DecodeOptionHeader, RejectsBadMagic) {
  Bytes b = kOptionHeaderGo;
  b[0] = std::byte{'i'};
  OptionHeader h;
  EXPECT_EQ(decode_option_header(b, h), Errc::bad_magic);
}

TEST(DecodeOptionHeader, RejectsEveryTruncation) {
  for (std::size_t n = 0; n < kOptionHeaderGo.size(); ++n) {
    OptionHeader h;
    EXPECT_EQ(decode_option_header(prefix(kOptionHeaderGo, n), h), Errc::short_input) << n;
  }
}

TEST(DecodeOptionHeader, IgnoresBytesAfterTheHeader) {
  Bytes b = cat({kOptionHeaderGo, bytes({0xaa, 0xbb})});
  OptionHeader h;
  ASSERT_FALSE(decode_option_header(b, h));
  EXPECT_EQ(h.option, 7u);
  EXPECT_EQ(h.length, 10u);
}

TEST(DecodeOptionHeader, PassesHugeLengthThrough) {
  Bytes b = cat({kIHaveOptBytes, bytes({0x12, 0x34, 0x56, 0x78}), bytes({0xff, 0xff, 0xff, 0xff})});
  OptionHeader h;
  ASSERT_FALSE(decode_option_header(b, h));
  EXPECT_EQ(h.option, 0x12345678u);
  EXPECT_EQ(h.length, 0xffffffffu);
}

// ---- NBD_OPT_INFO / NBD_OPT_GO payload ----

// name "abc", two info requests: BLOCK_SIZE, NAME.
const Bytes kInfoRequest =
    cat({bytes({0, 0, 0, 3}), text("abc"), bytes({0, 2}), bytes({0, 3}), bytes({0, 1})});

TEST(DecodeInfoRequest, ReadsGoldenBytes) {
  InfoRequest req;
  ASSERT_FALSE(decode_info_request(kInfoRequest, req));
  EXPECT_EQ(req.name, "abc");
  EXPECT_EQ(req.info_types, (std::vector<uint16_t>{3, 1}));
}

TEST(DecodeInfoRequest, AcceptsEmptyNameAndNoInfoTypes) {
  InfoRequest req{"stale", {9}};
  ASSERT_FALSE(decode_info_request(bytes({0, 0, 0, 0, 0, 0}), req));
  EXPECT_EQ(req.name, "");
  EXPECT_TRUE(req.info_types.empty());
}

TEST(DecodeInfoRequest, RejectsEveryTruncation) {
  for (std::size_t n = 0; n < kInfoRequest.size(); ++n) {
    InfoRequest req;
    const Errc expected = n < 4 ? Errc::short_input : Errc::bad_length;
    EXPECT_EQ(decode_info_request(prefix(kInfoRequest, n), req), expected) << n;
  }
}

TEST(DecodeInfoRequest, RejectsTrailingByte) {
  InfoRequest req;
  EXPECT_EQ(decode_info_request(cat({kInfoRequest, bytes({0})}), req), Errc::bad_length);
}

TEST(DecodeInfoRequest, RejectsHugeNameLength) {
  // CVE-2022-26495: a name length of 0xffffffff must not wrap.
  for (uint32_t length : {0xffffffffu, 0xfffffffcu, 0x80000000u, 10u}) {
    InfoRequest req;
    Bytes b = cat({be32(length), text("abc"), bytes({0, 0})});
    EXPECT_EQ(decode_info_request(b, req), Errc::bad_length) << length;
  }
}

TEST(DecodeInfoRequest, RejectsNameThatSwallowsTheCount) {
  InfoRequest req;
  EXPECT_EQ(decode_info_request(cat({be32(5), text("abc"), bytes({'d', 'e'})}), req),
            Errc::bad_length);
}

TEST(DecodeInfoRequest, RejectsCountDisagreeingWithPayload) {
  InfoRequest req;
  EXPECT_EQ(decode_info_request(cat({be32(0), bytes({0xff, 0xff}), bytes({0, 1})}), req),
            Errc::bad_length);
  EXPECT_EQ(decode_info_request(cat({be32(0), bytes({0, 1}), bytes({0, 1, 0, 2})}), req),
            Errc::bad_length);
  EXPECT_EQ(decode_info_request(cat({be32(0), bytes({0, 1}), bytes({0})}), req), Errc::bad_length);
}

TEST(DecodeInfoRequest, AcceptsNameOfMaximumLength) {
  InfoRequest req;
  const std::string name(kMaxStringLength, 'n');
  ASSERT_FALSE(decode_info_request(cat({be32(kMaxStringLength), text(name), be16(0)}), req));
  EXPECT_EQ(req.name, name);
}

TEST(DecodeInfoRequest, RejectsNameLongerThanMaximum) {
  InfoRequest req;
  const std::string name(kMaxStringLength + 1, 'n');
  EXPECT_EQ(decode_info_request(cat({be32(kMaxStringLength + 1), text(name), be16(0)}), req),
            Errc::string_too_long);
}

TEST(DecodeInfoRequest, RejectsEmbeddedNul) {
  InfoRequest req;
  EXPECT_EQ(decode_info_request(cat({be32(3), bytes({'a', 0, 'c'}), be16(0)}), req),
            Errc::embedded_nul);
}

TEST(DecodeInfoRequest, RejectsDuplicateInfoType) {
  InfoRequest req{"keep", {}};
  Bytes b = cat({be32(0), be16(3), be16(0), be16(3), be16(0)});
  EXPECT_EQ(decode_info_request(b, req), Errc::duplicate_info);
  EXPECT_EQ(req.name, "keep");
}

TEST(DecodeInfoRequest, AcceptsEveryDistinctInfoType) {
  Bytes b = cat({be32(0), be16(0xffff)});
  for (uint32_t t = 0; t < 0xffff; ++t) {
    Bytes v = be16(static_cast<uint16_t>(0xffff - t));
    b.insert(b.end(), v.begin(), v.end());
  }
  InfoRequest req;
  ASSERT_FALSE(decode_info_request(b, req));
  ASSERT_EQ(req.info_types.size(), 0xffffu);
  EXPECT_EQ(req.info_types.front(), 0xffff);
  EXPECT_EQ(req.info_types.back(), 1);
}

// ---- NBD_OPT_LIST/SET_META_CONTEXT payload ----

// export "e1", queries "base:" and "qemu:".
const Bytes kMetaRequest =
    cat({be32(2), text("e1"), be32(2), be32(5), text("base:"), be32(5), text("qemu:")});

TEST(DecodeMetaContextRequest, ReadsGoldenBytes) {
  const Bytes golden = cat({
      bytes({0, 0, 0, 2}),               // export name length
      bytes({'e', '1'}),                 // export name
      bytes({0, 0, 0, 2}),               // number of queries
      bytes({0, 0, 0, 5}),               // query length
      bytes({'b', 'a', 's', 'e', ':'}),  // query
      bytes({0, 0, 0, 5}),               // query length
      bytes({'q', 'e', 'm', 'u', ':'}),  // query
  });
  ASSERT_EQ(hex(golden), hex(kMetaRequest));
  MetaContextRequest req;
  ASSERT_FALSE(decode_meta_context_request(golden, req));
  EXPECT_EQ(req.export_name, "e1");
  EXPECT_EQ(req.queries, (std::vector<std::string>{"base:", "qemu:"}));
}

TEST(DecodeMetaContextRequest, AcceptsZeroQueries) {
  MetaContextRequest req{"old", {"old:q"}};
  ASSERT_FALSE(decode_meta_context_request(cat({be32(0), be32(0)}), req));
  EXPECT_EQ(req.export_name, "");
  EXPECT_TRUE(req.queries.empty());
}

TEST(DecodeMetaContextRequest, RejectsEveryTruncation) {
  for (std::size_t n = 0; n < kMetaRequest.size(); ++n) {
    MetaContextRequest req{"keep", {}};
    const Errc expected = n < 4 ? Errc::short_input : Errc::bad_length;
    EXPECT_EQ(decode_meta_context_request(prefix(kMetaRequest, n), req), expected) << n;
    EXPECT_EQ(req.export_name, "keep");
  }
}

TEST(DecodeMetaContextRequest, RejectsLeftoverBytes) {
  MetaContextRequest req;
  EXPECT_EQ(decode_meta_context_request(cat({kMetaRequest, bytes({0})}), req), Errc::bad_length);
}

TEST(DecodeMetaContextRequest, RejectsCountDisagreeingWithQueries) {
  MetaContextRequest req;
  // One query announced, two present.
  Bytes fewer = cat({be32(0), be32(1), be32(5), text("base:"), be32(5), text("qemu:")});
  EXPECT_EQ(decode_meta_context_request(fewer, req), Errc::bad_length);
  // Three announced, two present.
  Bytes more = cat({be32(0), be32(3), be32(5), text("base:"), be32(5), text("qemu:")});
  EXPECT_EQ(decode_meta_context_request(more, req), Errc::bad_length);
}

TEST(DecodeMetaContextRequest, RejectsHugeLengthsAndCounts) {
  MetaContextRequest req;
  for (uint32_t huge : {0xffffffffu, 0xfffffffcu, 0x80000000u, 0x40000000u}) {
    EXPECT_EQ(decode_meta_context_request(cat({be32(huge), be32(0)}), req), Errc::bad_length)
        << "name length " << huge;
    EXPECT_EQ(decode_meta_context_request(cat({be32(0), be32(huge), be32(0)}), req),
              Errc::bad_length)
        << "count " << huge;
    EXPECT_EQ(decode_meta_context_request(cat({be32(0), be32(1), be32(huge), text("x:")}), req),
              Errc::bad_length)
        << "query length " << huge;
  }
}

TEST(DecodeMetaContextRequest, RejectsQueryLongerThanMaximum) {
  MetaContextRequest req;
  const std::string query(kMaxStringLength + 1, 'q');
  Bytes b = cat({be32(0), be32(1), be32(kMaxStringLength + 1), text(query)});
  EXPECT_EQ(decode_meta_context_request(b, req), Errc::string_too_long);
}

TEST(DecodeMetaContextRequest, AcceptsQueryOfMaximumLength) {
  MetaContextRequest req;
  const std::string query(kMaxStringLength, 'q');
  Bytes b = cat({be32(0), be32(1), be32(kMaxStringLength), text(query)});
  ASSERT_FALSE(decode_meta_context_request(b, req));
  ASSERT_EQ(req.queries.size(), 1u);
  EXPECT_EQ(req.queries[0], query);
}

TEST(DecodeMetaContextRequest, RejectsBadExportName) {
  MetaContextRequest req;
  const std::string name(kMaxStringLength + 1, 'e');
  EXPECT_EQ(
      decode_meta_context_request(cat({be32(kMaxStringLength + 1), text(name), be32(0)}), req),
      Errc::string_too_long);
  EXPECT_EQ(decode_meta_context_request(cat({be32(2), bytes({0, 'e'}), be32(0)}), req),
            Errc::embedded_nul);
}

TEST(DecodeMetaContextRequest, RejectsEmbeddedNulInQuery) {
  MetaContextRequest req;
  Bytes b = cat({be32(0), be32(1), be32(6), bytes({'b', 'a', 's', 'e', ':', 0})});
  EXPECT_EQ(decode_meta_context_request(b, req), Errc::embedded_nul);
}

TEST(DecodeMetaContextRequest, AcceptsEmptyQueries) {
  MetaContextRequest req;
  ASSERT_FALSE(decode_meta_context_request(cat({be32(0), be32(2), be32(0), be32(0)}), req));
  EXPECT_EQ(req.queries, (std::vector<std::string>{"", ""}));
}

// ---- NBD_OPT_EXPORT_NAME payload ----

TEST(DecodeExportName, TakesTheWholePayload) {
  std::string name = "old";
  ASSERT_FALSE(decode_export_name(text("disk0"), name));
  EXPECT_EQ(name, "disk0");
  ASSERT_FALSE(decode_export_name({}, name));
  EXPECT_EQ(name, "");
}

TEST(DecodeExportName, EnforcesStringRules) {
  std::string name = "keep";
  EXPECT_FALSE(decode_export_name(text(std::string(kMaxStringLength, 'a')), name));
  EXPECT_EQ(name.size(), kMaxStringLength);
  name = "keep";
  EXPECT_EQ(decode_export_name(text(std::string(kMaxStringLength + 1, 'a')), name),
            Errc::string_too_long);
  EXPECT_EQ(decode_export_name(bytes({'a', 0}), name), Errc::embedded_nul);
  EXPECT_EQ(name, "keep");
}

// ---- Option replies ----

// Decodes the header of the reply that starts at `at` in `out`.
OptionReplyHeader reply_header_at(const Bytes& out, std::size_t at) {
  OptionReplyHeader h;
  EXPECT_FALSE(decode_option_reply_header(std::span(out).subspan(at), h));
  return h;
}

TEST(AppendReplyAck, WritesGoldenBytes) {
  Bytes out;
  append_reply_ack(out, 7);
  EXPECT_EQ(hex(out),
            hex(cat({kReplyMagic, bytes({0, 0, 0, 7}), bytes({0, 0, 0, 1}), bytes({0, 0, 0, 0})})));
  OptionReplyHeader h = reply_header_at(out, 0);
  EXPECT_EQ(h.option, 7u);
  EXPECT_EQ(h.type, static_cast<uint32_t>(OptionReply::ack));
  EXPECT_EQ(h.length, 0u);
}

TEST(AppendOptionReply, AppendsAfterExistingBytes) {
  Bytes out = bytes({0xee});
  append_option_reply(out, 8, OptionReply::ack, bytes({0xaa, 0xbb}));
  EXPECT_EQ(hex(out), hex(cat({bytes({0xee}), kReplyMagic, bytes({0, 0, 0, 8}), bytes({0, 0, 0, 1}),
                               bytes({0, 0, 0, 2}), bytes({0xaa, 0xbb})})));
}

TEST(AppendReplyError, WritesGoldenBytes) {
  Bytes out;
  append_reply_error(out, 7, OptionReply::err_unknown, "no");
  EXPECT_EQ(hex(out), hex(cat({kReplyMagic, bytes({0, 0, 0, 7}), bytes({0x80, 0, 0, 6}),
                               bytes({0, 0, 0, 2}), text("no")})));
}

TEST(AppendReplyError, TruncatesLongMessage) {
  Bytes out;
  append_reply_error(out, 6, OptionReply::err_invalid, std::string(5000, 'x'));
  ASSERT_EQ(out.size(), kOptionReplyHeaderSize + kMaxStringLength);
  EXPECT_EQ(reply_header_at(out, 0).length, kMaxStringLength);
}

TEST(AppendReplyError, TruncatesWithoutSplittingUtf8) {
  // U+00E9 is c3 a9; starting it at byte 4095 would cut it in half.
  const std::string message = std::string(kMaxStringLength - 1, 'x') + "\xc3\xa9" + "tail";
  Bytes out;
  append_reply_error(out, 6, OptionReply::err_invalid, message);
  EXPECT_EQ(reply_header_at(out, 0).length, kMaxStringLength - 1);
  EXPECT_EQ(out.size(), kOptionReplyHeaderSize + kMaxStringLength - 1);
}

TEST(AppendReplyError, TruncatesInvalidUtf8NearTheLimit) {
  Bytes out;
  append_reply_error(out, 6, OptionReply::err_invalid, std::string(5000, '\x80'));
  EXPECT_EQ(reply_header_at(out, 0).length, kMaxStringLength - 3);
}

TEST(AppendReplyError, KeepsFourByteSequenceWhole) {
  // U+1F600 is f0 9f 98 80; start it at byte 4094 so it would end at 4098.
  const std::string message = std::string(kMaxStringLength - 2, 'x') + "\xf0\x9f\x98\x80";
  Bytes out;
  append_reply_error(out, 6, OptionReply::err_invalid, message);
  EXPECT_EQ(reply_header_at(out, 0).length, kMaxStringLength - 2);
}

TEST(AppendReplyServer, WritesGoldenBytes) {
  Bytes out;
  append_reply_server(out, "ab", "desc");
  EXPECT_EQ(hex(out),
            hex(cat({kReplyMagic, bytes({0, 0, 0, 3}), bytes({0, 0, 0, 2}), bytes({0, 0, 0, 10}),
                     bytes({0, 0, 0, 2}), text("ab"), text("desc")})));
}

TEST(AppendReplyServer, AllowsEmptyDescription) {
  Bytes out;
  append_reply_server(out, "", "");
  EXPECT_EQ(hex(out), hex(cat({kReplyMagic, bytes({0, 0, 0, 3}), bytes({0, 0, 0, 2}),
                               bytes({0, 0, 0, 4}), bytes({0, 0, 0, 0})})));
}

TEST(AppendInfoExport, WritesGoldenBytes) {
  Bytes out;
  append_info_export(out, 7, 0x0000000140000000, 0x0d6d);
  EXPECT_EQ(hex(out),
            hex(cat({kReplyMagic, bytes({0, 0, 0, 7}), bytes({0, 0, 0, 3}), bytes({0, 0, 0, 12}),
                     bytes({0, 0}), bytes({0x00, 0x00, 0x00, 0x01, 0x40, 0x00, 0x00, 0x00}),
                     bytes({0x0d, 0x6d})})));
}

TEST(AppendInfoName, WritesGoldenBytes) {
  Bytes out;
  append_info_name(out, 6, "disk");
  EXPECT_EQ(hex(out), hex(cat({kReplyMagic, bytes({0, 0, 0, 6}), bytes({0, 0, 0, 3}),
                               bytes({0, 0, 0, 6}), bytes({0, 1}), text("disk")})));
}

TEST(AppendInfoDescription, WritesGoldenBytes) {
  Bytes out;
  append_info_description(out, 7, "");
  append_info_description(out, 7, "d");
  EXPECT_EQ(hex(out),
            hex(cat({kReplyMagic, bytes({0, 0, 0, 7}), bytes({0, 0, 0, 3}), bytes({0, 0, 0, 2}),
                     bytes({0, 2}), kReplyMagic, bytes({0, 0, 0, 7}), bytes({0, 0, 0, 3}),
                     bytes({0, 0, 0, 3}), bytes({0, 2}), text("d")})));
}

TEST(AppendInfoBlockSize, WritesGoldenBytes) {
  Bytes out;
  append_info_block_size(out, 7, 1, 4096, 32u << 20);
  EXPECT_EQ(hex(out), hex(cat({kReplyMagic, bytes({0, 0, 0, 7}), bytes({0, 0, 0, 3}),
                               bytes({0, 0, 0, 14}), bytes({0, 3}), bytes({0, 0, 0, 1}),
                               bytes({0, 0, 0x10, 0}), bytes({0x02, 0, 0, 0})})));
}

TEST(AppendReplyMetaContext, WritesGoldenBytes) {
  Bytes out;
  append_reply_meta_context(out, 10, 0x01020304, "base:allocation");
  EXPECT_EQ(hex(out),
            hex(cat({kReplyMagic, bytes({0, 0, 0, 10}), bytes({0, 0, 0, 4}), bytes({0, 0, 0, 19}),
                     bytes({1, 2, 3, 4}), text("base:allocation")})));
}

TEST(AppendExportNameReply, WritesSizeFlagsAndZeroes) {
  Bytes out;
  append_export_name_reply(out, 0x0000000000100000, 0x0001, false);
  Bytes golden = bytes({0, 0, 0, 0, 0, 0x10, 0, 0, 0, 1});
  golden.resize(kExportNameReplySize + kExportNameReplyPadding, std::byte{0});
  EXPECT_EQ(hex(out), hex(golden));
  EXPECT_EQ(out.size(), 134u);
}

TEST(AppendExportNameReply, OmitsZeroesWhenNegotiated) {
  Bytes out;
  append_export_name_reply(out, 0xffffffffffffffff, 0x0003, true);
  EXPECT_EQ(hex(out), hex(bytes({0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00, 0x03})));
}

TEST(DecodeOptionReplyHeader, RejectsBadMagicAndTruncation) {
  Bytes out;
  append_reply_ack(out, 1);
  OptionReplyHeader h;
  for (std::size_t n = 0; n < out.size(); ++n) {
    EXPECT_EQ(decode_option_reply_header(prefix(out, n), h), Errc::short_input) << n;
  }
  out[7] = std::byte{0};
  EXPECT_EQ(decode_option_reply_header(out, h), Errc::bad_magic);
}

// ---- Request header ----

// WRITE with FUA, cookie 0x0102..08, offset 4096, length 512.
const Bytes kWriteRequest = cat({bytes({0x25, 0x60, 0x95, 0x13}), bytes({0, 1}), bytes({0, 1}),
                                 kCookie, bytes({0, 0, 0, 0, 0, 0, 0x10, 0}), bytes({0, 0, 2, 0})});

TEST(DecodeRequestHeader, ReadsGoldenBytes) {
  RequestHeader h;
  ASSERT_FALSE(decode_request_header(kWriteRequest, h));
  EXPECT_EQ(h.flags, kCmdFlagFua);
  EXPECT_EQ(h.type, static_cast<uint16_t>(Command::write));
  EXPECT_EQ(h.cookie, kCookieValue);
  EXPECT_EQ(h.offset, 4096u);
  EXPECT_EQ(h.length, 512u);
}

TEST(EncodeRequestHeader, WritesGoldenBytes) {
  std::array<std::byte, kRequestHeaderSize> buf{};
  ASSERT_FALSE(encode_request_header(buf, RequestHeader{kCmdFlagFua, 1, kCookieValue, 4096, 512}));
  EXPECT_EQ(hex(buf), hex(kWriteRequest));
}

TEST(EncodeRequestHeader, RejectsEveryShortOutput) {
  std::array<std::byte, kRequestHeaderSize> buf{};
  for (std::size_t n = 0; n < buf.size(); ++n) {
    EXPECT_EQ(encode_request_header(std::span(buf).first(n), {}), Errc::output_too_small) << n;
  }
}

TEST(DecodeRequestHeader, RejectsBadMagic) {
  Bytes b = kWriteRequest;
  b[3] = std::byte{0x14};
  RequestHeader h;
  EXPECT_EQ(decode_request_header(b, h), Errc::bad_magic);
}

TEST(DecodeRequestHeader, RejectsEveryTruncation) {
  for (std::size_t n = 0; n < kWriteRequest.size(); ++n) {
    RequestHeader h;
    EXPECT_EQ(decode_request_header(prefix(kWriteRequest, n), h), Errc::short_input) << n;
  }
}

TEST(DecodeRequestHeader, IgnoresPayloadAfterHeader) {
  RequestHeader h;
  ASSERT_FALSE(decode_request_header(cat({kWriteRequest, Bytes(512)}), h));
  EXPECT_EQ(h.length, 512u);
}

TEST(DecodeRequestHeader, RoundTripsExtremeValues) {
  const RequestHeader in{0xffff, 0xffff, ~uint64_t{0}, ~uint64_t{0}, 0xffffffff};
  std::array<std::byte, kRequestHeaderSize> buf{};
  ASSERT_FALSE(encode_request_header(buf, in));
  EXPECT_EQ(hex(std::span(buf).subspan(4)), hex(Bytes(24, std::byte{0xff})));
  RequestHeader out;
  ASSERT_FALSE(decode_request_header(buf, out));
  EXPECT_EQ(out.flags, 0xffff);
  EXPECT_EQ(out.type, 0xffff);
  EXPECT_EQ(out.cookie, ~uint64_t{0});
  EXPECT_EQ(out.offset, ~uint64_t{0});
  EXPECT_EQ(out.length, 0xffffffffu);
}

// ---- Simple reply ----

const Bytes kSimpleReply = cat({bytes({0x67, 0x44, 0x66, 0x98}), bytes({0, 0, 0, 0x16}), kCookie});

TEST(EncodeSimpleReply, WritesGoldenBytes) {
  std::array<std::byte, kSimpleReplyHeaderSize> buf{};
  ASSERT_FALSE(encode_simple_reply(buf, 22, kCookieValue));
  EXPECT_EQ(hex(buf), hex(kSimpleReply));
  for (std::size_t n = 0; n < buf.size(); ++n) {
    EXPECT_EQ(encode_simple_reply(std::span(buf).first(n), 0, 0), Errc::output_too_small) << n;
  }
}

TEST(DecodeSimpleReply, ReadsGoldenBytes) {
  SimpleReply r;
  ASSERT_FALSE(decode_simple_reply(kSimpleReply, r));
  EXPECT_EQ(r.error, 22u);
  EXPECT_EQ(r.cookie, kCookieValue);
  for (std::size_t n = 0; n < kSimpleReply.size(); ++n) {
    EXPECT_EQ(decode_simple_reply(prefix(kSimpleReply, n), r), Errc::short_input) << n;
  }
  EXPECT_EQ(decode_simple_reply(cat({bytes({0, 0, 0, 0}), Bytes(12)}), r), Errc::bad_magic);
}

// ---- Structured reply chunks ----

const Bytes kChunkMagic = bytes({0x66, 0x8e, 0x33, 0xef});

TEST(EncodeChunkHeader, WritesGoldenBytes) {
  std::array<std::byte, kChunkHeaderSize> buf{};
  ASSERT_FALSE(encode_chunk_header(buf, kReplyFlagDone, Chunk::offset_data, kCookieValue, 16));
  const Bytes golden =
      cat({kChunkMagic, bytes({0, 1}), bytes({0, 1}), kCookie, bytes({0, 0, 0, 16})});
  EXPECT_EQ(hex(buf), hex(golden));
  for (std::size_t n = 0; n < buf.size(); ++n) {
    EXPECT_EQ(encode_chunk_header(std::span(buf).first(n), 0, Chunk::none, 0, 0),
              Errc::output_too_small)
        << n;
  }
}

TEST(DecodeChunkHeader, ReadsGoldenBytes) {
  const Bytes golden =
      cat({kChunkMagic, bytes({0, 1}), bytes({0x80, 1}), kCookie, bytes({0, 0, 0, 9})});
  ChunkHeader h;
  ASSERT_FALSE(decode_chunk_header(golden, h));
  EXPECT_EQ(h.flags, kReplyFlagDone);
  EXPECT_EQ(h.type, static_cast<uint16_t>(Chunk::error));
  EXPECT_EQ(h.cookie, kCookieValue);
  EXPECT_EQ(h.length, 9u);
  for (std::size_t n = 0; n < golden.size(); ++n) {
    EXPECT_EQ(decode_chunk_header(prefix(golden, n), h), Errc::short_input) << n;
  }
  EXPECT_EQ(decode_chunk_header(kSimpleReply, h), Errc::short_input);
  EXPECT_EQ(decode_chunk_header(cat({kSimpleReply, Bytes(4)}), h), Errc::bad_magic);
}

TEST(EncodeOffsetDataPrefix, WritesGoldenBytes) {
  std::array<std::byte, kOffsetDataPrefixSize> buf{};
  ASSERT_FALSE(encode_offset_data_prefix(buf, 0, kCookieValue, 0x200, 512));
  EXPECT_EQ(hex(buf), hex(cat({kChunkMagic, bytes({0, 0}), bytes({0, 1}), kCookie,
                               bytes({0, 0, 0x02, 0x08}), bytes({0, 0, 0, 0, 0, 0, 2, 0})})));
  ChunkHeader h;
  ASSERT_FALSE(decode_chunk_header(buf, h));
  EXPECT_EQ(h.length, 8u + 512u);
}

TEST(EncodeOffsetDataPrefix, RejectsShortOutput) {
  std::array<std::byte, kOffsetDataPrefixSize> buf{};
  for (std::size_t n = 0; n < buf.size(); ++n) {
    EXPECT_EQ(encode_offset_data_prefix(std::span(buf).first(n), 0, 0, 0, 1),
              Errc::output_too_small)
        << n;
  }
}

TEST(EncodeOffsetDataPrefix, RejectsLengthThatOverflowsChunkLength) {
  std::array<std::byte, kOffsetDataPrefixSize> buf{};
  EXPECT_EQ(encode_offset_data_prefix(buf, 0, 0, 0, 0xffffffff - 7), Errc::bad_length);
  EXPECT_EQ(encode_offset_data_prefix(buf, 0, 0, 0, 0xffffffff), Errc::bad_length);
  ASSERT_FALSE(encode_offset_data_prefix(buf, 0, 0, 0, 0xffffffff - 8));
  ChunkHeader h;
  ASSERT_FALSE(decode_chunk_header(buf, h));
  EXPECT_EQ(h.length, 0xffffffffu);
}

TEST(EncodeOffsetHole, WritesGoldenBytes) {
  std::array<std::byte, kOffsetHoleChunkSize> buf{};
  ASSERT_FALSE(encode_offset_hole(buf, kReplyFlagDone, kCookieValue, 0x1000, 0x10000));
  EXPECT_EQ(hex(buf),
            hex(cat({kChunkMagic, bytes({0, 1}), bytes({0, 2}), kCookie, bytes({0, 0, 0, 12}),
                     bytes({0, 0, 0, 0, 0, 0, 0x10, 0}), bytes({0, 1, 0, 0})})));
  for (std::size_t n = 0; n < buf.size(); ++n) {
    EXPECT_EQ(encode_offset_hole(std::span(buf).first(n), 0, 0, 0, 1), Errc::output_too_small) << n;
  }
}

TEST(AppendBlockStatusChunk, WritesGoldenBytes) {
  const std::array<BlockStatusExtent, 2> extents{{{4096, 0}, {8192, kStateHole | kStateZero}}};
  Bytes out = bytes({0xee});
  append_block_status_chunk(out, kReplyFlagDone, kCookieValue, 1, extents);
  EXPECT_EQ(hex(out), hex(cat({bytes({0xee}), kChunkMagic, bytes({0, 1}), bytes({0, 5}), kCookie,
                               bytes({0, 0, 0, 20}), bytes({0, 0, 0, 1}), bytes({0, 0, 0x10, 0}),
                               bytes({0, 0, 0, 0}), bytes({0, 0, 0x20, 0}), bytes({0, 0, 0, 3})})));
  ChunkHeader h;
  ASSERT_FALSE(decode_chunk_header(std::span(out).subspan(1), h));
  EXPECT_EQ(h.length, out.size() - 1 - kChunkHeaderSize);
}

TEST(AppendErrorChunk, WritesGoldenBytes) {
  Bytes out;
  append_error_chunk(out, kReplyFlagDone, kCookieValue, 22, "bad");
  EXPECT_EQ(hex(out),
            hex(cat({kChunkMagic, bytes({0, 1}), bytes({0x80, 1}), kCookie, bytes({0, 0, 0, 9}),
                     bytes({0, 0, 0, 22}), bytes({0, 3}), text("bad")})));
}

TEST(AppendErrorChunk, TruncatesLongMessage) {
  Bytes out;
  append_error_chunk(out, 0, 0, 5, std::string(70000, 'm'));
  ASSERT_EQ(out.size(), kChunkHeaderSize + 6 + kMaxStringLength);
  ChunkHeader h;
  ASSERT_FALSE(decode_chunk_header(out, h));
  EXPECT_EQ(h.length, 6 + kMaxStringLength);
  EXPECT_EQ(load_be16(out.data() + kChunkHeaderSize + 4), kMaxStringLength);
}

TEST(AppendNoneChunk, WritesGoldenBytes) {
  Bytes out;
  append_none_chunk(out, kReplyFlagDone, kCookieValue);
  EXPECT_EQ(hex(out),
            hex(cat({kChunkMagic, bytes({0, 1}), bytes({0, 0}), kCookie, bytes({0, 0, 0, 0})})));
}

}  // namespace
}  // namespace fleeced::protocol

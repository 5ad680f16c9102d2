// SPDX-License-Identifier: MIT
// libFuzzer target for request headers: decode_request_header, then validate()
// under several negotiated contexts, checking the promises validate.hpp makes
// (nothing accepted outside the export or above max_payload, drop_connection
// only for oversized writes). The header must also re-encode to its bytes.
#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <span>

#include "protocol/codec.hpp"
#include "protocol/validate.hpp"

namespace p = fleeced::protocol;

namespace {

constexpr uint16_t kAllFlags = p::kFlagHasFlags | p::kFlagSendFlush | p::kFlagSendFua |
                               p::kFlagSendTrim | p::kFlagSendWriteZeroes | p::kFlagSendDf |
                               p::kFlagSendCache | p::kFlagSendFastZero;

constexpr std::array<p::RequestContext, 5> kContexts{{
    {uint64_t{1} << 30, kAllFlags, true, 1, p::kMaxPayloadSize},
    {uint64_t{1} << 30, p::kFlagHasFlags | p::kFlagReadOnly | p::kFlagSendFua, true, 2,
     p::kMaxPayloadSize},
    {4096, p::kFlagHasFlags, false, 0, 512},
    {0, kAllFlags, true, 1, p::kMaxPayloadSize},
    {~uint64_t{0}, kAllFlags, true, 1, ~uint32_t{0}},
}};

void check(const p::RequestHeader& h, const p::RequestContext& ctx) {
  const p::Validation v = p::validate(h, ctx);
  const bool is_write = h.type == static_cast<uint16_t>(p::Command::write);
  if (v.drop_connection != (is_write && h.length > ctx.max_payload)) __builtin_trap();
  if (v.error == p::Error::ok) {
    if (!v.message.empty()) __builtin_trap();
    if (h.type > static_cast<uint16_t>(p::Command::block_status)) __builtin_trap();
    const bool ranged = h.type != static_cast<uint16_t>(p::Command::disc) &&
                        h.type != static_cast<uint16_t>(p::Command::flush);
    if (ranged && (h.offset > ctx.export_size || h.length > ctx.export_size - h.offset)) {
      __builtin_trap();
    }
    if (is_write && h.length > ctx.max_payload) __builtin_trap();
    if (is_write && (ctx.transmission_flags & p::kFlagReadOnly) != 0) __builtin_trap();
  } else if (v.message.empty()) {
    __builtin_trap();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::span<const std::byte> in(reinterpret_cast<const std::byte*>(data), size);
  p::RequestHeader h;
  if (p::decode_request_header(in, h)) return 0;
  std::array<std::byte, p::kRequestHeaderSize> again{};
  if (p::encode_request_header(again, h) || !std::equal(again.begin(), again.end(), in.begin())) {
    __builtin_trap();
  }
  for (const p::RequestContext& ctx : kContexts) check(h, ctx);
  // Reuse the cookie as an errno and the flags as command flags.
  (void)p::to_nbd_error(static_cast<int>(h.cookie), h.flags);
  return 0;
}

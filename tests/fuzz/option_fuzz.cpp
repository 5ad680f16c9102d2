// SPDX-License-Identifier: MIT
// libFuzzer target for the option-phase decoders (nbdkit server/fuzzer.c,
// Beast test/fuzz). Input: a 16-byte option header and its payload, routed by
// option code as the server would; every decoder also sees the raw bytes.
// Successful decodes are re-encoded and must give back the input bytes.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "protocol/codec.hpp"

namespace p = fleeced::protocol;

namespace {

using Bytes = std::vector<std::byte>;

void put32(Bytes& out, uint32_t v) {
  std::byte b[4];
  p::store_be32(b, v);
  out.insert(out.end(), b, b + 4);
}

void put16(Bytes& out, uint16_t v) {
  std::byte b[2];
  p::store_be16(b, v);
  out.insert(out.end(), b, b + 2);
}

void put_string(Bytes& out, std::string_view s) {
  const auto* d = reinterpret_cast<const std::byte*>(s.data());
  out.insert(out.end(), d, d + s.size());
}

void check_string(std::string_view s) {
  if (s.size() > p::kMaxStringLength || s.find('\0') != std::string_view::npos) {
    __builtin_trap();
  }
}

void require_same(const Bytes& encoded, std::span<const std::byte> in) {
  if (encoded.size() != in.size() || !std::equal(encoded.begin(), encoded.end(), in.begin())) {
    __builtin_trap();
  }
}

void fuzz_info(std::span<const std::byte> in) {
  p::InfoRequest req;
  if (p::decode_info_request(in, req)) return;
  check_string(req.name);
  Bytes again;
  put32(again, static_cast<uint32_t>(req.name.size()));
  put_string(again, req.name);
  put16(again, static_cast<uint16_t>(req.info_types.size()));
  for (uint16_t t : req.info_types) put16(again, t);
  require_same(again, in);
}

void fuzz_meta(std::span<const std::byte> in) {
  p::MetaContextRequest req;
  if (p::decode_meta_context_request(in, req)) return;
  check_string(req.export_name);
  Bytes again;
  put32(again, static_cast<uint32_t>(req.export_name.size()));
  put_string(again, req.export_name);
  put32(again, static_cast<uint32_t>(req.queries.size()));
  for (const std::string& q : req.queries) {
    check_string(q);
    put32(again, static_cast<uint32_t>(q.size()));
    put_string(again, q);
  }
  require_same(again, in);
  // Selection must only ever return available names.
  const std::vector<std::string> available = {"base:allocation", "qemu:dirty-bitmap:b0"};
  for (bool is_list : {true, false}) {
    std::vector<std::string> out;
    for (const std::string& q : req.queries) p::match_meta_context(q, available, is_list, out);
    if (out.size() > available.size()) __builtin_trap();
  }
}

void fuzz_export_name(std::span<const std::byte> in) {
  std::string name;
  if (p::decode_export_name(in, name)) return;
  check_string(name);
  if (name.size() != in.size()) __builtin_trap();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::span<const std::byte> in(reinterpret_cast<const std::byte*>(data), size);
  p::OptionHeader h;
  if (!p::decode_option_header(in, h)) {
    std::span<const std::byte> payload = in.subspan(p::kOptionHeaderSize);
    if (h.length < payload.size()) payload = payload.first(h.length);
    switch (static_cast<p::Option>(h.option)) {
      case p::Option::export_name:
        fuzz_export_name(payload);
        break;
      case p::Option::info:
      case p::Option::go:
        fuzz_info(payload);
        break;
      case p::Option::list_meta_context:
      case p::Option::set_meta_context:
        fuzz_meta(payload);
        break;
      default:
        break;
    }
  }
  fuzz_info(in);
  fuzz_meta(in);
  fuzz_export_name(in);
  return 0;
}

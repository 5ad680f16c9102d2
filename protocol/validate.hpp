// SPDX-License-Identifier: MIT
// Request validation and errno -> NBD error mapping. Pure functions of their
// arguments; safe from any thread.
#pragma once

#include <cstdint>
#include <string_view>

#include "protocol/codec.hpp"
#include "protocol/nbd.hpp"

namespace fleeced::protocol {

// What the connection negotiated and what the export offers, as seen by a
// request.
struct RequestContext {
  uint64_t export_size = 0;
  uint16_t transmission_flags = 0;  // as advertised (kFlag*)
  bool structured_replies = false;
  uint32_t meta_contexts = 0;  // number of contexts selected for this export
  uint32_t max_payload = kMaxPayloadSize;
};

// The outcome of validating one request header.
struct Validation {
  Error error = Error::ok;       // ok: serve it
  std::string_view message;      // for error replies and logs
  bool drop_connection = false;  // a WRITE whose payload cannot be consumed
};

// Checks a request header against the spec: known command, allowed flags,
// range within the export, read-only, size limits, block status prerequisites.
// For WRITE, a payload longer than max_payload sets drop_connection (the
// caller cannot consume it safely); otherwise the caller reads or drains the
// payload before replying.
// Order, first failure wins: unknown command; write-like on a read-only export
// (EPERM); flags; READ/WRITE/CACHE above max_payload (EINVAL, EOVERFLOW for a
// DF read); TRIM/WRITE_ZEROES not advertised, BLOCK_STATUS without structured
// replies or meta contexts; DISC/FLUSH stop here (no range check);
// zero-length BLOCK_STATUS; range (ENOSPC for WRITE/WRITE_ZEROES, else EINVAL).
Validation validate(const RequestHeader& header, const RequestContext& ctx);

// Maps an errno from the block layer to the NBD error for a reply, honouring
// the command flags (ENOTSUP only for FAST_ZERO, EOVERFLOW only for DF).
// `err` is a positive errno; anything unknown (or negative) maps to EINVAL.
Error to_nbd_error(int err, uint16_t cmd_flags);

}  // namespace fleeced::protocol

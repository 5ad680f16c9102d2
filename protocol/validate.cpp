// SPDX-License-Identifier: MIT
// Design notes: validate() runs its checks in a fixed order so every request
// gets one predictable error: unknown command, read-only (EPERM even for
// TRIM/WRITE_ZEROES that a read-only export does not advertise), flags,
// payload size, command prerequisites, then the range. A WRITE longer than
// max_payload always drops the connection, whichever check reports it.
#include "protocol/validate.hpp"

#include <cerrno>

namespace fleeced::protocol {
namespace {

constexpr Validation reject(Error error, std::string_view message) {
  return Validation{error, message, false};
}

bool is_write_like(Command cmd) {
  return cmd == Command::write || cmd == Command::write_zeroes || cmd == Command::trim;
}

bool has(uint16_t flags, uint16_t bit) { return (flags & bit) != 0; }

bool df_negotiated(const RequestContext& ctx) {
  return ctx.structured_replies && has(ctx.transmission_flags, kFlagSendDf);
}

// doc/proto.md "Request message": FUA is valid on any command once
// advertised; the other flags belong to one command each.
uint16_t allowed_flags(Command cmd, const RequestContext& ctx) {
  unsigned allowed = has(ctx.transmission_flags, kFlagSendFua) ? kCmdFlagFua : 0u;
  if (cmd == Command::read && df_negotiated(ctx)) allowed |= kCmdFlagDf;
  if (cmd == Command::write_zeroes) {
    allowed |= kCmdFlagNoHole;
    if (has(ctx.transmission_flags, kFlagSendFastZero)) allowed |= kCmdFlagFastZero;
  }
  if (cmd == Command::block_status) allowed |= kCmdFlagReqOne;
  return static_cast<uint16_t>(allowed);
}

Validation check_flags(const RequestHeader& h, Command cmd, const RequestContext& ctx) {
  const uint16_t bad = static_cast<uint16_t>(h.flags & ~allowed_flags(cmd, ctx));
  if (bad == 0) return {};
  if (has(bad, kCmdFlagFua)) return reject(Error::inval, "FUA flag not advertised");
  if (cmd == Command::read && has(bad, kCmdFlagDf)) {
    return reject(Error::inval, "DF flag not negotiated");
  }
  if (cmd == Command::write_zeroes && has(bad, kCmdFlagFastZero)) {
    return reject(Error::inval, "FAST_ZERO flag not advertised");
  }
  return reject(Error::inval, "flag not valid for this command");
}

// Only commands whose length is a payload (or a read of that size) are held
// to max_payload; TRIM, WRITE_ZEROES and BLOCK_STATUS carry effect lengths.
Validation check_payload(const RequestHeader& h, Command cmd, const RequestContext& ctx) {
  if (cmd != Command::read && cmd != Command::write && cmd != Command::cache) return {};
  if (h.length <= ctx.max_payload) return {};
  if (cmd == Command::read && has(h.flags, kCmdFlagDf)) {
    return reject(Error::overflow, "DF read larger than maximum payload");
  }
  return reject(Error::inval, "request larger than maximum payload");
}

// The command is one the client may send on this connection at all.
Validation check_negotiated(Command cmd, const RequestContext& ctx) {
  if (cmd == Command::trim && !has(ctx.transmission_flags, kFlagSendTrim)) {
    return reject(Error::inval, "TRIM not advertised");
  }
  if (cmd == Command::write_zeroes && !has(ctx.transmission_flags, kFlagSendWriteZeroes)) {
    return reject(Error::inval, "WRITE_ZEROES not advertised");
  }
  if (cmd == Command::block_status) {
    // doc/proto.md "Metadata querying": BLOCK_STATUS needs structured replies
    // and a successful SET_META_CONTEXT; servers SHOULD answer EINVAL.
    if (!ctx.structured_replies) return reject(Error::inval, "structured replies not negotiated");
    if (ctx.meta_contexts == 0) return reject(Error::inval, "no meta context negotiated");
  }
  return {};
}

Validation check_range(const RequestHeader& h, Command cmd, const RequestContext& ctx) {
  // Compared without adding, so offset + length cannot wrap.
  if (h.offset <= ctx.export_size && h.length <= ctx.export_size - h.offset) return {};
  // The spec allows ENOSPC for writes past the end, but the control API
  // (section 7.3) requires EINVAL for a straddling WRITE, as QEMU answers;
  // EINVAL satisfies both, so every out-of-range request gets it.
  if (cmd == Command::write || cmd == Command::write_zeroes) {
    return reject(Error::inval, "write beyond end of export");
  }
  return reject(Error::inval, "request beyond end of export");
}

Validation check(const RequestHeader& h, const RequestContext& ctx) {
  if (h.type > static_cast<uint16_t>(Command::block_status)) {
    return reject(Error::inval, "unknown command");
  }
  const auto cmd = static_cast<Command>(h.type);
  if (is_write_like(cmd) && has(ctx.transmission_flags, kFlagReadOnly)) {
    return reject(Error::perm, "write to read-only export");
  }
  if (Validation v = check_flags(h, cmd, ctx); v.error != Error::ok) return v;
  if (Validation v = check_payload(h, cmd, ctx); v.error != Error::ok) return v;
  if (Validation v = check_negotiated(cmd, ctx); v.error != Error::ok) return v;
  // The spec wants offset and length 0 on DISC and FLUSH; we accept anything.
  if (cmd == Command::disc || cmd == Command::flush) return {};
  if (cmd == Command::block_status && h.length == 0) {
    return reject(Error::inval, "need non-zero length");
  }
  return check_range(h, cmd, ctx);
}

}  // namespace

Validation validate(const RequestHeader& header, const RequestContext& ctx) {
  Validation v = check(header, ctx);
  // A payload above max_payload can be neither buffered nor safely drained,
  // whatever else was wrong with the request.
  if (header.type == static_cast<uint16_t>(Command::write) && header.length > ctx.max_payload) {
    v.drop_connection = true;
  }
  return v;
}

Error to_nbd_error(int err, uint16_t cmd_flags) {
  switch (err) {
    case 0:
      return Error::ok;
    case EPERM:
    case EROFS:
      return Error::perm;
    case EIO:
      return Error::io;
    case ENOMEM:
      return Error::nomem;
    case ENOSPC:
    case EDQUOT:
    case EFBIG:
      return Error::nospc;
    case EOVERFLOW:
      // doc/proto.md: EOVERFLOW only answers a DF read.
      return has(cmd_flags, kCmdFlagDf) ? Error::overflow : Error::inval;
    case ESHUTDOWN:
      return Error::shutdown;
    default:
      break;
  }
  // ENOTSUP and EOPNOTSUPP are one value on Linux, so not switch cases.
  // doc/proto.md: ENOTSUP only answers a FAST_ZERO request.
  if (err == ENOTSUP || err == EOPNOTSUPP) {
    return has(cmd_flags, kCmdFlagFastZero) ? Error::notsup : Error::inval;
  }
  return Error::inval;
}

}  // namespace fleeced::protocol

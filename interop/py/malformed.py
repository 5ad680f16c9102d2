# SPDX-License-Identifier: MIT
"""Malformed and hostile input on the NBD socket (control-api.md 7.3).

Each case runs on its own raw connection (py/nbdraw.py).  Meanwhile a
libnbd client in a child process (--bg) writes and reads its own region of
disk0 on one long-lived connection and checks every byte; it must be served
throughout.  At the end the image file is compared with what the test wrote.

Exports expected (see raw-malformed.sh): disk0 (writable, 8 MiB, pattern
everywhere), ro (read-only, 1 MiB pattern), big (writable, 80 MiB sparse).
Exit 0 when every case passes, 1 otherwise.
"""

import argparse
import faulthandler
import os
import random
import select
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nbdraw as R  # noqa: E402
from nbdraw import Closed, Timeout  # noqa: E402

MiB, KiB = 1 << 20, 1 << 10
EPERM, EINVAL, ENOSPC = 1, 22, 28
BG_OFF, BG_LEN = 4 * MiB, MiB          # owned by the background client
W21_OFF, W21_LEN = 6 * MiB, 64 * KiB   # write followed by NBD_CMD_DISC
MP_OFF = 7 * MiB                       # target of the mid-payload hang-up
CLOSE_WAIT = 5.0

args = None
failures = []
notes = []


class CaseFailed(Exception):
    pass


def fail(msg):
    raise CaseFailed(msg)


def check(cond, msg):
    if not cond:
        fail(msg)


def pattern(off, length):
    start, end = off & ~7, (off + length + 7) & ~7
    words = b"".join(struct.pack(">Q", (w | 1 << 63) ^ 0x5A5A5A5A)
                     for w in range(start, end, 8))
    return words[off - start:off - start + length]


def raw():
    return R.Raw(args.socket, timeout=CLOSE_WAIT)


def expect_close(r, what, allow_bytes=False):
    try:
        got = r.wait_closed(CLOSE_WAIT)
    except Timeout as e:
        fail(f"{what}: expected the server to close the connection: {e}")
    if got and not allow_bytes:
        fail(f"{what}: server sent {len(got)} bytes before closing: "
             f"{got[:48].hex()}")
    r.close()
    return got


def expect_error_or_close(r, code, what, errors=None):
    """Option answered by an error reply (any, or one of errors) or close.
    Returns the reply type, or None when the server closed."""
    try:
        opt, rtype, data = r.opt_reply(CLOSE_WAIT)
    except Closed:
        return None
    except Timeout:
        fail(f"{what}: neither an error reply nor a close within "
             f"{CLOSE_WAIT} s")
    check(opt == code, f"{what}: reply for option {opt}, sent {code}")
    check(rtype & 0x80000000, f"{what}: expected an error reply, got "
          f"{rtype:#x} ({data[:32].hex()})")
    if errors:
        check(rtype in errors, f"{what}: error {rtype:#x}, expected one of "
              f"{[hex(e) for e in errors]}")
    return rtype


def still_serves_go(r, what):
    """After an option error the same connection can still GO disk0."""
    rtype = r.go("disk0")
    check(rtype == R.REP_ACK, f"{what}: GO disk0 afterwards failed {rtype:#x}")
    check(r.read(0, 4096) == pattern(0, 4096), f"{what}: read afterwards")
    r.disconnect()


def usable_after(r, what):
    try:
        data = r.read(8192, 512, cookie=0xA11CE)
    except (Closed, Timeout, R.ProtocolError) as e:
        fail(f"connection not usable after {what}: {e}")
    check(data == pattern(8192, 512), f"wrong data after {what}")


def simple_error(r, cmd, offset, length, cookie, want, what, payload=b"",
                 flags=0):
    r.request(cmd, offset, length, cookie, flags, payload)
    try:
        rep = r.reply(read_length=length if cmd == R.CMD_READ else 0)
    except Closed:
        fail(f"{what}: server closed instead of replying error {want}")
    except Timeout:
        fail(f"{what}: no reply")
    check(rep["cookie"] == cookie, f"{what}: cookie {rep['cookie']:#x} "
          f"not echoed ({cookie:#x})")
    check(rep["error"] in want, f"{what}: error {rep['error']}, want {want}")
    return rep


def session(name="disk0", structured=False, meta=False):
    r = raw()
    r.negotiate(name, structured=structured, meta=meta)
    return r


# ------------------------------------------------------------------ cases

CASES = []


def case(fn):
    CASES.append(fn)
    return fn


@case
def connect_and_close_at_once():
    for _ in range(5):
        s = socket.socket(socket.AF_UNIX)
        s.connect(args.socket)
        s.close()
    r = raw()
    r.greeting()
    r.close()


@case
def garbage_instead_of_ihaveopt():
    r = raw()
    r.start()
    r.send(b"GARBAGE!GARBAGE!" + struct.pack(">II", 7, 0))
    expect_close(r, "garbage option magic")


@case
def garbage_instead_of_client_flags():
    r = raw()
    r.greeting()
    r.send(bytes(range(63, -1, -1)))
    expect_close(r, "64 junk bytes after the greeting", allow_bytes=True)


@case
def unknown_client_flags():
    r = raw()
    r.greeting()
    r.send(struct.pack(">I", 0xFFFFFFF0))
    expect_close(r, "client flags 0xfffffff0")


def huge_option(code):
    r = raw()
    r.start()
    r.option(code, b"x" * 100, length=0x7FFFFFFF)
    rtype = expect_error_or_close(r, code, f"option {code} with length 0x7fffffff")
    r.close()
    if rtype is not None:
        notes.append(f"option {code} length 0x7fffffff: error reply {rtype:#x}")


@case
def huge_option_go():
    huge_option(R.OPT_GO)


@case
def huge_option_list():
    huge_option(R.OPT_LIST)


@case
def huge_option_unknown():
    huge_option(0x1234)


@case
def go_unknown_export():
    r = raw()
    r.start()
    rtype = r.go("no-such-export")
    check(rtype == R.REP_ERR_UNKNOWN, f"GO unknown export: {rtype:#x}")
    still_serves_go(r, "GO unknown export")


@case
def info_unknown_export():
    r = raw()
    r.start()
    rtype = r.go("no-such-export", code=R.OPT_INFO)
    check(rtype == R.REP_ERR_UNKNOWN, f"INFO unknown export: {rtype:#x}")
    rtype = r.go("disk0", code=R.OPT_INFO)
    check(rtype == R.REP_ACK and r.size == 8 * MiB, "INFO disk0")
    still_serves_go(r, "INFO unknown export")


@case
def export_name_unknown():
    r = raw()
    r.start()
    r.option(R.OPT_EXPORT_NAME, b"no-such-export")
    expect_close(r, "EXPORT_NAME unknown export")


@case
def export_name_known():
    for flags in (R.C_FIXED_NEWSTYLE | R.C_NO_ZEROES, R.C_FIXED_NEWSTYLE):
        r = raw()
        r.start(flags)
        r.option(R.OPT_EXPORT_NAME, b"disk0")
        size, eflags = struct.unpack(">QH", r.recv_exact(10))
        check(size == 8 * MiB, f"EXPORT_NAME size {size}")
        if not flags & R.C_NO_ZEROES:
            check(r.recv_exact(124) == bytes(124), "124 zero bytes")
        check(r.read(0, 4096) == pattern(0, 4096), "read after EXPORT_NAME")
        r.disconnect()


@case
def info_name_length_ffffffff():
    for code in (R.OPT_INFO, R.OPT_GO):
        r = raw()
        r.start()
        r.option(code, struct.pack(">IH", 0xFFFFFFFF, 0))
        rtype = expect_error_or_close(r, code, f"option {code} name length 0xffffffff")
        if rtype is not None:
            still_serves_go(r, "name length 0xffffffff")
        r.close()


@case
def name_length_beyond_option():
    r = raw()
    r.start()
    r.option(R.OPT_GO, struct.pack(">I", 1000) + b"disk0" + struct.pack(">H", 0))
    rtype = expect_error_or_close(r, R.OPT_GO, "GO name length 1000 > option")
    if rtype is not None:
        still_serves_go(r, "GO name length beyond option")


@case
def info_count_beyond_option():
    r = raw()
    r.start()
    r.option(R.OPT_GO, struct.pack(">I", 5) + b"disk0" + struct.pack(">HH", 5, 0))
    rtype = expect_error_or_close(r, R.OPT_GO, "GO info count 5, one given")
    if rtype is not None:
        still_serves_go(r, "GO info count beyond option")


@case
def long_names():
    for n in (256, 4096):
        r = raw()
        r.start()
        rtype = r.go("n" * n)
        check(rtype == R.REP_ERR_UNKNOWN, f"GO unknown {n}-byte name: {rtype:#x}")
        still_serves_go(r, f"{n}-byte name")
    for n in (4097, 70000):
        r = raw()
        r.start()
        r.option(R.OPT_GO, R.Raw.info_payload("n" * n))
        rtype = expect_error_or_close(r, R.OPT_GO, f"GO {n}-byte name")
        if rtype is not None:
            still_serves_go(r, f"{n}-byte name")


@case
def name_with_nul():
    r = raw()
    r.start()
    rtype = r.go(b"disk0\x00x")
    check(rtype in (R.REP_ERR_UNKNOWN, R.REP_ERR_INVALID),
          f"GO 'disk0\\0x': {rtype:#x}")
    still_serves_go(r, "name with NUL")


@case
def unknown_option_is_unsup():
    r = raw()
    r.start()
    for code in (0x1234, 4, 0x7FFFFFFF, R.OPT_EXTENDED_HEADERS):
        r.option(code, b"abcd" if code != R.OPT_EXTENDED_HEADERS else b"")
        rtype = r.opt_replies(code)[-1][0]
        if code == R.OPT_EXTENDED_HEADERS and rtype == R.REP_ACK:
            notes.append("server ACKed NBD_OPT_EXTENDED_HEADERS")
            r.close()
            return
        check(rtype == R.REP_ERR_UNSUP, f"option {code:#x}: {rtype:#x}, want ERR_UNSUP")
    still_serves_go(r, "unknown options")


@case
def starttls_without_tls():
    r = raw()
    r.start()
    r.option(R.OPT_STARTTLS)
    rtype = r.opt_replies(R.OPT_STARTTLS)[-1][0]
    check(rtype in (R.REP_ERR_POLICY, R.REP_ERR_UNSUP),
          f"STARTTLS without TLS: {rtype:#x}")
    still_serves_go(r, "STARTTLS")


@case
def list_exports():
    r = raw()
    r.start()
    r.option(R.OPT_LIST, b"junk")
    rtype = r.opt_replies(R.OPT_LIST)[-1][0]
    check(rtype == R.REP_ERR_INVALID, f"LIST with data: {rtype:#x}")
    r.option(R.OPT_LIST)
    replies = r.opt_replies(R.OPT_LIST)
    check(replies[-1][0] == R.REP_ACK, f"LIST: {replies[-1][0]:#x}")
    names = set()
    for rtype, d in replies[:-1]:
        check(rtype == R.REP_SERVER, f"LIST reply type {rtype:#x}")
        n = struct.unpack(">I", d[:4])[0]
        check(n <= len(d) - 4, "LIST name length beyond reply")
        names.add(d[4:4 + n].decode())
    check(names == {"disk0", "ro", "big"}, f"LIST names {names}")
    r.option(R.OPT_ABORT)
    try:
        rtype = r.opt_replies(R.OPT_ABORT)[-1][0]
        check(rtype == R.REP_ACK, f"ABORT: {rtype:#x}")
    except Closed:
        pass
    expect_close(r, "after ABORT")


@case
def structured_reply_with_payload_and_repeat():
    r = raw()
    r.start()
    r.option(R.OPT_STRUCTURED_REPLY, b"xx")
    rtype = r.opt_replies(R.OPT_STRUCTURED_REPLY)[-1][0]
    check(rtype == R.REP_ERR_INVALID, f"STRUCTURED_REPLY with data: {rtype:#x}")
    # SET_META_CONTEXT before structured replies: SHOULD be ERR_INVALID
    n = b"disk0"
    data = struct.pack(">I", len(n)) + n + struct.pack(">I", 1)
    data += struct.pack(">I", 15) + b"base:allocation"
    r.option(R.OPT_SET_META_CONTEXT, data)
    rtype = r.opt_replies(R.OPT_SET_META_CONTEXT)[-1][0]
    if rtype != R.REP_ERR_INVALID:
        notes.append(f"SET_META_CONTEXT before STRUCTURED_REPLY: {rtype:#x}")
    check(r.structured_reply() == R.REP_ACK, "STRUCTURED_REPLY")
    r.option(R.OPT_STRUCTURED_REPLY)
    rtype = r.opt_replies(R.OPT_STRUCTURED_REPLY)[-1][0]
    check(rtype in (R.REP_ACK, R.REP_ERR_INVALID), f"repeated STRUCTURED_REPLY {rtype:#x}")
    still_serves_go(r, "structured reply options")


@case
def simple_read_at_size():
    r = session()
    simple_error(r, R.CMD_READ, 8 * MiB, 512, 0xC0FFEE01, (EINVAL,),
                 "READ at offset = size")
    usable_after(r, "READ at offset = size")
    simple_error(r, R.CMD_READ, 8 * MiB - 512, 1024, 0xC0FFEE02, (EINVAL,),
                 "READ straddling the end")
    usable_after(r, "READ straddling the end")
    r.disconnect()


@case
def simple_read_at_2_63():
    r = session()
    simple_error(r, R.CMD_READ, 1 << 63, 512, 0x8000000000000001, (EINVAL,),
                 "READ at 2^63")
    usable_after(r, "READ at 2^63")
    simple_error(r, R.CMD_READ, (1 << 64) - 512, 4096, 0xFFFFFFFFFFFFFFFF,
                 (EINVAL,), "READ with offset+length wrapping 2^64")
    usable_after(r, "READ wrapping")
    r.disconnect()


@case
def simple_write_straddling_end():
    r = session()
    off = 8 * MiB - 512
    # control-api.md section 7.3 requires error 22 here.
    simple_error(r, R.CMD_WRITE, off, 1024, 0x5712ADD1, (EINVAL,),
                 "WRITE straddling the end", payload=b"\xee" * 1024)
    usable_after(r, "WRITE straddling the end")
    check(r.read(off, 512) == pattern(off, 512), "tail changed by failed write")
    r.disconnect()


@case
def simple_write_on_read_only():
    r = session("ro")
    simple_error(r, R.CMD_WRITE, 0, 512, 0xE9E9, (EPERM,), "WRITE on ro",
                 payload=b"\x01" * 512)
    simple_error(r, R.CMD_TRIM, 0, 4096, 0xE9EA, (EPERM,), "TRIM on ro")
    simple_error(r, R.CMD_WRITE_ZEROES, 0, 4096, 0xE9EB, (EPERM,), "WRITE_ZEROES on ro")
    check(r.read(0, 4096) == pattern(0, 4096), "ro changed")
    r.disconnect()


@case
def unknown_command():
    r = session()
    r.request(0x55, 0, 512, 0x55AA55AA)
    try:
        rep = r.reply()
    except Closed:
        notes.append("unknown command 0x55: server closed (acceptable)")
        return
    check(rep["cookie"] == 0x55AA55AA, "cookie not echoed for command 0x55")
    check(rep["error"] == EINVAL, f"command 0x55: error {rep['error']}")
    usable_after(r, "unknown command 0x55")
    r.disconnect()


@case
def unknown_command_flags():
    r = session()
    simple_error(r, R.CMD_READ, 0, 512, 0xF1A6, (EINVAL,), "READ flags 0x8000",
                 flags=0x8000)
    usable_after(r, "READ with flag 0x8000")
    simple_error(r, R.CMD_WRITE, 0, 512, 0xF1A7, (EINVAL,), "WRITE flags 0x100",
                 payload=pattern(0, 512), flags=0x100)
    usable_after(r, "WRITE with flag 0x100")
    r.disconnect()


@case
def write_64mib_header_without_payload():
    r = session("big")
    r.request(R.CMD_WRITE, 0, 64 * MiB, 0xB16B16)
    try:
        rep = r.reply(timeout=CLOSE_WAIT)
        check(rep["cookie"] == 0xB16B16 and rep["error"] == EINVAL,
              f"WRITE 64 MiB header: reply {rep}")
    except Closed:
        r.close()
        return
    except Timeout:
        fail("WRITE 64 MiB header, no payload: no reply and no close "
             f"within {CLOSE_WAIT} s (is the server waiting for 64 MiB?)")
    expect_close(r, "WRITE 64 MiB header after its error reply")


@case
def read_64mib():
    r = session("big")
    r.request(R.CMD_READ, 0, 64 * MiB, 0x64646464)
    rep = r.reply(read_length=64 * MiB, timeout=30)
    check(rep["cookie"] == 0x64646464, "READ 64 MiB: cookie")
    if rep["error"] == 0:
        notes.append("READ of 64 MiB was served")
        check(rep["data"] == bytes(64 * MiB), "READ 64 MiB data")
    else:
        check(rep["error"] == EINVAL, f"READ 64 MiB: error {rep['error']}")
    check(r.read(0, 512) == bytes(512), "big readable after 64 MiB READ")
    r.disconnect()


@case
def bad_request_magic():
    r = session()
    r.request(R.CMD_READ, 0, 512, 0xBAD, magic=0x12345678)
    got = expect_close(r, "bad request magic", allow_bytes=True)
    if got:
        # tolerated: one EINVAL simple reply before the close (QEMU does it)
        check(len(got) == 16 and struct.unpack(">IIQ", got)[:2] ==
              (R.SIMPLE_REPLY_MAGIC, EINVAL),
              f"bad request magic: server sent {got[:48].hex()} before closing")
        notes.append("bad request magic: EINVAL reply, then close")


@case
def structured_errors_and_chunks():
    r = session(structured=True, meta=True)
    r.request(R.CMD_READ, 8 * MiB, 512, 0x5EED)
    rep = r.reply()
    check(not rep["simple"], "READ error reply not structured")
    check(rep["cookie"] == 0x5EED and rep["error"] == EINVAL,
          f"structured READ past end: {rep['error']}")
    ftype = rep["chunks"][-1]
    check(ftype[0] & R.REPLY_FLAG_DONE, "last chunk without DONE")
    check(any(c[1] in (R.REPLY_TYPE_ERROR, R.REPLY_TYPE_ERROR_OFFSET)
              for c in rep["chunks"]), "no error chunk")
    usable_after(r, "structured READ past end")
    # BLOCK_STATUS: length 0, length 2^32-1 (past end), REQ_ONE
    r.request(R.CMD_BLOCK_STATUS, 0, 0, 0xB500)
    r.reply()
    usable_after(r, "BLOCK_STATUS of length 0")
    r.request(R.CMD_BLOCK_STATUS, 0, 0xFFFFFFFF, 0xB5FF)
    rep = r.reply()
    check(rep["error"] == EINVAL, f"BLOCK_STATUS 0xffffffff on 8 MiB: {rep['error']}")
    r.request(R.CMD_BLOCK_STATUS, 4096, 8 * MiB - 4096, 0xB501,
              flags=R.CMD_FLAG_REQ_ONE)
    rep = r.reply()
    check(rep["error"] == 0, f"BLOCK_STATUS REQ_ONE: {rep['error']}")
    bs = [c for c in rep["chunks"] if c[1] == R.REPLY_TYPE_BLOCK_STATUS]
    check(len(bs) == 1, f"{len(bs)} block status chunks")
    ctx, = struct.unpack(">I", bs[0][2][:4])
    check(ctx == r.meta_id, f"context id {ctx} != negotiated {r.meta_id}")
    check(len(bs[0][2]) == 12, f"REQ_ONE: {(len(bs[0][2]) - 4) // 8} extents")
    length, flags = struct.unpack(">II", bs[0][2][4:12])
    check(0 < length <= 8 * MiB - 4096, f"REQ_ONE extent length {length}")
    usable_after(r, "BLOCK_STATUS")
    r.disconnect()


@case
def block_status_without_meta_context():
    r = session(structured=True)
    r.request(R.CMD_BLOCK_STATUS, 0, 4096, 0xB5B5)
    rep = r.reply()
    check(rep["error"] == EINVAL, f"BLOCK_STATUS without context: {rep['error']}")
    usable_after(r, "BLOCK_STATUS without context")
    r.disconnect()


@case
def pipelined_requests():
    r = session()
    n = 300

    def writer():
        # a thread, so that a server that stops reading while its replies
        # are unread cannot deadlock the test
        try:
            for i in range(n):
                r.request(R.CMD_READ, (i * 4096) % (4 * MiB), 512, 0x9000 + i)
        except (Closed, OSError):
            pass
    t = threading.Thread(target=writer, daemon=True)
    t.start()
    seen = set()
    for _ in range(n):
        rep = r.reply(read_length=512, timeout=30)
        c = rep["cookie"]
        i = c - 0x9000
        check(0 <= i < n and c not in seen, f"unexpected cookie {c:#x}")
        seen.add(c)
        check(rep["error"] == 0 and
              rep["data"] == pattern((i * 4096) % (4 * MiB), 512),
              f"pipelined read {i}")
    t.join(5)
    r.disconnect()


@case
def write_then_disc():
    r = session()
    r.request(R.CMD_WRITE, W21_OFF, W21_LEN, 0x21, payload=b"\x21" * W21_LEN)
    r.request(R.CMD_DISC, cookie=0x22)
    got = r.wait_closed(CLOSE_WAIT)
    # the write's reply may or may not precede the close
    check(len(got) in (0, 16), f"{len(got)} bytes after DISC")
    r = session()
    check(r.read(W21_OFF, W21_LEN) == b"\x21" * W21_LEN,
          "WRITE followed at once by DISC was not completed")
    r.disconnect()


@case
def flush_with_offset():
    r = session()
    r.request(R.CMD_FLUSH, 4096, 4096, 0xF10)
    rep = r.reply()
    check(rep["cookie"] == 0xF10, "FLUSH cookie")
    usable_after(r, "FLUSH with offset/length")
    r.disconnect()


@case
def hang_ups():
    # mid-option header, mid-option data
    r = raw(); r.start(); r.send(struct.pack(">Q", R.IHAVEOPT)[:6]); r.close()
    r = raw(); r.start(); r.option(R.OPT_GO, b"\x00\x00", length=20); r.close()
    r = raw(); r.greeting(); r.send(b"\x00\x00"); r.close()
    # mid-header, mid-payload
    r = session(); r.send(struct.pack(">IHHQ", R.REQUEST_MAGIC, 0, 0, 1)[:13]); r.close()
    r = session()
    r.request(R.CMD_WRITE, MP_OFF, 4096, 0x3F3F, payload=b"\x3f" * 100)
    r.close()
    # abrupt close with replies still to be sent
    r = session()
    for i in range(50):
        r.request(R.CMD_READ, 0, 65536, i)
    r.close()
    time.sleep(0.3)
    r = session()
    check(r.read(MP_OFF, 4096) == pattern(MP_OFF, 4096),
          "a WRITE whose payload never fully arrived changed the disk")
    r.disconnect()


@case
def twenty_junk_connections():
    rng = random.Random(2024)
    socks = []
    for i in range(20):
        r = raw()
        kind = i % 5
        try:
            if kind == 0:
                r.send(os.urandom(rng.randrange(1, 4096)))
            elif kind == 1:
                r.start()
                r.send(os.urandom(rng.randrange(1, 4096)))
            elif kind == 2:
                r.start()
                r.option(R.OPT_GO, b"", length=0x7FFFFFFF)
                r.send(os.urandom(1000))
            elif kind == 3:
                r.negotiate("disk0")
                r.send(os.urandom(rng.randrange(28, 4096)))
            else:
                r.negotiate("disk0")
                r.request(R.CMD_WRITE, 0, 32 * MiB, 7, payload=os.urandom(100))
        except (Closed, OSError):
            pass
        socks.append(r)
    # with all 20 open (or already dropped), a fresh client is served
    r = session()
    check(r.read(0, 4096) == pattern(0, 4096), "read beside 20 junk connections")
    r.disconnect()
    for r in socks:
        r.close()


# ------------------------------------------------------------------ bg client

def bg_client():
    """libnbd client hammering BG region until stdin closes."""
    import nbd
    h = nbd.NBD()
    h.set_export_name("disk0")
    h.connect_unix(args.socket)
    model = bytearray(pattern(BG_OFF, BG_LEN))
    rng = random.Random(99)
    n, worst = 0, 0.0
    try:
        while True:
            r, _, _ = select.select([sys.stdin], [], [], 0)
            if r:
                break
            t0 = time.monotonic()
            length = rng.randrange(1, 64 * KiB)
            off = rng.randrange(0, BG_LEN - length)
            data = rng.randbytes(length)
            h.pwrite(data, BG_OFF + off)
            model[off:off + length] = data
            got = h.pread(length, BG_OFF + off)
            if got != data:
                print(f"bg: read-back mismatch at {BG_OFF + off}", flush=True)
                return 1
            if n % 20 == 0:
                if h.pread(BG_LEN, BG_OFF) != bytes(model):
                    print("bg: region mismatch", flush=True)
                    return 1
            worst = max(worst, time.monotonic() - t0)
            n += 1
            time.sleep(0.005)
        h.flush()
        if h.pread(BG_LEN, BG_OFF) != bytes(model):
            print("bg: final region mismatch", flush=True)
            return 1
        with open(args.bg_model, "wb") as f:
            f.write(model)
    except nbd.Error as e:
        print(f"bg: libnbd error after {n} iterations: {e}", flush=True)
        return 1
    print(f"bg: {n} iterations, slowest {worst:.3f} s", flush=True)
    if n < 10:
        print("bg: made almost no progress", flush=True)
        return 1
    if worst > 5:
        print("bg: an iteration took more than 5 s", flush=True)
        return 1
    return 0


# ------------------------------------------------------------------ main

def main():
    global args
    p = argparse.ArgumentParser()
    p.add_argument("--socket", required=True)
    p.add_argument("--image", required=True, help="disk0's image file")
    p.add_argument("--bg", action="store_true")
    p.add_argument("--bg-model")
    p.add_argument("--only")
    args = p.parse_args()
    if args.bg:
        return bg_client()
    args.bg_model = args.image + ".bg-model"
    bg = subprocess.Popen([sys.executable, os.path.abspath(__file__),
                           "--bg", "--socket", args.socket, "--image", args.image,
                           "--bg-model", args.bg_model], stdin=subprocess.PIPE)
    time.sleep(0.5)
    cases = CASES
    if args.only:
        cases = [c for c in CASES if c.__name__ in args.only.split(",")]
    for c in cases:
        name = c.__name__
        print(f"{name} ...", flush=True)
        faulthandler.dump_traceback_later(60, exit=True)
        try:
            c()
            print("  ok", flush=True)
        except CaseFailed as e:
            failures.append(f"{name}: {e}")
            print(f"  FAIL {e}", flush=True)
        except Exception as e:  # noqa: BLE001
            failures.append(f"{name}: {type(e).__name__}: {e}")
            print(f"  FAIL {type(e).__name__}: {e}", flush=True)
            traceback.print_exc(limit=4)
        finally:
            faulthandler.cancel_dump_traceback_later()
        # the server still takes new clients after every case
        try:
            r = session()
            if r.read(0, 512) != pattern(0, 512):
                raise R.ProtocolError("wrong data")
            r.disconnect()
        except (ConnectionRefusedError, FileNotFoundError) as e:
            failures.append(f"after {name}: server no longer accepts "
                            f"connections ({e}); remaining cases skipped")
            print(f"  FAIL server gone after {name}: {e}", flush=True)
            break
        except Exception as e:  # noqa: BLE001
            failures.append(f"after {name}: new client not served: {e}")
            print(f"  FAIL new client not served after {name}: {e}", flush=True)
    bg.stdin.close()
    try:
        st = bg.wait(60)
    except subprocess.TimeoutExpired:
        bg.kill()
        st = "timeout"
    if st != 0:
        failures.append(f"background libnbd client failed (status {st})")
    # the image file: pattern everywhere except what this test wrote
    with open(args.image, "rb") as f:
        img = f.read()
    want = bytearray(pattern(0, 8 * MiB))
    if os.path.exists(args.bg_model):
        with open(args.bg_model, "rb") as f:
            want[BG_OFF:BG_OFF + BG_LEN] = f.read()
    else:
        want[BG_OFF:BG_OFF + BG_LEN] = img[BG_OFF:BG_OFF + BG_LEN]
    if any(c.__name__ == "write_then_disc" for c in cases):
        want[W21_OFF:W21_OFF + W21_LEN] = b"\x21" * W21_LEN
    if img != bytes(want):
        first = next(i for i in range(len(want)) if i >= len(img) or img[i] != want[i])
        failures.append(f"disk0 image differs from expected at byte {first}")
    for n in notes:
        print(f"note: {n}")
    if failures:
        print(f"\n{len(failures)} failure(s):", file=sys.stderr)
        for f in failures:
            print(f"  {f}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

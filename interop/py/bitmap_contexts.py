# SPDX-License-Identifier: MIT
"""Dirty-bitmap meta contexts through QMP and python3-libnbd.

Run by interop/bitmap-contexts.sh, in two phases:

  setup   QMP: bitmaps of 4 KiB / 64 KiB (default) / 1 MiB granularity and a
          disabled one on the command-line disk "disk0"; export errors
          (read-only + enabled bitmap, unknown bitmap, busy bitmap); the
          exports live / ro / ign / unm; writes, write-zeroes and trims at
          known offsets; bitmap counts before and after a write to the
          last byte of the disk.
  check   block status with several contexts at once, REQ_ONE, sub-ranges,
          LIST_META_CONTEXT / SET_META_CONTEXT query rules.

Expected values are literal.  Every check runs on its own and failures are
collected, so one run reports every problem.  Exit 0 when all pass, else 1.
"""

import argparse
import errno
import faulthandler
import json
import socket
import sys
import traceback

import nbd

KiB, MiB = 1 << 10, 1 << 20
SIZE = 8 * MiB + 5120          # disk0: not a multiple of 4 KiB, 64 KiB, 1 MiB
SMALL = 2 * MiB                # ign.img / unm.img
TEST_TIMEOUT = 30
BASE = nbd.CONTEXT_BASE_ALLOCATION
DB = "qemu:dirty-bitmap:"

args = None
failures = []
current = "?"


class CheckFailed(Exception):
    pass


def fail(msg):
    raise CheckFailed(msg)


def check(cond, msg):
    if not cond:
        fail(msg)


def soft_fail(msg):
    failures.append(f"{current}: {msg}")
    print(f"  FAIL {msg}", flush=True)


def soft_eq(got, want, what):
    if got != want:
        soft_fail(f"{what}:\n      got  {got}\n      want {want}")


# ------------------------------------------------------------------ QMP

class Qmp:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.buf = b""
        greeting = self._read()
        check("QMP" in greeting, f"QMP greeting {greeting}")
        r = self.cmd("qmp_capabilities")
        check(r == ("return", {}), f"qmp_capabilities: {r}")

    def _read(self):
        while b"\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                fail("QMP socket closed")
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        if not line.strip():
            return self._read()
        return json.loads(line)

    def cmd(self, execute, **arguments):
        msg = {"execute": execute}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            r = self._read()
            if "event" in r:
                continue
            if "return" in r:
                return ("return", r["return"])
            if "error" in r:
                return ("error", r["error"].get("class"), r["error"].get("desc"))
            fail(f"unexpected QMP message {r}")

    def ok(self, execute, **arguments):
        r = self.cmd(execute, **arguments)
        check(r[0] == "return", f"{execute} {arguments}: {r}")
        return r[1]

    def expect_error(self, what, desc, execute, **arguments):
        """GenericError required; the desc text is QEMU's wording (should)."""
        r = self.cmd(execute, **arguments)
        if r[0] != "error":
            soft_fail(f"{what}: {execute} succeeded ({r}), expected GenericError")
            return
        if r[1] != "GenericError":
            soft_fail(f"{what}: error class {r[1]}, expected GenericError ({r[2]})")
        if r[2] != desc:
            print(f"  note: {what}: desc [{r[2]}], QEMU 7.2 says [{desc}]",
                  flush=True)

    def bitmaps(self, node):
        nodes = self.ok("query-named-block-nodes", flat=True)
        for n in nodes:
            if n.get("node-name") == node:
                return {b["name"]: b for b in n.get("dirty-bitmaps", [])
                        if "name" in b}
        fail(f"node {node} not in query-named-block-nodes")

    def close(self):
        self.sock.close()


# ------------------------------------------------------------------ NBD helpers

def connect(sock, export, contexts=(), strict=True):
    h = nbd.NBD()
    for c in contexts:
        h.add_meta_context(c)
    h.set_export_name(export)
    if not strict:
        h.set_strict_mode(0)
    h.connect_unix(sock)
    return h


def block_status(h, count, offset, flags=0):
    """{context: [(length, flags), ...]} from ONE block_status call."""
    got = {}

    def cb(metacontext, off, entries, err):
        if metacontext in got:
            soft_fail(f"block_status({count}, {offset}): context {metacontext} "
                      f"replied twice")
        if off != offset:
            soft_fail(f"block_status({count}, {offset}): {metacontext} "
                      f"reply for offset {off}")
        got[metacontext] = [(entries[i], entries[i + 1])
                            for i in range(0, len(entries), 2)]
        return 0
    h.block_status(count, offset, cb, flags)
    return got


def walk(h, context, size):
    """Whole-export map of one context, merged, like nbdinfo --map."""
    out, pos = [], 0
    while pos < size:
        ext = block_status(h, size - pos, pos).get(context)
        check(ext, f"walk {context}: no extents at {pos}")
        for n, f in ext:
            check(n > 0, f"walk {context}: zero-length extent at {pos}")
            check(pos + n <= size, f"walk {context}: extent ({n}, {f}) at {pos} "
                  f"runs past the end {size}")
            if out and out[-1][1] == f:
                out[-1] = (out[-1][0] + n, f)
            else:
                out.append((n, f))
            pos += n
    return out


def dirty_bytes(extents):
    return sum(n for n, f in extents if f & 1)


# ------------------------------------------------------------------ expected

# Writes to disk0 (SIZE = 8 MiB + 5120):
#   W1 pwrite   1 byte  at 100              (unaligned, inside granule 0)
#   W2 pwrite  10 bytes at 200000           (4K granule 48, 64K granule 3)
#   W3 pwrite   2 bytes at 1 MiB - 1        (crosses 4K/64K/1M boundaries)
#   W4 zero  8192 bytes at 3 MiB + 2048     (4K granules 768-770)
#   W5 trim   64 KiB    at 5 MiB            (discard=on: unmap semantics)
#   W6 pwrite   1 byte  at SIZE - 1         (last, partial granule) -- later
MAP_4K = [(4096, 1), (192512, 0), (4096, 1), (843776, 0), (8192, 1),
          (2093056, 0), (12288, 1), (2084864, 0), (65536, 1), (3085312, 0)]
MAP_64K = [(65536, 1), (131072, 0), (65536, 1), (720896, 0), (131072, 1),
           (2031616, 0), (65536, 1), (2031616, 0), (65536, 1), (3085312, 0)]
MAP_1M = [(2 * MiB, 1), (MiB, 0), (MiB, 1), (MiB, 0), (MiB, 1), (2102272, 0)]


def with_tail(m, tail):
    """m (ending clean) with the last `tail` bytes dirty."""
    m = list(m)
    n, f = m[-1]
    assert f == 0 and n > tail
    return m[:-1] + [(n - tail, 0), (tail, 1)]


FINAL = {"b4k": with_tail(MAP_4K, 1024), "b64k": with_tail(MAP_64K, 5120),
         "b1m": with_tail(MAP_1M, 5120), "bdis": [(SIZE, 0)]}


# ------------------------------------------------------------------ setup

def phase_setup():
    q = Qmp(args.qmp)
    try:
        setup_steps(q)
    finally:
        q.close()


def setup_steps(q):
    global current
    current = "bitmap-add"
    q.ok("block-dirty-bitmap-add", node="disk0", name="b64k")
    q.ok("block-dirty-bitmap-add", node="disk0", name="b4k", granularity=4096)
    q.ok("block-dirty-bitmap-add", node="disk0", name="b1m", granularity=MiB)
    q.ok("block-dirty-bitmap-add", node="disk0", name="bdis", disabled=True)
    # 3 granules of 4 MiB, the last one partial; never exported
    q.ok("block-dirty-bitmap-add", node="disk0", name="b4m", granularity=4 * MiB)
    bm = q.bitmaps("disk0")
    soft_eq({k: (v["granularity"], v["recording"], v["busy"], v["count"])
             for k, v in bm.items()},
            {"b64k": (65536, True, False, 0), "b4k": (4096, True, False, 0),
             "b1m": (MiB, True, False, 0), "bdis": (65536, False, False, 0),
             "b4m": (4 * MiB, True, False, 0)},
            "bitmaps after add (granularity, recording, busy, count)")

    current = "export-errors"
    q.ok("nbd-server-start", addr={"type": "unix", "data": {"path": args.sock}})
    # string form + enabled bitmap + read-only export: refused (section 3.6)
    q.expect_error("read-only export of enabled 'b4k'",
                   "Enabled bitmap 'b4k' incompatible with readonly export",
                   "block-export-add", **export_args("bad", "disk0", False,
                                                     ["bdis", "b4k"]))
    q.expect_error("export of unknown bitmap",
                   "Bitmap 'nope' is not found",
                   "block-export-add", **export_args("bad", "disk0", True,
                                                     ["b4k", "nope"]))
    # the failed attempts left nothing behind: no export, nothing busy
    # (the command-line export disk0 is listed too, as qemu-storage-daemon
    # lists its --export ones)
    soft_eq([e["id"] for e in q.ok("query-block-exports")], ["disk0"],
            "exports after refused adds")
    soft_eq(sorted(k for k, v in q.bitmaps("disk0").items() if v["busy"]), [],
            "busy bitmaps after refused adds")

    current = "export-add"
    # writable export, enabled bitmaps, both reference forms
    q.ok("block-export-add", **export_args(
        "live", "disk0", True,
        ["b64k", {"node": "disk0", "name": "b4k"}, "b1m"]))
    # read-only export of a disabled bitmap (string form) is fine
    q.ok("block-export-add", **export_args("ro", "disk0", False, ["bdis"]))
    # a bitmap exported once is busy
    q.expect_error("second export of 'b4k'",
                   "Bitmap 'b4k' is currently in use by another operation "
                   "and cannot be used",
                   "block-export-add", **export_args("bad", "disk0", True,
                                                     ["b4k"]))
    q.expect_error("clear of exported 'b64k'",
                   "Bitmap 'b64k' is currently in use by another operation "
                   "and cannot be used",
                   "block-dirty-bitmap-clear", node="disk0", name="b64k")
    bm = q.bitmaps("disk0")
    soft_eq({k: v["busy"] for k, v in bm.items()},
            {"b64k": True, "b4k": True, "b1m": True, "bdis": True,
             "b4m": False},
            "busy after export")
    # blockdev-add disks: discard default ("ignore") and "unmap"
    q.ok("blockdev-add", driver="file", **{"node-name": "ign-file"},
         filename=args.ign_image)
    q.ok("blockdev-add", driver="raw", **{"node-name": "ign"}, file="ign-file")
    q.ok("blockdev-add", driver="file", **{"node-name": "unm-file"},
         filename=args.unm_image, discard="unmap")
    q.ok("blockdev-add", driver="raw", **{"node-name": "unm"},
         file="unm-file", discard="unmap")
    q.ok("block-dirty-bitmap-add", node="ign", name="bi")
    q.ok("block-dirty-bitmap-add", node="unm", name="bu")
    q.ok("block-export-add", **export_args("ign", "ign", True, ["bi"]))
    q.ok("block-export-add", **export_args("unm", "unm", True, ["bu"]))
    soft_eq(sorted(e["id"] for e in q.ok("query-block-exports")),
            ["disk0", "ign", "live", "ro", "unm"], "export ids")

    current = "writes-disk0"
    # W1-W5 through the command-line export disk0: the node records them
    h = connect(args.cl_sock, "disk0")
    check(h.get_size() == SIZE, f"disk0 size {h.get_size()}")
    check(h.can_trim() and h.can_zero(), "disk0 cannot trim/zero")
    h.pwrite(b"A", 100)
    h.pwrite(b"B" * 10, 200000)
    h.pwrite(b"CD", MiB - 1)
    h.zero(8192, 3 * MiB + 2048)
    h.trim(64 * KiB, 5 * MiB)
    h.flush()
    h.shutdown()

    current = "count-equals-map"
    # before the tail write no partial granule is dirty: count == map bytes
    bm = q.bitmaps("disk0")
    h = connect(args.sock, "live", [DB + "b4k", DB + "b64k", DB + "b1m"])
    for name, want_map, want in (("b4k", MAP_4K, 23 * 4096),
                                 ("b64k", MAP_64K, 6 * 65536),
                                 ("b1m", MAP_1M, 4 * MiB)):
        got_map = walk(h, DB + name, SIZE)
        soft_eq(got_map, want_map, f"{name} map before the tail write")
        soft_eq(bm[name]["count"], want, f"{name} count before the tail write")
        soft_eq(bm[name]["count"], dirty_bytes(got_map),
                f"{name} count vs dirty bytes of its map")
    soft_eq(bm["bdis"]["count"], 0, "disabled bitmap count")
    soft_eq(bm["b4m"]["count"], 8 * MiB, "b4m count before the tail write")

    current = "write-last-byte"
    # W6 through the QMP export while the bitmaps are exported (busy)
    h.pwrite(b"Z", SIZE - 1)
    check(h.pread(1, SIZE - 1) == b"Z", "last byte read back")
    h.shutdown()
    bm = q.bitmaps("disk0")
    # count = the dirty bytes inside the disk (sections 3.8 and 6.1): the
    # partial last granule (1024 bytes for b4k, 5120 for the others) counts
    # up to the end of the disk, so count == sum of the map's dirty extents
    soft_eq({k: v["count"] for k, v in bm.items()},
            {"b4k": 23 * 4096 + 1024, "b64k": 6 * 65536 + 5120,
             "b1m": 4 * MiB + 5120, "bdis": 0,
             "b4m": SIZE},    # every granule dirty: the whole disk
            "counts after the last-byte write")

    current = "discard-ignore"
    # blockdev-add default discard "ignore": trim is dropped, dirties nothing
    before = file_bytes(args.ign_image, 0, 128 * KiB)
    h = connect(args.sock, "ign", [DB + "bi"], strict=False)
    check(h.get_size() == SMALL, f"ign size {h.get_size()}")
    if not h.can_trim():
        soft_fail("writable export 'ign' (discard ignore) does not advertise "
                  "trim (section 7.1: trim on every writable export)")
    try:
        h.trim(64 * KiB, 0)
    except nbd.Error as e:
        soft_fail(f"aligned trim on 'ign' failed: {e}")
    h.pwrite(b"i", MiB + 5)
    # requests straddling the end are refused and dirty nothing
    for what, fn in (("write", lambda: h.pwrite(b"xy", SMALL - 1)),
                     ("write_zeroes", lambda: h.zero(8192, SMALL - 4096)),
                     ("trim", lambda: h.trim(128 * KiB, SMALL - 64 * KiB))):
        try:
            fn()
            soft_fail(f"{what} straddling the end of 'ign' succeeded")
        except nbd.Error as e:
            if e.errnum not in (errno.EINVAL, errno.ENOSPC):
                soft_fail(f"{what} straddling the end: {e}")
    h.flush()
    soft_eq(h.pread(128 * KiB, 0) == before, True,
            "data under an ignored trim unchanged (read)")
    soft_eq(walk(h, DB + "bi", SMALL),
            [(MiB, 0), (64 * KiB, 1), (MiB - 64 * KiB, 0)],
            "ign bitmap: ignored trim and refused requests clean, write dirty")
    h.shutdown()
    soft_eq(file_bytes(args.ign_image, 0, 128 * KiB) == before, True,
            "data under an ignored trim unchanged (file)")
    soft_eq(q.bitmaps("ign")["bi"]["count"], 65536, "ign count")

    current = "discard-unmap"
    h = connect(args.sock, "unm", [DB + "bu", BASE])
    check(h.can_trim(), "writable export 'unm' does not advertise trim")
    h.trim(64 * KiB, 64 * KiB)
    h.trim(128 * KiB, MiB)
    h.flush()
    soft_eq(walk(h, DB + "bu", SMALL),
            [(64 * KiB, 0), (64 * KiB, 1), (MiB - 128 * KiB, 0),
             (128 * KiB, 1), (MiB - 128 * KiB, 0)],
            "unm bitmap after aligned trims")
    # the trims reached the file: the holes are punched
    soft_eq(walk(h, BASE, SMALL),
            [(64 * KiB, 0), (64 * KiB, 3), (MiB - 128 * KiB, 0),
             (128 * KiB, 3), (MiB - 128 * KiB, 0)],
            "unm base:allocation after trims (discard unmap punches holes)")
    h.shutdown()
    soft_eq(q.bitmaps("unm")["bu"]["count"], 3 * 65536, "unm count")


def export_args(eid, node, writable, bitmaps):
    return {"type": "nbd", "id": eid, "node-name": node, "name": eid,
            "writable": writable, "bitmaps": bitmaps}


def file_bytes(path, off, n):
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(n)


# ------------------------------------------------------------------ check

def phase_check():
    checks = [check_whole_maps, check_three_contexts, check_sub_ranges,
              check_req_one, check_list_meta, check_set_meta]
    for c in checks:
        run(c)


def check_whole_maps():
    h = connect(args.sock, "live", [DB + n for n in ("b4k", "b64k", "b1m")])
    for name in ("b4k", "b64k", "b1m"):
        soft_eq(walk(h, DB + name, SIZE), FINAL[name], f"{name} whole map")
    h.shutdown()
    h = connect(args.sock, "ro", [DB + "bdis"])
    check(h.is_read_only(), "ro export writable")
    soft_eq(walk(h, DB + "bdis", SIZE), FINAL["bdis"], "bdis whole map")
    h.shutdown()


def check_three_contexts():
    h = connect(args.sock, "live", [BASE, DB + "b4k", DB + "b64k"])
    for c in (BASE, DB + "b4k", DB + "b64k"):
        check(h.can_meta_context(c), f"{c} not negotiated")
    check(not h.can_meta_context(DB + "b1m"), "b1m negotiated unasked")
    got = block_status(h, 256 * KiB, 0)
    soft_eq(sorted(got), sorted([BASE, DB + "b4k", DB + "b64k"]),
            "contexts in one block_status reply")
    soft_eq(got.get(BASE), [(4096, 0), (192512, 3), (4096, 0), (61440, 3)],
            "base:allocation [0, 256K)")
    soft_eq(got.get(DB + "b4k"),
            [(4096, 1), (192512, 0), (4096, 1), (61440, 0)], "b4k [0, 256K)")
    soft_eq(got.get(DB + "b64k"), [(65536, 1), (131072, 0), (65536, 1)],
            "b64k [0, 256K)")
    # across the 1 MiB boundary (W3) and around write_zeroes/trim (W4/W5)
    got = block_status(h, 5 * MiB + 128 * KiB - 960 * KiB, 960 * KiB)
    soft_eq(got.get(DB + "b4k"),
            [(61440, 0), (8192, 1), (2093056, 0), (12288, 1), (2084864, 0),
             (65536, 1), (65536, 0)], "b4k [960K, 5M+128K)")
    soft_eq(got.get(DB + "b64k"),
            [(131072, 1), (2031616, 0), (65536, 1), (2031616, 0),
             (65536, 1), (65536, 0)], "b64k [960K, 5M+128K)")
    h.shutdown()


def check_sub_ranges():
    h = connect(args.sock, "live", [BASE, DB + "b4k", DB + "b64k", DB + "b1m"])
    # starts mid-granule: [197000, 267000)
    got = block_status(h, 70000, 197000)
    soft_eq(got.get(BASE), [(3704, 0), (66296, 3)], "base [197000, +70000)")
    soft_eq(got.get(DB + "b4k"), [(3704, 1), (66296, 0)],
            "b4k [197000, +70000)")
    soft_eq(got.get(DB + "b64k"), [(65144, 1), (4856, 0)],
            "b64k [197000, +70000)")
    soft_eq(got.get(DB + "b1m"), [(70000, 1)], "b1m [197000, +70000)")
    # tiny range inside one clean 4K granule of a dirty 64K granule
    got = block_status(h, 7, 8192 + 3)
    soft_eq(got.get(DB + "b4k"), [(7, 0)], "b4k [8195, +7)")
    soft_eq(got.get(DB + "b64k"), [(7, 1)], "b64k [8195, +7)")
    # the tail of the disk: last granules are partial
    got = block_status(h, 3000, SIZE - 3000)
    soft_eq(got.get(DB + "b4k"), [(1976, 0), (1024, 1)], "b4k last 3000")
    soft_eq(got.get(DB + "b64k"), [(3000, 1)], "b64k last 3000")
    soft_eq(got.get(DB + "b1m"), [(3000, 1)], "b1m last 3000")
    got = block_status(h, 1, SIZE - 1)
    for c in (DB + "b4k", DB + "b64k", DB + "b1m"):
        soft_eq(got.get(c), [(1, 1)], f"{c} last byte")
    # no extent past the requested end, none of length 0, 1 MiB walk
    for off, cnt in ((MiB - 4096 + 1, 3 * 4096), (3 * MiB + 100, 5 * MiB),
                     (4 * MiB + 1, MiB + 65535)):
        got = block_status(h, cnt, off)
        for c, ext in got.items():
            total = sum(n for n, _ in ext)
            if total != cnt or any(n == 0 for n, _ in ext):
                soft_fail(f"{c} block_status({cnt}, {off}) = {ext}: "
                          f"covers {total} bytes")
            if c.startswith(DB):
                for i, (n, f) in enumerate(ext):
                    if f not in (0, 1):
                        soft_fail(f"{c}: flags {f} in {ext}")
    h.shutdown()


def check_req_one():
    h = connect(args.sock, "live", [BASE, DB + "b4k", DB + "b64k"])
    ONE = nbd.CMD_FLAG_REQ_ONE
    cases = [
        (0, MiB, {BASE: [(4096, 0)], DB + "b4k": [(4096, 1)],
                  DB + "b64k": [(65536, 1)]}),
        (4096, MiB, {BASE: [(192512, 3)], DB + "b4k": [(192512, 0)],
                     DB + "b64k": [(61440, 1)]}),
        (65536, 1000, {BASE: [(1000, 3)], DB + "b4k": [(1000, 0)],
                       DB + "b64k": [(1000, 0)]}),
        (MiB - 2, 8, {BASE: [(8, 0)], DB + "b4k": [(8, 1)],
                      DB + "b64k": [(8, 1)]}),
        (SIZE - 5120, 5120, {BASE: [(4096, 3)], DB + "b4k": [(4096, 0)],
                             DB + "b64k": [(5120, 1)]}),
    ]
    for off, cnt, want in cases:
        got = block_status(h, cnt, off, ONE)
        for c in (DB + "b4k", DB + "b64k"):
            soft_eq(got.get(c), want[c], f"REQ_ONE {c} [{off}, +{cnt})")
        # base:allocation depends on the file system's allocation unit;
        # with REQ_ONE it must still be exactly one extent
        b = got.get(BASE)
        if not b or len(b) != 1:
            soft_fail(f"REQ_ONE base [{off}, +{cnt}): {b}, want one extent")
        elif b != want[BASE]:
            print(f"  note: REQ_ONE base [{off}, +{cnt}) = {b} "
                  f"(4 KiB file-system blocks give {want[BASE]})", flush=True)
    h.shutdown()


def list_meta(sock, export, queries):
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.set_export_name(export)
    h.connect_unix(sock)
    for q in queries:
        h.add_meta_context(q)
    names = []
    n = h.opt_list_meta_context(lambda name: names.append(name))
    check(n == len(names), f"opt_list_meta_context returned {n}, "
          f"callback saw {len(names)}")
    h.opt_abort()
    return sorted(names)


def check_list_meta():
    live_all = [DB + "b1m", DB + "b4k", DB + "b64k"]
    cases = [
        ("live", ["qemu:"], live_all),
        ("live", [DB], live_all),
        ("live", [DB + "b4k"], [DB + "b4k"]),
        ("live", [DB + "b4"], []),
        ("live", [DB + "b4kk"], []),
        ("live", [DB + "nope"], []),
        ("live", [DB + "bdis"], []),           # on the node, not exported here
        ("live", ["qemu:allocation-depth"], []),
        ("live", ["base:"], [BASE]),
        ("live", [BASE], [BASE]),
        ("live", ["base:nope"], []),
        ("live", ["x-unknown:"], []),
        ("live", [], sorted([BASE] + live_all)),
        ("live", ["base:", DB + "b1m"], [BASE, DB + "b1m"]),
        ("live", [DB + "b64k", DB + "nope", "qemu:dirty-bitmap:b1m"],
         [DB + "b1m", DB + "b64k"]),
        ("ro", ["qemu:"], [DB + "bdis"]),
        ("ro", [], [BASE, DB + "bdis"]),
        # the command-line export of the same node exports no bitmap
        ("disk0", ["qemu:"], []),
        ("disk0", [DB], []),
        ("disk0", [DB + "b4k"], []),
        ("disk0", ["base:"], [BASE]),
        ("disk0", [], [BASE]),
        ("ign", ["qemu:"], [DB + "bi"]),
    ]
    for export, queries, want in cases:
        sock = args.cl_sock if export == "disk0" else args.sock
        got = list_meta(sock, export, queries)
        soft_eq(got, want, f"LIST_META_CONTEXT {export} {queries}")


def check_set_meta():
    # an unknown bitmap is simply not negotiated
    h = connect(args.sock, "live", [DB + "nope", DB + "b1m", BASE,
                                    "qemu:allocation-depth"])
    soft_eq([h.can_meta_context(c) for c in
             (DB + "nope", DB + "b1m", BASE, "qemu:allocation-depth",
              DB + "b4k")],
            [False, True, True, False, False], "SET_META_CONTEXT selection")
    got = block_status(h, MiB, 0)
    soft_eq(sorted(got), [BASE, DB + "b1m"], "contexts replied after SET")
    soft_eq(got.get(DB + "b1m"), [(MiB, 1)], "b1m [0, 1M)")
    h.shutdown()
    # wildcards select nothing on SET
    h = connect(args.sock, "live", ["qemu:", DB])
    soft_eq([h.can_meta_context(c) for c in
             ("qemu:", DB, DB + "b4k", DB + "b64k", BASE)],
            [False] * 5, "SET with wildcards only")
    h.shutdown()
    # a bitmap of the node is not offered through an export that lacks it
    h = connect(args.cl_sock, "disk0", [DB + "b4k", BASE])
    soft_eq([h.can_meta_context(DB + "b4k"), h.can_meta_context(BASE)],
            [False, True], "SET on disk0 (no exported bitmaps)")
    h.shutdown()


# ------------------------------------------------------------------ main

def run(fn):
    global current
    current = fn.__name__
    print(f"{current} ...", flush=True)
    n_before = len(failures)
    faulthandler.dump_traceback_later(TEST_TIMEOUT, exit=True)
    try:
        fn()
    except CheckFailed as e:
        failures.append(f"{current}: {e}")
        print(f"  FAIL {e}", flush=True)
    except Exception as e:  # noqa: BLE001 - report everything
        failures.append(f"{current}: {type(e).__name__}: {e}")
        print(f"  FAIL {type(e).__name__}: {e}", flush=True)
        traceback.print_exc(limit=3)
    finally:
        faulthandler.cancel_dump_traceback_later()
    if len(failures) == n_before:
        print("  ok", flush=True)


def main():
    global args
    p = argparse.ArgumentParser()
    p.add_argument("phase", choices=["setup", "check"])
    p.add_argument("--qmp", required=True)
    p.add_argument("--sock", required=True, help="nbd-server-start socket")
    p.add_argument("--cl-sock", required=True, help="--listen socket")
    p.add_argument("--ign-image", required=True)
    p.add_argument("--unm-image", required=True)
    args = p.parse_args()
    if args.phase == "setup":
        run(phase_setup)
    else:
        phase_check()
    if failures:
        print(f"\n{len(failures)} failure(s):", file=sys.stderr)
        for f in failures:
            print(f"  {f}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

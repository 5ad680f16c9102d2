# SPDX-License-Identifier: MIT
"""Copy-before-write failures, timeouts, scratch space and bad input.

Run by interop/fleece-failures.sh against a fleeced serving the writable
command-line export "disk0" (nodes disk0-file / disk0) on --cl-sock, with
QMP on --qmp.  Every fleece is built with flavour A (control-api.md 5.1):

    blockdev-add file fl-tmp[-file]   (scratch file, disk size, sparse)
    [blockdev-add blkdebug fl-tmp image=fl-tmp-file ...]   error injection
    blockdev-add copy-before-write fl-cbw file=disk0-file target=fl-tmp ...
    blockdev-reopen disk0 file=fl-cbw                     (point in time)
    blockdev-add snapshot-access fl-access file=fl-cbw
    block-export-add fleece (read-only) on nbd-server-start --sock

and torn down in the 5.1 order, every step asserted to return {}.

Parts (see the shell script for the summary):
  part1_guest_write    on-cbw-error break-guest-write (default): ENOSPC/EIO
                       injected on the scratch writes of chosen clusters
  part1_once           blkdebug once=true: the retry of the write succeeds
  part2_break_snapshot on-cbw-error break-snapshot
  part3_timeout_*      cbw-timeout 1 with a scratch that takes 1.5 s a write
  part4_space          scratch allocation = copied data clusters only
  part5_bad_input      refused blockdev-adds change nothing

The disk (4 MiB = 64 clusters of 64 KiB) starts as: clusters 0-15 and
32-47 pattern data, 24-27 allocated zeroes, the rest holes.  A model of the
live disk is kept; the fleece must always equal the live disk as it was at
the blockdev-reopen.  Each check runs on its own and failures are collected;
exit 0 when all pass, else 1.
"""

import argparse
import errno
import faulthandler
import json
import os
import socket
import sys
import time
import traceback

import nbd

KiB, MiB = 1 << 10, 1 << 20
CL = 64 * KiB                 # copy-before-write cluster size
SIZE = 4 * MiB
BLK = 4096                    # block status compared per 4 KiB block
PART_TIMEOUT = 40             # a hung part dumps tracebacks and exits
IO_TIMEOUT = 10               # QMP replies; bounded NBD commands
BASE = nbd.CONTEXT_BASE_ALLOCATION

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


def soft_check(cond, msg):
    if not cond:
        soft_fail(msg)
    return cond


def soft_eq(got, want, what):
    if got != want:
        soft_fail(f"{what}:\n      got  {got}\n      want {want}")
        return False
    return True


def note(msg):
    print(f"  note: {msg}", flush=True)


def path(name):
    return os.path.join(args.dir, name)


def pattern(tag, n):
    """n non-zero bytes that name their writer."""
    b = f"<{tag}>".encode()
    return (b * (n // len(b) + 1))[:n]


# ------------------------------------------------------------------ QMP

class Qmp:
    def __init__(self, sock_path):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(IO_TIMEOUT)
        self.sock.connect(sock_path)
        self.buf = b""
        self.events = []
        greeting = self._read()
        check("QMP" in greeting, f"QMP greeting {greeting}")
        r = self.cmd("qmp_capabilities")
        check(r == {"return": {}}, f"qmp_capabilities: {r}")

    def _read(self):
        while True:
            while b"\n" not in self.buf:
                data = self.sock.recv(65536)
                if not data:
                    fail("QMP socket closed")
                self.buf += data
            line, self.buf = self.buf.split(b"\n", 1)
            if line.strip():
                return json.loads(line)

    def cmd(self, execute, arguments=None):
        """The full response; events are kept in self.events."""
        msg = {"execute": execute}
        if arguments is not None:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            r = self._read()
            if "event" in r:
                self.events.append(r)
                continue
            return r

    def ok(self, execute, arguments=None):
        r = self.cmd(execute, arguments)
        check(r == {"return": {}} or ("return" in r and execute.startswith("query")),
              f"{execute} {json.dumps(arguments)}: {r}")
        return r["return"]

    def soft_ok(self, execute, arguments=None):
        r = self.cmd(execute, arguments)
        return soft_check(r == {"return": {}},
                          f"{execute} {json.dumps(arguments)}: {r}, want {{'return': {{}}}}")

    def wait_event(self, name, pred, timeout=IO_TIMEOUT):
        deadline = time.monotonic() + timeout
        while True:
            for i, e in enumerate(self.events):
                if e.get("event") == name and pred(e.get("data", {})):
                    del self.events[i]
                    return e
            left = deadline - time.monotonic()
            check(left > 0, f"no {name} event within {timeout} s")
            self.sock.settimeout(left)
            try:
                r = self._read()
            except socket.timeout:
                fail(f"no {name} event within {timeout} s")
            finally:
                self.sock.settimeout(IO_TIMEOUT)
            check("event" in r, f"unexpected message while waiting for {name}: {r}")
            self.events.append(r)

    def nodes(self):
        """query-named-block-nodes, order-independent, for comparisons."""
        r = self.cmd("query-named-block-nodes", {"flat": True})
        check("return" in r, f"query-named-block-nodes: {r}")
        return sorted(json.dumps(n, sort_keys=True) for n in r["return"])

    def node_names(self):
        return sorted(json.loads(n)["node-name"] for n in self.nodes())

    def close(self):
        self.sock.close()


q = None


# ------------------------------------------------------------------ NBD

def connect(sock, export, contexts=()):
    h = nbd.NBD()
    for c in contexts:
        h.add_meta_context(c)
    h.set_export_name(export)
    h.connect_unix(sock)
    return h


def live_handle():
    return connect(args.cl_sock, "disk0")


def run_bounded(h, cookie, limit, what):
    """Polls until the command completes; returns (error or None, seconds)."""
    t0 = time.monotonic()
    while True:
        try:
            if h.aio_command_completed(cookie):
                return None, time.monotonic() - t0
        except nbd.Error as e:
            return e, time.monotonic() - t0
        left = limit - (time.monotonic() - t0)
        if left <= 0:
            fail(f"{what}: no reply within {limit} s")
        h.poll(max(1, int(min(left, 0.2) * 1000)))


def aio_write(h, data, off, limit=IO_TIMEOUT):
    cookie = h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), off)
    return run_bounded(h, cookie, limit, f"pwrite({len(data)}, {off})")


def aio_zero(h, n, off, limit=IO_TIMEOUT):
    cookie = h.aio_zero(n, off)
    return run_bounded(h, cookie, limit, f"zero({n}, {off})")


def errname(e):
    return errno.errorcode.get(e, str(e)) if isinstance(e, int) else str(e)


class Live:
    """The live export and the model of its contents."""

    def __init__(self):
        self.h = live_handle()
        check(self.h.get_size() == SIZE, f"disk0 size {self.h.get_size()}")
        self.data = bytearray(self.h.pread(SIZE, 0))

    def write(self, data, off, what, limit=IO_TIMEOUT):
        """A live write that must succeed; returns its duration."""
        err, secs = aio_write(self.h, data, off, limit)
        if err is not None:
            soft_fail(f"{what}: live pwrite({len(data)}, {off}) failed: {err}")
            self.resync(off, len(data))
        else:
            self.data[off:off + len(data)] = data
        return secs

    def zero(self, n, off, what):
        err, _ = aio_zero(self.h, n, off)
        if err is not None:
            soft_fail(f"{what}: live zero({n}, {off}) failed: {err}")
            self.resync(off, n)
        else:
            self.data[off:off + n] = bytes(n)

    def write_fails(self, data, off, want_errno, what, limit=IO_TIMEOUT):
        """A live write that must fail with want_errno and change nothing."""
        err, secs = aio_write(self.h, data, off, limit)
        if err is None:
            soft_fail(f"{what}: live pwrite({len(data)}, {off}) succeeded, want "
                      f"{errname(want_errno)}")
            self.data[off:off + len(data)] = data
            return secs
        soft_eq(errname(err.errno), errname(want_errno),
                f"{what}: NBD error of live pwrite({len(data)}, {off}) ({err})")
        self.expect_unchanged(off, len(data), what)
        return secs

    def expect_unchanged(self, off, n, what):
        # the whole clusters around the failed write: nothing of it landed
        lo = off // CL * CL
        hi = min(SIZE, (off + n + CL - 1) // CL * CL)
        got = self.h.pread(hi - lo, lo)
        if not soft_check(got == bytes(self.data[lo:hi]),
                          f"{what}: live disk [{lo}, {hi}) changed by a failed "
                          f"write ({describe(got, self.data[lo:hi], lo)})"):
            self.data[lo:hi] = got

    def resync(self, off, n):
        self.data[off:off + n] = self.h.pread(n, off)

    def verify(self, what):
        got = self.h.pread(SIZE, 0)
        if not soft_check(got == bytes(self.data),
                          f"{what}: live disk differs from the model "
                          f"({describe(got, self.data, 0)})"):
            self.data = bytearray(got)

    def alloc(self):
        """Per-4K base:allocation flags of the live disk (point-in-time map
        when called right before the reopen)."""
        h = connect(args.cl_sock, "disk0", [BASE])
        try:
            return alloc_map(h)
        finally:
            h.shutdown()

    def close(self):
        self.h.shutdown()


def describe(got, want, base):
    """First differing offset, for messages."""
    for i in range(min(len(got), len(want))):
        if got[i] != want[i]:
            return (f"first difference at {base + i}: got {bytes(got[i:i + 12])!r}, "
                    f"want {bytes(want[i:i + 12])!r}")
    return f"lengths {len(got)} vs {len(want)}"


def alloc_map(h):
    """base:allocation flags per 4 KiB block of the whole export."""
    flags = []
    pos = 0
    while pos < SIZE:
        got = []

        def cb(ctx, off, entries, err):
            if ctx == BASE:
                got.extend((entries[i], entries[i + 1])
                           for i in range(0, len(entries), 2))
            return 0
        h.block_status(SIZE - pos, pos, cb)
        check(got, f"block status at {pos}: no base:allocation extents")
        for n, f in got:
            check(n > 0 and pos + n <= SIZE, f"extent ({n}, {f}) at {pos}")
            check(pos % BLK == 0 and n % BLK == 0,
                  f"extent ({n}, {f}) at {pos} is not 4 KiB aligned")
            flags.extend([f] * (n // BLK))
            pos += n
    return flags


# ------------------------------------------------------------------ fleece

class Fleece:
    """A flavour-A fleece of disk0 into a scratch file, optionally through
    a blkdebug node: `blkdebug` = its extra arguments (then the nodes are
    fl-tmp-file / fl-tmp), else the plain file node is fl-tmp."""

    def __init__(self, live, tag, cbw_args=None, blkdebug=None):
        self.live = live
        self.scratch = path(f"scratch-{tag}.img")
        with open(self.scratch, "wb") as f:
            f.truncate(SIZE)
        self.nodes = []
        self.handles = []
        file_node = "fl-tmp-file" if blkdebug is not None else "fl-tmp"
        q.ok("blockdev-add", {"driver": "file", "node-name": file_node,
                              "filename": self.scratch})
        self.nodes.append(file_node)
        if blkdebug is not None:
            q.ok("blockdev-add", {"driver": "blkdebug", "node-name": "fl-tmp",
                                  "image": "fl-tmp-file", **blkdebug})
            self.nodes.append("fl-tmp")
        q.ok("blockdev-add", {"driver": "copy-before-write", "node-name": "fl-cbw",
                              "file": "disk0-file", "target": "fl-tmp",
                              "min-cluster-size": CL,  # automatic would be 4 KiB
                              **(cbw_args or {})})
        self.nodes.append("fl-cbw")
        # nothing writes now: the live map and contents are the point in time
        self.pit_alloc = live.alloc()
        live.verify("before the point in time")
        self.snap = bytes(live.data)
        q.ok("blockdev-reopen", {"options": [{"driver": "raw", "node-name": "disk0",
                                              "file": "fl-cbw"}]})
        q.ok("blockdev-add", {"driver": "snapshot-access", "node-name": "fl-access",
                              "file": "fl-cbw"})
        self.nodes.append("fl-access")
        q.ok("block-export-add", {"type": "nbd", "id": "fleece", "node-name": "fl-access",
                                  "name": "fleece", "writable": False})
        self.h = self.handle()

    def handle(self):
        h = connect(args.sock, "fleece", [BASE])
        self.handles.append(h)
        check(h.is_read_only(), "fleece export is writable")
        check(h.get_size() == SIZE, f"fleece size {h.get_size()}")
        return h

    # -- reads that must return the point in time

    def verify(self, what):
        h = self.h
        got = h.pread(SIZE, 0)
        soft_check(got == self.snap, f"{what}: whole-disk fleece read is not the point "
                   f"in time ({describe(got, self.snap, 0)})")
        for off in range(0, SIZE, CL):
            got = h.pread(CL, off)
            if not soft_check(got == self.snap[off:off + CL],
                              f"{what}: fleece cluster {off // CL} is not the point in "
                              f"time ({describe(got, self.snap[off:off + CL], off)})"):
                break
        for off, n in ((12345, 1), (CL - 3, 2 * CL + 7), (3 * CL + 100, 5 * CL),
                       (SIZE - 1000, 1000)):
            got = h.pread(n, off)
            soft_check(got == self.snap[off:off + n],
                       f"{what}: fleece pread({n}, {off}) is not the point in time "
                       f"({describe(got, self.snap[off:off + n], off)})")
        self.verify_alloc(what)

    def verify_alloc(self, what):
        """The fleece's base:allocation is the point-in-time allocation:
        point-in-time holes stay holes (hole|zero), point-in-time data
        stays data; allocated zeroes may be reported as data or zero."""
        got = alloc_map(self.h)
        bad = []
        for i, (pit, fl) in enumerate(zip(self.pit_alloc, got)):
            block = self.snap[i * BLK:(i + 1) * BLK]
            if pit == fl:
                continue
            if pit & 1:
                ok = fl == 3
            elif any(block):
                ok = fl == 0
            else:
                ok = fl in (0, 2, 3)
            if not ok:
                bad.append(f"block {i} (offset {i * BLK}): fleece {fl}, point in time {pit}")
        soft_check(not bad, f"{what}: fleece base:allocation differs from the point "
                   f"in time at {len(bad)} block(s): {bad[:4]}")

    # -- reads that must fail (broken snapshot)

    def expect_broken(self, what, h=None):
        h = h or self.h
        for off, n in ((0, 512), (20 * CL, CL), (50 * CL, 4096), (12345, 1),
                       (0, SIZE), (SIZE - 1, 1)):
            try:
                h.pread(n, off)
                soft_fail(f"{what}: fleece pread({n}, {off}) succeeded on a broken "
                          f"snapshot, want EIO")
            except nbd.Error as e:
                soft_eq(errname(e.errno), "EIO",
                        f"{what}: fleece pread({n}, {off}) error ({e})")
        for off, n in ((0, SIZE), (50 * CL, CL), (SIZE - 4096, 4096)):
            try:
                h.block_status(n, off, lambda *a: 0)
                soft_fail(f"{what}: fleece block_status({n}, {off}) succeeded on a "
                          f"broken snapshot, want EIO")
            except nbd.Error as e:
                soft_eq(errname(e.errno), "EIO",
                        f"{what}: fleece block_status({n}, {off}) error ({e})")

    # -- teardown, every step must succeed

    def teardown(self):
        for h in self.handles:
            h.shutdown()
        self.handles = []
        deadline = time.monotonic() + 5
        while True:
            r = q.cmd("block-export-del", {"id": "fleece"})
            if r == {"return": {}}:
                break
            if ("still in use" not in json.dumps(r) or time.monotonic() > deadline):
                soft_fail(f"block-export-del fleece: {r}")
                break
            time.sleep(0.05)
        q.wait_event("BLOCK_EXPORT_DELETED", lambda d: d.get("id") == "fleece")
        q.soft_ok("blockdev-del", {"node-name": "fl-access"})
        q.soft_ok("blockdev-reopen", {"options": [{"driver": "raw", "node-name": "disk0",
                                                   "file": "disk0-file"}]})
        for n in ("fl-cbw", "fl-tmp", "fl-tmp-file"):
            if n in self.nodes:
                q.soft_ok("blockdev-del", {"node-name": n})
        soft_eq(q.node_names(), ["disk0", "disk0-file"], "nodes after teardown")


def cleanup_graph():
    """Best effort after a part that stopped half-way."""
    names = q.node_names()
    if names == ["disk0", "disk0-file"]:
        return
    print(f"  cleaning up nodes {names}", flush=True)
    q.cmd("block-export-del", {"id": "fleece", "mode": "hard"})
    q.cmd("blockdev-del", {"node-name": "fl-access"})
    q.cmd("blockdev-reopen", {"options": [{"driver": "raw", "node-name": "disk0",
                                           "file": "disk0-file"}]})
    for n in ("fl-cbw", "fl-tmp", "fl-tmp-file", "small"):
        q.cmd("blockdev-del", {"node-name": n})
    q.events.clear()


def allocated(file):
    return os.stat(file).st_blocks * 512


def cluster_is(data, c, kind):
    block = data[c * CL:(c + 1) * CL]
    return any(block) if kind == "data" else not any(block)


# ------------------------------------------------------------------ parts

def part1_guest_write():
    """on-cbw-error default (break-guest-write); scratch writes covering
    cluster 2 fail with ENOSPC, those covering cluster 4 with EIO."""
    live = Live()
    for c in (0, 1, 2, 3, 4):
        check(cluster_is(live.data, c, "data"), f"cluster {c} is no data cluster")
    check(cluster_is(live.data, 18, "zero"), "cluster 18 is not zero")
    fl = Fleece(live, "p1", blkdebug={"inject-error": [
        {"event": "write_aio", "iotype": "write", "errno": 28, "once": False,
         "sector": 2 * CL // 512},
        {"event": "write_aio", "iotype": "write", "errno": 5, "once": False,
         "sector": 4 * CL // 512}]})
    fl.verify("fresh fleece")
    # the copy of cluster 2 fails: the guest write fails, nothing lands
    live.write_fails(pattern("p1-c2", CL), 2 * CL, errno.ENOSPC, "full cluster 2")
    live.write_fails(pattern("p1-c2b", 1), 2 * CL + 999, errno.ENOSPC, "1 byte in cluster 2")
    live.write_fails(pattern("p1-c4", 1), 4 * CL + 1000, errno.EIO, "1 byte in cluster 4")
    # across clusters 1 and 2: the whole write fails, cluster 1 unchanged too
    live.write_fails(pattern("p1-c12", CL), CL + CL // 2, errno.ENOSPC, "clusters 1-2")
    live.write_fails(pattern("p1-c34", 2 * CL), 3 * CL, errno.EIO, "clusters 3-4")
    # write-zeroes needs the same copy and fails the same way
    err, _ = aio_zero(live.h, 4096, 2 * CL + 8192)
    if soft_check(err is not None, "zero(4096) in cluster 2 succeeded, want ENOSPC"):
        soft_eq(errname(err.errno), "ENOSPC", f"zero(4096) in cluster 2 error ({err})")
    live.expect_unchanged(2 * CL + 8192, 4096, "zero in cluster 2")
    fl.verify("after the failed writes")
    # writes that need no failing scratch write work
    live.write(pattern("p1-c0", CL), 0, "cluster 0 (copy to scratch [0, 64K))")
    live.write(pattern("p1-c0b", 100), 50, "cluster 0 again (already copied)")
    live.write(pattern("p1-c3", 512), 3 * CL + 4096, "cluster 3 (copy to scratch [192K, 256K))")
    live.write(pattern("p1-c18", CL), 18 * CL, "cluster 18 (zero: nothing to copy)")
    # the failing clusters still fail, with the same error
    live.write_fails(pattern("p1-c2c", 4096), 2 * CL, errno.ENOSPC, "cluster 2 again")
    live.write_fails(pattern("p1-c4c", 4096), 4 * CL, errno.EIO, "cluster 4 again")
    live.verify("after part 1 writes")
    fl.verify("after the good writes")
    fl.teardown()
    live.verify("after teardown")
    live.close()


def part1_once():
    """break-guest-write with a one-shot EIO on the scratch: the first
    write fails, its retry succeeds, the fleece stays the point in time."""
    live = Live()
    for c in (6, 7):
        check(cluster_is(live.data, c, "data"), f"cluster {c} is no data cluster")
    fl = Fleece(live, "p1once", cbw_args={"on-cbw-error": "break-guest-write"},
                blkdebug={"inject-error": [{"event": "write_aio", "iotype": "write",
                                            "errno": 5, "once": True}]})
    data = pattern("p1once-c6", CL)
    live.write_fails(data, 6 * CL, errno.EIO, "first write of cluster 6")
    fl.verify("after the failed write")
    live.write(data, 6 * CL, "retry of cluster 6")
    soft_check(live.h.pread(CL, 6 * CL) == data, "cluster 6 after the retry")
    live.write(pattern("p1once-c7", 3000), 7 * CL + 5, "cluster 7")
    live.verify("after the retry")
    fl.verify("after the retry")
    fl.teardown()
    live.close()


def part2_break_snapshot():
    """on-cbw-error break-snapshot, every scratch request fails (ENOSPC)."""
    live = Live()
    for c in (0, 8, 9):
        check(cluster_is(live.data, c, "data"), f"cluster {c} is no data cluster")
    check(cluster_is(live.data, 20, "zero"), "cluster 20 is not zero")
    # no iotype: the rule fails every request type on the scratch
    fl = Fleece(live, "p2", cbw_args={"on-cbw-error": "break-snapshot"},
                blkdebug={"inject-error": [{"event": "write_aio", "errno": 28,
                                            "once": False}]})
    fl.verify("fresh fleece")
    # a point-in-time zero cluster needs no scratch write: nothing breaks
    live.write(pattern("p2-c20", CL), 20 * CL, "cluster 20 (zero at the point in time)")
    fl.verify("after a write over a zero cluster")
    # the copy of cluster 8 fails: the live write goes through anyway
    data8 = pattern("p2-c8", CL)
    live.write(data8, 8 * CL, "cluster 8 (its copy fails)")
    soft_check(live.h.pread(CL, 8 * CL) == data8, "cluster 8 read back after the write")
    # from now on every fleece read and block status fails with EIO
    fl.expect_broken("after the failed copy")
    fl.expect_broken("new connection after the failed copy", fl.handle())
    # the live disk keeps working
    live.write(pattern("p2-c9", 7000), 9 * CL + 3, "cluster 9")
    live.write(pattern("p2-c8b", 512), 8 * CL + 512, "cluster 8 again")
    live.zero(CL, 40 * CL, "zero cluster 40")
    live.write(pattern("p2-c50", 100), 50 * CL, "cluster 50 (hole)")
    live.verify("after writes on a broken snapshot")
    fl.expect_broken("after more live writes")
    fl.teardown()
    live.verify("after teardown")
    live.close()


# The scratch write is much slower than cbw-timeout (1 s), so a bounded wait
# is told apart from a wait for the copy with a wide margin even on a slow
# (sanitizer) build.
SLOW_MS = 4000
BOUND_S = 3.0


def timeout_fleece(live, tag, on_error):
    return Fleece(live, tag, cbw_args={"on-cbw-error": on_error, "cbw-timeout": 1},
                  blkdebug={"x-delay-ms": SLOW_MS})


def part3_timeout_break_snapshot():
    live = Live()
    check(cluster_is(live.data, 10, "data"), "cluster 10 is no data cluster")
    fl = timeout_fleece(live, "p3s", "break-snapshot")
    data = pattern("p3s-c10", CL)
    secs = live.write(data, 10 * CL, "cluster 10 (copy slower than cbw-timeout)", limit=10)
    note(f"break-snapshot: live write with cbw-timeout 1 s and a {SLOW_MS} ms scratch "
         f"write took {secs:.2f} s")
    # cbw-timeout bounds the guest's wait (QEMU abandons the copy after
    # cbw-timeout), well below the scratch write's duration
    soft_check(secs < BOUND_S, f"live write took {secs:.2f} s: cbw-timeout 1 s did not "
               f"bound it (it waited for the whole 1.5 s copy)")
    soft_check(live.h.pread(CL, 10 * CL) == data, "cluster 10 read back")
    fl.expect_broken("after the timed-out copy")
    live.write(pattern("p3s-c11", 4096), 11 * CL, "cluster 11 after the break", limit=10)
    live.verify("after the timeout")
    fl.teardown()
    live.close()


def part3_timeout_guest_write():
    live = Live()
    check(cluster_is(live.data, 11, "data"), "cluster 11 is no data cluster")
    fl = timeout_fleece(live, "p3g", "break-guest-write")
    data = pattern("p3g-c11", CL)
    # A copy that timed out is a storage failure: fleeced answers EIO (QEMU
    # 7.2 would send its catch-all EINVAL for ETIMEDOUT)
    secs = live.write_fails(data, 11 * CL, errno.EIO,
                            "cluster 11 (copy slower than cbw-timeout)", limit=10)
    note(f"break-guest-write: failed live write took {secs:.2f} s")
    soft_check(secs < BOUND_S, f"failing live write took {secs:.2f} s: cbw-timeout 1 s "
               f"did not bound it")
    # the abandoned copy finishes in the background; let it, so the retry
    # below does not wait behind it for longer than cbw-timeout
    time.sleep(SLOW_MS / 1000 + 0.5)
    fl.verify("after the timed-out write")
    secs = live.write(data, 11 * CL, "retry of cluster 11", limit=10)
    note(f"break-guest-write: retry took {secs:.2f} s")
    soft_check(live.h.pread(CL, 11 * CL) == data, "cluster 11 after the retry")
    fl.verify("after the retry")
    fl.teardown()
    live.close()


def part4_space():
    """Plain file scratch: it holds the copied data clusters, nothing for
    point-in-time zero clusters, and is emptied by blockdev-del fl-cbw."""
    live = Live()
    data_clusters = (12, 13, 14, 15, 32)
    zero_clusters = (25, 26, 52, 53, 54, 55, 56, 57)
    for c in data_clusters:
        check(cluster_is(live.data, c, "data"), f"cluster {c} is no data cluster")
    for c in zero_clusters:
        check(cluster_is(live.data, c, "zero"), f"cluster {c} is not zero")
    fl = Fleece(live, "p4")
    scratch = fl.scratch
    soft_eq(allocated(scratch), 0, "scratch allocation before any write")
    # N = 5 data clusters copied
    live.write(pattern("p4-c12", CL), 12 * CL, "full cluster 12")
    live.write(pattern("p4-c13", 1), 13 * CL + 7, "1 byte in cluster 13")
    live.write(pattern("p4-c14", CL), 14 * CL + 100, "clusters 14-15")
    live.zero(CL, 32 * CL, "zero cluster 32")
    live.write(pattern("p4-c12b", CL), 12 * CL, "cluster 12 again")
    live.write(pattern("p4-c13b", 4096), 13 * CL, "cluster 13 again")
    # zero at the point in time (allocated zeroes 25-26, holes 52-57): no space
    live.write(pattern("p4-c25", CL), 25 * CL, "cluster 25 (allocated zeroes)")
    live.write(pattern("p4-c26", 10), 26 * CL + 60000, "cluster 26 (allocated zeroes)")
    live.write(pattern("p4-c52", 2 * CL), 52 * CL, "clusters 52-53 (holes)")
    live.write(pattern("p4-c54", 1), 54 * CL + CL - 1, "last byte of cluster 54 (hole)")
    live.write(pattern("p4-c55", CL), 55 * CL + 4096, "clusters 55-56 (holes)")
    live.zero(CL, 57 * CL, "zero cluster 57 (hole)")
    live.h.flush()
    n = len(data_clusters)
    got = allocated(scratch)
    note(f"scratch allocated {got} bytes for {n} copied clusters ({n * CL} bytes)")
    # file-system metadata (an ext4 extent block) may add a few blocks; one
    # cluster more than the data would mean a zero cluster was copied
    soft_check(n * CL <= got < n * CL + CL // 2,
               f"scratch allocation {got} bytes, want {n} clusters = {n * CL} "
               f"(+ < 32 KiB file-system rounding)")
    soft_eq(os.path.getsize(scratch), SIZE, "scratch file size")
    live.verify("after the part 4 writes")
    fl.verify("after the part 4 writes")
    # teardown (blockdev-del fl-cbw gives the scratch space back)
    fl.teardown()
    got = allocated(scratch)
    note(f"scratch allocated {got} bytes after teardown")
    soft_check(got < CL // 2, f"scratch allocation {got} bytes after blockdev-del fl-cbw, "
               f"want ~0")
    live.verify("after teardown")
    live.close()


def part5_bad_input():
    """Refused blockdev-adds: GenericError, a clear text, no node changed."""
    small = path("small.img")
    with open(small, "wb") as f:
        f.truncate(SIZE - CL)
    q.ok("blockdev-add", {"driver": "file", "node-name": "small", "filename": small})
    before = q.nodes()
    cbw = {"driver": "copy-before-write", "node-name": "fl-cbw", "file": "disk0-file"}
    cases = [
        ("target smaller than the disk", {**cbw, "target": "small"},
         "Cannot use 'small' as copy-before-write target of 'disk0-file': it must be "
         "writable and at least as large"),
        ("unknown target", {**cbw, "target": "nope"},
         "Cannot find device='' nor node-name='nope'"),
        ("target == file", {**cbw, "target": "disk0-file"},
         "The target of copy-before-write must differ from its file"),
        ("unknown bitmap", {**cbw, "target": "small",
                            "bitmap": {"node": "disk0", "name": "nope"}},
         "Dirty bitmap 'nope' not found"),
        ("bad on-cbw-error", {**cbw, "target": "small", "on-cbw-error": "bogus"},
         "Parameter 'on-cbw-error' does not accept value 'bogus'"),
        ("negative cbw-timeout", {**cbw, "target": "small", "cbw-timeout": -1},
         "Parameter 'cbw-timeout' expects uint32_t"),
        ("snapshot-access over a file node",
         {"driver": "snapshot-access", "node-name": "fl-access", "file": "disk0-file"},
         "Node 'disk0-file' is not a copy-before-write filter (no snapshot API)"),
        ("snapshot-access over a raw node",
         {"driver": "snapshot-access", "node-name": "fl-access", "file": "disk0"},
         "Node 'disk0' is not a copy-before-write filter (no snapshot API)"),
        ("blkdebug bad iotype",
         {"driver": "blkdebug", "node-name": "bd", "image": "small",
          "inject-error": [{"event": "write_aio", "iotype": "bogus", "errno": 28}]},
         "Parameter 'inject-error[0].iotype' does not accept value 'bogus'"),
        ("blkdebug unknown image",
         {"driver": "blkdebug", "node-name": "bd", "image": "nope",
          "inject-error": [{"event": "write_aio", "iotype": "write", "errno": 28}]},
         "Cannot find device='' nor node-name='nope'"),
        # The live raw node over the same file as target: once inserted with
        # blockdev-reopen, the filter would copy into itself (QEMU refuses
        # the cycle).
        ("target = the live raw node over the same file", {**cbw, "target": "disk0"},
         "Making 'disk0' a child of 'fl-cbw' would create a cycle"),
    ]
    for what, arguments, desc in cases:
        r = q.cmd("blockdev-add", arguments)
        err = r.get("error")
        if not soft_check(err is not None, f"{what}: blockdev-add succeeded ({r}), "
                          f"want GenericError"):
            # undo it so that the remaining cases see the same graph
            q.cmd("blockdev-del", {"node-name": arguments["node-name"]})
        else:
            soft_eq(err.get("class"), "GenericError", f"{what}: error class")
            if desc is not None:
                soft_eq(err.get("desc"), desc, f"{what}: error text")
            else:
                note(f"{what}: {err.get('desc')}")
        soft_eq(q.nodes(), before, f"{what}: query-named-block-nodes afterwards")
    q.ok("blockdev-del", {"node-name": "small"})
    soft_eq(q.node_names(), ["disk0", "disk0-file"], "nodes at the end")


# ------------------------------------------------------------------ main

PARTS = [part1_guest_write, part1_once, part2_break_snapshot,
         part3_timeout_break_snapshot, part3_timeout_guest_write, part4_space,
         part5_bad_input]


def run(fn):
    global current
    current = fn.__name__
    print(f"{current} ...", flush=True)
    n_before = len(failures)
    t0 = time.monotonic()
    faulthandler.dump_traceback_later(PART_TIMEOUT, exit=True)
    try:
        fn()
    except CheckFailed as e:
        failures.append(f"{current}: {e}")
        print(f"  FAIL {e}", flush=True)
    except Exception as e:  # noqa: BLE001 - report everything
        failures.append(f"{current}: {type(e).__name__}: {e}")
        print(f"  FAIL {type(e).__name__}: {e}", flush=True)
        traceback.print_exc(limit=4)
    finally:
        faulthandler.cancel_dump_traceback_later()
    try:
        cleanup_graph()
    except Exception as e:  # noqa: BLE001
        failures.append(f"{current}: cleanup: {type(e).__name__}: {e}")
    if len(failures) == n_before:
        print(f"  ok ({time.monotonic() - t0:.1f} s)", flush=True)


def main():
    global args, q
    p = argparse.ArgumentParser()
    p.add_argument("--qmp", required=True)
    p.add_argument("--cl-sock", required=True, help="--listen socket (export disk0)")
    p.add_argument("--sock", required=True, help="nbd-server-start socket")
    p.add_argument("--dir", required=True, help="scratch directory")
    p.add_argument("parts", nargs="*", help="parts to run (default: all)")
    args = p.parse_args()
    q = Qmp(args.qmp)
    q.ok("nbd-server-start", {"addr": {"type": "unix", "data": {"path": args.sock}}})
    for fn in PARTS:
        if not args.parts or fn.__name__ in args.parts:
            run(fn)
    q.close()
    if failures:
        print(f"\n{len(failures)} failure(s):", file=sys.stderr)
        for f in failures:
            print(f"  {f}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

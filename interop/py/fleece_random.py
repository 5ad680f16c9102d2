# SPDX-License-Identifier: MIT
"""Randomized concurrency test of a fleece (control-api.md 5.2, 7.3, 9.2).

Run by interop/fleece-random.sh against a fleeced serving the writable
command-line export "disk0" (nodes disk0-file / disk0, discard=on) on
--cl-sock, with QMP on --qmp.  Phases (one QMP connection each):

  prepare   nbd-server-start on --sock, bitmap b0 on disk0; the initial
            base:allocation map of disk0 and the node/export/job lists are
            saved in --dir/state.json.
  fleece    flavour B with rotation b0 -> b1 (b0 frozen, exported with the
            fleece); a writable export "live" of disk0 carrying b1.
  run       the concurrent phase (below) and the final comparisons.
  teardown  flavour B teardown, then query-block-jobs is [] and the nodes
            and exports are the ones saved by prepare; the image file
            equals the live export as read at the end of "run".

The concurrent phase runs in threads, each with its own libnbd handle(s)
and several aio commands in flight (libnbd releases the GIL while it
waits):

  writers  3, on the live disk: writer 0 on the command-line export disk0,
           writers 1 and 2 on the QMP export "live".  Random write,
           write_zeroes (may trim / NO_HOLE / FUA), trim and flush at
           unaligned offsets, 1 byte .. 3 clusters long, half of them in
           a few "hot" clusters shared by all writers; occasional
           read-back of a range the writer holds.
  readers  3, on the fleece, each with 2 connections (multi-conn):
           random reads of 1 byte .. 1 MiB at any alignment (also in the
           hot clusters) and block status (base:allocation, REQ_ONE or
           not, and qemu:dirty-bitmap:b0).

Models.  The fleece must always read as the initial image (--ref, a copy
of the image file taken before fleeced started) and report its initial
allocation.  The live model is a bytearray updated when a write
completes.  A writer only submits a request whose byte range overlaps no
request in flight (a range lock shared by all writers), so requests on
the same bytes are ordered by their completions and the expected live
content is well defined, while writers still hit the same clusters at
the same time (different bytes of one cluster).  After a trim the bytes
may read as before or as zeroes (a maybe-zero mask; a later write clears
it).  The number of operations scales with FLEECE_RANDOM_OPS (per role:
writers and readers each do that many in total); FLEECE_RANDOM_SEED
seeds every thread's choices (printed; the interleaving still varies);
FLEECE_RANDOM_SECONDS bounds the concurrent phase (a deadline, not
expected to be reached: the phase then stops issuing and drains).
"""

import argparse
import bisect
import errno
import faulthandler
import json
import os
import random
import select
import socket
import sys
import threading
import time
import traceback

import nbd

KiB, MiB = 1 << 10, 1 << 20
CL = 64 * KiB                 # copy-before-write cluster / bitmap granule
BASE = nbd.CONTEXT_BASE_ALLOCATION
DB = "qemu:dirty-bitmap:"
IO_TIMEOUT = 30               # one request (or a QMP reply) may take this long

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
        return False
    return True


def note(msg):
    print(f"  note: {msg}", flush=True)


def path(name):
    return os.path.join(args.dir, name)


# ------------------------------------------------------------------ QMP

class Qmp:
    """Minimal QMP client; events seen while waiting are kept."""

    def __init__(self, sock_path):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(IO_TIMEOUT)
        self.sock.connect(sock_path)
        self.buf = b""
        self.events = []
        greeting = self._read()
        check("QMP" in greeting, f"QMP greeting {greeting}")
        self.ok_empty("qmp_capabilities")

    def _read(self, deadline=None):
        deadline = deadline or time.monotonic() + IO_TIMEOUT
        while True:
            while b"\n" not in self.buf:
                left = deadline - time.monotonic()
                if left <= 0:
                    fail("timed out waiting for QMP input")
                self.sock.settimeout(left)
                try:
                    data = self.sock.recv(65536)
                except socket.timeout:
                    fail("timed out waiting for QMP input")
                if not data:
                    fail("QMP socket closed")
                self.buf += data
            line, self.buf = self.buf.split(b"\n", 1)
            if line.strip():
                return json.loads(line)

    def cmd(self, execute, arguments=None):
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
        check("return" in r, f"{execute} {json.dumps(arguments)}: {r}")
        return r["return"]

    def ok_empty(self, execute, arguments=None):
        r = self.cmd(execute, arguments)
        check(r == {"return": {}},
              f"{execute} {json.dumps(arguments)}: {r}, want {{'return': {{}}}}")

    def wait_event(self, name, pred, timeout=IO_TIMEOUT):
        deadline = time.monotonic() + timeout
        while True:
            for i, e in enumerate(self.events):
                if e.get("event") == name and pred(e.get("data", {})):
                    return self.events.pop(i)
            try:
                r = self._read(deadline)
            except CheckFailed:
                fail(f"no {name} event within {timeout} s")
            check("event" in r, f"unexpected message while waiting for {name}: {r}")
            self.events.append(r)

    def nodes(self):
        return {n["node-name"]: n
                for n in self.ok("query-named-block-nodes", {"flat": True})}

    def bitmaps(self, node="disk0"):
        n = self.nodes().get(node)
        check(n is not None, f"node {node} not in query-named-block-nodes")
        return {b["name"]: b for b in n.get("dirty-bitmaps", []) if "name" in b}

    def summary(self):
        """Node names, exports and jobs: what a fleece must leave behind."""
        return {
            "nodes": sorted(self.nodes()),
            "exports": sorted((e["id"], e["node-name"])
                              for e in self.ok("query-block-exports")),
            "jobs": self.ok("query-block-jobs"),
        }

    def close(self):
        self.sock.close()


# ------------------------------------------------------------------ NBD

def connect(sock, export, contexts=()):
    h = nbd.NBD()
    for c in contexts:
        h.add_meta_context(c)
    h.set_export_name(export)
    h.connect_unix(sock)
    return h


def walk(h, context, size):
    """Whole-export map of one context as merged runs [start, end, flags]."""
    out, pos = [], 0
    while pos < size:
        got = []

        def cb(ctx, off, entries, err):
            if ctx == context:
                got.extend((entries[i], entries[i + 1])
                           for i in range(0, len(entries), 2))
            return 0
        h.block_status(size - pos, pos, cb)
        check(got, f"walk {context}: no extents at {pos}")
        for n, f in got:
            check(n > 0, f"walk {context}: zero-length extent at {pos}")
            n = min(n, size - pos)
            if out and out[-1][2] == f:
                out[-1][1] += n
            else:
                out.append([pos, pos + n, f])
            pos += n
    return out


def read_all(h, size, chunk=4 * MiB):
    out = bytearray()
    for off in range(0, size, chunk):
        out += h.pread(min(chunk, size - off), off)
    return bytes(out)


def first_diff(got, want, base=0):
    n = min(len(got), len(want))
    lo, hi = 0, n
    if got[:n] == want[:n]:
        return f"lengths {len(got)} vs {len(want)}"
    # bisect on slices (fast) for the first differing byte
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if got[lo:mid] != want[lo:mid]:
            hi = mid
        else:
            lo = mid
    i = lo
    j = i
    while j < n and got[j] != want[j]:
        j += 1
    return (f"first difference at {base + i} (run of {j - i} bytes): got "
            f"{bytes(got[i:i + 8]).hex()}, want {bytes(want[i:i + 8]).hex()}")


def poll_many(handles, timeout):
    """One round of event handling over several libnbd handles."""
    rl, wl, by_fd = [], [], {}
    for h in handles:
        fd = h.aio_get_fd()
        d = h.aio_get_direction()
        by_fd[fd] = h
        if d & nbd.AIO_DIRECTION_READ:
            rl.append(fd)
        if d & nbd.AIO_DIRECTION_WRITE:
            wl.append(fd)
    r, w, _ = select.select(rl, wl, [], timeout)
    for fd in r:
        by_fd[fd].aio_notify_read()
    for fd in w:
        by_fd[fd].aio_notify_write()


# ------------------------------------------------------------------ state

def save_state(st):
    with open(path("state.json"), "w") as f:
        json.dump(st, f)


def load_state():
    with open(path("state.json")) as f:
        return json.load(f)


# ------------------------------------------------------------------ phases

def phase_prepare():
    q = Qmp(args.qmp)
    q.ok_empty("nbd-server-start",
               {"addr": {"type": "unix", "data": {"path": args.sock}}})
    before = q.summary()
    q.ok_empty("block-dirty-bitmap-add",
               {"node": "disk0", "name": "b0", "granularity": CL})
    h = connect(args.cl_sock, "disk0", [BASE])
    check(h.get_size() == args.size, f"disk0 size {h.get_size()}")
    ref_map = walk(h, BASE, args.size)
    got = read_all(h, args.size)
    h.shutdown()
    ref = read_ref()
    check(got == ref, f"disk0 is not the reference image ({first_diff(got, ref)})")
    save_state({"before": before, "ref_map": ref_map})
    print(f"  initial allocation: {len(ref_map)} runs, "
          f"{sum(e - s for s, e, f in ref_map if f == 0)} data bytes", flush=True)
    q.close()


def phase_fleece():
    q = Qmp(args.qmp)
    scratch = path("fleece-tmp.img")
    with open(scratch, "wb") as f:
        f.truncate(args.size)
    q.ok_empty("blockdev-add", {"driver": "file", "node-name": "fl-tmp",
                                "filename": scratch})
    q.ok_empty("transaction", {"actions": [
        {"type": "block-dirty-bitmap-add",
         "data": {"node": "disk0", "name": "b1", "granularity": CL}},
        {"type": "block-dirty-bitmap-disable",
         "data": {"node": "disk0", "name": "b0"}},
        {"type": "blockdev-backup",
         "data": {"job-id": "fleece-job", "device": "disk0", "target": "fl-tmp",
                  "sync": "none", "filter-node-name": "fl-cbw"}}]})
    q.ok_empty("blockdev-add", {"driver": "snapshot-access",
                                "node-name": "fl-access", "file": "fl-cbw"})
    q.ok_empty("block-export-add", {
        "type": "nbd", "id": "fleece", "node-name": "fl-access",
        "name": "fleece", "writable": False,
        "bitmaps": [{"node": "disk0", "name": "b0"}]})
    q.ok_empty("block-export-add", {
        "type": "nbd", "id": "live", "node-name": "disk0", "name": "live",
        "writable": True, "bitmaps": ["b1"]})
    jobs = q.ok("query-block-jobs")
    check([(j.get("device"), j.get("type"), j.get("status")) for j in jobs]
          == [("fleece-job", "backup", "running")],
          f"query-block-jobs after the transaction: {jobs}")
    nodes = q.nodes()
    for n in ("fl-tmp", "fl-cbw", "fl-access"):
        check(n in nodes, f"node {n} missing after the fleece: {sorted(nodes)}")
    bm = q.bitmaps()
    check(bm.get("b0", {}).get("recording") is False and
          bm.get("b1", {}).get("recording") is True,
          f"bitmaps after the rotation: {bm}")
    q.close()


def read_ref():
    with open(args.ref, "rb") as f:
        ref = f.read()
    check(len(ref) == args.size, f"reference image is {len(ref)} bytes")
    return ref


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts = {}
        self.bytes = {}
        self.mismatches = {}       # category -> [count, first messages]
        self.n_mismatch = 0
        self.errors = []

    def count(self, what, n=0):
        with self.lock:
            self.counts[what] = self.counts.get(what, 0) + 1
            self.bytes[what] = self.bytes.get(what, 0) + n

    def mismatch(self, msg, category):
        with self.lock:
            self.n_mismatch += 1
            c = self.mismatches.setdefault(category, [0, []])
            c[0] += 1
            if len(c[1]) < 5 and msg not in c[1]:
                c[1].append(msg)

    def error(self, msg):
        with self.lock:
            self.errors.append(msg)


class Live:
    """Model of the live disk and the range lock of the writers."""

    def __init__(self, ref):
        self.lock = threading.Lock()
        self.data = bytearray(ref)
        self.maybe_zero = bytearray(len(ref))     # 1: old value or zero
        self.busy = []
        self.dirty_must = set()                   # granules written / zeroed
        self.dirty_may = set()                    # ... and trimmed

    def try_acquire(self, a, b):
        with self.lock:
            for x, y in self.busy:
                if x < b and a < y:
                    return False
            self.busy.append((a, b))
            return True

    def complete(self, kind, a, b, data):
        """The request on [a, b) completed successfully."""
        with self.lock:
            g = range(a // CL, (b - 1) // CL + 1)
            if kind == "write":
                self.data[a:b] = data
                self.maybe_zero[a:b] = bytes(b - a)
                self.dirty_must.update(g)
            elif kind == "zero":
                self.data[a:b] = bytes(b - a)
                self.maybe_zero[a:b] = bytes(b - a)
                self.dirty_must.update(g)
            elif kind == "trim":
                self.maybe_zero[a:b] = b"\x01" * (b - a)
                self.dirty_may.update(g)

    def release(self, a, b):
        with self.lock:
            self.busy.remove((a, b))

    def expected(self, a, b):
        with self.lock:
            return bytes(self.data[a:b]), bytes(self.maybe_zero[a:b])


def live_matches(got, want, mz, base):
    """None when got is the model (maybe-zero bytes may be old or zero),
    else a description of the first bad byte."""
    if got == want:
        return None
    n = len(want)
    pos = 0
    while pos < n:
        if mz[pos] == 0:
            j = mz.find(1, pos)
            j = n if j < 0 else j
            if got[pos:j] != want[pos:j]:
                return first_diff(got[pos:j], want[pos:j], base + pos)
        else:
            j = mz.find(0, pos)
            j = n if j < 0 else j
            seg, old = got[pos:j], want[pos:j]
            if seg != old and seg != bytes(j - pos):
                for i in range(j - pos):
                    if seg[i] != 0 and seg[i] != old[i]:
                        return (f"byte {base + pos + i} (trimmed): got "
                                f"{seg[i]:#04x}, want {old[i]:#04x} or 0")
        pos = j
    return None


def pick_range(rng, size, hot, maxlen):
    """A random [off, off+len): unaligned, sometimes cluster-aligned, in
    the hot clusters half of the time, sometimes at the end of the disk."""
    r = rng.random()
    if r < 0.15:
        n = rng.randint(1, 600)
    elif r < 0.55:
        n = rng.randint(1, CL)
    elif r < 0.9:
        n = rng.randint(CL, maxlen)
    else:
        n = CL * rng.randint(1, maxlen // CL)
    n = min(n, size)
    r = rng.random()
    if r < 0.5:
        lo, hi = hot
        off = rng.randint(lo, max(lo, min(hi, size) - 1))
    elif r < 0.55:
        off = size - n
    else:
        off = rng.randrange(0, size - n + 1)
    if rng.random() < 0.1:
        off = off // CL * CL
    off = min(off, size - 1)
    n = min(n, size - off)
    return off, n


def writer(idx, seed, sock, export, live, stats, quota, deadline, size, hot):
    name = f"writer{idx}"
    rng = random.Random(seed)
    h = connect(sock, export)
    check(h.get_size() == size, f"{name}: size {h.get_size()}")
    check(h.can_trim() and h.can_zero() and h.can_multi_conn(),
          f"{name}: {export} lacks trim/zero/multi-conn")
    qd = 6
    inflight = {}          # cookie -> (kind, a, b, data, buf, t0)
    done = []
    issued = 0

    def completion(box):
        # box[0] (the cookie) is set once the aio call returns, before any
        # completion is processed below
        def cb(err):
            done.append((box, err.value))
            return 1
        return cb

    while issued < quota or inflight:
        now = time.monotonic()
        while issued < quota and len(inflight) < qd and now < deadline:
            r = rng.random()
            if r < 0.45:
                kind = "write"
            elif r < 0.55:
                kind = "zero"            # may trim
            elif r < 0.65:
                kind = "zero-nohole"
            elif r < 0.8:
                kind = "trim"
            elif r < 0.95:
                kind = "verify"          # read back a range we hold
            else:
                kind = "flush"
            box = [None]
            if kind == "flush":
                box[0] = h.aio_flush(completion(box))
                inflight[box[0]] = ("flush", 0, 0, None, None, now)
                issued += 1
                stats.count("flush")
                continue
            for _ in range(20):
                a, n = pick_range(rng, size, hot, 3 * CL)
                if live.try_acquire(a, a + n):
                    break
            else:
                break                     # all tries overlap: wait a little
            b = a + n
            stats.count(kind, n)
            data = buf = None
            flags = 0
            if kind == "write":
                data = rng.randbytes(n)
                buf = nbd.Buffer.from_bytearray(bytearray(data))
                if rng.random() < 0.2:
                    flags |= nbd.CMD_FLAG_FUA
                box[0] = h.aio_pwrite(buf, a, completion(box), flags)
            elif kind in ("zero", "zero-nohole"):
                if kind == "zero-nohole":
                    flags |= nbd.CMD_FLAG_NO_HOLE
                if rng.random() < 0.2:
                    flags |= nbd.CMD_FLAG_FUA
                box[0] = h.aio_zero(n, a, completion(box), flags)
                kind = "zero"
            elif kind == "trim":
                box[0] = h.aio_trim(n, a, completion(box))
            else:
                want, mz = live.expected(a, b)
                buf = nbd.Buffer(n)
                box[0] = h.aio_pread(buf, a, completion(box))
                data = (want, mz)
            inflight[box[0]] = (kind, a, b, data, buf, now)
            issued += 1
        if now >= deadline and issued < quota:
            quota = issued                  # stop issuing; drain
        if inflight and not done:
            poll_many([h], 0.2)
        elif not inflight:
            time.sleep(0.001)               # every range tried was busy
        for box, err in done:
            kind, a, b, data, buf, t0 = inflight.pop(box[0])
            if err:
                stats.error(f"{name}: {kind} [{a}, {b}) failed: "
                            f"{errno.errorcode.get(err, err)}")
            elif kind == "verify":
                bad = live_matches(buf.to_bytearray(), data[0], data[1], a)
                if bad:
                    stats.mismatch(f"{name}: live read [{a}, {b}) is not the "
                                   f"model: {bad}", "live read-back")
            elif kind != "flush":
                live.complete(kind, a, b, data)
            if kind != "flush":
                live.release(a, b)
        done.clear()
        for cookie, (kind, a, b, data, buf, t0) in inflight.items():
            if time.monotonic() - t0 > IO_TIMEOUT:
                stats.error(f"{name}: {kind} [{a}, {b}) got no reply within "
                            f"{IO_TIMEOUT} s")
                raise CheckFailed(f"{name}: request hung")
    h.flush()
    h.shutdown()


class RefMap:
    """The point-in-time base:allocation (runs [start, end, flags] of the
    live disk before the fleece) and content.  A fleece extent agrees
    with it when its flags are the point-in-time flags: data (also
    allocated zeroes) stays data, a point-in-time hole stays hole|zero."""

    def __init__(self, runs, ref):
        self.starts = [s for s, e, f in runs]
        self.runs = runs
        self.ref = ref

    def problem(self, off, n, flags):
        """None, or (category, description) of the first disagreement."""
        i = bisect.bisect_right(self.starts, off) - 1
        end = off + n
        while i < len(self.runs) and self.runs[i][0] < end:
            s, e, f = self.runs[i]
            s, e = max(s, off), min(e, end)
            i += 1
            if f == flags:
                continue
            where = f"[{s}, {e}) is {f} at the point in time"
            if f & 1:
                return ("alloc: point-in-time hole not reported as hole,zero",
                        where)
            if flags & 2:
                if self.ref.count(0, s, e) == e - s:
                    # fleeced keeps the allocation exact: allocated zeroes
                    # at the point in time are data, never hole,zero
                    return ("alloc: allocated zeroes reported as zero", where)
                return ("alloc: UNSAFE zero reported over point-in-time data",
                        where)
            return ("alloc: other", where)
        return None


def reader(idx, seed, sock, ref, refmap, stats, quota, deadline, size, hot):
    name = f"reader{idx}"
    rng = random.Random(seed)
    hs = [connect(sock, "fleece", [BASE, DB + "b0"]) for _ in range(2)]
    for h in hs:
        check(h.get_size() == size and h.is_read_only() and h.can_multi_conn(),
              f"{name}: fleece export size/read-only/multi-conn "
              f"{h.get_size()} {h.is_read_only()} {h.can_multi_conn()}")
        check(h.can_meta_context(BASE) and h.can_meta_context(DB + "b0"),
              f"{name}: meta contexts not negotiated on the fleece")
    qd = 4
    inflight = {}
    done = []
    issued = 0

    def completion(box):
        def cb(err):
            done.append((box, err.value))
            return 1
        return cb

    def extent_cb(sink):
        def cb(ctx, off, entries, err):
            sink.append((ctx, off, list(entries)))
            return 0
        return cb

    while issued < quota or inflight:
        now = time.monotonic()
        for hn, h in enumerate(hs):
            while issued < quota and h.aio_in_flight() < qd and now < deadline:
                box = [None]
                if rng.random() < 0.8:
                    n = min(size, int(2 ** rng.uniform(0, 20)))
                    if rng.random() < 0.4:
                        a = rng.randint(max(0, hot[0] - n), min(hot[1], size - n))
                    else:
                        a = rng.randrange(0, size - n + 1)
                    buf = nbd.Buffer(n)
                    box[0] = (hn, h.aio_pread(buf, a, completion(box)))
                    inflight[box[0]] = ("read", a, n, buf, 0, now)
                    stats.count("read", n)
                else:
                    n = rng.choice([size, rng.randint(1, 4 * MiB),
                                    rng.randint(1, 3 * CL)])
                    n = min(n, size)
                    a = rng.randrange(0, size - n + 1)
                    flags = nbd.CMD_FLAG_REQ_ONE if rng.random() < 0.3 else 0
                    sink = []
                    box[0] = (hn, h.aio_block_status(n, a, extent_cb(sink),
                                                     completion(box), flags))
                    inflight[box[0]] = ("status", a, n, sink, flags, now)
                    stats.count("block_status", n)
                issued += 1
        if now >= deadline and issued < quota:
            quota = issued
        if inflight and not done:
            poll_many(hs, 0.2)
        for box, err in done:
            kind, a, n, obj, flags, t0 = inflight.pop(box[0])
            if err:
                stats.error(f"{name}: {kind} [{a}, +{n}) failed: "
                            f"{errno.errorcode.get(err, err)}")
            elif kind == "read":
                got = obj.to_bytearray()
                if got != ref[a:a + n]:
                    stats.mismatch(f"{name}: fleece read [{a}, +{n}) is not the "
                                   f"point in time: "
                                   f"{first_diff(got, ref[a:a + n], a)}",
                                   "fleece read")
            else:
                check_status(name, stats, refmap, a, n, flags, obj, size)
        done.clear()
        for cookie, (kind, a, n, obj, flags, t0) in inflight.items():
            if time.monotonic() - t0 > IO_TIMEOUT:
                stats.error(f"{name}: {kind} [{a}, +{n}) got no reply within "
                            f"{IO_TIMEOUT} s")
                raise CheckFailed(f"{name}: request hung")
    for h in hs:
        h.shutdown()


def check_status(name, stats, refmap, a, n, flags, replies, size):
    seen = {}
    for ctx, off, entries in replies:
        if ctx in seen:
            stats.mismatch(f"{name}: block status [{a}, +{n}): two replies for "
                           f"{ctx}", "block status protocol")
        seen[ctx] = entries
        if off != a:
            stats.mismatch(f"{name}: block status [{a}, +{n}): {ctx} reply at "
                           f"{off}", "block status protocol")
    if sorted(seen) != sorted([BASE, DB + "b0"]):
        stats.mismatch(f"{name}: block status [{a}, +{n}): contexts "
                       f"{sorted(seen)}", "block status protocol")
        return
    for ctx, entries in seen.items():
        pos = a
        ext = [(entries[i], entries[i + 1]) for i in range(0, len(entries), 2)]
        if flags & nbd.CMD_FLAG_REQ_ONE and len(ext) != 1:
            stats.mismatch(f"{name}: REQ_ONE block status [{a}, +{n}) {ctx}: "
                           f"{len(ext)} extents", "block status protocol")
        if not ext:
            stats.mismatch(f"{name}: block status [{a}, +{n}) {ctx}: no extents",
                           "block status protocol")
        if flags & nbd.CMD_FLAG_REQ_ONE and ext and ext[0][0] > n:
            stats.mismatch(f"{name}: REQ_ONE block status [{a}, +{n}) {ctx}: "
                           f"extent of {ext[0][0]} bytes exceeds the request",
                           "block status protocol")
        for length, fl in ext:
            if length == 0 or pos + length > size:
                stats.mismatch(f"{name}: block status [{a}, +{n}) {ctx}: extent "
                               f"({length}, {fl}) at {pos}", "block status protocol")
                break
            if pos >= a + n:
                stats.mismatch(f"{name}: block status [{a}, +{n}) {ctx}: extent "
                               f"past the request at {pos}", "block status protocol")
                break
            clip = min(length, a + n - pos)
            if ctx == BASE:
                bad = refmap.problem(pos, clip, fl)
                if bad:
                    stats.mismatch(
                        f"{name}: fleece base:allocation extent [{pos}, +{clip}) "
                        f"= {fl}: {bad[1]}", bad[0])
            elif fl != 0:
                stats.mismatch(f"{name}: fleece {ctx} [{pos}, +{clip}) = {fl}: "
                               f"the frozen bitmap b0 recorded nothing",
                               "dirty bitmap b0")
            pos += length


def phase_run():
    global current
    st = load_state()
    size = args.size
    ref = read_ref()
    refmap = RefMap([tuple(r) for r in st["ref_map"]], ref)
    ops = int(os.environ.get("FLEECE_RANDOM_OPS", "8000"))
    seconds = float(os.environ.get("FLEECE_RANDOM_SECONDS", "100"))
    seed = int(os.environ.get("FLEECE_RANDOM_SEED", str(random.randrange(1 << 30))))
    print(f"  FLEECE_RANDOM_SEED={seed} FLEECE_RANDOM_OPS={ops} "
          f"FLEECE_RANDOM_SECONDS={seconds}", flush=True)
    rng = random.Random(seed)
    hot_start = rng.randrange(0, size // CL - 8) * CL
    hot = (hot_start, hot_start + 8 * CL)
    print(f"  hot clusters [{hot[0]}, {hot[1]})", flush=True)

    # before anything runs: the fleece is the reference, allocation too
    h = connect(args.sock, "fleece", [BASE])
    got = read_all(h, size)
    check(got == ref, f"fleece before the writers: {first_diff(got, ref)}")
    check(walk(h, BASE, size) == st["ref_map"],
          "fleece base:allocation before the writers differs from the "
          "initial one")
    h.shutdown()

    live = Live(ref)
    stats = Stats()
    deadline = time.monotonic() + seconds
    threads = []
    errors = []

    def guard(fn, *a):
        try:
            fn(*a)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"{fn.__name__}{a[0]}: {type(e).__name__}: {e}")
            traceback.print_exc(limit=4)

    wq = [ops // 3 + (1 if i < ops % 3 else 0) for i in range(3)]
    for i in range(3):
        sock, export = ((args.cl_sock, "disk0") if i == 0
                        else (args.sock, "live"))
        threads.append(threading.Thread(target=guard, daemon=True, args=(
            writer, i, seed * 7 + i, sock, export, live, stats, wq[i],
            deadline, size, hot)))
        threads.append(threading.Thread(target=guard, daemon=True, args=(
            reader, i, seed * 11 + i, args.sock, ref, refmap, stats, wq[i],
            deadline, size, hot)))
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(1, deadline + 2 * IO_TIMEOUT - time.monotonic()))
        check(not t.is_alive(), "a worker thread did not finish in time")
    secs = time.monotonic() - t0
    print(f"  concurrent phase: {secs:.1f} s", flush=True)
    for k in sorted(stats.counts):
        print(f"    {k:14} {stats.counts[k]:7} ops {stats.bytes[k]:12} bytes",
              flush=True)
    total = sum(stats.counts.values())
    print(f"    {'total':14} {total:7} ops, {stats.n_mismatch} mismatches",
          flush=True)
    if time.monotonic() >= deadline:
        note(f"the {seconds} s deadline ended the concurrent phase early")
    for e in errors + stats.errors:
        soft_fail(e)
    for cat, (n, msgs) in sorted(stats.mismatches.items()):
        soft_fail(f"{n} mismatch(es) of kind [{cat}], e.g.\n        " +
                  "\n        ".join(msgs))

    # final state: the fleece is still the point in time, the live disk is
    # the model
    current = "final-compare"
    h = connect(args.sock, "fleece", [BASE, DB + "b0"])
    got = read_all(h, size)
    if got != ref:
        soft_fail(f"full fleece read after the writers is not the initial "
                  f"image: {first_diff(got, ref)}")
    check_map("fleece base:allocation after the writers",
              walk(h, BASE, size), refmap, st["ref_map"])
    soft_eq(walk(h, DB + "b0", size), [[0, size, 0]], "frozen b0 map")
    h.shutdown()
    h = connect(args.cl_sock, "disk0")
    h.flush()
    got = read_all(h, size)
    h.shutdown()
    bad = live_matches(got, bytes(live.data), bytes(live.maybe_zero), 0)
    if bad:
        soft_fail(f"live export after the writers is not the model: {bad}")
    with open(path("live-final.img"), "wb") as f:
        f.write(got)
    nz = sum(1 for _ in iter_runs(live.maybe_zero, 1))
    print(f"  live model: {nz} trimmed runs left as old-or-zero", flush=True)

    # b1 recorded the writes: every written / zeroed granule is dirty,
    # trimmed ones may be, nothing else
    h = connect(args.sock, "live", [DB + "b1"])
    runs = walk(h, DB + "b1", size)
    h.shutdown()
    dirty = set()
    for s, e, f in runs:
        if f & 1:
            check(s % CL == 0 and (e % CL == 0 or e == size),
                  f"b1 dirty extent [{s}, {e}) not granule aligned")
            dirty.update(range(s // CL, (e - 1) // CL + 1))
    missing = sorted(live.dirty_must - dirty)
    extra = sorted(dirty - live.dirty_must - live.dirty_may)
    if missing:
        soft_fail(f"b1 misses {len(missing)} written granules: {missing[:10]}")
    if extra:
        soft_fail(f"b1 has {len(extra)} granules nothing wrote: {extra[:10]}")
    q = Qmp(args.qmp)
    bm = q.bitmaps()
    want = sum(min(CL, size - g * CL) for g in dirty)
    soft_eq(bm.get("b1", {}).get("count"), want, "b1 count vs its map")
    soft_eq(bm.get("b0", {}).get("count"), 0, "b0 count")
    q.close()
    print(f"  b1: {len(dirty)} dirty granules ({len(live.dirty_must)} written, "
          f"{len(live.dirty_may - live.dirty_must)} only trimmed)", flush=True)


def check_map(what, runs, refmap, ref_map):
    """A whole-export map [[start, end, flags]] against the point in time."""
    if runs == ref_map:
        print(f"  {what}: identical to the initial map", flush=True)
        return
    bad = {}
    for s, e, f in runs:
        p = refmap.problem(s, e - s, f)
        if p:
            bad.setdefault(p[0], []).append(f"[{s}, {e}) = {f}: {p[1]}")
    for cat, msgs in sorted(bad.items()):
        soft_fail(f"{what}: {len(msgs)} run(s) of kind [{cat}], e.g.\n        " +
                  "\n        ".join(msgs[:5]))
    if not bad:
        print(f"  {what}: agrees with the initial map", flush=True)


def phase_mapcheck():
    """nbdinfo --map --json of the fleece (--map-json) vs the point in time."""
    st = load_state()
    ref = read_ref()
    refmap = RefMap([tuple(r) for r in st["ref_map"]], ref)
    with open(args.map_json) as f:
        m = json.load(f)
    runs, pos = [], 0
    for x in m:
        check(x["offset"] == pos, f"nbdinfo map: extent at {x['offset']}, "
              f"expected {pos}")
        if runs and runs[-1][2] == x["type"]:
            runs[-1][1] += x["length"]
        else:
            runs.append([pos, pos + x["length"], x["type"]])
        pos += x["length"]
    check(pos == args.size, f"nbdinfo map covers {pos} bytes")
    check_map("nbdinfo --map of the fleece", runs, refmap, st["ref_map"])


def iter_runs(mask, value):
    pos, n = 0, len(mask)
    while pos < n:
        i = mask.find(value, pos)
        if i < 0:
            return
        j = mask.find(1 - value, i)
        j = n if j < 0 else j
        yield i, j
        pos = j


def phase_teardown():
    st = load_state()
    q = Qmp(args.qmp)
    q.ok_empty("block-export-del", {"id": "fleece"})
    q.wait_event("BLOCK_EXPORT_DELETED", lambda d: d.get("id") == "fleece")
    q.ok_empty("blockdev-del", {"node-name": "fl-access"})
    q.ok_empty("block-job-cancel", {"device": "fleece-job"})
    q.wait_event("BLOCK_JOB_CANCELLED", lambda d: d.get("device") == "fleece-job")
    q.ok_empty("blockdev-del", {"node-name": "fl-tmp"})
    q.ok_empty("block-export-del", {"id": "live"})
    q.wait_event("BLOCK_EXPORT_DELETED", lambda d: d.get("id") == "live")
    after = q.summary()
    before = st["before"]
    soft_eq(after["jobs"], [], "query-block-jobs after the teardown")
    soft_eq(after["nodes"], before["nodes"], "nodes after the teardown")
    soft_eq(after["exports"], [tuple(e) for e in before["exports"]],
            "exports after the teardown")
    bm = q.bitmaps()
    soft_eq(sorted(bm), ["b0", "b1"], "bitmaps after the teardown")
    soft_eq([bm[b].get("busy") for b in sorted(bm)], [False, False],
            "bitmaps busy after the teardown")
    for b in ("b0", "b1"):
        q.ok_empty("block-dirty-bitmap-remove", {"node": "disk0", "name": b})
    soft_eq(q.bitmaps(), {}, "bitmaps after removing b0 and b1")
    q.close()
    # the data is in the image file
    with open(args.image, "rb") as f:
        img = f.read()
    with open(path("live-final.img"), "rb") as f:
        want = f.read()
    if img != want:
        soft_fail(f"image file differs from the live export as read: "
                  f"{first_diff(img, want)}")


def run(fn, timeout):
    global current
    current = fn.__name__
    print(f"{current} ...", flush=True)
    n_before = len(failures)
    faulthandler.dump_traceback_later(timeout, exit=True)
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
    if len(failures) == n_before:
        print("  ok", flush=True)


def main():
    global args
    p = argparse.ArgumentParser()
    p.add_argument("phase", choices=["prepare", "fleece", "run", "mapcheck",
                                     "teardown"])
    p.add_argument("--map-json", help="mapcheck: nbdinfo --map --json output")
    p.add_argument("--qmp", required=True)
    p.add_argument("--sock", required=True, help="nbd-server-start socket")
    p.add_argument("--cl-sock", required=True, help="--listen socket (disk0)")
    p.add_argument("--dir", required=True)
    p.add_argument("--ref", required=True, help="copy of the initial image")
    p.add_argument("--image", required=True, help="the image file of disk0")
    p.add_argument("--size", required=True, type=int)
    args = p.parse_args()
    fn = {"prepare": phase_prepare, "fleece": phase_fleece,
          "run": phase_run, "mapcheck": phase_mapcheck,
          "teardown": phase_teardown}[args.phase]
    seconds = float(os.environ.get("FLEECE_RANDOM_SECONDS", "100"))
    run(fn, 60 + (2 * seconds if args.phase == "run" else 0))
    if failures:
        print(f"\n{len(failures)} failure(s):", file=sys.stderr)
        for f in failures:
            print(f"  {f}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

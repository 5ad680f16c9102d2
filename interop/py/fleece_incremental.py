# SPDX-License-Identifier: MIT
"""An incremental backup chain pulled from flavour-B fleeces while a writer
keeps writing (control-api.md 3.6, 3.7, 3.9, 3.10, 5.2, 6.1, 6.2).

Run by interop/fleece-incremental.sh against a fleeced serving the
writable command-line export "disk0" (nodes disk0-file / disk0) on
--cl-sock, with QMP on --qmp.  Two roles in this file:

  writer  (a child process) one libnbd connection to disk0, up to 8
          requests in flight, random write / write_zeroes (NO_HOLE, FUA
          at random) at unaligned offsets, 1 byte .. 3 granules, a third
          of them in a hot 2 MiB region, rate limited.  It never has two
          requests on overlapping bytes in flight, so requests on the same
          bytes are ordered (one completed before the next was sent).  Its
          log (--log) has a line when a request is sent ("S id kind off len
          flags t") and one when its reply has arrived ("C id t errno"),
          CLOCK_MONOTONIC taken before the send / after the reply.  The
          data of write `id` is random.Random(seed * 1000003 + id)
          .randbytes(len).  Commands on stdin: pause (drain, answer
          "paused"), resume, stop (drain, flush, answer "stopped").
  run     the orchestrator: QMP, the backup chain and every check.

The chain (b0 added before the writer starts; G = 64 KiB granules):

  cut 1  full backup.   rotation b0 -> b1 with the fleece, writer running;
         default nbdcopy of the fleece -> backup1; b0 removed.
  cut 2  incremental.   rotation b1 -> b2, writer running; the dirty
         extents of b1 pulled into a copy of backup1 -> backup2.
  cut 3  incremental.   rotation b2 -> b3, writer paused around the
         transaction (quiesced); b2 -> backup3.
  cut 4  failed.        rotation b3 -> b4, writer running; a few extents
         read, then the fleece is torn down; merging b3 while it is still
         exported is refused; then b3 is merged into b4 and removed.
  cut 5  incremental after the failure, quiesced: rotation b4 -> b5; b4
         (changes of both periods) pulled into a copy of backup3 (the
         last good one) -> backup5.
  end    writer stopped; live export == image file == model; b5 exactly
         the writes after cut 5; backup5 == the image at cut 5.

Every fleece: right after the export appears, the whole fleece is read
(R); after the pull the backup must equal R, and a second full read must
equal R again.  The bytes pulled must equal the frozen bitmap's count.

The image at a cut.  A quiesced cut is exact: the writer has drained, its
last replies have arrived, the client flushes, and a copy of the image
file taken then is the image at the cut (the transaction runs before the
writer resumes).  That copy must also equal the model (the initial image
plus every logged write, in order), which checks the log machinery.
With the writer running, the transaction is sent at Ts and returns at Tr;
it drains I/O, so every write is wholly before or wholly after the cut:

  * a write whose reply arrived before Ts is in the image at the cut,
  * a write sent after Tr is not,
  * the others (in flight across the transaction, "ambiguous") are
    decided from the fleece content: on the bytes no other ambiguous write
    touches, the fleece must hold either the write's data (in) or the
    data before it (out); anything else is a torn or foreign write.
    Ambiguous writes that overlap each other, or whose data equals what
    was there, are resolved by trying every assignment.
  * the set of writes "in" must be a point in time: if write X's reply
    arrived before write Y was sent and Y is in, X is in.
  * the image of that set (model) must equal the whole fleece, byte for
    byte, and the frozen bitmap must hold exactly the granules of the
    writes in this cut and not in the previous good one (writes that
    cannot be decided widen the allowed set only by their own granules).

So each running cut is checked exactly too: a fleece taken at any other
instant, a non-atomic rotation or a torn write fails.  FLEECE_INCREMENTAL
_OPS (writes per period, default 400), FLEECE_INCREMENTAL_RATE (writer
ops/s, default 200) and FLEECE_INCREMENTAL_SEED scale / reproduce it.
"""

import argparse
import errno
import faulthandler
import itertools
import json
import os
import random
import select
import shutil
import socket
import subprocess
import sys
import time
import traceback

import nbd

KiB, MiB = 1 << 10, 1 << 20
G = 64 * KiB                  # bitmap granularity, copy-before-write cluster
BASE = nbd.CONTEXT_BASE_ALLOCATION
DB = "qemu:dirty-bitmap:"
IO_TIMEOUT = 30
HOT = (20 * MiB, 22 * MiB)

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


def soft_check(cond, msg):
    if not cond:
        soft_fail(msg)
    return bool(cond)


def note(msg):
    print(f"  note: {msg}", flush=True)


def path(name):
    return os.path.join(args.dir, name)


def wdata(seed, wid, n):
    return random.Random(seed * 1000003 + wid).randbytes(n)


def first_diff(got, want, base=0):
    n = min(len(got), len(want))
    if got[:n] == want[:n]:
        return f"lengths {len(got)} vs {len(want)}"
    lo, hi = 0, n
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if got[lo:mid] != want[lo:mid]:
            hi = mid
        else:
            lo = mid
    j = lo
    while j < n and got[j] != want[j]:
        j += 1
    return (f"first difference at {base + lo} (run of {j - lo} bytes): got "
            f"{bytes(got[lo:lo + 8]).hex()}, want {bytes(want[lo:lo + 8]).hex()}")


# ------------------------------------------------------------------ writer

def writer_main():
    size, seed = args.size, args.seed
    rng = random.Random(seed)
    h = nbd.NBD()
    h.set_export_name("disk0")
    h.connect_unix(args.cl_sock)
    if h.get_size() != size:
        print(f"writer: size {h.get_size()}", file=sys.stderr)
        return 1
    log = open(args.log, "w")
    qd, rate = 8, float(args.rate)
    tokens, last = float(qd), time.monotonic()
    inflight = {}               # id -> (a, b, buf, t)
    done = []
    next_id = 0
    paused = stopping = pause_pending = burst_pending = False
    burst_until = 0.0
    lifetime = time.monotonic() + 900
    stdin = sys.stdin.buffer.raw
    inbuf = b""

    def reply(msg):
        sys.stdout.write(msg + "\n")
        sys.stdout.flush()

    def completion(wid):
        def cb(err):
            done.append((wid, time.monotonic(), err.value))
            return 1
        return cb

    while True:
        now = time.monotonic()
        if now > lifetime:
            print("writer: lifetime exceeded", file=sys.stderr)
            return 1
        tokens = min(float(qd), tokens + (now - last) * rate)
        if now < burst_until:
            tokens = float(qd)          # no rate limit: keep the queue full
        last = now
        while not (paused or stopping) and len(inflight) < qd and tokens >= 1:
            for _ in range(10):
                a, n, kind, flags = pick(rng, size)
                b = a + n
                if not any(x < b and a < y for x, y, _, _ in inflight.values()):
                    break
            else:
                break
            wid = next_id
            next_id += 1
            buf = None
            if kind == "w":
                buf = nbd.Buffer.from_bytearray(bytearray(wdata(seed, wid, n)))
            t = time.monotonic()
            log.write(f"S {wid} {kind} {a} {n} {flags} {t:.9f}\n")
            log.flush()
            if kind == "w":
                h.aio_pwrite(buf, a, completion(wid), flags)
            else:
                h.aio_zero(n, a, completion(wid), flags)
            inflight[wid] = (a, b, buf, t)
            tokens -= 1
        if burst_pending and (len(inflight) == qd or paused or stopping):
            burst_pending = False
            reply(f"bursting {len(inflight)}")
        if (paused or stopping) and not inflight:
            if stopping:
                h.flush()
                h.shutdown()
                log.close()
                reply(f"stopped {next_id}")
                return 0
            if pause_pending:
                pause_pending = False
                reply(f"paused {next_id}")
        for wid, t in list((w, v[3]) for w, v in inflight.items()):
            if time.monotonic() - t > IO_TIMEOUT:
                print(f"writer: request {wid} got no reply in {IO_TIMEOUT} s",
                      file=sys.stderr)
                return 1
        # wait for the socket, stdin or the next token
        rl, wl = [stdin], []
        fd, d = h.aio_get_fd(), h.aio_get_direction()
        if d & nbd.AIO_DIRECTION_READ:
            rl.append(fd)
        if d & nbd.AIO_DIRECTION_WRITE:
            wl.append(fd)
        timeout = 0.2
        if not (paused or stopping) and len(inflight) < qd:
            timeout = max(0.0, min(timeout, (1 - tokens) / rate))
        r, w, _ = select.select(rl, wl, [], timeout)
        if fd in r:
            h.aio_notify_read()
        if fd in w:
            h.aio_notify_write()
        for wid, t, err in done:
            log.write(f"C {wid} {t:.9f} {err}\n")
            del inflight[wid]
        if done:
            log.flush()
            done.clear()
        if stdin in r:
            data = os.read(stdin.fileno(), 4096)
            if not data:
                stopping = True           # the orchestrator went away
            inbuf += data
            while b"\n" in inbuf:
                line, inbuf = inbuf.split(b"\n", 1)
                c = line.decode().strip()
                if c == "pause":
                    paused = pause_pending = True
                elif c == "resume":
                    paused = False
                    tokens, last = float(qd), time.monotonic()
                    reply("resumed")
                elif c == "burst":
                    burst_until = time.monotonic() + 0.3
                    burst_pending = True
                elif c == "stop":
                    stopping = True


def pick(rng, size):
    r = rng.random()
    if r < 0.15:
        n = rng.randint(1, 600)
    elif r < 0.55:
        n = rng.randint(1, G)
    elif r < 0.9:
        n = rng.randint(G, 3 * G)
    else:
        n = G * rng.randint(1, 3)
    n = min(n, size)
    r = rng.random()
    if r < 0.45:
        a = rng.randrange(HOT[0], HOT[1])
    elif r < 0.35:
        a = size - n
    else:
        a = rng.randrange(0, size - n + 1)
    if rng.random() < 0.15:
        a = a // G * G
    a = min(a, size - 1)
    n = min(n, size - a)
    if rng.random() < 0.7:
        kind = "w"
        flags = nbd.CMD_FLAG_FUA if rng.random() < 0.15 else 0
    else:
        kind = "z"
        flags = nbd.CMD_FLAG_NO_HOLE if rng.random() < 0.5 else 0
        if rng.random() < 0.15:
            flags |= nbd.CMD_FLAG_FUA
    return a, n, kind, flags


class Writer:
    """The writer process and its log, as seen by the orchestrator."""

    def __init__(self):
        self.log_path = path("writer.log")
        open(self.log_path, "w").close()
        self.p = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "writer",
             "--cl-sock", args.cl_sock, "--size", str(args.size),
             "--seed", str(args.seed), "--log", self.log_path,
             "--rate", str(args.rate)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.f = open(self.log_path)
        self.partial = ""
        self.w = {}              # id -> dict
        self.order = []          # ids in submission order

    def _ask(self, cmd, want, timeout=IO_TIMEOUT):
        self.p.stdin.write(cmd.encode() + b"\n")
        self.p.stdin.flush()
        r, _, _ = select.select([self.p.stdout], [], [], timeout)
        check(r, f"writer did not answer {cmd!r} within {timeout} s")
        line = self.p.stdout.readline().decode().strip()
        check(line.startswith(want), f"writer answered {line!r} to {cmd!r}")
        return line

    def pause(self):
        return self._ask("pause", "paused")

    def resume(self):
        self._ask("resume", "resumed")

    def burst(self):
        """Lift the rate limit for 0.3 s; answers once 8 writes are in
        flight (so that the next command finds a full queue)."""
        self._ask("burst", "bursting")

    def stop(self):
        line = self._ask("stop", "stopped")
        self.p.wait(IO_TIMEOUT)
        check(self.p.returncode == 0, f"writer exited with {self.p.returncode}")
        return line

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(10)

    def alive(self):
        return self.p.poll() is None

    def update(self):
        data = self.f.read()
        if not data:
            return
        data = self.partial + data
        lines = data.split("\n")
        self.partial = lines.pop()
        for line in lines:
            p = line.split()
            if p[0] == "S":
                wid = int(p[1])
                self.w[wid] = {"id": wid, "kind": p[2], "a": int(p[3]),
                               "n": int(p[4]), "b": int(p[3]) + int(p[4]),
                               "flags": int(p[5]), "ts": float(p[6]),
                               "tc": None, "err": None}
                self.order.append(wid)
            elif p[0] == "C":
                w = self.w[int(p[1])]
                w["tc"], w["err"] = float(p[2]), int(p[3])
                if w["err"]:
                    soft_fail(f"writer: {w['kind']} [{w['a']}, {w['b']}) failed: "
                              f"{errno.errorcode.get(w['err'], w['err'])}")

    def count(self):
        self.update()
        return len(self.order)

    def wait_count(self, n, timeout):
        deadline = time.monotonic() + timeout
        while self.count() < n:
            check(self.alive(), "writer died")
            if time.monotonic() > deadline:
                note(f"writer reached {self.count()} of {n} writes in {timeout} s")
                return
            time.sleep(0.02)

    def wait_replies(self, t, timeout=IO_TIMEOUT):
        """Until every write sent at or before t has its reply logged."""
        deadline = time.monotonic() + timeout
        while True:
            self.update()
            open_ = [wid for wid in self.order
                     if self.w[wid]["ts"] <= t and self.w[wid]["tc"] is None]
            if not open_:
                return
            check(time.monotonic() < deadline,
                  f"writes {open_[:5]} got no reply within {timeout} s")
            time.sleep(0.01)

    def data(self, w):
        if w["kind"] == "z":
            return bytes(w["n"])
        return wdata(args.seed, w["id"], w["n"])


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

    def timed(self, execute, arguments):
        """Returns (response, time sent, time the response arrived)."""
        ts = time.monotonic()
        r = self.cmd(execute, arguments)
        return r, ts, time.monotonic()

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


# ------------------------------------------------------------------ NBD

def connect(sock, export, contexts=()):
    h = nbd.NBD()
    for c in contexts:
        h.add_meta_context(c)
    h.set_export_name(export)
    h.connect_unix(sock)
    return h


def walk(h, context, size):
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


def chunk_size(h):
    return min(4 * MiB, max(64 * KiB, h.get_block_size(nbd.SIZE_MAXIMUM) or MiB))


def read_all(h, size):
    c = chunk_size(h)
    out = bytearray()
    for off in range(0, size, c):
        out += h.pread(min(c, size - off), off)
    return bytes(out)


def file_bytes(p):
    with open(p, "rb") as f:
        return f.read()


# ------------------------------------------------------------------ fleece

class Fleece:
    """A flavour-B fleece with bitmap rotation frozen -> new."""

    def __init__(self, q, frozen, new, before):
        self.q = q
        self.frozen = frozen
        scratch = path("fleece-tmp.img")
        with open(scratch, "wb") as f:
            f.truncate(args.size)
        q.ok_empty("blockdev-add", {"driver": "file", "node-name": "fl-tmp",
                                    "filename": scratch})
        before()          # pause the writer, or fill its queue
        r, self.ts, self.tr = q.timed("transaction", {"actions": [
            {"type": "block-dirty-bitmap-add",
             "data": {"node": "disk0", "name": new, "granularity": G}},
            {"type": "block-dirty-bitmap-disable",
             "data": {"node": "disk0", "name": frozen}},
            {"type": "blockdev-backup",
             "data": {"job-id": "fleece-job", "device": "disk0",
                      "target": "fl-tmp", "sync": "none",
                      "filter-node-name": "fl-cbw"}}]})
        check(r == {"return": {}}, f"rotation {frozen} -> {new} transaction: {r}")
        print(f"  transaction {frozen} -> {new} took "
              f"{(self.tr - self.ts) * 1000:.1f} ms", flush=True)
        q.ok_empty("blockdev-add", {"driver": "snapshot-access",
                                    "node-name": "fl-access", "file": "fl-cbw"})
        q.ok_empty("block-export-add", {
            "type": "nbd", "id": "fleece", "node-name": "fl-access",
            "name": "fleece", "writable": False,
            "bitmaps": [{"node": "disk0", "name": frozen}]})
        bm = q.bitmaps()
        soft_check(bm.get(frozen, {}).get("recording") is False and
                   bm.get(frozen, {}).get("busy") is True and
                   bm.get(new, {}).get("recording") is True,
                   f"after the rotation {frozen} -> {new}: {bm}")
        self.count = bm.get(frozen, {}).get("count")

    def handle(self, contexts=()):
        h = connect(args.sock, "fleece", contexts)
        check(h.is_read_only() and h.get_size() == args.size,
              f"fleece: read-only {h.is_read_only()}, size {h.get_size()}")
        return h

    def teardown(self):
        q = self.q
        deadline = time.monotonic() + 5
        while True:
            r = q.cmd("block-export-del", {"id": "fleece"})
            if r == {"return": {}} or time.monotonic() > deadline:
                break
            time.sleep(0.1)        # a disconnect may be noticed late
        check(r == {"return": {}}, f"block-export-del fleece: {r}")
        q.wait_event("BLOCK_EXPORT_DELETED", lambda d: d.get("id") == "fleece")
        q.ok_empty("blockdev-del", {"node-name": "fl-access"})
        q.ok_empty("block-job-cancel", {"device": "fleece-job"})
        q.wait_event("BLOCK_JOB_CANCELLED",
                     lambda d: d.get("device") == "fleece-job")
        q.ok_empty("blockdev-del", {"node-name": "fl-tmp"})
        soft_eq(q.ok("query-block-jobs"), [], "query-block-jobs after teardown")
        nodes = sorted(q.nodes())
        soft_eq(nodes, ["disk0", "disk0-file"], "nodes after teardown")


# ------------------------------------------------------------------ the model

class Chain:
    """The image model at the last analysed cut: img = image of the set of
    writes `applied` (downward closed); status[cut][id] = True (in the
    image at that cut), False (not), None (undecidable)."""

    def __init__(self, writer, initial):
        self.wr = writer
        self.img = bytearray(initial)
        self.applied = set()
        self.status = {0: {}}         # cut 0: before the writer started

    def apply(self, ws):
        for w in sorted(ws, key=lambda w: w["ts"]):
            self.img[w["a"]:w["b"]] = self.wr.data(w)
            self.applied.add(w["id"])

    def st(self, cut, wid):
        return self.status[cut].get(wid, False)

    def analyse(self, cut, ts, tr, fleece):
        """Decide the image at a cut whose transaction was sent at ts and
        returned at tr, given the whole fleece (bytes).  Soft-fails on
        every inconsistency; returns the number of ambiguous writes."""
        wr = self.wr
        wr.wait_replies(tr)
        st = {}
        new_in, amb = [], []
        for wid in wr.order:
            w = wr.w[wid]
            if wid in self.applied:
                st[wid] = True
            elif w["ts"] > tr:
                continue
            elif w["tc"] < ts:
                new_in.append(w)
                st[wid] = True
            else:
                amb.append(w)
        self.apply(new_in)
        base = self.img                      # the image without amb
        amb.sort(key=lambda w: w["ts"])
        data = {w["id"]: wr.data(w) for w in amb}
        # evidence from the bytes no other ambiguous write touches
        poss = {}
        for w in amb:
            others = [(x["a"], x["b"]) for x in amb
                      if x is not w and x["a"] < w["b"] and w["a"] < x["b"]]
            can_in = can_out = True
            for s, e in exclusive(w["a"], w["b"], others):
                f = fleece[s:e]
                d = data[w["id"]][s - w["a"]:e - w["a"]]
                can_in &= f == d
                can_out &= f == base[s:e]
            if not (can_in or can_out):
                soft_fail(f"cut {cut}: the fleece holds neither the data before "
                          f"nor the data of write {w['id']} ({w['kind']} "
                          f"[{w['a']}, {w['b']})) on its own bytes: a torn write "
                          f"or a foreign one")
            poss[w["id"]] = (can_in, can_out)
        fixed = {wid: p[0] for wid, p in poss.items() if p[0] != p[1]}
        free = [w for w in amb if poss[w["id"]] == (True, True)]
        overlapping = [w for w in free
                       if any(x is not w and x["a"] < w["b"] and w["a"] < x["b"]
                              for x in amb)]
        check(len(overlapping) <= 14,
              f"cut {cut}: {len(overlapping)} undecidable overlapping writes")
        comps = components(amb)
        valid = []
        for bits in itertools.product((True, False), repeat=len(overlapping)):
            trial = dict(fixed)
            trial.update({w["id"]: b for w, b in zip(overlapping, bits)})
            if closure_violation(amb, trial):
                continue
            if all(self._component_ok(c, trial, base, fleece, data)
                   for c in comps if len(c) > 1):
                valid.append(trial)
        if not valid:
            v = closure_violation(amb, fixed)
            if v:
                x, y = v
                soft_fail(f"cut {cut} is not a point in time: write {y['id']} "
                          f"([{y['a']}, {y['b']}), sent {y['ts'] - ts:+.6f} s "
                          f"after the transaction was sent) is in the fleece, "
                          f"but write {x['id']} ([{x['a']}, {x['b']}), answered "
                          f"{x['tc'] - ts:+.6f} s) is not")
            else:
                soft_fail(f"cut {cut}: no assignment of the {len(amb)} writes in "
                          f"flight during the transaction explains the fleece")
            valid = [dict(fixed)]
        chosen = dict(valid[0])
        for w in amb:
            if w["id"] in chosen:
                vals = {v.get(w["id"]) for v in valid}
                st[w["id"]] = vals.pop() if len(vals) == 1 else None
        # isolated writes whose data equals what was there: the content
        # does not tell; only the order can force them in or out
        for w in free:
            if w["id"] in chosen:
                continue
            forced_in = any(chosen.get(y["id"]) is True and w["tc"] < y["ts"]
                            for y in amb)
            forced_out = any(chosen.get(x["id"]) is False and x["tc"] < w["ts"]
                             for x in amb)
            st[w["id"]] = True if forced_in else False if forced_out else None
            if forced_in:
                chosen[w["id"]] = True
        for w in amb:
            st.setdefault(w["id"], None)      # torn: reported above
        ins = [w for w in amb if chosen.get(w["id"]) is True]
        self.apply(ins)
        self.status[cut] = st
        if bytes(self.img) != fleece:
            soft_fail(f"cut {cut}: the fleece is not the image at the cut: "
                      f"{self.explain(fleece, ts)}")
        n_in = sum(1 for w in amb if st[w["id"]] is True)
        n_un = sum(1 for w in amb if st[w["id"]] is None)
        print(f"  cut {cut}: {len(new_in)} writes before, {len(amb)} in flight "
              f"during the transaction ({n_in} in the fleece, {n_un} "
              f"undecidable, the rest after)", flush=True)
        return len(amb)

    def explain(self, got, t0):
        """First difference between got and the model, with the writes
        that touched that byte (times relative to t0)."""
        msg = first_diff(got, self.img)
        lo, hi = 0, len(got)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if got[lo:mid] != self.img[lo:mid]:
                hi = mid
            else:
                lo = mid
        ws = [self.wr.w[i] for i in self.wr.order
              if self.wr.w[i]["a"] <= lo < self.wr.w[i]["b"]][-4:]
        for w in ws:
            where = "in" if w["id"] in self.applied else "not in"
            msg += (f"\n        write {w['id']} {w['kind']} [{w['a']}, {w['b']}) "
                    f"sent {w['ts'] - t0:+.6f} s, answered "
                    f"{(w['tc'] or 0) - t0:+.6f} s, {where} the model")
        return msg

    def granule_writes(self, granules, t0):
        """The last writes on these granules, for messages (times relative
        to t0, the transaction of the cut being checked)."""
        msg = ""
        for g in granules:
            ws = [self.wr.w[i] for i in self.wr.order
                  if self.wr.w[i]["a"] < (g + 1) * G and g * G < self.wr.w[i]["b"]]
            for w in ws[-3:]:
                cuts = {c: self.status[c].get(w["id"], False)
                        for c in sorted(self.status)}
                msg += (f"\n        granule {g}: write {w['id']} {w['kind']} "
                        f"[{w['a']}, {w['b']}) sent {w['ts'] - t0:+.6f} s, "
                        f"answered {(w['tc'] or 0) - t0:+.6f} s, in the image "
                        f"at cut {cuts}")
        return msg

    def _component_ok(self, comp, trial, base, fleece, data):
        lo = min(w["a"] for w in comp)
        hi = max(w["b"] for w in comp)
        img = bytearray(base[lo:hi])
        for w in comp:                      # comp is in ts order
            if trial.get(w["id"]):
                img[w["a"] - lo:w["b"] - lo] = data[w["id"]]
        return bytes(img) == fleece[lo:hi]

    def quiesced(self, cut, t):
        """The writer was drained (paused or stopped) before time t and
        sent nothing until after the cut: the writes sent before t are the
        image at the cut."""
        wr = self.wr
        wr.update()
        st, new = {}, []
        for wid in wr.order:
            w = wr.w[wid]
            if w["ts"] > t:
                continue
            check(w["tc"] is not None and w["tc"] < t,
                  f"write {wid} was in flight although the writer was drained")
            st[wid] = True
            if wid not in self.applied:
                new.append(w)
        self.apply(new)
        self.status[cut] = st

    def expected_bitmap(self, good, cut):
        """(must, may) granule sets of a bitmap frozen at `cut` that started
        recording at `good`."""
        must, may = set(), set()
        for wid in self.wr.order:
            a, b = self.st(cut, wid), self.st(good, wid)
            w = self.wr.w[wid]
            g = range(w["a"] // G, (w["b"] - 1) // G + 1)
            if a is True and b is False:
                must.update(g)
            if a is not False and b is not True:
                may.update(g)
        return must, may


def exclusive(a, b, others):
    """[a, b) minus the union of others, as a list of ranges."""
    out, pos = [], a
    for s, e in sorted(others):
        if s > pos:
            out.append((pos, min(s, b)))
        pos = max(pos, e)
        if pos >= b:
            break
    if pos < b:
        out.append((pos, b))
    return [(s, e) for s, e in out if s < e]


def components(ws):
    """Groups of writes connected by overlapping bytes (each in ts order)."""
    parent = list(range(len(ws)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i
    for i, x in enumerate(ws):
        for j in range(i):
            y = ws[j]
            if x["a"] < y["b"] and y["a"] < x["b"]:
                parent[find(i)] = find(j)
    groups = {}
    for i, w in enumerate(ws):
        groups.setdefault(find(i), []).append(w)
    return list(groups.values())


def closure_violation(ws, status):
    """A pair (x, y): x answered before y was sent, y in, x out."""
    for y in ws:
        if status.get(y["id"]) is not True:
            continue
        for x in ws:
            if status.get(x["id"]) is False and x["tc"] < y["ts"]:
                return x, y
    return None


def bitmap_granules(h, name):
    runs = walk(h, DB + name, args.size)
    dirty, pulled = set(), []
    for s, e, f in runs:
        if f & 1:
            soft_check(s % G == 0 and (e % G == 0 or e == args.size),
                       f"{name}: dirty extent [{s}, {e}) not granule aligned")
            dirty.update(range(s // G, (e - 1) // G + 1))
            pulled.append((s, e))
    return dirty, pulled


def check_bitmap(chain, name, dirty, good, cut, t0):
    must, may = chain.expected_bitmap(good, cut)
    missing = sorted(must - dirty)
    extra = sorted(dirty - may)
    soft_check(not missing, f"{name} lacks {len(missing)} granules written "
               f"between cut {good} and cut {cut}: {missing[:10]}"
               f"{chain.granule_writes(missing[:3], t0)}")
    soft_check(not extra, f"{name} has {len(extra)} granules that no write "
               f"between cut {good} and cut {cut} touched: {extra[:10]}"
               f"{chain.granule_writes(extra[:3], t0)}")
    print(f"  {name}: {len(dirty)} dirty granules (expected {len(must)}"
          f"{'' if must == may else f' .. {len(may)}'})", flush=True)


def pull(fl, name, prev, out):
    """Incremental pull of the dirty extents of `name` into a copy of
    `prev`; returns (bytes pulled, dirty granules)."""
    h = fl.handle([DB + name])
    check(h.can_meta_context(DB + name), f"{DB + name} not negotiated")
    dirty, extents = bitmap_granules(h, name)
    shutil.copyfile(prev, out)
    c = chunk_size(h)
    pulled = 0
    with open(out, "r+b") as f:
        for s, e in extents:
            for off in range(s, e, c):
                n = min(c, e - off)
                f.seek(off)
                f.write(h.pread(n, off))
                pulled += n
    h.shutdown()
    soft_eq(pulled, fl.count, f"bytes pulled for {name} vs its count")
    return pulled, dirty


# ------------------------------------------------------------------ run

def phase_run():
    global current
    size = args.size
    q = Qmp(args.qmp)
    q.ok_empty("nbd-server-start",
               {"addr": {"type": "unix", "data": {"path": args.sock}}})
    q.ok_empty("block-dirty-bitmap-add",
               {"node": "disk0", "name": "b0", "granularity": G})
    live = connect(args.cl_sock, "disk0")
    initial = read_all(live, size)
    check(initial == file_bytes(args.image), "disk0 is not the image file")
    wr = Writer()
    chain = Chain(wr, initial)
    per = args.ops
    print(f"  FLEECE_INCREMENTAL_SEED={args.seed} FLEECE_INCREMENTAL_OPS={per} "
          f"FLEECE_INCREMENTAL_RATE={args.rate}", flush=True)
    wait_s = max(60, 4 * per / args.rate)
    try:
        run_chain(q, wr, chain, live, per, wait_s)
    finally:
        wr.kill()
    live.shutdown()
    q.sock.close()


def step(name):
    global current
    current = name
    print(f"{name} ...", flush=True)


def run_chain(q, wr, chain, live, per, wait_s):
    size = args.size

    def quiesce_and_copy(cut):
        def fn():
            wr.pause()
            live.flush()
            shutil.copyfile(args.image, path(f"cut{cut}.img"))
        return fn

    # ---- cut 1: full backup, writer running
    step("cut1-full")
    wr.wait_count(per, wait_s)
    fl = Fleece(q, "b0", "b1", wr.burst)
    h = fl.handle([DB + "b0"])
    first = read_all(h, size)
    chain.analyse(1, fl.ts, fl.tr, first)
    dirty, _ = bitmap_granules(h, "b0")
    check_bitmap(chain, "b0", dirty, 0, 1, fl.ts)
    soft_eq(fl.count, sum(min(G, size - g * G) for g in dirty),
            "b0 count vs its map")
    r = subprocess.run(["nbdcopy", f"nbd+unix:///fleece?socket={args.sock}",
                        path("backup1.img")], timeout=120,
                       capture_output=True, text=True)
    check(r.returncode == 0, f"nbdcopy failed: {r.stderr}")
    b1 = file_bytes(path("backup1.img"))
    if b1 != first:
        soft_fail(f"nbdcopy of the fleece differs from the full read: "
                  f"{first_diff(b1, first)}")
    again = read_all(h, size)
    if again != first:
        soft_fail(f"second full read of the fleece differs: {first_diff(again, first)}")
    h.shutdown()
    fl.teardown()
    q.ok_empty("block-dirty-bitmap-remove", {"node": "disk0", "name": "b0"})
    last_good, good_cut = path("backup1.img"), 1

    # ---- cuts 2, 3: incrementals (3 quiesced)
    for cut, frozen, new, quiet in ((2, "b1", "b2", False), (3, "b2", "b3", True)):
        step(f"cut{cut}-incremental{' (quiesced)' if quiet else ''}")
        wr.wait_count(wr.count() + per, wait_s)
        fl = Fleece(q, frozen, new, quiesce_and_copy(cut) if quiet else wr.burst)
        if quiet:
            wr.resume()
        out = path(f"backup{cut}.img")
        incremental(q, wr, chain, fl, frozen, cut, good_cut, last_good, out, quiet)
        fl.teardown()
        q.ok_empty("block-dirty-bitmap-remove", {"node": "disk0", "name": frozen})
        last_good, good_cut = out, cut

    # ---- cut 4: a failed backup, then the frozen bitmap is merged back
    step("cut4-failed")
    wr.wait_count(wr.count() + per, wait_s)
    fl = Fleece(q, "b3", "b4", wr.burst)
    h = fl.handle([DB + "b3"])
    _, extents = bitmap_granules(h, "b3")
    for s, e in extents[:3]:
        h.pread(min(e - s, MiB), s)               # a partial pull ...
    r = q.cmd("block-dirty-bitmap-merge",
              {"node": "disk0", "target": "b4", "bitmaps": ["b3"]})
    soft_check(r.get("error", {}).get("class") == "GenericError",
               f"merging the exported (busy) b3: {r}, want GenericError")
    h.shutdown()                                  # ... that fails
    fl.teardown()
    before = q.bitmaps()
    q.ok_empty("block-dirty-bitmap-merge",
               {"node": "disk0", "target": "b4", "bitmaps": ["b3"]})
    q.ok_empty("block-dirty-bitmap-remove", {"node": "disk0", "name": "b3"})
    after = q.bitmaps()
    soft_eq(sorted(after), ["b4"], "bitmaps after merge + remove")
    soft_check(after.get("b4", {}).get("recording") is True and
               after["b4"]["count"] >= before["b3"]["count"],
               f"b4 after the merge: {after.get('b4')}, b3 was {before.get('b3')}")

    # ---- cut 5: incremental after the failure (quiesced), from backup3
    step("cut5-after-failure (quiesced)")
    wr.wait_count(wr.count() + per, wait_s)
    fl = Fleece(q, "b4", "b5", quiesce_and_copy(5))
    wr.resume()
    out = path("backup5.img")
    incremental(q, wr, chain, fl, "b4", 5, good_cut, last_good, out, True)
    fl.teardown()
    q.ok_empty("block-dirty-bitmap-remove", {"node": "disk0", "name": "b4"})

    # ---- the end: stop the writer; live == file == model; b5
    step("end")
    wr.wait_count(wr.count() + per // 4, wait_s)
    print(f"  writer: {wr.stop()} writes", flush=True)
    chain.quiesced(6, time.monotonic())
    live.flush()
    got = read_all(live, size)
    img = file_bytes(args.image)
    if got != img:
        soft_fail(f"live export differs from the image file: {first_diff(got, img)}")
    if got != bytes(chain.img):
        soft_fail(f"live export differs from the model: "
                  f"{first_diff(got, bytes(chain.img))}")
    q.ok_empty("block-export-add", {"type": "nbd", "id": "live", "node-name": "disk0",
                                    "name": "live", "writable": True,
                                    "bitmaps": ["b5"]})
    h = connect(args.sock, "live", [DB + "b5"])
    dirty, _ = bitmap_granules(h, "b5")
    h.shutdown()
    check_bitmap(chain, "b5", dirty, 5, 6, time.monotonic())
    soft_eq(q.bitmaps().get("b5", {}).get("count"),
            sum(min(G, size - g * G) for g in dirty), "b5 count vs its map")
    deadline = time.monotonic() + 5
    while True:
        r = q.cmd("block-export-del", {"id": "live"})
        if r == {"return": {}} or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    check(r == {"return": {}}, f"block-export-del live: {r}")
    q.wait_event("BLOCK_EXPORT_DELETED", lambda d: d.get("id") == "live")
    ws = [wr.w[i] for i in wr.order]
    print(f"  writes: {len(ws)} ({sum(w['kind'] == 'w' for w in ws)} write, "
          f"{sum(w['kind'] == 'z' for w in ws)} write_zeroes), "
          f"{sum(w['n'] for w in ws)} bytes", flush=True)


def incremental(q, wr, chain, fl, name, cut, good_cut, prev, out, quiet):
    size = args.size
    h = fl.handle()
    first = read_all(h, size)                    # right after the export
    if quiet:
        chain.quiesced(cut, fl.ts)
        at_cut = file_bytes(path(f"cut{cut}.img"))
        if at_cut != bytes(chain.img):
            soft_fail(f"cut {cut}: the image file copied at the cut is not the "
                      f"model of the logged writes: "
                      f"{first_diff(at_cut, bytes(chain.img))}")
        if first != at_cut:
            soft_fail(f"cut {cut}: the fleece is not the image at the cut "
                      f"(writer quiesced): {first_diff(first, at_cut)}")
    else:
        chain.analyse(cut, fl.ts, fl.tr, first)
    pulled, dirty = pull(fl, name, prev, out)
    check_bitmap(chain, name, dirty, good_cut, cut, fl.ts)
    result = file_bytes(out)
    if result != first:
        soft_fail(f"backup{cut} (backup{good_cut} + dirty extents of {name}) "
                  f"differs from the full fleece read: {first_diff(result, first)}")
    if result != bytes(chain.img):
        soft_fail(f"backup{cut} is not the image at cut {cut}: "
                  f"{chain.explain(result, fl.ts)}")
    again = read_all(h, size)
    if again != first:
        soft_fail(f"second full read of the fleece differs: {first_diff(again, first)}")
    h.shutdown()
    print(f"  {name}: pulled {pulled} bytes ({pulled * 100 // size}% of the disk) "
          f"into a copy of backup{good_cut}", flush=True)


def run(fn, timeout):
    global current
    current = fn.__name__
    print(f"{current} ...", flush=True)
    faulthandler.dump_traceback_later(timeout, exit=True)
    try:
        fn()
    except CheckFailed as e:
        failures.append(f"{current}: {e}")
        print(f"  FAIL {e}", flush=True)
    except Exception as e:  # noqa: BLE001 - report everything
        failures.append(f"{current}: {type(e).__name__}: {e}")
        print(f"  FAIL {type(e).__name__}: {e}", flush=True)
        traceback.print_exc(limit=6)
    finally:
        faulthandler.cancel_dump_traceback_later()


def main():
    global args
    p = argparse.ArgumentParser()
    p.add_argument("phase", choices=["run", "writer"])
    p.add_argument("--qmp")
    p.add_argument("--sock", help="nbd-server-start socket")
    p.add_argument("--cl-sock", required=True, help="--listen socket (disk0)")
    p.add_argument("--dir")
    p.add_argument("--image", help="the image file of disk0")
    p.add_argument("--size", required=True, type=int)
    p.add_argument("--seed", type=int,
                   default=int(os.environ.get("FLEECE_INCREMENTAL_SEED",
                                              random.randrange(1 << 30))))
    p.add_argument("--ops", type=int,
                   default=int(os.environ.get("FLEECE_INCREMENTAL_OPS", "400")))
    p.add_argument("--rate", type=float,
                   default=float(os.environ.get("FLEECE_INCREMENTAL_RATE", "200")))
    p.add_argument("--log", help="writer: log file")
    args = p.parse_args()
    if args.phase == "writer":
        return writer_main()
    if not (args.qmp and args.sock and args.dir and args.image):
        p.error("run needs --qmp, --sock, --dir and --image")
    run(phase_run, 260)          # dump tracebacks before the shell's bound
    if failures:
        print(f"\n{len(failures)} failure(s):", file=sys.stderr)
        for f in failures:
            print(f"  {f}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

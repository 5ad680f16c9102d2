#!/usr/bin/python3
"""QMP and NBD client steps for bench/bitmaps.sh (see bench/README.md).

Every subcommand is bounded (socket timeouts, deadlines) and exits non-zero
on any error, printing the reason on stderr.  The same code drives fleeced
and qemu-storage-daemon: both get the same QMP commands.

  setup     --qmp Q --image IMG --nbd S [--bitmaps N] [--granularity G] [--persistent]
            qmp_capabilities; blockdev-add file "disk0-file" + raw "disk0";
            nbd-server-start on unix socket S; block-export-add "disk0"
            (writable); N bitmaps b0..b{N-1} on disk0 (recording).
  freeze    --qmp Q --bitmap B --export E
            block-dirty-bitmap-disable B; block-export-add E (read-only,
            node disk0, "bitmaps": [B]).
  dirty     --uri URI --size S --granularity G --count N --seed X [--window W]
            N 4 KiB writes, each inside its own granule; the granules are
            distinct and never adjacent (even granule indices only), so they
            make exactly N dirty extents.  Up to W writes in flight
            (aio_pwrite).  Prints elapsed seconds.
  walk      --uri URI --context C --size S --granularity G --count N --seed X
            [--walks K]
            One verification walk (every dirty extent must be exactly one of
            the granules 'dirty' wrote, and all of them must be there), then
            K timed full walks of block status over the whole disk.  Prints
            JSON: {"walk_ms": [...], "extents": n, "callback_ms": [...],
            "requests": r, "replies": chunks}.
  touch     --uri URI --size S --granularity G --count N --seed X [--window W]
            [--seconds T]
            First-touch writes: up to N 4 KiB writes, each at the start of a
            different granule (random order, no granule twice), W in flight;
            no new write is issued after T seconds.  Prints "IOPS IOS".
"""
import argparse
import itertools
import json
import random
import socket
import sys
import time

import nbd

QMP_TIMEOUT = 30.0


def die(msg):
    print(f"bitmaps_client: {msg}", file=sys.stderr)
    sys.exit(1)


# ------------------------------------------------------------------ QMP

class Qmp:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(QMP_TIMEOUT)
        self.sock.connect(path)
        self.buf = b""
        greeting = self._read()
        if "QMP" not in greeting:
            die(f"bad QMP greeting {greeting}")
        self.ok("qmp_capabilities")

    def _read(self):
        while True:
            while b"\n" not in self.buf:
                data = self.sock.recv(65536)
                if not data:
                    die("QMP socket closed by the server")
                self.buf += data
            line, self.buf = self.buf.split(b"\n", 1)
            if line.strip():
                return json.loads(line)

    def ok(self, execute, **arguments):
        msg = {"execute": execute}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            r = self._read()
            if "event" in r:
                continue
            if "return" in r:
                return r["return"]
            if "error" in r:
                die(f"QMP {execute} {json.dumps(arguments)}: {r['error']}")
            die(f"unexpected QMP message {r}")

    def close(self):
        self.sock.close()


def cmd_setup(a):
    q = Qmp(a.qmp)
    q.ok("blockdev-add", driver="file", **{"node-name": "disk0-file"}, filename=a.image)
    q.ok("blockdev-add", driver="raw", **{"node-name": "disk0"}, file="disk0-file")
    q.ok("nbd-server-start", addr={"type": "unix", "data": {"path": a.nbd}})
    q.ok("block-export-add", type="nbd", id="disk0", **{"node-name": "disk0"},
         name="disk0", writable=True)
    for i in range(a.bitmaps):
        args = {"node": "disk0", "name": f"b{i}", "granularity": a.granularity}
        if a.persistent:
            args["persistent"] = True
        q.ok("block-dirty-bitmap-add", **args)
    if a.bitmaps:
        nodes = q.ok("query-named-block-nodes", flat=True)
        bms = [b for n in nodes if n.get("node-name") == "disk0"
               for b in n.get("dirty-bitmaps", []) if "name" in b]
        if len(bms) != a.bitmaps or not all(
                b["recording"] and b["granularity"] == a.granularity
                and bool(b.get("persistent")) == a.persistent for b in bms):
            die(f"unexpected bitmaps after setup: {bms}")
    q.close()


def cmd_freeze(a):
    q = Qmp(a.qmp)
    q.ok("block-dirty-bitmap-disable", node="disk0", name=a.bitmap)
    q.ok("block-export-add", type="nbd", id=a.export, **{"node-name": "disk0"},
         name=a.export, writable=False, bitmaps=[a.bitmap])
    q.close()


# ------------------------------------------------------------------ NBD

def granules(a, step):
    """The N granule indices used by dirty/walk (step 2) or touch (step 1)."""
    ngran = a.size // a.granularity
    pool = range(0, ngran, step)
    if a.count > len(pool):
        die(f"--count {a.count} > {len(pool)} usable granules")
    return random.Random(a.seed).sample(pool, a.count)  # random order


def connect(uri, contexts=()):
    h = nbd.NBD()
    for c in contexts:
        h.add_meta_context(c)
    h.connect_uri(uri)
    return h


def aio_writes(h, offsets, window, deadline, stop_after=None):
    """pwrite 4 KiB at every offset, at most `window` in flight.  With
    stop_after (seconds), stop issuing new writes after that long.  Returns
    the number of writes issued (all of them have completed on return)."""
    buf = nbd.Buffer.from_bytearray(bytearray(b"\xa5" * 4096))
    errors = []

    def done(err):
        if err.value:
            errors.append(err.value)
        return 1  # auto-retire

    t0 = time.monotonic()
    t_end = t0 + deadline
    issued = 0
    for off in offsets:
        while h.aio_in_flight() >= window:
            h.poll(1000)
        if errors:
            die(f"write failed: errno {errors[0]}")
        now = time.monotonic()
        if now > t_end:
            die("deadline hit while writing")
        if stop_after is not None and now - t0 >= stop_after:
            break
        h.aio_pwrite(buf, off, completion=done)
        issued += 1
    while h.aio_in_flight() > 0:
        h.poll(1000)
        if time.monotonic() > t_end:
            die("deadline hit while writing")
    if errors:
        die(f"write failed: errno {errors[0]}")
    return issued


def cmd_dirty(a):
    gr = granules(a, 2)
    rng = random.Random(a.seed + 1)
    per = a.granularity // 4096
    offs = [g * a.granularity + rng.randrange(per) * 4096 for g in gr]
    h = connect(a.uri)
    if h.get_size() != a.size:
        die(f"export size {h.get_size()} != {a.size}")
    t0 = time.perf_counter()
    aio_writes(h, offs, a.window, 600)
    h.flush()
    dt = time.perf_counter() - t0
    h.shutdown()
    print(f"{dt:.4f}")


def cmd_touch(a):
    gr = granules(a, 1)
    offs = [g * a.granularity for g in gr]
    h = connect(a.uri)
    if h.get_size() != a.size:
        die(f"export size {h.get_size()} != {a.size}")
    t0 = time.perf_counter()
    n = aio_writes(h, offs, a.window, a.seconds + 120, stop_after=a.seconds)
    dt = time.perf_counter() - t0
    h.shutdown()
    print(f"{n / dt:.2f} {n}")


MAX_REQ = (1 << 32) - (1 << 20)  # block status count per request (< 4 GiB, 1 MiB aligned)


def walk(h, ctx, size, collect):
    """One full walk.  Returns (dirty_runs, dirty_bytes, requests, cb_seconds,
    extents, replies) where extents is [(off, len)] of dirty runs when
    collect, and replies the number of block status chunks received."""
    st = {"pos": 0, "runs": 0, "bytes": 0, "last": 0, "cb": 0.0, "seen": False, "calls": 0}
    out = []

    def cb(metacontext, offset, entries, err):
        t = time.perf_counter()
        if metacontext != ctx:
            return 0
        st["seen"] = True
        st["calls"] += 1
        lens = entries[0::2]
        flags = entries[1::2]
        try:
            fl = bytes(flags)
        except ValueError:  # flag values > 255: keep bit 0 (dirty)
            fl = bytes(f & 1 for f in flags)
        # dirty runs = dirty extents not preceded by a dirty one (the server
        # should merge adjacent ones, but do not rely on it)
        runs = fl.count(1)
        if runs:
            if st["last"] and fl[0]:
                runs -= 1
            if fl.find(b"\x01\x01") != -1:  # slow path, only if unmerged
                runs -= sum(1 for i in range(1, len(fl)) if fl[i] and fl[i - 1])
            st["bytes"] += sum(itertools.compress(lens, fl))
        st["runs"] += runs
        if collect:
            pos = offset
            for ln, f in zip(lens, fl):
                if f:
                    if out and out[-1][0] + out[-1][1] == pos:
                        out[-1] = (out[-1][0], out[-1][1] + ln)
                    else:
                        out.append((pos, ln))
                pos += ln
        if fl:
            st["last"] = fl[-1]
        st["pos"] = offset + sum(lens)
        st["cb"] += time.perf_counter() - t
        return 0

    requests = 0
    while st["pos"] < size:
        before = st["pos"]
        h.block_status(min(size - before, MAX_REQ), before, cb)
        requests += 1
        if not st["seen"]:
            die(f"no {ctx} extents in the reply at offset {before}")
        if st["pos"] <= before:
            die(f"block status made no progress at offset {before}")
        if requests > 10_000_000:
            die("too many block status requests")
    return st["runs"], st["bytes"], requests, st["cb"], out, st["calls"]


def cmd_walk(a):
    gr = sorted(granules(a, 2))
    g = a.granularity
    h = connect(a.uri, [a.context])
    if not h.can_meta_context(a.context):
        die(f"server did not negotiate {a.context}")
    if h.get_size() != a.size:
        die(f"export size {h.get_size()} != {a.size}")
    runs, nbytes, _req, _cb, ext, _calls = walk(h, a.context, a.size, True)
    want = [(x * g, g) for x in gr]
    if ext != want:
        missing = sorted(set(want) - set(ext))[:5]
        extra = sorted(set(ext) - set(want))[:5]
        die(f"dirty extents differ from the {len(want)} written granules: got {len(ext)}; "
            f"first missing {missing}, first unexpected {extra}")
    if runs != len(want) or nbytes != len(want) * g:
        die(f"walk counted {runs} dirty extents / {nbytes} bytes, want {len(want)} / {len(want) * g}")
    walk_ms, cb_ms, reqs = [], [], 0
    for _ in range(a.walks):
        t0 = time.perf_counter()
        runs, nbytes, reqs, cbs, _, calls = walk(h, a.context, a.size, False)
        walk_ms.append((time.perf_counter() - t0) * 1e3)
        cb_ms.append(cbs * 1e3)
        if runs != len(want) or nbytes != len(want) * g:
            die(f"timed walk counted {runs} extents / {nbytes} bytes, want {len(want)}")
    h.shutdown()
    print(json.dumps({"walk_ms": walk_ms, "callback_ms": cb_ms, "extents": runs,
                      "requests": reqs, "replies": calls}))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("setup")
    s.add_argument("--qmp", required=True)
    s.add_argument("--image", required=True)
    s.add_argument("--nbd", required=True)
    s.add_argument("--bitmaps", type=int, default=0)
    s.add_argument("--granularity", type=int, default=65536)
    s.add_argument("--persistent", action="store_true")
    s = sub.add_parser("freeze")
    s.add_argument("--qmp", required=True)
    s.add_argument("--bitmap", required=True)
    s.add_argument("--export", required=True)
    for name in ("dirty", "walk", "touch"):
        s = sub.add_parser(name)
        s.add_argument("--uri", required=True)
        s.add_argument("--size", type=int, required=True)
        s.add_argument("--granularity", type=int, default=65536)
        s.add_argument("--count", type=int, required=True)
        s.add_argument("--seed", type=int, default=1)
        s.add_argument("--window", type=int, default=32)
        if name == "touch":
            s.add_argument("--seconds", type=float, default=5.0)
        if name == "walk":
            s.add_argument("--context", required=True)
            s.add_argument("--walks", type=int, default=7)
    a = p.parse_args()
    try:
        {"setup": cmd_setup, "freeze": cmd_freeze, "dirty": cmd_dirty,
         "walk": cmd_walk, "touch": cmd_touch}[a.cmd](a)
    except (nbd.Error, OSError, ValueError) as e:
        die(f"{a.cmd}: {type(e).__name__}: {e}")


if __name__ == "__main__":
    main()

# SPDX-License-Identifier: MIT
"""QEMU mirrors into fleeced: helper for interop/mirror-target.sh.

Two phases, run by the shell script with both daemons already started:

  mirror   Adds bitmaps pre64/pre4k on fleeced's node disk0, makes
           qemu-storage-daemon (QSD) connect to fleeced's writable export with
           an "nbd" node and blockdev-mirror (sync full) its source node into
           it, waits for BLOCK_JOB_READY, adds bitmap "ready" on fleeced, then
           writes to the source through QSD's own NBD export, completes the
           job, waits for BLOCK_JOB_COMPLETED and tells QSD to quit.  What it
           wrote is saved to a JSON state file.

  verify   (after QSD has exited) Reads fleeced's debug log: every NBD
           request QSD sent, one line each.  Disables the bitmaps, exports
           them read-only on fleeced and reads them with NBD block status,
           then checks:
             * QSD's requests all succeeded; the pre-READY ones cover the
               whole disk (QEMU's full mirror to an NBD target writes zeroes
               too, control-api.md 9.5.5);
             * pre64 / pre4k = exactly the granules covered by QSD's WRITE /
               WRITE_ZEROES requests, and their QMP "count" agrees;
             * ready = exactly the granules covered by requests logged after
               "ready" was added, and
                 granules(post-READY writes) <= ready
                   <= granules(post-READY writes widened to the 64 KiB
                      mirror granularity),
               with equality on the right for copy-mode background (the job
               re-copies whole dirty 64 KiB chunks) and on the left for
               write-blocking (guest writes are forwarded as they are);
           and prints the request mix QEMU used.

Exit 0 on success, 1 on failure.
"""

import argparse
import collections
import faulthandler
import json
import os
import random
import re
import socket
import sys
import time

import nbd

KiB, MiB = 1 << 10, 1 << 20
MIRROR_GRANULARITY = 64 * KiB   # passed to blockdev-mirror (also its default)
FINE = 4 * KiB                  # granularity of pre4k and ready
JOB = "m0"


class Failed(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise Failed(msg)


def log(msg):
    print(f"  {msg}", flush=True)


# ------------------------------------------------------------------ QMP

class QMP:
    """Minimal QMP client: keeps events that arrive while it waits."""

    def __init__(self, path, name, timeout=20):
        self.name = name
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.buf = b""
        self.events = []
        greeting = self._read()
        check("QMP" in greeting, f"{name}: bad QMP greeting {greeting}")
        self.cmd("qmp_capabilities")

    def _read(self, deadline=None):
        deadline = deadline or time.monotonic() + self.timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Failed(f"{self.name}: timed out waiting for QMP input")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                raise Failed(f"{self.name}: timed out waiting for QMP input")
            if not chunk:
                raise Failed(f"{self.name}: QMP connection closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        if not line.strip():
            return self._read(deadline)
        return json.loads(line)

    def execute(self, command, **arguments):
        """Send a command; return its response object (return or error)."""
        msg = {"execute": command, "id": command}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            obj = self._read()
            if "event" in obj:
                self.events.append(obj)
                continue
            return obj

    def cmd(self, command, **arguments):
        resp = self.execute(command, **arguments)
        if "error" in resp:
            raise Failed(f"{self.name}: {command} {json.dumps(arguments)} "
                         f"failed: {resp['error']}")
        return resp["return"]

    def wait_event(self, name, timeout, pred=lambda e: True):
        deadline = time.monotonic() + timeout
        while True:
            for i, e in enumerate(self.events):
                if e["event"] == name and pred(e):
                    del self.events[i]
                    return e
            self.events.append(self._read(deadline))

    def close(self):
        self.sock.close()


# ------------------------------------------------------------------ helpers

def granules(ranges, g, size):
    """Indices of the g-sized granules touched by [(offset, length)]."""
    out = set()
    for off, length in ranges:
        if length > 0:
            end = min(off + length, size)
            out.update(range(off // g, (end - 1) // g + 1))
    return out


def widen(ranges, g, size):
    """[(offset, length)] rounded out to multiples of g (clipped at size)."""
    out = []
    for off, length in ranges:
        start = off - off % g
        end = min(-(-(off + length) // g) * g, size)
        out.append((start, end - start))
    return out


def describe(gset, g, limit=8):
    """Compact text for a granule set: byte ranges."""
    runs, prev, start = [], None, None
    for i in sorted(gset):
        if prev is None or i != prev + 1:
            if start is not None:
                runs.append((start, prev))
            start = i
        prev = i
    if start is not None:
        runs.append((start, prev))
    text = ", ".join(f"[{a * g}, {(b + 1) * g})" for a, b in runs[:limit])
    if len(runs) > limit:
        text += f", ... ({len(runs)} runs)"
    return text or "(none)"


def bitmap_count(qmp, name):
    for node in qmp.cmd("query-named-block-nodes", flat=True):
        if node.get("node-name") == "disk0":
            for bm in node.get("dirty-bitmaps", []):
                if bm.get("name") == name:
                    return bm
    raise Failed(f"bitmap {name} not listed on disk0 by query-named-block-nodes")


REQ_RE = re.compile(
    r"conn (\d+) unix:pid=(\d+): cookie=\d+ cmd=(NBD_CMD_\w+) "
    r"offset=(\d+) length=(\d+) flags=0x([0-9a-f]+) -> (.*)$")
ADD_RE = re.compile(r"bitmap 'ready' added on 'disk0'")


def parse_log(path, pid):
    """QSD's requests as (line, conn, cmd, offset, length, flags, result) and
    the log line number where bitmap 'ready' was added."""
    reqs, mark, lineno = [], None, 0
    with open(path, errors="replace") as f:
        for lineno, line in enumerate(f):
            if mark is None and ADD_RE.search(line):
                mark = lineno
            m = REQ_RE.search(line)
            if m and int(m.group(2)) == pid:
                reqs.append((lineno, int(m.group(1)), m.group(3),
                             int(m.group(4)), int(m.group(5)),
                             int(m.group(6), 16), m.group(7).strip()))
    return reqs, mark


FLAG_NAMES = {0x1: "FUA", 0x2: "NO_HOLE", 0x4: "DF", 0x8: "REQ_ONE",
              0x10: "FAST_ZERO"}


def flag_text(flags):
    names = [n for b, n in FLAG_NAMES.items() if flags & b]
    return "|".join(names) or "0"


def summarize(reqs, title):
    log(f"{title}: {len(reqs)} requests on "
        f"{len({r[1] for r in reqs})} connection(s)")
    by = collections.defaultdict(list)
    for r in reqs:
        by[(r[2], flag_text(r[5]))].append(r[4])
    for (cmd, flags), lens in sorted(by.items()):
        hist = collections.Counter(lens)
        common = ", ".join(f"{n}x{c}" for n, c in hist.most_common(4))
        log(f"  {cmd:22s} flags={flags:10s} n={len(lens):5d} "
            f"bytes={sum(lens):10d} max={max(lens):9d}  sizes: {common}")


# ------------------------------------------------------------------ phases

def post_ready_writes(size):
    """(kind, offset, length, flags) written to the source after READY."""
    return [
        ("write", 5 * MiB + 512, 4096, 0),          # hole, unaligned
        ("write", 3 * MiB + 777, 300000, 0),        # inside data, odd
        ("zero", 0, 128 * KiB, 0),                   # data -> zero (may punch)
        ("zero", 40 * MiB, 64 * KiB, nbd.CMD_FLAG_NO_HOLE),  # hole, NO_HOLE
        ("write", 20 * MiB + 65535, 2, 0),          # straddles 64K boundary
        ("write", size - 4096, 4096, nbd.CMD_FLAG_FUA),  # tail granule
    ]


def phase_mirror(a):
    size = a.size
    fl = QMP(a.fleeced_qmp, "fleeced")
    qsd = QMP(a.qsd_qmp, "qsd")

    # Bitmaps on the empty target, before QSD connects.
    fl.cmd("block-dirty-bitmap-add", node="disk0", name="pre64")
    fl.cmd("block-dirty-bitmap-add", node="disk0", name="pre4k",
           granularity=FINE)
    check(bitmap_count(fl, "pre64")["granularity"] == 64 * KiB,
          "default granularity of a bitmap on a raw node is 64 KiB")
    for b in ("pre64", "pre4k"):
        check(bitmap_count(fl, b)["count"] == 0, f"{b} starts clean")

    # The target: QEMU's NBD client on fleeced's writable export.
    qsd.cmd("blockdev-add", driver="nbd", **{"node-name": "tgt"},
            server={"type": "unix", "path": a.fleeced_nbd}, export="disk0")
    qsd.cmd("blockdev-mirror", **{"job-id": JOB, "copy-mode": a.copy_mode},
            device="src", target="tgt", sync="full",
            granularity=MIRROR_GRANULARITY)
    t0 = time.monotonic()
    ready = qsd.wait_event("BLOCK_JOB_READY", 30,
                           lambda e: e["data"].get("device") == JOB)
    t_ready = time.monotonic() - t0
    check(ready["data"]["len"] == ready["data"]["offset"],
          f"READY with len != offset: {ready['data']}")
    jobs = qsd.cmd("query-block-jobs")
    check(len(jobs) == 1 and jobs[0]["ready"] and
          jobs[0]["offset"] == jobs[0]["len"],
          f"job not idle at READY: {jobs}")
    log(f"mirror READY after {t_ready:.2f} s ({ready['data']['len']} bytes)")

    # A bitmap added on the target once the mirror is in sync and idle.
    fl.cmd("block-dirty-bitmap-add", node="disk0", name="ready",
           granularity=FINE)

    # Writes to the source while the job mirrors, through QSD's own export.
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///src?socket={a.qsd_nbd}")
    check(h.get_size() == size, "QSD's source export has the image size")
    rng = random.Random(4711)
    writes = post_ready_writes(size)
    for kind, off, length, flags in writes:
        if kind == "write":
            data = bytes(b | 1 for b in rng.randbytes(length))  # no zeroes
            h.pwrite(data, off, flags)
        else:
            h.zero(length, off, flags)
    h.flush()
    h.shutdown()

    # Complete: the job copies what is left, then pivots to the target.
    t0 = time.monotonic()
    qsd.cmd("block-job-complete", device=JOB)
    done = qsd.wait_event("BLOCK_JOB_COMPLETED", 30,
                          lambda e: e["data"].get("device") == JOB)
    check("error" not in done["data"], f"mirror failed: {done['data']}")
    check(done["data"]["len"] == done["data"]["offset"],
          f"COMPLETED with len != offset: {done['data']}")
    check(qsd.cmd("query-block-jobs") == [],
          "job gone after COMPLETED (auto-dismiss)")
    log(f"mirror COMPLETED {time.monotonic() - t0:.2f} s after "
        f"block-job-complete")
    fl.close()

    with open(a.state, "w") as f:
        json.dump({"writes": [[k, o, n, fl_] for k, o, n, fl_ in writes]}, f)

    # Stop QSD: it drops its exports, flushes and disconnects from fleeced.
    resp = qsd.execute("quit")
    check("return" in resp, f"qsd quit: {resp}")
    qsd.close()


def read_bitmap(sock, export, name, size, g):
    """Dirty granule indices of qemu:dirty-bitmap:NAME, checking alignment."""
    ctx = f"qemu:dirty-bitmap:{name}"
    h = nbd.NBD()
    h.add_meta_context(ctx)
    h.connect_uri(f"nbd+unix:///{export}?socket={sock}")
    check(h.can_meta_context(ctx), f"{ctx} negotiated")
    dirty, off = set(), 0
    while off < size:
        got = []

        def cb(metacontext, offset, entries, err):
            if metacontext == ctx:
                got.append((offset, list(entries)))
            return 0
        h.block_status(min(size - off, 1 << 30), off, cb)
        check(len(got) == 1, f"{ctx}: one reply chunk at {off}, got {got}")
        entries = got[0][1]
        check(entries, f"{ctx}: empty extent list at {off}")
        pos = off
        for i in range(0, len(entries), 2):
            length, flags = entries[i], entries[i + 1]
            check(length > 0, f"{ctx}: zero-length extent at {pos}")
            end = min(pos + length, size)
            check(pos % g == 0 and (end % g == 0 or end == size),
                  f"{ctx}: extent [{pos}, {end}) not aligned to {g}")
            check(flags in (0, 1), f"{ctx}: flags {flags} at {pos}")
            if flags & 1:
                dirty.update(range(pos // g, (end - 1) // g + 1))
            pos = end
            if pos >= size:
                break
        off = pos
    h.shutdown()
    return dirty


def phase_verify(a):
    size = a.size
    with open(a.state) as f:
        writes = [tuple(w) for w in json.load(f)["writes"]]
    reqs, mark = parse_log(a.fleeced_log, a.qsd_pid)
    check(reqs, f"no requests from QSD (pid {a.qsd_pid}) in {a.fleeced_log}; "
          "was fleeced started with --log-level debug?")
    check(mark is not None, "fleeced logged the addition of bitmap 'ready'")

    bad = [r for r in reqs if r[6] != "ok"]
    check(not bad, f"requests from QSD failed: {bad[:5]}")
    writing = ("NBD_CMD_WRITE", "NBD_CMD_WRITE_ZEROES")
    unexpected = [r for r in reqs
                  if r[2] not in writing + ("NBD_CMD_FLUSH",
                                            "NBD_CMD_BLOCK_STATUS",
                                            "NBD_CMD_READ")]
    check(not unexpected,
          f"QEMU sent commands this test does not model: {unexpected[:5]}")
    pre = [r for r in reqs if r[0] < mark]
    post = [r for r in reqs if r[0] > mark]
    summarize(pre, "before 'ready' was added (initial copy)")
    summarize(post, "after 'ready' was added (post-READY writes, completion)")

    wr_all = [(r[3], r[4]) for r in reqs if r[2] in writing]
    wr_post = [(r[3], r[4]) for r in post if r[2] in writing]
    wr_pre = [(r[3], r[4]) for r in pre if r[2] in writing]

    # The initial full copy reaches every byte of the target.
    n4k = -(-size // FINE)
    cov = granules(wr_pre, FINE, size)
    check(cov == set(range(n4k)),
          "the pre-READY mirror requests cover the whole disk; missing "
          + describe(set(range(n4k)) - cov, FINE))

    fl = QMP(a.fleeced_qmp, "fleeced")
    names = {"pre64": 64 * KiB, "pre4k": FINE, "ready": FINE}
    counts = {}
    for name in names:
        fl.cmd("block-dirty-bitmap-disable", node="disk0", name=name)
        counts[name] = bitmap_count(fl, name)
        check(counts[name]["granularity"] == names[name],
              f"{name} granularity {counts[name]}")
    fl.cmd("nbd-server-start",
           addr={"type": "unix", "data": {"path": a.bitmap_nbd}})
    fl.cmd("block-export-add", type="nbd", id="bm", name="bm",
           **{"node-name": "disk0"}, bitmaps=list(names))

    failures = []

    def expect_set(name, got, want, what):
        if got != want:
            failures.append(
                f"bitmap {name} != {what}: only in bitmap: "
                f"{describe(got - want, names[name])}; missing from bitmap: "
                f"{describe(want - got, names[name])}")

    bitmaps = {}
    for name, g in names.items():
        got = read_bitmap(a.bitmap_nbd, "bm", name, size, g)
        bitmaps[name] = got
        want_count = min(len(got) * g, size)
        if counts[name]["count"] != want_count:
            failures.append(f"{name}: QMP count {counts[name]['count']} but "
                            f"NBD shows {len(got)} dirty granules of {g} "
                            f"(expected count {want_count})")
        log(f"bitmap {name}: {len(got)} dirty granules of {g}, "
            f"count {counts[name]['count']}")

    # pre64 / pre4k: exactly what the mirror wrote, i.e. the whole disk.
    for name in ("pre64", "pre4k"):
        g = names[name]
        expect_set(name, bitmaps[name], granules(wr_all, g, size),
                   "granules of QSD's WRITE/WRITE_ZEROES requests")
        expect_set(name, bitmaps[name], set(range(-(-size // g))),
                   "the whole disk")

    # ready: exactly the requests after its addition, which lie between the
    # post-READY writes and those writes widened to the mirror granularity.
    ready = bitmaps["ready"]
    touched = [(o, n) for _, o, n, _ in writes]
    lower = granules(touched, FINE, size)
    upper = granules(widen(touched, MIRROR_GRANULARITY, size), FINE, size)
    expect_set("ready", ready, granules(wr_post, FINE, size),
               "granules of QSD's requests logged after 'ready' was added")
    if not lower <= ready:
        failures.append("bitmap ready misses post-READY writes: "
                        + describe(lower - ready, FINE))
    if not ready <= upper:
        failures.append("bitmap ready has granules outside the 64 KiB chunks "
                        "of the post-READY writes: "
                        + describe(ready - upper, FINE))
    if a.copy_mode == "background":
        # The job copies whole dirty chunks of its 64 KiB granularity.
        expect_set("ready", ready, upper,
                   "the 64 KiB mirror chunks of the post-READY writes")
    else:
        # write-blocking: each guest write is forwarded as it is, and the
        # job's own bitmap (clean since READY) leaves nothing else to copy.
        expect_set("ready", ready, lower,
                   "the granules of the post-READY writes")
    log(f"ready: {len(lower)} granules written after READY <= {len(ready)} "
        f"dirty <= {len(upper)} in their 64 KiB chunks")

    # Safe mode: the server may notice our disconnects a little late, so
    # retry for up to 5 s as clients do (control-api.md 3.6).
    deadline = time.monotonic() + 5
    while True:
        resp = fl.execute("block-export-del", id="bm")
        if "return" in resp or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    check("return" in resp, f"block-export-del bm: {resp}")
    fl.wait_event("BLOCK_EXPORT_DELETED", 10, lambda e: e["data"]["id"] == "bm")
    fl.cmd("nbd-server-stop")
    fl.close()
    if failures:
        for msg in failures:
            print(f"FAIL: {msg}", file=sys.stderr)
        raise Failed(f"{len(failures)} bitmap check(s) failed")


def main():
    faulthandler.dump_traceback_later(50, exit=True)
    p = argparse.ArgumentParser()
    p.add_argument("phase", choices=["mirror", "verify"])
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--copy-mode", default="background",
                   choices=["background", "write-blocking"])
    p.add_argument("--fleeced-qmp", required=True)
    p.add_argument("--fleeced-nbd", required=True)
    p.add_argument("--fleeced-log", required=True)
    p.add_argument("--bitmap-nbd", required=True)
    p.add_argument("--qsd-qmp", required=True)
    p.add_argument("--qsd-nbd", required=True)
    p.add_argument("--qsd-pid", type=int, required=True)
    p.add_argument("--state", required=True)
    a = p.parse_args()
    try:
        if a.phase == "mirror":
            phase_mirror(a)
        else:
            phase_verify(a)
    except (Failed, nbd.Error, OSError) as e:
        print(f"FAIL: {a.phase} ({a.copy_mode}): {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

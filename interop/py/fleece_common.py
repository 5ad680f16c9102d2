# SPDX-License-Identifier: MIT
"""Shared pieces of interop/py/fleece_*.py: a QMP client that keeps the
events it sees, soft/hard checks that collect every failure, NBD helpers
(connect, block status walks) and the deterministic data patterns.

Failures are collected (soft) so that one run reports every problem; a
hard check ends the current step only.
"""

import errno
import faulthandler
import hashlib
import json
import os
import socket
import struct
import sys
import time
import traceback

import nbd

KiB, MiB = 1 << 10, 1 << 20
CLUSTER = 64 * KiB
BASE = nbd.CONTEXT_BASE_ALLOCATION
DB = "qemu:dirty-bitmap:"

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


def run(fn, timeout=40):
    """Run one step; failures are recorded, the next step still runs."""
    global current
    current = fn.__name__
    print(f"{current} ...", flush=True)
    n_before = len(failures)
    t0 = time.monotonic()
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
        print(f"  ok ({time.monotonic() - t0:.1f} s)", flush=True)
    else:
        print(f"  failed ({time.monotonic() - t0:.1f} s)", flush=True)


def finish():
    if failures:
        print(f"\n{len(failures)} failure(s):", file=sys.stderr)
        for f in failures:
            print(f"  {f}", file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------ QMP

class Qmp:
    """Minimal QMP client.  Every message is kept in self.log in arrival
    order (events and responses), so event order relative to a return can
    be checked; self.events holds the events not yet consumed."""

    def __init__(self, path, timeout=20):
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b""
        self.events = []
        self.log = []
        self.seq = 0
        greeting = self._read()
        check("QMP" in greeting, f"QMP greeting {greeting}")
        r = self.cmd("qmp_capabilities")
        check(r == {"return": {}}, f"qmp_capabilities: {r}")

    def _read(self, deadline=None):
        deadline = deadline or time.monotonic() + self.timeout
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
        if not line.strip():
            return self._read(deadline)
        return json.loads(line)

    def cmd(self, execute, **arguments):
        """Send a command, return the raw response object.  Events seen
        while waiting are appended to self.events and self.log."""
        self.seq += 1
        msg = {"execute": execute, "id": self.seq}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        self.last_events = []       # events that arrived before the answer
        while True:
            r = self._read()
            self.log.append(r)
            if "event" in r:
                self.events.append(r)
                self.last_events.append(r)
                continue
            check(r.get("id") == self.seq,
                  f"{execute}: response id {r.get('id')}, sent {self.seq}: {r}")
            r = dict(r)
            del r["id"]
            return r

    def ok(self, execute, **arguments):
        r = self.cmd(execute, **arguments)
        check(r == {"return": r.get("return")} and "return" in r,
              f"{execute} {json.dumps(arguments)}: {r}")
        return r["return"]

    def ok_empty(self, execute, **arguments):
        """A command that must answer exactly {"return": {}}."""
        r = self.cmd(execute, **arguments)
        check(r == {"return": {}},
              f"{execute} {json.dumps(arguments)}: got {r}, want "
              f'{{"return": {{}}}}')

    def expect_error(self, what, cls, desc, execute, **arguments):
        r = self.cmd(execute, **arguments)
        want = {"error": {"class": cls, "desc": desc}}
        return soft_eq(r, want, f"{what}: {execute}")

    def take_events(self, name=None):
        """Remove and return the pending events (of one name)."""
        got = [e for e in self.events if name is None or e["event"] == name]
        self.events = [e for e in self.events
                       if not (name is None or e["event"] == name)]
        return got

    def wait_event(self, name, timeout=10, pred=lambda e: True):
        deadline = time.monotonic() + timeout
        while True:
            for i, e in enumerate(self.events):
                if e["event"] == name and pred(e):
                    return self.events.pop(i)
            if time.monotonic() > deadline:
                return None
            try:
                r = self._read(deadline)
            except CheckFailed:
                return None
            self.log.append(r)
            if "event" in r:
                self.events.append(r)
            else:
                fail(f"unexpected QMP message while waiting for {name}: {r}")

    def nodes(self):
        return {n["node-name"]: n
                for n in self.ok("query-named-block-nodes", flat=True)}

    def bitmaps(self, node="disk0"):
        n = self.nodes().get(node)
        check(n is not None, f"node {node} not in query-named-block-nodes")
        return {b["name"]: b for b in n.get("dirty-bitmaps", []) if "name" in b}

    def state(self):
        """What a failing command must not change: the whole answers of
        query-named-block-nodes (bitmaps sorted by name), query-block-jobs
        and query-block-exports, each sorted."""
        nodes = {}
        for name, n in self.nodes().items():
            n = dict(n)
            n["dirty-bitmaps"] = sorted(n.get("dirty-bitmaps", []),
                                        key=lambda b: json.dumps(b, sort_keys=True))
            nodes[name] = n
        jobs = sorted(self.ok("query-block-jobs"),
                      key=lambda j: str(j.get("device")))
        exports = sorted(self.ok("query-block-exports"),
                         key=lambda e: str(e.get("id")))
        return {"nodes": nodes, "jobs": jobs, "exports": exports}

    def exports(self):
        """query-block-exports, sorted by id (the order is unspecified)."""
        return sorted(self.ok("query-block-exports"),
                      key=lambda e: str(e.get("id")))

    def cl_exports(self):
        """The command-line export disk0 as query-block-exports lists it:
        fleeced lists command-line exports (id = name), as
        qemu-storage-daemon lists its --export ones; older fleeced builds
        did not.  Either form is accepted, nothing else."""
        want = {"id": "disk0", "type": "nbd", "node-name": "disk0",
                "shutting-down": False}
        got = [e for e in self.exports() if e.get("id") == "disk0"]
        soft_check(got in ([], [want]),
                   f"command-line export in query-block-exports: {got}")
        return got

    def close(self):
        self.sock.close()


# ------------------------------------------------------------------ NBD

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
    got = {}

    def cb(metacontext, off, entries, err):
        got[metacontext] = [(entries[i], entries[i + 1])
                            for i in range(0, len(entries), 2)]
        return 0
    h.block_status(count, offset, cb, flags)
    return got


def walk(h, context, size):
    """Whole-export map of one context, merged runs [(length, flags)]."""
    out, pos = [], 0
    while pos < size:
        ext = block_status(h, min(size - pos, 1 << 30), pos).get(context)
        check(ext, f"walk {context}: no extents at {pos}")
        for n, f in ext:
            check(n > 0, f"walk {context}: zero-length extent at {pos}")
            n = min(n, size - pos)
            if out and out[-1][1] == f:
                out[-1] = (out[-1][0] + n, f)
            else:
                out.append((n, f))
            pos += n
    return out


def extents_with_offsets(runs):
    out, pos = [], 0
    for n, f in runs:
        out.append((pos, n, f))
        pos += n
    return out


def read_all(h, size, chunk=4 * MiB):
    out = bytearray()
    for off in range(0, size, chunk):
        out += h.pread(min(chunk, size - off), off)
    return bytes(out)


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def file_bytes(path, off=0, n=None):
    with open(path, "rb") as f:
        f.seek(off)
        return f.read() if n is None else f.read(n)


def allocated_bytes(path):
    return os.stat(path).st_blocks * 512


# ------------------------------------------------------------------ data

def pattern(off, length, tag):
    """Deterministic non-zero bytes that depend on the absolute offset and
    on a tag, so data from a wrong place or a wrong time never matches."""
    start = off & ~7
    end = (off + length + 7) & ~7
    words = struct.pack(f">{(end - start) // 8}Q",
                        *(((w | 1 << 63) ^ (tag * 0x9E3779B97F4A7C15))
                          & 0xFFFFFFFFFFFFFFFF
                          for w in range(start, end, 8)))
    return words[off - start: off - start + length]


def nbd_errno(e):
    return getattr(e, "errnum", None)


def expect_nbd_error(what, want_errno, fn):
    try:
        fn()
    except nbd.Error as e:
        return soft_eq(nbd_errno(e), want_errno,
                       f"{what}: errno ({e})")
    soft_fail(f"{what}: succeeded, expected {errno.errorcode[want_errno]}")
    return False

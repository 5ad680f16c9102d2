# SPDX-License-Identifier: MIT
"""The QMP control socket, spoken raw over the unix socket.

Run by interop/qmp-control.sh against a fleeced started with only
--qmp unix:PATH (--mode main), and against one that also serves a
command-line export (--mode cmdline).  Expectations are those of the shared
control-api.md: §1 (wire protocol), §2-3 (graph, commands), §4 (events),
§9.3/§9.4 (deliberate differences).  Error classes and the error texts the
spec quotes are asserted exactly; where the spec quotes no text, only the
class is checked.  After every command that must fail, the block nodes,
their bitmaps and the exports are queried again and must be unchanged.

--qemu runs the main checks against qemu-storage-daemon 7.2 (the spec's
reference) to check the expectations themselves: it skips what fleeced
deliberately does differently (§9.3, §9.4, count capping).

Each check runs on its own and failures are collected.  The last check
sends `quit`; the calling script checks the exit status.  Exit 0 when all
checks pass, 1 otherwise.
"""

import argparse
import faulthandler
import json
import os
import select
import socket
import sys
import time
import traceback

import nbd

KiB, MiB = 1 << 10, 1 << 20
DISK_SIZE = 4 * MiB
SECTION_TIMEOUT = 30      # a hung section dumps tracebacks and exits
IO_TIMEOUT = 10           # seconds for any single read from the QMP socket

args = None
failures = []
current = "?"
q = None                  # the one control connection (one client at a time)

BUSY = "Bitmap '{}' is currently in use by another operation and cannot be used"
GRAN = "Granularity must be power of 2 and at least 512"
NOT_NEGOTIATED = "Expecting capabilities negotiation with 'qmp_capabilities'"
NOT_OBJECT = "QMP input must be a JSON object"
_absent = object()


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


def dumps(v):
    return json.dumps(v, sort_keys=True)


def path(name):
    return os.path.join(args.dir, name)


# ------------------------------------------------------------------ QMP client

class Closed(Exception):
    pass


class Qmp:
    """Raw QMP over a unix socket.  Responses are read line by line (the
    server writes one object per line); events are kept in self.events."""

    def __init__(self, sock_path, negotiate=True):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(IO_TIMEOUT)
        self.sock.connect(sock_path)
        self.buf = b""
        self.events = []
        self.during = []      # events received during the last execute()
        self.greeting_raw = None
        self.greeting = self.recv(raw_out=True)
        if negotiate:
            r = self.execute("qmp_capabilities")
            check(r == {"return": {}}, f"qmp_capabilities answered {r}")

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, data):
        if isinstance(data, str):
            data = data.encode()
        self.sock.sendall(data)

    def _line(self, timeout):
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout(f"no complete message within {timeout} s "
                                     f"(have {self.buf[:200]!r})")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            finally:
                self.sock.settimeout(IO_TIMEOUT)
            if not chunk:
                raise Closed(f"connection closed (pending {self.buf[:200]!r})")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line

    def recv(self, timeout=IO_TIMEOUT, raw_out=False):
        """The next message (event or response) as a dict."""
        while True:
            line = self._line(timeout)
            if not line.strip():
                continue
            try:
                msg = json.loads(line)
            except ValueError:
                fail(f"server sent a line that is not JSON: {line[:300]!r}")
            check(isinstance(msg, dict), f"server sent a non-object: {line[:300]!r}")
            if raw_out:
                self.greeting_raw = line
            return msg

    def pending(self, wait):
        """True if anything arrives within `wait` seconds."""
        if self.buf.strip():
            return True
        r, _, _ = select.select([self.sock], [], [], wait)
        return bool(r)

    def response(self, timeout=IO_TIMEOUT):
        """The next non-event message; events go to self.events."""
        while True:
            msg = self.recv(timeout)
            if "event" in msg:
                self.events.append(msg)
                self.during.append(msg)
                continue
            return msg

    def execute(self, name, arguments=_absent, id=_absent, raw=None):
        """Sends a command, returns the full response; checks its envelope
        and that "id" is echoed exactly (and absent when not sent)."""
        msg = {"execute": name}
        if arguments is not _absent:
            msg["arguments"] = arguments
        if id is not _absent:
            msg["id"] = id
        self.during = []
        self.send((raw if raw is not None else json.dumps(msg)) + "\n")
        r = self.response()
        check_envelope(r, id, f"{name} {dumps(arguments) if arguments is not _absent else ''}")
        return r

    def ok(self, name, arguments=_absent):
        r = self.execute(name, arguments)
        if "return" not in r:
            fail(f"{name} {dumps(arguments) if arguments is not _absent else ''} "
                 f"failed: {r}")
        return r["return"]

    def drain_events(self, wait=0.3):
        """Reads what arrives within `wait` s (events only); returns and
        forgets all events kept so far."""
        while self.pending(wait):
            msg = self.recv()
            if "event" not in msg:
                soft_fail(f"unexpected non-event message: {msg}")
                continue
            self.events.append(msg)
        out, self.events = self.events, []
        return out


def check_envelope(r, sent_id, what):
    keys = set(r)
    if sent_id is _absent:
        soft_check("id" not in r, f"{what}: response has an id that was not sent: {r}")
    else:
        if "id" not in r:
            soft_fail(f"{what}: id {dumps(sent_id)} not echoed: {r}")
        elif dumps(r["id"]) != dumps(sent_id):
            soft_fail(f"{what}: id {dumps(sent_id)} echoed as {dumps(r['id'])}")
    keys.discard("id")
    if keys == {"return"}:
        return
    if keys == {"error"}:
        e = r["error"]
        soft_check(isinstance(e, dict) and set(e) == {"class", "desc"} and
                   isinstance(e["class"], str) and isinstance(e["desc"], str),
                   f"{what}: malformed error member {e}")
        return
    soft_fail(f"{what}: response is neither return nor error: {r}")


# ------------------------------------------------------------------ state

def query_nodes():
    return q.ok("query-named-block-nodes", {"flat": True})


def state():
    """Nodes with their bitmaps, and the exports, in a comparable form."""
    nodes = {}
    for n in query_nodes():
        bms = n.get("dirty-bitmaps")
        nodes[n["node-name"]] = (None if bms is None else
                                 sorted(dumps(b) for b in bms))
    exports = sorted(dumps(e) for e in q.ok("query-block-exports"))
    return {"nodes": nodes, "exports": exports}


def diff_state(a, b):
    out = []
    for k in sorted(set(a["nodes"]) | set(b["nodes"])):
        if a["nodes"].get(k, "<absent>") != b["nodes"].get(k, "<absent>"):
            out.append(f"node {k}: {a['nodes'].get(k, '<absent>')} -> "
                       f"{b['nodes'].get(k, '<absent>')}")
    if a["exports"] != b["exports"]:
        out.append(f"exports {a['exports']} -> {b['exports']}")
    return "; ".join(out)


def expect_error(name, arguments=_absent, desc=None, cls="GenericError",
                 unchanged=True, id=_absent, what=None):
    """The command must fail with `cls` (and `desc` when given); with
    `unchanged`, nodes, bitmaps and exports must be as before."""
    what = what or f"{name} {dumps(arguments) if arguments is not _absent else ''}"
    before = state() if unchanged else None
    r = q.execute(name, arguments, id=id)
    if "error" not in r:
        soft_fail(f"{what}: succeeded ({r}), expected {cls}"
                  + (f" \"{desc}\"" if desc else ""))
    else:
        e = r["error"]
        if isinstance(cls, (tuple, list)):
            soft_check(e.get("class") in cls, f"{what}: class {e.get('class')}, "
                       f"expected one of {cls} ({e.get('desc')})")
        else:
            soft_check(e.get("class") == cls,
                       f"{what}: class {e.get('class')}, expected {cls} ({e.get('desc')})")
        if desc is not None:
            soft_check(e.get("desc") == desc,
                       f"{what}: desc [{e.get('desc')}], expected [{desc}]")
    if unchanged:
        after = state()
        soft_check(after == before, f"{what}: the failed command changed state: "
                   f"{diff_state(before, after)}")
    return r


def bitmaps(node):
    for n in query_nodes():
        if n["node-name"] == node:
            return {b.get("name"): b for b in n.get("dirty-bitmaps", [])}
    fail(f"node {node} not in query-named-block-nodes")


def bitmap(node, name):
    b = bitmaps(node).get(name)
    check(b is not None, f"bitmap {node}/{name} not listed")
    return b


def expect_bitmap(node, name, **want):
    b = bitmap(node, name)
    for k, v in want.items():
        soft_check(b.get(k) == v, f"bitmap {node}/{name}: {k} is {b.get(k)!r}, "
                   f"expected {v!r} (full: {b})")
    return b


def add_node_pair(node, image, discard=None):
    """file node NODE-file and raw node NODE over it."""
    f = {"driver": "file", "node-name": node + "-file", "filename": image}
    r = {"driver": "raw", "node-name": node, "file": node + "-file"}
    if discard:
        f["discard"] = discard
        r["discard"] = discard
    check(q.ok("blockdev-add", f) == {}, "blockdev-add file returns {}")
    check(q.ok("blockdev-add", r) == {}, "blockdev-add raw returns {}")


def nbd_server_start(sock_path, **extra):
    a = {"addr": {"type": "unix", "data": {"path": sock_path}}}
    a.update(extra)
    check(q.ok("nbd-server-start", a) == {}, "nbd-server-start returns {}")


def export_add(**a):
    a.setdefault("type", "nbd")
    check(q.ok("block-export-add", a) == {}, "block-export-add returns {}")


def check_event(ev, name, data):
    what = f"event {ev}"
    if not soft_check(set(ev) == {"timestamp", "event", "data"},
                      f"{what}: members are not exactly timestamp, event, data"):
        return
    ts = ev["timestamp"]
    if soft_check(isinstance(ts, dict) and set(ts) == {"seconds", "microseconds"},
                  f"{what}: timestamp is not {{seconds, microseconds}}"):
        s, us = ts["seconds"], ts["microseconds"]
        if soft_check(type(s) is int and type(us) is int,
                      f"{what}: timestamp members are not integers"):
            soft_check(0 <= us < 1000000, f"{what}: microseconds out of range")
            soft_check(abs(s + us / 1e6 - time.time()) < 60,
                       f"{what}: timestamp is not the current time")
    soft_check(ev["event"] == name, f"{what}: expected event {name}")
    soft_check(ev["data"] == data, f"{what}: data is not {data}")


def wait_export_deleted(ids, timeout=5):
    """Collects BLOCK_EXPORT_DELETED for every id in `ids` (they may have
    come before the return, §4); no other events are expected."""
    want = set(ids)
    got = []
    deadline = time.monotonic() + timeout
    while True:
        for ev in q.events:
            got.append(ev)
        q.events = []
        seen = {e.get("data", {}).get("id") for e in got
                if e.get("event") == "BLOCK_EXPORT_DELETED"}
        if want <= seen or time.monotonic() > deadline:
            break
        if q.pending(min(0.2, max(0.0, deadline - time.monotonic()))):
            msg = q.recv()
            if "event" in msg:
                q.events.append(msg)
            else:
                soft_fail(f"unexpected non-event message while waiting for "
                          f"BLOCK_EXPORT_DELETED: {msg}")
    for e in got:
        if e.get("event") == "BLOCK_EXPORT_DELETED":
            check_event(e, "BLOCK_EXPORT_DELETED", {"id": e.get("data", {}).get("id")})
        else:
            soft_fail(f"unexpected event {e}")
    ids_got = sorted(e.get("data", {}).get("id") for e in got
                     if e.get("event") == "BLOCK_EXPORT_DELETED")
    soft_check(ids_got == sorted(ids),
               f"BLOCK_EXPORT_DELETED for {ids_got}, expected exactly one each for "
               f"{sorted(ids)}")


def export_del_safe(export_id):
    """Safe block-export-del after the clients disconnected: like clients
    (§3.6), retry for up to 5 s, since a server may notice a disconnect
    late; then the BLOCK_EXPORT_DELETED event."""
    deadline = time.monotonic() + 5
    while True:
        r = q.execute("block-export-del", {"id": export_id})
        if "return" in r or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    soft_check(r == {"return": {}}, f"safe block-export-del {export_id} (retried for 5 s "
               f"after its clients disconnected): {r}")
    wait_export_deleted([export_id])


def expect_no_events(what, wait=0.3):
    evs = q.drain_events(wait)
    soft_check(not evs, f"{what}: unexpected events {evs}")


# ------------------------------------------------------------------ NBD side

def nbd_open(sock_path, export, metas=()):
    h = nbd.NBD()
    for m in metas:
        h.add_meta_context(m)
    h.set_export_name(export)
    h.connect_unix(sock_path)
    return h


def nbd_connects(sock_path, export):
    try:
        h = nbd_open(sock_path, export)
    except nbd.Error:
        return False
    h.shutdown()
    return True


def pread_bounded(h, n, off, secs=5):
    """pread through the aio API with a deadline; raises nbd.Error if the
    command fails, TimeoutError if nothing happens."""
    buf = nbd.Buffer(n)
    cookie = h.aio_pread(buf, off)
    deadline = time.monotonic() + secs
    while True:
        if h.aio_command_completed(cookie):
            return buf.to_bytearray()
        if time.monotonic() > deadline:
            raise TimeoutError(f"pread({n}, {off}) got no answer in {secs} s")
        h.poll(100)


def dirty_extents(h, context, size):
    """[(offset, length)] of dirty (flag 1) extents of `context`."""
    out, pos = [], 0
    while pos < size:
        got = []

        def cb(metacontext, off, entries, err):
            if metacontext == context:
                got.append(list(entries))
            return 0
        h.block_status(size - pos, pos, cb)
        check(len(got) == 1, f"block_status on {context}: {len(got)} replies")
        entries = got[0]
        check(entries and len(entries) % 2 == 0, f"bad extents {entries}")
        for i in range(0, len(entries), 2):
            n, flags = entries[i], entries[i + 1]
            n = min(n, size - pos)
            if flags & 1:
                if out and out[-1][0] + out[-1][1] == pos:
                    out[-1] = (out[-1][0], out[-1][1] + n)
                else:
                    out.append((pos, n))
            pos += n
            if pos >= size:
                break
    return out


def make_image(name, size):
    p = path(name)
    with open(p, "wb") as f:
        f.truncate(size)
    return p


# ------------------------------------------------------------------ checks: wire

def test_wire():
    global q
    g = q.greeting
    check(set(g) == {"QMP"}, f"greeting {g} is not {{\"QMP\": ...}}")
    qmp = g["QMP"]
    check(isinstance(qmp, dict) and set(qmp) == {"version", "capabilities"},
          f"greeting QMP member {qmp} is not {{version, capabilities}}")
    ver = qmp["version"]
    check(isinstance(ver, dict) and isinstance(ver.get("qemu"), dict),
          f"greeting version {ver} has no qemu object")
    soft_check(set(ver["qemu"]) == {"major", "minor", "micro"},
               f"version.qemu members {sorted(ver['qemu'])}")
    for k in ("major", "minor", "micro"):
        soft_check(type(ver["qemu"].get(k)) is int,
                   f"version.qemu.{k} = {ver['qemu'].get(k)!r} is not an integer")
    soft_check(set(ver) <= {"qemu", "package"}, f"version members {sorted(ver)}")
    if "package" in ver:
        soft_check(isinstance(ver["package"], str), "version.package is not a string")
    soft_check(isinstance(qmp["capabilities"], list), "capabilities is not a list")
    soft_check(q.greeting_raw.endswith(b"}") or q.greeting_raw.endswith(b"}\r"),
               f"greeting line {q.greeting_raw!r} is not one object per line")

    # nothing but qmp_capabilities before negotiation, as QEMU 7.2
    for name, a, id_ in [("query-block-exports", _absent, "pre-1"),
                         ("query-named-block-nodes", {"flat": True}, 17),
                         ("quit", _absent, "pre-quit"),
                         ("blockdev-add", {"driver": "file", "node-name": "pre",
                                           "filename": path("disk.img")}, _absent)]:
        r = q.execute(name, a, id=id_)
        soft_check(r.get("error") == {"class": "CommandNotFound", "desc": NOT_NEGOTIATED},
                   f"{name} before qmp_capabilities answered {r}")
    r = q.execute("no-such-command", id="pre-unknown")
    soft_check(r.get("error", {}).get("class") == "CommandNotFound",
               f"unknown command before qmp_capabilities answered {r}")
    r = q.execute("qmp_capabilities")
    check(r == {"return": {}}, f"qmp_capabilities answered {r}")
    r = q.execute("qmp_capabilities", id="again")
    soft_check(r.get("error") == {"class": "CommandNotFound", "desc":
                                  "Capabilities negotiation is already complete, "
                                  "command ignored"},
               f"second qmp_capabilities answered {r}")
    # the early quit was refused, blockdev-add did nothing
    check(q.ok("query-named-block-nodes", {"flat": True}) == [],
          "nodes exist although blockdev-add was refused before negotiation")
    check(q.ok("query-block-exports") == [], "query-block-exports is not []")


def test_ids():
    for id_ in ["abc", "", 42, -7, 0, 1.5, 2 ** 53, True, False, None,
                {"a": [1, {"b": None}], "c": "d"}, [1, "x", []], {}]:
        r = q.execute("query-block-exports", id=id_)
        soft_check(r.get("return") == [], f"query-block-exports id={dumps(id_)}: {r}")
    # errors echo the id too
    r = q.execute("no-such-command", id={"k": "v"})
    soft_check(r.get("error", {}).get("class") == "CommandNotFound",
               f"unknown command answered {r}")
    r = q.execute("blockdev-del", {}, id=[1, 2])
    soft_check(r.get("error") == {"class": "GenericError",
                                  "desc": "Parameter 'node-name' is missing"},
               f"blockdev-del {{}} answered {r}")
    # envelope errors echo it as well
    for raw, desc in [('{"execute": 5, "id": "e1"}',
                       "QMP input member 'execute' must be a string"),
                      ('{"exec": "query-block-exports", "id": "e1"}',
                       "QMP input member 'exec' is unexpected")]:
        q.send(raw + "\n")
        r = q.response()
        soft_check(r == {"id": "e1", "error": {"class": "GenericError", "desc": desc}},
                   f"{raw} answered {r}")


def test_stream():
    ask = '{"execute": "query-block-exports", "id": %s}'
    # two commands in one write, no separator, no trailing newline
    q.send(ask % '"two-a"' + ask % '"two-b"')
    ids = [q.response().get("id") for _ in range(2)]
    soft_check(ids == ["two-a", "two-b"], f"two in one write: ids {ids}")
    # many in one write, answered in order
    seps = ["\n", " ", "", "\r\n", "\t"]
    q.send("".join(ask % i + seps[i % len(seps)] for i in range(40)) + "\n")
    ids = [q.response().get("id") for _ in range(40)]
    soft_check(ids == list(range(40)), f"40 in one write: ids {ids}")
    # one command split over several writes with pauses, newlines inside;
    # nothing may be answered before it is complete
    pieces = ['{"exe', 'cute"', ':\n  "query-block-', 'exports",\r\n\t"id"', ':',
              ' 12', '34', '\n}']
    for i, p in enumerate(pieces):
        q.send(p)
        if i + 1 < len(pieces):
            if q.pending(0.15):
                soft_fail(f"answered before the command was complete "
                          f"(after piece {i} {p!r}): {q.recv()}")
    r = q.response()
    soft_check(r == {"return": [], "id": 1234}, f"split command answered {r}")
    # a write that ends one command and starts the next
    q.send(ask % '"s1"' + '\n{"execute": "query-bl')
    r = q.response()
    soft_check(r.get("id") == "s1", f"first of a straddling pair: {r}")
    time.sleep(0.1)
    q.send('ock-exports", "id": "s2"}')
    r = q.response()
    soft_check(r == {"return": [], "id": "s2"}, f"second of a straddling pair: {r}")
    # whitespace and newlines everywhere
    q.send('\n\n  {\n"execute"\n:\n"query-block-exports"\n,\n"arguments"\n:\n{\n}\n,'
           '"id"\n:\n"ws"\n}\n\n')
    r = q.response()
    soft_check(r == {"return": [], "id": "ws"}, f"command with newlines inside: {r}")
    # one byte per write
    text = '{"execute": "query-named-block-nodes", "arguments": {"flat": true}, "id": "bytes"}'
    for c in text:
        q.send(c)
        time.sleep(0.002)
    q.send("\n")
    r = q.response()
    soft_check(r == {"return": [], "id": "bytes"}, f"byte-by-byte command: {r}")
    # escapes and unicode in strings
    q.send('{"execute": "query-block-exports", "id": "\\u00e9\\"\\\\\\n\u00e8"}\n')
    r = q.response()
    soft_check(r.get("id") == "\u00e9\"\\\n\u00e8", f"escaped id echoed as {r.get('id')!r}")


def expect_parse_errors_then(raw, tag):
    """Sends `raw` followed by a good command with id `tag`: at least one
    GenericError (without id) must come first, then the good command's answer."""
    q.send(raw + '\n{"execute": "query-block-exports", "id": "%s"}\n' % tag)
    errors = []
    while True:
        r = q.response()
        if r.get("id") == tag:
            break
        errors.append(r)
    soft_check(r == {"return": [], "id": tag},
               f"command after malformed input {raw!r}: {r}")
    if not errors:
        soft_fail(f"malformed input {raw!r} got no error")
    for e in errors:
        soft_check(set(e) == {"error"} and e["error"].get("class") == "GenericError",
                   f"malformed input {raw!r} answered {e}")


def test_malformed():
    before = state()
    expect_parse_errors_then('{"execute": }', "bad-1")
    expect_parse_errors_then('{bad}', "bad-2")
    expect_parse_errors_then('garbage', "bad-3")
    expect_parse_errors_then('}', "bad-4")
    expect_parse_errors_then('{"execute": "query-block-exports" "id": 1}', "bad-5")
    expect_parse_errors_then('{"execute": "query-block-exports",, "id": 1}', "bad-6")
    expect_parse_errors_then('{"a": tru}', "bad-7")
    # non-object input
    for raw in ['[1, 2]', '5', '"text"', 'null', 'true', '[]', '-3.5']:
        q.send(raw + "\n")
        r = q.response()
        soft_check(r == {"error": {"class": "GenericError", "desc": NOT_OBJECT}},
                   f"input {raw} answered {r}")
    # envelope problems (class only: the spec quotes no text for these)
    for raw in ['{"arguments": {}}', '{"execute": "query-block-exports", "arguments": 7}',
                '{"execute": "query-block-exports", "arguments": []}']:
        q.send(raw + "\n")
        r = q.response()
        soft_check(set(r) == {"error"} and r["error"].get("class") == "GenericError",
                   f"input {raw} answered {r}")
    # still negotiated and working
    r = q.execute("query-block-exports", id="alive")
    check(r == {"return": [], "id": "alive"}, f"session after bad input: {r}")
    soft_check(state() == before, "malformed input changed state")


def test_arguments():
    disk = path("disk.img")
    expect_error("blockdev-del", {}, "Parameter 'node-name' is missing")
    expect_error("blockdev-del", _absent, "Parameter 'node-name' is missing")
    expect_error("blockdev-del", {"node-name": "x", "bogus": 1},
                 "Parameter 'bogus' is unexpected")
    expect_error("blockdev-add", {"driver": "file", "node-name": "x", "filename": disk,
                                  "bogus": 1}, "Parameter 'bogus' is unexpected")
    expect_error("blockdev-add", {"driver": "file", "node-name": 5, "filename": disk},
                 "Invalid parameter type for 'node-name', expected: string")
    expect_error("blockdev-add", {"driver": "file", "node-name": "x", "filename": [disk]},
                 "Invalid parameter type for 'filename', expected: string")
    expect_error("blockdev-del", {"node-name": None},
                 "Invalid parameter type for 'node-name', expected: string")
    expect_error("blockdev-add", {"driver": "nonexistent-driver", "node-name": "x"},
                 "Parameter 'driver' does not accept value 'nonexistent-driver'")
    expect_error("blockdev-add", {"node-name": "x", "filename": disk},
                 "Parameter 'driver' is missing")
    expect_error("blockdev-add", {"driver": "file", "node-name": "x"},
                 "Parameter 'filename' is missing")
    expect_error("blockdev-add", {"driver": "raw", "node-name": "x"},
                 "Parameter 'file' is missing")
    expect_error("query-block-exports", {"bogus": 1}, "Parameter 'bogus' is unexpected")
    expect_error("nbd-server-stop", {"bogus": 1}, "Parameter 'bogus' is unexpected")
    expect_error("block-export-add", {"type": "nbd", "id": "x", "node-name": "x",
                                      "writable": "yes"},
                 "Invalid parameter type for 'writable', expected: boolean")
    expect_error("block-export-add", {"type": "nbd", "node-name": "x"},
                 "Parameter 'id' is missing")
    expect_error("nbd-server-start", {}, "Parameter 'addr' is missing")
    # quit with a bad argument must not quit
    expect_error("quit", {"bogus": True}, "Parameter 'bogus' is unexpected")
    # unknown command
    expect_error("no-such-command", cls="CommandNotFound", id="unk")
    check(q.ok("query-block-exports") == [], "server still answers after bad quit")


# ------------------------------------------------------------------ checks: graph

def test_blockdev():
    disk, other = path("disk.img"), path("other.img")
    check(q.ok("blockdev-add", {"driver": "file", "node-name": "d-file",
                                "filename": disk}) == {}, "blockdev-add file")
    check(q.ok("blockdev-add", {"driver": "raw", "node-name": "d",
                                "file": "d-file"}) == {}, "blockdev-add raw")
    for a in (_absent, {}, {"flat": True}):
        nodes = q.ok("query-named-block-nodes", a)
        names = sorted(n.get("node-name") for n in nodes)
        soft_check(names == ["d", "d-file"], f"query-named-block-nodes {a}: {names}")
        for n in nodes:
            soft_check("dirty-bitmaps" not in n,
                       f"node {n.get('node-name')} without bitmaps has a dirty-bitmaps "
                       f"member: {n.get('dirty-bitmaps')}")
    # duplicates, across drivers too
    for a in [{"driver": "file", "node-name": "d-file", "filename": other},
              {"driver": "file", "node-name": "d", "filename": other},
              {"driver": "raw", "node-name": "d", "file": "d-file"},
              {"driver": "raw", "node-name": "d-file", "file": "d-file"}]:
        expect_error("blockdev-add", a, f"Duplicate nodes with node-name='{a['node-name']}'")
    missing = path("missing.raw")
    expect_error("blockdev-add", {"driver": "file", "node-name": "m", "filename": missing},
                 f"Could not open '{missing}': No such file or directory")
    expect_error("blockdev-add", {"driver": "raw", "node-name": "m", "file": "nonexist"})
    for drv, extra in [("file", {"filename": other}), ("raw", {"file": "d-file"})]:
        expect_error("blockdev-add", dict(driver=drv, **{"node-name": "m"}, **extra,
                                          discard="bogus"),
                     "Parameter 'discard' does not accept value 'bogus'")
        expect_error("blockdev-add", dict(driver=drv, **{"node-name": "m"}, **extra,
                                          discard=True),
                     "Invalid parameter type for 'discard', expected: string")
    # discard: both values are accepted on both drivers
    add_node_pair("o", other, discard="unmap")
    check(q.ok("blockdev-add", {"driver": "file", "node-name": "i-file",
                                "filename": path("small.img"),
                                "discard": "ignore"}) == {}, "file discard=ignore")
    check(q.ok("blockdev-add", {"driver": "raw", "node-name": "i", "file": "i-file",
                                "discard": "ignore"}) == {}, "raw discard=ignore")
    names = sorted(n["node-name"] for n in query_nodes())
    soft_check(names == ["d", "d-file", "i", "i-file", "o", "o-file"], f"nodes {names}")
    # blockdev-del
    expect_error("blockdev-del", {"node-name": "nonexist"},
                 "Failed to find node with node-name='nonexist'")
    expect_error("blockdev-del", {"node-name": "i-file"}, "Block device i-file is in use")
    expect_error("blockdev-del", {"node-name": "d-file"}, "Block device d-file is in use")
    check(q.ok("blockdev-del", {"node-name": "i"}) == {}, "blockdev-del raw")
    check(q.ok("blockdev-del", {"node-name": "i-file"}) == {}, "blockdev-del file")
    names = sorted(n["node-name"] for n in query_nodes())
    soft_check(names == ["d", "d-file", "o", "o-file"], f"nodes after blockdev-del {names}")
    expect_error("blockdev-del", {"node-name": "i"}, "Failed to find node with node-name='i'")
    # the names can be used again
    check(q.ok("blockdev-add", {"driver": "file", "node-name": "i-file",
                                "filename": path("small.img")}) == {}, "re-add")
    check(q.ok("blockdev-del", {"node-name": "i-file"}) == {}, "del re-added node")


def test_later_commands_fail_cleanly():
    """Commands of later issues (blockdev-reopen, copy-before-write,
    blockdev-backup, jobs, object-add) on things that do not exist fail
    cleanly, whether or not they are implemented yet, and change nothing."""
    ok_classes = ("GenericError", "CommandNotFound")
    expect_error("blockdev-reopen", {"options": [{"driver": "raw", "node-name": "nonexist",
                                                  "file": "nonexist2"}]}, cls=ok_classes)
    expect_error("blockdev-add", {"driver": "copy-before-write", "node-name": "cbw",
                                  "file": "nonexist", "target": "nonexist2"}, cls=ok_classes)
    expect_error("blockdev-backup", {"job-id": "j", "device": "nonexist",
                                     "target": "nonexist2", "sync": "none"}, cls=ok_classes)
    expect_error("block-job-cancel", {"device": "nonexist"},
                 cls=("DeviceNotActive", "CommandNotFound"))
    expect_error("object-add", {"qom-type": "tls-creds-psk", "id": "tls0",
                                "endpoint": "server", "dir": path("no-such-dir")},
                 cls=ok_classes)


# ------------------------------------------------------------------ checks: NBD server, exports

def test_server_and_exports():
    sock_a, sock_b = path("nbd-a.sock"), path("nbd-b.sock")
    expect_error("nbd-server-stop", _absent, "NBD server not running")
    expect_error("block-export-add", {"type": "nbd", "id": "x", "node-name": "d"})

    # inet on 127.0.0.1 (out of scope in §8: it may fail cleanly, or work)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    r = q.execute("nbd-server-start", {"addr": {"type": "inet", "data": {
        "host": "127.0.0.1", "port": str(port)}}})
    if "error" in r:
        print(f"  note: inet nbd-server-start refused: {r['error']}", flush=True)
        soft_check(r["error"]["class"] == "GenericError", f"inet refused with {r}")
        expect_error("nbd-server-stop", _absent, "NBD server not running")
    else:
        expect_error("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock_b}}},
                     "NBD server already running")
        soft_check(not os.path.exists(sock_b), "a refused nbd-server-start created its socket")
        export_add(id="tcp", **{"node-name": "d"})
        h = nbd.NBD()
        h.set_export_name("d")
        h.connect_tcp("127.0.0.1", str(port))
        soft_check(h.get_size() == DISK_SIZE, "size over tcp")
        soft_check(h.is_read_only(), "export without writable is read-only")
        h.shutdown()
        check(q.ok("nbd-server-stop") == {}, "nbd-server-stop")
        wait_export_deleted(["tcp"])
        soft_check(q.ok("query-block-exports") == [], "exports after nbd-server-stop")
        h = nbd.NBD()
        h.set_export_name("d")
        try:
            h.connect_tcp("127.0.0.1", str(port))
            soft_fail("tcp listener still accepts after nbd-server-stop")
        except nbd.Error:
            pass

    # unix, max-connections
    nbd_server_start(sock_a, **{"max-connections": 3})
    expect_error("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock_b}}},
                 "NBD server already running")
    soft_check(not os.path.exists(sock_b), "a refused nbd-server-start created its socket")
    expect_error("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock_a}},
                                      "max-connections": "3"})
    export_add(id="live", **{"node-name": "d"}, name="live", writable=True)
    export_add(id="ro-d", **{"node-name": "d"})          # name defaults to the node name
    want = [{"id": "live", "type": "nbd", "node-name": "d", "shutting-down": False},
            {"id": "ro-d", "type": "nbd", "node-name": "d", "shutting-down": False}]
    got = sorted(q.ok("query-block-exports"), key=lambda e: e.get("id"))
    soft_check(got == want, f"query-block-exports {got}, expected {want}")
    a, b = nbd_open(sock_a, "live"), nbd_open(sock_a, "d")
    soft_check(not a.is_read_only(), "writable export is read-only")
    soft_check(b.is_read_only(), "export without writable is writable")
    a.pwrite(b"live!", 1000)
    soft_check(bytes(b.pread(5, 1000)) == b"live!", "write on live not seen on d")
    a.shutdown()
    b.shutdown()
    soft_check(not nbd_connects(sock_a, "ro-d"),
               "export ro-d without a name is reachable by its id, not only its node name")

    # export errors
    expect_error("block-export-add", {"type": "nbd", "id": "live", "node-name": "o",
                                      "name": "other"},
                 "Block export id 'live' is already in use")
    expect_error("block-export-add", {"type": "nbd", "id": "x", "node-name": "o",
                                      "name": "live"},
                 "NBD server already has export named 'live'")
    expect_error("block-export-add", {"type": "nbd", "id": "x", "node-name": "nonexist"},
                 "Cannot find device='' nor node-name='nonexist'")
    expect_error("block-export-add", {"type": "bogus", "id": "x", "node-name": "o"},
                 "Parameter 'type' does not accept value 'bogus'")

    # in use by an export
    expect_error("blockdev-del", {"node-name": "d"}, "Node d is in use")
    expect_error("blockdev-del", {"node-name": "d-file"}, "Block device d-file is in use")

    # safe mode refused while a client is connected; hard mode disconnects
    expect_no_events("before block-export-del")
    h = nbd_open(sock_a, "live")
    pread_bounded(h, 512, 0)          # the client is surely in transmission
    for a in ({"id": "live"}, {"id": "live", "mode": "safe"}):
        expect_error("block-export-del", a, "export 'live' still in use")
    expect_no_events("after a refused block-export-del")
    try:
        soft_check(bytes(pread_bounded(h, 5, 1000)) == b"live!",
                   "client of a refused safe delete reads wrong data")
    except (nbd.Error, TimeoutError) as e:
        soft_fail(f"client not served after a refused safe delete: {e}")
    expect_error("block-export-del", {"id": "live", "mode": "bogus"},
                 "Parameter 'mode' does not accept value 'bogus'")
    expect_error("block-export-del", {"id": "e2"}, "Export 'e2' is not found")
    r = q.execute("block-export-del", {"id": "live", "mode": "hard"})
    soft_check(r == {"return": {}}, f"hard block-export-del answered {r}")
    before_return = [e for e in q.during if e.get("event") == "BLOCK_EXPORT_DELETED"]
    wait_export_deleted(["live"])
    if not before_return:
        print("  note: BLOCK_EXPORT_DELETED came after the return "
              "(QEMU 7.2 sends it before; clients accept both)", flush=True)
    deadline = time.monotonic() + 5
    while True:
        try:
            pread_bounded(h, 512, 0, secs=max(0.1, deadline - time.monotonic()))
        except (nbd.Error, TimeoutError):
            break
        if time.monotonic() > deadline:
            soft_fail("client of a hard-deleted export is still served")
            break
        time.sleep(0.1)
    del h
    soft_check([e["id"] for e in q.ok("query-block-exports")] == ["ro-d"],
               "exports after hard delete")
    soft_check(not nbd_connects(sock_a, "live"), "deleted export still connects")

    # the safe error names the export id (QEMU 7.2: "export '<id>' still in use")
    export_add(id="e-named", **{"node-name": "o"}, name="named")
    h = nbd_open(sock_a, "named")
    pread_bounded(h, 512, 0)
    expect_error("block-export-del", {"id": "e-named"}, "export 'e-named' still in use")
    # a client that disconnects is noticed within 5 s; safe delete then works
    h.shutdown()
    del h
    export_del_safe("e-named")

    # a client counts as connected as soon as its handshake is done: a safe
    # delete right after nbd_connect returned must be refused too
    raced = 0
    for i in range(10):
        export_add(id=f"race{i}", **{"node-name": "o"}, name=f"race{i}")
        h = nbd_open(sock_a, f"race{i}")
        r = q.execute("block-export-del", {"id": f"race{i}"})
        if "return" in r:
            raced += 1
        else:
            soft_check(r.get("error") == {"class": "GenericError",
                                          "desc": f"export 'race{i}' still in use"},
                       f"safe delete right after connect: {r}")
            q.ok("block-export-del", {"id": f"race{i}", "mode": "hard"})
        wait_export_deleted([f"race{i}"])
        del h
    soft_check(raced == 0, f"safe block-export-del right after a client's handshake "
               f"completed was accepted {raced} of 10 times (the client was then cut off)")

    # max-connections 3: three clients at once
    hs = []
    try:
        for i in range(3):
            hs.append(nbd_open(sock_a, "d"))
        for c in hs:
            pread_bounded(c, 512, 0)
    except (nbd.Error, TimeoutError) as e:
        soft_fail(f"three clients with max-connections 3: {e}")
    for c in hs:
        c.shutdown()

    # bitmaps on exports
    for name, extra in [("eb", {}), ("db", {"disabled": True}), ("x1", {}),
                        ("ob", {})]:
        q.ok("block-dirty-bitmap-add", dict(node="d", name=name, **extra))
    q.ok("block-dirty-bitmap-add", {"node": "o", "name": "ob"})
    x = {"type": "nbd", "id": "x", "node-name": "d", "name": "x"}
    expect_error("block-export-add", dict(x, bitmaps=["nope"]), "Bitmap 'nope' is not found")
    # (QEMU 7.2 words this one "Dirty bitmap 'nope' not found": class only)
    expect_error("block-export-add", dict(x, bitmaps=[{"node": "d", "name": "nope"}]))
    expect_error("block-export-add", dict(x, bitmaps=[{"node": "nonexist", "name": "eb"}]))
    expect_error("block-export-add", dict(x, bitmaps=["eb"]),
                 "Enabled bitmap 'eb' incompatible with readonly export")
    expect_error("block-export-add", dict(x, writable=False, bitmaps=["db", "x1"]),
                 "Enabled bitmap 'x1' incompatible with readonly export")
    export_add(id="bm-ro", **{"node-name": "d"}, name="bm-ro", bitmaps=["db"])
    export_add(id="bm-rw", **{"node-name": "d"}, name="bm-rw", writable=True,
               bitmaps=["x1", {"node": "d", "name": "eb"}, {"node": "o", "name": "ob"}])
    for node, name, busy in [("d", "db", True), ("d", "x1", True), ("d", "eb", True),
                             ("o", "ob", True), ("d", "ob", False)]:
        expect_bitmap(node, name, busy=busy)
    expect_error("block-export-add", {"type": "nbd", "id": "x", "node-name": "d",
                                      "name": "x", "writable": True, "bitmaps": ["db"]},
                 BUSY.format("db"))
    expect_error("block-export-add", {"type": "nbd", "id": "x", "node-name": "d",
                                      "name": "x", "writable": True,
                                      "bitmaps": [{"node": "o", "name": "ob"}]},
                 BUSY.format("ob"))
    # busy bitmaps refuse every bitmap command
    for cmd in ("remove", "clear", "enable", "disable"):
        expect_error("block-dirty-bitmap-" + cmd, {"node": "d", "name": "x1"},
                     BUSY.format("x1"))
    expect_error("block-dirty-bitmap-merge", {"node": "d", "target": "x1",
                                              "bitmaps": ["ob"]}, BUSY.format("x1"))
    expect_error("block-dirty-bitmap-merge", {"node": "d", "target": "ob",
                                              "bitmaps": ["x1"]}, BUSY.format("x1"))
    expect_error("block-dirty-bitmap-merge", {"node": "d", "target": "ob",
                                              "bitmaps": [{"node": "o", "name": "ob"}]},
                 BUSY.format("ob"))
    # meta contexts
    ctx = "qemu:dirty-bitmap:"
    h = nbd_open(sock_a, "bm-rw", [ctx + "x1", ctx + "eb", ctx + "ob", ctx + "db",
                                   ctx + "nope"])
    for name, want in [("x1", True), ("eb", True), ("ob", True), ("db", False),
                       ("nope", False)]:
        soft_check(h.can_meta_context(ctx + name) == want,
                   f"export bm-rw: meta context {ctx + name} negotiated: "
                   f"{h.can_meta_context(ctx + name)}")
    h.shutdown()
    h = nbd_open(sock_a, "bm-ro", [ctx + "db", ctx + "x1"])
    soft_check(h.can_meta_context(ctx + "db"), "export bm-ro lacks qemu:dirty-bitmap:db")
    soft_check(not h.can_meta_context(ctx + "x1"), "export bm-ro has qemu:dirty-bitmap:x1")
    h.shutdown()
    # deleting an export un-busies its bitmaps
    export_del_safe("bm-ro")
    expect_bitmap("d", "db", busy=False)
    expect_bitmap("d", "x1", busy=True)

    # nbd-server-stop removes every export, one event each, and disconnects
    h = nbd_open(sock_a, "bm-rw")
    check(q.ok("nbd-server-stop") == {}, "nbd-server-stop")
    wait_export_deleted(["bm-rw", "ro-d"])
    soft_check(q.ok("query-block-exports") == [], "exports after nbd-server-stop")
    for node, name in [("d", "x1"), ("d", "eb"), ("o", "ob")]:
        expect_bitmap(node, name, busy=False)
    try:
        pread_bounded(h, 512, 0)
        soft_fail("client still served after nbd-server-stop")
    except (nbd.Error, TimeoutError):
        pass
    del h
    soft_check(not nbd_connects(sock_a, "d"), "NBD socket still accepts after nbd-server-stop")
    expect_error("nbd-server-stop", _absent, "NBD server not running")

    # a new server without max-connections has no limit of 3
    nbd_server_start(sock_b)
    export_add(id="ro-d", **{"node-name": "d"})
    hs = []
    try:
        for i in range(5):
            hs.append(nbd_open(sock_b, "d"))
        for c in hs:
            pread_bounded(c, 512, 0)
    except (nbd.Error, TimeoutError) as e:
        soft_fail(f"5 clients after restarting without max-connections "
                  f"(the earlier server had max-connections 3): {e}")
    for c in hs:
        c.shutdown()
    export_del_safe("ro-d")
    for node, name in [("d", "db"), ("d", "eb"), ("d", "x1"), ("d", "ob"), ("o", "ob")]:
        q.ok("block-dirty-bitmap-remove", {"node": node, "name": name})
    for n in query_nodes():
        soft_check("dirty-bitmaps" not in n, f"node {n['node-name']} still lists "
                   f"bitmaps after all were removed: {n.get('dirty-bitmaps')}")
    # the server keeps running for the next checks (socket nbd-b.sock)


# ------------------------------------------------------------------ checks: bitmaps

def test_bitmaps():
    sock = path("nbd-b.sock")
    export_add(id="w", **{"node-name": "d"}, name="w", writable=True)
    # add, defaults, exact query entry
    check(q.ok("block-dirty-bitmap-add", {"node": "d", "name": "b0"}) == {}, "add b0")
    b = bitmap("d", "b0")
    soft_check(b == {"name": "b0", "recording": True, "persistent": False, "busy": False,
                     "granularity": 65536, "count": 0}, f"b0 listed as {b}")
    # granularity validation
    for g in (65535, 256, 0, 196608, 511, 1):
        expect_error("block-dirty-bitmap-add", {"node": "d", "name": "g", "granularity": g},
                     GRAN)
    for g in (2 ** 32, 2 ** 40):
        expect_error("block-dirty-bitmap-add", {"node": "d", "name": "g", "granularity": g},
                     "Parameter 'granularity' expects uint32_t")
    for g in ("64k", 1.5, "65536", None, True):
        expect_error("block-dirty-bitmap-add", {"node": "d", "name": "g", "granularity": g},
                     "Parameter 'granularity' expects uint64")
    for name, g in [("b512", 512), ("bbig", 2 ** 31), ("b1m", MiB)]:
        q.ok("block-dirty-bitmap-add", {"node": "d", "name": name, "granularity": g})
        expect_bitmap("d", name, granularity=g, count=0, recording=True)
    # names, nodes
    expect_error("block-dirty-bitmap-add", {"node": "d", "name": "b0"},
                 "Bitmap already exists: b0")
    expect_error("block-dirty-bitmap-add", {"node": "d", "name": "b0", "granularity": 512},
                 "Bitmap already exists: b0")
    expect_error("block-dirty-bitmap-add", {"node": "d", "name": ""},
                 "Bitmap name cannot be empty")
    long_name = "n" * 1024
    expect_error("block-dirty-bitmap-add", {"node": "d", "name": long_name},
                 "Bitmap name too long: " + long_name)
    q.ok("block-dirty-bitmap-add", {"node": "d", "name": "n" * 1023})
    q.ok("block-dirty-bitmap-remove", {"node": "d", "name": "n" * 1023})
    expect_error("block-dirty-bitmap-add", {"node": "no-such-node", "name": "x"},
                 "Cannot find device='no-such-node' nor node-name='no-such-node'")
    expect_error("block-dirty-bitmap-add", {"node": "d"}, "Parameter 'name' is missing")
    expect_error("block-dirty-bitmap-add", {"node": "d", "name": "x", "disabled": "yes"},
                 "Invalid parameter type for 'disabled', expected: boolean")
    # disabled, persistent (§9.4: fleeced accepts persistent on raw nodes)
    q.ok("block-dirty-bitmap-add", {"node": "d", "name": "bd", "disabled": True})
    expect_bitmap("d", "bd", recording=False, count=0, persistent=False)
    if args.qemu:
        expect_error("block-dirty-bitmap-add", {"node": "d", "name": "pb",
                                                "persistent": True},
                     "Can't store persistent bitmaps to d: Operation not supported")
    else:
        q.ok("block-dirty-bitmap-add", {"node": "d", "name": "pb", "persistent": True,
                                        "granularity": 4096})
        expect_bitmap("d", "pb", persistent=True, recording=True, granularity=4096,
                      count=0)
        q.ok("block-dirty-bitmap-remove", {"node": "d", "name": "pb"})
        soft_check("pb" not in bitmaps("d"), "persistent bitmap not removed")

    # recording: writes and write-zeroes, partial granules count
    h = nbd_open(sock, "w")
    h.pwrite(b"x", 70000)                 # 64k granule 1; 512 granule 136
    h.pwrite(b"y" * 100, 65500)           # 64k 0,1; 512 127,128
    h.pwrite(b"z", DISK_SIZE - 1)         # 64k 63; 512 8191
    h.zero(4096, MiB)                     # 64k 16; 512 2048..2055
    h.flush()
    expect_bitmap("d", "b0", count=4 * 65536)
    expect_bitmap("d", "b512", count=12 * 512)
    expect_bitmap("d", "b1m", count=3 * MiB)          # MiB granules 0, 1 and 3
    expect_bitmap("d", "bd", count=0, recording=False)
    # §3.8: count is capped at the disk size (QEMU 7.2 itself reports 2^31)
    expect_bitmap("d", "bbig", count=2 ** 31 if args.qemu else DISK_SIZE)

    # clear
    q.ok("block-dirty-bitmap-clear", {"node": "d", "name": "b512"})
    expect_bitmap("d", "b512", count=0, recording=True)
    # disable / enable, idempotent
    q.ok("block-dirty-bitmap-disable", {"node": "d", "name": "b0"})
    q.ok("block-dirty-bitmap-disable", {"node": "d", "name": "b0"})
    expect_bitmap("d", "b0", recording=False, count=4 * 65536)
    h.pwrite(b"w", 2 * MiB + 1)
    expect_bitmap("d", "b0", count=4 * 65536)
    expect_bitmap("d", "b512", count=512)
    q.ok("block-dirty-bitmap-enable", {"node": "d", "name": "b0"})
    q.ok("block-dirty-bitmap-enable", {"node": "d", "name": "b0"})
    expect_bitmap("d", "b0", recording=True)
    h.pwrite(b"w", 2 * MiB + 1)
    expect_bitmap("d", "b0", count=5 * 65536)
    q.ok("block-dirty-bitmap-enable", {"node": "d", "name": "bd"})
    expect_bitmap("d", "bd", recording=True, count=0)
    q.ok("block-dirty-bitmap-disable", {"node": "d", "name": "bd"})
    expect_bitmap("d", "bd", recording=False)
    # errors of remove/clear/enable/disable
    for cmd in ("remove", "clear", "enable", "disable"):
        expect_error("block-dirty-bitmap-" + cmd, {"node": "d", "name": "b2"},
                     "Dirty bitmap 'b2' not found")
        expect_error("block-dirty-bitmap-" + cmd, {"node": "no-such-node", "name": "b0"})
        expect_error("block-dirty-bitmap-" + cmd, {"node": "d"}, "Parameter 'name' is missing")
        expect_error("block-dirty-bitmap-" + cmd, {"node": "d", "name": "b0", "x": 1},
                     "Parameter 'x' is unexpected")
    # remove
    q.ok("block-dirty-bitmap-remove", {"node": "d", "name": "b1m"})
    soft_check("b1m" not in bitmaps("d"), "removed bitmap still listed")
    expect_error("block-dirty-bitmap-remove", {"node": "d", "name": "b1m"},
                 "Dirty bitmap 'b1m' not found")

    # merge: sources of other granularities, both reference forms
    for name in ("b0", "b512", "bbig", "bd"):
        q.ok("block-dirty-bitmap-remove", {"node": "d", "name": name})
    q.ok("block-dirty-bitmap-add", {"node": "d", "name": "s512", "granularity": 512})
    q.ok("block-dirty-bitmap-add", {"node": "d", "name": "s64"})
    h.pwrite(b"y" * 100, 65500)           # 64k 0,1; 512 127,128
    h.pwrite(b"z", DISK_SIZE - 1)         # 64k 63; 512 8191
    for name in ("s512", "s64"):
        q.ok("block-dirty-bitmap-disable", {"node": "d", "name": name})
    expect_bitmap("d", "s512", count=3 * 512)
    expect_bitmap("d", "s64", count=3 * 65536)
    q.ok("block-dirty-bitmap-add", {"node": "d", "name": "t1", "granularity": 512,
                                    "disabled": True})
    q.ok("block-dirty-bitmap-merge", {"node": "d", "target": "t1",
                                      "bitmaps": [{"node": "d", "name": "s64"}]})
    expect_bitmap("d", "t1", count=3 * 65536, granularity=512, recording=False)
    q.ok("block-dirty-bitmap-add", {"node": "d", "name": "t2", "disabled": True})
    q.ok("block-dirty-bitmap-merge", {"node": "d", "target": "t2", "bitmaps": ["s512"]})
    expect_bitmap("d", "t2", count=3 * 65536, granularity=65536)
    q.ok("block-dirty-bitmap-add", {"node": "d", "name": "t3", "granularity": 512,
                                    "disabled": True})
    q.ok("block-dirty-bitmap-merge", {"node": "d", "target": "t3",
                                      "bitmaps": ["s512", {"node": "d", "name": "s512"}]})
    expect_bitmap("d", "t3", count=3 * 512)
    # sources unchanged; merging into a recording target
    expect_bitmap("d", "s512", count=3 * 512)
    expect_bitmap("d", "s64", count=3 * 65536)
    # a bitmap on another node of the same size
    q.ok("block-dirty-bitmap-add", {"node": "o", "name": "tb"})
    export_add(id="ot", **{"node-name": "o"}, name="ot", writable=True)
    t = nbd_open(sock, "ot")
    t.pwrite(b"t" * 65536, 131072)
    t.flush()
    expect_bitmap("o", "tb", count=65536)
    q.ok("block-dirty-bitmap-merge", {"node": "d", "target": "t3",
                                      "bitmaps": [{"node": "o", "name": "tb"}]})
    expect_bitmap("d", "t3", count=3 * 512 + 65536)
    # trim on a node with discard=unmap dirties its granule (§3.7)
    q.ok("block-dirty-bitmap-clear", {"node": "o", "name": "tb"})
    t.trim(65536, 131072)
    t.flush()
    expect_bitmap("o", "tb", count=65536)
    t.shutdown()
    export_del_safe("ot")
    # merge errors
    expect_error("block-dirty-bitmap-merge", {"node": "d", "target": "nope",
                                              "bitmaps": ["s64"]},
                 "Dirty bitmap 'nope' not found")
    expect_error("block-dirty-bitmap-merge", {"node": "d", "target": "t2",
                                              "bitmaps": ["s64", "nope"]},
                 "Dirty bitmap 'nope' not found")
    expect_error("block-dirty-bitmap-merge", {"node": "d", "target": "t2",
                                              "bitmaps": [{"node": "o", "name": "nope"}]},
                 "Dirty bitmap 'nope' not found")
    expect_error("block-dirty-bitmap-merge", {"node": "d", "target": "t2",
                                              "bitmaps": [{"node": "no-such-node",
                                                           "name": "s64"}]})
    expect_error("block-dirty-bitmap-merge", {"node": "d", "target": "t2"},
                 "Parameter 'bitmaps' is missing")
    if not args.qemu:      # §9.3: QEMU 7.2 crashes on it
        expect_error("block-dirty-bitmap-merge", {"node": "d", "target": "t2",
                                                  "bitmaps": []})
    # busy source / target (exported)
    export_add(id="ms", **{"node-name": "d"}, name="ms", bitmaps=["s64"])
    expect_error("block-dirty-bitmap-merge", {"node": "d", "target": "t2",
                                              "bitmaps": ["s512", "s64"]}, BUSY.format("s64"))
    expect_error("block-dirty-bitmap-merge", {"node": "d", "target": "s64",
                                              "bitmaps": ["s512"]}, BUSY.format("s64"))
    # the exported bitmap's extents add up to its count (§6.1)
    r = nbd_open(sock, "ms", ["qemu:dirty-bitmap:s64"])
    ext = dirty_extents(r, "qemu:dirty-bitmap:s64", DISK_SIZE)
    soft_check(ext == [(0, 131072), (DISK_SIZE - 65536, 65536)],
               f"qemu:dirty-bitmap:s64 dirty extents {ext}")
    r.shutdown()
    export_del_safe("ms")
    h.shutdown()
    export_del_safe("w")
    for name in ("s512", "s64", "t1", "t2", "t3"):
        q.ok("block-dirty-bitmap-remove", {"node": "d", "name": name})
    q.ok("block-dirty-bitmap-remove", {"node": "o", "name": "tb"})


# ------------------------------------------------------------------ checks: transaction

def txn(*actions):
    return {"actions": [{"type": t, "data": d} for t, d in actions]}


def test_transaction():
    sock = path("nbd-b.sock")
    export_add(id="w", **{"node-name": "d"}, name="w", writable=True)
    h = nbd_open(sock, "w")
    q.ok("block-dirty-bitmap-add", {"node": "d", "name": "p0"})
    q.ok("block-dirty-bitmap-add", {"node": "d", "name": "p1"})
    q.ok("block-dirty-bitmap-add", {"node": "d", "name": "p2"})
    q.ok("block-dirty-bitmap-add", {"node": "d", "name": "mt", "disabled": True})
    h.pwrite(b"a", 0)                                   # p0 p1 p2: granule 0
    q.ok("block-dirty-bitmap-disable", {"node": "d", "name": "p1"})
    q.ok("block-dirty-bitmap-clear", {"node": "d", "name": "p2"})
    h.pwrite(b"b", 65536)                               # p0 p2: granule 1
    # p0: rec {0,1}; p1: disabled {0}; p2: rec {1}; mt: disabled {}
    expect_bitmap("d", "p0", count=131072, recording=True)
    expect_bitmap("d", "p1", count=65536, recording=False)
    expect_bitmap("d", "p2", count=65536, recording=True)
    expect_bitmap("d", "mt", count=0, recording=False)

    # everything at once
    r = q.execute("transaction", txn(
        ("block-dirty-bitmap-add", {"node": "d", "name": "n1", "granularity": 512}),
        ("block-dirty-bitmap-disable", {"node": "d", "name": "p0"}),
        ("block-dirty-bitmap-merge", {"node": "d", "target": "mt",
                                      "bitmaps": ["p1", {"node": "d", "name": "p2"}]}),
        ("block-dirty-bitmap-clear", {"node": "d", "name": "p2"}),
        ("block-dirty-bitmap-enable", {"node": "d", "name": "p1"}),
        ("block-dirty-bitmap-disable", {"node": "d", "name": "n1"})))
    check(r == {"return": {}}, f"transaction answered {r}")
    expect_bitmap("d", "n1", count=0, recording=False, granularity=512)
    expect_bitmap("d", "p0", count=131072, recording=False)
    expect_bitmap("d", "p1", count=65536, recording=True)
    expect_bitmap("d", "p2", count=0, recording=True)
    expect_bitmap("d", "mt", count=131072, recording=False)
    h.pwrite(b"c", 2 * 65536)                           # p1 p2: granule 2
    expect_bitmap("d", "p1", count=2 * 65536)
    expect_bitmap("d", "p2", count=65536)
    expect_bitmap("d", "p0", count=131072)
    # p0: disabled {0,1}; p1: rec {0,2}; p2: rec {2}; mt: disabled {0,1}; n1

    # one failing action: the earlier ones are rolled back, whatever they were
    cases = [
        ("duplicate add last", txn(
            ("block-dirty-bitmap-add", {"node": "d", "name": "f1"}),
            ("block-dirty-bitmap-clear", {"node": "d", "name": "p0"}),
            ("block-dirty-bitmap-disable", {"node": "d", "name": "p2"}),
            ("block-dirty-bitmap-enable", {"node": "d", "name": "p0"}),
            ("block-dirty-bitmap-merge", {"node": "d", "target": "mt", "bitmaps": ["p2"]}),
            ("block-dirty-bitmap-add", {"node": "d", "name": "p0"})),
         "Bitmap already exists: p0"),
        ("unknown node last", txn(
            ("block-dirty-bitmap-add", {"node": "d", "name": "f2", "disabled": True}),
            ("block-dirty-bitmap-merge", {"node": "d", "target": "p1",
                                          "bitmaps": [{"node": "d", "name": "mt"}]}),
            ("block-dirty-bitmap-add", {"node": "no-such-node", "name": "f3"})),
         "Cannot find device='no-such-node' nor node-name='no-such-node'"),
        ("add, use, abort", txn(
            ("block-dirty-bitmap-add", {"node": "d", "name": "f4"}),
            ("block-dirty-bitmap-disable", {"node": "d", "name": "f4"}),
            ("block-dirty-bitmap-merge", {"node": "d", "target": "f4", "bitmaps": ["p1"]}),
            ("block-dirty-bitmap-clear", {"node": "d", "name": "p1"}),
            ("abort", {})),
         "Transaction aborted using Abort action"),
        ("abort alone", txn(("abort", {})), "Transaction aborted using Abort action"),
        ("abort first", txn(("abort", {}),
                            ("block-dirty-bitmap-add", {"node": "d", "name": "f5"})),
         "Transaction aborted using Abort action"),
        ("unknown bitmap", txn(
            ("block-dirty-bitmap-clear", {"node": "d", "name": "p1"}),
            ("block-dirty-bitmap-disable", {"node": "d", "name": "nope"})),
         "Dirty bitmap 'nope' not found"),
        ("bad granularity", txn(
            ("block-dirty-bitmap-enable", {"node": "d", "name": "mt"}),
            ("block-dirty-bitmap-add", {"node": "d", "name": "f6", "granularity": 1000})),
         GRAN),
        ("unknown action type", txn(
            ("block-dirty-bitmap-add", {"node": "d", "name": "f7"}),
            ("block-dirty-bitmap-bogus", {"node": "d", "name": "p0"})),
         "Parameter 'type' does not accept value 'block-dirty-bitmap-bogus'"),
    ]
    if not args.qemu:
        cases.append(("empty merge", txn(
            ("block-dirty-bitmap-add", {"node": "d", "name": "f8"}),
            ("block-dirty-bitmap-merge", {"node": "d", "target": "mt", "bitmaps": []})),
            None))
    for what, a, desc in cases:
        expect_error("transaction", a, desc, what=f"transaction ({what})")
    # recording still as before the failed transactions (p2 was disabled in one)
    h.pwrite(b"d", 3 * 65536)                           # p1 p2: granule 3
    expect_bitmap("d", "p2", count=2 * 65536, recording=True)
    expect_bitmap("d", "p1", count=3 * 65536, recording=True)
    expect_bitmap("d", "p0", count=131072, recording=False)
    # busy bitmap in a transaction
    export_add(id="tb", **{"node-name": "d"}, name="tb", bitmaps=["p0"])
    expect_error("transaction", txn(
        ("block-dirty-bitmap-add", {"node": "d", "name": "f9"}),
        ("block-dirty-bitmap-clear", {"node": "d", "name": "p0"})),
        BUSY.format("p0"), what="transaction (busy bitmap)")
    q.ok("block-export-del", {"id": "tb"})
    wait_export_deleted(["tb"])
    # envelope errors
    expect_error("transaction", {}, "Parameter 'actions' is missing")
    expect_error("transaction", {"actions": [{"type": "abort"}]},
                 "Parameter 'actions[0].data' is missing")
    expect_error("transaction", {"actions": {"type": "abort", "data": {}}})
    # an empty transaction succeeds and changes nothing
    before = state()
    check(q.ok("transaction", {"actions": []}) == {}, "empty transaction")
    soft_check(state() == before, "empty transaction changed state")
    h.shutdown()
    export_del_safe("w")


# ------------------------------------------------------------------ checks: reconnect, quit

def reconnect(negotiate=True):
    global q
    q.close()
    q = Qmp(args.qmp, negotiate=negotiate)


def test_reconnect():
    q.ok("block-dirty-bitmap-add", {"node": "d", "name": "keep", "granularity": 4096})
    before = state()
    # disconnect in the middle of a command; the next client starts clean
    q.send('{"execute": "block-dirty-bitmap-add", "arguments": {"node": "d", "na')
    reconnect(negotiate=False)
    check("QMP" in q.greeting, f"greeting after reconnect: {q.greeting}")
    r = q.execute("query-block-exports", id="again")
    soft_check(r == {"id": "again", "error": {"class": "CommandNotFound",
                                              "desc": NOT_NEGOTIATED}},
               f"command before negotiation on a new connection: {r}")
    check(q.execute("qmp_capabilities") == {"return": {}}, "negotiation after reconnect")
    soft_check(state() == before, f"state after reconnect: {diff_state(before, state())}")
    # several quick reconnects, with and without negotiating
    for i in range(5):
        reconnect(negotiate=bool(i % 2))
    reconnect()
    soft_check(state() == before, "state after several reconnects")
    expect_bitmap("d", "keep", granularity=4096)
    # a client that only half-closes still gets its answer
    q.send('{"execute": "query-block-exports", "id": "last"}\n')
    q.sock.shutdown(socket.SHUT_WR)
    r = q.response()
    soft_check(r.get("id") == "last" and "return" in r, f"answer after SHUT_WR: {r}")
    reconnect()
    q.ok("block-dirty-bitmap-remove", {"node": "d", "name": "keep"})


def test_quit():
    r = q.execute("quit", id="bye")
    check(r == {"return": {}, "id": "bye"}, f"quit answered {r}")
    # then the server closes the socket
    deadline = time.monotonic() + 10
    while True:
        try:
            msg = q.recv(timeout=max(0.1, deadline - time.monotonic()))
        except Closed:
            break
        except ConnectionResetError:
            break
        except socket.timeout:
            soft_fail("control socket still open 10 s after quit")
            break
        soft_check("event" in msg, f"message after quit's return: {msg}")


# ------------------------------------------------------------------ command-line export mode

def test_cmdline_nodes():
    nodes = {n["node-name"]: n for n in query_nodes()}
    soft_check(sorted(nodes) == ["disk0", "disk0-file"],
               f"command-line export nodes {sorted(nodes)}")
    for n in nodes.values():
        soft_check("dirty-bitmaps" not in n, f"{n['node-name']} lists dirty-bitmaps")
    expect_error("blockdev-del", {"node-name": "disk0"}, "Node disk0 is in use")
    expect_error("blockdev-del", {"node-name": "disk0-file"},
                 "Block device disk0-file is in use")
    expect_error("blockdev-add", {"driver": "file", "node-name": "disk0-file",
                                  "filename": args.image},
                 "Duplicate nodes with node-name='disk0-file'")
    # a bitmap on the command-line node records writes through its export
    q.ok("block-dirty-bitmap-add", {"node": "disk0", "name": "b0", "granularity": 4096})
    h = nbd_open(args.nbd_socket, "disk0")
    h.pwrite(b"q" * 10, 4090)
    h.flush()
    h.shutdown()
    expect_bitmap("disk0", "b0", count=2 * 4096, recording=True, busy=False)
    expect_error("block-dirty-bitmap-add", {"node": "disk0", "name": "b0"},
                 "Bitmap already exists: b0")


# ------------------------------------------------------------------ main

MAIN = [test_wire, test_ids, test_stream, test_malformed, test_arguments, test_blockdev,
        test_later_commands_fail_cleanly, test_server_and_exports, test_bitmaps,
        test_transaction, test_reconnect, test_quit]
CMDLINE = [test_cmdline_nodes, test_quit]


def main():
    global args, q, current
    p = argparse.ArgumentParser()
    p.add_argument("--qmp", required=True, help="control socket path")
    p.add_argument("--dir", required=True, help="scratch directory (images, sockets)")
    p.add_argument("--mode", choices=("main", "cmdline"), default="main")
    p.add_argument("--image", help="cmdline mode: the export's image")
    p.add_argument("--nbd-socket", help="cmdline mode: the --listen socket")
    p.add_argument("--qemu", action="store_true",
                   help="the server is qemu-storage-daemon 7.2 (checks the checks)")
    p.add_argument("--only", help="run only these checks (comma list)")
    args = p.parse_args()
    if args.mode == "main":
        make_image("disk.img", DISK_SIZE)
        make_image("other.img", DISK_SIZE)
        make_image("small.img", MiB)
    tests = MAIN if args.mode == "main" else CMDLINE
    if args.only:
        want = set(args.only.split(","))
        tests = [t for t in tests if t.__name__[5:] in want]
    q = Qmp(args.qmp, negotiate=(tests[:1] != [test_wire]))
    for t in tests:
        current = t.__name__[5:]
        print(f"{current} ...", flush=True)
        n_before = len(failures)
        faulthandler.dump_traceback_later(SECTION_TIMEOUT, exit=True)
        broken = False
        try:
            t()
        except CheckFailed as e:
            failures.append(f"{current}: {e}")
            print(f"  FAIL {e}", flush=True)
            broken = True
        except Exception as e:  # noqa: BLE001 - report everything
            failures.append(f"{current}: {type(e).__name__}: {e}")
            print(f"  FAIL {type(e).__name__}: {e}", flush=True)
            traceback.print_exc(limit=4)
            broken = True
        finally:
            faulthandler.cancel_dump_traceback_later()
        if len(failures) == n_before:
            print("  ok", flush=True)
        if broken and t is not test_quit:
            try:           # give the next check a clean, negotiated connection
                reconnect()
                q.drain_events(0.1)
            except Exception as e:  # noqa: BLE001
                failures.append(f"cannot reconnect after {current}: {e}; "
                                f"remaining checks skipped")
                break
    if failures:
        print(f"\n{len(failures)} failure(s):", file=sys.stderr)
        for f in failures:
            print(f"  {f}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

# SPDX-License-Identifier: MIT
"""Persistent dirty bitmaps survive kill -9 under write load.

Run by interop/bitmap-crash.sh, once per server start:

  round N   (the server was just started, by the script)
            1. QMP: add the nodes (blockdev-add file + raw, or nothing when
               the disk came from --export on the command line), start the
               NBD server and export disk0 writable; round 0 also adds the
               persistent bitmaps b64k (default granularity) and b4k.
            2. Check the bitmaps came back: present, persistent, recording,
               granularity, not inconsistent, not busy.
            3. Read both bitmaps through NBD block status (a read-only export
               "bmcheck" with both bitmaps, deleted again afterwards) and
               compare them with the write log (below).
            4. Unless --no-write: random writes and write-zeroes on two
               connections, 8 requests in flight on each (odd offsets and
               lengths, 1 B to 1 MiB, 40 % of them in the first 8 MiB so
               that granules are written again), QMP clears of one or both
               bitmaps at random moments while writes are in flight (always
               when more than half of a bitmap's granules may be dirty),
               and kill -9 of the server (by its PID, --pid) 5-300 ms into
               the writes, right after the first requests (12 % of the
               rounds), or within 3 ms of sending a clear (a quarter of the
               rounds with clears).
  summary   totals over the whole log; the script prints them.

The write log (--log) is appended to with write(2) as things happen (this
process is never the one killed, so nothing written to the log is lost; no
fsync is needed).  One record per line:

  R r mode            round r starts writing (server alive, bitmaps checked)
  W r s off len seed  pwrite number s of round r, logged BEFORE it is issued;
                      its payload is random.Random(seed).randbytes(len)
  Z r s off len flags write-zeroes, logged before it is issued
  A r s               the server acknowledged s (logged after the reply)
  F r s errno         s failed (ENOTCONN once the server is gone)
  CB r name s1,s2|-   clear of bitmap name sent (logged before sending);
                      the requests listed were in flight at that moment
  CD r name           the clear returned success
  CE r name           the clear returned an error
  K r ms              SIGKILL sent, ms after the writes started
  L r s               found by the next round: s was never acknowledged, but
                      its payload is in the image, so its data was written
  V r name required dirty false-positives window allowed granules
    unacked-clean digest
                      one verification of one bitmap (statistics, granule
                      counts; see verify())

What must hold after every restart, per bitmap (design doc section 4,
control-api.md 9.4):

* A granule is REQUIRED to be dirty when a write touching it was
  acknowledged, or was not acknowledged but its data reached the image
  (an L record; found by comparing the image with the payload, for pwrites
  of >= 8 bytes), and no clear of the bitmap was sent after that write was
  logged.  A write that was merely logged (queued in libnbd, in the socket,
  or waiting in the server for its bitmap commit) when the server died may
  have never reached the image; then its granules may be clean, and that is
  correct.  What is never allowed is data in the image that the bitmap
  does not cover.
* Writes around a clear are ambiguous (they may have been marked before the
  clear took effect): the requests in flight when the clear was sent, and
  the ones logged between sending it and its reply, or until the server
  died if it died first.  Those granules may be dirty or clean; after a
  clear that did not return, everything before it is ambiguous too (a
  crash in the middle of the clear's sync may leave some of the old bits).
* A granule may be dirty only if some logged write (since the last clear
  that returned, counting that clear's ambiguous writes) touched it.  By
  the ordering rules, bits only ever come from marks of requests the server
  received, so a dirty granule outside that set is a bug; the bound on
  these "unexplained" granules is 0.  Dirty granules inside the set but not
  required are allowed.  Those in a clear window are not counted as false
  positives (either state is right there).  The others, the false
  positives, can only be granules of unacknowledged requests whose data is
  not in the image: marked, but killed before the data write, or a
  write-zeroes (which cannot be told apart from old zeroes).  With at most
  16 requests in flight at each crash against hundreds acknowledged per
  round, they must stay under 5 % of the dirty granules over the run
  (summary --max-fp-percent); in practice they are about 1 %.
* The bitmaps are identical across a clean stop and restart without
  writes (--same-as-previous).

Exit status 0 when everything holds, 1 otherwise.
"""

import argparse
import errno
import hashlib
import json
import os
import random
import select
import signal
import socket
import sys
import time
import traceback

import nbd

KiB, MiB = 1 << 10, 1 << 20
NODE = "disk0"              # raw node (also the command-line disk's name)
FILE_NODE = "disk0-file"
EXPORT = "disk0"            # writable export the writers use
CHECK_EXPORT = "bmcheck"    # read-only export of both bitmaps, per check
BITMAPS = {"b64k": 65536, "b4k": 4096}   # b64k is added without granularity
DB = "qemu:dirty-bitmap:"
NCONN = 2                   # writer connections
QD = 8                      # requests in flight per connection
HOT = 8 * MiB               # part of the writes go to [0, HOT)
QMP_TIMEOUT = 10


class CheckFailed(Exception):
    pass


def fail(msg):
    raise CheckFailed(msg)


def check(cond, msg):
    if not cond:
        fail(msg)


def granule_mask(off, length, g):
    """Bit set of the granules touched by [off, off+length)."""
    a = off // g
    b = (off + length - 1) // g + 1
    return ((1 << (b - a)) - 1) << a


def bits(mask):
    """Indices of the set bits of mask, lowest first."""
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


def payload(seed, n):
    return random.Random(seed).randbytes(n)


# ------------------------------------------------------------------ QMP

class QmpGone(Exception):
    pass


class Qmp:
    """Minimal QMP client; commands carry ids so replies can be polled."""

    def __init__(self, path, timeout=QMP_TIMEOUT):
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.s = s
        self.buf = b""
        self.msgs = []
        self.replies = {}
        self.next_id = 0
        while not self.msgs:
            self._fill(deadline - time.monotonic())
        greeting = self.msgs.pop(0)
        check("QMP" in greeting, f"bad QMP greeting {greeting}")
        self.cmd("qmp_capabilities")

    def fileno(self):
        return self.s.fileno()

    def _fill(self, timeout):
        """Read what is there (wait up to timeout s); False if nothing."""
        if timeout < 0:
            raise TimeoutError("QMP reply timed out")
        r, _, _ = select.select([self.s], [], [], timeout)
        if not r:
            return False
        try:
            data = self.s.recv(65536)
        except OSError as e:
            raise QmpGone(str(e)) from e
        if not data:
            raise QmpGone("QMP connection closed")
        self.buf += data
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            if not line.strip():
                continue
            m = json.loads(line)
            if "event" in m:
                continue
            if "id" in m:
                self.replies[m["id"]] = m
            else:
                self.msgs.append(m)
        return True

    def send(self, execute, arguments=None):
        self.next_id += 1
        msg = {"execute": execute, "id": self.next_id}
        if arguments is not None:
            msg["arguments"] = arguments
        try:
            self.s.sendall(json.dumps(msg).encode() + b"\n")
        except OSError as e:
            raise QmpGone(str(e)) from e
        return self.next_id

    def poll(self, qid):
        """The reply to qid if it has arrived, else None (never blocks)."""
        while qid not in self.replies and self._fill(0):
            pass
        return self.replies.pop(qid, None)

    def cmd(self, execute, arguments=None, check_ok=True, timeout=QMP_TIMEOUT):
        qid = self.send(execute, arguments)
        deadline = time.monotonic() + timeout
        while qid not in self.replies:
            self._fill(deadline - time.monotonic())
        r = self.replies.pop(qid)
        if check_ok and "error" not in r:
            return r["return"]
        if check_ok:
            fail(f"QMP {execute} {json.dumps(arguments)}: {r['error']}")
        return r

    def close(self):
        self.s.close()


# ------------------------------------------------------------------ log

class Log:
    def __init__(self, path):
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def rec(self, *fields):
        os.write(self.fd, (" ".join(str(f) for f in fields) + "\n").encode())


def read_log(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [line.split() for line in f if line.strip()]


def write_table(recs):
    """{(round, seq): (op, off, len, extra)} for every W/Z record."""
    out = {}
    for rec in recs:
        if rec[0] in ("W", "Z"):
            out[(int(rec[1]), int(rec[2]))] = (rec[0], int(rec[3]),
                                               int(rec[4]), int(rec[5]))
    return out


def expected(recs, name, g):
    """(required, soft, allowed) granule masks of bitmap name.

    required: touched by a write that was acknowledged or whose data is in
              the image, since the last clear (outside clear windows);
    soft:     touched by an unacknowledged write since the last clear,
              outside clear windows (may or may not be dirty);
    allowed:  touched by any logged write that may still be recorded: the
              above, plus clear windows and everything before a clear that
              never returned.  Outside it every granule must be clean.
    """
    acked = {(int(r[1]), int(r[2])) for r in recs if r[0] in ("A", "L")}
    req = soft = allow = 0
    pend = None          # mask of the clear window while a clear is pending
    masks = {}
    for rec in recs:
        t = rec[0]
        if t == "R":
            pend = None      # a clear that never returned is dead now
        elif t in ("W", "Z"):
            key = (int(rec[1]), int(rec[2]))
            m = granule_mask(int(rec[3]), int(rec[4]), g)
            masks[key] = m
            allow |= m
            if pend is not None:
                pend |= m
            elif key in acked:
                req |= m
            else:
                soft |= m
        elif t == "CB" and rec[2] == name:
            r = int(rec[1])
            pend = 0
            if rec[3] != "-":
                for s in rec[3].split(","):
                    pend |= masks[(r, int(s))]
            req = soft = 0
        elif t == "CD" and rec[2] == name:
            check(pend is not None, f"log: CD without CB: {rec}")
            allow = pend
            pend = None
        elif t == "CE" and rec[2] == name:
            pend = None
    return req, soft, allow


# ------------------------------------------------------------------ checks

def node_bitmaps(q):
    nodes = q.cmd("query-named-block-nodes", {"flat": True})
    for n in nodes:
        if n.get("node-name") == NODE:
            return {b.get("name"): b for b in n.get("dirty-bitmaps", [])}
    fail(f"node {NODE} not in query-named-block-nodes: {nodes}")


def check_bitmap_info(infos, rnd, busy=False):
    for name, g in BITMAPS.items():
        b = infos.get(name)
        check(b is not None, f"round {rnd}: persistent bitmap {name} did not "
              f"come back; node {NODE} has {sorted(infos)}")
        check(not b.get("inconsistent", False),
              f"round {rnd}: bitmap {name} is marked inconsistent: {b}")
        want = {"persistent": True, "recording": True, "granularity": g,
                "busy": busy}
        got = {k: b.get(k) for k in want}
        check(got == want, f"round {rnd}: bitmap {name} is {b}, want {want}")


def read_dirty(q, sock, size):
    """Dirty granules of every bitmap, as bit masks, via NBD block status."""
    q.cmd("block-export-add", {
        "type": "nbd", "id": CHECK_EXPORT, "node-name": NODE,
        "name": CHECK_EXPORT, "writable": False,
        "bitmaps": [{"node": NODE, "name": n} for n in BITMAPS]})
    h = nbd.NBD()
    for n in BITMAPS:
        h.add_meta_context(DB + n)
    h.set_export_name(CHECK_EXPORT)
    h.connect_unix(sock)
    check(h.get_size() == size, f"{CHECK_EXPORT} size {h.get_size()}")
    for n in BITMAPS:
        check(h.can_meta_context(DB + n), f"{DB}{n} not negotiated")
    dirty = {n: 0 for n in BITMAPS}
    reached = {n: 0 for n in BITMAPS}
    for _ in range(100000):
        pos = min(reached.values())
        if pos >= size:
            break
        got = []

        def cb(ctx, off, entries, err):
            got.append((ctx, off, list(entries)))
            return 0
        h.block_status(size - pos, pos, cb)
        for ctx, off, ent in got:
            check(ctx.startswith(DB) and ctx[len(DB):] in BITMAPS,
                  f"block status for unexpected context {ctx}")
            name = ctx[len(DB):]
            g = BITMAPS[name]
            check(off == pos, f"{ctx}: extents start at {off}, asked {pos}")
            p = off
            for i in range(0, len(ent), 2):
                length, flags = ent[i], ent[i + 1]
                check(length > 0, f"{ctx}: zero-length extent at {p}")
                end = min(p + length, size)
                check(end % g == 0 or end == size,
                      f"{ctx}: extent [{p}, {p + length}) not aligned to the "
                      f"granularity {g}")
                check(flags in (0, 1), f"{ctx}: flags {flags} at {p}")
                if flags & 1:
                    dirty[name] |= granule_mask(p, end - p, g)
                p = end
                if p >= size:
                    break
            reached[name] = max(reached[name], p)
        check(got, f"block status at {pos} returned nothing")
    else:
        fail("block status walk did not finish")
    h.shutdown()
    del h
    # safe mode fails while the server still sees the client (<= 5 s)
    deadline = time.monotonic() + 5
    while True:
        r = q.cmd("block-export-del", {"id": CHECK_EXPORT}, check_ok=False)
        if "return" in r:
            break
        check("still in use" in r["error"].get("desc", "") and
              time.monotonic() < deadline,
              f"block-export-del {CHECK_EXPORT}: {r['error']}")
        time.sleep(0.05)
    return dirty


def detect_landed(recs, image, log):
    """L records for unacknowledged pwrites of the last round whose payload
    is in the image.  Call before anything writes to the disk again."""
    rounds = [int(r[1]) for r in recs if r[0] == "R"]
    if not rounds:
        return []
    last = rounds[-1]
    acked = {(int(r[1]), int(r[2])) for r in recs if r[0] in ("A", "L")}
    out = []
    with open(image, "rb") as f:
        for rec in recs:
            if rec[0] != "W" or int(rec[1]) != last:
                continue
            key = (last, int(rec[2]))
            off, n, seed = int(rec[3]), int(rec[4]), int(rec[5])
            if key in acked or n < 8:
                continue
            want = payload(seed, n)
            got = os.pread(f.fileno(), n, off)
            if n < 16:
                hit = got == want
            else:
                hit = any(got[i:i + 16] == want[i:i + 16]
                          for i in range(0, n - 15, 16))
            if hit:
                log.rec("L", last, key[1])
                out.append(["L", str(last), str(key[1])])
    return out


def describe_granule(recs, name, g, gi, limit=4):
    """The logged writes that touch granule gi, for a failure message."""
    acked = {(int(r[1]), int(r[2])): r[0] for r in recs if r[0] in ("A", "L")}
    out = []
    for rec in recs:
        if rec[0] in ("W", "Z"):
            off, n = int(rec[3]), int(rec[4])
            if granule_mask(off, n, g) >> gi & 1:
                key = (int(rec[1]), int(rec[2]))
                how = {"A": "acked", "L": "not acked, data in image"}.get(
                    acked.get(key), "not acked")
                out.append(f"{rec[0]} round {key[0]} seq {key[1]} "
                           f"[{off}, {off + n}) {how}")
        elif rec[0] in ("CB", "CD", "CE") and rec[2] == name:
            out.append(" ".join(rec))
    return "; ".join(out[-limit:])


def verify(q, args, rnd, size, log):
    infos = node_bitmaps(q)
    check_bitmap_info(infos, rnd)
    dirty = read_dirty(q, args.socket, size)
    infos = node_bitmaps(q)
    check_bitmap_info(infos, rnd)       # not busy any more
    recs = read_log(args.log)
    recs += detect_landed(recs, args.image, log)
    # the crashed round, unless an earlier check already looked at it
    prev_round = None
    for i in range(len(recs) - 1, -1, -1):
        if recs[i][0] == "V":
            break
        if recs[i][0] == "R":
            prev_round = int(recs[i][1])
            break
    table = write_table(recs)
    acked = {(int(r[1]), int(r[2])) for r in recs if r[0] in ("A", "L")}
    report = []
    wide = []        # bitmaps where over half the granules may be dirty
    for name, g in BITMAPS.items():
        n = size // g
        d = dirty[name]
        count = infos[name]["count"]
        check(count == d.bit_count() * g,
              f"round {rnd}: {name}: count {count} but block status shows "
              f"{d.bit_count()} dirty granules of {g}")
        req, soft, allow = expected(recs, name, g)
        missing = req & ~d
        if missing:
            idx = list(bits(missing))
            lines = [f"  granule {i} [{i * g}, {(i + 1) * g}): "
                     f"{describe_granule(recs, name, g, i)}" for i in idx[:5]]
            fail(f"round {rnd}: bitmap {name}: {len(idx)} granule(s) that "
                 f"were written are clean after the restart:\n" +
                 "\n".join(lines))
        unexplained = d & ~allow
        if unexplained:
            idx = list(bits(unexplained))
            fail(f"round {rnd}: bitmap {name}: {len(idx)} granule(s) are "
                 f"dirty although no logged write since the last clear "
                 f"touched them: {idx[:10]} (granule size {g})")
        # unacknowledged writes of the crashed round that left some granule
        # clean: their data never reached the image (correctly not dirty)
        unacked_clean = 0
        if prev_round is not None:
            for key, (op, off, ln, _) in table.items():
                if key[0] == prev_round and key not in acked:
                    if granule_mask(off, ln, g) & ~d:
                        unacked_clean += 1
        # dirty but not required: in a clear window (either is right), or
        # only written by unacknowledged requests whose data is not in the
        # image (marked, but the write was never issued, or a write-zeroes
        # that cannot be told from old zeroes): the false positives
        ambiguous = allow & ~req & ~soft
        window = (d & ambiguous).bit_count()
        fp = (d & ~req & ~ambiguous).bit_count()
        digest = hashlib.sha1(d.to_bytes(n // 8 + 1, "little")).hexdigest()
        log.rec("V", rnd, name, req.bit_count(), d.bit_count(), fp, window,
                allow.bit_count(), n, unacked_clean, digest[:16])
        report.append(f"{name} {req.bit_count()}/{d.bit_count()}/"
                      f"{allow.bit_count()}/{n}")
        if allow.bit_count() > n // 2:
            wide.append(name)
    return report, wide


# ------------------------------------------------------------------ writes

def plan_round(rnd, seed, must_clear):
    """(kill delay in s, [(time, bitmap)] clears) of one round.  Bitmaps in
    must_clear are cleared for sure, so that enough granules stay clean for
    the must-be-clean check to mean something."""
    rng = random.Random(f"{seed}/plan/{rnd}")
    if rng.random() < 0.12:
        delay = 0.0                              # right after the start
    else:
        delay = rng.uniform(0.005, 0.300)
    clears = []
    for name, p in (("b4k", 0.25), ("b64k", 0.15)):
        if rng.random() < p or name in must_clear:
            clears.append((rng.uniform(0, delay), name))
    if clears and delay > 0 and rng.random() < 0.25:
        # kill while the (first) clear is syncing
        delay = min(t for t, _ in clears) + rng.uniform(0, 0.003)
    return delay, sorted(clears)


def gen_request(rng, size):
    r = rng.random()
    if r < 0.35:
        n = rng.randrange(1, 4097)
    elif r < 0.60:
        n = rng.randrange(4097, 65537)
    elif r < 0.75:
        n = rng.randrange(65537, 256 * KiB + 1)
    elif r < 0.80:
        n = rng.randrange(256 * KiB + 1, MiB + 1)
    else:
        n = 4096 * rng.randrange(1, 33)
    hot = rng.random() < 0.4
    top = (HOT if hot else size) - n
    off = rng.randrange(0, top + 1)
    if n % 4096 == 0 and rng.random() < 0.7:
        off &= ~4095
    op = "Z" if rng.random() < 0.25 else "W"
    return op, off, n


def pid_state(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None     # reaped (ProcessLookupError: between open and read)


def write_round(q, args, rnd, size, log, must_clear):
    delay, clears = plan_round(rnd, args.seed, must_clear)
    rng = random.Random(f"{args.seed}/writes/{rnd}")
    handles = []
    for _ in range(NCONN):
        h = nbd.NBD()
        h.set_export_name(EXPORT)
        h.connect_unix(args.socket)
        check(not h.is_read_only(), f"{EXPORT} is read-only")
        check(h.get_size() == size, f"{EXPORT} size {h.get_size()}")
        handles.append(h)
    live = [True] * NCONN
    per_conn = [0] * NCONN
    inflight = {}            # seq -> buffer (kept alive until completion)
    st = {"seq": 0, "acked": 0, "issued": 0, "killed": None, "live_fail": []}
    pending = {}             # QMP id -> bitmap name
    clear_done = []

    def completion(seq, ci):
        def cb(err):
            inflight.pop(seq, None)
            per_conn[ci] -= 1
            e = err.value
            if e == 0:
                log.rec("A", rnd, seq)
                st["acked"] += 1
            else:
                log.rec("F", rnd, seq, e)
                if st["killed"] is None:
                    st["live_fail"].append((seq, errno.errorcode.get(e, e)))
            return 1
        return cb

    def issue(ci):
        h = handles[ci]
        op, off, n = gen_request(rng, size)
        seq = st["seq"]
        st["seq"] += 1
        buf = None
        if op == "W":
            pseed = rng.getrandbits(62)
            flags = nbd.CMD_FLAG_FUA if rng.random() < 0.1 else 0
            log.rec("W", rnd, seq, off, n, pseed)
            buf = nbd.Buffer.from_bytearray(bytearray(payload(pseed, n)))
        else:
            flags = nbd.CMD_FLAG_NO_HOLE if rng.random() < 0.5 else 0
            log.rec("Z", rnd, seq, off, n, flags)
        inflight[seq] = buf
        per_conn[ci] += 1
        try:
            if op == "W":
                h.aio_pwrite(buf, off, completion=completion(seq, ci),
                             flags=flags)
            else:
                h.aio_zero(n, off, completion=completion(seq, ci),
                           flags=flags)
        except nbd.Error:
            # the handle is closed (server gone): logged but never sent
            inflight.pop(seq, None)
            per_conn[ci] -= 1
            live[ci] = False
            return
        st["issued"] += 1

    log.rec("R", rnd, args.mode)
    t0 = time.monotonic()
    while True:
        now = time.monotonic()
        while clears and st["killed"] is None and now - t0 >= clears[0][0]:
            _, name = clears.pop(0)
            log.rec("CB", rnd, name,
                    ",".join(str(s) for s in sorted(inflight)) or "-")
            try:
                pending[q.send("block-dirty-bitmap-clear",
                               {"node": NODE, "name": name})] = name
            except QmpGone:
                pass
        for ci in range(NCONN):
            while live[ci] and per_conn[ci] < QD:
                issue(ci)
        if st["killed"] is None and now - t0 >= delay:
            state = pid_state(args.pid)
            check(state not in (None, "Z"), f"round {rnd}: fleeced "
                  f"{args.pid} died before it was killed (state {state})")
            try:
                os.kill(args.pid, signal.SIGKILL)
            except ProcessLookupError:
                fail(f"round {rnd}: fleeced {args.pid} vanished before it "
                     f"was killed (state just before: {state}, now: "
                     f"{pid_state(args.pid)})")
            st["killed"] = time.monotonic()
            log.rec("K", rnd, int((st["killed"] - t0) * 1000))
        rl, wl, fds = [], [], {}
        for ci, h in enumerate(handles):
            if not live[ci]:
                continue
            try:
                if h.aio_is_closed() or h.aio_is_dead():
                    live[ci] = False
                    continue
                fd, d = h.aio_get_fd(), h.aio_get_direction()
            except nbd.Error:
                live[ci] = False
                continue
            fds[fd] = ci
            if d & nbd.AIO_DIRECTION_READ:
                rl.append(fd)
            if d & nbd.AIO_DIRECTION_WRITE:
                wl.append(fd)
        if pending:
            rl.append(q.fileno())
        if st["killed"] is not None:
            if not any(live) and not pending:
                break
            if time.monotonic() - st["killed"] > 10:
                fail(f"round {rnd}: 10 s after kill -9 the connections "
                     f"have not noticed (live {live}, QMP pending {pending})")
            timeout = 0.05
        else:
            timeout = max(0.0, min(0.01, t0 + delay - time.monotonic()))
        r, w, _ = select.select(rl, wl, [], timeout)
        for fd in set(r) | set(w):
            if fd == q.fileno():
                continue
            ci = fds[fd]
            try:
                if fd in r:
                    handles[ci].aio_notify_read()
                if fd in w:
                    handles[ci].aio_notify_write()
            except nbd.Error:
                live[ci] = False
        for qid in list(pending):
            try:
                reply = q.poll(qid)
            except QmpGone:
                pending.clear()        # the server died before answering
                break
            if reply is None:
                continue
            name = pending.pop(qid)
            if "return" in reply:
                log.rec("CD", rnd, name)
                clear_done.append(name)
            else:
                log.rec("CE", rnd, name)
                if st["killed"] is None:
                    fail(f"round {rnd}: block-dirty-bitmap-clear {name}: "
                         f"{reply['error']}")
    handles.clear()          # closes the (dead) connections
    check(not st["live_fail"], f"round {rnd}: writes failed while the server "
          f"was alive: {st['live_fail'][:5]}")
    # the server must be dead (a zombie until the script reaps it)
    deadline = time.monotonic() + 5
    while pid_state(args.pid) not in (None, "Z"):
        check(time.monotonic() < deadline,
              f"round {rnd}: fleeced {args.pid} survived SIGKILL for 5 s")
        time.sleep(0.01)
    return (f"{st['issued']} writes, {st['acked']} acked, kill -9 after "
            f"{int((st['killed'] - t0) * 1000)} ms"
            + (f", cleared {'+'.join(clear_done)}" if clear_done else ""))


# ------------------------------------------------------------------ main

def setup_nodes(q, args, size):
    if args.mode == "qmp":
        q.cmd("blockdev-add", {"driver": "file", "node-name": FILE_NODE,
                               "filename": args.image})
        q.cmd("blockdev-add", {"driver": "raw", "node-name": NODE,
                               "file": FILE_NODE})
    # With --listen on the command line, QMP still wants its own NBD server
    # before block-export-add ("NBD server not running" otherwise).
    q.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {
        "path": args.socket if args.mode == "qmp" else args.qmp_nbd}}})
    if args.mode == "qmp":
        q.cmd("block-export-add", {"type": "nbd", "id": EXPORT,
                                   "node-name": NODE, "name": EXPORT,
                                   "writable": True})
    if args.create:
        for name, g in BITMAPS.items():
            a = {"node": NODE, "name": name, "persistent": True}
            if g != 65536:
                a["granularity"] = g
            q.cmd("block-dirty-bitmap-add", a)


def cmd_round(args):
    size = os.path.getsize(args.image)
    for g in BITMAPS.values():
        check(size % g == 0, "image size must be a multiple of every "
              "granularity")
    log = Log(args.log)
    t0 = time.monotonic()
    q = Qmp(args.qmp)
    setup_nodes(q, args, size)
    report, wide = verify(q, args, args.round, size, log)
    if args.same_as_previous:
        vs = [r for r in read_log(args.log) if r[0] == "V"]
        last = {r[2]: r for r in vs if int(r[1]) == args.round}
        prev = {r[2]: r for r in vs if int(r[1]) < args.round}
        for name in BITMAPS:
            check(last[name][10] == prev[name][10],
                  f"round {args.round}: {name} changed across a clean "
                  f"restart without writes: {prev[name]} -> {last[name]}")
    what = "verified only"
    if not args.no_write:
        what = write_round(q, args, args.round, size, log, wide)
    q.close()
    print(f"round {args.round:3d} ({args.mode:7s}) bitmaps ok "
          f"[{', '.join(report)} required/dirty/allowed/granules]; "
          f"{what} "
          f"({time.monotonic() - t0:.2f} s)", flush=True)


def cmd_summary(args):
    recs = read_log(args.log)
    rounds = len({r[1] for r in recs if r[0] == "K"})
    writes = sum(1 for r in recs if r[0] in ("W", "Z"))
    acked = sum(1 for r in recs if r[0] == "A")
    landed = sum(1 for r in recs if r[0] == "L")
    cb = sum(1 for r in recs if r[0] == "CB")
    cd = sum(1 for r in recs if r[0] == "CD")
    vs = [r for r in recs if r[0] == "V"]
    checked = sum(int(r[3]) for r in vs)
    dirty = sum(int(r[4]) for r in vs)
    fp = sum(int(r[5]) for r in vs)
    window = sum(int(r[6]) for r in vs)
    clean_checked = sum(int(r[8]) - int(r[7]) for r in vs)
    unacked_clean = sum(int(r[9]) for r in vs if r[2] == "b4k")
    ratio = 100.0 * fp / max(dirty, 1)
    print(f"rounds {rounds} (kill -9), restarts checked "
          f"{len({r[1] for r in vs})}, writes issued {writes} "
          f"(acked {acked}, unacked with data in the image {landed}, "
          f"unacked that left a 4 KiB granule clean {unacked_clean}), "
          f"clears {cd}/{cb} completed; granules checked: {checked} "
          f"must-be-dirty, {clean_checked} must-be-clean; false positives "
          f"{fp} of {dirty} dirty ({ratio:.2f}%; plus {window} in clear "
          f"windows, where either state is right)")
    check(rounds >= args.min_rounds, f"only {rounds} kill -9 rounds")
    check(checked > 0 and clean_checked > 0, "nothing was checked")
    # every false positive is a granule of an unacknowledged write (the
    # per-round subset check); with 16 requests in flight per crash against
    # hundreds acknowledged, they must stay a small part of the dirty ones
    check(ratio < args.max_fp_percent, f"false positives {ratio:.2f}% of "
          f"the dirty granules, more than {args.max_fp_percent}%")


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("round")
    r.add_argument("--round", type=int, required=True)
    r.add_argument("--mode", choices=("qmp", "cmdline"), required=True)
    r.add_argument("--pid", type=int, required=True)
    r.add_argument("--qmp", required=True)
    r.add_argument("--socket", required=True, help="NBD socket for clients")
    r.add_argument("--qmp-nbd", help="socket for nbd-server-start (cmdline)")
    r.add_argument("--image", required=True)
    r.add_argument("--log", required=True)
    r.add_argument("--seed", required=True)
    r.add_argument("--create", action="store_true")
    r.add_argument("--no-write", action="store_true")
    r.add_argument("--same-as-previous", action="store_true")
    s = sub.add_parser("summary")
    s.add_argument("--log", required=True)
    s.add_argument("--min-rounds", type=int, default=50)
    s.add_argument("--max-fp-percent", type=float, default=5.0)
    args = p.parse_args()
    try:
        if args.cmd == "round":
            cmd_round(args)
        else:
            cmd_summary(args)
    except CheckFailed as e:
        print(f"FAIL {e}", file=sys.stderr, flush=True)
        return 1
    except (QmpGone, TimeoutError, nbd.Error, OSError) as e:
        traceback.print_exc()
        print(f"FAIL {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

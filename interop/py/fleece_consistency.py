# SPDX-License-Identifier: MIT
"""A fleece is point-in-time for every read (control-api.md 9.2, 5.2, 6.1):
helper for interop/fleece-consistency.sh.

Phases (the shell script runs them in this order, fleeced already started
with the command-line export disk0 on --cl-sock, discard=on):

  prepare      writes P0 (the "previous full backup": data islands, holes,
               allocated zeroes, data in the last partial cluster) into the
               image file, before fleeced starts.
  setup-a      nbd-server-start; bitmap b0; pattern A written over P0 through
               the live export (writes, write_zeroes with and without
               NO_HOLE, trims, allocated zeroes, the last bytes); checks the
               live export equals the model; saves the model of A
               (a-model.img) and A's allocation (base:allocation of the
               live export) in the state file.
  fleece       flavour B, 5.2 steps 1-4, with the bitmap rotation in the
               transaction (b1 added, b0 disabled); then pattern B through
               the live export; the live export must equal B.
  reads        reads of the fleece of many sizes and alignments == A, with
               many requests in flight too; its base:allocation is A's;
               writes to the fleece fail with EPERM, reads past its end
               with EINVAL.
  check-map    an `nbdinfo --map` output of the fleece against A's allocation.
  writer       background writer on the live export (two connections,
               many requests in flight, writes / write_zeroes / trims at
               random unaligned places) until --stop-file appears; then
               saves its final model and what it did.
  incremental  walks qemu:dirty-bitmap:b0 on the fleece, pulls the dirty
               extents onto a copy of the previous full backup; bytes pulled
               == b0's count.
  final        (writer stopped) live == writer model, fleece still == A,
               b1 == exactly the granules written after the point in time,
               the writer really overlapped every copy; then 5.2 steps 5-8
               with their events, and the live disk keeps every write.
  atomic       (--flavour b|a) the point in time taken under load: flavour
               B's transaction with the rotation, or flavour A's step 3,
               sent while requests are in flight; each request is in the
               fleece entirely or not at all, consistent with its timing,
               and the new bitmap matches.
  race         (--rounds N) fresh fleeces read with many requests in flight
               while writers hit the same, still uncopied, clusters.
"""

import argparse
import errno
import json
import os
import random
import signal
import sys
import threading
import time

import nbd

from fleece_common import (BASE, CLUSTER, DB, KiB, MiB, Qmp, allocated_bytes,
                           block_status, check, connect, expect_nbd_error,
                           fail, file_bytes, finish, pattern, read_all, run,
                           soft_check, soft_eq, soft_fail, walk)

GRAN = 64 * KiB               # b0/b1 granularity
args = None
SIZE = 0


# ------------------------------------------------------------------ model ops

# Each op: (kind, offset, length, flags, tag).  kind: write | zero | trim.
# write data = pattern(offset, length, tag); tag 0 = literal zero bytes
# (allocated zeroes).  zero and trim read back as zeroes: the live node has
# discard=on, where TRIM punches a hole (and zeroes partial blocks).

def p0_islands(size):
    M = MiB
    last = size - size % CLUSTER            # start of the partial cluster
    return [
        (0, 256 * KiB, 1),
        (1 * M, 64 * KiB, 1),
        (2 * M + 4096, 8192, 1),            # partial cluster
        (4 * M, 1 * M, 1),
        (6 * M, 128 * KiB, 0),              # allocated zeroes
        (8 * M + 512, 3000, 1),             # unaligned island
        (10 * M, 200 * KiB, 1),
        (last + 4096, size - last - 4096, 1),   # data in the last cluster
        # a large data area (random bytes, tag -1), for copies to chew on
        # while the writer copies-before-write under them
        (16 * M, 14 * M, -1),
        (30 * M + 64 * KiB, 14 * M + 100, -1),
        (44 * M + 300 * KiB, 12 * M, -1),
    ]


def ops_a(size):
    M = MiB
    return [
        ("write", 100, 5000, 0, 2),                     # unaligned, cluster 0
        ("write", 3 * M - 100, 70000, 0, 2),            # across clusters, hole
        ("zero", 4 * M + 64 * KiB, 128 * KiB, 0, 0),    # may punch a hole
        ("zero", 4 * M + 300000, 10000, nbd.CMD_FLAG_NO_HOLE, 0),
        ("trim", 10 * M + 64 * KiB, 64 * KiB, 0, 0),
        ("write", 7 * M, 64 * KiB, 0, 0),               # allocated zeroes
        ("write", 9 * M + 4096, 4096, 0, 2),
        ("write", size - 100, 100, 0, 2),               # the last bytes
    ]


def ops_b(size):
    M = MiB
    last = size - size % CLUSTER
    return [
        ("write", 0, 10, 0, 3),                         # A data, cluster 0
        ("write", 64 * KiB - 1, 2, 0, 3),               # straddles 0|1
        ("write", 1 * M - 1000, 200000, 0, 3),          # multi-cluster mixed
        ("zero", 4 * M, 64 * KiB, 0, 0),                # aligned, may trim
        ("zero", 4 * M + 512 * KiB + 7, 100000, nbd.CMD_FLAG_NO_HOLE, 0),
        ("zero", 5 * M - 3 * CLUSTER, 2 * CLUSTER, 0, 0),
        ("trim", 10 * M, 64 * KiB, 0, 0),               # aligned trim of data
        ("trim", 5 * M - 5000, 10000, 0, 0),            # unaligned trim
        ("trim", 2 * M, 64 * KiB, 0, 0),                # partial-data cluster
        ("write", 11 * M + 100, 50, 0, 3),              # into a pure hole
        ("zero", 11 * M + 512 * KiB, 64 * KiB, nbd.CMD_FLAG_NO_HOLE, 0),
        ("write", 6 * M + 10, 20, 0, 3),                # allocated zeroes (P0)
        ("write", 7 * M + 5, 5, 0, 3),                  # allocated zeroes (A)
        ("write", 8 * M - 300, 1 * M + 600, 0, 3),      # > 1 MiB, unaligned
        ("write", 3 * M + 1000, 64 * KiB, 0, 3),        # A's data across 2
        ("write", last + 10, 100, 0, 3),                # last partial cluster
        ("trim", size - 2000, 2000, 0, 0),              # up to the end
        ("zero", size - 1, 1, nbd.CMD_FLAG_NO_HOLE, 0), # the last byte
        ("write", 20, 10, nbd.CMD_FLAG_FUA, 4),         # cluster 0 again
        ("write", 9 * M, 3 * CLUSTER + 1, nbd.CMD_FLAG_FUA, 3),
        ("zero", 12 * M + 64 * KiB + 5, 70000, nbd.CMD_FLAG_FUA, 0),
    ]


def apply_model(model, op):
    kind, off, length, flags, tag = op
    if kind == "write":
        model[off:off + length] = op_data(op)
    else:
        model[off:off + length] = bytes(length)


def op_data(op):
    kind, off, length, flags, tag = op
    return bytes(length) if tag == 0 else pattern(off, length, tag)


def do_op(h, op):
    kind, off, length, flags, tag = op
    if kind == "write":
        h.pwrite(op_data(op), off, flags)
    elif kind == "zero":
        h.zero(length, off, flags)
    else:
        h.trim(length, off, flags)


def granules(ops, gran=GRAN):
    g = set()
    for kind, off, length, flags, tag in ops:
        g.update(range(off // gran, (off + length - 1) // gran + 1))
    return g


def granule_map(gs, size, gran=GRAN):
    """Merged [(length, 1|0)] of a set of granules, the last one cut at EOF."""
    out = []
    n = (size + gran - 1) // gran
    for i in range(n):
        length = min(gran, size - i * gran)
        f = 1 if i in gs else 0
        if out and out[-1][1] == f:
            out[-1] = (out[-1][0] + length, f)
        else:
            out.append((length, f))
    return out


def dirty_bytes(gs, size, gran=GRAN):
    return sum(min(gran, size - i * gran) for i in gs)


# ------------------------------------------------------------------ state

def load_state():
    with open(args.state) as f:
        return json.load(f)


def save_state(st):
    with open(args.state + ".new", "w") as f:
        json.dump(st, f)
    os.replace(args.state + ".new", args.state)


def write_image(path, data):
    with open(path, "wb") as f:
        f.write(data)


def live(contexts=()):
    return connect(args.cl_sock, "disk0", contexts)


def fleece(contexts=()):
    return connect(args.sock, "fleece", contexts)


def compare(got, want, what, base=0):
    """soft_eq for large buffers: report the first differing range."""
    if got == want:
        return True
    if len(got) != len(want):
        soft_fail(f"{what}: {len(got)} bytes, want {len(want)}")
        return False
    i = next(i for i in range(len(got)) if got[i] != want[i])
    j = i
    while j < len(got) and got[j] != want[j]:
        j += 1
    z = " (got zeroes)" if not any(got[i:j]) else ""
    soft_fail(f"{what}: first difference at {base + i} .. {base + j}{z}")
    return False


# ------------------------------------------------------------------ phases

def phase_prepare():
    size = args.size
    with open(args.image, "wb") as f:
        f.truncate(size)
        rng = random.Random(1)
        for off, length, tag in p0_islands(size):
            f.seek(off)
            f.write(bytes(length) if tag == 0 else rng.randbytes(length)
                    if tag < 0 else pattern(off, length, tag))
    with open(args.image, "rb") as f:
        write_image(args.prev, f.read())


def phase_setup_a():
    q = Qmp(args.qmp)
    q.ok_empty("nbd-server-start",
               addr={"type": "unix", "data": {"path": args.sock}})
    q.ok_empty("block-dirty-bitmap-add", node="disk0", name="b0")
    model = bytearray(file_bytes(args.prev))
    h = live([BASE])
    check(h.get_size() == SIZE, f"disk0 size {h.get_size()}")
    check(h.can_trim() and h.can_zero(), "disk0: no trim or no zero")
    for op in ops_a(SIZE):
        do_op(h, op)
        apply_model(model, op)
    h.flush()
    compare(read_all(h, SIZE), bytes(model), "live export after pattern A")
    pit_map = walk(h, BASE, SIZE)
    h.shutdown()
    write_image(args.a_model, bytes(model))
    want_b0 = granules(ops_a(SIZE))
    bm = q.bitmaps("disk0")
    soft_eq(bm.get("b0", {}).get("count"), dirty_bytes(want_b0, SIZE),
            "b0 count after pattern A")
    print(f"  A allocation: {pit_map}", flush=True)
    save_state({"pit_map": pit_map, "b0_count": bm["b0"]["count"]})


def phase_fleece():
    st = load_state()
    q = Qmp(args.qmp)
    before = q.bitmaps("disk0")
    soft_eq(before["b0"]["count"], st["b0_count"], "b0 count before the fleece")
    q.ok_empty("blockdev-add", driver="file", **{"node-name": "fl-tmp"},
               filename=args.scratch)
    q.ok_empty("transaction", actions=[
        {"type": "block-dirty-bitmap-add",
         "data": {"node": "disk0", "name": "b1", "granularity": 65536}},
        {"type": "block-dirty-bitmap-disable",
         "data": {"node": "disk0", "name": "b0"}},
        {"type": "blockdev-backup",
         "data": {"job-id": "fleece-job", "device": "disk0",
                  "target": "fl-tmp", "sync": "none",
                  "filter-node-name": "fl-cbw"}}])
    q.ok_empty("blockdev-add", driver="snapshot-access",
               **{"node-name": "fl-access"}, file="fl-cbw")
    q.ok_empty("block-export-add", type="nbd", id="fleece",
               **{"node-name": "fl-access"}, name="fleece", writable=False,
               bitmaps=[{"node": "disk0", "name": "b0"}])
    bm = q.bitmaps("disk0")
    soft_eq({k: (v["recording"], v["busy"], v["count"], v["granularity"])
             for k, v in bm.items()},
            {"b0": (False, True, before["b0"]["count"], GRAN),
             "b1": (True, False, 0, GRAN)},
            "bitmaps after the rotation (b0 frozen and exported, b1 new)")
    # B through the live export
    model = bytearray(file_bytes(args.a_model))
    h = live()
    for op in ops_b(SIZE):
        do_op(h, op)
        apply_model(model, op)
    h.flush()
    compare(read_all(h, SIZE), bytes(model), "live export after pattern B")
    h.shutdown()
    write_image(args.b_model, bytes(model))
    soft_eq(q.bitmaps("disk0")["b1"]["count"],
            dirty_bytes(granules(ops_b(SIZE)), SIZE),
            "b1 count after pattern B")
    jobs = q.ok("query-block-jobs")
    soft_eq([(j.get("device"), j.get("type"), j.get("status"), j.get("len"))
             for j in jobs], [("fleece-job", "backup", "running", SIZE)],
            "query-block-jobs during the fleece")


def read_cases():
    M, C = MiB, CLUSTER
    last = SIZE - SIZE % C
    cases = [
        (0, 1), (100, 1), (SIZE - 1, 1), (last, 1), (6 * M + 15, 1),
        (0, 4095), (12345, 4095), (C - 1, 4095), (4 * M + 1, 4095),
        (0, C - 1), (1, C - 1), (C + 1, C - 1),
        (0, C), (C, C), (4 * M, C), (10 * M, C), (2 * M, C),
        (0, C + 1), (C - 1, C + 1), (4 * M - 1, C + 1), (SIZE - C - 1, C + 1),
        (4 * M - 1234, 3 * C), (10 * M - 7, 3 * C), (1 * M - 1000, 3 * C),
        (5 * M - 3 * C - 1, 3 * C), (11 * M + 99, 3 * C),
        (0, M), (1 * M - 1000, M), (4 * M, M), (4 * M + 17, M),
        (8 * M - 300, M + 600), (SIZE - M, M), (SIZE - M - 3, M + 3),
        (last, SIZE - last), (last - 5, SIZE - last + 5),
        (3 * M, 3 * M + 5), (0, SIZE),
    ]
    rng = random.Random(4242)
    lens = [1, 7, 511, 512, 4095, 4096, 4097, C - 1, C, C + 1, 3 * C + 13,
            200000, M, 2 * M + 1]
    for _ in range(250):
        n = rng.choice(lens)
        off = rng.randrange(0, SIZE - n + 1)
        if rng.random() < 0.3:
            off -= off % C
        cases.append((off, n))
    return cases


def phase_reads():
    a = file_bytes(args.a_model)
    h = fleece([BASE])
    soft_eq(h.get_size(), SIZE, "fleece size")
    soft_check(h.is_read_only(), "fleece export is not read-only")
    maxb = h.get_block_size(nbd.SIZE_MAXIMUM) or 32 * MiB
    soft_check(maxb >= MiB, f"fleece maximum block size {maxb} < 1 MiB")
    bad = 0
    for off, n in read_cases():
        got = b"".join(h.pread(min(maxb, off + n - o), o)
                       for o in range(off, off + n, maxb))
        if got != a[off:off + n]:
            bad += 1
            if bad <= 12:
                compare(got, a[off:off + n], f"fleece read ({off}, {n})", off)
    soft_eq(bad, 0, "fleece reads differing from A")
    # the same reads with many in flight at once (64 KiB +- 1 and 1 MiB)
    rng = random.Random(7)
    cookies = []
    for i in range(200):
        n = rng.choice([1, 4095, CLUSTER - 1, CLUSTER + 1, 3 * CLUSTER, MiB])
        off = rng.randrange(0, SIZE - n + 1)
        buf = nbd.Buffer(n)
        cookies.append((h.aio_pread(buf, off), buf, off, n))
        while h.aio_in_flight() >= 48:
            h.poll(-1)
    for c, buf, off, n in cookies:
        while not h.aio_command_completed(c):
            h.poll(-1)
        if buf.to_bytearray() != a[off:off + n]:
            bad += 1
            if bad <= 12:
                compare(bytes(buf.to_bytearray()), a[off:off + n],
                        f"fleece aio read ({off}, {n})", off)
    soft_eq(bad, 0, "fleece aio reads differing from A")
    full = walk(h, BASE, SIZE)
    check_fleece_map(full, granules(ops_b(SIZE), CLUSTER),
                     "base:allocation of the fleece (libnbd)")
    # block status of sub-ranges (mid-cluster starts, REQ_ONE) agrees with
    # the whole map
    rng = random.Random(11)
    for i in range(150):
        n = rng.choice([1, 4095, CLUSTER - 1, CLUSTER + 1, 3 * CLUSTER, MiB])
        off = rng.randrange(0, SIZE - n + 1)
        flags = nbd.CMD_FLAG_REQ_ONE if i % 3 == 0 else 0
        ext = block_status(h, n, off, flags).get(BASE)
        if not ext:
            soft_fail(f"block_status({n}, {off}): no base:allocation")
            continue
        pos = off
        for k, (ln, f) in enumerate(ext):
            ln = min(ln, off + n - pos)
            if ln <= 0:
                soft_fail(f"block_status({n}, {off}, {flags}): extent {k} "
                          f"({ln}) past the request: {ext}")
                break
            want = slice_runs(full, pos, pos + ln)
            if [w for _, w in want] != [f]:
                soft_fail(f"block_status({n}, {off}, {flags}): extent "
                          f"({pos}, {ln}, flags {f}), whole map says {want}")
                break
            pos += ln
        if flags and len(ext) != 1:
            soft_fail(f"REQ_ONE block_status({n}, {off}): {ext}")
    h.shutdown()
    # errors on the fleece: read past / straddling the end, any write
    h = connect(args.sock, "fleece", strict=False)
    expect_nbd_error("read straddling the end of the fleece", errno.EINVAL,
                     lambda: h.pread(2, SIZE - 1))
    expect_nbd_error("read at the end of the fleece", errno.EINVAL,
                     lambda: h.pread(1, SIZE))
    soft_check(not h.can_trim() and not h.can_zero(),
               "fleece advertises trim or zero")
    expect_nbd_error("write to the fleece", errno.EPERM,
                     lambda: h.pwrite(b"x", 0))
    expect_nbd_error("write_zeroes on the fleece", errno.EPERM,
                     lambda: h.zero(CLUSTER, 0))
    expect_nbd_error("trim on the fleece", errno.EPERM,
                     lambda: h.trim(CLUSTER, 0))
    h.flush()
    soft_eq(h.pread(CLUSTER, 0), a[:CLUSTER], "fleece after refused writes")
    h.shutdown()


def slice_runs(runs, start, end):
    out, pos = [], 0
    for n, f in runs:
        s, e = max(pos, start), min(pos + n, end)
        if s < e:
            if out and out[-1][1] == f:
                out[-1] = (out[-1][0] + e - s, f)
            else:
                out.append((e - s, f))
        pos += n
    return out


def check_fleece_map(got, touched, what):
    """got: the fleece's merged base:allocation runs.  Per cluster it must be
    A's allocation (the live export's map before the point in time).  A
    cluster copied to the scratch file after the point in time may instead
    be reported as data as a whole when A had data in it (QEMU reports
    copied areas as allocated); a cluster that was a hole stays hole|zero
    however it was written later."""
    pit = load_state()["pit_map"]
    pit = [tuple(x) for x in pit]
    soft_eq(sum(n for n, _ in got), SIZE, f"{what}: length")
    bad = []
    for c in range((SIZE + CLUSTER - 1) // CLUSTER):
        s, e = c * CLUSTER, min(SIZE, (c + 1) * CLUSTER)
        g, w = slice_runs(got, s, e), slice_runs(pit, s, e)
        if g == w:
            continue
        if c in touched and any(not f & 1 for _, f in w) and \
                g == [(e - s, 0)]:
            continue
        bad.append((s, g, w))
    for s, g, w in bad[:10]:
        soft_fail(f"{what}: cluster at {s}: got {g}, A's allocation {w}"
                  f"{' (written after the point in time)' if s // CLUSTER in touched else ''}")
    soft_eq(len(bad), 0, f"{what}: clusters differing from A's allocation")


def parse_nbdinfo_map(path):
    runs = []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            off, n, flags = line.split()[:3]
            check(int(off) == sum(x for x, _ in runs),
                  f"nbdinfo --map: gap before {line.strip()}")
            if runs and runs[-1][1] == int(flags):
                runs[-1] = (runs[-1][0] + int(n), int(flags))
            else:
                runs.append((int(n), int(flags)))
    return runs


def phase_check_map():
    check_fleece_map(parse_nbdinfo_map(args.map),
                     granules(ops_b(SIZE), CLUSTER), "nbdinfo --map fleece")


# ------------------------------------------------------------------ writer

def phase_writer():
    """Keeps many requests in flight on two connections to the live export
    until the stop file appears.  Requests in flight never overlap each
    other (so the final content is known), but share clusters freely."""
    model = bytearray(file_bytes(args.b_model))
    lock = threading.Lock()
    inflight = []                   # [(start, end)]
    ops = []                        # every op, in issue order
    done_times = []
    stop = threading.Event()
    errors = []
    signal.signal(signal.SIGTERM, lambda *a: stop.set())

    # half of the requests go to clusters not written since the point in
    # time, so that copy-before-write keeps happening during every copy
    fresh = sorted(set(range((SIZE + CLUSTER - 1) // CLUSTER)) -
                   granules(ops_b(SIZE), CLUSTER))
    random.Random(99).shuffle(fresh)

    def pick(rng):
        while True:
            r = rng.random()
            kind = "write" if r < 0.6 else "zero" if r < 0.8 else "trim"
            n = rng.choice([1, 100, 4095, 4096, CLUSTER - 1, CLUSTER,
                            CLUSTER + 1, 3 * CLUSTER + 5, 300000])
            off = rng.randrange(0, SIZE - n + 1)
            if fresh and rng.random() < 0.5:
                off = min(fresh.pop() * CLUSTER + rng.randrange(CLUSTER),
                          SIZE - n)
            if rng.random() < 0.3:
                off -= off % 4096
            if all(off + n <= s or e <= off for s, e in inflight):
                flags = nbd.CMD_FLAG_NO_HOLE if kind == "zero" and \
                    rng.random() < 0.5 else 0
                return (kind, off, n, flags, 10 + len(ops))

    def worker(idx):
        rng = random.Random(1000 + idx)
        h = live()
        pending = []
        try:
            while not stop.is_set() or pending:
                while not stop.is_set() and len(pending) < 24:
                    with lock:
                        op = pick(rng)
                        kind, off, n, flags, tag = op
                        data = rng.randbytes(n) if kind == "write" else None
                        inflight.append((off, off + n))
                        ops.append(op)
                        model[off:off + n] = data or bytes(n)
                    if kind == "write":
                        buf = nbd.Buffer.from_bytearray(bytearray(data))
                        c = h.aio_pwrite(buf, off, flags=flags)
                    elif kind == "zero":
                        buf, c = None, h.aio_zero(n, off, flags=flags)
                    else:
                        buf, c = None, h.aio_trim(n, off)
                    pending.append((c, op, buf))
                h.poll(100)
                still = []
                for c, op, buf in pending:
                    try:
                        finished = h.aio_command_completed(c)
                    except nbd.Error as e:
                        errors.append(f"{op}: {e}")
                        finished = True
                    if finished:
                        with lock:
                            inflight.remove((op[1], op[1] + op[2]))
                            done_times.append(time.time())
                    else:
                        still.append((c, op, buf))
                pending = still
            h.flush()
            h.shutdown()
        except Exception as e:  # noqa: BLE001
            errors.append(f"worker {idx}: {type(e).__name__}: {e}")
            stop.set()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    ready = False
    deadline = time.monotonic() + args.max_seconds
    while not stop.is_set():
        if not ready and len(done_times) >= 100:
            open(args.ready_file, "w").close()
            ready = True
        if os.path.exists(args.stop_file) or time.monotonic() > deadline:
            stop.set()
        time.sleep(0.05)
    for t in threads:
        t.join(30)
        check(not t.is_alive(), "writer thread did not finish")
    write_image(args.final_model, bytes(model))
    with open(args.writer_out, "w") as f:
        json.dump({"ops": ops, "done_times": done_times, "errors": errors}, f)
    print(f"  writer: {len(ops)} requests, {len(errors)} errors", flush=True)
    for e in errors[:10]:
        soft_fail(f"writer request failed: {e}")


# ------------------------------------------------------------------ incremental

def phase_incremental():
    q = Qmp(args.qmp)
    count = q.bitmaps("disk0")["b0"]["count"]
    soft_eq(count, load_state()["b0_count"], "b0 count (frozen) now")
    h = fleece([DB + "b0"])
    check(h.can_meta_context(DB + "b0"), "qemu:dirty-bitmap:b0 not offered "
          "by the fleece export")
    runs = walk(h, DB + "b0", SIZE)
    soft_eq(runs, granule_map(granules(ops_a(SIZE)), SIZE),
            "qemu:dirty-bitmap:b0 on the fleece = granules of pattern A")
    backup = bytearray(file_bytes(args.prev))
    pulled, pos = 0, 0
    for n, f in runs:
        if f & 1:
            for o in range(pos, pos + n, MiB):
                k = min(MiB, pos + n - o)
                backup[o:o + k] = h.pread(k, o)
            pulled += n
        pos += n
    h.shutdown()
    soft_eq(pulled, count, "bytes pulled by the incremental backup vs b0 count")
    write_image(args.out, bytes(backup))
    q.close()


# ------------------------------------------------------------------ final

def phase_final():
    q = Qmp(args.qmp)
    w = json.load(open(args.writer_out))
    wops = [tuple(o) for o in w["ops"]]
    soft_eq(w["errors"], [], "writer errors")
    # the writer overlapped every copy
    with open(args.windows) as f:
        for line in f:
            name, t0, t1 = line.split()
            n = sum(1 for t in w["done_times"] if float(t0) <= t <= float(t1))
            print(f"  {name}: {n} writer requests completed during it "
                  f"({float(t1) - float(t0):.2f} s)", flush=True)
            soft_check(n >= 20, f"{name}: only {n} writer requests completed "
                       f"while it ran")
    final = file_bytes(args.final_model)
    a = file_bytes(args.a_model)
    h = live()
    compare(read_all(h, SIZE), final, "live export after the writer")
    h.shutdown()
    h = fleece([BASE])
    compare(read_all(h, SIZE), a, "fleece after the writer")
    check_fleece_map(walk(h, BASE, SIZE),
                     granules(ops_b(SIZE) + wops, CLUSTER),
                     "base:allocation of the fleece after the writer")
    h.shutdown()
    want_b1 = granules(ops_b(SIZE) + wops)
    bm = q.bitmaps("disk0")
    soft_eq(bm["b1"]["count"], dirty_bytes(want_b1, SIZE), "b1 count")
    soft_eq(bm["b0"]["count"], load_state()["b0_count"], "b0 count")
    # b1's map, through a temporary export of the live node
    q.ok_empty("block-export-add", type="nbd", id="b1map",
               **{"node-name": "disk0"}, name="b1map", writable=False,
               bitmaps=[{"node": "disk0", "name": "b1"}])
    h = connect(args.sock, "b1map", [DB + "b1"])
    soft_eq(walk(h, DB + "b1", SIZE), granule_map(want_b1, SIZE),
            "qemu:dirty-bitmap:b1 = granules written after the point in time")
    h.shutdown()
    del_export(q, "b1map")

    # 5.2 steps 5-8
    del_export(q, "fleece")
    q.ok_empty("blockdev-del", **{"node-name": "fl-access"})
    q.take_events()
    q.ok_empty("block-job-cancel", device="fleece-job")
    ev = q.wait_event("BLOCK_JOB_CANCELLED", 10,
                      lambda e: e["data"].get("device") == "fleece-job")
    check(ev is not None, "no BLOCK_JOB_CANCELLED for fleece-job")
    d = dict(ev["data"])
    soft_eq({k: d.get(k) for k in ("device", "type", "len", "speed")},
            {"device": "fleece-job", "type": "backup", "len": SIZE,
             "speed": 0}, "BLOCK_JOB_CANCELLED data")
    soft_eq(q.ok("query-block-jobs"), [], "query-block-jobs after cancel")
    q.ok_empty("blockdev-del", **{"node-name": "fl-tmp"})
    soft_eq(sorted(q.nodes()), ["disk0", "disk0-file"], "nodes after teardown")
    bm = q.bitmaps("disk0")
    soft_eq({k: (v["recording"], v["busy"]) for k, v in bm.items()},
            {"b0": (False, False), "b1": (True, False)},
            "bitmaps after teardown")
    h = live()
    compare(read_all(h, SIZE), final, "live export after teardown")
    h.shutdown()
    q.close()


def del_export(q, eid):
    """block-export-del (safe), retried for up to 5 s while the server
    notices a client's disconnect (6.3); BLOCK_EXPORT_DELETED must come."""
    q.take_events("BLOCK_EXPORT_DELETED")
    deadline = time.monotonic() + 5
    while True:
        r = q.cmd("block-export-del", id=eid)
        if r == {"return": {}}:
            break
        if time.monotonic() > deadline or \
                r.get("error", {}).get("desc") != f"export '{eid}' still in use":
            fail(f"block-export-del {eid}: {r}")
        time.sleep(0.1)
    ev = q.wait_event("BLOCK_EXPORT_DELETED", 10,
                      lambda e: e["data"] == {"id": eid})
    soft_check(ev is not None, f"no BLOCK_EXPORT_DELETED for {eid}")


# ------------------------------------------------------------------ atomic

class SlotWriter:
    """Writers on two connections to the live export, many requests in
    flight, each request in its own 96 KiB slot of the disk, so that no two
    requests of the round overlap (their slots share 64 KiB clusters, so
    copy-before-write of one cluster races between requests).  Every op
    records when it was issued and when it completed."""

    SLOT = 96 * KiB

    def __init__(self, seed):
        self.slots = list(range(SIZE // self.SLOT))
        random.Random(seed).shuffle(self.slots)
        self.lock = threading.Lock()
        self.ops = []          # [kind, off, n, flags, seed, issued, done]
        self.errors = []
        self.done = 0
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.worker, args=(i,))
                        for i in range(2)]

    @staticmethod
    def data(op):
        return random.Random(op[4]).randbytes(op[2])

    def next_op(self, rng):
        with self.lock:
            if not self.slots:
                return None
            slot = self.slots.pop()
            r = rng.random()
            kind = "write" if r < 0.7 else "zero" if r < 0.85 else "trim"
            n = rng.choice([1, 100, 4095, 4096, 20000, CLUSTER + 1])
            off = slot * self.SLOT + rng.randrange(0, 32 * KiB)
            if rng.random() < 0.3:
                off -= off % 4096
            flags = nbd.CMD_FLAG_NO_HOLE if kind == "zero" and \
                rng.random() < 0.5 else 0
            op = [kind, off, n, flags, len(self.ops) + 7 * 10**6, None, None]
            self.ops.append(op)
            return op

    def worker(self, idx):
        rng = random.Random(500 + idx)
        try:
            h = live()
            pending = []
            while not self.stop.is_set() or pending:
                while not self.stop.is_set() and len(pending) < 16:
                    op = self.next_op(rng)
                    if op is None:
                        self.stop.set()
                        break
                    kind, off, n, flags = op[:4]
                    op[5] = time.time()
                    if kind == "write":
                        buf = nbd.Buffer.from_bytearray(
                            bytearray(self.data(op)))
                        c = h.aio_pwrite(buf, off, flags=flags)
                    elif kind == "zero":
                        buf, c = None, h.aio_zero(n, off, flags=flags)
                    else:
                        buf, c = None, h.aio_trim(n, off)
                    pending.append((c, op, buf))
                if pending:
                    h.poll(100)
                still = []
                for c, op, buf in pending:
                    try:
                        fin = h.aio_command_completed(c)
                    except nbd.Error as e:
                        self.errors.append(f"{op[:4]}: {e}")
                        fin = True
                    if fin:
                        op[6] = time.time()
                        with self.lock:
                            self.done += 1
                    else:
                        still.append((c, op, buf))
                pending = still
            h.flush()
            h.shutdown()
        except Exception as e:  # noqa: BLE001
            self.errors.append(f"worker {idx}: {type(e).__name__}: {e}")
            self.stop.set()

    def start(self):
        for t in self.threads:
            t.start()

    def wait_done(self, n, timeout):
        deadline = time.monotonic() + timeout
        while self.done < n and not self.stop.is_set():
            check(time.monotonic() < deadline,
                  f"writer: {self.done} of {n} requests done in {timeout} s")
            time.sleep(0.01)

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(30)
            check(not t.is_alive(), "writer thread did not finish")


def phase_atomic():
    """The point in time under load: flavour B's transaction (atomic with
    the bitmap rotation, 5.2) or flavour A's step 3, sent while two
    connections keep requests in flight.  Every request must be in the
    fleece entirely or not at all, requests completed before the command
    was sent must be in it, requests issued after it returned must not;
    the new bitmap holds exactly the requests that are not in the fleece
    (flavour B) or all of them (flavour A: rotated before, quiesced)."""
    flav = args.flavour
    old, new = ("b1", "b2") if flav == "b" else ("b2", "b3")
    q = Qmp(args.qmp)
    h = live()
    base = read_all(h, SIZE)
    h.shutdown()
    compare(base, file_bytes(args.final_model),
            f"live export before round {flav}")
    with open(args.scratch, "wb") as f:
        f.truncate(SIZE)
    rotation = [{"type": "block-dirty-bitmap-add",
                 "data": {"node": "disk0", "name": new, "granularity": 65536}},
                {"type": "block-dirty-bitmap-disable",
                 "data": {"node": "disk0", "name": old}}]
    q.ok_empty("blockdev-add", driver="file", **{"node-name": "fl-tmp"},
               filename=args.scratch)
    if flav == "a":
        q.ok_empty("transaction", actions=rotation)       # quiesced (5.1)
        q.ok_empty("blockdev-add", driver="copy-before-write",
                   **{"node-name": "fl-cbw"}, file="disk0-file",
                   target="fl-tmp")
    w = SlotWriter(31 if flav == "b" else 32)
    w.start()
    try:
        w.wait_done(150, 20)
        t_send = time.time()
        if flav == "b":
            q.ok_empty("transaction", actions=rotation + [
                {"type": "blockdev-backup",
                 "data": {"job-id": "fleece-job", "device": "disk0",
                          "target": "fl-tmp", "sync": "none",
                          "filter-node-name": "fl-cbw"}}])
        else:
            q.ok_empty("blockdev-reopen", options=[
                {"driver": "raw", "node-name": "disk0", "file": "fl-cbw",
                 "discard": "unmap"}])
        t_ret = time.time()
        w.wait_done(w.done + 250, 20)
    finally:
        w.finish()
    soft_eq(w.errors, [], "writer errors")
    q.ok_empty("blockdev-add", driver="snapshot-access",
               **{"node-name": "fl-access"}, file="fl-cbw")
    q.ok_empty("block-export-add", type="nbd", id="fleece",
               **{"node-name": "fl-access"}, name="fleece", writable=False)
    h = fleece()
    fl = read_all(h, SIZE)
    h.shutdown()
    h = live()
    lv = read_all(h, SIZE)
    h.shutdown()

    want_live = bytearray(base)
    inside, outside, undecided, torn = [], [], [], []
    for op in w.ops:
        kind, off, n = op[:3]
        nd = SlotWriter.data(op) if kind == "write" else bytes(n)
        want_live[off:off + n] = nd
        od, fd = base[off:off + n], fl[off:off + n]
        diff = [i for i in range(n) if nd[i] != od[i]]
        if not diff:
            undecided.append(op)
        elif all(fd[i] == nd[i] for i in diff) and fd == nd:
            inside.append(op)
        elif fd == od:
            outside.append(op)
        else:
            torn.append(op)
    print(f"  round {flav}: {len(w.ops)} requests: {len(inside)} in the "
          f"fleece, {len(outside)} not, {len(undecided)} undecidable; "
          f"command took {t_ret - t_send:.3f} s", flush=True)
    compare(lv, bytes(want_live), f"round {flav}: live export")
    for op in torn[:5]:
        kind, off, n = op[:3]
        compare(fl[off:off + n], base[off:off + n],
                f"round {flav}: {kind} ({off}, {n}) is partly in the fleece",
                off)
    soft_eq(len(torn), 0, f"round {flav}: requests torn by the point in time")
    late = [op[:3] for op in inside if op[5] > t_ret]
    early = [op[:3] for op in outside if op[6] < t_send]
    soft_eq(late[:5], [], f"round {flav}: requests issued after the "
            f"command returned, yet in the fleece")
    soft_eq(early[:5], [], f"round {flav}: requests completed before the "
            f"command was sent, yet missing from the fleece")
    # outside every request the fleece is the base
    mask = bytearray(base)
    mfl = bytearray(fl)
    for op in w.ops:
        off, n = op[1], op[2]
        mask[off:off + n] = bytes(n)
        mfl[off:off + n] = bytes(n)
    compare(bytes(mfl), bytes(mask), f"round {flav}: fleece outside requests")

    bm = q.bitmaps("disk0")
    gout = granules([tuple(o[:5]) for o in outside])
    gund = granules([tuple(o[:5]) for o in undecided])
    gall = granules([tuple(o[:5]) for o in w.ops])
    got = granule_set(q, new)
    if flav == "b":
        soft_check(gout <= got, f"round b: {new} misses granules of requests "
                   f"that are not in the fleece: {sorted(gout - got)[:10]}")
        soft_check(got <= gout | gund, f"round b: {new} has granules of "
                   f"requests that are in the fleece only: "
                   f"{sorted(got - gout - gund)[:10]}")
        soft_check(granules([tuple(o[:5]) for o in inside]) <=
                   granule_set(q, old), f"round b: frozen {old} misses "
                   f"granules of requests that are in the fleece")
    else:
        soft_eq(sorted(got), sorted(gall), f"round a: {new} = every request "
                f"(rotated before the writer started)")
        soft_eq(bm[old]["recording"], False, f"round a: {old} frozen")

    # teardown
    del_export(q, "fleece")
    q.ok_empty("blockdev-del", **{"node-name": "fl-access"})
    if flav == "b":
        q.ok_empty("block-job-cancel", device="fleece-job")
        ev = q.wait_event("BLOCK_JOB_CANCELLED", 10,
                          lambda e: e["data"].get("device") == "fleece-job")
        check(ev is not None, "no BLOCK_JOB_CANCELLED")
    else:
        q.ok_empty("blockdev-reopen", options=[
            {"driver": "raw", "node-name": "disk0", "file": "disk0-file",
             "discard": "unmap"}])
        q.ok_empty("blockdev-del", **{"node-name": "fl-cbw"})
    soft_check(allocated_bytes(args.scratch) <= 4096, f"round {flav}: scratch "
               f"file after the fleece: {allocated_bytes(args.scratch)} bytes")
    q.ok_empty("blockdev-del", **{"node-name": "fl-tmp"})
    soft_eq(sorted(q.nodes()), ["disk0", "disk0-file"],
            f"round {flav}: nodes after teardown")
    write_image(args.final_model, bytes(want_live))


def granule_set(q, name):
    """Dirty granules of a bitmap on disk0, through a temporary export."""
    eid = "gs-" + name
    q.ok_empty("block-export-add", type="nbd", id=eid,
               **{"node-name": "disk0"}, name=eid, writable=False,
               bitmaps=[{"node": "disk0", "name": name}])
    h = connect(args.sock, eid, [DB + name])
    out, pos = set(), 0
    for n, f in walk(h, DB + name, SIZE):
        if f & 1:
            out.update(range(pos // GRAN, (pos + n - 1) // GRAN + 1))
        pos += n
    h.shutdown()
    del_export(q, eid)
    return out


# ------------------------------------------------------------------ race

def phase_race():
    """Fresh fleeces (flavour B, no rotation), each read by two connections
    with many reads in flight while two connections write, zero and trim
    the very clusters being read, all still uncopied when they start: every
    read must return the point in time at once, and the live writes must
    all land."""
    q = Qmp(args.qmp)
    model = bytearray(file_bytes(args.final_model))
    region = 8 * MiB
    bad = []
    for rnd in range(args.rounds):
        r0 = (16 + 8 * (rnd % 5)) * MiB
        with open(args.scratch, "wb") as f:
            f.truncate(SIZE)
        q.ok_empty("blockdev-add", driver="file", **{"node-name": "fl-tmp"},
                   filename=args.scratch)
        q.ok_empty("transaction", actions=[
            {"type": "blockdev-backup",
             "data": {"job-id": "race-job", "device": "disk0",
                      "target": "fl-tmp", "sync": "none",
                      "filter-node-name": "fl-cbw"}}])
        pit = bytes(model)
        q.ok_empty("blockdev-add", driver="snapshot-access",
                   **{"node-name": "fl-access"}, file="fl-cbw")
        q.ok_empty("block-export-add", type="nbd", id="fleece",
                   **{"node-name": "fl-access"}, name="fleece",
                   writable=False)
        lock = threading.Lock()
        inflight = []
        stop = threading.Event()
        errors = []
        counts = {"reads": 0, "writes": 0}

        def writer(idx):
            rng = random.Random(rnd * 100 + idx)
            h = live()
            pending = []
            while not stop.is_set() or pending:
                while not stop.is_set() and len(pending) < 16:
                    n = rng.choice([1, 4095, CLUSTER - 1, CLUSTER + 1,
                                    3 * CLUSTER + 5])
                    with lock:
                        for _ in range(20):
                            off = r0 + rng.randrange(0, region - n)
                            if all(off + n <= a or b <= off
                                   for a, b in inflight):
                                break
                        else:
                            break
                        r = rng.random()
                        kind = "write" if r < 0.7 else \
                            "zero" if r < 0.85 else "trim"
                        data = rng.randbytes(n) if kind == "write" else None
                        model[off:off + n] = data or bytes(n)
                        inflight.append((off, off + n))
                    if kind == "write":
                        buf = nbd.Buffer.from_bytearray(bytearray(data))
                        c = h.aio_pwrite(buf, off)
                    elif kind == "zero":
                        buf, c = None, h.aio_zero(n, off)
                    else:
                        buf, c = None, h.aio_trim(n, off)
                    pending.append((c, (off, off + n), buf))
                if pending:
                    h.poll(100)
                still = []
                for c, rg, buf in pending:
                    try:
                        fin = h.aio_command_completed(c)
                    except nbd.Error as e:
                        errors.append(f"write {rg}: {e}")
                        fin = True
                    if fin:
                        with lock:
                            inflight.remove(rg)
                            counts["writes"] += 1
                    else:
                        still.append((c, rg, buf))
                pending = still
            h.flush()
            h.shutdown()

        def reader(idx):
            rng = random.Random(rnd * 100 + 50 + idx)
            h = fleece()
            pending = []
            while not stop.is_set() or pending:
                while not stop.is_set() and len(pending) < 16:
                    n = rng.choice([1, 4095, CLUSTER - 1, CLUSTER,
                                    CLUSTER + 1, 3 * CLUSTER + 7, MiB])
                    off = r0 + rng.randrange(0, region - n)
                    if rng.random() < 0.3:
                        off -= off % CLUSTER
                    buf = nbd.Buffer(n)
                    pending.append((h.aio_pread(buf, off), off, n, buf))
                if pending:
                    h.poll(100)
                still = []
                for c, off, n, buf in pending:
                    try:
                        fin = h.aio_command_completed(c)
                    except nbd.Error as e:
                        errors.append(f"read ({off}, {n}): {e}")
                        fin = True
                        buf = None
                    if fin:
                        counts["reads"] += 1
                        if buf is not None and \
                                buf.to_bytearray() != pit[off:off + n]:
                            bad.append((rnd, off, n,
                                        bytes(buf.to_bytearray())))
                    else:
                        still.append((c, off, n, buf))
                pending = still
            h.shutdown()

        def guarded(fn, i):
            try:
                fn(i)
            except Exception as e:  # noqa: BLE001
                errors.append(f"{fn.__name__} {i}: {type(e).__name__}: {e}")
                stop.set()

        threads = [threading.Thread(target=guarded, args=(f, i))
                   for f in (reader, writer) for i in range(2)]
        for t in threads:
            t.start()
        time.sleep(args.round_seconds)
        stop.set()
        for t in threads:
            t.join(30)
            check(not t.is_alive(), "race thread did not finish")
        for e in errors[:5]:
            soft_fail(f"round {rnd}: {e}")
        h = fleece()
        compare(read_all(h, SIZE), pit, f"round {rnd}: whole fleece")
        h.shutdown()
        h = live()
        compare(read_all(h, SIZE), bytes(model), f"round {rnd}: live export")
        h.shutdown()
        print(f"  round {rnd} at {r0 // MiB} MiB: {counts['reads']} reads, "
              f"{counts['writes']} writes", flush=True)
        del_export(q, "fleece")
        q.ok_empty("blockdev-del", **{"node-name": "fl-access"})
        q.ok_empty("block-job-cancel", device="race-job")
        check(q.wait_event("BLOCK_JOB_CANCELLED", 10) is not None,
              "no BLOCK_JOB_CANCELLED")
        q.ok_empty("blockdev-del", **{"node-name": "fl-tmp"})
    for rnd, off, n, got in bad[:10]:
        soft_fail(f"round {rnd}: fleece read ({off}, {n}) returned "
                  f"non-point-in-time data"
                  f"{' (zeroes)' if not any(got) else ''}")
    soft_eq(len(bad), 0, "fleece reads racing live writes that differ from "
            "the point in time")
    write_image(args.final_model, bytes(model))


# ------------------------------------------------------------------ main

def main():
    global args, SIZE
    p = argparse.ArgumentParser()
    p.add_argument("phase")
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--qmp")
    p.add_argument("--sock")
    p.add_argument("--cl-sock")
    p.add_argument("--image")
    p.add_argument("--prev")
    p.add_argument("--scratch")
    p.add_argument("--state")
    p.add_argument("--a-model")
    p.add_argument("--b-model")
    p.add_argument("--final-model")
    p.add_argument("--map")
    p.add_argument("--out")
    p.add_argument("--stop-file")
    p.add_argument("--ready-file")
    p.add_argument("--writer-out")
    p.add_argument("--windows")
    p.add_argument("--max-seconds", type=float, default=40)
    p.add_argument("--flavour", choices=["a", "b"])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--round-seconds", type=float, default=0.4)
    args = p.parse_args()
    SIZE = args.size
    phases = {"prepare": phase_prepare, "setup-a": phase_setup_a,
              "fleece": phase_fleece, "reads": phase_reads,
              "check-map": phase_check_map, "writer": phase_writer,
              "incremental": phase_incremental, "final": phase_final,
              "atomic": phase_atomic, "race": phase_race}
    fn = phases[args.phase]
    run(fn, timeout=args.max_seconds + 30 if args.phase == "writer" else 40)
    return finish()


if __name__ == "__main__":
    sys.exit(main())

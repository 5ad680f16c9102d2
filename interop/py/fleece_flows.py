# SPDX-License-Identifier: MIT
"""Fleecing flows over QMP: helper for interop/fleece-flows.sh.

Phases, run in this order against one fleeced (command-line export disk0,
discard=on, on --cl-sock; NBD server started here on --sock):

  flavour-a   control-api.md 5.1 steps 1-10 exactly, every step
              {"return": {}}, with the bitmap rotation transaction before
              step 3; writes before the rotation, between the rotation and
              step 1, between steps 2 and 3 (all in the fleece) and after
              the point in time; the scratch file grows by exactly the
              non-zero clusters copied (64 KiB; the last cluster partial);
              errors while the fleece exists (3.3, 3.4 texts) leave the
              graph, jobs, exports and bitmaps unchanged and the filter
              working; BLOCK_EXPORT_DELETED; the scratch space comes back at
              step 9; the reopen without "discard" drops it (3.4), a reopen
              with "discard": "unmap" brings it back.
  rollback    transactions with blockdev-backup and a failing action (3.9):
              the error of the failing action, no job, no filter node,
              bitmaps unchanged, live writes not copied anywhere.
  b-up        5.2 steps 1-4 (b0 removed, rotation b1 -> b2), query-block-jobs
              while running (QEMU 7.2's members, offset = bytes copied),
              busy errors (3.3, 3.10) with nothing changed, writes after
              the point in time; leaves the fleece up for the shell
              (fleecectl, nbdcopy, nbdinfo) and saves the point in time.
  b-down      5.2 steps 5-8: BLOCK_EXPORT_DELETED, BLOCK_JOB_CANCELLED (shape,
              order relative to the return), query-block-jobs [], the
              scratch space given back at the cancel.
  cbw-bitmap  copy-before-write with "bitmap": {"node","name"} (reference.md
              2.5): reads outside the bitmap fail with EINVAL (EACCES),
              reads inside return point-in-time data, only clusters inside
              are copied.
  final       the live disk kept every write; b1 / b2 hold exactly the
              writes of their periods.

State between phases (the model of the disk, the writes of each bitmap
period) is kept in --state.
"""

import argparse
import errno
import json
import os
import sys
import time

import nbd

from fleece_common import (CLUSTER, DB, KiB, MiB, Qmp, check, connect,
                           expect_nbd_error, fail, file_bytes, finish, note,
                           pattern, read_all, run, soft_check, soft_eq,
                           soft_fail, walk)

C = CLUSTER
args = None
SIZE = 0
NCL = 0
ST = {}          # persistent state, see load/save

DATA_CLUSTERS = [0, 1, 2, 8, 9, 10, 11, 20, 40, 41, 45, 46, 47, 48, 60]
ZERO_CLUSTERS = [30, 31]            # allocated, all zero bytes
SLACK = 8 * KiB                     # ext4 extent-tree blocks count in st_blocks


# ------------------------------------------------------------------ model

def load():
    global ST
    with open(args.state) as f:
        ST = json.load(f)


def save():
    with open(args.state + ".new", "w") as f:
        json.dump(ST, f)
    os.replace(args.state + ".new", args.state)


def model():
    return bytearray(file_bytes(args.model))


def save_model(m):
    with open(args.model, "wb") as f:
        f.write(m)


def last_cluster():
    return NCL - 1


def clusters_of(off, length):
    return set(range(off // C, (off + length - 1) // C + 1))


def cluster_len(c):
    return min(C, SIZE - c * C)


def granule_map(gs):
    out = []
    for i in range(NCL):
        f = 1 if i in gs else 0
        n = cluster_len(i)
        if out and out[-1][1] == f:
            out[-1] = (out[-1][0] + n, f)
        else:
            out.append((n, f))
    return out


def dirty_bytes(gs):
    return sum(cluster_len(i) for i in gs)


class Disk:
    """The live export plus the model of its content."""

    def __init__(self):
        self.h = connect(args.cl_sock, "disk0")
        self.m = model()

    def write(self, off, length, tag, flags=0):
        data = pattern(off, length, tag)
        self.h.pwrite(data, off, flags)
        self.m[off:off + length] = data
        return clusters_of(off, length)

    def zero(self, off, length, flags=0):
        self.h.zero(length, off, flags)
        self.m[off:off + length] = bytes(length)
        return clusters_of(off, length)

    def trim(self, off, length, dropped=False):
        """TRIM; with discard=unmap it reads back as zeroes (the hole is
        punched), with discard "ignore" it is dropped."""
        self.h.trim(length, off)
        if not dropped:
            self.m[off:off + length] = bytes(length)
        return clusters_of(off, length)

    def check(self, what):
        self.h.flush()
        got = read_all(self.h, SIZE)
        compare(got, bytes(self.m), what)

    def close(self):
        self.h.flush()
        self.h.shutdown()
        save_model(self.m)


def compare(got, want, what, base=0):
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


def alloc(path):
    return os.stat(path).st_blocks * 512


class Scratch:
    """Allocated bytes of a scratch file versus the clusters copied:
    non-zero point-in-time clusters, each once (64 KiB, the last one
    partial); all-zero clusters are not written."""

    def __init__(self, path, pit):
        self.path, self.pit = path, pit
        self.copied = set()
        self.base = alloc(path)

    def expect(self, clusters, what):
        for c in clusters:
            if any(self.pit[c * C:c * C + cluster_len(c)]):
                self.copied.add(c)
        want = sum(cluster_len(c) for c in self.copied)
        # cluster_len is a multiple of 4 KiB here, so no rounding
        got = alloc(self.path) - self.base
        if not want <= got <= want + SLACK:
            soft_fail(f"scratch file after {what}: {got} bytes allocated, "
                      f"want {want} (clusters {sorted(self.copied)})")


def check_fleece(pit, what, h=None):
    own = h is None
    h = h or connect(args.sock, "fleece")
    soft_eq(h.get_size(), SIZE, f"{what}: fleece size")
    compare(read_all(h, SIZE), bytes(pit), f"{what}: whole fleece")
    for off, n in ((0, 1), (C - 1, C + 1), (8 * C + 7, 3 * C), (SIZE - 1, 1),
                   (last_cluster() * C - 3, 4095), (40 * C + 100, MiB)):
        n = min(n, SIZE - off)
        compare(h.pread(n, off), bytes(pit[off:off + n]),
                f"{what}: fleece read ({off}, {n})", off)
    if own:
        h.shutdown()


def bitmap_map(q, bitmap, node="disk0"):
    """qemu:dirty-bitmap:NAME through a temporary read-only export."""
    q.ok_empty("block-export-add", type="nbd", id="bm-view",
               **{"node-name": node}, name="bm-view", writable=False,
               bitmaps=[{"node": node, "name": bitmap}])
    h = connect(args.sock, "bm-view", [DB + bitmap])
    runs = walk(h, DB + bitmap, SIZE)
    h.shutdown()
    del_export(q, "bm-view")
    return runs


def del_export(q, eid, check_order=False):
    """block-export-del (safe), retried for up to 5 s while the server
    notices a client's disconnect; returns once BLOCK_EXPORT_DELETED came."""
    q.take_events("BLOCK_EXPORT_DELETED")
    deadline = time.monotonic() + 5
    while True:
        r = q.cmd("block-export-del", id=eid)
        if r == {"return": {}}:
            break
        if time.monotonic() > deadline or \
                r.get("error", {}).get("desc") != f"export '{eid}' still in use":
            fail(f"block-export-del {eid}: got {r}, want {{'return': {{}}}}")
        time.sleep(0.1)
    before = [e for e in q.last_events if e["event"] == "BLOCK_EXPORT_DELETED"]
    ev = q.wait_event("BLOCK_EXPORT_DELETED", 10,
                      lambda e: e["data"].get("id") == eid)
    if not soft_check(ev is not None, f"no BLOCK_EXPORT_DELETED for {eid}"):
        return
    soft_eq(sorted(ev), ["data", "event", "timestamp"],
            "BLOCK_EXPORT_DELETED members")
    soft_eq(ev["data"], {"id": eid}, "BLOCK_EXPORT_DELETED data")
    ts = ev["timestamp"]
    soft_check(isinstance(ts.get("seconds"), int) and
               isinstance(ts.get("microseconds"), int),
               f"BLOCK_EXPORT_DELETED timestamp {ts}")
    if check_order:
        # QEMU 7.2 sends it before the return (4, 9.5.2: "should")
        soft_check(bool(before), "BLOCK_EXPORT_DELETED arrived after the "
                   "return of block-export-del (QEMU 7.2 sends it before)")


def error_unchanged(q, what, cls, desc, execute, qemu_desc=None, **arguments):
    """A command that must fail and change nothing.  desc: the text the spec
    quotes (asserted); qemu_desc: QEMU 7.2's text for a case the spec does
    not quote (checked against qemu-storage-daemon 7.2.22; a different
    wording is only a note, the spec says "should")."""
    before = q.state()
    r = q.cmd(execute, **arguments)
    if desc is not None:
        soft_eq(r, {"error": {"class": cls, "desc": desc}}, what)
    else:
        got = r.get("error", {})
        soft_eq((list(r), got.get("class")), (["error"], cls),
                f"{what}: {r}")
        if got.get("desc") != qemu_desc:
            note(f"{what}: desc [{got.get('desc')}], QEMU 7.2 says "
                 f"[{qemu_desc}]")
    soft_eq(q.state(), before, f"{what}: state after the error")


# ------------------------------------------------------------------ phases

def phase_prepare():
    global SIZE
    m = bytearray(SIZE)
    for c in DATA_CLUSTERS + [last_cluster()]:
        m[c * C:c * C + cluster_len(c)] = pattern(c * C, cluster_len(c), 1)
    with open(args.image, "wb") as f:
        f.truncate(SIZE)
        for c in DATA_CLUSTERS + [last_cluster()] + ZERO_CLUSTERS:
            f.seek(c * C)
            f.write(m[c * C:c * C + cluster_len(c)])
    save_model(m)
    ST.clear()
    save()


def phase_flavour_a():
    load()
    q = Qmp(args.qmp)
    q.ok_empty("nbd-server-start",
               addr={"type": "unix", "data": {"path": args.sock}})
    q.ok_empty("block-dirty-bitmap-add", node="disk0", name="b0")
    d = Disk()
    b0 = d.write(2 * C + 100, 5000, 2) | d.write(50 * C, 10, 2)

    # the rotation, writers quiesced (5.1)
    d.h.flush()
    q.ok_empty("transaction", actions=[
        {"type": "block-dirty-bitmap-add",
         "data": {"node": "disk0", "name": "b1", "granularity": 65536}},
        {"type": "block-dirty-bitmap-disable",
         "data": {"node": "disk0", "name": "b0"}}])
    # between the rotation and step 3: in b1 and in the fleece
    b1 = d.write(9 * C + 7, 100, 3)
    truncate(args.scratch)
    q.ok_empty("blockdev-add", driver="file", **{"node-name": "fl-tmp"},
               filename=args.scratch)                                 # 1
    q.ok_empty("blockdev-add", driver="copy-before-write",
               **{"node-name": "fl-cbw", "min-cluster-size": C}, file="disk0-file",
               target="fl-tmp")                                       # 2
    b1 |= d.write(10 * C + 3, 100, 3)     # between 2 and 3: in the fleece
    d.h.flush()
    soft_eq(alloc(args.scratch), 0, "scratch allocation before step 3")
    q.ok_empty("blockdev-reopen", options=[
        {"driver": "raw", "node-name": "disk0", "file": "fl-cbw"}])   # 3
    pit = bytes(d.m)
    q.ok_empty("blockdev-add", driver="snapshot-access",
               **{"node-name": "fl-access"}, file="fl-cbw")           # 4
    q.ok_empty("block-export-add", type="nbd", id="fleece",
               **{"node-name": "fl-access"}, name="fleece", writable=False,
               bitmaps=[{"node": "disk0", "name": "b0"}])             # 5

    soft_eq(q.exports(), q.cl_exports() + [
        {"id": "fleece", "type": "nbd", "node-name": "fl-access",
         "shutting-down": False}], "query-block-exports (flavour A)")
    soft_eq(sorted(q.nodes()),
            ["disk0", "disk0-file", "fl-access", "fl-cbw", "fl-tmp"],
            "nodes (flavour A)")
    soft_eq(q.ok("query-block-jobs"), [], "query-block-jobs (flavour A)")
    bm = q.bitmaps()
    soft_eq({k: (v["recording"], v["busy"], v["count"]) for k, v in bm.items()},
            {"b0": (False, True, dirty_bytes(b0)),
             "b1": (True, False, dirty_bytes(b1))}, "bitmaps at step 5")
    check_fleece(pit, "flavour A at step 5")
    h = connect(args.sock, "fleece", [DB + "b0"])
    soft_eq(walk(h, DB + "b0", SIZE), granule_map(b0),
            "qemu:dirty-bitmap:b0 on the fleece")
    h.shutdown()

    # writes after the point in time, scratch growth exact
    sc = Scratch(args.scratch, pit)
    steps = [
        ("write in a data cluster", lambda: d.write(5, 10, 4)),
        ("second write to the same cluster", lambda: d.write(500, 10, 4)),
        ("write_zeroes over 2 data clusters", lambda: d.zero(8 * C, 2 * C)),
        ("write into a hole", lambda: d.write(15 * C + 1, 100, 4)),
        ("write into allocated zeroes", lambda: d.write(30 * C + 1000, 10, 4)),
        ("NO_HOLE write_zeroes on allocated zeroes",
         lambda: d.zero(31 * C, C, nbd.CMD_FLAG_NO_HOLE)),
        ("write in the last partial cluster",
         lambda: d.write(last_cluster() * C + 10, 100, 4)),
        ("write across two data clusters",
         lambda: d.write(41 * C - 50, 100, 4)),
        ("unaligned write_zeroes over 3 data clusters",
         lambda: d.zero(46 * C + 1, 2 * C)),
    ]
    for what, fn in steps:
        touched = fn()
        b1 |= touched
        d.h.flush()
        sc.expect(touched, what)
    # step 3 had no "discard": the node is back to "ignore" (3.4), so a
    # TRIM is dropped: nothing changes, nothing is copied
    before_alloc = alloc(args.scratch)
    d.trim(20 * C, C, dropped=True)
    d.h.flush()
    soft_eq(d.h.pread(C, 20 * C), bytes(d.m[20 * C:21 * C]),
            "TRIM after a reopen without \"discard\" (discard reverts to "
            "ignore, 3.4): data must stay")
    if alloc(args.scratch) != before_alloc:
        note("the dropped TRIM copied its cluster to the scratch file")
    if q.bitmaps()["b1"]["count"] != dirty_bytes(b1):
        note("the dropped TRIM dirtied b1 (QEMU 7.2 does not)")
        b1 |= {20}
    d.check("live export after the writes (flavour A)")
    check_fleece(pit, "flavour A after the writes")

    # errors while the fleece exists: nothing changes (3.3, 3.4, 3.10)
    error_unchanged(
        q, "reopen back to disk0-file while fl-access exists", "GenericError",
        "Permission conflict on node 'disk0-file': permissions 'write' are "
        "both required by node 'disk0' (uses node 'disk0-file' as 'file' "
        "child) and unshared by node 'fl-cbw' (uses node 'disk0-file' as "
        "'file' child).", "blockdev-reopen",
        options=[{"driver": "raw", "node-name": "disk0", "file": "disk0-file"}])
    error_unchanged(q, "blockdev-del fl-access while exported", "GenericError",
                    "Node fl-access is in use", "blockdev-del",
                    **{"node-name": "fl-access"})
    error_unchanged(q, "blockdev-del disk0", "GenericError",
                    "Node disk0 is in use", "blockdev-del",
                    **{"node-name": "disk0"})
    error_unchanged(q, "blockdev-del disk0-file", "GenericError",
                    "Block device disk0-file is in use", "blockdev-del",
                    **{"node-name": "disk0-file"})
    error_unchanged(q, "blockdev-del fl-cbw (in use)", "GenericError", None,
                    "blockdev-del", qemu_desc="Block device fl-cbw is in use",
                    **{"node-name": "fl-cbw"})
    error_unchanged(q, "blockdev-del fl-tmp (in use)", "GenericError", None,
                    "blockdev-del", qemu_desc="Block device fl-tmp is in use",
                    **{"node-name": "fl-tmp"})
    error_unchanged(q, "blockdev-del unknown node", "GenericError",
                    "Failed to find node with node-name='nonexist'",
                    "blockdev-del", **{"node-name": "nonexist"})
    error_unchanged(q, "blockdev-reopen unknown file", "GenericError",
                    "Cannot find device='' nor node-name='nonexist'",
                    "blockdev-reopen", options=[
                        {"driver": "raw", "node-name": "disk0",
                         "file": "nonexist"}])
    error_unchanged(q, "blockdev-reopen unknown node", "GenericError",
                    "Failed to find node with node-name='nonexist'",
                    "blockdev-reopen", options=[
                        {"driver": "raw", "node-name": "nonexist",
                         "file": "fl-cbw"}])
    # "driver": "file" with its own valid options; QEMU 7.2.22 answers
    # "Cannot change the option 'driver'" for it (and for qcow2)
    error_unchanged(q, "blockdev-reopen with a different driver (file)",
                    "GenericError", "Cannot change the option 'driver'",
                    "blockdev-reopen", options=[
                        {"driver": "file", "node-name": "disk0",
                         "filename": args.image}])
    error_unchanged(q, "blockdev-reopen with a different driver (qcow2)",
                    "GenericError", "Cannot change the option 'driver'",
                    "blockdev-reopen", options=[
                        {"driver": "qcow2", "node-name": "disk0",
                         "file": "fl-cbw"}])
    error_unchanged(q, "blockdev-reopen without driver", "GenericError",
                    "Parameter 'options[0].driver' is missing",
                    "blockdev-reopen", options=[
                        {"node-name": "disk0", "file": "disk0-file"}])
    error_unchanged(q, "block-job-cancel of an unknown job", "DeviceNotActive",
                    "Block job 'nonexist' not found", "block-job-cancel",
                    device="nonexist")
    # "file" omitted: QEMU 7.2.22 answers "Parameter 'options[0].file' is
    # missing" (the spec quotes no text for it: a note only)
    before = q.state()
    r = q.cmd("blockdev-reopen", options=[
        {"driver": "raw", "node-name": "disk0"}])
    if r != {"error": {"class": "GenericError",
                       "desc": "Parameter 'options[0].file' is missing"}}:
        note(f"blockdev-reopen without \"file\": {r}; QEMU 7.2 says "
             f"GenericError \"Parameter 'options[0].file' is missing\"")
    soft_eq(q.state(), before, "state after a reopen without \"file\"")
    # ... and the filter still copies before write
    touched = d.write(45 * C + 9, 9, 5)
    b1 |= touched
    d.h.flush()
    sc.expect(touched, "a write after the refused commands")
    check_fleece(pit, "flavour A after the refused commands")

    # teardown, steps 6-10
    d.h.flush()
    del_export(q, "fleece", check_order=True)                         # 6
    q.ok_empty("blockdev-del", **{"node-name": "fl-access"})          # 7
    q.ok_empty("blockdev-reopen", options=[
        {"driver": "raw", "node-name": "disk0", "file": "disk0-file"}])  # 8
    q.ok_empty("blockdev-del", **{"node-name": "fl-cbw"})             # 9
    soft_check(alloc(args.scratch) <= 4096,
               f"scratch file after step 9 (fl-cbw deleted): "
               f"{alloc(args.scratch)} bytes allocated, want ~0")
    q.ok_empty("blockdev-del", **{"node-name": "fl-tmp"})             # 10
    soft_eq(sorted(q.nodes()), ["disk0", "disk0-file"], "nodes after step 10")
    touched = d.write(46 * C, 10, 6)      # straight to the file again
    b1 |= touched
    d.check("live export after flavour A")

    # the live node lost discard with the exact step 3/8 (3.4); a reopen
    # passing it again brings TRIM back
    q.ok_empty("blockdev-reopen", options=[
        {"driver": "raw", "node-name": "disk0", "file": "disk0-file",
         "discard": "unmap"}])
    b1 |= d.trim(20 * C, C)
    d.h.flush()
    soft_eq(d.h.pread(C, 20 * C), bytes(C),
            "TRIM after a reopen with \"discard\": \"unmap\"")
    d.close()

    bm = q.bitmaps()
    soft_eq({k: (v["recording"], v["busy"], v["count"]) for k, v in bm.items()},
            {"b0": (False, False, dirty_bytes(b0)),
             "b1": (True, False, dirty_bytes(b1))},
            "bitmaps after flavour A")
    soft_eq(bitmap_map(q, "b0"), granule_map(b0), "b0 map after flavour A")
    soft_eq(bitmap_map(q, "b1"), granule_map(b1),
            "b1 map after flavour A: exactly the writes after the rotation")
    ST["b1"] = sorted(b1)
    save()


def truncate(path):
    with open(path, "wb") as f:
        f.truncate(SIZE)


def backup_action(job, target, filt, device="disk0"):
    return {"type": "blockdev-backup",
            "data": {"job-id": job, "device": device, "target": target,
                     "sync": "none", "filter-node-name": filt,
                     # the space checks count 64 KiB clusters (fleeced's
                     # automatic size is 4 KiB; QEMU 7.2's is 64 KiB)
                     "x-perf": {"min-cluster-size": C}}}


def phase_rollback():
    load()
    q = Qmp(args.qmp)
    truncate(args.scratch2)
    q.ok_empty("blockdev-add", driver="file", **{"node-name": "fl-tmp2"},
               filename=args.scratch2)
    q.take_events()
    cases = [
        ("backup then a duplicate bitmap", "Bitmap already exists: b1",
         [{"type": "block-dirty-bitmap-add",
           "data": {"node": "disk0", "name": "b3"}},
          backup_action("j2", "fl-tmp2", "fl-cbw2"),
          {"type": "block-dirty-bitmap-add",
           "data": {"node": "disk0", "name": "b1"}}]),
        ("backup then abort", "Transaction aborted using Abort action",
         [{"type": "block-dirty-bitmap-disable",
           "data": {"node": "disk0", "name": "b1"}},
          backup_action("j2", "fl-tmp2", "fl-cbw2"),
          {"type": "abort", "data": {}}]),
        ("disable, then backup of an unknown device",
         "Cannot find device='no-such-node' nor node-name='no-such-node'",
         [{"type": "block-dirty-bitmap-disable",
           "data": {"node": "disk0", "name": "b1"}},
          backup_action("j2", "fl-tmp2", "fl-cbw2", device="no-such-node")]),
        ("backup, then a bitmap on an unknown node",
         "Cannot find device='no-such-node' nor node-name='no-such-node'",
         [backup_action("j2", "fl-tmp2", "fl-cbw2"),
          {"type": "block-dirty-bitmap-add",
           "data": {"node": "no-such-node", "name": "b3"}}]),
    ]
    for what, desc, actions in cases:
        error_unchanged(q, f"transaction: {what}", "GenericError", desc,
                        "transaction", actions=actions)
        soft_check("fl-cbw2" not in q.nodes(), f"{what}: filter node left")
    error_unchanged(q, "transaction with an unknown action type",
                    "GenericError", "Parameter 'type' does not accept value "
                    "'block-dirty-bitmap-bogus'", "transaction", actions=[
                        backup_action("j2", "fl-tmp2", "fl-cbw2"),
                        {"type": "block-dirty-bitmap-bogus",
                         "data": {"node": "disk0", "name": "b3"}}])
    before = q.state()
    q.ok_empty("transaction", actions=[])
    soft_eq(q.state(), before, "state after an empty transaction")
    # JOB_STATUS_CHANGE of a rolled-back job is optional; if sent, it ends
    st = [e["data"]["status"] for e in q.take_events("JOB_STATUS_CHANGE")
          if e["data"].get("id") == "j2"]
    if st:
        soft_eq(st[-1], "null", f"JOB_STATUS_CHANGE for j2 {st}: last status")
    soft_eq(q.take_events("BLOCK_JOB_CANCELLED"), [],
            "BLOCK_JOB_CANCELLED for a rolled-back job")
    # nothing copies: a write to a data cluster leaves fl-tmp2 empty, and is
    # recorded by b1 (still recording: the disable was rolled back)
    d = Disk()
    b1 = set(ST["b1"]) | d.write(11 * C + 5, 10, 7)
    d.close()
    soft_eq(alloc(args.scratch2), 0, "fl-tmp2 allocation after a live write")
    bm = q.bitmaps()
    soft_eq({k: (v["recording"], v["busy"], v["count"]) for k, v in bm.items()},
            {"b0": (False, False, bm.get("b0", {}).get("count")),
             "b1": (True, False, dirty_bytes(b1))},
            "bitmaps after the rolled-back transactions")
    # blockdev-backup on its own (3.10: fleeced should accept it), cancelled
    q.take_events()
    q.ok_empty("blockdev-backup",
               **backup_action("j2", "fl-tmp2", "fl-cbw2")["data"])
    soft_eq(q.ok("query-block-jobs"), [dict(job_entry(0), device="j2")],
            "query-block-jobs after a standalone blockdev-backup")
    q.ok_empty("block-job-cancel", device="j2")
    ev = q.wait_event("BLOCK_JOB_CANCELLED", 10,
                      lambda e: e["data"].get("device") == "j2")
    soft_check(ev is not None, "no BLOCK_JOB_CANCELLED for j2")
    soft_eq(q.ok("query-block-jobs"), [], "query-block-jobs after cancel j2")
    soft_check("fl-cbw2" not in q.nodes(), "fl-cbw2 left after cancel j2")
    q.ok_empty("blockdev-del", **{"node-name": "fl-tmp2"})
    ST["b1"] = sorted(b1)
    save()


def job_entry(offset):
    """A running fleece job as QEMU 7.2 lists it in query-block-jobs."""
    return {"auto-finalize": True, "io-status": "ok", "device": "fleece-job",
            "auto-dismiss": True, "busy": False, "len": SIZE,
            "offset": offset, "status": "running", "paused": False,
            "speed": 0, "ready": False, "type": "backup"}


def fast_zero(d, off):
    """NBD_CMD_FLAG_FAST_ZERO: the server zeroes, or fails fast with ENOTSUP
    and changes no data (it may still dirty bitmaps, as QEMU 7.2 does, and
    copy the cluster first).  A plain write to the cluster follows, so the
    expected bitmaps and scratch space do not depend on the choice."""
    try:
        return d.zero(off, C, nbd.CMD_FLAG_FAST_ZERO)
    except nbd.Error as e:
        soft_eq(e.errnum, errno.ENOTSUP, f"FAST_ZERO failed: {e}")
        note(f"FAST_ZERO refused: {e}")
        soft_eq(d.h.pread(C, off) == d.m[off:off + C], True,
                "data under a refused FAST_ZERO unchanged")
        return d.write(off + 3, 5, 8)


def phase_b_up():
    load()
    q = Qmp(args.qmp)
    # the backup from fleece A succeeded: its frozen bitmap goes (6.1)
    q.ok_empty("block-dirty-bitmap-remove", node="disk0", name="b0")
    d = Disk()
    b1 = set(ST["b1"])
    truncate(args.scratch)
    q.ok_empty("blockdev-add", driver="file", **{"node-name": "fl-tmp"},
               filename=args.scratch)                                 # 1
    q.take_events()
    q.ok_empty("transaction", actions=[
        {"type": "block-dirty-bitmap-add",
         "data": {"node": "disk0", "name": "b2", "granularity": 65536}},
        {"type": "block-dirty-bitmap-disable",
         "data": {"node": "disk0", "name": "b1"}},
        backup_action("fleece-job", "fl-tmp", "fl-cbw")])              # 2
    pit = bytes(d.m)
    soft_eq(q.ok("query-block-jobs"), [job_entry(0)],
            "query-block-jobs right after the transaction")
    q.ok_empty("blockdev-add", driver="snapshot-access",
               **{"node-name": "fl-access"}, file="fl-cbw")           # 3
    q.ok_empty("block-export-add", type="nbd", id="fleece",
               **{"node-name": "fl-access"}, name="fleece", writable=False,
               bitmaps=[{"node": "disk0", "name": "b1"}])             # 4
    soft_eq(sorted(q.nodes()),
            ["disk0", "disk0-file", "fl-access", "fl-cbw", "fl-tmp"],
            "nodes (flavour B)")
    soft_eq(q.exports(), q.cl_exports() + [
        {"id": "fleece", "type": "nbd", "node-name": "fl-access",
         "shutting-down": False}], "query-block-exports (flavour B)")
    bm = q.bitmaps()
    soft_eq({k: (v["recording"], v["busy"], v["count"]) for k, v in bm.items()},
            {"b1": (False, True, dirty_bytes(b1)), "b2": (True, False, 0)},
            "bitmaps at step 4")
    check_fleece(pit, "flavour B at step 4")

    sc = Scratch(args.scratch, pit)
    b2, touched_all = set(), set()
    steps = [
        ("write in a data cluster", lambda: d.write(1 * C + 1, 1, 8)),
        ("aligned TRIM of a data cluster (discard unmap)",
         lambda: d.trim(10 * C, C)),
        ("unaligned TRIM across data clusters",
         lambda: d.trim(40 * C + 5, C)),
        ("write_zeroes (may trim) of a data cluster", lambda: d.zero(2 * C, C)),
        ("TRIM of a hole", lambda: d.trim(55 * C, C)),
        ("write into a hole", lambda: d.write(56 * C + 3, 3, 8)),
        ("write into allocated zeroes", lambda: d.write(30 * C, 1, 8)),
        ("write the last byte", lambda: d.write(SIZE - 1, 1, 8)),
        ("multi-cluster unaligned write", lambda: d.write(59 * C - 1, 2 * C + 2, 8)),
        ("FUA write in a data cluster",
         lambda: d.write(41 * C + 77, 1000, 8, nbd.CMD_FLAG_FUA)),
        ("FAST_ZERO write_zeroes of a data cluster", lambda: fast_zero(d, 8 * C)),
    ]
    for what, fn in steps:
        touched = fn()
        b2 |= touched
        touched_all |= touched
        d.h.flush()
        sc.expect(touched, what)
    # requests straddling the end are refused (7.3) and copy nothing
    hs = connect(args.cl_sock, "disk0", strict=False)
    before_alloc, before_b2 = alloc(args.scratch), q.bitmaps()["b2"]["count"]
    for what, fn in (("write", lambda: hs.pwrite(b"xy", SIZE - 1)),
                     ("write_zeroes", lambda: hs.zero(C, SIZE - 4096)),
                     ("trim", lambda: hs.trim(C, SIZE - C + 4096))):
        try:
            fn()
            soft_fail(f"{what} straddling the end of disk0 succeeded")
        except nbd.Error as e:
            soft_check(e.errnum in (errno.EINVAL, errno.ENOSPC),
                       f"{what} straddling the end: {e}")
    hs.shutdown()
    soft_eq(alloc(args.scratch), before_alloc,
            "scratch allocation after refused requests straddling the end")
    soft_eq(q.bitmaps()["b2"]["count"], before_b2,
            "b2 count after refused requests straddling the end")
    d.check("live export after the writes (flavour B)")
    check_fleece(pit, "flavour B after the writes")
    h = connect(args.sock, "fleece", [DB + "b1"])
    soft_eq(walk(h, DB + "b1", SIZE), granule_map(b1),
            "qemu:dirty-bitmap:b1 on the fleece")
    h.shutdown()
    offset = dirty_bytes(touched_all)
    soft_eq(q.ok("query-block-jobs"), [job_entry(offset)],
            "query-block-jobs while running (offset = bytes of the clusters "
            "copied-before-write, as QEMU 7.2 counts them)")

    # busy errors: nothing changes
    error_unchanged(q, "blockdev-del fl-tmp while the job runs",
                    "GenericError",
                    "Node 'fl-tmp' is busy: block device is in use by block "
                    "job: backup", "blockdev-del", **{"node-name": "fl-tmp"})
    error_unchanged(q, "blockdev-backup reusing the target", "GenericError",
                    "Node 'fl-tmp' is busy: block device is in use by block "
                    "job: backup", "blockdev-backup",
                    **backup_action("j2", "fl-tmp", "fl-cbw2")["data"])
    error_unchanged(q, "transaction reusing the target", "GenericError",
                    "Node 'fl-tmp' is busy: block device is in use by block "
                    "job: backup", "transaction", actions=[
                        {"type": "block-dirty-bitmap-add",
                         "data": {"node": "disk0", "name": "b3"}},
                        backup_action("j2", "fl-tmp", "fl-cbw2")])
    error_unchanged(q, "blockdev-del fl-access while exported", "GenericError",
                    "Node fl-access is in use", "blockdev-del",
                    **{"node-name": "fl-access"})
    error_unchanged(q, "blockdev-del fl-cbw while the job runs",
                    "GenericError", None, "blockdev-del",
                    qemu_desc="Node fl-cbw is in use",
                    **{"node-name": "fl-cbw"})
    error_unchanged(q, "block-job-cancel of an unknown job", "DeviceNotActive",
                    "Block job 'nonexist' not found", "block-job-cancel",
                    device="nonexist")
    touched = d.write(47 * C + 100, 10, 9)
    b2 |= touched
    touched_all |= touched
    d.h.flush()
    sc.expect(touched, "a write after the refused commands")
    check_fleece(pit, "flavour B after the refused commands")
    d.close()
    with open(args.pit, "wb") as f:
        f.write(pit)
    ST.update(b2=sorted(b2), offset=dirty_bytes(touched_all),
              copied=sorted(sc.copied))
    save()


def phase_b_down():
    load()
    q = Qmp(args.qmp)
    pit = file_bytes(args.pit)
    check_fleece(pit, "flavour B before teardown")
    # safe mode with a client connected: refused, client still served (3.6)
    h = connect(args.sock, "fleece")
    error_unchanged(q, "block-export-del of the fleece with a client",
                    "GenericError", "export 'fleece' still in use",
                    "block-export-del", id="fleece")
    soft_eq(q.take_events("BLOCK_EXPORT_DELETED"), [],
            "BLOCK_EXPORT_DELETED after a refused block-export-del")
    check_fleece(pit, "fleece client after the refused block-export-del", h)
    h.shutdown()
    del_export(q, "fleece", check_order=True)                         # 5
    q.ok_empty("blockdev-del", **{"node-name": "fl-access"})          # 6
    soft_eq(q.ok("query-block-jobs"), [job_entry(ST["offset"])],
            "query-block-jobs before the cancel")
    q.take_events()
    q.ok_empty("block-job-cancel", device="fleece-job")               # 7
    before = [e for e in q.last_events if e["event"] == "BLOCK_JOB_CANCELLED"]
    ev = q.wait_event("BLOCK_JOB_CANCELLED", 10,
                      lambda e: e["data"].get("device") == "fleece-job")
    check(ev is not None, "no BLOCK_JOB_CANCELLED for fleece-job within 10 s")
    soft_eq(sorted(ev), ["data", "event", "timestamp"],
            "BLOCK_JOB_CANCELLED members")
    soft_eq(ev["data"], {"device": "fleece-job", "len": SIZE,
                         "offset": ST["offset"], "speed": 0, "type": "backup"},
            "BLOCK_JOB_CANCELLED data")
    soft_check(bool(before), "BLOCK_JOB_CANCELLED arrived after the return "
               "of block-job-cancel (QEMU 7.2 sends it before)")
    st = [e["data"]["status"] for e in q.events
          if e["event"] == "JOB_STATUS_CHANGE" and
          e["data"].get("id") == "fleece-job"]
    if st:
        print(f"  JOB_STATUS_CHANGE fleece-job: {st}", flush=True)
        soft_eq(st[-1], "null", "last JOB_STATUS_CHANGE of the cancelled job")
    soft_eq(q.ok("query-block-jobs"), [], "query-block-jobs after the cancel")
    soft_eq(sorted(q.nodes()), ["disk0", "disk0-file", "fl-tmp"],
            "nodes after the cancel (the filter is gone)")
    soft_check(alloc(args.scratch) <= 4096,
               f"scratch file after block-job-cancel: {alloc(args.scratch)} "
               f"bytes allocated, want ~0")
    q.ok_empty("blockdev-del", **{"node-name": "fl-tmp"})             # 8
    soft_eq(sorted(q.nodes()), ["disk0", "disk0-file"], "nodes after step 8")
    error_unchanged(q, "block-job-cancel of the finished job",
                    "DeviceNotActive", "Block job 'fleece-job' not found",
                    "block-job-cancel", device="fleece-job")
    bm = q.bitmaps()
    soft_eq({k: (v["recording"], v["busy"], v["count"]) for k, v in bm.items()},
            {"b1": (False, False, dirty_bytes(set(ST["b1"]))),
             "b2": (True, False, dirty_bytes(set(ST["b2"])))},
            "bitmaps after flavour B")


def phase_cbw_bitmap():
    load()
    q = Qmp(args.qmp)
    d = Disk()
    q.ok_empty("block-dirty-bitmap-add", node="disk0", name="bm")
    inside = d.write(1 * C + 3, 5, 10) | d.write(11 * C, 7, 10) | \
        d.write(60 * C + 100, 1, 10)
    b2 = set(ST["b2"]) | inside
    # bm keeps recording: the filter takes its content when it is added
    # (reference.md 2.5: "only used to initialise"), so the live writes
    # below, outside bm, must not make anything readable or copied
    d.h.flush()
    truncate(args.scratch)
    q.ok_empty("blockdev-add", driver="file", **{"node-name": "fl-tmp"},
               filename=args.scratch)
    q.ok_empty("blockdev-add", driver="copy-before-write",
               **{"node-name": "fl-cbw", "min-cluster-size": C}, file="disk0-file",
               target="fl-tmp", bitmap={"node": "disk0", "name": "bm"})
    q.ok_empty("blockdev-reopen", options=[
        {"driver": "raw", "node-name": "disk0", "file": "fl-cbw",
         "discard": "unmap"}])
    pit = bytes(d.m)
    q.ok_empty("blockdev-add", driver="snapshot-access",
               **{"node-name": "fl-access"}, file="fl-cbw")
    q.ok_empty("block-export-add", type="nbd", id="fleece",
               **{"node-name": "fl-access"}, name="fleece", writable=False)

    h = connect(args.sock, "fleece", strict=False)

    def reads(when):
        for c in sorted(inside):
            s, n = c * C, cluster_len(c)
            got = b""
            try:
                got = h.pread(n, s)
            except nbd.Error as e:
                soft_fail(f"{when}: read of cluster {c} (inside the bitmap) "
                          f"failed: {e}")
            compare(got, pit[s:s + n], f"{when}: cluster {c} (inside)", s)
            compare(h.pread(7, s + 9), pit[s + 9:s + 16],
                    f"{when}: 7 bytes inside cluster {c}", s + 9)
        for what, off, n in (("1 byte of cluster 0", 0, 1),
                             ("cluster 2", 2 * C, C),
                             ("a hole cluster", 50 * C, C),
                             ("cluster 1 and 1 byte of cluster 2", C, C + 1),
                             ("1 byte before cluster 11", 11 * C - 1, 2),
                             ("the whole disk", 0, SIZE)):
            expect_nbd_error(f"{when}: read of {what} (outside the bitmap)",
                             errno.EINVAL, lambda: h.pread(n, off))
        # the connection stays usable after the errors
        compare(h.pread(1, C), pit[C:C + 1], f"{when}: read after errors")

    reads("bitmap-limited fleece")
    sc = Scratch(args.scratch, pit)
    for what, fn, copied in (
            ("write inside the bitmap", lambda: d.write(C + 4000, 10, 11), True),
            ("write outside the bitmap", lambda: d.write(2 * C, 10, 11), False),
            ("write_zeroes over clusters 10-11 (11 inside)",
             lambda: d.zero(10 * C + 1, 2 * C - 2), True),
            ("TRIM of cluster 60 (inside)", lambda: d.trim(60 * C, C), True),
            ("write outside, next to cluster 60",
             lambda: d.write(61 * C, 10, 11), False)):
        touched = fn()
        b2 |= touched
        d.h.flush()
        sc.expect(touched & inside, what)
    reads("bitmap-limited fleece after live writes")
    h.shutdown()
    d.check("live export during the bitmap-limited fleece")
    del_export(q, "fleece")
    q.ok_empty("blockdev-del", **{"node-name": "fl-access"})
    q.ok_empty("blockdev-reopen", options=[
        {"driver": "raw", "node-name": "disk0", "file": "disk0-file",
         "discard": "unmap"}])
    q.ok_empty("blockdev-del", **{"node-name": "fl-cbw"})
    soft_check(alloc(args.scratch) <= 4096,
               f"scratch file after deleting the bitmap-limited fl-cbw: "
               f"{alloc(args.scratch)} bytes allocated, want ~0")
    q.ok_empty("blockdev-del", **{"node-name": "fl-tmp"})
    q.ok_empty("block-dirty-bitmap-remove", node="disk0", name="bm")
    d.close()
    ST["b2"] = sorted(b2)
    save()


def phase_final():
    load()
    q = Qmp(args.qmp)
    d = Disk()
    d.check("live export at the end")
    d.close()
    soft_eq(sorted(q.nodes()), ["disk0", "disk0-file"], "nodes at the end")
    soft_eq(q.ok("query-block-jobs"), [], "query-block-jobs at the end")
    soft_eq(q.exports(), q.cl_exports(), "query-block-exports at the end")
    b1, b2 = set(ST["b1"]), set(ST["b2"])
    bm = q.bitmaps()
    soft_eq({k: (v["recording"], v["busy"], v["count"]) for k, v in bm.items()},
            {"b1": (False, False, dirty_bytes(b1)),
             "b2": (True, False, dirty_bytes(b2))}, "bitmaps at the end")
    soft_eq(bitmap_map(q, "b1"), granule_map(b1),
            "b1: the writes between fleece A's rotation and fleece B's")
    soft_eq(bitmap_map(q, "b2"), granule_map(b2),
            "b2: the writes since fleece B's point in time")


def main():
    global args, SIZE, NCL
    p = argparse.ArgumentParser()
    p.add_argument("phase")
    p.add_argument("--size", type=int, required=True)
    for o in ("qmp", "sock", "cl-sock", "image", "scratch", "scratch2",
              "state", "model", "pit"):
        p.add_argument("--" + o)
    args = p.parse_args()
    SIZE = args.size
    NCL = (SIZE + C - 1) // C
    check(SIZE % 4096 == 0 and SIZE % C, "size: a multiple of 4 KiB, "
          "not of 64 KiB")
    phases = {"prepare": phase_prepare, "flavour-a": phase_flavour_a,
              "rollback": phase_rollback, "b-up": phase_b_up,
              "b-down": phase_b_down, "cbw-bitmap": phase_cbw_bitmap,
              "final": phase_final}
    run(phases[args.phase])
    return finish()


if __name__ == "__main__":
    sys.exit(main())

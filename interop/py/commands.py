# SPDX-License-Identifier: MIT
"""Every NBD command, flag and error code through python3-libnbd.

Run by interop/python-commands.sh; see there for the exports.  Each check
runs on its own and failures are collected, so one run reports every
problem.  Exit 0 when all pass, 1 otherwise.
"""

import argparse
import errno
import faulthandler
import os
import random
import struct
import sys
import traceback

import nbd

EPERM, EINVAL, ENOSPC = errno.EPERM, errno.EINVAL, errno.ENOSPC
EOVERFLOW, ENOTSUP = errno.EOVERFLOW, errno.ENOTSUP
KiB, MiB = 1 << 10, 1 << 20
TEST_TIMEOUT = 30  # seconds per check; a hang dumps tracebacks and exits

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
    """Record a failure but keep running the current check."""
    failures.append(f"{current}: {msg}")
    print(f"  FAIL {msg}", flush=True)


# ------------------------------------------------------------------ pattern

def pattern(off, length):
    """Bytes of make_pattern_image's pattern for [off, off+length)."""
    start = off & ~7
    end = (off + length + 7) & ~7
    words = b"".join(struct.pack(">Q", (w | 1 << 63) ^ 0x5A5A5A5A)
                     for w in range(start, end, 8))
    return words[off - start:off - start + length]


def parse_islands(text):
    def num(t):
        mult = {"k": KiB, "m": MiB, "g": 1 << 30}.get(t[-1:].lower())
        return int(t[:-1], 0) * mult if mult else int(t, 0)
    out = []
    for item in text.split():
        o, n = item.split(":")
        out.append((num(o), num(n)))
    return sorted(out)


def expected_content(size, islands):
    buf = bytearray(size)
    for o, n in islands:
        buf[o:o + n] = pattern(o, n)
    return buf


def expected_map(size, islands, offset, count):
    """[(length, flags)] of base:allocation for [offset, offset+count)."""
    out = []
    pos = offset
    end = offset + count
    edges = []
    for o, n in islands:
        edges.append((o, o + n))
    while pos < end:
        flags, nxt = 3, end
        for a, b in edges:
            if a <= pos < b:
                flags, nxt = 0, min(b, end)
                break
            if a > pos:
                nxt = min(nxt, a)
        nxt = min(nxt, end)
        if out and out[-1][1] == flags:
            out[-1] = (out[-1][0] + nxt - pos, flags)
        else:
            out.append((nxt - pos, flags))
        pos = nxt
    return out


# ------------------------------------------------------------------ helpers

def connect(export, strict=True, meta=True):
    h = nbd.NBD()
    if meta:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.set_export_name(export)
    if not strict:
        h.set_strict_mode(0)
    h.connect_unix(args.socket)
    return h


def expect_error(fn, allowed, what):
    """Run fn, which must fail with an errno in allowed (a tuple)."""
    try:
        fn()
    except nbd.Error as e:
        if e.errnum not in allowed:
            names = "/".join(errno.errorcode[a] for a in allowed)
            soft_fail(f"{what}: expected {names}, got errno {e.errnum} "
                      f"({e.errno}): {e.string}")
        elif "command failed" not in e.string:
            soft_fail(f"{what}: libnbd refused it locally, the request was "
                      f"never sent: {e.string}")
        return e.errnum
    soft_fail(f"{what}: succeeded, expected an error")
    return 0


def still_usable(h, export_content, what):
    """After an error the connection must still serve a read."""
    try:
        got = h.pread(512, 4096)
    except nbd.Error as e:
        fail(f"connection unusable after {what}: {e}")
    if export_content is not None:
        check(got == bytes(export_content[4096:4608]),
              f"wrong data read after {what}")


def file_bytes(path, off, n):
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(n)


def collect_extents(h, count, offset, flags=0):
    got = []

    def cb(metacontext, off, entries, err):
        if metacontext == nbd.CONTEXT_BASE_ALLOCATION:
            got.append((off, list(entries)))
        return 0
    h.block_status(count, offset, cb, flags)
    check(len(got) == 1, f"block_status({count}, {offset}) returned "
          f"{len(got)} base:allocation replies")
    off, entries = got[0]
    check(off == offset, f"block_status callback offset {off} != {offset}")
    check(len(entries) >= 2 and len(entries) % 2 == 0,
          f"block_status({count}, {offset}): bad entries {entries}")
    return [(entries[i], entries[i + 1]) for i in range(0, len(entries), 2)]


def merge(extents):
    out = []
    for n, f in extents:
        if out and out[-1][1] == f:
            out[-1] = (out[-1][0] + n, f)
        else:
            out.append((n, f))
    return out


def clip(extents, limit):
    out, total = [], 0
    for n, f in extents:
        if total >= limit:
            break
        n = min(n, limit - total)
        out.append((n, f))
        total += n
    return out


# ------------------------------------------------------------------ state

class Disk:
    """Shadow copy of the writable export disk0."""

    def __init__(self, path):
        self.path = path
        with open(path, "rb") as f:
            self.data = bytearray(f.read())
        self.size = len(self.data)

    def write(self, off, buf):
        self.data[off:off + len(buf)] = buf

    def zero(self, off, n):
        self.data[off:off + n] = bytes(n)

    def expect(self, h, off, n, what):
        got = h.pread(n, off)
        want = bytes(self.data[off:off + n])
        if got != want:
            first = next(i for i in range(n) if got[i] != want[i])
            fail(f"{what}: pread({n}, {off}) differs at byte {off + first}: "
                 f"got {got[first:first + 8].hex()} "
                 f"want {want[first:first + 8].hex()}")


disk = None
ro_content = None


# ------------------------------------------------------------------ checks

def test_flags():
    h = connect("disk0")
    check(h.get_size() == disk.size, f"disk0 size {h.get_size()}")
    check(h.get_structured_replies_negotiated(), "no structured replies")
    check(h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION),
          "base:allocation not negotiated")
    want = dict(is_read_only=False, can_flush=True, can_fua=True,
                can_multi_conn=True, can_trim=True, can_zero=True,
                can_fast_zero=True, can_df=True, can_cache=True)
    for k, v in want.items():
        check(getattr(h, k)() == v, f"disk0 {k}() is {not v}")
    sizes = [h.get_block_size(t) for t in
             (nbd.SIZE_MINIMUM, nbd.SIZE_PREFERRED, nbd.SIZE_MAXIMUM)]
    check(sizes == [1, 4096, 32 * MiB], f"disk0 block sizes {sizes}")
    h.shutdown()
    h = connect("ro")
    check(h.get_size() == len(ro_content), f"ro size {h.get_size()}")
    want.update(is_read_only=True, can_trim=False, can_zero=False,
                can_fast_zero=False)
    for k, v in want.items():
        check(getattr(h, k)() == v, f"ro {k}() is {not v}")
    h.shutdown()


def test_odd_reads_writes():
    h = connect("disk0")
    s = disk.size
    cases = [(0, 1), (4095, 1), (s - 1, 1), (1, 513), (4096 - 100, 200),
             (8191, 8194), (3 * 4096 - 1, 2), (MiB - 7, 4096 + 14),
             (12345, 65536 + 3), (s - 513, 513)]
    rng = random.Random(7)
    for off, n in cases:
        buf = rng.randbytes(n)
        h.pwrite(buf, off)
        disk.write(off, buf)
        disk.expect(h, off, n, f"read back pwrite({n}, {off})")
        # neighbours untouched
        lo = max(0, off - 5)
        disk.expect(h, lo, min(s, off + n + 5) - lo, f"around pwrite({n}, {off})")
    for _ in range(200):
        n = rng.randrange(1, 300 * KiB)
        off = rng.randrange(0, s - n + 1)
        if rng.random() < 0.5:
            buf = rng.randbytes(n)
            h.pwrite(buf, off)
            disk.write(off, buf)
        disk.expect(h, off, n, "random odd read")
    h.flush()
    check(file_bytes(disk.path, 0, s) == bytes(disk.data),
          "image file differs from what was written")
    # reads across 4 KiB boundaries of the read-only pattern image
    r = connect("ro")
    for off, n in [(0, 1), (1, 513), (4095, 2), (4096 - 1, 4096 + 2),
                   (65536 - 3, 10), (MiB - 1, 2), (len(ro_content) - 1, 1)]:
        got = r.pread(n, off)
        check(got == bytes(ro_content[off:off + n]), f"ro pread({n}, {off})")
    r.shutdown()
    h.shutdown()


def test_max_size_io():
    h = connect("disk0")
    n = 32 * MiB
    if disk.size < n:
        return
    buf = random.Random(3).randbytes(n)
    h.pwrite(buf, 0)
    disk.write(0, buf)
    check(h.pread(n, 0) == buf, "32 MiB read back")
    h.shutdown()


def test_fua():
    h = connect("disk0")
    off, n = 2 * MiB + 3, 10000
    buf = os.urandom(n)
    h.pwrite(buf, off, nbd.CMD_FLAG_FUA)
    disk.write(off, buf)
    check(file_bytes(disk.path, off, n) == buf, "FUA write not in the file")
    h.zero(777, off + 100, nbd.CMD_FLAG_FUA)
    disk.zero(off + 100, 777)
    check(file_bytes(disk.path, off, n) == bytes(disk.data[off:off + n]),
          "FUA zero not in the file")
    disk.expect(h, off, n, "after FUA write+zero")
    # FUA must be accepted on every command once SEND_FUA is advertised
    h.set_strict_mode(0)
    for what, fn in [
            ("pread+FUA", lambda: h.pread(100, 0, nbd.CMD_FLAG_FUA)),
            ("flush+FUA", lambda: h.flush(nbd.CMD_FLAG_FUA)),
            ("cache+FUA", lambda: h.cache(100, 0, nbd.CMD_FLAG_FUA)),
            ("trim+FUA", lambda: h.trim(4096, 6 * MiB, nbd.CMD_FLAG_FUA)),
            ("block_status+FUA",
             lambda: h.block_status(4096, 0, lambda *a: 0, nbd.CMD_FLAG_FUA))]:
        try:
            fn()
        except nbd.Error as e:
            soft_fail(f"{what} rejected: {e}")
    got = h.pread(4096, 6 * MiB)      # trimmed: contents now undefined
    disk.write(6 * MiB, got)
    h.shutdown()


def test_flush():
    for export in ("disk0", "ro"):
        h = connect(export)
        h.flush()
        h.flush()
        h.shutdown()


def test_trim():
    h = connect("disk0")
    rng = random.Random(11)
    # fill a region with data, trim odd/aligned ranges, neighbours must stay
    base = 5 * MiB
    buf = rng.randbytes(MiB)
    h.pwrite(buf, base)
    disk.write(base, buf)
    for off, n in [(base + 1000, 5000), (base + 64 * KiB, 128 * KiB),
                   (base + 513, 1), (base + 300 * KiB + 7, 200 * KiB)]:
        h.trim(n, off)
        got = h.pread(n, off)         # undefined, but must read
        disk.write(off, got)
        disk.expect(h, off - 200, 200, f"left of trim({n}, {off})")
        disk.expect(h, off + n, 200, f"right of trim({n}, {off})")
    disk.expect(h, base, MiB, "trimmed region")
    # a fully aligned trim of a 1 MiB range normally reads back zeroes
    h.trim(MiB, base)
    got = h.pread(MiB, base)
    disk.write(base, got)
    h.flush()
    check(file_bytes(disk.path, base - 4096, MiB + 8192) ==
          bytes(disk.data[base - 4096:base + MiB + 4096]),
          "file differs around trimmed range")
    h.shutdown()


def allocated_bytes(path):
    return os.stat(path).st_blocks * 512


def test_zero():
    h = connect("disk0")
    rng = random.Random(13)
    base = 4 * MiB
    buf = rng.randbytes(MiB)
    h.pwrite(buf, base)
    disk.write(base, buf)
    for off, n, flags in [(base + 1, 1, 0), (base + 1, 513, 0),
                          (base + 4096 - 5, 10, 0),
                          (base + 8192, 64 * KiB, 0),
                          (base + 100 * KiB + 3, 33 * KiB, nbd.CMD_FLAG_NO_HOLE),
                          (base + 512 * KiB, 256 * KiB, nbd.CMD_FLAG_NO_HOLE)]:
        h.zero(n, off, flags)
        disk.zero(off, n)
        disk.expect(h, off - 100, n + 200, f"zero({n}, {off}, {flags:#x})")
    # NO_HOLE on a hole: the area must end up allocated in the file
    h.trim(MiB, 7 * MiB)
    disk.zero(7 * MiB, MiB)   # (re-zeroed below, contents irrelevant)
    before = allocated_bytes(disk.path)
    h.zero(MiB, 7 * MiB, nbd.CMD_FLAG_NO_HOLE)
    h.flush()
    after = allocated_bytes(disk.path)
    disk.expect(h, 7 * MiB, MiB, "zero NO_HOLE over a trimmed range")
    if after - before < MiB - 64 * KiB:
        soft_fail(f"zero NO_HOLE of 1 MiB over a hole grew the file's "
                  f"allocation by only {after - before} bytes")
    # FAST_ZERO: success (zeroes) or ENOTSUP with data unchanged
    off, n = base + 800 * KiB, 64 * KiB
    data = rng.randbytes(n)
    h.pwrite(data, off)
    disk.write(off, data)
    try:
        h.zero(n, off, nbd.CMD_FLAG_FAST_ZERO)
        disk.zero(off, n)
    except nbd.Error as e:
        check(e.errnum == ENOTSUP, f"FAST_ZERO failed with {e}, not ENOTSUP")
    disk.expect(h, off, n, "after FAST_ZERO")
    # FAST_ZERO | NO_HOLE together
    try:
        h.zero(4096, off, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
        disk.zero(off, 4096)
    except nbd.Error as e:
        check(e.errnum == ENOTSUP, f"FAST_ZERO|NO_HOLE failed with {e}")
    disk.expect(h, off, n, "after FAST_ZERO|NO_HOLE")
    h.flush()
    check(file_bytes(disk.path, base, 4 * MiB) ==
          bytes(disk.data[base:base + 4 * MiB]), "file differs after zeroes")
    h.shutdown()


def test_cache():
    for export, content in (("disk0", None), ("ro", ro_content)):
        h = connect(export)
        size = h.get_size()
        for off, n in [(0, 1), (1, 513), (4095, 4098), (0, MiB),
                       (size - 1, 1), (0, min(size, 32 * MiB))]:
            h.cache(n, off)
        if size > 32 * MiB:
            # above the maximum block size: may fail (EINVAL/EOVERFLOW)
            try:
                h.cache(size, 0)
            except nbd.Error as e:
                check(e.errnum in (EINVAL, EOVERFLOW),
                      f"cache of {size} bytes failed with {e}")
        if content is not None:
            check(h.pread(MiB, 0) == bytes(content[:MiB]), "data after cache")
        else:
            disk.expect(h, 0, MiB, "data after cache")
        h.shutdown()


def test_block_status():
    h = connect("ro")
    size = len(ro_content)
    isl = args.islands
    spots = [(0, size), (0, 4096), (1, 1000), (4095, 2), (60 * KiB, 8 * KiB),
             (64 * KiB - 1, MiB), (MiB - 4096, 4096 + 64 * KiB + 4096),
             (MiB + 1, 65535), (size - 4096, 4096), (size - 1, 1),
             (2 * MiB, 12 * KiB), (3 * MiB + 5, 7)]
    for off, count in spots:
        # without REQ_ONE: extents from off, never past off+count
        ext = collect_extents(h, count, off)
        total = sum(n for n, _ in ext)
        if any(n == 0 for n, _ in ext):
            soft_fail(f"block_status({count}, {off}): zero-length extent {ext}")
        if total > count:
            soft_fail(f"block_status({count}, {off}): extents end at "
                      f"{off + total}, past the requested end {off + count}: "
                      f"{ext}")
        want = expected_map(size, isl, off, min(total, count))
        if merge(clip(ext, count)) != want:
            soft_fail(f"block_status({count}, {off}) = {ext}, want {want}")
        # REQ_ONE: exactly one extent, not past the end
        ext1 = collect_extents(h, count, off, nbd.CMD_FLAG_REQ_ONE)
        if len(ext1) != 1:
            soft_fail(f"block_status REQ_ONE({count}, {off}) returned "
                      f"{len(ext1)} extents: {ext1}")
        n, f = ext1[0]
        if n == 0 or n > count:
            soft_fail(f"block_status REQ_ONE({count}, {off}) extent length "
                      f"{n}, requested {count}")
        first = expected_map(size, isl, off, count)[0]
        if f != first[1] or n > first[0]:
            soft_fail(f"block_status REQ_ONE({count}, {off}) = {ext1}, "
                      f"first expected extent {first}")
    # walk the whole export like nbdinfo --map
    pos, got = 0, []
    while pos < size:
        ext = collect_extents(h, size - pos, pos)
        got += clip(ext, size - pos)
        pos += sum(n for n, _ in clip(ext, size - pos))
    check(merge(got) == expected_map(size, isl, 0, size),
          f"full walk {merge(got)} != {expected_map(size, isl, 0, size)}")
    h.shutdown()


def structured_read(h, n, off, flags=0):
    chunks = []

    def cb(buf, coff, status, err):
        chunks.append((coff, len(buf), status, bytes(buf)))
        return 0
    buf = h.pread_structured(n, off, cb, flags)
    return buf, sorted(chunks)


def test_structured_read():
    for export in ("ro", "ro-direct"):
        structured_read_checks(export)


def structured_read_checks(export):
    h = connect(export)
    size = len(ro_content)
    isl = args.islands
    # find a 1 MiB-aligned, fully-hole MiB and a data island
    hole = next(m for m in range(0, size, MiB)
                if all(o + n <= m or o >= m + MiB for o, n in isl))
    d_off, d_len = isl[0]
    for off, n in [(hole, MiB), (hole + 1, 4095), (d_off, d_len),
                   (d_off + 1, d_len - 2), (max(0, d_off + d_len - 4096),
                                            8192 + 3)]:
        buf, chunks = structured_read(h, n, off)
        check(buf == bytes(ro_content[off:off + n]),
              f"pread_structured({n}, {off}) content")
        pos = off
        for coff, clen, status, data in chunks:
            check(status in (nbd.READ_DATA, nbd.READ_HOLE),
                  f"chunk status {status}")
            check(coff == pos and clen > 0,
                  f"pread_structured({n}, {off}): chunks not contiguous "
                  f"{[(c[0], c[1], c[2]) for c in chunks]}")
            pos += clen
        check(pos == off + n, f"pread_structured({n}, {off}) chunks cover "
              f"up to {pos}, not {off + n}")
        kinds = {c[2] for c in chunks}
        if off == hole and n == MiB and kinds != {nbd.READ_HOLE}:
            soft_fail(f"{export}: read of a 1 MiB hole at {hole}: expected only "
                      f"OFFSET_HOLE chunks, got "
                      f"{[(c[0], c[1], c[2]) for c in chunks]}")
        if (off, n) == (d_off, d_len) and kinds != {nbd.READ_DATA}:
            soft_fail(f"read of data island at {d_off}: chunk kinds {kinds}")
    # DF: exactly one OFFSET_DATA chunk even over data + hole (<= 64 KiB)
    mixed = (d_off + d_len - 4096, 64 * KiB)
    for off, n in [mixed, (hole, 64 * KiB), (d_off + 1, 513),
                   (hole - 1, 2)]:
        buf, chunks = structured_read(h, n, off, nbd.CMD_FLAG_DF)
        check(buf == bytes(ro_content[off:off + n]), f"DF read({n}, {off})")
        if len(chunks) != 1 or chunks[0][:3] != (off, n, nbd.READ_DATA):
            soft_fail(f"DF read({n}, {off}): want one data chunk, got "
                      f"{[(c[0], c[1], c[2]) for c in chunks]}")
    # DF on a large read: one chunk or EOVERFLOW
    try:
        buf, chunks = structured_read(h, 4 * MiB, 0, nbd.CMD_FLAG_DF)
        check(buf == bytes(ro_content[:4 * MiB]), "DF 4 MiB content")
        if len(chunks) != 1:
            soft_fail(f"DF 4 MiB read: {len(chunks)} chunks")
    except nbd.Error as e:
        check(e.errnum == EOVERFLOW, f"DF 4 MiB read failed with {e}")
    still_usable(h, ro_content, "DF reads")
    h.shutdown()


def test_errors():
    """Out-of-range and forbidden requests; the connection stays usable."""
    h = connect("disk0", strict=False)
    s = disk.size
    cases = [
        ("read at end", lambda: h.pread(512, s), (EINVAL,)),
        ("read 1 byte at end", lambda: h.pread(1, s), (EINVAL,)),
        ("read straddling end", lambda: h.pread(1024, s - 512), (EINVAL,)),
        ("read at 2^63", lambda: h.pread(512, 1 << 63), (EINVAL,)),
        ("read offset+len wraps",
         lambda: h.pread(4096, (1 << 64) - 2048), (EINVAL,)),
        ("write at end", lambda: h.pwrite(b"x" * 512, s), (EINVAL,)),
        ("write straddling end",
         lambda: h.pwrite(b"y" * 1024, s - 512), (EINVAL,)),
        ("trim past end", lambda: h.trim(4096, s), (EINVAL, ENOSPC)),
        ("trim straddling end", lambda: h.trim(8192, s - 4096),
         (EINVAL, ENOSPC)),
        ("zero past end", lambda: h.zero(4096, s), (ENOSPC, EINVAL)),
        ("zero straddling end", lambda: h.zero(8192, s - 4096),
         (ENOSPC, EINVAL)),
        ("cache past end", lambda: h.cache(4096, s), (EINVAL,)),
        ("block_status past end",
         lambda: h.block_status(4096, s, lambda *a: 0), (EINVAL,)),
        ("read with unknown flag 0x100",
         lambda: h.pread(512, 0, 0x100), (EINVAL,)),
        ("write with unknown flag 0x8000",
         lambda: h.pwrite(b"z" * 512, 0, 0x8000), (EINVAL,)),
        ("flush with unknown flag 0x40", lambda: h.flush(0x40), (EINVAL,)),
        ("zero with unknown flag 0x20",
         lambda: h.zero(512, 0, 0x20), (EINVAL,)),
        ("trim with unknown flag 0x1000",
         lambda: h.trim(512, 0, 0x1000), (EINVAL,)),
        ("block_status with unknown flag 0x80",
         lambda: h.block_status(512, 0, lambda *a: 0, 0x80), (EINVAL,)),
    ]
    for what, fn, allowed in cases:
        expect_error(fn, allowed, what)
        still_usable(h, disk.data, what)
    # the failed writes changed nothing
    disk.expect(h, s - MiB, MiB, "tail after failed writes")
    check(os.path.getsize(disk.path) == s, "image file grew")
    # inapplicable (known) flags: the spec says SHOULD be EINVAL
    inapplicable = [
        ("read with NO_HOLE", lambda: h.pread(512, 0, nbd.CMD_FLAG_NO_HOLE)),
        ("read with REQ_ONE", lambda: h.pread(512, 0, nbd.CMD_FLAG_REQ_ONE)),
        ("write with DF",
         lambda: h.pwrite(bytes(disk.data[:512]), 0, nbd.CMD_FLAG_DF)),
        ("trim with NO_HOLE",
         lambda: h.trim(4096, 6 * MiB + 4096, nbd.CMD_FLAG_NO_HOLE)),
        ("trim with FAST_ZERO",
         lambda: h.trim(4096, 6 * MiB + 4096, nbd.CMD_FLAG_FAST_ZERO)),
        ("flush with DF", lambda: h.flush(nbd.CMD_FLAG_DF)),
    ]
    for what, fn in inapplicable:
        expect_error(fn, (EINVAL,), what)
        still_usable(h, None, what)
    got = h.pread(4096, 6 * MiB + 4096)   # may have been trimmed
    disk.write(6 * MiB + 4096, got)
    disk.expect(h, 0, MiB, "head after inapplicable flags")
    # zero-length requests: any reply, but the connection must survive
    for what, fn in [("read of 0 bytes", lambda: h.pread(0, 0)),
                     ("write of 0 bytes", lambda: h.pwrite(b"", 4096)),
                     ("zero of 0 bytes", lambda: h.zero(0, 4096)),
                     ("trim of 0 bytes", lambda: h.trim(0, 4096))]:
        try:
            fn()
        except nbd.Error:
            pass
        still_usable(h, disk.data, what)
    h.shutdown()

    r = connect("ro", strict=False)
    for what, fn in [
            ("write on read-only", lambda: r.pwrite(b"w" * 512, 0)),
            ("write+FUA on read-only",
             lambda: r.pwrite(b"w" * 512, 4096, nbd.CMD_FLAG_FUA)),
            ("trim on read-only", lambda: r.trim(4096, 0)),
            ("zero on read-only", lambda: r.zero(4096, 0)),
            ("zero NO_HOLE on read-only",
             lambda: r.zero(4096, 0, nbd.CMD_FLAG_NO_HOLE))]:
        expect_error(fn, (EPERM,), what)
        still_usable(r, ro_content, what)
    r.flush()   # flush on a read-only export succeeds
    check(r.pread(len(ro_content), 0) == bytes(ro_content),
          "read-only export changed")
    check(file_bytes(args.ro_image, 0, len(ro_content)) == bytes(ro_content),
          "read-only image file changed")
    r.shutdown()


def test_aio_pipeline():
    """Many requests in flight on one connection."""
    h = connect("disk0")
    rng = random.Random(19)
    writes = []
    for i in range(150):
        n = rng.randrange(1, 17 * KiB)       # requests never overlap
        off = i * 20 * KiB + rng.randrange(0, 3000)
        buf = nbd.Buffer.from_bytearray(bytearray(rng.randbytes(n)))
        h.aio_pwrite(buf, off)
        writes.append((off, buf))
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for off, buf in writes:
        disk.write(off, buf.to_bytearray())
    reads = []
    for off, buf in writes:
        rb = nbd.Buffer(len(buf.to_bytearray()))
        h.aio_pread(rb, off)
        reads.append((off, rb))
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for off, rb in reads:
        got = bytes(rb.to_bytearray())
        check(got == bytes(disk.data[off:off + len(got)]),
              f"aio read at {off}")
    h.shutdown()


def test_multi_conn():
    a, b, c = connect("disk0"), connect("disk0"), connect("disk0")
    d = connect("disk0-ro")
    for h in (a, b, c, d):
        check(h.can_multi_conn(), "multi-conn not advertised")
    rng = random.Random(23)
    for off, n in [(3 * MiB + 1, 4097), (0, 65536), (disk.size - 3, 3)]:
        c.pread(n, off)   # warm any cache on C and D
        d.pread(n, off)
        buf = rng.randbytes(n)
        a.pwrite(buf, off)
        disk.write(off, buf)
        b.flush()
        check(c.pread(n, off) == buf, f"conn C does not see A's write at {off}")
        check(d.pread(n, off) == buf,
              f"read-only export of the same file does not see A's write at {off}")
        check(file_bytes(disk.path, off, n) == buf,
              f"image file does not hold A's write at {off} after B's flush")
    for h in (a, b, c, d):
        h.shutdown()


def test_stdin_mode():
    if not args.fleeced:
        return
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.set_export_name("disk0")
    h.connect_command([args.fleeced, "--stdin", "--log-level", "warn",
                       "--export", f"name=disk0,file={args.stdin_image},writable=on"])
    size = os.path.getsize(args.stdin_image)
    check(h.get_size() == size, f"--stdin size {h.get_size()} != {size}")
    check(h.can_multi_conn() in (True, False), "flags")
    h.pwrite(b"stdin!" * 100, 513)
    check(h.pread(600, 513) == b"stdin!" * 100, "--stdin read back")
    h.flush()
    check(file_bytes(args.stdin_image, 513, 600) == b"stdin!" * 100,
          "--stdin write not in file")
    ext = collect_extents(h, size, 0)
    check(sum(n for n, _ in ext) <= size and ext, "--stdin block status")
    h.shutdown()
    del h   # closes the handle; libnbd reaps the --stdin server


def server_accepts():
    import socket
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    try:
        s.connect(args.socket)
        return len(s.recv(18)) > 0
    except OSError:
        return False
    finally:
        s.close()


def main():
    global args, disk, ro_content, current
    p = argparse.ArgumentParser()
    p.add_argument("--socket", required=True)
    p.add_argument("--disk-image", required=True)
    p.add_argument("--ro-image", required=True)
    p.add_argument("--ro-islands", required=True)
    p.add_argument("--stdin-image")
    p.add_argument("--fleeced")
    p.add_argument("--only", help="run only these checks (comma list)")
    args = p.parse_args()
    args.islands = parse_islands(args.ro_islands)
    disk = Disk(args.disk_image)
    ro_content = expected_content(os.path.getsize(args.ro_image), args.islands)
    with open(args.ro_image, "rb") as f:
        if f.read() != bytes(ro_content):
            print("ro image does not match its island list", file=sys.stderr)
            return 1
    tests = [t for n, t in globals().items() if n.startswith("test_")]
    if args.only:
        want = set(args.only.split(","))
        tests = [t for t in tests if t.__name__[5:] in want]
    for t in tests:
        current = t.__name__[5:]
        print(f"{current} ...", flush=True)
        n_before = len(failures)
        faulthandler.dump_traceback_later(TEST_TIMEOUT, exit=True)
        try:
            t()
        except CheckFailed as e:
            failures.append(f"{current}: {e}")
            print(f"  FAIL {e}", flush=True)
        except Exception as e:  # noqa: BLE001 - report everything
            failures.append(f"{current}: {type(e).__name__}: {e}")
            print(f"  FAIL {type(e).__name__}: {e}", flush=True)
            traceback.print_exc(limit=3)
        finally:
            faulthandler.cancel_dump_traceback_later()
        if len(failures) == n_before:
            print("  ok", flush=True)
        elif not server_accepts():
            failures.append(f"server no longer accepts connections after "
                            f"{current}; remaining checks skipped")
            print(f"  FAIL server gone after {current}", flush=True)
            break
    if failures:
        print(f"\n{len(failures)} failure(s):", file=sys.stderr)
        for f in failures:
            print(f"  {f}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

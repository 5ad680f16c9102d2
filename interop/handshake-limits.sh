#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# --max-connections and --handshake-timeout: a connection over the limit is
# closed at once while the others stay; an idle negotiation is closed after
# the timeout while finished handshakes and normal clients are unaffected.
# --max-requests 2 with one event-loop and one I/O thread: deep pipelining
# is throttled, not dropped, and a 4-connection nbdcopy does not deadlock.
source "$(dirname "$0")/functions.sh"
requires nbdcopy
requires_python_nbd

make_pattern_image "$tmpdir/disk0.img" 1M 0:1M

limits_py() {
    bounded 60 "$PYTHON" - "$interop_dir/py" "$@"
}

# ---- --max-connections 2
sock=$tmpdir/max.sock
start_fleeced --export "name=disk0,file=$tmpdir/disk0.img" --listen "unix:$sock" \
    --max-connections 2 --handshake-timeout 0
limits_py "$sock" <<'PY' || fail "--max-connections 2 (see above)"
import sys, time
sys.path.insert(0, sys.argv[1])
import nbdraw as R
sock = sys.argv[2]

def pat(off, n):
    import struct
    return b"".join(struct.pack(">Q", (w | 1 << 63) ^ 0x5A5A5A5A)
                    for w in range(off, off + n, 8))

a = R.Raw(sock); a.greeting()            # idle in negotiation
b = R.Raw(sock); b.negotiate("disk0")     # idle in transmission
time.sleep(0.3)
c = R.Raw(sock)
t0 = time.monotonic()
try:
    got = c.wait_closed(3)
except R.Timeout:
    sys.exit("third connection still open 3 s after connecting")
if got:
    sys.exit(f"third connection received {len(got)} bytes before the close: {got[:32].hex()}")
print(f"third connection closed after {time.monotonic() - t0:.2f} s")
# the two others still work
a.client_flags()
if a.go("disk0") != R.REP_ACK:
    sys.exit("first connection could not finish its handshake")
assert a.read(0, 4096) == pat(0, 4096), "first connection: wrong data"
assert b.read(4096, 4096) == pat(4096, 4096), "second connection: wrong data"
# freeing a slot lets a new client in (the server may need a moment)
a.disconnect()
deadline = time.monotonic() + 3
while True:
    d = R.Raw(sock)
    try:
        d.negotiate("disk0")
        break
    except (R.Closed, R.Timeout, OSError) as e:
        d.close()
        if time.monotonic() > deadline:
            sys.exit(f"no new connection accepted after a slot was freed: {e}")
        time.sleep(0.2)
assert d.read(0, 512) == pat(0, 512)
d.disconnect()
b.disconnect()
PY
fleeced_alive "$fleeced_pid" || fail "fleeced died"
stop_fleeced "$fleeced_pid"
expect_eq "$fleeced_status" 0 "exit status after SIGTERM"

# ---- --handshake-timeout 1
sock=$tmpdir/hs.sock
start_fleeced --export "name=disk0,file=$tmpdir/disk0.img" --listen "unix:$sock" \
    --handshake-timeout 1
limits_py "$sock" <<'PY' || fail "--handshake-timeout 1 (see above)"
import sys, time, subprocess
sys.path.insert(0, sys.argv[1])
import nbdraw as R
import nbd
sock = sys.argv[2]

idle = R.Raw(sock, timeout=5)             # greeting, then silence
idle.greeting()
half = R.Raw(sock, timeout=5)             # flags, then a truncated option
half.start()
half.send(b"IHAVEOPT"[:5])
silent = R.Raw(sock, timeout=5)           # never reads the greeting
done = R.Raw(sock, timeout=5)             # finished handshake, then idle
done.negotiate("disk0")
t0 = time.monotonic()
# a normal client connects meanwhile
h = nbd.NBD(); h.set_export_name("disk0"); h.connect_unix(sock)
assert h.get_size() == 1 << 20
for name, r in (("idle", idle), ("half", half), ("silent", silent)):
    try:
        r.wait_closed(max(0.1, t0 + 3.5 - time.monotonic()))
    except R.Timeout:
        sys.exit(f"{name} negotiation not closed within ~3 s of a 1 s handshake timeout")
    print(f"{name} closed after {time.monotonic() - t0:.2f} s")
elapsed = time.monotonic() - t0
if elapsed < 0.5:
    sys.exit(f"idle negotiations closed after {elapsed:.2f} s, before the 1 s timeout")
time.sleep(1.5 - min(elapsed, 1.5))
# transmission-phase connections are not subject to the handshake timeout
if not done.is_open(0.2):
    sys.exit("a connection past NBD_OPT_GO was closed by the handshake timeout")
assert len(done.read(0, 4096)) == 4096
done.disconnect()
h.pread(512, 0)
h.shutdown()
PY
fleeced_alive "$fleeced_pid" || fail "fleeced died"
stop_fleeced "$fleeced_pid"
expect_eq "$fleeced_status" 0 "exit status after SIGTERM"

# ---- --handshake-timeout 0: no timeout
sock=$tmpdir/none.sock
start_fleeced --export "name=disk0,file=$tmpdir/disk0.img" --listen "unix:$sock" \
    --handshake-timeout 0
limits_py "$sock" <<'PY' || fail "--handshake-timeout 0 (see above)"
import sys, time
sys.path.insert(0, sys.argv[1])
import nbdraw as R
r = R.Raw(sys.argv[2]); r.greeting()
time.sleep(2.5)
if not r.is_open(0.1):
    sys.exit("--handshake-timeout 0 closed an idle negotiation after 2.5 s")
r.client_flags()
assert r.go("disk0") == R.REP_ACK
r.disconnect()
PY
fleeced_alive "$fleeced_pid" || fail "fleeced died"
stop_fleeced "$fleeced_pid"
expect_eq "$fleeced_status" 0 "exit status after SIGTERM"

# ---- --max-requests 2 --threads 1 --io-threads 1: a client pipelining far
# more requests than allowed is throttled, not dropped, and nothing deadlocks
sock=$tmpdir/req.sock
make_pattern_image "$tmpdir/w.img" 16M 0:16M
start_fleeced --export "name=w,file=$tmpdir/w.img,writable=on" --listen "unix:$sock" \
    --max-requests 2 --threads 1 --io-threads 1
limits_py "$sock" <<'PY' || fail "--max-requests 2 (see above)"
import sys, threading, struct
sys.path.insert(0, sys.argv[1])
import nbdraw as R
r = R.Raw(sys.argv[2], timeout=20)
r.negotiate("w")
n = 400
def writer():
    for i in range(n):
        if i % 2:
            r.request(R.CMD_WRITE, i * 4096, 4096, i, payload=bytes([i % 251]) * 4096)
        else:
            r.request(R.CMD_READ, i * 4096, 4096, i)
t = threading.Thread(target=writer, daemon=True)
t.start()
seen = set()
for _ in range(n):
    rep = r.reply(read_length=lambda c: 0 if c % 2 else 4096, timeout=20)
    i = rep["cookie"]
    assert i not in seen and 0 <= i < n, f"cookie {i}"
    assert rep["error"] == 0, f"request {i}: error {rep['error']}"
    if i % 2 == 0:   # even blocks are never written: still the pattern
        off = i * 4096
        want = b"".join(struct.pack(">Q", (w | 1 << 63) ^ 0x5A5A5A5A)
                        for w in range(off, off + 4096, 8))
        assert rep["data"] == want, f"read {i}: wrong data"
    seen.add(i)
t.join(5)
for i in range(1, n, 2):
    assert r.read(i * 4096, 4096, cookie=10000 + i) == bytes([i % 251]) * 4096, f"write {i}"
r.disconnect()
print(f"{n} pipelined requests answered")
PY
cp --sparse=always "$tmpdir/w.img" "$tmpdir/w.src"
bounded 60 nbdcopy --connections=4 --requests=64 "$tmpdir/w.src" "$(nbd_unix_uri w "$sock")" ||
    fail "nbdcopy into a --threads 1 --io-threads 1 --max-requests 2 server"
expect_eq "$(sha256 "$tmpdir/w.img")" "$(sha256 "$tmpdir/w.src")" "nbdcopy result"
fleeced_alive "$fleeced_pid" || fail "fleeced died"
echo "PASS: $test_name"

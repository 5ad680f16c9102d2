#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# The fleeced command line (docs/cli-contract.txt): --help/--version, bad
# arguments (exit 2, one "fleeced: error:" line), several listeners, ",,"
# in values, --stdin, and SIGTERM/SIGINT (exit 0, socket file removed).
source "$(dirname "$0")/functions.sh"
requires nbdinfo
_require_fleeced_binary

img=$tmpdir/disk.img
truncate -s 4M "$img"

# run_cli ARGS...: run fleeced (bounded), outputs in $tmpdir/out $tmpdir/err
run_cli() {
    cli_status=0
    bounded 10 "$FLEECED" "$@" </dev/null >"$tmpdir/out" 2>"$tmpdir/err" || cli_status=$?
}

# ---- --help / --version
run_cli --help
expect_eq "$cli_status" 0 "--help exit status"
grep -q -- '--export' "$tmpdir/out" || fail "--help does not mention --export: $(cat "$tmpdir/out")"
grep -q -- '--listen' "$tmpdir/out" || fail "--help does not mention --listen"
run_cli --version
expect_eq "$cli_status" 0 "--version exit status"
[ -s "$tmpdir/out" ] || fail "--version printed nothing on stdout"

# ---- bad arguments: exit 2, exactly one line "fleeced: error: ..."
bad_args() {
    local what=$1
    shift
    run_cli "$@"
    if [ "$cli_status" != 2 ]; then
        cat "$tmpdir/err" >&2
        fail "$what: exit status $cli_status, expected 2 (args: $*)"
    fi
    expect_eq "$(wc -l <"$tmpdir/err")" 1 "$what: lines on stderr [$(cat "$tmpdir/err")]"
    grep -q '^fleeced: error: ' "$tmpdir/err" ||
        fail "$what: stderr does not start with 'fleeced: error: ': $(cat "$tmpdir/err")"
}
sock=$tmpdir/s.sock
ok_export="name=d,file=$img"
bad_args "unknown option" --bogus-option
bad_args "unknown option with exports" --export "$ok_export" --listen "unix:$sock" --frobnicate 3
bad_args "--export without a value" --export
bad_args "--export without file=" --export name=d --listen "unix:$sock"
bad_args "--export with an unknown key" --export "$ok_export,colour=red" --listen "unix:$sock"
bad_args "--export writable=maybe" --export "$ok_export,writable=maybe" --listen "unix:$sock"
bad_args "duplicate export names" --export "$ok_export" --export "$ok_export" --listen "unix:$sock"
bad_args "--listen with an unknown scheme" --export "$ok_export" --listen "udp:1.2.3.4:5"
bad_args "--listen tcp without a port" --export "$ok_export" --listen "tcp:127.0.0.1"
bad_args "--listen tcp with a bad port" --export "$ok_export" --listen "tcp:127.0.0.1:99999"
bad_args "--threads abc" --export "$ok_export" --listen "unix:$sock" --threads abc
bad_args "--max-connections -1" --export "$ok_export" --listen "unix:$sock" --max-connections -1
bad_args "--handshake-timeout x" --export "$ok_export" --listen "unix:$sock" --handshake-timeout x
bad_args "--log-level loud" --export "$ok_export" --listen "unix:$sock" --log-level loud
[ ! -e "$sock" ] || fail "a failed start left $sock behind"

# ---- an image that cannot be opened: exit 1 or 2, message names the file
missing=$tmpdir/no-such-dir/missing.img
run_cli --export "name=d,file=$missing" --listen "unix:$sock"
case $cli_status in
    1 | 2) ;;
    *) fail "nonexistent image: exit status $cli_status, expected 1 or 2" ;;
esac
grep -qF "$missing" "$tmpdir/err" || fail "nonexistent image: message does not name the file: $(cat "$tmpdir/err")"
grep -q '^fleeced: error: ' "$tmpdir/err" ||
    fail "nonexistent image: no 'fleeced: error:' line: $(cat "$tmpdir/err")"

# ---- unix + tcp listeners at once; ",," is a literal comma
port=$(free_tcp_port)
start_fleeced --export "name=d,file=$img,writable=on,description=one,,two" \
    --listen "unix:$sock" --listen "tcp:127.0.0.1:$port"
[ -S "$sock" ] || fail "$sock is not a socket"
expect_eq "$(bounded 30 nbdinfo --size "$(nbd_unix_uri d "$sock")")" 4194304 "size over unix"
expect_eq "$(bounded 30 nbdinfo --size "nbd://127.0.0.1:$port/d")" 4194304 "size over tcp"
bounded 30 nbdinfo --json "nbd://127.0.0.1:$port/d" >"$tmpdir/info.json"
grep -q '"description": "one,two"' "$tmpdir/info.json" ||
    fail "description with ,, : $(grep description "$tmpdir/info.json")"

# a second server on the same tcp port fails to start (non-zero, message)
run_cli --export "$ok_export" --listen "tcp:127.0.0.1:$port" --pidfile "$tmpdir/second.pid"
[ "$cli_status" != 0 ] && [ "$cli_status" != 124 ] ||
    fail "second server on busy port $port: exit status $cli_status"
grep -q "fleeced: error: .*$port" "$tmpdir/err" ||
    fail "busy port: message does not name the port: $(cat "$tmpdir/err")"
[ ! -e "$tmpdir/second.pid" ] || fail "pidfile written although listening failed"

# ---- SIGTERM with an idle client connected: exit 0 within 5 s, socket removed
"$PYTHON" -c 'import socket, sys, time
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.recv(18); time.sleep(30)' \
    "$sock" &
idle=$!
cleanup_fn kill_quiet "$idle"
sleep 0.3
stop_fleeced "$fleeced_pid" TERM
expect_eq "$fleeced_status" 0 "exit status after SIGTERM"
[ ! -e "$sock" ] || fail "socket file $sock still exists after SIGTERM"
kill_quiet "$idle"

# ---- SIGTERM under load: exit 0 within 5 s; every acknowledged write is in the file
truncate -s 64M "$tmpdir/load.img"
start_fleeced --export "name=d,file=$tmpdir/load.img,writable=on" --listen "unix:$sock"
if "$PYTHON" -c 'import nbd' 2>/dev/null; then
    bounded 60 "$PYTHON" - "$sock" "$tmpdir/acked" <<'PY' &
import struct, sys, time
import nbd
sock, acked_path = sys.argv[1], sys.argv[2]
h = nbd.NBD(); h.set_export_name("d"); h.connect_unix(sock)
acked = {}                     # block -> newest acknowledged tag
def make_cb(blk, tag):
    def cb(err):
        if err.value == 0:
            acked[blk] = max(acked.get(blk, 0), tag)
        return 1
    return cb
tag = 0
try:
    while True:                # until the server goes away
        while h.aio_in_flight() < 32:
            tag += 1
            blk = tag % 16384  # 64 MiB of 4 KiB blocks, over and over
            h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(struct.pack(">Q", tag) * 512)),
                         blk * 4096, make_cb(blk, tag))
        h.poll(1000)
except nbd.Error:
    pass
with open(acked_path, "w") as f:
    f.write("\n".join(f"{b} {t}" for b, t in acked.items()))
PY
    loader=$!
    sleep 1
    stop_fleeced "$fleeced_pid" TERM
    expect_eq "$fleeced_status" 0 "exit status after SIGTERM under load"
    wait "$loader" || fail "load client failed"
    "$PYTHON" - "$tmpdir/load.img" "$tmpdir/acked" <<'PY' || fail "acknowledged writes missing after SIGTERM"
import struct, sys
img, acked = sys.argv[1], sys.argv[2]
pairs = [tuple(map(int, line.split())) for line in open(acked) if line.strip()]
if not pairs:
    sys.exit("no write was acknowledged before SIGTERM")
with open(img, "rb") as f:
    for blk, tag in pairs:
        f.seek(blk * 4096)
        got = f.read(4096)
        found = struct.unpack(">Q", got[:8])[0]
        # a newer write may have landed without its reply getting out
        if got != struct.pack(">Q", found) * 512 or found < tag or found % 16384 != blk:
            sys.exit(f"block {blk}: acknowledged write {tag} not in the image "
                     f"(found {got[:16].hex()})")
print(f"newest acknowledged write of {len(pairs)} blocks all present")
PY
else
    stop_fleeced "$fleeced_pid" TERM
fi
[ ! -e "$sock" ] || fail "socket file $sock still exists after SIGTERM under load"

# ---- SIGINT too
start_fleeced --export "$ok_export" --listen "unix:$sock"
bounded 30 nbdinfo --size "$(nbd_unix_uri d "$sock")" >/dev/null
stop_fleeced "$fleeced_pid" INT
expect_eq "$fleeced_status" 0 "exit status after SIGINT"
[ ! -e "$sock" ] || fail "socket file $sock still exists after SIGINT"

# ---- --stdin: one connection on stdin/stdout, then exit 0
if "$PYTHON" -c 'import nbd' 2>/dev/null; then
    bounded 30 "$PYTHON" - "$FLEECED" "$img" <<'PY' || fail "--stdin session failed"
import socket, subprocess, sys
import nbd
fleeced, img = sys.argv[1], sys.argv[2]
a, b = socket.socketpair()
p = subprocess.Popen([fleeced, "--stdin", "--log-level", "warn", "--export", f"name=d,file={img},writable=on"],
                     stdin=b, stdout=b)
b.close()
h = nbd.NBD()
h.set_export_name("d")
h.connect_socket(a.detach())   # libnbd owns (and closes) the socket now
assert h.get_size() == 4194304, h.get_size()
h.pwrite(b"hello", 100)
assert h.pread(5, 100) == b"hello"
h.shutdown()
del h
st = p.wait(10)
if st != 0:
    sys.exit(f"fleeced --stdin exited with {st} after the client disconnected")
PY
    expect_eq "$(dd if="$img" bs=1 skip=100 count=5 status=none)" hello "--stdin write in the file"
fi
echo "PASS: $test_name"

# SPDX-License-Identifier: MIT
# Shared helpers for interop/*.sh (modelled on nbdkit tests/functions.sh.in).
#
# Source it first thing:   source "$(dirname "$0")/functions.sh"
#
# Environment (set by ctest, see interop/CMakeLists.txt):
#   FLEECED            path of the fleeced binary (required)
#   FLEECED_SOURCE_DIR source tree (default: parent of interop/)
#   FLEECED_BUILD_DIR  build tree (informative)
#   FLEECED_PYTHON     python with the libnbd module (default /usr/bin/python3)
#
# Exit codes: 0 pass, 1 fail, 77 skip.  Every wait in here is bounded.

set -e
set -u
set -o pipefail

interop_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
: "${FLEECED_SOURCE_DIR:=$(dirname "$interop_dir")}"
: "${FLEECED_BUILD_DIR:=}"
: "${FLEECED_PYTHON:=/usr/bin/python3}"
PYTHON=$FLEECED_PYTHON
test_name=$(basename "$0" .sh)

# ---------------------------------------------------------------- reporting

fail() {
    echo "FAIL: $test_name: $*" >&2
    exit 1
}

skip() {
    echo "SKIP: $test_name: $*" >&2
    exit 77
}

# expect_eq ACTUAL EXPECTED MSG
expect_eq() {
    if [ "$1" != "$2" ]; then
        fail "$3: expected [$2], got [$1]"
    fi
}

# expect_status EXPECTED MSG CMD...   runs CMD, compares its exit status
expect_status() {
    local want=$1 msg=$2 st=0
    shift 2
    "$@" || st=$?
    if [ "$st" != "$want" ]; then
        fail "$msg: expected exit status $want, got $st (command: $*)"
    fi
}

# expect_file_eq ACTUAL_FILE EXPECTED_FILE MSG   (prints a diff on mismatch)
expect_file_eq() {
    if ! cmp -s "$1" "$2"; then
        echo "--- expected ($2)" >&2
        echo "+++ actual ($1)" >&2
        diff -u "$2" "$1" >&2 || true
        fail "$3"
    fi
}

# ---------------------------------------------------------------- requirements

# requires CMD...   skip (77) unless every CMD is on PATH (or is an executable path)
requires() {
    local c
    for c in "$@"; do
        if ! command -v "$c" >/dev/null 2>&1; then
            skip "required command '$c' not found"
        fi
    done
}

requires_python_nbd() {
    if ! "$PYTHON" -c 'import nbd' >/dev/null 2>&1; then
        skip "$PYTHON has no 'nbd' module (python3-libnbd)"
    fi
}

# ---------------------------------------------------------------- cleanup

_cleanup_cmds=()
# cleanup_fn CMD ARGS...   run at exit, last registered first
cleanup_fn() {
    _cleanup_cmds+=("$(printf '%q ' "$@")")
}

_fleeced_pids=()     # started by start_fleeced, not yet stopped
_fleeced_logs=()     # matching stderr logs
_fleeced_bad=0       # set when a server died on its own or exited non-zero

_run_cleanup() {
    local st=$? i
    set +e
    trap '' INT TERM
    _stop_all_fleeced
    for ((i = ${#_cleanup_cmds[@]} - 1; i >= 0; i--)); do
        eval "${_cleanup_cmds[$i]}"
    done
    if [ "$_fleeced_bad" != 0 ] && { [ "$st" = 0 ] || [ "$st" = 77 ]; }; then
        echo "FAIL: $test_name: fleeced did not exit cleanly (see above)" >&2
        st=1
    fi
    if [ "$st" != 0 ] && [ "$st" != 77 ]; then
        _dump_fleeced_logs
    fi
    if [ -n "${tmpdir:-}" ] && [ -d "$tmpdir" ]; then
        if [ -n "${KEEP_TMPDIR:-}" ]; then
            echo "keeping $tmpdir" >&2
        else
            rm -rf -- "$tmpdir"
        fi
    fi
    exit "$st"
}
trap _run_cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

_dump_fleeced_logs() {
    local f
    for f in ${tmpdir:+"$tmpdir"/fleeced-*.log}; do
        [ -s "$f" ] || continue
        echo "---- last lines of $(basename "$f") ----" >&2
        tail -n 40 "$f" >&2
    done
}

# ---------------------------------------------------------------- temp dir

tmpdir=$(mktemp -d "${TMPDIR:-/tmp}/fleeced-$test_name.XXXXXX")
# sun_path is 108 bytes; keep socket paths short.
if [ ${#tmpdir} -gt 80 ]; then
    echo "warning: temp dir path is long ($tmpdir); unix sockets may fail" >&2
fi

# ---------------------------------------------------------------- misc helpers

# bounded SECONDS CMD...   run CMD with a hard time limit (exit 124 on timeout)
bounded() {
    local secs=$1
    shift
    timeout --kill-after=5 "$secs" "$@"
}

# wait_exit PID SECONDS: waits up to SECONDS for PID (a child of this shell)
# to exit, reaps it and sets exit_status; returns 1, without reaping, if it
# still runs then.
wait_exit() {
    local pid=$1 tenths=$(($2 * 10)) i
    for ((i = 0; i < tenths; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -0 "$pid" 2>/dev/null && return 1
    exit_status=0
    wait "$pid" || exit_status=$?
}

# kill_quiet PID...: SIGTERM to these PIDs, ignoring ones already gone
# (for helper processes a test started itself; use with cleanup_fn)
kill_quiet() {
    kill "$@" 2>/dev/null || true
}

# free_tcp_port: print a TCP port on 127.0.0.1 that was free a moment ago
free_tcp_port() {
    "$PYTHON" -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])'
}

# nbd_unix_uri EXPORT SOCKET
nbd_unix_uri() {
    printf 'nbd+unix:///%s?socket=%s\n' "$1" "$2"
}

sha256() {
    sha256sum "$1" | cut -d' ' -f1
}

# make_pattern_image FILE SIZE [OFFSET:LENGTH...]   (numbers may end in k/M/G)
#   Creates a sparse FILE of SIZE bytes.  Each listed island (default: a few
#   islands chosen from SIZE) is filled with a deterministic pattern: every
#   8-byte big-endian word holds (absolute offset of the word | 1<<63) XOR
#   0x5a5a5a5a, so data read from a wrong place never matches and never
#   looks like zeroes.  Offsets and lengths must be multiples of 8.
#   Everything outside the islands is a hole.
make_pattern_image() {
    local file=$1 size=$2
    shift 2
    "$PYTHON" - "$file" "$size" "$@" <<'PY'
import os, struct, sys
def num(t):
    m = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(t[-1:].lower())
    return int(t[:-1], 0) * m if m else int(t, 0)
path, size = sys.argv[1], num(sys.argv[2])
islands = [tuple(num(x) for x in a.split(":")) for a in sys.argv[3:]]
if not islands:
    m = 1 << 20
    islands = [(0, 64 * 1024), (m, 4096), (3 * m + 512, 12288)]
    islands = [(o, l) for o, l in islands if o + l <= size]
with open(path, "wb") as f:
    f.truncate(size)
    for off, length in islands:
        assert off % 8 == 0 and length % 8 == 0 and off + length <= size
        f.seek(off)
        words = range(off, off + length, 8)
        f.write(b"".join(struct.pack(">Q", (w | 1 << 63) ^ 0x5a5a5a5a)
                         for w in words))
PY
}

# make_random_image FILE SIZE SEED
#   Sparse FILE of SIZE bytes: random-length islands of random bytes at
#   random 512-aligned offsets, about a third of the file data, the rest
#   holes.  Deterministic for a given SEED.
make_random_image() {
    local file=$1 size=$2 seed=$3
    "$PYTHON" - "$file" "$size" "$seed" <<'PY'
import random, sys
def num(t):
    m = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(t[-1:].lower())
    return int(t[:-1], 0) * m if m else int(t, 0)
path, size, seed = sys.argv[1], num(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
with open(path, "wb") as f:
    f.truncate(size)
    off = 0
    while off < size:
        off += rng.randrange(0, 2 << 20, 512)          # hole
        length = rng.randrange(1, 1 << 20)               # odd lengths too
        length = min(length, size - off)
        if length <= 0:
            break
        f.seek(off)
        f.write(rng.randbytes(length))
        off += length
PY
}

# ---------------------------------------------------------------- fleeced

_require_fleeced_binary() {
    if [ -z "${FLEECED:-}" ]; then
        fail "FLEECED is not set (path of the fleeced binary)"
    fi
    if [ ! -x "$FLEECED" ]; then
        fail "FLEECED=$FLEECED is not executable"
    fi
}

_fleeced_count=0
# start_fleeced ARGS...
#   Starts "$FLEECED --pidfile PIDFILE ARGS..." in the background with stderr
#   in $tmpdir/fleeced-N.log, waits up to 10 s for the pidfile, sets
#   $fleeced_pid and $fleeced_log.  The server is stopped at exit (TERM, then
#   KILL after 5 s); a server that crashed or exited non-zero fails the test.
#   Must be called in the main shell, not in $(...).
start_fleeced() {
    _require_fleeced_binary
    _fleeced_count=$((_fleeced_count + 1))
    local pidfile=$tmpdir/fleeced-$_fleeced_count.pid
    fleeced_log=$tmpdir/fleeced-$_fleeced_count.log
    rm -f "$pidfile"
    "$FLEECED" --pidfile "$pidfile" "$@" </dev/null >>"$fleeced_log" 2>&1 &
    local bg=$! i
    _fleeced_pids+=("$bg")
    _fleeced_logs+=("$fleeced_log")
    for ((i = 0; i < 100; i++)); do
        if [ -s "$pidfile" ]; then
            break
        fi
        if ! kill -0 "$bg" 2>/dev/null || _is_zombie "$bg"; then
            local st=0
            wait "$bg" || st=$?
            _forget_fleeced "$bg"
            cat "$fleeced_log" >&2
            fail "fleeced $* exited with status $st before writing its pidfile"
        fi
        sleep 0.1
    done
    if [ ! -s "$pidfile" ]; then
        fail "fleeced did not write $pidfile within 10 s"
    fi
    fleeced_pid=$(cat "$pidfile")
    if [ "$fleeced_pid" != "$bg" ]; then
        fail "pidfile holds [$fleeced_pid], expected the server's PID $bg"
    fi
}

# _is_zombie PID: true if the process is a zombie or already gone (reaped
# between a kill -0 and this check: /proc/PID no longer exists).
_is_zombie() {
    local state
    [ -r "/proc/$1/stat" ] || return 0
    state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 0
    [ -z "$state" ] || [ "$state" = Z ]
}

_forget_fleeced() {
    local i
    for i in "${!_fleeced_pids[@]}"; do
        if [ "${_fleeced_pids[$i]}" = "$1" ]; then
            unset '_fleeced_pids[i]'
        fi
    done
}

# fleeced_alive PID: true while the server runs
fleeced_alive() {
    kill -0 "$1" 2>/dev/null && ! _is_zombie "$1"
}

# stop_fleeced PID [SIGNAL]: send SIGNAL (default TERM), wait at most 5 s,
# then KILL.  Sets $fleeced_status to the exit status (128+n for signal n).
stop_fleeced() {
    local pid=$1 sig=${2:-TERM} i
    fleeced_status=
    kill "-$sig" "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        if _is_zombie "$pid" || ! kill -0 "$pid" 2>/dev/null; then
            break
        fi
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null && ! _is_zombie "$pid"; then
        echo "fleeced $pid ignored SIG$sig for 5 s, sending KILL" >&2
        kill -KILL "$pid" 2>/dev/null || true
    fi
    fleeced_status=0
    wait "$pid" 2>/dev/null || fleeced_status=$?
    _forget_fleeced "$pid"
}

_stop_all_fleeced() {
    local pid
    for pid in "${_fleeced_pids[@]}"; do
        if ! fleeced_alive "$pid"; then
            local st=0
            wait "$pid" 2>/dev/null || st=$?
            echo "fleeced $pid had already exited with status $st" >&2
            _fleeced_bad=1
            continue
        fi
        stop_fleeced "$pid" TERM
        if [ "$fleeced_status" != 0 ]; then
            echo "fleeced $pid exited with status $fleeced_status after SIGTERM" >&2
            _fleeced_bad=1
        fi
    done
    _fleeced_pids=()
}

# ---------------------------------------------------------------- TLS

# make_psk_keys FILE USER...   appends a fresh random key for each USER to
#   FILE with psktool (the "user:hexkey" lines that keys.psk holds)
make_psk_keys() {
    local file=$1 user
    shift
    mkdir -p "$(dirname "$file")"
    for user in "$@"; do
        psktool -u "$user" -p "$file" >/dev/null 2>&1 || fail "psktool -u $user -p $file failed"
    done
}

# make_ca DIR CN   a CA in DIR: ca-key.pem and a self-signed ca-cert.pem (certtool)
make_ca() {
    local dir=$1 cn=$2
    mkdir -p "$dir"
    certtool --generate-privkey --key-type=ecdsa --outfile "$dir/ca-key.pem" >/dev/null 2>&1 ||
        fail "certtool: CA key"
    printf 'cn = %s\nca\ncert_signing_key\ncrl_signing_key\nexpiration_days = 30\n' "$cn" \
        >"$dir/ca.info"
    certtool --generate-self-signed --load-privkey "$dir/ca-key.pem" --template "$dir/ca.info" \
        --outfile "$dir/ca-cert.pem" >/dev/null 2>&1 || fail "certtool: CA certificate"
}

# make_cert CADIR OUTDIR server|client CN   a key and a certificate signed
#   by the CA in CADIR, as OUTDIR/{server,client}-{cert,key}.pem, plus a
#   copy of the CA certificate (the layout QEMU and libnbd read). Server
#   certificates name localhost and 127.0.0.1.
make_cert() {
    local ca=$1 out=$2 role=$3 cn=$4
    mkdir -p "$out"
    certtool --generate-privkey --key-type=ecdsa --outfile "$out/$role-key.pem" >/dev/null 2>&1 ||
        fail "certtool: $role key"
    {
        printf 'country = GB\norganization = fleeced test\ncn = %s\n' "$cn"
        if [ "$role" = server ]; then
            printf 'dns_name = localhost\nip_address = 127.0.0.1\ntls_www_server\n'
        else
            printf 'tls_www_client\n'
        fi
        printf 'encryption_key\nsigning_key\nexpiration_days = 30\n'
    } >"$out/$role.info"
    certtool --generate-certificate --load-ca-certificate "$ca/ca-cert.pem" \
        --load-ca-privkey "$ca/ca-key.pem" --load-privkey "$out/$role-key.pem" \
        --template "$out/$role.info" --outfile "$out/$role-cert.pem" >/dev/null 2>&1 ||
        fail "certtool: $role certificate"
    cp "$ca/ca-cert.pem" "$out/ca-cert.pem"
}

# ------------------------------------------------------- fleece-backup tests

# requires_backup_tools: FLEECECTL and FLEECE_BACKUP (set by ctest; by hand
# they default to siblings of FLEECED), skipping when they are missing.
requires_backup_tools() {
    : "${FLEECECTL:=$(dirname "${FLEECED:-.}")/fleecectl}"
    : "${FLEECE_BACKUP:=$(dirname "${FLEECED:-.}")/fleece-backup}"
    [ -x "$FLEECECTL" ] || skip "FLEECECTL=$FLEECECTL is not executable"
    [ -x "$FLEECE_BACKUP" ] || skip "FLEECE_BACKUP=$FLEECE_BACKUP is not executable"
}

# backup_env: the names every fleece-backup test against fleeced uses
# ($qmp, $sock, $img, $dir, $live), the environment fleece-backup reads, and
# ctl ARGS... (fleecectl on $qmp, bounded).
backup_env() {
    qmp=$tmpdir/qmp.sock
    sock=$tmpdir/nbd.sock
    img=$tmpdir/disk.img
    dir=$tmpdir/backups
    live=$(nbd_unix_uri disk0 "$sock")
    export FLEECED_QMP=$qmp FLEECED_NBD="nbd+unix:///?socket=$sock"
    ctl() { bounded 30 "$FLEECECTL" -s "$qmp" --timeout 20 "$@"; }
}

# start_backup_fleeced: fleeced serving $img as disk0 (writable) on $sock,
# with its control socket on $qmp.
start_backup_fleeced() {
    start_fleeced --export "name=disk0,file=$img,writable=on" --listen "unix:$sock" \
        --qmp "unix:$qmp" --log-level warn
}

# expect_no_fleece WHAT: the server holds only the command-line export disk0
# and its two nodes, no block job. Leaves query-named-block-nodes in
# $tmpdir/q.json for the caller's bitmap checks.
expect_no_fleece() {
    ctl --json exports >"$tmpdir/q.json"
    expect_eq "$(jq -c '[.return[].id]' "$tmpdir/q.json")" '["disk0"]' "exports after $1"
    ctl --json jobs >"$tmpdir/q.json"
    expect_eq "$(jq -c '.return' "$tmpdir/q.json")" '[]' "block jobs after $1"
    ctl --json nodes >"$tmpdir/q.json"
    expect_eq "$(jq -c '[.return[]."node-name"] | sort' "$tmpdir/q.json")" '["disk0","disk0-file"]' \
        "block nodes after $1"
}

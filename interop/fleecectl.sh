#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# fleecectl, the command line over the QMP control socket: nodes, bitmaps,
# bitmap add/remove/clear/enable/disable/merge, exports, export add/del,
# server start/stop, raw JSON, quit.  Exit status 0 on success, 1 with
# "fleecectl: CLASS: desc" on stderr for a QMP error or a connection
# problem, 2 with "fleecectl: error: ..." for a usage error.  Tables are
# compared literally (rows sorted, since the server's order is not
# specified), --json output is parsed.  FLEECED_QMP vs -s, unix:PATH,
# a missing socket, a server that never answers (--timeout).
source "$(dirname "$0")/functions.sh"
requires_python_nbd
_require_fleeced_binary
if [ -z "${FLEECECTL:-}" ]; then
    fail "FLEECECTL is not set (path of the fleecectl binary)"
fi
[ -x "$FLEECECTL" ] || fail "FLEECECTL=$FLEECECTL is not executable"

out=$tmpdir/out
err=$tmpdir/err
qmp=$tmpdir/qmp.sock
nbd_sock=$tmpdir/nbd.sock
truncate -s 4M "$tmpdir/disk.img" "$tmpdir/other.img"
unset FLEECED_QMP

# ctl ARGS...: run fleecectl (bounded); $ctl_status, stdout in $out, stderr in $err
ctl() {
    ctl_status=0
    bounded 20 "$FLEECECTL" "$@" </dev/null >"$out" 2>"$err" || ctl_status=$?
}

show_run() {
    echo "--- stdout:" >&2
    cat "$out" >&2
    echo "--- stderr:" >&2
    cat "$err" >&2
}

# ok ARGS...: must succeed with nothing on stderr
ok() {
    ctl "$@"
    if [ "$ctl_status" != 0 ] || [ -s "$err" ]; then
        show_run
        fail "fleecectl $*: exit status $ctl_status, expected 0 with an empty stderr"
    fi
}

# ok_quiet ARGS...: must succeed and print nothing at all
ok_quiet() {
    ok "$@"
    if [ -s "$out" ]; then
        show_run
        fail "fleecectl $*: printed something on stdout"
    fi
}

# qmp_error CLASS DESC ARGS...: exit 1, stdout empty, stderr exactly
# "fleecectl: CLASS: DESC"
qmp_error() {
    local cls=$1 desc=$2
    shift 2
    ctl "$@"
    if [ "$ctl_status" != 1 ]; then
        show_run
        fail "fleecectl $*: exit status $ctl_status, expected 1"
    fi
    expect_eq "$(cat "$err")" "fleecectl: $cls: $desc" "stderr of fleecectl $*"
    [ ! -s "$out" ] || { show_run; fail "fleecectl $*: failed but printed on stdout"; }
}

# usage_error ARGS...: exit 2, one line "fleecectl: error: ..." and nothing on stdout
usage_error() {
    ctl "$@"
    if [ "$ctl_status" != 2 ]; then
        show_run
        fail "fleecectl $*: exit status $ctl_status, expected 2 (usage error)"
    fi
    expect_eq "$(wc -l <"$err")" 1 "fleecectl $*: lines on stderr [$(cat "$err")]"
    grep -q '^fleecectl: error: ' "$err" ||
        fail "fleecectl $*: stderr is not 'fleecectl: error: ...': $(cat "$err")"
    [ ! -s "$out" ] || { show_run; fail "fleecectl $*: usage error printed on stdout"; }
}

# expect_table WHAT EXPECTED: header line literally, the rows in any order
expect_table() {
    local what=$1 want=$2
    local got_sorted want_sorted
    got_sorted=$({ head -n 1 "$out"; tail -n +2 "$out" | LC_ALL=C sort; })
    want_sorted=$({ head -n 1 <<<"$want"; tail -n +2 <<<"$want" | LC_ALL=C sort; })
    if [ "$got_sorted" != "$want_sorted" ]; then
        echo "--- expected" >&2
        echo "$want_sorted" >&2
        echo "--- got" >&2
        cat "$out" >&2
        fail "$what: table differs"
    fi
}

# json_check WHAT PYTHON-EXPR: $out holds one JSON response line; the
# expression (with r = the parsed response) must be true
json_check() {
    "$PYTHON" - "$out" "$2" <<'PY' || fail "$1: --json output check failed: $(cat "$out")"
import json, sys
text = open(sys.argv[1]).read()
lines = [l for l in text.splitlines() if l.strip()]
if len(lines) != 1:
    sys.exit(f"expected one JSON line, got {len(lines)}")
r = json.loads(lines[0])
if not eval(sys.argv[2], {"r": r}):
    sys.exit(f"{sys.argv[2]} is false for {r}")
PY
}

# bitmap_field NODE NAME FIELD: one member of a bitmap, from --json nodes
bitmap_field() {
    ctl -s "$qmp" --json bitmaps
    [ "$ctl_status" = 0 ] || { show_run; fail "fleecectl --json bitmaps failed"; }
    "$PYTHON" - "$out" "$1" "$2" "$3" <<'PY'
import json, sys
r = json.loads(open(sys.argv[1]).read())
for n in r["return"]:
    if n["node-name"] == sys.argv[2]:
        for b in n.get("dirty-bitmaps", []):
            if b.get("name") == sys.argv[3]:
                print(json.dumps(b[sys.argv[4]]))
                sys.exit(0)
print("<absent>")
PY
}

# nbd_write EXPORT OFFSET LENGTH: write LENGTH bytes through NBD
nbd_write() {
    bounded 20 "$PYTHON" - "$nbd_sock" "$@" <<'PY' || fail "NBD write to $1 failed"
import sys, nbd
sock, export, off, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
h = nbd.NBD()
h.set_export_name(export)
h.connect_unix(sock)
h.pwrite(b"\xa5" * n, off)
h.flush()
h.shutdown()
PY
}

# export_del_retry ID: safe export del; like a client (control-api.md §3.6)
# retry for up to 5 s while the server has not yet noticed a disconnect
export_del_retry() {
    local i
    for ((i = 0; i < 50; i++)); do
        ctl export del "$1"
        [ "$ctl_status" = 0 ] && break
        grep -q "still in use" "$err" || break
        sleep 0.1
    done
    if [ "$ctl_status" != 0 ] || [ -s "$err" ] || [ -s "$out" ]; then
        show_run
        fail "fleecectl export del $1: exit status $ctl_status"
    fi
}

# ---------------------------------------------------------------- usage errors
ctl --help
expect_eq "$ctl_status" 0 "--help exit status"
for word in nodes bitmaps "bitmap add" "bitmap merge" exports "export add" "export del" \
    "server start" "server stop" raw quit; do
    grep -qF -- "$word" "$out" || fail "--help does not mention '$word'"
done
usage_error
usage_error nodes                                  # no socket at all
usage_error -s "$qmp" frobnicate
usage_error -s "$qmp" --bogus-option nodes
usage_error -s "$qmp" nodes extra-word
usage_error -s "$qmp" bitmap
usage_error -s "$qmp" bitmap add d
usage_error -s "$qmp" bitmap add d b0 extra
usage_error -s "$qmp" bitmap add d b0 --granularity abc
usage_error -s "$qmp" bitmap add d b0 --granularity -512
usage_error -s "$qmp" bitmap add d b0 --colour red
usage_error -s "$qmp" bitmap frob d b0
usage_error -s "$qmp" bitmap merge d t
usage_error -s "$qmp" export add only-id
usage_error -s "$qmp" export del
usage_error -s "$qmp" server start tcp:127.0.0.1:10809
usage_error -s "$qmp" server start unix:
usage_error -s "$qmp" server stop now
usage_error -s "$qmp" raw
usage_error -s "$qmp" raw '{"execute": '
usage_error -s "$qmp" --timeout abc nodes
grep -q 'no control socket' <(FLEECED_QMP='' "$FLEECECTL" nodes 2>&1) ||
    fail "without -s and FLEECED_QMP the error does not say that no socket was given"

# ---------------------------------------------------------------- no server
missing=$tmpdir/no-such.sock
ctl -s "$missing" nodes
expect_eq "$ctl_status" 1 "missing socket: exit status"
grep -qF "$missing" "$err" || fail "missing socket: error does not name $missing: $(cat "$err")"
grep -q 'No such file or directory' "$err" ||
    fail "missing socket: error does not give the reason: $(cat "$err")"
[ ! -s "$out" ] || fail "missing socket: printed on stdout"
ctl -s "$tmpdir/disk.img" nodes
expect_eq "$ctl_status" 1 "a regular file as the socket: exit status"
grep -qF "$tmpdir/disk.img" "$err" || fail "regular file as socket: $(cat "$err")"

# a server that accepts and never says anything: --timeout gives up
mute=$tmpdir/mute.sock
"$PYTHON" - "$mute" <<'PY' &
import socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1])
s.listen(4)
s.settimeout(30)
try:
    conns = []
    end = time.monotonic() + 30
    while time.monotonic() < end:
        conns.append(s.accept()[0])
except OSError:
    pass
PY
mute_pid=$!
cleanup_fn kill_quiet "$mute_pid"
for ((i = 0; i < 50; i++)); do [ -S "$mute" ] && break; sleep 0.1; done
start=$SECONDS
ctl -s "$mute" --timeout 1 nodes
expect_eq "$ctl_status" 1 "mute server: exit status"
grep -q 'no answer' "$err" || fail "mute server: error does not say so: $(cat "$err")"
[ $((SECONDS - start)) -le 5 ] || fail "--timeout 1 took $((SECONDS - start)) s"
kill_quiet "$mute_pid"

# ---------------------------------------------------------------- a daemon
start_fleeced --qmp "unix:$qmp"
daemon_pid=$fleeced_pid

# raw passthrough (also builds the graph)
ok -s "$qmp" raw '{"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "d-file",' \
    "\"filename\": \"$tmpdir/disk.img\"}}"
expect_eq "$(cat "$out")" $'{\n  "return": {}\n}' "raw blockdev-add output"
ok -s "$qmp" --json raw '{"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "d", "file": "d-file"}}'
json_check "raw --json" 'r == {"return": {}}'
ok -s "$qmp" raw "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": \"file\", \"node-name\": \"o-file\", \"filename\": \"$tmpdir/other.img\"}}"
ok -s "$qmp" raw '{"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "o", "file": "o-file"}}'
ok -s "$qmp" --json raw '{"execute": "query-block-exports", "id": {"mine": [7]}}'
json_check "raw with an id" 'r == {"return": [], "id": {"mine": [7]}}'
ctl -s "$qmp" raw '{"execute": "blockdev-del", "arguments": {"node-name": "nonexist"}}'
expect_eq "$ctl_status" 1 "raw command that fails: exit status"
grep -q '"GenericError"' "$out" || { show_run; fail "raw error response not printed"; }
grep -qF "Failed to find node with node-name='nonexist'" "$out" ||
    { show_run; fail "raw error desc not printed"; }
ctl -s "$qmp" --json raw '{"execute": "no-such-command"}'
expect_eq "$ctl_status" 1 "raw unknown command: exit status"
json_check "raw unknown command" 'r["error"]["class"] == "CommandNotFound"'
ok -s "$qmp" raw '{"execute":' '"query-block-exports"}'  # words are joined
expect_eq "$(cat "$out")" $'{\n  "return": []\n}' "raw from two words"

# FLEECED_QMP vs -s, unix:PATH
FLEECED_QMP=$qmp ok --json nodes
json_check "FLEECED_QMP" 'sorted(n["node-name"] for n in r["return"]) == ["d", "d-file", "o", "o-file"]'
FLEECED_QMP=unix:$qmp ok nodes
FLEECED_QMP=$missing ok -s "$qmp" nodes            # -s wins
FLEECED_QMP=$missing ok --socket="unix:$qmp" nodes
FLEECED_QMP=$qmp ctl -s "$missing" nodes           # -s wins, also when it is wrong
expect_eq "$ctl_status" 1 "-s with a missing socket overrides a good FLEECED_QMP"
export FLEECED_QMP=$qmp

# ---------------------------------------------------------------- nodes, bitmaps
ok nodes
expect_table "nodes" "NODE    DRIVER  BITMAP  GRANULARITY  COUNT  RECORDING  BUSY  PERSISTENT
d       raw     -       -            -      -          -     -
d-file  file    -       -            -      -          -     -
o       raw     -       -            -      -          -     -
o-file  file    -       -            -      -          -     -"
ok nodes --json                                    # global option after the command
json_check "nodes --json" 'all("dirty-bitmaps" not in n for n in r["return"])'

ok_quiet bitmap add d b0
ok_quiet bitmap add d b512 --granularity 512
ok_quiet bitmap add d bd --disabled
ok_quiet bitmap add d b1k --granularity=1K
ok_quiet bitmap add d pb --persistent --granularity 4096
ok_quiet bitmap add o ob
ok bitmaps d
expect_table "bitmaps d" "NODE  BITMAP  GRANULARITY  COUNT  RECORDING  BUSY  PERSISTENT
d     b0      65536        0      yes        no    no
d     b512    512          0      yes        no    no
d     bd      65536        0      no         no    no
d     b1k     1024         0      yes        no    no
d     pb      4096         0      yes        no    yes"
ok bitmaps
expect_table "bitmaps" "NODE  BITMAP  GRANULARITY  COUNT  RECORDING  BUSY  PERSISTENT
d     b0      65536        0      yes        no    no
d     b512    512          0      yes        no    no
d     bd      65536        0      no         no    no
d     b1k     1024         0      yes        no    no
d     pb      4096         0      yes        no    yes
o     ob      65536        0      yes        no    no"
ok bitmaps o-file
expect_eq "$(cat "$out")" "NODE  BITMAP  GRANULARITY  COUNT  RECORDING  BUSY  PERSISTENT" \
    "bitmaps of a node without bitmaps"
ctl bitmaps nonexist
expect_eq "$ctl_status" 1 "bitmaps of an unknown node: exit status"
grep -qF "nonexist" "$err" || fail "bitmaps nonexist: $(cat "$err")"
ok nodes
expect_table "nodes with bitmaps" "NODE    DRIVER  BITMAP  GRANULARITY  COUNT  RECORDING  BUSY  PERSISTENT
d       raw     b0      65536        0      yes        no    no
d       raw     b512    512          0      yes        no    no
d       raw     bd      65536        0      no         no    no
d       raw     b1k     1024         0      yes        no    no
d       raw     pb      4096         0      yes        no    yes
d-file  file    -       -            -      -          -     -
o       raw     ob      65536        0      yes        no    no
o-file  file    -       -            -      -          -     -"

# QMP errors: exit 1, class and desc on stderr
qmp_error GenericError "Bitmap already exists: b0" bitmap add d b0
qmp_error GenericError "Granularity must be power of 2 and at least 512" \
    bitmap add d g --granularity 1000
qmp_error GenericError "Parameter 'granularity' expects uint32_t" \
    bitmap add d g --granularity 4G
qmp_error GenericError "Bitmap name cannot be empty" bitmap add d ""
qmp_error GenericError "Cannot find device='no-such-node' nor node-name='no-such-node'" \
    bitmap add no-such-node g
for verb in remove clear enable disable; do
    qmp_error GenericError "Dirty bitmap 'nope' not found" bitmap "$verb" d nope
done
ctl --json bitmap add d b0
expect_eq "$ctl_status" 1 "--json with a failing command: exit status"
json_check "--json error" 'r["error"] == {"class": "GenericError", "desc": "Bitmap already exists: b0"}'
expect_eq "$(cat "$err")" "fleecectl: GenericError: Bitmap already exists: b0" "--json error on stderr"
ctl -s "$qmp" --json bitmaps d
json_check "bitmaps --json unchanged after errors" \
    'sorted(b["name"] for n in r["return"] if n["node-name"] == "d" for b in n["dirty-bitmaps"]) == ["b0", "b1k", "b512", "bd", "pb"]'

ok_quiet bitmap disable d b0
ok_quiet bitmap disable d b0
ok_quiet bitmap enable d bd
ok_quiet bitmap remove d b1k
ok_quiet bitmap remove d pb
ok bitmaps d
expect_table "bitmaps after enable/disable/remove" "NODE  BITMAP  GRANULARITY  COUNT  RECORDING  BUSY  PERSISTENT
d     b0      65536        0      no         no    no
d     b512    512          0      yes        no    no
d     bd      65536        0      yes        no    no"
qmp_error GenericError "Dirty bitmap 'b1k' not found" bitmap remove d b1k

# ---------------------------------------------------------------- server, exports
qmp_error GenericError "NBD server not running" server stop
ok_quiet server start "unix:$nbd_sock" --max-connections 8
qmp_error GenericError "NBD server already running" server start "unix:$tmpdir/second.sock"
[ ! -e "$tmpdir/second.sock" ] || fail "refused server start created its socket"
ok_quiet export add w d --name w --writable
ok_quiet export add d-ro d --description "read-only view"
ok_quiet export add o-ro o --name o-ro
ok exports
expect_table "exports" "ID    TYPE  NODE  SHUTTING-DOWN
w     nbd   d     no
d-ro  nbd   d     no
o-ro  nbd   o     no"
ok --json exports
json_check "exports --json" 'sorted(r["return"], key=lambda e: e["id"]) == [
    {"id": "d-ro", "type": "nbd", "node-name": "d", "shutting-down": False},
    {"id": "o-ro", "type": "nbd", "node-name": "o", "shutting-down": False},
    {"id": "w", "type": "nbd", "node-name": "d", "shutting-down": False}]'
bounded 20 "$PYTHON" - "$nbd_sock" <<'PY' || fail "exports as seen over NBD"
import sys, nbd
def info(name):
    h = nbd.NBD()
    h.set_full_info(True)
    h.set_export_name(name)
    h.connect_unix(sys.argv[1])
    try:
        desc = h.get_export_description()
    except nbd.Error:
        desc = None
    ro = h.is_read_only()
    h.shutdown()
    return ro, desc
assert info("w")[0] is False, "export w is read-only"
assert info("d") == (True, "read-only view"), f"export d-ro (named d): {info('d')}"
assert info("o-ro")[0] is True, "export o-ro is writable"
PY
qmp_error GenericError "Block export id 'w' is already in use" export add w o --name other
qmp_error GenericError "NBD server already has export named 'w'" export add x o --name w
qmp_error GenericError "Cannot find device='' nor node-name='nonexist'" export add x nonexist
qmp_error GenericError "Bitmap 'nope' is not found" export add x d --name x --bitmap nope
qmp_error GenericError "Enabled bitmap 'b512' incompatible with readonly export" \
    export add x d --name x --bitmap b512
qmp_error GenericError "Export 'nope' is not found" export del nope

# recording, then merge with NAME and NODE/NAME sources
nbd_write w 0 1                     # d: granule 0 (b512: granule 0)
nbd_write w $((3 * 65536 + 100)) 512  # 64k granule 3; 512 granules 384, 385
expect_eq "$(bitmap_field d b512 count)" $((3 * 512)) "b512 count after writes"
expect_eq "$(bitmap_field d bd count)" $((2 * 65536)) "bd count after writes"
expect_eq "$(bitmap_field d b0 count)" 0 "disabled b0 count after writes"
ok_quiet export add o-w o --name o-w --writable
nbd_write o-w $((5 * 65536)) 4096   # o: granule 5
expect_eq "$(bitmap_field o ob count)" 65536 "ob count after a write"
ok_quiet bitmap merge d b0 b512 o/ob
expect_eq "$(bitmap_field d b0 count)" $((3 * 65536)) "b0 after merging b512 and o/ob"
expect_eq "$(bitmap_field d b0 recording)" false "merge target stays disabled"
ok_quiet bitmap clear d bd
expect_eq "$(bitmap_field d bd count)" 0 "bd after clear"
qmp_error GenericError "Dirty bitmap 'nope' not found" bitmap merge d b0 b512 nope
qmp_error GenericError "Dirty bitmap 'nope' not found" bitmap merge d nope b512
expect_eq "$(bitmap_field d b0 count)" $((3 * 65536)) "b0 after failed merges"

# exported bitmaps are busy
ok_quiet export add bm d --name bm --bitmap b0 --bitmap o/ob
ok bitmaps
expect_table "busy bitmaps" "NODE  BITMAP  GRANULARITY  COUNT   RECORDING  BUSY  PERSISTENT
d     b0      65536        196608  no         yes   no
d     b512    512          1536    yes        no    no
d     bd      65536        0       yes        no    no
o     ob      65536        65536   yes        yes   no"
busy="Bitmap 'b0' is currently in use by another operation and cannot be used"
for verb in remove clear enable disable; do
    qmp_error GenericError "$busy" bitmap "$verb" d b0
done
qmp_error GenericError "$busy" bitmap merge d b0 bd
qmp_error GenericError "Bitmap 'ob' is currently in use by another operation and cannot be used" \
    bitmap merge d bd o/ob

# export del: safe refused while a client is connected, --hard disconnects
holder_ready=$tmpdir/holder.ready
bounded 30 "$PYTHON" - "$nbd_sock" "$holder_ready" <<'PY' &
import os, sys, time, nbd
h = nbd.NBD()
h.set_export_name("bm")
h.connect_unix(sys.argv[1])
h.pread(512, 0)                        # surely in transmission now
open(sys.argv[2], "w").close()
end = time.monotonic() + 25
while time.monotonic() < end:          # until the server drops it
    try:
        h.pread(512, 0)
    except nbd.Error:
        sys.exit(0)
    time.sleep(0.05)
sys.exit(1)
PY
holder_pid=$!
cleanup_fn kill_quiet "$holder_pid"
for ((i = 0; i < 100; i++)); do [ -e "$holder_ready" ] && break; sleep 0.1; done
[ -e "$holder_ready" ] || fail "NBD client did not connect to bm"
qmp_error GenericError "export 'bm' still in use" export del bm
ok exports
grep -q '^bm ' "$out" || fail "export bm gone after a refused safe delete"
ctl -v export del bm --hard
expect_eq "$ctl_status" 0 "export del --hard: exit status"
[ ! -s "$out" ] || fail "export del --hard printed on stdout: $(cat "$out")"
if grep -qv '"event"' "$err"; then
    show_run
    fail "export del -v --hard: stderr has more than events"
fi
if ! grep -q '"BLOCK_EXPORT_DELETED"' "$err"; then
    echo "note: -v printed no BLOCK_EXPORT_DELETED (the event came after the return)" >&2
fi
holder_status=0
wait "$holder_pid" || holder_status=$?
expect_eq "$holder_status" 0 "NBD client of a hard-deleted export was disconnected"
expect_eq "$(bitmap_field d b0 busy)" false "b0 busy after its export was deleted"
export_del_retry d-ro

# server stop removes the rest
ok_quiet server stop
ok exports
expect_eq "$(cat "$out")" "ID  TYPE  NODE  SHUTTING-DOWN" "exports after server stop"
qmp_error GenericError "NBD server not running" server stop
ok_quiet server start "unix:$nbd_sock"
ok_quiet server stop

# ---------------------------------------------------------------- quit
fleeced_alive "$daemon_pid" || fail "fleeced died"
ok_quiet quit
for ((i = 0; i < 100; i++)); do fleeced_alive "$daemon_pid" || break; sleep 0.1; done
fleeced_alive "$daemon_pid" && fail "fleeced still running 10 s after fleecectl quit"
stop_fleeced "$daemon_pid"          # already gone: collects the exit status
expect_eq "$fleeced_status" 0 "fleeced exit status after quit"
ctl nodes
expect_eq "$ctl_status" 1 "fleecectl after quit: exit status"
grep -qF "$qmp" "$err" || fail "fleecectl after quit: $(cat "$err")"

echo "PASS: $test_name"

#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Credential rotation without dropping service. (1) X.509 given on the
# command line: the whole PKI is replaced (new CA, server and client
# certificates) and SIGHUP reloads it while a python3-libnbd client stays
# connected and keeps writing and reading; new clients need the new PKI; a
# broken key file on the next SIGHUP keeps the working credentials. (2) PSK
# objects on the control socket: keys.psk is rewritten and
# x-fleeced-tls-reload applies it, same checks, and a reload that fails
# answers with the error and changes nothing.
source "$(dirname "$0")/functions.sh"
requires certtool psktool nbdinfo
requires_python_nbd
: "${FLEECECTL:=$(dirname "${FLEECED:-.}")/fleecectl}"
[ -x "$FLEECECTL" ] || skip "FLEECECTL=$FLEECECTL is not executable"

make_pattern_image "$tmpdir/disk0.img" 16M 0:1M
client() { bounded 60 "$PYTHON" "$interop_dir/py/tls_client.py" "$@"; }

# hold_start NAME ARGS...: a client that stays connected, doing I/O until
# $tmpdir/NAME.stop exists; hold_finish NAME checks it never failed.
hold_start() {
    local name=$1 i
    shift
    bounded 180 "$PYTHON" "$interop_dir/py/tls_client.py" hold "$@" \
        --ready "$tmpdir/$name.ready" --stop "$tmpdir/$name.stop" >"$tmpdir/$name.out" 2>&1 &
    eval "${name}_pid=$!"
    cleanup_fn kill_quiet "$!"
    for ((i = 0; i < 100; i++)); do [ -s "$tmpdir/$name.ready" ] && return 0; sleep 0.1; done
    fail "$name: client did not connect: $(cat "$tmpdir/$name.out")"
}
hold_finish() {
    local pid_var=${1}_pid
    touch "$tmpdir/$1.stop"
    wait "${!pid_var}" || fail "$1: the connected client failed: $(cat "$tmpdir/$1.out")"
}
# wait_log TEXT: until the server log has TEXT (bounded)
wait_log() {
    local i
    for ((i = 0; i < 50; i++)); do grep -qF "$1" "$fleeced_log" && return 0; sleep 0.1; done
    fail "no log line '$1'"
}

# ---- (1) X.509 on the command line, SIGHUP
pki=$tmpdir/pki
for gen in 1 2; do
    make_ca "$pki/ca$gen" "fleeced CA generation $gen"
    make_cert "$pki/ca$gen" "$pki/server$gen" server localhost
    make_cert "$pki/ca$gen" "$pki/client$gen" client "client$gen"
done
mkdir -p "$tmpdir/live"
cp "$pki/server1/"*.pem "$tmpdir/live/"
sock=$tmpdir/x509.sock
port=$(free_tcp_port)
start_fleeced --export "name=disk0,file=$tmpdir/disk0.img,writable=on" \
    --listen "unix:$sock" --listen "tcp:127.0.0.1:$port" \
    --tls-creds "x509:$tmpdir/live,verify-peer=on"
hold_start x509hold --socket "$sock" --certs "$pki/client1" --offset $((2 << 20))

cp "$pki/server2/"*.pem "$tmpdir/live/"
kill -HUP "$fleeced_pid"
wait_log "TLS credentials reloaded: x509:$tmpdir/live verify-peer=on"
client refused --socket "$sock" --certs "$pki/client1" >/dev/null ||
    fail "a client of the old CA was served after the rotation"
client refused --tcp "127.0.0.1:$port" --certs "$pki/client1" >/dev/null ||
    fail "a client trusting only the old CA accepted the new server certificate"
client roundtrip --socket "$sock" --certs "$pki/client2" --offset $((8 << 20)) >/dev/null ||
    fail "a client of the new CA was refused after the rotation"
client roundtrip --tcp "127.0.0.1:$port" --certs "$pki/client2" --offset $((9 << 20)) >/dev/null ||
    fail "the new server certificate was not accepted over TCP"

# A broken rotation keeps the working credentials.
echo "not a key" >"$tmpdir/live/server-key.pem"
kill -HUP "$fleeced_pid"
wait_log "TLS credentials not reloaded (the old ones stay): Cannot load private key $tmpdir/live/server-key.pem"
client roundtrip --socket "$sock" --certs "$pki/client2" --offset $((10 << 20)) >/dev/null ||
    fail "a failed reload broke the credentials"
hold_finish x509hold

# ---- (2) PSK objects on the control socket, x-fleeced-tls-reload
make_psk_keys "$tmpdir/old/keys.psk" alice
make_psk_keys "$tmpdir/new/keys.psk" alice
mkdir -p "$tmpdir/psk"
cp "$tmpdir/old/keys.psk" "$tmpdir/psk/keys.psk"
qmp=$tmpdir/qmp.sock
qsock=$tmpdir/qmp-nbd.sock
start_fleeced --export "name=disk0,file=$tmpdir/disk0.img,writable=on" --qmp "unix:$qmp"
ctl() { bounded 30 "$FLEECECTL" --timeout 20 -s "$qmp" "$@"; }
ctl raw '{"execute": "object-add", "arguments": {"qom-type": "tls-creds-psk", "id": "tls0", "endpoint": "server", "dir": "'"$tmpdir/psk"'"}}' \
    >/dev/null || fail "object-add"
ctl server start "unix:$qsock" --tls-creds tls0 >/dev/null || fail "nbd-server-start"
ctl export add e0 disk0 --name qdisk --writable >/dev/null || fail "block-export-add"
hold_start pskhold --socket "$qsock" --export qdisk --psk "$tmpdir/old/keys.psk" \
    --offset $((4 << 20))

cp "$tmpdir/new/keys.psk" "$tmpdir/psk/keys.psk"
ctl raw '{"execute": "x-fleeced-tls-reload", "arguments": {"id": "tls0"}}' >/dev/null ||
    fail "x-fleeced-tls-reload"
client refused --socket "$qsock" --export qdisk --psk "$tmpdir/old/keys.psk" >/dev/null ||
    fail "the old key still works after the reload"
client roundtrip --socket "$qsock" --export qdisk --psk "$tmpdir/new/keys.psk" \
    --offset $((12 << 20)) >/dev/null || fail "the new key does not work after the reload"

rm "$tmpdir/psk/keys.psk"
out=$(ctl raw '{"execute": "x-fleeced-tls-reload", "arguments": {"id": "tls0"}}' 2>&1) &&
    fail "reload without keys.psk succeeded"
grep -qF "Unable to access credentials $tmpdir/psk/keys.psk: No such file or directory" <<<"$out" ||
    fail "reload error: $out"
out=$(ctl raw '{"execute": "x-fleeced-tls-reload", "arguments": {"id": "nope"}}' 2>&1) &&
    fail "reload of an unknown id succeeded"
grep -qF "No TLS credentials with id 'nope'" <<<"$out" || fail "reload error: $out"
client roundtrip --socket "$qsock" --export qdisk --psk "$tmpdir/new/keys.psk" \
    --offset $((13 << 20)) >/dev/null || fail "a failed reload broke the credentials"
hold_finish pskhold

for pid in "${_fleeced_pids[@]}"; do fleeced_alive "$pid" || fail "fleeced $pid died"; done
echo "PASS: $test_name"

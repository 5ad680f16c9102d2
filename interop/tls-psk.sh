#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# TLS with pre-shared keys (keys.psk written by psktool): nbdinfo, nbdcopy
# and python3-libnbd over nbds+unix:// and nbds:// (TCP), qemu-img and
# qemu-io with --object tls-creds-psk; refusals with the log line that
# explains each (plaintext client in require mode, wrong key, unknown user);
# --tls=on serving both kinds of client; and the same credentials through
# the control socket (object-add, nbd-server-start tls-creds, object-del).
source "$(dirname "$0")/functions.sh"
requires psktool nbdinfo nbdcopy qemu-img qemu-io
requires_python_nbd
: "${FLEECECTL:=$(dirname "${FLEECED:-.}")/fleecectl}"
[ -x "$FLEECECTL" ] || skip "FLEECECTL=$FLEECECTL is not executable"

keys=$tmpdir/psk/keys.psk
make_psk_keys "$keys" alice bob
make_psk_keys "$tmpdir/other/keys.psk" alice   # alice again, another key
make_psk_keys "$tmpdir/carol/keys.psk" carol   # a user the server does not know
make_pattern_image "$tmpdir/disk0.img" 16M 0:64k 5M:8k 9M:1M
sock=$tmpdir/tls.sock
port=$(free_tcp_port)
client() { bounded 60 "$PYTHON" "$interop_dir/py/tls_client.py" "$@"; }
uri() { printf 'nbds+unix://%s@/disk0?socket=%s&tls-psk-file=%s\n' "$1" "${3:-$sock}" "$2"; }

start_fleeced --export "name=disk0,file=$tmpdir/disk0.img,writable=on" \
    --listen "unix:$sock" --listen "tcp:127.0.0.1:$port" --tls-creds "psk:$tmpdir/psk"
grep -q "listening on unix:$sock (TLS required, psk:$tmpdir/psk (2 identities))" "$fleeced_log" ||
    fail "no TLS listening line in the log"

# ---- clients that hold a key
bounded 30 nbdinfo "$(uri alice "$keys")" >"$tmpdir/info.out"
grep -qx "protocol: newstyle-fixed with TLS, using structured packets" "$tmpdir/info.out" ||
    fail "nbdinfo over TLS: $(cat "$tmpdir/info.out")"
expect_eq "$(bounded 30 nbdinfo --size "nbds://bob@127.0.0.1:$port/disk0?tls-psk-file=$keys")" \
    16777216 "nbdinfo --size over TCP as bob"
sum=$(sha256 "$tmpdir/disk0.img")
bounded 60 nbdcopy "$(uri alice "$keys")" "$tmpdir/copy.img"
expect_eq "$(sha256 "$tmpdir/copy.img")" "$sum" "nbdcopy export -> file over TLS"
client roundtrip --socket "$sock" --psk "$keys" --user alice >/dev/null ||
    fail "python3-libnbd round trip over unix"
client roundtrip --tcp "127.0.0.1:$port" --psk "$keys" --user bob --offset $((14 << 20)) \
    >/dev/null || fail "python3-libnbd round trip over TCP"

qemu_obj() { echo "tls-creds-psk,id=tls0,endpoint=client,dir=$1,username=$2"; }
qemu_opts="driver=nbd,server.type=unix,server.path=$sock,export=disk0,tls-creds=tls0"
bounded 60 qemu-io --object "$(qemu_obj "$tmpdir/psk" bob)" --image-opts "$qemu_opts" \
    -c 'write -P 0x5a 2M 64k' -c 'read -P 0x5a 2M 64k' >"$tmpdir/qio.out" ||
    fail "qemu-io over TLS: $(cat "$tmpdir/qio.out")"
sum=$(sha256 "$tmpdir/disk0.img")
bounded 60 qemu-img convert -O raw --object "$(qemu_obj "$tmpdir/psk" alice)" \
    --image-opts "driver=raw,file.${qemu_opts//,/,file.}" "$tmpdir/qcopy.img"
expect_eq "$(sha256 "$tmpdir/qcopy.img")" "$sum" "qemu-img convert export -> file over TLS"

# ---- refusals, each with its log line; the server keeps serving
expect_status 1 "plaintext nbdinfo in require mode" \
    bounded 30 nbdinfo "nbd+unix:///disk0?socket=$sock" >/dev/null 2>&1
grep -q "refusing NBD_OPT_GO: TLS is required (send NBD_OPT_STARTTLS first)" "$fleeced_log" ||
    fail "no log line for the plaintext client"
client refused --socket "$sock" --plain >"$tmpdir/plain.out" ||
    fail "plaintext libnbd client was served"
if bounded 30 qemu-img info "nbd+unix:///disk0?socket=$sock" >/dev/null 2>&1; then
    fail "plaintext qemu-img was served"
fi
client refused --socket "$sock" --psk "$tmpdir/other/keys.psk" --user alice >/dev/null ||
    fail "wrong key was accepted"
grep -q "closing: TLS handshake failed: binder does not verify (wrong PSK for 'alice'?)" \
    "$fleeced_log" || fail "no log line for the wrong key"
client refused --socket "$sock" --psk "$tmpdir/carol/keys.psk" --user carol >/dev/null ||
    fail "unknown user was accepted"
grep -q "closing: TLS handshake failed: unknown PSK identity 'carol'" "$fleeced_log" ||
    fail "no log line for the unknown user"
if bounded 30 qemu-img info --object "$(qemu_obj "$tmpdir/carol" carol)" \
        --image-opts "$qemu_opts" >/dev/null 2>&1; then
    fail "qemu-img with an unknown user was served"
fi
expect_eq "$(bounded 30 nbdinfo --size "$(uri alice "$keys")")" 16777216 "served after refusals"

# ---- --tls=on: TLS offered, plaintext still served
on_sock=$tmpdir/on.sock
start_fleeced --export "name=disk0,file=$tmpdir/disk0.img" --listen "unix:$on_sock" \
    --tls-creds "psk:$tmpdir/psk" --tls=on
bounded 30 nbdinfo "nbd+unix:///disk0?socket=$on_sock" | grep -q "without TLS" ||
    fail "--tls=on: plaintext client not served"
bounded 30 nbdinfo "$(uri bob "$keys" "$on_sock")" | grep -q "with TLS" ||
    fail "--tls=on: TLS client not served"

# ---- the control socket
qmp=$tmpdir/qmp.sock
qsock=$tmpdir/qmp-nbd.sock
start_fleeced --export "name=disk0,file=$tmpdir/disk0.img" --qmp "unix:$qmp"
ctl() { bounded 30 "$FLEECECTL" --timeout 20 -s "$qmp" "$@"; }
ctl_error() { # EXPECTED-DESC JSON
    local out
    if out=$(ctl raw "$2" 2>&1); then fail "expected an error from $2, got $out"; fi
    grep -qF "\"desc\": \"$1\"" <<<"$out" || fail "error for $2: $out (expected: $1)"
}
add='{"execute": "object-add", "arguments": {"qom-type": "tls-creds-psk", "id": "tls0", "endpoint": "server", "dir": "DIR"}}'
ctl_error "Unable to access credentials $tmpdir/none/keys.psk: No such file or directory" \
    "${add/DIR/$tmpdir/none}"
ctl raw "${add/DIR/$tmpdir/psk}" >/dev/null || fail "object-add tls-creds-psk"
ctl_error "attempt to add duplicate property 'tls0' to object (type 'container')" \
    "${add/DIR/$tmpdir/psk}"
ctl_error "No TLS credentials with id 'nope'" \
    '{"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": "'"$qsock"'"}}, "tls-creds": "nope"}}'
ctl server start "unix:$qsock" --tls-creds tls0 >/dev/null || fail "nbd-server-start tls-creds"
ctl export add e0 disk0 --name qdisk >/dev/null || fail "block-export-add"
expect_eq "$(bounded 30 nbdinfo --size "nbds+unix://alice@/qdisk?socket=$qsock&tls-psk-file=$keys")" \
    16777216 "QMP-started server over TLS"
expect_status 1 "plaintext client of the QMP-started server" \
    bounded 30 nbdinfo "nbd+unix:///qdisk?socket=$qsock" >/dev/null 2>&1
# object-del: the running server keeps the credentials it started with (QEMU too).
ctl raw '{"execute": "object-del", "arguments": {"id": "tls0"}}' >/dev/null || fail "object-del"
ctl_error "object 'tls0' not found" '{"execute": "object-del", "arguments": {"id": "tls0"}}'
expect_eq "$(bounded 30 nbdinfo --size "nbds+unix://bob@/qdisk?socket=$qsock&tls-psk-file=$keys")" \
    16777216 "served after object-del"

for pid in "${_fleeced_pids[@]}"; do fleeced_alive "$pid" || fail "fleeced $pid died"; done
echo "PASS: $test_name"

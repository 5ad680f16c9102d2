#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# TLS with X.509 certificates made by certtool (QEMU's directory layout):
# nbdinfo, nbdcopy and python3-libnbd over nbds+unix:// and nbds:// (TCP),
# qemu-img and qemu-io with --object tls-creds-x509, with and without
# client certificates; verify-peer refusals (no certificate, a certificate
# from another CA), a client that does not trust the server, the allow-list
# of client DNs (--tls-authz, and authz-list over the control socket).
source "$(dirname "$0")/functions.sh"
requires certtool nbdinfo nbdcopy qemu-img qemu-io
requires_python_nbd
: "${FLEECECTL:=$(dirname "${FLEECED:-.}")/fleecectl}"
[ -x "$FLEECECTL" ] || skip "FLEECECTL=$FLEECECTL is not executable"

pki=$tmpdir/pki
make_ca "$pki/ca" "fleeced test CA"
make_cert "$pki/ca" "$pki/server" server localhost
make_cert "$pki/ca" "$pki/client1" client client1
make_cert "$pki/ca" "$pki/client2" client client2
make_ca "$pki/other" "some other CA"
make_cert "$pki/other" "$pki/intruder" client intruder
mkdir -p "$pki/nocert" && cp "$pki/ca/ca-cert.pem" "$pki/nocert/"   # trusts the CA, no certificate
dn1="CN=client1,O=fleeced test,C=GB"
dn2="CN=client2,O=fleeced test,C=GB"
make_pattern_image "$tmpdir/disk0.img" 16M 0:64k 5M:8k 9M:1M
client() { bounded 60 "$PYTHON" "$interop_dir/py/tls_client.py" "$@"; }
uri() { printf 'nbds+unix:///disk0?socket=%s&tls-certificates=%s\n' "$1" "$2"; }
qemu_obj() { echo "tls-creds-x509,id=tls0,endpoint=client,dir=$1"; }
qemu_opts() { echo "driver=nbd,server.type=unix,server.path=$1,export=disk0,tls-creds=tls0,tls-hostname=localhost"; }

# ---- verify-peer off: any client that trusts the server's CA
open_sock=$tmpdir/open.sock
port=$(free_tcp_port)
start_fleeced --export "name=disk0,file=$tmpdir/disk0.img,writable=on" \
    --listen "unix:$open_sock" --listen "tcp:127.0.0.1:$port" --tls-creds "x509:$pki/server"
bounded 30 nbdinfo "$(uri "$open_sock" "$pki/nocert")" | grep -q "with TLS" ||
    fail "client without a certificate, verify-peer off"
expect_eq "$(bounded 30 nbdinfo --size "nbds://localhost:$port/disk0?tls-certificates=$pki/client1")" \
    16777216 "nbdinfo over TCP"
client roundtrip --tcp "127.0.0.1:$port" --certs "$pki/nocert" >/dev/null ||
    fail "python3-libnbd over TCP without a client certificate"
bounded 60 qemu-io --object "$(qemu_obj "$pki/client1")" --image-opts "$(qemu_opts "$open_sock")" \
    -c 'write -P 0x33 1M 4k' -c 'read -P 0x33 1M 4k' >/dev/null || fail "qemu-io over TLS"
bounded 60 qemu-img info --object "$(qemu_obj "$pki/client1")" \
    --image-opts "driver=nbd,server.type=inet,server.host=localhost,server.port=$port,export=disk0,tls-creds=tls0" \
    >/dev/null || fail "qemu-img info over TCP"
# A client that does not trust our CA gives up; the server logs why. (Over
# TCP: libnbd 1.14 does not check the server certificate on unix sockets.)
client refused --tcp "127.0.0.1:$port" --certs "$pki/intruder" >/dev/null ||
    fail "a client with another CA accepted the server"
grep -q "closing: TLS handshake failed: " "$fleeced_log" || fail "no log line for the distrustful client"

# ---- verify-peer on: a certificate signed by the CA is required
sock=$tmpdir/verify.sock
start_fleeced --export "name=disk0,file=$tmpdir/disk0.img,writable=on" \
    --listen "unix:$sock" --tls-creds "x509:$pki/server,verify-peer=on"
grep -q "listening on unix:$sock (TLS required, x509:$pki/server verify-peer=on)" "$fleeced_log" ||
    fail "no TLS listening line"
sum=$(sha256 "$tmpdir/disk0.img")
bounded 60 nbdcopy "$(uri "$sock" "$pki/client1")" "$tmpdir/copy.img"
expect_eq "$(sha256 "$tmpdir/copy.img")" "$sum" "nbdcopy export -> file with a client certificate"
client roundtrip --socket "$sock" --certs "$pki/client2" >/dev/null || fail "python3-libnbd as client2"
bounded 60 qemu-io --object "$(qemu_obj "$pki/client2")" --image-opts "$(qemu_opts "$sock")" \
    -c 'write -P 0x44 3M 64k' -c 'read -P 0x44 3M 64k' >/dev/null || fail "qemu-io with a client cert"
sum=$(sha256 "$tmpdir/disk0.img")
bounded 60 qemu-img convert -O raw --object "$(qemu_obj "$pki/client1")" \
    --image-opts "driver=raw,file.$(qemu_opts "$sock" | sed 's/,/,file./g')" "$tmpdir/qcopy.img"
expect_eq "$(sha256 "$tmpdir/qcopy.img")" "$sum" "qemu-img convert with a client certificate"

client refused --socket "$sock" --certs "$pki/nocert" >/dev/null || fail "no client certificate accepted"
grep -q "closing: TLS handshake failed: peer did not return a certificate" "$fleeced_log" ||
    fail "no log line for the missing client certificate"
mkdir -p "$pki/mixed" && cp "$pki/ca/ca-cert.pem" "$pki/mixed/" &&
    cp "$pki/intruder/client-cert.pem" "$pki/intruder/client-key.pem" "$pki/mixed/"
# GnuTLS sends no certificate that the server's list of CAs does not cover,
# so this is refused as "no certificate" (py/tls_raw.py sends one anyway).
client refused --socket "$sock" --certs "$pki/mixed" >/dev/null ||
    fail "a client certificate from another CA was accepted"
expect_eq "$(grep -c "closing: TLS handshake failed: peer did not return a certificate" "$fleeced_log")" \
    2 "log lines for the refused clients"
if bounded 30 qemu-img info --object "$(qemu_obj "$pki/nocert")" --image-opts "$(qemu_opts "$sock")" \
        >/dev/null 2>&1; then
    fail "qemu-img without a client certificate was served"
fi
expect_status 1 "plaintext nbdinfo" bounded 30 nbdinfo "nbd+unix:///disk0?socket=$sock" >/dev/null 2>&1
expect_eq "$(bounded 30 nbdinfo --size "$(uri "$sock" "$pki/client1")")" 16777216 "served after refusals"

# ---- --tls-authz: only client1's DN
authz_sock=$tmpdir/authz.sock
printf '# backup host\n%s\n' "$dn1" >"$tmpdir/allow.txt"
start_fleeced --export "name=disk0,file=$tmpdir/disk0.img" --listen "unix:$authz_sock" \
    --tls-creds "x509:$pki/server" --tls-authz "$tmpdir/allow.txt"
client refused --socket "$authz_sock" --plain >/dev/null || fail "plaintext client served"
bounded 30 nbdinfo --size "$(uri "$authz_sock" "$pki/client1")" >/dev/null || fail "client1 refused"
client refused --socket "$authz_sock" --certs "$pki/client2" >"$tmpdir/authz.out" ||
    fail "client2 was served despite the allow-list"
grep -q "TLS client '$dn2' is not authorized: refusing every option" "$fleeced_log" ||
    fail "no log line for client2"
# verify-peer is off here, but the allow-list needs a certificate.
client refused --socket "$authz_sock" --certs "$pki/nocert" >/dev/null || fail "anonymous client served"

# ---- the control socket: tls-creds-x509 (verify-peer defaults to on) and authz-list
qmp=$tmpdir/qmp.sock
qsock=$tmpdir/qmp-nbd.sock
start_fleeced --export "name=disk0,file=$tmpdir/disk0.img" --qmp "unix:$qmp"
ctl() { bounded 30 "$FLEECECTL" --timeout 20 -s "$qmp" "$@"; }
ctl_error() { # EXPECTED-DESC JSON
    local out
    if out=$(ctl raw "$2" 2>&1); then fail "expected an error from $2, got $out"; fi
    grep -qF "\"desc\": \"$1\"" <<<"$out" || fail "error for $2: $out (expected: $1)"
}
ctl_error "Unable to access credentials $pki/nocert/server-cert.pem: No such file or directory" \
    '{"execute": "object-add", "arguments": {"qom-type": "tls-creds-x509", "id": "tls0", "endpoint": "server", "dir": "'"$pki/nocert"'"}}'
ctl raw '{"execute": "object-add", "arguments": {"qom-type": "tls-creds-x509", "id": "tls0", "endpoint": "server", "dir": "'"$pki/server"'"}}' \
    >/dev/null || fail "object-add tls-creds-x509"
ctl raw '{"execute": "object-add", "arguments": {"qom-type": "tls-creds-x509", "id": "tlsc", "dir": "'"$pki/client1"'"}}' \
    >/dev/null || fail "object-add of client credentials"
ctl raw '{"execute": "object-add", "arguments": {"qom-type": "authz-list", "id": "auth0", "policy": "deny", "rules": [{"match": "'"$dn1"'", "policy": "allow"}]}}' \
    >/dev/null || fail "object-add authz-list"
start='{"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": "'"$qsock"'"}}, TLS}}'
ctl_error "Expecting TLS credentials with a server endpoint" "${start/TLS/\"tls-creds\": \"tlsc\"}"
ctl_error "Object with id 'auth0' is not TLS credentials" "${start/TLS/\"tls-creds\": \"auth0\"}"
ctl_error "tls-authz is not supported without tls-creds" "${start/TLS/\"tls-authz\": \"auth0\"}"
ctl raw "${start/TLS/\"tls-creds\": \"tls0\", \"tls-authz\": \"auth0\"}" >/dev/null ||
    fail "nbd-server-start with tls-creds and tls-authz"
ctl export add e0 disk0 --name qdisk >/dev/null || fail "block-export-add"
quri() { printf 'nbds+unix:///qdisk?socket=%s&tls-certificates=%s\n' "$qsock" "$1"; }
expect_eq "$(bounded 30 nbdinfo --size "$(quri "$pki/client1")")" 16777216 "client1 via QMP server"
expect_status 1 "client2 via QMP server" bounded 30 nbdinfo --size "$(quri "$pki/client2")" >/dev/null 2>&1
expect_status 1 "no certificate via QMP server (verify-peer defaults to on)" \
    bounded 30 nbdinfo --size "$(quri "$pki/nocert")" >/dev/null 2>&1

for pid in "${_fleeced_pids[@]}"; do fleeced_alive "$pid" || fail "fleeced $pid died"; done
echo "PASS: $test_name"

#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# STARTTLS at byte level (py/tls_raw.py, Python's ssl as the client):
# options negotiated in plaintext are forgotten after STARTTLS (structured
# replies, meta contexts), STARTTLS twice or with a payload is ERR_INVALID,
# the TLS-required refusals, bytes sent after STARTTLS before its reply,
# garbage instead of a ClientHello, and client certificates the server must
# refuse, while a python3-libnbd client keeps working on its own connection.
source "$(dirname "$0")/functions.sh"
requires certtool
requires_python_nbd

pki=$tmpdir/pki
make_ca "$pki/ca" "fleeced test CA"
make_cert "$pki/ca" "$pki/server" server localhost
make_cert "$pki/ca" "$pki/client1" client client1
make_ca "$pki/other" "some other CA"
make_cert "$pki/other" "$pki/intruder" client intruder
make_pattern_image "$tmpdir/disk0.img" 8M 0:1M 5M:64k
creds="x509:$pki/server,verify-peer=on"

start_fleeced --export "name=disk0,file=$tmpdir/disk0.img,writable=on" \
    --listen "unix:$tmpdir/on.sock" --tls-creds "$creds" --tls=on
on_log=$fleeced_log
start_fleeced --export "name=disk0,file=$tmpdir/disk0.img,writable=on" \
    --listen "unix:$tmpdir/req.sock" --tls-creds "$creds"
req_log=$fleeced_log

# A well-behaved client on the required server throughout.
touch "$tmpdir/dummy"
bounded 120 "$PYTHON" "$interop_dir/py/tls_client.py" hold --socket "$tmpdir/req.sock" \
    --certs "$pki/client1" --offset $((6 << 20)) \
    --ready "$tmpdir/ready" --stop "$tmpdir/stop" >"$tmpdir/hold.out" 2>&1 &
hold_pid=$!
cleanup_fn kill_quiet "$hold_pid"
for ((i = 0; i < 100; i++)); do [ -s "$tmpdir/ready" ] && break; sleep 0.1; done
[ -s "$tmpdir/ready" ] || fail "the libnbd client did not connect: $(cat "$tmpdir/hold.out")"

PYTHONPATH=$interop_dir/py bounded 120 "$PYTHON" "$interop_dir/py/tls_raw.py" \
    --on "$tmpdir/on.sock" --require "$tmpdir/req.sock" --image "$tmpdir/disk0.img" \
    --pki "$pki" || fail "py/tls_raw.py reported failures (see above)"

touch "$tmpdir/stop"
wait "$hold_pid" || fail "the libnbd client failed: $(cat "$tmpdir/hold.out")"

for line in "refusing NBD_OPT_GO: TLS is required (send NBD_OPT_STARTTLS first)" \
    "closing: NBD_OPT_EXPORT_NAME refused: TLS is required" \
    "closing: 16 bytes sent after NBD_OPT_STARTTLS before its reply" \
    "closing: TLS handshake failed: client certificate rejected: unable to get local issuer certificate" \
    "closing: TLS handshake failed: peer did not return a certificate"; do
    grep -qF "$line" "$req_log" || fail "no log line '$line'"
done
grep -qF "closing: TLS handshake failed: " "$req_log" || fail "no log line for the garbage handshake"
fleeced_alive "$fleeced_pid" || fail "fleeced died"
echo "PASS: $test_name"

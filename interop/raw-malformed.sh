#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Malformed input at byte level (py/malformed.py, control-api.md 7.3) while
# a libnbd client keeps reading and writing on its own connection.
source "$(dirname "$0")/functions.sh"
requires_python_nbd

sock=$tmpdir/nbd.sock
make_pattern_image "$tmpdir/disk0.img" 8M 0:8M
make_pattern_image "$tmpdir/ro.img" 1M 0:1M
truncate -s 80M "$tmpdir/big.img"
ro_sum=$(sha256 "$tmpdir/ro.img")

start_fleeced \
    --export "name=disk0,file=$tmpdir/disk0.img,writable=on" \
    --export "name=ro,file=$tmpdir/ro.img" \
    --export "name=big,file=$tmpdir/big.img,writable=on" \
    --listen "unix:$sock"

bounded 240 "$PYTHON" "$interop_dir/py/malformed.py" \
    --socket "$sock" --image "$tmpdir/disk0.img" \
    ${MALFORMED_ONLY:+--only "$MALFORMED_ONLY"} ||
    fail "py/malformed.py reported failures (see above)"

expect_eq "$(sha256 "$tmpdir/ro.img")" "$ro_sum" "ro.img unchanged"
expect_eq "$(du -k "$tmpdir/big.img" | cut -f1)" 0 "big.img still unallocated"
fleeced_alive "$fleeced_pid" || fail "fleeced died"
echo "PASS: $test_name"

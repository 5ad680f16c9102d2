#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Every command, flag and error code through python3-libnbd (py/commands.py):
# odd offsets/lengths, FUA, flush, trim, zero (NO_HOLE, FAST_ZERO), cache,
# block status (REQ_ONE), structured reads (holes, DF), errors with the
# connection still usable, pipelining, multi-conn, and --stdin mode.
source "$(dirname "$0")/functions.sh"
requires_python_nbd

sock=$tmpdir/nbd.sock
ro_islands="0:64k 1M:64k 2101248:8k"
make_pattern_image "$tmpdir/disk0.img" 40M 0:64k 1M:4k 3M:1M 39M:1M
make_pattern_image "$tmpdir/ro.img" 4M $ro_islands
make_pattern_image "$tmpdir/stdin.img" 2M 0:4k
ro_sum=$(sha256 "$tmpdir/ro.img")

start_fleeced \
    --export "name=disk0,file=$tmpdir/disk0.img,writable=on" \
    --export "name=disk0-ro,file=$tmpdir/disk0.img" \
    --export "name=ro,file=$tmpdir/ro.img" \
    --export "name=ro-direct,file=$tmpdir/ro.img,direct=on" \
    --listen "unix:$sock"

bounded 240 "$PYTHON" "$interop_dir/py/commands.py" \
    --socket "$sock" \
    --disk-image "$tmpdir/disk0.img" \
    --ro-image "$tmpdir/ro.img" --ro-islands "$ro_islands" \
    --stdin-image "$tmpdir/stdin.img" --fleeced "$FLEECED" \
    ${COMMANDS_ONLY:+--only "$COMMANDS_ONLY"} ||
    fail "py/commands.py reported failures (see above)"

expect_eq "$(sha256 "$tmpdir/ro.img")" "$ro_sum" "ro.img unchanged"
fleeced_alive "$fleeced_pid" || fail "fleeced died"
echo "PASS: $test_name"

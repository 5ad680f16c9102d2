#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# qemu-io through QEMU's NBD client: aligned/unaligned writes with patterns,
# aio writes, vectored I/O, FUA, write -z, discard, then the same patterns
# read back on a new connection and from the image file itself.
source "$(dirname "$0")/functions.sh"
requires qemu-io

sock=$tmpdir/nbd.sock
truncate -s 8M "$tmpdir/disk0.img"
make_pattern_image "$tmpdir/ro.img" 1M 0:64k
ro_sum=$(sha256 "$tmpdir/ro.img")
start_fleeced \
    --export "name=disk0,file=$tmpdir/disk0.img,writable=on" \
    --export "name=ro,file=$tmpdir/ro.img" \
    --listen "unix:$sock"
disk0=$(nbd_unix_uri disk0 "$sock")

# qio TARGET [qemu-io options] -- CMD...   every CMD must succeed and verify
qio() {
    local target=$1 opts=() cmds=()
    shift
    while [ "$1" != -- ]; do opts+=("$1"); shift; done
    shift
    for c in "$@"; do cmds+=(-c "$c"); done
    local st=0
    bounded 60 qemu-io -f raw "${opts[@]}" "${cmds[@]}" "$target" \
        >"$tmpdir/qio.out" 2>&1 || st=$?
    if [ $st != 0 ] || grep -qiE 'verification failed|error|failed|not permitted' "$tmpdir/qio.out"; then
        grep -v '^[0-9.]* [KMG]iB, [0-9]* ops' "$tmpdir/qio.out" | head -n 40 >&2 || true
        fail "qemu-io on $target exited $st for: $*"
    fi
}

written=(
    'read -P 0xab 0 1000'
    'read -P 0xcd 1000 3000'
    'read -P 0xab 4000 61536'
    'read -P 0x11 128k 32k'
    'read -P 0 160k 8k'
    'read -P 0x11 168k 24k'
    'read -P 0 192k 64k'
    'read -P 0x13 1048577 4095'
    'read -P 0 1048576 1'
    'read -P 0 1052672 1'
    'read -P 0x55 3M 512'
    'readv -P 0x66 4194303 511 1k 7 4096'
    'read -P 0 5M 1M'
)

qio "$disk0" -- \
    'write -P 0xab 0 64k' \
    'read -P 0xab 0 64k' \
    'write -P 0xcd 1000 3000' \
    'read -P 0xcd 1000 3000' \
    'read -P 0xab 0 1000' \
    'read -P 0xab 4000 61536' \
    'read -P 0xab 1 1' \
    'aio_write -P 0x11 128k 64k' \
    'aio_write -P 0x12 192k 64k' \
    'aio_write -P 0x13 1048577 4095' \
    'aio_flush' \
    'read -P 0x11 128k 64k' \
    'read -P 0x12 192k 64k' \
    'read -P 0x13 1048577 4095' \
    'write -z 160k 8k' \
    'write -z -u 192k 64k' \
    'write -P 0x44 2M 1M' \
    'discard 2M 1M' \
    'read 2M 1M' \
    'write -f -P 0x55 3M 512' \
    'writev -P 0x66 4194303 511 1k 7 4096' \
    'write -P 0x77 5M 1M' \
    'write -z -f 5M 1M' \
    'flush' \
    "${written[@]}"

# negative control: a wrong pattern must be detected
if bounded 60 qemu-io -f raw -c 'read -P 0xee 0 64k' "$disk0" >"$tmpdir/neg.out" 2>&1; then
    fail "qemu-io accepted a wrong pattern"
fi
grep -q 'Pattern verification failed' "$tmpdir/neg.out" ||
    fail "qemu-io negative control: $(cat "$tmpdir/neg.out")"

# a new connection, then the image file itself
qio "$disk0" -- "${written[@]}"
qio "$tmpdir/disk0.img" -r -- "${written[@]}"
expect_eq "$(stat -c %s "$tmpdir/disk0.img")" 8388608 "disk0.img size"

# read-only export: reads work, writes are refused
qio "$(nbd_unix_uri ro "$sock")" -r -- 'read -P 0 64k 64k' 'read -v 0 16'
if bounded 60 qemu-io -f raw -c 'write -P 0x99 0 512' "$(nbd_unix_uri ro "$sock")" \
        >"$tmpdir/ro.out" 2>&1 && ! grep -qiE 'error|denied|read-only|failed' "$tmpdir/ro.out"; then
    fail "write to read-only export through qemu-io succeeded: $(cat "$tmpdir/ro.out")"
fi
expect_eq "$(sha256 "$tmpdir/ro.img")" "$ro_sum" "ro.img unchanged"
fleeced_alive "$fleeced_pid" || fail "fleeced died"
echo "PASS: $test_name"

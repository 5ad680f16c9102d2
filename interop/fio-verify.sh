#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# fio's nbd engine (libnbd): random writes with crc32c verification, at
# iodepth 1 and 32, plus a mixed-size verified run and a verify-only re-read
# on a fresh connection.
source "$(dirname "$0")/functions.sh"
requires fio jq
if ! fio --enghelp=nbd 2>/dev/null >"$tmpdir/enghelp" || ! grep -q uri "$tmpdir/enghelp"; then
    skip "fio has no nbd engine"
fi

sock=$tmpdir/nbd.sock
truncate -s 64M "$tmpdir/disk0.img"
start_fleeced --export "name=disk0,file=$tmpdir/disk0.img,writable=on" \
    --listen "unix:$sock"
uri=$(nbd_unix_uri disk0 "$sock")

# run_fio NAME [fio options]: must exit 0 with no errors in the JSON report
run_fio() {
    local name=$1 st=0
    shift
    bounded 120 fio --name="$name" --ioengine=nbd --uri="$uri" \
        --verify_fatal=1 --output-format=json --output="$tmpdir/$name.json" \
        "$@" >"$tmpdir/$name.log" 2>&1 || st=$?
    if [ $st != 0 ]; then
        cat "$tmpdir/$name.log" >&2
        [ -s "$tmpdir/$name.json" ] && head -c 3000 "$tmpdir/$name.json" >&2
        fail "fio $name exited with status $st"
    fi
    if grep -qi 'verify.*\(bad\|fail\)\|bad magic\|crc32c: verify' "$tmpdir/$name.log"; then
        cat "$tmpdir/$name.log" >&2
        fail "fio $name reported verify errors"
    fi
    # the JSON may be preceded by notes; take from the first '{'
    sed -n '/^{/,$p' "$tmpdir/$name.json" >"$tmpdir/$name.clean.json"
    expect_eq "$(jq '[.jobs[].error] | add' "$tmpdir/$name.clean.json")" 0 "fio $name job error"
    local wrote
    wrote=$(jq '[.jobs[].write.io_bytes] | add' "$tmpdir/$name.clean.json")
    if [ "$want_write" = some ]; then
        [ "$wrote" -gt 0 ] || fail "fio $name wrote nothing"
    else
        expect_eq "$wrote" "$want_write" "fio $name bytes written"
    fi
    local verified
    verified=$(jq '[.jobs[].read.io_bytes] | add' "$tmpdir/$name.clean.json")
    [ "$verified" -gt 0 ] || fail "fio $name read (verified) nothing"
}

want_write=33554432 run_fio randwrite-qd1 \
    --rw=randwrite --bs=4k --size=32m --verify=crc32c --iodepth=1
want_write=33554432 run_fio randwrite-qd32 \
    --rw=randwrite --bs=4k --size=32m --offset=32m --verify=crc32c --iodepth=32
want_write=some run_fio mixed-sizes \
    --rw=randwrite --bsrange=512-64k --bs_unaligned=1 --size=16m --offset=8m \
    --verify=crc32c --verify_backlog=256 --iodepth=16 --randseed=99
# verify-only pass over what randwrite-qd32 wrote, on a new connection
# (fio counts the skipped writes as written)
reverify=(--rw=randwrite --bs=4k --size=32m --offset=32m --verify=crc32c
          --iodepth=8 --verify_only=1)
want_write=33554432 run_fio reverify "${reverify[@]}"

# negative control: corrupt one block behind the server's back; the same
# verify-only pass must now fail
printf 'corrupt' | dd of="$tmpdir/disk0.img" bs=1 seek=$((40 * 1048576 + 100)) \
    conv=notrunc status=none
if bounded 120 fio --name=corrupt --ioengine=nbd --uri="$uri" --verify_fatal=1 \
        "${reverify[@]}" >"$tmpdir/corrupt.log" 2>&1; then
    fail "fio did not detect a corrupted block (data not read from the image?)"
fi
fleeced_alive "$fleeced_pid" || fail "fleeced died"
echo "PASS: $test_name"

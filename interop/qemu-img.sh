#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# qemu-img (QEMU's NBD client) against fleeced: info, map, compare, convert
# from an export, and convert into a writable export (URI and image-opts).
source "$(dirname "$0")/functions.sh"
requires qemu-img

sock=$tmpdir/nbd.sock
size=16777216
make_pattern_image "$tmpdir/src.img" $size 0:64k 5M:8k 9M:1M 16380k:4k
src_sum=$(sha256 "$tmpdir/src.img")
cp --sparse=always "$tmpdir/src.img" "$tmpdir/other.img"
printf 'X' | dd of="$tmpdir/other.img" bs=1 seek=$((9 * 1048576 + 4097)) conv=notrunc status=none
for d in uri opts; do
    head -c $size /dev/urandom >"$tmpdir/dst-$d.img"   # junk to overwrite
done

start_fleeced \
    --export "name=src,file=$tmpdir/src.img" \
    --export "name=other,file=$tmpdir/other.img" \
    --export "name=dst-uri,file=$tmpdir/dst-uri.img,writable=on" \
    --export "name=dst-opts,file=$tmpdir/dst-opts.img,writable=on" \
    --listen "unix:$sock"
uri() { nbd_unix_uri "$1" "$sock"; }
opts() { echo "driver=raw,file.driver=nbd,file.server.type=unix,file.server.path=$sock,file.export=$1"; }

# ---- info
bounded 30 qemu-img info --output=json "$(uri src)" >"$tmpdir/info.json"
expect_eq "$(jq -r '.["virtual-size"]' "$tmpdir/info.json" 2>/dev/null ||
             sed -n 's/.*"virtual-size": \([0-9]*\).*/\1/p' "$tmpdir/info.json")" \
    $size "qemu-img info virtual-size"
bounded 30 qemu-img info "$(uri src)" >"$tmpdir/info.txt"
grep -qx "virtual size: 16 MiB ($size bytes)" "$tmpdir/info.txt" ||
    fail "qemu-img info text: $(cat "$tmpdir/info.txt")"

# ---- map (block status through QEMU's client), literal
bounded 30 qemu-img map --output=json -f raw "$(uri src)" >"$tmpdir/map.out"
cat >"$tmpdir/map.expected" <<'EOT'
[{ "start": 0, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true, "offset": 0},
{ "start": 65536, "length": 5177344, "depth": 0, "present": true, "zero": true, "data": false, "offset": 65536},
{ "start": 5242880, "length": 8192, "depth": 0, "present": true, "zero": false, "data": true, "offset": 5242880},
{ "start": 5251072, "length": 4186112, "depth": 0, "present": true, "zero": true, "data": false, "offset": 5251072},
{ "start": 9437184, "length": 1048576, "depth": 0, "present": true, "zero": false, "data": true, "offset": 9437184},
{ "start": 10485760, "length": 6287360, "depth": 0, "present": true, "zero": true, "data": false, "offset": 10485760},
{ "start": 16773120, "length": 4096, "depth": 0, "present": true, "zero": false, "data": true, "offset": 16773120}]
EOT
expect_file_eq "$tmpdir/map.out" "$tmpdir/map.expected" "qemu-img map --output=json"

# ---- compare: equal image is equal (0), a one-byte difference is found (1)
expect_status 0 "qemu-img compare src.img vs export src" \
    bounded 60 qemu-img compare -f raw -F raw "$tmpdir/src.img" "$(uri src)"
expect_status 0 "qemu-img compare -s (strict) src.img vs export src" \
    bounded 60 qemu-img compare -q -s -f raw -F raw "$tmpdir/src.img" "$(uri src)"
expect_status 1 "qemu-img compare src.img vs export other (one byte differs)" \
    bounded 60 qemu-img compare -q -f raw -F raw "$tmpdir/src.img" "$(uri other)"
bounded 60 qemu-img compare -f raw -F raw "$tmpdir/src.img" "$(uri other)" \
    >"$tmpdir/cmp.out" 2>&1 || true
grep -q "Content mismatch at offset 9441280!" "$tmpdir/cmp.out" ||
    fail "qemu-img compare did not report the mismatch offset: $(cat "$tmpdir/cmp.out")"

# ---- convert from the export to a local file
bounded 60 qemu-img convert -f raw -O raw "$(uri src)" "$tmpdir/out.img"
expect_eq "$(sha256 "$tmpdir/out.img")" "$src_sum" "convert export -> file: sha256"
bounded 60 qemu-img convert -W -m 16 -f raw -O raw "$(uri src)" "$tmpdir/out2.img"
expect_eq "$(sha256 "$tmpdir/out2.img")" "$src_sum" "convert -W -m 16 export -> file: sha256"

# ---- convert into writable exports (-n: target exists), URI and image-opts
bounded 60 qemu-img convert -n -f raw -O raw "$tmpdir/src.img" "$(uri dst-uri)"
bounded 60 qemu-img convert -n -W -m 8 -f raw --target-image-opts \
    "$tmpdir/src.img" "$(opts dst-opts)"
for d in uri opts; do
    expect_status 0 "qemu-img compare src.img vs export dst-$d" \
        bounded 60 qemu-img compare -q -f raw -F raw "$tmpdir/src.img" "$(uri dst-$d)"
    expect_eq "$(sha256 "$tmpdir/dst-$d.img")" "$src_sum" "dst-$d.img after convert"
done

# ---- export -> export
bounded 60 qemu-img convert -n -f raw -O raw "$(uri other)" "$(uri dst-uri)"
expect_eq "$(sha256 "$tmpdir/dst-uri.img")" "$(sha256 "$tmpdir/other.img")" \
    "dst-uri.img after export -> export convert"

# ---- writing to a read-only export fails cleanly
if bounded 60 qemu-img convert -n -f raw -O raw "$tmpdir/other.img" "$(uri src)" \
        >"$tmpdir/ro.out" 2>&1; then
    fail "qemu-img convert into a read-only export succeeded"
fi
expect_eq "$(sha256 "$tmpdir/src.img")" "$src_sum" "src.img unchanged"
fleeced_alive "$fleeced_pid" || fail "fleeced died"
echo "PASS: $test_name"

#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# nbdcopy export -> file and file -> writable export (and export -> export)
# with default, 4 and 1 connections; sha256 compared both ways.  The image is
# 64 MiB of random islands between holes; destinations start filled with other
# random data so holes must really be written as zeroes.
source "$(dirname "$0")/functions.sh"
requires nbdcopy sha256sum

sock=$tmpdir/nbd.sock
make_random_image "$tmpdir/src.img" 64M 4242
want=$(sha256 "$tmpdir/src.img")
exports=(--export "name=src,file=$tmpdir/src.img")
variants=(default 4 1 big noext nbd)
for v in "${variants[@]}"; do
    # non-sparse junk, so that every hole of src has to be zeroed
    head -c 64M /dev/urandom >"$tmpdir/dst-$v.img"
    exports+=(--export "name=dst-$v,file=$tmpdir/dst-$v.img,writable=on")
done
start_fleeced "${exports[@]}" --listen "unix:$sock"
src_uri=$(nbd_unix_uri src "$sock")

conn_opts() {
    case $1 in
        default) ;;
        4) echo --connections=4 ;;
        1) echo --connections=1 ;;
        big) echo --connections=2 --request-size=33554432 ;;
        noext) echo --no-extents --request-size=65536 ;;
        nbd) ;;
    esac
}

for v in "${variants[@]}"; do
    opts=$(conn_opts $v)
    dst_uri=$(nbd_unix_uri "dst-$v" "$sock")

    # export -> local file
    rm -f "$tmpdir/out.img"
    bounded 60 nbdcopy $opts "$src_uri" "$tmpdir/out.img" ||
        fail "nbdcopy $opts export -> file failed"
    expect_eq "$(sha256 "$tmpdir/out.img")" "$want" "nbdcopy $opts src -> file: sha256"

    # local file -> writable export (export -> export for 'nbd')
    if [ $v = nbd ]; then
        bounded 60 nbdcopy --flush "$src_uri" "$dst_uri" ||
            fail "nbdcopy export -> export failed"
    else
        bounded 60 nbdcopy --flush $opts "$tmpdir/src.img" "$dst_uri" ||
            fail "nbdcopy $opts file -> export failed"
    fi
    expect_eq "$(stat -c %s "$tmpdir/dst-$v.img")" 67108864 "dst-$v size"
    expect_eq "$(sha256 "$tmpdir/dst-$v.img")" "$want" "nbdcopy $opts -> dst-$v: sha256 of the image file"

    # and read it back through the server
    rm -f "$tmpdir/back.img"
    bounded 60 nbdcopy $opts "$dst_uri" "$tmpdir/back.img" ||
        fail "nbdcopy $opts dst-$v -> file failed"
    expect_eq "$(sha256 "$tmpdir/back.img")" "$want" "nbdcopy $opts dst-$v -> file: sha256"
done

# the source image was served read-only and must be untouched
expect_eq "$(sha256 "$tmpdir/src.img")" "$want" "src.img unchanged"
fleeced_alive "$fleeced_pid" || fail "fleeced died"
echo "PASS: $test_name"

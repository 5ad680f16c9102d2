#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# `fleece-backup pull` from a server that is not fleeced: qemu-storage-daemon
# exporting a raw image over NBD (unix socket), driven through its QMP
# monitor with fleecectl.
#   1. bitmap b0 added on node d (recording); a full pull of the writable
#      export into a new file equals the image; the report's bytes_pulled +
#      bytes_zeroed == virtual_size... minus holes: checked against nbdinfo.
#   2. writes, write-zeroes and an unaligned write through the export
#      (qemu-io); b0 is disabled (QEMU exports a bitmap only when it is
#      disabled or the export read-only) and a second, read-only export
#      publishes qemu:dirty-bitmap:b0; `pull --bitmap b0` into a copy of the
#      full pull equals the current image; the report's bytes_pulled +
#      bytes_zeroed == dirty_bytes == b0's count in query-named-block-nodes;
#      the same pull (full context name) into a copy of the current image
#      leaves it equal.
#   3. --bitmap with a target that does not exist is a usage error (2);
#      a bitmap the export does not publish fails (1).
source "$(dirname "$0")/functions.sh"
requires qemu-storage-daemon qemu-io qemu-img nbdinfo jq cmp
requires_backup_tools

size=$((96 * 1048576))
img=$tmpdir/disk.img
qmp=$tmpdir/qsd-qmp.sock
sock=$tmpdir/qsd-nbd.sock
make_random_image "$img" $size 31337

bounded 10 qemu-storage-daemon \
    --chardev "socket,path=$qmp,server=on,wait=off,id=m" --monitor chardev=m \
    --blockdev "driver=file,filename=$img,node-name=f" \
    --blockdev driver=raw,file=f,node-name=d \
    --nbd-server "addr.type=unix,addr.path=$sock" \
    --export type=nbd,id=e,node-name=d,name=disk,writable=on \
    --pidfile "$tmpdir/qsd.pid" --daemonize </dev/null >"$tmpdir/qsd.log" 2>&1 ||
    fail "qemu-storage-daemon did not start: $(cat "$tmpdir/qsd.log")"
qsd_pid=$(cat "$tmpdir/qsd.pid")
cleanup_fn kill_quiet "$qsd_pid"

ctl() { bounded 30 "$FLEECECTL" -s "$qmp" --timeout 20 "$@"; }
pull() { bounded 120 "$FLEECE_BACKUP" pull "$@"; }
live="nbd+unix:///disk?socket=$sock"

# ---- 1. full pull
ctl bitmap add d b0 --granularity 65536 >/dev/null || fail "block-dirty-bitmap-add on qsd"
pull --from "$live" --into "$tmpdir/full.raw" --json >"$tmpdir/r1.json" || fail "full pull failed"
bounded 60 qemu-img compare -q -f raw -F raw "$tmpdir/full.raw" "$img" || fail "full pull != image"
cmp "$tmpdir/full.raw" "$img" >&2 || fail "cmp: full pull != image"
expect_eq "$(jq -r '.event + " " + (.virtual_size|tostring)' "$tmpdir/r1.json")" "pull $size" "full report"
data=$(bounded 30 nbdinfo --map --totals "$live" | awk '$3 == 0 { s += $1 } END { print s + 0 }')
[ "$data" -gt 0 ] || fail "nbdinfo sees no data"
expect_eq "$(jq .bytes_pulled "$tmpdir/r1.json")" "$data" "full pull: bytes_pulled vs nbdinfo's data total"
expect_eq "$(jq 'has("dirty_bytes")' "$tmpdir/r1.json")" false "full pull report has no dirty_bytes"

# ---- 2. changes, then an incremental pull through the bitmap
bounded 60 qemu-io -f raw "$live" -c 'write -P 0x11 1M 100k' -c 'write -z 10M 1M' \
    -c 'write -P 3 40000 1' -c 'write -P 0x99 95M 1M' -c 'write -P 0x42 50M 3M' >/dev/null ||
    fail "qemu-io writes"
ctl bitmap disable d b0 >/dev/null || fail "block-dirty-bitmap-disable"
ctl --json bitmaps d >"$tmpdir/q.json"
count=$(jq '.return[] | ."dirty-bitmaps"[]? | select(.name == "b0") | .count' "$tmpdir/q.json")
# granules: 0, 16-17, 160-175, 1520-1535, 800-847
expect_eq "$count" $(((1 + 2 + 16 + 16 + 48) << 16)) "b0 count on qsd"
ctl export add e2 d --name bm --bitmap b0 >/dev/null || fail "block-export-add with bitmap b0"
cp --sparse=always "$tmpdir/full.raw" "$tmpdir/copy.raw"
pull --from "nbd+unix:///bm?socket=$sock" --bitmap b0 --into "$tmpdir/copy.raw" --json \
    >"$tmpdir/r2.json" || fail "bitmap pull failed"
bounded 60 qemu-img compare -q -f raw -F raw "$tmpdir/copy.raw" "$img" ||
    fail "bitmap pull into the copy != current image"
cmp "$tmpdir/copy.raw" "$img" >&2 || fail "cmp: bitmap pull != image"
pulled=$(jq .bytes_pulled "$tmpdir/r2.json")
zeroed=$(jq .bytes_zeroed "$tmpdir/r2.json")
expect_eq "$(jq .dirty_bytes "$tmpdir/r2.json")" "$count" "bitmap pull: dirty_bytes vs b0 count"
expect_eq $((pulled + zeroed)) "$count" "bitmap pull: bytes_pulled + bytes_zeroed"
[ "$zeroed" -ge $((1 << 20)) ] || fail "bitmap pull: the zeroed 1 MiB was not zeroed ($zeroed)"
cp --sparse=always "$img" "$tmpdir/again.raw"
pull --from "nbd+unix:///bm?socket=$sock" --bitmap qemu:dirty-bitmap:b0 --into "$tmpdir/again.raw" \
    -q || fail "bitmap pull with a full context name"
cmp "$tmpdir/again.raw" "$img" >&2 || fail "second bitmap pull changed the image copy"

# ---- 3. refusals
st=0
pull --from "nbd+unix:///bm?socket=$sock" --bitmap b0 --into "$tmpdir/none.raw" \
    2>"$tmpdir/err.txt" || st=$?
expect_eq "$st" 2 "bitmap pull into a missing file"
[ ! -e "$tmpdir/none.raw" ] || fail "bitmap pull created the missing target"
st=0
pull --from "nbd+unix:///bm?socket=$sock" --bitmap nope --into "$tmpdir/copy.raw" \
    2>"$tmpdir/err.txt" || st=$?
expect_eq "$st" 1 "bitmap pull of an unpublished bitmap"
grep -q "nope" "$tmpdir/err.txt" || fail "no mention of the bitmap: $(cat "$tmpdir/err.txt")"
cmp "$tmpdir/copy.raw" "$img" >&2 || fail "a failed pull changed its target"

ctl raw '{"execute":"quit"}' >/dev/null 2>&1 || true
wait_exit "$qsd_pid" 5 || true
echo "PASS: $test_name"

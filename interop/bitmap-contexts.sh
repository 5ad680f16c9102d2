#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Dirty bitmaps as NBD meta contexts (control-api.md 3.6, 3.7, 3.8, 7.2):
# bitmaps of 4 KiB, 64 KiB (default) and 1 MiB granularity on a writable
# command-line disk whose size is no multiple of any of them; unaligned
# writes, a write across granule boundaries, write_zeroes, trim with
# discard unmap (command line discard=on, blockdev-add "unmap") and ignore
# (blockdev-add default), a write to the last byte; the bitmaps exported
# with block-export-add.  Checked with literal expected output:
#   - nbdinfo --map=qemu:dirty-bitmap:NAME (and --totals),
#   - qemu-img map --output=json with x-dirty-bitmap (dirty = data false),
#   - python3-libnbd block status with base:allocation and two bitmaps in
#     one call, REQ_ONE, mid-granule sub-ranges (py/bitmap_contexts.py),
#   - LIST_META_CONTEXT / SET_META_CONTEXT query rules,
#   - count in query-named-block-nodes / fleecectl bitmaps.
source "$(dirname "$0")/functions.sh"
requires nbdinfo qemu-img
requires_python_nbd
: "${FLEECECTL:=$(dirname "${FLEECED:-.}")/fleecectl}"
[ -x "$FLEECECTL" ] || skip "FLEECECTL=$FLEECECTL is not executable"

size=8393728                    # 8 MiB + 5120
qmp=$tmpdir/qmp.sock            # --qmp
cl_sock=$tmpdir/cl.sock         # --listen (command-line export disk0)
sock=$tmpdir/nbd.sock           # nbd-server-start (QMP exports)
truncate -s $size "$tmpdir/a.img"
make_pattern_image "$tmpdir/ign.img" 2M 0:2M
make_pattern_image "$tmpdir/unm.img" 2M 0:2M

start_fleeced \
    --export "name=disk0,file=$tmpdir/a.img,writable=on" \
    --listen "unix:$cl_sock" --qmp "unix:$qmp"

ctl() { bounded 30 "$FLEECECTL" --timeout 20 -s "$qmp" "$@"; }
py() {
    bounded 120 "$PYTHON" "$interop_dir/py/bitmap_contexts.py" "$1" \
        --qmp "$qmp" --sock "$sock" --cl-sock "$cl_sock" \
        --ign-image "$tmpdir/ign.img" --unm-image "$tmpdir/unm.img"
}

# ---- 1. bitmaps, export errors, exports, writes (see py/bitmap_contexts.py)
py setup || fail "py/bitmap_contexts.py setup reported failures (see above)"

# ---- 6. count = dirty bytes inside the disk = the sum of the dirty extents
# of the map (control-api 3.8/6.1): the partial last granule (written at the
# last byte) counts up to the end of the disk.  b4m (4 MiB, not exported) has
# all three granules dirty: the whole disk.
# The order of nodes and of bitmaps in a node is unspecified: compare sorted.
expect_table_eq() {
    sort "$1" >"$1.sorted"
    sort "$2" >"$2.sorted"
    expect_file_eq "$1.sorted" "$2.sorted" "$3"
}
ctl bitmaps disk0 >"$tmpdir/bitmaps.out" || fail "fleecectl bitmaps disk0 failed"
cat >"$tmpdir/bitmaps.expected" <<'EOT'
NODE   BITMAP  GRANULARITY  COUNT    RECORDING  BUSY  PERSISTENT
disk0  b64k    65536        398336   yes        yes   no
disk0  b4k     4096         95232    yes        yes   no
disk0  b1m     1048576      4199424  yes        yes   no
disk0  bdis    65536        0        no         yes   no
disk0  b4m     4194304      8393728  yes        no    no
EOT
expect_table_eq "$tmpdir/bitmaps.out" "$tmpdir/bitmaps.expected" "fleecectl bitmaps disk0"
ctl bitmaps >"$tmpdir/allbitmaps.out" || fail "fleecectl bitmaps failed"
cat >"$tmpdir/allbitmaps.expected" <<'EOT'
NODE   BITMAP  GRANULARITY  COUNT    RECORDING  BUSY  PERSISTENT
disk0  b64k    65536        398336   yes        yes   no
disk0  b4k     4096         95232    yes        yes   no
disk0  b1m     1048576      4199424  yes        yes   no
disk0  bdis    65536        0        no         yes   no
disk0  b4m     4194304      8393728  yes        no    no
ign    bi      65536        65536    yes        yes   no
unm    bu      65536        196608   yes        yes   no
EOT
expect_table_eq "$tmpdir/allbitmaps.out" "$tmpdir/allbitmaps.expected" "fleecectl bitmaps"

# ---- 2. nbdinfo --map=qemu:dirty-bitmap:NAME
check_map() {
    local export=$1 opt=$2
    bounded 30 nbdinfo $opt "$(nbd_unix_uri "$export" "$sock")" >"$tmpdir/map.out" ||
        fail "nbdinfo $opt $export failed"
    cat >"$tmpdir/map.expected"
    expect_file_eq "$tmpdir/map.out" "$tmpdir/map.expected" "nbdinfo $opt $export"
}

check_map live --map=qemu:dirty-bitmap:b4k <<'EOT'
         0        4096    1  dirty
      4096      192512    0  clean
    196608        4096    1  dirty
    200704      843776    0  clean
   1044480        8192    1  dirty
   1052672     2093056    0  clean
   3145728       12288    1  dirty
   3158016     2084864    0  clean
   5242880       65536    1  dirty
   5308416     3084288    0  clean
   8392704        1024    1  dirty
EOT
check_map live --map=qemu:dirty-bitmap:b64k <<'EOT'
         0       65536    1  dirty
     65536      131072    0  clean
    196608       65536    1  dirty
    262144      720896    0  clean
    983040      131072    1  dirty
   1114112     2031616    0  clean
   3145728       65536    1  dirty
   3211264     2031616    0  clean
   5242880       65536    1  dirty
   5308416     3080192    0  clean
   8388608        5120    1  dirty
EOT
check_map live --map=qemu:dirty-bitmap:b1m <<'EOT'
         0     2097152    1  dirty
   2097152     1048576    0  clean
   3145728     1048576    1  dirty
   4194304     1048576    0  clean
   5242880     1048576    1  dirty
   6291456     2097152    0  clean
   8388608        5120    1  dirty
EOT
check_map live '--map=qemu:dirty-bitmap:b64k --totals' <<'EOT'
   7995392  95.3%   0 clean
    398336   4.7%   1 dirty
EOT
check_map ro --map=qemu:dirty-bitmap:bdis <<'EOT'
         0     8393728    0  clean
EOT
check_map ign --map=qemu:dirty-bitmap:bi <<'EOT'
         0     1048576    0  clean
   1048576       65536    1  dirty
   1114112      983040    0  clean
EOT
check_map unm --map=qemu:dirty-bitmap:bu <<'EOT'
         0       65536    0  clean
     65536       65536    1  dirty
    131072      917504    0  clean
   1048576      131072    1  dirty
   1179648      917504    0  clean
EOT
# a bitmap of the node that this export does not carry is not offered
for bad in "live qemu:dirty-bitmap:bdis" "ro qemu:dirty-bitmap:b4k" \
           "live qemu:dirty-bitmap:nope"; do
    set -- $bad
    if bounded 30 nbdinfo --map="$2" "$(nbd_unix_uri "$1" "$sock")" \
            >"$tmpdir/bad.out" 2>&1; then
        fail "nbdinfo --map=$2 on export $1 succeeded: $(cat "$tmpdir/bad.out")"
    fi
done
if bounded 30 nbdinfo --map=qemu:dirty-bitmap:b4k "$(nbd_unix_uri disk0 "$cl_sock")" \
        >"$tmpdir/bad.out" 2>&1; then
    fail "command-line export disk0 offers qemu:dirty-bitmap:b4k: $(cat "$tmpdir/bad.out")"
fi

# ---- 3. qemu-img map with x-dirty-bitmap: QEMU's client reads the bitmap
# context in place of base:allocation, so dirty (1 = "hole") shows as
# data false / present false and clean as data true.
qemu_map() {
    local export=$1 bitmap=$2
    bounded 30 qemu-img map --output=json --image-opts \
        "driver=nbd,server.type=unix,server.path=$sock,export=$export,x-dirty-bitmap=qemu:dirty-bitmap:$bitmap" \
        >"$tmpdir/qmap.out" || fail "qemu-img map $export $bitmap failed"
    cat >"$tmpdir/qmap.expected"
    expect_file_eq "$tmpdir/qmap.out" "$tmpdir/qmap.expected" \
        "qemu-img map x-dirty-bitmap=qemu:dirty-bitmap:$bitmap ($export)"
}
qemu_map live b64k <<'EOT'
[{ "start": 0, "length": 65536, "depth": 0, "present": false, "zero": false, "data": false},
{ "start": 65536, "length": 131072, "depth": 0, "present": true, "zero": false, "data": true, "offset": 65536},
{ "start": 196608, "length": 65536, "depth": 0, "present": false, "zero": false, "data": false},
{ "start": 262144, "length": 720896, "depth": 0, "present": true, "zero": false, "data": true, "offset": 262144},
{ "start": 983040, "length": 131072, "depth": 0, "present": false, "zero": false, "data": false},
{ "start": 1114112, "length": 2031616, "depth": 0, "present": true, "zero": false, "data": true, "offset": 1114112},
{ "start": 3145728, "length": 65536, "depth": 0, "present": false, "zero": false, "data": false},
{ "start": 3211264, "length": 2031616, "depth": 0, "present": true, "zero": false, "data": true, "offset": 3211264},
{ "start": 5242880, "length": 65536, "depth": 0, "present": false, "zero": false, "data": false},
{ "start": 5308416, "length": 3080192, "depth": 0, "present": true, "zero": false, "data": true, "offset": 5308416},
{ "start": 8388608, "length": 5120, "depth": 0, "present": false, "zero": false, "data": false}]
EOT
qemu_map live b4k <<'EOT'
[{ "start": 0, "length": 4096, "depth": 0, "present": false, "zero": false, "data": false},
{ "start": 4096, "length": 192512, "depth": 0, "present": true, "zero": false, "data": true, "offset": 4096},
{ "start": 196608, "length": 4096, "depth": 0, "present": false, "zero": false, "data": false},
{ "start": 200704, "length": 843776, "depth": 0, "present": true, "zero": false, "data": true, "offset": 200704},
{ "start": 1044480, "length": 8192, "depth": 0, "present": false, "zero": false, "data": false},
{ "start": 1052672, "length": 2093056, "depth": 0, "present": true, "zero": false, "data": true, "offset": 1052672},
{ "start": 3145728, "length": 12288, "depth": 0, "present": false, "zero": false, "data": false},
{ "start": 3158016, "length": 2084864, "depth": 0, "present": true, "zero": false, "data": true, "offset": 3158016},
{ "start": 5242880, "length": 65536, "depth": 0, "present": false, "zero": false, "data": false},
{ "start": 5308416, "length": 3084288, "depth": 0, "present": true, "zero": false, "data": true, "offset": 5308416},
{ "start": 8392704, "length": 1024, "depth": 0, "present": false, "zero": false, "data": false}]
EOT
qemu_map live b1m <<'EOT'
[{ "start": 0, "length": 2097152, "depth": 0, "present": false, "zero": false, "data": false},
{ "start": 2097152, "length": 1048576, "depth": 0, "present": true, "zero": false, "data": true, "offset": 2097152},
{ "start": 3145728, "length": 1048576, "depth": 0, "present": false, "zero": false, "data": false},
{ "start": 4194304, "length": 1048576, "depth": 0, "present": true, "zero": false, "data": true, "offset": 4194304},
{ "start": 5242880, "length": 1048576, "depth": 0, "present": false, "zero": false, "data": false},
{ "start": 6291456, "length": 2097152, "depth": 0, "present": true, "zero": false, "data": true, "offset": 6291456},
{ "start": 8388608, "length": 5120, "depth": 0, "present": false, "zero": false, "data": false}]
EOT

# ---- 4./5. block status and meta-context negotiation through libnbd
py check || fail "py/bitmap_contexts.py check reported failures (see above)"

# reading never dirtied anything: counts unchanged after all the above
ctl bitmaps disk0 >"$tmpdir/bitmaps.out" || fail "fleecectl bitmaps disk0 failed"
expect_table_eq "$tmpdir/bitmaps.out" "$tmpdir/bitmaps.expected" \
    "fleecectl bitmaps disk0 after the read-only checks"

# the last byte reached the file
expect_eq "$(tail -c 1 "$tmpdir/a.img")" Z "last byte of a.img"
fleeced_alive "$fleeced_pid" || fail "fleeced died"
echo "PASS: $test_name"

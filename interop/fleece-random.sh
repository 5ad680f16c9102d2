#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Randomized concurrency test of a fleece (control-api.md 5.2, 7.3, 9.2),
# bounded: a disk with known random content (data islands, holes, runs of
# allocated zeroes, an odd tail) gets a flavour-B fleece with bitmap
# rotation b0 -> b1; then, at the same time,
#   - 3 writers on the live disk (the command-line export and a QMP export
#     "live") do random write / write_zeroes (may trim, NO_HOLE, FUA) /
#     trim / flush at unaligned offsets, up to 3 clusters long, many of
#     them in a few shared "hot" clusters, with requests in flight;
#   - 3 readers on the fleece, 2 connections each (multi-conn), do random
#     reads of 1 byte .. 1 MiB at any alignment and block status;
# every fleece read must be the initial image and every base:allocation
# extent the initial allocation; afterwards the live export must equal the
# model of the live disk (well defined: writers never have overlapping
# requests in flight), a full fleece read the initial image, nbdinfo --map
# of the fleece the initial map, b1 exactly the written granules.  Then the
# flavour-B teardown leaves no job, node or export behind.
# Scale with FLEECE_RANDOM_OPS (default 8000 writer ops + 8000 reader ops),
# seed the choices with FLEECE_RANDOM_SEED (printed).
# See py/fleece_random.py.
source "$(dirname "$0")/functions.sh"
requires nbdinfo cp cmp dd
requires_python_nbd

size=$((48 * 1048576 + 3333))   # not a multiple of the 64 KiB cluster
qmp=$tmpdir/qmp.sock            # --qmp
cl_sock=$tmpdir/cl.sock         # --listen (command-line export disk0)
sock=$tmpdir/nbd.sock           # nbd-server-start (fleece and live exports)
img=$tmpdir/disk.img
ref=$tmpdir/ref.img

make_random_image "$img" $size "${FLEECE_RANDOM_SEED:-4242}"
# runs of allocated zeroes, one unaligned, one across the end
dd if=/dev/zero of="$img" bs=64k seek=64 count=16 conv=notrunc status=none
dd if=/dev/zero of="$img" bs=512 seek=$((20 * 2048 + 1)) count=700 \
    conv=notrunc status=none
dd if=/dev/zero of="$img" bs=1 seek=$((size - 70000)) count=70000 \
    conv=notrunc status=none 2>/dev/null
expect_eq "$(stat -c %s "$img")" "$size" "image size"
cp --sparse=always "$img" "$ref"

start_fleeced \
    --export "name=disk0,file=$img,writable=on,discard=on" \
    --listen "unix:$cl_sock" --qmp "unix:$qmp"

: "${FLEECE_RANDOM_SECONDS:=100}"
export FLEECE_RANDOM_SECONDS
py() {
    local limit=60
    [ "$1" = run ] && limit=$((2 * ${FLEECE_RANDOM_SECONDS%.*} + 80))
    bounded "$limit" "$PYTHON" "$interop_dir/py/fleece_random.py" "$@" \
        --qmp "$qmp" --sock "$sock" --cl-sock "$cl_sock" --dir "$tmpdir" \
        --ref "$ref" --image "$img" --size $size
}

st=0
py prepare || fail "prepare phase failed (see above)"
bounded 30 nbdinfo --map "$(nbd_unix_uri disk0 "$cl_sock")" >"$tmpdir/initial.map" ||
    fail "nbdinfo --map of disk0 failed"
py fleece || fail "fleece phase failed (see above)"
bounded 30 nbdinfo --map "$(nbd_unix_uri fleece "$sock")" >"$tmpdir/fleece0.map" ||
    fail "nbdinfo --map of the fleece failed"
expect_file_eq "$tmpdir/fleece0.map" "$tmpdir/initial.map" \
    "nbdinfo --map of the new fleece vs the initial map"

py run || { st=1; echo "concurrent phase failed (see above)" >&2; }

# The fleece still reports the point-in-time allocation (nbdinfo as a
# second client): every run as in the initial map, except that allocated
# zeroes (never copied, control.md 4) may be reported as hole,zero.
bounded 30 nbdinfo --map "$(nbd_unix_uri fleece "$sock")" >"$tmpdir/fleece.map" ||
    fail "nbdinfo --map of the fleece failed"
bounded 30 nbdinfo --json --map "$(nbd_unix_uri fleece "$sock")" >"$tmpdir/fleece.json" ||
    fail "nbdinfo --map --json of the fleece failed"
if ! cmp -s "$tmpdir/fleece.map" "$tmpdir/initial.map"; then
    diff -u "$tmpdir/initial.map" "$tmpdir/fleece.map" | head -40 >&2 || true
fi
py mapcheck --map-json "$tmpdir/fleece.json" ||
    { st=1; echo "nbdinfo --map of the fleece: see above" >&2; }

py teardown || fail "teardown phase failed (see above)"
[ "$st" = 0 ] || fail "the fleece or the live disk did not match the models (see above)"

fleeced_alive "$fleeced_pid" || fail "fleeced died"
stop_fleeced "$fleeced_pid"
expect_eq "$fleeced_status" 0 "fleeced exit status after SIGTERM"
echo "PASS: $test_name"

#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# An incremental backup chain from flavour-B fleeces under a running writer
# (control-api.md 3.6, 3.7, 3.9, 3.10, 5.2, 6.1, 6.2): bitmap b0 from the
# start; a full backup (default nbdcopy of the fleece, rotation b0 -> b1);
# two incrementals (rotation b_n -> b_n+1 atomically with the fleece, the
# dirty extents of qemu:dirty-bitmap:b_n pulled from the fleece into a copy
# of the previous backup); a failed backup whose frozen bitmap is merged
# back into the active one and removed; an incremental after it that must
# hold the changes of both periods.  A writer process (random writes and
# write-zeroes, 8 in flight, every request logged with send / reply times)
# runs across all cuts.  Checked at every cut:
#   - the backup equals a full read of the fleece taken right after the
#     export appeared, and a second full read equals the first;
#   - bytes pulled == the frozen bitmap's count in query-named-block-nodes;
#   - the backup is the image at the cut: with the writer paused around the
#     transaction (cuts 3 and 5), a copy of the image file taken then;
#     with it running (cuts 1 and 2), the image of the logged writes up to
#     the cut, where the writes in flight during the transaction are
#     decided from the fleece and must form a point in time;
#   - the frozen bitmap holds exactly the granules of the writes since the
#     last good cut.
# At the end the writer stops; the live export equals the image file and
# the model, the last backup the image at the last cut.
# Scale with FLEECE_INCREMENTAL_OPS (writes per period, default 400) and
# FLEECE_INCREMENTAL_RATE (writer ops/s, default 200); FLEECE_INCREMENTAL
# _SEED reproduces the writer's choices.  See py/fleece_incremental.py.
source "$(dirname "$0")/functions.sh"
requires nbdcopy cmp
requires_python_nbd

size=$((64 * 1048576 + 4567))   # the last granule is partial
qmp=$tmpdir/qmp.sock            # --qmp
cl_sock=$tmpdir/cl.sock         # --listen (command-line export disk0)
sock=$tmpdir/nbd.sock           # nbd-server-start (fleece exports)
img=$tmpdir/disk.img

make_random_image "$img" $size 1717
expect_eq "$(stat -c %s "$img")" "$size" "image size"

start_fleeced \
    --export "name=disk0,file=$img,writable=on" \
    --listen "unix:$cl_sock" --qmp "unix:$qmp"

bounded 280 "$PYTHON" "$interop_dir/py/fleece_incremental.py" run \
    --qmp "$qmp" --sock "$sock" --cl-sock "$cl_sock" --dir "$tmpdir" \
    --image "$img" --size $size ||
    fail "py/fleece_incremental.py reported failures (see above)"

# the last backup is the image at the last cut (copied with the writer
# quiesced), byte for byte
cmp "$tmpdir/backup5.img" "$tmpdir/cut5.img" >&2 ||
    fail "backup5 differs from the image at cut 5"

fleeced_alive "$fleeced_pid" || fail "fleeced died"
stop_fleeced "$fleeced_pid"
expect_eq "$fleeced_status" 0 "fleeced exit status after SIGTERM"
echo "PASS: $test_name"

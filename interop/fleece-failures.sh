#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Copy-before-write failures (control-api.md 3.2, 5.1; reference.md 2.5),
# with the scratch node wrapped in blkdebug for error injection and delay:
#   1. on-cbw-error break-guest-write (the default): a live write whose copy
#      fails gets the injected error (ENOSPC for errno 28, EIO for 5), the
#      live disk is unchanged there, the fleece stays the point in time
#      (data and base:allocation), writes needing no failing copy (already
#      copied, zero at the point in time) work; blkdebug once=true: the
#      retry of the failed write succeeds.
#   2. on-cbw-error break-snapshot: the live write lands; every later fleece
#      read and block status fails with EIO (also areas never written, also
#      on a new connection); live writes keep working; teardown succeeds.
#   3. cbw-timeout 1 with a scratch taking 1.5 s per write: break-snapshot
#      -> the write completes (bounded) and the snapshot is broken;
#      break-guest-write -> the write fails (ETIMEDOUT -> NBD_EINVAL, as
#      QEMU 7.2 maps it), its retry succeeds, the fleece is intact.
#   4. a plain file scratch holds exactly the copied data clusters (not the
#      point-in-time zero ones) and is emptied by blockdev-del fl-cbw.
#   5. refused blockdev-adds (small/unknown/same target, unknown bitmap,
#      snapshot-access over a non-cbw node, blkdebug bad iotype, ...) give
#      GenericError with a clear text and leave query-named-block-nodes alone.
# See py/fleece_failures.py.
source "$(dirname "$0")/functions.sh"
requires_python_nbd
requires stat fallocate dd

size=$((4 * 1048576))
qmp=$tmpdir/qmp.sock            # --qmp
cl_sock=$tmpdir/cl.sock         # --listen (command-line export disk0)
sock=$tmpdir/nbd.sock           # nbd-server-start (the fleece export)
img=$tmpdir/disk.img

# clusters (64 KiB) 0-15 and 32-47 data, 24-27 allocated zeroes, rest holes
make_pattern_image "$img" $size 0:1M 2M:1M
dd if=/dev/zero of="$img" bs=64k seek=24 count=4 conv=notrunc,fsync status=none
# the scratch space check needs a file system that allocates what is written
# and punches holes: probe it once
truncate -s 1M "$tmpdir/probe"
dd if=/dev/urandom of="$tmpdir/probe" bs=64k count=1 conv=notrunc,fsync status=none
if [ "$(($(stat -c %b "$tmpdir/probe") * 512))" -lt 65536 ] ||
   ! fallocate -p -o 0 -l 65536 "$tmpdir/probe" 2>/dev/null; then
    skip "$tmpdir: no block accounting or hole punching"
fi
rm -f "$tmpdir/probe"

start_fleeced \
    --export "name=disk0,file=$img,writable=on" \
    --listen "unix:$cl_sock" --qmp "unix:$qmp"

bounded 120 "$PYTHON" "$interop_dir/py/fleece_failures.py" \
    --qmp "$qmp" --cl-sock "$cl_sock" --sock "$sock" --dir "$tmpdir" "$@" ||
    fail "py/fleece_failures.py reported failures (see above)"

fleeced_alive "$fleeced_pid" || fail "fleeced died"
stop_fleeced "$fleeced_pid"
expect_eq "$fleeced_status" 0 "fleeced exit status after SIGTERM"
echo "PASS: $test_name"

#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Persistent dirty bitmaps are crash-safe (docs/design/persistent-bitmaps.md,
# control-api.md 9.4): kill -9 the server BITMAP_CRASH_ROUNDS times (default
# 60) under random writes, write-zeroes and bitmap clears from
# python3-libnbd, restart it, and after every restart check through QMP and
# NBD block status that both persistent bitmaps (64 KiB and 4 KiB granules)
# came back, are not inconsistent, cover every granule whose write was
# acknowledged or whose data reached the image (unacknowledged writes are
# found in the image by their random payload), and have no dirty granule
# that no logged write could have touched.  A write that was only issued by
# the client may legitimately be clean: the server may have died before it
# read the request or while the request waited for its bitmap commit, and
# then its data never reached the image either.  False positives (dirty,
# only unacknowledged writes, data not in the image) must stay under 5 % of
# the dirty granules.  See py/bitmap_crash.py for the exact rules.
#
# The disk is added through QMP blockdev-add (file + raw) in two rounds out
# of three, and with --export on the command line in the third; both must
# load the bitmaps.  After the last crash: a restart that only checks, a
# clean stop (SIGTERM), and another restart whose bitmaps must be
# identical.  BITMAP_CRASH_SEED makes a run repeatable.
source "$(dirname "$0")/functions.sh"
requires_python_nbd
requires timeout truncate

rounds=${BITMAP_CRASH_ROUNDS:-60}
seed=${BITMAP_CRASH_SEED:-$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}
echo "seed $seed (BITMAP_CRASH_SEED=$seed to repeat), $rounds rounds"

img=$tmpdir/disk.img
log=$tmpdir/writes.log
qmp=$tmpdir/qmp.sock
sock=$tmpdir/nbd.sock
qsock=$tmpdir/nbd-qmp.sock
truncate -s 256M "$img"
SECONDS=0

# start MODE: start fleeced with the disk added through QMP (qmp) or on
# the command line (cmdline)
start() {
    if [ "$1" = cmdline ]; then
        start_fleeced --qmp "unix:$qmp" --listen "unix:$sock" \
            --export "name=disk0,file=$img,writable=on"
    else
        start_fleeced --qmp "unix:$qmp"
    fi
}

# check ROUND MODE ARGS...: one run of the python driver against the
# server just started; the driver kills the server by its PID.  Bash
# reports the server's death ("Killed") on its stderr when the foreground
# command ends, so stderr goes to a file here and is shown without that.
check() {
    local r=$1 mode=$2 st=0
    shift 2
    {
        bounded 60 "$PYTHON" "$interop_dir/py/bitmap_crash.py" round \
            --round "$r" --mode "$mode" --pid "$fleeced_pid" --qmp "$qmp" \
            --socket "$sock" --qmp-nbd "$qsock" --image "$img" \
            --log "$log" --seed "$seed" "$@" || st=$?
    } 2>"$tmpdir/driver.err"
    grep -v ": line [0-9]*: *$fleeced_pid Killed  " "$tmpdir/driver.err" >&2 ||
        true
    if [ "$st" != 0 ]; then
        fail "round $r ($mode) failed, status $st (seed $seed;" \
            "KEEP_TMPDIR=1 keeps $log)"
    fi
}

for ((r = 0; r < rounds; r++)); do
    mode=qmp
    if ((r % 3 == 2)); then
        mode=cmdline
    fi
    start "$mode"
    extra=()
    if ((r == 0)); then
        extra=(--create)
    fi
    check "$r" "$mode" "${extra[@]}"
    # the driver killed it; reap it (stop_fleeced KILLs it if it is not dead)
    stop_fleeced "$fleeced_pid" KILL
    expect_eq "$fleeced_status" 137 "round $r: fleeced exit status"
done

# after the last crash: check, stop cleanly, check again (no writes between)
start qmp
check "$rounds" qmp --no-write
stop_fleeced "$fleeced_pid" TERM
expect_eq "$fleeced_status" 0 "fleeced exit status after SIGTERM"
start cmdline
check $((rounds + 1)) cmdline --no-write --same-as-previous
stop_fleeced "$fleeced_pid" TERM
expect_eq "$fleeced_status" 0 "fleeced exit status after SIGTERM"

summary=$(bounded 60 "$PYTHON" "$interop_dir/py/bitmap_crash.py" summary \
    --log "$log" --min-rounds "$rounds") || fail "summary: $summary"
echo "$test_name: $summary, ${SECONDS} s"
echo "PASS: $test_name"

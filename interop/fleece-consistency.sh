#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# A fleece is point-in-time for every read (control-api.md 9.2, 5.2, 6.1).
#
# P0 (data islands, holes, allocated zeroes, data in the last partial
# cluster; the disk size is no multiple of 64 KiB) is the previous full
# backup.  Pattern A is written over it through the live export with bitmap
# b0 recording, the writers are quiesced and the image file is copied: that
# copy is the point in time.  Then flavour B (5.2) with the bitmap rotation
# in the transaction, and pattern B through the live export: writes,
# write_zeroes with and without NO_HOLE, aligned and unaligned trims
# (discard=on), multi-cluster and unaligned ranges, the last partial
# cluster.  Checked (py/fleece_consistency.py does the python side):
#   - the live export equals B; reads of the fleece of every size and
#     alignment (1 byte .. the whole disk, many in flight) equal A;
#     base:allocation of the fleece (libnbd and nbdinfo --map) is A's;
#   - nbdcopy of the fleece with default settings, --connections=4 and
#     --request-size=65536, each while a python writer keeps many requests
#     in flight on the live export: sha256 == the point-in-time image;
#     qemu-img compare of each copy and of the fleece URI against it;
#   - the incremental path: qemu:dirty-bitmap:b0 walked on the fleece, only
#     dirty extents pulled (bytes == b0's count) onto the previous full
#     backup reproduces the point-in-time image;
#   - after the writer: live == its model, b1 == exactly the granules
#     written after the point in time; the 5.2 teardown with its events;
#     the scratch file gives its space back;
#   - the point in time under load: flavour B's transaction (with the
#     rotation) and flavour A's step 3 sent while two connections keep
#     requests in flight: every request is in the fleece entirely or not at
#     all, consistent with when it ran, and the new bitmap holds exactly the
#     requests that are not in the fleece;
#   - races: fresh fleeces read by two connections (many reads in flight)
#     while two connections write, zero and trim the same, still uncopied,
#     clusters: every read returns the point in time.
source "$(dirname "$0")/functions.sh"
requires nbdcopy nbdinfo qemu-img cmp du
requires_python_nbd

size=$((64 * 1048576 + 45568))   # 64 MiB + 44.5 KiB: partial last cluster
qmp=$tmpdir/qmp.sock
cl_sock=$tmpdir/cl.sock          # --listen: command-line export disk0
sock=$tmpdir/nbd.sock            # nbd-server-start: fleece
img=$tmpdir/disk.img
scratch=$tmpdir/fleece.raw
fleece_uri=$(nbd_unix_uri fleece "$sock")

py() {
    local phase=$1
    shift
    bounded 90 "$PYTHON" "$interop_dir/py/fleece_consistency.py" "$phase" \
        "${py_args[@]}" "$@"
}
py_args=(--size "$size" --qmp "$qmp" --sock "$sock" --cl-sock "$cl_sock"
    --image "$img" --prev "$tmpdir/prev.img" --scratch "$scratch"
    --state "$tmpdir/state.json" --a-model "$tmpdir/a-model.img"
    --b-model "$tmpdir/b-model.img" --final-model "$tmpdir/final-model.img"
    --stop-file "$tmpdir/writer.stop" --ready-file "$tmpdir/writer.ready"
    --writer-out "$tmpdir/writer.json" --windows "$tmpdir/windows")

# Checks that do not stop the run: every problem is reported, then the test
# fails at the end.
problems=()
problem() {
    echo "FAIL (continuing): $*" >&2
    problems+=("$*")
}

# allocated KiB of a file (st_blocks), for the scratch-space checks
alloc_kib() { du -k "$1" | cut -f1; }

# ---- P0 = the previous full backup; fleeced on it
py prepare || fail "prepare"
start_fleeced \
    --export "name=disk0,file=$img,writable=on" \
    --listen "unix:$cl_sock" --qmp "unix:$qmp"

# ---- pattern A, quiesce, capture the point in time
py setup-a || fail "setup-a: pattern A through the live export (see above)"
cp --sparse=always "$img" "$tmpdir/pit.img"
cmp "$tmpdir/pit.img" "$tmpdir/a-model.img" >&2 ||
    fail "image file after pattern A differs from the model of A"
pit_sha=$(sha256 "$tmpdir/pit.img")

# ---- flavour B with the rotation, then pattern B
truncate -s $size "$scratch"
py fleece || fail "fleece: 5.2 steps 1-4 and pattern B (see above)"
scratch_kib=$(alloc_kib "$scratch")
echo "scratch file after pattern B: $scratch_kib KiB allocated"

# ---- reads of the fleece, its allocation
py reads || problem "reads of the fleece (see above)"
bounded 30 nbdinfo --map "$fleece_uri" >"$tmpdir/fleece.map" ||
    fail "nbdinfo --map $fleece_uri"
py check-map --map "$tmpdir/fleece.map" || {
    cat "$tmpdir/fleece.map" >&2
    problem "nbdinfo --map of the fleece is not A's allocation"
}

# ---- nbdcopy while a writer keeps the live export busy
# (started directly, not through py(), so that $! is the process to stop)
bounded 90 "$PYTHON" "$interop_dir/py/fleece_consistency.py" writer \
    "${py_args[@]}" --max-seconds 45 &
writer_pid=$!
cleanup_fn kill_quiet "$writer_pid"
for ((i = 0; i < 150; i++)); do
    [ -e "$tmpdir/writer.ready" ] && break
    kill -0 "$writer_pid" 2>/dev/null || fail "writer exited early"
    sleep 0.1
done
[ -e "$tmpdir/writer.ready" ] || fail "writer not ready within 15 s"

: >"$tmpdir/windows"
n=0
for opts in "" "--connections=4" "--request-size=65536"; do
    n=$((n + 1))
    out=$tmpdir/copy$n.img
    t0=$(date +%s.%N)
    # shellcheck disable=SC2086
    bounded 60 nbdcopy $opts "$fleece_uri" "$out" ||
        fail "nbdcopy ${opts:-(default)} of the fleece failed"
    t1=$(date +%s.%N)
    echo "nbdcopy${opts:+_$opts} $t0 $t1" >>"$tmpdir/windows"
    expect_eq "$(stat -c %s "$out")" $size "nbdcopy ${opts:-(default)}: size"
    if [ "$(sha256 "$out")" != "$pit_sha" ]; then
        cmp -l "$out" "$tmpdir/pit.img" 2>&1 | awk 'NR == 1 { f = $1 } END {
            print "  first differing byte (1-based) " f ", " NR " bytes differ" }' >&2
        problem "nbdcopy ${opts:-(default)} of the fleece (writer running):" \
            "sha256 differs from the point in time"
    fi
    bounded 30 qemu-img compare -f raw -F raw "$out" "$tmpdir/pit.img" >&2 ||
        problem "qemu-img compare nbdcopy ${opts:-(default)} copy vs point in time"
done
t0=$(date +%s.%N)
bounded 30 qemu-img compare -f raw -F raw "$fleece_uri" "$tmpdir/pit.img" >&2 ||
    problem "qemu-img compare $fleece_uri vs point in time (writer running)"
t1=$(date +%s.%N)
echo "qemu-img_compare $t0 $t1" >>"$tmpdir/windows"

# ---- incremental pull from the frozen bitmap (writer still running)
py incremental --out "$tmpdir/incr.img" || problem "incremental pull (see above)"
cmp "$tmpdir/incr.img" "$tmpdir/pit.img" >&2 ||
    problem "previous full backup + dirty extents of b0 != point in time"

# ---- stop the writer, final checks, teardown (5.2 steps 5-8)
touch "$tmpdir/writer.stop"
wait_exit "$writer_pid" 30 || fail "writer did not stop within 30 s"
expect_eq "$exit_status" 0 "writer exit status (see above)"
scratch_kib=$(alloc_kib "$scratch")
echo "scratch file with the writer done: $scratch_kib KiB allocated"
py final || problem "final checks and teardown (see above)"

# the scratch space is given back when the fleece ends
# (at most one file-system block: the one holding the end of the file, which
# is no multiple of 4 KiB)
[ "$(alloc_kib "$scratch")" -le 4 ] ||
    problem "scratch file still has $(alloc_kib "$scratch") KiB allocated after the fleece"
expect_eq "$(stat -c %s "$scratch")" $size "scratch file size after the fleece"
cmp "$img" "$tmpdir/final-model.img" >&2 ||
    problem "image file after teardown differs from the live writes"

# ---- the point in time under load: flavour B's transaction, then flavour
# A's step 3, sent with requests in flight (every request all or nothing)
py atomic --flavour b || problem "point in time under load, flavour B (see above)"
py atomic --flavour a || problem "point in time under load, flavour A (see above)"
py race --rounds 6 || problem "fleece reads racing live writes (see above)"
cmp "$img" "$tmpdir/final-model.img" >&2 ||
    problem "image file after the rounds under load differs from the live writes"
fleeced_alive "$fleeced_pid" || fail "fleeced died"
if [ ${#problems[@]} -gt 0 ]; then
    printf '  - %s\n' "${problems[@]}" >&2
    fail "${#problems[@]} check(s) failed"
fi
echo "PASS: $test_name"

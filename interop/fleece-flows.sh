#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Fleecing flows over QMP with real clients (control-api.md 3.3, 3.4, 3.9,
# 3.10, 4, 5.1, 5.2; reference.md 2.5).  One fleeced, command-line export
# disk0 (discard=on), disk size no multiple of 64 KiB.  py/fleece_flows.py
# drives QMP and libnbd; this script adds fleecectl, nbdcopy and nbdinfo
# while the flavour B fleece is up.
#   1. flavour A exactly as 5.1 (steps 1-10, each {"return": {}}) with the
#      bitmap rotation before step 3; flavour B exactly as 5.2 (steps 1-8);
#      BLOCK_EXPORT_DELETED and BLOCK_JOB_CANCELLED (members, data, before
#      the return), query-block-jobs while running and [] after;
#   2. teardown-order and busy errors with their exact texts, blockdev-reopen
#      errors, rolled-back transactions with blockdev-backup; after each
#      failure the nodes, bitmaps, jobs and exports are unchanged;
#   3. copy-before-write limited by a bitmap: EINVAL outside, point-in-time
#      data inside;
#   4. the scratch file grows by exactly the non-zero clusters copied and is
#      given back when the fleece ends;
#   5. the live disk keeps every write; each rotated bitmap records exactly
#      the writes of its period.
source "$(dirname "$0")/functions.sh"
requires nbdcopy nbdinfo cmp
requires_python_nbd
: "${FLEECECTL:=$(dirname "${FLEECED:-.}")/fleecectl}"
[ -x "$FLEECECTL" ] || skip "FLEECECTL=$FLEECECTL is not executable"

size=$((4 * 1048576 + 20480))    # 64 full clusters + one of 20 KiB
qmp=$tmpdir/qmp.sock
cl_sock=$tmpdir/cl.sock          # --listen: command-line export disk0
sock=$tmpdir/nbd.sock            # nbd-server-start: fleece
img=$tmpdir/disk.img

problems=()
problem() {
    echo "FAIL (continuing): $*" >&2
    problems+=("$*")
}

py() {
    local phase=$1
    shift
    bounded 60 "$PYTHON" "$interop_dir/py/fleece_flows.py" "$phase" \
        --size $size --qmp "$qmp" --sock "$sock" --cl-sock "$cl_sock" \
        --image "$img" --scratch "$tmpdir/fleece.raw" \
        --scratch2 "$tmpdir/fleece2.raw" --state "$tmpdir/state.json" \
        --model "$tmpdir/model.img" --pit "$tmpdir/pit-b.img" "$@"
}
ctl() { bounded 30 "$FLEECECTL" --timeout 20 -s "$qmp" "$@"; }

py prepare || fail "prepare"
start_fleeced \
    --export "name=disk0,file=$img,writable=on" \
    --listen "unix:$cl_sock" --qmp "unix:$qmp"

py flavour-a || problem "flavour A (5.1) and its errors (see above)"
py rollback || problem "rolled-back transactions (see above)"
py b-up || fail "flavour B (5.2) steps 1-4 (see above)"

# ---- with the flavour B fleece up: fleecectl, nbdcopy, nbdinfo
ctl jobs >"$tmpdir/jobs.out" || problem "fleecectl jobs failed"
grep -Eq '^fleece-job +backup +running' "$tmpdir/jobs.out" || {
    cat "$tmpdir/jobs.out" >&2
    problem "fleecectl jobs does not show fleece-job running"
}
ctl --json exports >"$tmpdir/exports.json" || problem "fleecectl --json exports"
"$PYTHON" - "$tmpdir/exports.json" <<'PY' || problem "fleecectl --json exports"
import json, sys
got = json.load(open(sys.argv[1]))
got = sorted(got["return"], key=lambda e: e["id"])
want = [{"id": "fleece", "type": "nbd", "node-name": "fl-access",
         "shutting-down": False}]
# the command-line export, listed by newer builds (id = name)
cl = {"id": "disk0", "type": "nbd", "node-name": "disk0",
      "shutting-down": False}
if got not in (want, [cl] + want):
    sys.exit(f"exports: got {got}, want {want}")
PY
fleece_uri=$(nbd_unix_uri fleece "$sock")
bounded 30 nbdcopy "$fleece_uri" "$tmpdir/copy-b.img" || problem "nbdcopy of the fleece"
cmp "$tmpdir/copy-b.img" "$tmpdir/pit-b.img" >&2 ||
    problem "nbdcopy of the flavour B fleece != its point in time"
# the frozen b1 exported with the fleece, as nbdinfo shows it
bounded 30 nbdinfo --map=qemu:dirty-bitmap:b1 "$fleece_uri" >"$tmpdir/b1.map" ||
    problem "nbdinfo --map=qemu:dirty-bitmap:b1 of the fleece"
"$PYTHON" - "$tmpdir/b1.map" "$tmpdir/state.json" $size <<'PY' ||
import json, sys
path, state, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
b1 = set(json.load(open(state))["b1"])
C = 65536
want, pos = [], 0
for c in range((size + C - 1) // C):
    n, f = min(C, size - c * C), int(c in b1)
    if want and want[-1][2] == f:
        want[-1][1] += n
    else:
        want.append([c * C, n, f])
got = [[int(x) for x in l.split()[:3]] for l in open(path) if l.strip()]
if got != want:
    sys.exit(f"nbdinfo b1 map: got {got}, want {want}")
PY
    problem "nbdinfo --map=qemu:dirty-bitmap:b1 of the fleece != b1's writes"

py b-down || problem "flavour B (5.2) steps 5-8 (see above)"
ctl --json jobs >"$tmpdir/jobs.json" || problem "fleecectl --json jobs"
"$PYTHON" -c 'import json, sys; sys.exit(json.load(open(sys.argv[1]))["return"] != [])' \
    "$tmpdir/jobs.json" ||
    problem "fleecectl --json jobs after the cancel: $(cat "$tmpdir/jobs.json")"

py cbw-bitmap || problem "bitmap-limited copy-before-write (see above)"
py final || problem "final state (see above)"
cmp "$img" "$tmpdir/model.img" >&2 ||
    problem "image file differs from every write made through the live export"
fleeced_alive "$fleeced_pid" || fail "fleeced died"
if [ ${#problems[@]} -gt 0 ]; then
    printf '  - %s\n' "${problems[@]}" >&2
    fail "${#problems[@]} check(s) failed"
fi
echo "PASS: $test_name"

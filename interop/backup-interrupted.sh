#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# fleece-backup incrementals that fail, are interrupted or are killed, and
# the bitmap reclaim that must keep every change for the next incremental
# (control-api.md 6.2).  A 256 MiB sparse disk served by fleeced; a full
# backup; then, each after its own deterministic writes:
#   a. the --exec-at-cut hook exits 1: exit 1, nothing left behind (export,
#      job, fleece nodes, scratch, image), the manifest's active_bitmap is the
#      new bitmap, the only one, recording, and it holds the union (its count
#      >= the granules written before the run);
#   b1. the hook sends SIGINT to fleece-backup: exit 130, the same checks;
#   b2. SIGINT while pulling: --progress json, --request-size 4096
#      --connections 1 --requests 1 over a 192 MiB dirty set; after the first
#      "progress" line fleeced is stopped (SIGSTOP) so the pull cannot finish,
#      fleece-backup gets SIGINT, fleeced SIGCONT: exit 130, the same checks;
#   c. fleece-backup is killed (SIGKILL) inside its hook, leaving the fleece
#      and a frozen bitmap behind: the next incremental succeeds, says it
#      removed the old fleece and merged the frozen bitmap, and its restore
#      equals the disk at its cut (captured by its hook) including every
#      write of the failed periods; the restore of the full equals the
#      full's cut; verify passes; one bitmap remains;
#   d. a full backup killed in its hook: the next full into that directory
#      removes the bitmap it leaked; a full of an unknown node creates no
#      directory.
source "$(dirname "$0")/functions.sh"
requires nbdcopy qemu-img qemu-io qemu-nbd jq cmp
_require_fleeced_binary
requires_backup_tools

size=$((256 * 1048576))
backup_env

make_pattern_image "$img" $size 0:1M 7M:64k 100M:2M
start_backup_fleeced

backup() { bounded 120 "$FLEECE_BACKUP" "$@"; }
mf() { jq -r "$1" "$dir/manifest.json"; }
qio() { bounded 60 qemu-io -f raw "$live" "$@" >/dev/null || fail "qemu-io $*"; }

# check_clean WHAT NBACKUPS: no fleece on the server, exactly one bitmap (the
# manifest's active one, recording), DIR holds the chain and nothing else;
# sets $count to the active bitmap's count
check_clean() {
    local what=$1 n=$2 active want i
    expect_no_fleece "$what"
    active=$(mf .active_bitmap)
    expect_eq "$(jq -c '[.return[] | ."dirty-bitmaps"[]? | {name, recording}]' "$tmpdir/q.json")" \
        "[{\"name\":\"$active\",\"recording\":true}]" "bitmaps after $what"
    want=".lock manifest.json"
    for ((i = 0; i < n; i++)); do
        want+=" $(mf ".backups[$i].file") $(mf ".backups[$i].sums")"
    done
    expect_eq "$(ls -A "$dir" | sort | xargs)" "$(echo $want | tr ' ' '\n' | sort | xargs)" \
        "files in DIR after $what"
    expect_eq "$(mf '.backups | length')" "$n" "backups in the manifest after $what"
    count=$(jq ".return[] | .\"dirty-bitmaps\"[]? | select(.name == \"$active\") | .count" "$tmpdir/q.json")
}

# expect_failed_run WHAT STATUS SERIAL STDERR MIN_COUNT: after a failed or
# interrupted incremental that created bitmap <chain>.SERIAL
expect_failed_run() {
    local what=$1 want=$2 serial=$3 err=$4 min=$5
    check_clean "$what" 1
    expect_eq "$(mf .active_bitmap)" "fleece-backup.$chain.$serial" "active bitmap after $what"
    [ "$count" -ge "$min" ] || fail "$what: count $count of the active bitmap < $min (lost changes)"
    grep -q "merged bitmap fleece-backup.$chain.$((serial - 1)) into fleece-backup.$chain.$serial" \
        "$err" || fail "$what: no merge message: $(cat "$err")"
    echo "$what: exit $want, active bitmap count $count" >&2
}

# the hooks
cat >"$tmpdir/capture.sh" <<'SH'
set -e
nbdcopy "$FLEECE_URI" "$T/cut-$FLEECE_INDEX.raw"
SH
export T=$tmpdir

# ---- full
backup full "$dir" --node disk0 -q --exec-at-cut "sh $tmpdir/capture.sh" || fail "full backup failed"
chain=$(mf .chain)
expect_eq "$(mf .active_bitmap)" "fleece-backup.$chain.0" "active bitmap after the full"
check_clean "the full" 1
mv "$tmpdir/cut-0.raw" "$tmpdir/full-cut.raw"

# ---- a. the hook fails
qio -c 'write -P 0x11 2M 1M' -c 'write -z 7M 64k'               # 17 granules
st=0
backup incremental "$dir" --json --exec-at-cut 'exit 1' >"$tmpdir/out.txt" 2>"$tmpdir/err.txt" || st=$?
expect_eq "$st" 1 "incremental with a failing hook: exit status"
grep -q "exec-at-cut command exited with 1" "$tmpdir/err.txt" ||
    fail "a: no hook failure message: $(cat "$tmpdir/err.txt")"
expect_eq "$(cat "$tmpdir/out.txt")" "" "a: no report on stdout"
expect_failed_run "a (hook exit 1)" 1 1 "$tmpdir/err.txt" $((17 << 16))

# ---- b1. SIGINT from the hook, right at the cut
qio -c 'write -P 0x22 20M 512k'                                  # 8 more granules
st=0
backup incremental "$dir" --exec-at-cut 'kill -INT $PPID' >"$tmpdir/out.txt" 2>"$tmpdir/err.txt" ||
    st=$?
expect_eq "$st" 130 "incremental interrupted at the cut: exit status"
grep -q "failed: interrupted" "$tmpdir/err.txt" || fail "b1: no interrupted message: $(cat "$tmpdir/err.txt")"
expect_failed_run "b1 (SIGINT at the cut)" 130 2 "$tmpdir/err.txt" $(((17 + 8) << 16))

# ---- b2. SIGINT while pulling.  fleece-backup raises --request-size to its
# 64 KiB chunk, and a local pull of 192 MiB takes well under the 1 s before
# the first progress line, so fleeced is throttled (SIGSTOP 100 ms / SIGCONT
# 10 ms, bounded, always left running) until the interrupt is sent.
qio -c 'write -P 0x33 32M 192M'                                   # 3072 granules
(
    for ((i = 0; i < 300; i++)); do
        [ -e "$tmpdir/unthrottle" ] && break
        kill -STOP "$fleeced_pid" 2>/dev/null || break
        sleep 0.1
        kill -CONT "$fleeced_pid" 2>/dev/null || break
        sleep 0.01
    done
    kill -CONT "$fleeced_pid" 2>/dev/null
) &
tpid=$!
cleanup_fn kill_quiet -CONT "$fleeced_pid"
cleanup_fn touch "$tmpdir/unthrottle"
# (not through `bounded`: the signal must reach fleece-backup itself; the
# wait below is bounded instead)
"$FLEECE_BACKUP" incremental "$dir" --progress json --request-size 4096 --connections 1 \
    --requests 1 >"$tmpdir/out.txt" 2>"$tmpdir/err.txt" &
bpid=$!
cleanup_fn kill_quiet "$bpid"
for ((i = 0; i < 600; i++)); do
    grep -q '"event":"progress"' "$tmpdir/out.txt" 2>/dev/null && break
    grep -q '"event":"done"' "$tmpdir/out.txt" 2>/dev/null && break
    kill -0 "$bpid" 2>/dev/null || break
    sleep 0.05
done
grep -q '"event":"progress"' "$tmpdir/out.txt" && kill -INT "$bpid"
touch "$tmpdir/unthrottle"
wait "$tpid" || true
kill -CONT "$fleeced_pid"
grep -q '"event":"progress"' "$tmpdir/out.txt" ||
    fail "b2: no progress line while pulling: $(cat "$tmpdir/out.txt" "$tmpdir/err.txt")"
wait_exit "$bpid" 60 || fail "b2: fleece-backup still runs 60 s after SIGINT"
expect_eq "$exit_status" 130 "incremental interrupted while pulling: exit status"
first=$(head -n 1 "$tmpdir/out.txt")
expect_eq "$(jq -r .event <<<"$first")" progress "b2: first progress line"
[ "$(jq .bytes <<<"$first")" -lt "$(jq .total <<<"$first")" ] || fail "b2: pull done at the first line"
expect_eq "$(jq .total <<<"$first")" $(((17 + 8 + 3072) << 16)) "b2: progress total (the dirty bytes)"
grep -q '"event":"done"' "$tmpdir/out.txt" && grep -q '"bytes":'$(((17 + 8 + 3072) << 16))',' "$tmpdir/out.txt" &&
    fail "b2: the pull completed"
grep -q "failed: interrupted" "$tmpdir/err.txt" || fail "b2: no interrupted message: $(cat "$tmpdir/err.txt")"
expect_failed_run "b2 (SIGINT while pulling)" 130 3 "$tmpdir/err.txt" $(((17 + 8 + 3072) << 16))

# ---- c. SIGKILL inside the hook, then a repairing incremental
qio -c 'write -P 0x44 230M 1M'
st=0
backup incremental "$dir" -q --exec-at-cut 'kill -KILL $PPID' >/dev/null 2>&1 || st=$?
expect_eq "$st" 137 "killed incremental: exit status"
# what a killed run leaves: the fleece, its scratch, a frozen and a new bitmap
ctl --json exports >"$tmpdir/q.json"
expect_eq "$(jq -c '[.return[].id] | sort' "$tmpdir/q.json")" '["disk0","fleece-backup-disk0"]' \
    "c: exports after the kill"
ctl --json bitmaps disk0 >"$tmpdir/q.json"
expect_eq "$(jq -c '[.return[] | ."dirty-bitmaps"[]? | {name, recording}] | sort_by(.name)' "$tmpdir/q.json")" \
    "[{\"name\":\"fleece-backup.$chain.3\",\"recording\":false},{\"name\":\"fleece-backup.$chain.4\",\"recording\":true}]" \
    "c: bitmaps after the kill"
qio -c 'write -P 0x55 240M 64k' -c 'write -z 0 64k'
backup incremental "$dir" --json --exec-at-cut "sh $tmpdir/capture.sh" \
    >"$tmpdir/out.txt" 2>"$tmpdir/err.txt" || fail "c: repairing incremental failed: $(cat "$tmpdir/err.txt")"
grep -q "removing a fleece of 'disk0' left behind by an earlier run" "$tmpdir/err.txt" ||
    fail "c: no message about the old fleece: $(cat "$tmpdir/err.txt")"
grep -q "merged bitmap fleece-backup.$chain.3, frozen by an interrupted run, into fleece-backup.$chain.4" \
    "$tmpdir/err.txt" || fail "c: no repair message: $(cat "$tmpdir/err.txt")"
check_clean "c (repaired)" 2
expect_eq "$(mf .backups[1].kind)" incremental "c: entry 1"
dirty=$(mf .backups[1].dirty_bytes)
expect_eq "$(($(mf .backups[1].bytes_pulled) + $(mf .backups[1].bytes_zeroed)))" "$dirty" \
    "c: bytes_pulled + bytes_zeroed"
# 17 + 8 + 3072 + 16 + 1 + 1 granules written since the full
expect_eq "$dirty" $(((17 + 8 + 3072 + 16 + 1 + 1) << 16)) "c: dirty_bytes (every failed period)"

backup restore "$dir" --at 1 --to "$tmpdir/restore-1.raw" -q || fail "restore --at 1 failed"
cmp "$tmpdir/restore-1.raw" "$tmpdir/cut-1.raw" >&2 || fail "restore 1 differs from its cut"
cmp "$tmpdir/restore-1.raw" "$img" >&2 || fail "restore 1 differs from the (quiet) image"
backup restore "$dir" --at 0 --to "$tmpdir/restore-0.raw" -q || fail "restore --at 0 failed"
cmp "$tmpdir/restore-0.raw" "$tmpdir/full-cut.raw" >&2 || fail "restore 0 differs from its cut"
backup verify "$dir" -q || fail "verify failed"

# ---- d. a full backup killed inside its hook leaks neither its bitmap
# (the next full into the same directory removes it) nor a directory when
# the node does not exist
dir2=$tmpdir/backups-2
st=0
"$FLEECE_BACKUP" full "$dir2" --node disk0 -q --exec-at-cut 'kill -9 $PPID' 2>/dev/null || st=$?
expect_eq "$st" 137 "d: killed full"
ctl --json bitmaps disk0 >"$tmpdir/q.json"
expect_eq "$(jq '[.return[] | ."dirty-bitmaps"[]?] | length' "$tmpdir/q.json")" 2 "d: bitmaps after the kill"
backup full "$dir2" --node disk0 -q 2>"$tmpdir/err.txt" || fail "d: second full failed: $(cat "$tmpdir/err.txt")"
grep -q "of a full backup that did not finish" "$tmpdir/err.txt" ||
    fail "d: no message about the leaked bitmap: $(cat "$tmpdir/err.txt")"
ctl --json bitmaps disk0 >"$tmpdir/q.json"
expect_eq "$(jq -c '[.return[] | ."dirty-bitmaps"[]? | .name] | sort' "$tmpdir/q.json")" \
    "$(jq -c --arg first "$(mf .active_bitmap)" '[.active_bitmap, $first] | sort' "$dir2/manifest.json")" \
    "d: bitmaps after the second full (one per chain)"
st=0
"$FLEECE_BACKUP" full "$tmpdir/never" --node nosuch -q 2>/dev/null || st=$?
expect_eq "$st" 1 "d: unknown node"
[ ! -e "$tmpdir/never" ] || fail "d: a directory was created for an unknown node"

fleeced_alive "$fleeced_pid" || fail "fleeced died"
stop_fleeced "$fleeced_pid"
expect_eq "$fleeced_status" 0 "fleeced exit status after SIGTERM"
echo "PASS: $test_name"

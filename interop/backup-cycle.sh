#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# fleece-backup end to end under a running writer: a sparse 128 MiB disk with
# random data islands, served by fleeced with a control socket; a
# python3-libnbd writer (random writes and write-zeroes at random, partly
# unaligned offsets, bounded by a stop file and a deadline) runs across a
# full backup and two incrementals; deterministic changes of a few % of the
# disk go in before each incremental.  Every run captures the fleece with
# nbdcopy from --exec-at-cut (cut-N.raw) and, for incrementals, the frozen
# bitmap's dirty total through the fleece export's qemu:dirty-bitmap context
# (the control socket serves one client at a time and fleece-backup holds it
# during the hook).  A last incremental runs with the writer stopped, so its
# dirty_bytes must equal the QMP `count` of the active bitmap read just
# before, and its restore must equal the image file.  Checked:
#   - exit status, --json report and manifest.json entries (kind, file,
#     checkpoint, bitmap, bytes_pulled + bytes_zeroed == dirty_bytes ==
#     the frozen bitmap's dirty total);
#   - after every run: no fleece export, job or fbt/fbc/fba node, exactly one
#     bitmap (the manifest's active_bitmap, recording, persistent), no
#     scratch or partial file in DIR;
#   - restore of every point == its cut (qemu-img compare and cmp), restore
#     reports verified; verify exits 0; qemu-img info --backing-chain lists
#     the chain newest first; qemu-img check is clean for every image.
source "$(dirname "$0")/functions.sh"
requires nbdcopy nbdinfo qemu-img qemu-io qemu-nbd jq cmp
requires_python_nbd
_require_fleeced_binary
requires_backup_tools

size=$((128 * 1048576))
backup_env

make_random_image "$img" $size 4242
start_backup_fleeced

backup() { bounded 120 "$FLEECE_BACKUP" "$@"; }
mf() { jq -r "$1" "$dir/manifest.json"; }

# check_clean NBACKUPS: no fleece left on the server, one recording
# persistent bitmap (the manifest's active one), nothing extra in DIR
check_clean() {
    local n=$1 active want i
    expect_no_fleece "backup $n"
    active=$(mf .active_bitmap)
    expect_eq "$(jq -c '[.return[] | ."dirty-bitmaps"[]? | {name, recording, persistent}]' \
        "$tmpdir/q.json")" "[{\"name\":\"$active\",\"recording\":true,\"persistent\":true}]" \
        "bitmaps after backup $n"
    want=".lock manifest.json"
    for ((i = 0; i < n; i++)); do
        want+=" $(mf ".backups[$i].file") $(mf ".backups[$i].sums")"
    done
    expect_eq "$(ls -A "$dir" | sort | xargs)" "$(echo $want | tr ' ' '\n' | sort | xargs)" \
        "files in DIR after backup $n"
}

# ---- the writer: random writes and write-zeroes until $tmpdir/stop (or 240 s)
"$PYTHON" - "$live" "$tmpdir/stop" $size >"$tmpdir/writer.out" 2>&1 <<'PY' &
import nbd, os, random, sys, time
uri, stop, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
h = nbd.NBD()
h.connect_uri(uri)
rng = random.Random(99)
ops = zeroes = 0
end = time.monotonic() + 240
while not os.path.exists(stop) and time.monotonic() < end:
    length = rng.choice([1, 512, 4096, 5000, 16384, 65536, 100000])
    off = rng.randrange(0, size - length)
    if rng.random() < 0.5:
        off &= ~511
    if rng.random() < 0.2:
        h.zero(length, off)
        zeroes += 1
    else:
        h.pwrite(rng.randbytes(length), off)
    ops += 1
    time.sleep(0.01)
h.flush()
h.shutdown()
print(ops, zeroes)
PY
writer_pid=$!
cleanup_fn kill_quiet "$writer_pid"
sleep 0.5
fleeced_alive "$fleeced_pid" || fail "fleeced died"
kill -0 "$writer_pid" 2>/dev/null || fail "writer did not start: $(cat "$tmpdir/writer.out")"

# the hook: the disk at the cut, and the frozen bitmap's dirty total as the
# fleece export publishes it ($FROZEN is passed through fleece-backup's env)
cat >"$tmpdir/hook.sh" <<'SH'
set -e
nbdcopy "$FLEECE_URI" "$T/cut-$FLEECE_INDEX.raw"
if [ -n "$FROZEN" ]; then
    nbdinfo --map="qemu:dirty-bitmap:$FROZEN" --totals "$FLEECE_URI" >"$T/map-$FLEECE_INDEX.txt"
fi
echo "$FLEECE_URI" >"$T/uri-$FLEECE_INDEX.txt"
SH
hook="sh $tmpdir/hook.sh"
export T=$tmpdir

# ---- full backup
FROZEN='' backup full "$dir" --node disk0 --json --exec-at-cut "$hook" >"$tmpdir/r0.json" ||
    fail "full backup failed"
expect_eq "$(jq -r '.event + " " + .kind + " " + (.index|tostring)' "$tmpdir/r0.json")" \
    "backup full 0" "full report"
expect_eq "$(cat "$tmpdir/uri-0.txt")" "nbd+unix:///fleece-backup-disk0?socket=$sock" "FLEECE_URI"
expect_eq "$(mf .virtual_size)" $size "manifest virtual_size"
expect_eq "$(mf .chunk_size)" 65536 "manifest chunk_size"
expect_eq "$(mf .node)" disk0 "manifest node"
expect_eq "$(mf '.backups | length')" 1 "backups after the full"
expect_eq "$(mf '.backups[0].kind + " " + .backups[0].file')" "full 0000.full.qcow2" "entry 0"
chain=$(mf .chain)
expect_eq "$(mf .active_bitmap)" "fleece-backup.$chain.0" "active bitmap after the full"
expect_eq "$(mf .backups[0].checkpoint)" "fleece-backup.$chain.0" "checkpoint of the full"
expect_eq "$(mf .backups[0].bytes_pulled)" "$(jq .bytes_pulled "$tmpdir/r0.json")" \
    "bytes_pulled report vs manifest"
expect_eq "$(mf .backups[0].digest)" "$(jq -r .digest "$tmpdir/r0.json")" "digest report vs manifest"
[ "$(mf .backups[0].bytes_pulled)" -gt $((8 << 20)) ] || fail "full pulled too little data"
[ "$(stat -c %s "$tmpdir/cut-0.raw")" = $size ] || fail "cut-0.raw has the wrong size"
check_clean 1

# ---- two incrementals, a few % of the disk changed before each
changes=("write -P 0xa1 3M 1M;write -z 40M 512k;write -P 0xa2 100000 3;write -P 0xa3 127M 1M"
         "write -P 0xb1 64M 2M;write -z 3M 64k;write -P 0xb2 90M 65537")
# granules these touch at least (64 KiB): 16+8+1+16 and 32+1+2
min_dirty=($(((16 + 8 + 1 + 16) << 16)) $(((32 + 1 + 2) << 16)))
for k in 1 2; do
    prev_active=$(mf .active_bitmap)
    IFS=';' read -ra cmds <<<"${changes[$((k - 1))]}"
    qargs=()
    for c in "${cmds[@]}"; do qargs+=(-c "$c"); done
    bounded 60 qemu-io -f raw "$live" "${qargs[@]}" >/dev/null || fail "qemu-io changes $k"
    FROZEN=$prev_active backup incremental "$dir" --json --exec-at-cut "$hook" \
        >"$tmpdir/r$k.json" || fail "incremental $k failed"
    e=".backups[$k]"
    expect_eq "$(mf '.backups | length')" $((k + 1)) "backups after incremental $k"
    expect_eq "$(mf "$e.kind + \" \" + $e.file")" "incremental $(printf %04d $k).inc.qcow2" "entry $k"
    expect_eq "$(mf "$e.bitmap")" "$prev_active" "frozen bitmap of incremental $k"
    expect_eq "$(mf .active_bitmap)" "fleece-backup.$chain.$k" "active bitmap after incremental $k"
    expect_eq "$(mf "$e.checkpoint")" "fleece-backup.$chain.$k" "checkpoint of incremental $k"
    pulled=$(mf "$e.bytes_pulled")
    zeroed=$(mf "$e.bytes_zeroed")
    dirty=$(mf "$e.dirty_bytes")
    expect_eq $((pulled + zeroed)) "$dirty" "incremental $k: bytes_pulled + bytes_zeroed"
    for f in bytes_pulled bytes_zeroed dirty_bytes; do
        expect_eq "$(jq ".$f" "$tmpdir/r$k.json")" "$(mf "$e.$f")" "incremental $k: $f report vs manifest"
    done
    hook_dirty=$(awk '$3 == 1 { s += $1 } END { print s + 0 }' "$tmpdir/map-$k.txt")
    expect_eq "$dirty" "$hook_dirty" "incremental $k: dirty_bytes vs the frozen bitmap at the cut"
    [ "$dirty" -ge "${min_dirty[$((k - 1))]}" ] ||
        fail "incremental $k: dirty_bytes $dirty < ${min_dirty[$((k - 1))]} (the changes made)"
    [ $((dirty % 65536)) = 0 ] || fail "incremental $k: dirty_bytes $dirty not granule aligned"
    [ "$dirty" -lt $((size / 2)) ] || fail "incremental $k: dirty_bytes $dirty is most of the disk"
    check_clean $((k + 1))
    cmp -s "$tmpdir/cut-$((k - 1)).raw" "$tmpdir/cut-$k.raw" && fail "cut $k equals cut $((k - 1))"
done

# ---- stop the writer; a last incremental must take exactly the active
# bitmap's count and restore to the image file itself
touch "$tmpdir/stop"
wait_exit "$writer_pid" 10 || fail "the writer did not stop within 10 s"
expect_eq "$exit_status" 0 "writer exit status ($(cat "$tmpdir/writer.out"))"
read -r wops wzeroes <"$tmpdir/writer.out"
[ "$wops" -ge 20 ] || fail "the writer did only $wops writes"
echo "writer: $wops requests, $wzeroes of them write-zeroes" >&2
bounded 60 qemu-io -f raw "$live" -c 'write -P 0xc1 10M 256k' >/dev/null
active=$(mf .active_bitmap)
ctl --json bitmaps disk0 >"$tmpdir/q.json"
count=$(jq ".return[] | .\"dirty-bitmaps\"[]? | select(.name == \"$active\") | .count" "$tmpdir/q.json")
[ "$count" -ge $((4 << 16)) ] || fail "count $count of $active < 256 KiB"
FROZEN=$active backup incremental "$dir" --json --exec-at-cut "$hook" >"$tmpdir/r3.json" ||
    fail "incremental 3 failed"
expect_eq "$(mf .backups[3].dirty_bytes)" "$count" "incremental 3: dirty_bytes vs QMP count"
expect_eq "$(($(mf .backups[3].bytes_pulled) + $(mf .backups[3].bytes_zeroed)))" "$count" \
    "incremental 3: bytes_pulled + bytes_zeroed"
check_clean 4
cmp "$tmpdir/cut-3.raw" "$img" >&2 || fail "cut 3 differs from the quiesced image"

# ---- restore every point, compare with its cut
for n in 0 1 2 3; do
    backup restore "$dir" --at $n --to "$tmpdir/restore-$n.raw" --json >"$tmpdir/rs$n.json" ||
        fail "restore --at $n failed"
    expect_eq "$(jq -c '[.index, .verified, .virtual_size]' "$tmpdir/rs$n.json")" "[$n,true,$size]" \
        "restore $n report"
    expect_eq "$(jq -r .digest "$tmpdir/rs$n.json")" "$(mf ".backups[$n].digest")" "restore $n digest"
    bounded 60 qemu-img compare -q -f raw -F raw "$tmpdir/restore-$n.raw" "$tmpdir/cut-$n.raw" ||
        fail "qemu-img compare: restore $n differs from cut $n"
    cmp "$tmpdir/restore-$n.raw" "$tmpdir/cut-$n.raw" >&2 || fail "cmp: restore $n differs from cut $n"
    rm -f "$tmpdir/restore-$n.raw"
done
# restore without --at: the newest point
backup restore "$dir" --to "$tmpdir/restore-last.raw" -q || fail "restore (latest) failed"
cmp "$tmpdir/restore-last.raw" "$img" >&2 || fail "latest restore differs from the image"

# ---- verify, the chain as qemu-img sees it, qemu-img check
backup verify "$dir" >"$tmpdir/verify.out" || fail "verify: $(cat "$tmpdir/verify.out")"
grep -qx "chain: ok, 4 backup(s), all verified" "$tmpdir/verify.out" ||
    fail "verify output: $(cat "$tmpdir/verify.out")"
bounded 60 qemu-img info --backing-chain --output=json "$dir/0003.inc.qcow2" >"$tmpdir/info.json"
expect_eq "$(jq -c '[.[].filename | split("/") | last]' "$tmpdir/info.json")" \
    '["0003.inc.qcow2","0002.inc.qcow2","0001.inc.qcow2","0000.full.qcow2"]' "backing chain"
expect_eq "$(jq -c '[.[].format] | unique' "$tmpdir/info.json")" '["qcow2"]' "chain formats"
expect_eq "$(jq -c '[.[]."virtual-size"] | unique' "$tmpdir/info.json")" "[$size]" "chain sizes"
for f in 0000.full 0001.inc 0002.inc 0003.inc; do
    bounded 60 qemu-img check -q -f qcow2 "$dir/$f.qcow2" >&2 || fail "qemu-img check $f.qcow2"
done
backup list "$dir" --json >"$tmpdir/list.json"
expect_eq "$(jq -c '[.backups[].kind]' "$tmpdir/list.json")" \
    '["full","incremental","incremental","incremental"]' "list --json kinds"

fleeced_alive "$fleeced_pid" || fail "fleeced died"
stop_fleeced "$fleeced_pid"
expect_eq "$fleeced_status" 0 "fleeced exit status after SIGTERM"
echo "PASS: $test_name"

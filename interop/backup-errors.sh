#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# fleece-backup refusals and damage detection, and pulls over TLS:
#   - usage errors exit 2 with one line on stderr and nothing on stdout
#     (unknown option, missing --node for full, unknown command, no command,
#     bad --progress, --request-size not a power of two, restore --at past
#     the chain, restore onto an existing file without --force);
#   - an unknown node exits 1 naming it, and creates nothing on the server
#     (no bitmap, export, job or node) and no chain in DIR;
#   - full into a DIR that holds a chain, incremental into an empty DIR or a
#     missing one, verify of an empty DIR: exit 1, the chain untouched;
#   - verify finds a corrupted data cluster (found with qemu-img map of the
#     image alone, backing=null) in the last incremental: exit 3, names
#     that backup, the others ok; restore of that point exits 3;
#     restore --force of an earlier point still works;
#   - over TLS-PSK (fleeced --tls-creds psk:DIR): pull of the export into a
#     new file equals the image; a plaintext pull is refused (exit 1); a
#     full backup with an nbds+unix:// --nbd URI equals the image.
source "$(dirname "$0")/functions.sh"
requires qemu-img qemu-io qemu-nbd jq cmp psktool
_require_fleeced_binary
requires_backup_tools

size=$((64 * 1048576))
backup_env

make_random_image "$img" $size 777
start_backup_fleeced
main_pid=$fleeced_pid

fb() { bounded 120 "$FLEECE_BACKUP" "$@"; }
mf() { jq -r "$1" "$dir/manifest.json"; }

# expect_exit STATUS PATTERN WHAT ARGS...: fleece-backup ARGS exits STATUS,
# prints nothing on stdout and one stderr line matching PATTERN (grep -E)
expect_exit() {
    local want=$1 pat=$2 what=$3 st=0
    shift 3
    fb "$@" >"$tmpdir/out.txt" 2>"$tmpdir/err.txt" || st=$?
    expect_eq "$st" "$want" "$what: exit status"
    expect_eq "$(cat "$tmpdir/out.txt")" "" "$what: stdout"
    expect_eq "$(wc -l <"$tmpdir/err.txt")" 1 "$what: stderr lines ($(cat "$tmpdir/err.txt"))"
    grep -qE -e "$pat" "$tmpdir/err.txt" || fail "$what: stderr [$(cat "$tmpdir/err.txt")] !~ /$pat/"
}

# server_clean WHAT: only the command-line export and its nodes, no bitmap
server_clean() {
    expect_no_fleece "$1"
    expect_eq "$(jq -c "[.return[] | .\"dirty-bitmaps\"[]? | .name]" "$tmpdir/q.json")" "${2:-[]}" \
        "bitmaps after $1"
}

# ---- usage errors
expect_exit 2 "unknown option --bogus" "unknown option" full "$dir" --node disk0 --bogus
expect_exit 2 "unknown option -x" "unknown short option" list "$dir" -x
expect_exit 2 "--node is required" "full without --node" full "$tmpdir/nonode"
expect_exit 2 "unknown command 'frobnicate'" "unknown command" frobnicate "$dir"
expect_exit 2 "no command" "no command" --json
expect_exit 2 "--progress must be" "bad --progress" full "$dir" --node disk0 --progress fancy
expect_exit 2 "--request-size must be" "odd --request-size" \
    pull --from "$live" --into "$tmpdir/x.raw" --request-size 5000
expect_exit 2 "--from is required" "pull without --from" pull --into "$tmpdir/x.raw"
[ ! -e "$tmpdir/x.raw" ] || fail "a refused pull created its target"
server_clean "usage errors"

# ---- unknown node
expect_exit 1 "no node named 'nosuch'" "unknown node" full "$dir" --node nosuch
server_clean "unknown node"
[ ! -e "$dir/manifest.json" ] || fail "unknown node: a manifest was written"
expect_eq "$(find "$dir" -name '*.qcow2' -o -name '*.sums' -o -name '.fleece-scratch*' | wc -l)" 0 \
    "unknown node: files in DIR"

# ---- incremental without a chain
mkdir -p "$tmpdir/empty"
expect_exit 1 "holds no backup chain" "incremental into an empty DIR" incremental "$tmpdir/empty"
expect_exit 1 "" "incremental into a missing DIR" incremental "$tmpdir/missing"
expect_exit 1 "manifest.json" "verify of an empty DIR" verify "$tmpdir/empty"
server_clean "incremental without a chain"

# ---- a chain: full + 2 incrementals; full again into it
fb full "$dir" --node disk0 -q || fail "full backup failed"
bounded 60 qemu-io -f raw "$live" -c 'write -P 0x61 4M 1M' -c 'write -P 0x62 30M 64k' >/dev/null
fb incremental "$dir" -q || fail "incremental 1 failed"
cp "$img" "$tmpdir/at1.raw"
bounded 60 qemu-io -f raw "$live" -c 'write -P 0x71 8M 2M' -c 'write -P 0x72 63M 512k' >/dev/null
fb incremental "$dir" -q || fail "incremental 2 failed"
cp "$img" "$tmpdir/at2.raw"
active=$(mf .active_bitmap)
cp "$dir/manifest.json" "$tmpdir/manifest.before"
expect_exit 1 "already holds a backup chain" "full into a chain" full "$dir" --node disk0
cmp "$dir/manifest.json" "$tmpdir/manifest.before" >&2 || fail "refused full changed the manifest"
expect_eq "$(ls "$dir" | xargs)" "0000.full.qcow2 0000.sums 0001.inc.qcow2 0001.sums 0002.inc.qcow2 0002.sums manifest.json" \
    "DIR after the refused full"
server_clean "a refused full" "[\"$active\"]"
expect_exit 2 "backs up node 'disk0', not 'disk1'" "incremental naming another node" \
    incremental "$dir" --node disk1

# ---- restore refusals
: >"$tmpdir/exists.raw"
expect_exit 2 "exists; add --force" "restore onto an existing file" restore "$dir" --to "$tmpdir/exists.raw"
expect_eq "$(stat -c %s "$tmpdir/exists.raw")" 0 "the existing file is untouched"
expect_exit 2 "--at 3" "restore --at past the chain" restore "$dir" --at 3 --to "$tmpdir/r.raw"
fb restore "$dir" --at 1 --to "$tmpdir/exists.raw" --force -q || fail "restore --force"
cmp "$tmpdir/exists.raw" "$tmpdir/at1.raw" >&2 || fail "restore --force --at 1 != the disk then"

# ---- a corrupted data cluster in the last incremental
fb verify "$dir" -q || fail "verify of the intact chain"
last=$dir/0002.inc.qcow2
bounded 30 qemu-img map --output=json \
    "json:{\"driver\":\"qcow2\",\"file\":{\"driver\":\"file\",\"filename\":\"$last\"},\"backing\":null}" \
    >"$tmpdir/map.json"
host=$(jq '[.[] | select(.data and .depth == 0 and .offset != null)][0].offset' "$tmpdir/map.json")
guest=$(jq '[.[] | select(.data and .depth == 0 and .offset != null)][0].start' "$tmpdir/map.json")
[ "$host" != null ] && [ "$host" -gt 0 ] || fail "no data cluster in $last: $(cat "$tmpdir/map.json")"
"$PYTHON" - "$last" $((host + 4096)) <<'PY'
import sys
path, off = sys.argv[1], int(sys.argv[2])
with open(path, "r+b") as f:
    f.seek(off)
    b = bytearray(f.read(16))
    f.seek(off)
    f.write(bytes(x ^ 0xff for x in b))
PY
st=0
fb verify "$dir" >"$tmpdir/verify.out" 2>&1 || st=$?
expect_eq "$st" 3 "verify of a corrupted chain: exit status"
grep -q "^backup 2 0002.inc.qcow2: FAILED" "$tmpdir/verify.out" ||
    fail "verify does not name backup 2: $(cat "$tmpdir/verify.out")"
grep -q "first at offset $guest" "$tmpdir/verify.out" ||
    fail "verify does not name guest offset $guest: $(cat "$tmpdir/verify.out")"
grep -q "^backup 0 0000.full.qcow2: ok" "$tmpdir/verify.out" || fail "backup 0 not ok: $(cat "$tmpdir/verify.out")"
grep -q "^backup 1 0001.inc.qcow2: ok" "$tmpdir/verify.out" || fail "backup 1 not ok: $(cat "$tmpdir/verify.out")"
st=0
fb verify "$dir" --json >"$tmpdir/verify.json" 2>/dev/null || st=$?
expect_eq "$st" 3 "verify --json of a corrupted chain: exit status"
expect_eq "$(jq -c '[.ok, .chain_ok, [.backups[].ok]]' "$tmpdir/verify.json")" '[false,true,[true,true,false]]' \
    "verify --json"
st=0
fb restore "$dir" --to "$tmpdir/bad.raw" -q 2>"$tmpdir/err.txt" || st=$?
expect_eq "$st" 3 "restore of the corrupted point: exit status"
grep -q "differs from the backup" "$tmpdir/err.txt" || fail "restore mismatch message: $(cat "$tmpdir/err.txt")"
fb restore "$dir" --at 1 --to "$tmpdir/exists.raw" --force -q || fail "restore --at 1 after the damage"
cmp "$tmpdir/exists.raw" "$tmpdir/at1.raw" >&2 || fail "restore --at 1 after the damage != the disk then"

# ---- TLS-PSK
keys=$tmpdir/psk/keys.psk
make_psk_keys "$keys" alice
tls_sock=$tmpdir/tls.sock
tls_qmp=$tmpdir/tls-qmp.sock
cp "$tmpdir/at2.raw" "$tmpdir/tls.img"
start_fleeced --export "name=disk0,file=$tmpdir/tls.img,writable=on" --listen "unix:$tls_sock" \
    --tls-creds "psk:$tmpdir/psk" --qmp "unix:$tls_qmp" --log-level warn
tls_pid=$fleeced_pid
tls_uri="nbds+unix://alice@/disk0?socket=$tls_sock&tls-psk-file=$keys"
fb pull --from "$tls_uri" --into "$tmpdir/tls-pull.raw" --json >"$tmpdir/tls.json" ||
    fail "pull over TLS-PSK failed"
cmp "$tmpdir/tls-pull.raw" "$tmpdir/tls.img" >&2 || fail "pull over TLS-PSK != the image"
expect_eq "$(jq .virtual_size "$tmpdir/tls.json")" $size "TLS pull: virtual_size"
expect_exit 1 "TLS" "plaintext pull from a TLS-only server" \
    pull --from "nbd+unix:///disk0?socket=$tls_sock" --into "$tmpdir/plain.raw"
[ ! -e "$tmpdir/plain.raw" ] || fail "a refused pull created its target"
FLEECED_QMP=$tls_qmp fb full "$tmpdir/tls-backups" --node disk0 -q \
    --nbd "nbds+unix://alice@/?socket=$tls_sock&tls-psk-file=$keys" || fail "full backup over TLS-PSK"
fb restore "$tmpdir/tls-backups" --to "$tmpdir/tls-restore.raw" -q || fail "restore of the TLS backup"
cmp "$tmpdir/tls-restore.raw" "$tmpdir/tls.img" >&2 || fail "TLS full backup != the image"

for pid in "$tls_pid" "$main_pid"; do
    fleeced_alive "$pid" || fail "fleeced $pid died"
    stop_fleeced "$pid"
    expect_eq "$fleeced_status" 0 "fleeced exit status after SIGTERM"
done
echo "PASS: $test_name"

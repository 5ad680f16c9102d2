#!/usr/bin/env bash
# The main job: install, build, then back up a live disk end to end.
#
# Generates a sparse disk with data, serves it with fleeced (NBD + control
# socket), keeps a writer running against the live export, takes a full
# backup with fleece-backup, changes a few percent of the disk, takes two
# incremental backups, restores every point and proves with checksums that
# each restore equals the disk at its cut (captured from the fleece itself
# with nbdcopy at the moment of the cut), then prints a report. Cleans up
# after itself.
#
# Env: FLEECED_SKIP_INSTALL=1 (skip apt), DEMO_SIZE (default 1G),
#      DEMO_KEEP=1 (keep the work directory).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
[ "${FLEECED_SKIP_INSTALL:-0}" = 1 ] || bash scripts/install-deps.sh

echo "== building fleeced, fleecectl and fleece-backup (release)"
cmake --preset release >/dev/null
cmake --build --preset release --target fleeced fleecectl fleece-backup
bin=$root/build/release
fleeced=$bin/server/fleeced
fleecectl=$bin/tools/fleecectl
backup=$bin/tools/fleece-backup

work=$(mktemp -d "${TMPDIR:-/tmp}/fleeced-demo.XXXXXX")
pid="" writer=""
cleanup() {
  [ -n "$writer" ] && kill "$writer" 2>/dev/null && wait "$writer" 2>/dev/null || true
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  if [ "${DEMO_KEEP:-0}" = 1 ]; then echo "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

size=${DEMO_SIZE:-1G}
disk=$work/disk.raw
sock=$work/nbd.sock
export FLEECED_QMP=$work/qmp.sock
export FLEECED_NBD="nbd+unix:///?socket=$sock"
live="nbd+unix:///disk0?socket=$sock"
dir=$work/backups
start=$SECONDS

echo "== generating a sparse $size disk with data islands"
truncate -s "$size" "$disk"
for mib in 0 7 64 300 511; do
  head -c 8M /dev/urandom | dd of="$disk" bs=1M seek="$mib" conv=notrunc status=none
done
echo "   allocated: $(du -h "$disk" | cut -f1) of $(du -h --apparent-size "$disk" | cut -f1)"

echo "== starting fleeced (NBD on $sock, control socket $FLEECED_QMP)"
"$fleeced" --export "name=disk0,file=$disk,writable=on,description=demo disk" \
  --listen "unix:$sock" --qmp "unix:$FLEECED_QMP" --pidfile "$work/pid" --log-level warn &
pid=$!
for _ in $(seq 100); do [ -f "$work/pid" ] && break; sleep 0.1; done
[ -f "$work/pid" ] || { echo "fleeced did not start"; exit 1; }
nbdinfo --map "$live" | sed 's/^/   /'

# writes random 4-64 KiB blocks at random places until told to stop
# (PERCENT=p: instead, changes p% of the disk in scattered 64 KiB granules
# and exits)
write_random() {
  /usr/bin/python3 - "$live" "$@" <<'EOF'
import nbd, os, random, sys, time
uri = sys.argv[1]
h = nbd.NBD(); h.connect_uri(uri)
size = h.get_size()
if len(sys.argv) > 2:                       # a burst: p % of the disk
    gran = 65536
    n = int(size * float(sys.argv[2]) / 100 / gran)
    for g in random.sample(range(size // gran), n):
        h.pwrite(os.urandom(gran), g * gran)
    h.flush(); h.shutdown(); sys.exit(0)
deadline = time.time() + 600
while time.time() < deadline and not os.path.exists(os.environ["STOPFILE"]):
    n = random.choice([4096, 16384, 65536])
    off = random.randrange(0, size - n) // 4096 * 4096
    if random.random() < 0.15:
        h.zero(n, off)
    else:
        h.pwrite(os.urandom(n), off)
    time.sleep(0.01)
h.shutdown()
EOF
}

echo "== a writer keeps changing the live disk during every backup"
export STOPFILE=$work/stop-writer
write_random &
writer=$!

# The hook runs while the fleece is exported: it captures the disk exactly
# as it was at the cut, through the fleece, for the checks below.
hook='nbdcopy "$FLEECE_URI" '"$work"'/cut-$FLEECE_INDEX.raw && sha256sum < '"$work"'/cut-$FLEECE_INDEX.raw | cut -d" " -f1 > '"$work"'/cut-$FLEECE_INDEX.sha256'

echo "== full backup"
"$backup" full "$dir" --node disk0 --exec-at-cut "$hook" --progress none
echo "== changing 3% of the disk, then incremental backup 1"
write_random 3
"$backup" incremental "$dir" --exec-at-cut "$hook" --progress none
echo "== changing 2% of the disk, then incremental backup 2"
write_random 2
"$backup" incremental "$dir" --exec-at-cut "$hook" --progress none
touch "$STOPFILE"; wait "$writer"; writer=""

echo "== the chain"
"$backup" list "$dir" | sed 's/^/   /'
qemu-img info --backing-chain "$dir/0002.inc.qcow2" | grep -E '^(image|backing file):' | sed 's/^/   /'

echo "== verify: qemu-img check of every image, chain order, chunk digests"
"$backup" verify "$dir" | sed 's/^/   /'

echo "== restoring every point and comparing with the disk at its cut"
report=()
for i in 0 1 2; do
  "$backup" restore "$dir" --at "$i" --to "$work/restore-$i.raw" -q
  got=$(sha256sum < "$work/restore-$i.raw" | cut -d' ' -f1)
  want=$(cat "$work/cut-$i.sha256")
  if [ "$got" != "$want" ]; then
    echo "   backup $i: restore $got != disk at cut $want: MISMATCH"; exit 1
  fi
  echo "   backup $i: sha256 $got = disk at its cut"
  rm -f "$work/restore-$i.raw" "$work/cut-$i.raw"
done

echo "== report"
/usr/bin/python3 - "$dir/manifest.json" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1]))
gib = 1 << 30; mib = 1 << 20
print(f"   disk: {m['virtual_size'] / gib:.2f} GiB, node {m['node']}, chunk {m['chunk_size'] // 1024} KiB")
print(f"   {'backup':<16}{'pulled':>12}{'zeroed':>12}{'dirty':>12}{'pull s':>9}{'total s':>9}{'file':>12}")
for b in m["backups"]:
    dirty = f"{b['dirty_bytes'] / mib:.1f} MiB" if b["kind"] == "incremental" else "-"
    print(f"   {str(b['index']) + ' ' + b['kind']:<16}{b['bytes_pulled'] / mib:>8.1f} MiB"
          f"{b['bytes_zeroed'] / mib:>8.1f} MiB{dirty:>12}{b['pull_seconds']:>9.2f}{b['seconds']:>9.2f}"
          f"{b['file_size'] / mib:>8.1f} MiB")
EOF
echo "   no fleece left behind: $("$fleecectl" exports | grep -c fleece-backup || true) fleece exports," \
  "bitmaps: $("$fleecectl" bitmaps | tail -n +2 | awk '{print $2}' | tr '\n' ' ')"

echo "== stopping fleeced (SIGTERM)"
kill -TERM "$pid"; wait "$pid"; pid=""
echo "demo finished in $((SECONDS - start)) s: every restore equals the disk at its cut"

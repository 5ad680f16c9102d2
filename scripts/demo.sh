#!/usr/bin/env bash
# The main job: install, build, then serve a generated sparse disk with
# fleeced and use it with real NBD clients (nbdinfo, nbdcopy, qemu-img,
# qemu-io), proving with checksums that what comes back is what was written.
# Cleans up after itself. Env: FLEECED_SKIP_INSTALL=1, DEMO_SIZE (default 1G).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
[ "${FLEECED_SKIP_INSTALL:-0}" = 1 ] || bash scripts/install-deps.sh

echo "== building fleeced (release)"
cmake --preset release >/dev/null
cmake --build --preset release --target fleeced
fleeced=$root/build/release/server/fleeced

work=$(mktemp -d "${TMPDIR:-/tmp}/fleeced-demo.XXXXXX")
pid=""
cleanup() {
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"; for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

size=${DEMO_SIZE:-1G}
disk=$work/disk.raw
sock=$work/nbd.sock
uri="nbd+unix:///disk0?socket=$sock"
start=$SECONDS

echo "== generating a sparse $size disk with data islands"
truncate -s "$size" "$disk"
for mib in 0 7 64 300 511; do
  head -c 4M /dev/urandom | dd of="$disk" bs=1M seek="$mib" conv=notrunc status=none
done
echo "   allocated: $(du -h "$disk" | cut -f1) of $(du -h --apparent-size "$disk" | cut -f1)"

echo "== starting fleeced"
"$fleeced" --export "name=disk0,file=$disk,writable=on,description=demo disk" \
  --listen "unix:$sock" --pidfile "$work/pid" --log-level warn &
pid=$!
for _ in $(seq 100); do [ -f "$work/pid" ] && break; sleep 0.1; done
[ -f "$work/pid" ] || { echo "fleeced did not start"; exit 1; }

echo "== nbdinfo --list"
nbdinfo --list "nbd+unix:///?socket=$sock" | sed 's/^/   /'
echo "== nbdinfo --map (base:allocation: only the islands are data)"
nbdinfo --map "$uri" | sed 's/^/   /'

echo "== nbdcopy the export to a file and compare checksums"
nbdcopy -p "$uri" "$work/copy.raw" 2>/dev/null || nbdcopy "$uri" "$work/copy.raw"
a=$(sha256sum < "$disk" | cut -d' ' -f1); b=$(sha256sum < "$work/copy.raw" | cut -d' ' -f1)
echo "   image: $a"; echo "   copy:  $b"
[ "$a" = "$b" ] || { echo "MISMATCH"; exit 1; }

echo "== writing through NBD with qemu-io, reading the pattern back"
qemu-io -f raw "$uri" -c 'write -P 0x5a 100M 1M' -c 'read -P 0x5a 100M 1M' | sed 's/^/   /'
echo "== qemu-img compare: NBD export vs the image file"
qemu-img compare -f raw -F raw "$uri" "$disk" | sed 's/^/   /'

echo "== stopping fleeced (SIGTERM)"
kill -TERM "$pid"; wait "$pid"; pid=""
echo "demo finished in $((SECONDS - start)) s: every check passed"

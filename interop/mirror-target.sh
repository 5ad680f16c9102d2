#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# QEMU mirrors into fleeced (control-api.md 9.5.5): qemu-storage-daemon runs
# blockdev-mirror sync=full from a raw source image into a writable fleeced
# export over NBD, the source is written to after BLOCK_JOB_READY, and the
# job is completed.  Then the target image must equal the source, and the
# bitmaps on the target must hold exactly the granules QEMU's requests
# touched (fleeced runs with --log-level debug, one line per request).
# Two rounds: copy-mode background into an empty target, copy-mode
# write-blocking into a target full of junk.  See py/mirror_target.py.
source "$(dirname "$0")/functions.sh"
requires qemu-storage-daemon qemu-img cmp
requires_python_nbd

size=$((48 * 1048576 + 20 * 1024))    # not a multiple of 64 KiB
# Data islands (aligned and not), holes, and a last granule with data; each
# round's copy also gets allocated zeroes at 30M..32M (cp --sparse=always
# would turn them into a hole).
make_pattern_image "$tmpdir/base.img" $size \
    0:64k $((1048576 + 4096)):8k 3M:5M $((20 * 1048576)):102400 \
    $((size - 8192)):8k

qsd_pid=
_stop_qsd() {
    if [ -n "$qsd_pid" ]; then
        kill "$qsd_pid" 2>/dev/null || true
        wait "$qsd_pid" 2>/dev/null || true
        qsd_pid=
    fi
}
cleanup_fn _stop_qsd

# _qsd_gone PID: true once the process has exited (zombie or reaped).  bash
# may reap it between the two tests, hence the final look at /proc.
_qsd_gone() {
    ! kill -0 "$1" 2>/dev/null || _is_zombie "$1" || [ ! -e "/proc/$1" ]
}

# start_qsd N IMAGE: qemu-storage-daemon with QMP on $tmpdir/qN.qmp, nodes
# src-file/src on IMAGE, and a writable NBD export "src" on $tmpdir/qN.sock.
start_qsd() {
    local n=$1 img=$2 i
    rm -f "$tmpdir/q$n.pid"
    qemu-storage-daemon \
        --chardev "socket,path=$tmpdir/q$n.qmp,server=on,wait=off,id=m" \
        --monitor chardev=m \
        --blockdev "driver=file,node-name=src-file,filename=$img" \
        --blockdev driver=raw,node-name=src,file=src-file \
        --nbd-server "addr.type=unix,addr.path=$tmpdir/q$n.sock" \
        --export type=nbd,id=src,node-name=src,name=src,writable=on \
        --pidfile "$tmpdir/q$n.pid" \
        </dev/null >"$tmpdir/qsd$n.log" 2>&1 &
    qsd_pid=$!
    for ((i = 0; i < 100; i++)); do
        [ -s "$tmpdir/q$n.pid" ] && return 0
        if _qsd_gone "$qsd_pid"; then
            cat "$tmpdir/qsd$n.log" >&2
            qsd_pid=
            fail "qemu-storage-daemon exited during startup"
        fi
        sleep 0.1
    done
    fail "qemu-storage-daemon did not write its pidfile within 10 s"
}

# _qsd_diag N: where a hung qemu-storage-daemon is stuck (for the report)
_qsd_diag() {
    local t
    echo "---- qsd$1.log ----" >&2
    cat "$tmpdir/qsd$1.log" >&2
    for t in /proc/"$qsd_pid"/task/*; do
        [ -e "$t" ] || continue
        echo "thread $(basename "$t") $(cat "$t/comm" 2>/dev/null)" \
            "wchan=$(cat "$t/wchan" 2>/dev/null)" >&2
    done
    if command -v gdb >/dev/null 2>&1; then
        bounded 20 gdb -p "$qsd_pid" -batch -ex 'thread apply all bt' \
            </dev/null >&2 2>&1 || true
    fi
}

# wait_qsd_exit N: after QMP quit, QSD must be gone within 10 s with status 0
wait_qsd_exit() {
    local n=$1 i st=0 gone=0
    for ((i = 0; i < 100; i++)); do
        if _qsd_gone "$qsd_pid"; then
            gone=1
            break
        fi
        sleep 0.1
    done
    if [ "$gone" = 0 ]; then
        _qsd_diag "$n"
        fail "qemu-storage-daemon still running 10 s after quit"
    fi
    wait "$qsd_pid" || st=$?
    qsd_pid=
    if [ "$st" != 0 ]; then
        cat "$tmpdir/qsd$n.log" >&2
        fail "qemu-storage-daemon exited with status $st"
    fi
}

# round N COPY-MODE empty|junk
round() {
    local n=$1 mode=$2 init=$3
    local src=$tmpdir/src$n.img tgt=$tmpdir/tgt$n.img
    echo "== round $n: copy-mode $mode, $init target"
    cp --sparse=always "$tmpdir/base.img" "$src"
    dd if=/dev/zero of="$src" bs=1M seek=30 count=2 conv=notrunc,fsync status=none
    if [ "$init" = junk ]; then
        head -c $size /dev/urandom >"$tgt"
    else
        truncate -s $size "$tgt"
    fi
    start_fleeced --log-level debug \
        --export "name=disk0,file=$tgt,writable=on" \
        --listen "unix:$tmpdir/f$n.sock" --qmp "unix:$tmpdir/f$n.qmp"
    local fpid=$fleeced_pid flog=$fleeced_log
    start_qsd "$n" "$src"
    local args=(--size $size --copy-mode "$mode"
        --fleeced-qmp "$tmpdir/f$n.qmp" --fleeced-nbd "$tmpdir/f$n.sock"
        --fleeced-log "$flog" --bitmap-nbd "$tmpdir/b$n.sock"
        --qsd-qmp "$tmpdir/q$n.qmp" --qsd-nbd "$tmpdir/q$n.sock"
        --qsd-pid "$qsd_pid" --state "$tmpdir/state$n.json")

    if ! bounded 60 "$PYTHON" "$interop_dir/py/mirror_target.py" mirror "${args[@]}"; then
        echo "---- qsd$n.log ----" >&2
        cat "$tmpdir/qsd$n.log" >&2
        fail "round $n ($mode): mirror phase failed"
    fi
    wait_qsd_exit "$n"
    fleeced_alive "$fpid" || fail "round $n: fleeced died during the mirror"

    # The target equals the (post-write) source: in the file, and over NBD.
    cmp "$src" "$tgt" >&2 || fail "round $n ($mode): target image differs from source"
    expect_status 0 "round $n: qemu-img compare source vs fleeced export" \
        bounded 30 qemu-img compare -q -f raw -F raw "$src" \
        "$(nbd_unix_uri disk0 "$tmpdir/f$n.sock")"

    bounded 60 "$PYTHON" "$interop_dir/py/mirror_target.py" verify "${args[@]}" ||
        fail "round $n ($mode): bitmap checks failed"

    stop_fleeced "$fpid"
    expect_eq "$fleeced_status" 0 "round $n: fleeced exit status after SIGTERM"
}

round 1 background empty
round 2 write-blocking junk
echo "PASS: $test_name"

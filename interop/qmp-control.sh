#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# The QMP control socket (shared control-api.md §1-4, §9.3-9.4), spoken raw
# by py/qmp_control.py: greeting and negotiation, id echo, a JSON stream that
# is not line based, malformed input, argument errors with QEMU 7.2's texts,
# blockdev-add/-del, nbd-server-start/-stop, block-export-add/-del (safe and
# hard, BLOCK_EXPORT_DELETED), dirty bitmaps and their recording, merge,
# transaction rollback, reconnects, and quit (exit status 0).  A second
# daemon checks the nodes a command-line --export creates.
source "$(dirname "$0")/functions.sh"
requires_python_nbd
_require_fleeced_binary

# after_helper PID HELPER_STATUS WHAT: when the helper passed it ended with
# quit, so PID must exit by itself within 10 s with status 0; when it failed,
# only report how the server is doing.
failed=0
after_helper() {
    local pid=$1 st=$2 what=$3 i
    if [ "$st" != 0 ]; then
        echo "FAIL: $test_name: py/qmp_control.py ($what) reported failures (see above)" >&2
        failed=1
        if ! fleeced_alive "$pid"; then
            stop_fleeced "$pid"     # already gone: only collects the exit status
            echo "fleeced ($what) exited with status $fleeced_status" >&2
        fi
        return
    fi
    for ((i = 0; i < 100; i++)); do
        fleeced_alive "$pid" || break
        sleep 0.1
    done
    if fleeced_alive "$pid"; then
        echo "FAIL: $test_name: fleeced ($what) still running 10 s after quit" >&2
        failed=1
        return
    fi
    stop_fleeced "$pid"             # already gone: only collects the exit status
    if [ "$fleeced_status" != 0 ]; then
        echo "FAIL: $test_name: fleeced ($what) exited with status $fleeced_status after quit" >&2
        failed=1
    fi
}

# ---- a daemon with only the control socket
qmp=$tmpdir/qmp.sock
start_fleeced --qmp "unix:$qmp"
main_pid=$fleeced_pid
st=0
bounded 60 "$PYTHON" "$interop_dir/py/qmp_control.py" --qmp "$qmp" --dir "$tmpdir" \
    ${QMP_ONLY:+--only "$QMP_ONLY"} || st=$?
if [ -n "${QMP_ONLY:-}" ] && [[ ",$QMP_ONLY," != *,quit,* ]]; then
    [ "$st" = 0 ] || fail "py/qmp_control.py --only $QMP_ONLY reported failures"
    echo "PASS: $test_name (only $QMP_ONLY)"
    exit 0
fi
after_helper "$main_pid" "$st" "control socket only"
if [ "$st" = 0 ] && [ -e "$qmp" ]; then
    echo "FAIL: $test_name: control socket $qmp left behind after quit" >&2
    failed=1
fi

# ---- a daemon with a command-line export: nodes disk0-file and disk0
truncate -s 4M "$tmpdir/cmd.img"
qmp2=$tmpdir/qmp2.sock
start_fleeced --qmp "unix:$qmp2" --export "name=disk0,file=$tmpdir/cmd.img,writable=on" \
    --listen "unix:$tmpdir/nbd-cmd.sock"
cmd_pid=$fleeced_pid
st=0
bounded 30 "$PYTHON" "$interop_dir/py/qmp_control.py" --mode cmdline --qmp "$qmp2" \
    --dir "$tmpdir" --image "$tmpdir/cmd.img" --nbd-socket "$tmpdir/nbd-cmd.sock" || st=$?
after_helper "$cmd_pid" "$st" "command-line export"

[ "$failed" = 0 ] || exit 1
echo "PASS: $test_name"

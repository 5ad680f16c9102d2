#!/usr/bin/env bash
# bench/run.sh — compare fleeced against qemu-nbd, qemu-storage-daemon and
# nbdkit on one fully allocated raw image.  See bench/README.md.
#
#   bench/run.sh            full run (3 rounds, 5 s fio runs, 1 GiB image)
#   bench/run.sh --quick    smoke run (1 round, 2 s, 256 MiB)
#
# Environment (all optional):
#   BENCH_SIZE=1G           image size (bytes or K/M/G/T suffix, binary)
#   BENCH_ROUNDS=3          rounds; servers alternate within each round
#   BENCH_SECS=5            fio runtime per random-I/O run (seconds)
#   BENCH_HANDSHAKES=1000   connections per handshake run
#   BENCH_SERVERS=fleeced,qemu-nbd,qsd,nbdkit
#   BENCH_ONLY=             comma list of metrics or metric prefixes
#                           (e.g. "seqread,handshake"; "ceiling" = socket ceiling only)
#   FLEECED=build/release/server/fleeced   fleeced binary
#   BENCH_OUT=bench/results/latest.json
set -uo pipefail # no -e: a failed measurement is recorded as n/a, not fatal
export LC_ALL=C

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
PY=/usr/bin/python3 # system python: has the libnbd "nbd" module (pyenv's does not)

usage() { sed -n '2,18p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() { echo "bench: error: $*" >&2; exit 2; }
warn() { echo "bench: warning: $*" >&2; }
note() { echo "bench: $*" >&2; }

QUICK=0
for arg in "$@"; do
    case "$arg" in
    --quick) QUICK=1 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$arg' (try --help)" ;;
    esac
done

if ((QUICK)); then d_rounds=1 d_secs=2 d_size=256M; else d_rounds=3 d_secs=5 d_size=1G; fi
ROUNDS=${BENCH_ROUNDS:-$d_rounds}
SECS=${BENCH_SECS:-$d_secs}
SIZE_SPEC=${BENCH_SIZE:-$d_size}
HANDSHAKES=${BENCH_HANDSHAKES:-1000}
SERVERS_SPEC=${BENCH_SERVERS:-fleeced,qemu-nbd,qsd,nbdkit}
ONLY=${BENCH_ONLY:-}
FLEECED=${FLEECED:-$ROOT/build/release/server/fleeced}
OUT_JSON=${BENCH_OUT:-$HERE/results/latest.json}
WORK=$HERE/work

[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "BENCH_ROUNDS must be a positive integer"
[[ $SECS =~ ^[1-9][0-9]*$ ]] || die "BENCH_SECS must be a positive integer"
[[ $HANDSHAKES =~ ^[1-9][0-9]*$ ]] || die "BENCH_HANDSHAKES must be a positive integer"
s=${SIZE_SPEC%iB}; s=${s%B}; s=${s^^}
SIZE=$(numfmt --from=iec "$s" 2>/dev/null) || die "bad BENCH_SIZE '$SIZE_SPEC'"
((SIZE >= 1048576 && SIZE % 4096 == 0)) || die "BENCH_SIZE must be >= 1 MiB and a multiple of 4096"

for tool in nbdcopy nbdinfo fio jq taskset timeout cc numfmt; do
    command -v "$tool" >/dev/null || die "required tool '$tool' not found"
done
if ! [[ -x $PY ]] || ! "$PY" -c 'import nbd' 2>/dev/null; then
    die "$PY with the libnbd python module (python3-libnbd) is required"
fi

# ---------------------------------------------------------------- metrics --
METRICS=(seqread_unix seqread_unix_c1 seqread_tcp randread_qd1 randread_qd32
    randwrite_qd1 randwrite_qd32 seqwrite_unix handshake randread_qd1_pinned)
declare -A M_UNIT M_DESC M_TR M_PIN M_CPU_UNIT
defm() {
    M_UNIT[$1]=$2; M_TR[$1]=$3; M_PIN[$1]=$4; M_DESC[$1]=$5
    case $2 in GiB/s) M_CPU_UNIT[$1]=ms/GiB ;; IOPS) M_CPU_UNIT[$1]=us/IO ;; *) M_CPU_UNIT[$1]=us/conn ;; esac
}
defm seqread_unix GiB/s unix 0 "nbdcopy URI null:, unix socket, default connections (multi-conn up to 4)"
defm seqread_unix_c1 GiB/s unix 0 "nbdcopy --connections=1 URI null:, unix socket"
defm seqread_tcp GiB/s tcp 0 "nbdcopy URI null:, TCP 127.0.0.1, default connections"
defm randread_qd1 IOPS unix 0 "fio nbd engine, 4 KiB randread, iodepth 1, unix socket"
defm randread_qd32 IOPS unix 0 "fio nbd engine, 4 KiB randread, iodepth 32, unix socket"
defm randwrite_qd1 IOPS unix 0 "fio nbd engine, 4 KiB randwrite, iodepth 1, unix socket"
defm randwrite_qd32 IOPS unix 0 "fio nbd engine, 4 KiB randwrite, iodepth 32, unix socket"
defm seqwrite_unix GiB/s unix 0 "nbdcopy local-file -> URI, unix socket, default connections, no flush"
defm handshake conn/s unix 0 "sequential connect_uri+shutdown in one python process (libnbd)"
defm randread_qd1_pinned IOPS unix 1 "fio 4 KiB randread QD1, server and fio both taskset -c 0"

# BENCH_ONLY item matches a metric by exact name, or (if the item is not
# itself a metric name) as a prefix: "seqread" = all seqread_* rows.
matches() { # metric item
    [[ $1 == "$2" ]] && return 0
    [[ -z ${M_UNIT[$2]+x} && $1 == "$2"_* ]]
}
selected() { # metric -> 0 if selected by BENCH_ONLY
    local m=$1 item
    [[ -z $ONLY ]] && return 0
    IFS=, read -ra items <<<"$ONLY"
    for item in "${items[@]}"; do
        matches "$m" "$item" && return 0
    done
    return 1
}
SEL_METRICS=()
for m in "${METRICS[@]}"; do selected "$m" && SEL_METRICS+=("$m"); done
RUN_CEILING=0
if [[ -z $ONLY || ,$ONLY, == *,ceiling,* ]]; then RUN_CEILING=1; fi
for m in "${SEL_METRICS[@]}"; do [[ $m == seqread_unix* ]] && RUN_CEILING=1; done
if [[ -n $ONLY ]]; then
    IFS=, read -ra items <<<"$ONLY"
    for item in "${items[@]}"; do
        [[ $item == ceiling ]] && continue
        ok=0
        for m in "${METRICS[@]}"; do matches "$m" "$item" && ok=1; done
        ((ok)) || die "BENCH_ONLY: unknown metric '$item' (known: ${METRICS[*]} ceiling)"
    done
fi

# ---------------------------------------------------------------- servers --
SERVERS=()
SKIPPED=()
IFS=, read -ra req <<<"$SERVERS_SPEC"
for s in "${req[@]}"; do
    [[ $s == qemu-storage-daemon ]] && s=qsd
    case $s in
    fleeced)
        if [[ -x $FLEECED ]]; then SERVERS+=(fleeced); else
            warn "fleeced binary not found at $FLEECED: fleeced rows skipped"; SKIPPED+=(fleeced); fi ;;
    qemu-nbd | qsd | nbdkit)
        bin=$s; [[ $s == qsd ]] && bin=qemu-storage-daemon
        if command -v "$bin" >/dev/null; then SERVERS+=("$s"); else
            warn "$bin not installed: $s rows skipped"; SKIPPED+=("$s"); fi ;;
    "") ;;
    *) die "BENCH_SERVERS: unknown server '$s' (known: fleeced qemu-nbd qsd nbdkit)" ;;
    esac
done
((${#SERVERS[@]})) || die "no servers to run"

# ------------------------------------------------------------ run state ----
mkdir -p "$WORK" || die "cannot create $WORK"
# Sockets and logs live in a short /tmp path (sun_path is limited to 108 bytes).
RUN=$(mktemp -d /tmp/fleeced-bench.XXXXXX) || die "mktemp failed"
LOG=$RUN/bench.log
SRV_PID=""
SRV_SOCK=""
SRV_NAME=""
URI=""

stop_server() {
    [[ -n $SRV_PID ]] || return 0
    local i st
    kill -TERM "$SRV_PID" 2>/dev/null
    for ((i = 0; i < 50; i++)); do
        kill -0 "$SRV_PID" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$SRV_PID" 2>/dev/null; then
        warn "$SRV_NAME (pid $SRV_PID) still running 5 s after SIGTERM; sending SIGKILL"
        kill -KILL "$SRV_PID" 2>/dev/null
    fi
    wait "$SRV_PID" 2>/dev/null
    st=$?
    if [[ $SRV_NAME == fleeced && $st -ne 0 ]]; then
        warn "fleeced exited with status $st after SIGTERM (contract: 0)"
    fi
    SRV_PID=""
    [[ -n $SRV_SOCK ]] && rm -f "$SRV_SOCK"
    SRV_SOCK=""
}

cleanup() {
    stop_server
    if [[ -d $RUN ]]; then
        find "$RUN" -type s -delete 2>/dev/null
        rm -rf "$WORK/last-run"
        cp -r "$RUN" "$WORK/last-run" 2>/dev/null
        rm -rf "$RUN"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() {
    "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# start_server NAME unix|tcp PIN(0|1): sets SRV_PID, SRV_SOCK, URI
start_server() {
    local name=$1 tr=$2 pin=$3 sock=$RUN/$1.sock port i
    local -a pre=() cmd=()
    rm -f "$sock"
    port=$(free_port) || return 1
    ((pin)) && pre=(taskset -c 0)
    case $name in
    fleeced)
        # fleeced can listen on both at once: always give it both.
        cmd=("$FLEECED" --export "name=disk0,file=$IMG,writable=on"
            --listen "unix:$sock" --listen "tcp:127.0.0.1:$port" --log-level warn) ;;
    qemu-nbd)
        # -t: persistent (otherwise qemu-nbd exits after the first client leaves)
        cmd=(qemu-nbd -f raw -x disk0 --cache=writeback --aio=threads -e 0 -t)
        if [[ $tr == unix ]]; then cmd+=(-k "$sock"); else cmd+=(-b 127.0.0.1 -p "$port"); fi
        cmd+=("$IMG") ;;
    qsd)
        local addr="addr.type=unix,addr.path=$sock"
        [[ $tr == tcp ]] && addr="addr.type=inet,addr.host=127.0.0.1,addr.port=$port"
        # shellcheck disable=SC2054 # commas are qemu option syntax
        cmd=(qemu-storage-daemon
            --blockdev "driver=file,node-name=f,filename=$IMG,cache.direct=off"
            --blockdev driver=raw,node-name=disk0,file=f
            --nbd-server "$addr"
            --export type=nbd,id=e,node-name=disk0,name=disk0,writable=on) ;;
    nbdkit)
        # -f: stay in the foreground so $! is the server's pid
        cmd=(nbdkit -f -e disk0)
        if [[ $tr == unix ]]; then cmd+=(-U "$sock"); else cmd+=(-p "$port" -i 127.0.0.1); fi
        cmd+=(file "$IMG") ;;
    esac
    echo "== start $name ($tr pin=$pin): ${pre[*]} ${cmd[*]}" >>"$LOG"
    "${pre[@]}" "${cmd[@]}" >>"$LOG" 2>&1 &
    SRV_PID=$!
    SRV_NAME=$name
    SRV_SOCK=$sock
    if [[ $tr == unix ]]; then URI="nbd+unix:///disk0?socket=$sock"; else URI="nbd://127.0.0.1:$port/disk0"; fi
    for ((i = 0; i < 200; i++)); do # <= ~10-20 s
        if ! kill -0 "$SRV_PID" 2>/dev/null; then
            warn "$name exited during startup (see $WORK/last-run/bench.log)"
            wait "$SRV_PID" 2>/dev/null
            SRV_PID=""
            return 1
        fi
        if [[ $tr == tcp || -S $sock ]] && timeout 2 nbdinfo --size "$URI" >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.05
    done
    warn "$name did not become ready"
    stop_server
    return 1
}

# ------------------------------------------------------------ measurements --
BOUND=$((60 + SIZE / (8 * 1024 * 1024))) # per-copy timeout: >= 8 MiB/s or fail

# Every m_* prints "VALUE WORK": WORK is what the server did (GiB moved, I/Os
# completed, connections served), used for the server CPU cost per unit.
gib_per_s() { awk -v b="$SIZE" -v a="$1" -v c="$2" 'BEGIN { printf "%.4f %.6f\n", b / (c - a) / 1073741824, b / 1073741824 }'; }

# utime+stime of the server process (all threads), in clock ticks
cpu_ticks() { [[ -r /proc/$1/stat ]] && awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }
CLK_TCK=$(getconf CLK_TCK)

m_seqread() { # extra nbdcopy args...
    local t0 t1
    t0=$EPOCHREALTIME
    timeout "$BOUND" nbdcopy "$@" "$URI" null: >>"$LOG" 2>&1 || return 1
    t1=$EPOCHREALTIME
    gib_per_s "$t0" "$t1"
}

m_seqwrite() {
    local t0 t1
    t0=$EPOCHREALTIME
    timeout "$BOUND" nbdcopy "$SRC" "$URI" >>"$LOG" 2>&1 || return 1
    t1=$EPOCHREALTIME
    gib_per_s "$t0" "$t1"
}

m_fio() { # rw qd pin
    local rw=$1 qd=$2 pin=$3 dir=read out=$RUN/fio.json
    local -a pre=()
    [[ $rw == randwrite ]] && dir="write"
    ((pin)) && pre=(taskset -c 0)
    rm -f "$out"
    timeout $((SECS + 60)) "${pre[@]}" fio --name=bench --ioengine=nbd --uri="$URI" \
        --rw="$rw" --bs=4k --iodepth="$qd" --time_based --runtime="$SECS" --direct=0 \
        --output-format=json --output="$out" >>"$LOG" 2>&1 || return 1
    # tolerate stray non-JSON lines before the document
    sed -n '/^{/,$p' "$out" | jq -er "if .jobs[0].error == 0 and .jobs[0].$dir.iops > 0
        then \"\\(.jobs[0].$dir.iops) \\(.jobs[0].$dir.total_ios)\" else error(\"fio failed\") end" 2>>"$LOG"
}

m_handshake() {
    local v
    v=$(timeout 300 "$PY" "$HERE/handshake.py" "$URI" "$HANDSHAKES" 240 2>>"$LOG") || return 1
    echo "$v $HANDSHAKES"
}

measure() { # metric
    case $1 in
    seqread_unix | seqread_tcp) m_seqread ;;
    seqread_unix_c1) m_seqread --connections=1 ;;
    randread_qd1) m_fio randread 1 0 ;;
    randread_qd32) m_fio randread 32 0 ;;
    randwrite_qd1) m_fio randwrite 1 0 ;;
    randwrite_qd32) m_fio randwrite 32 0 ;;
    seqwrite_unix) m_seqwrite ;;
    handshake) m_handshake ;;
    randread_qd1_pinned) m_fio randread 1 1 ;;
    *) return 1 ;;
    esac
}

run_one() { # metric server round
    local m=$1 s=$2 r=$3 val=nan work="" out c0 c1 cpu=nan
    if start_server "$s" "${M_TR[$m]}" "${M_PIN[$m]}"; then
        echo "== measure $m on $s (round $r) uri=$URI" >>"$LOG"
        c0=$(cpu_ticks "$SRV_PID")
        if out=$(measure "$m"); then read -r val work <<<"$out"; fi
        c1=$(cpu_ticks "$SRV_PID")
        [[ -n $val ]] || val=nan
        if [[ $val != nan && -n $c0 && -n $c1 && -n $work ]]; then
            # server CPU per unit of work: ms/GiB, us/IO, us/conn
            cpu=$(awk -v a="$c0" -v b="$c1" -v t="$CLK_TCK" -v w="$work" -v u="${M_CPU_UNIT[$m]}" \
                'BEGIN { s = (b - a) / t; printf "%.3f\n", (u == "ms/GiB" ? s * 1e3 : s * 1e6) / w }')
        fi
        if ! kill -0 "$SRV_PID" 2>/dev/null; then
            local st
            wait "$SRV_PID" 2>/dev/null
            st=$?
            ((st > 128)) && st="$st (signal $((st - 128)))"
            warn "$s DIED during $m (round $r), exit status $st; see $WORK/last-run/bench.log"
            echo "== $s died during $m, exit status $st" >>"$LOG"
            SRV_PID=""
            val=nan
        fi
        stop_server
    else
        val=nan
    fi
    # keep dirty page-cache writeback from leaking into the next row
    [[ $m == *write* ]] && sync "$IMG"
    [[ $val == nan ]] && warn "$m on $s (round $r) failed; see $WORK/last-run/bench.log"
    [[ $val == nan ]] && cpu=nan
    printf '%s\t%s\t%s\t%s\t%s\n' "$m" "$s" "$r" "$val" "$cpu" >>"$RUN/samples.tsv"
    printf 'bench: [round %d/%d] %-20s %-9s %12.3f %-7s server CPU %9.2f %s\n' \
        "$r" "$ROUNDS" "$m" "$s" "$val" "${M_UNIT[$m]}" "$cpu" "${M_CPU_UNIT[$m]}" >&2
}

# ------------------------------------------------------------------ image --
IMG=$WORK/image-$SIZE.raw
SRC=$WORK/source-$SIZE.raw
if [[ ! -f $IMG || $(stat -c %s "$IMG") -ne $SIZE || ! -f $SRC || $(stat -c %s "$SRC") -ne $SIZE ]]; then
    note "generating $SIZE-byte random image in $WORK (once)"
    rm -f "$IMG" "$SRC"
    { head -c "$SIZE" /dev/urandom >"$IMG.tmp" && mv "$IMG.tmp" "$IMG"; } || die "image generation failed"
    { cp --sparse=never "$IMG" "$SRC.tmp" && mv "$SRC.tmp" "$SRC"; } || die "source copy failed"
    sync "$IMG" "$SRC"
fi
case $IMG in *,*) die "image path must not contain ',' (qemu/fleeced option syntax)" ;; esac

# ---------------------------------------------------------------- config ---
{
    printf 'size_bytes\t%s\n' "$SIZE"
    printf 'rounds\t%s\n' "$ROUNDS"
    printf 'secs\t%s\n' "$SECS"
    printf 'handshakes\t%s\n' "$HANDSHAKES"
    printf 'servers\t%s\n' "$(IFS=,; echo "${SERVERS[*]}")"
    printf 'skipped_servers\t%s\n' "$(IFS=,; echo "${SKIPPED[*]}")"
    printf 'metrics\t%s\n' "$(IFS=,; echo "${SEL_METRICS[*]}")"
    printf 'quick\t%s\n' "$QUICK"
    printf 'date\t%s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    printf 'cpus\t%s\n' "$(nproc)"
    printf 'cpu_model\t%s\n' "$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)"
    printf 'kernel\t%s\n' "$(uname -r)"
    printf 'loadavg_start\t%s\n' "$(cut -d' ' -f1-3 /proc/loadavg)"
    printf 'image\t%s\n' "$IMG"
    [[ " ${SERVERS[*]} " == *" fleeced "* ]] && printf 'fleeced_version\t%s\n' "$("$FLEECED" --version 2>&1 | head -1)"
    printf 'qemu_nbd_version\t%s\n' "$(qemu-nbd --version 2>/dev/null | head -1)"
    printf 'nbdkit_version\t%s\n' "$(nbdkit --version 2>/dev/null | head -1)"
    printf 'nbdcopy_version\t%s\n' "$(nbdcopy --version 2>/dev/null | head -1)"
    printf 'fio_version\t%s\n' "$(fio --version 2>/dev/null)"
} >"$RUN/config.tsv"
for m in "${METRICS[@]}"; do
    printf '%s\t%s\t%s\t%s\n' "$m" "${M_UNIT[$m]}" "${M_DESC[$m]}" "${M_CPU_UNIT[$m]}"
done >"$RUN/metrics.tsv"
: >"$RUN/samples.tsv"

load1=$(cut -d' ' -f1 /proc/loadavg)
if awk -v l="$load1" 'BEGIN { exit !(l > 0.5) }'; then
    warn "1-min load average is $load1: something else is using the CPUs; expect noisy numbers"
fi

# ---------------------------------------------------------------- ceiling --
if ((RUN_CEILING)); then
    CEIL=$WORK/sockceil
    if [[ ! -x $CEIL || $HERE/sockceil.c -nt $CEIL ]]; then
        cc -O2 -o "$CEIL" "$HERE/sockceil.c" || die "cannot compile sockceil.c"
    fi
fi
ceil_bytes=$((2 << 30))
((QUICK)) && ceil_bytes=$((1 << 30))
measure_ceiling() { # 3 runs per round, interleaved with the servers' rounds
    ((RUN_CEILING)) || return 0
    local i v
    for ((i = 0; i < 3; i++)); do
        if v=$(timeout 60 "$CEIL" "$ceil_bytes" 262144); then
            echo "$v" >>"$RUN/ceiling.tsv"
        else
            warn "sockceil run failed"; v=nan
        fi
        printf 'bench: [round %d/%d] %-20s %-9s %12.3f GiB/s\n' "$r" "$ROUNDS" unix_ceiling - "${v:-nan}" >&2
    done
}

# ----------------------------------------------------------------- rounds --
note "servers: ${SERVERS[*]}; metrics: ${SEL_METRICS[*]:-none}; size=$SIZE rounds=$ROUNDS secs=$SECS"
nserv=${#SERVERS[@]}
for ((r = 1; r <= ROUNDS; r++)); do
    # page cache: reads are served from cache for every server alike
    cat "$IMG" "$SRC" >/dev/null
    measure_ceiling
    # rotate the server order each round so no server is always first/last
    order=()
    for ((k = 0; k < nserv; k++)); do order+=("${SERVERS[$(((k + r - 1) % nserv))]}"); done
    for m in "${SEL_METRICS[@]}"; do
        for s in "${order[@]}"; do
            run_one "$m" "$s" "$r"
        done
    done
done

printf 'loadavg_end\t%s\n' "$(cut -d' ' -f1-3 /proc/loadavg)" >>"$RUN/config.tsv"
"$PY" "$HERE/report.py" "$RUN" "$OUT_JSON"

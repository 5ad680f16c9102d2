#!/usr/bin/env bash
# bench/bitmaps.sh — dirty-bitmap costs of fleeced, compared with
# qemu-storage-daemon (QSD).  See bench/README.md, section "Dirty bitmaps".
#
#   bench/bitmaps.sh            full run (3 rounds, 5 s fio runs, 1 GiB image)
#   bench/bitmaps.sh --quick    smoke run (1 round, 2 s, 256 MiB image)
#
# Environment (all optional):
#   BENCH_ROUNDS=3          rounds; servers/variants alternate within each round
#   BENCH_SECS=5            fio runtime per random-write run (seconds)
#   BENCH_SIZE=1G           image of the write rows (bytes or K/M/G suffix)
#   BENCH_WALK_SIZE=64G     sparse image of the enumeration row
#   BENCH_EXTENTS=100000    dirty extents made for the enumeration row
#   BENCH_WALKS=7           timed full walks per enumeration row
#   BENCH_BITMAPS=4         recording bitmaps in the "with bitmaps" rows
#   BENCH_ONLY=             comma list of metrics or prefixes (walk,
#                           randwrite, persist_warm, first_touch, ...)
#   FLEECED=build/release/server/fleeced   fleeced binary
#   BENCH_OUT=bench/results/bitmaps.json
set -uo pipefail # no -e: a failed measurement is recorded as n/a, not fatal
export LC_ALL=C

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
PY=/usr/bin/python3 # system python: has the libnbd "nbd" module (pyenv's does not)
CLIENT=$HERE/bitmaps_client.py

usage() { sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() { echo "bitmaps: error: $*" >&2; exit 2; }
warn() { echo "bitmaps: warning: $*" >&2; }
note() { echo "bitmaps: $*" >&2; }

QUICK=0
for arg in "$@"; do
    case "$arg" in
    --quick) QUICK=1 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$arg' (try --help)" ;;
    esac
done

if ((QUICK)); then d_rounds=1 d_secs=2 d_size=256M d_walks=5; else d_rounds=3 d_secs=5 d_size=1G d_walks=7; fi
ROUNDS=${BENCH_ROUNDS:-$d_rounds}
SECS=${BENCH_SECS:-$d_secs}
SIZE_SPEC=${BENCH_SIZE:-$d_size}
WSIZE_SPEC=${BENCH_WALK_SIZE:-64G}
EXTENTS=${BENCH_EXTENTS:-100000}
WALKS=${BENCH_WALKS:-$d_walks}
NBM=${BENCH_BITMAPS:-4}
ONLY=${BENCH_ONLY:-}
FLEECED=${FLEECED:-$ROOT/build/release/server/fleeced}
OUT_JSON=${BENCH_OUT:-$HERE/results/bitmaps.json}
WORK=$HERE/work
GRAN=65536 # bitmap granularity (QEMU's default for raw nodes)
WSEED=1    # offsets of the enumeration row's writes: the same for every server, round and run

posint() { [[ $2 =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer"; }
posint BENCH_ROUNDS "$ROUNDS"
posint BENCH_SECS "$SECS"
posint BENCH_EXTENTS "$EXTENTS"
posint BENCH_WALKS "$WALKS"
posint BENCH_BITMAPS "$NBM"
to_bytes() { # spec -> bytes
    local s=${1%iB}; s=${s%B}; s=${s^^}
    numfmt --from=iec "$s" 2>/dev/null
}
SIZE=$(to_bytes "$SIZE_SPEC") || die "bad BENCH_SIZE '$SIZE_SPEC'"
WSIZE=$(to_bytes "$WSIZE_SPEC") || die "bad BENCH_WALK_SIZE '$WSIZE_SPEC'"
((SIZE >= 16 * GRAN && SIZE % GRAN == 0)) || die "BENCH_SIZE must be >= 1 MiB and a multiple of 64 KiB"
((WSIZE % GRAN == 0)) || die "BENCH_WALK_SIZE must be a multiple of 64 KiB"
((EXTENTS <= WSIZE / GRAN / 2)) || die "BENCH_EXTENTS must be <= half the granules of BENCH_WALK_SIZE"

for tool in nbdinfo fio jq timeout numfmt truncate; do
    command -v "$tool" >/dev/null || die "required tool '$tool' not found"
done
if ! [[ -x $PY ]] || ! "$PY" -c 'import nbd' 2>/dev/null; then
    die "$PY with the libnbd python module (python3-libnbd) is required"
fi

# ---------------------------------------------------------------- metrics --
# Each metric is measured once per round for each of its variants (a server,
# or a server configuration); the variants' order is rotated every round.
HAVE_FLEECED=0 HAVE_QSD=0
if [[ -x $FLEECED ]]; then HAVE_FLEECED=1; else warn "fleeced binary not found at $FLEECED: fleeced rows skipped"; fi
if command -v qemu-storage-daemon >/dev/null; then HAVE_QSD=1; else warn "qemu-storage-daemon not installed: qsd rows skipped"; fi
((HAVE_FLEECED + HAVE_QSD)) || die "no servers to run"

METRICS=(walk randwrite_qd32 randwrite_qd1 persist_warm_qd32 persist_warm_qd1 first_touch_qd32 first_touch_qd1)
declare -A M_UNIT M_DESC M_VARIANTS
srv_variants() { # suffix -> "fleeced<suffix> qsd<suffix>" for the available servers
    local list=()
    ((HAVE_FLEECED)) && list+=("fleeced$1")
    ((HAVE_QSD)) && list+=("qsd$1")
    echo "${list[*]}"
}
defm() { M_UNIT[$1]=$2; M_VARIANTS[$1]=$3; M_DESC[$1]=$4; }
defm walk ms "$(srv_variants "")" \
    "full walk of qemu:dirty-bitmap:b0 over a $WSIZE_SPEC sparse raw image with $EXTENTS dirty extents (python3-libnbd block_status loop; median of $WALKS walks per round)"
defm randwrite_qd32 IOPS "$(srv_variants :0) $(srv_variants ":$NBM")" \
    "fio nbd 4 KiB randwrite, iodepth 32, ${SIZE_SPEC} allocated image; variant :N = N recording non-persistent bitmaps"
defm randwrite_qd1 IOPS "$(srv_variants :0) $(srv_variants ":$NBM")" \
    "fio nbd 4 KiB randwrite, iodepth 1, ${SIZE_SPEC} allocated image; variant :N = N recording non-persistent bitmaps"
if ((HAVE_FLEECED)); then pv="volatile persistent"; else pv=""; fi
defm persist_warm_qd32 IOPS "$pv" \
    "fleeced, $NBM bitmaps, fio 4 KiB randwrite iodepth 32 after a full sequential write dirtied every granule"
defm persist_warm_qd1 IOPS "$pv" \
    "fleeced, $NBM bitmaps, fio 4 KiB randwrite iodepth 1 after a full sequential write dirtied every granule"
defm first_touch_qd32 IOPS "$pv" \
    "fleeced, $NBM fresh bitmaps, python3-libnbd 4 KiB writes each to a different clean granule, 32 in flight"
defm first_touch_qd1 IOPS "$pv" \
    "fleeced, $NBM fresh bitmaps, python3-libnbd 4 KiB writes each to a different clean granule, 1 in flight"

matches() { # metric item
    [[ $1 == "$2" ]] && return 0
    [[ -z ${M_UNIT[$2]+x} && $1 == "$2"_* ]]
}
SEL_METRICS=()
for m in "${METRICS[@]}"; do
    [[ -n ${M_VARIANTS[$m]} ]] || continue
    if [[ -z $ONLY ]]; then SEL_METRICS+=("$m"); continue; fi
    IFS=, read -ra items <<<"$ONLY"
    for item in "${items[@]}"; do matches "$m" "$item" && { SEL_METRICS+=("$m"); break; }; done
done
if [[ -n $ONLY ]]; then
    IFS=, read -ra items <<<"$ONLY"
    for item in "${items[@]}"; do
        ok=0
        for m in "${METRICS[@]}"; do matches "$m" "$item" && ok=1; done
        ((ok)) || die "BENCH_ONLY: unknown metric '$item' (known: ${METRICS[*]})"
    done
fi
((${#SEL_METRICS[@]})) || die "nothing to measure"

# ------------------------------------------------------------ run state ----
mkdir -p "$WORK" || die "cannot create $WORK"
RUN=$(mktemp -d /tmp/fleeced-bitmaps.XXXXXX) || die "mktemp failed" # short: sun_path <= 108
LOG=$RUN/bench.log
QMP=$RUN/qmp.sock
NBDS=$RUN/nbd.sock
SRV_PID="" SRV_NAME="" SRV_IMG=""
IMG=$WORK/bitmaps-image-$SIZE.raw   # fully allocated, random data (write rows)
WIMG=$WORK/bitmaps-sparse-$WSIZE.raw # sparse (enumeration row), made once, same writes every time

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
    rm -f "$QMP" "$NBDS"
    # fleeced keeps persistent bitmaps in IMG.bitmaps/: never carry them over
    [[ -n $SRV_IMG ]] && rm -rf "$SRV_IMG.bitmaps"
    SRV_IMG=""
}

cleanup() {
    stop_server
    if [[ -d $RUN ]]; then
        find "$RUN" -type s -delete 2>/dev/null
        rm -rf "$WORK/bitmaps-last-run"
        cp -r "$RUN" "$WORK/bitmaps-last-run" 2>/dev/null
        rm -rf "$RUN"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start_server SERVER IMAGE NBITMAPS PERSISTENT(0|1)
# Starts the daemon with only a QMP socket and builds the same graph on both
# over QMP: disk0-file (file) <- disk0 (raw), NBD server on $NBDS, writable
# export "disk0", NBITMAPS bitmaps b0.. on disk0 (64 KiB, recording).
start_server() {
    local name=$1 img=$2 nbm=$3 pers=$4 i
    local -a cmd=() popt=()
    rm -f "$QMP" "$NBDS"
    rm -rf "$img.bitmaps"
    case $name in
    fleeced) cmd=("$FLEECED" --qmp "unix:$QMP" --log-level warn) ;;
    qsd)
        # shellcheck disable=SC2054 # commas are qemu option syntax
        cmd=(qemu-storage-daemon --chardev "socket,id=m,path=$QMP,server=on,wait=off" --monitor chardev=m) ;;
    esac
    echo "== start $name: ${cmd[*]}" >>"$LOG"
    "${cmd[@]}" >>"$LOG" 2>&1 &
    SRV_PID=$!
    SRV_NAME=$name
    SRV_IMG=$img
    URI="nbd+unix:///disk0?socket=$NBDS"
    for ((i = 0; i < 200; i++)); do # <= ~10 s
        if ! kill -0 "$SRV_PID" 2>/dev/null; then
            warn "$name exited during startup (see $WORK/bitmaps-last-run/bench.log)"
            wait "$SRV_PID" 2>/dev/null
            SRV_PID=""
            return 1
        fi
        [[ -S $QMP ]] && break
        sleep 0.05
    done
    ((pers)) && popt+=(--persistent)
    echo "== setup $name: image=$img bitmaps=$nbm persistent=$pers" >>"$LOG"
    if ! timeout 60 "$PY" "$CLIENT" setup --qmp "$QMP" --image "$img" --nbd "$NBDS" \
        --bitmaps "$nbm" --granularity "$GRAN" "${popt[@]}" >>"$LOG" 2>&1; then
        warn "$name: QMP setup failed (see $WORK/bitmaps-last-run/bench.log)"
        stop_server
        return 1
    fi
    for ((i = 0; i < 100; i++)); do
        timeout 2 nbdinfo --size "$URI" >/dev/null 2>&1 && return 0
        sleep 0.05
    done
    warn "$name did not become ready"
    stop_server
    return 1
}

# utime+stime of the server process (all threads), in clock ticks
cpu_ticks() { [[ -r /proc/$1/stat ]] && awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }
CLK_TCK=$(getconf CLK_TCK)

# ------------------------------------------------------------ measurements --
# Every m_* prints "VALUE WORK [EXTRA_JSON]"; WORK = I/Os done (for server
# CPU per I/O) or "-".

m_fio() { # rw bs qd timed(0|1) -> "IOPS TOTAL_IOS"
    local rw=$1 bs=$2 qd=$3 timed=$4 out=$RUN/fio.json dir=write
    local -a t=()
    ((timed)) && t=(--time_based --runtime="$SECS")
    rm -f "$out"
    timeout $((SECS + 120)) fio --name=bench --ioengine=nbd --uri="$URI" \
        --rw="$rw" --bs="$bs" --iodepth="$qd" "${t[@]}" --direct=0 \
        --output-format=json --output="$out" >>"$LOG" 2>&1 || return 1
    sed -n '/^{/,$p' "$out" | jq -er "if .jobs[0].error == 0 and .jobs[0].$dir.iops > 0
        then \"\\(.jobs[0].$dir.iops) \\(.jobs[0].$dir.total_ios)\" else error(\"fio failed\") end" 2>>"$LOG"
}

m_walk() { # server seed
    local d j ms
    d=$(timeout 600 "$PY" "$CLIENT" dirty --uri "$URI" --size "$WSIZE" --granularity "$GRAN" \
        --count "$EXTENTS" --seed "$2" --window 32 2>>"$LOG") || return 1
    timeout 60 "$PY" "$CLIENT" freeze --qmp "$QMP" --bitmap b0 --export bm >>"$LOG" 2>&1 || return 1
    j=$(timeout 600 "$PY" "$CLIENT" walk --uri "nbd+unix:///bm?socket=$NBDS" \
        --context qemu:dirty-bitmap:b0 --size "$WSIZE" --granularity "$GRAN" \
        --count "$EXTENTS" --seed "$2" --walks "$WALKS" 2>>"$LOG") || return 1
    ms=$(jq -r '.walk_ms | sort | if length % 2 == 1 then .[length / 2 | floor]
        else (.[length / 2 - 1] + .[length / 2]) / 2 end' <<<"$j") || return 1
    echo "$ms - $(jq -c --argjson d "$d" '. + {dirty_secs: $d}' <<<"$j")"
}

m_touch() { # qd round: every granule at most once, for at most SECS seconds
    timeout $((SECS + 120)) "$PY" "$CLIENT" touch --uri "$URI" --size "$SIZE" --granularity "$GRAN" \
        --count $((SIZE / GRAN)) --seed "$2" --window "$1" --seconds "$SECS" 2>>"$LOG"
}

# run_one metric variant round
run_one() {
    local m=$1 v=$2 r=$3 srv nbm=0 pers=0 img=$IMG val=nan work="-" extra="{}" out c0 c1 cpu=nan
    case $m in
    walk) srv=$v img=$WIMG nbm=1 ;;
    randwrite_*) srv=${v%%:*} nbm=${v##*:} ;;
    persist_* | first_touch_*) srv=fleeced nbm=$NBM; [[ $v == persistent ]] && pers=1 ;;
    esac
    if start_server "$srv" "$img" "$nbm" "$pers"; then
        # warm rows: dirty every granule first (not timed), then settle the page cache
        if [[ $m == persist_warm_* ]]; then
            echo "== warm-up $m $v: fio sequential write of the whole export" >>"$LOG"
            if m_fio write 1m 8 0 >/dev/null; then sync "$img"; else
                warn "warm-up failed for $m $v"; fi
        fi
        echo "== measure $m on $v (round $r) uri=$URI" >>"$LOG"
        c0=$(cpu_ticks "$SRV_PID")
        case $m in
        walk) out=$(m_walk "$srv" "$WSEED") ;;
        randwrite_qd32 | persist_warm_qd32) out=$(m_fio randwrite 4k 32 1) ;;
        randwrite_qd1 | persist_warm_qd1) out=$(m_fio randwrite 4k 1 1) ;;
        first_touch_qd32) out=$(m_touch 32 "$r") ;;
        first_touch_qd1) out=$(m_touch 1 "$r") ;;
        esac && read -r val work extra <<<"$out"
        c1=$(cpu_ticks "$SRV_PID")
        [[ -n $val ]] || val=nan
        [[ -n $extra ]] || extra="{}"
        if [[ $val != nan && $work != - && -n $c0 && -n $c1 ]]; then
            cpu=$(awk -v a="$c0" -v b="$c1" -v t="$CLK_TCK" -v w="$work" 'BEGIN { printf "%.3f\n", (b - a) / t * 1e6 / w }')
        fi
        if ! kill -0 "$SRV_PID" 2>/dev/null; then
            local st
            wait "$SRV_PID" 2>/dev/null
            st=$?
            ((st > 128)) && st="$st (signal $((st - 128)))"
            warn "$srv DIED during $m (round $r), exit status $st; see $WORK/bitmaps-last-run/bench.log"
            echo "== $srv died during $m, exit status $st" >>"$LOG"
            SRV_PID=""
            val=nan
        fi
        stop_server
    fi
    # keep dirty page-cache writeback from leaking into the next row
    sync "$img"
    [[ $val == nan ]] && { warn "$m on $v (round $r) failed; see $WORK/bitmaps-last-run/bench.log"; cpu=nan; }
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$m" "$v" "$r" "$val" "$cpu" "$extra" >>"$RUN/samples.tsv"
    printf 'bitmaps: [round %d/%d] %-18s %-12s %12.3f %-4s server CPU %8.2f us/IO\n' \
        "$r" "$ROUNDS" "$m" "$v" "$val" "${M_UNIT[$m]}" "$cpu" >&2
}

# ------------------------------------------------------------------ images --
case $WORK in *,*) die "work path must not contain ','" ;; esac
need_img=0
for m in "${SEL_METRICS[@]}"; do [[ $m != walk ]] && need_img=1; done
if ((need_img)) && [[ ! -f $IMG || $(stat -c %s "$IMG") -ne $SIZE ]]; then
    note "generating $SIZE-byte random image $IMG (once)"
    rm -f "$IMG"
    { head -c "$SIZE" /dev/urandom >"$IMG.tmp" && mv "$IMG.tmp" "$IMG"; } || die "image generation failed"
    sync "$IMG"
fi
rm -rf "$IMG.bitmaps" "$WIMG.bitmaps"
# The sparse image is kept between runs: every run writes the same offsets
# (fixed seed), so it only grows when BENCH_EXTENTS changes (and deleting a
# file with 100k+ scattered extents can take minutes on this box).
if [[ " ${SEL_METRICS[*]} " == *" walk "* ]] && [[ ! -f $WIMG || $(stat -c %s "$WIMG") -ne $WSIZE ]]; then
    rm -f "$WIMG"
    truncate -s "$WSIZE" "$WIMG" || die "cannot create $WIMG"
fi

# ---------------------------------------------------------------- config ---
{
    printf 'size_bytes\t%s\n' "$SIZE"
    printf 'walk_size_bytes\t%s\n' "$WSIZE"
    printf 'extents\t%s\n' "$EXTENTS"
    printf 'walks\t%s\n' "$WALKS"
    printf 'bitmaps\t%s\n' "$NBM"
    printf 'granularity\t%s\n' "$GRAN"
    printf 'rounds\t%s\n' "$ROUNDS"
    printf 'secs\t%s\n' "$SECS"
    printf 'metrics\t%s\n' "$(IFS=,; echo "${SEL_METRICS[*]}")"
    printf 'quick\t%s\n' "$QUICK"
    printf 'date\t%s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    printf 'cpus\t%s\n' "$(nproc)"
    printf 'cpu_model\t%s\n' "$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)"
    printf 'kernel\t%s\n' "$(uname -r)"
    printf 'loadavg_start\t%s\n' "$(cut -d' ' -f1-3 /proc/loadavg)"
    printf 'fleeced\t%s\n' "$FLEECED"
    ((HAVE_FLEECED)) && printf 'fleeced_version\t%s\n' "$("$FLEECED" --version 2>&1 | head -1)"
    ((HAVE_QSD)) && printf 'qsd_version\t%s\n' "$(qemu-storage-daemon --version 2>/dev/null | head -1)"
    printf 'libnbd_version\t%s\n' "$("$PY" -c 'import nbd; print(nbd.NBD().get_version())' 2>/dev/null)"
    printf 'fio_version\t%s\n' "$(fio --version 2>/dev/null)"
} >"$RUN/config.tsv"
for m in "${METRICS[@]}"; do
    printf '%s\t%s\t%s\t%s\n' "$m" "${M_UNIT[$m]}" "${M_VARIANTS[$m]}" "${M_DESC[$m]}"
done >"$RUN/metrics.tsv"
: >"$RUN/samples.tsv"

load1=$(cut -d' ' -f1 /proc/loadavg)
if awk -v l="$load1" 'BEGIN { exit !(l > 0.5) }'; then
    warn "1-min load average is $load1: something else is using the CPUs; expect noisy numbers"
fi

# ----------------------------------------------------------------- rounds --
note "metrics: ${SEL_METRICS[*]}; rounds=$ROUNDS secs=$SECS size=$SIZE walk: $WSIZE bytes, $EXTENTS extents"
for ((r = 1; r <= ROUNDS; r++)); do
    ((need_img)) && cat "$IMG" >/dev/null # page cache: same start for every variant
    for m in "${SEL_METRICS[@]}"; do
        read -ra vs <<<"${M_VARIANTS[$m]}"
        n=${#vs[@]}
        for ((k = 0; k < n; k++)); do # rotate the order every round
            run_one "$m" "${vs[$(((k + r - 1) % n))]}" "$r"
        done
    done
done

printf 'loadavg_end\t%s\n' "$(cut -d' ' -f1-3 /proc/loadavg)" >>"$RUN/config.tsv"
"$PY" "$HERE/bitmaps_report.py" "$RUN" "$OUT_JSON"

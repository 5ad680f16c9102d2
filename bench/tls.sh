#!/usr/bin/env bash
# bench/tls.sh — NBD over TLS: fleeced vs qemu-nbd with the same
# credentials (PSK and X.509 with client certificates), plus each server in
# plaintext for the TLS/plaintext ratio. See bench/README.md ("TLS rows").
#
#   bench/tls.sh            full run (3 rounds, 5 s random-read runs, 1 GiB image)
#   bench/tls.sh --quick    smoke run (1 round, 2 s, 256 MiB)
#
# Environment (all optional):
#   BENCH_SIZE=1G  BENCH_ROUNDS=3  BENCH_SECS=5
#   BENCH_SERVERS=fleeced,qemu-nbd
#   BENCH_ONLY=             comma list of rows or prefixes (seqread, randread_qd32_psk, ...)
#   FLEECED=build/release/server/fleeced
#   BENCH_OUT=bench/results/tls.json
set -uo pipefail # no -e: a failed measurement is recorded as n/a, not fatal
export LC_ALL=C

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
PY=/usr/bin/python3

die() { echo "bench: error: $*" >&2; exit 2; }
warn() { echo "bench: warning: $*" >&2; }

QUICK=0
for arg in "$@"; do
    case "$arg" in
    --quick) QUICK=1 ;;
    -h | --help) sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$arg' (try --help)" ;;
    esac
done
if ((QUICK)); then d_rounds=1 d_secs=2 d_size=256M; else d_rounds=3 d_secs=5 d_size=1G; fi
ROUNDS=${BENCH_ROUNDS:-$d_rounds}
SECS=${BENCH_SECS:-$d_secs}
s=${BENCH_SIZE:-$d_size}; s=${s%iB}; s=${s%B}; s=${s^^}
SIZE=$(numfmt --from=iec "$s" 2>/dev/null) || die "bad BENCH_SIZE"
((SIZE >= 1048576 && SIZE % 4096 == 0)) || die "BENCH_SIZE must be >= 1 MiB and a multiple of 4096"
[[ $ROUNDS =~ ^[1-9][0-9]*$ && $SECS =~ ^[1-9][0-9]*$ ]] || die "BENCH_ROUNDS and BENCH_SECS must be positive"
FLEECED=${FLEECED:-$ROOT/build/release/server/fleeced}
OUT_JSON=${BENCH_OUT:-$HERE/results/tls.json}
ONLY=${BENCH_ONLY:-}
WORK=$HERE/work
for tool in nbdcopy nbdinfo psktool certtool cc pkg-config numfmt qemu-nbd; do
    command -v "$tool" >/dev/null || die "required tool '$tool' not found"
done
[[ -x $FLEECED ]] || die "fleeced not found at $FLEECED (build the release preset)"

# metric -> unit, description
ROWS=(seqread_plain seqread_psk seqread_x509 randread_qd32_plain randread_qd32_psk randread_qd32_x509)
declare -A UNIT=([seqread_plain]=GiB/s [seqread_psk]=GiB/s [seqread_x509]=GiB/s
    [randread_qd32_plain]=IOPS [randread_qd32_psk]=IOPS [randread_qd32_x509]=IOPS)
SEL=()
for m in "${ROWS[@]}"; do
    if [[ -z $ONLY ]]; then SEL+=("$m"); continue; fi
    IFS=, read -ra items <<<"$ONLY"
    for it in "${items[@]}"; do [[ $m == "$it" || $m == "$it"_* ]] && { SEL+=("$m"); break; }; done
done
((${#SEL[@]})) || die "BENCH_ONLY selects no row (rows: ${ROWS[*]})"
IFS=, read -ra SERVERS <<<"${BENCH_SERVERS:-fleeced,qemu-nbd}"

mkdir -p "$WORK" "$(dirname "$OUT_JSON")"
RUN=$(mktemp -d /tmp/fleeced-tlsbench.XXXXXX) || die "mktemp failed"
LOG=$RUN/bench.log
SRV_PID=""
stop_server() {
    [[ -n $SRV_PID ]] || return 0
    local i
    kill -TERM "$SRV_PID" 2>/dev/null
    for ((i = 0; i < 50; i++)); do kill -0 "$SRV_PID" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$SRV_PID" 2>/dev/null && kill -KILL "$SRV_PID" 2>/dev/null
    wait "$SRV_PID" 2>/dev/null
    SRV_PID=""
    rm -f "$RUN/srv.sock"
}
cleanup() {
    stop_server
    find "$RUN" -type s -delete 2>/dev/null
    rm -rf "$WORK/last-tls-run"
    cp -r "$RUN" "$WORK/last-tls-run" 2>/dev/null
    rm -rf "$RUN"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ------------------------------------------------------------ inputs -------
IMG=$WORK/image-$SIZE.raw
if [[ ! -f $IMG || $(stat -c %s "$IMG") -ne $SIZE ]]; then
    echo "bench: generating $SIZE-byte random image in $WORK (once)" >&2
    { head -c "$SIZE" /dev/urandom >"$IMG.tmp" && mv "$IMG.tmp" "$IMG"; } || die "image generation failed"
fi
RAND=$WORK/tlsrand
if [[ ! -x $RAND || $HERE/tlsrand.c -nt $RAND ]]; then
    # shellcheck disable=SC2046
    cc -O2 -o "$RAND" "$HERE/tlsrand.c" $(pkg-config --cflags --libs libnbd) || die "cannot build tlsrand"
fi
# Credentials, made fresh for the run: PSK (alice) and X.509 with client certificates.
CRED=$RUN/cred
mkdir -p "$CRED/psk" "$CRED/ca" "$CRED/server" "$CRED/client"
psktool -u alice -p "$CRED/psk/keys.psk" >/dev/null 2>&1 || die "psktool failed"
certtool --generate-privkey --key-type=ecdsa --outfile "$CRED/ca/ca-key.pem" >/dev/null 2>&1
printf 'cn = bench CA\nca\ncert_signing_key\nexpiration_days = 2\n' >"$CRED/ca/ca.info"
certtool --generate-self-signed --load-privkey "$CRED/ca/ca-key.pem" --template "$CRED/ca/ca.info" \
    --outfile "$CRED/ca/ca-cert.pem" >/dev/null 2>&1 || die "certtool failed"
for role in server client; do
    certtool --generate-privkey --key-type=ecdsa --outfile "$CRED/$role/$role-key.pem" >/dev/null 2>&1
    if [[ $role == server ]]; then ext='dns_name = localhost\ntls_www_server'; else ext='tls_www_client'; fi
    printf "cn = bench $role\n$ext\nsigning_key\nencryption_key\nexpiration_days = 2\n" >"$CRED/$role/$role.info"
    certtool --generate-certificate --load-ca-certificate "$CRED/ca/ca-cert.pem" \
        --load-ca-privkey "$CRED/ca/ca-key.pem" --load-privkey "$CRED/$role/$role-key.pem" \
        --template "$CRED/$role/$role.info" --outfile "$CRED/$role/$role-cert.pem" >/dev/null 2>&1 ||
        die "certtool failed"
    cp "$CRED/ca/ca-cert.pem" "$CRED/$role/"
done

# start_server NAME plain|psk|x509: sets SRV_PID and URI
start_server() {
    local name=$1 mode=$2 sock=$RUN/srv.sock i
    local -a cmd
    case $name in
    fleeced)
        cmd=("$FLEECED" --export "name=disk0,file=$IMG" --listen "unix:$sock" --log-level warn)
        [[ $mode == psk ]] && cmd+=(--tls-creds "psk:$CRED/psk")
        [[ $mode == x509 ]] && cmd+=(--tls-creds "x509:$CRED/server,verify-peer=on") ;;
    qemu-nbd)
        cmd=(qemu-nbd -f raw -x disk0 --cache=writeback --aio=threads -e 0 -t -r -k "$sock")
        [[ $mode == psk ]] && cmd+=(--object "tls-creds-psk,id=tls0,endpoint=server,dir=$CRED/psk" --tls-creds tls0)
        [[ $mode == x509 ]] && cmd+=(--object "tls-creds-x509,id=tls0,endpoint=server,dir=$CRED/server,verify-peer=on" --tls-creds tls0)
        cmd+=("$IMG") ;;
    *) return 1 ;;
    esac
    case $mode in
    plain) URI="nbd+unix:///disk0?socket=$sock" ;;
    psk) URI="nbds+unix://alice@/disk0?socket=$sock&tls-psk-file=$CRED/psk/keys.psk" ;;
    x509) URI="nbds+unix:///disk0?socket=$sock&tls-certificates=$CRED/client" ;;
    esac
    echo "== start $name $mode: ${cmd[*]}" >>"$LOG"
    "${cmd[@]}" >>"$LOG" 2>&1 &
    SRV_PID=$!
    for ((i = 0; i < 200; i++)); do
        kill -0 "$SRV_PID" 2>/dev/null || { SRV_PID=""; return 1; }
        [[ -S $sock ]] && timeout 5 nbdinfo --size "$URI" >/dev/null 2>&1 && return 0
        sleep 0.05
    done
    stop_server
    return 1
}

cpu_ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat" 2>/dev/null; }
CLK_TCK=$(getconf CLK_TCK)

# Runs a command and prints its CPU time (user + system of it and its
# children) in seconds on fd 3.
client_cpu() {
    "$PY" -c 'import resource, subprocess, sys
rc = subprocess.call(sys.argv[1:], stdout=sys.stderr)
u = resource.getrusage(resource.RUSAGE_CHILDREN)
print(f"{u.ru_utime + u.ru_stime:.4f}", file=open(3, "w", closefd=False))
sys.exit(rc)' "$@"
}

measure() { # metric -> "VALUE WORK CLIENT_CPU_PER_UNIT"
    local t0 t1 cc
    case $1 in
    seqread_*)
        t0=$EPOCHREALTIME
        cc=$(client_cpu timeout $((120 + SIZE / 8388608)) nbdcopy "$URI" null: 3>&1 2>>"$LOG") || return 1
        t1=$EPOCHREALTIME
        awk -v b="$SIZE" -v a="$t0" -v c="$t1" -v cc="$cc" \
            'BEGIN { g = b / 1073741824; printf "%.4f %.6f %.1f\n", g / (c - a), g, cc * 1e3 / g }' ;;
    randread_qd32_*)
        timeout $((SECS + 60)) "$RAND" "$URI" "$SECS" 32 4096 2>>"$LOG" ;;
    esac
}

: >"$RUN/samples.tsv"
load1=$(cut -d' ' -f1 /proc/loadavg)
awk -v l="$load1" 'BEGIN { exit !(l > 0.5) }' && warn "1-min load average is $load1: expect noisy numbers"
echo "bench: servers ${SERVERS[*]}; rows ${SEL[*]}; size=$SIZE rounds=$ROUNDS secs=$SECS" >&2
n=${#SERVERS[@]}
for ((r = 1; r <= ROUNDS; r++)); do
    cat "$IMG" >/dev/null
    for m in "${SEL[@]}"; do
        for ((k = 0; k < n; k++)); do
            s=${SERVERS[$(((k + r - 1) % n))]}
            val=nan cpu=nan work="" ccpu=nan
            if start_server "$s" "${m##*_}"; then
                c0=$(cpu_ticks "$SRV_PID")
                if out=$(measure "$m"); then read -r val work ccpu <<<"$out"; fi
                c1=$(cpu_ticks "$SRV_PID")
                if [[ $val != nan && -n $work && -n $c0 && -n $c1 ]]; then
                    cpu=$(awk -v a="$c0" -v b="$c1" -v t="$CLK_TCK" -v w="$work" -v u="${UNIT[$m]}" \
                        'BEGIN { s = (b - a) / t; printf "%.3f\n", (u == "GiB/s" ? s * 1e3 : s * 1e6) / w }')
                fi
                stop_server
            else
                warn "$s did not start for $m"
            fi
            printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$m" "$s" "$r" "${val:-nan}" "$cpu" "${ccpu:-nan}" >>"$RUN/samples.tsv"
            printf 'bench: [round %d/%d] %-20s %-9s %12s %-6s server CPU %s %s\n' "$r" "$ROUNDS" "$m" "$s" \
                "$val" "${UNIT[$m]}" "$cpu" "$([[ ${UNIT[$m]} == GiB/s ]] && echo ms/GiB || echo us/IO)" >&2
        done
    done
done

"$PY" - "$RUN/samples.tsv" "$OUT_JSON" "$(cut -d' ' -f1-3 /proc/loadavg)" "$load1" "$(nproc)" <<'PY'
import json, statistics, sys
samples, out, load_end, load_start, ncpu = sys.argv[1:6]
ncpu = int(ncpu)
vals, cpus, ccpus = {}, {}, {}
for line in open(samples):
    m, s, r, v, c, cc = line.rstrip("\n").split("\t")
    if v != "nan":
        vals.setdefault((m, s), []).append(float(v))
    if c != "nan":
        cpus.setdefault((m, s), []).append(float(c))
    if cc != "nan":
        ccpus.setdefault((m, s), []).append(float(cc))
med = lambda d, k: statistics.median(d[k]) if k in d else None
rows = []
for m in dict.fromkeys(k[0] for k in list(vals) + list(cpus)):
    unit = "GiB/s" if m.startswith("seqread") else "IOPS"
    f, q = med(vals, (m, "fleeced")), med(vals, (m, "qemu-nbd"))
    kind = m.rsplit("_", 1)[1]
    plain = med(vals, (m.rsplit("_", 1)[0] + "_plain", "fleeced"))
    rows.append({"metric": m, "unit": unit, "fleeced": f, "qemu-nbd": q,
                 "fleeced_vs_qemu_nbd": f / q if f and q else None,
                 "fleeced_tls_vs_plain": f / plain if f and plain and kind != "plain" else None,
                 "cpu_fleeced": med(cpus, (m, "fleeced")), "cpu_qemu_nbd": med(cpus, (m, "qemu-nbd")),
                 "client_cpu_fleeced": med(ccpus, (m, "fleeced")),
                 "samples": {s: vals.get((m, s), []) for s in ("fleeced", "qemu-nbd")}})
fmt = lambda x, p=3: "n/a" if x is None else (f"{x:.{p}f}" if x < 1000 else f"{x:.0f}")
print()
print(f"{'metric':22} {'unit':6} {'fleeced':>10} {'qemu-nbd':>10} {'fleeced/qemu':>13} {'TLS/plain':>10}")
for r in rows:
    ratio = "n/a" if r["fleeced_vs_qemu_nbd"] is None else f"{r['fleeced_vs_qemu_nbd']:.2f}x"
    tp = "" if r["fleeced_tls_vs_plain"] is None else f"{r['fleeced_tls_vs_plain']:.2f}x"
    print(f"{r['metric']:22} {r['unit']:6} {fmt(r['fleeced']):>10} {fmt(r['qemu-nbd']):>10} {ratio:>13} {tp:>10}")
print()
print(f"{'server CPU':22} {'unit':6} {'fleeced':>10} {'qemu-nbd':>10}")
for r in rows:
    unit = "ms/GiB" if r["unit"] == "GiB/s" else "us/IO"
    print(f"{r['metric']:22} {unit:6} {fmt(r['cpu_fleeced'], 2):>10} {fmt(r['cpu_qemu_nbd'], 2):>10}")
# Client and server share the machine's CPUs: a copy of a GiB cannot take
# less than (client CPU + server CPU) / CPUs seconds. With the TLS client's
# measured cost and a server that spends on TLS no more than on plaintext
# (plaintext cost + nothing for encryption), this is the best TLS/plain any
# server could reach here.
bounds = {}
plain = next((r for r in rows if r["metric"] == "seqread_plain"), None)
if plain and plain["fleeced"] and plain["cpu_fleeced"] and plain["client_cpu_fleeced"]:
    print()
    print(f"seqread CPU budget ({ncpu} CPUs shared by nbdcopy and the server), ms/GiB:")
    print(f"{'':22} {'client':>8} {'server':>8} {'sum':>8} {'max GiB/s':>10} {'TLS/plain bound':>16}")
    for r in rows:
        if not r["metric"].startswith("seqread") or r["client_cpu_fleeced"] is None:
            continue
        c, sv = r["client_cpu_fleeced"], r["cpu_fleeced"] or 0
        cap = ncpu * 1e3 / (c + sv)
        line = f"{r['metric']:22} {c:8.0f} {sv:8.0f} {c + sv:8.0f} {cap:10.2f}"
        if r is not plain:
            # the best case: server TLS cost = its plaintext cost
            best = ncpu * 1e3 / (c + plain["cpu_fleeced"]) / plain["fleeced"]
            bounds[r["metric"]] = best
            line += f" {best:15.2f}x"
        print(line)
    print("  (bound: this client's cost plus fleeced's plaintext server cost, i.e. encryption for free)")
json.dump({"rows": rows, "tls_over_plain_bound": bounds, "loadavg_start": load_start,
           "loadavg_end": load_end}, open(out, "w"), indent=1)
print(f"\nbench: wrote {out} (load average at start {load_start}, at end {load_end})")
PY

#!/usr/bin/python3
"""Aggregate bench/run.sh samples into a table (stdout) and JSON.

usage: report.py RUNDIR OUT_JSON

RUNDIR holds files written by run.sh:
  metrics.tsv  name<TAB>unit<TAB>description<TAB>cpu_unit   (ordered; all higher-is-better)
  samples.tsv  metric<TAB>server<TAB>round<TAB>value<TAB>server_cpu_per_work
               (value "nan" = failed run; CPU cost is lower-is-better)
  config.tsv   key<TAB>value
  ceiling.tsv  one GiB/s value per line (unix socket stream ceiling runs)
"""
import json
import math
import os
import statistics
import sys

PRIMARY = "fleeced"


def read_tsv(path):
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if line:
                rows.append(line.split("\t"))
    return rows


def fmt(v, unit):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if unit == "GiB/s":
        return f"{v:.3f}"
    if v >= 1000:
        return f"{v:,.0f}"
    return f"{v:.1f}"


def main():
    rundir, out_json = sys.argv[1], sys.argv[2]
    metrics = read_tsv(os.path.join(rundir, "metrics.tsv"))
    samples = read_tsv(os.path.join(rundir, "samples.tsv"))
    config = {k: v for k, v in (r[:2] for r in read_tsv(os.path.join(rundir, "config.tsv")) if len(r) >= 2)}
    ceil_runs = [float(r[0]) for r in read_tsv(os.path.join(rundir, "ceiling.tsv"))]
    servers = [s for s in config.get("servers", "").split(",") if s]
    skipped = [s for s in config.get("skipped_servers", "").split(",") if s]
    ceiling = statistics.median(ceil_runs) if ceil_runs else None

    data = {}  # metric -> server -> [values]
    cpu = {}  # metric -> server -> [server CPU per unit of work]
    for row in samples:
        if len(row) < 4:
            continue
        m, s, _r, v = row[:4]
        data.setdefault(m, {}).setdefault(s, []).append(float(v))
        if len(row) >= 5:
            cpu.setdefault(m, {}).setdefault(s, []).append(float(row[4]))

    result = {
        "config": config,
        "unix_socket_ceiling_gib_s": ceiling,
        "unix_socket_ceiling_runs": ceil_runs,
        "metrics": {},
    }

    cols = servers + [s for s in skipped if s not in servers]
    if PRIMARY in cols:  # fleeced first, peers in configured order
        cols = [PRIMARY] + [s for s in cols if s != PRIMARY]
    name_w = max([len("metric")] + [len(m[0]) for m in metrics])
    col_w = max([10] + [len(s) for s in cols])
    header = f"{'metric':<{name_w}}  {'unit':<7}" + "".join(f"  {s:>{col_w}}" for s in cols)
    header += f"  {'best peer':>{col_w}}  {'fleeced/best':>12}"
    lines = [header, "-" * len(header)]

    cpu_lines = []
    cpu_header = f"{'metric':<{name_w}}  {'unit':<7}" + "".join(f"  {s:>{col_w}}" for s in cols)
    cpu_header += f"  {'best peer':>{col_w}}  {'fleeced/best':>12}"
    cpu_lines += [cpu_header, "-" * len(cpu_header)]
    for mrow in metrics:
        name, unit, desc = mrow[:3]
        cpu_unit = mrow[3] if len(mrow) > 3 else "?"
        per = data.get(name, {})
        if not per and name not in data:
            continue
        entry = {"unit": unit, "description": desc, "servers": {}}
        medians = {}
        for s in cols:
            vals = per.get(s, [])
            good = [v for v in vals if not math.isnan(v)]
            med = statistics.median(good) if good else None
            medians[s] = med
            entry["servers"][s] = {
                "samples": [None if math.isnan(v) else v for v in vals],
                "median": med,
                "failed_runs": len(vals) - len(good),
            }
        peers = {s: v for s, v in medians.items() if s != PRIMARY and v is not None}
        best_peer = max(peers, key=peers.get) if peers else None
        ratio = None
        if best_peer and medians.get(PRIMARY) is not None and peers[best_peer] > 0:
            ratio = medians[PRIMARY] / peers[best_peer]
        entry["best_peer"] = best_peer
        entry["best_peer_median"] = peers.get(best_peer) if best_peer else None
        entry["ratio_fleeced_over_best_peer"] = ratio
        if ceiling and unit == "GiB/s" and name.startswith("seqread_unix"):
            entry["pct_of_unix_ceiling"] = {
                s: (None if v is None else 100.0 * v / ceiling) for s, v in medians.items()
            }
        # server CPU cost per unit of work (lower is better)
        cmed = {}
        for s in cols:
            good = [v for v in cpu.get(name, {}).get(s, []) if not math.isnan(v)]
            cmed[s] = statistics.median(good) if good else None
            entry["servers"][s]["server_cpu_median"] = cmed[s]
        cpeers = {s: v for s, v in cmed.items() if s != PRIMARY and v is not None}
        cbest = min(cpeers, key=cpeers.get) if cpeers else None
        cratio = None
        if cbest and cmed.get(PRIMARY) is not None and cpeers[cbest] > 0:
            cratio = cmed[PRIMARY] / cpeers[cbest]
        entry["server_cpu_unit"] = cpu_unit
        entry["server_cpu_best_peer"] = cbest
        entry["server_cpu_ratio_fleeced_over_best_peer"] = cratio
        cl = f"{name:<{name_w}}  {cpu_unit:<7}" + "".join(
            f"  {('n/a' if cmed[s] is None else f'{cmed[s]:.1f}'):>{col_w}}" for s in cols)
        cl += f"  {(cbest or 'n/a'):>{col_w}}  {('n/a' if cratio is None else f'{cratio:.2f}x'):>12}"
        cpu_lines.append(cl)
        result["metrics"][name] = entry

        line = f"{name:<{name_w}}  {unit:<7}" + "".join(f"  {fmt(medians[s], unit):>{col_w}}" for s in cols)
        line += f"  {(best_peer or 'n/a'):>{col_w}}  {('n/a' if ratio is None else f'{ratio:.2f}x'):>12}"
        lines.append(line)

    print()
    print(
        f"fleeced bench: size={config.get('size_bytes', '?')} B  rounds={config.get('rounds', '?')}  "
        f"fio runtime={config.get('secs', '?')} s  cpus={config.get('cpus', '?')}  (medians over rounds)"
    )
    print(f"load average: start {config.get('loadavg_start', '?')}, end {config.get('loadavg_end', '?')}")
    if skipped:
        print(f"skipped servers (binary missing): {', '.join(skipped)}")
    print()
    print("\n".join(lines))
    print()
    print("server CPU time (user+sys, all threads) per unit of work - lower is better,")
    print("fleeced/best < 1.00x means fleeced is cheaper:")
    print()
    print("\n".join(cpu_lines))
    if ceiling:
        print()
        print(f"unix socket stream ceiling (1 socketpair, 256 KiB write/read, median of {len(ceil_runs)}, max {max(ceil_runs):.3f}): {ceiling:.3f} GiB/s")
        for name, e in result["metrics"].items():
            pct = e.get("pct_of_unix_ceiling")
            if not pct:
                continue
            cells = "  ".join(f"{s}={'n/a' if v is None else f'{v:.0f}%'}" for s, v in pct.items())
            print(f"  {name} as % of ceiling: {cells}")
        print("  (multi-conn rows use several sockets in parallel and can exceed 100%)")
    print()

    os.makedirs(os.path.dirname(os.path.abspath(out_json)), exist_ok=True)
    tmp = out_json + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    os.replace(tmp, out_json)
    print(f"JSON written to {out_json}")


if __name__ == "__main__":
    main()

#!/usr/bin/python3
"""Aggregate bench/bitmaps.sh samples into tables (stdout) and JSON.

usage: bitmaps_report.py RUNDIR OUT_JSON

RUNDIR holds files written by bitmaps.sh:
  metrics.tsv  name<TAB>unit<TAB>variants (space separated)<TAB>description
  samples.tsv  metric<TAB>variant<TAB>round<TAB>value<TAB>server_cpu_us_per_io<TAB>extra_json
               (value "nan" = failed run)
  config.tsv   key<TAB>value

Medians over rounds; every ratio is a ratio of medians, taken from the same
run.  Per-round (paired) ratios are in the JSON as well.
"""
import json
import math
import os
import statistics
import sys

WALK_TARGET = 1.00       # fleeced walk time / QSD walk time must be <= this
BITMAP_TARGET = 0.95     # fleeced IOPS with N bitmaps / 0 bitmaps must be >= this
PERSIST_TARGET = 0.90    # warm persistent / volatile IOPS must be >= this


def read_tsv(path):
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                line = line.rstrip("\n")
                if line:
                    rows.append(line.split("\t"))
    return rows


def num(v):
    try:
        x = float(v)
    except ValueError:
        return None
    return None if math.isnan(x) else x


def med(vals):
    good = [v for v in vals if v is not None]
    return statistics.median(good) if good else None


def ratio(a, b):
    return a / b if a is not None and b else None


def fv(v, unit=""):
    if v is None:
        return "n/a"
    if unit == "ms":
        return f"{v:.2f}"
    if v >= 1000:
        return f"{v:,.0f}"
    return f"{v:.1f}"


def fr(r):
    return "n/a" if r is None else f"{r:.2f}x"


def verdict(r, target, lower_is_better=False):
    if r is None:
        return "n/a"
    ok = r <= target if lower_is_better else r >= target
    return "met" if ok else "MISSED"


def main():
    rundir, out_json = sys.argv[1], sys.argv[2]
    metrics = read_tsv(os.path.join(rundir, "metrics.tsv"))
    config = {r[0]: r[1] for r in read_tsv(os.path.join(rundir, "config.tsv")) if len(r) >= 2}
    samples = {}  # metric -> variant -> [(round, value, cpu, extra)]
    for row in read_tsv(os.path.join(rundir, "samples.tsv")):
        m, v, r, val = row[:4]
        cpu = num(row[4]) if len(row) > 4 else None
        extra = json.loads(row[5]) if len(row) > 5 and row[5] else {}
        samples.setdefault(m, {}).setdefault(v, []).append((int(r), num(val), cpu, extra))

    nbm = config.get("bitmaps", "4")
    result = {"config": config, "targets": {
        "walk_fleeced_over_qsd_max": WALK_TARGET,
        "fleeced_bitmaps_over_no_bitmaps_min": BITMAP_TARGET,
        "persistent_over_volatile_warm_min": PERSIST_TARGET}, "metrics": {}}
    medians = {}  # (metric, variant) -> median
    for mrow in metrics:
        name, unit, variants, desc = mrow[0], mrow[1], mrow[2].split(), mrow[3]
        if name not in samples:
            continue
        entry = {"unit": unit, "description": desc, "variants": {}}
        for v in variants:
            rows = samples[name].get(v, [])
            vals = [x[1] for x in rows]
            e = {"samples": vals, "median": med(vals),
                 "failed_runs": sum(1 for x in vals if x is None),
                 "server_cpu_us_per_io_median": med([x[2] for x in rows])}
            if name == "walk":
                e["all_walk_ms"] = [w for x in rows for w in x[3].get("walk_ms", [])]
                e["best_walk_ms"] = min(e["all_walk_ms"]) if e["all_walk_ms"] else None
                e["client_callback_ms_median"] = med([c for x in rows for c in x[3].get("callback_ms", [])])
                e["extents"] = [x[3].get("extents") for x in rows]
                e["block_status_requests"] = [x[3].get("requests") for x in rows]
                e["block_status_replies"] = [x[3].get("replies") for x in rows]
                e["dirty_write_secs"] = [x[3].get("dirty_secs") for x in rows]
                e["dirty_write_secs_median"] = med(e["dirty_write_secs"])
            entry["variants"][v] = e
            medians[(name, v)] = e["median"]
        result["metrics"][name] = entry

    def paired(metric, a, b):
        """per-round ratios value(a)/value(b)"""
        ra = {x[0]: x[1] for x in samples.get(metric, {}).get(a, [])}
        rb = {x[0]: x[1] for x in samples.get(metric, {}).get(b, [])}
        return [ratio(ra[k], rb[k]) for k in sorted(ra) if k in rb]

    out = []
    out.append("")
    out.append(f"fleeced bitmap bench: rounds={config.get('rounds')}  fio runtime={config.get('secs')} s  "
               f"cpus={config.get('cpus')}  (medians over rounds; ratios from this run)")
    out.append(f"load average: start {config.get('loadavg_start', '?')}, end {config.get('loadavg_end', '?')}")
    out.append(f"fleeced: {config.get('fleeced_version', 'n/a')} ({config.get('fleeced', '?')})")
    out.append(f"qsd:     {config.get('qsd_version', 'n/a')}")
    summary = {}

    # ---- 1. enumeration
    if "walk" in result["metrics"]:
        e = result["metrics"]["walk"]["variants"]
        f, q = e.get("fleeced", {}), e.get("qsd", {})
        r = ratio(f.get("median"), q.get("median"))
        summary["walk_fleeced_over_qsd"] = r
        summary["walk_paired_fleeced_over_qsd"] = paired("walk", "fleeced", "qsd")
        gib = int(config.get("walk_size_bytes", 0)) / 2**30
        out.append("")
        out.append(f"1. Enumeration: full walk of qemu:dirty-bitmap:b0, {gib:g} GiB sparse raw image, "
                   f"{config.get('extents')} dirty extents, 64 KiB granularity, "
                   f"{config.get('walks')} walks per round")
        out.append(f"   {'':<34}{'fleeced':>10}{'qsd':>10}{'fleeced/qsd':>13}")
        out.append(f"   {'walk time, ms (lower is better)':<34}{fv(f.get('median'), 'ms'):>10}"
                   f"{fv(q.get('median'), 'ms'):>10}{fr(r):>13}   target <= {WALK_TARGET:.2f}x: "
                   f"{verdict(r, WALK_TARGET, True)}")
        bf = min(f["all_walk_ms"]) if f.get("all_walk_ms") else None
        bq = min(q["all_walk_ms"]) if q.get("all_walk_ms") else None
        summary["walk_best_fleeced_over_qsd"] = ratio(bf, bq)
        out.append(f"   {'fastest single walk, ms':<34}{fv(bf, 'ms'):>10}{fv(bq, 'ms'):>10}"
                   f"{fr(ratio(bf, bq)):>13}   (less sensitive to load)")
        out.append(f"   {'client callback (median), ms':<34}{fv(f.get('client_callback_ms_median'), 'ms'):>10}"
                   f"{fv(q.get('client_callback_ms_median'), 'ms'):>10}")
        def same(vals):  # one value per round; show it once when all agree
            vals = [str(x) for x in vals if x is not None]
            return "n/a" if not vals else vals[0] if len(set(vals)) == 1 else "/".join(vals)
        out.append(f"   {'dirty extents counted (verified)':<34}{same(f.get('extents', [])):>10}"
                   f"{same(q.get('extents', [])):>10}")
        rq = lambda d: same([f"{a}:{b}" for a, b in zip(d.get("block_status_requests", []),  # noqa: E731
                                                       d.get("block_status_replies", []))])
        out.append(f"   {'block status requests:replies':<34}{rq(f):>10}{rq(q):>10}")
        dr = ratio(f.get("dirty_write_secs_median"), q.get("dirty_write_secs_median"))
        out.append(f"   {'making them (4 KiB writes, QD32), s':<34}{fv(f.get('dirty_write_secs_median'), 'ms'):>10}"
                   f"{fv(q.get('dirty_write_secs_median'), 'ms'):>10}{fr(dr):>13}   (info)")

    # ---- 2. IOPS with recording bitmaps
    rw = [m for m in ("randwrite_qd32", "randwrite_qd1") if m in result["metrics"]]
    if rw:
        out.append("")
        out.append(f"2. 4 KiB random-write IOPS with 0 and {nbm} recording bitmaps (fio nbd, "
                   f"{int(config.get('size_bytes', 0)) / 2**20:g} MiB allocated image)")
        out.append(f"   {'':<34}{'fleeced':>10}{'qsd':>10}{'fleeced/qsd':>13}")
        for m in rw:
            qd = m.split("_")[1]
            f0, f4 = medians.get((m, "fleeced:0")), medians.get((m, f"fleeced:{nbm}"))
            q0, q4 = medians.get((m, "qsd:0")), medians.get((m, f"qsd:{nbm}"))
            out.append(f"   {qd + ', 0 bitmaps, IOPS':<34}{fv(f0):>10}{fv(q0):>10}{fr(ratio(f0, q0)):>13}")
            out.append(f"   {qd + f', {nbm} bitmaps, IOPS':<34}{fv(f4):>10}{fv(q4):>10}{fr(ratio(f4, q4)):>13}")
            rf, rq = ratio(f4, f0), ratio(q4, q0)
            out.append(f"   {qd + f', {nbm} bitmaps / 0 bitmaps':<34}{fr(rf):>10}{fr(rq):>10}{'':>13}"
                       f"   target fleeced >= {BITMAP_TARGET:.2f}x: {verdict(rf, BITMAP_TARGET)}")
            cf = result["metrics"][m]["variants"]
            cpu = lambda v: cf.get(v, {}).get("server_cpu_us_per_io_median")  # noqa: E731
            out.append(f"   {qd + ', server CPU us/IO 0 / ' + nbm + ' bm':<34}"
                       f"{fv(cpu('fleeced:0')) + '/' + fv(cpu(f'fleeced:{nbm}')):>10}"
                       f"{fv(cpu('qsd:0')) + '/' + fv(cpu(f'qsd:{nbm}')):>10}")
            summary[f"{m}_fleeced_over_qsd_0_bitmaps"] = ratio(f0, q0)
            summary[f"{m}_fleeced_over_qsd_{nbm}_bitmaps"] = ratio(f4, q4)
            summary[f"{m}_fleeced_bitmaps_over_none"] = rf
            summary[f"{m}_qsd_bitmaps_over_none"] = rq
            summary[f"{m}_fleeced_bitmaps_over_none_paired"] = paired(m, f"fleeced:{nbm}", "fleeced:0")
            summary[f"{m}_qsd_bitmaps_over_none_paired"] = paired(m, f"qsd:{nbm}", "qsd:0")

    # ---- 3. persistence
    pm = [m for m in ("persist_warm_qd32", "persist_warm_qd1", "first_touch_qd32", "first_touch_qd1")
          if m in result["metrics"]]
    if pm:
        out.append("")
        out.append(f"3. Persistence cost, fleeced only ({nbm} persistent vs {nbm} non-persistent bitmaps; "
                   "QSD cannot keep persistent bitmaps on raw images)")
        out.append(f"   {'':<34}{'volatile':>10}{'persist.':>10}{'pers./vol.':>13}")
        for m in pm:
            v, p = medians.get((m, "volatile")), medians.get((m, "persistent"))
            r = ratio(p, v)
            qd = m.rsplit("_", 1)[1]
            if m.startswith("persist_warm"):
                label, tail = f"warm (dirty granules) {qd}, IOPS", \
                    f"   target >= {PERSIST_TARGET:.2f}x: {verdict(r, PERSIST_TARGET)}"
            else:
                label, tail = f"first touch {qd}, IOPS", "   (info)"
            out.append(f"   {label:<34}{fv(v):>10}{fv(p):>10}{fr(r):>13}{tail}")
            summary[f"{m}_persistent_over_volatile"] = r
            summary[f"{m}_persistent_over_volatile_paired"] = paired(m, "persistent", "volatile")

    result["summary"] = summary
    out.append("")
    print("\n".join(out))

    os.makedirs(os.path.dirname(os.path.abspath(out_json)), exist_ok=True)
    tmp = out_json + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    os.replace(tmp, out_json)
    print(f"JSON written to {out_json}")


if __name__ == "__main__":
    main()

#!/usr/bin/python3
# SPDX-License-Identifier: MIT
"""bench/backup.py - fleece-backup: incremental vs full, and pull rate vs nbdcopy.

On a fully allocated disk (default 4 GiB of random data) served by fleeced,
round by round:
  * a full backup with fleece-backup into a fresh directory; while its fleece
    is exported (--exec-at-cut), nbdcopy copies the same fleece to a raw file
    (default options: multi-conn, 64 requests in flight; --flush, because a
    backup is only done when it is durable and fleece-backup fdatasyncs its
    image before it drops the frozen bitmap), timed;
  * 1 % of the disk rewritten in scattered 64 KiB granules;
  * an incremental backup; in its hook the frozen bitmap's `count` is read
    from query-named-block-nodes.
Reports medians: full and incremental time (whole run and pull only), their
ratio, bytes pulled + zeroed vs dirty bytes (must be equal) vs the bitmap
count, and fleece-backup's full pull rate / nbdcopy's rate on the same fleece.

  bench/backup.py [--quick] [--rounds N] [--size BYTES] [--percent P]
Environment: FLEECED, FLEECE_BACKUP, FLEECECTL (default build/release/...).
Targets (issue 6): incremental of 1 % < 5 % of a full backup's time; bytes
pulled == dirty bytes; fleece-backup's full pull rate >= 0.9x nbdcopy's.
"""
import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, "/usr/lib/python3/dist-packages")
import nbd  # noqa: E402


def die(msg):
    print(f"bench/backup: error: {msg}", file=sys.stderr)
    sys.exit(2)


def binary(env, rel):
    path = os.environ.get(env, os.path.join(ROOT, "build/release", rel))
    if not os.access(path, os.X_OK):
        die(f"{path} is missing; build the release preset or set {env}")
    return path


def make_image(path, size):
    if os.path.exists(path) and os.path.getsize(path) == size:
        return
    print(f"generating {size >> 20} MiB of random data in {path}", file=sys.stderr)
    with open(path + ".tmp", "wb") as out:
        gen = subprocess.Popen(
            ["openssl", "enc", "-aes-128-ctr", "-pass", "pass:fleeced", "-nosalt", "-pbkdf2"],
            stdin=open("/dev/zero", "rb"),
            stdout=subprocess.PIPE)
        left = size
        while left:
            chunk = gen.stdout.read(min(left, 8 << 20))
            out.write(chunk)
            left -= len(chunk)
        gen.kill()
        gen.wait()
    os.rename(path + ".tmp", path)


def change(uri, percent, seed):
    h = nbd.NBD()
    h.connect_uri(uri)
    size = h.get_size()
    gran = 65536
    rng = random.Random(seed)
    n = max(1, int(size // gran * percent / 100))
    for g in sorted(rng.sample(range(size // gran), n)):
        h.pwrite(rng.randbytes(gran), g * gran)
    h.flush()
    h.shutdown()
    return n * gran


def settle():
    """Lets the disk finish what earlier steps left (writeback, discards)."""
    os.sync()
    time.sleep(2)


def bitmaps(fleecectl, env):
    """Names of the bitmaps on node disk0 (fleecectl --json answers with
    query-named-block-nodes)."""
    out = subprocess.run([fleecectl, "--json", "bitmaps", "disk0"], env=env, check=True,
                         stdout=subprocess.PIPE, text=True, timeout=60).stdout
    return [b["name"] for node in json.loads(out)["return"] if node["node-name"] == "disk0"
            for b in node.get("dirty-bitmaps", [])]


def run_json(cmd, env):
    out = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         timeout=1800)
    if out.returncode != 0:
        die(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip()}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="1 round, 1 GiB")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--size", type=int, help="disk size in bytes (default 4 GiB)")
    ap.add_argument("--percent", type=float, default=1.0)
    ap.add_argument("--backup-args", default="", help="extra fleece-backup options, e.g. "
                    "'--connections 2'")
    ap.add_argument("--target-dir", help="where the backups and nbdcopy's copy go (default "
                    "bench/work; /dev/shm takes the disk out of the comparison)")
    args = ap.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    size = args.size or ((1 << 30) if args.quick else (4 << 30))

    fleeced = binary("FLEECED", "server/fleeced")
    backup = binary("FLEECE_BACKUP", "tools/fleece-backup")
    fleecectl = binary("FLEECECTL", "tools/fleecectl")
    for tool in ("nbdcopy", "openssl"):
        if not shutil.which(tool):
            die(f"{tool} is missing")

    workroot = os.path.join(HERE, "work")
    os.makedirs(workroot, exist_ok=True)
    image = os.path.join(workroot, f"backup-image-{size}.raw")
    make_image(image, size)
    tmp = tempfile.mkdtemp(prefix="backup-bench.", dir=workroot)
    target_dir = tempfile.mkdtemp(prefix="backup-bench.", dir=args.target_dir or workroot)
    sock, qmp = os.path.join(tmp, "nbd.sock"), os.path.join(tmp, "qmp.sock")
    env = dict(os.environ, FLEECED_QMP=qmp, FLEECED_NBD=f"nbd+unix:///?socket={sock}")
    server = subprocess.Popen([fleeced, "--export", f"name=disk0,file={image},writable=on",
                               "--listen", f"unix:{sock}", "--qmp", f"unix:{qmp}",
                               "--pidfile", os.path.join(tmp, "pid"), "--log-level", "warn"])
    rows = []
    try:
        for _ in range(100):
            if os.path.exists(os.path.join(tmp, "pid")):
                break
            time.sleep(0.1)
        live = f"nbd+unix:///disk0?socket={sock}"
        for r in range(rounds):
            d = os.path.join(target_dir, f"backups-{r}")
            copy = os.path.join(target_dir, "nbdcopy.raw")
            timing = os.path.join(tmp, "nbdcopy.time")
            # Both copies start from the same state: nothing left to write,
            # and the memory of the other tool's deleted file free. The copy
            # is deleted and the disk settled (sync waits for the discards a
            # filesystem mounted with -o discard issues) inside the hook, and
            # the whole hook is taken out of the full backup's time.
            hook = (f'h=$(date +%s.%N); sync; sleep 1; s=$(date +%s.%N); nbdcopy --flush "$FLEECE_URI" {copy} && '
                    f'e=$(date +%s.%N) && rm -f {copy} && sync && sleep 2 && '
                    f'echo "$h $s $e $(date +%s.%N)" > {timing}')
            full = run_json([backup, "full", d, "--node", "disk0", "--exec-at-cut", hook,
                             "--json", "--progress", "none"] + args.backup_args.split(), env)
            hook_start, s, e, hook_end = map(float, open(timing).read().split())
            nbdcopy_secs = e - s
            changed = change(live, args.percent, 1000 + r)
            count_file = os.path.join(tmp, "count")
            hook2 = f'echo "$FLEECE_BITMAP_COUNT" > {count_file}'
            inc = run_json([backup, "incremental", d, "--exec-at-cut", hook2, "--json",
                            "--progress", "none"] + args.backup_args.split(), env)
            count = int(open(count_file).read())
            row = {
                # the hook runs inside the full backup: not its cost
                "full_seconds": full["seconds"] - (hook_end - hook_start),
                "full_pull_seconds": full["pull_seconds"],
                "full_bytes": full["bytes_pulled"],
                "full_rate": full["bytes_pulled"] / full["pull_seconds"],
                "nbdcopy_seconds": nbdcopy_secs, "nbdcopy_rate": size / nbdcopy_secs,
                "inc_seconds": inc["seconds"], "inc_pull_seconds": inc["pull_seconds"],
                "inc_pulled": inc["bytes_pulled"], "inc_zeroed": inc["bytes_zeroed"],
                "dirty_bytes": inc["dirty_bytes"], "bitmap_count": count, "changed": changed,
            }
            rows.append(row)
            print(f"round {r + 1}/{rounds}: full {row['full_seconds']:.2f} s "
                  f"(pull {row['full_pull_seconds']:.2f} s, {row['full_rate'] / 2**30:.2f} GiB/s), "
                  f"nbdcopy {nbdcopy_secs:.2f} s ({row['nbdcopy_rate'] / 2**30:.2f} GiB/s), "
                  f"incremental {row['inc_seconds']:.3f} s, pulled {row['inc_pulled']} "
                  f"dirty {row['dirty_bytes']} count {count}", file=sys.stderr)
            shutil.rmtree(d)
            # Each full backup leaves its chain's persistent bitmap on the
            # node; the next round starts a new chain, so drop them all.
            for name in bitmaps(fleecectl, env):
                subprocess.run([fleecectl, "bitmap", "remove", "disk0", name], env=env, check=True,
                               stdout=subprocess.DEVNULL, timeout=60)
            settle()
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(target_dir, ignore_errors=True)

    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    ratio_time = med["inc_seconds"] / med["full_seconds"]
    ratio_pull = med["inc_pull_seconds"] / med["full_pull_seconds"]
    rate_ratio = statistics.median(r["full_rate"] / r["nbdcopy_rate"] for r in rows)
    equal = all(r["inc_pulled"] + r["inc_zeroed"] == r["dirty_bytes"] == r["bitmap_count"]
                for r in rows)
    gib = 2**30
    print(f"\nfleece-backup on a {size / gib:.1f} GiB fully allocated disk, {args.percent}% "
          f"changed in scattered 64 KiB granules, {rounds} round(s), backups in "
          f"{args.target_dir or workroot}, medians:")
    print(f"  full backup          {med['full_seconds']:8.2f} s  (hook excluded; pull {med['full_pull_seconds']:.2f} s,"
          f" {med['full_rate'] / gib:.2f} GiB/s)")
    print(f"  nbdcopy of the fleece {med['nbdcopy_seconds']:7.2f} s  ({med['nbdcopy_rate'] / gib:.2f} GiB/s)")
    print(f"  incremental backup   {med['inc_seconds']:8.3f} s  (pull {med['inc_pull_seconds']:.3f} s)")
    print(f"  incremental / full   {ratio_time * 100:7.2f} %   (target < 5 %; pull only "
          f"{ratio_pull * 100:.2f} %)")
    print(f"  bytes pulled+zeroed == dirty bytes == bitmap count: {'yes' if equal else 'NO'} "
          f"({rows[-1]['inc_pulled']} + {rows[-1]['inc_zeroed']} / {rows[-1]['dirty_bytes']} / "
          f"{rows[-1]['bitmap_count']}; changed {rows[-1]['changed']})")
    print(f"  full pull rate / nbdcopy rate: {rate_ratio:.2f}x (target >= 0.9x)")
    out = os.path.join(HERE, "results")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "backup.json"), "w") as f:
        json.dump({"rows": rows, "median": med, "inc_over_full": ratio_time,
                   "rate_ratio": rate_ratio, "equal": equal}, f, indent=1)


if __name__ == "__main__":
    main()

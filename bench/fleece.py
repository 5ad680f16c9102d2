#!/usr/bin/python3
# SPDX-License-Identifier: MIT
"""bench/fleece.py - what an active fleece costs: fleeced vs qemu-storage-daemon.

For each server (alternating, round by round, same fully allocated image):
  * 4 KiB random-write IOPS into the live export (fio nbd engine) at QD1 and
    QD32, without a fleece and with a fresh fleece taken just before the run
    (flavour B: transaction with blockdev-backup sync=none + snapshot-access,
    exported), so the point in time predates every measured write;
  * nbdcopy of the fleece vs nbdcopy of the live export to null: (GiB/s).
Prints medians, each server's fleece/no-fleece ratio and fleeced/qsd ratios.

  bench/fleece.py [--quick] [--rounds N] [--secs S] [--size BYTES]
Environment: FLEECED (default build/release/server/fleeced).
Targets (issue 4): fleeced keeps >= 0.7x of its own IOPS with a fleece at
both depths; its fleece IOPS >= 2x qsd's; reading a fleece >= 0.9x as fast
as reading the live export.
"""
import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def die(msg):
    print(f"bench/fleece: error: {msg}", file=sys.stderr)
    sys.exit(2)


class Qmp:
    """Minimal QMP client: commands, and events kept while waiting."""

    def __init__(self, path, timeout=30):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.settimeout(timeout)
                self.s.connect(path)
                break
            except OSError:
                self.s.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.buf = b""
        self.dec = json.JSONDecoder()
        self.events = []
        self._read()  # greeting
        self.cmd("qmp_capabilities")

    def _read(self):
        while True:
            text = self.buf.decode(errors="replace").lstrip()
            if text:
                try:
                    obj, end = self.dec.raw_decode(text)
                    self.buf = text[end:].encode()
                    return obj
                except json.JSONDecodeError:
                    pass
            chunk = self.s.recv(65536)
            if not chunk:
                raise EOFError("QMP socket closed")
            self.buf += chunk

    def cmd(self, command, **args):
        msg = {"execute": command}
        if args:
            msg["arguments"] = args
        self.s.sendall(json.dumps(msg).encode())
        while True:
            r = self._read()
            if "event" in r:
                self.events.append(r)
                continue
            if "error" in r:
                raise RuntimeError(f"{command}: {r['error']['desc']}")
            return r["return"]

    def wait_event(self, name, timeout=30):
        deadline = time.monotonic() + timeout
        while True:
            for i, e in enumerate(self.events):
                if e["event"] == name:
                    return self.events.pop(i)
            if time.monotonic() > deadline:
                raise TimeoutError(name)
            self.events.append(self._read())

    def close(self):
        self.s.close()


class Server:
    def __init__(self, kind, image, run, fleeced):
        self.kind, self.image, self.run = kind, image, run
        self.sock = os.path.join(run, f"{kind}.sock")
        self.qmp_path = os.path.join(run, f"{kind}.qmp")
        self.fsock = os.path.join(run, f"{kind}-fleece.sock")
        for p in (self.sock, self.qmp_path, self.fsock):
            if os.path.exists(p):
                os.unlink(p)
        log = open(os.path.join(run, "servers.log"), "a")
        if kind == "fleeced":
            cmd = [fleeced, "--export", f"name=disk0,file={image},writable=on",
                   "--listen", f"unix:{self.sock}", "--qmp", f"unix:{self.qmp_path}",
                   "--log-level", "warn"]
        else:
            cmd = ["qemu-storage-daemon",
                   "--blockdev", f"driver=file,node-name=disk0-file,filename={image},cache.direct=off",
                   "--blockdev", "driver=raw,node-name=disk0,file=disk0-file",
                   "--nbd-server", f"addr.type=unix,addr.path={self.sock}",
                   "--export", "type=nbd,id=live,node-name=disk0,name=disk0,writable=on",
                   "--chardev", f"socket,id=m,path={self.qmp_path},server=on,wait=off",
                   "--monitor", "chardev=m"]
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log)
        self.qmp = Qmp(self.qmp_path)
        deadline = time.monotonic() + 20
        while not os.path.exists(self.sock):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                die(f"{kind} did not start (see {run}/servers.log)")
            time.sleep(0.05)
        self.uri = f"nbd+unix:///disk0?socket={self.sock}"
        self.fleece_uri = None
        self.scratch = os.path.join(run, f"{kind}-scratch.raw")
        self.nbd_started = False

    def take_fleece(self):
        with open(self.scratch, "wb") as f:
            f.truncate(os.path.getsize(self.image))
        q = self.qmp
        q.cmd("blockdev-add", driver="file", **{"node-name": "fl-tmp", "filename": self.scratch})
        q.cmd("transaction", actions=[{"type": "blockdev-backup", "data": {
            "job-id": "fleece-job", "device": "disk0", "target": "fl-tmp", "sync": "none",
            "filter-node-name": "fl-cbw"}}])
        q.cmd("blockdev-add", driver="snapshot-access", **{"node-name": "fl-access", "file": "fl-cbw"})
        if self.kind == "fleeced" and not self.nbd_started:
            # fleeced's command-line listener serves disk0; the fleece gets its own.
            q.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": self.fsock}})
            self.nbd_started = True
        q.cmd("block-export-add", type="nbd", id="fleece", **{"node-name": "fl-access"},
              name="fleece", writable=False)
        sock = self.fsock if self.kind == "fleeced" else self.sock
        self.fleece_uri = f"nbd+unix:///fleece?socket={sock}"

    def drop_fleece(self):
        q = self.qmp
        for _ in range(100):  # safe mode: clients may still be leaving
            try:
                q.cmd("block-export-del", id="fleece")
                break
            except RuntimeError:
                time.sleep(0.05)
        q.wait_event("BLOCK_EXPORT_DELETED")
        q.cmd("blockdev-del", **{"node-name": "fl-access"})
        q.cmd("block-job-cancel", device="fleece-job")
        q.wait_event("BLOCK_JOB_CANCELLED")
        q.cmd("blockdev-del", **{"node-name": "fl-tmp"})
        os.unlink(self.scratch)
        self.fleece_uri = None

    def cpu(self):
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self):
        try:
            self.qmp.cmd("quit")
        except Exception:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def fio_iops(uri, qd, secs, log):
    out = subprocess.run(
        ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k",
         f"--iodepth={qd}", "--time_based", f"--runtime={secs}", "--direct=0",
         "--output-format=json"], capture_output=True, text=True, timeout=secs + 120)
    log.write(out.stderr)
    text = out.stdout[out.stdout.find("{"):]
    job = json.loads(text)["jobs"][0]
    if job["error"] != 0 or job["write"]["iops"] <= 0:
        raise RuntimeError("fio failed")
    return job["write"]["iops"]


def nbdcopy_gibs(uri, size, log):
    t0 = time.monotonic()
    subprocess.run(["nbdcopy", uri, "null:"], check=True, stdout=log, stderr=log,
                   timeout=600)
    return size / (time.monotonic() - t0) / 2**30


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--secs", type=int)
    ap.add_argument("--size", type=int)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "fleece.json"))
    a = ap.parse_args()
    rounds = a.rounds or (1 if a.quick else 3)
    secs = a.secs or (2 if a.quick else 5)
    size = a.size or ((256 if a.quick else 1024) << 20)
    fleeced = os.environ.get("FLEECED", os.path.join(ROOT, "build/release/server/fleeced"))
    if not os.access(fleeced, os.X_OK):
        die(f"fleeced binary not found at {fleeced}")
    for tool in ("fio", "nbdcopy", "qemu-storage-daemon"):
        if not shutil.which(tool):
            die(f"{tool} is required")
    work = os.path.join(HERE, "work")
    os.makedirs(work, exist_ok=True)
    source = os.path.join(work, f"fleece-source-{size}.raw")
    if not os.path.exists(source) or os.path.getsize(source) != size:
        with open(source, "wb") as f:  # fully allocated, incompressible
            for _ in range(size >> 20):
                f.write(os.urandom(1 << 20))
    run = tempfile.mkdtemp(prefix="fleeced-fleece-bench.")
    image = os.path.join(run, "image.raw")
    log = open(os.path.join(run, "bench.log"), "a")
    samples = {}  # (server, metric) -> [values]

    def add(server, metric, value):
        samples.setdefault((server, metric), []).append(value)
        print(f"  {server:8} {metric:24} {value:12.3f}", flush=True)

    servers = ["fleeced", "qsd"]
    try:
        for r in range(rounds):
            print(f"round {r + 1}/{rounds}", flush=True)
            for kind in servers if r % 2 == 0 else reversed(servers):
                shutil.copyfile(source, image)
                subprocess.run(["sync", image])
                s = Server(kind, image, run, fleeced)
                try:
                    # Alternate the order within a round so neither side
                    # always runs on a warmer (or dirtier) page cache.
                    for qd in (1, 32):
                        for with_fleece in ((False, True) if r % 2 == 0 else (True, False)):
                            if not with_fleece:
                                add(kind, f"randwrite_qd{qd}", fio_iops(s.uri, qd, secs, log))
                                continue
                            s.take_fleece()
                            c0 = s.cpu()
                            iops = fio_iops(s.uri, qd, secs, log)
                            add(kind, f"randwrite_qd{qd}_fleece", iops)
                            add(kind, f"cpu_us_per_io_qd{qd}_fleece",
                                (s.cpu() - c0) * 1e6 / (iops * secs))
                            s.drop_fleece()
                    s.take_fleece()
                    reads = [("read_live_gibs", s.uri), ("read_fleece_gibs", s.fleece_uri)]
                    for metric, uri in (reads if r % 2 == 0 else reversed(reads)):
                        add(kind, metric, nbdcopy_gibs(uri, size, log))
                    s.drop_fleece()
                finally:
                    s.stop()
    finally:
        log.close()

    med = {k: statistics.median(v) for k, v in samples.items()}
    print(f"\nfleece bench: size={size} B rounds={rounds} fio runtime={secs} s "
          f"cpus={os.cpu_count()} (medians)\n")
    print(f"{'metric':28} {'fleeced':>12} {'qsd':>12} {'fleeced/qsd':>12}")
    for m in ("randwrite_qd1", "randwrite_qd1_fleece", "randwrite_qd32",
              "randwrite_qd32_fleece", "read_live_gibs", "read_fleece_gibs",
              "cpu_us_per_io_qd1_fleece", "cpu_us_per_io_qd32_fleece"):
        f, q = med.get(("fleeced", m)), med.get(("qsd", m))
        ratio = f"{f / q:.2f}x" if f and q else "n/a"
        print(f"{m:28} {f or float('nan'):12.2f} {q or float('nan'):12.2f} {ratio:>12}")
    print("\nkept with an active fleece (fleece / no fleece):")
    for kind in servers:
        parts = []
        for qd in (1, 32):
            a_, b_ = med.get((kind, f"randwrite_qd{qd}_fleece")), med.get((kind, f"randwrite_qd{qd}"))
            parts.append(f"QD{qd} {a_ / b_:.2f}x" if a_ and b_ else f"QD{qd} n/a")
        rl, rf = med.get((kind, "read_live_gibs")), med.get((kind, "read_fleece_gibs"))
        parts.append(f"fleece read / live read {rf / rl:.2f}x" if rl and rf else "read n/a")
        print(f"  {kind:8} " + ", ".join(parts))
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"size": size, "rounds": rounds, "secs": secs,
                   "samples": {f"{k[0]}/{k[1]}": v for k, v in samples.items()},
                   "medians": {f"{k[0]}/{k[1]}": v for k, v in med.items()}}, f, indent=1)
    print(f"\nJSON written to {a.out}; logs in {run}")


if __name__ == "__main__":
    main()

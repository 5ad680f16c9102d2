#!/usr/bin/python3
"""Sequential NBD handshakes per second, in-process (no process spawn per
connection): nbd.NBD(); connect_uri(URI); shutdown(); repeat N times.

usage: handshake.py URI N [DEADLINE_SECONDS]
prints: handshakes/s (float) on stdout; exits 1 on any error or if the
deadline is hit before N handshakes complete (loop is bounded both ways).
"""
import sys
import time

import nbd


def main():
    uri = sys.argv[1]
    n = int(sys.argv[2])
    deadline = float(sys.argv[3]) if len(sys.argv) > 3 else 120.0
    t0 = time.perf_counter()
    for i in range(n):
        h = nbd.NBD()
        h.connect_uri(uri)
        h.shutdown()
        del h
        if time.perf_counter() - t0 > deadline:
            print(f"handshake: deadline hit after {i + 1} handshakes", file=sys.stderr)
            return 1
    dt = time.perf_counter() - t0
    print(f"{n / dt:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

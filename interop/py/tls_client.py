# SPDX-License-Identifier: MIT
"""python3-libnbd (GnuTLS) clients for the TLS interop scripts.

    tls_client.py roundtrip CONNECT...   write, read back, flush; check TLS
    tls_client.py refused CONNECT...     the connection must fail; prints why
    tls_client.py hold CONNECT... --ready FILE --stop FILE
        connects, writes READY, then keeps writing and reading its own
        region until STOP exists (bounded by --max-seconds); fails on any
        error, so a rotation that disturbs a running session shows up.

CONNECT: --socket PATH | --tcp HOST:PORT, --export NAME, and either
--psk FILE --user NAME, --certs DIR, or --plain.
"""

import argparse
import os
import sys
import time

import nbd


def connect(a):
    h = nbd.NBD()
    h.set_export_name(a.export)
    if a.plain:
        h.set_tls(nbd.TLS_DISABLE)
    else:
        h.set_tls(nbd.TLS_REQUIRE)
        if a.psk:
            h.set_tls_psk_file(a.psk)
            h.set_tls_username(a.user)
        else:
            h.set_tls_certificates(a.certs)
            h.set_tls_verify_peer(True)
    if a.tcp:
        host, port = a.tcp.rsplit(":", 1)
        h.connect_tcp(host, port)
    else:
        h.connect_unix(a.socket)
    return h


def pattern(offset, length, seed):
    return bytes(((offset + i) * 7 + seed) & 0xFF for i in range(length))


def check_tls(a, h):
    if not a.plain and h.get_tls_negotiated() != 1:
        sys.exit("TLS was not negotiated")


def roundtrip(a):
    h = connect(a)
    check_tls(a, h)
    for i, (off, length) in enumerate([(a.offset, 4096), (a.offset + 65536, 300000)]):
        data = pattern(off, length, i + 1)
        h.pwrite(data, off)
        if h.pread(length, off) != data:
            sys.exit(f"data read back at {off} differs")
    h.flush()
    print(f"ok size={h.get_size()} tls={h.get_tls_negotiated()}")
    h.shutdown()


def refused(a):
    try:
        h = connect(a)
        h.pread(512, 0)
    except nbd.Error as e:
        print(f"refused: {e.string}")
        return
    sys.exit("the connection was expected to fail but worked")


def hold(a):
    h = connect(a)
    check_tls(a, h)
    with open(a.ready, "w") as f:
        f.write("connected\n")
    deadline = time.monotonic() + a.max_seconds
    rounds = 0
    while not os.path.exists(a.stop):
        if time.monotonic() > deadline:
            sys.exit("STOP file never appeared")
        off = a.offset + (rounds % 16) * 8192
        data = pattern(off, 8192, rounds)
        h.pwrite(data, off)
        if h.pread(8192, off) != data:
            sys.exit(f"round {rounds}: data read back differs")
        rounds += 1
        time.sleep(0.01)
    h.flush()
    h.shutdown()
    print(f"ok rounds={rounds}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["roundtrip", "refused", "hold"])
    p.add_argument("--socket")
    p.add_argument("--tcp")
    p.add_argument("--export", default="disk0")
    p.add_argument("--psk")
    p.add_argument("--user", default="alice")
    p.add_argument("--certs")
    p.add_argument("--plain", action="store_true")
    p.add_argument("--offset", type=int, default=12 << 20)
    p.add_argument("--ready")
    p.add_argument("--stop")
    p.add_argument("--max-seconds", type=float, default=60)
    a = p.parse_args()
    {"roundtrip": roundtrip, "refused": refused, "hold": hold}[a.mode](a)


if __name__ == "__main__":
    main()

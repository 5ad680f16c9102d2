# SPDX-License-Identifier: MIT
"""STARTTLS at byte level (NBD spec "TLS support"; CVE-2021-3716), with
Python's ssl module (OpenSSL) as the TLS client.

    tls_raw.py --on SOCK --require SOCK --image IMG --pki DIR

--on: a fleeced with --tls=on and X.509 verify-peer=on; --require: the same
with TLS required. PKI: ca/ (the server's CA), client1/ (a client signed by
it), intruder/ (a client of another CA). Prints one line per check and exits
non-zero if any failed.
"""

import argparse
import socket
import ssl
import struct
import sys

import nbdraw as nr

failures = 0


def check(ok, what):
    global failures
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        failures += 1


def tls_context(pki, client):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(f"{pki}/ca/ca-cert.pem")
    if client:
        ctx.load_cert_chain(f"{pki}/{client}/client-cert.pem", f"{pki}/{client}/client-key.pem")
    return ctx


def starttls(raw, ctx):
    """STARTTLS, expect ACK, then the handshake; raw.sock becomes TLS."""
    raw.option(nr.OPT_STARTTLS)
    rtype = raw.opt_replies(nr.OPT_STARTTLS)[-1][0]
    if rtype != nr.REP_ACK:
        raise nr.ProtocolError(f"STARTTLS answered {rtype:#x}")
    raw.sock.settimeout(5)
    raw.sock = ctx.wrap_socket(raw.sock, server_hostname="localhost")


def read_simple(raw, cookie):
    magic, error, got = struct.unpack(">IIQ", raw.recv_exact(16))
    if magic != nr.SIMPLE_REPLY_MAGIC or got != cookie:
        raise nr.ProtocolError(f"expected a simple reply to {cookie}, got magic {magic:#x}")
    return error


def request(raw, cmd, cookie, offset, length):
    raw.send(struct.pack(">IHHQQI", nr.REQUEST_MAGIC, 0, cmd, cookie, offset, length))


def forgotten_after_starttls(a, image):
    raw = nr.Raw(a.on)
    raw.start()
    check(raw.structured_reply() == nr.REP_ACK, "plaintext STRUCTURED_REPLY acknowledged (--tls=on)")
    check(raw.set_meta_context("disk0", ["base:allocation"]) == nr.REP_ACK,
          "plaintext SET_META_CONTEXT acknowledged")
    starttls(raw, tls_context(a.pki, "client1"))
    check(raw.go("disk0") == nr.REP_ACK, "GO over TLS")
    check(not raw.eflags & 0x80, "no NBD_FLAG_SEND_DF: structured replies were forgotten")
    request(raw, nr.CMD_READ, 1, 4096, 4096)
    err = read_simple(raw, 1)
    data = raw.recv_exact(4096)
    check(err == 0 and data == image[4096:8192], "READ answered with a simple reply and the data")
    request(raw, nr.CMD_BLOCK_STATUS, 2, 0, 65536)
    check(read_simple(raw, 2) == 22, "BLOCK_STATUS refused (EINVAL): the meta context was forgotten")
    request(raw, nr.CMD_DISC, 3, 0, 0)
    raw.close()

    raw = nr.Raw(a.on)
    raw.start()
    check(raw.structured_reply() == nr.REP_ACK, "plaintext STRUCTURED_REPLY")
    starttls(raw, tls_context(a.pki, "client1"))
    check(raw.structured_reply() == nr.REP_ACK,
          "STRUCTURED_REPLY over TLS is acknowledged again (not 'already negotiated')")
    raw.option(nr.OPT_STARTTLS)
    check(raw.opt_replies(nr.OPT_STARTTLS)[-1][0] == nr.REP_ERR_INVALID,
          "second STARTTLS: NBD_REP_ERR_INVALID")
    check(raw.go("disk0") == nr.REP_ACK and raw.eflags & 0x80, "GO after that, with DF")
    raw.close()


def required(a):
    raw = nr.Raw(a.require)
    raw.start()
    for name, code, data in [("LIST", nr.OPT_LIST, b""),
                             ("INFO", nr.OPT_INFO, raw.info_payload("disk0")),
                             ("GO", nr.OPT_GO, raw.info_payload("disk0")),
                             ("STRUCTURED_REPLY", nr.OPT_STRUCTURED_REPLY, b""),
                             ("unknown option 0x99", 0x99, b"junk")]:
        raw.option(code, data)
        rtype = raw.opt_replies(code)[-1][0]
        check(rtype == nr.REP_ERR_TLS_REQD, f"{name} before STARTTLS: NBD_REP_ERR_TLS_REQD ({rtype:#x})")
    raw.option(nr.OPT_STARTTLS, b"x")
    check(raw.opt_replies(nr.OPT_STARTTLS)[-1][0] == nr.REP_ERR_INVALID,
          "STARTTLS with a payload: NBD_REP_ERR_INVALID")
    starttls(raw, tls_context(a.pki, "client1"))
    check(raw.go("disk0") == nr.REP_ACK, "then STARTTLS and GO work")
    raw.close()

    raw = nr.Raw(a.require)
    raw.start()
    raw.option(nr.OPT_EXPORT_NAME, b"disk0")
    check(raw.wait_closed() == b"", "EXPORT_NAME before STARTTLS ends the session")

    raw = nr.Raw(a.require)
    raw.start()
    raw.send(struct.pack(">QII", nr.IHAVEOPT, nr.OPT_STARTTLS, 0) +
             struct.pack(">QII", nr.IHAVEOPT, nr.OPT_GO, 0))
    check(raw.wait_closed() == b"", "bytes after STARTTLS before its reply: closed, nothing sent")

    raw = nr.Raw(a.require)
    raw.start()
    raw.option(nr.OPT_STARTTLS)
    raw.opt_replies(nr.OPT_STARTTLS)
    raw.send(b"GET / HTTP/1.0\r\n\r\n" * 4)
    got = raw.wait_closed()
    check(not got.startswith(b"NBD") and len(got) < 64, "garbage instead of a ClientHello: closed")


def refused_handshake(a, client, what):
    raw = nr.Raw(a.require)
    raw.start()
    try:
        starttls(raw, tls_context(a.pki, client))
        # TLS 1.3: the server's verdict on our certificate comes after the
        # client's handshake is done; the first read shows it.
        raw.option(nr.OPT_GO, raw.info_payload("disk0"))
        raw.opt_replies(nr.OPT_GO)
        check(False, what)
    except (ssl.SSLError, nr.Closed, ConnectionResetError, BrokenPipeError, OSError) as e:
        check(True, f"{what} ({type(e).__name__}: {e})")
    raw.close()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--on", required=True)
    p.add_argument("--require", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--pki", required=True)
    a = p.parse_args()
    with open(a.image, "rb") as f:
        image = f.read(1 << 20)
    forgotten_after_starttls(a, image)
    required(a)
    refused_handshake(a, "intruder", "client certificate from another CA refused")
    refused_handshake(a, None, "no client certificate refused")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()

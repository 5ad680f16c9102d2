# SPDX-License-Identifier: MIT
"""A byte-level NBD client for malformed-input tests (python struct only).

Every receive has a timeout, so a server that neither answers nor closes
shows up as a Timeout instead of a hang.
"""

import select
import socket
import struct
import time

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2
C_FIXED_NEWSTYLE = 1
C_NO_ZEROES = 2

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = 0x80000001
REP_ERR_POLICY = 0x80000002
REP_ERR_INVALID = 0x80000003
REP_ERR_PLATFORM = 0x80000004
REP_ERR_TLS_REQD = 0x80000005
REP_ERR_UNKNOWN = 0x80000006
REP_ERR_SHUTDOWN = 0x80000007
REP_ERR_BLOCK_SIZE_REQD = 0x80000008
REP_ERR_TOO_BIG = 0x80000009

INFO_EXPORT = 0

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_FLAG_FUA = 1
CMD_FLAG_REQ_ONE = 8

REPLY_FLAG_DONE = 1
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = 0x8001
REPLY_TYPE_ERROR_OFFSET = 0x8002


class Closed(Exception):
    """The server closed the connection (EOF or reset)."""


class Timeout(Exception):
    """The server neither answered nor closed in time."""


class ProtocolError(Exception):
    pass


class Raw:
    def __init__(self, path, timeout=5.0):
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.size = None
        self.eflags = None
        self.structured = False
        self.meta_id = None
        self.no_zeroes = False

    # -------------------------------------------------------------- bytes
    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, data):
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError) as e:
            raise Closed(f"send: {e}") from e

    def recv_exact(self, n, timeout=None):
        deadline = time.monotonic() + (timeout or self.timeout)
        buf = bytearray()
        while len(buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Timeout(f"got {len(buf)} of {n} bytes")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(min(n - len(buf), 1 << 20))
            except socket.timeout as e:
                raise Timeout(f"got {len(buf)} of {n} bytes") from e
            except ConnectionResetError as e:
                raise Closed("reset") from e
            if not chunk:
                raise Closed(f"EOF after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def wait_closed(self, timeout=5.0):
        """Return bytes received before EOF/reset; raise Timeout if the
        connection is still open after timeout seconds."""
        deadline = time.monotonic() + timeout
        got = bytearray()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Timeout(f"still open after {timeout} s "
                              f"(received {bytes(got[:64]).hex()})")
            r, _, _ = select.select([self.sock], [], [], left)
            if not r:
                continue
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return bytes(got)
            if not chunk:
                return bytes(got)
            got += chunk

    def is_open(self, wait=0.3):
        """True if nothing arrived and no EOF within wait seconds."""
        r, _, _ = select.select([self.sock], [], [], wait)
        if not r:
            return True
        try:
            data = self.sock.recv(1, socket.MSG_PEEK)
        except ConnectionResetError:
            return False
        return bool(data)

    # -------------------------------------------------------------- handshake
    def greeting(self):
        data = self.recv_exact(18)
        magic, opt, hflags = struct.unpack(">QQH", data)
        if magic != NBDMAGIC or opt != IHAVEOPT:
            raise ProtocolError(f"bad greeting {data.hex()}")
        if not hflags & FLAG_FIXED_NEWSTYLE:
            raise ProtocolError(f"no FIXED_NEWSTYLE in {hflags:#x}")
        return hflags

    def client_flags(self, flags=C_FIXED_NEWSTYLE | C_NO_ZEROES):
        self.no_zeroes = bool(flags & C_NO_ZEROES)
        self.send(struct.pack(">I", flags))

    def start(self, flags=C_FIXED_NEWSTYLE | C_NO_ZEROES):
        self.greeting()
        self.client_flags(flags)

    def option(self, code, data=b"", length=None):
        if length is None:
            length = len(data)
        self.send(struct.pack(">QII", IHAVEOPT, code, length) + data)

    def opt_reply(self, timeout=None):
        hdr = self.recv_exact(20, timeout)
        magic, opt, rtype, length = struct.unpack(">QIII", hdr)
        if magic != REPLY_MAGIC:
            raise ProtocolError(f"bad option reply magic {hdr.hex()}")
        data = self.recv_exact(length, timeout) if length else b""
        return opt, rtype, data

    def opt_replies(self, code, timeout=None):
        """All replies to one option, up to ACK or an error."""
        out = []
        while True:
            opt, rtype, data = self.opt_reply(timeout)
            if opt != code:
                raise ProtocolError(f"reply for option {opt}, sent {code}")
            out.append((rtype, data))
            if rtype == REP_ACK or rtype & 0x80000000:
                return out

    @staticmethod
    def info_payload(name, infos=()):
        n = name.encode() if isinstance(name, str) else name
        return (struct.pack(">I", len(n)) + n + struct.pack(">H", len(infos))
                + b"".join(struct.pack(">H", i) for i in infos))

    def go(self, name, code=OPT_GO):
        self.option(code, self.info_payload(name))
        replies = self.opt_replies(code)
        last = replies[-1][0]
        if last != REP_ACK:
            return last
        for rtype, data in replies:
            if rtype == REP_INFO and struct.unpack(">H", data[:2])[0] == INFO_EXPORT:
                self.size, self.eflags = struct.unpack(">QH", data[2:12])
        if self.size is None:
            raise ProtocolError("GO without NBD_INFO_EXPORT")
        return REP_ACK

    def structured_reply(self):
        self.option(OPT_STRUCTURED_REPLY)
        rtype = self.opt_replies(OPT_STRUCTURED_REPLY)[-1][0]
        self.structured = rtype == REP_ACK
        return rtype

    def set_meta_context(self, name, queries):
        n = name.encode()
        data = struct.pack(">I", len(n)) + n + struct.pack(">I", len(queries))
        for q in queries:
            data += struct.pack(">I", len(q)) + q.encode()
        self.option(OPT_SET_META_CONTEXT, data)
        replies = self.opt_replies(OPT_SET_META_CONTEXT)
        for rtype, d in replies:
            if rtype == REP_META_CONTEXT:
                self.meta_id = struct.unpack(">I", d[:4])[0]
        return replies[-1][0]

    def negotiate(self, name, structured=False, meta=False):
        self.start()
        if structured:
            if self.structured_reply() != REP_ACK:
                raise ProtocolError("structured replies refused")
        if meta:
            if self.set_meta_context(name, ["base:allocation"]) != REP_ACK:
                raise ProtocolError("SET_META_CONTEXT failed")
        rtype = self.go(name)
        if rtype != REP_ACK:
            raise ProtocolError(f"GO {name!r} failed with {rtype:#x}")

    # -------------------------------------------------------------- transmission
    def request(self, cmd, offset=0, length=0, cookie=1, flags=0, payload=b"",
                magic=REQUEST_MAGIC):
        self.send(struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset,
                              length) + payload)

    def simple_reply(self, timeout=None):
        """(error, cookie) of a simple reply (no data read)."""
        hdr = self.recv_exact(16, timeout)
        magic, err, cookie = struct.unpack(">IIQ", hdr)
        if magic != SIMPLE_REPLY_MAGIC:
            raise ProtocolError(f"bad simple reply {hdr.hex()}")
        return err, cookie

    def reply(self, read_length=0, timeout=None):
        """Read one whole reply.  Returns dict(error, cookie, data, chunks).

        read_length: for a successful simple READ reply, bytes of data that
        follow (or a function cookie -> length, for pipelined mixes).  For
        structured replies all chunks up to DONE are read."""
        magic_b = self.recv_exact(4, timeout)
        magic = struct.unpack(">I", magic_b)[0]
        if magic == SIMPLE_REPLY_MAGIC:
            rest = self.recv_exact(12, timeout)
            err, cookie = struct.unpack(">IQ", rest)
            data = b""
            if callable(read_length):
                read_length = read_length(cookie)
            if err == 0 and read_length:
                data = self.recv_exact(read_length, timeout)
            return dict(simple=True, error=err, cookie=cookie, data=data,
                        chunks=[])
        if magic != STRUCTURED_REPLY_MAGIC:
            raise ProtocolError(f"bad reply magic {magic_b.hex()}")
        chunks, err, cookie = [], 0, None
        while True:
            if chunks:
                m = struct.unpack(">I", self.recv_exact(4, timeout))[0]
                if m != STRUCTURED_REPLY_MAGIC:
                    raise ProtocolError(f"bad chunk magic {m:#x}")
            flags, ctype, ck, length = struct.unpack(
                ">HHQI", self.recv_exact(16, timeout))
            payload = self.recv_exact(length, timeout) if length else b""
            if cookie is not None and ck != cookie:
                raise ProtocolError("interleaved replies")
            cookie = ck
            chunks.append((flags, ctype, payload))
            if ctype & 0x8000:
                err = err or struct.unpack(">I", payload[:4])[0]
            if flags & REPLY_FLAG_DONE:
                break
        data = bytearray()
        for _, ctype, payload in chunks:
            if ctype == REPLY_TYPE_OFFSET_DATA:
                data += payload[8:]
        return dict(simple=False, error=err, cookie=cookie, data=bytes(data),
                    chunks=chunks)

    def read(self, offset, length, cookie=0x1111):
        """A checked READ; returns the data (structured replies reassembled)."""
        self.request(CMD_READ, offset, length, cookie)
        r = self.reply(read_length=length)
        if r["error"] or r["cookie"] != cookie:
            raise ProtocolError(f"read({offset}, {length}) -> {r['error']}, "
                                f"cookie {r['cookie']:#x}")
        if r["simple"]:
            return r["data"]
        buf = bytearray(length)
        for _, ctype, payload in r["chunks"]:
            if ctype == REPLY_TYPE_OFFSET_DATA:
                off = struct.unpack(">Q", payload[:8])[0] - offset
                buf[off:off + len(payload) - 8] = payload[8:]
        return bytes(buf)

    def disconnect(self):
        try:
            self.request(CMD_DISC, cookie=0xD15C)
        except Closed:
            pass
        self.close()

"""The NBD client against a hostile server: every bad reply is one clean error, never a hang.

A tiny fake server (socketserver, in a thread) does the handshake right, or
not, then answers each request the way the test says: bad magics, oversize
lengths, wrong handles, chunks outside the request, bytes left unsent, a
stall, a close mid-reply.  The client must raise :class:`NbdError` naming the
export within its timeout.
"""

from __future__ import annotations

import contextlib
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers.qemu import socket_path

from cbt.source.nbd import (
    BASE_ALLOCATION,
    IHAVEOPT,
    NBDMAGIC,
    OPT_GO,
    OPT_REPLY_MAGIC,
    OPT_SET_META_CONTEXT,
    REP_ACK,
    REP_INFO,
    REP_META_CONTEXT,
    STRUCTURED_REPLY_MAGIC,
    NbdClient,
    NbdError,
)

SIZE = 1 << 20
TIMEOUT = 1.0
Reply = Callable[[socket.socket, int, int, int, int], None]  # (sock, cmd, cookie, off, len)


def _recv(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        got = s.recv(n - len(buf))
        if not got:
            raise ConnectionError
        buf += got
    return buf


def _opt_reply(s: socket.socket, opt: int, rtype: int, data: bytes = b"") -> None:
    s.sendall(struct.pack(">QIII", OPT_REPLY_MAGIC, opt, rtype, len(data)) + data)


def _handshake(s: socket.socket, greeting: bytes | None) -> None:
    s.sendall(greeting if greeting is not None else struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3))
    _recv(s, 4)
    while True:
        _magic, opt, n = struct.unpack(">QII", _recv(s, 16))
        data = _recv(s, n)
        if opt == OPT_SET_META_CONTEXT:
            (nlen,) = struct.unpack_from(">I", data)
            (count,) = struct.unpack_from(">I", data, 4 + nlen)
            pos = 8 + nlen
            for i in range(count):
                (qlen,) = struct.unpack_from(">I", data, pos)
                _opt_reply(s, opt, REP_META_CONTEXT,
                           struct.pack(">I", i + 1) + data[pos + 4:pos + 4 + qlen])
                pos += 4 + qlen
        if opt == OPT_GO:
            _opt_reply(s, opt, REP_INFO, struct.pack(">HQH", 0, SIZE, 1))
        _opt_reply(s, opt, REP_ACK)
        if opt == OPT_GO:
            return


def chunk(s: socket.socket, flags: int, rtype: int, cookie: int, body: bytes,
          length: int | None = None) -> None:
    s.sendall(struct.pack(">IHHQI", STRUCTURED_REPLY_MAGIC, flags, rtype, cookie,
                          len(body) if length is None else length) + body)


@contextlib.contextmanager
def fake_server(tmp_path: Path, reply: Reply | None = None,
                greeting: bytes | None = None) -> Iterator[str]:
    """A fake NBD server on a unix socket: a right handshake, then ``reply`` per request."""

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            s: socket.socket = self.request
            s.settimeout(10)
            with contextlib.suppress(OSError, ConnectionError):
                _handshake(s, greeting)
                while True:
                    _magic, _flags, cmd, cookie, off, n = struct.unpack(">IHHQQI",
                                                                        _recv(s, 28))
                    if cmd == 2:  # NBD_CMD_DISC
                        return
                    assert reply is not None
                    reply(s, cmd, cookie, off, n)

    with socket_path(tmp_path) as sock:
        srv = socketserver.ThreadingUnixStreamServer(sock, Handler)
        srv.daemon_threads = True
        t = threading.Thread(target=srv.serve_forever, daemon=True)
        t.start()
        try:
            yield sock
        finally:
            srv.shutdown()
            srv.server_close()
            t.join()
            Path(sock).unlink()


def _good(s: socket.socket, cmd: int, cookie: int, off: int, n: int) -> None:
    if cmd == 0:  # a hole then data, in two chunks
        half = n // 2
        chunk(s, 0, 2, cookie, struct.pack(">QI", off, half))
        chunk(s, 1, 1, cookie, struct.pack(">Q", off + half) + b"x" * (n - half))
    else:  # block status: one short extent a reply, asked again from where it stopped
        chunk(s, 1, 5, cookie, struct.pack(">III", 1, min(n, 4096), 1))


def test_the_fake_server_itself_is_read_right(tmp_path: Path) -> None:
    """The reference behaviour the attacks below depart from."""
    with fake_server(tmp_path, _good) as sock, \
            NbdClient(sock, "vm", [BASE_ALLOCATION], timeout=TIMEOUT) as c:
        assert c.size == SIZE
        assert c.read(10, 1000) == bytes(500) + b"x" * 500
        ext = c.block_status(BASE_ALLOCATION, 0, 3 * 4096 + 5)
        assert ext == [(0, 3 * 4096 + 5, 1)]


def _data(body_off: int = 0, extra: int = 0) -> Reply:
    def reply(s: socket.socket, cmd: int, cookie: int, off: int, n: int) -> None:
        chunk(s, 1, 1, cookie, struct.pack(">Q", off + body_off) + b"y" * (n + extra))
    return reply


def _bad_magic(s: socket.socket, cmd: int, cookie: int, off: int, n: int) -> None:
    s.sendall(struct.pack(">IIQ", 0xDEADBEEF, 0, cookie))


def _wrong_cookie(s: socket.socket, cmd: int, cookie: int, off: int, n: int) -> None:
    chunk(s, 1, 1, cookie + 1000, struct.pack(">Q", off) + b"y" * n)


def _oversize(s: socket.socket, cmd: int, cookie: int, off: int, n: int) -> None:
    # claims 4 GiB of data: must be refused before reading (or allocating) it
    s.sendall(struct.pack(">IHHQI", STRUCTURED_REPLY_MAGIC, 1, 1, cookie, 0xFFFFFFFF))


def _short(s: socket.socket, cmd: int, cookie: int, off: int, n: int) -> None:
    chunk(s, 1, 1, cookie, struct.pack(">Q", off) + b"y" * (n - 1))  # done, a byte missing


def _twice(s: socket.socket, cmd: int, cookie: int, off: int, n: int) -> None:
    chunk(s, 0, 1, cookie, struct.pack(">Q", off) + b"y" * n)
    chunk(s, 1, 2, cookie, struct.pack(">QI", off, n))


def _stall(s: socket.socket, cmd: int, cookie: int, off: int, n: int) -> None:
    time.sleep(3 * TIMEOUT)


def _trickle(s: socket.socket, cmd: int, cookie: int, off: int, n: int) -> None:
    s.sendall(struct.pack(">IHHQI", STRUCTURED_REPLY_MAGIC, 1, 1, cookie, n + 8)
              + struct.pack(">Q", off))
    for _ in range(n):  # a byte now and then, each well within the timeout
        time.sleep(TIMEOUT / 4)
        s.sendall(b"y")


def _close_mid_reply(s: socket.socket, cmd: int, cookie: int, off: int, n: int) -> None:
    s.sendall(struct.pack(">IHHQI", STRUCTURED_REPLY_MAGIC, 1, 1, cookie, n + 8)
              + struct.pack(">Q", off) + b"y" * (n // 2))
    s.shutdown(socket.SHUT_RDWR)
    raise ConnectionError


def _error_chunk(s: socket.socket, cmd: int, cookie: int, off: int, n: int) -> None:
    msg = b"medium on fire"
    chunk(s, 1, (1 << 15) | 2, cookie, struct.pack(">IH", 5, len(msg)) + msg
          + struct.pack(">Q", off + 512))


def _unknown_type(s: socket.socket, cmd: int, cookie: int, off: int, n: int) -> None:
    chunk(s, 1, 77, cookie, b"zz")


def _zero_extent(s: socket.socket, cmd: int, cookie: int, off: int, n: int) -> None:
    chunk(s, 1, 5, cookie, struct.pack(">III", 1, 0, 0))


def _no_extent(s: socket.socket, cmd: int, cookie: int, off: int, n: int) -> None:
    chunk(s, 1, 0, cookie, b"")


def _status_other_context(s: socket.socket, cmd: int, cookie: int, off: int, n: int) -> None:
    chunk(s, 1, 5, cookie, struct.pack(">III", 9, n, 0))


def _status_twice(s: socket.socket, cmd: int, cookie: int, off: int, n: int) -> None:
    chunk(s, 0, 5, cookie, struct.pack(">III", 1, n, 0))
    chunk(s, 1, 5, cookie, struct.pack(">III", 1, n, 0))


def _overlap_below(s: socket.socket, cmd: int, cookie: int, off: int, n: int) -> None:
    chunk(s, 0, 1, cookie, struct.pack(">Q", off + 500) + b"y" * (n - 500))
    chunk(s, 1, 2, cookie, struct.pack(">QI", off, 501))


def _two_contexts(s: socket.socket, cmd: int, cookie: int, off: int, n: int) -> None:
    # one chunk per negotiated context (ids 1 and 2, in the order asked), the other first
    chunk(s, 0, 5, cookie, struct.pack(">IIIII", 2, 4096, 1, n, 0))
    chunk(s, 1, 5, cookie, struct.pack(">III", 1, n, 3))


def _simple_ok(s: socket.socket, cmd: int, cookie: int, off: int, n: int) -> None:
    s.sendall(struct.pack(">IIQ", 0x67446698, 0, cookie))


def _simple_error(s: socket.socket, cmd: int, cookie: int, off: int, n: int) -> None:
    s.sendall(struct.pack(">IIQ", 0x67446698, 5, cookie))


def _huge_status(s: socket.socket, cmd: int, cookie: int, off: int, n: int) -> None:
    s.sendall(struct.pack(">IHHQI", STRUCTURED_REPLY_MAGIC, 1, 5, cookie, 0xFFFFFFF4))


READ_ATTACKS: dict[str, tuple[Reply, str]] = {
    "bad magic": (_bad_magic, "bad reply magic 0xdeadbeef"),
    "wrong handle": (_wrong_cookie, "not in flight"),
    "oversize length": (_oversize, "a data chunk of 4294967295 bytes"),
    "chunk past the request": (_data(body_off=100), r"a chunk for bytes \[110, 1110\)"),
    "chunk before the request": (_data(body_off=-10), r"a chunk for bytes \[0, 1000\)"),
    "more data than asked": (_data(extra=1), "a data chunk of 1009 bytes"),
    "bytes left unsent": (_short, "left bytes from 1009 unsent"),
    "the same bytes twice": (_twice, "sent twice"),
    "overlapping bytes": (_overlap_below, r"a chunk for bytes \[10, 511\) sent twice"),
    "stall": (_stall, "no reply from the server within 1 s"),
    "trickle": (_trickle, "no reply from the server within 1 s"),
    "closed mid-reply": (_close_mid_reply, "closed the connection|connection failed"),
    "error chunk": (_error_chunk, "read failed at byte 522: .*medium on fire"),
    "unknown chunk type": (_unknown_type, "a reply chunk of type 77"),
    "a simple error": (_simple_error, "the server failed a request: Input/output error"),
}


@pytest.mark.parametrize("attack", READ_ATTACKS, ids=list(READ_ATTACKS))
def test_a_bad_read_reply_is_a_clean_error(tmp_path: Path, attack: str) -> None:
    reply, message = READ_ATTACKS[attack]
    with fake_server(tmp_path, reply) as sock, NbdClient(sock, "vm", timeout=TIMEOUT) as c:
        t = time.monotonic()
        with pytest.raises(NbdError, match=message) as err:
            c.read(10, 1000)
        assert time.monotonic() - t < 2 * TIMEOUT + 1
        with pytest.raises(NbdError, match="unusable after an earlier error"):
            c.read(0, 10)  # (replies still due would be taken for this one's)
    assert "nbd+unix:///vm?socket=" in str(err.value)
    assert err.value.path == f"nbd+unix:///vm?socket={sock}"
    assert "\n" not in str(err.value)


STATUS_ATTACKS: dict[str, tuple[Reply, str]] = {
    "zero-length extent": (_zero_extent, "an empty extent at byte 0"),
    "no extent": (_no_extent, "no extents for byte 0"),
    "another context": (_status_other_context, "context 9, never asked for"),
    "the same context twice": (_status_twice, "context 1, never asked for or already"),
    "oversize chunk": (_huge_status, "a bad block status chunk"),
    "wrong handle": (_wrong_cookie, "not in flight"),
    "a simple reply": (_simple_ok, "a simple reply without extents"),
    "a simple error": (_simple_error, "the server failed a request: Input/output error"),
}


@pytest.mark.parametrize("attack", STATUS_ATTACKS, ids=list(STATUS_ATTACKS))
def test_a_bad_block_status_reply_is_a_clean_error(tmp_path: Path, attack: str) -> None:
    reply, message = STATUS_ATTACKS[attack]
    with fake_server(tmp_path, reply) as sock, \
            NbdClient(sock, "vm", [BASE_ALLOCATION], timeout=TIMEOUT) as c, \
            pytest.raises(NbdError, match=message):
        c.block_status(BASE_ALLOCATION)


@pytest.mark.parametrize(("greeting", "message"), [
    (b"HTTP/1.1 400 Bad Request\r\n", "bad magic"),
    (struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 0), "fixed newstyle"),
    (b"NBDMAG", "no reply from the server within 1 s"),
])
def test_a_bad_greeting_is_a_clean_error(tmp_path: Path, greeting: bytes, message: str) -> None:
    with fake_server(tmp_path, greeting=greeting) as sock, \
            pytest.raises(NbdError, match=message):
        NbdClient(sock, "vm", timeout=TIMEOUT)


def test_an_oversize_option_reply_is_refused(tmp_path: Path) -> None:
    greeting = struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3)
    # the greeting, then an option reply claiming 4 GiB of data
    greeting_and_reply = greeting + struct.pack(">QIII", OPT_REPLY_MAGIC, 8, REP_ACK,
                                                0xFFFFFFFF)
    with fake_server(tmp_path, greeting=greeting_and_reply) as sock, \
            pytest.raises(NbdError, match="an option reply of 4294967295 bytes"):
        NbdClient(sock, "vm", timeout=TIMEOUT)


def test_block_status_with_two_contexts_takes_the_one_asked(tmp_path: Path) -> None:
    with fake_server(tmp_path, _two_contexts) as sock, \
            NbdClient(sock, "vm", [BASE_ALLOCATION, "qemu:dirty-bitmap:bm"],
                      timeout=TIMEOUT) as c:
        assert c.contexts == {BASE_ALLOCATION: 1, "qemu:dirty-bitmap:bm": 2}
        assert c.block_status(BASE_ALLOCATION, 0, 8192) == [(0, 8192, 3)]


def test_a_simple_reply_to_a_read_is_read(tmp_path: Path) -> None:
    def reply(s: socket.socket, cmd: int, cookie: int, off: int, n: int) -> None:
        s.sendall(struct.pack(">IIQ", 0x67446698, 0, cookie) + bytes([off % 251]) * n)

    with fake_server(tmp_path, reply) as sock, NbdClient(sock, "vm", timeout=TIMEOUT) as c:
        buf = bytearray(3000)
        c.read_into(100, buf, in_flight=4, request=1024)
        assert buf == bytes([100]) * 1024 + bytes([1124 % 251]) * 1024 + bytes([2148 % 251]) * 952


def test_short_ranges_are_read_with_requests_in_flight_across_them(tmp_path: Path) -> None:
    """A tracked disk reads many short ranges: the source keeps several requests out
    across ranges (one at a time, each cost a round trip to the server and its disk), and
    hands the windows back in order however the server orders its replies."""
    import select

    from cbt.source.nbd import NbdSource

    queued: list[tuple[int, int, int]] = []
    batches: list[int] = []

    def reply(s: socket.socket, cmd: int, cookie: int, off: int, n: int) -> None:
        queued.append((cookie, off, n))
        if select.select([s], [], [], 0.05)[0]:  # more requests came: answer them together
            return
        batches.append(len(queued))
        for c, o, k in reversed(queued):  # last asked, first answered
            body = b"".join(bytes([(o + i) // 4096 % 251]) * 4096 for i in range(0, k, 4096))
            chunk(s, 1, 1, c, struct.pack(">Q", o) + body)
        queued.clear()

    ranges = [(b, b + 1) for b in range(0, 64, 3)] + [(70, 75)]
    with fake_server(tmp_path, reply) as sock:
        source = NbdSource(sock, "vm", timeout=TIMEOUT)
        try:
            got = [(first, bytes(w)) for first, w in source.windows_of(4096, ranges)]
        finally:
            source.close()
    want = [(lo, b"".join(bytes([b % 251]) * 4096 for b in range(lo, hi)))
            for lo, hi in ranges]
    assert got == want
    assert max(batches) >= 4, batches  # (one request at a time: every batch is 1)


def test_windows_of_reuses_a_window_only_once_the_next_is_asked_for(tmp_path: Path) -> None:
    """Each window keeps its bytes until the caller asks for the next one."""
    from cbt.source.nbd import NbdSource

    def reply(s: socket.socket, cmd: int, cookie: int, off: int, n: int) -> None:
        chunk(s, 1, 1, cookie, struct.pack(">Q", off) + bytes([off // 8192 % 251]) * n)

    with fake_server(tmp_path, reply) as sock:
        source = NbdSource(sock, "vm", timeout=TIMEOUT, window=8192)
        try:
            for first, w in source.windows_of(4096, [(0, 40), (50, 60)]):
                assert bytes(w) == bytes([first // 2 % 251]) * len(w)
        finally:
            source.close()


def test_reads_abandoned_with_replies_due_leave_the_connection_refused(tmp_path: Path) -> None:
    """A caller that stops taking windows leaves replies due on the stream: the next
    request on that connection is refused (it would read another request's bytes)."""
    from cbt.source.nbd import NbdSource

    def reply(s: socket.socket, cmd: int, cookie: int, off: int, n: int) -> None:
        chunk(s, 1, 1, cookie, struct.pack(">Q", off) + b"z" * n)

    with fake_server(tmp_path, reply) as sock:
        source = NbdSource(sock, "vm", timeout=TIMEOUT)
        try:
            windows = source.windows_of(4096, [(b, b + 1) for b in range(0, 60, 2)])
            next(windows)
            windows.close()
            with pytest.raises(NbdError, match="abandoned"):
                source.client.read(0, 4096)
        finally:
            source.close()

"""An NBD client and an NBD block source (a running VM's disk through QEMU's NBD server).

Our own minimal client of the NBD protocol (the public specification,
``doc/proto.md`` of NetworkBlockDevice/nbd), over a unix socket:

1. fixed newstyle handshake; ``NBD_OPT_STRUCTURED_REPLY``;
   ``NBD_OPT_SET_META_CONTEXT`` (``base:allocation``,
   ``qemu:dirty-bitmap:NAME``); ``NBD_OPT_GO`` with the export name (its size,
   its flags and its block size limits come back);
2. ``NBD_CMD_READ`` with structured replies (data, hole and error chunks),
   several requests in flight (a bounded window: QEMU serves them in
   parallel, about twice as fast as one at a time);
3. ``NBD_CMD_BLOCK_STATUS``: the extents of one context over a range, asked
   again from where the server stopped until the range is covered;
4. ``NBD_CMD_DISC`` on close.

Everything the server sends is untrusted: magics, lengths, offsets, handles
and chunk types are checked, a reply never larger than what was asked is
accepted, and every receive has a timeout.  Anything wrong is one
:class:`NbdError` naming the export (and the byte, where a read failed).

:class:`NbdSource` is a :class:`~cbt.source.base.BlockSource` over an export:
size from the handshake, extents from ``base:allocation``, windows filled by
pipelined reads, a :class:`~cbt.source.base.SourceSpec` of kind ``"nbd"`` from
which a worker reopens it, and :meth:`NbdSource.dirty_ranges` from a QEMU
persistent dirty bitmap.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import errno
import itertools
import os
import socket
import struct
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from cbt.core.errors import SourceReadError
from cbt.source.base import BlockSource, SourceSpec, Window
from cbt.source.plan import BlockRange

# -- protocol constants (doc/proto.md) ----------------------------------------------------

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE = 1 << 0  # handshake flags (server) and client flags
FLAG_NO_ZEROES = 1 << 1

OPT_ABORT = 2
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_INFO = 3
REP_META_CONTEXT = 4
REP_FLAG_ERROR = 1 << 31
REP_ERR_UNKNOWN = REP_FLAG_ERROR | 6

INFO_EXPORT = 0
INFO_BLOCK_SIZE = 3

TFLAG_HAS_FLAGS = 1 << 0  # transmission flags
TFLAG_SEND_DF = 1 << 7

CMD_READ = 0
CMD_DISC = 2
CMD_BLOCK_STATUS = 7

REPLY_FLAG_DONE = 1 << 0
REPLY_NONE = 0
REPLY_OFFSET_DATA = 1
REPLY_OFFSET_HOLE = 2
REPLY_BLOCK_STATUS = 5
REPLY_ERROR = (1 << 15) | 1
REPLY_ERROR_OFFSET = (1 << 15) | 2
REPLY_TYPE_ERROR_BIT = 1 << 15
REPLY_SIMPLE = -1  # (ours: a simple reply without error, where the header says the type)

STATE_HOLE = 1 << 0  # base:allocation
STATE_DIRTY = 1 << 0  # qemu:dirty-bitmap:NAME

BASE_ALLOCATION = "base:allocation"
DIRTY_BITMAP = "qemu:dirty-bitmap:"

# -- limits --------------------------------------------------------------------------------

MAX_REQUEST = 32 << 20  # bytes read by one request (QEMU's own limit); less if the server says
READ_REQUEST = 512 << 10  # bytes asked by one pipelined read (faster than larger ones here)
IN_FLIGHT = 8  # pipelined reads in flight at once
MAX_OPTION_REPLY = 64 << 10  # an option reply carries a few names and numbers
MAX_STATUS_CHUNK = 16 << 20  # extents of one block status chunk (2 Mi extents)
MAX_STATUS_LENGTH = 1 << 30  # bytes of disk one block status request asks about
MAX_STRING = 4096
TIMEOUT = 60.0  # seconds for a reply header or a chunk's data to come: the server is stuck
WINDOW = 64 << 20  # bytes of one window of NbdSource.windows

_ERRNO = {1: errno.EPERM, 5: errno.EIO, 12: errno.ENOMEM, 22: errno.EINVAL, 28: errno.ENOSPC,
          75: errno.EOVERFLOW, 95: errno.ENOTSUP, 108: errno.ESHUTDOWN}


class NbdError(SourceReadError):
    """The NBD server refused, failed, went away or sent something invalid.

    ``path`` names the export (``nbd+unix:///EXPORT?socket=PATH``); ``offset``
    is the byte a read failed at (0 where no read was involved).
    """


def export_uri(socket_path: str, export: str) -> str:
    """How an export is named in messages: the NBD URI form (``nbd+unix``)."""
    return f"nbd+unix:///{export}?socket={socket_path}"


@dataclass
class _Read:
    """A read request in flight: where its bytes go and which have come."""

    offset: int
    view: memoryview  # the request's bytes in the caller's buffer
    job: int = 0  # which buffer of :meth:`NbdClient.read_many` it fills
    starts: list[int] = field(default_factory=list)  # byte ranges received, sorted:
    ends: list[int] = field(default_factory=list)  # [starts[i], ends[i])


class NbdClient:
    """One connection to one export of an NBD server over a unix socket.

    ``contexts`` are the metadata contexts to negotiate (each must be granted:
    an export without that dirty bitmap is refused here).
    """

    def __init__(self, socket_path: str, export: str = "", contexts: Iterable[str] = (),
                 timeout: float = TIMEOUT) -> None:
        self.socket_path = socket_path
        self.export = export
        self.name = export_uri(socket_path, export)
        self.timeout = timeout
        self.size = 0
        self.flags = 0
        self.max_request = MAX_REQUEST
        self.contexts: dict[str, int] = {}  # granted context name -> id
        self._broken: NbdError | None = None  # the error that left the connection unusable
        self._cookies = itertools.count(1)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(socket_path)
        except OSError as exc:
            self._sock.close()
            raise self._error(f"cannot connect to {socket_path}: "
                              f"{exc.strerror or exc}", exc.errno or errno.EIO) from None
        try:
            self._handshake(list(contexts))
        except BaseException:
            self._sock.close()
            raise

    # -- errors and raw socket ---------------------------------------------------------------

    def _error(self, what: str, err: int = errno.EPROTO, offset: int = 0) -> NbdError:
        return NbdError(err, f"NBD export {self.name}: {what}", self.name, offset)

    def _recv_into(self, view: memoryview) -> None:
        """Fill ``view`` from the socket: the server closing or stalling is an error.

        The whole of ``view`` (a header, or a chunk's data: at most one request)
        must come within the timeout, not each piece of it: a server sending a
        byte now and then is as stuck as a silent one.
        """
        done = 0
        deadline = time.monotonic() + self.timeout
        while done < len(view):
            try:
                self._sock.settimeout(max(deadline - time.monotonic(), 0.001))
                n = self._sock.recv_into(view[done:])
            except TimeoutError:
                raise self._error(f"no reply from the server within {self.timeout:g} s",
                                  errno.ETIMEDOUT) from None
            except OSError as exc:
                raise self._error(f"the connection failed: {exc.strerror or exc}",
                                  exc.errno or errno.EIO) from None
            if n == 0:
                raise self._error("the server closed the connection", errno.ECONNRESET)
            done += n

    def _recv(self, n: int) -> bytes:
        buf = bytearray(n)
        self._recv_into(memoryview(buf))
        return bytes(buf)

    def _send(self, data: bytes) -> None:
        try:
            self._sock.sendall(data)
        except TimeoutError:
            raise self._error(f"the server took nothing for {self.timeout:g} s",
                              errno.ETIMEDOUT) from None
        except OSError as exc:
            raise self._error(f"the connection failed: {exc.strerror or exc}",
                              exc.errno or errno.EIO) from None

    # -- handshake -----------------------------------------------------------------------------

    def _handshake(self, contexts: list[str]) -> None:
        magic, opt_magic, hflags = struct.unpack(">QQH", self._recv(18))
        if magic != NBDMAGIC or opt_magic != IHAVEOPT:
            raise self._error("not an NBD server speaking the newstyle protocol (bad magic)")
        if not hflags & FLAG_FIXED_NEWSTYLE:
            raise self._error("the server does not speak the fixed newstyle protocol")
        self._send(struct.pack(">I", FLAG_FIXED_NEWSTYLE | (hflags & FLAG_NO_ZEROES)))
        self._option(OPT_STRUCTURED_REPLY, b"")
        if self._reply(OPT_STRUCTURED_REPLY)[0] != REP_ACK:
            raise self._error("the server sent data to NBD_OPT_STRUCTURED_REPLY")
        if contexts:
            self._set_meta_contexts(contexts)
        self._go()

    def _option(self, option: int, data: bytes) -> None:
        self._send(struct.pack(">QII", IHAVEOPT, option, len(data)) + data)

    def _reply(self, option: int) -> tuple[int, bytes]:
        """One option reply: (type, data); an error reply raises."""
        magic, opt, rtype, length = struct.unpack(">QIII", self._recv(20))
        if magic != OPT_REPLY_MAGIC:
            raise self._error(f"bad option reply magic {magic:#x}")
        if opt != option:
            raise self._error(f"a reply to option {opt} while option {option} was asked")
        if length > MAX_OPTION_REPLY:
            raise self._error(f"an option reply of {length} bytes (at most "
                              f"{MAX_OPTION_REPLY} expected)")
        data = self._recv(length)
        if rtype & REP_FLAG_ERROR:
            text = data.decode("utf-8", "replace")[:200]
            if rtype == REP_ERR_UNKNOWN:
                raise self._error("the server has no such export" + (f" ({text})" if text
                                                                     else ""), errno.ENOENT)
            raise self._error(f"the server refused option {option} (error {rtype & 0x7FFFFFFF}"
                              f"{': ' + text if text else ''})", errno.ENOTSUP)
        return rtype, data

    def _set_meta_contexts(self, contexts: list[str]) -> None:
        name = self.export.encode()
        data = struct.pack(">I", len(name)) + name + struct.pack(">I", len(contexts))
        for c in contexts:
            q = c.encode()
            data += struct.pack(">I", len(q)) + q
        self._option(OPT_SET_META_CONTEXT, data)
        while True:
            rtype, body = self._reply(OPT_SET_META_CONTEXT)
            if rtype == REP_ACK:
                break
            if rtype != REP_META_CONTEXT or len(body) < 4 or len(body) > 4 + MAX_STRING:
                raise self._error(f"a bad reply (type {rtype}) to NBD_OPT_SET_META_CONTEXT")
            (cid,) = struct.unpack_from(">I", body)
            granted = body[4:].decode("utf-8", "replace")
            if granted not in contexts:
                raise self._error(f"the server granted a context never asked for: {granted!r}")
            self.contexts[granted] = cid
        for c in contexts:
            if c not in self.contexts:
                what = (f"no dirty bitmap named {c[len(DIRTY_BITMAP):]!r}"
                        if c.startswith(DIRTY_BITMAP) else f"no metadata context {c!r}")
                raise self._error(f"the export has {what}", errno.ENOENT)

    def _go(self) -> None:
        name = self.export.encode()
        self._option(OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">HH", 1,
                                                                               INFO_BLOCK_SIZE))
        have_export = False
        while True:
            rtype, body = self._reply(OPT_GO)
            if rtype == REP_ACK:
                break
            if rtype != REP_INFO or len(body) < 2:
                raise self._error(f"a bad reply (type {rtype}) to NBD_OPT_GO")
            (info,) = struct.unpack_from(">H", body)
            if info == INFO_EXPORT:
                if len(body) != 12:
                    raise self._error("a bad NBD_INFO_EXPORT reply")
                self.size, self.flags = struct.unpack_from(">QH", body, 2)
                have_export = True
            elif info == INFO_BLOCK_SIZE:
                if len(body) != 14:
                    raise self._error("a bad NBD_INFO_BLOCK_SIZE reply")
                _minimum, _preferred, maximum = struct.unpack_from(">III", body, 2)
                if maximum >= 512:
                    self.max_request = min(MAX_REQUEST, maximum)
        if not have_export:
            raise self._error("the server did not say the export's size")
        if self.size >= 1 << 63:
            raise self._error(f"an export of {self.size} bytes")

    # -- transmission ----------------------------------------------------------------------

    def _request(self, cmd: int, offset: int, length: int, flags: int = 0) -> int:
        cookie = next(self._cookies)
        self._send(struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, cookie, offset, length))
        return cookie

    def _chunk_header(self) -> tuple[int, int, int, int]:
        """The next reply header: (flags, type, cookie, length); a simple reply is
        turned into a final chunk (an error where it carries one)."""
        (magic,) = struct.unpack(">I", self._recv(4))
        if magic == SIMPLE_REPLY_MAGIC:
            err, cookie = struct.unpack(">IQ", self._recv(12))
            if err:
                raise self._error(f"the server failed a request: {_strerror(err)}",
                                  _ERRNO.get(err, errno.EIO))
            return REPLY_FLAG_DONE, REPLY_SIMPLE, cookie, 0
        if magic != STRUCTURED_REPLY_MAGIC:
            raise self._error(f"bad reply magic {magic:#x}")
        flags, rtype, cookie, length = struct.unpack(">HHQI", self._recv(16))
        return flags, rtype, cookie, length

    def _chunk_error(self, rtype: int, length: int, offset: int) -> NbdError:
        """The error an error chunk carries (its body is read here)."""
        if length < 6 or length > 6 + MAX_STRING + 8:
            raise self._error(f"an error chunk of {length} bytes")
        body = self._recv(length)
        err, mlen = struct.unpack_from(">IH", body)
        if 6 + mlen > length:
            raise self._error("an error chunk whose message runs past its end")
        text = body[6:6 + mlen].decode("utf-8", "replace")
        if rtype == REPLY_ERROR_OFFSET and length == 6 + mlen + 8:
            (offset,) = struct.unpack_from(">Q", body, 6 + mlen)
        return self._error(f"read failed at byte {offset}: {_strerror(err)}"
                           + (f" ({text})" if text else ""), _ERRNO.get(err, errno.EIO),
                           offset)

    def _usable(self) -> None:
        """After an error the stream is out of step (replies still due): refuse."""
        if self._broken is not None:
            raise self._error(f"the connection is unusable after an earlier error "
                              f"({self._broken.strerror})", self._broken.errno or errno.EIO,
                              self._broken.offset)

    def read_into(self, offset: int, buf: memoryview | bytearray,
                  in_flight: int = IN_FLIGHT, request: int = READ_REQUEST) -> None:
        """Fill ``buf`` with the export's bytes from ``offset``, ``in_flight`` requests at once."""
        self._usable()
        view = memoryview(buf).cast("B")
        if offset < 0 or offset + len(view) > self.size:
            raise self._error(f"bytes [{offset}, {offset + len(view)}) asked past the end "
                              f"({self.size})", errno.EINVAL, offset)
        try:
            self._read_into(offset, view, in_flight, request)
        except NbdError as exc:
            self._broken = exc
            raise

    def _read_into(self, offset: int, view: memoryview, in_flight: int, request: int) -> None:
        end = offset + len(view)
        step = max(min(request, self.max_request), 512)
        starts = iter(range(offset, end, step))
        pending: dict[int, _Read] = {}
        while True:
            while len(pending) < max(in_flight, 1):
                start = next(starts, None)
                if start is None:
                    break
                n = min(step, end - start)
                cookie = self._request(CMD_READ, start, n)
                pending[cookie] = _Read(start, view[start - offset:start - offset + n])
            if not pending:
                return
            self._read_chunk(pending)

    def read_many(self, jobs: Iterator[tuple[int, memoryview]], in_flight: int = IN_FLIGHT,
                  request: int = READ_REQUEST) -> Iterator[int]:
        """Fill each ``(offset, view)`` of ``jobs`` with the export's bytes, keeping
        ``in_flight`` requests out across jobs (many short reads cost one round trip each
        otherwise); yields each job's number (0, 1, ...) once all its bytes have come, in
        order.  ``jobs`` is taken lazily, a few requests ahead of what is yielded."""
        self._usable()
        pending: dict[int, _Read] = {}
        try:
            yield from self._read_many(jobs, pending, in_flight, request)
        except NbdError as exc:
            self._broken = exc
            raise
        finally:
            if pending and self._broken is None:  # (abandoned: replies still due)
                self._broken = self._error("reads abandoned with replies still due",
                                           errno.EIO)

    def _read_many(self, jobs: Iterator[tuple[int, memoryview]], pending: dict[int, _Read],
                   in_flight: int, request: int) -> Iterator[int]:
        step = max(min(request, self.max_request), 512)
        left: list[int] = []  # per job: its requests not yet answered in full
        issued = 0  # jobs whose requests are all sent
        pieces = self._pieces(jobs, step, left)
        done = 0  # jobs yielded
        exhausted = False  # every request of every job sent
        while True:
            while not exhausted and len(pending) < max(in_flight, 1):
                piece = next(pieces, None)
                if piece is None:
                    exhausted = True
                    break
                job, start, view = piece
                pending[self._request(CMD_READ, start, len(view))] = _Read(start, view, job)
                issued = job  # (every job before this one is sent in full)
            while done < len(left) and left[done] == 0 and (done < issued or exhausted):
                yield done
                done += 1
            if not pending:
                return
            finished = self._read_chunk(pending)
            if finished is not None:
                left[finished.job] -= 1

    def _pieces(self, jobs: Iterator[tuple[int, memoryview]], step: int,
                left: list[int]) -> Iterator[tuple[int, int, memoryview]]:
        """Each job's requests: (job, offset, bytes of the view), counted in ``left``."""
        for job, (offset, view) in enumerate(jobs):
            view = view.cast("B")
            if offset < 0 or offset + len(view) > self.size or not len(view):
                raise self._error(f"bytes [{offset}, {offset + len(view)}) asked past the "
                                  f"end ({self.size})", errno.EINVAL, offset)
            left.append(0)
            for at in range(0, len(view), step):
                left[job] += 1
                yield job, offset + at, view[at:at + step]

    def _read_chunk(self, pending: dict[int, _Read]) -> _Read | None:
        """Receive one chunk of a reply to a pending read; a request answered in full is
        retired and returned."""
        flags, rtype, cookie, length = self._chunk_header()
        req = pending.get(cookie)
        if req is None:
            raise self._error(f"a reply to request {cookie}, which is not in flight")
        end = req.offset + len(req.view)
        if rtype == REPLY_SIMPLE:  # without error: the data follows
            self._check_in(req, req.offset, len(req.view))
            self._recv_into(req.view)
        elif rtype == REPLY_OFFSET_DATA:
            if length < 8 or length - 8 > len(req.view):
                raise self._error(f"a data chunk of {length} bytes for a read of "
                                  f"{len(req.view)}", offset=req.offset)
            (at,) = struct.unpack(">Q", self._recv(8))
            n = length - 8
            self._check_in(req, at, n)
            self._recv_into(req.view[at - req.offset:at - req.offset + n])
        elif rtype == REPLY_OFFSET_HOLE:
            if length != 12:
                raise self._error(f"a hole chunk of {length} bytes", offset=req.offset)
            at, n = struct.unpack(">QI", self._recv(12))
            self._check_in(req, at, n)
            req.view[at - req.offset:at - req.offset + n] = bytes(n)
        elif rtype & REPLY_TYPE_ERROR_BIT:
            raise self._chunk_error(rtype, length, req.offset)
        elif rtype != REPLY_NONE or length:
            raise self._error(f"a reply chunk of type {rtype} to a read", offset=req.offset)
        if flags & REPLY_FLAG_DONE:
            del pending[cookie]
            covered = req.offset  # (the ranges never overlap: where the first gap starts)
            for a, b in zip(req.starts, req.ends, strict=True):
                if a != covered:
                    break
                covered = b
            if covered != end:
                raise self._error(f"the reply to a read of [{req.offset}, {end}) left bytes "
                                  f"from {covered} unsent", offset=covered)
            return req
        return None

    def _check_in(self, req: _Read, at: int, n: int) -> None:
        """A chunk's bytes ``[at, at + n)`` must lie in the request and be new."""
        end = req.offset + len(req.view)
        if n == 0 or at < req.offset or at + n > end:
            raise self._error(f"a chunk for bytes [{at}, {at + n}) in reply to a read of "
                              f"[{req.offset}, {end})", offset=req.offset)
        i = bisect.bisect_right(req.starts, at)
        if (i and req.ends[i - 1] > at) or (i < len(req.starts) and req.starts[i] < at + n):
            raise self._error(f"a chunk for bytes [{at}, {at + n}) sent twice",
                              offset=req.offset)
        req.starts.insert(i, at)
        req.ends.insert(i, at + n)

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.read_into(offset, buf)
        return bytes(buf)

    def block_status(self, context: str, start: int = 0,
                     end: int | None = None) -> list[tuple[int, int, int]]:
        """Extents ``(start, end, flags)`` of ``context`` covering ``[start, end)``, in order."""
        self._usable()
        cid = self.contexts.get(context)
        if cid is None:
            raise self._error(f"metadata context {context!r} was not negotiated", errno.EINVAL)
        stop = self.size if end is None else end
        if not 0 <= start <= stop <= self.size:
            raise self._error(f"block status of bytes [{start}, {stop}) asked outside the "
                              f"export ({self.size} bytes)", errno.EINVAL, start)
        try:
            return self._block_status(cid, context, start, stop)
        except NbdError as exc:
            self._broken = exc
            raise

    def _block_status(self, cid: int, context: str, start: int,
                      stop: int) -> list[tuple[int, int, int]]:
        out: list[tuple[int, int, int]] = []
        at = start
        while at < stop:
            cookie = self._request(CMD_BLOCK_STATUS, at, min(stop - at, MAX_STATUS_LENGTH))
            got = self._status_reply(cookie, cid, at, stop)
            if not got:
                raise self._error(f"no extents for byte {at} of {context!r}", offset=at)
            for a, b, f in got:
                if out and out[-1][2] == f and out[-1][1] == a:
                    out[-1] = (out[-1][0], b, f)
                else:
                    out.append((a, b, f))
            at = got[-1][1]
        return out

    def _status_reply(self, cookie: int, cid: int, at: int,
                      stop: int) -> list[tuple[int, int, int]]:
        """The extents one block status reply gives, from ``at``, clipped to ``stop``."""
        got: list[tuple[int, int, int]] = []
        seen: set[int] = set()  # contexts answered (one chunk each)
        while True:
            flags, rtype, c, length = self._chunk_header()
            if c != cookie:
                raise self._error(f"a reply to request {c}, which is not in flight")
            if rtype == REPLY_BLOCK_STATUS:
                if length < 12 or (length - 4) % 8 or length > MAX_STATUS_CHUNK:
                    raise self._error(f"a bad block status chunk ({length} bytes)", offset=at)
                body = self._recv(length)
                (bid,) = struct.unpack_from(">I", body)
                if bid not in self.contexts.values() or bid in seen:
                    raise self._error(f"block status for context {bid}, never asked for or "
                                      "already answered", offset=at)
                seen.add(bid)
                if bid == cid:  # (else another negotiated context: not what was asked)
                    got = self._extents(body, at, stop)
            elif rtype == REPLY_SIMPLE:
                raise self._error("a simple reply without extents to block status", offset=at)
            elif rtype & REPLY_TYPE_ERROR_BIT:
                raise self._chunk_error(rtype, length, at)
            elif rtype != REPLY_NONE or length:
                raise self._error(f"a reply chunk of type {rtype} to block status", offset=at)
            if flags & REPLY_FLAG_DONE:
                return got

    def _extents(self, body: bytes, at: int, stop: int) -> list[tuple[int, int, int]]:
        """The extents of a block status chunk's body, from ``at``, clipped to ``stop``."""
        got: list[tuple[int, int, int]] = []
        pos = at
        for i in range(4, len(body), 8):
            n, f = struct.unpack_from(">II", body, i)
            if n == 0:
                raise self._error(f"an empty extent at byte {pos}", offset=pos)
            got.append((pos, min(pos + n, stop), f))
            pos += n
            if pos >= stop:
                break
        return got

    def close(self) -> None:
        """Say goodbye (``NBD_CMD_DISC``) and close; again is harmless."""
        if self._sock.fileno() < 0:
            return
        with contextlib.suppress(OSError):
            self._sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC,
                                           next(self._cookies), 0, 0))
        self._sock.close()

    def __enter__(self) -> NbdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _strerror(err: int) -> str:
    code = _ERRNO.get(err)
    return os.strerror(code) if code else f"error {err}"


# -- the block source -----------------------------------------------------------------------


class NbdSource(BlockSource):
    """A disk read through an NBD export (a running VM's disk served by QEMU).

    ``bitmaps``: dirty bitmaps negotiated on this connection already (a server
    that takes one client at a time, ``qemu-nbd`` without ``--shared``); any
    other one asked of :meth:`dirty_ranges` takes a connection of its own.
    """

    def __init__(self, socket_path: str, export: str = "", live: bool = False,
                 timeout: float = TIMEOUT, window: int = WINDOW,
                 bitmaps: tuple[str, ...] = ()) -> None:
        self.socket_path = socket_path
        self.window = window
        self.export = export
        self.timeout = timeout
        self.client = NbdClient(socket_path, export,
                                [BASE_ALLOCATION, *(DIRTY_BITMAP + b for b in bitmaps)], timeout)
        self.path = self.client.name
        self.size = self.client.size
        self.live = live

    def extents(self) -> list[tuple[int, int]]:
        """Byte ranges that may hold data: everything ``base:allocation`` calls no hole."""
        return _merged(self.client.block_status(BASE_ALLOCATION, 0, self.size), STATE_HOLE,
                       STATE_HOLE)

    def windows(self, block_size: int, lo: int, hi: int,
                read_ahead: bool = True) -> Iterator[tuple[int, Window]]:
        return self.windows_of(block_size, [(lo, hi)], read_ahead)

    def windows_of(self, block_size: int, ranges: Sequence[BlockRange],
                   read_ahead: bool = True) -> Iterator[tuple[int, Window]]:
        """Windows of at most :attr:`window` bytes, read with requests in flight across
        windows and ranges (a tracked disk reads many short ranges: one at a time, each
        would cost a round trip to the server and its disk).  A window's buffer is
        reused once the next window is asked for."""
        step = max(self.window // block_size, 1)
        made: collections.deque[tuple[int, bytearray]] = collections.deque()
        free: list[bytearray] = []  # buffers of windows already handed out and done with

        def jobs() -> Iterator[tuple[int, memoryview]]:
            for lo, hi in ranges:
                for first in range(lo, hi, step):
                    offset = first * block_size
                    length = min(min(first + step, hi) * block_size, self.size) - offset
                    buf = next((b for b in free if len(b) == length), None)
                    if buf is None:
                        buf = bytearray(length)
                    else:
                        free.remove(buf)
                    made.append((first, buf))
                    yield offset, memoryview(buf)

        for _ in self.client.read_many(jobs()):
            first, buf = made.popleft()
            yield first, buf
            if len(free) < 2:
                free.append(buf)

    def dirty_ranges(self, bitmap: str) -> list[tuple[int, int]]:
        """Byte ranges ``[start, end)`` the QEMU dirty bitmap ``bitmap`` marks, merged."""
        context = DIRTY_BITMAP + bitmap
        if context in self.client.contexts:
            return _merged(self.client.block_status(context, 0, self.size), STATE_DIRTY, 0)
        with NbdClient(self.socket_path, self.export, [context], self.timeout) as c:
            return _merged(c.block_status(context, 0, min(c.size, self.size)), STATE_DIRTY, 0)

    def spec(self) -> SourceSpec:
        return SourceSpec("nbd", self.socket_path, self.size, self.live, None, self.export)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> NbdSource:
        return self


def _merged(extents: list[tuple[int, int, int]], bit: int,
            skip: int) -> list[tuple[int, int]]:
    """The byte ranges of the extents whose flag ``bit`` is not ``skip``, adjacent ones merged."""
    out: list[tuple[int, int]] = []
    for a, b, f in extents:
        if f & bit == skip:
            continue
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def open_nbd(spec: SourceSpec) -> NbdSource:
    """Reopen an NBD source from its spec (in a worker); an export now smaller is refused."""
    source = NbdSource(spec.path, spec.export, spec.live)
    if source.size < spec.size:
        source.close()
        raise NbdError(errno.EIO, f"NBD export {source.path} shrank while it was read: it "
                       f"has {source.size} bytes, it had {spec.size}", source.path, source.size)
    source.size = spec.size
    return source

"""The QEMU guest agent (``qemu-ga``), from the host side of its virtio-serial socket.

A running VM's agent is reached through the unix socket of the chardev that
backs its ``org.qemu.guest_agent.0`` port.  The protocol is QMP-like JSON,
one object per line, with no greeting and no framing; the channel may hold a
stale reply of an earlier client, so every session starts with
``guest-sync-delimited`` and a random id: the agent answers with a ``0xFF``
byte, then ``{"return": id}``; everything before the delimiter, and any reply
with another id, is skipped.

Everything the agent sends is untrusted: a line longer than
:data:`MAX_LINE` is an error, every receive is bounded by the timeout, and
each reply's JSON shape is checked.  Errors are :class:`GuestAgentError`, one
line naming the socket, the command and the agent's error class and
description.
"""

from __future__ import annotations

import json
import os
import secrets
import socket as _socket
import time
from typing import Any

from cbt.core.errors import CbtError, untrusted_json

__all__ = ["DEFAULT_TIMEOUT", "MAX_LINE", "GuestAgent", "GuestAgentError"]

DEFAULT_TIMEOUT = 60.0
MAX_LINE = 64 << 10  # bytes of one reply line
_MAX_SKIPPED = 64  # stale replies skipped while syncing
_DELIMITER = b"\xff"


class GuestAgentError(CbtError):
    """The guest agent could not be reached, refused a command, or said something invalid."""


def _printable(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())[:limit]
    return "".join(ch if ch.isprintable() else "?" for ch in text)


class GuestAgent:
    """A session with a VM's guest agent; every receive is bounded by ``timeout`` seconds.

    ``freeze()`` and ``thaw()`` can take long in a busy guest (the agent runs
    the guest's fsfreeze hook scripts): give them the hook timeout.
    """

    def __init__(self, socket: str | os.PathLike[str], timeout: float = DEFAULT_TIMEOUT) -> None:
        self.socket = str(socket)
        self.timeout = timeout
        self._buf = bytearray()
        self._sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            self._sock.settimeout(timeout)
            self._sock.connect(self.socket)
        except OSError as exc:
            self._sock.close()
            reason = exc.strerror or str(exc) or type(exc).__name__
            raise GuestAgentError(f"guest agent {self.socket}: cannot connect: {reason}"
                                  ) from None

    # -- commands ----------------------------------------------------------------------

    def sync(self) -> None:
        """``guest-sync-delimited`` with a random id: later replies are this session's."""
        token = secrets.randbelow(1 << 31)
        self._send(b"\xff" + self._encode("guest-sync-delimited", {"id": token}),
                   "guest-sync-delimited")
        self._skip_to_delimiter()
        for _ in range(_MAX_SKIPPED):
            reply = self._reply("guest-sync-delimited")
            if reply == token:
                return
        raise self._error("guest-sync-delimited", "no reply with this session's id")

    def sync_and_thaw(self) -> int:
        """``guest-sync-delimited`` and ``guest-fsfreeze-thaw`` sent at once, then their
        replies: an agent still busy in a freeze that outlived its timeout runs the thaw
        as soon as the freeze returns, whether or not cbt still waits (a thaw that waited
        for the sync's reply first would never be sent, and the guest stay frozen)."""
        token = secrets.randbelow(1 << 31)
        self._send(b"\xff" + self._encode("guest-sync-delimited", {"id": token})
                   + self._encode("guest-fsfreeze-thaw", None), "guest-fsfreeze-thaw")
        self._skip_to_delimiter()
        for _ in range(_MAX_SKIPPED):
            if self._reply("guest-sync-delimited") == token:
                return self._int(self._reply("guest-fsfreeze-thaw"), "guest-fsfreeze-thaw")
        raise self._error("guest-sync-delimited", "no reply with this session's id")

    def freeze(self) -> int:
        """``guest-fsfreeze-freeze``: the number of file systems frozen."""
        return self._int(self.command("guest-fsfreeze-freeze"), "guest-fsfreeze-freeze")

    def thaw(self) -> int:
        """``guest-fsfreeze-thaw``: the number of file systems thawed."""
        return self._int(self.command("guest-fsfreeze-thaw"), "guest-fsfreeze-thaw")

    def status(self) -> str:
        """``guest-fsfreeze-status``: ``thawed`` or ``frozen``."""
        value = self.command("guest-fsfreeze-status")
        if value not in ("thawed", "frozen"):
            raise self._error("guest-fsfreeze-status",
                              f"unexpected reply {_printable(repr(value))}")
        return str(value)

    def command(self, name: str, args: dict[str, Any] | None = None) -> Any:
        """Run one command; its ``return`` value, or :class:`GuestAgentError`."""
        self._send(self._encode(name, args), name)
        return self._reply(name)

    # -- the wire ----------------------------------------------------------------------

    @staticmethod
    def _encode(name: str, args: dict[str, Any] | None) -> bytes:
        msg: dict[str, Any] = {"execute": name}
        if args:
            msg["arguments"] = args
        return json.dumps(msg).encode() + b"\n"

    def _error(self, command: str, what: str) -> GuestAgentError:
        return GuestAgentError(f"guest agent {self.socket}: {command}: {what}")

    def _send(self, data: bytes, command: str) -> None:
        try:
            self._sock.sendall(data)
        except OSError as exc:
            raise self._error(command, f"cannot send: {exc.strerror or exc}") from None

    def _recv(self, command: str, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise self._error(command, f"no reply within {self.timeout:g} s")
        self._sock.settimeout(left)
        try:
            chunk = self._sock.recv(65536)
        except TimeoutError:
            raise self._error(command, f"no reply within {self.timeout:g} s") from None
        except OSError as exc:
            raise self._error(command, f"cannot receive: {exc.strerror or exc}") from None
        if not chunk:
            raise self._error(command, "the agent closed the connection")
        self._buf += chunk

    def _skip_to_delimiter(self) -> None:
        deadline = time.monotonic() + self.timeout
        skipped = 0
        while True:
            at = self._buf.find(_DELIMITER)
            if at >= 0:
                del self._buf[:at + 1]
                return
            skipped += len(self._buf)
            self._buf.clear()
            if skipped > MAX_LINE:
                raise self._error("guest-sync-delimited",
                                  f"no delimiter within {MAX_LINE} bytes")
            self._recv("guest-sync-delimited", deadline)

    def _line(self, command: str) -> bytes:
        deadline = time.monotonic() + self.timeout
        while True:
            at = self._buf.find(b"\n")
            if at >= 0:
                if at > MAX_LINE:
                    break
                # a stale delimited reply of an earlier client carries its own 0xFF
                line = bytes(self._buf[:at]).lstrip(_DELIMITER)
                del self._buf[:at + 1]
                if line.strip():
                    return line
                continue
            if len(self._buf) > MAX_LINE:
                break
            self._recv(command, deadline)
        raise self._error(command, f"reply longer than {MAX_LINE} bytes")

    def _reply(self, command: str) -> Any:
        line = self._line(command)
        try:
            msg = untrusted_json(line)
        except ValueError:
            raise self._error(command, "reply is not JSON: "
                              f"{_printable(line.decode(errors='replace'))}") from None
        if isinstance(msg, dict) and "return" in msg:
            return msg["return"]
        err = msg.get("error") if isinstance(msg, dict) else None
        if isinstance(err, dict):
            cls, desc = err.get("class"), err.get("desc")
            return_err = f"{_printable(str(cls))}: {_printable(str(desc))}"
            raise self._error(command, f"the agent refused: {return_err}")
        raise self._error(command, f"not a reply: {_printable(line.decode(errors='replace'))}")

    def _int(self, value: Any, command: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self._error(command, f"unexpected reply {_printable(repr(value))}")
        return value

    # -- life --------------------------------------------------------------------------

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> GuestAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

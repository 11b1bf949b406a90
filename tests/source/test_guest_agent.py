"""The guest agent client against a real qemu-ga on this host (unix-listen, every rpc that
could touch the host blocked: it never freezes this machine), and against sockets that
answer nothing, garbage or too much."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.qmp_daemon import host_guest_agent

from cbt.source.guest_agent import MAX_LINE, GuestAgent, GuestAgentError


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Path]:
    with host_guest_agent(tmp_path) as sock:
        yield sock


def test_sync_and_status_against_qemu_ga(agent: Path) -> None:
    with GuestAgent(agent, timeout=10) as ga:
        ga.sync()
        assert ga.status() == "thawed"
        ga.sync()  # again on the same connection
        assert ga.command("guest-ping") == {}
    with GuestAgent(agent, timeout=10) as ga:  # a second session after the first closed
        ga.sync()
        assert ga.status() == "thawed"


def test_a_blocked_freeze_is_one_line_naming_the_command(agent: Path) -> None:
    with GuestAgent(agent, timeout=10) as ga:
        ga.sync()
        with pytest.raises(GuestAgentError) as err:
            ga.freeze()
        msg = str(err.value)
        assert msg.startswith(f"guest agent {agent}: guest-fsfreeze-freeze: the agent refused: ")
        assert "CommandNotFound" in msg and "disabled" in msg and "\n" not in msg
        with pytest.raises(GuestAgentError, match="guest-fsfreeze-thaw: the agent refused"):
            ga.thaw()
        assert ga.status() == "thawed"  # the session goes on after a refusal


def test_a_stale_reply_in_the_channel_is_skipped(agent: Path) -> None:
    with GuestAgent(agent, timeout=10) as ga:
        ga.sync()
        # an earlier client's command whose reply it never read
        ga._sock.sendall(b'{"execute": "guest-ping"}\n{"execute": "guest-info"}\n')
        time.sleep(0.2)
        ga.sync()
        assert ga.status() == "thawed"


def test_no_socket_is_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(GuestAgentError, match=r"^guest agent .*none\.sock: cannot connect: "
                       "No such file or directory$"):
        GuestAgent(tmp_path / "none.sock", timeout=2)


@contextlib.contextmanager
def _server(path: Path, reply: bytes | None) -> Iterator[None]:
    """A unix socket that accepts one client and sends ``reply`` once it has read a line
    (None: listens and never accepts)."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)
    done = threading.Event()

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            conn.settimeout(5)
            with contextlib.suppress(OSError):
                conn.recv(4096)
                assert reply is not None
                conn.sendall(reply)
                done.wait(10)

    thread = threading.Thread(target=serve, daemon=True) if reply is not None else None
    if thread:
        thread.start()
    try:
        yield
    finally:
        done.set()
        if thread:
            thread.join(10)
        srv.close()
        path.unlink()


def test_a_socket_nobody_answers_times_out(tmp_path: Path) -> None:
    sock = tmp_path / "mute.sock"
    with _server(sock, None), GuestAgent(sock, timeout=0.5) as ga:
        started = time.monotonic()
        with pytest.raises(GuestAgentError, match=r"guest-sync-delimited: no reply within 0\.5 s"):
            ga.sync()
        assert time.monotonic() - started < 3


@pytest.mark.parametrize(("reply", "message"), [
    (b"\xff{not json\n", "guest-sync-delimited: reply is not JSON: {not json"),
    (b"\xff[1, 2]\n", r"guest-sync-delimited: not a reply: \[1, 2\]"),
    (b"\xff" + json.dumps({"error": {"class": "X\x1b[31m", "desc": "d\ne"}}).encode() + b"\n",
     r"guest-sync-delimited: the agent refused: X\?\[31m: d e"),
    (b"\xff{\"return\": 1}\n" * 70, "no reply with this session's id"),
    (b"\xff" + b"x" * (MAX_LINE + 10), f"reply longer than {MAX_LINE} bytes"),
    (b"y" * (MAX_LINE + 70000), f"no delimiter within {MAX_LINE} bytes"),
    (b"\xff", "no reply within 0.5 s"),
    (b"\xff" + b"[" * 100000 + b"\n", f"reply longer than {MAX_LINE} bytes"),
], ids=["garbage", "shape", "escapes", "stale-only", "long-line", "no-delimiter", "silent",
        "deep"])
def test_untrusted_replies_are_one_line_errors(tmp_path: Path, reply: bytes,
                                               message: str) -> None:
    sock = tmp_path / "bad.sock"
    with _server(sock, reply), GuestAgent(sock, timeout=0.5) as ga:
        with pytest.raises(GuestAgentError, match=message) as err:
            ga.sync()
        assert "\n" not in str(err.value) and "\x1b" not in str(err.value)


def test_freeze_and_status_replies_are_shape_checked(tmp_path: Path) -> None:
    sock = tmp_path / "odd.sock"
    with (_server(sock, b'{"return": "three"}\n'), GuestAgent(sock, timeout=2) as ga,
          pytest.raises(GuestAgentError, match="guest-fsfreeze-freeze: unexpected reply")):
        ga.freeze()
    with (_server(sock, b'{"return": "melting"}\n'), GuestAgent(sock, timeout=2) as ga,
          pytest.raises(GuestAgentError, match="guest-fsfreeze-status: unexpected reply")):
        ga.status()


@contextlib.contextmanager
def _hung_freeze_agent(path: Path, hang: float) -> Iterator[list[str]]:
    """An agent as qemu-ga serves its one channel: commands run in order, one client at a
    time; its freeze takes ``hang`` seconds (a guest file system stuck).  Yields the
    commands it ran, in order."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(4)
    srv.settimeout(0.2)
    ran: list[str] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            with conn:
                _serve_in_order(conn, ran, hang)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield ran
    finally:
        stop.set()
        thread.join(10)
        srv.close()
        path.unlink()


def _serve_in_order(conn: socket.socket, ran: list[str], hang: float) -> None:
    """Every command the client sent runs, whether or not its reply can still be sent
    (the client gave up waiting): qemu-ga reads its channel in order."""
    buf = b""
    while True:
        try:
            chunk = conn.recv(4096)
        except OSError:
            chunk = b""
        if not chunk:
            return
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            msg = json.loads(line.lstrip(b"\xff"))
            ran.append(msg["execute"])
            reply = b'{"return": 1}\n'
            if msg["execute"] == "guest-fsfreeze-freeze":
                time.sleep(hang)
            elif msg["execute"] == "guest-sync-delimited":
                reply = b"\xff" + json.dumps({"return": msg["arguments"]["id"]}).encode() + b"\n"
            with contextlib.suppress(OSError):
                conn.sendall(reply)


def test_a_thaw_after_a_freeze_that_hung_still_reaches_the_agent(tmp_path: Path) -> None:
    """The freeze outlives its timeout and the thaw's own: the thaw was sent all the same,
    so the agent thaws the guest as soon as the freeze returns."""
    from cbt.jobs.qemu import agent_call

    with _hung_freeze_agent(tmp_path / "hung.sock", hang=2.5) as ran:
        freeze = agent_call(str(tmp_path / "hung.sock"), "guest-freeze", 1.0)
        assert not freeze.ok and "no reply within 1 s" in (freeze.error or "")
        thaw = agent_call(str(tmp_path / "hung.sock"), "guest-thaw", 1.0)
        assert not thaw.ok  # busy in the freeze: no reply in time, but sent
        deadline = time.monotonic() + 10
        while "guest-fsfreeze-thaw" not in ran and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ran[-1] == "guest-fsfreeze-thaw", ran
        assert ran.index("guest-fsfreeze-freeze") < ran.index("guest-fsfreeze-thaw")

"""QMP replies are untrusted: a monitor answering with the wrong shapes (what a broken or
hostile QEMU, or something else listening on the socket, might say) makes one QemuError
naming what was asked, never a KeyError or TypeError out of cbt."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cbt.source.qemu import QemuError, QmpSession, resolve_disks

_GREETING = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""},
                     "capabilities": []}}


@contextlib.contextmanager
def _fake_qmp(path: Path, answers: dict[str, Any]) -> Iterator[None]:
    """A unix socket speaking QMP's framing, answering each command from ``answers``."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)
    srv.settimeout(10)

    def serve() -> None:
        with contextlib.suppress(OSError), srv.accept()[0] as conn:
            conn.sendall(json.dumps(_GREETING).encode() + b"\n")
            buf, dec = "", json.JSONDecoder()
            while chunk := conn.recv(65536):
                buf += chunk.decode()
                while buf.strip():  # (a client need not end its commands with a newline)
                    try:
                        msg, end = dec.raw_decode(buf.lstrip())
                    except ValueError:
                        break
                    buf = buf.lstrip()[end:]
                    ret = {} if msg["execute"] == "qmp_capabilities" else \
                        answers.get(msg["execute"], [])
                    conn.sendall(json.dumps({"return": ret, "id": msg.get("id")}).encode()
                                 + b"\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        srv.close()
        thread.join(10)
        path.unlink()


_NODE = {"node-name": "os", "drv": "qcow2", "ro": False, "image": {"virtual-size": 1 << 20}}
_GRAPH = {"nodes": [{"id": 1, "type": "block-driver", "name": "os"}], "edges": []}


@pytest.mark.parametrize("answers", [
    {"query-named-block-nodes": [{"no-node-name": 1}]},
    {"query-named-block-nodes": "not a list"},
    {"query-named-block-nodes": [_NODE], "query-block": [{"inserted": {"node-name": "os"},
                                                          "qdev": 5}]},
    {"query-named-block-nodes": [_NODE], "query-block": [{"inserted": {"node-name": "gone"},
                                                          "device": "vda"}]},
    {"query-named-block-nodes": [{**_NODE, "dirty-bitmaps": [
        {"name": "cbt-x", "granularity": "huge", "count": 1}]}],
     "x-debug-query-block-graph": _GRAPH},
    {"query-named-block-nodes": [{**_NODE, "image": {"virtual-size": "big"}}],
     "x-debug-query-block-graph": _GRAPH},
    {"query-named-block-nodes": [_NODE], "x-debug-query-block-graph": {"nodes": [],
                                                                       "edges": [{}]}},
], ids=["no-node-name", "not-a-list", "qdev-number", "device-on-no-node", "granularity",
        "size", "graph"])
def test_odd_replies_are_one_qemu_error(tmp_path: Path, answers: dict[str, Any]) -> None:
    sock = tmp_path / "fake.qmp"
    with _fake_qmp(sock, answers), QmpSession(sock, timeout=5) as s, \
            pytest.raises(QemuError, match="unexpected reply while resolving the disks"):
        resolve_disks(s)

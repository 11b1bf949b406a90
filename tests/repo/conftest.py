"""Fixtures of the vault tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.s3 import S3Server, fresh_bucket


@pytest.fixture(params=["dir", "s3"])
def location(request: pytest.FixtureRequest, tmp_path: Path,
             monkeypatch: pytest.MonkeyPatch) -> str:
    """A vault location: a directory, or a prefix of a fresh bucket on the module's S3
    server (its AWS variables set for the test)."""
    if request.param == "dir":
        return str(tmp_path / "v")
    server: S3Server = request.getfixturevalue("s3")
    for key, value in server.env.items():
        monkeypatch.setenv(key, value)
    return f"s3://{fresh_bucket()}/vault"

"""Fixtures of the command-line tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.s3 import S3Server
from helpers.vaults import PASSWORD


@pytest.fixture
def env(s3: S3Server, tmp_path: Path) -> dict[str, str]:
    """The environment of a ``cbt`` run against the module's S3 server: its AWS variables
    and a password file opening the tests' encrypted vaults."""
    pw = tmp_path / "password"
    pw.write_text(PASSWORD + "\n")
    pw.chmod(0o600)
    return {**s3.env, "CBT_PASSWORD_FILE": str(pw)}

"""Fixtures shared by the source tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.system import loop_fs


@pytest.fixture(scope="module", params=["xfs", "btrfs"])
def fs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
       ) -> Iterator[tuple[str, Path]]:
    """A loop-mounted XFS (reflink) or btrfs file system, shared by a module's tests."""
    kind = str(request.param)
    with loop_fs(tmp_path_factory.mktemp(kind), kind) as mnt:
        yield kind, mnt

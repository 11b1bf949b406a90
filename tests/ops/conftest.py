"""Fixtures of the operations' tests: one small damaged-on-demand vault history."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import KIB
from helpers.packs import trailer_entries
from helpers.vaults import History3, build_history3

HISTORY_BS = 64 * KIB


@pytest.fixture(scope="session")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> History3:
    """Three points of VM ``vm`` (``helpers.vaults.History3``), built once, never changed."""
    h = build_history3(tmp_path_factory.mktemp("history3"), HISTORY_BS)
    # one pack per disk and run; day 2 changed one block of one disk
    assert [len(p) for p in h.packs] == [2, 2, 1]
    assert len(trailer_entries(h.pack_path(h.packs[2][0]))) == 1
    assert min(len(trailer_entries(h.pack_path(p))) for p in h.packs[1]) > 10
    return h


@pytest.fixture
def vh(pristine: History3, tmp_path: Path) -> History3:
    """A copy of the history for one test to damage."""
    return pristine.clone(tmp_path / "vault")

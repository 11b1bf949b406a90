"""prune's progress (issue 16): ``progress(done, total)`` over the points it hides or
deletes, called before each and once at the end."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.vaults import two_point_vault

from cbt.api import Vault
from cbt.ops.prune import PruneRequest, forget, prune


@pytest.mark.parametrize(("kept", "changed"), [("second", 1), ("none", 2)])
def test_prune_progress_counts_points(tmp_path: Path, kept: str, changed: int) -> None:
    vault_dir, ids = two_point_vault(tmp_path)
    keep = {ids[1]} if kept == "second" else set()
    seen: list[tuple[int, int]] = []
    vault = Vault.open(vault_dir)
    prune(vault, PruneRequest(keep=lambda pts: {p.id: (["k"] if p.id in keep else [])
                                                for p in pts},
                              expired=lambda _vm, _c: False),
          progress=lambda d, t: seen.append((d, t)))
    assert seen == [(n, changed) for n in range(changed + 1)], seen
    left = {r.id: r.hidden for r in Vault.open(vault_dir).records()}
    # removing every point: the newest stays hidden until the VM's next point (so that
    # backup knows a point was forgotten and trusts no change hint)
    assert left == ({ids[0]: True, ids[1]: False} if kept == "second" else {ids[1]: True}), left


def test_dry_prune_reports_no_progress(tmp_path: Path) -> None:
    vault_dir, _ids = two_point_vault(tmp_path)
    seen: list[tuple[int, int]] = []
    prune(Vault.open(vault_dir), PruneRequest(keep=lambda pts: {p.id: [] for p in pts},
                                              expired=lambda _vm, _c: False, dry_run=True),
          progress=lambda d, t: seen.append((d, t)))
    assert seen == [] and len(Vault.open(vault_dir).records()) == 2


def test_forget_progress_counts_the_named_points(tmp_path: Path) -> None:
    """forget is prune on named points: the same progress over what it hides or deletes
    (both points named: the older deleted, the newer hidden until the VM's next one)."""
    vault_dir, ids = two_point_vault(tmp_path)
    seen: list[tuple[int, int]] = []
    result = forget(Vault.open(vault_dir), list(ids), progress=lambda d, t: seen.append((d, t)))
    assert sorted(p.recovery_point for p in result.points) == sorted(ids)
    assert seen == [(0, 2), (1, 2), (2, 2)], seen
    assert {r.id: r.hidden for r in Vault.open(vault_dir).records()} == {ids[1]: True}

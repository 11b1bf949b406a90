"""A full disk (ENOSPC) during backup: exit 2, one clear line, nothing lost.

The vault lives on a small loop-mounted file system (ext4 on a loop device, or
a tmpfs); the disks live elsewhere.  A first backup fits; a second one of new
incompressible data does not: it must fail with exit 2 and one line naming the
lack of space, leave the vault consistent (``cbt verify`` exit 0) with no
temporary file, and every earlier point must restore bit for bit.  Once space
is freed (a ballast file removed), the next backup succeeds and restores.

A second test runs out of space at every durable write of a small backup (the
pack, the manifest, the index segment, the point record) by leaving exactly
N pages free on a tmpfs, for N up to what the backup needs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import KIB, MIB
from helpers.cli import backup_cli, cbt, one_error_line
from helpers.images import assert_same_disk, keep_copy
from helpers.system import fill, free_bytes, small_fs
from helpers.vaults import temp_files

import cbt as cbt_api

BS = 64 * KIB
SPACE_WORDS = ("space", "ENOSPC")


def _random(path: Path, size: int, seed: int) -> None:
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, size, np.uint8).tobytes())


def _points(vault: Path) -> list[str]:
    return [p.id for p in cbt_api.Vault.open(vault).points()]


def _consistent(vault: Path, history: list[tuple[str, Path]], out: Path,
                leftovers: list[str], cli: bool = True) -> None:
    """verify exit 0, exactly the committed points, each bit for bit; temporary files
    left behind are added to ``leftovers`` (checked at the end of the test)."""
    r = cbt("verify", vault, "--json")
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert json.loads(r.stdout)["problems"] == []
    leftovers += temp_files(vault)
    assert _points(vault) == [pid for pid, _ in history]
    for i, (pid, copy) in enumerate(history):
        to = out / f"restore{i}"
        if cli:
            assert cbt("restore", vault, pid, "--to", to).returncode == 0
        else:
            cbt_api.Vault.open(vault).restore(pid, to)
        assert_same_disk(to / "d.img", copy, BS)
        shutil.rmtree(to)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ext4", "tmpfs"])
def test_enospc_during_backup(tmp_path: Path, kind: str) -> None:
    disk = tmp_path / "d.img"
    with small_fs(kind, 64 if kind == "ext4" else 40, tmp_path) as mnt:
        vault = mnt / "vault"
        assert cbt("init", "--encryption", "none", vault).returncode == 0
        _random(disk, 8 * MIB, 1)
        p0 = backup_cli(vault, "vm", disk, "--block-size", "64K")["recovery_point"]
        history = [(p0, keep_copy(disk, tmp_path / "day0.img"))]
        ballast = mnt / "ballast"
        fill(ballast, 6 * MIB)
        # 24 MiB of new, incompressible data: it cannot fit (its first full pack already not)
        with open(disk, "r+b") as f:
            f.seek(2 * MIB)
            f.write(np.random.default_rng(2).integers(0, 256, 24 * MIB, np.uint8).tobytes())
        failures, leftovers = [], []
        for as_json in (False, True):
            r = cbt("backup", vault, disk, "--vm", "vm", *(["--json"] if as_json else []))
            assert r.returncode == 2, r.stderr
            assert any(w in r.stderr for w in SPACE_WORDS), r.stderr
            if as_json:
                last = json.loads(r.stdout.splitlines()[-1])
                assert last["type"] == "error" and "space" in last["message"]
            failures.append(r)
            _consistent(vault, history, tmp_path, leftovers)
        # space comes back: the next backup succeeds
        ballast.unlink()
        point = backup_cli(vault, "vm", disk)
        history.append((point["recovery_point"], keep_copy(disk, tmp_path / "day1.img")))
        _consistent(vault, history, tmp_path, leftovers)
        r = cbt("verify", vault, "--data")
        assert r.returncode == 0, r.stderr
    assert leftovers == [], "temporary files were left behind"
    for r in failures:  # one clear line, nothing else on stderr
        line = one_error_line(r)
        assert any(w in line for w in SPACE_WORDS), line


@pytest.mark.slow
def test_enospc_at_every_write_of_a_backup(tmp_path: Path) -> None:
    """Leave N-4..N pages free, N being what a small incremental backup takes: it runs
    out of space writing its pack, its manifest, its index segment, its point record."""
    disk = tmp_path / "d.img"
    _random(disk, MIB, 3)
    with small_fs("tmpfs", 8, tmp_path) as mnt:
        vault = mnt / "vault"
        cbt_api.Vault.init(vault)
        p0 = cbt_api.Vault.open(vault).backup("vm", [disk], block_size=BS, workers=1).id
        day0 = keep_copy(disk, tmp_path / "day0.img")
        pristine = tmp_path / "pristine"
        shutil.copytree(vault, pristine)
        with open(disk, "r+b") as f:  # 192 KiB of new data: a few pages of pack
            f.seek(128 * KIB)
            f.write(np.random.default_rng(4).integers(0, 256, 192 * KIB, np.uint8).tobytes())
        day1 = keep_copy(disk, tmp_path / "day1.img")
        # how many pages does the backup take?
        before = free_bytes(mnt)
        backup = ["backup", vault, disk, "--vm", "vm", "--workers", "1"]
        assert cbt(*backup).returncode == 0
        # (+ 1: the run's own lock file, locks/shared-*, removed when it ends)
        need = (before - free_bytes(mnt)) // 4096 + 1
        assert need >= 4  # pack, manifest, index segment, point record
        outcomes: list[int] = []
        leftovers: list[str] = []
        lines = []
        for pages in range(need - 4, need + 1):
            shutil.rmtree(vault)
            shutil.copytree(pristine, vault)
            ballast = mnt / "ballast"
            fill(ballast, pages * 4096)
            r = cbt(*backup)
            ballast.unlink()
            outcomes.append(r.returncode)
            if r.returncode == 0:
                pts = _points(vault)
                assert len(pts) == 2 and pts[0] == p0
                _consistent(vault, [(p0, day0), (pts[1], day1)], tmp_path, leftovers, cli=False)
                continue
            assert any(w in r.stderr for w in SPACE_WORDS), (pages, r.stderr)
            lines.append(r)
            _consistent(vault, [(p0, day0)], tmp_path, leftovers, cli=False)
            # and with space back, the next backup succeeds
            assert cbt(*backup).returncode == 0
            assert len(_points(vault)) == 2
        assert outcomes == [2, 2, 2, 2, 0], outcomes
    assert leftovers == [], "temporary files were left behind"
    for r in lines:
        one_error_line(r)

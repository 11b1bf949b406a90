"""A ``gc --max-unused 0`` killed (SIGKILL) after each step that changes the vault
(every put, rename, delete and touch of its storage, the locks' included) loses no
point: every point restores bit for bit, ``verify --data`` finds nothing, and a rerun
finishes the job (the run after it has nothing left to do).  On a directory and on S3
(where a move is a copy, then a delete).

The run rewrites three mostly live packs and empties a trash an earlier gc filled, so
the steps cover the rewritten packs, the new index segment, the old segments' removal,
the moves to the trash and the trash's emptying.  Plain and encrypted vaults.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import KIB, MIB
from helpers.images import assert_same_bytes, copy_disk, write_random_disk
from helpers.kills import KILLING, copy_vault, kill_steps
from helpers.vaults import PASSWORD, fast_kdf

import cbt.ops.backup as backup_mod
from cbt.api import Vault
from cbt.ops.gc import gc
from cbt.ops.prune import PruneRequest, prune

BS = 64 * KIB
# The S3 run's steps are split over this many tests (each kills at every SHARDS-th step,
# :func:`helpers.kills.kill_steps`) that pytest-xdist runs side by side: every step
# waits out S3's whole-second times, ~5 s, so one test of them all took over 2 minutes.
SHARDS = 4

_CHILD = KILLING + r"""
from cbt.api import Vault
from cbt.ops.gc import gc

path, kill_at, password = sys.argv[1], int(sys.argv[2]), sys.argv[3] or None
vault = Vault.open(path, passphrase=password) if password else Vault.open(path)
killing(vault.storage, ("put", "rename", "delete", "touch"), kill_at)
r = gc(vault, grace=0.0, max_unused=0.0)
print("finished", steps[0], r.packs_rewritten, r.trash_emptied)
"""


def _open(path: Path | str, encrypted: bool) -> Vault:
    return Vault.open(path, passphrase=PASSWORD) if encrypted else Vault.open(path)


@pytest.mark.parametrize(("kind", "encrypted", "shard"), [
    pytest.param("dir", False, 0, id="plain"), pytest.param("dir", True, 0, id="encrypted"),
    *(pytest.param("s3", True, n, marks=pytest.mark.slow, id=f"s3-encrypted-{n + 1}of{SHARDS}")
      for n in range(SHARDS))])  # (28 runs on S3, ~7 a shard)
def test_gc_killed_at_each_step_loses_no_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               request: pytest.FixtureRequest, kind: str,
                                               encrypted: bool, shard: int) -> None:
    monkeypatch.setattr(backup_mod, "TARGET_PACK_SIZE", MIB)
    src: Path | str = tmp_path / "src"
    if kind == "s3":
        from helpers.s3 import fresh_bucket

        request.getfixturevalue("s3_env")  # (its variables reach the killed runs too)
        src = f"s3://{fresh_bucket()}/src"
    vault = (Vault.init(src, encryption="aes-256-gcm", passphrase=PASSWORD, kdf=fast_kdf())
             if encrypted else Vault.init(src))
    disk = write_random_disk(tmp_path / "d.img", 8 * MIB, seed=21)
    first = vault.backup("vm", [f"d={disk}"], block_size=BS, workers=1).id
    truths: dict[str, Path] = {}
    for n in range(2):
        with disk.open("r+b") as f:
            for i in range(8):  # 2*i+n blocks of pack i changed
                for j in range(2 * i + n):
                    f.seek((i * 16 + j) * BS)
                    f.write(os.urandom(BS))
        point = vault.backup("vm", [f"d={disk}"], block_size=BS, workers=1).id
        truths[point] = copy_disk(disk, tmp_path / f"truth-{n}.img")
    prune(vault, PruneRequest(keep=lambda pts: {p.id: [] if p.id == first else ["kept"]
                                                for p in pts},
                              expired=lambda _vm, _created: False))
    # (S3 mtimes are whole seconds and gc's reading of the server's clock errs by up to
    # two seconds on the safe side: packs younger than that are not judged)
    pause = 2.1 if kind == "s3" else 0.05
    time.sleep(pause)
    first_gc = gc(vault, grace=3600.0)  # the mostly dead packs to the trash, the mostly live kept
    assert first_gc.packs_rewritten == 4, first_gc  # (the old four to the trash)
    retired = len(vault.storage.list("trash/index"))  # (the segments it replaced, with them)
    assert retired >= 1

    def check(path: Path | str, to: Path) -> Vault:
        v = _open(path, encrypted)
        for point, truth in truths.items():
            v.restore(point, to / point, workers=1)
            assert_same_bytes(to / point / "d.img", truth)
        assert v.verify(data=True).problems == []
        return v

    finished = False
    kill_at = total = 0
    steps = kill_steps(shard, 1 if kind == "dir" else SHARDS)
    while not finished:
        kill_at = next(steps)
        assert kill_at < 200, "gc never finished"
        path: Path | str = (tmp_path / f"v{kill_at}" if kind == "dir"
                            else f"{src[:-len('src')]}v{kill_at}")
        copy_vault(src, path)
        time.sleep(pause)  # (trashed before the killed run's clock)
        run = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(kill_at),
                              PASSWORD if encrypted else ""],
                             capture_output=True, text=True, timeout=300)
        finished = run.returncode == 0
        assert finished or run.returncode == -signal.SIGKILL, run
        if finished:
            # (what it had to do: rewrite 3 packs, empty the trash of 4 and the segments)
            assert run.stdout.split()[2:] == ["3", str(4 + retired)], run.stdout
            total = int(run.stdout.split()[1])  # (its steps: each one a place to die)
        v = check(path, tmp_path / f"r{kill_at}")
        time.sleep(pause)
        again = gc(v, grace=0.0, max_unused=0.0)  # the rerun finishes the job
        assert not again.warnings, again
        settled = gc(v, grace=0.0, max_unused=0.0)
        assert settled.packs_rewritten == settled.packs_removed == 0, (kill_at, settled)
        assert settled.dead_kept_bytes == 0, (kill_at, settled)
        check(path, tmp_path / f"s{kill_at}")
        if isinstance(path, Path):
            shutil.rmtree(path)
        shutil.rmtree(tmp_path / f"r{kill_at}")
        shutil.rmtree(tmp_path / f"s{kill_at}")
    # (the run took that many steps: each was a place where a run was killed, by this
    # test or another shard of it)
    assert total >= 10, run.stdout

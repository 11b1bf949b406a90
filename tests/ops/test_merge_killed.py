"""A backup whose commit triggers an index merge, SIGKILLed after each step that changes
the vault (every put, streamed put, rename, delete and touch of its storage): from
its packs through its commit, the merged segment's write and each input's retirement
to the trash.  On a directory and on S3 (where a retirement is a copy, then a delete).

After each kill: every committed point restores bit for bit, ``verify --data`` finds
nothing wrong, a follow-up backup and a gc succeed (and the gc leaves nothing dead
behind), every point restores again, and nothing half-written is left.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import KIB, MIB
from helpers.images import assert_same_bytes, write_random_disk
from helpers.kills import KILLING, copy_vault, kill_steps

import cbt as cbt_api
from cbt.ops.gc import gc
from cbt.repo import compact as compact_mod

BS = 64 * KIB
# The S3 run's steps are split over this many tests (each kills at every SHARDS-th step,
# :func:`helpers.kills.kill_steps`) that pytest-xdist runs side by side: every step
# waits out S3's whole-second times, ~6 s, so one test of them all took ~2.5 minutes.
SHARDS = 4

_CHILD = KILLING + r"""
import cbt as cbt_api

path, kill_at, disk = sys.argv[1], int(sys.argv[2]), sys.argv[3]
vault = cbt_api.Vault.open(path)
killing(vault.storage, ("put", "put_stream", "rename", "delete", "touch"), kill_at)
point = vault.backup("today", [f"d={disk}"], block_size=64 * 1024, workers=1)
print("finished", steps[0], point.id, len(point.warnings))
"""


@pytest.mark.parametrize(("kind", "shard"), [
    pytest.param("dir", 0, id="dir"),
    *(pytest.param("s3", n, marks=pytest.mark.slow, id=f"s3-{n + 1}of{SHARDS}")
      for n in range(SHARDS))])
def test_a_merge_killed_at_each_step_loses_nothing(tmp_path: Path, kind: str, shard: int,
                                                   request: pytest.FixtureRequest) -> None:
    src: Path | str = tmp_path / "src"
    if kind == "s3":
        from helpers.s3 import fresh_bucket

        request.getfixturevalue("s3_env")  # (its variables reach the killed runs too)
        src = f"s3://{fresh_bucket()}/src"
    v = cbt_api.Vault.init(src)
    truths: dict[str, Path] = {}
    for i in range(compact_mod.WIDTH - 1):  # (the tier one segment short of a merge)
        disk = write_random_disk(tmp_path / f"d{i}.img", MIB, seed=70 + i)
        truths[v.backup(f"vm{i}", [f"d={disk}"], block_size=BS, workers=1).id] = disk
    today = write_random_disk(tmp_path / "today.img", MIB, seed=80)
    pause = 2.1 if kind == "s3" else 0.05  # (S3 mtimes: whole seconds)

    def check(path: Path | str, to: Path, points: dict[str, Path]) -> cbt_api.Vault:
        vault = cbt_api.Vault.open(path)
        for point, disk in points.items():
            vault.restore(point, to / point, workers=1)
            assert_same_bytes(to / point / "d.img", disk)
        assert vault.verify(data=True).problems == []
        return vault

    finished, kill_at, total = False, 0, 0
    steps = kill_steps(shard, 1 if kind == "dir" else SHARDS)
    while not finished:
        kill_at = next(steps)
        assert kill_at < 100, "the backup never finished"
        path: Path | str = (tmp_path / f"v{kill_at}" if kind == "dir"
                            else f"{src[:-len('src')]}v{kill_at}")
        copy_vault(src, path)
        run = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(kill_at),
                              str(today)], capture_output=True, text=True, timeout=300)
        finished = run.returncode == 0
        assert finished or run.returncode == -signal.SIGKILL, run
        if finished:
            assert run.stdout.split()[3] == "0", run.stdout  # (no warning: the merge ran)
            total = int(run.stdout.split()[1])  # (its steps: each one a place to die)
        vault = cbt_api.Vault.open(path)
        points = dict(truths)
        points.update({p: today for p in vault.point_ids() if p.startswith("today.")})
        check(path, tmp_path / f"r{kill_at}", points)
        time.sleep(pause)  # (what the killed run left is older than the next one)
        follow = vault.backup("next", [f"d={today}"], block_size=BS, workers=1)
        points[follow.id] = today
        time.sleep(pause)
        swept = gc(vault, grace=0.0, max_unused=0.0)
        assert not swept.warnings, (kill_at, swept)
        time.sleep(pause)
        settled = gc(vault, grace=0.0, max_unused=0.0)
        assert settled.packs_rewritten == settled.packs_removed == 0, (kill_at, settled)
        assert settled.dead_kept_bytes == 0, (kill_at, settled)
        vault = check(path, tmp_path / f"s{kill_at}", points)
        # nothing of the index unreferenced; what a killed run left outside it (its
        # manifests, S3's clock probe: removed by a backup once older than its start, in
        # the server's whole seconds less a margin: later than this one on S3) is all
        # the verify counts
        left = vault.leftovers()
        assert all(n.startswith(("manifests/", ".clock.tmp-")) for n in left), left
        if kind == "dir":
            assert left == [], (kill_at, left)
        extra = sum(vault.storage.size(n) for n in left)
        assert vault.verify().unreferenced_bytes == extra, (kill_at, left)
        if isinstance(path, Path):
            shutil.rmtree(path)
        shutil.rmtree(tmp_path / f"r{kill_at}")
        shutil.rmtree(tmp_path / f"s{kill_at}")
    # (packs, manifest, segment, record, merged segment, WIDTH retirements: each a place
    # where a run was killed, by this test or another shard of it)
    assert total > compact_mod.WIDTH + 3, run.stdout

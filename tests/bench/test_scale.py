"""bench/scale.py: its vaults hold the synthetic entries it says, and a tiny run reports
every command at every scale.

The truth is computed here from the recipe the module documents (numpy's generator
seeded with ``[seed, segment]``: 32 bytes an id, then 16 bytes a pack of 2000), not by
the builder's own function, and read back through the vault's own index loader.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import numpy as np
import pytest
import scale

from cbt.core.crypto import KdfParams
from cbt.format.pack import HEADER
from cbt.repo.vault import Vault


def expected(seed: int, chunk: int, count: int) -> tuple[np.ndarray, list[str]]:
    """The ids of one synthetic segment and the pack id of each, as documented."""
    rng = np.random.default_rng([seed, chunk])
    ids = np.frombuffer(rng.bytes(count * 32), dtype=np.uint8).reshape(count, 32)
    npacks = -(-count // 2000)
    packs = rng.bytes(npacks * 16)
    return ids, [uuid.UUID(bytes=packs[16 * (i // 2000):16 * (i // 2000) + 16]).hex
                 for i in range(count)]


def check_entries(vault: Vault, n: int, per_segment: int) -> None:
    """The vault's index holds exactly the ``n`` documented entries."""
    index = vault.load_index()
    assert len(index) == n and not index.damaged and not index.orphans
    rng = np.random.default_rng(7)
    for chunk, start in enumerate(range(0, n, per_segment)):
        count = min(per_segment, n - start)
        ids, packs = expected(scale.SEED, chunk, count)
        for i in {0, count - 1, *rng.integers(0, count, 20).tolist()}:
            e = index.find(ids[i].tobytes())
            assert e is not None and e.pack == packs[i] and e.raw == 4096
            assert 0 < e.stored <= 4096 and e.offset >= HEADER.size
            if i % 2000 == 0:
                assert e.offset == HEADER.size  # the first blob of its pack
    for absent in rng.bytes(32 * 50), bytes(32) * 50:
        assert (index.lookup(np.frombuffer(absent, np.uint8).reshape(50, 32)) == -1).all()


@pytest.mark.skipif(not os.access(scale.GNU_TIME, os.X_OK), reason="needs GNU time (apt "
                    "package time), what the benchmark measures with")
def test_a_tiny_run_reports_every_command_at_every_scale(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert scale.main(["--scales", "0,50k", "--disk-size", "4M", "--dir", str(tmp_path),
                       "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = {(r["scale"], r["command"]): r for r in result["rows"]}
    assert set(rows) == {(n, c) for n in (0, 50_000) for c in scale.COMMANDS}
    for (n, c), r in rows.items():
        assert r["peak_rss"] >= max(r["gnu_time_rss"]) > 10 << 20  # a Python process, at least
        assert r["seconds"] > 0 and r["streams"] == (c in ("verify_data", "gc"))
        assert (r["delta_rss_per_million"] is None) == (n == 0)
    # a backup forks a worker per disk: its tree was sampled
    assert rows[(0, "backup_full")]["processes"] >= 1
    cached = tmp_path / "50k" / "vault"
    vault = Vault.open(cached)
    check_entries(vault, 50_000, scale.SEGMENT_ENTRIES)
    # the runs worked on clones: the cached vault holds no point, only its segments
    assert vault.points() == [] and [p.name for p in (cached / "index").iterdir()] == [
        "synthetic-0000.arrow"]
    assert not (tmp_path / "runs").exists()


def test_build_vault_reuses_or_remakes_by_recipe(tmp_path: Path) -> None:
    made = scale.build_vault(tmp_path / "s", 5000, per_segment=2000)
    check_entries(Vault.open(made), 5000, 2000)
    assert len(Vault.open(made).segment_names()) == 3
    stamp = (tmp_path / "s" / "recipe.json").stat().st_mtime_ns
    assert scale.build_vault(tmp_path / "s", 5000, per_segment=2000) == made
    assert (tmp_path / "s" / "recipe.json").stat().st_mtime_ns == stamp  # reused
    scale.build_vault(tmp_path / "s", 4000, per_segment=2000)  # another recipe: remade
    check_entries(Vault.open(made), 4000, 2000)


def test_segments_stay_below_the_merge_threshold(tmp_path: Path) -> None:
    made = scale.build_vault(tmp_path / "s", 100, per_segment=1)
    per = scale.segment_size(100, 1)
    assert len(Vault.open(made).segment_names()) == -(-100 // per) <= scale.MAX_SEGMENTS
    check_entries(Vault.open(made), 100, per)


def test_an_encrypted_vault_holds_them_sealed(tmp_path: Path) -> None:
    made = scale.build_vault(tmp_path / "e", 3000, encrypted=True, per_segment=2000,
                             kdf=KdfParams(log_n=10))
    vault = Vault.open(made, scale.PASSPHRASE)
    assert vault.encrypted
    names = vault.segment_names()
    assert len(names) == 2 and all(n.endswith(".sealed") and "synthetic" not in n
                                   for n in names)
    check_entries(vault, 3000, 2000)


def test_profile_names_each_step_of_loading_the_index(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert scale.main(["--profile", "--scales", "5k", "--dir", str(tmp_path), "--json"]) == 0
    (got,) = json.loads(capsys.readouterr().out)
    steps = {s["step"]: s for s in got["steps"]}
    assert "Index.build (5,000 entries)" in steps
    # the Index holds 60 bytes an entry: digest 32, key 8, pack 4, offset 8, stored 4, raw 4
    assert steps["the Index's arrays"]["rss"] == 60 * 5000
    assert all(s["rss"] > 0 for s in got["steps"])

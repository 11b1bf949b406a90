"""bench/scale.py: its vaults hold the synthetic entries it says, and a tiny run reports
every command at every scale.

The truth is computed here from the recipes the module documents, not by the builder's
own functions, and read back through the vault's own index loader: for paged segments
(the default) numpy's generator seeded ``[seed, segment]`` draws the sorted 8-byte id
prefixes, then 16 bytes a pack of 2000; the rest of each entry is splitmix64 of the
prefix (computed here in plain Python integers); for ``--legacy`` segments 32 random
bytes an id, then 16 bytes a pack of 2000.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import numpy as np
import pytest
import scale
from helpers.system import need

from cbt.core.crypto import KdfParams
from cbt.format.pack import BLOB, HEADER
from cbt.repo import compact
from cbt.repo.vault import Vault


def expected(seed: int, chunk: int, count: int) -> tuple[np.ndarray, list[str]]:
    """The ids of one synthetic segment and the pack id of each, as documented."""
    rng = np.random.default_rng([seed, chunk])
    ids = np.frombuffer(rng.bytes(count * 32), dtype=np.uint8).reshape(count, 32)
    npacks = -(-count // 2000)
    packs = rng.bytes(npacks * 16)
    return ids, [uuid.UUID(bytes=packs[16 * (i // 2000):16 * (i // 2000) + 16]).hex
                 for i in range(count)]


M64 = (1 << 64) - 1


def splitmix(x: int) -> int:
    """splitmix64's finalizer of ``x``, in Python integers."""
    z = (x * 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def expected_paged(seed: int, segment: int, count: int, rows: list[int]
                   ) -> list[tuple[bytes, str, int, int]]:
    """(id, pack id, offset, stored) of the given rows of one synthetic paged segment."""
    rng = np.random.default_rng([seed, segment])
    prefix = sorted(int(x) for x in rng.integers(0, 2**64, count, dtype=np.uint64))
    for j in range(1, count):  # strictly ascending
        prefix[j] = max(prefix[j], prefix[j - 1] + 1)
    packs = rng.bytes(-(-count // 2000) * 16)

    def stored(j: int) -> int:
        return 4096 // 3 + splitmix(prefix[j] + 4) % (4096 - 4096 // 3 + 1)

    out = []
    for j in rows:
        digest = b"".join(((prefix[j] + w) & M64 if w == 0 else splitmix(prefix[j] + w))
                          .to_bytes(8, "big") for w in range(4))
        first = j - j % 2000
        offset = HEADER.size + sum(stored(i) + BLOB.size for i in range(first, j))
        out.append((digest, uuid.UUID(bytes=packs[16 * (j // 2000):16 * (j // 2000) + 16]).hex,
                    offset, stored(j)))
    return out


def check_paged_entries(vault: Vault, n: int) -> None:
    """The vault's index holds exactly the ``n`` documented paged entries."""
    index = vault.load_index()
    assert len(index) == n and not index.damaged and not index.orphans
    rng = np.random.default_rng(7)
    for segment, count in enumerate(scale.paged_layout(n)):
        rows = sorted({0, count - 1, 1999 % count, *rng.integers(0, count, 20).tolist()})
        for digest, pack, offset, stored in expected_paged(scale.SEED, segment, count, rows):
            e = index.find(digest)
            assert e == (digest, pack, offset, stored, 4096)
    for absent in rng.bytes(32 * 50), bytes(32) * 50:
        assert (index.lookup(np.frombuffer(absent, np.uint8).reshape(50, 32)) == -1).all()


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


def test_a_tiny_run_reports_every_command_at_every_scale(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    need(os.access(scale.GNU_TIME, os.X_OK), "needs GNU time (apt package time; "
         "ci/system-deps.sh installs it), what the benchmark measures with")
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
    check_paged_entries(vault, 50_000)
    # the runs worked on clones: the cached vault holds no point, only its segments
    assert vault.points() == [] and sorted(p.name for p in (cached / "index").iterdir()) == [
        f"synthetic-{i:04d}.cbtidx" for i in range(3)]
    assert not (tmp_path / "runs").exists()


def test_build_vault_reuses_or_remakes_by_recipe(tmp_path: Path) -> None:
    made = scale.build_vault(tmp_path / "s", 5000)
    check_paged_entries(Vault.open(made), 5000)
    stamp = (tmp_path / "s" / "recipe.json").stat().st_mtime_ns
    assert scale.build_vault(tmp_path / "s", 5000) == made
    assert (tmp_path / "s" / "recipe.json").stat().st_mtime_ns == stamp  # reused
    assert json.loads((tmp_path / "s" / "recipe.json").read_text())["paged_version"] == 1
    scale.build_vault(tmp_path / "s", 40_000)  # another recipe: remade
    check_paged_entries(Vault.open(made), 40_000)
    scale.build_vault(tmp_path / "s", 5000, per_segment=2000, legacy=True)  # legacy: remade
    check_entries(Vault.open(made), 5000, 2000)
    assert len(Vault.open(made).segment_names()) == 3


@pytest.mark.parametrize("n", [1, 4095, 16_384, 70_000, 1_000_000, 16_000_000, 10**9])
def test_the_paged_layout_is_one_compaction_leaves(n: int) -> None:
    sizes = scale.paged_layout(n)
    assert sum(sizes) == n and sizes == sorted(sizes, reverse=True)
    tiers = [compact.tier(s) for s in sizes]
    # at most WIDTH - 1 a tier (so nothing merges), none in tier 0 but a vault under
    # one tier-1 segment (so the run's two backups, tier 0, merge nothing either)
    assert all(tiers.count(t) < compact.WIDTH for t in tiers)
    assert compact.choose([(str(i), s) for i, s in enumerate([*sizes, 1024, 1024])]) == []
    assert 0 not in tiers or len(sizes) == 1


def test_legacy_segments_stay_below_the_merge_threshold(tmp_path: Path) -> None:
    made = scale.build_vault(tmp_path / "s", 100, per_segment=1, legacy=True)
    per = scale.segment_size(100, 1)
    assert len(Vault.open(made).segment_names()) == -(-100 // per) <= scale.MAX_SEGMENTS
    check_entries(Vault.open(made), 100, per)


def test_an_encrypted_vault_holds_them_sealed(tmp_path: Path) -> None:
    made = scale.build_vault(tmp_path / "e", 40_000, encrypted=True, kdf=KdfParams(log_n=10))
    vault = Vault.open(made, scale.PASSPHRASE)
    assert vault.encrypted
    names = vault.segment_names()
    assert len(names) == len(scale.paged_layout(40_000)) == 2 and all(
        n.endswith(".cbtidx") and "synthetic" not in n for n in names)
    check_paged_entries(vault, 40_000)
    legacy = scale.build_vault(tmp_path / "l", 3000, encrypted=True, per_segment=2000,
                               kdf=KdfParams(log_n=10), legacy=True)
    check_entries(Vault.open(legacy, scale.PASSPHRASE), 3000, 2000)


def test_profile_names_each_step_of_using_the_index(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert scale.main(["--profile", "--scales", "40k", "--dir", str(tmp_path), "--json"]) == 0
    (got,) = json.loads(capsys.readouterr().out)
    steps = {s["step"]: s for s in got["steps"]}
    assert "load the index (2 parts, 40,000 entries)" in steps
    assert "stream every entry (Index.chunks: 40,000)" in steps
    # a paged segment's head: 1.5 bytes an entry of filter, then fences and checks
    held = steps["what the open segments' heads hold"]["arrays"]["per entry"]
    assert 1.5 < held < 4
    assert all(s["rss"] > 0 for s in got["steps"])

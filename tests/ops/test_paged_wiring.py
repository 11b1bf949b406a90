"""The paged index as the vault uses it, attacked: damaged segments beside a backup's
merge, a merge killed before it retired its inputs, readers that opened the index
before a merge or a gc retired its segments.

- A backup whose commit is followed by a merge that fails (a damaged page in a
  segment of the crowded tier; a head that fails its checks) is still a success:
  the point is committed; the merge's failure is a warning, and nothing of it is
  left.  ``verify --repair`` then rebuilds the index, and the next merge runs.
- A merge killed after its segment is whole and before its inputs are retired
  leaves each of their entries twice (the same digest, pack and offset).  That is
  one blob: verify's unreferenced bytes, stats' stored bytes and gc's dead bytes
  count it once (gc with ``--max-unused 0`` found every such pack half dead and
  rewrote it for nothing; verify reported the whole index as unreferenced).
- A restore or verify that loaded the index (segment heads only) before a merge or
  a gc retired its segments reads their pages from the trash and finishes.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from helpers import KIB, MIB
from helpers.cli import cbt
from helpers.images import assert_same_bytes, write_random_disk
from helpers.vaults import PASSWORD, fast_kdf

import cbt as cbt_api
from cbt.ops.gc import gc
from cbt.ops.stats import stats
from cbt.ops.verify import repair
from cbt.repo import compact as compact_mod
from cbt.repo import segments as segments_mod
from cbt.repo.lock import gc_lock
from cbt.repo.vault import Vault as RepoVault

BS = 64 * KIB
WIDTH = compact_mod.WIDTH  # (the default: tests lower or raise the module's)


def _vault(path: Path, encrypted: bool) -> cbt_api.Vault:
    if encrypted:
        return cbt_api.Vault.init(path, encryption="aes-256-gcm", passphrase=PASSWORD,
                                  kdf=fast_kdf())
    return cbt_api.Vault.init(path)


def _open(path: Path, encrypted: bool) -> cbt_api.Vault:
    return cbt_api.Vault.open(path, passphrase=PASSWORD) if encrypted else cbt_api.Vault.open(path)


def _points(v: cbt_api.Vault, tmp: Path, n: int, seed: int) -> dict[str, Path]:
    """``n`` points of VMs of their own, one 1 MiB random disk each: id -> its disk."""
    out = {}
    for i in range(n):
        disk = write_random_disk(tmp / f"d{seed}-{i}.img", MIB, seed=seed + i)
        out[v.backup(f"vm{i}", [f"d={disk}"], block_size=BS, workers=1).id] = disk
    return out


def _restores(v: cbt_api.Vault, truths: dict[str, Path], to: Path) -> None:
    for point, disk in truths.items():
        v.restore(point, to / point, workers=1)
        assert_same_bytes(to / point / "d.img", disk)


def _flip(storage: Any, name: str, at: int) -> None:
    """One bit of a vault object flipped (``at`` < 0: from its end)."""
    body = bytearray(storage.get(name))
    body[at] ^= 1
    storage.put(name, bytes(body))


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
@pytest.mark.parametrize("where", ["page", "head"])
def test_a_merge_that_fails_after_the_commit_is_a_warning(tmp_path: Path, where: str,
                                                          encrypted: bool) -> None:
    """WIDTH - 1 points, a segment of one damaged: the next backup crowds the tier and
    its merge reads the damaged segment.  The backup succeeds (its point committed,
    restorable), says why the merge did not run, leaves nothing of it; after
    ``verify --repair`` everything restores and the next backup's merge runs."""
    v = _vault(tmp_path / "v", encrypted)
    truths = _points(v, tmp_path, compact_mod.WIDTH - 1, seed=10)
    victim = sorted(v.storage.list("index"))[1]
    _flip(v.storage, victim, 100 if where == "page" else -200)
    before = set(v.storage.list(""))
    disk = write_random_disk(tmp_path / "new.img", MIB, seed=20)
    point = v.backup("new", [f"d={disk}"], block_size=BS, workers=1)  # (raised: the bug)
    truths[point.id] = disk
    added = {n for n in set(v.storage.list("")) - before if not n.startswith("locks/")}
    assert {n.split("/")[0] for n in added} == {"packs", "manifests", "index", "points"}, added
    assert not any("merged-" in n or "trash" in n for n in added), added
    if where == "page":
        assert any("index segments not merged" in w and v.storage.where(victim) in w
                   for w in point.warnings), point.warnings
    else:  # (a head that fails is a damaged segment: left out of the merge, and named)
        assert any("damaged index segment" in w for w in point.warnings), point.warnings
    v.restore(point.id, tmp_path / "new", workers=1)
    assert_same_bytes(tmp_path / "new" / "d.img", disk)
    assert repair(v).problems == []
    assert v.verify().problems == []
    _restores(v, truths, tmp_path / "r")
    # the next backup's merge runs: the index is whole again
    assert len(v.storage.list("index")) == 1  # (repair's one segment)
    again = _points(v, tmp_path, compact_mod.WIDTH, seed=30)
    assert len(v.storage.list("index")) < 1 + compact_mod.WIDTH  # (merged)
    truths.update(again)
    _restores(_open(tmp_path / "v", encrypted), truths, tmp_path / "r2")
    assert v.verify(data=True).problems == []


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_a_merge_killed_before_retiring_its_inputs_counts_each_blob_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, encrypted: bool) -> None:
    """The merged segment written, its inputs not retired (as a kill between the two
    leaves them): verify, stats and gc see each blob once, and the next merge settles."""
    v = _vault(tmp_path / "v", encrypted)
    with monkeypatch.context() as m:
        m.setattr(compact_mod, "WIDTH", 100)  # (no merge yet: WIDTH segments wait)
        truths = _points(v, tmp_path, WIDTH, seed=40)
    with monkeypatch.context() as m, gc_lock(v.storage, None, not v.encrypted):
        m.setattr(segments_mod, "retire_segment", lambda _storage, _name: None)
        assert segments_mod.compact(v) is not None
    assert len(v.storage.list("index")) == compact_mod.WIDTH + 1  # (merged, and its inputs)
    whole = sum(v.storage.size(n) for n in v.storage.list("packs"))
    report = v.verify()
    assert report.problems == [] and report.unreferenced_bytes == 0, report
    twice = stats(v).stored_bytes
    swept = gc(v, grace=0, max_unused=0)  # (found every pack half dead: rewrote them all)
    assert swept.packs_rewritten == swept.packs_removed == 0, swept
    assert swept.dead_kept_bytes == 0, swept
    assert sum(v.storage.size(n) for n in v.storage.list("packs")) == whole
    with gc_lock(v.storage, None, not v.encrypted):
        assert segments_mod.compact(v) is not None  # (the tier is crowded: merged again)
    assert len(v.storage.list("index")) == 1
    assert stats(v).stored_bytes == twice  # (each blob once, as before)
    _restores(v, truths, tmp_path / "r")
    assert v.verify(data=True).unreferenced_bytes == 0


def _retire_while_loading(monkeypatch: pytest.MonkeyPatch, writer: Any) -> list[str]:
    """The next index a reader loads (segment heads only) has its segments retired by
    ``writer`` (run in another thread, waited for) before the reader reads a page;
    returns the names retired."""
    real = RepoVault.load_index
    retired: list[str] = []
    armed = [True]

    def load_index(self: RepoVault, *args: Any, **kwargs: Any) -> Any:
        index = real(self, *args, **kwargs)
        if armed[0]:  # (once: the writer, a gc, loads the index too)
            armed[0] = False
            t = threading.Thread(target=writer)
            t.start()
            t.join()
            left = set(self.storage.list("index"))
            retired.extend(n for n in index.segments if n not in left)
        return index

    monkeypatch.setattr(RepoVault, "load_index", load_index)
    return retired


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
@pytest.mark.parametrize("writer", ["merge", "gc"])
@pytest.mark.parametrize("reader", ["restore", "verify"])
def test_a_reader_finishes_when_its_segments_are_retired(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, encrypted: bool, writer: str,
        reader: str) -> None:
    v = _vault(tmp_path / "v", encrypted)
    with monkeypatch.context() as m:
        m.setattr(compact_mod, "WIDTH", 100)  # (no merge yet: WIDTH segments wait)
        truths = _points(v, tmp_path, WIDTH + 1, seed=50)
    gone = next(iter(truths))
    v.storage.delete(v.point_name(gone))  # (forgotten, as prune does): its pack is dead
    del truths[gone]
    other = _open(tmp_path / "v", encrypted)

    def write() -> None:
        if writer == "merge":
            with gc_lock(other.storage, None, not other.encrypted):
                assert segments_mod.compact(other) is not None
        else:
            assert gc(other, grace=3600).packs_removed == 1

    with monkeypatch.context() as m:
        retired = _retire_while_loading(m, write)
        if reader == "restore":
            point = sorted(truths)[-1]
            v.restore(point, tmp_path / "out", workers=1)
            assert_same_bytes(tmp_path / "out" / "d.img", truths[point])
        else:
            report = v.verify(data=True)
            assert report.problems == [], report
    assert len(retired) >= compact_mod.WIDTH, retired  # (read from the trash)
    assert all(v.storage.exists(f"trash/{n}") for n in retired)
    _restores(_open(tmp_path / "v", encrypted), truths, tmp_path / "r")


def test_a_segment_copied_from_another_vault_is_ignored(tmp_path: Path) -> None:
    """A plain vault's index segment copied into another (nothing authenticates it),
    naming the same blocks in packs that vault does not hold, under a name searched
    first: it is ignored and named, so every point restores, a backup of the same
    blocks deduplicates against the vault's own packs, and its merge leaves the copy
    out (it merged it into a segment of the vault for good: a point of every later
    backup unrestorable, and the vault's own points too)."""
    v = cbt_api.Vault.init(tmp_path / "v")
    truths = _points(v, tmp_path, WIDTH - 1, seed=60)
    other = cbt_api.Vault.init(tmp_path / "other")
    _points(other, tmp_path, 1, seed=60)  # (the first disk again: the same blocks)
    (segment,) = other.storage.list("index")
    v.storage.put("index/0-copied.cbtidx", other.storage.get(segment))
    disk = next(iter(truths.values()))
    point = v.backup("again", [f"d={disk}"], block_size=BS, workers=1)
    assert point.bytes_new == 0  # (the vault holds these blocks)
    assert any("0-copied.cbtidx" in w and "another vault" in w for w in point.warnings)
    truths[point.id] = disk
    assert "index/0-copied.cbtidx" in v.storage.list("index")  # (named, left for repair)
    _restores(v, truths, tmp_path / "r")
    report = v.verify(data=True)
    assert [p.problem for p in report.problems] == [
        f"damaged index segment: {v.storage.where('index/0-copied.cbtidx')} names 1 packs, "
        "none of them in this vault (copied from another vault?)"], report
    r = cbt("verify", tmp_path / "v")  # (one line, no empty place before the problem)
    assert r.returncode == 2
    assert any(line.startswith("cbt: problem: damaged index segment: ")
               for line in r.stderr.splitlines()), r.stderr
    assert repair(v).problems == []
    assert "index/0-copied.cbtidx" not in v.storage.list("index")
    _restores(v, truths, tmp_path / "r2")

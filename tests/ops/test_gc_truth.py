"""gc tells the truth (issue 16): what it deleted, what waits in the trash, what dead data
it keeps and why, the vault's size before and after; ``max_unused`` repacks partly used
packs, the most dead first.

The truth is computed apart from cbt: file sizes under the vault, the packs' trailers
read by :mod:`helpers.packs`, and the ids of the blocks the kept point holds (BLAKE3 of
the disk's blocks: a plain vault's block ids).
"""

from __future__ import annotations

import datetime as dt
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import blake3
import pytest
from helpers import KIB, MIB
from helpers.images import assert_same_bytes, copy_disk, write_at, write_random_disk
from helpers.packs import pack_files, trailer_entries
from helpers.vaults import dir_bytes, vault_state

import cbt.ops.backup as backup_mod
from cbt.api import Vault
from cbt.ops.gc import gc
from cbt.ops.prune import PruneRequest, prune

BS = 64 * KIB
PER_PACK = 16  # blocks of a pack (packs of 1 MiB)
PACKS = 8
BLOB_HEADER = struct.calcsize("<4s32sBBHII")  # documented blob header


class History:
    """Point 1 of a random 8 MiB disk (8 packs of 16 blocks), then point 2 with 2*i blocks
    of pack i changed; point 1 pruned: pack i holds 2*i dead blocks."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(backup_mod, "TARGET_PACK_SIZE", MIB)
        self.dir = root / "vault"
        disk = write_random_disk(root / "d.img", PACKS * PER_PACK * BS, seed=16)
        self.vault = Vault.init(self.dir)
        first = self.vault.backup("vm", [f"d={disk}"], block_size=BS, workers=1).id
        for i in range(PACKS):
            for j in range(2 * i):
                write_at(disk, (i * PER_PACK + j) * BS, os.urandom(BS))
        self.point = self.vault.backup("vm", [f"d={disk}"], block_size=BS, workers=1).id
        self.truth = copy_disk(disk, root / "truth.img")
        data = disk.read_bytes()
        self.live = {blake3.blake3(data[o:o + BS]).digest() for o in range(0, len(data), BS)}
        prune(self.vault, PruneRequest(
            keep=lambda pts: {p.id: ([] if p.id == first else ["kept"]) for p in pts},
            expired=lambda _vm, _created: False))

    def dead_per_pack(self) -> dict[Path, tuple[int, int, int]]:
        """Per pack file: (dead bytes, live bytes, file size), from its trailer."""
        out = {}
        for f in pack_files(self.dir):
            dead = live = 0
            for digest, _off, stored, _raw in trailer_entries(f):
                if digest in self.live:
                    live += BLOB_HEADER + stored
                else:
                    dead += BLOB_HEADER + stored
            out[f] = (dead, live, f.stat().st_size)
        return out

    def restores(self, to: Path) -> None:
        self.vault.restore(self.point, to, workers=1)
        assert_same_bytes(to / "d.img", self.truth)


@pytest.fixture
def history(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[History]:
    yield History(tmp_path, monkeypatch)


def _vault_bytes(v: Path) -> int:
    """The vault's files but its locks."""
    lock = v / "gc.lock"
    return dir_bytes(v) - dir_bytes(v / "locks") - (lock.stat().st_size if lock.exists() else 0)


def _when(text: str | None) -> float:
    assert text is not None and text.endswith("Z"), text
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def test_gc_reports_what_it_freed_trashed_and_kept(history: History) -> None:
    """The first run deletes nothing: dead packs and the index segments it replaces go to
    the trash (the vault grows by the rewritten packs: "freed" before was the dead bytes
    it trashed); the next run past the grace period deletes the trash, and the vault
    shrinks by exactly that."""
    v = history.dir
    packs = history.dead_per_pack()
    dead = {f: d for f, (d, _lv, _sz) in packs.items() if d}
    assert len(dead) == PACKS - 1, packs  # (pack 0 lost nothing)
    # today's rule: rewritten when the live blobs are under half the pack, else kept whole
    kept = {f: d for f, (d, lv, sz) in packs.items() if d and lv >= sz / 2}
    gone = {f for f in dead if f not in kept}
    assert len(kept) == 3 and len(gone) == 4, packs
    segments = dir_bytes(v / "index")
    nsegments = len(list((v / "index").iterdir()))
    before = _vault_bytes(v)
    started = time.time()
    r = gc(history.vault, grace=3600.0)
    ended = time.time()
    assert r.vault_bytes_before == before
    assert r.vault_bytes_after == _vault_bytes(v)
    assert r.packs_rewritten == len(gone) and r.packs_removed == 0, r
    assert r.dead_kept_packs == len(kept) and r.dead_kept_bytes == sum(kept.values()), r
    # (the replaced index segments go to the trash too: a reader may be searching them)
    assert r.bytes_trashed == sum(packs[f][2] for f in gone) + segments \
        == dir_bytes(v / "trash") == r.trash_bytes
    assert r.trash_emptied == 0 and r.bytes_deleted == 0, r
    new_packs = sum(f.stat().st_size for f in pack_files(v) if f not in packs)
    assert r.bytes_written == new_packs + dir_bytes(v / "index"), r
    assert _vault_bytes(v) == before - r.bytes_deleted + r.bytes_written > before  # it grew
    assert started + 3600 - 1 <= _when(r.trash_free_after) <= ended + 3600 + 1
    history.restores(v.parent / "r1")

    time.sleep(0.05)  # (trashed before the next run's clock)
    trash = dir_bytes(v / "trash")
    before = _vault_bytes(v)
    again = gc(history.vault, grace=0.0)
    assert again.trash_emptied == len(gone) + nsegments and again.packs_rewritten == 0, again
    assert again.bytes_deleted == trash and again.bytes_written == 0, again  # (same index)
    assert dir_bytes(v / "trash") == again.trash_bytes == 0 and again.trash_free_after is None
    assert again.vault_bytes_before == before and again.vault_bytes_after == _vault_bytes(v)
    assert _vault_bytes(v) == before - again.bytes_deleted + again.bytes_written < before
    assert again.dead_kept_bytes == sum(kept.values()), again  # still kept: mostly live
    history.restores(v.parent / "r2")


def test_dry_run_says_the_same_and_changes_nothing(history: History) -> None:
    v = history.dir
    before = vault_state(v)
    dry = gc(history.vault, dry_run=True, max_unused=0.0)
    assert vault_state(v) == before
    assert dry.vault_bytes_before == _vault_bytes(v) and dry.vault_bytes_after is None
    real = gc(history.vault, max_unused=0.0)
    for k in ("packs_removed", "packs_rewritten", "bytes_freed", "bytes_trashed",
              "dead_kept_bytes", "dead_kept_packs"):
        assert getattr(dry, k) == getattr(real, k), (k, dry, real)


def test_max_unused_zero_repacks_every_pack_with_dead_blocks(history: History) -> None:
    r = gc(history.vault, grace=3600.0, max_unused=0.0)
    assert r.packs_rewritten == PACKS - 1 and r.dead_kept_bytes == 0, r
    after = history.dead_per_pack()
    assert sum(d for d, _lv, _sz in after.values()) == 0, after  # no dead blob left in packs/
    history.restores(history.dir.parent / "r")
    again = gc(history.vault, grace=3600.0, max_unused=0.0)
    assert again.packs_rewritten == again.packs_removed == 0, again  # settled


@pytest.mark.parametrize("percent", [10.0, 30.0])
def test_max_unused_repacks_the_most_dead_first_until_within(history: History,
                                                            percent: float) -> None:
    packs = history.dead_per_pack()
    total_dead = sum(d for d, _lv, _sz in packs.values())
    assert total_dead > 0.3 * dir_bytes(history.dir / "packs")  # (both cases repack)
    r = gc(history.vault, grace=3600.0, max_unused=percent)
    after = history.dead_per_pack()
    left = sum(d for d, _lv, _sz in after.values())
    assert left == r.dead_kept_bytes and left <= percent / 100 * dir_bytes(history.dir / "packs")
    rewritten = [d for f, (d, _lv, _sz) in packs.items() if d and f not in after]
    kept = [d for f, (d, _lv, _sz) in packs.items() if d and f in after]
    assert len(rewritten) == r.packs_rewritten and kept, (packs, after)
    assert max(kept) <= min(rewritten)  # the most dead went first
    # minimal: leaving out the last one rewritten would have left too much dead
    assert left + min(rewritten) > percent / 100 * (dir_bytes(history.dir / "packs")
                                                    + min(rewritten))
    history.restores(history.dir.parent / "r")


def test_max_unused_out_of_range_is_refused(history: History) -> None:
    from cbt.core.errors import CbtValueError

    with pytest.raises(CbtValueError, match="percentage"):
        gc(history.vault, max_unused=101.0)


def test_progress_of_mark_sweep_and_rewrite(history: History) -> None:
    seen: list[tuple[str, int, int]] = []
    records, n_packs = len(history.vault.records()), len(pack_files(history.dir))
    gc(history.vault, grace=3600.0, max_unused=0.0,
       progress=lambda phase, done, total: seen.append((phase, done, total)))
    phases = [p for p, _d, _t in seen]
    assert phases.index("mark") < phases.index("sweep") < phases.index("rewrite")
    for phase in ("mark", "sweep", "rewrite"):
        mine = [(d, t) for p, d, t in seen if p == phase]
        assert all(0 <= d <= t for d, t in mine), mine
        assert [d for d, _t in mine] == sorted(d for d, _t in mine)
        assert mine[-1][0] == mine[-1][1] > 0, mine
    assert [t for p, _d, t in seen if p == "mark"][-1] == records
    assert [t for p, _d, t in seen if p == "sweep"][-1] == n_packs


def test_s3_vault_size_from_one_listing(s3_env: Any, tmp_path: Path) -> None:
    """On S3 the sizes come from the listing; they agree with a HEAD of each object, and
    gc's vault size is their sum (locks aside)."""
    from helpers.s3 import fresh_bucket

    from cbt.repo.storage import Storage

    vault = Vault.init(f"s3://{fresh_bucket()}/v")
    disk = write_random_disk(tmp_path / "d.img", MIB, seed=3)
    vault.backup("vm", [f"d={disk}"], block_size=BS, workers=1)
    listed = vault.storage.sizes("")
    headed = Storage.sizes(vault.storage, "")  # (the generic way: a HEAD each)
    assert listed == headed and len(listed) >= 4, (listed, headed)
    assert vault.storage.sizes("packs") == {k: n for k, n in listed.items()
                                            if k.startswith("packs/")}
    r = gc(vault, grace=0.0)
    data = {k: n for k, n in listed.items() if k != "gc.lock" and not k.startswith("locks/")}
    assert r.vault_bytes_before == sum(data.values()) > MIB, (r, listed)


def test_dry_run_figures_are_what_the_run_then_does(history: History) -> None:
    """Every figure of a dry run is the run's "would": the packs and segment it would
    write, the trash it would empty and the segments it would replace, the trash left
    (a dry run once said it would write 0 B, delete nothing)."""
    v = history.dir
    nsegments = len(list((v / "index").iterdir()))
    gc(history.vault, grace=3600.0)  # the mostly dead packs to the trash, 3 mostly live kept
    time.sleep(0.05)  # (trashed before the next runs' clocks)
    before = vault_state(v)
    dry = gc(history.vault, dry_run=True, grace=0.0, max_unused=0.0)
    assert vault_state(v) == before
    real = gc(history.vault, grace=0.0, max_unused=0.0)
    assert real.packs_rewritten == 3 and real.trash_emptied == 4 + nsegments, real
    for k in ("packs_removed", "packs_rewritten", "bytes_freed", "bytes_trashed",
              "dead_kept_bytes", "dead_kept_packs", "trash_emptied", "bytes_deleted",
              "bytes_written", "trash_bytes", "vault_bytes_before"):
        assert getattr(dry, k) == getattr(real, k), (k, dry, real)
    assert dry.vault_bytes_before - dry.bytes_deleted + dry.bytes_written \
        == real.vault_bytes_after == _vault_bytes(v)
    assert abs(_when(dry.trash_free_after) - _when(real.trash_free_after)) <= 2
    history.restores(v.parent / "r")
    # nothing to do: nothing would be written, nor deleted
    time.sleep(0.05)
    calm = gc(history.vault, dry_run=True, grace=3600.0)
    assert calm.bytes_written == calm.bytes_deleted == calm.trash_emptied == 0, calm
    assert calm.trash_bytes == dir_bytes(v / "trash") > 0, calm


def test_max_unused_says_what_it_could_not_judge(history: History) -> None:
    """Packs written since a running backup started (here: every pack, their mtimes in
    the future) are not judged: --max-unused 0 cannot reach its target, ends, and says
    why (it once said nothing: 0 dead kept, as if the vault were clean)."""
    later = time.time() + 3600
    files = pack_files(history.dir)
    for f in files:
        os.utime(f, (later, later))
    before = vault_state(history.dir)
    r = gc(history.vault, grace=3600.0, max_unused=0.0)
    assert r.packs_rewritten == r.packs_removed == r.dead_kept_packs == 0, r
    assert vault_state(history.dir) == before  # (nothing to do, nothing done)
    assert len(r.warnings) == 1 and r.warnings[0].startswith(
        f"{len(files)} packs ("), r.warnings
    assert "not judged" in r.warnings[0] and "--max-unused 0%" in r.warnings[0], r.warnings
    history.restores(history.dir.parent / "r")


@pytest.mark.parametrize("max_unused", [None, 0.0])
def test_bytes_freed_is_what_packs_loses(history: History, max_unused: float | None) -> None:
    """``bytes_freed``: what ``packs/`` holds less, once the trash is emptied (the trashed
    packs out, the rewritten ones in: a new pack's own header and trailer are not
    freed)."""
    packs = dir_bytes(history.dir / "packs")
    r = gc(history.vault, grace=3600.0, max_unused=max_unused)
    assert r.packs_rewritten > 0, r
    assert r.bytes_freed == packs - dir_bytes(history.dir / "packs"), r


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_s3_figures_are_the_listings_difference(s3_env: Any, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                encrypted: bool) -> None:
    """On S3 (plain and encrypted): the object listing before and after each run differs
    by exactly what gc says it deleted and wrote; the trash holds what it says; its dry
    run says the same as the run."""
    from helpers.s3 import fresh_bucket
    from helpers.vaults import PASSWORD, fast_kdf

    monkeypatch.setattr(backup_mod, "TARGET_PACK_SIZE", MIB)
    url = f"s3://{fresh_bucket()}/v"
    vault = (Vault.init(url, encryption="aes-256-gcm", passphrase=PASSWORD, kdf=fast_kdf())
             if encrypted else Vault.init(url))
    disk = write_random_disk(tmp_path / "d.img", 4 * MIB, seed=5)
    first = vault.backup("vm", [f"d={disk}"], block_size=BS, workers=1).id
    for i in range(4):
        for j in range(3 * i):
            write_at(disk, (i * PER_PACK + j) * BS, os.urandom(BS))
    point = vault.backup("vm", [f"d={disk}"], block_size=BS, workers=1).id
    truth = copy_disk(disk, tmp_path / "truth.img")
    prune(vault, PruneRequest(keep=lambda pts: {p.id: [] if p.id == first else ["k"]
                                                for p in pts},
                              expired=lambda _vm, _created: False))

    def data() -> dict[str, int]:
        return {k: n for k, n in vault.storage.sizes("").items()
                if k != "gc.lock" and not k.startswith("locks/")}

    runs = []
    for grace, max_unused in ((3600.0, 0.0), (0.0, None)):
        time.sleep(1.1)  # (S3 times are whole seconds: trashed before this run's clock)
        before = data()
        dry = gc(vault, dry_run=True, grace=grace, max_unused=max_unused)
        assert data() == before
        r = gc(vault, grace=grace, max_unused=max_unused)
        after = data()
        gone, new = set(before) - set(after), set(after) - set(before)
        assert r.vault_bytes_before == sum(before.values())
        assert r.vault_bytes_after == sum(after.values())
        assert r.bytes_deleted == sum(before[k] for k in gone  # (packs, segments: trashed)
                                      if not k.startswith(("packs/", "index/")))
        assert r.bytes_written == sum(after[k] for k in new if not k.startswith("trash/"))
        assert r.bytes_trashed == sum(after[k] for k in new if k.startswith("trash/"))
        assert r.trash_bytes == sum(n for k, n in after.items() if k.startswith("trash/"))
        for k in ("packs_removed", "packs_rewritten", "bytes_freed", "bytes_trashed",
                  "trash_emptied", "bytes_deleted", "bytes_written", "trash_bytes",
                  "dead_kept_bytes"):
            assert getattr(dry, k) == getattr(r, k), (k, dry, r)
        runs.append(r)
    assert runs[0].packs_rewritten > 0 and runs[0].bytes_trashed > 0, runs
    assert r.trash_emptied > 0 and r.bytes_deleted > 0, r  # (the second run emptied it)
    vault.restore(point, tmp_path / "r", workers=1)
    assert_same_bytes(tmp_path / "r" / "d.img", truth)


def test_max_unused_zero_settles_on_compressible_packs(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Highly compressible blocks (a pack holds hundreds): --max-unused 0 rewrites once,
    then has nothing to do (issue 15's gc rewrote an all-live pack on every run)."""
    monkeypatch.setattr(backup_mod, "TARGET_PACK_SIZE", MIB)
    disk = tmp_path / "d.img"
    disk.write_bytes(b"".join((f"block {i} " * 8000).encode()[:BS] for i in range(512)))
    vault = Vault.init(tmp_path / "v")
    first = vault.backup("vm", [f"d={disk}"], block_size=BS, workers=1).id
    for i in range(0, 512, 3):
        write_at(disk, i * BS, (f"new {i} " * 10000).encode()[:BS])
    point = vault.backup("vm", [f"d={disk}"], block_size=BS, workers=1).id
    prune(vault, PruneRequest(keep=lambda pts: {p.id: [] if p.id == first else ["kept"]
                                                for p in pts},
                              expired=lambda _vm, _created: False))
    assert len(pack_files(tmp_path / "v")) < 5  # (hundreds of blocks a pack)
    first_run = gc(vault, grace=0.0, max_unused=0.0)
    assert first_run.packs_rewritten + first_run.packs_removed > 0, first_run
    for _ in range(2):
        time.sleep(0.05)
        again = gc(vault, grace=0.0, max_unused=0.0)
        assert again.packs_rewritten == again.packs_removed == again.dead_kept_bytes == 0
        assert again.bytes_written == 0, again
    vault.restore(point, tmp_path / "r", workers=1)
    assert (tmp_path / "r" / "d.img").read_bytes() == disk.read_bytes()

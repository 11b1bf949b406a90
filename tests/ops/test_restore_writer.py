"""Restore's writer thread: each worker's runs are checked and written on a thread of
their own while the worker opens and decompresses the next pack.

Truth: the disk's own bytes (a copy kept at backup time), and which thread called
``pwritev``.  The writer is slowed down (a sleep before each run) to make the worker
run ahead of it: an encrypted vault's scratch buffers must not be reused under a run
that is not written yet.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from helpers import KIB, MIB
from helpers.images import fs_image, keep_copy, read
from helpers.vaults import PASSWORD, fast_kdf, file_tree

import cbt as cbt_api
import cbt.ops.backup as backup_mod
import cbt.ops.restore as restore_mod
from cbt.ops.restore import DamagedPointError, _Writer

BS = 16 * KIB


def _vault(tmp_path: Path, encrypted: bool, monkeypatch: pytest.MonkeyPatch
           ) -> tuple[cbt_api.Vault, str, Path]:
    """A vault holding one 6 MiB disk in many small packs (so a worker has many jobs)."""
    monkeypatch.setattr(backup_mod, "TARGET_PACK_SIZE", 128 * KIB)
    disk = fs_image(tmp_path / "os.img", 6 * MIB, 21)
    v = (cbt_api.Vault.init(tmp_path / "v", encryption="aes-256-gcm", passphrase=PASSWORD,
                            kdf=fast_kdf()) if encrypted else cbt_api.Vault.init(tmp_path / "v"))
    point = v.backup("vm", [disk], block_size=BS, workers=1).id
    return v, point, keep_copy(disk, tmp_path / "os.copy")


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_runs_are_written_by_the_writer_thread_exactly(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, encrypted: bool) -> None:
    v, point, truth = _vault(tmp_path, encrypted, monkeypatch)
    packs = sum(1 for _ in (tmp_path / "v").rglob("*.pack"))
    assert packs >= 8
    writers: list[str] = []
    real_pwritev, real_write = os.pwritev, restore_mod._check_and_write

    def pwritev(fd: int, buffers: list[bytes], offset: int) -> int:
        writers.append(threading.current_thread().name)
        return real_pwritev(fd, buffers, offset)

    def slow(*args: object) -> None:
        time.sleep(0.005)  # the worker opens the next packs meanwhile
        real_write(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "pwritev", pwritev)
    monkeypatch.setattr(restore_mod, "_check_and_write", slow)
    out = tmp_path / "out"
    monkeypatch.setattr(restore_mod, "ISOLATE", False)  # (one worker: in this process)
    r = v.restore(point, out, workers=1)
    assert read(out / "os.img").tobytes() == read(truth).tobytes()
    assert writers and set(writers) == {"cbt-restore-write"}
    assert r.disks[0].blocks_verified > 0


def test_writer_raises_the_first_error_and_drops_the_rest() -> None:
    done: list[int] = []
    w = _Writer(restore_mod.Writeback())
    try:
        w.put(lambda: done.append(1))

        def fail() -> None:
            raise DamagedPointError("point p disk d block 7 pack k: content does not match")

        ticket = w.put(fail)
        w.put(lambda: done.append(3))  # (after the error: never run)
        with pytest.raises(DamagedPointError, match="block 7"):
            w.wait(ticket)
        with pytest.raises(DamagedPointError, match="block 7"):
            w.put(lambda: done.append(4))
        with pytest.raises(DamagedPointError, match="block 7"):
            w.close()
        assert done == [1]
        w.close(abort=True)  # (closed: nothing more)
    finally:
        w.writeback.close()


def test_a_block_that_fails_on_the_writer_leaves_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run the writer finds damaged fails the restore, naming the block, and no
    temporary file is left (the worker stops at its next hand-over)."""
    v, point, _ = _vault(tmp_path, False, monkeypatch)
    real = restore_mod._check_and_write
    calls = [0]

    def damaging(fd: int, bs: int, wb: object, key: object, where: str,
                 views: list[bytes], *rest: object) -> None:
        calls[0] += 1
        if calls[0] == 3:
            views = [b"\x01" * len(views[0]), *views[1:]]
            rest = (rest[0], rest[1], rest[2], [False] * len(views))  # hash them all
        real(fd, bs, wb, key, where, views, *rest)  # type: ignore[arg-type]

    monkeypatch.setattr(restore_mod, "_check_and_write", damaging)
    out = tmp_path / "out"
    with pytest.raises(DamagedPointError, match=r"^point \S+ disk os block \d+ pack \w+: "
                                                "content does not match its digest"):
        v.restore(point, out, workers=1)
    assert file_tree(out) == {}


def test_a_disk_is_planned_in_the_order_of_its_blocks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The jobs of a disk go pack by pack in the order of each pack's first block on the
    disk, not of the pack's number in the index (a paged segment numbers packs in digest
    order): a worker's share is then one stretch of the disk, written front to back.
    Truth: where each pack's blocks lie, from the jobs themselves."""
    from cbt.ops.restore import plan_disk

    v, point, _ = _vault(tmp_path, False, monkeypatch)
    index = v.load_index()
    record = v.point(point)
    manifest = v.resolve(record, record.disks[0].label)
    jobs = plan_disk(v.spec(), index, point, record.disks[0].label, manifest, "/dev/null")
    packs = list(dict.fromkeys(j.pack for j in jobs))
    assert len(packs) >= 8
    first = [min(int(j.blocks.min()) for j in jobs if j.pack == p) for p in packs]
    assert first == sorted(first)
    assert [j.pack for j in jobs] == sorted((j.pack for j in jobs), key=packs.index)


class _Capture:
    """A stand-in writer that keeps what each run would write (no thread, no disk)."""

    def __init__(self) -> None:
        self.runs: list[tuple[list[int], list[bytes], list[bytes], list[str], list[bool]]] = []
        self.writeback = None

    def put(self, task: object) -> int:
        assert task.func is restore_mod._each  # type: ignore[attr-defined]
        for run in task.args[0]:  # type: ignore[attr-defined]  # (the runs handed over at once)
            views, blocks, digests, packs, checked = run.args[5:]
            self.runs.append((list(blocks), [bytes(v) for v in views],
                              [bytes(d) for d in digests], list(packs), list(checked)))
        return len(self.runs)


def _reference_runs(jobs: list[tuple[list[int], list[bytes], list[bool], str]]
                    ) -> list[tuple[list[int], list[bytes], list[bytes], list[str], list[bool]]]:
    """The runs cut block by block: a new run where a block does not follow the last one,
    or once the run holds RUN_BYTES (what restore did before add_many)."""
    runs: list[tuple[list[int], list[bytes], list[bytes], list[str], list[bool]]] = []
    cur: tuple[list[int], list[bytes], list[bytes], list[str], list[bool]] | None = None
    used = 0
    for blocks, views, checked, pack in jobs:
        for b, v, c in zip(blocks, views, checked, strict=True):
            if cur is not None and (b != cur[0][-1] + 1 or used >= restore_mod.RUN_BYTES):
                runs.append(cur)
                cur, used = None, 0
            if cur is None:
                cur = ([], [], [], [], [])
            cur[0].append(b)
            cur[1].append(v)
            cur[2].append(_digest(b))
            cur[3].append(pack)
            cur[4].append(c)
            used += len(v)
    if cur is not None:
        runs.append(cur)
    return runs


def _digest(block: int) -> bytes:
    return block.to_bytes(32, "little")


@pytest.mark.parametrize("seed", range(8))
def test_a_jobs_blocks_are_cut_into_the_runs_block_by_block_queuing_makes(seed: int) -> None:
    """add_many cuts a job's blocks with one search per run: the runs (blocks, bytes,
    digests, packs, checked flags) are exactly those of a block-by-block reference, across
    jobs that continue a run, gaps, short last blocks and blocks of any size."""
    import numpy as np

    rng = np.random.default_rng(seed)
    jobs = []
    nxt = 0
    for j in range(int(rng.integers(1, 6))):
        n = int(rng.integers(0, 400))
        blocks = []
        for _ in range(n):
            nxt += 1 if rng.random() < 0.9 else int(rng.integers(2, 50))
            blocks.append(nxt)
        sizes = [1, 4096, 16384, 65536, 300000]
        one = int(rng.choice(sizes[1:4]))  # (a job of one size fills a run exactly)
        views = [bytes([b % 251]) * (one if j % 2 else int(rng.choice(sizes))) for b in blocks]
        checked = [bool(x) for x in rng.random(n) < 0.5]
        jobs.append((blocks, views, checked, f"pack{j}"))
    cap = _Capture()
    run = restore_mod._Run.__new__(restore_mod._Run)
    run.__init__(0, _JobStub(), cap)  # type: ignore[misc, arg-type]
    for blocks, views, checked, pack in jobs:
        digests = np.frombuffer(b"".join(_digest(b) for b in blocks), np.uint8).reshape(-1, 32)
        run.add_many(blocks, digests, views, pack, checked)
    run.flush()
    assert cap.runs == _reference_runs(jobs)


class _JobStub:
    point, label, block_size = "p", "d", BS

"""Multi-day backup cycles: every point restores bit for bit to the disk as it was that day.

Each day the disks change the way real ones do (``cbt.synth.mutate``): scattered
4 KiB page writes (a database), longer runs, zero-filled regions, punched holes,
appends that grow a disk and a rewrite that shrinks it; a disk is added on day 3,
removed on day 4 and comes back on day 5.  A sparse copy of every disk is kept
for every day.  Truth: numpy compares of consecutive copies (``changed_blocks``)
and BLAKE3 of every block (what the vault must newly hold, ``bytes_new``).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import KIB, MIB
from helpers.images import assert_same_disk, fs_image, keep_copy, read
from helpers.packs import pack_files, walk_pack
from helpers.system import need, need_root_tools
from helpers.truth import block_digests, nblocks, truth_changed

import cbt
from cbt.source.synth import make_db_file, mutate


def _day_changes(day: int, disks: Path, fill_at: dict[str, int]) -> list[str]:
    """Apply day ``day``'s changes; returns the labels of the disks backed up that day."""
    os_img, db_img, logs_img = disks / "os.img", disks / "db.img", disks / "logs.img"
    if day == 0:
        fs_image(os_img, 6 * MIB, 11)
        make_db_file(db_img, 3 * MIB, seed=12)
        return ["os", "db"]
    if day == 1:  # file-system runs, a zeroed region and a punched hole; database pages
        ch = mutate(os_img, seed=101, page_writes=0, runs=3, run_length=384 * KIB,
                    zero_runs=1, holes=1)
        fill_at["os"] = next(c.offset for c in ch if c.kind == "hole punch")
        mutate(db_img, seed=102, page_writes=150, runs=0, zero_runs=0, holes=0)
        return ["os", "db"]
    if day == 2:  # the os disk grows by an unaligned append; db: pages, zeros, a hole
        mutate(os_img, seed=201, page_writes=20, runs=0, zero_runs=0, holes=0,
               resize=MIB + 12345)
        mutate(db_img, seed=202, page_writes=200, runs=0, zero_runs=1, holes=1)
        return ["os", "db"]
    if day == 3:  # a rewrite that shrinks os; db unchanged; a new disk appears
        mutate(os_img, seed=301, page_writes=0, runs=2, run_length=256 * KIB,
               zero_runs=0, holes=0, resize=-(2 * MIB + 777))
        fs_image(logs_img, 2 * MIB + 4097, 13)
        return ["os", "db", "logs"]
    if day == 4:  # db is removed; the hole punched on day 1 fills with data again
        with open(os_img, "r+b") as f:
            f.seek(fill_at["os"])
            f.write(np.random.default_rng(401).integers(1, 256, 512 * KIB,
                                                        dtype=np.uint8).tobytes())
        mutate(logs_img, seed=402, page_writes=40, runs=1, run_length=128 * KIB,
               zero_runs=0, holes=0)
        return ["os", "logs"]
    if day == 5:  # db comes back (a new baseline); logs grows by one byte; os unchanged
        mutate(db_img, seed=501, page_writes=30, runs=0, zero_runs=0, holes=0)
        mutate(logs_img, seed=502, page_writes=0, runs=0, zero_runs=0, holes=0, resize=1)
        return ["os", "db", "logs"]
    raise AssertionError(day)


@pytest.mark.slow
@pytest.mark.parametrize("bs", [4 * KIB, 64 * KIB], ids=["4K", "64K"])
def test_daily_cycle_every_point_restores(tmp_path: Path, bs: int) -> None:
    disks = tmp_path / "disks"
    disks.mkdir()
    copies = tmp_path / "copies"
    copies.mkdir()
    vault = cbt.Vault.init(tmp_path / "vault")
    fill_at: dict[str, int] = {}
    stored: dict[bytes, int] = {}  # what the vault holds: digest -> raw length
    previous: dict[str, Path] = {}  # label -> copy of the disk at its last point
    history: list[tuple[str, dict[str, Path]]] = []
    for day in range(6):
        labels = _day_changes(day, disks, fill_at)
        point = vault.backup("web", [f"{lb}={disks / lb}.img" for lb in labels],
                             block_size=bs)
        today = {}
        for lb in labels:
            today[lb] = keep_copy(disks / f"{lb}.img", copies / f"{lb}.day{day}.img")
        assert [d.label for d in point.disks] == labels
        assert point.vm == "web" and point.id.startswith("web.")
        # what the vault must newly hold: distinct non-zero blocks it did not have
        new: dict[bytes, int] = {}
        for d in point.disks:
            data = read(today[d.label])
            assert d.size == len(data)
            assert d.block_size == bs, "a disk keeps the block size of its first backup"
            assert d.blocks == nblocks(len(data), bs)
            before = previous.get(d.label)
            if before is None or (history and d.label not in history[-1][1]):
                expected = d.blocks  # first backup of this disk (or it came back)
            else:
                expected = truth_changed(read(before), data, bs)
            assert d.changed_blocks == expected, (day, d.label)
            assert d.bytes_stored <= d.bytes_new
            for dig, raw in block_digests(data, bs).items():
                if dig not in stored:
                    new[dig] = raw
        assert point.bytes_new == sum(new.values()), day
        assert sum(d.bytes_new for d in point.disks) == point.bytes_new
        assert sum(d.bytes_stored for d in point.disks) == point.bytes_stored
        stored.update(new)
        previous.update(today)
        history.append((point.id, today))

    assert [p.id for p in vault.points("web")] == [pid for pid, _ in history]
    # every point, not only the latest, restores bit-identical, holes as holes
    for i, (pid, copies_then) in enumerate(history):
        out = tmp_path / f"restore{i}"
        result = vault.restore(pid, out)
        assert {d.label for d in result.disks} == set(copies_then)
        for lb, copy in copies_then.items():
            assert_same_disk(out / f"{lb}.img", copy, bs)
    report = vault.verify(data=True)
    assert report["problems"] == []
    assert report["unreferenced_bytes"] == 0
    # the packs hold exactly the distinct non-zero blocks, never a zero block
    held = {b.digest: b.raw for p in pack_files(Path(vault.root)) for b in walk_pack(p)}
    assert held == stored


def test_empty_and_tiny_disks_grow_and_shrink(tmp_path: Path) -> None:
    bs = 4 * KIB
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    vault = cbt.Vault.init(tmp_path / "vault")
    states = [  # (content of a, content of b) per day; None = sparse 70000 bytes
        (b"", b"xyz"),
        (None, b""),
        (None, b"\x00" * 5000 + b"q"),
        (b"", b"\x00" * 5001),
    ]
    history = []
    previous: dict[str, np.ndarray] = {}
    for day, (ca, cb) in enumerate(states):
        if ca is None:
            with open(a, "wb") as f:
                f.truncate(70000)
                f.seek(65536 + 100)
                f.write(b"tail data")
        else:
            a.write_bytes(ca)
        b.write_bytes(cb)
        point = vault.backup("vm", [a, b], block_size=bs)
        copies = {lb: keep_copy(tmp_path / f"{lb}.img", tmp_path / f"{lb}.{day}.img")
                  for lb in ("a", "b")}
        for d in point.disks:
            data = read(copies[d.label])
            assert d.size == len(data) and d.blocks == nblocks(len(data), bs)
            want = d.blocks if day == 0 else truth_changed(previous[d.label], data, bs)
            assert d.changed_blocks == want, (day, d.label)
            previous[d.label] = data
        history.append((point.id, copies))
    for i, (pid, copies) in enumerate(history):
        vault.restore(pid, tmp_path / f"out{i}")
        for lb, copy in copies.items():
            assert_same_disk(tmp_path / f"out{i}" / f"{lb}.img", copy, bs)
    assert vault.verify(data=True)["problems"] == []


def test_a_block_device_disk(tmp_path: Path) -> None:
    """A loop device as the disk: read through the device, restored to an image file."""
    need_root_tools("losetup")
    bs = 16 * KIB
    backing = tmp_path / "backing.img"
    fs_image(backing, 4 * MIB, 21)
    attach = subprocess.run(["losetup", "--find", "--show", str(backing)],
                            capture_output=True, text=True, check=False)
    need(attach.returncode == 0, f"losetup cannot attach a loop device: {attach.stderr.strip()}")
    dev = attach.stdout.strip()
    try:
        vault = cbt.Vault.init(tmp_path / "vault")
        history = []
        for day in range(3):
            if day:
                fd = os.open(dev, os.O_WRONLY)
                try:
                    rng = np.random.default_rng(day)
                    for _ in range(20):
                        off = int(rng.integers(0, 4 * MIB - 10000))
                        os.pwrite(fd, rng.integers(0, 256, 5000, np.uint8).tobytes(), off)
                    os.pwrite(fd, bytes(64 * KIB), MIB)  # a zeroed region
                    os.fsync(fd)
                finally:
                    os.close(fd)
            copy = tmp_path / f"day{day}.img"
            with open(dev, "rb") as f:
                copy.write_bytes(f.read())
            point = vault.backup("vm", [dev], block_size=bs)
            d = point.disks[0]
            assert d.label == Path(dev).name and d.size == 4 * MIB
            if history:
                assert d.changed_blocks == truth_changed(read(history[-1][1]), read(copy), bs)
            history.append((point.id, copy))
        for i, (pid, copy) in enumerate(history):
            vault.restore(pid, tmp_path / f"out{i}")
            assert_same_disk(tmp_path / f"out{i}" / f"{Path(dev).name}.img", copy, bs)
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


@pytest.mark.parametrize("pool", ["forked", "threads", "fork processes", "spawn processes"])
def test_backup_on_any_executor(tmp_path: Path, pool: str) -> None:
    """The same two points on forked workers or any Executor.  A spawned process shares
    nothing with this one: its workers open the vault from the storage's spec and load
    the index themselves, so the second point stores only the day's new blocks."""
    import multiprocessing
    from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor

    from cbt.core.native import fast

    FLAG_DATA = fast.FLAG_DATA

    bs = 16 * KIB
    disks = {"os": tmp_path / "os.img", "db": tmp_path / "db.img"}
    make_db_file(disks["db"], 3 * MIB, seed=5)
    os_data = np.random.default_rng(6).integers(0, 256, 5 * MIB + 77, np.uint8)
    os_data[MIB:2 * MIB] = 0
    os_data.tofile(disks["os"])
    vault = cbt.Vault.init(tmp_path / "vault")
    executor: Executor | None = None
    if pool == "threads":
        executor = ThreadPoolExecutor(2)
    elif pool.endswith("processes"):
        executor = ProcessPoolExecutor(
            2, mp_context=multiprocessing.get_context(pool.split()[0]))
    try:
        stored: dict[bytes, int] = {}
        for day in range(2):
            if day:
                mutate(disks["db"], seed=7, page_writes=40, holes=0)
            want = {lb: block_digests(read(p), bs) for lb, p in disks.items()}
            point = vault.backup("vm", [f"{lb}={p}" for lb, p in disks.items()],
                                 block_size=bs, workers=2, executor=executor)
            new = {d: n for blocks in want.values() for d, n in blocks.items()
                   if d not in stored}
            assert point.bytes_new == sum(new.values()), (day, pool)
            stored.update(new)
            for d in point.disks:
                m = vault.resolve(point, d.label)
                data_rows = np.flatnonzero(m.flags == FLAG_DATA)
                assert {m.digests[i].tobytes() for i in data_rows} == set(want[d.label])
    finally:
        if executor is not None:
            executor.shutdown()
    assert vault.verify(data=True)["problems"] == []


def test_fork_pool_processes_reuse_the_runs_loaded_index(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pool processes forked from the backup's process find the index it loaded; they
    do not load it again (on a large vault that is seconds per process)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from cbt.repo import index as index_mod

    disk = tmp_path / "os.img"
    disk.write_bytes(np.random.default_rng(8).integers(0, 256, 3 * MIB, np.uint8).tobytes())
    vault = cbt.Vault.init(tmp_path / "vault")
    vault.backup("vm", [disk], block_size=16 * KIB, workers=2)
    loads = tmp_path / "loads"
    real_load = index_mod.load

    def counting_load(*args: Any, **kwargs: Any) -> index_mod.Index:
        with open(loads, "a") as f:  # inherited by the forked pool processes
            f.write(f"{os.getpid()}\n")
        return real_load(*args, **kwargs)

    monkeypatch.setattr(index_mod, "load", counting_load)
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as pool:
        point = vault.backup("vm", [disk], block_size=16 * KIB, workers=2, executor=pool)
    assert point.bytes_new == 0
    assert loads.read_text().split() == [str(os.getpid())]

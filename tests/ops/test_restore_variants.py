"""Restore of one disk: to a new file, to a block device, and in place.

A VM with two disks is backed up on three days (scattered page writes, longer
runs, zeroed regions, punched holes; the os disk then grows and the db disk
shrinks) and a sparse copy of each disk is kept for each day.  Truth is numpy
over those copies; what cbt actually wrote is read back from the kernel:
``SEEK_DATA`` for holes, and ``strace -f`` of the real ``cbt`` process for the
offsets and lengths of every ``pwrite64``, hole punch and ``BLKZEROOUT``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import KIB, MIB
from helpers.cli import cbt, one_error_line
from helpers.images import (
    assert_same_disk,
    fs_image,
    keep_copy,
    read,
    read_device,
    write_at,
)
from helpers.images import copy_disk as copy_file
from helpers.shapes import RESTORE_DISK_KEYS, RESTORE_KEYS
from helpers.strace import strace_cbt, touched_blocks, traced_writes
from helpers.system import loop_device
from helpers.truth import (
    block_len,
    data_block_mask,
    data_bytes,
    differing_blocks,
    nblocks,
    nonzero_blocks,
    runs,
    sha256,
)
from helpers.vaults import temp_files

import cbt as cbt_api
from cbt.source.synth import make_db_file, mutate

BS = 16 * KIB
LABELS = ("os", "db")


@dataclass
class History:
    vault: Path
    points: list[str]
    copies: list[dict[str, Path]]  # per day: label -> sparse copy of the disk that day

    def truth(self, day: int, label: str) -> np.ndarray:
        return read(self.copies[day][label])


@pytest.fixture(scope="module")
def hist(tmp_path_factory: pytest.TempPathFactory) -> History:
    root = tmp_path_factory.mktemp("restore-history")
    disks = root / "disks"
    disks.mkdir()
    fs_image(disks / "os.img", 4 * MIB + 12345, 31)  # a short tail block
    make_db_file(disks / "db.img", 2 * MIB, seed=32)
    vault = cbt_api.Vault.init(root / "vault")
    points, copies = [], []
    for day in range(3):
        if day == 1:
            mutate(disks / "os.img", seed=33, page_writes=30, runs=2, run_length=256 * KIB,
                   zero_runs=1, holes=1)
            mutate(disks / "db.img", seed=34, page_writes=40, runs=0, zero_runs=1, holes=1)
        if day == 2:
            mutate(disks / "os.img", seed=35, page_writes=10, runs=0, zero_runs=0, holes=0,
                   resize=MIB + 4321)
            mutate(disks / "db.img", seed=36, page_writes=10, runs=0, zero_runs=0, holes=0,
                   resize=-300000)
        p = vault.backup("vm", [disks / "os.img", disks / "db.img"], block_size=BS)
        points.append(p.id)
        copies.append({lb: keep_copy(disks / f"{lb}.img", root / f"{lb}.day{day}.img")
                       for lb in LABELS})
    h = History(root / "vault", points, copies)
    # the history means what the tests need it to mean
    os1, os2 = h.truth(1, "os"), h.truth(2, "os")
    assert len(os2) > len(os1) and len(h.truth(2, "db")) < len(h.truth(1, "db"))
    assert len(os1) % BS, "a short tail block"
    for day in range(3):
        for lb in LABELS:
            nz = nonzero_blocks(h.truth(day, lb), BS)
            assert 0 < nz.sum() < len(nz), (day, lb, "needs data and zero blocks")
    assert (~data_block_mask(h.copies[1]["os"], BS)).any(), "needs holes"
    return h


def _restore_json(*args: object) -> dict:
    r = cbt("restore", *args, "--json")
    assert r.returncode == 0, (r.stdout, r.stderr)
    out = json.loads(r.stdout)
    assert set(out) == RESTORE_KEYS
    assert len(out["disks"]) == 1 and set(out["disks"][0]) == RESTORE_DISK_KEYS
    return out


# -- one disk to a new file ---------------------------------------------------------------


@pytest.mark.slow
def test_one_disk_to_a_new_file(hist: History, tmp_path: Path) -> None:
    for day, pid in enumerate(hist.points):
        for lb in LABELS:
            out_dir = tmp_path / f"d{day}{lb}"
            out_dir.mkdir()
            target = out_dir / "restored.raw"
            res = _restore_json(hist.vault, pid, "--disk", lb, "--to", target)
            truth = hist.truth(day, lb)
            d = res["disks"][0]
            assert res["recovery_point"] == pid
            assert d["label"] == lb and d["to"] == str(target) and d["size"] == len(truth)
            assert d["blocks_verified"] == int(nonzero_blocks(truth, BS).sum())
            assert d["bytes_written"] == data_bytes(truth, BS)
            assert os.path.getsize(target) == len(truth)
            assert_same_disk(target, hist.copies[day][lb], BS)  # zero blocks are holes
            # nothing allocated beyond the data blocks (give or take file system metadata)
            nz = int(nonzero_blocks(truth, BS).sum())
            assert os.stat(target).st_blocks * 512 <= nz * BS + 64 * KIB
            assert sorted(p.name for p in out_dir.iterdir()) == ["restored.raw"]


def test_existing_target_needs_force(hist: History, tmp_path: Path) -> None:
    target = tmp_path / "os.raw"
    target.write_bytes(b"an older file")
    r = cbt("restore", hist.vault, hist.points[1], "--disk", "os", "--to", target)
    line = one_error_line(r)
    assert str(target) in line and "--force" in line
    assert target.read_bytes() == b"an older file"
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["os.raw"]
    res = _restore_json(hist.vault, hist.points[1], "--disk", "os", "--to", target, "--force")
    assert res["disks"][0]["size"] == len(hist.truth(1, "os"))
    assert_same_disk(target, hist.copies[1]["os"], BS)
    assert temp_files(tmp_path) == []


@pytest.mark.parametrize("as_json", [False, True])
def test_unknown_label(hist: History, tmp_path: Path, as_json: bool) -> None:
    target = tmp_path / "x.raw"
    args = ["restore", hist.vault, hist.points[0], "--disk", "nope", "--to", target]
    r = cbt(*args, *(["--json"] if as_json else []))
    line = one_error_line(r)
    assert "nope" in line and hist.points[0] in line
    assert not target.exists() and temp_files(tmp_path) == []
    if as_json:
        err = json.loads(r.stdout)
        assert err["type"] == "error" and "nope" in err["message"]


def test_in_place_needs_an_existing_copy(hist: History, tmp_path: Path) -> None:
    target = tmp_path / "missing.raw"
    line = one_error_line(cbt("restore", hist.vault, hist.points[0], "--disk", "os",
                              "--to", target, "--in-place"))
    assert str(target) in line
    assert not target.exists() and temp_files(tmp_path) == []


# -- to a block device ------------------------------------------------------------------------


def _garbage(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(1, 256, n, dtype=np.uint8).tobytes()


def _backing(path: Path, size: int, seed: int | None) -> Path:
    """A device backing file of ``size`` bytes (a multiple of 512): garbage, or zeros."""
    assert size % 512 == 0
    if seed is None:
        with open(path, "wb") as f:
            f.truncate(size)
    else:
        path.write_bytes(_garbage(size, seed))
    return path


def _check_data_writes(writes: list, truth: np.ndarray) -> None:
    """The writes of block data (pwrite or coalesced pwritev runs) cover exactly the DATA
    blocks, each once, on block boundaries."""
    data = [w for w in writes if w.call in ("pwrite64", "pwritev", "pwritev2") and w.length]
    covered: list[int] = []
    for w in data:
        assert w.offset % BS == 0, w
        first, end = w.offset // BS, -(-(w.offset + w.length) // BS)
        covered.extend(range(first, end))
        assert w.length == sum(block_len(len(truth), BS, b) for b in range(first, end)), w
    assert sorted(covered) == np.flatnonzero(nonzero_blocks(truth, BS)).tolist()


def test_to_a_block_device(hist: History, tmp_path: Path) -> None:
    """Every block written: data with pwrite, zero and hole blocks with BLKZEROOUT."""
    truth = hist.truth(1, "os")
    size = len(truth)
    backing = _backing(tmp_path / "dev.img", (size // 512 + 1) * 512 + MIB, seed=41)
    before = read(backing)
    with loop_device(backing) as dev:
        log = tmp_path / "strace.log"
        r = strace_cbt(log, "restore", hist.vault, hist.points[1], "--disk", "os", "--to",
                       dev, "--json")
        assert r.returncode == 0, r.stderr
        d = json.loads(r.stdout)["disks"][0]
        after = read_device(dev)
        writes = traced_writes(log, dev)
        zeroouts = [ln for ln in log.read_text().splitlines()
                    if "BLKZEROOUT" in ln and f"<{dev}>" in ln]
    assert d["to"] == dev and d["size"] == size
    assert d["bytes_written"] == size, "data blocks plus zeroed blocks: the whole disk"
    assert d["blocks_verified"] == int(nonzero_blocks(truth, BS).sum())
    assert np.array_equal(after[:size], truth), "zero and hole blocks must read as zeros"
    assert np.array_equal(after[size:], before[size:]), "bytes past the disk were touched"
    _check_data_writes(writes, truth)
    assert touched_blocks(writes, BS) == set(range(nblocks(size, BS)))
    assert sum(w.length for w in writes) == size, "some block was written twice"
    assert zeroouts, "zero blocks must be zeroed with BLKZEROOUT"
    assert all(w.offset + w.length <= size for w in writes)


def test_to_a_zeroed_block_device(hist: History, tmp_path: Path) -> None:
    """--assume-zeroed: only the data blocks are written."""
    truth = hist.truth(2, "db")
    size = len(truth)
    backing = _backing(tmp_path / "dev.img", (size // 512 + 1) * 512 + MIB, seed=None)
    data = nonzero_blocks(truth, BS)
    # garbage exactly where the disk has data (restore must overwrite it) and past its end
    for first, count in runs(data):
        lo, hi = first * BS, min((first + count) * BS, size)
        write_at(backing, lo, _garbage(hi - lo, first))
    write_at(backing, size, _garbage(os.path.getsize(backing) - size, 7))
    before = read(backing)
    with loop_device(backing) as dev:
        log = tmp_path / "strace.log"
        r = strace_cbt(log, "restore", hist.vault, hist.points[2], "--disk", "db", "--to",
                       dev, "--assume-zeroed", "--json")
        assert r.returncode == 0, r.stderr
        d = json.loads(r.stdout)["disks"][0]
        after = read_device(dev)
        writes = traced_writes(log, dev)
        zeroouts = [ln for ln in log.read_text().splitlines() if "BLKZEROOUT" in ln]
    assert d["bytes_written"] == data_bytes(truth, BS)
    assert np.array_equal(after[:size], truth)
    assert np.array_equal(after[size:], before[size:])
    _check_data_writes(writes, truth)
    assert touched_blocks(writes, BS) == set(np.flatnonzero(data).tolist())
    assert sum(w.length for w in writes) == data_bytes(truth, BS)
    assert zeroouts == [], "--assume-zeroed must not zero anything"


@pytest.mark.parametrize("in_place", [False, True])
def test_device_smaller_than_the_disk(hist: History, tmp_path: Path, in_place: bool) -> None:
    size = len(hist.truth(0, "os"))
    backing = _backing(tmp_path / "dev.img", (size // 512 - 128) * 512, seed=43)
    digest = sha256(backing)
    with loop_device(backing) as dev:
        r = cbt("restore", hist.vault, hist.points[0], "--disk", "os", "--to", dev,
                *(["--in-place"] if in_place else []))
        line = one_error_line(r)
    assert dev in line and str(size) in line, line
    assert sha256(backing) == digest, "a refused restore wrote to the device"


# -- in place -------------------------------------------------------------------------------------


def _damage(path: Path, truth: np.ndarray) -> None:
    """Damage a copy of the disk every way a real one can differ from its backup."""
    from cbt.source.synth import punch_hole

    size = len(truth)
    nz = np.flatnonzero(nonzero_blocks(truth, BS))
    zero = np.flatnonzero(~nonzero_blocks(truth, BS))
    rng = np.random.default_rng(44)
    for b in rng.choice(nz[:-1], 5, replace=False).tolist():  # scribbled over
        write_at(path, b * BS + int(rng.integers(0, BS - 100)), _garbage(100, b))
    write_at(path, int(nz[1]) * BS, bytes(BS))  # a data block zeroed
    fd = os.open(path, os.O_RDWR)
    try:
        punch_hole(fd, int(nz[2]) * BS, BS)  # a data block lost to a hole
    finally:
        os.close(fd)
    write_at(path, int(zero[0]) * BS + 5, b"junk where zeros belong")
    write_at(path, int(zero[-1]) * BS, _garbage(BS, 3) if (int(zero[-1]) + 1) * BS <= size
             else _garbage(size - int(zero[-1]) * BS, 3))
    write_at(path, size, _garbage(3 * BS + 77, 5))  # and it grew past the disk's end


# (start from the copy of day, label; restore point of day)
IN_PLACE = {
    "older-restore": ((0, "os"), 1),
    "grow": ((1, "os"), 2),
    "shrink": ((2, "os"), 1),
    "db-shrink": ((1, "db"), 2),
    "db-grow": ((2, "db"), 0),
    "damaged-original": ((1, "os"), 1),
    "identical": ((2, "db"), 2),
}


@pytest.mark.parametrize("case", list(IN_PLACE))
def test_in_place_rewrites_only_differing_blocks(hist: History, tmp_path: Path,
                                                 case: str) -> None:
    (start_day, lb), day = IN_PLACE[case]
    truth = hist.truth(day, lb)
    target = copy_file(hist.copies[start_day][lb], tmp_path / "copy.img")
    if case == "damaged-original":
        _damage(target, truth)
    old = read(target)
    differs = differing_blocks(old, truth, BS)
    expect_bytes = sum(block_len(len(truth), BS, int(i)) for i in np.flatnonzero(differs))
    made_zero = differs & ~nonzero_blocks(truth, BS)
    if case == "identical":
        assert not differs.any()
    else:
        assert differs.any() and not differs.all()
    if case in ("older-restore", "damaged-original"):
        assert made_zero.any(), "the case should also need blocks made zero"
    log = tmp_path / "strace.log"
    r = strace_cbt(log, "restore", hist.vault, hist.points[day], "--disk", lb, "--to", target,
                   "--in-place", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)["disks"][0]
    assert d["size"] == len(truth) and d["to"] == str(target)
    assert d["bytes_written"] == expect_bytes
    assert os.path.getsize(target) == len(truth)
    assert np.array_equal(read(target), truth)
    writes = traced_writes(log, target)
    assert touched_blocks(writes, BS) == set(np.flatnonzero(differs).tolist()), \
        "written blocks are not exactly the differing ones"
    assert sum(w.length for w in writes) == expect_bytes
    for w in writes:
        assert w.offset % BS == 0, w
    # blocks that had to become zero were punched (they are holes now), and only those
    assert not (made_zero & data_block_mask(target, BS)).any()
    punched = touched_blocks([w for w in writes if w.call == "fallocate"], BS)
    assert punched == set(np.flatnonzero(made_zero).tolist())
    assert temp_files(tmp_path) == []


@pytest.mark.slow
def test_in_place_onto_a_block_device(hist: History, tmp_path: Path) -> None:
    """An older restore on a device, brought forward (grow) then back (shrink) in place."""
    sizes = [len(hist.truth(d, "os")) for d in range(3)]
    backing = _backing(tmp_path / "dev.img", (max(sizes) // 512 + 1) * 512 + MIB, seed=45)
    write_at(backing, 0, hist.truth(0, "os").tobytes())  # the older restore
    with loop_device(backing) as dev:
        for step, day in enumerate((2, 1)):
            truth = hist.truth(day, "os")
            size = len(truth)
            before = read_device(dev)
            differs = differing_blocks(before[:size], truth, BS)
            expect = sum(block_len(size, BS, int(i)) for i in np.flatnonzero(differs))
            assert differs.any() and (differs & ~nonzero_blocks(truth, BS)).any()
            log = tmp_path / f"strace{step}.log"
            r = strace_cbt(log, "restore", hist.vault, hist.points[day], "--disk", "os",
                           "--to", dev, "--in-place", "--json")
            assert r.returncode == 0, r.stderr
            d = json.loads(r.stdout)["disks"][0]
            after = read_device(dev)
            writes = traced_writes(log, dev)
            assert d["bytes_written"] == expect, (day, d)
            assert np.array_equal(after[:size], truth), day
            assert np.array_equal(after[size:], before[size:]), "bytes past the disk touched"
            assert touched_blocks(writes, BS) == set(np.flatnonzero(differs).tolist()), day
            assert sum(w.length for w in writes) == expect


def test_whole_point_in_place_into_a_directory(hist: History, tmp_path: Path) -> None:
    """Without --disk, --in-place rewrites DIR/LABEL.img of every disk."""
    out = tmp_path / "out"
    out.mkdir()
    for lb in LABELS:
        copy_file(hist.copies[0][lb], out / f"{lb}.img")
    old = {lb: read(out / f"{lb}.img") for lb in LABELS}
    r = cbt("restore", hist.vault, hist.points[2], "--to", out, "--in-place", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert sorted(d["label"] for d in res["disks"]) == sorted(LABELS)
    for d in res["disks"]:
        truth = hist.truth(2, d["label"])
        differs = differing_blocks(old[d["label"]], truth, BS)
        assert d["bytes_written"] == sum(block_len(len(truth), BS, int(i))
                                         for i in np.flatnonzero(differs)), d
        assert np.array_equal(read(out / f"{d['label']}.img"), truth)
    assert sorted(p.name for p in out.iterdir()) == ["db.img", "os.img"]


def test_api_restore_returns_what_the_cli_prints(hist: History, tmp_path: Path) -> None:
    """``Vault.restore`` returns a RestoreResult; its ``to_dict()`` is ``--json``'s shape
    and values (the timing aside), and its fields are what was written."""
    from cbt.ops.restore import RestoredDisk, RestoreResult

    res = cbt_api.Vault.open(hist.vault).restore(hist.points[1], tmp_path / "api", workers=2)
    assert isinstance(res, RestoreResult) and all(isinstance(d, RestoredDisk) for d in res.disks)
    r = cbt("restore", hist.vault, hist.points[1], "--to", tmp_path / "cli", "--json")
    assert r.returncode == 0, r.stderr
    cli = json.loads(r.stdout)
    api = res.to_dict()
    assert json.loads(json.dumps(api)) == api  # plain JSON values
    assert set(api) == RESTORE_KEYS and all(set(d) == RESTORE_DISK_KEYS for d in api["disks"])
    for d in api["disks"] + cli["disks"]:
        d["to"] = Path(d["to"]).name
    del api["seconds"], cli["seconds"]
    assert api == cli
    for d in res.disks:
        truth = hist.truth(1, d.label)
        assert (d.size, d.bytes_written) == (len(truth), data_bytes(truth, BS))
        assert d.source is None
        assert np.array_equal(read(tmp_path / "api" / f"{d.label}.img"), truth)


def _pack_jobs(target: str, blocks_per_pack: list[int], bs: int = 16 * 1024) -> list[Any]:
    from cbt.ops.restore import _Job
    from cbt.repo.storage import StorageSpec

    jobs, first = [], 0
    for k, count in enumerate(blocks_per_pack):
        blocks = np.arange(first, first + count, dtype=np.uint64)
        first += count
        jobs.append(_Job(StorageSpec("local", "vault"), "p", target, target, bs,
                         f"{target}-{k}", blocks,
                         np.zeros((count, 32), np.uint8), np.zeros(count, np.uint64),
                         np.full(count, 100, np.uint64), first * bs))
    return jobs


@pytest.mark.parametrize("sizes", [[160, 90], [200, 200], [300], [50, 40, 30, 20, 10]])
def test_restore_work_shared_out_evenly_files_split_least(sizes: list[int]) -> None:
    """Two workers: every pack job exactly once; loads within one pack of equal; a file
    that fits in a worker's share goes to one worker whole; at most one file is split
    per worker beyond its share."""
    from cbt.ops.restore import _balance

    jobs = [j for t, n in enumerate(sizes) for j in _pack_jobs(f"d{t}", [10] * n)]
    groups = _balance(jobs, 2)
    assert sorted(id(j) for g in groups for j in g) == sorted(id(j) for j in jobs)
    loads = [sum(len(j.blocks) for j in g) for g in groups]
    assert abs(loads[0] - loads[1]) <= 10 + sum(sizes) * 10 // 32, loads
    holders = {t: {k for k, g in enumerate(groups) if any(j.target == t for j in g)}
               for t in {j.target for j in jobs}}
    share = sum(sizes) * 10 / 2
    for t, n in enumerate(sizes):
        if n * 10 <= share and len(sizes) <= 2:
            assert len(holders[f"d{t}"]) == 1, (sizes, holders)
    assert sum(len(h) > 1 for h in holders.values()) <= 1, holders


def test_restore_split_target_fills_workers_evenly() -> None:
    """One disk poured into three workers: a small pack must not push a worker past its
    share so that another gets nothing."""
    from cbt.ops.restore import _balance

    jobs = _pack_jobs("d0", [100, 2, 100, 100])
    loads = sorted(sum(len(j.blocks) for j in g) for g in _balance(jobs, 3))
    assert loads == [100, 100, 102]

"""Review of issue 12 part B: random backup chains of thin disks never miss a change.

Each seeded case builds a small disk (4 KiB to 1 MiB, 4 KiB blocks, a tail shorter
than a block now and then) and mutates it between backups: grown, shrunk, holes
punched (``fallocate`` PUNCH_HOLE), holes filled with data or with zeros, the disk
going all-hole, a dense disk becoming thin and back.  After each backup every point
so far is restored and compared with numpy against the copy kept of the disk at that
point (every third case on an encrypted vault); ``diff`` of each consecutive pair of
points is compared with a truth computed by numpy from the two copies (a hole reads
as zeros: equal to a zero block).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import itertools
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from helpers.vaults import PASSWORD, fast_kdf

import cbt

BS = 4096
CASES = 200
PER_TEST = 25

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
PUNCH = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE


def _punch(path: Path, off: int, length: int) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        if _libc.fallocate(fd, PUNCH, off, length) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
    finally:
        os.close(fd)


def _write(path: Path, off: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(data)


def _mutate(rng: random.Random, path: Path) -> str:
    size = path.stat().st_size
    op = rng.choice(["grow", "shrink", "punch", "data", "zeros", "allhole", "dense", "tail",
                     "none"])
    if op == "grow":
        new = size + rng.choice([1, BS - 1, BS, 3 * BS + 17, rng.randrange(1, 64 * BS)])
        os.truncate(path, min(new, 1 << 20))
    elif op == "shrink" and size:
        os.truncate(path, rng.randrange(0, size))
    elif op == "tail":  # a size that is no multiple of the block size, data at the end
        new = max(1, size - size % BS + rng.randrange(1, BS))
        os.truncate(path, new)
        _write(path, max(0, new - 5), rng.randbytes(min(5, new)))
    elif op == "allhole" and size:
        _punch(path, 0, size)
    elif op == "dense" and size:
        _write(path, 0, rng.randbytes(size))
    elif op in ("punch", "data", "zeros") and size:
        for _ in range(rng.randrange(1, 6)):
            off = rng.randrange(0, size)
            n = min(size - off, rng.choice([1, 100, BS, 2 * BS + 3, rng.randrange(1, 16 * BS)]))
            if op == "punch":
                _punch(path, off, n)
            elif op == "data":
                _write(path, off, rng.randbytes(n))
            else:
                _write(path, off, bytes(n))
    return op


def _changed_truth(a: np.ndarray, b: np.ndarray) -> tuple[int, list[list[int]]]:
    """Changed blocks and merged byte ranges, by the documented rules: blocks both
    disks have whole (or the same size: all) compare by content; every block from
    the shorter disk's last whole block on is changed."""
    sa, sb = len(a), len(b)
    total = max(sa, sb)
    n = -(-total // BS)
    common = -(-sa // BS) if sa == sb else min(sa, sb) // BS
    changed = np.ones(n, dtype=bool)
    if common:
        pa = np.zeros(common * BS, np.uint8)
        pb = np.zeros(common * BS, np.uint8)
        pa[:min(sa, common * BS)] = a[:common * BS]
        pb[:min(sb, common * BS)] = b[:common * BS]
        changed[:common] = (pa.reshape(common, BS) != pb.reshape(common, BS)).any(axis=1)
    ranges: list[list[int]] = []
    for i in np.nonzero(changed)[0].tolist():
        start, end = i * BS, min((i + 1) * BS, total)
        if ranges and ranges[-1][0] + ranges[-1][1] == start:
            ranges[-1][1] += end - start
        else:
            ranges.append([start, end - start])
    return int(changed.sum()), ranges


def _one_case(seed: int, root: Path) -> None:
    rng = random.Random(seed)
    root.mkdir()
    disk = root / "disk.img"
    size = rng.choice([BS, 1, BS + 1, 37 * BS, rng.randrange(1, 1 << 20), 1 << 20])
    with open(disk, "wb") as f:
        f.truncate(size)
    if rng.random() < 0.5:
        _write(disk, 0, rng.randbytes(size))
    encrypted = seed % 3 == 2  # every third case on an encrypted vault
    vault = (cbt.Vault.init(root / "vault", encryption="aes-256-gcm", passphrase=PASSWORD,
                            kdf=fast_kdf()) if encrypted else cbt.Vault.init(root / "vault"))
    kept: list[tuple[str, np.ndarray]] = []
    ops = []
    for step in range(rng.randrange(2, 6)):
        if step:
            ops.append(_mutate(rng, disk))
        point = vault.backup("vm", [f"d={disk}"], block_size=BS, workers=1,
                             created=f"2024-01-01T00:00:{step:02d}Z")
        kept.append((point.id, np.fromfile(disk, dtype=np.uint8)))
        for pid, truth in kept:
            out = root / f"r-{pid}.img"
            vault.restore(pid, out, disk="d", workers=1, force=True)
            got = np.fromfile(out, dtype=np.uint8)
            assert len(got) == len(truth) and np.array_equal(got, truth), (seed, ops, pid)
            out.unlink()
        # in place onto the disk as it is now (other data, holes, size): the latest point
        # written over each older one's restore, and each older one over the disk
        for pid, truth in kept:
            target = root / "inplace.img"
            shutil.copyfile(disk, target)
            vault.restore(pid, target, disk="d", workers=1, in_place=True)
            got = np.fromfile(target, dtype=np.uint8)
            assert len(got) == len(truth) and np.array_equal(got, truth), (seed, ops, pid)
            target.unlink()
    for (ia, a), (ib, b) in itertools.pairwise(kept):
        cs = cbt.diff(f"{root / 'vault'}::{ia}/d", f"{root / 'vault'}::{ib}/d",
                      passphrase=PASSWORD if encrypted else None)
        assert isinstance(cs, cbt.ChangeSet)
        want_n, want_ranges = _changed_truth(a, b)
        assert (cs.changed_blocks, cs.ranges.tolist()) == (want_n, want_ranges), (seed, ops)
    assert vault.verify(data=True).problems == [], (seed, ops)


@pytest.mark.parametrize("chunk", range(CASES // PER_TEST))
def test_random_thin_chains_restore_bit_for_bit_and_diff_as_numpy(chunk: int,
                                                                   tmp_path: Path) -> None:
    for seed in range(chunk * PER_TEST, (chunk + 1) * PER_TEST):
        _one_case(seed, tmp_path / f"case{seed}")


FIXTURE = Path(__file__).parent.parent / "fixtures"


def test_the_format1_fixture_extended_with_thin_disks(tmp_path: Path) -> None:
    """The committed format-1 vault takes thin points (format-2 manifests) of a new VM and a
    fixture disk gone thin on its own chain; every old and new point restores as it was."""
    import hashlib
    import json
    import shutil

    shutil.copytree(FIXTURE / "vault-format1", tmp_path / "vault")
    vault = cbt.Vault.open(tmp_path / "vault")
    truth = json.loads((FIXTURE / "vault-format1.json").read_text())
    first = truth["points"][0]
    vault.restore(first["id"], tmp_path / "os.img", disk="os", workers=1)
    rng = random.Random(7)
    kept: list[tuple[str, str, np.ndarray]] = []
    thin = tmp_path / "thin.img"
    with open(thin, "wb") as f:
        f.truncate(300 * BS + 11)
    for step in range(4):
        os_img = tmp_path / "os.img"
        ops = [_mutate(rng, os_img), _mutate(rng, thin)]
        if step == 0:
            _punch(os_img, BS, 40 * BS)  # the dense fixture disk goes thin
        for vm, label, disk in (("web", "os", os_img), ("thin", "t", thin)):
            p = vault.backup(vm, [f"{label}={disk}"], block_size=4096, workers=1,
                             created=f"2027-01-01T00:00:{step:02d}Z")
            kept.append((p.id, label, np.fromfile(disk, dtype=np.uint8)))
        for pid, label, want in kept:
            out = tmp_path / "r.img"
            vault.restore(pid, out, disk=label, workers=1, force=True)
            assert np.array_equal(np.fromfile(out, dtype=np.uint8), want), (pid, ops)
    for point in truth["points"]:
        for label, d in point["disks"].items():
            out = tmp_path / "old.img"
            vault.restore(point["id"], out, disk=label, workers=1, force=True)
            assert hashlib.sha256(out.read_bytes()).hexdigest() == d["sha256"]
    assert vault.verify(data=True).problems == []
    versions = {pa.ipc.open_file(str(f)).schema.metadata[b"cbt.format_version"]
                for f in (tmp_path / "vault" / "manifests").glob("*.2027*/*.arrow")}
    assert b"2" in versions  # a thin full manifest (deltas stay format 1)
    # (the vault's format is 3 now: its index holds paged segments)
    assert json.loads((tmp_path / "vault" / "config").read_text())["format_version"] == 3

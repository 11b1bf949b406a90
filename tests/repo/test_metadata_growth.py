"""DESIGN.md invariant: metadata grows with change, not with disk size.

A fully allocated disk of 2^19 blocks of 4 KiB (2 GiB of random data), 30 daily
backups with 1% scattered change each (5,243 random 4 KiB pages rewritten a
day).  Each incremental is told what changed by a hint file (``--changed-ranges``,
no sample re-read), so it reads 20 MiB, not the whole 2 GiB: what is measured is
the metadata, which does not depend on how the change was found:

- the manifest files of points 2-30 together are at most 3x point 1's full
  manifest;
- resolving point k opens at most ceil(log2 k) + 1 manifest files (k points
  existed when it was the latest; a fresh ``Vault.open`` for each resolution so
  no cache hides an open);
- every resolved manifest equals the truth: BLAKE3 of every page, computed
  here as the pages are written.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import blake3
import numpy as np
import pytest
from helpers import MIB, PAGE

import cbt

BLOCKS = 1 << 19
DAYS = 30
CHANGED = math.ceil(BLOCKS / 100)  # 5,243 pages a day
CHUNK = 64 * MIB


def _digests(buf: bytes) -> np.ndarray:
    mv = memoryview(buf)
    out = b"".join(blake3.blake3(mv[i:i + PAGE]).digest() for i in range(0, len(buf), PAGE))
    return np.frombuffer(out, dtype=np.uint8).reshape(-1, 32)


def _hint(path: Path, pages: np.ndarray) -> Path:
    """A hint file (the shape of ``cbt diff --json``) naming ``pages`` (sorted), adjacent
    ones as one range."""
    starts = pages[np.r_[True, np.diff(pages) != 1]]
    ends = pages[np.r_[np.diff(pages) != 1, True]] + 1
    size = BLOCKS * PAGE
    path.write_text(json.dumps({"block_size": PAGE, "size_a": size, "size_b": size,
                                "ranges": [[int(a) * PAGE, int(e - a) * PAGE]
                                           for a, e in zip(starts, ends, strict=True)]}))
    return path


def _manifest_bytes(vault: Path, point_id: str) -> int:
    return sum(f.stat().st_size for f in (vault / "manifests" / point_id).iterdir())


@pytest.mark.slow
def test_metadata_grows_with_change_not_disk_size(tmp_path: Path) -> None:
    disk, vault_dir = tmp_path / "big.img", tmp_path / "vault"
    rng = np.random.default_rng(2030)
    truth = np.empty((BLOCKS, 32), dtype=np.uint8)
    try:
        # 64 MiB of random words, XORed with a different random word for each chunk:
        # every page is distinct and incompressible, at a fraction of the cost of 2 GiB
        # of fresh random numbers
        base = np.frombuffer(rng.bytes(CHUNK), dtype=np.uint64)
        keys = rng.integers(1, 2**63, size=BLOCKS * PAGE // CHUNK, dtype=np.uint64)
        fd = os.open(disk, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for pos, key in zip(range(0, BLOCKS * PAGE, CHUNK), keys.tolist(), strict=True):
                buf = (base ^ np.uint64(key)).tobytes()
                assert os.pwrite(fd, buf, pos) == CHUNK
                truth[pos // PAGE:(pos + CHUNK) // PAGE] = _digests(buf)
        finally:
            os.close(fd)
        st = os.stat(disk)
        assert st.st_size == BLOCKS * PAGE and st.st_blocks * 512 >= st.st_size

        vault = cbt.Vault.init(vault_dir)
        points: list[str] = []
        fingerprints: list[str] = []  # BLAKE3 of the truth's digest column, per day
        for day in range(DAYS):
            hints = {}
            if day:
                pages = np.sort(rng.choice(BLOCKS, size=CHANGED, replace=False))
                data = rng.bytes(CHANGED * PAGE)
                fd = os.open(disk, os.O_WRONLY)
                try:
                    for k, page in enumerate(pages.tolist()):
                        os.pwrite(fd, data[k * PAGE:(k + 1) * PAGE], page * PAGE)
                finally:
                    os.close(fd)
                truth[pages] = _digests(data)
                hints = {"big": _hint(tmp_path / "changed.json", pages)}
            point = vault.backup("db", [f"big={disk}"], block_size=PAGE, hints=hints,
                                 verify_fraction=0.0)
            d = point.disks[0]
            assert d.blocks == BLOCKS and d.block_size == PAGE
            assert d.changed_blocks == (BLOCKS if day == 0 else CHANGED)
            assert d.change_source == ("hash" if day == 0 else "hint-file")
            assert point.bytes_new == (BLOCKS if day == 0 else CHANGED) * PAGE
            points.append(point.id)
            fingerprints.append(blake3.blake3(truth.data).hexdigest())

        full = _manifest_bytes(vault_dir, points[0])
        assert full >= BLOCKS * 32, "point 1 holds a full manifest"
        later = sum(_manifest_bytes(vault_dir, p) for p in points[1:])
        assert later <= 3 * full, (f"manifests of points 2-{DAYS}: {later} bytes, more than "
                                   f"3x the full manifest's {full}")
        # every point resolves to the truth of its day, opening few manifest files: at
        # most ceil(log2 k) + 1 for point k (k points existed when it was the latest)
        bound = math.ceil(math.log2(DAYS)) + 1
        for k, (pid, fp) in enumerate(zip(points, fingerprints, strict=True), start=1):
            opened: list[str] = []
            fresh = cbt.Vault.open(vault_dir)  # no cache from an earlier resolution
            m = fresh.resolve(fresh.point(pid), "big", opened)
            assert len(opened) <= min(bound, math.ceil(math.log2(k)) + 1), (pid, opened)
            assert len(set(opened)) == len(opened), opened
            assert m.disk_size == BLOCKS * PAGE and m.block_size == PAGE
            assert int(np.count_nonzero(m.flags != 0)) == 0, f"{pid}: every block is DATA"
            assert blake3.blake3(np.ascontiguousarray(m.digests).data).hexdigest() == fp, (
                f"point {k} ({pid}) does not resolve to the disk as it was that day")
    finally:
        disk.unlink(missing_ok=True)
        shutil.rmtree(vault_dir, ignore_errors=True)

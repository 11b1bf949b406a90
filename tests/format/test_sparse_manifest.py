"""Manifests without a row per hole (format 2) and the sparse in-memory manifest.

Truth here is the dense form, one row per block, computed with plain numpy:
every sparse operation (delta, apply, the changed-block count, lookups) must
give what the dense arithmetic gives.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from helpers import MIB

import cbt
from cbt.core import reference
from cbt.core.errors import CorruptManifestError
from cbt.format.manifest import (
    DATA,
    HOLE,
    ZERO,
    Delta,
    Manifest,
    read_manifest_bytes,
    union_rows,
)
from cbt.ops.diff import changed_blocks, diff_manifests

BS = 4096


def _random_dense(rng: np.random.Generator, n: int, p_hole: float
                  ) -> tuple[np.ndarray, np.ndarray]:
    flags = rng.choice(np.array([DATA, ZERO, HOLE], np.uint8), size=n,
                       p=[(1 - p_hole) * 0.8, (1 - p_hole) * 0.2, p_hole])
    digests = rng.integers(0, 4, size=(n, 32), dtype=np.uint8)  # few values: some repeat
    digests[:, 0] |= 1
    digests[flags != DATA] = 0
    return digests, flags


def _dense_truth_bitmap(a: Manifest, b: Manifest) -> np.ndarray:
    na, nb = a.blocks, b.blocks
    common = na if a.disk_size == b.disk_size else min(a.disk_size, b.disk_size) // BS
    bitmap = np.ones(max(na, nb), np.uint8)
    bitmap[:common] = (a.digests[:common] != b.digests[:common]).any(axis=1)
    return bitmap


def _dense_truth_changed(a: Manifest, b: Manifest) -> int:
    """cbt diff's rule on dense arrays: content compared up to the shorter end."""
    na, nb = a.blocks, b.blocks
    common = na if a.disk_size == b.disk_size else min(a.disk_size, b.disk_size) // BS
    total = max(na, nb)
    differ = (a.digests[:common] != b.digests[:common]).any(axis=1)
    return int(differ.sum()) + total - common


@pytest.mark.parametrize("seed", range(12))
def test_delta_apply_and_changed_count_equal_the_dense_truth(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_base = int(rng.integers(0, 300))
    n_new = int(rng.integers(0, 300)) if seed % 3 else n_base
    base = Manifest(BS, n_base * BS - int(rng.integers(0, BS)) if n_base else 0,
                    *_random_dense(rng, n_base, rng.random()))
    dg, fl = base.digests.copy(), base.flags.copy()
    new_d, new_f = _random_dense(rng, n_new, rng.random())
    # most blocks unchanged from the base where both exist
    common = min(n_base, n_new)
    keep = rng.random(common) < 0.7
    new_d[:common][keep], new_f[:common][keep] = dg[:common][keep], fl[:common][keep]
    size = n_new * BS - int(rng.integers(0, BS)) if n_new else 0
    new = Manifest(BS, size, new_d, new_f)

    delta = new.delta_from(base)
    # the delta's rows: exactly the blocks whose (digest, flag) differ from the base's,
    # blocks past the base's end counting as holes there
    base_f = np.full(new.blocks, HOLE, np.uint8)
    base_d = np.zeros((new.blocks, 32), np.uint8)
    k = min(base.blocks, new.blocks)
    base_f[:k], base_d[:k] = base.flags[:k], base.digests[:k]
    want = np.nonzero((new.flags != base_f) | (new.digests != base_d).any(axis=1))[0]
    assert delta.rows.tolist() == want.tolist()
    back = read_manifest_bytes(delta.to_bytes(), "delta")
    assert isinstance(back, Delta)
    full = back.apply(base)
    assert full.disk_size == new.disk_size
    assert np.array_equal(full.flags, new.flags) and np.array_equal(full.digests, new.digests)
    assert not (full.row_flags == HOLE).any()

    truth = _dense_truth_changed(base, new)
    assert changed_blocks(base, new) == truth == diff_manifests(base, new).changed_blocks
    assert changed_blocks(new, base) == _dense_truth_changed(new, base)
    # the ranges of the sparse diff are those of the dense bitmap
    for a, b in ((base, new), (new, base)):
        cs = diff_manifests(a, b)
        bitmap = _dense_truth_bitmap(a, b)
        assert np.array_equal(cs.bitmap, bitmap)
        assert np.array_equal(cs.ranges, reference.bitmap_runs(
            bitmap, BS, max(a.disk_size, b.disk_size)))


def test_a_vault_manifest_of_a_thin_disk_has_no_row_per_hole(tmp_path: Path) -> None:
    """Format 2: 64 MiB of holes around 3 blocks of data give 3 rows, not 16K; the disk
    without holes gives format 1, byte for byte what cbt always wrote."""
    disk = tmp_path / "thin.img"
    with open(disk, "wb") as f:
        f.truncate(64 * MIB)
        for off in (0, 5 * MIB + 100, 64 * MIB - 10):
            f.seek(off)
            f.write(b"x" * 10)
    dense_disk = tmp_path / "dense.img"
    dense_disk.write_bytes(np.random.default_rng(1).bytes(8 * BS))
    vault = cbt.Vault.init(tmp_path / "v")
    point = vault.backup("vm", [f"thin={disk}", f"dense={dense_disk}"], block_size=BS)

    table = pa.ipc.open_file(pa.py_buffer(
        (tmp_path / "v" / point.disk("thin").manifest).read_bytes())).read_all()
    meta = table.schema.metadata
    assert meta[b"cbt.format_version"] == b"2" and meta[b"cbt.kind"] == b"full"
    first, mid, last = 0, (5 * MIB + 100) // BS, (64 * MIB - 10) // BS
    assert table.column("block").to_pylist() == [first, mid, last]
    assert table.column("flags").to_pylist() == [DATA] * 3

    dense = pa.ipc.open_file(pa.py_buffer(
        (tmp_path / "v" / point.disk("dense").manifest).read_bytes())).read_all()
    assert dense.schema.metadata[b"cbt.format_version"] == b"1"
    assert dense.column("block").to_pylist() == list(range(8))

    m = vault.resolve(point, "thin")
    assert (m.blocks, m.data_blocks, m.hole_blocks) == (16 * 1024, 3, 16 * 1024 - 3)
    assert m.rows.tolist() == [first, mid, last]
    assert (m.flags == HOLE).sum() == 16 * 1024 - 3  # the dense view, on request

    # cbt scan -o stays dense: one row per block, format 1
    cbt.scan(disk, BS).write(tmp_path / "scan.arrow")
    t = pa.ipc.open_file(str(tmp_path / "scan.arrow")).read_all()
    assert t.num_rows == 16 * 1024 and t.schema.metadata[b"cbt.format_version"] == b"1"
    assert np.array_equal(Manifest.read(tmp_path / "scan.arrow").digests, m.digests)


def test_a_format2_manifest_with_a_hole_row_or_rows_out_of_order_is_corrupt() -> None:
    rng = np.random.default_rng(3)
    d, f = _random_dense(rng, 40, 0.5)
    m = Manifest(BS, 40 * BS, d, f)
    good = m.to_bytes()
    assert isinstance(read_manifest_bytes(good, "m"), Manifest)
    table = pa.ipc.open_file(pa.py_buffer(good)).read_all()
    assert table.schema.metadata[b"cbt.format_version"] == b"2"
    from cbt.format.manifest import content_checksum

    def forged(blocks: np.ndarray, flags: np.ndarray, digests: np.ndarray) -> bytes:
        meta = dict(table.schema.metadata)
        meta[b"cbt.checksum"] = content_checksum("full", m.disk_size, BS, blocks, digests,
                                                 flags).encode()
        import blake3
        meta[b"cbt.digest_checksum"] = blake3.blake3(digests.tobytes()).hexdigest().encode()
        t = pa.table({"block": pa.array(blocks, pa.uint64()),
                      "digest": pa.array([bytes(r) for r in digests], pa.binary(32)),
                      "flags": pa.array(flags, pa.uint8())}).replace_schema_metadata(meta)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, t.schema) as w:
            w.write_table(t)
        return bytes(sink.getvalue().to_pybytes())

    rows, digests, flags = m.rows, m.row_digests, m.row_flags
    hole = flags.copy()
    hole[flags == ZERO] = HOLE  # (a zero row's digest is zeros: only the flag says hole)
    assert (hole == HOLE).any()
    with pytest.raises(CorruptManifestError, match="HOLE row"):
        read_manifest_bytes(forged(rows, hole, digests), "m")
    with pytest.raises(CorruptManifestError, match="not ascending"):
        read_manifest_bytes(forged(rows[::-1].copy(), flags[::-1].copy(),
                                   digests[::-1].copy()), "m")
    past = rows.copy()
    past[-1] = 40
    with pytest.raises(CorruptManifestError, match="out of range"):
        read_manifest_bytes(forged(past, flags, digests), "m")


def test_union_rows_and_lookups() -> None:
    rng = np.random.default_rng(4)
    a = np.sort(rng.choice(1 << 40, 500, replace=False)).astype(np.uint64)
    b = np.sort(rng.choice(1 << 40, 700, replace=False)).astype(np.uint64)
    assert union_rows(a, b).tolist() == sorted(set(a.tolist()) | set(b.tolist()))
    assert union_rows(a, a).tolist() == a.tolist()
    m = Manifest.sparse(BS, 1 << 52, a, np.ones((500, 32), np.uint8), np.zeros(500, np.uint8))
    d, f = m.at(b)
    held = np.isin(b, a)
    assert (f[held] == DATA).all() and (f[~held] == HOLE).all()
    assert (d[~held] == 0).all()
    assert m.blocks == (1 << 52) // BS and m.hole_blocks == m.blocks - 500

"""Review of issue 12 part B: crafted manifests (checksums recomputed, as anyone can for a
plain vault or a manifest file) fail as one clean ``corrupt manifest FILE: why``."""

from __future__ import annotations

from pathlib import Path

import blake3
import numpy as np
import pyarrow as pa
import pytest
from helpers.cli import cbt

from cbt.core.errors import CorruptManifestError
from cbt.format.manifest import content_checksum, read_manifest_bytes

BS = 4096


def _forged(disk_size: int, batches: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
            version: str = "2") -> bytes:
    """A manifest file whose checksums are right for whatever it says."""
    empty = (np.zeros(0, np.uint64), np.zeros((0, 32), np.uint8), np.zeros(0, np.uint8))
    b, d, f = (np.concatenate(x) for x in zip(*(batches or [empty]), strict=True))
    meta = {"cbt.magic": "cbt-manifest", "cbt.format_version": version, "cbt.kind": "full",
            "cbt.disk_size": str(disk_size), "cbt.block_size": str(BS), "cbt.source": "",
            "cbt.created": "", "cbt.digest_checksum": blake3.blake3(d.tobytes()).hexdigest(),
            "cbt.checksum": content_checksum("full", disk_size, BS, b, d, f)}
    schema = pa.schema([("block", pa.uint64()), ("digest", pa.binary(32)),
                        ("flags", pa.uint8())], metadata=meta)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, schema) as w:
        for bb, dd, ff in batches:
            w.write_batch(pa.record_batch(
                [pa.array(bb, pa.uint64()), pa.array([bytes(r) for r in dd], pa.binary(32)),
                 pa.array(ff, pa.uint8())], schema=schema))
    return bytes(sink.getvalue().to_pybytes())


def _rows(blocks: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    digests = np.random.default_rng(len(blocks)).integers(1, 256, (len(blocks), 32),
                                                         dtype=np.uint8)
    return np.array(blocks, np.uint64), digests, np.zeros(len(blocks), np.uint8)


@pytest.mark.parametrize("size", [2**63, 2**64 - BS, 2**70])
def test_a_disk_size_past_2_63_is_a_corrupt_manifest_not_an_overflow(size: int) -> None:
    with pytest.raises(CorruptManifestError, match=r"^corrupt manifest m\.arrow: disk size"):
        read_manifest_bytes(_forged(size, [_rows([0, 5])]), "m.arrow")


def test_a_batch_repeating_the_last_row_of_the_one_before_is_named_once() -> None:
    a, b = _rows([0, 1, 2]), _rows([2, 3])
    with pytest.raises(CorruptManifestError) as err:
        read_manifest_bytes(_forged(10 * BS, [a, b]), "m.arrow")
    msg = str(err.value)
    assert msg == "corrupt manifest m.arrow: block rows out of range or not ascending", msg


def test_empty_and_mixed_batches_read_as_their_rows() -> None:
    empty = _rows([])
    parts = [empty, _rows([1, 4]), empty, _rows([7]), empty]
    m = read_manifest_bytes(_forged(8 * BS, parts), "m.arrow")
    assert m.rows.tolist() == [1, 4, 7]
    assert read_manifest_bytes(_forged(8 * BS, []), "m.arrow").rows.tolist() == []


def test_cbt_diff_of_a_manifest_file_of_a_huge_disk_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "huge.arrow"
    bad.write_bytes(_forged(2**64 - BS, [_rows([0])]))
    r = cbt("diff", bad, bad)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert str(bad) in r.stderr

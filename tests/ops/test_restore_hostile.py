"""Restore against a crafted plain vault and a hostile target: what it reads is checked
for what it is (a raw block is exactly its length), and what it cannot write is named.

Truth: the block's length from the disk's size (``want``), BLAKE3 from the ``blake3``
package, and the target file as the kernel reports it.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import blake3
import numpy as np
import pytest
import zstandard
from helpers import KIB, MIB
from helpers.cli import cbt, one_error_line
from helpers.system import small_fs
from helpers.vaults import PASSWORD, fast_kdf, file_tree

import cbt as cbt_api
import cbt.format.pack as pack_mod
import cbt.ops.restore as restore_mod
from cbt.format.pack import BLOB, BLOB_MAGIC, CODEC_NONE, CODEC_ZSTD, ENCRYPTION_NONE
from cbt.ops.restore import DamagedPointError, _Job, _job_data

BS = 16 << 10
WHERE = "point p disk d block {} pack k"


def _raw_pack(payloads: list[bytes], raw: list[int], size: int) -> tuple[memoryview, _Job]:
    """A pack of raw blobs of blocks 0.. whose headers (and the index: the job's lengths)
    say ``stored = len(payload)`` and ``raw``; each digest is the payload's BLAKE3."""
    out, offsets, lengths = bytearray(), [], []
    for payload, r in zip(payloads, raw, strict=True):
        offsets.append(len(out))
        out += BLOB.pack(BLOB_MAGIC, blake3.blake3(payload).digest(), CODEC_NONE,
                         ENCRYPTION_NONE, 0, r, len(payload))
        out += payload
        lengths.append(BLOB.size + len(payload))
    n = len(payloads)
    job = _Job(vault=None, point="p", label="d", target="t", block_size=BS,  # type: ignore[arg-type]
               pack="k", blocks=np.arange(n, dtype=np.int64),
               digests=np.frombuffer(b"".join(blake3.blake3(p).digest() for p in payloads),
                                     np.uint8).reshape(n, 32),
               offsets=np.array(offsets, np.int64), lengths=np.array(lengths, np.int64),
               disk_size=size)
    return memoryview(bytes(out)), job


@pytest.mark.parametrize("last", [BS, 5000], ids=["whole", "short-last"])
def test_a_raw_blob_longer_than_its_block_is_refused(last: int) -> None:
    """A raw blob whose header and index agree on a stored length longer than the block
    (its header's raw length is the block's) and whose digest is that of all its bytes
    (a crafted plain vault): refused, naming the block, not handed on to be written past
    the block's end (past the disk's end, for the last one)."""
    size = BS + last
    payloads = [bytes(range(256)) * (BS // 256), b"\x07" * (last + 300)]
    pack, job = _raw_pack(payloads, [BS, last], size)
    with pytest.raises(DamagedPointError, match=r"^point p disk d block 1 pack k: "):
        views, _ = _job_data(job, pack, WHERE)
        assert [len(v) for v in views] == [BS, last]  # (what would be written)


def _spy_decompress(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The lengths ``cbt.format.pack.decompress`` is asked for, from now on."""
    asked: list[int] = []
    real = pack_mod.decompress

    def spy(payload: bytes | memoryview, raw: int, where: str = "") -> bytes:
        asked.append(raw)
        return real(payload, raw, where)

    monkeypatch.setattr(pack_mod, "decompress", spy)
    return asked


def test_a_frame_whose_header_claims_a_huge_block_is_refused_unread(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain vault's compressed blob whose header says 64 MiB (its frame too: 64 MiB
    of zeros is 2 KiB of zstd) for a 16 KiB block: refused naming the block, and never
    decompressed past the block's length (a 4 GiB claim was 4 GiB allocated, per blob)."""
    huge = 64 << 20
    frame = zstandard.ZstdCompressor(level=1).compress(bytes(huge))
    digest = blake3.blake3(bytes(BS)).digest()
    pack = memoryview(BLOB.pack(BLOB_MAGIC, digest, CODEC_ZSTD, ENCRYPTION_NONE, 0, huge,
                                len(frame)) + frame)
    job = _Job(vault=None, point="p", label="d", target="t", block_size=BS,  # type: ignore[arg-type]
               pack="k", blocks=np.zeros(1, np.int64),
               digests=np.frombuffer(digest, np.uint8).reshape(1, 32),
               offsets=np.zeros(1, np.int64), lengths=np.array([len(pack)], np.int64),
               disk_size=BS)
    asked = _spy_decompress(monkeypatch)
    with pytest.raises(DamagedPointError, match=r"^point p disk d block 0 pack k: content "
                                                "has the wrong length$"):
        _job_data(job, pack, WHERE)
    assert all(raw <= BS for raw in asked), asked


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_a_restore_that_runs_out_of_space_names_the_disk_and_the_file(
        tmp_path: Path, workers: int) -> None:
    """ENOSPC on the writer thread: one line naming the disk, the block, the file written
    and the lack of space; exit 2, nothing left in the directory; no thread left (API)."""
    disk = tmp_path / "os.img"
    disk.write_bytes(np.random.default_rng(3).integers(0, 256, 12 * MIB, np.uint8).tobytes())
    v = cbt_api.Vault.init(tmp_path / "v")
    point = v.backup("vm", [disk], block_size=64 * KIB, workers=1).id
    with small_fs("tmpfs", 4, tmp_path) as mnt:
        out = mnt / "out"
        r = cbt("restore", tmp_path / "v", point, "--to", out, "--workers", workers)
        line = one_error_line(r)
        assert f"point {point} disk os block " in line, line
        assert str(out) in line and "No space left on device" in line, line
        assert file_tree(out) == {}
        before = threading.active_count()
        with pytest.raises(OSError, match="No space left on device"):
            v.restore(point, out, workers=workers)
        assert threading.active_count() == before
        assert file_tree(out) == {}


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_a_block_repeated_over_a_disk_is_opened_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, encrypted: bool) -> None:
    """A disk of one block written 512 times (a pattern-filled region: one blob, so every
    copy in one job): the blob is opened and decompressed once, not once a copy (memory
    was a copy per block: a 100 GiB region of one pattern was 100 GiB of RAM); restored
    bit for bit."""
    block = (b"one pattern " * BS)[:BS]  # (compressible: decompressed in both vaults)
    disk = tmp_path / "os.img"
    disk.write_bytes(block * 512)
    v = (cbt_api.Vault.init(tmp_path / "v", encryption="aes-256-gcm", passphrase=PASSWORD,
                            kdf=fast_kdf()) if encrypted else cbt_api.Vault.init(tmp_path / "v"))
    point = v.backup("vm", [disk], block_size=BS, workers=1).id
    taken: list[int] = []
    inflated: list[int] = []
    real_take, real_many = restore_mod._Scratch.take, restore_mod.decompress_many

    def take(self: restore_mod._Scratch, nbytes: int) -> memoryview:
        taken.append(nbytes)
        return real_take(self, nbytes)

    def decompress_many(data: Any, starts: Any, ends: Any, raw: Any, exact: Any = None,
                        codecs: Any = None) -> Any:
        inflated.extend(raw.tolist())
        return real_many(data, starts, ends, raw, exact, codecs)

    monkeypatch.setattr(restore_mod._Scratch, "take", take)
    monkeypatch.setattr(restore_mod, "decompress_many", decompress_many)
    monkeypatch.setattr(restore_mod, "ISOLATE", False)  # (one worker: in this process)
    v.restore(point, tmp_path / "out", workers=1)
    assert (tmp_path / "out" / "os.img").read_bytes() == disk.read_bytes()
    assert inflated == [BS]
    assert max(taken, default=0) <= BS


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_a_pack_of_blocks_that_compress_well_is_opened_a_part_at_a_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, encrypted: bool) -> None:
    """8 MiB of distinct blocks of a few bytes each (the rest zeros) are one small pack:
    a worker opens at most :data:`JOB_BYTES` of it at once (it was all of it: a pack of
    100,000 such blocks was 6 GiB in memory at once); restored bit for bit."""
    monkeypatch.setattr(restore_mod, "JOB_BYTES", 1 * MIB, raising=False)
    n = 512
    blocks = np.zeros((n, BS), np.uint8)
    blocks[:, :8] = np.arange(1, n + 1, dtype=np.uint64).view(np.uint8).reshape(n, 8)
    disk = tmp_path / "os.img"
    disk.write_bytes(blocks.tobytes())
    v = (cbt_api.Vault.init(tmp_path / "v", encryption="aes-256-gcm", passphrase=PASSWORD,
                            kdf=fast_kdf()) if encrypted else cbt_api.Vault.init(tmp_path / "v"))
    point = v.backup("vm", [disk], block_size=BS, workers=1).id
    assert sum(1 for _ in (tmp_path / "v").rglob("*.pack")) == 1
    opened: list[int] = []
    real = restore_mod._read_job

    def read_job(*args: object) -> tuple[list[memoryview], object]:
        views, checked = real(*args)  # type: ignore[arg-type]
        opened.append(sum(len(x) for x in views))
        return views, checked

    monkeypatch.setattr(restore_mod, "_read_job", read_job)
    monkeypatch.setattr(restore_mod, "ISOLATE", False)  # (one worker: in this process)
    v.restore(point, tmp_path / "out", workers=1)
    assert (tmp_path / "out" / "os.img").read_bytes() == disk.read_bytes()
    assert sum(opened) == n * BS and max(opened) <= MIB, opened


def test_a_blob_claiming_more_than_the_largest_block_is_refused_unread_by_every_reader(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``verify --data`` and ``copy`` decode blobs without knowing their block's length:
    a header claiming more than the largest block (4 MiB) is refused before anything is
    decompressed (a frame of 64 MiB of zeros is 2 KiB; 4 GiB would be 4 GiB allocated)."""
    from cbt.format.pack import CorruptPackError, decode_blob
    from cbt.format.records import MAX_BLOCK

    huge = 64 << 20
    frame = zstandard.ZstdCompressor(level=1).compress(bytes(huge))
    digest = blake3.blake3(bytes(huge)).digest()
    blob = BLOB.pack(BLOB_MAGIC, digest, CODEC_ZSTD, ENCRYPTION_NONE, 0, huge, len(frame)) + frame
    asked = _spy_decompress(monkeypatch)
    with pytest.raises(CorruptPackError, match=r"^pack k blob 0: content has the wrong length$"):
        decode_blob(blob, digest, "pack k blob 0")
    assert asked == []
    small = bytes(range(256)) * 16  # (a block of the largest size or less still decodes)
    ok = zstandard.ZstdCompressor(level=1).compress(small)
    d = blake3.blake3(small).digest()
    assert bytes(decode_blob(BLOB.pack(BLOB_MAGIC, d, CODEC_ZSTD, ENCRYPTION_NONE, 0, len(small),
                                       len(ok)) + ok, d, "pack k blob 1")) == small
    assert MAX_BLOCK == 4 << 20


@pytest.mark.parametrize("workers", [1, 2])
def test_a_pack_cut_short_while_it_is_read_fails_the_restore_naming_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int) -> None:
    """Packs are mapped: one cut short by someone else writing the vault, after it was
    mapped and before its blocks are read, is a SIGBUS.  It killed a one-worker restore
    (run in this process), leaving the target half-written; now every worker runs in a
    child, and the restore fails with the pack named, nothing left at the target."""
    import os

    from helpers.images import write_random_disk

    monkeypatch.setattr("cbt.ops.backup.TARGET_PACK_SIZE", MIB)
    disk = write_random_disk(tmp_path / "os.img", 4 * MIB, seed=3)
    v = cbt_api.Vault.init(tmp_path / "v")
    point = v.backup("vm", [disk], block_size=64 * KIB, workers=1).id
    real = restore_mod._fetch_pack
    cut: list[str] = []

    def cutting(vault: Any, job: Any) -> memoryview:
        view = real(vault, job)
        if not cut:  # (in the worker: the first pack it maps)
            cut.append(job.pack)
            path = next(p for p in (tmp_path / "v").rglob("*.pack") if job.pack in p.name)
            os.truncate(path, 64)
        return view

    monkeypatch.setattr(restore_mod, "_fetch_pack", cutting)
    out = tmp_path / "out"
    with pytest.raises(DamagedPointError, match=r"^point \S+ disk os block \d+ pack \w+: cannot "
                                                r"be read \(.*SIGBUS.*cut short"):
        v.restore(point, out, workers=workers)
    assert file_tree(out) == {} if out.exists() else True

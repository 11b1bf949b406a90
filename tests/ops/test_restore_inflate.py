"""A plain vault's compressed blocks, restored: decompressed straight from the pack by
a context each thread reuses (``zstandard``), checked against their digests batch by
batch, and refused with the block named when a frame is not what its header says."""

from __future__ import annotations

import os

import blake3
import numpy as np
import pyarrow as pa
import pytest

from cbt.format.pack import (
    BLOB,
    BLOB_MAGIC,
    CODEC_LZ4,
    CODEC_NONE,
    CODEC_ZSTD,
    ENCRYPTION_NONE,
    CorruptPackError,
    decompress,
    decompress_lz4,
)
from cbt.ops.restore import OPEN_BATCH, DamagedPointError, _Job, _job_data

BS = 16 << 10
ZSTD = pa.Codec("zstd", compression_level=3)
LZ4 = pa.Codec("lz4_raw")  # an lz4 block, as cbt stores it (written here by pyarrow)
WHERE = "point p disk d block {} pack k"


def _block(i: int) -> bytes:
    return (f"block {i} ".encode() * BS)[:BS]


def _pack(blobs: list[tuple[bytes, int, bytes]], size: int
          ) -> tuple[memoryview, _Job]:
    """A pack of ``(digest, codec, payload)`` blobs of blocks 0.. and its job."""
    out, offsets, lengths = bytearray(), [], []
    for digest, codec, payload in blobs:
        offsets.append(len(out))
        out += BLOB.pack(BLOB_MAGIC, digest, codec, ENCRYPTION_NONE, 0, BS, len(payload))
        out += payload
        lengths.append(BLOB.size + len(payload))
    n = len(blobs)
    job = _Job(vault=None, point="p", label="d", target="t", block_size=BS,  # type: ignore[arg-type]
               pack="k", blocks=np.arange(n, dtype=np.int64),
               digests=np.frombuffer(b"".join(b[0] for b in blobs), np.uint8).reshape(n, 32),
               offsets=np.array(offsets, np.int64), lengths=np.array(lengths, np.int64),
               disk_size=size)
    return memoryview(bytes(out)), job


def test_decompress_reads_a_frame_and_refuses_what_is_not_the_block() -> None:
    data = _block(1)
    frame = ZSTD.compress(data, asbytes=True)
    assert decompress(memoryview(frame), BS) == data
    with pytest.raises(CorruptPackError, match="cannot decompress"):
        decompress(frame + b"more", BS)  # bytes after the frame
    with pytest.raises(CorruptPackError, match="cannot decompress"):
        decompress(frame[:-4], BS)  # a frame cut short
    with pytest.raises(CorruptPackError, match="cannot decompress"):
        decompress(os.urandom(64), BS)  # no frame at all
    big = ZSTD.compress(bytes(64 << 20), asbytes=True)  # says 64 MiB: refused unread
    with pytest.raises(CorruptPackError, match="wrong length"):
        decompress(big, BS)


def test_compressed_and_raw_blocks_of_a_job_come_back_in_order_all_checked() -> None:
    n = 2 * OPEN_BATCH + 5  # batches, and a short one
    blobs = []
    for i in range(n):
        data = _block(i) if i % 3 else os.urandom(BS)  # every third one raw
        codec, payload = ((CODEC_ZSTD, ZSTD.compress(data, asbytes=True)) if i % 3
                          else (CODEC_NONE, data))
        blobs.append((blake3.blake3(data).digest(), codec, payload))
    pack, job = _pack(blobs, n * BS)
    views, checked = _job_data(job, pack, WHERE)
    assert [bytes(v) for v in views] == [
        ZSTD.decompress(p, decompressed_size=BS, asbytes=True) if c == CODEC_ZSTD else p
        for _, c, p in blobs]
    # the compressed ones are checked as they are decompressed; raw ones when written
    assert checked.tolist() == [bool(i % 3) for i in range(n)]


def _bad_payloads(codec: pa.Codec, bad: int) -> dict[str, bytes]:
    """Payloads of ``codec`` that are not block ``bad``, by what is wrong with them."""
    good = codec.compress(_block(bad), asbytes=True)
    return {"other content": codec.compress(_block(999), asbytes=True),
            "longer": codec.compress(_block(bad) + b"x", asbytes=True),
            "shorter": codec.compress(_block(bad)[:-1], asbytes=True),
            "not compressed data": os.urandom(200), "cut": good[:len(good) // 2]}


@pytest.mark.parametrize("how", ["other content", "longer", "shorter", "not compressed data",
                                 "cut"])
@pytest.mark.parametrize(("codec", "code"), [(ZSTD, CODEC_ZSTD), (LZ4, CODEC_LZ4)],
                         ids=["zstd", "lz4"])
def test_a_payload_that_is_not_its_block_is_named(codec: pa.Codec, code: int, how: str) -> None:
    blobs = [(blake3.blake3(_block(i)).digest(), code, codec.compress(_block(i), asbytes=True))
             for i in range(OPEN_BATCH + 3)]
    bad = OPEN_BATCH + 1
    blobs[bad] = (blobs[bad][0], code, _bad_payloads(codec, bad)[how])
    pack, job = _pack(blobs, len(blobs) * BS)
    with pytest.raises(DamagedPointError) as exc:
        _job_data(job, pack, WHERE)
    msg = str(exc.value)
    assert msg.startswith(f"point p disk d block {bad} pack k: "), msg
    assert "\n" not in msg


@pytest.mark.parametrize("after", [b"more", b"\0", "skippable", "frame"])
def test_bytes_after_a_frame_are_refused_with_the_block_named(after: bytes | str) -> None:
    """zstandard's many-frame call takes bytes after a frame: restore reads each frame's
    own length first, and a blob holding more than its frame fails, named."""
    frames = [ZSTD.compress(_block(i), asbytes=True) for i in range(OPEN_BATCH + 3)]
    bad = OPEN_BATCH + 2
    extra = {"skippable": (0x184D2A50).to_bytes(4, "little") + (2).to_bytes(4, "little")
             + b"ab", "frame": frames[0]}.get(after, after)  # type: ignore[call-overload]
    frames[bad] += extra
    blobs = [(blake3.blake3(_block(i)).digest(), CODEC_ZSTD, f) for i, f in enumerate(frames)]
    pack, job = _pack(blobs, len(blobs) * BS)
    with pytest.raises(DamagedPointError) as exc:
        _job_data(job, pack, WHERE)
    assert str(exc.value).startswith(f"point p disk d block {bad} pack k: cannot decompress")


# -- lz4 (a vault of --compression lz4): blocks with no frame, lengths in the blob header


def test_decompress_lz4_gives_exactly_the_block_or_names_the_problem() -> None:
    data = _block(2)
    payload = LZ4.compress(data, asbytes=True)
    assert decompress_lz4(memoryview(payload), BS) == data
    for bad in (payload[:-3], os.urandom(300), b"", LZ4.compress(data + b"x", asbytes=True)):
        with pytest.raises(CorruptPackError, match=r"^pack p blob 3: cannot decompress"):
            decompress_lz4(bad, BS, "pack p blob 3")  # (more than BS bytes: never written)
    with pytest.raises(CorruptPackError, match=r"^pack p blob 3: content has the wrong"):
        decompress_lz4(LZ4.compress(data[:-1], asbytes=True), BS, "pack p blob 3")


def test_lz4_zstd_and_raw_blocks_of_one_job_come_back_in_order_all_checked() -> None:
    """A pack may hold both codecs (a vault copied into, or one whose blocks came from
    another): each block decompressed by its own codec, in order, each checked."""
    n = 2 * OPEN_BATCH + 7
    blobs = []
    for i in range(n):
        data = _block(i) if i % 5 else os.urandom(BS)
        codec, payload = ((CODEC_NONE, data) if i % 5 == 0 else
                          (CODEC_LZ4, LZ4.compress(data, asbytes=True)) if i % 2 else
                          (CODEC_ZSTD, ZSTD.compress(data, asbytes=True)))
        blobs.append((blake3.blake3(data).digest(), codec, payload))
    pack, job = _pack(blobs, n * BS)
    views, checked = _job_data(job, pack, WHERE)
    assert [bytes(v) for v in views] == [_block(i) if i % 5 else p
                                         for i, (_, _, p) in enumerate(blobs)]
    assert checked.tolist() == [i % 5 != 0 for i in range(n)]


@pytest.mark.parametrize("raw", [-1, (4 << 20) + 1, 1 << 31, (1 << 32) - 1])
def test_decompress_lz4_refuses_a_length_no_block_has_before_allocating_it(raw: int) -> None:
    """decompress_lz4 allocates ``raw`` bytes before it decodes: a length that is no
    block's (over 4 MiB, or negative, which lz4 would read from the payload's first bytes:
    here 2 GiB) is a damaged blob, named, whoever the caller is."""
    payload = b"\xff\xff\xff\x7f" + LZ4.compress(_block(1), asbytes=True)
    with pytest.raises(CorruptPackError, match=r"^pack p blob 3: content has the wrong length"):
        decompress_lz4(payload, raw, "pack p blob 3")


@pytest.mark.parametrize("raw", [-1, -(1 << 20), (4 << 20) + 1])
def test_decompress_many_refuses_an_lz4_length_no_block_has_before_allocating(raw: int) -> None:
    """A negative length made the lz4 binding take the size from the payload's first four
    bytes (here 1 GiB) and allocate it; no block is longer than MAX_BLOCK either."""
    import numpy as np

    from cbt.format.pack import FrameError, decompress_many

    payload = (1 << 30).to_bytes(4, "little") + LZ4.compress(_block(1), asbytes=True)
    with pytest.raises(FrameError) as exc:
        decompress_many(payload, np.array([0]), np.array([len(payload)]), np.array([raw]),
                        np.array([False]), np.array([CODEC_LZ4], dtype=np.uint8))
    assert exc.value.item == 0

"""Pack files: the blob-header view restore reads many headers with, and reading a
pack's trailer alone.

The truth is the test helpers' own walk of a pack (``vault_helpers.walk_pack``,
``trailer_entries``: their own struct layouts, nothing of ``cbt.format.pack``).
"""

from __future__ import annotations

from pathlib import Path

import blake3
import numpy as np
import pyarrow as pa
import pytest
from helpers.packs import trailer_entries, walk_pack

from cbt.format.pack import (
    PackWriter,
    blob_headers,
    blob_length,
    blobs_match,
    read_pack_trailer,
    read_trailer,
)


def _blocks() -> list[bytes]:
    rng = np.random.default_rng(7)
    out = []
    for i in range(40):
        if i % 3 == 0:  # incompressible: stored raw
            out.append(rng.integers(0, 256, 4096 + i, dtype=np.uint8).tobytes())
        else:  # compressible: stored with zstd
            out.append(bytes([i]) * 1000 + rng.integers(0, 4, 3000, dtype=np.uint8).tobytes())
    return out


@pytest.fixture
def pack(tmp_path: Path) -> Path:
    w = PackWriter()
    for data in _blocks():
        w.add(blake3.blake3(data).digest(), data)
    path = tmp_path / f"{w.pack_id}.pack"
    path.write_bytes(b"".join(bytes(b) for b in w.finish()))
    return path


def test_blob_headers_read_every_field_as_written(pack: Path) -> None:
    data = pack.read_bytes()
    truth = walk_pack(pack)
    assert {b.codec for b in truth} == {0, 1}, "needs raw and compressed blobs"
    offsets = np.array([b.offset for b in truth], dtype=np.uint64)[::-1]  # any order
    h = blob_headers(data, offsets)
    assert len(h) == len(truth)
    for got, want in zip(h, truth[::-1], strict=True):
        assert bytes(got["magic"]) == b"CBTB"
        assert bytes(got["digest"]) == want.digest
        assert (int(got["codec"]), int(got["encryption"])) == (want.codec, want.encryption)
        assert (int(got["raw"]), int(got["stored"])) == (want.raw, want.stored)
    assert len(blob_headers(data, np.zeros(0, np.uint64))) == 0


def test_blobs_match_flags_exactly_the_headers_that_disagree(pack: Path) -> None:
    data = bytearray(pack.read_bytes())
    truth = walk_pack(pack)
    n = len(truth)
    offsets = np.array([b.offset for b in truth], dtype=np.int64)
    digests = np.array([np.frombuffer(b.digest, np.uint8) for b in truth])
    stored = np.array([b.stored for b in truth])
    raw = np.array([b.raw for b in truth])
    assert blobs_match(blob_headers(data, offsets), digests, stored, raw).all()
    assert (blob_length(stored) == stored + 48).all() and blob_length(5) == 53

    other_digest = digests.copy()
    other_digest[3, 0] ^= 1
    short = raw.copy()
    short[5] -= 1
    data[truth[7].offset] ^= 0xFF  # magic
    data[truth[9].offset + 37] = 1  # encryption
    data[truth[11].offset + 36] = 9  # codec
    got = blobs_match(blob_headers(data, offsets), other_digest, stored, short)
    assert np.flatnonzero(~got).tolist() == [3, 5, 7, 9, 11]
    # an offset that is not a blob's start
    moved = offsets.copy()
    moved[n - 1] += 1
    assert np.flatnonzero(~blobs_match(blob_headers(data, moved), digests, stored,
                                       raw)).tolist() == [7, 9, 11, n - 1]


def test_blob_headers_refuse_a_header_past_the_end(pack: Path) -> None:
    from cbt.format.pack import CorruptPackError

    data = pack.read_bytes()
    with pytest.raises(CorruptPackError):
        blob_headers(data, np.array([0, len(data) - 47], dtype=np.int64))


def test_read_pack_trailer_reads_only_header_footer_and_trailer(pack: Path) -> None:
    data = pack.read_bytes()
    reads: list[tuple[int, int]] = []

    def read_range(offset: int, length: int) -> bytes:
        reads.append((offset, length))
        return data[offset:offset + length]

    entries = read_pack_trailer(read_range, len(data), "p")
    assert [(bytes(e["digest"]), int(e["offset"]), int(e["stored"]), int(e["raw"]))
            for e in entries] == trailer_entries(pack)
    assert np.array_equal(entries, read_trailer(data, "p"))
    first_blob = min(b.offset for b in walk_pack(pack))
    trailer_start = len(data) - 48 - 48 * len(entries)
    for offset, length in reads:  # never a byte of a blob
        assert offset + length <= first_blob or offset >= trailer_start, (offset, length)


@pytest.mark.parametrize("cut", ["short", "footer", "trailer"])
def test_read_pack_trailer_detects_damage(pack: Path, cut: str) -> None:
    from cbt.format.pack import CorruptPackError

    data = bytearray(pack.read_bytes())
    if cut == "short":
        data = data[:60]
    elif cut == "footer":
        data[-1] ^= 1
    else:
        data[-60] ^= 1
    with pytest.raises(CorruptPackError):
        read_pack_trailer(lambda o, n: bytes(data[o:o + n]), len(data), "p")


def test_blob_aads_are_blob_aad_row_by_row() -> None:
    from cbt.format.pack import BLOB_AAD_SIZE, blob_aad, blob_aads

    rng = np.random.default_rng(5)
    digests = rng.integers(0, 256, size=(5, 32), dtype=np.uint8)
    raw = np.array([4096, 16384, 1, 0, 2**32 - 1], dtype=np.int64)
    rows = blob_aads(digests, 1, raw)
    assert rows.shape == (5, BLOB_AAD_SIZE)
    for i in range(5):
        assert rows[i].tobytes() == blob_aad(digests[i].tobytes(), 1, int(raw[i]))


def test_decompress_keeps_one_context_per_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every block read back is decompressed by its thread's own ``zstandard`` context,
    made once (a context made per block costs more than 16 KiB of decompression), and
    the content is the block's."""
    import threading

    import zstandard

    import cbt.format.pack as pack_mod

    made: list[int] = []
    real = zstandard.ZstdDecompressor

    def counting() -> zstandard.ZstdDecompressor:
        made.append(threading.get_ident())
        return real()

    monkeypatch.setattr(zstandard, "ZstdDecompressor", counting)
    monkeypatch.setattr(pack_mod, "_local", threading.local())
    blocks = _blocks()
    frames = [zstandard.ZstdCompressor(level=3).compress(b) for b in blocks]

    def run() -> None:
        for b, f in zip(blocks, frames, strict=True):
            assert pack_mod.decompress(f, len(b)) == b

    run()
    run()
    assert len(made) == 1
    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert len(made) == 2 and made[0] != made[1]


def test_decompress_names_where_and_refuses_what_is_not_a_frame_of_raw_bytes() -> None:
    import zstandard

    from cbt.format.pack import CorruptPackError, decompress

    data = bytes(range(256)) * 64
    frame = zstandard.ZstdCompressor(level=3).compress(data)
    with pytest.raises(CorruptPackError, match=r"^pack p blob 3: cannot decompress"):
        decompress(frame + b"x", len(data), "pack p blob 3")
    with pytest.raises(CorruptPackError, match=r"^pack p blob 3: content has the wrong"):
        decompress(frame, len(data) - 1, "pack p blob 3")


def test_blocks_are_decompressed_in_one_place_only() -> None:
    """One module decompresses blocks with the codec packages (``cbt.format.pack``): no
    other makes a decompressor of its own.  (Besides it: the core's own LZ4 decoder, in C,
    which restore runs first, and the core's pure-Python reference, a test oracle that
    decodes with the lz4 package on purpose.)"""
    src = Path(__file__).resolve().parents[2] / "src" / "cbt"
    found = [str(p.relative_to(src)) for p in src.rglob("*.py")
             if ("ZstdDecompressor(" in p.read_text() or ".decompress(" in p.read_text())
             and p not in (src / "format" / "pack.py", src / "core" / "reference.py")]
    assert found == [], found


# -- the compression side: coded on threads, appended in order --------------------------


def _coded_pack(tmp_path: Path, blocks: list[bytes], threads: int, codec: int = 1) -> Path:
    """A pack of ``blocks`` coded by :func:`encode_blocks` (``codec``) in runs of 7 on
    ``threads`` threads at once, appended in order."""
    from concurrent.futures import ThreadPoolExecutor

    from cbt.format.pack import encode_blocks

    pairs = [(blake3.blake3(b).digest(), b) for b in blocks]
    runs = [pairs[k:k + 7] for k in range(0, len(pairs), 7)]
    w = PackWriter()
    with ThreadPoolExecutor(threads) as pool:
        for coded in pool.map(lambda run: encode_blocks(run, None, codec), runs):
            for blob in coded:
                w.add_coded(blob)
    path = tmp_path / f"{w.pack_id}.pack"
    path.write_bytes(b"".join(bytes(b) for b in w.finish()))
    return path


@pytest.mark.parametrize("codec", [1, 2], ids=["zstd", "lz4"])
@pytest.mark.parametrize("threads", [1, 4])
def test_blocks_coded_on_threads_decode_in_order(tmp_path: Path, threads: int,
                                                  codec: int) -> None:
    """Blocks compressed on several threads at once (a context each) land in the pack in
    the order given, each decoding (the helpers' own reader: pyarrow's zstd and lz4_raw)
    to itself."""
    blocks = _blocks() * 3
    truth = walk_pack(_coded_pack(tmp_path, blocks, threads, codec))
    assert [b.digest for b in truth] == [blake3.blake3(b).digest() for b in blocks]
    assert [b.raw for b in truth] == [len(b) for b in blocks]
    assert {b.codec for b in truth} == {0, codec}
    assert all(b.stored < b.raw for b in truth if b.codec == codec)


def test_coder_backs_off_after_incompressible_blocks() -> None:
    """After a block that does not shrink, the next 1, 2, 4, then 8 are stored raw
    untried; a block that compresses resets it (what ``PackWriter.add`` does too)."""
    from cbt.format.pack import CODEC_NONE, CODEC_ZSTD, Coder

    rng = np.random.default_rng(3)
    noise = [rng.integers(0, 256, 1024, dtype=np.uint8).tobytes() for _ in range(40)]
    tried = []
    coder = Coder()
    for b in noise:
        before = coder.skip
        codec, payload = coder.code(b)
        assert codec == CODEC_NONE and bytes(payload) == b
        tried.append(before == 0)
    assert [i for i, t in enumerate(tried) if t] == [0, 2, 5, 10, 19, 28, 37]
    assert coder.code(b"\0" * 1024)[0] == CODEC_NONE  # still skipping: 38, 39...
    coder.skip = 0
    assert coder.code(b"\0" * 1024)[0] == CODEC_ZSTD and coder.backoff == 0


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "sealed"])
def test_a_run_that_starts_compressible_is_coded_in_one_call_each_block_as_it_shrinks(
        encrypted: bool) -> None:
    """encode_blocks with zstd: a run whose first block compresses has the rest coded by
    one call, each block zstd only if that made it smaller (incompressible ones raw, no
    back-off); a run whose first block does not compress goes block by block, backing off
    (Coder's own order).  Every payload opens and decodes to its block."""
    from cbt.core.crypto import Cipher
    from cbt.format.pack import (
        CODEC_NONE,
        CODEC_ZSTD,
        ENCRYPTION_AEAD,
        ENCRYPTION_NONE,
        Coder,
        blob_aad,
        encode_blocks,
    )

    cipher = Cipher("aes-256-gcm", bytes(range(32))) if encrypted else None
    blocks = _blocks()  # (every third block incompressible, starting with the first)
    pairs = [(blake3.blake3(b).digest(), b) for b in blocks]
    for run in (pairs[1:30], pairs[:30]):
        coded = encode_blocks(run, cipher)
        assert [c[0] for c in coded] == [d for d, _ in run]
        if run[0][1] == blocks[1]:  # compressible first: every block as it shrinks
            want = [CODEC_NONE if (i + 1) % 3 == 0 else CODEC_ZSTD for i in range(len(run))]
        else:  # block by block with the back-off, exactly as a Coder
            coder = Coder()
            want = [coder.code(b)[0] for _, b in run]
        assert [c[1] for c in coded] == want
        for (digest, data), (_, codec, enc, payload, raw) in zip(run, coded, strict=True):
            assert raw == len(data)
            assert enc == (ENCRYPTION_AEAD if encrypted else ENCRYPTION_NONE)
            if cipher is not None:
                payload = cipher.open(payload, blob_aad(digest, codec, raw))
            got = (bytes(payload) if codec == CODEC_NONE else
                   pa.Codec("zstd").decompress(payload, decompressed_size=raw, asbytes=True))
            assert got == data


def test_a_zstd_run_with_an_empty_block_is_coded_block_by_block() -> None:
    """zstandard's many-input call refuses an empty input: a run holding one (no backup
    makes it, a caller might) is coded one block at a time, each decoding to itself."""
    from cbt.format.pack import CODEC_NONE, encode_blocks

    blocks = [b"a" * 4096, b"", b"b" * 4096]
    coded = encode_blocks([(blake3.blake3(b).digest(), b) for b in blocks])
    for data, (_, codec, _, payload, raw) in zip(blocks, coded, strict=True):
        got = (bytes(payload) if codec == CODEC_NONE else
               pa.Codec("zstd").decompress(payload, decompressed_size=raw, asbytes=True))
        assert got == data

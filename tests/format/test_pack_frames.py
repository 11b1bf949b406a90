"""Many zstd frames decompressed at once (``decompress_many``), only when each span is
exactly one frame of the block's length (``exact_frames``, which reads the frame format
itself): against the ``zstandard`` package as the oracle, frame variant by variant."""

from __future__ import annotations

import os

import numpy as np
import pytest
import zstandard

from cbt.format.pack import FrameError, decompress_many, exact_frames

BS = 16 << 10


def _text(n: int, seed: int = 0) -> bytes:
    return (f"line {seed} of some text ".encode() * (n // 8 + 1))[:n]


def _variants() -> dict[str, tuple[bytes, int, bool]]:
    """name -> (span, raw length, whether it is exactly one frame of that length)."""
    one = zstandard.ZstdCompressor(level=1)
    data = _text(BS)
    frame = one.compress(data)
    big = _text(1 << 20, 7)  # several 128 KiB blocks in one frame
    noisy = os.urandom(BS)  # a raw block inside the frame
    rle = bytes([7]) * BS  # an RLE block
    skippable = (0x184D2A50).to_bytes(4, "little") + (4).to_bytes(4, "little") + b"abcd"
    return {
        "plain": (frame, BS, True),
        "checksum": (zstandard.ZstdCompressor(level=1, write_checksum=True).compress(data),
                     BS, True),
        "level 19": (zstandard.ZstdCompressor(level=19).compress(data), BS, True),
        "several blocks": (one.compress(big), len(big), True),
        "raw block": (one.compress(noisy), BS, True),
        "rle block": (one.compress(rle), BS, True),
        "short block": (one.compress(data[:100]), 100, True),
        "no content size": (zstandard.ZstdCompressor(level=1, write_content_size=False)
                            .compress(data), BS, False),
        "bytes after": (frame + b"more", BS, False),
        "one byte after": (frame + b"\0", BS, False),
        "two frames": (frame + frame, BS, False),
        "skippable after": (frame + skippable, BS, False),
        "cut short": (frame[:-3], BS, False),
        "header only": (frame[:8], BS, False),
        "other length": (frame, BS - 1, False),
        "not a frame": (os.urandom(200), BS, False),
        "empty": (b"", BS, False),
    }


def test_exact_frames_takes_exactly_one_frame_of_raw_bytes() -> None:
    variants = _variants()
    spans = [v[0] for v in variants.values()]
    data = b"junk" + b"".join(spans) + b"tail"
    lens = np.array([len(s) for s in spans], dtype=np.int64)
    starts = 4 + np.cumsum(lens) - lens
    got = exact_frames(memoryview(data), starts, starts + lens,
                       np.array([v[1] for v in variants.values()], dtype=np.int64))
    assert dict(zip(variants, got.tolist(), strict=True)) == {
        k: v[2] for k, v in variants.items()}


def test_exact_frames_agree_with_zstandard_on_frames_of_every_kind() -> None:
    """Random content of many lengths, compressed at several levels, with and without a
    checksum: every frame is exact at its length, none at another; the oracle says what
    each holds."""
    rng = np.random.default_rng(17)
    spans, raws = [], []
    for i in range(200):
        n = int(rng.integers(1, 300_000))
        kind = i % 3
        data = (_text(n, i) if kind == 0 else rng.integers(0, 4 if kind == 1 else 256, n,
                                                           dtype=np.uint8).tobytes())
        c = zstandard.ZstdCompressor(level=int(rng.choice([1, 3, 9])),
                                     write_checksum=bool(i % 2))
        spans.append(c.compress(data))
        raws.append(n)
        assert zstandard.ZstdDecompressor().decompress(spans[-1]) == data
    data = b"".join(spans)
    lens = np.array([len(s) for s in spans], dtype=np.int64)
    starts = np.cumsum(lens) - lens
    raw = np.array(raws, dtype=np.int64)
    assert exact_frames(data, starts, starts + lens, raw).all()
    assert not exact_frames(data, starts, starts + lens, raw + 1).any()
    assert not exact_frames(data, starts, starts + lens - 1, raw).any()
    out = decompress_many(data, starts, starts + lens, raw)
    dctx = zstandard.ZstdDecompressor()
    assert [bytes(v) for v in out] == [dctx.decompress(s) for s in spans]


def test_decompress_many_decompresses_sound_frames_and_names_the_first_bad_one() -> None:
    variants = _variants()
    good = {k: v for k, v in variants.items() if v[2] or k == "no content size"}
    spans = [v[0] for v in good.values()]
    raws = [v[1] for v in good.values()]
    data = b"".join(spans)
    lens = np.array([len(s) for s in spans], dtype=np.int64)
    starts = np.cumsum(lens) - lens
    out = decompress_many(data, starts, starts + lens, np.array(raws, dtype=np.int64))
    dctx = zstandard.ZstdDecompressor()
    assert [bytes(v) for v in out] == [dctx.decompress(s, max_output_size=n)
                                       for s, n in zip(spans, raws, strict=True)]
    for name, (span, raw, exact) in variants.items():
        if exact or name == "no content size":
            continue
        frames = [spans[0], span, spans[0]]
        data = b"".join(frames)
        lens = np.array([len(s) for s in frames], dtype=np.int64)
        starts = np.cumsum(lens) - lens
        with pytest.raises(FrameError) as exc:
            decompress_many(data, starts, starts + lens, np.array([BS, raw, BS]))
        assert exc.value.item == 1, name
        assert "\n" not in str(exc.value)

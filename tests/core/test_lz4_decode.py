"""cbt's own LZ4 block decoder and the restore loop built on it (``decode_check``).

Truth is the ``lz4`` package (the format's reference library, bundled in it): every
block it writes decodes to exactly its input, byte for byte; blocks crafted here
sequence by sequence decode to what the package decodes them to; and on damaged or
hostile input the decoder never touches a byte outside its two buffers (guard bytes
around the output stay as they were) and accepts nothing the package would decode
to something else.  ``decode_check`` runs against both the compiled core and the
pure-Python reference (``impl``), its digests from the ``blake3`` package.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import blake3
import lz4.block
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cbt.core.native
import cbt.core.reference
from cbt.core.errors import CbtValueError
from cbt.format.pack import CODEC_LZ4, CODEC_NONE, CODEC_ZSTD

FAST = importlib.import_module("cbt.core._fast")
GUARD = 64  # bytes on each side of an output that must stay untouched
RNG = np.random.default_rng(17)


def _text(n: int) -> bytes:
    """Compressible, file-system-like content: this repository's own sources, repeated."""
    here = Path(cbt.core.native.__file__).parent
    src = b"".join(p.read_bytes() for p in sorted(here.glob("*.py")))
    return (src * (n // len(src) + 1))[:n]


def _kinds(n: int) -> dict[str, bytes]:
    rnd = RNG.integers(0, 256, n, dtype=np.uint8).tobytes()
    sparse = bytearray(n)
    for at in RNG.integers(0, max(n, 1), n // 97 + 1).tolist():
        if at < n:
            sparse[at] = at % 251 + 1
    return {"random": rnd, "zeros": bytes(n), "sparse": bytes(sparse), "text": _text(n),
            "half": rnd[: n // 2] + bytes(n - n // 2),
            **{f"period{p}": (bytes(range(1, p + 1)) * (n // p + 1))[:n]
               for p in (1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 31, 33)}}


def _decode(src: bytes, size: int) -> tuple[bool, bytes]:
    """Our decoder into the middle of a guarded buffer; the guards must survive."""
    buf = np.full(size + 2 * GUARD, 0xA5, dtype=np.uint8)
    ok = FAST.lz4_decode(src, buf[GUARD:GUARD + size])
    assert (buf[:GUARD] == 0xA5).all() and (buf[GUARD + size:] == 0xA5).all(), \
        "wrote outside its output"
    return ok, buf[GUARD:GUARD + size].tobytes()


def _package(src: bytes, size: int) -> bytes | None:
    try:
        out: bytes = lz4.block.decompress(src, uncompressed_size=size)
    except (lz4.block.LZ4BlockError, ValueError):
        return None
    return out if len(out) == size else None


def _compressed(data: bytes, mode: str) -> bytes:
    if mode == "hc":
        return lz4.block.compress(data, mode="high_compression", compression=12,
                                  store_size=False)
    if mode == "fast":
        return lz4.block.compress(data, mode="fast", acceleration=8, store_size=False)
    return lz4.block.compress(data, store_size=False)


# -- exactness on what the lz4 package writes ----------------------------------

SIZES = sorted({*range(0, 300), *range(4096 - 40, 4096 + 40), *range(16384 - 40, 16384 + 40),
                1000, 1023, 1024, 1025, 2048, 8191, 8192, 65535, 65536, 65537, 70000})


@pytest.mark.parametrize("mode", ["default", "hc", "fast"])
def test_every_block_the_package_writes_decodes_exactly(mode: str) -> None:
    """Every kind of content at every length from 0 to 300 and around 4, 16 and 64 KiB,
    compressed by the package in its three modes (their sequences differ): our decoder
    gives back exactly the input."""
    pool = _kinds(70000)
    for size in SIZES:
        for kind, data in pool.items():
            block = data[:size]
            src = _compressed(block, mode)
            ok, got = _decode(src, size)
            assert ok and got == block, f"{kind} {size} bytes ({mode})"


def test_real_disk_content_decodes_exactly() -> None:
    """Blocks of a real file system's files (this machine's Python library), 16 KiB each."""
    import sysconfig

    lib = Path(sysconfig.get_paths()["stdlib"])
    data = b"".join(p.read_bytes() for p in sorted(lib.glob("*.py"))[:200])
    for at in range(0, len(data) - 16384, 16384):
        block = data[at:at + 16384]
        ok, got = _decode(_compressed(block, "default"), len(block))
        assert ok and got == block


# -- crafted sequences ----------------------------------------------------------


def _length(n: int) -> bytes:
    """The extra length bytes of a length >= 15 (its token nibble being 15)."""
    n -= 15
    return b"\xff" * (n // 255) + bytes([n % 255])


def _encode(seqs: list[tuple[bytes, int, int]], last: bytes) -> bytes:
    """An lz4 block of sequences (literals, offset, match length) and the last literals."""
    out = bytearray()
    for lit, off, ml in seqs:
        token = (min(len(lit), 15) << 4) | min(ml - 4, 15)
        out.append(token)
        if len(lit) >= 15:
            out += _length(len(lit))
        out += lit
        out += off.to_bytes(2, "little")
        if ml - 4 >= 15:
            out += _length(ml - 4)
    out.append(min(len(last), 15) << 4)
    if len(last) >= 15:
        out += _length(len(last))
    out += last
    return bytes(out)


def _random_block(rng: np.random.Generator) -> tuple[bytes, int]:
    """Random valid sequences: literal runs of 0 to 600 bytes (length bytes included),
    matches of every offset from 1 up and lengths from 4 to 700, the format's end rules
    kept (a match ends 5 or more bytes before the end and starts 12 or more before it:
    the last literals are 8 or more)."""
    seqs = []
    made = 0
    for _ in range(int(rng.integers(1, 40))):
        lit = rng.integers(0, 256, int(rng.choice([0, 1, 3, 14, 15, 16, 17, 40, 270, 600])),
                           dtype=np.uint8).tobytes()
        made += len(lit)
        if made == 0:
            lit, made = b"\x07", 1
        off = int(rng.choice([1, 2, 3, 4, 7, 8, 9, 15, 16, 17, 31, 32, 33, 100, made]))
        off = min(off, made, 65535)
        ml = int(rng.choice([4, 5, 8, 15, 18, 19, 20, 33, 64, 270, 700]))
        seqs.append((lit, off, ml))
        made += ml
    # (the last match starts 12 or more bytes before the end: 8 literals after a 4-byte one)
    last = rng.integers(0, 256, int(rng.choice([8, 9, 12, 15, 16, 40])), dtype=np.uint8).tobytes()
    return _encode(seqs, last), made + len(last)


@pytest.mark.parametrize("seed", range(40))
def test_crafted_sequences_decode_as_the_package_decodes_them(seed: int) -> None:
    """Long literal and match lengths (one or more 255 bytes), every short offset (the
    overlapping copies of a repeated pattern) and matches near the block's end (where no
    whole 16-byte copy fits): the same bytes as the package."""
    rng = np.random.default_rng(seed)
    for _ in range(25):
        src, size = _random_block(rng)
        want = _package(src, size)
        assert want is not None, "a crafted block the package refuses: the test is wrong"
        ok, got = _decode(src, size)
        assert ok and got == want


@pytest.mark.parametrize("src, size, why", [
    (b"", 0, "no input"),
    (b"\x01", 0, "an empty block is the one byte 0"),
    (b"\x00\x00", 0, "an empty block is the one byte 0, alone"),
    (bytes([0x40]) + b"abcd" + b"\x00\x00" + bytes([0x50]) + b"abcde", 13, "offset 0"),
    (bytes([0x40]) + b"abcd" + b"\x05\x00" + bytes([0x50]) + b"abcde", 13, "before the start"),
    (bytes([0x40]) + b"abcd" + b"\x04\x00", 8, "ends with a match"),
    (bytes([0x50]) + b"abcde", 6, "one byte short"),
    (bytes([0x50]) + b"abcde", 4, "one byte long"),
    (bytes([0x50]) + b"abcde" + b"x", 5, "bytes after the last literals"),
    (bytes([0xF0]), 15, "a length byte missing"),
    (bytes([0xF0, 0xFF]), 270, "a length that runs off the end"),
    (bytes([0x40]) + b"abcd" + b"\x04\x00", 12, "a match in the last 5 bytes"),
    (bytes([0x4F]) + b"abcd" + b"\x04\x00", 40, "a match length byte missing"),
])
def test_malformed_blocks_are_refused(src: bytes, size: int, why: str) -> None:
    ok, _ = _decode(src, size)
    assert not ok, why
    assert _package(src, size) is None, f"the package decodes it: {why}"


def test_a_match_starting_in_the_last_12_bytes_is_refused_as_the_package_refuses_it() -> None:
    """The format's end rule: 8 literals, then a match of 4 starting 9 bytes before the
    end, then 5 literals (17 bytes)."""
    src = _encode([(b"abcdefgh", 4, 4)], b"12345")
    assert _package(src, 17) is None
    assert not _decode(src, 17)[0]
    ok_src = _encode([(b"abcdefgh", 4, 4)], b"12345678")  # starts 12 before the end
    assert _decode(ok_src, 20) == (True, b"abcdefghefgh12345678") == (True, _package(ok_src, 20))


@settings(max_examples=400, deadline=None)
@given(st.binary(min_size=0, max_size=400), st.integers(0, 2000))
def test_garbage_never_escapes_its_buffers(src: bytes, size: int) -> None:
    """Any bytes at all: the guards survive, and whatever we accept the package decodes
    to the same bytes."""
    ok, got = _decode(src, size)
    if ok:
        assert _package(src, size) == got


@pytest.mark.parametrize("seed", range(6))
def test_damaged_blocks_never_escape_and_never_disagree(seed: int) -> None:
    """Real blocks cut short at every length, and with bytes flipped at random: never a
    write outside the output, never an output the package does not give."""
    rng = np.random.default_rng(100 + seed)
    data = list(_kinds(16384).values())[seed % 5]
    src = _compressed(data, "default")
    for cut in range(len(src)):
        ok, got = _decode(src[:cut], len(data))
        if ok:
            assert _package(src[:cut], len(data)) == got
    for _ in range(300):
        bad = bytearray(src)
        for at in rng.integers(0, len(bad), int(rng.integers(1, 4))).tolist():
            bad[at] = int(rng.integers(0, 256))
        ok, got = _decode(bytes(bad), len(data))
        if ok:
            assert _package(bytes(bad), len(data)) == got


# -- decode_check: the restore loop ---------------------------------------------


@pytest.fixture(scope="module", params=["fast", "reference"])
def impl(request: pytest.FixtureRequest) -> ModuleType:
    return cbt.core.native.fast if request.param == "fast" else cbt.core.reference


def test_codes_are_the_packs_own(impl: ModuleType) -> None:
    assert (impl.STORED_RAW, impl.STORED_LZ4) == (CODEC_NONE, CODEC_LZ4)
    assert len({impl.DECODE_OK, impl.DECODE_BAD_CODEC, impl.DECODE_BAD_PAYLOAD,
                impl.DECODE_BAD_DIGEST}) == 4


def _job(n: int, key: bytes | None = None, seed: int = 0) -> dict[str, object]:
    """n blocks of mixed content and sizes, stored raw or as lz4 blocks in one source
    buffer with gaps between them (as blobs lie in a pack)."""
    rng = np.random.default_rng(seed)
    pool = list(_kinds(20000).values())
    src, starts, ends, codecs, sizes, blocks = bytearray(), [], [], [], [], []
    for i in range(n):
        size = int(rng.choice([1, 100, 4096, 16384, 16383]))
        data = pool[int(rng.integers(0, len(pool)))][:size]
        data = bytes([i % 256]) + data[1:]
        packed = _compressed(data, "default")
        raw = rng.random() < 0.3 or len(packed) >= size
        payload = data if raw else packed
        src += bytes(int(rng.integers(0, 40)))
        starts.append(len(src))
        src += payload
        ends.append(len(src))
        codecs.append(CODEC_NONE if raw else CODEC_LZ4)
        sizes.append(size)
        blocks.append(data)
    digests = np.array([list((blake3.blake3(b) if key is None else blake3.blake3(b, key=key))
                             .digest()) for b in blocks], dtype=np.uint8).reshape(-1, 32)
    return {"src": bytes(src), "starts": np.array(starts, np.int64),
            "ends": np.array(ends, np.int64), "codecs": np.array(codecs, np.uint8),
            "sizes": np.array(sizes, np.int64), "digests": digests, "blocks": blocks}


def _run(impl: ModuleType, job: dict[str, object], key: bytes | None = None,
         extra: int = 0) -> tuple[tuple[int, int], bytes]:
    sizes = job["sizes"]
    out = np.zeros(int(sizes.sum()) + extra, np.uint8)  # type: ignore[attr-defined]
    got = impl.decode_check(job["src"], job["starts"], job["ends"], job["codecs"], sizes, out,
                            job["digests"], key)
    return got, out.tobytes()


@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 70])
@pytest.mark.parametrize("keyed", [False, True], ids=["plain", "keyed"])
def test_sound_blocks_land_one_after_another(impl: ModuleType, n: int, keyed: bool) -> None:
    key = bytes(range(32)) if keyed else None
    job = _job(n, key)
    got, out = _run(impl, job, key, extra=7)
    assert got == (-1, impl.DECODE_OK)
    assert out == b"".join(job["blocks"]) + bytes(7)  # type: ignore[arg-type]


def _damage(job: dict[str, object], i: int, how: str) -> None:
    if how == "digest":
        job["digests"][i, 5] ^= 1  # type: ignore[index]
    elif how == "codec":
        job["codecs"][i] = CODEC_ZSTD  # type: ignore[index]
    elif how == "payload":
        if job["codecs"][i] == CODEC_NONE:  # type: ignore[index]
            job["ends"][i] -= 1  # type: ignore[index]  # a raw one of another size
        else:
            job["sizes"][i] += 1  # type: ignore[index]  # lz4 that decodes to fewer bytes
    elif how == "outside":
        job["ends"][i] = len(job["src"]) + 1  # type: ignore[index, arg-type]


@pytest.mark.parametrize("how, why", [("digest", "DECODE_BAD_DIGEST"),
                                      ("codec", "DECODE_BAD_CODEC"),
                                      ("payload", "DECODE_BAD_PAYLOAD"),
                                      ("outside", "DECODE_BAD_PAYLOAD")])
@pytest.mark.parametrize("at", [0, 5, 15, 16, 33, 39])
def test_the_first_bad_block_is_named(impl: ModuleType, how: str, why: str, at: int) -> None:
    job = _job(40, seed=at)
    _damage(job, at, how)
    got, out = _run(impl, job)
    assert got == (at, getattr(impl, why))
    # the blocks before it are in place
    before = b"".join(job["blocks"][:at])  # type: ignore[index]
    assert out[:len(before)] == before


@pytest.mark.parametrize("first, second", [(18, 20), (20, 18), (3, 17), (17, 3)])
def test_of_two_bad_blocks_the_earlier_is_named(impl: ModuleType, first: int,
                                                second: int) -> None:
    """A bad digest and a bad payload, in one group of 16 or two, either order."""
    job = _job(40, seed=first)
    _damage(job, first, "digest")
    _damage(job, second, "codec")
    got, _ = _run(impl, job)
    assert got[0] == min(first, second)


def test_wrong_arguments_are_refused(impl: ModuleType) -> None:
    job = _job(3)
    with pytest.raises(CbtValueError):
        impl.decode_check(job["src"], job["starts"], job["ends"][:2], job["codecs"],
                          job["sizes"], np.zeros(1 << 16, np.uint8), job["digests"])
    with pytest.raises(CbtValueError):
        impl.decode_check(job["src"], job["starts"], job["ends"], job["codecs"], job["sizes"],
                          np.zeros(int(job["sizes"].sum()) - 1, np.uint8), job["digests"])
    neg = job["sizes"].copy()
    neg[1] = -1
    with pytest.raises(CbtValueError):
        impl.decode_check(job["src"], job["starts"], job["ends"], job["codecs"], neg,
                          np.zeros(1 << 16, np.uint8), job["digests"])
    huge = np.array([1 << 62] * 4, np.int64)  # (their sum overflows to 0)
    with pytest.raises(CbtValueError):
        impl.decode_check(b"\x00" * 4, np.zeros(4, np.int64), np.ones(4, np.int64),
                          np.full(4, CODEC_LZ4, np.uint8), huge, np.zeros(1 << 16, np.uint8),
                          np.zeros((4, 32), np.uint8))


# Blocks the lz4 package (liblz4 1.9.4) decodes to exactly their size but the format
# forbids (found by fuzzing against the system's liblz4): offset 0 (liblz4 copies the output
# onto itself), and a last match ending 3 bytes before the end (liblz4's shortcut for short
# sequences skips the end rules).  cbt's decoder refuses both; so must the reference.
_OFFSET_0 = bytes.fromhex("1f08000006500000010000")  # -> 31 bytes
_LOOSE_END = bytes.fromhex("dd") + b"abcdefghijklm" + bytes.fromhex("0d00") + b"\x30xyz"


@pytest.mark.parametrize(("src", "size"), [(_OFFSET_0, 31), (_LOOSE_END, 33)])
def test_blocks_the_format_forbids_are_refused_by_both(impl: ModuleType, src: bytes,
                                                       size: int) -> None:
    assert len(_package(src, size)) == size  # (the package decodes it)
    data = _package(src, size)
    digest = np.frombuffer(blake3.blake3(data).digest(), np.uint8).reshape(1, 32)
    assert not impl.lz4_decode(src, bytearray(size))
    assert impl.decode_check(src, np.array([0]), np.array([len(src)]),
                             np.array([CODEC_LZ4], np.uint8), np.array([size]),
                             bytearray(size), digest) == (0, impl.DECODE_BAD_PAYLOAD)


def test_an_unknown_codec_is_named_whatever_its_bounds(impl: ModuleType) -> None:
    assert impl.decode_check(b"abc", np.array([-1]), np.array([2]), np.array([7], np.uint8),
                             np.array([1]), bytearray(1), np.zeros((1, 32), np.uint8)
                             ) == (0, impl.DECODE_BAD_CODEC)


def test_none_is_refused() -> None:
    job = _job(1)
    with pytest.raises(TypeError):
        FAST.lz4_decode(None, bytearray(4))
    with pytest.raises(TypeError):
        FAST.decode_check(job["src"], job["starts"], job["ends"], job["codecs"], job["sizes"],
                          None, job["digests"])


@pytest.mark.parametrize("name", FAST.kernels())
def test_every_blake3_kernel_checks_the_same(name: str) -> None:
    """decode_check hashes with the running BLAKE3 kernel: each this CPU runs."""
    job = _job(40, bytes(32), seed=3)
    before = FAST.kernel
    try:
        FAST.use_kernel(name)
        assert _run(FAST, job, bytes(32))[0] == (-1, FAST.DECODE_OK)
        _damage(job, 21, "digest")
        assert _run(FAST, job, bytes(32))[0] == (21, FAST.DECODE_BAD_DIGEST)
    finally:
        FAST.use_kernel(before)

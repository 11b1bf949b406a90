"""The core, one test body against every implementation.

``impl`` runs each test against the compiled core (``cbt.core.native.fast``) and the
pure-Python reference (``cbt.core.reference``).  Expected values come from the
``blake3`` package and numpy directly, never from either implementation, so
the two agree because both are right.
"""

from __future__ import annotations

import importlib
import mmap
import sys
from types import ModuleType

import blake3
import numpy as np
import pytest
from helpers.truth import truth_hash, truth_ranges
from hypothesis import given
from hypothesis import strategies as st

import cbt
import cbt.core.native
import cbt.core.reference
from cbt.core.native import CoreMissingError

# ``import cbt._fast`` does not bind it: cbt/__init__ deletes its ``_fast`` name.
FAST = importlib.import_module("cbt.core._fast")

KIB = 1024
MIB = 1024 * KIB
BLOCK_SIZES = [1 << s for s in range(12, 23)]  # 4 KiB .. 4 MiB


@pytest.fixture(scope="module", params=["fast", "reference"])
def impl(request: pytest.FixtureRequest) -> ModuleType:
    return cbt.core.native.fast if request.param == "fast" else cbt.core.reference


def outputs(length: int, bs: int) -> tuple[np.ndarray, np.ndarray]:
    n = -(-length // bs)
    return np.full((n, 32), 0xAA, dtype=np.uint8), np.full(n, 0xAA, dtype=np.uint8)


def hashed(impl: ModuleType, data: object, bs: int) -> tuple[np.ndarray, np.ndarray, int]:
    digests, flags = outputs(len(data), bs)  # type: ignore[arg-type]
    count = impl.hash_blocks(data, bs, digests, flags)
    return digests, flags, count


_BIG = np.random.default_rng(7).integers(0, 256, size=3 * (4 * MIB) + 4 * MIB // 3,
                                         dtype=np.uint8)


# -- hash_blocks ----------------------------------------------------------------


def test_implementations_share_constants(impl: ModuleType) -> None:
    assert impl.API_VERSION == cbt.core.native.EXPECTED_API_VERSION
    assert (impl.DIGEST_SIZE, impl.FLAG_DATA, impl.FLAG_ZERO, impl.FLAG_HOLE) == (32, 0, 1, 2)
    assert (impl.MIN_BLOCK, impl.MAX_BLOCK) == (4 * KIB, 4 * MIB)
    assert isinstance(impl.kernel, str) and impl.kernel


@pytest.mark.parametrize("bs", BLOCK_SIZES, ids=lambda b: f"{b // KIB}K")
def test_hash_blocks_every_block_size(impl: ModuleType, bs: int) -> None:
    """Two full blocks, a zero block between them, and a tail a third of a block long."""
    data = _BIG[:3 * bs + bs // 3].copy()
    data[bs:2 * bs] = 0
    digests, flags, count = hashed(impl, data, bs)
    assert flags.tolist() == [impl.FLAG_DATA, impl.FLAG_ZERO, impl.FLAG_DATA, impl.FLAG_DATA]
    assert count == 3
    for i in (0, 2, 3):
        block = data[i * bs:(i + 1) * bs].tobytes()
        assert digests[i].tobytes() == blake3.blake3(block).digest()
    assert len(data[3 * bs:]) == bs // 3
    assert digests[1].tobytes() == bytes(32)


def test_hash_blocks_tail_shorter_than_block(impl: ModuleType) -> None:
    bs = 4 * KIB
    data = _BIG[:bs + 1].tobytes()
    digests, flags, count = hashed(impl, data, bs)
    assert count == 2 and flags.tolist() == [0, 0]
    assert digests[1].tobytes() == blake3.blake3(data[bs:]).digest()


def test_hash_blocks_data_shorter_than_one_block(impl: ModuleType) -> None:
    data = b"\x01" * 100
    digests, flags, count = hashed(impl, data, 64 * KIB)
    assert (count, flags.tolist()) == (1, [0])
    assert digests[0].tobytes() == blake3.blake3(data).digest()


def test_hash_blocks_zero_tail_is_zero(impl: ModuleType) -> None:
    data = _BIG[:4 * KIB].tobytes() + bytes(10)
    digests, flags, count = hashed(impl, data, 4 * KIB)
    assert (count, flags.tolist()) == (1, [0, 1])
    assert digests[1].tobytes() == bytes(32)


def test_hash_blocks_empty(impl: ModuleType) -> None:
    digests = np.zeros((0, 32), dtype=np.uint8)
    flags = np.zeros(0, dtype=np.uint8)
    assert impl.hash_blocks(b"", 4 * KIB, digests, flags) == 0


@pytest.mark.parametrize("where", [0, 1, 4095, 2048])
def test_hash_blocks_single_nonzero_byte(impl: ModuleType, where: int) -> None:
    """A block that is zero but for one byte (first, last, anywhere) is data."""
    data = bytearray(3 * 4096)
    data[4096 + where] = 0x80
    digests, flags, count = hashed(impl, data, 4096)
    assert (count, flags.tolist()) == (1, [1, 0, 1])
    assert digests[1].tobytes() == blake3.blake3(bytes(data[4096:8192])).digest()
    assert digests[0].tobytes() == digests[2].tobytes() == bytes(32)


def test_golden_digest(impl: ModuleType) -> None:
    # Future optimizations must not change this, or existing vaults will stop
    # deduplicating: every stored block is keyed by these digests.
    golden = "3c24967b2bfe6125046598300a4bb52fc9814e327c51102b0bc1529c4283f30d"
    bs = 64 * KIB
    data = np.random.default_rng(12345).integers(0, 256, size=MIB + 100, dtype=np.uint8)
    data[3 * bs + 1000:9 * bs] = 0
    digests, flags, count = hashed(impl, data, bs)
    assert flags.tolist() == [0] * 4 + [1] * 5 + [0] * 8
    assert count == 12
    assert blake3.blake3(digests.tobytes() + flags.tobytes()).hexdigest() == golden


def test_keyed_block_ids(impl: ModuleType) -> None:
    # an encrypted vault names blocks by BLAKE3's keyed mode: same zero handling,
    # a different digest for every data block, equal to the blake3 package's
    key = bytes(range(32))
    bs = 4 * KIB
    data = np.random.default_rng(3).integers(0, 256, size=5 * bs + 7, dtype=np.uint8)
    data[bs:2 * bs] = 0
    digests, flags = outputs(len(data), bs)
    assert impl.hash_blocks(data, bs, digests, flags, key) == 5
    plain, _, _ = hashed(impl, data, bs)
    raw = data.tobytes()
    for i in range(6):
        block = raw[i * bs:(i + 1) * bs]
        if i == 1:
            assert flags[i] == impl.FLAG_ZERO and not digests[i].any()
            continue
        assert digests[i].tobytes() == blake3.blake3(block, key=key).digest()
        assert digests[i].tobytes() != plain[i].tobytes()
    each = np.zeros((2, 32), dtype=np.uint8)
    impl.hash_each([raw[:bs], memoryview(raw)[2 * bs:3 * bs]], each, key)
    assert each[0].tobytes() == blake3.blake3(raw[:bs], key=key).digest()
    assert each[1].tobytes() == digests[2].tobytes()


# -- accepted inputs --------------------------------------------------------------


def _inputs(raw: bytes, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    path = tmp_path_factory.mktemp("mmap") / "data"
    path.write_bytes(raw)
    with open(path, "rb") as f:
        ro_map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    anon = mmap.mmap(-1, len(raw))
    anon.write(raw)
    return {
        "bytes": raw,
        "bytearray": bytearray(raw),
        "memoryview": memoryview(raw),
        "mmap-anonymous": anon,
        "mmap-readonly-file": ro_map,
        "numpy": np.frombuffer(raw, dtype=np.uint8).copy(),
        "numpy-readonly": np.frombuffer(raw, dtype=np.uint8),
        "numpy-slice": np.frombuffer(b"\x01" * 64 + raw, dtype=np.uint8)[64:],
    }


def test_inputs_of_every_buffer_kind(impl: ModuleType,
                                     tmp_path_factory: pytest.TempPathFactory) -> None:
    bs = 4 * KIB
    raw = _BIG[:3 * bs + 77].tobytes() + bytes(bs)
    want_digests, want_flags = truth_hash(raw, bs)
    for name, data in _inputs(raw, tmp_path_factory).items():
        digests, flags, _ = hashed(impl, data, bs)
        assert np.array_equal(digests, want_digests), name
        assert np.array_equal(flags, want_flags), name
        zf = np.full(len(want_flags), 9, dtype=np.uint8)
        assert impl.zero_flags(data, bs, zf) == 1, name
        assert np.array_equal(zf, want_flags), name
        out = np.full(len(want_flags), 9, dtype=np.uint8)
        assert impl.compare_buffers(data, raw, bs, out) == 0, name
        assert not out.any(), name


def test_outputs_of_every_writable_kind(impl: ModuleType) -> None:
    bs = 4 * KIB
    raw = _BIG[:2 * bs + 5].tobytes()
    want_digests, want_flags = truth_hash(raw, bs)
    digests = bytearray(3 * 32)
    flags = mmap.mmap(-1, 3)
    impl.hash_blocks(raw, bs, memoryview(digests).cast("B", (3, 32)), flags)
    assert bytes(digests) == want_digests.tobytes()
    assert flags[:] == want_flags.tobytes()


def test_strided_input_is_refused(impl: ModuleType) -> None:
    bs = 4 * KIB
    arr = np.ones(2 * bs * 2, dtype=np.uint8)[::2]
    digests, flags = outputs(len(arr), bs)
    with pytest.raises(ValueError):
        impl.hash_blocks(arr, bs, digests, flags)
    with pytest.raises(ValueError):
        impl.zero_flags(arr, bs, flags)
    with pytest.raises(ValueError):
        impl.compare_buffers(arr, np.ones(len(arr), dtype=np.uint8), bs,
                             np.zeros(2, dtype=np.uint8))


@pytest.mark.parametrize("shape", ["few-rows", "many-rows", "narrow", "flat-digests",
                                   "short-flags", "long-flags"])
def test_wrongly_shaped_outputs_are_refused(impl: ModuleType, shape: str) -> None:
    bs = 4 * KIB
    data = _BIG[:3 * bs + 1].tobytes()  # 4 blocks
    digests = {"few-rows": np.zeros((3, 32), np.uint8), "many-rows": np.zeros((5, 32), np.uint8),
               "narrow": np.zeros((4, 31), np.uint8), "flat-digests": np.zeros(128, np.uint8),
               }.get(shape, np.zeros((4, 32), np.uint8))
    flags = {"short-flags": np.zeros(3, np.uint8),
             "long-flags": np.zeros(5, np.uint8)}.get(shape, np.zeros(4, np.uint8))
    with pytest.raises(ValueError):
        impl.hash_blocks(data, bs, digests, flags)
    if shape.endswith("flags"):
        with pytest.raises(ValueError):
            impl.zero_flags(data, bs, flags)
        with pytest.raises(ValueError):
            impl.compare_buffers(data, data, bs, flags)


def test_output_of_wrong_dtype_is_refused(impl: ModuleType) -> None:
    """A uint16 digest array of the right shape is not a place for bytes."""
    bs = 4 * KIB
    data = _BIG[:bs].tobytes()
    with pytest.raises(ValueError):
        impl.hash_blocks(data, bs, np.zeros((1, 32), np.uint16), np.zeros(1, np.uint8))


@pytest.mark.parametrize("bs", [0, 1, 512, 2048, 4095, 5000, 4096 + 1, 12288, 65535,
                                3 * MIB, 8 * MIB, -4096])
def test_bad_block_size_is_refused(impl: ModuleType, bs: int) -> None:
    data = bytes(64 * KIB)
    for call in (
        lambda: impl.check_block_size(bs),
        lambda: impl.hash_blocks(data, bs, np.zeros((1, 32), np.uint8), np.zeros(1, np.uint8)),
        lambda: impl.zero_flags(data, bs, np.zeros(1, np.uint8)),
        lambda: impl.compare_buffers(data, data, bs, np.zeros(1, np.uint8)),
        lambda: impl.bitmap_runs(np.zeros(1, np.uint8), bs, len(data)),
    ):
        with pytest.raises(ValueError) as info:
            call()
        assert isinstance(info.value, cbt.CbtError)


@pytest.mark.parametrize("bs", BLOCK_SIZES)
def test_valid_block_sizes_pass(impl: ModuleType, bs: int) -> None:
    impl.check_block_size(bs)
    assert impl.nblocks(0, bs) == 0
    assert impl.nblocks(1, bs) == 1
    assert impl.nblocks(bs, bs) == 1
    assert impl.nblocks(bs + 1, bs) == 2


# -- compare_digests / compare_buffers / bitmap_runs ---------------------------------


def test_compare_digests(impl: ModuleType) -> None:
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, size=(50, 32), dtype=np.uint8)
    b = a.copy()
    changed = [0, 7, 8, 31, 49]
    for i in changed:
        b[i, i % 32] ^= 0x01  # one bit, at a different byte of each row
    out = np.full(50, 7, dtype=np.uint8)
    assert impl.compare_digests(a, b, out) == len(changed)
    assert np.flatnonzero(out).tolist() == changed
    assert set(out.tolist()) == {0, 1}


def test_compare_digests_empty(impl: ModuleType) -> None:
    empty = np.zeros((0, 32), np.uint8)
    assert impl.compare_digests(empty, empty, np.zeros(0, np.uint8)) == 0


@pytest.mark.parametrize("case", ["rows", "out", "width", "flat"])
def test_compare_digests_refuses_bad_shapes(impl: ModuleType, case: str) -> None:
    a = np.zeros((4, 32), np.uint8)
    b, out = a.copy(), np.zeros(4, np.uint8)
    if case == "rows":
        b = np.zeros((5, 32), np.uint8)
    elif case == "out":
        out = np.zeros(3, np.uint8)
    elif case == "width":
        a, b = np.zeros((4, 16), np.uint8), np.ones((4, 16), np.uint8)
    else:
        a, b = np.zeros(4, np.uint8), np.ones(4, np.uint8)
    with pytest.raises(ValueError):
        impl.compare_digests(a, b, out)


def test_compare_buffers(impl: ModuleType) -> None:
    bs = 4 * KIB
    a = _BIG[:5 * bs + 100].copy()
    b = a.copy()
    b[bs - 1] ^= 1  # last byte of block 0
    b[2 * bs] ^= 1  # first byte of block 2
    b[-1] ^= 1  # last byte of the short tail block 5
    out = np.full(6, 7, dtype=np.uint8)
    assert impl.compare_buffers(a, b, bs, out) == 3
    assert out.tolist() == [1, 0, 1, 0, 0, 1]


def test_compare_buffers_refuses_different_lengths(impl: ModuleType) -> None:
    with pytest.raises(ValueError) as info:
        impl.compare_buffers(bytes(8192), bytes(8191), 4096, np.zeros(2, np.uint8))
    assert isinstance(info.value, cbt.CbtError)


def test_bitmap_runs_merged_and_clipped(impl: ModuleType) -> None:
    bs = 4 * KIB
    bits = np.array([1, 1, 0, 1, 0, 0, 1, 1, 1], dtype=np.uint8)
    total = 8 * bs + 10  # the last block is 10 bytes long
    runs = impl.bitmap_runs(bits, bs, total)
    assert runs.dtype == np.uint64 and runs.shape == (3, 2)
    assert runs.tolist() == [[0, 2 * bs], [3 * bs, bs], [6 * bs, 2 * bs + 10]]


def test_bitmap_runs_nonzero_values_count_as_set(impl: ModuleType) -> None:
    runs = impl.bitmap_runs(np.array([0, 5, 255, 0], np.uint8), 4096, 4 * 4096)
    assert runs.tolist() == [[4096, 8192]]


def test_bitmap_runs_empty(impl: ModuleType) -> None:
    for bits in (np.zeros(0, np.uint8), np.zeros(10, np.uint8)):
        runs = impl.bitmap_runs(bits, 4096, 10 * 4096)
        assert runs.shape == (0, 2) and runs.dtype == np.uint64


# -- property-based: against blake3/numpy truth, which makes them agree ----------------


@st.composite
def buffers(draw: st.DrawFn) -> tuple[np.ndarray, int]:
    bs = 1 << draw(st.integers(12, 16))
    length = draw(st.integers(0, 5)) * bs + draw(st.one_of(st.just(0), st.integers(1, bs - 1)))
    if draw(st.booleans()):
        seed = draw(st.integers(0, 2**32 - 1))
        data = np.random.default_rng(seed).integers(0, 256, size=length, dtype=np.uint8)
    else:
        data = np.zeros(length, dtype=np.uint8)
    for _ in range(draw(st.integers(0, 4))):  # zero runs, often across block boundaries
        start = draw(st.integers(0, length))
        data[start:start + draw(st.integers(0, 2 * bs))] = 0
    if length:
        for pos in draw(st.lists(st.integers(0, length - 1), max_size=4)):
            data[pos] = draw(st.integers(1, 255))
    return data, bs


@given(buffers())
def test_property_hash_and_zero_flags(impl: ModuleType, case: tuple[np.ndarray, int]) -> None:
    data, bs = case
    want_digests, want_flags = truth_hash(data, bs)
    digests, flags, count = hashed(impl, data, bs)
    assert np.array_equal(flags, want_flags)
    assert np.array_equal(digests, want_digests)
    assert count == int((want_flags == 0).sum())
    zf = np.full(len(want_flags), 9, dtype=np.uint8)
    assert impl.zero_flags(data, bs, zf) == int((want_flags == 1).sum())
    assert np.array_equal(zf, want_flags)


@given(buffers(), st.data())
def test_property_compare(impl: ModuleType, case: tuple[np.ndarray, int],
                          more: st.DataObject) -> None:
    a, bs = case
    b = a.copy()
    if len(a):
        for pos in more.draw(st.lists(st.integers(0, len(a) - 1), max_size=6)):
            b[pos] ^= more.draw(st.integers(1, 255))
    n = -(-len(a) // bs)
    pad = np.zeros(n * bs - len(a), np.uint8)
    want = (np.concatenate([a, pad]).reshape(n, bs)
            != np.concatenate([b, pad]).reshape(n, bs)).any(axis=1).astype(np.uint8)
    out = np.full(n, 9, dtype=np.uint8)
    assert impl.compare_buffers(a, b, bs, out) == int(want.sum())
    assert np.array_equal(out, want)
    # The same answer from digests: equal blocks, equal digests (zero blocks included).
    da, _, _ = hashed(impl, a, bs)
    db, _, _ = hashed(impl, b, bs)
    out2 = np.full(n, 9, dtype=np.uint8)
    assert impl.compare_digests(da, db, out2) == int(want.sum())
    assert np.array_equal(out2, want)


@given(st.lists(st.booleans(), max_size=200), st.integers(12, 22), st.data())
def test_property_bitmap_runs(impl: ModuleType, bits: list[bool], shift: int,
                              more: st.DataObject) -> None:
    bs = 1 << shift
    n = len(bits)
    total = more.draw(st.integers((n - 1) * bs + 1, n * bs)) if n else 0
    bitmap = np.array(bits, dtype=np.uint8)
    runs = impl.bitmap_runs(bitmap, bs, total)
    assert runs.dtype == np.uint64
    assert runs.tolist() == truth_ranges(bitmap, bs, total)
    assert int(runs[:, 1].sum()) == sum(min(bs, total - i * bs) for i in range(n) if bits[i])


@given(buffers())
def test_property_native_equals_reference(case: tuple[np.ndarray, int]) -> None:
    data, bs = case
    d1, f1, c1 = hashed(cbt.core.native.fast, data, bs)
    d2, f2, c2 = hashed(cbt.core.reference, data, bs)
    assert c1 == c2
    assert np.array_equal(f1, f2) and np.array_equal(d1, d2)


# -- loading the compiled core -------------------------------------------------------


def test_load_returns_the_compiled_core() -> None:
    core = cbt.core.native.load()
    assert core is FAST
    assert core.__file__ is not None and not core.__file__.endswith(".py")


def test_load_refuses_a_stale_core(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FAST, "API_VERSION", cbt.core.native.EXPECTED_API_VERSION + 1)
    with pytest.raises(CoreMissingError, match="stale") as info:
        cbt.core.native.load()
    assert isinstance(info.value, ImportError)
    assert isinstance(info.value, cbt.CbtError)
    assert "pip install" in str(info.value)


def test_load_refuses_a_missing_core(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cbt.core._fast", None)  # import cbt._fast now fails
    with pytest.raises(CoreMissingError, match="missing") as info:
        cbt.core.native.load()
    assert isinstance(info.value, ImportError)


# -- hash_each (restore checks scattered blocks in one call) ----------------------------


@given(sizes=st.lists(st.integers(min_value=0, max_value=70_000), max_size=12),
       seed=st.integers(min_value=0, max_value=2**32 - 1))
def test_hash_each_equals_blake3_of_every_buffer(impl: ModuleType, sizes: list[int],
                                                 seed: int) -> None:
    rng = np.random.default_rng(seed)
    raw = [rng.integers(0, 256, size=n, dtype=np.uint8).tobytes() for n in sizes]
    # as bytes, as memoryviews into one larger buffer, and as numpy arrays
    joined = b"".join(raw)
    views, at = [], 0
    for r in raw:
        views.append(memoryview(joined)[at:at + len(r)])
        at += len(r)
    for bufs in (raw, views, [np.frombuffer(r, dtype=np.uint8) for r in raw]):
        out = np.full((len(raw), 32), 7, dtype=np.uint8)
        assert impl.hash_each(list(bufs), out) == len(raw)
        assert [bytes(row) for row in out] == [blake3.blake3(r).digest() for r in raw]


def test_hash_each_refuses_a_wrong_output(impl: ModuleType) -> None:
    with pytest.raises(ValueError):
        impl.hash_each([b"a", b"b"], np.zeros((1, 32), dtype=np.uint8))
    with pytest.raises(ValueError):
        impl.hash_each([b"a"], np.zeros((1, 16), dtype=np.uint8))

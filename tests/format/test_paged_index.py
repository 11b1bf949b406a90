"""Paged index segments: lookups, gathers and streaming against a plain reference, every
kind of damage as one error naming the segment, sealed segments, and memory bounds.

The truth is plain Python: a sorted list of the entries (``sorted`` of bytes) and a
dict from digest to row; ids are random, or built to share 8-, 16- or 24-byte
prefixes with stored ones (the fences see 8 bytes, the filter bytes 8..24).
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import os
import struct
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import blake3
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cbt.core.crypto import OVERHEAD, Cipher
from cbt.format import paged_index
from cbt.format.index_segment import CorruptIndexError
from cbt.format.paged_index import (
    ENTRY_SIZE,
    PAGE_ENTRIES,
    TRAILER_SIZE,
    PagedIndexError,
    PagedSegment,
    PagedWriter,
    trailer_entries,
)
from cbt.repo.segments import merge_paged

P = PAGE_ENTRIES
NAME = "index/0123abcd"


@pytest.fixture(autouse=True, scope="module")
def paged_only() -> Iterator[None]:
    """The tests here are of the paged reads: no segment is made resident (its whole
    decoded once) unless a test says so (:func:`resident_budget`)."""
    kept = paged_index.RESIDENT
    paged_index.RESIDENT = paged_index._Budget(0)
    yield
    paged_index.RESIDENT = kept


@contextlib.contextmanager
def resident_budget(nbytes: int) -> Iterator[paged_index._Budget]:
    kept = paged_index.RESIDENT
    paged_index.RESIDENT = budget = paged_index._Budget(nbytes)
    try:
        yield budget
    finally:
        paged_index.RESIDENT = kept


class Entries:
    """Entries in ascending digest order, and the plain truth about them."""

    def __init__(self, digests: list[bytes], rng: np.random.Generator, npacks: int = 7) -> None:
        self.list = sorted(set(digests))
        n = len(self.list)
        self.n = n
        self.packs = [uuid.UUID(bytes=rng.bytes(16)) for _ in range(npacks)]
        self.pack_of = [int(x) for x in rng.integers(0, npacks, n)]
        self.offset = [int(x) for x in rng.integers(0, 1 << 40, n)]
        self.stored = [int(x) for x in rng.integers(0, 1 << 24, n)]
        self.raw = [int(x) for x in rng.integers(0, 1 << 24, n)]
        self.row = {d: i for i, d in enumerate(self.list)}

    def arrays(self, lo: int = 0, hi: int | None = None) -> tuple[Any, ...]:
        sel = slice(lo, self.n if hi is None else hi)
        k = len(self.list[sel])
        return (np.frombuffer(b"".join(self.list[sel]), dtype=np.uint8).reshape(k, 32),
                np.frombuffer(b"".join(self.packs[p].bytes for p in self.pack_of[sel]),
                              dtype=np.uint8).reshape(k, 16),
                np.array(self.offset[sel], dtype=np.uint64),
                np.array(self.stored[sel], dtype=np.uint32),
                np.array(self.raw[sel], dtype=np.uint32))


def random_entries(n: int, seed: int = 1) -> Entries:
    rng = np.random.default_rng(seed)
    return Entries([rng.bytes(32) for _ in range(n)], rng)


def colliding_entries(seed: int = 2) -> Entries:
    """Random ids, plus runs sharing an 8-byte prefix (one run longer than two pages,
    so it crosses page boundaries) and pairs sharing 16 bytes."""
    rng = np.random.default_rng(seed)
    ids = [rng.bytes(32) for _ in range(3 * P)]
    for run in (2 * P + 40, 5, P):
        prefix = rng.bytes(8)
        ids += [prefix + rng.bytes(24) for _ in range(run)]
    for _ in range(50):
        prefix = rng.bytes(16)
        ids += [prefix + rng.bytes(16), prefix + rng.bytes(16)]
    return Entries(ids, rng)


def write(entries: Entries, *, cipher: Cipher | None = None, name: str = NAME,
          sizes: list[int] | None = None, total: int | None = None) -> bytes:
    out = bytearray()
    w = PagedWriter(out.extend, total=entries.n if total is None else total, name=name,
                    cipher=cipher)
    cuts = [0]
    for s in sizes or [entries.n]:
        cuts.append(min(entries.n, cuts[-1] + s))
    if cuts[-1] < entries.n:
        cuts.append(entries.n)
    for lo, hi in itertools.pairwise(cuts):
        w.add(*entries.arrays(lo, hi))
    assert w.finish() == len(out)
    return bytes(out)


def open_bytes(data: bytes, *, cipher: Cipher | None = None, name: str = NAME,
               reads: list[tuple[int, int]] | None = None) -> PagedSegment:
    def read_range(offset: int, length: int) -> bytes:
        if reads is not None:
            reads.append((offset, length))
        return data[offset:offset + length]

    return PagedSegment.open(read_range, len(data), name=name, where=f"vault:{name}",
                             cipher=cipher)


def as_array(ids: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(ids), dtype=np.uint8).reshape(len(ids), 32)


def check_all(seg: PagedSegment, e: Entries, queries: list[bytes]) -> None:
    """lookup, gather and chunks against the plain truth."""
    assert seg.n == e.n
    assert seg.pack_ids == [p.hex for p in seg_packs(e)]
    got = seg.lookup(as_array(queries)) if queries else seg.lookup(np.zeros((0, 32), np.uint8))
    assert got.tolist() == [e.row.get(q, -1) for q in queries]
    rows_found, entries = seg.find(as_array(queries) if queries else np.zeros((0, 32), np.uint8))
    assert rows_found.tolist() == got.tolist()
    hit = got >= 0
    assert [bytes(d) for d in entries["digests"][hit]] == [q for q in queries if q in e.row]
    assert not entries["digests"][~hit].any() and not entries["offset"][~hit].any()
    assert entries["offset"][hit].tolist() == [e.offset[r] for r in got[hit].tolist()]
    assert [seg.pack_ids[p] for p in entries["pack"][hit].tolist()] == [
        e.packs[e.pack_of[r]].hex for r in got[hit].tolist()]
    rows = [r for r in got.tolist() if r >= 0][::-1]
    g = seg.gather(np.array(rows, dtype=np.int64))
    assert [bytes(d) for d in g["digests"]] == [e.list[r] for r in rows]
    assert [seg.pack_ids[p] for p in g["pack"].tolist()] == [e.packs[e.pack_of[r]].hex
                                                             for r in rows]
    assert g["offset"].tolist() == [e.offset[r] for r in rows]
    assert g["stored"].tolist() == [e.stored[r] for r in rows]
    assert g["raw"].tolist() == [e.raw[r] for r in rows]
    digests, offsets = [], []
    for chunk in seg.chunks(entries=3 * P):
        assert len(chunk["offset"]) <= 3 * P
        digests += [bytes(d) for d in chunk["digests"]]
        offsets += chunk["offset"].tolist()
    assert digests == e.list
    assert offsets == e.offset


def seg_packs(e: Entries) -> list[uuid.UUID]:
    """The pack table in order of first appearance (the writer numbers packs so)."""
    seen: dict[uuid.UUID, None] = {}
    for p in e.pack_of:
        seen.setdefault(e.packs[p])
    return list(seen)


def absent(e: Entries, rng: np.random.Generator, k: int) -> list[bytes]:
    return [q for q in (rng.bytes(32) for _ in range(k)) if q not in e.row]


CIPHERS = [None, "aes-256-gcm"]


def cipher_of(kind: str | None) -> Cipher | None:
    return None if kind is None else Cipher(kind, bytes(range(32)))


# -- answers ----------------------------------------------------------------------


MODES = ["paged", "resident"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", CIPHERS)
@pytest.mark.parametrize("n", [0, 1, 2, P - 1, P, P + 1, 3 * P - 1, 3 * P, 3 * P + 1, 1000])
def test_lookup_gather_chunks_match_reference(n: int, kind: str | None, mode: str) -> None:
    cipher = cipher_of(kind)
    e = random_entries(n, seed=n)
    rng = np.random.default_rng(99)
    edges = [e.list[i] for i in {0, n - 1, P - 1, P, 2 * P - 1, 2 * P} if 0 <= i < n]
    present = [e.list[int(i)] for i in rng.integers(0, n, 200)] if n else []
    with resident_budget(1 << 30 if mode == "resident" else 0):
        seg = open_bytes(write(e, cipher=cipher), cipher=cipher)
        check_all(seg, e, edges + present + absent(e, rng, 300))
        assert (seg._resident is not None) == (mode == "resident" and n > 0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", CIPHERS)
def test_prefix_collisions(kind: str | None, mode: str) -> None:
    """Ids sharing 8, 16 or 24 bytes with stored ones (24: the filter cannot tell them
    apart, only the page search can), runs of one 8-byte prefix across pages."""
    with resident_budget(1 << 30 if mode == "resident" else 0):
        _prefix_collisions(kind)


def _prefix_collisions(kind: str | None) -> None:
    cipher = cipher_of(kind)
    e = colliding_entries()
    seg = open_bytes(write(e, cipher=cipher), cipher=cipher)
    rng = np.random.default_rng(5)
    queries = list(e.list)
    for d in e.list[::3]:
        for keep in (8, 16, 24, 31):
            q = d[:keep] + rng.bytes(32 - keep)
            if q not in e.row:
                queries.append(q)
    # just below and above a stored id: neighbours in the sort order
    for d in e.list[::5]:
        v = int.from_bytes(d, "big")
        for q in ((v - 1) % (1 << 256), (v + 1) % (1 << 256)):
            b = q.to_bytes(32, "big")
            if b not in e.row:
                queries.append(b)
    rng.shuffle(queries)  # type: ignore[arg-type]
    check_all(seg, e, queries)
    # the 24-byte neighbours pass the filter: the pages had to refuse them
    near = [q for q in queries[:2000] if q not in e.row and q[:24] in {d[:24] for d in e.list}]
    assert near and seg.maybe(as_array(near)).all()


@given(st.data())
def test_property_small_segments(data: st.DataObject) -> None:
    """Few distinct 8- and 16-byte prefixes (runs across pages), any split into add()
    calls, any queries: the reference's answers."""
    prefixes8 = data.draw(st.lists(st.binary(min_size=8, max_size=8), min_size=1, max_size=4))
    mids = data.draw(st.lists(st.binary(min_size=8, max_size=8), min_size=1, max_size=3))
    seed = data.draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    n = data.draw(st.integers(0, 3 * P + 2))
    ids = [prefixes8[int(rng.integers(len(prefixes8)))] + mids[int(rng.integers(len(mids)))]
           + rng.bytes(16) for _ in range(n)]
    e = Entries(ids, rng, npacks=data.draw(st.integers(1, 5)))
    sizes = data.draw(st.lists(st.integers(0, 2 * P), max_size=6))
    seg = open_bytes(write(e, sizes=sizes))
    queries = [d[:keep] + rng.bytes(32 - keep) for d in e.list[::7] for keep in (8, 16, 24)]
    check_all(seg, e, e.list + queries + [bytes(32), b"\xff" * 32])


def test_streamed_in_odd_calls_same_bytes() -> None:
    e = colliding_entries()
    one = write(e)
    for sizes in ([1] * 7 + [P - 3, 2 * P + 5, 1, 13], [e.n - 1, 1], [3, 0, 5, 0, 1000]):
        assert write(e, sizes=sizes) == one


def test_writer_keeps_no_view_of_the_callers_arrays() -> None:
    """A caller that reuses its buffers between add() calls (a reader filling one
    array again and again) gets the same segment."""
    e = random_entries(3 * P + 10)
    out = bytearray()
    w = PagedWriter(out.extend, total=e.n, name=NAME)
    for lo in range(0, e.n, 50):
        arrays = [a.copy() for a in e.arrays(lo, lo + 50)]
        w.add(*arrays)
        for a in arrays:
            a[...] = 0xFF  # overwritten before the page is written
    w.finish()
    assert bytes(out) == write(e)


def test_golden_bytes() -> None:
    """Future changes must not alter the layout of segments already written."""
    rng = np.random.default_rng(2026)
    e = Entries([rng.bytes(32) for _ in range(2 * P + 3)], rng, npacks=3)
    data = write(e)
    assert len(data) == (2 * P + 3) * ENTRY_SIZE + 3 * 16 + 3 * 25 + 64 * 7 + TRAILER_SIZE
    assert blake3.blake3(data).hexdigest()[:32] == GOLDEN


GOLDEN = "47cef4cc6fb802f5d34a156394337cba"


def test_total_is_an_upper_bound() -> None:
    e = random_entries(300)
    seg = open_bytes(write(e, total=10_000))
    check_all(seg, e, e.list[::7] + absent(e, np.random.default_rng(3), 100))


@pytest.mark.parametrize("kind", CIPHERS)
def test_empty_segment_with_room(kind: str | None) -> None:
    cipher = cipher_of(kind)
    e = random_entries(0)
    seg = open_bytes(write(e, cipher=cipher, total=50), cipher=cipher)
    q = as_array([bytes(32), b"\xff" * 32])
    assert seg.lookup(q).tolist() == [-1, -1]
    assert not seg.maybe(q).any()
    assert list(seg.chunks()) == []
    assert len(seg.gather(np.zeros(0, np.int64))["digests"]) == 0


def test_writer_refuses_bad_order() -> None:
    e = random_entries(20)
    d, p, o, s, r = e.arrays()
    for bad in (d[::-1], np.concatenate([d[:5], d[4:]])):
        k = len(bad)
        w = PagedWriter(lambda b: None, total=100, name=NAME)
        with pytest.raises(ValueError, match="ascending"):
            w.add(bad, np.zeros((k, 16), np.uint8), np.zeros(k, np.uint64),
                  np.zeros(k, np.uint32), np.zeros(k, np.uint32))
    w = PagedWriter(lambda b: None, total=100, name=NAME)
    w.add(d[:10], p[:10], o[:10], s[:10], r[:10])
    with pytest.raises(ValueError, match="ascending"):  # a duplicate across calls
        w.add(d[9:], p[9:], o[9:], s[9:], r[9:])
    w = PagedWriter(lambda b: None, total=19, name=NAME)
    with pytest.raises(ValueError, match="total"):
        w.add(d, p, o, s, r)


def test_a_resident_segment_is_read_once_within_its_budget() -> None:
    """A lookup asking about a quarter of a segment's pages or more reads and decodes it
    whole, once; later lookups, finds and gathers read nothing.  The process's budget
    bounds what is kept: a segment that does not fit in what is left stays paged, and
    a segment let go gives its share back."""
    from cbt.format.paged_index import RESIDENT_ENTRY

    a, b = random_entries(8 * P, seed=1), random_entries(8 * P, seed=2)
    reads_a: list[tuple[int, int]] = []
    reads_b: list[tuple[int, int]] = []
    with resident_budget(8 * P * RESIDENT_ENTRY + 100) as budget:  # room for one
        seg_a = open_bytes(write(a), reads=reads_a)
        seg_b = open_bytes(write(b), reads=reads_b)
        seg_a.lookup(as_array(a.list[::P]))  # 8 ids, one a page: asks for every page
        assert budget.used == 8 * P * RESIDENT_ENTRY
        reads_a.clear()
        q = a.list[::-7] + absent(a, np.random.default_rng(1), 50)
        assert seg_a.lookup(as_array(q)).tolist() == [a.row.get(d, -1) for d in q]
        rows, got = seg_a.find(as_array(q))
        assert rows.tolist() == [a.row.get(d, -1) for d in q]
        assert [bytes(d) for d in got["digests"][rows >= 0]] == [d for d in q if d in a.row]
        g = seg_a.gather(np.array([5, 3 * P + 1], dtype=np.int64))
        assert [bytes(d) for d in g["digests"]] == [a.list[5], a.list[3 * P + 1]]
        assert reads_a == []
        reads_b.clear()
        seg_b.lookup(as_array(b.list[::P]))  # no room left: paged, read as it is asked
        assert budget.used == 8 * P * RESIDENT_ENTRY and seg_b._resident is None
        assert reads_b == [(0, 8 * P * ENTRY_SIZE)]  # (the pages asked for, in one read)
        assert seg_b.lookup(as_array(b.list[:3])).tolist() == [0, 1, 2]
        del seg_a
        gc.collect()
        assert budget.used == 0
        few = open_bytes(write(b))  # a few ids of many pages: stays paged
        few.lookup(as_array(b.list[:3]))
        assert budget.used == 0 and few._resident is None


def test_a_damaged_page_keeps_a_segment_paged() -> None:
    """A segment with a damaged page is not made resident (the whole read fails on that
    page): lookups that need other pages answer, one that needs it is one error naming
    it, as before; nothing of the budget is kept."""
    e = random_entries(8 * P)
    data = damaged(write(e), 5 * P * ENTRY_SIZE + 77)
    with resident_budget(1 << 30) as budget:
        seg = open_bytes(data)
        q = [e.list[p * P + 3] for p in range(8) if p != 5]
        assert seg.lookup(as_array(q)).tolist() == [e.row[d] for d in q]
        assert budget.used == 0 and seg._resident is None
        one_error(lambda: seg.lookup(as_array([e.list[5 * P + 3]])), "page 5 of 8")


def test_a_page_the_storage_cannot_read_keeps_a_segment_paged() -> None:
    """An I/O error reading one page (EIO on a disk, a failed object-store read) while a
    segment is made resident: it stays paged; lookups of other pages answer, one that
    needs that page gets the error; warm() never raises."""
    e = random_entries(8 * P)
    data = write(e)
    bad = 5 * P * ENTRY_SIZE

    def read_range(offset: int, length: int) -> bytes:
        if offset <= bad < offset + length:
            raise OSError(5, "Input/output error")
        return data[offset:offset + length]

    def opened() -> PagedSegment:
        return PagedSegment.open(read_range, len(data), name=NAME, where="x", cache_pages=0)

    with resident_budget(1 << 30) as budget:
        seg = opened()
        q = [e.list[p * P + 3] for p in range(8) if p != 5]
        assert seg.lookup(as_array(q)).tolist() == [e.row[d] for d in q]
        assert budget.used == 0 and seg._resident is None
        with pytest.raises(OSError, match="Input/output"):
            seg.lookup(as_array([e.list[5 * P + 3]]))
        assert not opened().warm(100) and budget.used == 0
        assert not open_bytes(write(random_entries(0))).warm(100)  # (empty: nothing to keep)


def test_lookup_reads_each_page_once_and_coalesces() -> None:
    e = random_entries(10 * P + 7)
    data = write(e)
    reads: list[tuple[int, int]] = []
    seg = open_bytes(data, reads=reads)
    reads.clear()
    q = e.list[::-1] + e.list  # every page, wanted twice, in no order
    assert seg.lookup(as_array(q)).tolist() == [e.row[d] for d in q]
    assert reads == [(0, e.n * ENTRY_SIZE)]  # 11 adjacent pages: one read
    reads.clear()
    g = seg.gather(np.array([3 * P + 1, 9 * P], dtype=np.int64))
    assert [bytes(x) for x in g["digests"]] == [e.list[3 * P + 1], e.list[9 * P]]
    assert reads == []  # both pages are in the cache


def test_filter_false_positive_rate() -> None:
    e_n = 100_000
    rng = np.random.default_rng(11)
    ids = np.sort(rng.integers(0, 256, (e_n, 32), dtype=np.uint8).view("S32").ravel())
    digests = np.unique(ids).view(np.uint8).reshape(-1, 32)
    k = len(digests)
    out = bytearray()
    w = PagedWriter(out.extend, total=k, name=NAME)
    w.add(digests, np.zeros((k, 16), np.uint8), np.zeros(k, np.uint64), np.zeros(k, np.uint32),
          np.zeros(k, np.uint32))
    w.finish()
    seg = open_bytes(bytes(out))
    assert seg.maybe(digests).all()  # no false negatives
    probe = rng.integers(0, 256, (200_000, 32), dtype=np.uint8)
    rate = float(seg.maybe(probe).mean())
    assert rate < 0.02  # measured 0.4% at 12 bits an entry; a loose bound


# -- damage ------------------------------------------------------------------------


def damaged(data: bytes, at: int, xor: int = 0x40) -> bytes:
    b = bytearray(data)
    b[at] ^= xor
    return bytes(b)


def one_error(fn: Callable[[], Any], *words: str) -> str:
    with pytest.raises(CorruptIndexError) as info:
        fn()
    msg = str(info.value)
    assert isinstance(info.value, PagedIndexError)
    assert "\n" not in msg
    assert f"vault:{NAME}" in msg
    for w in words:
        assert w in msg
    return msg


def use_all(data: bytes, cipher: Cipher | None = None, name: str = NAME) -> None:
    seg = open_bytes(data, cipher=cipher, name=name)
    e_list = [bytes(d) for c in seg.chunks() for d in c["digests"]]
    seg.lookup(as_array(e_list))


@pytest.mark.parametrize("kind", CIPHERS)
def test_every_damage_is_one_error(kind: str | None) -> None:
    cipher = cipher_of(kind)
    e = random_entries(4 * P + 5)
    data = write(e, cipher=cipher)
    extra = OVERHEAD if cipher else 0
    page = P * ENTRY_SIZE + extra
    pages_end = e.n * ENTRY_SIZE + 5 * extra
    rng = np.random.default_rng(4)
    for p in range(5):  # a byte flipped in each page: that page is named
        for at in (p * page, p * page + int(rng.integers(0, 5 * ENTRY_SIZE)),
                   min(pages_end, (p + 1) * page) - 1):
            bad = damaged(data, at)
            seg = open_bytes(bad, cipher=cipher)  # the head is intact
            one_error(lambda s=seg: s.lookup(as_array(e.list)), f"page {p} of 5")
            one_error(lambda s=seg: list(s.chunks()), f"page {p} of 5")
    head_len = len(data) - TRAILER_SIZE - pages_end
    for at in [pages_end + int(x) for x in rng.integers(0, head_len, 20)] + [
            pages_end, len(data) - TRAILER_SIZE - 1]:
        one_error(lambda at=at: open_bytes(damaged(data, at), cipher=cipher))
    for at in range(len(data) - TRAILER_SIZE, len(data)):  # every trailer byte
        one_error(lambda at=at: open_bytes(damaged(data, at), cipher=cipher))
    for cut in (1, 7, TRAILER_SIZE, page, len(data) - 10, len(data)):
        one_error(lambda b=data[:-cut]: open_bytes(b, cipher=cipher))
    one_error(lambda: open_bytes(data + b"\0", cipher=cipher))
    one_error(lambda: open_bytes(b"\0" * 40 + data, cipher=cipher))
    # two whole pages swapped
    swapped = data[page:2 * page] + data[:page] + data[2 * page:]
    one_error(lambda: use_all(swapped, cipher), "page 0 of 5")


def trailer(n: int, npacks: int, nblocks: int, head_offset: int, head_length: int,
            flags: int = 0, per: int = P, version: int = 1) -> bytes:
    counts = struct.pack("<8sIIIIQQQQQ", b"CBTPGIX1", version, flags, per, 7, n, npacks, nblocks,
                         head_offset, head_length)
    first = counts + bytes(16)
    return first + blake3.blake3(first).digest(length=16)


@pytest.mark.parametrize("claim", [
    dict(n=1 << 60, npacks=1, nblocks=1, head_offset=0, head_length=89),
    dict(n=10, npacks=1 << 62, nblocks=1, head_offset=520, head_length=1 << 40),
    dict(n=10, npacks=1, nblocks=1 << 58, head_offset=520, head_length=105),
    dict(n=10, npacks=1, nblocks=3, head_offset=520, head_length=(1 << 63)),
    dict(n=(1 << 64) - 1, npacks=(1 << 64) - 1, nblocks=(1 << 64) - 1,
         head_offset=(1 << 64) - 1, head_length=(1 << 64) - 1),
    dict(n=10, npacks=1, nblocks=3, head_offset=520, head_length=105, per=1),
    dict(n=10, npacks=1, nblocks=3, head_offset=520, head_length=105, version=9),
    dict(n=10, npacks=1, nblocks=3, head_offset=520, head_length=105, flags=6),
])
def test_crafted_trailer_is_one_error(claim: dict[str, int]) -> None:
    """Counts that would need terabytes are refused before anything is allocated."""
    body = bytes(520 + 105)
    data = body + trailer(**claim)
    msg = one_error(lambda: open_bytes(data))
    if claim.get("version") == 9:
        assert "newer cbt" in msg


def recheck(body: bytearray, n: int) -> bytes:
    """A plain segment's page checks, head check and trailer check recomputed (what a
    crafted file would carry: only the structural checks can refuse it)."""
    pages_end = n * ENTRY_SIZE
    npages = -(-n // P)
    t = body[-TRAILER_SIZE:]
    npacks = struct.unpack_from("<Q", t, 32)[0]
    checks_at = pages_end + npacks * 16 + npages * 9
    for p in range(npages):
        page = bytes(body[p * P * ENTRY_SIZE:min(n, (p + 1) * P) * ENTRY_SIZE])
        body[checks_at + 16 * p:checks_at + 16 * (p + 1)] = blake3.blake3(page).digest(16)
    head = bytes(body[pages_end:-TRAILER_SIZE])
    t[64:80] = blake3.blake3(head).digest(16)
    t[80:96] = blake3.blake3(bytes(t[:80])).digest(16)
    body[-TRAILER_SIZE:] = t
    return bytes(body)


def test_crafted_pages_with_valid_checksums() -> None:
    """A page whose checks were recomputed (a crafted file, not a flipped bit) is still
    refused when its digests are out of order, outside its fences, or its pack unknown."""
    e = random_entries(3 * P)
    data = write(e)
    assert recheck(bytearray(data), e.n) == data
    swap = bytearray(data)  # entries 5 and 6 of page 1 swapped
    swap[P * ENTRY_SIZE + 5 * 32:P * ENTRY_SIZE + 7 * 32] = (
        data[P * ENTRY_SIZE + 6 * 32:P * ENTRY_SIZE + 7 * 32]
        + data[P * ENTRY_SIZE + 5 * 32:P * ENTRY_SIZE + 6 * 32])
    one_error(lambda: use_all(recheck(swap, e.n)), "page 1 of 3", "ascending")
    fence = bytearray(data)  # page 2's first digest changed: no longer its fence
    fence[2 * P * ENTRY_SIZE] ^= 1
    one_error(lambda: use_all(recheck(fence, e.n)), "page 2 of 3")
    beyond = bytearray(data)  # page 0's last digest above page 1's fence (still in order)
    beyond[(P - 1) * 32:P * 32] = b"\xff" * 32
    one_error(lambda: use_all(recheck(beyond, e.n)), "page 0 of 3", "fence")
    pack = bytearray(data)  # a pack number past the table
    at = P * 32 + 3 * 4
    pack[at:at + 4] = struct.pack("<I", 1000)
    one_error(lambda: use_all(recheck(pack, e.n)), "page 0 of 3", "pack number")


def test_crafted_order_across_a_page_boundary() -> None:
    """Two digests of one 8-byte prefix exchanged across a page boundary: each page is
    still in order and matches its fence, only the order across pages is wrong."""
    e = colliding_entries()
    data = write(e)
    cut = next(i for i in range(P, e.n, P) if e.list[i - 1][:8] == e.list[i][:8])
    body = bytearray(data)
    page = cut // P
    last = (page - 1) * P * ENTRY_SIZE + (P - 1) * 32  # digest column of the page before
    first = page * P * ENTRY_SIZE
    body[last:last + 32], body[first:first + 32] = e.list[cut], e.list[cut - 1]
    one_error(lambda: use_all(recheck(body, e.n)), f"page {page} of", "page before")
    # streamed one page at a time (the two pages in different chunks)
    seg = open_bytes(recheck(body, e.n))
    one_error(lambda: list(seg.chunks(entries=P)), f"page {page} of", "page before")


def test_crafted_heads_with_valid_checksums() -> None:
    """A head rewritten with its checks recomputed: fences out of order, bad span
    flags, a pack listed twice, a fence that is not its page's first digest."""
    e = random_entries(3 * P)
    data = write(e)
    pages_end = e.n * ENTRY_SIZE
    npacks = len(seg_packs(e))
    fences_at = pages_end + npacks * 16
    spans_at = fences_at + 3 * 8

    def rehead(edit: Callable[[bytearray], None]) -> bytes:
        body = bytearray(data)
        edit(body)
        t = body[-TRAILER_SIZE:]
        t[64:80] = blake3.blake3(bytes(body[pages_end:-TRAILER_SIZE])).digest(16)
        t[80:96] = blake3.blake3(bytes(t[:80])).digest(16)
        body[-TRAILER_SIZE:] = t
        return bytes(body)

    def swap_fences(b: bytearray) -> None:
        b[fences_at:fences_at + 16] = b[fences_at + 8:fences_at + 16] + b[fences_at:fences_at + 8]

    def span(page: int, value: int) -> Callable[[bytearray], None]:
        return lambda b: b.__setitem__(spans_at + page, value)

    def twice(b: bytearray) -> None:
        b[pages_end + 16:pages_end + 32] = b[pages_end:pages_end + 16]

    def lower_fence(b: bytearray) -> None:  # page 1's fence lowered: still in order
        at = fences_at + 8
        v = int.from_bytes(b[at:at + 8], "big")
        b[at:at + 8] = (v - 1).to_bytes(8, "big")

    one_error(lambda: open_bytes(rehead(swap_fences)), "fences out of order")
    one_error(lambda: open_bytes(rehead(span(0, 1))), "span")
    one_error(lambda: open_bytes(rehead(span(2, 2))), "span")
    one_error(lambda: open_bytes(rehead(twice)), "pack listed twice")
    one_error(lambda: use_all(rehead(lower_fence)), "page 1 of 3", "fence")
    # no filter at all (it would answer "certainly absent" for every id)
    nblocks = struct.unpack_from("<Q", data, len(data) - TRAILER_SIZE + 40)[0]
    body = bytearray(data[:len(data) - TRAILER_SIZE - nblocks * 64])
    head = bytes(body[pages_end:])
    counts = bytearray(data[-TRAILER_SIZE:-16])
    struct.pack_into("<QQQ", counts, 40, 0, pages_end, len(head))
    counts[64:80] = blake3.blake3(head).digest(16)
    no_filter = bytes(body) + bytes(counts) + blake3.blake3(bytes(counts)).digest(16)
    one_error(lambda: open_bytes(no_filter), "no filter")


def test_sealed_pages_and_heads_are_bound_to_their_place() -> None:
    cipher = cipher_of("aes-256-gcm")
    assert cipher is not None
    e1, e2 = random_entries(3 * P, seed=1), random_entries(3 * P, seed=2)
    one = write(e1, cipher=cipher, name="index/one")
    two = write(e2, cipher=cipher, name="index/two")
    use_all(one, cipher, "index/one")
    page = P * ENTRY_SIZE + OVERHEAD
    # page 1 of segment two put in place of page 1 of segment one (head checks patched
    # cannot help: the head is sealed), and the page-check path aside, its own AAD
    moved = one[:page] + two[page:2 * page] + one[2 * page:]
    with pytest.raises(PagedIndexError, match="page 1 of 3"):
        use_all(moved, cipher, "index/one")
    # same segment opened under another name: the head fails authentication
    with pytest.raises(PagedIndexError, match="authentication"):
        open_bytes(one, cipher=cipher, name="index/other")
    # another vault's key
    with pytest.raises(PagedIndexError, match="authentication"):
        open_bytes(one, cipher=Cipher("aes-256-gcm", bytes(32)), name="index/one")
    # sealed without a key, plain in an encrypted vault
    with pytest.raises(PagedIndexError, match="no key"):
        open_bytes(one, name="index/one")
    with pytest.raises(PagedIndexError, match="not sealed"):
        open_bytes(write(e1), cipher=cipher)


def test_sealed_page_moved_within_segment_fails_authentication() -> None:
    """Even with the head's page check matching (the same page, moved): the AAD binds
    the page number.  Built by sealing a head whose checks list the swapped pages."""
    cipher = cipher_of("aes-256-gcm")
    assert cipher is not None
    e = random_entries(3 * P)
    data = write(e, cipher=cipher)
    page = P * ENTRY_SIZE + OVERHEAD
    now = [data]
    seg = PagedSegment.open(lambda o, n: now[0][o:o + n], len(data), name=NAME,
                            where=f"vault:{NAME}", cipher=cipher)
    seg._checks[[0, 1]] = seg._checks[[1, 0]]  # as if the head had been re-sealed so
    now[0] = data[page:2 * page] + data[:page] + data[2 * page:]
    with pytest.raises(PagedIndexError, match="authentication"):
        seg.lookup(as_array(e.list))


# -- memory ------------------------------------------------------------------------


def synthetic(n: int, seed: int, chunk: int = 1 << 16, keep_every: int = 0
              ) -> Iterator[tuple[Any, ...]]:
    """``n`` ascending random-looking ids in chunks (the first 8 bytes grow by random
    gaps), without ever holding them all."""
    rng = np.random.default_rng(seed)
    base = np.uint64(0)
    gap = (1 << 64) // (n + 1)
    for lo in range(0, n, chunk):
        k = min(chunk, n - lo)
        steps = rng.integers(1, gap, k, dtype=np.uint64)
        keys = base + np.cumsum(steps, dtype=np.uint64)
        base = keys[-1]
        d = rng.integers(0, 256, (k, 32), dtype=np.uint8)
        d[:, :8] = keys.astype(">u8").view(np.uint8).reshape(k, 8)
        packs = np.zeros((k, 16), np.uint8)
        packs[:, 0] = (np.arange(lo, lo + k) // 4096) % 256
        packs[:, 1] = (np.arange(lo, lo + k) // (4096 * 256)) % 256
        yield (d, packs, np.arange(lo, lo + k, dtype=np.uint64),
               np.full(k, 4096, np.uint32), np.full(k, 4096, np.uint32))


def test_two_million_entries_memory(tmp_path: Path) -> None:
    n = 2_000_000
    path = tmp_path / "segment"
    rng = np.random.default_rng(8)
    want_rows = np.sort(rng.choice(n, 5000, replace=False))
    wanted = []
    gc.collect()
    tracemalloc.start()
    with open(path, "wb") as f:
        w = PagedWriter(f.write, total=n, name=NAME)
        for part in synthetic(n, seed=3):
            lo = int(part[2][0])
            sel = want_rows[(want_rows >= lo) & (want_rows < lo + len(part[2]))] - lo
            wanted.append(part[0][sel].copy())
            w.add(*part)
            del part
        w.finish()
    _, write_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # the writer holds its head (filter 3 MB at 2M entries), never the 104 MB of entries;
    # besides it, one chunk of 65536 entries and its temporaries (measured 12.6 MB in all)
    assert write_peak <= 20 << 20
    present = np.concatenate(wanted)
    misses = rng.integers(0, 256, (5000, 32), dtype=np.uint8)
    fd = os.open(path, os.O_RDONLY)
    try:
        gc.collect()
        tracemalloc.start()
        seg = PagedSegment.open(lambda o, k: os.pread(fd, k, o), os.fstat(fd).st_size,
                                name=NAME, where="vault:seg")
        got_hit = seg.lookup(present)
        got_miss = seg.lookup(misses)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    finally:
        os.close(fd)
    assert got_hit.tolist() == want_rows.tolist()
    assert (got_miss == -1).all()
    assert seg.n == n
    assert seg.head_bytes <= 4 * (1 << 20) * n / 1e6
    # the head, then transients: a batch of 128 pages read, checked and decoded, the
    # queries' filter slots (measured 9.3 MB in all, head 3.4 MB)
    assert peak <= seg.head_bytes + (8 << 20)


def test_read_many_gets_a_batch_of_runs() -> None:
    """A reader of many ranges at once gets every run of adjacent pages of a batch in
    one call (an object store can fetch them concurrently)."""
    e = random_entries(12 * P)
    data = write(e)
    calls: list[list[tuple[int, int]]] = []

    def read_many(ranges: list[tuple[int, int]]) -> list[bytes]:
        calls.append(list(ranges))
        return [data[o:o + k] for o, k in ranges]

    seg = PagedSegment.open(lambda o, k: data[o:o + k], len(data), name=NAME, where="x",
                            read_many=read_many, cache_pages=0)
    q = [e.list[p * P + 5] for p in (1, 2, 3, 7, 9, 10)]
    assert seg.lookup(as_array(q)).tolist() == [e.row[d] for d in q]
    page = P * ENTRY_SIZE
    assert calls == [[(1 * page, 3 * page), (7 * page, page), (9 * page, 2 * page)]]
    short = lambda ranges: [data[o:o + k - 1] for o, k in ranges]  # noqa: E731
    seg = PagedSegment.open(lambda o, k: data[o:o + k], len(data), name=NAME,
                            where=f"vault:{NAME}", read_many=short)
    one_error(lambda: seg.lookup(as_array(q)), "truncated")


def test_threads_share_a_segment() -> None:
    from concurrent.futures import ThreadPoolExecutor

    e = random_entries(20 * P)
    seg = open_bytes(write(e))

    def work(seed: int) -> bool:
        rng = np.random.default_rng(seed)
        for _ in range(20):
            q = [e.list[int(i)] for i in rng.integers(0, e.n, 50)] + absent(e, rng, 20)
            if seg.lookup(as_array(q)).tolist() != [e.row.get(d, -1) for d in q]:
                return False
        return True

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(work, range(8)))


# -- merging -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", CIPHERS)
@pytest.mark.parametrize("entries", [1, 300, 1 << 18])
def test_merge_against_reference(kind: str | None, entries: int) -> None:
    """Duplicates across segments (the first segment listing a digest wins, unless its
    pack is dropped: then the next copy stands), an empty segment, many rounds."""
    cipher = cipher_of(kind)
    rng = np.random.default_rng(21)
    shared = [rng.bytes(32) for _ in range(200)]
    a = Entries(shared[:150] + [rng.bytes(32) for _ in range(400)], rng, npacks=3)
    b = Entries(shared[100:] + [rng.bytes(32) for _ in range(300)], rng, npacks=4)
    c = Entries(shared[::3] + [bytes([7]) * 8 + rng.bytes(24) for _ in range(200)], rng)
    empty = Entries([], rng)
    sources = [a, empty, b, c]
    dropped = {a.packs[0].hex, c.packs[1].hex}
    names = [f"index/src{i}" for i in range(len(sources))]
    segs = [open_bytes(write(e, cipher=cipher, name=nm), cipher=cipher, name=nm)
            for e, nm in zip(sources, names, strict=True)]
    out = bytearray()
    w = PagedWriter(out.extend, total=sum(s.n for s in segs), name="index/merged",
                    cipher=cipher)
    added = merge_paged(segs, w, entries=entries, drop_packs=dropped)
    w.finish()
    truth: dict[bytes, tuple[str, int, int, int]] = {}
    for e in sources:
        for i, d in enumerate(e.list):
            pack = e.packs[e.pack_of[i]].hex
            if pack not in dropped and d not in truth:
                truth[d] = (pack, e.offset[i], e.stored[i], e.raw[i])
    merged = open_bytes(bytes(out), cipher=cipher, name="index/merged")
    assert added == merged.n == len(truth)
    got = {}
    for chunk in merged.chunks():
        for d, p, o, s, r in zip(chunk["digests"], chunk["pack"].tolist(),
                                 chunk["offset"].tolist(), chunk["stored"].tolist(),
                                 chunk["raw"].tolist(), strict=True):
            got[bytes(d)] = (merged.pack_ids[p], o, s, r)
    assert list(got) == sorted(truth)
    assert got == truth
    q = list(truth)[::5] + shared + absent(a, rng, 50)
    assert merged.lookup(as_array(q)).tolist() == [
        sorted(truth).index(d) if d in truth else -1 for d in q]


def test_merge_memory_is_bounded() -> None:
    """Merging is bounded by ``entries``, not by the segments' sizes."""
    datas = []
    for seed in range(4):
        out = bytearray()
        w = PagedWriter(out.extend, total=100_000, name=f"s{seed}")
        for part in synthetic(100_000, seed=seed, chunk=8192):
            w.add(*part)
        w.finish()
        datas.append(bytes(out))
    segs = [open_bytes(d, name=f"s{i}") for i, d in enumerate(datas)]
    written = [0]

    def count(b: bytes | memoryview) -> None:
        written[0] += len(b)

    w = PagedWriter(count, total=400_000, name="merged")  # its head: 0.6 MB
    gc.collect()
    tracemalloc.start()
    added = merge_paged(segs, w, entries=8192)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert added == 400_000
    assert peak <= MERGE_PEAK, peak


MERGE_PEAK = 8 << 20  # measured 4.2 MB (entries=65536: 20 MB, ~300 B an entry)


def test_reads_from_a_mapped_file(tmp_path: Path) -> None:
    """A reader handing out views of a mapped file: answers as from bytes, and nothing
    returned points into the mapping (it can be closed while they are in use)."""
    import mmap

    e = random_entries(2 * P + 9)
    path = tmp_path / "segment"
    path.write_bytes(write(e))
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        views = [memoryview(m)]
        seg = PagedSegment.open(lambda o, k: views[0][o:o + k], len(m), name=NAME,
                                where="x", cache_pages=0)
        chunks = list(seg.chunks(entries=P))
        found = seg.find(as_array(e.list[-3:]))
        del seg
        views.pop().release()
        m.close()  # BufferError if anything still pointed into it
    assert [bytes(d) for c in chunks for d in c["digests"]] == e.list
    assert found[0].tolist() == [e.n - 3, e.n - 2, e.n - 1]
    assert found[1]["offset"].tolist() == e.offset[-3:]


def count_of(data: bytes, reads: list[tuple[int, int]] | None = None) -> int:
    def read_range(offset: int, length: int) -> bytes:
        if reads is not None:
            reads.append((offset, length))
        return data[offset:offset + length]

    return trailer_entries(read_range, len(data), where=f"vault:{NAME}")


@pytest.mark.parametrize("kind", CIPHERS)
@pytest.mark.parametrize("n", [0, 1, P, 3 * P + 7])
def test_trailer_entries_reads_the_trailer_alone(kind: str | None, n: int) -> None:
    data = write(random_entries(n), cipher=cipher_of(kind), total=n + 5)
    reads: list[tuple[int, int]] = []
    assert count_of(data, reads) == n == open_bytes(data, cipher=cipher_of(kind)).n
    assert reads == [(len(data) - TRAILER_SIZE, TRAILER_SIZE)]  # no head, no page
    # the head damaged: the count still reads (opening then fails, naming the segment)
    bad = damaged(data, len(data) - TRAILER_SIZE - 1)
    assert count_of(bad) == n
    one_error(lambda: open_bytes(bad, cipher=cipher_of(kind)))


def test_trailer_entries_refuses_a_damaged_or_crafted_trailer() -> None:
    data = write(random_entries(2 * P + 1))
    for at in range(len(data) - TRAILER_SIZE, len(data)):  # every trailer byte
        one_error(lambda at=at: count_of(damaged(data, at)))
    for cut in (1, TRAILER_SIZE, len(data) - 10):
        one_error(lambda b=data[:-cut]: count_of(b))
    one_error(lambda: count_of(b"\0" * 10))
    # a count the size cannot hold, under a valid checksum
    one_error(lambda: count_of(bytes(625) + trailer(1 << 60, 1, 1, 0, 89)), "do not fit")
    assert "newer cbt" in one_error(lambda: count_of(bytes(625) + trailer(10, 1, 3, 520, 105,
                                                                          version=9)))


def test_warm_makes_resident_what_that_many_queries_would() -> None:
    """``warm(k)``: resident now if a lookup of ``k`` ids would make it so (a quarter of
    the pages or more), and within the budget; lookups then read nothing."""
    e = random_entries(16 * P)
    reads: list[tuple[int, int]] = []
    with resident_budget(1 << 30) as budget:
        seg = open_bytes(write(e), reads=reads)
        assert not seg.warm(3) and budget.used == 0  # 3 of 16 pages: stays paged
        assert seg.warm(4) and budget.used > 0
        reads.clear()
        q = e.list[::5]
        assert seg.lookup(as_array(q)).tolist() == [e.row[d] for d in q]
        assert reads == []
    with resident_budget(100):
        assert not open_bytes(write(e)).warm(10**6)  # past the budget: paged


@given(st.lists(st.integers(0, 40), max_size=60), st.sampled_from(["int64", "V16"]))
def test_distinct_is_numpy_unique(values: list[int], kind: str) -> None:
    """``distinct`` (what opening and searching a segment use instead of ``np.unique``, whose
    check for masked arrays imports ``numpy.ma``) gives numpy's own answer, also for the
    16-byte pack ids."""
    a = np.array(values, dtype=np.int64)
    if kind == "V16":
        a = np.repeat(a, 2).view("V16")  # 16 bytes a value: two equal int64 words
    assert np.array_equal(paged_index.distinct(a), np.unique(a))


def test_backup_and_restore_leave_numpy_ma_unloaded(tmp_path: Path) -> None:
    """A whole backup, incremental and restore (the vault's index opened and searched each
    time) never load ``numpy.ma``: start-up time counts against cp and borg."""
    import subprocess
    import sys

    disk = tmp_path / "d.img"
    disk.write_bytes(np.random.default_rng(4).integers(0, 256, 1 << 20, np.uint8).tobytes())
    v, out = tmp_path / "v", tmp_path / "out"
    probe = ("import sys\n"
             "from cbt.cli.main import main\n"
             "def run(*argv):\n"
             "    assert main(['-q', *argv]) == 0, argv\n"
             f"run('init', '--encryption', 'none', {str(v)!r})\n"
             f"run('backup', '--vm', 'x', {str(v)!r}, 'd={disk}')\n"
             f"run('backup', '--vm', 'x', {str(v)!r}, 'd={disk}')\n"
             f"run('restore', {str(v)!r}, 'x.latest', '--to', {str(out)!r})\n"
             "print('numpy.ma' in sys.modules)\n")
    said = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True).stdout
    assert said.strip() == "False"
    assert (out / "d.img").read_bytes() == disk.read_bytes()

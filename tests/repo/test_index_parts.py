"""An Index composed of several parts, against a plain dict reference.

The reference is built the obvious way: walk the parts in order, one Python dict
per digest, the first part that has a digest wins.  Lookups (stored ids, ids in no
part, ids sharing 8 or 16 bytes with stored ones), ``locate``, ``entry``, ``find``
and ``chunks`` (every entry once per part, in position order) must agree with it.
"""

from __future__ import annotations

import itertools
import uuid

import numpy as np
import pytest

from cbt.repo.index import (
    Index,
    IndexEntry,
    Located,
    MemoryPart,
    entries_for_packs,
    select_entries,
)

Row = tuple[bytes, str, int, int, int]  # digest, pack id, offset, stored, raw


def _part(rows: list[Row]) -> MemoryPart:
    """A MemoryPart of ``rows``, its pack ids numbered in order of first use."""
    ids: dict[str, int] = {}
    n = len(rows)
    part = {
        "digests": np.frombuffer(b"".join(r[0] for r in rows), np.uint8).reshape(n, 32),
        "pack": np.array([ids.setdefault(r[1], len(ids)) for r in rows], dtype=np.uint32),
        "offset": np.array([r[2] for r in rows], dtype=np.uint64),
        "stored": np.array([r[3] for r in rows], dtype=np.uint32),
        "raw": np.array([r[4] for r in rows], dtype=np.uint32),
    }
    part["pack_ids"] = list(ids)
    return MemoryPart.build([part])


def _rows(rng: np.random.Generator, digests: list[bytes], packs: list[str]) -> list[Row]:
    return [(d, packs[int(rng.integers(len(packs)))], int(rng.integers(1 << 40)),
             int(rng.integers(1 << 20)), int(rng.integers(1 << 20))) for d in digests]


def _digests(rng: np.random.Generator, n: int) -> list[bytes]:
    return [rng.integers(0, 256, 32, dtype=np.uint8).tobytes() for _ in range(n)]


def _collide(rng: np.random.Generator, d: bytes, keep: int) -> bytes:
    """Another digest sharing the first ``keep`` bytes of ``d``."""
    while True:
        other = d[:keep] + rng.integers(0, 256, 32 - keep, dtype=np.uint8).tobytes()
        if other != d:
            return other


def _layout(seed: int) -> tuple[list[list[Row]], list[bytes]]:
    """Three parts (and an empty one between) sharing packs and some digests, with prefix
    collisions inside a part and across parts; and ids stored nowhere, some colliding."""
    rng = np.random.default_rng(seed)
    packs = [uuid.UUID(bytes=rng.integers(0, 256, 16, dtype=np.uint8).tobytes()).hex
             for _ in range(7)]
    a = _digests(rng, 300)
    a += [_collide(rng, a[i], 8) for i in range(0, 40, 2)]  # same 8-byte key, one part
    a += [_collide(rng, a[i], 16) for i in range(1, 40, 2)]
    b = _digests(rng, 200) + a[100:160]  # 60 also in the first part: the first wins
    b += [_collide(rng, a[i], 8) for i in range(200, 230)]  # same key as another part's
    c = _digests(rng, 150) + b[:40] + a[160:170] + [_collide(rng, b[i], 16) for i in range(40, 60)]
    parts = [_rows(rng, a, packs[:4]), [], _rows(rng, b, packs[2:6]),
             _rows(rng, c, [packs[6], packs[0], packs[3]])]
    absent = _digests(rng, 100)
    stored = a + b + c
    absent += [_collide(rng, stored[i], 8) for i in range(0, len(stored), 17)]
    absent += [_collide(rng, stored[i], 31) for i in range(5, len(stored), 23)]
    return parts, absent


def _reference(parts: list[list[Row]]) -> dict[bytes, Row]:
    ref: dict[bytes, Row] = {}
    for rows in parts:
        for r in rows:
            ref.setdefault(r[0], r)
    return ref


def _stack(digests: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(digests), np.uint8).reshape(-1, 32)


def _row(index: Index, at: Located, i: int) -> Row:
    return (at.digests[i].tobytes(), index.pack_ids[int(at.pack[i])], int(at.offset[i]),
            int(at.stored[i]), int(at.raw[i]))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_lookup_locate_entry_find_match_the_reference(seed: int) -> None:
    parts, absent = _layout(seed)
    ref = _reference(parts)
    index = Index([_part(rows) for rows in parts], [], [])
    assert len(index) == sum(len(rows) for rows in parts)
    assert len(set(index.pack_ids)) == len(index.pack_ids)
    assert set(index.pack_ids) == {r[1] for rows in parts for r in rows}
    rng = np.random.default_rng(seed + 100)
    queries = list(ref) + absent
    queries += [queries[int(i)] for i in rng.integers(0, len(queries), 200)]  # repeats
    order = rng.permutation(len(queries))
    queries = [queries[int(i)] for i in order]
    pos = index.lookup(_stack(queries))
    assert pos.dtype == np.int64
    for q, p in zip(queries, pos.tolist(), strict=True):
        assert (p >= 0) == (q in ref)
        if p >= 0:
            assert tuple(index.entry(p)) == ref[q]
    hits = pos[pos >= 0]
    at = index.locate(hits)
    want = [ref[q] for q, p in zip(queries, pos.tolist(), strict=True) if p >= 0]
    assert [_row(index, at, i) for i in range(len(hits))] == want
    for q in list(ref)[::7] + absent[::5]:
        got = index.find(q)
        assert (got is None) if q not in ref else (got == IndexEntry(*ref[q]))


def test_a_digest_in_two_parts_is_found_in_the_first() -> None:
    parts, _absent = _layout(4)
    index = Index([_part(rows) for rows in parts], [], [])
    shared = [r[0] for r in parts[0][100:160]]
    pos = index.lookup(_stack(shared))
    assert (pos < len(parts[0])).all(), "the first part's position"
    assert [tuple(index.entry(p)) for p in pos.tolist()] == parts[0][100:160]


@pytest.mark.parametrize("entries", [1, 7, 64, 65536])
def test_chunks_cover_every_entry_once_per_part(entries: int) -> None:
    parts, _absent = _layout(5)
    index = Index([_part(rows) for rows in parts], [], [])
    seen: list[Row] = []
    expect = 0
    for base, got in index.chunks(entries):
        assert base == expect and 0 < len(got.offset) <= entries
        rows = [_row(index, got, i) for i in range(len(got.offset))]
        again = index.locate(np.arange(base, base + len(rows), dtype=np.int64))
        assert [_row(index, again, i) for i in range(len(rows))] == rows
        seen += rows
        expect += len(rows)
    assert expect == len(index)
    # every part's entries once, in part order (a digest in two parts comes twice)
    want = [r for rows in parts for r in sorted(rows)]
    bounds = np.cumsum([0] + [len(rows) for rows in parts])
    got_by_part = [sorted(seen[a:b]) for a, b in itertools.pairwise(bounds)]
    assert [r for rows in got_by_part for r in rows] == want


def test_one_part_is_what_build_makes_and_positions_are_checked() -> None:
    parts, absent = _layout(6)
    rows = parts[0]
    one = Index([_part(rows)], ["index/x.arrow"], [])
    built = Index.build([{"digests": _stack([r[0] for r in rows]),
                          "pack": np.array([sorted({r[1] for r in rows}).index(r[1])
                                            for r in rows], dtype=np.uint32),
                          "pack_ids": sorted({r[1] for r in rows}),
                          "offset": np.array([r[2] for r in rows], dtype=np.uint64),
                          "stored": np.array([r[3] for r in rows], dtype=np.uint32),
                          "raw": np.array([r[4] for r in rows], dtype=np.uint32)}],
                        ["index/x.arrow"], [])
    q = _stack([r[0] for r in rows] + absent)
    assert (one.lookup(q) == built.lookup(q)).all()
    pos = one.lookup(q)
    assert [tuple(one.entry(p)) for p in pos[pos >= 0].tolist()] == \
        [tuple(built.entry(p)) for p in pos[pos >= 0].tolist()]
    multi = Index([_part(r) for r in parts], [], [])
    for index in (one, multi):
        for bad in ([-1], [len(index)], [0, len(index) + 5]):
            with pytest.raises(IndexError):
                index.locate(np.array(bad, dtype=np.int64))
        assert len(index.locate(np.zeros(0, dtype=np.int64)).offset) == 0
    empty = Index([], [], [])
    assert len(empty) == 0 and list(empty.chunks()) == []
    assert (empty.lookup(q) == -1).all() and empty.find(rows[0][0]) is None


def test_entries_for_packs_streams_every_part() -> None:
    parts, _absent = _layout(7)
    index = Index([_part(rows) for rows in parts], [], [])
    every = [r for rows in parts for r in rows]
    for packs in ({index.pack_ids[0]}, set(index.pack_ids[2:5]), set(index.pack_ids)):
        got = entries_for_packs(index, packs)
        rows = sorted(zip([d.tobytes() for d in got["digests"]],
                          [uuid.UUID(bytes=u.tobytes()).hex for u in got["pack_uuid"]],
                          got["offset"].tolist(), got["stored"].tolist(),
                          got["raw"].tolist(), strict=True))
        assert rows == sorted(r for r in every if r[1] in packs)
    keep = np.zeros(len(index), dtype=bool)
    keep[::3] = True
    picked = select_entries(index, lambda base, got: keep[base:base + len(got.offset)])
    assert len(picked["offset"]) == int(keep.sum())
    at = index.locate(np.nonzero(keep)[0])
    assert (picked["digests"] == at.digests).all() and (picked["offset"] == at.offset).all()

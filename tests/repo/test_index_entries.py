"""Index entries one at a time (IndexEntry) and the explicit index cache of a run."""

from __future__ import annotations

import os
import uuid

import numpy as np

from cbt.format.index_segment import segment_bytes
from cbt.repo.index import Index, IndexCache, IndexEntry, load, read_segment, segment_entries
from cbt.repo.storage import MemoryStorage


def _entries(n: int, packs: list[str]) -> list[IndexEntry]:
    return [IndexEntry(os.urandom(32), packs[i % len(packs)], 64 * i, 100 + i, 4096)
            for i in range(n)]


def test_entries_round_trip_through_a_segment() -> None:
    packs = [uuid.uuid4().hex for _ in range(3)]
    entries = _entries(50, packs)
    part = read_segment(segment_bytes(segment_entries(entries)), "test")
    index = Index.build([part], ["index/x.arrow"], [])
    assert len(index) == 50
    for e in entries:
        assert index.find(e.digest) == e
    assert index.find(os.urandom(32)) is None
    pos = index.lookup(np.frombuffer(b"".join(e.digest for e in entries), np.uint8)
                       .reshape(-1, 32))
    assert [index.entry(int(p)) for p in pos] == entries


def test_index_cache_loads_once_per_token() -> None:
    storage = MemoryStorage()
    entries = _entries(5, [uuid.uuid4().hex])
    storage.put("index/a.arrow", segment_bytes(segment_entries(entries)))
    first = load(storage)
    cache = IndexCache(first)
    assert cache.get(storage, first.token()) is first  # handed in: no load
    fresh = IndexCache()
    got = fresh.get(storage, first.token())
    assert got is not first and got.token() == first.token()
    assert fresh.get(storage, first.token()) is got  # loaded once
    more = _entries(3, [uuid.uuid4().hex])
    storage.put("index/b.arrow", segment_bytes(segment_entries(more)))
    newer = load(storage)
    again = fresh.get(storage, newer.token())  # another run's token: loaded again
    assert again is not got and len(again) == 8
    assert {again.find(e.digest) for e in entries + more} == set(entries + more)


def _grouped(n: int, packs: list[str]) -> list[IndexEntry]:
    per = -(-n // len(packs))
    return [IndexEntry(os.urandom(32), packs[i // per], 64 * i, 100 + i, 4096) for i in range(n)]


def test_segment_pack_numbers_for_every_layout_of_its_rows() -> None:
    """A segment's rows name their packs as numbers: the one-run-per-pack way (what a backup
    writes), packs in several runs, and packs whose uuids share their first 8 bytes all give
    each row its own pack back."""
    head = os.urandom(8)
    layouts = {
        "grouped": _grouped(60, [uuid.uuid4().hex for _ in range(4)]),
        "interleaved": _entries(60, [uuid.uuid4().hex for _ in range(4)]),
        "a pack in two runs": _grouped(30, ["a" * 32, "b" * 32]) + _grouped(10, ["a" * 32]),
        "same head": _grouped(40, [(head + os.urandom(8)).hex() for _ in range(4)]),
    }
    for name, entries in layouts.items():
        part = read_segment(segment_bytes(segment_entries(entries)), "test")
        assert len(set(part["pack_ids"])) == len(part["pack_ids"]), name
        got = {d.tobytes(): part["pack_ids"][int(k)]
               for d, k in zip(part["digests"], part["pack"], strict=True)}
        assert got == {e.digest: e.pack for e in entries}, name

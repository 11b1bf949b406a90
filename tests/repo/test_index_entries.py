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

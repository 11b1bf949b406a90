"""The k-way merge of sorted index streams against a plain reference (sorted, first copy
of each digest kept), with chunkings of every size and ids sharing long prefixes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cbt.format.pack import pack_name
from cbt.format.paged_index import TRAILER_SIZE
from cbt.repo.compact import BASE, KEYS, TIER, WIDTH, choose, merge, tier
from cbt.repo.segments import compact as compact_vault
from cbt.repo.segments import open_paged, write_paged
from cbt.repo.vault import Vault


def _entries(digests: list[bytes], tag: int) -> dict[str, Any]:
    n = len(digests)
    return {"digests": np.frombuffer(b"".join(digests), np.uint8).reshape(n, 32).copy(),
            "pack_uuid": np.full((n, 16), tag, np.uint8),
            "offset": np.arange(n, dtype=np.uint64) + tag * 1000,
            "stored": np.full(n, tag, np.uint32), "raw": np.full(n, tag, np.uint32)}


def _chunked(e: dict[str, Any], sizes: list[int]) -> Iterator[dict[str, Any]]:
    at, k = 0, 0
    n = len(e["offset"])
    while at < n:
        step = sizes[k % len(sizes)]
        k += 1
        yield {key: v[at:at + step] for key, v in e.items()}
        at += step


def _ids(rng: np.random.Generator, n: int, prefix: bytes = b"") -> list[bytes]:
    return [prefix + rng.bytes(32 - len(prefix)) for _ in range(n)]


@pytest.mark.parametrize("sizes", [[1], [3, 7], [1000], [64, 1, 5]])
def test_merge_equals_sorted_first_copies(sizes: list[int]) -> None:
    rng = np.random.default_rng(len(sizes) + sizes[0])
    shared = _ids(rng, 50)
    # adversarial: ids that share 8, 16 and 31 bytes with each other, and zero tails
    crafted = _ids(rng, 40, b"\x07" * 8) + _ids(rng, 40, b"\x07" * 16) + \
        [b"\x09" * 31 + bytes([i]) for i in range(0, 256, 17)] + [b"\x05" + b"\0" * 31]
    inputs: list[list[bytes]] = []
    for _ in range(4):
        own = _ids(rng, int(rng.integers(0, 300)))
        pick = [shared[i] for i in rng.choice(50, 20, replace=False)]
        cpick = [crafted[i] for i in rng.choice(len(crafted), 30, replace=False)]
        inputs.append(sorted(set(own + pick + cpick)))
    inputs.append([])  # an empty input
    reference: dict[bytes, tuple[int, int]] = {}
    for tag, ids in enumerate(inputs):
        for row, d in enumerate(ids):
            reference.setdefault(d, (tag, row))
    got = list(merge([_chunked(_entries(ids, tag), sizes)
                      for tag, ids in enumerate(inputs)]))
    total = sum(len(g["offset"]) for g in got)
    out = {k: np.concatenate([g[k] for g in got]) for k in KEYS}
    digests = [bytes(r) for r in out["digests"]]
    assert total == len(digests) == len(reference)
    assert digests == sorted(reference)
    for i, d in enumerate(digests):  # the first input's copy, its own row
        tag, row = reference[d]
        assert out["pack_uuid"][i, 0] == tag and out["offset"][i] == row + tag * 1000


def test_merge_refuses_unsorted_input() -> None:
    rng = np.random.default_rng(1)
    ids = sorted(_ids(rng, 10))
    ids[3], ids[4] = ids[4], ids[3]
    with pytest.raises(ValueError, match="not sorted"):
        list(merge([_chunked(_entries(ids, 0), [2])]))
    dup = sorted(_ids(rng, 5))
    with pytest.raises(ValueError, match="not sorted"):
        list(merge([_chunked(_entries(dup + dup[-1:], 0), [3])]))


def test_merge_holds_a_chunk_per_input() -> None:
    """The merge asks an input for its next chunk only once the last one is used up."""
    rng = np.random.default_rng(2)
    pulled: list[int] = []

    def lazy(e: dict[str, Any], tag: int) -> Iterator[dict[str, Any]]:
        for c in _chunked(e, [10]):
            pulled.append(tag)
            yield c

    a, b = sorted(_ids(rng, 100)), sorted(_ids(rng, 100))
    seen = [len(pulled) for _ in merge([lazy(_entries(a, 0), 0), lazy(_entries(b, 1), 1)])]
    assert len(pulled) == 20 and seen[0] <= 3


def test_tiers_keep_few_segments_and_rewrite_each_entry_few_times() -> None:
    """Backups each adding a small segment, merged as choose() says: the segment count
    stays within (WIDTH - 1) per tier, and an entry is rewritten about log_TIER(N) times."""
    assert [tier(n) for n in (0, 1, BASE, BASE + 1, BASE * TIER, BASE * TIER + 1)] == \
        [0, 0, 0, 1, 1, 2]
    segments: dict[str, int] = {}
    rewrites = 0
    for run in range(2000):
        segments[f"run{run}"] = 3000  # (a backup's new blocks)
        while picked := choose(sorted(segments.items())):
            assert len(picked) >= WIDTH
            merged = sum(segments.pop(p) for p in picked)
            rewrites += merged
            segments[f"merged{run}-{len(segments)}"] = merged
        total = sum(segments.values())
        tiers = max(tier(n) for n in segments.values()) + 1
        assert len(segments) <= (WIDTH - 1) * tiers, segments
    assert total == 2000 * 3000
    assert rewrites / total <= 1 + np.log(total / BASE) / np.log(TIER)
    assert choose([("a", 1), ("b", 2)], legacy=["index/x.arrow"]) == ["index/x.arrow"]
    assert choose([("a", 1), ("b", 2), ("c", 3)]) == []


def test_compaction_reads_only_the_segments_it_merges(tmp_path: Path) -> None:
    """Choosing reads each segment's trailer only: a segment it does not merge is never
    opened (here its head is damaged, and the merge of the crowded tier goes on), and the
    merged segment holds exactly the union of the ones merged."""
    vault = Vault.init(tmp_path / "v", "none")
    rng = np.random.default_rng(5)
    small = [sorted(_ids(rng, 50)) for _ in range(WIDTH)]  # a crowded tier 0
    for i, ids in enumerate(small):
        write_paged(vault, vault.segment_name(f"small-{i}"), [_entries(ids, i + 1)], len(ids))
        # (the vault holds its pack: a segment naming none of the vault's is ignored)
        vault.storage.put(pack_name(bytes([i + 1]).hex() * 16), b"")
    big_ids = sorted(_ids(rng, BASE * TIER + 1))  # alone in tier 2
    big = vault.segment_name("big")
    write_paged(vault, big, [_entries(big_ids, 9)], len(big_ids))
    path = tmp_path / "v" / big
    data = bytearray(path.read_bytes())
    data[-TRAILER_SIZE - 1] ^= 0x40  # the head's last byte
    path.write_bytes(bytes(data))
    merged = compact_vault(vault)
    assert merged is not None and sorted(vault.segment_names()) == sorted([big, merged])
    seg = open_paged(vault.storage, merged, None)
    got = [bytes(d) for c in seg.chunks() for d in c["digests"]]
    assert got == sorted(d for ids in small for d in ids)

#!/usr/bin/env python3
"""Lookup throughput and memory of one paged index segment (``cbt.format.paged_index``).

Usage::

    python bench/paged_index.py [--entries 1000000] [--sealed] [--dir DIR] [--json]

Writes a segment of ``--entries`` synthetic entries (ascending random ids,
streamed: never all in memory) to a file in ``--dir`` (default: the system temp
directory; removed at the end), then, each on a freshly opened segment (empty
page cache; the file itself is in the page cache, as a recently used segment):

- ``lookup hit``: ids that are in the segment, in random order, in batches of
  10k and 100k (one ``lookup`` call each);
- ``lookup miss``: random ids in no segment (the filter answers most);
- ``gather``: the rows of the hits (after their lookup: pages partly cached);
- ``find``: lookup and gather of 10k hits in one pass;
- ``chunks``: every entry in order;
- ``merge``: the segment merged with itself (compaction: 2n entries in, n out),
  its speed and tracemalloc peak;
- memory: the open segment's ``head_bytes`` and the tracemalloc peak of opening
  it and looking up 10k hits.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

from cbt.core.crypto import Cipher
from cbt.format.paged_index import PagedSegment, PagedWriter
from cbt.repo.segments import merge_paged


def synthetic(n: int, seed: int, chunk: int = 1 << 16) -> Iterator[tuple[Any, ...]]:
    """``n`` ascending random ids with entries, in chunks (the first 8 bytes grow by
    random gaps, the rest random); 4096 entries a pack."""
    rng = np.random.default_rng(seed)
    base = np.uint64(0)
    gap = (1 << 64) // (n + 1)
    for lo in range(0, n, chunk):
        k = min(chunk, n - lo)
        keys = base + np.cumsum(rng.integers(1, gap, k, dtype=np.uint64), dtype=np.uint64)
        base = keys[-1]
        d = rng.integers(0, 256, (k, 32), dtype=np.uint8)
        d[:, :8] = keys.astype(">u8").view(np.uint8).reshape(k, 8)
        rows = np.arange(lo, lo + k, dtype=np.uint64)
        packs = np.zeros((k, 16), np.uint8)
        packs[:, :8] = (rows // 4096).astype("<u8").view(np.uint8).reshape(k, 8)
        yield d, packs, rows, np.full(k, 4096, np.uint32), np.full(k, 4096, np.uint32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--entries", type=int, default=1_000_000)
    ap.add_argument("--sealed", action="store_true", help="seal pages and head (AES-256-GCM)")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    n = args.entries
    cipher = Cipher("aes-256-gcm", os.urandom(32)) if args.sealed else None
    rng = np.random.default_rng(8)
    want = np.sort(rng.choice(n, min(n, 100_000), replace=False))
    out: dict[str, Any] = {"entries": n, "sealed": bool(args.sealed)}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = os.path.join(tmp, "segment")
        kept: list[npt.NDArray[np.uint8]] = []
        t0 = time.perf_counter()
        with open(path, "wb") as f:
            w = PagedWriter(f.write, total=n, name="bench", cipher=cipher)
            for part in synthetic(n, seed=3):
                lo = int(part[2][0])
                kept.append(part[0][want[(want >= lo) & (want < lo + len(part[2]))] - lo])
                w.add(*part)
            size = w.finish()
        out["write_seconds"] = time.perf_counter() - t0
        out["bytes_per_entry"] = size / n
        hits = np.concatenate(kept)
        order = rng.permutation(len(hits))
        hits, rows = hits[order], want[order]
        misses = rng.integers(0, 256, (1_000_000, 32), dtype=np.uint8)
        fd = os.open(path, os.O_RDONLY)
        try:
            def segment() -> PagedSegment:
                return PagedSegment.open(lambda o, k: os.pread(fd, k, o), size, name="bench",
                                         where=path, cipher=cipher)

            gc.collect()
            tracemalloc.start()
            seg = segment()
            got = seg.lookup(hits[:10_000])
            out["peak_open_lookup_10k"] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert (got == rows[:10_000]).all()
            out["head_bytes"] = seg.head_bytes
            for label, q in (("hit", hits), ("miss", misses)):
                for m in (10_000, 100_000):
                    seg = segment()
                    t0 = time.perf_counter()
                    seg.lookup(q[:m])
                    out[f"lookup_{label}_{m}_ids_per_s"] = m / (time.perf_counter() - t0)
            seg = segment()
            found = seg.lookup(hits[:10_000])
            t0 = time.perf_counter()
            seg.gather(found)
            out["gather_10k_rows_per_s"] = 10_000 / (time.perf_counter() - t0)
            seg = segment()
            t0 = time.perf_counter()
            seg.find(hits[:10_000])
            out["find_10k_ids_per_s"] = 10_000 / (time.perf_counter() - t0)
            t0 = time.perf_counter()
            total = sum(len(c["offset"]) for c in segment().chunks())
            out["chunks_entries_per_s"] = total / (time.perf_counter() - t0)
            # compaction: the segment merged with itself (every entry twice, one kept)
            merged = PagedWriter(lambda b: None, total=2 * n, name="merged", cipher=cipher)
            gc.collect()
            tracemalloc.start()
            t0 = time.perf_counter()
            kept_n = merge_paged([segment(), segment()], merged)
            out["merge_entries_per_s"] = 2 * n / (time.perf_counter() - t0)
            out["merge_peak"] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert kept_n == n
        finally:
            os.close(fd)
    if args.json:
        print(json.dumps(out))
        return
    for key, value in out.items():
        print(f"{key:32} {value:,.2f}" if isinstance(value, float) else f"{key:32} {value}")


if __name__ == "__main__":
    main()

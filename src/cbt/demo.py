"""The demo: two days of a disk, scanned and diffed, checked against the truth.

1. In a new directory, generate day 0 of a file-system-like image (data, text,
   zero regions, holes).
2. Copy it (keeping holes) to day 1 and apply a day's realistic changes:
   scattered 4 KiB writes, longer runs straddling block boundaries, a zeroed
   region, a punched hole, an append.
3. Scan day 0 into a manifest (``day0.arrow``), as a backup would keep it.
4. Diff the manifest against day 1 (hashing day 1), and the two images
   directly (no hashing).
5. Check both answers against an independent byte-for-byte numpy comparison.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from cbt.diff import diff
from cbt.errors import CbtValueError
from cbt.scan import DEFAULT_BLOCK_SIZE, scan
from cbt.synth import copy_sparse, make_fs_image, mutate


def new_demo_dir(directory: str | os.PathLike[str] | None) -> Path:
    """The demo's directory: a fresh one, or ``directory`` if new or empty."""
    if directory is None:
        import tempfile

        return Path(tempfile.mkdtemp(prefix="cbt-demo-"))
    d = Path(directory)
    if d.exists() and (not d.is_dir() or any(d.iterdir())):
        raise CbtValueError(f"demo directory exists and is not empty: {d}")
    d.mkdir(parents=True, exist_ok=True)
    return d


def _truth(a: Path, b: Path, block_size: int) -> np.ndarray:
    """Changed blocks by plain numpy over the whole files (independent of the core)."""
    x = np.fromfile(a, dtype=np.uint8)
    y = np.fromfile(b, dtype=np.uint8)
    short, big = min(len(x), len(y)), max(len(x), len(y))
    n = -(-big // block_size)
    full = short // block_size
    out = np.ones(n, dtype=np.uint8)
    same = (x[: full * block_size] == y[: full * block_size]).reshape(full, block_size).all(1)
    out[:full] = ~same
    if len(x) == len(y) and full < n:
        out[full] = int(not np.array_equal(x[full * block_size:], y[full * block_size:]))
    return out


def run_demo(directory: str | os.PathLike[str] | None = None, size: int = 256 << 20,
             block_size: int = DEFAULT_BLOCK_SIZE) -> dict[str, Any]:
    started = time.perf_counter()
    d = new_demo_dir(directory)
    day0, day1, manifest_path = d / "day0.img", d / "day1.img", d / "day0.arrow"
    make_fs_image(day0, size, seed=1)
    copy_sparse(day0, day1)
    changes = mutate(day1, seed=2, page_writes=200, runs=6, resize=3 * 4096 + 1000)
    m0 = scan(day0, block_size)
    m0.write(manifest_path)
    by_manifest = diff(manifest_path, day1)
    by_images = diff(day0, day1, block_size)
    truth = _truth(day0, day1, block_size)
    agree = bool(np.array_equal(by_manifest.bitmap, truth)
                 and np.array_equal(by_images.bitmap, truth))
    return {
        "dir": str(d),
        "day0": str(day0),
        "day1": str(day1),
        "manifest": str(manifest_path),
        "block_size": block_size,
        "day0_scan": m0.summary(),
        "changes": [{"kind": c.kind, "offset": c.offset, "length": c.length}
                    for c in changes],
        "diff": by_manifest.to_dict(),
        "truth_changed_blocks": int(truth.sum()),
        "agrees_with_truth": agree,
        "seconds": round(time.perf_counter() - started, 3),
        "warnings": [],
    }

"""Block ranges to rows and back (format.manifest.range_rows / row_runs), against loops."""

from __future__ import annotations

import numpy as np

from cbt.format.manifest import range_rows, row_runs


def test_range_rows_and_row_runs_against_a_loop() -> None:
    rng = np.random.default_rng(1)
    for _ in range(300):
        k = int(rng.integers(0, 20))
        ends = np.sort(rng.choice(1000, 2 * k, replace=False))
        ranges = [(int(ends[2 * i]), int(ends[2 * i + 1])) for i in range(k)]
        truth = [b for lo, hi in ranges for b in range(lo, hi)]
        rows = range_rows(ranges)
        assert rows.dtype == np.uint64 and rows.tolist() == truth
        merged: list[tuple[int, int]] = []  # adjacent ranges make one run
        for lo, hi in ranges:
            if merged and merged[-1][1] == lo:
                merged[-1] = (merged[-1][0], hi)
            else:
                merged.append((lo, hi))
        starts, stops = row_runs(rows)
        assert list(zip(starts.tolist(), stops.tolist(), strict=True)) == merged
    assert range_rows([]).tolist() == [] and range_rows([(5, 5)]).tolist() == []
    assert row_runs(np.zeros(0, dtype=np.uint64))[0].tolist() == []

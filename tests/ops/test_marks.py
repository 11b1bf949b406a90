"""Marks (a bit per index position) against a plain bool array: set, ranges at every
alignment, the marked positions in ascending order, the count."""

from __future__ import annotations

import numpy as np
import pytest

from cbt.ops.marks import Marks


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1000, 70_001])
def test_marks_equal_a_bool_array(n: int) -> None:
    rng = np.random.default_rng(n)
    marks, truth = Marks(n), np.zeros(n, dtype=bool)
    for _ in range(3):
        pos = rng.integers(0, n, n // 3 + 1) if n else np.zeros(0, np.int64)
        pos = np.concatenate([pos, pos[:5]])  # repeats
        marks.set(pos)
        truth[pos] = True
    assert marks.bits.nbytes == (n + 7) // 8
    for start in {0, 1, 3, 8, n // 2, max(0, n - 9), n}:
        for stop in {start, start + 1, start + 13, start + 4096, n, n + 5}:
            assert marks.get(start, stop).tolist() == truth[start:min(stop, n)].tolist()
    for step in (8, 24, 1 << 20):
        got = list(marks.positions(step))
        assert all(len(g) <= step for g in got)
        flat = np.concatenate([np.zeros(0, np.int64), *got])
        assert flat.tolist() == np.nonzero(truth)[0].tolist()
    assert marks.count() == int(truth.sum())


def test_marks_refuse_a_position_outside() -> None:
    marks = Marks(10)
    for bad in ([10], [-1], [3, 11]):
        with pytest.raises(IndexError):
            marks.set(np.array(bad, dtype=np.int64))
    assert marks.count() == 0

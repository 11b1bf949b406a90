"""The benchmark scripts' modules (bench/) importable by their tests, as the scripts
import each other: by plain name (``import realset``)."""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

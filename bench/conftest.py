"""Benchmark support: prints a GB/s table after pytest-benchmark's own table.

pytest-benchmark's columns are fixed (min, max, mean, ...), so each case in
``bench_core.py`` stores its throughput in ``benchmark.extra_info["GB/s"]``
(also written by ``--benchmark-json``) and this hook prints those figures,
one line per case.  GB = 1e9 bytes, from the median round time.
"""

from __future__ import annotations

from typing import Any

import pytest


def _benchmarks(config: pytest.Config) -> list[Any]:
    session = getattr(config, "_benchmarksession", None)
    return list(getattr(session, "benchmarks", None) or [])


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter: Any, exitstatus: int,
                            config: pytest.Config) -> None:
    rows = [b for b in _benchmarks(config) if "GB/s" in b.extra_info]
    if not rows:
        return
    tr = terminalreporter
    tr.write_sep("-", "throughput (GB/s = 1e9 bytes / median round time)")
    width = max(len(b.name) for b in rows)
    tr.write_line(f"{'case':<{width}}  {'median ms':>10}  {'GB/s':>8}  what")
    for b in rows:  # in the order they ran
        median_ms = b.stats.median * 1e3
        tr.write_line(f"{b.name:<{width}}  {median_ms:>10.3f}  {b.extra_info['GB/s']:>8.2f}  "
                      f"{b.extra_info.get('what', '')}")

"""Issue 17's target table as bench/peers.py and bench/race.py judge it: each threshold
passes at its value and misses just below (fake times, no commands run)."""

from __future__ import annotations

from typing import Any

import peers
import pytest
import race


def judged(cbt_key: str, peer_key: str, ratio: float) -> dict[str, Any]:
    """peers.comparisons of one pair whose peer takes ``ratio`` times cbt's time."""
    a = peers.Command(cbt_key, cbt_key, [], 1, peer_key, times=[1.0, 1.0, 1.0])
    b = peers.Command(peer_key, peer_key, [], 1, times=[ratio] * 3)
    (comp,) = peers.comparisons({cbt_key: a, peer_key: b})
    return comp


@pytest.mark.parametrize(("cbt_key", "peer_key", "want"), [
    ("scan1", "b3sum1", 0.95), ("scanN", "b3sumN", 0.95), ("scan1_4k", "b3sum1", 0.9),
    ("diff", "b3sum1", 1.5), ("ext_scan1", "ext_b3sum1", 0.95),
    ("ext_scanN", "ext_b3sumN", 0.95), ("ext_scan1_4k", "ext_b3sum1", 0.9),
    ("ext_diff", "ext_b3sum1", 1.5), ("db_scan1", "db_b3sum1", 0.95),
    ("db_scan1_4k", "db_b3sum1", 0.9)])
def test_peers_targets(cbt_key: str, peer_key: str, want: float) -> None:
    assert judged(cbt_key, peer_key, want)["pass"] is True
    assert judged(cbt_key, peer_key, want - 0.01)["pass"] is False
    assert judged(cbt_key, peer_key, want)["want"] == f">= {want:g}x"


def rows(incr_borg: float, restore_cp: float, restore_borg: float) -> list[dict[str, Any]]:
    """race.summarize-like rows: cbt takes 1 s for each operation."""
    def row(op: str, tool: str, ratio: float) -> dict[str, Any]:
        return {"op": op, "tool": tool, "median": ratio, "ratio": ratio, "stored": 100}
    return [row("incr", "cbt", 1), row("incr", "borg", incr_borg),
            row("restore", "cbt", 1), row("restore", "cp", restore_cp),
            row("restore", "borg", restore_borg)]


def test_race_targets() -> None:
    result = {t["what"]: t["pass"] for t in race.targets(rows(5.0, 0.8, 3.0), None)}
    assert result == {"incremental backup (day 1): borg s / cbt s": True,
                      "restore (day 1) + sync: cp s / cbt s": True,
                      "restore (day 1) + sync: borg s / cbt s": True,
                      "incremental backup (day 1): bytes stored, cbt vs borg": True}
    missed = race.targets(rows(4.9, 0.79, 2.9), None)
    assert [t["pass"] for t in missed] == [False, False, False, True]


def test_race_judges_the_targets_on_ext4db() -> None:
    assert race.JUDGED == "ext4db" and race.JUDGED in race.SETS


def test_race_targets_of_an_lz4_vault() -> None:
    """cbt-lz4 (a vault of --compression lz4) is judged against the peers on its own
    times and bytes, beside cbt's."""
    lz4 = [{**r, "tool": "cbt-lz4", "median": r["median"] / 2, "stored": 150}
           for r in rows(5.0, 0.8, 3.0) if r["tool"] == "cbt"]
    got = {t["what"]: (t["value"], t["pass"])
           for t in race.targets(rows(5.0, 0.8, 3.0) + lz4, None)}
    assert got["restore (day 1) + sync: cp s / cbt s"] == (0.8, True)
    assert got["restore (day 1) + sync: cp s / cbt-lz4 s"] == (1.6, True)
    assert got["incremental backup (day 1): borg s / cbt-lz4 s"] == (10.0, True)
    assert got["incremental backup (day 1): bytes stored, cbt-lz4 vs borg"][1] is False
    assert got["incremental backup (day 1): bytes stored, cbt vs borg"][1] is True

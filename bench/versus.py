#!/usr/bin/env python3
"""Two builds of cbt against each other on bench/race's realistic (ext4db) set: is a change
slower?

Usage::

    python bench/versus.py --cbt-b /path/to/other/bin/cbt [--cbt PATH] [--dir /var/tmp/cbt-bench]
                           [--size 2G] [--pairs 10] [--compression zstd|lz4] [--json]

``--cbt`` (A, default: the ``cbt`` next to this Python) and ``--cbt-b`` (B: typically a
virtual environment with the code before a change, ``pip install .`` of a ``git worktree``
of it).  The set is bench/race.py's ext4db set (made there, or here the same way, in
``--dir``).

Each pair runs A and B once each, in turn A B then B A (ABBA: neither always goes first);
each run: a fresh unencrypted vault (of ``--compression``, default zstd), the full backup
of day 0 (not timed), the timed incremental backup of day 1, then the timed restore of
day 1 followed by ``sync`` of the restored files.  A vault is a build's own: a change to
the vault's formats is measured with it.  The figures: for each of the two timed steps,
the median of A/B over the pairs (wall and CPU; CPU is user + sys of the process and its
workers) with its smallest and largest, and each build's median seconds.  A pair's ratio
scatters by 10-20% on a shared machine: judge the median of many pairs, not one.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness
import race

STEPS = ("incremental backup (day 1)", "restore (day 1) + sync")


def one_run(cbt: str, ds: race.DataSet, work: Path, compression: str = "zstd"
            ) -> tuple[tuple[float, float], ...]:
    """(wall, cpu) of the incremental and of the restore + sync, in a fresh vault."""
    vault, out = work / "vault", work / "restore"
    shutil.rmtree(vault, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    harness.run_timed([cbt, "init", "--encryption", "none", "--compression", compression,
                       str(vault)])
    backup = [cbt, "backup", "--vm", "ext4db", "--block-size", "16K", "--json", str(vault)]
    harness.run_timed(backup + [f"{d.label}={d.day0}" for d in ds.disks])
    harness.ensure_cached(ds.files())
    wall, cpu, said = harness.run_timed(backup + [f"{d.label}={d.day1}" for d in ds.disks],
                                        capture=True)
    point = json.loads(said.strip().splitlines()[-1])["recovery_point"]
    r_wall, r_cpu, _ = harness.run_timed(
        ["sh", "-c", '"$0" restore --json "$1" "$2" --to "$3" >/dev/null && sync "$3"/*',
         cbt, str(vault), point, str(out)])
    shutil.rmtree(vault)
    shutil.rmtree(out)
    return (wall, cpu), (r_wall, r_cpu)


def main(argv: list[str] | None = None) -> int:
    p = harness.parser(__doc__ or "", "/var/tmp/cbt-bench", "where the set is (made)", "2G",
                       "bench/race.py's --size of the set (2G: a 1 GiB ext4 image)")
    p.add_argument("--cbt-b", required=True, metavar="PATH",
                   help="build B, the one A (--cbt) is held against")
    p.add_argument("--pairs", type=int, default=10, help="ABBA pairs (default 10, at least 2)")
    p.add_argument("--compression", choices=("zstd", "lz4"), default="zstd",
                   help="the vaults' codec (both builds must know it; default zstd)")
    harness.add_output_options(p)
    args, size = harness.parse(p, argv)
    if args.pairs < 2:
        p.error("--pairs: at least 2")
    a, b = harness.find_cbt(args.cbt), harness.find_cbt(args.cbt_b)
    work = Path(args.dir)
    ds = race.ext4db_set(work, size)
    race.build(ds)
    scratch = work / "versus"
    runs: dict[str, list[tuple[tuple[float, float], ...]]] = {"A": [], "B": []}
    try:
        for i in range(args.pairs):
            for who in ("AB" if i % 2 == 0 else "BA"):
                runs[who].append(one_run(a if who == "A" else b, ds, scratch,
                                         args.compression))
            harness.log(f"pair {i + 1} of {args.pairs}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    result: dict[str, Any] = {"a": a, "b": b, "pairs": args.pairs, "steps": {}}
    for k, step in enumerate(STEPS):
        ratios = {m: sorted(x[k][m] / y[k][m] for x, y in zip(runs["A"], runs["B"], strict=True))
                  for m in (0, 1)}
        result["steps"][step] = {
            "a_seconds": harness.median([r[k][0] for r in runs["A"]]),
            "b_seconds": harness.median([r[k][0] for r in runs["B"]]),
            "a_cpu": harness.median([r[k][1] for r in runs["A"]]),
            "b_cpu": harness.median([r[k][1] for r in runs["B"]]),
            "wall_ratio": [ratios[0][0], harness.median(ratios[0]), ratios[0][-1]],
            "cpu_ratio": [ratios[1][0], harness.median(ratios[1]), ratios[1][-1]]}

    def report() -> str:
        rows = [["step", "A s", "B s", "A/B wall (min-max)", "A cpu", "B cpu",
                 "A/B cpu (min-max)"]]
        for step, f in result["steps"].items():
            w, c = f["wall_ratio"], f["cpu_ratio"]
            rows.append([step, f"{f['a_seconds']:.2f}", f"{f['b_seconds']:.2f}",
                         f"{w[1]:.3f} ({w[0]:.2f}-{w[2]:.2f})", f"{f['a_cpu']:.2f}",
                         f"{f['b_cpu']:.2f}", f"{c[1]:.3f} ({c[0]:.2f}-{c[2]:.2f})"])
        return "\n".join([f"A = {a}", f"B = {b}",
                          f"{args.pairs} ABBA pairs on {ds.title}, {args.compression} vaults; "
                          "medians",
                          *harness.table(rows, {1, 2, 3, 4, 5, 6}),
                          "A/B above 1: A is slower"])

    harness.emit(args.json, lambda: result, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

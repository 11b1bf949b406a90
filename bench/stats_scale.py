#!/usr/bin/env python3
"""Time and memory of ``cbt stats`` as the points and blocks grow (it must stay linear).

Usage::

    python bench/stats_scale.py [--dir /var/tmp/cbt-stats] [--size 256M] [--block 4K]
                                [--points 10,20,40] [--change 0.02] [--json] [--keep]

Backs up one VM's disk of ``--size`` random bytes in ``--block`` blocks (``cbt
backup`` processes: this one stays small, as a child's peak RSS starts at its
parent's), ``--change`` of its blocks rewritten before each point,
up to the largest ``--points``; after each count in ``--points``, runs ``cbt stats
--json`` as its own process and prints the references counted (points x blocks),
the wall time and the peak RSS (``wait4``'s ``ru_maxrss``).  Everything made is
removed at the end (``--keep``: the vault stays, to profile).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from cbt.core.sizes import human_bytes, parse_size

CBT = str(Path(sys.executable).with_name("cbt"))


def run_stats(vault: Path) -> tuple[float, int, dict[str, object]]:
    """Wall seconds, peak RSS bytes and the JSON of one ``cbt stats --json``."""
    t0 = time.monotonic()
    p = subprocess.Popen([CBT, "stats", str(vault), "--json"], stdout=subprocess.PIPE)
    out = p.stdout.read() if p.stdout else b""
    _pid, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        raise SystemExit(f"cbt stats failed with {p.returncode}")
    return time.monotonic() - t0, usage.ru_maxrss * 1024, json.loads(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default="/var/tmp/cbt-stats")
    p.add_argument("--size", default="256M")
    p.add_argument("--block", default="4K")
    p.add_argument("--points", default="10,20,40")
    p.add_argument("--change", type=float, default=0.02)
    p.add_argument("--json", action="store_true")
    p.add_argument("--keep", action="store_true", help="leave the vault in --dir")
    args = p.parse_args(argv)
    size, bs = parse_size(args.size), parse_size(args.block)
    counts = sorted(int(c) for c in args.points.split(","))
    work = Path(args.dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rng = np.random.default_rng(5)
    disk = work / "d.img"
    with open(disk, "wb") as f:
        for _ in range(0, size, 1 << 20):
            f.write(os.urandom(min(1 << 20, size)))
    subprocess.run([CBT, "init", str(work / "vault"), "--encryption", "none", "-q"], check=True)
    nblocks = size // bs
    rows = []
    try:
        for n in range(1, counts[-1] + 1):
            if n > 1:
                with open(disk, "r+b") as f:
                    for b in rng.choice(nblocks, int(nblocks * args.change), replace=False):
                        f.seek(int(b) * bs)
                        f.write(rng.integers(0, 256, bs, dtype=np.uint8).tobytes())
            subprocess.run([CBT, "backup", str(work / "vault"), "--vm", "vm", f"d={disk}",
                            "--block-size", args.block, "--workers", "2", "-q"], check=True,
                           stdout=subprocess.DEVNULL)
            if n in counts:
                secs, rss, out = run_stats(work / "vault")
                rows.append({"points": n, "references": n * nblocks, "seconds": round(secs, 3),
                             "peak_rss": rss, "stored_bytes": out["stored_bytes"]})
                print(f"{n:4d} points x {nblocks} blocks: {secs:.2f} s, peak RSS "
                      f"{human_bytes(rss)}", file=sys.stderr, flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps({"size": size, "block_size": bs, "runs": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

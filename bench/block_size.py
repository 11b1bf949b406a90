#!/usr/bin/env python3
"""Choose the default block size: bytes stored and time per incremental backup.

For each block size, back up day 0 of two realistic disks into a fresh vault,
apply a day of changes, back up day 1, and report what day 1 stored and how
long each backup took (whole backup, in-process):

- ``db``: a database-like file changed by scattered 4 KiB page writes;
- ``fs``: a file-system-like image changed by longer runs.

    python bench/block_size.py [--size 512M] [--dir /var/tmp/cbt-bs]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import cbt
from cbt.core.sizes import format_size, parse_size
from cbt.source.synth import copy_sparse, make_db_file, make_fs_image, mutate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="512M")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--sizes", default="4K,16K,64K,256K,1M")
    args = ap.parse_args()
    size = parse_size(args.size)
    work = Path(args.dir or tempfile.mkdtemp(prefix="cbt-bs-"))
    work.mkdir(parents=True, exist_ok=True)
    base = {"db": work / "db0.img", "fs": work / "fs0.img"}
    make_db_file(base["db"], size, seed=1)
    make_fs_image(base["fs"], size, seed=2)
    days = {"db": dict(page_writes=size // 4096 // 50, runs=0, zero_runs=0, holes=0),
            "fs": dict(page_writes=16, runs=12, run_length=2 << 20, zero_runs=1, holes=1)}
    print(f"{'disk':<4} {'block':>6} {'day0 s':>7} {'day1 s':>7} {'changed':>9} "
          f"{'day1 new':>12} {'day1 stored':>12} {'manifest':>10}")
    for kind in ("db", "fs"):
        day1 = work / f"{kind}1.img"
        copy_sparse(base[kind], day1)
        mutate(day1, seed=3, **days[kind])
        for bs in [parse_size(s) for s in args.sizes.split(",")]:
            vdir = work / f"vault-{kind}-{bs}"
            shutil.rmtree(vdir, ignore_errors=True)
            v = cbt.Vault.init(vdir)
            t = time.perf_counter()
            v.backup(kind, [f"d={base[kind]}"], block_size=bs)
            t0 = time.perf_counter() - t
            t = time.perf_counter()
            p = v.backup(kind, [f"d={day1}"])
            t1 = time.perf_counter() - t
            d = p.disks[0]
            mf = (vdir / d.manifest).stat().st_size
            print(f"{kind:<4} {format_size(bs):>6} {t0:>7.2f} {t1:>7.2f} {d.changed_blocks:>9} "
                  f"{d.bytes_new:>12} {d.bytes_stored:>12} {mf:>10}")
            shutil.rmtree(vdir)
    if not args.dir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()

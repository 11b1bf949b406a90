#!/usr/bin/env python3
"""The README's picture of ``cbt diff --map`` (``docs/diff-map.png``), made again.

Usage (root: the ext4db set mounts its image to change it)::

    python bench/diff_map_picture.py [--dir /var/tmp/cbt-bench] [--size 2G]
                                     [--out docs/diff-map.png] [--width 1000]

1. The ext4db set of ``bench/race.py`` (``bench/realset.py``): an ext4 image of
   ``--size``/2 holding files of this machine, changed as a system changes in a
   day (deletes, in-place rewrites, appends, new files, a tree copied in), made
   in ``--dir/ext4db`` or reused there when its recipe matches (``race.py
   --dir D --size S`` shares it).
2. ``cbt diff day0/ext4.img day1/ext4.img --map OUT --width W`` run in the set's
   folder (the picture's title names the two days, not the folders), 64 KiB
   blocks.
3. cbt's summary line (blocks changed) is printed: the README's caption.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import race
import realset
from harness import BenchError, find_cbt, log, size_arg


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default="/var/tmp/cbt-bench", help="work directory (the set)")
    p.add_argument("--size", default="2G", help="the set's size (the image is half)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "docs"
                                        / "diff-map.png"), help="the picture (.png or .svg)")
    p.add_argument("--width", type=int, default=1000, help="cells of the strip")
    p.add_argument("--cbt", help="the cbt command (default: the one beside this Python)")
    args = p.parse_args(argv)
    size = size_arg(p, args.size)
    cbt = find_cbt(args.cbt)
    ds = race.ext4db_set(Path(args.dir), size)
    race.build(ds)
    out = os.path.abspath(args.out)
    r = subprocess.run([cbt, "diff", f"day0/{realset.IMAGE}", f"day1/{realset.IMAGE}",
                        "--map", out, "--width", str(args.width)], cwd=ds.root,
                       capture_output=True, text=True, check=False)
    if r.returncode not in (0, 1):  # (1: they differ, as they should)
        raise BenchError(f"cbt diff failed: {r.stderr.strip()}")
    log(f"wrote {out}")
    print(r.stdout.splitlines()[0])
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (BenchError, realset.SetError) as exc:
        print(f"diff_map_picture: {exc}", file=sys.stderr)
        sys.exit(2)

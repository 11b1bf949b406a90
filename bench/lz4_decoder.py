#!/usr/bin/env python3
"""cbt's own LZ4 block decoder against the system's liblz4, in C, side by side.

Usage::

    python bench/lz4_decoder.py [--data FILE ...] [--block-size 16K] [--runs 9] [--json]

1. Cuts the files (default: the ext4db set's day-1 ext4 image and SQLite database that
   ``bench/race.py --keep`` leaves) into blocks, drops the all-zero ones (a vault never
   stores them), and compresses each with the ``lz4`` package as a vault does (an lz4
   block, no size prefix); those that shrink are written to one file.
2. Compiles one small C harness twice (``cc -O2``): once with cbt's decoder
   (``src/cbt/core/lz4/decode.c``), once calling ``LZ4_decompress_safe`` of the system's
   ``liblz4.so.1`` (Debian's liblz4-1; its headers are not needed).  Each harness decodes
   every block into a buffer that stays in cache (32 slots of a block each) and checks
   that it got exactly the block's length, ``--runs`` times, and prints each run's time.
3. Runs the two alternately, ``--runs`` rounds each, and prints the best time of each,
   its GB/s of decoded bytes and cbt's speed as a fraction of liblz4's.

Needs a C compiler and liblz4.so.1 (exit 2, one line, without them).  The harness is
the decoder alone: no Python, no hashing (``bench/codec_speed.py`` times restore's whole
loop, decode and check).
"""

from __future__ import annotations

import argparse
import ctypes.util
import json
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import lz4.block

from cbt.core.sizes import parse_size

ROOT = Path(__file__).resolve().parents[1]
DECODER = ROOT / "src" / "cbt" / "core" / "lz4"
DATA = [Path("/var/tmp/cbt-bench/ext4db/day1/ext4.img"),
        Path("/var/tmp/cbt-bench/ext4db/day1/app.sqlite")]

HARNESS = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef SYSTEM_LZ4
int LZ4_decompress_safe(const char *src, char *dst, int n, int cap);
static int decode(const uint8_t *s, size_t n, uint8_t *d, size_t cap)
{
    return LZ4_decompress_safe((const char *)s, (char *)d, (int)n, (int)cap) == (int)cap ? 0 : -1;
}
#else
#include "cbt_lz4.h"
static int decode(const uint8_t *s, size_t n, uint8_t *d, size_t cap)
{
    return cbt_lz4_decode(s, n, d, cap);
}
#endif
int main(int argc, char **argv)
{
    FILE *f = fopen(argv[1], "rb");
    int runs = atoi(argv[2]);
    if (!f) return 2;
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *buf = malloc(size), *out = malloc((size_t)32 << 22);
    if (!buf || !out || fread(buf, 1, size, f) != (size_t)size) return 2;
    for (int r = 0; r < runs; r++) {
        struct timespec a, b;
        long p = 0, raw = 0, bad = 0, k = 0;
        clock_gettime(CLOCK_MONOTONIC, &a);
        while (p < size) {
            uint32_t n, cap;
            memcpy(&n, buf + p, 4);
            memcpy(&cap, buf + p + 4, 4);
            p += 8;
            bad += decode(buf + p, n, out + (k++ % 32) * (size_t)cap, cap) != 0;
            p += n;
            raw += cap;
        }
        clock_gettime(CLOCK_MONOTONIC, &b);
        printf("%.6f %ld %ld\n", (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9, raw, bad);
        fflush(stdout);
    }
    return 0;
}
"""


def write_blocks(files: list[Path], bs: int, out: Path) -> tuple[int, int, int]:
    """The files' non-zero blocks that lz4 shrinks, as (length, raw length, block) records."""
    count = raw = stored = 0
    with out.open("wb") as o:
        for path in files:
            with path.open("rb") as f:
                while block := f.read(bs):
                    if block.count(0) == len(block):
                        continue
                    packed = lz4.block.compress(block, store_size=False)
                    if len(packed) < len(block):
                        o.write(struct.pack("<II", len(packed), len(block)) + packed)
                        count, raw, stored = count + 1, raw + len(block), stored + len(packed)
    return count, raw, stored


def build(cc: str, tmp: Path, system_lz4: str | None) -> Path:
    src = tmp / "harness.c"
    src.write_text(HARNESS)
    exe = tmp / ("liblz4" if system_lz4 else "cbt")
    argv = [cc, "-O2", "-o", str(exe), str(src)]
    argv += (["-DSYSTEM_LZ4", system_lz4] if system_lz4  # (-l:liblz4.so.1: no -dev package)
             else [f"-I{DECODER}", str(DECODER / "decode.c")])
    subprocess.run(argv, check=True)
    return exe


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="cbt's LZ4 decoder against the system's liblz4")
    p.add_argument("--data", nargs="+", type=Path, default=DATA)
    p.add_argument("--block-size", default="16K")
    p.add_argument("--runs", type=int, default=9)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    cc = shutil.which("cc") or shutil.which("gcc")
    lib = ctypes.util.find_library("lz4")
    missing = [what for what, ok in (("a C compiler (cc)", cc), ("liblz4.so.1", lib)) if not ok]
    missing += [str(f) for f in args.data if not f.is_file()]
    if missing:
        print(f"lz4_decoder.py: missing {', '.join(missing)}", file=sys.stderr)
        return 2
    assert cc is not None and lib is not None
    with tempfile.TemporaryDirectory(prefix="cbt-lz4-bench-") as t:
        tmp = Path(t)
        count, raw, stored = write_blocks(args.data, parse_size(args.block_size),
                                          tmp / "blocks.bin")
        if not count:
            print("lz4_decoder.py: no block of the data compresses", file=sys.stderr)
            return 2
        exes = {"cbt": build(cc, tmp, None), "liblz4": build(cc, tmp, f"-l:{lib}")}
        times: dict[str, list[float]] = {name: [] for name in exes}
        for _ in range(max(1, args.runs)):  # alternately, one run each
            for name, exe in exes.items():
                out = subprocess.run([str(exe), str(tmp / "blocks.bin"), "1"], check=True,
                                     capture_output=True, text=True).stdout.split()
                seconds, got, bad = float(out[0]), int(out[1]), int(out[2])
                if bad or got != raw:
                    print(f"lz4_decoder.py: {name} failed {bad} of {count} blocks",
                          file=sys.stderr)
                    return 1
                times[name].append(seconds)
    best = {name: min(ts) for name, ts in times.items()}
    gb_s = {k: round(raw / v / 1e9, 2) for k, v in best.items()}
    result: dict[str, Any] = {
        "blocks": count, "raw_mb": round(raw / 1e6, 1), "stored_mb": round(stored / 1e6, 1),
        "best_s": {k: round(v, 4) for k, v in best.items()}, "gb_s": gb_s,
        "cbt_speed_vs_liblz4": round(best["liblz4"] / best["cbt"], 3)}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{count} lz4 blocks, {result['raw_mb']} MB decoded ({result['stored_mb']} MB stored); "
          f"best of {args.runs} alternating runs, one core:")
    for name in exes:
        print(f"  {name:6}: {best[name]:.3f} s, {gb_s[name]} GB/s")
    print(f"  cbt's decoder at {result['cbt_speed_vs_liblz4']:.2f}x liblz4's speed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

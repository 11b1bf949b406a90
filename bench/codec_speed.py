#!/usr/bin/env python3
"""The two codecs of a vault, zstd (level 1) and lz4, on real blocks: CPU time and bytes.

Usage::

    python bench/codec_speed.py [--vault /var/tmp/cbt-bench/kept/ext4db-cbt-vault] [--blocks 40000]
                           [--runs 3] [--json]

1. Reads the compressible blocks of a plain vault (default: the ext4db set's vault that
   ``bench/race.py --keep`` leaves, an ext4 image's and a SQLite database's blocks; its
   lz4 vault serves as well), each decoded back to its content with cbt's own reader
   (which checks it), the first ``--blocks``.
2. Compresses every block with each codec at cbt's settings, one call a block (zstd
   level 1 through one reused ``zstandard`` context; lz4 as a block with no size
   prefix; a backup codes a zstd run of 64 blocks by one call),
   then decompresses them (zstd: 64 frames a call through
   ``multi_decompress_to_buffer``; lz4: a call a block).  Each step is timed as this
   process's CPU time, best of ``--runs``: CPU time, not wall, so that other work on
   the machine weighs less.
3. Times a restore's work on the lz4 blocks, decoding and checking each against its
   digest, both ways: the ``lz4`` package a block a call and the core's batch BLAKE3 on
   every 64 (what restore did before), and the core's ``decode_check`` (cbt's own LZ4
   decoder and the batch BLAKE3, all blocks in one call, into one reused buffer: what
   an lz4 vault's restore runs now).
4. Prints bytes stored and MB/s of each step for each codec, and the ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lz4.block
import numpy as np
import zstandard

from cbt.core.native import fast
from cbt.format import pack

BATCH = 64  # frames a restore decompresses per call


def blocks_of(vault: Path, limit: int) -> list[bytes]:
    """The content of a plain vault's compressed blocks (zstd or lz4), pack by pack."""
    out: list[bytes] = []
    for path in sorted((vault / "packs").rglob("*.pack")):
        data = path.read_bytes()
        for e in pack.read_trailer(data, str(path)):
            start, stored = int(e["offset"]), int(e["stored"])
            if stored < int(e["raw"]):
                out.append(bytes(pack.decode_blob(data[start:start + pack.blob_length(stored)],
                                                  e["digest"].tobytes(), str(path))))
                if len(out) == limit:
                    return out
    return out


def best(runs: int, fn: Callable[[], Any]) -> tuple[float, Any]:
    """The least CPU time of ``runs`` calls of ``fn``, and its last result."""
    times, got = [], None
    for _ in range(runs):
        t = time.process_time()
        got = fn()
        times.append(time.process_time() - t)
    return min(times), got


def measure(raws: list[bytes], runs: int) -> dict[str, Any]:
    mb = sum(map(len, raws)) / 1e6
    cz = zstandard.ZstdCompressor(level=pack.ZSTD_LEVEL)
    dz = zstandard.ZstdDecompressor()
    tz, zs = best(runs, lambda: [cz.compress(b) for b in raws])
    tl, ls = best(runs, lambda: [lz4.block.compress(b, store_size=False) for b in raws])
    sizes = np.array([len(b) for b in raws], dtype="<u8")

    def zdec() -> None:
        for a in range(0, len(zs), BATCH):
            dz.multi_decompress_to_buffer(zs[a:a + BATCH],
                                          decompressed_sizes=sizes[a:a + BATCH].tobytes())

    tzd, _ = best(runs, zdec)
    tld, _ = best(runs, lambda: [lz4.block.decompress(x, uncompressed_size=len(r))
                                 for x, r in zip(ls, raws, strict=True)])
    return {"blocks": len(raws), "mb": round(mb, 1),
            "stored_mb": {"zstd": round(sum(map(len, zs)) / 1e6, 1),
                          "lz4": round(sum(map(len, ls)) / 1e6, 1)},
            "compress_cpu_s": {"zstd": round(tz, 3), "lz4": round(tl, 3)},
            "decompress_cpu_s": {"zstd": round(tzd, 3), "lz4": round(tld, 3)},
            "lz4_decode_verify_cpu_s": decode_verify(raws, ls, runs)}


def decode_verify(raws: list[bytes], ls: list[bytes], runs: int) -> dict[str, float]:
    """A restore's work on lz4 blocks ``ls`` (of ``raws``), CPU seconds, both ways; a block
    that does not decode to its own content is an error (the figures would be void)."""
    digests = np.empty((len(raws), fast.DIGEST_SIZE), dtype=np.uint8)
    fast.hash_each(list(raws), digests)
    sizes = [len(r) for r in raws]

    def package() -> None:
        got = np.empty((BATCH, fast.DIGEST_SIZE), dtype=np.uint8)
        for a in range(0, len(ls), BATCH):
            outs = [lz4.block.decompress(x, uncompressed_size=n)
                    for x, n in zip(ls[a:a + BATCH], sizes[a:a + BATCH], strict=True)]
            fast.hash_each(outs, got[:len(outs)])
            if (got[:len(outs)] != digests[a:a + len(outs)]).any():
                raise SystemExit("codec_speed.py: an lz4 block does not decode to itself")

    src = b"".join(ls)
    ends = np.cumsum([len(x) for x in ls], dtype=np.int64)
    starts = ends - np.array([len(x) for x in ls], dtype=np.int64)
    out = np.empty(sum(sizes), dtype=np.uint8)
    codecs = np.full(len(ls), fast.STORED_LZ4, dtype=np.uint8)
    sizes64 = np.array(sizes, dtype=np.int64)

    def core() -> None:
        bad, why = fast.decode_check(src, starts, ends, codecs, sizes64, out, digests)
        if bad >= 0:
            raise SystemExit(f"codec_speed.py: the core refused lz4 block {bad} ({why})")

    return {"lz4 package": round(best(runs, package)[0], 3),
            "cbt core": round(best(runs, core)[0], 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="zstd against lz4 on a vault's blocks")
    p.add_argument("--vault", default="/var/tmp/cbt-bench/kept/ext4db-cbt-vault", type=Path)
    p.add_argument("--blocks", type=int, default=40000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if not (args.vault / "packs").is_dir():
        print(f"codec_speed.py: no vault at {args.vault} (make it with bench/race.py --keep)",
              file=sys.stderr)
        return 2
    raws = blocks_of(args.vault, args.blocks)
    if not raws:
        print(f"codec_speed.py: {args.vault} holds no compressed block", file=sys.stderr)
        return 2
    r = measure(raws, max(1, args.runs))
    if args.json:
        print(json.dumps(r))
        return 0
    mb, st, c, d = r["mb"], r["stored_mb"], r["compress_cpu_s"], r["decompress_cpu_s"]
    print(f"{r['blocks']} blocks, {mb} MB, CPU time (best of {args.runs})")
    for codec in ("zstd", "lz4"):
        print(f"  {codec:4}: stored {st[codec]} MB; compress {mb / c[codec]:.0f} MB/s; "
              f"decompress {mb / d[codec]:.0f} MB/s")
    print(f"  lz4 against zstd: stores {st['lz4'] / st['zstd']:.2f}x, compresses "
          f"{c['zstd'] / c['lz4']:.2f}x and decompresses {d['zstd'] / d['lz4']:.2f}x faster")
    v = r["lz4_decode_verify_cpu_s"]
    print(f"  restore's work on the lz4 blocks (decode, then BLAKE3 against the digest): "
          f"lz4 package + batch hash {mb / v['lz4 package']:.0f} MB/s, the core's "
          f"decode_check {mb / v['cbt core']:.0f} MB/s "
          f"({v['lz4 package'] / v['cbt core']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

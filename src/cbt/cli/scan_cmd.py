"""Hash every block of a disk image or block device with BLAKE3.

Holes (SEEK_DATA/SEEK_HOLE) are never read and all-zero blocks are flagged
without hashing.  With -o the per-block manifest is written as an Arrow IPC
file (temporary name, fsync, rename), readable by pyarrow, DuckDB or polars.

--json prints {"path","size","block_size","blocks","data_blocks","zero_blocks",
"hole_blocks","bytes_read","seconds","warnings"}.
"""

from __future__ import annotations

import argparse

from cbt.cli._common import (
    EXIT_OK,
    add_json,
    local_path_arg,
    print_json,
    progress_bar,
    rate_text,
    say,
    size_arg,
    workers_arg,
)
from cbt.core.sizes import format_size, human_bytes

# scan_blocks, not scan: without -o nothing needs numpy or pyarrow (start-up time); imported
# here, with the command, while the collector is off (cbt.cli.main)
from cbt.source.scan import DEFAULT_BLOCK_SIZE, scan_blocks


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", metavar="IMAGE", help="disk image file or block device")
    p.add_argument("--block-size", type=size_arg, default=None, metavar="SIZE",
                   help="block size: a power of two from 4K to 4M (default 64K)")
    p.add_argument("--workers", type=workers_arg, default=None, metavar="N",
                   help="processes reading the disk in parallel (default: number of cores)")
    p.add_argument("-o", "--output", type=local_path_arg, metavar="FILE.arrow",
                   help="write the block manifest here (nothing is written without -o)")
    add_json(p)


def run(args: argparse.Namespace) -> int:
    bs = args.block_size or DEFAULT_BLOCK_SIZE
    with progress_bar(f"scan {args.image}") as progress:
        result = scan_blocks(args.image, bs, args.workers, progress)
    if args.output:
        result.manifest().write(args.output)
    if args.json:
        print_json(result.to_dict())
        return EXIT_OK
    s = result.summary()
    print(f"{s['path']}: {human_bytes(s['size'])} ({s['size']} bytes), {s['blocks']} blocks "
          f"of {format_size(bs)}")
    print(f"  data {s['data_blocks']}, zero {s['zero_blocks']}, hole {s['hole_blocks']}")
    print(f"  read {human_bytes(s['bytes_read'])} in {s['seconds']:.2f} s "
          f"({rate_text(s['bytes_read'], s['seconds'])})")
    if args.output:
        say(f"  manifest written to {args.output}")
    return EXIT_OK

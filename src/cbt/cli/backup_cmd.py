"""Back up a VM's disks into a vault: a new recovery point.

DISK is PATH or LABEL=PATH; the default label is the file name without its
last extension (disks/os.img -> os).  A disk's first backup is full; every
later one stores only the blocks the vault does not hold yet.  A disk keeps
the block size of its first backup.  The vault's writer lock is taken: a
second writer fails at once (or waits with --wait).

--json prints JSON Lines: {"type":"progress","vm","disk","bytes_done",
"bytes_total"} lines (a few per second at most), then one {"type":"point",
"recovery_point","vm","created","consistency","consistency_reason","disks":[
{"label","path","size","block_size","blocks","changed_blocks","bytes_read",
"bytes_new","bytes_stored","seconds"}],"seconds","warnings"} line.
"""

from __future__ import annotations

import argparse
import sys
import time

from cbt.cli._common import EXIT_OK, add_json, print_json, size_arg, workers_arg


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("vault", metavar="VAULT", help="the vault (made with cbt init)")
    p.add_argument("--vm", required=True, metavar="NAME", help="the VM these disks belong to")
    p.add_argument("disks", nargs="+", metavar="DISK", help="PATH or LABEL=PATH")
    p.add_argument("--block-size", type=size_arg, default=None, metavar="SIZE",
                   help="block size of a disk's first backup (default 16K)")
    p.add_argument("--workers", type=workers_arg, default=None, metavar="N",
                   help="worker processes (default: number of cores)")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="wait up to this long for another writer to finish (default: fail)")
    add_json(p)


def point_json(point: object) -> dict[str, object]:
    from cbt.vault.points import PointRecord

    assert isinstance(point, PointRecord)
    return {"type": "point", "recovery_point": point.id, "vm": point.vm,
            "created": point.created, "consistency": point.consistency,
            "consistency_reason": point.consistency_reason,
            "disks": [d.public() for d in point.disks], "seconds": point.seconds,
            "warnings": point.warnings}


def run(args: argparse.Namespace) -> int:
    from cbt.backup import parse_disk_arg
    from cbt.sizes import human_bytes
    from cbt.vault import Vault

    vault = Vault.open(args.vault)
    specs = [parse_disk_arg(d) for d in args.disks]
    progress = None
    bars = None
    if args.json:
        last: dict[str, float] = {}

        def progress(vm: str, disk: str, done: int, total: int) -> None:
            now = time.monotonic()
            if now - last.get(disk, 0.0) >= 0.5 or done >= total:
                if last.get(disk) == -1.0:
                    return
                last[disk] = -1.0 if done >= total else now
                print_json({"type": "progress", "vm": vm, "disk": disk, "bytes_done": done,
                            "bytes_total": total})
    elif sys.stderr.isatty():
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

        bars = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                        console=Console(stderr=True), transient=True)
        ids = {s.label: bars.add_task(s.label, total=None) for s in specs}

        def progress(vm: str, disk: str, done: int, total: int) -> None:
            bars.update(ids[disk], completed=done, total=total)

        bars.start()
    try:
        point = vault.backup(args.vm, specs, block_size=args.block_size,
                             workers=args.workers, progress=progress, wait=args.wait)
    finally:
        if bars is not None:
            bars.stop()
    if args.json:
        print_json(point_json(point))
        return EXIT_OK
    for w in point.warnings:
        sys.stderr.write(f"cbt: warning: {w}\n")
    print(f"recovery point {point.id} ({point.consistency}: {point.consistency_reason})")
    print(f"  {'disk':<12} {'size':>10} {'changed':>9} {'read':>10} {'new':>10} {'stored':>10}")
    for d in point.disks:
        print(f"  {d.label:<12} {human_bytes(d.size):>10} {d.changed_blocks:>9} "
              f"{human_bytes(d.bytes_read):>10} {human_bytes(d.bytes_new):>10} "
              f"{human_bytes(d.bytes_stored):>10}")
    print(f"  new data {human_bytes(point.bytes_new)}, stored {human_bytes(point.bytes_stored)}"
          f" in {point.seconds:.2f} s")
    return EXIT_OK

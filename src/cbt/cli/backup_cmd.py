"""Back up a VM's disks into a vault: a new recovery point.

Two forms:
  cbt backup VAULT --vm NAME DISK [DISK ...]   the disks named here, read live
  cbt backup --config FILE [--vm NAME]         the job of each VM of a config (or
                                               one) now: hooks, snapshots,
                                               workers, consistency, job history

DISK is PATH or LABEL=PATH; the default label is the file name without its
last extension (disks/os.img -> os).  A disk's first backup is full; every
later one stores only the blocks the vault does not hold yet.  A qcow2 image
(a regular file named *.qcow2 that starts with the qcow2 magic: never the
header alone, which a guest can write into its raw disk; a block device is
always raw) is read through qemu-nbd as the guest sees it, never as its container
file; a persistent dirty bitmap cbt-<point id> in the image (qemu-img bitmap,
kept up to date by QEMU while the VM runs) says what changed by the next
backup (change_source "qemu-bitmap").  Its backing chain is opened once and
checked (plain files only, formats qcow2 and raw named in the image, none its
owner could not read).  An image no bitmap can be added to (read-only, or its
file system too full) is hashed, saying why.  An image a running QEMU holds
is locked: that backup fails, saying so.  A disk keeps
the block size of its first backup.  Backups of different VMs run into one vault
at once; a second backup of the same VM fails at once naming the running one (or
waits with --wait), and so does any backup while prune, verify --repair or a key
change runs.

Change tracking: an incremental reads only what changed where a change source
says what did: --changed-ranges LABEL=FILE (one per disk) names a hint file
of a tool that tracks writes itself, in the shape of 'cbt diff --json'
({"block_size","size_a","size_b","ranges":[[offset,length],...]} in bytes,
other keys ignored): "disk LABEL changed only in these ranges since its
previous point".  Each run re-hashes a rotating sample of the blocks the
source calls unchanged (--verify-fraction, default 1/32: every block once in
32 runs); a mismatch hash-scans the disk in the same run, with a warning.
A disk whose size changed, a first backup, or --full-scan: every allocated
block is read (change_source "hash").  Each disk of the point records
change_source, change_source_reason, verified_blocks and hint_mismatches.

--json prints JSON Lines: {"type":"progress","vm","disk","bytes_done",
"bytes_total"} lines (a few per second at most), then one {"type":"point",
"recovery_point","vm","created","consistency","consistency_reason","disks":[
{"label","path","size","block_size","blocks","changed_blocks","bytes_read",
"bytes_new","bytes_stored","seconds","change_source","change_source_reason",
"verified_blocks","hint_mismatches"}],"seconds","warnings"} line; with
--config one such line per VM (each disk adds "snapshot", the provider used),
or {"type":"error","vm","message","warnings"} for a VM whose job failed.

--executor dask://HOST:PORT runs the shards on a Dask cluster's workers
(pip install 'cbt[dask]'): a disk's on the workers of its VM's host (config key
host; workers started with --resources host-NAME=1), else on those of this
host; each writes its packs to the vault itself (an s3:// vault needs no shared
file system); this command plans and commits.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from collections.abc import Iterator
from typing import Any

from cbt.cli._common import (
    EXIT_ERROR,
    EXIT_OK,
    MAX_WAIT,
    add_json,
    add_password_file,
    add_vault,
    change_source_text,
    detail,
    emit_warnings,
    finder,
    now_arg,
    open_vault,
    print_json,
    print_table,
    progress_bars,
    quiet,
    say,
    seconds_arg,
    size_arg,
    workers_arg,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_vault(p, "the vault (made with cbt init)")
    p.add_argument("disks", nargs="*", metavar="DISK", help="PATH or LABEL=PATH")
    p.add_argument("--vm", metavar="NAME",
                   help="the VM these disks belong to (with --config: only this VM)")
    p.add_argument("--config", metavar="FILE", help="run the jobs of this configuration")
    p.add_argument("--now", type=now_arg, metavar="ISO8601",
                   help="the point's creation time, with an offset (default: now)")
    p.add_argument("--block-size", type=size_arg, default=None, metavar="SIZE",
                   help="block size of a disk's first backup (default 16K)")
    p.add_argument("--workers", type=workers_arg, default=None, metavar="N",
                   help="worker processes (default: number of cores)")
    p.add_argument("--wait", type=seconds_arg(MAX_WAIT), default=0.0, metavar="SECONDS",
                   help="wait up to this long for a running backup of the VM, or a prune, "
                        "repair or key change, to finish (default: fail)")
    p.add_argument("--full-scan", action="store_true",
                   help="read and hash every allocated block, whatever a change source says")
    p.add_argument("--changed-ranges", action="append", default=[], metavar="LABEL=FILE",
                   help="a hint file: disk LABEL changed only in these byte ranges since its "
                        "previous point (JSON as 'cbt diff --json' prints; one per disk)")
    p.add_argument("--verify-fraction", type=fraction_arg, default=None, metavar="F",
                   help="share of the blocks a change source calls unchanged re-hashed as a "
                        "check, 0 to 1 (default 1/32: each block once in 32 runs)")
    p.add_argument("--executor", metavar="dask://HOST:PORT", default=None,
                   help="run the shards on the workers of this Dask scheduler "
                        "(pip install 'cbt[dask]')")
    add_password_file(p)
    add_json(p)


def point_json(point: object, snapshots: dict[str, str] | None = None) -> dict[str, object]:
    from cbt.format.records import PointRecord

    assert isinstance(point, PointRecord)
    disks = [d.public() for d in point.disks]
    if snapshots is not None:
        for d in disks:
            d["snapshot"] = snapshots.get(str(d["label"]), "none")
    return {"type": "point", "recovery_point": point.id, "vm": point.vm,
            "created": point.created, "consistency": point.consistency,
            "consistency_reason": point.consistency_reason,
            "disks": disks, "seconds": point.seconds, "warnings": point.warnings}


def run(args: argparse.Namespace) -> int:
    from cbt.core.errors import CbtValueError
    from cbt.ops.early_scan import start_early_scan
    from cbt.source.disks import parse_disk_arg
    from cbt.source.qcow2 import is_qcow2

    if args.config:
        if args.vault or args.disks:
            raise CbtValueError("with --config the vault and disks come from the config file")
        if args.changed_ranges or args.verify_fraction is not None:
            raise CbtValueError("--changed-ranges and --verify-fraction are for a direct "
                                "backup (VAULT --vm NAME DISK ...), not --config")
        return _run_config(args)
    if not args.vault or not args.vm or not args.disks:
        raise CbtValueError("give VAULT --vm NAME DISK [DISK ...], or --config FILE")
    specs = [parse_disk_arg(d) for d in args.disks]
    hints = _hint_files(args.changed_ranges, [s.label for s in specs])
    vault = open_vault(args)  # (an encrypted vault's scan needs its id key)
    # first thing: hash the disks of an incremental backup while the rest loads (not
    # those a hint file tracks: they read only what changed)
    # (nor qcow2 images: read through qemu-nbd as the guest sees them, tracked by bitmaps)
    with _executor(args) as executor:
        early = None if executor is not None else start_early_scan(
            vault, args.vm, specs, args.block_size, args.workers,
            skip=set(hints) | {s.label for s in specs if is_qcow2(s.path)})
        try:
            with _progress(args, [s.label for s in specs]) as progress:
                point = vault.backup(args.vm, specs, block_size=args.block_size,
                                     workers=args.workers, progress=progress, wait=args.wait,
                                     created=_created(args), early=early, executor=executor,
                                     full_scan=args.full_scan,
                                     verify_fraction=args.verify_fraction, hints=hints)
        finally:
            if early is not None:
                early.cancel()
    if args.json:
        print_json(point_json(point))
        return EXIT_OK
    _print_point(point)
    return EXIT_OK


@contextlib.contextmanager
def _executor(args: argparse.Namespace) -> Iterator[Any]:
    """The Dask executor of ``--executor`` (None: forked workers), closed after."""
    if args.executor is None:
        yield None
        return
    import logging

    from cbt.jobs.dask_executor import connect

    executor = connect(args.executor)
    # (a lost scheduler is one line of cbt's, not Dask's reconnect log and tracebacks:
    # distributed sets the levels of its loggers as it is imported)
    for name in ["distributed", *logging.root.manager.loggerDict]:
        if name.split(".", 1)[0] == "distributed":
            logging.getLogger(name).setLevel(logging.CRITICAL + 1)
    try:
        yield executor
    finally:
        executor.shutdown(cancel_futures=True)


def fraction_arg(text: str) -> float:
    """argparse type of ``--verify-fraction``: a number from 0 to 1."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:  # nan, inf, out of range
        raise argparse.ArgumentTypeError(f"not a fraction from 0 to 1: {text!r}")
    return value


def _hint_files(items: list[str], labels: list[str]) -> dict[str, str]:
    """``--changed-ranges LABEL=FILE`` arguments by label: each a disk of this backup, once."""
    from cbt.core.errors import CbtValueError

    out: dict[str, str] = {}
    for item in items:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            raise CbtValueError(f"--changed-ranges {item!r}: give LABEL=FILE")
        if label not in labels:
            raise CbtValueError(f"--changed-ranges {item!r}: no disk labelled {label!r} in "
                                f"this backup ({', '.join(labels)})")
        if label in out:
            raise CbtValueError(f"--changed-ranges: two hint files for disk {label!r}")
        out[label] = path
    return out


def _run_config(args: argparse.Namespace) -> int:
    from cbt.jobs.config import load

    config = load(args.config)
    find = finder(args, config.vault)  # one finder: asked (or read) once for every VM
    if args.vm is not None and args.vm not in config.vms:
        from cbt.core.errors import CbtValueError

        raise CbtValueError(f"no VM named {args.vm!r} in {args.config}")
    names = [args.vm] if args.vm else list(config.vms)
    code = EXIT_OK
    with _executor(args) as executor:
        for name in names:
            code = max(code, _run_config_vm(args, config, name, find, executor))
    return code


def _run_config_vm(args: argparse.Namespace, config: Any, name: str, find: Any,
                   executor: Any) -> int:
    """One VM's job of ``--config``: its point printed, or its error."""
    from cbt.jobs.job import JobRequest
    from cbt.jobs.runner import run_vm

    with _progress(args, list(config.vms[name].disks)) as progress:
        result = run_vm(config, name, JobRequest(workers=args.workers, progress=progress,
                                                 wait=args.wait, created=_created(args),
                                                 passphrase=find, executor=executor,
                                                 full_scan=args.full_scan))
    if result.point is None:
        sys.stderr.write(f"cbt: error: VM {name}: {result.error}\n")
        if args.json:
            print_json({"type": "error", "vm": name, "message": result.error,
                        "warnings": []})
        return EXIT_ERROR
    if args.json:
        print_json(point_json(result.point, result.snapshots))
    else:
        _print_point(result.point, result.snapshots)
    return EXIT_OK


def _created(args: argparse.Namespace) -> str | None:
    if not args.now:
        return None
    from cbt.core.timefmt import parse_now, rfc3339

    return rfc3339(parse_now(args.now))


@contextlib.contextmanager
def _progress(args: argparse.Namespace, labels: list[str]) -> Iterator[Any]:
    """JSON progress lines, or a bar per disk on a terminal, or nothing."""
    if args.json:
        last: dict[str, float] = {}

        def json_progress(vm: str, disk: str, done: int, total: int) -> None:
            now = time.monotonic()
            if now - last.get(disk, 0.0) >= 0.5 or done >= total:
                if last.get(disk) == -1.0:
                    return
                last[disk] = -1.0 if done >= total else now
                print_json({"type": "progress", "vm": vm, "disk": disk, "bytes_done": done,
                            "bytes_total": total})

        yield json_progress
    else:
        with progress_bars(labels) as bars:
            if bars is None:
                yield None
                return

            def bar_progress(vm: str, disk: str, done: int, total: int) -> None:
                bars(disk, done, total)

            yield bar_progress


def _print_point(point: Any, snapshots: dict[str, str] | None = None) -> None:
    """The point made: its id, a table of its disks, what it cost (not with -q); with -v
    how each disk's change source was chosen."""
    from cbt.core.sizes import human_bytes

    emit_warnings(point.warnings)
    first = "" if point.parent else " (the VM's first point: every block read)"
    for d in point.disks:
        detail(f"disk {d.label}: {d.path}, change source {change_source_text(d)}{first}; "
               f"{d.changed_blocks} of {d.blocks} blocks changed, read "
               f"{human_bytes(d.bytes_read)} in {d.seconds:.2f} s")
    if quiet():
        return
    say(f"recovery point {point.id} ({point.consistency}: {point.consistency_reason})")
    headers = ["disk", "size", "changed", "read", "new", "stored", "source"]
    rows = [[d.label, human_bytes(d.size), str(d.changed_blocks), human_bytes(d.bytes_read),
             human_bytes(d.bytes_new), human_bytes(d.bytes_stored), d.change_source]
            + ([snapshots.get(d.label, "none")] if snapshots else []) for d in point.disks]
    print_table(headers + (["snapshot"] if snapshots else []), rows, right={1, 2, 3, 4, 5},
                indent="  ")
    for d in point.disks:
        if d.change_source_reason or d.verified_blocks:
            say(f"  {d.label}: {change_source_text(d)}")
    say(f"  new data {human_bytes(point.bytes_new)}, stored {human_bytes(point.bytes_stored)}"
        f" in {point.seconds:.2f} s")

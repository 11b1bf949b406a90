"""Restore a recovery point bit for bit: every disk as DIR/LABEL.img, or one
disk (--disk LABEL) to a file or a block device.

Every block is checked against its digest as it is read back; a mismatch stops
the restore (exit 2) and leaves no target file behind.  Each file is written
under a temporary name, fsynced and renamed; holes and zero blocks stay holes.
An existing target is refused unless --force.  New image files are made 0600 (only
their owner reads them: they hold a whole disk); --mode 640 widens that.  A target
restored --in-place keeps its mode.

On a block device every block is written: zero and hole blocks with BLKZEROOUT,
or skipped with --assume-zeroed; a device smaller than the disk is an error.
--in-place restores onto an existing copy of the disk (an older restore or the
damaged original): it is read first and only the blocks that differ are
rewritten; "bytes_written" says how much.

--json prints {"recovery_point","disks":[{"label","to","size","bytes_written",
"blocks_verified"}],"seconds","warnings"}; with --instant each disk adds
"source" ("snapshot (reflink, verified)", "snapshot (copy, ...)" or "vault").

--format qcow2 makes each disk a sparse qcow2 file instead (LABEL.qcow2 in a
--to directory), for QEMU to boot again: the disk is restored and verified as
a raw file under a temporary name, converted with qemu-img convert, compared
with qemu-img compare, then renamed into place (nothing is left on failure; it
needs room for both files a moment).  Not onto a block device, nor with
--in-place, --instant or --assume-zeroed.

--instant restores from the snapshot a job kept (the policy's
instant_restore_days), re-hashing it against the point's manifest unless
--no-verify, and falls back to the vault where there is none.
"""

from __future__ import annotations

import argparse
import contextlib

from cbt.cli._common import (
    EXIT_OK,
    add_json,
    add_password_file,
    add_vault,
    detail,
    emit_warnings,
    local_path_arg,
    open_vault,
    print_json,
    say,
    workers_arg,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_vault(p, "the vault")
    p.add_argument("point", metavar="POINT", help="point id, unique prefix, or VM.latest")
    p.add_argument("--to", required=True, type=local_path_arg, metavar="PATH",
                   help="directory for the disk images; with --disk, a file or block device")
    p.add_argument("--disk", metavar="LABEL", help="restore only this disk, to the --to path")
    p.add_argument("--in-place", action="store_true",
                   help="rewrite only the blocks that differ in an existing copy")
    p.add_argument("--instant", action="store_true",
                   help="restore from the point's kept snapshot when there is one (reflink "
                        "clone on the same file system), else from the vault")
    p.add_argument("--no-verify", action="store_true",
                   help="with --instant: do not re-hash the snapshot against the manifest")
    p.add_argument("--assume-zeroed", action="store_true",
                   help="the target device reads as zeros: do not zero hole and zero blocks")
    p.add_argument("--format", choices=("raw", "qcow2"), default="raw",
                   help="raw image files (default), or sparse qcow2 files made with qemu-img "
                        "(LABEL.qcow2 in a --to directory): a disk for QEMU to boot again")
    p.add_argument("--force", action="store_true", help="replace existing target files")
    p.add_argument("--mode", type=_mode_arg, default=0o600, metavar="OCTAL",
                   help="permissions of new image files, in octal (default 600: owner only)")
    p.add_argument("--workers", type=workers_arg, default=None, metavar="N",
                   help="worker processes (default: number of cores)")
    add_password_file(p)
    add_json(p)


def _mode_arg(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"invalid mode {text!r}: octal permission bits, "
                                         "e.g. 600 or 640")
    return mode


def run(args: argparse.Namespace) -> int:
    from cbt.cli._common import progress_bar
    from cbt.core.sizes import human_bytes

    vault = open_vault(args)
    # an instant restore has never shown a progress bar
    bar = contextlib.nullcontext(None) if args.instant else progress_bar("restore")
    with bar as progress:
        result = vault.restore(args.point, args.to, force=args.force, workers=args.workers,
                               progress=progress, disk=args.disk, in_place=args.in_place,
                               assume_zeroed=args.assume_zeroed, instant=args.instant,
                               verify_snapshot=not args.no_verify, mode=args.mode,
                               format=args.format)
    if args.json:
        print_json(result.to_dict())
        return EXIT_OK
    emit_warnings(result.warnings)
    for d in result.disks:
        detail(f"disk {d.label}: read from {d.source or 'the vault'}, "
               f"{d.blocks_verified} blocks verified against the manifest")
    say(f"restored {result.recovery_point} in {result.seconds:.2f} s")
    for d in result.disks:
        say(f"  {d.label} -> {d.to}: {human_bytes(d.size)}, "
              f"{d.blocks_verified} blocks verified, {human_bytes(d.bytes_written)} "
              f"written{', from ' + d.source if d.source is not None else ''}")
    return EXIT_OK

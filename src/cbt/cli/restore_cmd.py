"""Restore every disk of a recovery point as DIR/LABEL.img, bit for bit.

Every block is checked against its digest as it is read back; a mismatch stops
the restore (exit 2) and leaves no target file behind.  Each file is written
under a temporary name, fsynced and renamed; holes and zero blocks stay holes.
An existing target is refused unless --force.

--json prints {"recovery_point","disks":[{"label","to","size","bytes_written",
"blocks_verified"}],"seconds","warnings"}.
"""

from __future__ import annotations

import argparse

from cbt.cli._common import EXIT_OK, add_json, emit_warnings, print_json, workers_arg


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("vault", metavar="VAULT", help="the vault")
    p.add_argument("point", metavar="POINT", help="point id, unique prefix, or VM.latest")
    p.add_argument("--to", required=True, metavar="DIR", help="directory for the disk images")
    p.add_argument("--force", action="store_true", help="replace existing target files")
    p.add_argument("--workers", type=workers_arg, default=None, metavar="N",
                   help="worker processes (default: number of cores)")
    add_json(p)


def run(args: argparse.Namespace) -> int:
    from cbt.cli._common import progress_bar
    from cbt.sizes import human_bytes
    from cbt.vault import Vault

    vault = Vault.open(args.vault)
    with progress_bar("restore") as progress:
        result = vault.restore(args.point, args.to, force=args.force, workers=args.workers,
                               progress=progress)
    if args.json:
        print_json(result)
        return EXIT_OK
    emit_warnings(result["warnings"])
    print(f"restored {result['recovery_point']} in {result['seconds']:.2f} s")
    for d in result["disks"]:
        print(f"  {d['label']} -> {d['to']}: {human_bytes(d['size'])}, "
              f"{d['blocks_verified']} blocks verified")
    return EXIT_OK

"""Show one recovery point: its disks, what changed, and its consistency.

POINT is an id, a unique prefix of one, or VM.latest.
--json prints the point as in 'cbt list --json' (with "copied_from") plus
"consistency_reason",
"seconds", and per disk "changed_blocks", "bytes_read", "bytes_new",
"bytes_stored", "path", "blocks", and how the run found the changed blocks:
"change_source" (fiemap, btrfs-send, hint-file or hash), "change_source_reason"
(why it fell back to hash: "--full-scan", "disk resized", "hint mismatch at
block N"...; null when it did not), "verified_blocks" (blocks the source called
unchanged, re-hashed as a check) and "hint_mismatches" (of those, how many had
changed).

With --manifest LABEL -o FILE.arrow it writes that disk's resolved manifest
(full, its deltas applied) as a plain Arrow IPC file any Arrow tool reads
(pyarrow, DuckDB, polars): columns block, digest, flags.  The digests are the
vault's block ids, as the schema metadata says: cbt.digest_kind "blake3"
(plain BLAKE3, as cbt scan -o writes) or "blake3-keyed" (an encrypted vault's
keyed ids, comparable only within that vault), and cbt.vault_id.  The file
holds the disk's path and block digests in the clear.
--json then prints {"manifest","recovery_point","disk","blocks","block_size",
"disk_size","digest_kind","vault_id","warnings"}.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from cbt.cli._common import (
    EXIT_OK,
    add_json,
    add_password_file,
    add_vault,
    change_source_text,
    local_path_arg,
    open_vault,
    print_json,
    say,
)

if TYPE_CHECKING:
    from cbt.api import Vault
    from cbt.format.records import PointRecord


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_vault(p, "the vault")
    p.add_argument("point", metavar="POINT", help="point id, unique prefix, or VM.latest")
    p.add_argument("--manifest", metavar="LABEL",
                   help="write this disk's resolved manifest to the -o file")
    p.add_argument("-o", "--output", type=local_path_arg, metavar="FILE",
                   help="with --manifest: the Arrow IPC file to write (created 0600)")
    p.add_argument("--force", action="store_true", help="replace an existing -o file")
    add_password_file(p)
    add_json(p)


def run(args: argparse.Namespace) -> int:
    from cbt.core.errors import CbtValueError
    from cbt.core.sizes import format_size, human_bytes

    if (args.manifest is None) != (args.output is None):
        raise CbtValueError("--manifest LABEL and -o FILE go together")
    if args.output is not None and not args.force and os.path.lexists(args.output):
        raise CbtValueError(f"{args.output} exists (pass --force to replace it)")
    vault = open_vault(args)
    p = vault.point(args.point)
    if args.manifest is not None:
        return _export(vault, p, args)
    out = p.summary()
    out.update({"consistency_reason": p.consistency_reason, "seconds": p.seconds,
                "copied_from": p.copied_from,
                "disks": [d.public() for d in p.disks], "warnings": p.warnings})
    if args.json:
        print_json(out)
        return EXIT_OK
    print(f"recovery point {p.id}")
    print(f"  vm {p.vm}, created {p.created}, parent {p.parent or '-'}")
    print(f"  consistency {p.consistency} ({p.consistency_reason})")
    if p.copied_from:
        print(f"  copied from vault {p.copied_from} (cbt copy)")
    for d in p.disks:
        print(f"  disk {d.label}: {human_bytes(d.size)} from {d.path}, {d.blocks} blocks of "
              f"{format_size(d.block_size)}, {d.changed_blocks} changed, "
              f"new {human_bytes(d.bytes_new)}, stored {human_bytes(d.bytes_stored)}")
        print(f"    change source {change_source_text(d)}, read {human_bytes(d.bytes_read)}")
    return EXIT_OK


def _export(vault: Vault, point: PointRecord, args: argparse.Namespace) -> int:
    """Write one disk's resolved manifest, saying whose digests it holds."""
    from cbt.format.manifest import DIGEST_KIND, PLAIN_DIGESTS, VAULT_ID, Manifest

    m = vault.resolve(point, args.manifest)
    kind = PLAIN_DIGESTS if vault.id_key is None else str(vault.config["id_key"])
    out = Manifest.sparse(m.block_size, m.disk_size, m.rows, m.row_digests, m.row_flags,
                          source=m.source, created=m.created,
                          metadata={DIGEST_KIND: kind, VAULT_ID: str(vault.config["id"]),
                                    "cbt.recovery_point": point.id, "cbt.disk": args.manifest})
    # what the vault holds: as private as a restored image; no row for a hole (format 2
    # where there are holes), so a thin disk's export is as small as its data
    out.write(args.output, 0o600, dense=False)
    if args.json:
        print_json({"manifest": os.path.abspath(args.output), "recovery_point": point.id,
                    "disk": args.manifest, "blocks": out.blocks, "block_size": out.block_size,
                    "disk_size": out.disk_size, "digest_kind": kind,
                    "vault_id": vault.config["id"], "warnings": []})
    else:
        say(f"wrote the manifest of disk {args.manifest} of {point.id} to {args.output}: "
              f"{out.blocks} blocks, digests {kind}")
    return EXIT_OK

"""Copy recovery points from vault SRC to vault DST (the 3-2-1 rule's second copy).

Copies every point of SRC (or those of --vm, or the POINTs named), parents
first, sending only the blocks DST lacks.  Either vault may be encrypted, with
different keys: DST names each block by its own key, so blocks are read from
SRC, checked against SRC's ids (a damaged one fails the copy naming the point
and the block) and re-identified.  Each copied point keeps its id, creation
time, consistency, disks and change records, says which vault it came from
("copied_from"), and is stored with full manifests (it stands alone in DST).

Resumable: the point record is written last, so a copy killed at any moment
leaves no half point, and running it again reuses what it already stored.
Points DST holds already are skipped; a different point under the same id is
an error.  DST is shared with backups while copying (a prune, repair or key change there
refuses meanwhile), but a VM's points are copied only while no backup of that VM runs
in DST (one of them fails naming the other, or waits with --wait); SRC is only read.

Both vaults are named here, SRC then DST: copy takes no -r/--vault and does not read
$CBT_VAULT (restic's and borg's -r names a copy's destination, where cbt's would name
the source: neither is guessed, so a vault is never written by mistake).

SRC's passphrase as for every command (--password-file, CBT_PASSWORD_FILE,
CBT_PASSWORD); DST's from --to-password-file, CBT_TO_PASSWORD_FILE or
CBT_TO_PASSWORD (or a prompt on a terminal).

--json prints one line per point {"type":"point","recovery_point","bytes_sent",
"blocks_new","blocks_read","skipped"}, then {"type":"summary","points_copied",
"points_skipped","bytes_sent","blocks_new","warnings"}.
"""

from __future__ import annotations

import argparse
import os

from cbt.cli._common import (
    EXIT_OK,
    MAX_WAIT,
    PassphraseFinder,
    add_json,
    add_password_file,
    emit_warnings,
    on_terminal,
    open_vault,
    print_json,
    progress_bar,
    prompt_passphrase,
    say,
    seconds_arg,
    vault_arg,
)

TO_ENV_FILE, TO_ENV_PASSWORD = "CBT_TO_PASSWORD_FILE", "CBT_TO_PASSWORD"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", type=vault_arg, metavar="SRC", help="the vault to copy from")
    p.add_argument("dst", type=vault_arg, metavar="DST", help="the vault to copy into "
                   "(made with cbt init)")
    p.add_argument("points", nargs="*", metavar="POINT",
                   help="points to copy (id, unique id prefix or VM.latest; default: all)")
    p.add_argument("--vm", metavar="NAME", help="copy only this VM's points")
    p.add_argument("--wait", type=seconds_arg(MAX_WAIT), default=0.0, metavar="SECONDS",
                   help="how long to wait while DST is held alone, or a VM copied is being backed "
                        "up there (default: fail at once)")
    add_password_file(p)
    p.add_argument("--to-password-file", metavar="FILE",
                   help=f"read DST's passphrase from the first line of FILE (else "
                        f"{TO_ENV_FILE}, {TO_ENV_PASSWORD}, or a prompt on a terminal)")
    add_json(p)


class ToPassphraseFinder(PassphraseFinder):
    """DST's passphrase: --to-password-file, CBT_TO_PASSWORD_FILE, CBT_TO_PASSWORD, prompt."""

    def _find(self) -> bytes:
        from cbt.repo.keys import PassphraseRequiredError, read_password_file

        if self.password_file:
            return read_password_file(self.password_file)
        if os.environ.get(TO_ENV_FILE):
            return read_password_file(os.environ[TO_ENV_FILE])
        if os.environ.get(TO_ENV_PASSWORD):
            return os.environ[TO_ENV_PASSWORD].encode()
        if on_terminal():
            return prompt_passphrase(f"passphrase of {self.vault}: ", False)
        raise PassphraseRequiredError(
            f"{self.what} and no passphrase was given: give it with --to-password-file FILE, "
            f"{TO_ENV_FILE}=FILE or {TO_ENV_PASSWORD}, or run on a terminal to be asked")


def run(args: argparse.Namespace) -> int:
    from cbt.api import Vault
    from cbt.core.sizes import human_bytes
    from cbt.ops.copy import CopiedPoint, copy

    src = open_vault(args, args.src)
    dst = Vault.open(args.dst, passphrase=ToPassphraseFinder(
        args.dst, args.to_password_file, what=f"destination vault {args.dst} is encrypted"))

    def said(p: CopiedPoint) -> None:
        if args.json:
            print_json(p.to_dict())
        elif p.skipped:
            say(f"{p.id}: already in {args.dst}, skipped")
        else:
            say(f"{p.id}: copied, {p.blocks_new} new blocks, {human_bytes(p.bytes_sent)} sent")

    with progress_bar("copying") as progress:
        result = copy(src, dst, args.vm, args.points, args.wait, progress, said)
    summary = result.to_dict()
    if args.json:
        print_json(summary)
        return EXIT_OK
    emit_warnings(result.warnings)
    say(f"copy: {summary['points_copied']} points copied, {summary['points_skipped']} "
          f"skipped, {human_bytes(summary['bytes_sent'])} sent")
    return EXIT_OK

"""Free the blocks no recovery point references.

Removes packs with no live block and rewrites packs that are mostly dead.  It
takes its own lock and may run beside one backup: it only sweeps packs older
than the start of the running backup, and moves dead packs to a trash area
emptied after a grace period, so a restore reading at the time never fails
and a backup that reused a block gc found dead brings it back at its commit.

What it reports is measured from the storage: what this run deleted (freed
now: packs an earlier run trashed whose grace period is over, replaced index
segments); what it moved to the trash (deleted by a gc after the grace
period, and the time from which it can be); the dead bytes it kept inside
packs that stay (a pack mostly live is kept whole unless --max-unused says
otherwise); and the vault's size before and after.  A run that rewrites packs
writes their live part before it trashes them, so the vault can grow until
the trash is emptied.

--max-unused PERCENT (restic's meaning): rewrite partly used packs, those with
the most dead bytes first, until at most PERCENT of the packs' bytes are dead;
0 rewrites every pack with a dead block.  Default: a pack is rewritten when
less than half of it is live.

--json prints {"dry_run","packs_removed","packs_rewritten","bytes_freed" (dead
bytes taken out of packs/ into the trash),"trash_emptied","bytes_deleted"
(freed now),"bytes_trashed","bytes_written","trash_bytes","trash_free_after"
(ISO 8601 or null),"dead_kept_bytes","dead_kept_packs","max_unused",
"vault_bytes_before","vault_bytes_after" (null when dry),"warnings"}.
"""

from __future__ import annotations

import argparse
import contextlib
import math
from collections.abc import Callable, Iterator

from cbt.cli._common import (
    EXIT_OK,
    MAX_GRACE,
    MAX_WAIT,
    ProgressFn,
    add_json,
    add_password_file,
    add_vault,
    emit_warnings,
    open_vault,
    print_json,
    progress_bar,
    say,
    seconds_arg,
)


def percent_arg(text: str) -> float:
    """argparse type of a percentage from 0 to 100 (``5``, ``2.5``, ``10%``)."""
    try:
        value = float(text.strip().removesuffix("%"))
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 100.0:  # nan, inf, out of range
        raise argparse.ArgumentTypeError(f"not a percentage from 0 to 100: {text!r}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_vault(p, "the vault")
    p.add_argument("--dry-run", action="store_true", help="say what would be freed")
    p.add_argument("--grace", type=seconds_arg(MAX_GRACE), default=3600.0, metavar="SECONDS",
                   help="how long trashed packs stay readable (default 3600)")
    p.add_argument("--max-unused", type=percent_arg, default=None, metavar="PERCENT",
                   help="rewrite partly used packs, most dead first, until at most PERCENT "
                        "of the packs' bytes are dead (0: every pack with a dead block; "
                        "default: packs less than half live)")
    p.add_argument("--wait", type=seconds_arg(MAX_WAIT), default=600.0, metavar="SECONDS",
                   help="how long to wait for another gc, or a backup's commit (default 600)")
    add_password_file(p)
    add_json(p)


_PHASES = {"mark": ("gc: marking", "points"), "sweep": ("gc: sweeping", "packs"),
           "rewrite": ("gc: rewriting", "blocks")}


@contextlib.contextmanager
def phased_bars() -> Iterator[Callable[[str, int, int], None]]:
    """``progress(phase, done, total)`` shown as one bar per phase (on a terminal only)."""
    with contextlib.ExitStack() as stack:
        current: list[tuple[str, ProgressFn | None]] = []

        def progress(phase: str, done: int, total: int) -> None:
            if not current or current[0][0] != phase:
                stack.close()
                what, unit = _PHASES.get(phase, (f"gc: {phase}", ""))
                current[:] = [(phase, stack.enter_context(progress_bar(what, unit)))]
            update = current[0][1]
            if update is not None:
                update(done, total)

        yield progress


def run(args: argparse.Namespace) -> int:
    from cbt.core.sizes import human_bytes
    from cbt.ops.gc import gc

    vault = open_vault(args)
    with phased_bars() as progress:
        r = gc(vault, args.dry_run, args.grace, args.wait, args.max_unused, progress)
    if args.json:
        print_json(r.to_dict())
        return EXIT_OK
    emit_warnings(r.warnings)
    hb = human_bytes
    if args.dry_run:
        say(f"gc (dry run): would remove {r.packs_removed} packs and rewrite "
            f"{r.packs_rewritten}, moving {hb(r.bytes_trashed)} to the trash "
            f"({hb(r.bytes_freed)} of it dead) and writing {hb(r.bytes_written)} anew")
    else:
        say(f"gc: removed {r.packs_removed} packs, rewrote {r.packs_rewritten}: "
            f"{hb(r.bytes_freed)} of dead blocks out of use")
        say(f"  freed now: {hb(r.bytes_deleted)} deleted ({r.trash_emptied} trashed packs "
            "whose grace period was over, and replaced index segments)")
    if r.trash_bytes:
        say(f"  in the trash: {hb(r.trash_bytes)}, deleted by a gc after "
            f"{r.trash_free_after} (the grace period)")
    if r.dead_kept_bytes:
        why = (f"within --max-unused {r.max_unused:g}%" if r.max_unused is not None
               else "each mostly live; --max-unused 0 rewrites them")
        say(f"  dead but kept: {hb(r.dead_kept_bytes)} in {r.dead_kept_packs} packs ({why})")
    after = "" if r.vault_bytes_after is None else f" -> {hb(r.vault_bytes_after)}"
    say(f"  vault: {hb(r.vault_bytes_before)}{after}")
    return EXIT_OK

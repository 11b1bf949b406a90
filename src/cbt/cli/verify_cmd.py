"""Check that recovery points can be restored.

Every index segment, point record and manifest must pass its checksum and
every referenced block must be in the index and inside an existing pack
whose trailer lists it (only each pack's header and trailer are read).
With --data every stored block is also read, decompressed and re-hashed
(a read error inside a pack's data shows only then).
Problems are listed with point, disk, block and pack (exit 2), one per damaged
file: the blocks of a disk one pack fails are one problem, naming the first
block and counting them all.  A damaged index segment is a problem, but what it
indexed is read from the packs' trailers meanwhile.  Data left by a killed
backup is reported as unreferenced (not a problem, exit 0).

--read-data-subset N% or n/m reads and re-hashes the blocks of a part of the
packs only (restic's meaning): n/m the nth of m parts of the packs by pack id
(m runs, 1/m to m/m, cover every pack once); N% (may be fractional) a window
of N% of the pack ids that moves on by N% each run, so any 100/N runs of the
same N read every pack once however the vault grows (ids are random: about N%
of the packs and of their bytes a run).  Where the last run's window was is a
small record per vault and N in cbt's state folder ($STATE_DIRECTORY,
$XDG_STATE_HOME/cbt or ~/.local/state/cbt); without one (the first run of
that N) a run starts at the window of the day (days since 1970, UTC), so
daily runs read as a window moving by the day would.  The other packs get the
checks without --data (their trailers against the index).

--repair (needs the vault alone, and no gc running) rebuilds the index from the packs themselves,
indexing only blobs whose content matches their digest, without touching
healthy data, moves damaged point records (with their manifests) to
quarantine/ naming the points lost with them, then verifies and reports which
points remain damaged (blocks that no pack holds).

--json prints {"points","blocks_checked","data","problems":[{"point","disk",
"block","pack","problem","count"}],"unreferenced_bytes","warnings","data_subset"
(the part read, or null),"packs_data_checked","bytes_data_checked"}; with --repair
also "repair":{"packs_read","blobs_indexed","blobs_damaged","packs_quarantined",
"damaged_points","records_quarantined","lost_points"}.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from cbt.cli._common import (
    EXIT_ERROR,
    EXIT_OK,
    add_json,
    add_password_file,
    add_vault,
    emit_warnings,
    open_vault,
    print_json,
    progress_bar,
    say,
)

if TYPE_CHECKING:
    from cbt.ops.verify import DataSubset


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_vault(p, "the vault")
    p.add_argument("point", nargs="?", metavar="POINT", help="only this point (default: all)")
    p.add_argument("--data", action="store_true",
                   help="also read and re-hash every stored block")
    p.add_argument("--read-data-subset", type=_subset, default=None, metavar="SUBSET",
                   help="read and re-hash the blocks of a part of the packs: N%% of them "
                        "(a part that moves on each run), or n/m: the nth of m parts")
    p.add_argument("--repair", action="store_true",
                   help="rebuild the index from the packs, then verify")
    add_password_file(p)
    add_json(p)


def _subset(text: str) -> DataSubset:
    from cbt.ops.verify import DataSubset

    try:
        return DataSubset.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    import sys

    from cbt.core.sizes import human_bytes
    from cbt.jobs.verify_record import next_window, save_window
    from cbt.ops.verify import RepairResult, VerifyResult, repair, verify

    if args.read_data_subset is not None and (args.data or args.repair):
        from cbt.core.errors import CbtValueError

        raise CbtValueError("--read-data-subset reads a part of the data: it goes with neither "
                            f"--{'data' if args.data else 'repair'} (which read all of it)")
    vault = open_vault(args)
    result: VerifyResult | RepairResult
    if args.repair:
        result = repair(vault)
        checked = result.verify
    else:
        subset = args.read_data_subset
        window, notes = (next_window(args.vault, subset.percent) if subset and subset.percent
                         else (None, []))
        with progress_bar("verify") as progress:
            result = checked = verify(vault, args.point, data=args.data, subset=subset,
                                      day=window, progress=progress)
        if window is not None:
            notes += save_window(args.vault, subset.percent, window)
        checked.warnings[:0] = notes
    code = EXIT_ERROR if checked.problems else EXIT_OK
    if args.json:
        print_json({k: v for k, v in result.to_dict().items() if k != "seconds"})
        return code
    emit_warnings(checked.warnings)
    for p in checked.problems:
        where = ", ".join(f"{k} {v}" for k, v in (("point", p.point), ("disk", p.disk),
                                                  ("block", p.block), ("pack", p.pack))
                          if v is not None)
        many = f" ({p.count} blocks)" if p.count is not None and p.count > 1 else ""
        # (a problem of the vault as a whole, a damaged index segment, names no point)
        sys.stderr.write(f"cbt: problem: {where + ': ' if where else ''}{p.problem}{many}\n")
    if isinstance(result, RepairResult):
        r = result.repair
        say(f"repair: {r.packs_read} packs read, {r.blobs_indexed} blocks indexed, "
              f"{r.blobs_damaged} damaged; damaged points: "
              f"{', '.join(r.damaged_points) or 'none'}")
        if r.records_quarantined:
            say(f"repair: moved {len(r.records_quarantined)} damaged point records to "
                  f"quarantine/ ({', '.join(r.records_quarantined)}); points lost: "
                  f"{', '.join(r.lost_points) or 'unknown (their records name them only)'}")
    status = "problems found" if checked.problems else "ok"
    how = (f" with the data of part {checked.data_subset} ({checked.packs_data_checked} packs, "
           f"{human_bytes(checked.bytes_data_checked)})" if checked.data_subset is not None
           else " with data" if checked.data else "")
    say(f"verify {status}: {checked.points} points, {checked.blocks_checked} blocks "
        f"checked{how}, {human_bytes(checked.unreferenced_bytes)} unreferenced")
    return code

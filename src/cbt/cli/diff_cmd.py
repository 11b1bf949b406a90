"""List the blocks that differ between A and B.

A and B are image files, block devices, manifests written by 'cbt scan -o', or
one disk of a recovery point as VAULT::POINT/LABEL, in any mix (a file starting
with Arrow's magic ARROW1 is a manifest).  VAULT::POINT against another whole
point compares them disk by disk, reading only metadata.  With -r VAULT (or
$CBT_VAULT), ::POINT[/LABEL] is a point of that vault: cbt diff -r /srv/vault
::web.20261129T020000Z ::web.latest.  Two
images are compared directly, without hashing; an image against a manifest is
scanned with the manifest's block size.  Content decides: a hole equals a block
of zeros.  When the sizes differ, the block holding the shorter input's end and
every block after it count as changed.

--map draws where the disks changed: on the terminal one line per disk, a strip
of cells (the terminal's width, or --width N) each standing for a run of
blocks, shaded by the share of them changed (' ' none, then '░' '▒' '▓' '█' by
quarters), the disk's offsets at both ends.  --map FILE.svg or --map FILE.png
draws the same as a picture, offsets on its axis (needs matplotlib: pip
install 'cbt[plot]'); on a terminal the strip is printed too.  Give --map
FILE anywhere, or a bare --map after A and B.

Exit code 0 when identical, 1 when they differ, 2 on error (like cmp).
--json prints {"block_size","size_a","size_b","blocks","changed_blocks",
"changed_bytes","ranges":[[offset,length],...],"warnings"}; for two whole points
{"a","b","disks":[{"label","status":"same|changed|only_a|only_b", ...the keys
above}],"changed_blocks","changed_bytes","warnings"}.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from cbt.cli._common import (
    EXIT_DIFFERENT,
    EXIT_OK,
    VAULT_ENV,
    OneVault,
    PassphraseFinder,
    add_json,
    add_password_file,
    emit_warnings,
    print_json,
    progress_bar,
    say,
    size_arg,
    vault_arg,
    workers_arg,
)

if TYPE_CHECKING:
    from cbt.cli._common import ProgressFn
    from cbt.ops.changeset import ChangeSet
    from cbt.ops.diff import PointDiff


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", metavar="A", help="image, block device, manifest, or VAULT::POINT[/LABEL]"
                                          " (::POINT: the vault of -r or $CBT_VAULT)")
    p.add_argument("b", metavar="B", help="as A")
    p.add_argument("-r", "--vault", dest="diff_vault", type=vault_arg, metavar="VAULT",
                   action=OneVault,
                   help=f"the vault of an A or B written ::POINT[/LABEL] (default: "
                        f"${VAULT_ENV})")
    p.add_argument("--block-size", type=size_arg, default=None, metavar="SIZE",
                   help="block size for images (default 64K); a manifest's own wins")
    p.add_argument("--workers", type=workers_arg, default=None, metavar="N",
                   help="processes comparing in parallel (default: number of cores)")
    p.add_argument("--ranges", action="store_true",
                   help="list every changed run (offset, length) in the human output")
    p.add_argument("--map", nargs="?", const="", default=None, metavar="FILE",
                   help="draw where the disk changed: a strip on the terminal, or a picture "
                        "FILE.svg / FILE.png (pip install 'cbt[plot]')")
    p.add_argument("--width", type=_width_arg, default=None, metavar="N",
                   help="cells of the --map strip (default: the terminal's width)")
    add_password_file(p)
    add_json(p)


def _width_arg(text: str) -> int:
    from cbt.cli._common import whole_arg
    from cbt.cli.diffmap import MAX_CELLS

    return whole_arg(8, MAX_CELLS, "cells")(text)


def _check_map(args: argparse.Namespace) -> None:
    """Refuse a bad --map before any work: a picture's name, the strip with --json."""
    from cbt.core.errors import CbtValueError

    if args.map:
        from cbt.cli.diffmap import check_picture_path

        check_picture_path(args.map)
    elif args.map == "" and args.json:
        raise CbtValueError("--map without FILE draws on the terminal: not with --json "
                            "(give --map FILE.svg or FILE.png)")
    if args.width is not None and args.map is None:
        raise CbtValueError("--width is the width of the --map strip: give --map too")


def _draw(args: argparse.Namespace, disks: list[tuple[str, ChangeSet]], indent: str) -> None:
    """The --map of these disks: the picture FILE, the strips (no FILE, or a terminal)."""
    if args.map is None:
        return
    from cbt.cli.diffmap import legend, strip_line, terminal_cells, write_picture

    if args.map:
        total = sum(cs.changed_blocks for _, cs in disks)
        blocks = sum(cs.blocks for _, cs in disks)
        write_picture(args.map, disks, f"cbt diff {args.a} {args.b}: {total} of {blocks} "
                                       "blocks changed", args.width or 1000)
        if args.json:
            return
        say(f"{indent}map written to {args.map}")
        if not sys.stdout.isatty():
            return
    wide = max(len(label) for label, _ in disks)
    drawn = []
    for label, cs in disks:
        cells = terminal_cells(args.width, max(cs.size_a, cs.size_b), len(indent) + wide + 1)
        print(f"{indent}{label:<{wide}} {strip_line(cs, cells)}".rstrip())
        drawn.append((label, cs, cells))
    say(f"{indent}{legend(drawn)}")


def run(args: argparse.Namespace) -> int:
    from cbt.core.sizes import format_size, human_bytes
    from cbt.ops.changeset import ChangeSet

    _check_map(args)
    args.a, args.b = _in_vault(args.a, args.b, args.diff_vault)
    check_digest_kinds(args.a, args.b)
    with progress_bar("diff") as progress:
        cs = _diff(args, progress)
    if not isinstance(cs, ChangeSet):
        return _print_points(cs, args)
    code = EXIT_OK if cs.identical else EXIT_DIFFERENT
    if args.json:
        _draw(args, [("disk", cs)], "")
        print_json(cs.to_dict())
        return code
    emit_warnings(cs.warnings)
    if cs.identical:
        print(f"identical: {cs.blocks} blocks of {format_size(cs.block_size)}")
        _draw(args, [("disk", cs)], "")
        return code
    sizes = "" if cs.size_a == cs.size_b else f" (sizes {cs.size_a} and {cs.size_b} bytes)"
    print(f"differ: {cs.changed_blocks} of {cs.blocks} blocks of {format_size(cs.block_size)} "
          f"changed, {human_bytes(cs.changed_bytes)} ({cs.changed_bytes} bytes) in "
          f"{cs.runs} runs{sizes}")
    if args.ranges:
        _print_ranges(cs, "  ")
    _draw(args, [("disk", cs)], "")
    return code


def _diff(args: argparse.Namespace, progress: ProgressFn | None) -> ChangeSet | PointDiff:
    """Two images are compared without loading numpy or a vault (a whole ``cbt diff`` is
    timed against ``b3sum``); a manifest or a point goes through :func:`cbt.ops.diff.diff`."""
    from cbt.format.magic import is_manifest_path
    from cbt.ops.changeset import diff_images, parse_point_ref
    from cbt.source.scan import DEFAULT_BLOCK_SIZE

    if not any(parse_point_ref(x) or is_manifest_path(x) for x in (args.a, args.b)):
        return diff_images(args.a, args.b, args.block_size or DEFAULT_BLOCK_SIZE,
                           args.workers, progress)
    from cbt.ops.diff import diff

    return diff(args.a, args.b, args.block_size, args.workers, progress,
                passphrase=PassphraseFinder(_vault_of(args), args.password_file))


def _in_vault(a: str, b: str, option: str | None) -> tuple[str, str]:
    """A and B with ``::POINT[/LABEL]`` made ``VAULT::POINT[/LABEL]``: the vault of -r,
    else of $CBT_VAULT (a ``VAULT::`` written out keeps its own).  -r with two
    operands neither of which is a point is refused (a script meaning points would
    compare files of those names)."""
    from cbt.core.errors import CbtValueError
    from cbt.ops.changeset import POINT_SEPARATOR as SEP
    from cbt.ops.changeset import parse_point_ref

    bare = [x for x in (a, b) if x.startswith(SEP)]
    if option is None and bare:
        env = os.environ.get(VAULT_ENV) or None
        if env is None:
            raise CbtValueError(f"{bare[0]}: a point of which vault? give -r VAULT or set "
                                f"${VAULT_ENV} (or write VAULT{bare[0]})")
        try:
            option = vault_arg(env)
        except argparse.ArgumentTypeError as exc:
            raise CbtValueError(f"${VAULT_ENV}: {exc}") from None
    elif option is not None and not bare and not any(map(parse_point_ref, (a, b))):
        raise CbtValueError(f"-r {option}: neither A nor B is a point (write "
                            f"{SEP}POINT[/LABEL])")

    def full(x: str) -> str:
        return f"{option}{x}" if x.startswith(SEP) else x

    return full(a), full(b)


def _print_ranges(cs: ChangeSet, indent: str) -> None:
    for off, length in cs.range_list():
        print(f"{indent}{off:>16} {length:>12}")


def _print_points(pd: object, args: argparse.Namespace) -> int:
    from cbt.core.sizes import human_bytes
    from cbt.ops.diff import PointDiff

    assert isinstance(pd, PointDiff)
    code = EXIT_OK if pd.identical else EXIT_DIFFERENT
    disks = [(label, cs) for label, _, cs in pd.disks]
    if args.json:
        _draw(args, disks, "")
        print_json(pd.to_dict())
        return code
    emit_warnings(pd.warnings)
    print(f"{pd.a} -> {pd.b}: {'identical' if pd.identical else 'differ'}")
    for label, status, cs in pd.disks:
        print(f"  {label:<16} {status:<8} {cs.changed_blocks:>10} of {cs.blocks} blocks, "
              f"{human_bytes(cs.changed_bytes)}")
        if args.ranges:
            _print_ranges(cs, "    ")
    _draw(args, disks, "  ")
    return code


def _digest_kind(src: str) -> tuple[str, str] | None:
    """(digest kind, vault id) of a manifest file; None for anything else."""
    from cbt.format.magic import is_manifest_path

    if not is_manifest_path(src):
        return None
    from cbt.format.manifest import DIGEST_KIND, PLAIN_DIGESTS, VAULT_ID, manifest_file_metadata

    meta = manifest_file_metadata(src)
    return meta.get(DIGEST_KIND, PLAIN_DIGESTS), meta.get(VAULT_ID, "")


def check_digest_kinds(a: str, b: str) -> None:
    """Refuse to compare a vault's keyed ids (an exported manifest) with anything else.

    A manifest written by ``cbt show --manifest -o`` from an encrypted vault
    holds that vault's keyed BLAKE3 ids: it compares with another such export of
    the same vault, or a point of it (``VAULT::POINT/LABEL``), never with plain
    BLAKE3 digests (an image, a ``cbt scan -o`` manifest), where every block
    would differ.
    """
    kinds = {src: _digest_kind(src) for src in (a, b)}
    if not any(kinds.values()):  # no manifest (and nothing heavy imported)
        return
    from cbt.core.errors import CbtValueError
    from cbt.format.manifest import PLAIN_DIGESTS
    from cbt.ops.changeset import parse_point_ref

    for src, other in ((a, b), (b, a)):
        kind = kinds[src]
        if kind is None or kind[0] == PLAIN_DIGESTS:
            continue
        theirs = kinds[other]
        if theirs == kind or (theirs is None and parse_point_ref(other) is not None):
            continue
        what = ("plain BLAKE3 digests" if theirs is None or theirs[0] == PLAIN_DIGESTS
                else f"the ids of vault {theirs[1] or '?'} ({theirs[0]})")
        raise CbtValueError(f"{src} holds the {kind[0]} block ids of vault {kind[1] or '?'}; "
                            f"{other} has {what}: they cannot be compared (compare with a "
                            "point of that vault, VAULT::POINT/LABEL)")


def _vault_of(args: argparse.Namespace) -> str:
    """The vault a ``VAULT::POINT`` argument names (for the prompt and messages)."""
    from cbt.ops.changeset import parse_point_ref

    for src in (args.a, args.b):
        ref = parse_point_ref(src)
        if ref is not None:
            return ref[0]
    return "the vault"

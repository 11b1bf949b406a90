"""Where a vault's space goes: sizes, ratios, per VM and per point.

Logical bytes: the disks' sizes; data: their DATA blocks (no holes, no zero
blocks); stored: the blobs in the packs (compressed, sealed when encrypted),
blocks awaiting 'cbt gc' included; referenced: those some point uses.  A
point's stored bytes are the blocks it references, new those no earlier point
of its VM does, unique those no other point does (what forgetting it leaves
unreferenced: 'cbt gc' frees them from packs mostly dead; a pack still at least
half live keeps them until more of it dies).  dedup_ratio = data bytes / raw bytes of the distinct
referenced blocks; compression_ratio = those raw bytes / their stored bytes.
The totals are the whole vault's; --vm and POINT only limit what is listed.
Takes no lock (it only reads).

--map draws each VM's stored and new bytes per point over time on the
terminal; --map FILE.svg or FILE.png writes a chart (needs matplotlib:
pip install 'cbt[plot]').

--json prints {"logical_bytes","data_bytes","stored_bytes","referenced_bytes",
"dedup_ratio","compression_ratio","compression" (the codec new blocks are stored
with: zstd or lz4, chosen at 'cbt init'),"vms":[{"vm","points","logical_bytes",
"data_bytes","unique_bytes"}],"points":[{"recovery_point","vm","created",
"logical_bytes","data_bytes","stored_bytes","new_bytes","unique_bytes"}],
"warnings"} (a ratio is null when nothing is stored).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from cbt.cli._common import (
    EXIT_OK,
    add_json,
    add_password_file,
    add_vault,
    emit_warnings,
    local_path_arg,
    open_vault,
    print_json,
    print_table,
    say,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from cbt.ops.stats import Stats

MAP_WIDTH = 40  # cells of the longest bar on a wide terminal
MIN_MAP_WIDTH = 10  # ... and on a narrow one (the lines wrap)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_vault(p, "the vault")
    p.add_argument("points", nargs="*", metavar="POINT",
                   help="list only these points (id, unique prefix, or VM.latest)")
    p.add_argument("--vm", metavar="NAME", help="list only this VM and its points")
    p.add_argument("--map", nargs="?", const="-", type=_map_arg, metavar="FILE",
                   help="draw each VM's stored and new bytes per point over time: on the "
                        "terminal, or into FILE.svg / FILE.png (needs matplotlib)")
    add_password_file(p)
    add_json(p)


def _map_arg(text: str) -> str:
    if text == "-":
        return text
    text = local_path_arg(text)
    if not text.lower().endswith((".svg", ".png")):
        raise argparse.ArgumentTypeError(f"{text!r}: a chart is written as FILE.svg or "
                                         "FILE.png (the map on the terminal: '--map -', "
                                         "or --map after VAULT)")
    return text


def run(args: argparse.Namespace) -> int:
    from cbt.ops.stats import stats

    if args.map not in (None, "-"):
        from cbt.cli.diffmap import check_picture_path

        check_picture_path(args.map)  # before the work: its folder, not a directory
    result = stats(open_vault(args), args.vm, list(args.points))
    if args.map not in (None, "-"):
        write_chart(result, args.map)
    if args.json:
        print_json(result.to_dict())
        return EXIT_OK
    emit_warnings(result.warnings)
    if args.map == "-":
        for line in text_map(result):
            print(line)
    elif args.map is None:
        _print_tables(result)
    else:
        say(f"wrote {args.map}")
    return EXIT_OK


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _print_tables(s: Stats) -> None:
    from cbt.core.sizes import human_bytes as hb

    print(f"logical {hb(s.logical_bytes)}, data {hb(s.data_bytes)}, stored "
          f"{hb(s.stored_bytes)} ({hb(s.referenced_bytes)} referenced); dedup "
          f"{_ratio(s.dedup_ratio)}, compression {_ratio(s.compression_ratio)} "
          f"({s.compression})")
    if not s.points:
        print("no recovery points")
        return
    print()
    print_table(["vm", "points", "logical", "data", "unique"],
                [[v.vm, str(v.points), hb(v.logical_bytes), hb(v.data_bytes),
                  hb(v.unique_bytes)] for v in s.vms], right={1, 2, 3, 4})
    print()
    print_table(["point", "created", "logical", "data", "stored", "new", "unique"],
                [[p.recovery_point, p.created, hb(p.logical_bytes), hb(p.data_bytes),
                  hb(p.stored_bytes), hb(p.new_bytes), hb(p.unique_bytes)]
                 for p in s.points], right={2, 3, 4, 5, 6})


def text_map(s: Stats, columns: int | None = None) -> list[str]:
    """Per VM, one line per point (oldest first): a bar as long as its stored bytes,
    the new part in full blocks, the rest shaded; all bars on one scale, as wide as
    fits the terminal's ``columns`` (``$COLUMNS``, else the terminal's width) from
    :data:`MIN_MAP_WIDTH` to :data:`MAP_WIDTH` cells."""
    import shutil

    from cbt.core.sizes import human_bytes as hb

    top = max([p.stored_bytes for p in s.points], default=0)
    text = [(f"  {p.created}  ", f"  stored {hb(p.stored_bytes)}, new {hb(p.new_bytes)}")
            for p in s.points]
    if columns is None:
        columns = shutil.get_terminal_size((80, 24)).columns
    width = max(MIN_MAP_WIDTH, min(MAP_WIDTH, columns - 1 - max(
        (len(a) + len(b) for a, b in text), default=0)))
    lines: list[str] = [] if s.points else ["no recovery points"]
    for vm in sorted({p.vm for p in s.points}):
        lines.append(f"{vm}  (\u2588 new, \u2592 stored before)")
        for p, (head, tail) in zip(s.points, text, strict=True):
            if p.vm != vm:
                continue
            cells = _cells(p.stored_bytes, top, width)
            new = min(cells, _cells(p.new_bytes, top, width))
            bar = "\u2588" * new + "\u2592" * (cells - new)
            lines.append(f"{head}{bar:<{width}}{tail}")
    return lines


def _cells(value: int, top: int, width: int) -> int:
    """Cells of a bar for ``value`` on a scale where ``top`` fills ``width`` (anything
    above zero shows)."""
    if value <= 0 or top <= 0:
        return 0
    return max(1, round(value * width / top))


def write_chart(s: Stats, path: str) -> None:
    """:func:`chart` into ``path`` (SVG or PNG by its suffix; whole or not at all)."""
    from cbt.cli.diffmap import PLOT_HINT, save_figure
    from cbt.core.errors import CbtValueError

    try:
        fig = chart(s)
    except ImportError:
        raise CbtValueError(f"--map {path}: drawing a chart needs matplotlib: "
                            f"{PLOT_HINT}") from None
    save_figure(fig, path)


def chart(s: Stats) -> Figure:
    """A chart per VM of stored and new bytes per point over time (matplotlib's Figure,
    imported only here): the bars as wide as the VM's points are apart
    (:func:`bar_width`), the byte axis in binary units."""
    import datetime as dt

    from matplotlib.figure import Figure

    from cbt.cli.diffmap import binary_axis

    vms = sorted({p.vm for p in s.points}) or ["(no points)"]
    fig = Figure(figsize=(9, 2.6 * len(vms)), layout="constrained")
    axes = fig.subplots(len(vms), 1, squeeze=False)[:, 0]
    for ax, vm in zip(axes, vms, strict=True):
        pts = [p for p in s.points if p.vm == vm]
        when = [dt.datetime.fromisoformat(p.created.replace("Z", "+00:00")) for p in pts]
        ax.plot(when, [p.stored_bytes for p in pts], marker="o", label="stored")
        ax.bar(when, [p.new_bytes for p in pts], color="tab:orange", label="new",
               width=bar_width([w.timestamp() / 86400 for w in when]))
        binary_axis(ax.yaxis, max((p.stored_bytes for p in pts), default=0), ticks=4)
        ax.set_ylim(bottom=0)
        ax.set_title(vm)
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))  # (beside: bars under it)
        for label in ax.get_xticklabels():
            label.set(rotation=30, horizontalalignment="right")
    return fig


def bar_width(days: list[float]) -> float:
    """The width of a point's bar, in days (matplotlib's unit of dates): 70% of the
    median gap between the VM's points, so bars of hourly points do not cover each
    other (a fixed third of a day covered seven), and a point made minutes after a
    daily one (a manual backup) does not make every bar a sliver; a lone point, a
    third of a day."""
    import itertools
    import statistics

    gaps = [b - a for a, b in itertools.pairwise(sorted(days)) if b > a]
    return 0.7 * statistics.median(gaps) if gaps else 1 / 3

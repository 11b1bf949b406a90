"""Where a disk changed, drawn: ``cbt diff A B --map [FILE.svg|FILE.png]``.

1. The disk's blocks (the longer input's) are cut into W cells of consecutive
   blocks: cell i holds blocks [i*n//W, (i+1)*n//W) (one block a cell when the
   disk has fewer than W blocks).
2. A cell's share is its changed blocks over its blocks, counted from the change
   set's merged runs without a per-block array (a 1 TiB disk is 16 M blocks):
   C(x), the changed blocks below block x, is the lengths of the runs starting
   below x less the part of the last one at or past x; a cell's count is
   C(end) - C(start).
3. On a terminal each cell is one character shaded by its share (' ' none,
   then '░' '▒' '▓' '█' by quarters: any change shows), between the offsets of
   the disk's two ends, in binary units.
4. A picture (matplotlib, imported only here and only then) draws the same
   shares as a strip, offsets on its x axis in binary units, written under a
   temporary name and renamed (nothing half-written).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from cbt.core.errors import CbtValueError
from cbt.core.sizes import human_bytes

if TYPE_CHECKING:
    from cbt.ops.changeset import ChangeSet

SHADES = " ░▒▓█"
PICTURE_SUFFIXES = (".svg", ".png")
PLOT_HINT = "pip install 'cbt[plot]'"
MAX_CELLS = 100_000


def cell_edges(blocks: int, cells: int) -> npt.NDArray[np.int64]:
    """The block index each cell starts at, and the end (step 1): ``cells + 1`` edges,
    or ``blocks + 1`` when there are fewer blocks than cells."""
    cells = max(1, min(cells, blocks))
    return (np.arange(cells + 1, dtype=np.int64) * blocks) // cells


def shares(cs: ChangeSet, cells: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """(edges, share changed per cell) of one disk's change set (steps 1 and 2)."""
    n = cs.blocks
    edges = cell_edges(n, cells)
    bs = cs.block_size
    r = cs.ranges.astype(np.int64).reshape(-1, 2)
    starts = r[:, 0] // bs
    ends = np.minimum(-(-(r[:, 0] + r[:, 1]) // bs), n)
    lengths = np.cumsum(ends - starts)
    if len(r) == 0:
        return edges, np.zeros(len(edges) - 1)

    def below(x: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        k = np.searchsorted(starts, x, side="left")  # the runs starting below x
        last = np.maximum(k - 1, 0)
        return np.where(k > 0, lengths[last] - np.maximum(ends[last] - x, 0), 0)

    counts = np.diff(below(edges))
    width = np.diff(edges)
    return edges, counts / np.maximum(width, 1)


def shade(share: float) -> str:
    """The character of a cell (step 3): none, or a quarter band; any change shows."""
    if share <= 0:
        return SHADES[0]
    return SHADES[min(4, max(1, int(np.ceil(share * 4))))]


def strip_line(cs: ChangeSet, cells: int) -> str:
    """One disk's strip: ``0 B |…| 64.0 MiB`` with ``cells`` shaded characters."""
    _, s = shares(cs, cells)
    size = max(cs.size_a, cs.size_b)
    return f"0 B |{''.join(shade(float(x)) for x in s)}| {human_bytes(size)}"


def terminal_cells(width: int | None, size: int, taken: int = 0) -> int:
    """Cells of a strip: ``--width``, else what fits the terminal (or $COLUMNS, or 80)
    beside the two offsets and ``taken`` columns (a label), at most :data:`MAX_CELLS`
    (as ``--width``: a huge $COLUMNS must not draw a 1 TiB disk block by block)."""
    if width is not None:
        return width
    import shutil

    columns = shutil.get_terminal_size((80, 24)).columns
    return min(MAX_CELLS, max(8, columns - taken - len("0 B || ") - len(human_bytes(size))))


def legend(disks: list[tuple[str, ChangeSet, int]]) -> str:
    """What a cell stands for and what its shades mean; per disk (label, change set,
    cells) when their cells differ (a point's disks of different sizes)."""
    each = []
    for label, cs, cells in disks:
        per = max(1, cs.blocks // max(1, min(cells, cs.blocks)))
        each.append((label, f"~{per} blocks ({human_bytes(per * cs.block_size)})"))
    if len({text for _, text in each}) == 1:
        head = f"each cell {each[0][1]}"
    else:
        head = "each cell: " + ", ".join(f"{label} {text}" for label, text in each)
    return (f"{head}; changed: '{SHADES[1]}' up to 1/4, '{SHADES[2]}' 1/2, "
            f"'{SHADES[3]}' 3/4, '{SHADES[4]}' more, ' ' none")


def check_picture_path(path: str) -> None:
    """A picture's file name must end in .svg or .png, in a folder that exists, and not be
    a directory (one line otherwise)."""
    if not path.lower().endswith(PICTURE_SUFFIXES):
        raise CbtValueError(f"--map {path}: a picture is FILE.svg or FILE.png (or give --map "
                            "alone for the terminal)")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CbtValueError(f"--map {path}: no such folder {folder}")
    if os.path.isdir(path):  # else found only after the diff, naming the temporary file
        raise CbtValueError(f"--map {path}: is a directory, not a picture file")


def write_picture(path: str, disks: list[tuple[str, ChangeSet]], title: str,
                  cells: int = 1000) -> None:
    """Step 4: one strip per disk in an SVG or PNG at ``path``."""
    check_picture_path(path)
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise CbtValueError(f"--map {path}: drawing a picture needs matplotlib: "
                            f"{PLOT_HINT}") from None
    fig = Figure(figsize=(10, 0.9 + 0.9 * len(disks)), layout="constrained")
    axes = fig.subplots(len(disks), 1, squeeze=False)[:, 0]
    image = None
    for ax, (label, cs) in zip(axes, disks, strict=True):
        edges, s = shares(cs, cells)
        size = max(cs.size_a, cs.size_b)
        x = np.minimum(edges * cs.block_size, size).astype(np.float64)
        image = ax.pcolormesh(x, [0.0, 1.0], s.reshape(1, -1), cmap="Reds", vmin=0.0,
                              vmax=1.0, rasterized=len(s) > 2000)
        ax.set_xlim(0, max(size, 1))
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center")
        binary_axis(ax.xaxis, size)
        ax.tick_params(axis="x", labelsize=8)
    axes[0].set_title(title, fontsize=9)
    if image is not None:
        fig.colorbar(image, ax=list(axes), label="share changed", fraction=0.03, pad=0.01)
    save_figure(fig, path)


def save_figure(fig: object, path: str) -> None:
    """Write a picture (diff's strips, stats' chart) to ``path``, SVG or PNG by its suffix:
    under a temporary name beside it, synced, then renamed (a failed write, the disk
    full, leaves nothing, and a picture already there untouched); an error names
    ``path``, not the temporary file."""
    from cbt.core.durable import atomic_file
    from cbt.core.errors import CbtIOError

    kind = os.path.splitext(path)[1][1:].lower()
    try:
        with atomic_file(path) as f:
            fig.savefig(f, format=kind, dpi=100,  # type: ignore[attr-defined]
                        metadata={"Software": "cbt"} if kind == "png" else None)
    except OSError as exc:
        raise CbtIOError(exc.errno, exc.strerror or str(exc), path) from None


def binary_axis(axis: object, top: float, ticks: int = 8) -> None:
    """Ticks of ``axis`` (matplotlib's) at about ``ticks`` binary steps up to ``top``
    bytes, labelled in binary units (4.0 MiB, not 4194304 or 4.2 MB)."""
    from matplotlib.ticker import FuncFormatter, MultipleLocator

    step = 2.0 ** np.floor(np.log2(max(top, ticks) / ticks))
    axis.set_major_locator(MultipleLocator(step))  # type: ignore[attr-defined]
    axis.set_major_formatter(FuncFormatter(  # type: ignore[attr-defined]
        lambda v, _pos: human_bytes(v)))

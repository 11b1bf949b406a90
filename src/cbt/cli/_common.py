"""What every command shares: JSON output, warnings, errors, progress bars.

Conventions (DESIGN.md): human output on stdout; warnings on stderr, one line
each; progress bars on stderr only when it is a terminal; ``--json`` prints one
JSON object on stdout; errors are one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from cbt.core.errors import CbtValueError

EXIT_OK = 0
EXIT_DIFFERENT = 1
EXIT_ERROR = 2


def size_arg(text: str) -> int:
    """argparse type for sizes (``4K``, ``64K``, ``1M``, bytes); must be a block size."""
    from cbt.core.native import fast
    from cbt.core.sizes import parse_size

    try:
        value = parse_size(text)
        fast.check_block_size(value)
    except CbtValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def workers_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"not a positive number of workers: {text!r}")
    return value


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true",
                        help="machine-readable output: one JSON object on stdout")


def print_json(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def warn(message: str) -> None:
    sys.stderr.write(f"cbt: warning: {message}\n")


def emit_warnings(warnings: list[str]) -> None:
    for w in warnings:
        warn(w)


def fail(message: str, as_json: bool) -> int:
    """One line on stderr (and a JSON error object with --json); returns exit code 2."""
    sys.stderr.write(f"cbt: error: {message}\n")
    if as_json:
        print_json({"type": "error", "message": message, "warnings": []})
    return EXIT_ERROR


ProgressFn = Callable[[int, int], None]


@contextlib.contextmanager
def progress_bar(description: str) -> Iterator[ProgressFn | None]:
    """A rich progress bar on stderr when it is a terminal; else no callback at all."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                   TransferSpeedColumn(), TimeRemainingColumn(),
                   console=Console(stderr=True), transient=True)
    task = bar.add_task(description, total=None)
    last = [0.0]

    def update(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= 0.1 or done >= total:
            last[0] = now
            bar.update(task, completed=done, total=total)

    with bar:
        yield update

"""SIGTERM and SIGINT around a job's steps: handled by the job (its abort), or held
back while a step that must finish once begun runs.

1. :func:`handling` puts a handler in place for both signals for a block, and the
   previous ones back after it.
2. :func:`signals_deferred` holds both back for a block (main thread only: Python
   runs signal handlers there) and delivers the first one that came, to the handler
   in place after the block.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGTERM and SIGINT wait until the block is done, then are delivered (to the
    handler in place then: the job's abort).  For what must finish once begun: the
    job's end record (a write cut short fails the next), a QEMU VM's thaw and QEMU's
    teardown (a copy-before-write filter left in the VM's write path, its overlay
    growing, until the next run), a hook's start (a hook started but not yet known
    would be left running).  Each step inside is bounded by its timeout."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []

    def defer(signum: int, _frame: object) -> None:
        got.append(signum)

    try:
        with handling(defer):
            yield
    finally:
        if got:
            signal.raise_signal(got[0])


@contextlib.contextmanager
def handling(handler: Callable[[int, FrameType | None], None]) -> Iterator[None]:
    """``handler`` for SIGTERM and SIGINT while the block runs; the previous ones after."""
    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)

"""Objects written and read on background threads, a bounded number in flight.

An object store answers each request after a round trip and its own work: one
request at a time leaves the link and the server mostly idle.
:class:`Uploader` puts objects on threads of its own, at most ``limit`` at once
(:attr:`Storage.in_flight <cbt.repo.storage.Storage.in_flight>`): a caller
hands a closed pack off and goes on; when ``limit`` are in flight it waits
for one to finish, so memory stays bounded (``limit`` objects, plus what the
callers hold).  :func:`shared_uploader` is the process's one per limit: every
worker thread of a backup shares it, so a process never has more than
``limit`` puts in flight however many threads fill packs.  A forked child
gets its own (threads do not survive a fork).

:func:`read_ahead` is the other way: the results of ``fetch(item)`` for items
in order, up to ``limit`` fetched ahead on threads (a restore's packs).  A
failed fetch raises when its turn comes, in order; the rest are abandoned.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Generator, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from cbt.repo.storage import Buffers, Storage

_T = TypeVar("_T")
_R = TypeVar("_R")


class Uploader:
    """Puts on ``threads`` threads (default ``limit``), at most ``limit`` handed over
    (in flight, or queued for a thread) at once (see the module doc)."""

    def __init__(self, limit: int, threads: int | None = None) -> None:
        self.limit = max(1, limit)
        self._pool = ThreadPoolExecutor(max(1, min(threads or self.limit, self.limit)),
                                        thread_name_prefix="cbt-upload")
        self._slots = threading.BoundedSemaphore(self.limit)

    def put(self, storage: Storage, name: str, data: Buffers) -> Future[None]:
        """Start putting ``data`` as ``name`` (waits while ``limit`` are in flight);
        the future's result raises the put's error."""
        self._slots.acquire()
        try:
            fut = self._pool.submit(storage.put, name, data)
        except BaseException:
            self._slots.release()
            raise
        fut.add_done_callback(lambda _: self._slots.release())
        return fut

    def close(self) -> None:
        """Wait for the puts in flight, then stop the threads."""
        self._pool.shutdown(wait=True)


_SHARED: dict[tuple[int, int], Uploader] = {}
_SHARED_MUTEX = threading.Lock()


def shared_uploader(limit: int) -> Uploader:
    """This process's uploader of ``limit`` in flight (made on first use; kept)."""
    key = (os.getpid(), limit)
    with _SHARED_MUTEX:
        up = _SHARED.get(key)
        if up is None:
            for old in [k for k in _SHARED if k[0] != key[0]]:
                del _SHARED[old]  # (a forked child's copy of its parent's: no threads)
            up = _SHARED[key] = Uploader(limit)
        return up


def read_ahead(fetch: Callable[[_T], _R], items: Iterable[_T], limit: int
               ) -> Generator[tuple[_T, _R], None, None]:
    """``(item, fetch(item))`` in order, up to ``limit`` fetched ahead on threads (1: none;
    each is fetched when asked for, in this thread)."""
    if limit <= 1:
        for item in items:
            yield item, fetch(item)
        return
    pending: deque[tuple[_T, Future[_R]]] = deque()
    todo = iter(items)
    with ThreadPoolExecutor(limit, thread_name_prefix="cbt-read") as pool:
        try:
            for item in todo:  # (``limit`` in flight, also while the caller works)
                pending.append((item, pool.submit(fetch, item)))
                if len(pending) >= limit:
                    break
            while pending:
                first, fut = pending.popleft()
                result = fut.result()
                for item in todo:
                    pending.append((item, pool.submit(fetch, item)))
                    break
                yield first, result
                del result
        finally:
            for _, fut in pending:
                fut.cancel()

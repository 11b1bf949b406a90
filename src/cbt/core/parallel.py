"""Fork workers that write their results into shared memory.

Used where one disk is split across cores (``scan --workers N``, image diffs):

1. The caller allocates its outputs with :func:`shared_buffer` or
   :func:`shared_array` (anonymous ``MAP_SHARED`` memory), so forked children
   write straight into them: no pickling of digests, no copies.
2. :func:`fork_map` forks one child per task; each child runs ``fn(task,
   report)`` and sends back only a small picklable result (or its exception)
   through a pipe.  :class:`Forked` is the same in two halves (fork now,
   collect later), for a caller with other work to do meanwhile.
3. ``report(nbytes)`` adds to a shared per-task counter which the parent
   passes to ``progress`` (as a list) a few times a second while it waits.
4. A child that dies without a result (a signal: SIGBUS on a mapped file
   that cannot be read, SIGKILL of the OOM killer) is a :class:`WorkerError`
   naming the signal, its task, and the byte range the child last noted with
   :func:`working_on`, so the caller can say what it was reading.

With ``ignore_stop_signals`` the children ignore SIGTERM and SIGINT: a signal
sent to the whole process group (a daemon being stopped) then leaves them to
finish, and the parent alone decides what to do.  Without it they die of it.

fork, not spawn: children start in microseconds with the parent's imports and
arrays already in place.  This module needs numpy only for :func:`shared_array`:
``cbt scan`` without ``-o`` never imports it (start-up time counts).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import pickle
import select
import selectors
import signal
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from cbt.core.errors import CbtError

if TYPE_CHECKING:
    import numpy.typing as npt

T = TypeVar("T")
R = TypeVar("R")
Report = Callable[[int], None]
Progress = Callable[[list[int]], None]  # bytes done per task


def shared_buffer(nbytes: int, fill: int = 0) -> mmap.mmap:
    """``nbytes`` of anonymous shared memory (zeros, or ``fill`` bytes) for forked children."""
    buf = mmap.mmap(-1, max(1, nbytes))  # MAP_SHARED | MAP_ANONYMOUS
    if fill:
        buf[:] = bytes([fill]) * len(buf)
    return buf


def shared_array(shape: tuple[int, ...], dtype: Any, fill: int = 0) -> npt.NDArray[Any]:
    """A numpy array in anonymous shared memory, visible to forked children."""
    import numpy as np

    count = int(np.prod(shape))
    arr: npt.NDArray[Any] = np.frombuffer(
        shared_buffer(count * np.dtype(dtype).itemsize), dtype=dtype, count=count)
    arr = arr.reshape(shape)
    if fill:
        arr.fill(fill)
    return arr


class WorkerError(CbtError, RuntimeError):
    """A forked worker died without reporting (killed by a signal, out of memory).

    ``task`` is its position in the task list, ``signum`` what killed it (None:
    it exited), ``span`` the byte range ``[start, end)`` it last noted with
    :func:`working_on` (None: none).
    """

    def __init__(self, message: str, task: int | None = None, signum: int | None = None,
                 span: tuple[int, int] | None = None) -> None:
        super().__init__(message)
        self.task = task
        self.signum = signum
        self.span = span


# In a forked child: its slot (start, end, set) in the shared "working on" memory.
_WHERE: tuple[memoryview, int] | None = None


def working_on(start: int, end: int) -> None:
    """Note the byte range ``[start, end)`` this worker is about to touch.

    Read by the parent only when the worker dies of a signal (a mapped page
    that cannot be read), to say where; a no-op outside a forked worker.
    """
    if _WHERE is not None:
        slots, at = _WHERE
        slots[at], slots[at + 1], slots[at + 2] = start, end, 1


def fork_map(
    fn: Callable[[T, Report], R],
    tasks: Sequence[T],
    progress: Progress | None = None,
    interval: float = 0.2,
    *,
    ignore_stop_signals: bool = False,
    isolate: bool = False,
) -> list[R]:
    """Run ``fn(task, report)`` for every task, one forked child each.

    Returns the results in task order; re-raises the first child's exception.
    A single task runs in this process (no fork), whose signal handling is
    its caller's; but with ``isolate`` (tasks that map files, where a page
    that cannot be read is a SIGBUS) it too runs in a child, whose death is
    a :class:`WorkerError`.
    """
    if len(tasks) == 0 or (len(tasks) == 1 and not isolate):
        done = [0]

        def report_local(n: int) -> None:
            done[0] += n
            if progress:
                progress(done)

        return [fn(t, report_local) for t in tasks]
    return Forked(fn, tasks, ignore_stop_signals=ignore_stop_signals).wait(progress, interval)


def stop_others(report: Report) -> None:
    """A :func:`thread_map` worker that is failing tells the others to stop now, before its
    own clean-up (which may wait on I/O) lets the failure reach :func:`thread_map`; a
    ``report`` of any other kind (forked workers: the parent kills them) ignores it."""
    stop = getattr(report, "stop_others", None)
    if stop is not None:
        stop()


class Stopped(CbtError, RuntimeError):
    """A :func:`thread_map` worker told to stop: another one failed, or the caller was
    interrupted."""


def thread_map(fn: Callable[[T, Report], R], tasks: Sequence[T],
               progress: Progress | None = None) -> list[R]:
    """:func:`fork_map` on threads of this process (for what a forked child cannot use:
    an S3 client's threads); results in task order, the first exception re-raised.

    A thread cannot be killed: the first failure (or an interrupt of the caller, a
    Ctrl-C) makes every other worker's next ``report`` raise :class:`Stopped`, so
    they stop where they are rather than finish their work first; the failure is
    raised once they all have."""
    from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

    done = [0] * len(tasks)
    guard = threading.Lock()
    stop = threading.Event()

    def reporter(k: int) -> Report:
        def report(n: int) -> None:
            if stop.is_set():
                raise Stopped("stopped: another worker failed")
            with guard:
                done[k] += n
                if progress:
                    progress(list(done))
        report.stop_others = stop.set  # type: ignore[attr-defined]  # (see stop_others)
        return report

    def run(k: int, task: T) -> R:
        try:
            return fn(task, reporter(k))
        except BaseException:
            stop.set()  # (at once, from the failing thread: the others stop at their next report)
            raise

    with _Waker() as waker:  # (closed once every worker, and so every callback, is done)
        pool = ThreadPoolExecutor(max(1, len(tasks)))
        try:
            futures = [pool.submit(run, k, t) for k, t in enumerate(tasks)]
            for f in futures:
                f.add_done_callback(waker.wake)
            while wait(futures, timeout=0, return_when=FIRST_EXCEPTION).not_done \
                    and not stop.is_set():
                waker.sleep()
            if stop.is_set():
                wait(futures)
                errors = [e for e in (f.exception() for f in futures) if e is not None]
                raise next((e for e in errors if not isinstance(e, Stopped)), errors[0])
            return [f.result() for f in futures]
        except BaseException:
            stop.set()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


class _Waker:
    """What the main thread of :func:`thread_map` sleeps on: woken when a worker ends,
    and at once by a signal (a Ctrl-C), wherever the kernel delivered it.

    A signal's Python handler runs only in the main thread, and only when it runs; one
    the kernel gave a worker thread (``kill`` of the process: any thread may get it)
    would wait for the main thread's next wake-up, while the workers go on.  So the main
    thread sleeps in ``select`` on a pipe that is also the signal wake-up fd
    (:func:`signal.set_wakeup_fd`: the C handler writes to it from any thread).  Off
    the main thread, or where a wake-up fd is already set (an event loop's), it wakes
    every 0.1 s as well."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._old: int | None = None
        self._step = 0.1
        if threading.current_thread() is threading.main_thread():
            try:
                old = signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
            except ValueError:
                return
            if old == -1:
                self._old, self._step = old, 1.0
            else:  # (someone else's: theirs stays)
                signal.set_wakeup_fd(old)

    def wake(self, _done: object = None) -> None:
        with contextlib.suppress(OSError):  # (full: awake already; closed: all done)
            os.write(self._w, b"\0")

    def sleep(self) -> None:
        select.select([self._r], [], [], self._step)
        with contextlib.suppress(OSError):
            while os.read(self._r, 4096):
                pass

    def __enter__(self) -> _Waker:
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._old is not None:
            signal.set_wakeup_fd(self._old)
        os.close(self._r)
        os.close(self._w)


class Forked(Generic[R]):
    """Children started now, collected later: the caller works meanwhile.

    ``Forked(fn, tasks)`` forks one child per task at once; :meth:`wait`
    returns their results in task order (re-raising the first child's
    exception); :meth:`cancel` kills whatever still runs.  Either one must be
    called.  With ``ignore_stop_signals`` the children ignore SIGTERM and SIGINT.
    """

    def __init__(self, fn: Callable[[T, Report], R], tasks: Sequence[T], *,
                 ignore_stop_signals: bool = False) -> None:
        self._counters = memoryview(shared_buffer(8 * max(1, len(tasks)))).cast("Q")
        self._where = memoryview(shared_buffer(24 * max(1, len(tasks)))).cast("Q")
        self._children: list[tuple[int, int]] = []  # (pid, read fd)
        self._status: dict[int, int] = {}  # pid -> wait status, once reaped
        self._reaped = False
        try:
            for index, task in enumerate(tasks):
                r, w = os.pipe()
                try:
                    pid = os.fork()
                except BaseException:
                    os.close(r)
                    os.close(w)
                    raise
                if pid == 0:  # child
                    os.close(r)
                    _child(fn, task, index, (self._counters, self._where), w,
                           ignore_stop_signals)
                self._children.append((pid, r))  # first: a cancel must find this child
                os.close(w)
        except BaseException:
            self.cancel()
            raise

    def wait(self, progress: Progress | None = None, interval: float = 0.2) -> list[R]:
        if self._reaped:  # (its pipes are closed; their numbers may belong to others now)
            raise WorkerError("these workers were already collected or cancelled")
        try:
            payloads = _collect(self._children, self._counters, progress, interval)
        finally:
            self.cancel()
        results: list[R] = []
        for index, ((pid, _), payload) in enumerate(zip(self._children, payloads, strict=True)):
            if not payload:
                raise self._died(index, pid)
            ok, value = pickle.loads(payload)
            if not ok:
                raise value
            results.append(value)
        return results

    def _died(self, index: int, pid: int) -> WorkerError:
        """The error of a child that sent no result: the signal that killed it, and where."""
        status = self._status.get(pid)
        sig = os.WTERMSIG(status) if status is not None and os.WIFSIGNALED(status) else None
        at = 3 * index
        span = ((int(self._where[at]), int(self._where[at + 1]))
                if self._where[at + 2] else None)
        how = "" if sig is None else f" (killed by {signal.Signals(sig).name})"
        return WorkerError(f"worker process {pid} died without a result{how}", index, sig, span)

    def cancel(self) -> None:
        """Kill and reap every child still running (a no-op once :meth:`wait` returned)."""
        if self._reaped:
            return
        self._reaped = True
        for pid, r in self._children:
            with contextlib.suppress(OSError):
                os.close(r)
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                os.kill(pid, signal.SIGKILL)  # (a child already dead keeps its own status)
                self._status[pid] = os.waitpid(pid, 0)[1]


def _child(fn: Callable[[T, Report], R], task: T, index: int,
           shared: tuple[memoryview, memoryview], w: int, ignore_stop_signals: bool) -> None:
    global _WHERE
    code = 0
    counters, _WHERE = shared[0], (shared[1], 3 * index)
    try:
        if ignore_stop_signals:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)

        def report(n: int) -> None:
            counters[index] += n

        try:
            payload = pickle.dumps((True, fn(task, report)))
        except BaseException as exc:  # sent to the parent, which re-raises it
            code = 1
            try:
                payload = pickle.dumps((False, exc))
            except Exception:
                payload = pickle.dumps((False, CbtError(f"{type(exc).__name__}: {exc}")))
        with os.fdopen(w, "wb") as out:
            out.write(payload)
    finally:
        os._exit(code)


def _collect(children: list[tuple[int, int]], counters: memoryview,
             progress: Progress | None, interval: float) -> list[bytes]:
    chunks: dict[int, list[bytes]] = {r: [] for _, r in children}
    open_fds = set(chunks)
    with selectors.DefaultSelector() as sel:
        for fd in open_fds:
            sel.register(fd, selectors.EVENT_READ)
        while open_fds:
            for key, _ in sel.select(timeout=interval):
                fd = int(key.fd)
                data = os.read(fd, 1 << 16)
                if data:
                    chunks[fd].append(data)
                else:
                    sel.unregister(fd)
                    open_fds.discard(fd)
            if progress:
                progress(counters.tolist())
    return [b"".join(chunks[r]) for _, r in children]

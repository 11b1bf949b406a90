"""Backups on a Dask cluster: :class:`DaskExecutor`, a ``distributed.Client`` as an Executor.

``cbt backup --config F --executor dask://HOST:PORT`` (or ``cbt.jobs.run(config,
executor=client)``, ``Vault.backup(..., executor=client)``) runs each disk's shards on
the cluster's workers instead of forked ones.  The coordinator (the command) plans,
takes the locks and commits; each worker reopens the vault from its spec (its keys
included: use ``tls://`` between hosts), reads its shard of the disk where the disk
lies, and writes its packs straight to the vault's storage.  What comes back is
small: the shard's digests and flags and the index entries of the blocks it stored,
checked by the coordinator as input (:func:`cbt.ops.backup.check_result`; at the
commit, every pack they name is stat'ed and every block read must be in the vault).
When the run ends, done or failed, every worker drops the vault's spec it was handed
(:meth:`DaskExecutor.release`): a long-lived worker keeps no vault's keys.  A shard
that fails is logged by its worker with the task's repr (the shard: its disk and
ranges; never a key).

Where a disk's shards run (pinning): a disk with a host (the VM's ``host`` config
key, ``BackupRequest.hosts``) runs on the workers that serve that host: those
started with the resource ``host-NAME`` (``dask worker SCHED --resources
host-NAME=1``), or whose address, host or name is NAME.  Its extents are mapped
there too, so the coordinator needs no access to the disk.  A disk without one
runs on the workers of the coordinator's own host (the address it reaches the
scheduler from, or a loopback one).  A host no worker serves fails the backup
before anything is written, naming it.

The vault must be reachable from every worker at the same location: an ``s3://``
vault needs nothing shared (each worker takes its credentials from its own AWS
environment); a directory vault needs the same path on every host (a shared file
system).

A worker that leaves the cluster while it holds shards of the run fails the run
(nothing is committed; its packs are left for the next run to adopt or gc to
collect), as a forked worker's death does: Dask would otherwise run its shards
again elsewhere, out of sight.

Speed: Dask's nanny starts each worker with ``MALLOC_TRIM_THRESHOLD_=65536``, which
fixes glibc's mmap threshold at 128 KiB: every buffer above that (a window, a pack, a
compressed block) is a fresh mmap, zeroed page by page, and the shards took 2.5 times
the CPU of the built-in workers (bench/dask_backup.py).  A task of cbt therefore sets
the thresholds of its worker process once (:func:`_tune_malloc`: 32 MiB, the most
glibc's dynamic threshold reaches, and a trim threshold of twice that).

``distributed`` is an optional dependency (``pip install 'cbt[dask]'``): imported
only here, and only when a Dask executor is asked for.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import socket
import threading
import uuid
import weakref
from collections.abc import Callable
from concurrent.futures import Executor, Future, InvalidStateError
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from cbt.core.errors import CbtError, CbtIOError, CbtValueError
from cbt.ops.backup import PlacedExecutor

if TYPE_CHECKING:
    from distributed import Client

__all__ = ["DASK_SCHEME", "DaskExecutor", "as_executor", "connect", "host_resource"]

DASK_SCHEME = "dask://"
CONNECT_TIMEOUT = 10.0  # seconds to reach the scheduler
WATCH_EVERY = 0.25  # seconds between looks at the cluster's workers while shards run
RELEASE_WAIT = 10.0  # seconds the end of a run waits for the workers to drop its vault
LIVE_CLIENT = frozenset({"running", "newly-created"})  # a Client's status while connected
HOST_RESOURCE = "host-"  # a worker serves host NAME when it has the resource host-NAME
LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})
# glibc's mallopt: the thresholds a worker process is given (see the module doc)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20

_P = ParamSpec("_P")
_T = TypeVar("_T")


def host_resource(host: str) -> str:
    """The Dask worker resource that says a worker serves ``host``."""
    return HOST_RESOURCE + host


def _distributed() -> Any:
    try:
        import distributed
    except ImportError:
        raise CbtValueError("the Dask executor needs the distributed package: "
                            "pip install 'cbt[dask]'") from None
    return distributed


def connect(address: str, timeout: float = CONNECT_TIMEOUT) -> DaskExecutor:
    """A DaskExecutor on the scheduler at ``dask://HOST:PORT`` (also ``tcp://``, ``tls://``),
    closing its client when shut down."""
    if address.startswith(DASK_SCHEME):
        target = "tcp://" + address[len(DASK_SCHEME):]
    elif address.startswith(("tcp://", "tls://")):
        target = address
    else:
        raise CbtValueError(f"--executor {address!r}: give dask://HOST:PORT")
    host, _, port = target.split("://", 1)[1].rpartition(":")
    if not host or not port.isdigit():
        raise CbtValueError(f"--executor {address!r}: give dask://HOST:PORT")
    distributed = _distributed()
    try:
        client = distributed.Client(target, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError) as exc:
        raise CbtIOError(getattr(exc, "errno", None) or 0,
                         f"cannot reach the Dask scheduler at {host}:{port}: "
                         f"{' '.join(str(exc).split()) or type(exc).__name__}") from None
    return DaskExecutor(client, own_client=True)


def as_executor(executor: Executor | Client | None) -> Executor | None:
    """An Executor from what a caller gave: a ``distributed.Client`` becomes a
    :class:`DaskExecutor`; anything else is returned as it is."""
    if executor is None or isinstance(executor, Executor):
        return executor
    if hasattr(executor, "get_executor") and hasattr(executor, "scheduler_info"):
        return DaskExecutor(executor)
    raise CbtValueError(f"not an executor: {type(executor).__name__}")


class DaskExecutor(PlacedExecutor):
    """A ``distributed.Client``'s workers as a :class:`~cbt.ops.backup.PlacedExecutor`."""

    def __init__(self, client: Client, own_client: bool = False) -> None:
        _distributed()
        self.client: Any = client  # (distributed is partly untyped)
        self._own = own_client
        self._lock = threading.Lock()
        # the run's futures still pending, each with the workers that may run it and its task
        self._pending: dict[Future[Any], tuple[frozenset[str], Any]] = {}
        self._watcher: threading.Thread | None = None
        self._closed = threading.Event()
        self._gone: set[str] = set()

    # -- where -------------------------------------------------------------------------

    def _workers(self) -> dict[str, dict[str, Any]]:
        """Every worker of the cluster, asked of the scheduler now (not
        ``client.scheduler_info()``, whose answer the client's periodic refresh may
        replace meanwhile with one of no worker at all: every worker 'gone')."""
        client = self.client
        info: dict[str, Any] = client.sync(client.scheduler.identity, n_workers=-1)
        workers: dict[str, dict[str, Any]] = info.get("workers", {})
        return workers

    def local_hosts(self) -> set[str]:
        """The addresses of the coordinator's host as the cluster may see it."""
        hosts = set(LOOPBACK)
        with contextlib.suppress(OSError):
            hosts.update(str(a[4][0]) for a in socket.getaddrinfo(socket.gethostname(), None))
        address = str(self.client.scheduler.address)
        where = address.split("://", 1)[-1].rsplit(":", 1)
        try:  # the address this host reaches the scheduler from (no packet sent: UDP)
            with socket.socket(socket.AF_INET6 if ":" in where[0] else socket.AF_INET,
                               socket.SOCK_DGRAM) as s:
                s.connect((where[0].strip("[]"), int(where[1])))
                hosts.add(s.getsockname()[0])
        except (OSError, ValueError, IndexError):
            pass
        return hosts

    def serving(self, host: str | None) -> list[str]:
        """The addresses of the workers that serve ``host`` (None: the coordinator's)."""
        workers = self._workers()
        if host is None:
            local = self.local_hosts()
            return sorted(a for a, w in workers.items() if w.get("host") in local)
        return sorted(a for a, w in workers.items()
                      if host_resource(host) in (w.get("resources") or {})
                      or host in (a, w.get("host"), w.get("name"),
                                  a.split("://", 1)[-1]))

    def on(self, host: str | None) -> tuple[Executor, int]:
        workers = self.serving(host)
        if not workers:
            if host is None:
                raise CbtValueError(
                    "no Dask worker runs on this host (the coordinator's): start one here "
                    "(dask worker SCHEDULER), or name the VM's host (host = \"NAME\")")
            raise CbtValueError(
                f"no Dask worker serves host {host}: start one there with "
                f"--resources {host_resource(host)}=1")
        return _Pinned(self, frozenset(workers)), len(workers)

    # -- running ---------------------------------------------------------------------

    def submit(self, fn: Callable[_P, _T], /, *args: _P.args,
               **kwargs: _P.kwargs) -> Future[_T]:
        """A task on the workers of the coordinator's host."""
        pinned, _ = self.on(None)
        return pinned.submit(fn, *args, **kwargs)

    def _submit(self, workers: frozenset[str], fn: Callable[..., _T], *args: Any,
                **kwargs: Any) -> Future[_T]:
        if self._closed.is_set():
            raise RuntimeError("cannot submit to a DaskExecutor that was shut down")
        done: Future[_T] = Future()
        name = getattr(fn, "__name__", "task")
        task = self.client.submit(_on_worker, fn, *args, workers=sorted(workers),
                                  allow_other_workers=False, pure=False, retries=0,
                                  key=f"{name}-{uuid.uuid4().hex}", **kwargs)
        with self._lock:
            self._pending[done] = (workers, task)
            self._start_watch()

        def cancelled(f: Future[_T]) -> None:
            if f.cancelled():
                task.cancel()

        done.add_done_callback(cancelled)
        ref = weakref.ref(self)

        def settle(t: Any) -> None:
            me = ref()
            if me is not None:
                me._settle(done, t)

        task.add_done_callback(settle)
        return done

    def _settle(self, done: Future[Any], task: Any) -> None:
        with self._lock:
            self._pending.pop(done, None)
        if done.done():
            return
        try:
            if task.status == "finished":
                done.set_result(task.result())
            elif task.status == "cancelled":  # (not by us: ours were done first)
                done.set_exception(CbtIOError(0, "Dask cancelled a shard (its worker or the "
                                                 "scheduler went away?): nothing committed"))
            else:
                done.set_exception(_worker_error(task.exception()))
        except InvalidStateError:  # (settled meanwhile: the watcher's error, a cancel)
            pass
        except BaseException as exc:  # (the result could not be fetched)
            with contextlib.suppress(InvalidStateError):
                done.set_exception(_worker_error(exc))

    def _start_watch(self) -> None:
        if self._watcher is None or not self._watcher.is_alive():
            self._watcher = threading.Thread(target=self._watch, name="cbt-dask-watch",
                                             daemon=True)
            self._watcher.start()

    def _watch(self) -> None:
        """While tasks are pending: a worker that may hold one and left the cluster fails
        them all (the run is not committed), saying which worker."""
        while not self._closed.wait(WATCH_EVERY):
            with self._lock:
                if not self._pending:
                    self._watcher = None
                    return
                eligible = set().union(*(w for w, _ in self._pending.values()))
            gone_text = ("the Dask scheduler went away during the backup (connection "
                         "lost): nothing committed; run it again")
            try:  # (the client's view: lost at once when the scheduler's connection is)
                connected = self.client.status in LIVE_CLIENT
                alive = set(self._workers()) if connected else set()
            except Exception:  # (the scheduler itself is gone: say so)
                alive = set()
            else:
                gone_text = "" if connected else gone_text
            gone = sorted(eligible - alive)
            if not gone:
                continue
            message = gone_text or (f"Dask worker {gone[0]} left the cluster during the "
                                    "backup (killed?): nothing committed; run it again")
            with self._lock:
                pending = list(self._pending.items())
                self._pending.clear()
            for f, _ in pending:
                with contextlib.suppress(InvalidStateError):
                    f.set_exception(CbtIOError(0, message))
            for _, (_, task) in pending:
                task.cancel()  # (Dask would run it again on another worker)

    def release(self) -> None:
        """Every worker drops what the run handed it (:func:`_forget`): the vault's
        spec, its keys among them, are not left in long-lived workers.  A worker that
        cannot be reached is passed over (gone, it holds nothing)."""
        if self.client.status not in LIVE_CLIENT:  # (the scheduler is gone: nothing to ask)
            return

        def forget() -> None:
            with contextlib.suppress(Exception):
                self.client.run(_forget, on_error="ignore")

        asking = threading.Thread(target=forget, name="cbt-dask-release", daemon=True)
        asking.start()
        asking.join(RELEASE_WAIT)  # (a worker that does not answer holds up no command)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._closed.set()
        if cancel_futures:
            with self._lock:
                pending = list(self._pending.items())
            for f, (_, task) in pending:
                f.cancel()
                task.cancel()
        if self._own:
            self.client.close()


class _Pinned(Executor):
    """A DaskExecutor's tasks restricted to some workers (a host's)."""

    def __init__(self, owner: DaskExecutor, workers: frozenset[str]) -> None:
        self.owner = owner
        self.workers = workers

    def submit(self, fn: Callable[_P, _T], /, *args: _P.args,
               **kwargs: _P.kwargs) -> Future[_T]:
        return self.owner._submit(self.workers, fn, *args, **kwargs)


_TUNED: list[bool] = []  # (a worker process's malloc tuned already)


def _on_worker(fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """Run a task of cbt on a worker: its malloc tuned first (once per process)."""
    if not _TUNED:
        _TUNED.append(True)
        _tune_malloc()
    return fn(*args, **kwargs)


def _forget() -> None:
    """On a worker: drop the WorkerVaults of cbt's runs (keys included), and collect."""
    import gc

    from cbt.ops.backup import forget_runs

    forget_runs()
    gc.collect()


def _tune_malloc() -> None:
    """Give back glibc the thresholds Dask's ``MALLOC_TRIM_THRESHOLD_`` pinned low (only
    where it is set: a worker started otherwise keeps its own)."""
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD)


def _worker_error(exc: BaseException | None) -> BaseException:
    """A worker's failure as cbt reports it: cbt's own errors (and OSErrors) as they are;
    a worker that died under a task (KilledWorker), a lost connection, or anything else
    as one line."""
    if exc is None:
        return CbtIOError(0, "a Dask shard failed without an error (its worker died?): "
                             "nothing committed; run the backup again")
    if type(exc).__module__.split(".")[0] == "distributed" and isinstance(exc, OSError):
        # (CommClosedError is an OSError: the scheduler or a worker went away mid-fetch)
        return CbtIOError(0, "the Dask scheduler or a worker went away during the backup "
                             "(connection lost): nothing committed; run it again")
    if isinstance(exc, CbtError | OSError):
        return exc
    name = type(exc).__name__
    if name == "KilledWorker":
        return CbtIOError(0, "a Dask worker died while running a shard: nothing committed; "
                             "run the backup again")
    if name == "FutureCancelledError" or "cancel" in name.lower():
        text = " ".join(str(exc).split())
        if "connection-lost" in text or "lost the connection" in text:
            return CbtIOError(0, "the Dask scheduler went away during the backup (connection "
                                 "lost): nothing committed; run it again")
        return CbtIOError(0, f"Dask cancelled a shard ({text[:200]}): nothing committed; "
                             "run the backup again")
    # anything else a worker raised (its traceback is in the worker's log): one line here,
    # never the worker's exception itself (a KeyboardInterrupt or SystemExit would pass
    # for this process's own)
    text = " ".join(str(exc).split())
    return CbtIOError(0, f"a Dask worker failed: {name}"
                         f"{': ' + text[:200] if text else ''}: nothing committed")


"""Restore: write disks of a recovery point back, bit for bit.

:func:`restore` takes a :class:`RestoreRequest` and returns a
:class:`RestoreResult`; one function per step of the protocol:

1. Plan (:func:`_plan_targets`, :func:`_plan_target`, :func:`plan_disk`):
   resolve the point's manifests, check each disk's target, and choose what
   to write to it:
   - a new file: created under a temporary name with the disk's size; holes
     and zero blocks are never written, so they stay holes;
   - a block device: every DATA block, and zero/hole ranges zeroed with
     ``BLKZEROOUT`` (skipped with ``assume_zeroed``); the device must be at
     least as large as the disk;
   - ``in_place`` (an older restore or the damaged original, file or device):
     the target is scanned first and only blocks whose digest differs are
     written; blocks that must read as zeros are punched (file) or zeroed
     (device).
   Every DATA block to write is looked up in the index (a block the index
   lacks is an error before anything is written) and the blocks are ordered
   by (pack, offset): one job per pack.  A damaged index segment costs
   nothing: the packs it covered are indexed from their own trailers, or
   their blob headers where a trailer is lost too (each block is checked as
   it is written anyway).
2. Create (:func:`_create_target`): a new file, at its temporary name.
3. Write (:func:`_write`): each worker gets whole packs (:func:`_balance`),
   reopens the vault from its spec (storage and keys: no passphrase asked),
   maps each pack, checks all its blob headers at once
   (:func:`cbt.format.pack.blob_headers`), decompresses what is compressed
   (:func:`cbt.format.pack.decompress_many`: many blocks a call, the GIL let go;
   a job of raw and lz4 blobs, an lz4 vault's, is decoded and checked by one call
   into the core, :func:`_decode_plain`), and hands runs of consecutive blocks to
   its writer thread (:class:`_Writer`), which writes each with one ``pwritev``,
   straight from the mapped pack or the decoded blocks, while the worker goes on
   with the next pack.  An
   encrypted vault's blobs are each opened (authenticated) first: a blob that
   fails is an error naming its pack, before its block is written.
4. Verify, before it writes: blocks are hashed many at a time in one call into
   the core (keyed BLAKE3 with the vault's id key in an encrypted vault) and
   checked against the manifest's digests: a batch as it is decompressed or
   opened (while it is in cache), the rest run by run on the writer thread.
5. Finish (:func:`_finish_target`): zero what must read as zeros, fsync.
6. Commit (:func:`_commit_targets`): a new file is renamed into place and its
   directory fsynced.  On any error temporary files are removed
   (:func:`_discard_targets`): no new target is left half-written.

:func:`instant_restore` (``--instant``), for each disk:

1. Plan: the point's kept snapshot of the disk, where the registry names one
   and it still exists.
2. Clone it to a temporary name: a reflink where the target is on the same
   file system, else a sparse copy.
3. Verify: re-hash the clone against the point's manifest (unless
   ``verify_snapshot`` is off).
4. Commit: fsync, rename into place, fsync the directory.
   A disk without a snapshot, or whose snapshot fails 2-4, is restored from
   the vault (:func:`restore`) with a warning; each disk says its source.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import fcntl
import functools
import itertools
import os
import queue
import re
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cbt.core.blockio import (
    Writeback,
    copy_sparse,
    device_size,
    is_block_device,
    rename_noreplace,
    write_all,
    zero_range,
)
from cbt.core.crypto import OVERHEAD, Cipher
from cbt.core.durable import fsync_dir, fsync_file, pid_alive, temp_name
from cbt.core.errors import CbtError, CbtIOError, CbtValueError
from cbt.core.native import fast
from cbt.core.parallel import Report, WorkerError, fork_map, stop_others, thread_map, working_on
from cbt.format.manifest import Manifest, union_rows
from cbt.format.pack import (
    BLOB,
    BLOB_AAD_SIZE,
    CODEC_LZ4,
    CODEC_NONE,
    ENCRYPTION_AEAD,
    ENCRYPTION_NONE,
    CorruptPackError,
    FrameError,
    blob_aads,
    blob_headers,
    blob_length,
    blobs_match,
    decode_blob,
    decompress_many,
    exact_frames,
)
from cbt.format.records import NAME_RE, PointRecord
from cbt.ops.diff import changed_blocks
from cbt.repo.index import Index, skipping_damaged
from cbt.repo.registry import kept_snapshots
from cbt.repo.storage import Storage, StorageSpec
from cbt.repo.trash import pack_places
from cbt.repo.uploader import read_ahead
from cbt.repo.vault import Vault, VaultSpec
from cbt.source.scan import default_workers, scan
from cbt.source.snapshot import is_snapshot_file, reflink

FORMATS = ("raw", "qcow2")


class DamagedPointError(CbtError, ValueError):
    """A block of a point is missing from the vault or fails its digest."""


@dataclass(frozen=True)
class RestoreRequest:
    """What ``cbt restore`` is asked: which point, where to, and how."""

    point: str  # point id, unique prefix, or VM.latest
    to: str | os.PathLike[str]  # a directory; with ``disk``, a file or block device
    disk: str | None = None  # restore only this disk
    force: bool = False  # replace existing target files
    in_place: bool = False  # rewrite only the blocks that differ in an existing copy
    assume_zeroed: bool = False  # a target device reads as zeros already
    workers: int | None = None
    progress: Callable[[int, int], None] | None = None  # (bytes done, bytes in all)
    instant: bool = False  # from the point's kept snapshots where there are some
    verify_snapshot: bool = True  # instant: re-hash a snapshot against the manifest
    mode: int = 0o600  # permission bits of a new image file (one restored in place keeps its)
    # "raw", or "qcow2": a new sparse qcow2 file made with qemu-img (a disk to boot again)
    format: str = "raw"

    def check_format(self) -> None:
        """``qcow2`` only where a new file is made: not onto a device, in place, instant."""
        if self.format not in FORMATS:
            raise CbtValueError(f"unknown restore format {self.format!r} (give "
                                f"{' or '.join(FORMATS)})")
        if self.format == "raw":
            return
        for flag, why in ((self.in_place, "--in-place"), (self.instant, "--instant"),
                          (self.assume_zeroed, "--assume-zeroed")):
            if flag:
                raise CbtValueError(f"--format qcow2 makes a new image file: not with {why}")
        from cbt.source.qcow2 import tool

        tool("qemu-img")


@dataclass(frozen=True)
class RestoredDisk:
    """One disk of a restore: where it went, how big, what it cost."""

    label: str
    to: str
    size: int
    bytes_written: int
    blocks_verified: int
    source: str | None = None  # instant restore only: "vault" or "snapshot (...)"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"label": self.label, "to": self.to, "size": self.size,
                               "bytes_written": self.bytes_written,
                               "blocks_verified": self.blocks_verified}
        if self.source is not None:
            out["source"] = self.source
        return out


@dataclass(frozen=True)
class RestoreResult:
    """What a restore did: ``to_dict()`` is ``cbt restore --json``."""

    recovery_point: str
    disks: list[RestoredDisk]
    seconds: float
    warnings: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"recovery_point": self.recovery_point,
                "disks": [d.to_dict() for d in self.disks],
                "seconds": self.seconds, "warnings": list(self.warnings)}

    def __getitem__(self, key: str) -> Any:
        """``result["disks"]``: the keys of :meth:`to_dict`, for scripts written when
        ``Vault.restore`` returned that dict."""
        return self.to_dict()[key]


@dataclass(frozen=True)
class _Job:
    """The blocks of one disk held by one pack: what a worker writes."""

    vault: VaultSpec  # the worker reopens the vault (its storage, its keys) from this
    point: str
    label: str
    target: str
    block_size: int
    pack: str
    blocks: np.ndarray  # block numbers, in pack offset order
    digests: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray  # blob header + payload
    disk_size: int


# Consecutive blocks are gathered up to this many bytes, checked with one call
# into the core and written with one pwritev, straight from where they lie (the
# mapped pack, the buffer a block was decompressed into, or the scratch buffer an
# lz4 vault's job is decoded into): no copy of ours.
# About one batch decompressed (INFLATE_BATCH blocks of 16 KiB): the kernel's copy
# into the page cache then reads blocks still in the CPU's cache.  Measured on a
# 1.5 GB ext4 image and SQLite database, two workers, medians of 4 alternating
# runs: 8 MiB runs took 3.6 CPU-s (1.6 of them in the kernel), 1 MiB runs 2.5 (0.7);
# 512 KiB as 1 MiB, 2 MiB and 256 KiB between.
RUN_BYTES = 1 << 20
IOV_MAX = 1024


class _Run:
    """Consecutive blocks of one target on their way to disk."""

    def __init__(self, fd: int, job: _Job, writer: _Writer,
                 id_key: bytes | None = None) -> None:
        self.fd, self.bs, self.writer = fd, job.block_size, writer
        self.id_key = id_key  # an encrypted vault's block ids are keyed BLAKE3
        self.where = f"point {job.point} disk {job.label} block {{}} pack {{}}"
        self.used = 0
        self.views: list[bytes | memoryview] = []
        self.blocks: list[int] = []
        self.digests: list[np.ndarray] = []  # (rows of the run, a job's part at a time)
        self.packs: list[str] = []
        self.checked: list[bool] = []
        self.ready: list[Callable[[], None]] = []  # runs ended, not handed over yet

    def add_many(self, blocks: list[int], digests: np.ndarray,
                 views: Sequence[bytes | memoryview], pack: str, checked: list[bool]) -> None:
        """Queue a job's blocks, in its order; ``checked[i]``: block ``i``'s content was
        already hashed against its digest (decompressed or opened blocks are, while they
        are in cache).  A run ends where the next block is not the one after its last, or
        once it holds :data:`RUN_BYTES`: the same runs as queuing block by block, cut by
        one search per run in the job's cumulative lengths (not a test per block)."""
        n = len(blocks)
        if not n:
            return
        ends = list(itertools.accumulate(map(len, views)))
        gaps = (np.flatnonzero(np.diff(np.asarray(blocks, dtype=np.int64)) != 1) + 1).tolist()
        for s, e in zip([0, *gaps], [*gaps, n], strict=True):  # stretches of consecutive blocks
            i = s
            while i < e:
                if self.blocks and (blocks[i] != self.blocks[-1] + 1 or self.used >= RUN_BYTES):
                    self._cut()
                base = ends[i - 1] if i else 0
                # block j > i joins while the run holds less than RUN_BYTES before it
                k = bisect.bisect_left(ends, RUN_BYTES - self.used + base, i, e - 1) + 1
                self.views += views[i:k]
                self.blocks += blocks[i:k]
                self.digests.append(digests[i:k])
                self.packs += [pack] * (k - i)
                self.checked += checked[i:k]
                self.used += ends[k - 1] - base
                i = k

    def _cut(self) -> None:
        """End the run (it waits for :meth:`flush`) and start anew."""
        if self.blocks:
            self.ready.append(functools.partial(
                _check_and_write, self.fd, self.bs, self.writer.writeback, self.id_key,
                self.where, self.views, self.blocks, np.concatenate(self.digests), self.packs,
                self.checked))
        self.used = 0
        self.views, self.blocks, self.digests, self.packs, self.checked = [], [], [], [], []

    def flush(self) -> None:
        """Hand the runs ended so far and this one to the writer thread (which checks,
        then writes them), as one task: a job's runs at once, so that the worker
        goes on with the next job while the writer writes them all."""
        self._cut()
        if self.ready:
            self.writer.put(functools.partial(_each, self.ready))
            self.ready = []


def _each(tasks: list[Callable[[], None]]) -> None:
    for task in tasks:
        task()


def _check_and_write(fd: int, bs: int, writeback: Writeback, id_key: bytes | None,
                     where: str, views: list[bytes | memoryview], blocks: list[int],
                     digests: np.ndarray, packs: list[str], checked: list[bool]) -> None:
    """A run of consecutive blocks: those not checked yet hashed in one call into the
    core and compared with their digests (a block that fails is an error naming it,
    before anything of the run is written), then written with one ``pwritev`` (per
    :data:`IOV_MAX` blocks) straight from where they lie."""
    n = len(blocks)
    todo = [i for i, c in enumerate(checked) if not c]
    if todo:
        got = np.empty((len(todo), fast.DIGEST_SIZE), dtype=np.uint8)
        fast.hash_each([views[i] for i in todo] if len(todo) < n else views, got, id_key)
        bad = (got != (digests[todo] if len(todo) < n else digests)).any(axis=1)
        if bad.any():
            i = todo[int(np.argmax(bad))]
            raise DamagedPointError(where.format(blocks[i], packs[i])
                                    + ": content does not match its digest")
    offset = blocks[0] * bs
    for k in range(0, n, IOV_MAX):
        chunk = views[k:k + IOV_MAX]
        want = sum(len(v) for v in chunk)
        try:
            done = os.pwritev(fd, chunk, offset)
            if done < want:  # a short write: finish it plainly
                write_all(fd, offset + done, b"".join(bytes(v) for v in chunk)[done:])
        except OSError as exc:  # (ENOSPC, EIO: say what and where, in one line)
            raise _write_error(fd, where.format(blocks[k], packs[k]), exc) from None
        writeback.written(fd, offset, want)
        offset += want


def _write_error(fd: int, what: str, exc: OSError) -> CbtIOError:
    """A write that failed, naming the block and the file (as the kernel names ``fd``)."""
    with contextlib.suppress(OSError):
        path = os.readlink(f"/proc/self/fd/{fd}")
        return CbtIOError(exc.errno, f"{what}: cannot write it to {path}: {exc.strerror}")
    return CbtIOError(exc.errno, f"{what}: cannot write it: {exc.strerror}")


# Tasks (a job's runs each) handed to a worker's writer thread and not written yet,
# at most.  (The worker also waits, before it reads a job into a scratch buffer, until
# the runs of the job before last, which pointed into it, are written.)
WRITE_AHEAD = 2


class _Writer:
    """A worker's verify-and-write thread: the runs handed to it (:meth:`put`, as calls;
    a job's runs as one) are checked and written in order while the worker reads, opens
    and decodes what comes next (``pwritev``, the kernel's copy into the page cache,
    lets go of the GIL; so does the core's batch hash).

    At most :data:`WRITE_AHEAD` tasks wait (the worker waits for room: memory stays
    bounded).  The first error stops the writing (the rest is dropped) and is raised
    by the worker's next :meth:`put`, :meth:`wait` or :meth:`close`.  :meth:`put`
    returns a ticket: :meth:`wait` of it returns once that task is done (a buffer
    its runs point into may then be reused)."""

    def __init__(self, writeback: Writeback) -> None:
        self.writeback = writeback
        self._todo: queue.Queue[Callable[[], None] | None] = queue.Queue(WRITE_AHEAD)
        self._cond = threading.Condition()
        self._sent = self._done = 0
        self._error: BaseException | None = None
        self._abort = False
        self._thread = threading.Thread(target=self._run, name="cbt-restore-write",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (task := self._todo.get()) is not None:
            if self._error is None and not self._abort:
                try:
                    task()
                except BaseException as exc:  # raised in the worker
                    self._error = exc
            del task  # (its buffers let go before the worker hears it is done)
            with self._cond:
                self._done += 1
                self._cond.notify_all()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def put(self, task: Callable[[], None]) -> int:
        self._raise()
        self._todo.put(task)
        self._sent += 1
        return self._sent

    @property
    def sent(self) -> int:
        return self._sent

    def wait(self, ticket: int) -> None:
        with self._cond:
            while self._done < ticket and self._thread.is_alive():
                self._cond.wait()
        self._raise()

    def close(self, abort: bool = False) -> None:
        """Write what is left (or drop it: ``abort``), end the thread; then raise the
        first error, unless aborting.  Once closed, a no-op."""
        self._abort = self._abort or abort
        if self._thread.is_alive():
            self._todo.put(None)
            self._thread.join()
        if not abort:
            self._raise()


# -- 3-4. write and verify (in the workers) -----------------------------------


def _restore_packs(jobs: list[_Job], report: Report, ahead: int = 1
                   ) -> dict[str, tuple[int, int]]:
    """A worker: write the blocks of its packs; label -> (bytes written, blocks verified).

    ``ahead``: packs fetched ahead of the one being written, on threads (storage
    worth several requests in flight: :attr:`Storage.in_flight`); written in order,
    each pack's memory let go once written.  The runs are checked and written by the
    worker's :class:`_Writer` thread while it opens and decompresses the next pack; an
    encrypted vault's blocks are opened, an lz4 vault's decoded, into two scratch
    buffers in turn, each reused once the writer is done with the runs that point
    into it (a job's runs are handed over at its end)."""
    stats: dict[str, tuple[int, int]] = {}
    runs: dict[str, _Run] = {}
    vaults: dict[StorageSpec, Vault] = {}
    for job in jobs:
        if job.vault.storage not in vaults:
            vaults[job.vault.storage] = Vault.from_spec(job.vault)
    writeback = Writeback()  # the disk starts writing while this worker still works
    writer = _Writer(writeback)
    scratch = (_Scratch(), _Scratch())  # where blocks are opened or decoded
    tickets = [0, 0]  # the last task whose runs point into each scratch buffer
    packs = read_ahead(lambda j: _fetch_pack(vaults[j.vault.storage], j), jobs, ahead)
    try:
        for k, (job, pack) in enumerate(packs):
            vault = vaults[job.vault.storage]
            run = runs.get(job.target)
            if run is None:
                run = runs[job.target] = _Run(os.open(job.target, os.O_WRONLY), job, writer,
                                              vault.id_key)
            writer.wait(tickets[k % 2])
            working_on(k, k + 1)  # (the job a SIGBUS of a mapped pack is reported against)
            views, checked = _read_job(vault, job, scratch[k % 2], pack)
            del pack
            # (the blocks not checked yet are checked when written)
            run.add_many(job.blocks.tolist(), job.digests, views, job.pack, checked.tolist())
            run.flush()  # no run points into both this scratch buffer and the next one
            tickets[k % 2] = writer.sent
            w, v = stats.get(job.label, (0, 0))
            stats[job.label] = (w + sum(len(d) for d in views), v + len(views))
            del views  # the pack is unmapped once its runs are written
            report(int(job.lengths.sum()))
        for run in runs.values():
            run.flush()
        writer.close()
    except BaseException:
        stop_others(report)  # (threads: they stop now, not after this one's clean-up)
        raise
    finally:
        packs.close()  # (an error: the packs fetched ahead are dropped)
        try:
            writer.close(abort=True)  # (a no-op once closed)
            for run in runs.values():
                writeback.forget(run.fd)
                os.close(run.fd)
        finally:
            writeback.close()
    return stats


class _Scratch:
    """One worker's buffer for opened blocks, reused by every job (a new one each
    time would be fresh memory, faulted in and zeroed by the kernel page by page)."""

    def __init__(self) -> None:
        self.buf = np.empty(0, dtype=np.uint8)

    def take(self, nbytes: int) -> memoryview:
        if len(self.buf) < nbytes:
            self.buf = np.empty(nbytes, dtype=np.uint8)  # not zeroed: all overwritten
        return self.buf[:nbytes].data


def _fetch_pack(vault: Vault, job: _Job) -> memoryview:
    """The pack of a job (mapped where storage can; else the spans it needs, read)."""
    try:
        return memoryview(_map_pack(vault.storage, job.pack, _spans(job)))
    except (OSError, ValueError) as exc:
        raise DamagedPointError(f"point {job.point} disk {job.label} block "
                                f"{int(job.blocks[0])} pack {job.pack}: {exc}") from None


def _read_job(vault: Vault, job: _Job, scratch: _Scratch, pack: memoryview
              ) -> tuple[list[bytes | memoryview], npt.NDArray[np.bool_]]:
    """The content of every block of a job, from its pack (fetched by :func:`_fetch_pack`),
    and which of them were already checked against their digests."""
    where = f"point {job.point} disk {job.label} block {{}} pack {job.pack}"
    same = _repeats(job)
    if same is not None:  # each blob opened once, its content shared by every copy
        keep = np.r_[True, ~same]
        views, checked = _read_job(vault, replace(
            job, blocks=job.blocks[keep], digests=job.digests[keep],
            offsets=job.offsets[keep], lengths=job.lengths[keep]), scratch, pack)
        at = (np.cumsum(keep) - 1).tolist()
        return [views[i] for i in at], checked[at]
    if vault.keys is None:
        return _job_data(job, pack, where, scratch=scratch)
    return _job_data(job, pack, where, vault.keys.cipher, vault.id_key, scratch)


def read_verified(vault: Vault, job: _Job, scratch: _Scratch | None = None
                  ) -> list[bytes | memoryview]:
    """The content of every block of a job, each checked against its digest (keyed in an
    encrypted vault): what ``cbt mount`` serves.  Restore's own steps 3-4 for a reader that
    keeps the blocks instead of writing them: :func:`_fetch_pack`, :func:`_read_job`, then
    the blocks it did not check hashed at once.  A view may point into the mapped pack or
    ``scratch``: copy what is kept.  A block that fails is a :class:`DamagedPointError`
    naming the point, disk, block and pack."""
    pack = _fetch_pack(vault, job)
    views, checked = _read_job(vault, job, scratch or _Scratch(), pack)
    todo = np.flatnonzero(~checked)
    if len(todo):
        got = np.empty((len(todo), fast.DIGEST_SIZE), dtype=np.uint8)
        fast.hash_each([views[i] for i in todo.tolist()], got, vault.id_key)
        bad = (got != job.digests[todo]).any(axis=1)
        if bad.any():
            blk = int(job.blocks[todo[int(np.argmax(bad))]])
            raise DamagedPointError(f"point {job.point} disk {job.label} block {blk} pack "
                                    f"{job.pack}: content does not match its digest")
    return views


def _job_data(job: _Job, pack: memoryview, where: str, cipher: Cipher | None = None,
              id_key: bytes | None = None, scratch: _Scratch | None = None
              ) -> tuple[list[bytes | memoryview], npt.NDArray[np.bool_]]:
    """The content of every block of a job, from the mapped pack.

    The blob headers are checked all at once (:func:`blobs_match`).  A plain vault's
    job of sound raw and lz4 blobs is decoded and checked by one call into the core
    (:func:`_decode_plain`); else (or if a block fails there) a sound raw blob comes
    back as a view into the pack, anything else goes through :func:`decode_blob`
    (which decompresses, or names the problem).  An encrypted vault's blobs
    (``cipher``) are all sealed, never viewed raw: every sound one is opened
    (authenticated) at once by :func:`_open_sealed`, and decompressed if it is
    compressed; any other goes through :func:`decode_blob`.  The content itself is
    checked later, run by run, except what was checked as it was decoded or opened
    (the second array says which blocks)."""
    n = len(job.blocks)
    offs = job.offsets.astype(np.int64)
    lengths = job.lengths.astype(np.int64)
    bs = job.block_size
    want = np.minimum(bs, job.disk_size - job.blocks.astype(np.int64) * bs)
    sound = np.zeros(n, dtype=bool)
    codecs = np.zeros(n, dtype=np.uint8)
    if n and int((offs + lengths).max()) <= len(pack):
        headers = blob_headers(pack, offs)
        codecs = headers["codec"]
        sound = blobs_match(headers, job.digests, lengths - BLOB.size, want,
                            ENCRYPTION_NONE if cipher is None else ENCRYPTION_AEAD)
    decoded = (_decode_plain(job, pack, offs, lengths, codecs, want, sound, scratch)
               if cipher is None else None)
    if decoded is not None:
        return decoded
    checked = np.zeros(n, dtype=bool)
    opened: dict[int, bytes | memoryview] = {}
    if cipher is not None:
        opened, checked = _open_sealed(cipher, id_key, job, pack, sound, codecs, want, where,
                                       scratch or _Scratch())
    else:
        opened, checked = _inflate_plain(job, pack, sound & (codecs != CODEC_NONE), codecs,
                                         want, where)
    # (a raw blob is viewed only if it is exactly the block: a longer one would be written
    # past the block's end; decode_blob names it)
    direct = (sound & (codecs == CODEC_NONE) & (lengths - BLOB.size == want)
              if cipher is None else checked)
    out: list[bytes | memoryview] = []
    for i, (blk, off, ln, view) in enumerate(zip(job.blocks.tolist(), offs.tolist(),
                                                 lengths.tolist(), direct.tolist(),
                                                 strict=True)):
        if view or i in opened:
            out.append(opened[i] if i in opened else pack[off + BLOB.size:off + ln])
            continue
        try:
            data = decode_blob(pack[off:off + ln], job.digests[i].tobytes(), where.format(blk),
                               check=False, cipher=cipher, want=int(want[i]))
        except CorruptPackError as exc:
            raise DamagedPointError(str(exc)) from None
        if len(data) != int(want[i]):
            raise DamagedPointError(f"{where.format(blk)}: content has the wrong length")
        out.append(data)
    return out, checked


def _decode_plain(job: _Job, pack: memoryview, offs: npt.NDArray[np.int64],
                  lengths: npt.NDArray[np.int64], codecs: npt.NDArray[np.uint8],
                  want: npt.NDArray[np.int64], sound: npt.NDArray[np.bool_],
                  scratch: _Scratch | None
                  ) -> tuple[list[bytes | memoryview], npt.NDArray[np.bool_]] | None:
    """A plain vault's job whose blobs all checked (``sound``) and are stored raw or as
    lz4 blocks (an lz4 vault's, or incompressible ones): every block decoded (or copied)
    into the worker's ``scratch`` buffer, one after another, and checked against its
    digest, by one call into the core (:func:`~cbt.core._fast.decode_check`: cbt's own
    LZ4 decoder, then the batch BLAKE3 while the blocks are in cache, the GIL released).
    The blocks as views of ``scratch`` (every one checked); None for any other job, or if
    any block fails: the careful path then decodes the job and names the block."""
    if not (len(want) and sound.all()
            and ((codecs == CODEC_NONE) | (codecs == CODEC_LZ4)).all()):
        return None
    ends = np.cumsum(want)
    buf = (scratch or _Scratch()).take(int(ends[-1]))
    bad, _ = fast.decode_check(pack, offs + BLOB.size, offs + lengths,
                               np.ascontiguousarray(codecs, dtype=np.uint8), want, buf,
                               np.ascontiguousarray(job.digests))
    if bad >= 0:
        return None
    bounds = [0, *ends.tolist()]
    return ([buf[a:b] for a, b in itertools.pairwise(bounds)],
            np.ones(len(want), dtype=bool))


def _repeats(job: _Job) -> npt.NDArray[np.bool_] | None:
    """Which blocks of a job are the same blob as the one before them (a block written
    many times over a disk: one blob, so all its copies are in one job, side by side in
    offset order): same offset, length, digest and block length; None if none is."""
    same = job.offsets[1:] == job.offsets[:-1]
    if not same.any():
        return None
    want = np.minimum(job.block_size, job.disk_size - job.blocks.astype(np.int64) * job.block_size)
    same &= ((job.lengths[1:] == job.lengths[:-1]) & (want[1:] == want[:-1])
             & (job.digests[1:] == job.digests[:-1]).all(axis=1))
    return same if same.any() else None


def _inflate_plain(job: _Job, pack: memoryview, packed: npt.NDArray[np.bool_],
                   codecs: npt.NDArray[np.uint8], want: npt.NDArray[np.int64], where: str
                   ) -> tuple[dict[int, bytes | memoryview], npt.NDArray[np.bool_]]:
    """A plain vault's compressed blobs whose headers checked (``packed``; the job's
    ``codecs``): decompressed straight from the pack (no per-blob parse of
    :func:`decode_blob`), and each batch of :data:`INFLATE_BATCH` decompressed by one
    call (:func:`_inflate`) and hashed against its digests at once, while it is in
    cache.  Returns the blocks (by position in the job) and which of them were checked
    (all of them)."""
    checked = np.zeros(len(packed), dtype=bool)
    idx = np.flatnonzero(packed)
    if not len(idx):
        return {}, checked
    starts = job.offsets[idx].astype(np.int64) + BLOB.size
    ends = job.offsets[idx].astype(np.int64) + job.lengths[idx].astype(np.int64)
    sizes = want[idx]
    opened: dict[int, bytes | memoryview] = {}
    got = np.empty((len(idx), fast.DIGEST_SIZE), dtype=np.uint8)
    batches = _inflate(job, pack, idx, starts, ends, sizes, codecs[idx], where)
    for a, batch in zip(range(0, len(idx), INFLATE_BATCH), batches, strict=True):
        b = a + len(batch)
        fast.hash_each(batch, got[a:b])
        opened.update(zip(idx[a:b].tolist(), batch, strict=True))
    wrong = (got != job.digests[idx]).any(axis=1)
    if wrong.any():
        raise DamagedPointError(f"{where.format(int(job.blocks[idx[int(np.argmax(wrong))]]))}: "
                                "content does not match its digest")
    checked[idx] = True
    return opened, checked


# Blocks opened, then hashed, at a time: small enough that the plaintext is
# still in the CPU's cache when it is hashed (one pass over memory, not two).
OPEN_BATCH = 32

# Compressed blocks decompressed by one call (the GIL let go for all of them), then
# hashed at once: about 1 MiB of 16 KiB blocks, still in the CPU's cache when hashed.
INFLATE_BATCH = 64


def _inflate(job: _Job, data: memoryview, idx: npt.NDArray[np.intp],
             starts: npt.NDArray[np.int64], ends: npt.NDArray[np.int64],
             sizes: npt.NDArray[np.int64], codecs: npt.NDArray[np.uint8],
             where: str) -> Iterator[list[bytes | memoryview]]:
    """The blocks ``idx`` of a job, compressed (``codecs``) at ``data[starts:ends]``,
    decompressed by :func:`~cbt.format.pack.decompress_many`, :data:`INFLATE_BATCH` a
    call, yielded batch by batch (to be hashed while in cache); zstd frames are checked
    all at once first (:func:`~cbt.format.pack.exact_frames`).  A payload that fails is
    an error naming its block (the message names it only when there is one to give)."""
    # (decompress_many leaves lz4 blocks out of the zstd call itself; an all-lz4 job needs
    # no frame checked)
    exact = (np.zeros(len(idx), dtype=bool) if (codecs == CODEC_LZ4).all()
             else exact_frames(data, starts, ends, sizes))
    for a in range(0, len(idx), INFLATE_BATCH):
        b = a + INFLATE_BATCH
        try:
            yield decompress_many(data, starts[a:b], ends[a:b], sizes[a:b], exact[a:b],
                                  codecs[a:b])
        except FrameError as exc:
            blk = int(job.blocks[idx[a + exc.item]])
            raise DamagedPointError(f"{where.format(blk)}{exc}") from None


def _open_sealed(cipher: Cipher, id_key: bytes | None, job: _Job, pack: memoryview,
                 sound: npt.NDArray[np.bool_], codecs: npt.NDArray[np.uint8],
                 want: npt.NDArray[np.int64], where: str, scratch: _Scratch
                 ) -> tuple[dict[int, bytes | memoryview], npt.NDArray[np.bool_]]:
    """Open every sealed blob whose header checked (``sound``) into the worker's
    ``scratch`` buffer, and decompress the compressed ones: :func:`decode_blob`'s
    work without its per-blob checks and copies, the one that costs when every
    block of a restore is opened.  Each batch of :data:`OPEN_BATCH` raw blocks is
    hashed against its digests as soon as it is opened (keyed with ``id_key``),
    while it is in cache.  Returns the blocks opened (by position in the job) and
    which of them were checked."""
    payload = job.lengths.astype(np.int64) - BLOB.size - OVERHEAD  # plaintext sizes
    raw = codecs == CODEC_NONE
    # (a raw blob's plaintext is the block: another size fails, named by decode_blob)
    idx = np.flatnonzero(sound & (payload >= 0) & (~raw | (payload == want)))
    checked = np.zeros(len(sound), dtype=bool)
    if not len(idx):
        return {}, checked
    sizes = payload[idx]
    ends = np.cumsum(sizes)
    buf = scratch.take(int(ends[-1]))
    outs = [buf[e - n:e] for e, n in zip(ends.tolist(), sizes.tolist(), strict=True)]
    starts = job.offsets[idx].astype(np.int64) + BLOB.size
    sealed = [pack[a:a + n + OVERHEAD]
              for a, n in zip(starts.tolist(), sizes.tolist(), strict=True)]
    digests = job.digests[idx]
    aads = memoryview(blob_aads(digests, codecs[idx], want[idx]).tobytes())
    k = BLOB_AAD_SIZE
    is_raw = raw[idx]
    got = np.zeros((len(idx), fast.DIGEST_SIZE), dtype=np.uint8)
    for a in range(0, len(idx), OPEN_BATCH):
        b = min(a + OPEN_BATCH, len(idx))
        bad = cipher.open_each_into(sealed[a:b], [aads[j * k:(j + 1) * k] for j in range(a, b)],
                                    outs[a:b])
        if bad >= 0:
            raise DamagedPointError(f"{where.format(int(job.blocks[idx[a + bad]]))}: blob "
                                    "fails authentication")
        hot = np.flatnonzero(is_raw[a:b]) + a
        if len(hot) == b - a:
            fast.hash_each(outs[a:b], got[a:b], id_key)
        elif len(hot):
            part = np.empty((len(hot), fast.DIGEST_SIZE), dtype=np.uint8)
            fast.hash_each([outs[j] for j in hot.tolist()], part, id_key)
            got[hot] = part
    wrong = is_raw & (got != digests).any(axis=1)
    if wrong.any():
        i = int(idx[int(np.argmax(wrong))])
        raise DamagedPointError(f"{where.format(int(job.blocks[i]))}: content does not match "
                                "its digest")
    checked[idx[is_raw]] = True
    return _decompress_opened(job, idx, is_raw, codecs[idx], buf, ends, want, where), checked


def _decompress_opened(job: _Job, idx: npt.NDArray[np.intp], is_raw: npt.NDArray[np.bool_],
                       codecs: npt.NDArray[np.uint8], buf: memoryview, ends: npt.NDArray[np.int64],
                       want: npt.NDArray[np.int64], where: str
                       ) -> dict[int, bytes | memoryview]:
    """The opened blocks by position in the job (block ``j`` of ``idx`` opened into
    ``buf[ends[j - 1]:ends[j]]``): raw ones as they are, compressed ones decompressed
    :data:`INFLATE_BATCH` at a time (checked against their digests later, run by run)."""
    starts = np.r_[0, ends[:-1]].astype(np.int64)
    opened: dict[int, bytes | memoryview] = {
        i: buf[a:b] for i, a, b in zip(idx[is_raw].tolist(), starts[is_raw].tolist(),
                                       ends[is_raw].tolist(), strict=True)}
    packed = np.flatnonzero(~is_raw)
    got = _inflate(job, buf, idx[packed], starts[packed], ends[packed], want[idx[packed]],
                   codecs[packed], where)
    opened.update(zip(idx[packed].tolist(), (v for batch in got for v in batch), strict=True))
    return opened


# Blobs of a job less than this apart are faulted in as one span (one madvise call);
# farther apart, the bytes between them are not read.
SPAN_GAP = 256 << 10


def _spans(job: _Job) -> list[tuple[int, int]]:
    """The byte ranges of the pack holding the job's blobs (sorted by offset), gaps
    under :data:`SPAN_GAP` closed: what a restore reads of the pack."""
    starts = job.offsets.astype(np.int64)
    ends = starts + job.lengths.astype(np.int64)
    cut = np.flatnonzero(starts[1:] - np.maximum.accumulate(ends)[:-1] >= SPAN_GAP) + 1
    firsts, lasts = np.split(starts, cut), np.split(ends, cut)
    return [(int(a.min()), int(b.max())) for a, b in zip(firsts, lasts, strict=True) if len(a)]


def _map_pack(storage: Storage, pack: str, spans: list[tuple[int, int]]) -> Any:
    """Map a pack (or read it, where storage cannot map), from the trash if a gc moved it
    (:func:`~cbt.repo.trash.pack_places`); only ``spans`` of it are read (faulted in) now."""
    *first, last = pack_places(pack)
    for name in first:
        try:
            return storage.map(name, spans)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
    return storage.map(last, spans)


# -- 1. plan --------------------------------------------------------------------


@dataclass
class _Target:
    """Where one disk goes and how."""

    label: str
    final: Path
    write_to: Path  # the temporary name for a new file, else ``final``
    size: int
    block_size: int
    device: bool
    zero_runs: list[tuple[int, int]]  # (first block, count): runs to make read as zeros
    mode: int = 0o600  # of a new file
    zeroed: int = 0
    lock: int | None = None  # an fd holding the temporary file locked while it is written
    # in place, a file: (st_dev, st_ino, size) when it was compared; the blocks that
    # compared equal are not written, so it must be that file, no shorter, to the end
    compared: tuple[int, int, int] | None = None
    qcow2: bool = False  # converted into a new qcow2 file once written and verified


def image_name(point: PointRecord, label: str, ext: str = "img") -> str:
    """``LABEL.img``, the file a disk restores to in the ``--to`` directory; a label that
    is no plain name (a separator, ``..``, what :data:`NAME_RE` refuses) is an error."""
    if not isinstance(label, str) or not NAME_RE.match(label) or "/" in label:
        raise CbtValueError(f"point {point.id} has a disk label that is not a plain name: "
                            f"{label!r}; refusing to restore it")
    return f"{label}.{ext}"


def _check_mode(mode: int) -> int:
    if type(mode) is not int or not 0 <= mode <= 0o777:
        raise CbtValueError(f"invalid mode {mode!r}: give permission bits, 0 to 0o777")
    return mode


def _plan_targets(point: PointRecord, request: RestoreRequest) -> tuple[dict[str, Path],
                                                                         set[Path]]:
    """Label -> target path of every disk to restore, and the directories they are in."""
    to = Path(request.to)
    _check_mode(request.mode)
    ext = "qcow2" if request.format == "qcow2" else "img"
    names = {d.label: image_name(point, d.label, ext) for d in point.disks}
    if request.disk is not None:
        if point.disk(request.disk) is None:
            raise CbtValueError(f"point {point.id} has no disk {request.disk!r} (it has "
                                f"{', '.join(d.label for d in point.disks)})")
        if not to.parent.is_dir():
            raise CbtIOError(errno.ENOENT, f"no such directory for {to}: {to.parent}")
        return {request.disk: to}, {to.parent}
    if to.exists() and not to.is_dir():
        raise CbtIOError(errno.ENOTDIR, f"not a directory: {to} (name one disk with "
                         "--disk LABEL to restore it to a file or device)")
    to.mkdir(parents=True, exist_ok=True)
    return {label: to / name for label, name in names.items()}, {to}


def _check_target(final: Path, label: str, size: int, device: bool,
                  request: RestoreRequest) -> None:
    """Refuse a target that is too small, exists unasked, or is not there to rewrite."""
    if device:
        fd = os.open(final, os.O_RDONLY)
        try:
            have = device_size(fd)
        finally:
            os.close(fd)
        if have < size:
            raise CbtValueError(f"device {final} holds {have} bytes; disk {label} needs {size}")
    elif final.exists() and not (request.force or request.in_place):
        raise CbtIOError(errno.EEXIST, f"target exists: {final} (use --force to replace it, "
                         "or --in-place to rewrite only the blocks that differ)")
    elif request.in_place and not final.is_file():
        raise CbtIOError(errno.ENOENT, f"--in-place needs an existing copy of the disk: {final}")


def _differing_blocks(final: Path, manifest: Manifest, workers: int | None,
                      id_key: bytes | None = None
                      ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """In place: the DATA blocks whose digest (the vault's block id) differs, and the
    blocks to zero (only blocks the target or the manifest holds are looked at)."""
    current = scan(final, manifest.block_size, workers, limit=manifest.disk_size, key=id_key)
    # a block past the target's old end reads as zeros once the file is extended: a hole
    held = current.rows[current.rows < manifest.blocks]
    blocks = union_rows(manifest.rows, held)
    want_digests, want_flags = manifest.at(blocks)
    have_digests, have_flags = current.at(blocks)
    differs = (have_digests != want_digests).any(axis=1)
    is_data = want_flags == fast.FLAG_DATA
    was_nonzero = have_flags == fast.FLAG_DATA
    rows = blocks.astype(np.int64)
    return rows[is_data & differs], rows[~is_data & was_nonzero]


def _check_qcow2_target(final: Path, device: bool) -> None:
    """``--format qcow2`` makes a file: not onto a device, nor onto a pipe, a terminal or
    ``/dev/stdout`` (a qcow2 cannot be streamed; with --force the temporary file would be
    made beside it, in /dev, and renamed over it)."""
    if device:
        raise CbtValueError(f"--format qcow2 makes an image file: {final} is a block device "
                            "(restore it raw)")
    with contextlib.suppress(OSError):
        mode = os.stat(final).st_mode
        if not stat.S_ISREG(mode):
            raise CbtValueError(f"--format qcow2 makes an image file: {final} is not a "
                                "regular file (a qcow2 image cannot be streamed)")


def _plan_target(vault: Vault, index: Index, point_id: str, label: str, manifest: Manifest,
                 final: Path, request: RestoreRequest) -> tuple[_Target, list[_Job]]:
    """Check one disk's target and plan the blocks to write to it and to zero."""
    device = is_block_device(final)
    if request.format == "qcow2":
        _check_qcow2_target(final, device)
    _check_target(final, label, manifest.disk_size, device, request)
    write_to = final
    compared = None
    if request.in_place:
        if not device:
            st = os.stat(final)
            compared = (st.st_dev, st.st_ino, st.st_size)
        rows, zero_rows = _differing_blocks(final, manifest, request.workers, vault.id_key)
        zero_runs = _zero_runs(zero_rows)
    else:
        rows = manifest.data_rows()[0].astype(np.int64)
        zero_runs = []
        if device and not request.assume_zeroed:
            zero_runs = _gaps(rows, manifest.blocks)
        if not device:
            write_to = temp_name(final)
    target = _Target(label, final, write_to, manifest.disk_size, manifest.block_size, device,
                     zero_runs, request.mode, compared=compared,
                     qcow2=request.format == "qcow2")
    jobs = plan_disk(vault.spec(), index, point_id, label, manifest, str(write_to), rows)
    return target, jobs


def plan_disk(vault: VaultSpec, index: Index, point_id: str, label: str,
              manifest: Manifest, target: str,
              rows: npt.NDArray[np.int64] | None = None) -> list[_Job]:
    """One job per pack holding the DATA blocks ``rows`` (default: all) of this disk."""
    if rows is None:
        rows = manifest.data_rows()[0].astype(np.int64)
    digests = manifest.at(rows)[0]
    pos = index.lookup(digests)
    if (pos < 0).any():
        blk = int(rows[np.argmax(pos < 0)])
        raise DamagedPointError(f"point {point_id} disk {label} block {blk}: not in the vault "
                                f"({int((pos < 0).sum())} blocks missing; run cbt verify)")
    at = index.locate(pos)
    packs, offsets = at.pack, at.offset
    # by pack, offset order within each, the packs in the order of their first block on
    # the disk (a pack's number in the index is no order at all: a paged segment numbers
    # packs in digest order): a worker's share of a disk is then one stretch of it
    # (:func:`_balance`), written front to back.  Counted per pack the disk holds, not
    # per pack of the vault: ``cbt mount`` plans every read.
    held, which = np.unique(packs, return_inverse=True)
    first = np.full(len(held), np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first, which, rows)
    order = np.lexsort((offsets, packs, first[which]))
    rows, digests, packs, offsets = rows[order], digests[order], packs[order], offsets[order]
    lengths = blob_length(at.stored[order])
    jobs = []
    bounds = np.nonzero(np.diff(packs.astype(np.int64)))[0] + 1
    step = max(1, JOB_BYTES // manifest.block_size)
    for s, e in zip(np.r_[0, bounds], np.r_[bounds, len(rows)], strict=True):
        for a in range(int(s), int(e), step):  # (a pack of blocks that compress well: parts)
            b = min(a + step, int(e))
            jobs.append(_Job(vault, point_id, label, target, manifest.block_size,
                             index.pack_ids[int(packs[a])], rows[a:b], digests[a:b],
                             offsets[a:b], lengths[a:b], manifest.disk_size))
    return jobs


# A job's blocks, at most (its pack's blocks beyond are the next job's): what a worker holds
# opened at once.  A pack is 8 MiB stored, but blocks that compress 1000:1 (a few bytes
# each, the rest zeros) are 100,000 of them: 6 GiB opened at once, were it one job.
JOB_BYTES = 64 << 20


# -- 2. create, 3. write, 5. finish, 6. commit ----------------------------------


def _create_target(t: _Target) -> None:
    """A new file is created (at its temporary name, held locked: :func:`lock_temp`);
    a file gets the disk's size."""
    if t.device:
        return
    if t.compared is not None:
        fd = os.open(t.write_to, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _check_compared(t, fd, min(t.compared[2], t.size))
        finally:
            os.close(fd)
    if t.write_to != t.final:
        fd = os.open(t.write_to, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, t.mode)  # exactly the mode asked, whatever the umask
            t.lock = lock_temp(fd)
        except BaseException:
            os.close(fd)
            raise
    os.truncate(t.write_to, t.size)


def lock_temp(fd: int) -> int:
    """Hold a temporary file locked (flock) through ``fd`` while it is written: what
    :func:`remove_stale_temps` of another restore checks, whatever its PID namespace or
    host (the name's PID alone cannot say); the lock goes when ``fd`` is closed.  (It
    waits for a cleaner that is looking at the new file: it holds the lock a moment.)"""
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _unlock(t: _Target) -> None:
    if t.lock is not None:
        os.close(t.lock)
        t.lock = None


ISOLATE = True  # (a test that spies on one worker in this process sets it False)


def _forked(work: Callable[[list[_Job], Report], dict[str, tuple[int, int]]],
            groups: list[list[_Job]], report: Callable[[list[int]], None] | None
            ) -> list[dict[str, tuple[int, int]]]:
    """:func:`fork_map` of the workers, a lone one included (``isolate``): packs are
    mapped, and a pack cut short while it is read (by whoever else writes the vault)
    is a SIGBUS, which would kill this process and leave the target half-written.  A
    worker that dies so is a :class:`DamagedPointError` naming the pack it was on."""
    try:
        return fork_map(work, groups, report, isolate=ISOLATE)
    except WorkerError as exc:
        if exc.task is None or exc.span is None:
            raise
        job = groups[exc.task][exc.span[0]]
        raise DamagedPointError(
            f"point {job.point} disk {job.label} block {int(job.blocks[0])} pack {job.pack}: "
            f"cannot be read ({exc}; cut short while it was read?)") from None


def _write(jobs: list[_Job], workers: int | None,
           progress: Callable[[int, int], None] | None,
           storage: Storage) -> dict[str, tuple[int, int]]:
    """Run the pack jobs on forked workers (:func:`_balance`); label -> (written, verified).

    Storage a forked child cannot use (S3: :attr:`Storage.forkable`) gets threads
    instead; storage worth several requests in flight has them shared out to the
    workers, each reading its packs that far ahead."""
    groups = [g for g in _balance(jobs, max(1, min(workers or default_workers(), len(jobs))))
              if g]
    total = sum(int(j.lengths.sum()) for j in jobs)
    report = (lambda done: progress(sum(done), total)) if progress else None
    ahead = -(-storage.in_flight // max(1, len(groups)))  # (1 where in_flight is 1)
    work = functools.partial(_restore_packs, ahead=ahead)
    threads = not storage.forkable
    per_disk: dict[str, tuple[int, int]] = {}
    for stats in (thread_map(work, groups, report) if threads else
                  _forked(work, groups, report)):
        for label, (w, v) in stats.items():
            w0, v0 = per_disk.get(label, (0, 0))
            per_disk[label] = (w0 + w, v0 + v)
    return per_disk


def _balance(jobs: list[_Job], n: int) -> list[list[_Job]]:
    """Share pack jobs out to ``n`` workers: equal bytes, and each file to as few as can be.

    The kernel serialises buffered writes to one file, so two workers writing the same
    file mostly wait for each other: a target that fits in what a worker has left goes
    to it whole (largest first); one that does not is poured into the workers with the
    most room, in pack order (two disks of 1.6 and 0.9 GB on two workers: one takes
    1.25 GB of the first, the other the rest of it and the second).  Work is counted in
    block bytes (what is verified and written), not in stored bytes.
    """
    by_target: dict[str, list[_Job]] = {}
    for job in jobs:
        by_target.setdefault(job.target, []).append(job)

    def size(js: list[_Job]) -> int:
        return sum(len(j.blocks) * j.block_size for j in js)

    quota = -(-size(jobs) // n)
    groups: list[list[_Job]] = [[] for _ in range(n)]
    load = [0] * n
    for target_jobs in sorted(by_target.values(), key=lambda js: -size(js)):
        k = load.index(min(load))
        if load[k] + size(target_jobs) <= quota + quota // 16:  # (slack: packs are lumps)
            groups[k] += target_jobs
            load[k] += size(target_jobs)
            continue
        order = sorted(range(n), key=load.__getitem__)  # most room first
        i = 0
        for job in target_jobs:
            work = len(job.blocks) * job.block_size
            while i < n - 1 and load[order[i]] + work / 2 > quota:  # (nearer the next one)
                i += 1
            groups[order[i]].append(job)
            load[order[i]] += work
    return groups


def _zero_runs(rows: npt.NDArray[np.int64]) -> list[tuple[int, int]]:
    """Consecutive block numbers as (first, count) runs."""
    if len(rows) == 0:
        return []
    breaks = np.nonzero(np.diff(rows) != 1)[0] + 1
    starts = np.r_[0, breaks]
    ends = np.r_[breaks, len(rows)]
    return [(int(rows[s]), int(e - s)) for s, e in zip(starts, ends, strict=True)]


def _gaps(rows: npt.NDArray[np.int64], n: int) -> list[tuple[int, int]]:
    """The (first, count) runs of blocks in ``[0, n)`` that are not in sorted ``rows``."""
    starts = np.r_[0, rows + 1]
    ends = np.r_[rows, n]
    keep = ends > starts
    return [(int(a), int(b - a)) for a, b in zip(starts[keep], ends[keep], strict=True)]


def _check_compared(t: _Target, fd: int, size: int) -> None:
    """An in-place target is still the file compared (``fd`` opened by its path now), and
    at least ``size`` bytes long: else the blocks that compared equal are not there."""
    assert t.compared is not None
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != t.compared[:2]:
        raise CbtIOError(errno.ESTALE, f"{t.final} replaced while it was restored in place: "
                         "another file is there now; restore again")
    if st.st_size < size:
        raise CbtIOError(errno.EIO, f"{t.final} shrank while it was restored in place: it "
                         f"ends at byte {st.st_size}, it had {size} bytes; restore again")


def _finish_target(t: _Target) -> None:
    """Zero what must read as zeros (counted in ``t.zeroed``), fsync."""
    fd = os.open(t.write_to, os.O_WRONLY)
    try:
        if t.compared is not None:
            _check_compared(t, fd, t.size)
        for first, count in t.zero_runs:
            lo = first * t.block_size
            hi = min((first + count) * t.block_size, t.size)
            zero_range(fd, lo, hi - lo, t.device)
            t.zeroed += hi - lo
        fsync_file(fd)
    finally:
        os.close(fd)


def _commit_targets(targets: list[_Target], out_dirs: set[Path], force: bool) -> None:
    """Rename new files into place (replacing a file there only with ``force``), then make
    the renames durable."""
    for t in targets:
        if t.write_to != t.final:
            _rename_into_place(t.write_to, t.final, force)
        _unlock(t)
    for d in out_dirs:
        fsync_dir(d)


def _rename_into_place(tmp: Path, final: Path, force: bool) -> None:
    """``tmp`` becomes ``final``.  Without ``force`` a ``final`` that appeared since the
    target was checked (another restore into this directory committed it) is kept and
    this is an error (the rename never replaces: :func:`rename_noreplace`)."""
    if force:
        os.replace(tmp, final)
        return
    try:
        rename_noreplace(tmp, final)
    except FileExistsError:
        raise CbtIOError(errno.EEXIST, f"target exists: {final} (made by another process "
                         "while this restore ran; use --force to replace it)") from None


# ``.LABEL.img.tmp-PID``: the temporary name (core.durable.temp_name) of a disk restored
# into a directory (``.LABEL.qcow2.tmp-PID`` and its qcow2 ``.LABEL.qcow2.q.tmp-PID``
# with --format qcow2).
_IMAGE_TEMP_RE = re.compile(
    r"^\.[A-Za-z0-9][A-Za-z0-9_-]{0,63}\.(?:img|qcow2(?:\.q)?)\.tmp-([1-9][0-9]{0,9})$")


def qcow2_temp(final: Path) -> Path:
    """Where ``--format qcow2`` converts a disk before its rename: ``.NAME.q.tmp-PID``."""
    return temp_name(final.with_name(final.name + ".q"))


def _convert_qcow2(t: _Target) -> None:
    """The raw file written and verified becomes a sparse qcow2 (``qemu-img convert``),
    compared with it (``qemu-img compare``), fsynced; the raw file is removed and the
    qcow2 is what is renamed into place.  cbt creates the qcow2 file itself (``O_EXCL``,
    never through a link) and gives ``qemu-img`` both files open (``/dev/fd/N``): a link
    planted under the temporary name (in a shared directory) never makes it write
    elsewhere."""
    from cbt.source.qcow2 import qemu_img

    out = qcow2_temp(t.final)
    raw = t.write_to
    src = os.open(raw, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        dst = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                      0o600)
    except BaseException as exc:
        os.close(src)  # (the raw file is still what a failure removes)
        if isinstance(exc, FileExistsError):
            raise CbtError(f"cannot convert {t.final} to qcow2: {out} exists (not made by "
                           "this restore); remove it") from None
        raise
    t.write_to = out  # (from now on, what a failure removes; the raw file goes anyway)
    try:
        fds, raw_at, out_at = (src, dst), f"/dev/fd/{src}", f"/dev/fd/{dst}"
        qemu_img(str(t.final), "convert", "-f", "raw", "-O", "qcow2", raw_at, out_at,
                 timeout=None, fds=fds)
        qemu_img(str(t.final), "compare", "-q", "-f", "raw", "-F", "qcow2", raw_at, out_at,
                 timeout=None, fds=fds)
        os.fchmod(dst, t.mode)
        fsync_file(dst)
    finally:
        os.close(src)
        os.close(dst)
        os.unlink(raw)


def remove_stale_temps(finals: dict[str, Path], one_disk: bool) -> list[str]:
    """Remove what restores killed before their rename left beside these targets: regular
    files (never links) named as cbt names a target's temporary file (in a ``--to``
    directory any ``.LABEL.img.tmp-PID``; beside one ``--disk`` file only its own
    ``.NAME.tmp-PID``) that no restore holds locked (:func:`lock_temp`) and whose process
    is gone, or is this one (in a container each run can have the same PID: the name is
    one of this restore's own, not made yet).  Returns a warning per file removed."""
    removed = []
    own = ({temp_name(final).name for final in finals.values()}
           | {qcow2_temp(final).name for final in finals.values()})
    for final in finals.values():
        pattern = (re.compile(rf"^\.{re.escape(final.name)}(?:\.q)?\.tmp-([1-9][0-9]{{0,9}})$")
                   if one_disk else _IMAGE_TEMP_RE)
        with contextlib.suppress(OSError), os.scandir(final.parent) as entries:
            for entry in entries:
                m = pattern.match(entry.name)
                if m and entry.is_file(follow_symlinks=False) and _remove_if_stale(
                        entry.path, int(m.group(1)), entry.name in own):
                    removed.append(f"removed {entry.path}, left by a restore (process "
                                   f"{m.group(1)}) that did not finish")
        if not one_disk:
            break  # one directory, every name matched at once
    return removed


def _remove_if_stale(path: str, pid: int, own: bool) -> bool:
    """Unlink the temporary file ``path`` (named with ``pid``) if no restore holds it
    locked and its process is gone (or it is ``own``); whether it was."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return False
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held: a live restore's (OSError)
        if not (own and pid == os.getpid()) and pid_alive(pid):
            return False
        now = os.stat(path, follow_symlinks=False)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            return False  # replaced meanwhile
        os.unlink(path)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _discard_targets(targets: list[_Target]) -> None:
    """After a failure: remove every new file not yet renamed into place."""
    for t in targets:
        if t.write_to != t.final:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(t.write_to)
        _unlock(t)


def restore(vault: Vault, request: RestoreRequest) -> RestoreResult:
    """Restore point ``request.point``: every disk as ``to/LABEL.img``, or one ``disk`` to ``to``.

    ``to`` may be a block device when ``disk`` is given.  With ``instant`` this
    is :func:`instant_restore`.  The steps are the module's.
    """
    request.check_format()
    if request.instant:
        return instant_restore(vault, request)
    started = time.perf_counter()
    point = vault.point(request.point)
    finals, out_dirs = _plan_targets(point, request)
    warnings = remove_stale_temps(finals, request.disk is not None)
    manifests = {label: vault.resolve(point, label) for label in finals}
    loaded: list[str] = []

    def load(exclude: dict[str, str]) -> Index:
        loaded.clear()
        return vault.load_index(loaded, headers=True, exclude=exclude)  # (blocks are checked)

    def plan(index: Index) -> list[tuple[_Target, list[_Job]]]:
        return [_plan_target(vault, index, point.id, label, manifests[label], final, request)
                for label, final in finals.items()]

    planned = skipping_damaged(load, plan)  # (a damaged index page: its segment set aside)
    warnings += loaded
    targets: list[_Target] = []
    jobs: list[_Job] = []
    try:
        for target, disk_jobs in planned:
            targets.append(target)
            jobs += disk_jobs
            _create_target(target)
        written = _write(jobs, request.workers, request.progress, vault.storage)
        for t in targets:
            _finish_target(t)
            if t.qcow2:
                _convert_qcow2(t)
        _commit_targets(targets, out_dirs, request.force)
    except BaseException:
        _discard_targets(targets)
        raise
    disks = []
    for t in targets:
        w, v = written.get(t.label, (0, 0))
        disks.append(RestoredDisk(t.label, str(t.final), t.size, w + t.zeroed, v))
    return RestoreResult(point.id, disks, round(time.perf_counter() - started, 6), warnings)


# -- instant restore --------------------------------------------------------------


def instant_restore(vault: Vault, request: RestoreRequest) -> RestoreResult:
    """Restore from the point's kept snapshots where there are some, else from the vault.

    See the module doc; ``request.verify_snapshot`` off skips the re-hash.  Of
    the request's options, a disk restored from the vault uses ``force`` and
    ``workers``.
    """
    started = time.perf_counter()
    point = vault.point(request.point)
    disk = request.disk
    if disk is not None and point.disk(disk) is None:
        raise CbtValueError(f"point {point.id} has no disk {disk!r}")
    _check_mode(request.mode)
    names = {d.label: image_name(point, d.label) for d in point.disks}
    entry = kept_snapshots(vault).get(point.id)
    kept = entry.disks if entry is not None and entry.vm == point.vm else {}
    to = Path(request.to)
    if disk is None:
        to.mkdir(parents=True, exist_ok=True)
    labels = [disk] if disk is not None else [d.label for d in point.disks]
    finals = {label: to if disk is not None else to / names[label] for label in labels}
    disks: list[RestoredDisk] = []
    warnings = remove_stale_temps(finals, disk is not None)
    for label, final in finals.items():
        disks.append(_instant_disk(vault, point, label, kept.get(label), final, request,
                                   warnings))
    return RestoreResult(point.id, disks, round(time.perf_counter() - started, 6), warnings)


def _instant_disk(vault: Vault, point: PointRecord, label: str, snap: str | None,
                  final: Path, request: RestoreRequest, warnings: list[str]) -> RestoredDisk:
    """One disk: from its kept snapshot (1. plan) when that works, else from the vault."""
    if snap and not is_snapshot_file(snap, point.vm):
        # the registry is read from the vault: a path that is no snapshot of this VM
        # (a crafted entry naming any host file) is never read
        warnings.append(f"disk {label}: the kept snapshot's path {snap!r} is not a snapshot "
                        "of this VM; restoring from the vault")
        snap = None
    if snap and os.path.exists(snap):
        if final.exists() and not request.force:
            raise CbtIOError(errno.EEXIST, f"target exists: {final} (use --force)")
        try:
            return _from_snapshot(vault, point, label, snap, final, request)
        except (CbtError, OSError) as exc:
            warnings.append(f"disk {label}: instant restore from the snapshot failed "
                            f"({exc}); restoring from the vault")
    elif snap:
        warnings.append(f"disk {label}: kept snapshot {snap} is gone; restoring from the "
                        "vault")
    r = restore(vault, RestoreRequest(point.id, final, disk=label, force=request.force,
                                      workers=request.workers, mode=request.mode))
    warnings += r.warnings
    return replace(r.disks[0], source="vault")


def _from_snapshot(vault: Vault, point: PointRecord, label: str, snap: str, final: Path,
                   request: RestoreRequest) -> RestoredDisk:
    """2. clone, 3. verify, 4. commit one disk's snapshot; the clone is removed on failure."""
    tmp = temp_name(final)
    lock: int | None = None
    try:
        try:
            reflink(snap, str(tmp))
            how = "reflink"
        except OSError:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
            how = "copy"
        lock = lock_temp(os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC))
        if how == "copy":
            copy_sparse(snap, tmp)
        os.chmod(tmp, request.mode)
        manifest = vault.resolve(point, label)
        verify = request.verify_snapshot
        if verify:
            got = scan(tmp, manifest.block_size, request.workers, key=vault.id_key)
            if got.disk_size != manifest.disk_size or changed_blocks(got, manifest):
                raise DamagedPointError(f"kept snapshot {snap} does not match point "
                                        f"{point.id} disk {label}")
        fd = os.open(tmp, os.O_RDONLY)
        try:
            fsync_file(fd)
        finally:
            os.close(fd)
        _rename_into_place(tmp, final, request.force)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    finally:
        if lock is not None:
            os.close(lock)
    fsync_dir(final.parent)
    return RestoredDisk(label, str(final), manifest.disk_size,
                        0 if how == "reflink" else manifest.disk_size,
                        manifest.blocks if verify else 0,
                        f"snapshot ({how}{', verified' if verify else ', not verified'})")

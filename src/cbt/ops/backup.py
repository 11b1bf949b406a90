"""Backup: one recovery point of a VM's disks, sending only blocks the vault lacks.

A :class:`BackupRequest` says what to back up and how; :func:`backup` runs it:

1. Lock: take the VM's lock and share the vault with other backups
   (:func:`backup`, :mod:`cbt.repo.lock`; a job holding them calls
   :func:`backup_locked`) and remove what a killed run left (temporary
   files, manifests of points never committed) when it is older than every
   live holder of the vault (so never what another running backup writes).
   Packs a killed run finished stay: the index picks them up from their
   trailers, so their blocks are not sent again (resume, not restart).
2. Plan (:func:`plan`): load the index; open every disk as a block source
   (errors now, before any work), fix its block size (a disk keeps the block
   size of its first backup), find its previous point and its data extents;
   choose its change hint (:func:`_choose_hint`: ``--full-scan``, a hint
   file, the snapshots' change source, else a hash scan; a first backup or a
   resized disk is always hash-scanned).  A hash-scanned disk reads every
   allocated block (taking the digests of an early scan that covers it); a
   tracked disk reads only the hint's blocks, those its previous point held
   as holes, and a rotating sample of the rest (:func:`sample_mask`); its
   other blocks keep their previous digests.  Cut the blocks read into
   shards of about equal bytes (:func:`cbt.source.plan.plan_shards`), or,
   after an early scan, of about equal work: what changed (:func:`_row_costs`).
3b. Verify (:func:`verify_hints`): a sample block that differs from the
   previous point means the source lied: the disk is hash-scanned in the
   same run (the rest of its blocks read now), and the point says so.
3. Transfer (:func:`transfer`): one worker per shard, forked or on any
   ``concurrent.futures.Executor``.  A worker is handed the vault's spec (its
   keys included: no passphrase, no key derivation) and the run's index
   (:class:`WorkerVault`), reopens its disk from the source's spec, runs the
   one hash loop (:func:`cbt.source.read.hash_shard`), looks each window's
   digests up in the index in one vectorised call, and copies the missing
   blocks (a disk read live: hashed again, all at once, so what is stored is
   what its digest says); a few threads of the worker's own compress (and seal)
   them in runs (:class:`_PackSink`: zstd releases the GIL, so a shard left
   alone with new blocks uses every core), and they are appended in order to
   packs of a few MiB that a thread of its own writes durably as they fill.
   On a :class:`PlacedExecutor` (a Dask cluster) each
   disk's shards run on the workers of its host (``BackupRequest.hosts``; none:
   the coordinator's), which also open and map a disk of another host for the
   plan; a host no worker serves fails the run before anything is written.  The
   early scan is not used there: its digests live in the coordinator's shared
   memory, which only forked workers see.  What a worker sends back is input
   (:func:`check_result`): the shard's own, one digest and flag per block, only
   blocks it read stored; what a worker of another host says of its disk too
   (:func:`_checked_disk`).
4. Commit (:func:`commit`): assemble each disk's manifest; count the blocks
   that differ from the disk's previous point (``cbt diff`` rules); write a
   full manifest (first backup) or a delta against the skip-chain base (see
   ``vault.points``); then, under the gc lock, an index segment for the new
   packs (one entry per digest, however many workers raced to store it) and
   the point record: its rename is the commit.  Before it, every pack the new
   entries name is stat'ed (there, and long enough: :func:`_check_packs`) and
   every DATA block read must be in the index or stored now (:func:`_check_held`):
   no point names a block the vault lacks, whatever a worker claimed.  A crash
   anywhere before leaves earlier points untouched.

In an encrypted vault a block's id (its digest everywhere: manifests, index,
packs) is its keyed BLAKE3 under the vault's id key, also when a block read
live is hashed again as it is copied; every blob is sealed as it is packed
(:class:`~cbt.format.pack.PackWriter` with the vault's cipher), and the
manifests, index segments and point record are sealed under the vault's
names (``vault.manifest_name``, ``segment_name``, ``point_name``).  A
manifest's checksum in the point record is of the bytes stored.
"""

from __future__ import annotations

import abc
import bisect
import dataclasses
import errno
import functools
import math
import mmap
import os
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor, as_completed
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from cbt.core.crypto import Cipher
from cbt.core.durable import prepare_crash_counter
from cbt.core.errors import CbtError, CbtIOError, CbtValueError
from cbt.core.native import fast
from cbt.core.parallel import Report, WorkerError, fork_map
from cbt.core.sizes import format_size
from cbt.core.timefmt import utc_now
from cbt.format.manifest import Manifest, range_rows
from cbt.format.manifest import row_runs as manifest_row_runs
from cbt.format.pack import (
    CODEC_ZSTD,
    TARGET_PACK_SIZE,
    Coded,
    PackWriter,
    encode_blocks,
    pack_name,
)
from cbt.format.records import DiskRecord, PointRecord, check_name
from cbt.ops.diff import changed_blocks
from cbt.repo import index as index_mod
from cbt.repo import segments
from cbt.repo.lock import (
    check_held,
    commit_point,
    gc_lock,
    objects_before,
    shared_lock,
    vm_lock,
)
from cbt.repo.storage import Storage, StorageSpec
from cbt.repo.uploader import Uploader, shared_uploader
from cbt.repo.vault import Vault, VaultSpec
from cbt.source.base import SourceSpec, Window
from cbt.source.changes import (
    DEFAULT_VERIFY_FRACTION,
    ChangeHint,
    TrackingBase,
    read_hint_file,
)
from cbt.source.disks import DiskSpec
from cbt.source.image import explain_death, open_source
from cbt.source.plan import (
    BlockRange,
    DiskPlan,
    Shard,
    bytes_to_read,
    default_workers,
    plan_shards,
    split_ranges_at,
)
from cbt.source.read import hash_shard
from cbt.source.scan import BlockScan, PendingScan

# Default block size of a disk's first backup, chosen by bench/block_size.py: on a
# database-like file with 1% of its 4 KiB pages rewritten, 16K blocks store 3.3x
# less than 64K (and 4K only 3.5x less again, at 4x the metadata and twice the scan
# time); on a file-system image changed in longer runs 16K stores the same as 64K.
DEFAULT_BACKUP_BLOCK_SIZE = 16 << 10
COMPACT_STEPS = 8  # compactions after a commit at most (each merges a crowded tier)
PACKS_IN_FLIGHT = 2  # full packs of a worker queued for its writing thread
EARLY_SCAN_MAX_WAIT = 1.0  # seconds waited for the lock after which an early scan is dropped
# shards per worker on an Executor: more shards than workers, so progress moves as they finish
EXECUTOR_SHARDS_PER_WORKER = 4
# shards per worker of a cluster (a PlacedExecutor): one, as bench/dask_backup.py found
# (2 worker processes, 128 MiB to an S3 vault, Dask over the built-in workers: 0.93-1.06x
# with one shard a worker, 1.04-1.19x with two, 1.16-1.34x with four: each shard ends
# with a part-filled pack, one more PUT, and waits on its own round trips)
CLUSTER_SHARDS_PER_WORKER = 1
PREFETCH_AHEAD = 32 << 20  # bytes of a shard asked of the kernel ahead of its reader
BATCH_BLOCKS, BATCH_BYTES = 4096, 32 << 20  # windows a shard looks up in one call
SAMPLE_RUN = 256 << 10  # bytes: the verification sample is taken in runs this long
PICK_BYTES = 4 << 20  # new blocks copied at once, before they are handed to the sink
CODE_RUN = 64  # blocks a coding thread compresses (and seals) in one task
# coding threads of a shard: up to one per core, but at most this many (a machine of many
# cores runs as many shards: a lone shard left with new blocks takes 4 cores, not 1)
CODE_THREADS = 4
CODE_RUNS_IN_FLIGHT = 2  # runs per coding thread queued or coded, not yet appended

_T = TypeVar("_T")

# (vm, label, bytes_done, bytes_total) a few times a second
BackupProgress = Callable[[str, str, int, int], None]


class PlacedExecutor(Executor):
    """An Executor whose tasks can be pinned to a host: a cluster's (a Dask client's,
    :mod:`cbt.jobs.dask_executor`).

    A disk's shards run where its host is served (``BackupRequest.hosts``; no host: the
    coordinator's own host).  Such a worker reopens the disk there, and writes its packs
    straight to the vault's storage; what comes back is its digests and index entries.
    """

    @abc.abstractmethod
    def on(self, host: str | None) -> tuple[Executor, int]:
        """The executor whose tasks run on ``host`` (None: the coordinator's host), and
        how many workers serve it; :class:`CbtValueError` naming the host when none does."""

    def release(self) -> None:  # (a hook: nothing to release by default)
        """The run is over (done or failed): its workers drop what it handed them (the
        vault's spec, its keys among them: :func:`forget_runs`)."""


@dataclass(frozen=True)
class BackupRequest:
    """What to back up, and how: everything :func:`backup` needs to know.

    ``block_size`` applies to a disk's first backup (later ones keep it);
    ``workers`` defaults to one per core; ``wait`` is how long to wait for the
    VM's lock and for the vault (each); ``executor`` runs the shards instead of forked workers;
    ``early`` is a scan of the disks started beforehand
    (:func:`cbt.ops.early_scan.start_early_scan`).  The last three fields are
    for a caller that holds the locks (a job, :func:`backup_locked`):
    the point's id, warnings so far, and ``before_commit``, run when every disk
    is read, whose warnings go into the point (a job's post hook after a live
    read).  With ``ignore_stop_signals`` forked workers ignore SIGTERM and
    SIGINT, so a daemon's job in flight finishes.
    """

    vm: str
    disks: Sequence[DiskSpec]
    block_size: int | None = None
    workers: int | None = None
    progress: BackupProgress | None = None
    wait: float = 0.0
    created: str | None = None
    consistency: tuple[str, str] = ("crash", "live read")
    executor: Executor | None = None
    slot: str | None = None
    early: PendingScan | None = None
    point_id: str | None = None
    warnings: Sequence[str] = ()
    before_commit: Callable[[], list[str]] | None = None
    ignore_stop_signals: bool = False  # forked workers ignore SIGTERM/SIGINT (a daemon's job)
    # change tracking (cbt.source.changes): ``full_scan`` hashes every allocated block;
    # ``hints`` are hint files by disk label (``--changed-ranges``); ``changes`` asks the
    # snapshots what changed in a disk (label, its previous record or None, block size,
    # size now); ``settle`` runs after ``before_commit`` and names each kept tracking base
    full_scan: bool = False
    verify_fraction: float = DEFAULT_VERIFY_FRACTION
    hints: Mapping[str, str] = field(default_factory=dict)
    changes: Callable[[str, DiskRecord | None, int, int], ChangeHint] | None = None
    settle: Callable[[], Mapping[str, TrackingBase]] | None = None
    # the host of each disk (label -> host; absent: the coordinator's): its shards run
    # there, on a PlacedExecutor's workers
    hosts: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "disks", tuple(self.disks))
        object.__setattr__(self, "warnings", tuple(self.warnings))

    def check(self) -> None:
        """Names, labels and block size, before anything runs."""
        check_name("VM name", self.vm)
        if not self.disks:
            raise CbtValueError("no disks to back up")
        labels = [d.label for d in self.disks]
        for label in labels:
            check_name("disk label", label)
        if len(set(labels)) != len(labels):
            raise CbtValueError(f"two disks share a label: {labels}")
        if self.block_size is not None:
            fast.check_block_size(self.block_size)
        unknown = sorted(set(self.hints) - set(labels))
        if unknown:
            raise CbtValueError(f"changed ranges for {unknown[0]!r}, which is not a disk of "
                                f"this backup ({', '.join(labels)})")
        if not 0.0 <= self.verify_fraction <= 1.0:
            raise CbtValueError(f"verify fraction {self.verify_fraction} is not between 0 and 1")
        unknown = sorted(set(self.hosts) - set(labels))
        if unknown:
            raise CbtValueError(f"a host for {unknown[0]!r}, which is not a disk of this "
                                f"backup ({', '.join(labels)})")
        if self.hosts and not isinstance(self.executor, PlacedExecutor):
            label, host = next(iter(self.hosts.items()))
            raise CbtValueError(f"disk {label} is on host {host}: its backup runs on a Dask "
                                "cluster's workers there (--executor dask://HOST:PORT)")


def backup(vault: Vault, request: BackupRequest) -> PointRecord:
    """Back up the request's disks into ``vault``; returns the committed point.

    Takes the VM's lock, then shares the vault with other backups
    (:mod:`cbt.repo.lock`), waiting up to ``request.wait`` seconds for each.
    """
    early = request.early
    try:
        request.check()
        prepare_crash_counter()
        asked = time.monotonic()
        with vm_lock(vault, request.vm, request.wait), \
                shared_lock(vault.storage, request.wait, reveal_command=not vault.encrypted):
            if early is not None and time.monotonic() - asked > EARLY_SCAN_MAX_WAIT:
                early.cancel()  # it saw the disks too long before the point was taken
                request = dataclasses.replace(request, early=None)
            images, warnings = _offline_images(request)
            request = dataclasses.replace(request, warnings=(*request.warnings, *warnings))
            if images:
                return _backup_offline(vault, request, images)
            return backup_locked(vault, request)
    finally:
        if early is not None:
            early.cancel()


def _offline_images(request: BackupRequest) -> tuple[dict[str, str], list[str]]:
    """The disks that are qcow2 images read where they lie (label -> path): each is read
    through ``qemu-nbd`` as the guest sees it (:mod:`cbt.source.qcow2`); and a warning for
    each disk that starts with a qcow2 header but is not named so (read raw).  A disk of
    another host (``request.hosts``) is never looked at here: its path names a file there,
    not the one this host may have at that path (:func:`_open_disk_there`)."""
    from cbt.source.qcow2 import is_qcow2, unnamed_qcow2_warnings

    files = {d.label: d.path for d in request.disks
             if d.nbd is None and d.read_from is None and d.label not in request.hosts}
    return ({lb: p for lb, p in files.items() if is_qcow2(p)},
            unnamed_qcow2_warnings(files))


def _backup_offline(vault: Vault, request: BackupRequest,
                    images: Mapping[str, str]) -> PointRecord:
    """:func:`backup_locked` with the offline qcow2 ``images`` served by ``qemu-nbd`` and
    tracked by their bitmaps: the point's id is chosen first (it names the new bitmap);
    the bitmaps settle after the commit (or are merged back on failure)."""
    from cbt.source.qcow2 import open_offline
    from cbt.source.qemu import scope_of

    created = request.created or utc_now()
    point_id = request.point_id or vault.unused_point_id(request.vm, created)
    prev = vault.latest(request.vm)
    scope = scope_of(str(vault.config["id"]), request.vm)
    with open_offline(images, point_id, prev.id if prev else None, scope) as offline:
        consistency = request.consistency
        if len(images) == len(request.disks) and consistency == ("crash", "live read"):
            consistency = offline.consistency
        point = backup_locked(vault, dataclasses.replace(
            request, disks=offline.specs(list(request.disks)), created=created,
            point_id=point_id, consistency=consistency,
            changes=offline.changes(request.changes)))
        offline.commit()
    return point


def backup_locked(vault: Vault, request: BackupRequest) -> PointRecord:
    """:func:`backup` for a caller that already holds the VM's lock and shares the vault
    (a job)."""
    started = time.perf_counter()
    request.check()
    placed = placements(request)  # (before anything is written: a disk no worker serves)
    _clean_leftovers(vault)
    try:
        planned = plan(vault, request, placed)
        results = transfer(vault, request, planned)
        _fill(planned.disks, planned.shards, results)
        results += verify_hints(vault, request, planned)
    finally:
        if isinstance(request.executor, PlacedExecutor):
            request.executor.release()
    if request.before_commit is not None:
        planned.warnings += request.before_commit()
    # (last before the commit: a base kept now names what this point was made from)
    tracking = dict(request.settle()) if request.settle is not None else {}
    return commit(vault, request, planned, results, started, tracking)


def _clean_leftovers(vault: Vault) -> None:
    """Remove what killed runs left: only what is older than every live holder of the
    vault (this run among them), so never what another running backup is writing; in
    the storage's clock (an S3 server's: :meth:`~cbt.repo.storage.Storage.clock_offset`)."""
    before = objects_before(vault.storage)
    if before > 0.0:
        vault.clean_leftovers(vault.leftovers(before=before + vault.storage.clock_offset()))


# -- 2. plan ---------------------------------------------------------------------------


@dataclass
class PlannedDisk:
    """One disk of the run: what is read, and (after the transfer) what was found."""

    spec: DiskSpec
    source: SourceSpec
    block_size: int
    parent: DiskRecord | None
    seq: int
    ranges: list[BlockRange]
    # one row per block of ``ranges`` (the blocks read), in block order: holes cost nothing
    rows: npt.NDArray[np.uint64]
    digests: npt.NDArray[np.uint8]
    flags: npt.NDArray[np.uint8]
    early: BlockScan | None = None  # the disk's early scan, when one matches
    host: str | None = None  # the host that holds it (None: this one)
    # change tracking: what the source said, and what the run found of it
    hint: ChangeHint = field(default_factory=ChangeHint.hash)
    previous: Manifest | None = None  # the disk's manifest at the point this run follows
    tracked: TrackedRows | None = None  # a tracked disk's rows (None: every block read)
    verified_blocks: int = 0
    hint_mismatches: int = 0
    read_before: int = 0  # bytes read by an earlier pass of this run (a hint that lied)
    bytes_read: int = 0
    bytes_new: int = 0  # of the blocks this run stored: their raw and stored bytes
    bytes_stored: int = 0
    seconds: float = 0.0

    @property
    def size(self) -> int:
        return self.source.size

    @property
    def to_read(self) -> int:
        return bytes_to_read(self.ranges, self.block_size, self.size)

    @property
    def change_source(self) -> str:
        return self.hint.source


@dataclass
class TrackedRows:
    """A tracked disk's allocated blocks: those read, and where the rest come from.

    ``alloc``: every allocated block (the manifest's rows); ``read``: which of them
    this run reads (the hint's ranges, the verification sample, and any block the
    previous point holds no row for); ``prev_pos``: each block's row in the
    previous manifest (meaningful where it holds one); ``sample``: positions in
    the rows read of the blocks the source called unchanged, re-hashed as a check.
    """

    alloc: npt.NDArray[np.uint64]
    read: npt.NDArray[np.bool_]
    prev_pos: npt.NDArray[np.intp]
    sample: npt.NDArray[np.intp]


@dataclass(frozen=True)
class ShardTask:
    """One worker's share of one disk: picklable, so any Executor can run it."""

    disk: int  # position in the run's disk list
    label: str
    source: SourceSpec  # what to read (the snapshot, or the disk itself)
    block_size: int
    ranges: list[BlockRange]
    # the shard's rows of the digests and flags of an early scan (shared memory, so
    # only for forked workers): the shard then hashes nothing and reads only new blocks
    prehash: tuple[memoryview, memoryview] | None = None
    disk_path: str = ""  # the disk itself (``source`` may be a snapshot of it)

    @property
    def blocks(self) -> int:
        return sum(hi - lo for lo, hi in self.ranges)

    @property
    def key(self) -> str:
        """The shard's identity, echoed by its result (one for another shard is refused)."""
        import blake3

        return blake3.blake3(repr((self.disk, self.label, self.block_size,
                                   self.ranges)).encode()).hexdigest()[:32]

    @property
    def name(self) -> str:
        """The disk in messages: its label, and its path where a snapshot of it is read."""
        path = self.disk_path
        return self.label if not path or path == self.source.path else f"{self.label} ({path})"


@dataclass
class Plan:
    """The run's plan: the index it deduplicates against, its disks and shards."""

    index: index_mod.Index
    prev: PointRecord | None
    disks: list[PlannedDisk]
    shards: list[ShardTask]
    warnings: list[str] = field(default_factory=list)
    # each disk's executor and its worker count, on a PlacedExecutor (else empty)
    placed: list[tuple[Executor, int]] = field(default_factory=list)


def placements(request: BackupRequest) -> list[tuple[Executor, int]]:
    """On a PlacedExecutor, each disk's executor (the workers of its host) and how many
    workers it has; a host no worker serves fails here, before anything is written."""
    executor = request.executor
    if not isinstance(executor, PlacedExecutor):
        return []
    on: dict[str | None, tuple[Executor, int]] = {}
    out = []
    for spec in request.disks:
        host = request.hosts.get(spec.label)
        if host not in on:
            try:
                on[host] = executor.on(host)
            except CbtValueError as exc:
                raise CbtValueError(f"disk {spec.label}: {exc}") from None
        out.append(on[host])
    return out


def plan(vault: Vault, request: BackupRequest,
         placed: list[tuple[Executor, int]] | None = None) -> Plan:
    """Load the index, open and map every disk, take the early scan, cut shards."""
    placed = placements(request) if placed is None else placed
    warnings = list(request.warnings)
    index = vault.load_index(warnings)
    prev = _latest_healthy(vault, request.vm, warnings)
    lost = (_newer_point_lost(vault, request.vm, prev, len(warnings) > len(request.warnings))
            if (request.hints or request.changes is not None) and not request.full_scan
            else None)
    disks = [_plan_disk(vault, request, prev, spec, warnings, lost,
                        placed[k][0] if placed and spec.label in request.hosts else None)
             for k, spec in enumerate(request.disks)]
    early = request.early
    if early is not None:
        # (its results live in shared memory: forked workers only; and its digests must
        # be the vault's block ids: keyed BLAKE3 in an encrypted vault)
        if request.executor is None and early.key == vault.id_key:
            _take_early_scan(early, disks, request)
        early.cancel()
    shards = _cut(disks, range(len(disks)), request, placed)
    return Plan(index, prev, disks, [_shard_task(disks[s.disk], s) for s in shards], warnings,
                placed)


def _cut(disks: list[PlannedDisk], which: Sequence[int], request: BackupRequest,
         placed: list[tuple[Executor, int]]) -> list[Shard]:
    """Shards of about equal work (:func:`_row_costs`) of the disks ``which``: as many as
    the workers (forked), a few per worker on an Executor, and on a PlacedExecutor one per
    worker of each disk's host; in disk order."""
    groups: dict[int, list[int]] = {}
    for k in which:
        groups.setdefault(id(placed[k][0]) if placed else 0, []).append(k)
    workers = request.workers or default_workers()
    if request.executor is not None:
        workers *= EXECUTOR_SHARDS_PER_WORKER
    out: list[Shard] = []
    for ks in groups.values():
        parts = placed[ks[0]][1] * CLUSTER_SHARDS_PER_WORKER if placed else workers
        if not any(disks[k].early is not None for k in ks):  # (work follows bytes read)
            cut = plan_shards([DiskPlan(disks[k].ranges, disks[k].block_size, disks[k].size)
                               for k in ks], parts)
            out += [s._replace(disk=ks[s.disk]) for s in cut]
            continue
        costs = [np.cumsum(_row_costs(disks[k])) for k in ks]
        quota = max(1, -(-sum(int(c[-1]) for c in costs if len(c)) // max(1, parts)))
        for k, cum in zip(ks, costs, strict=True):
            total = int(cum[-1]) if len(cum) else 0
            pieces = max(1, -(-total // quota))
            # each piece's first row: where the running cost passes its share
            cuts = np.searchsorted(cum, total * np.arange(1, pieces) // pieces, side="right")
            got = split_ranges_at(disks[k].ranges, cuts.tolist()) or [[]]
            out += [Shard(k, r) for r in got]
    return sorted(out, key=lambda s: s.disk)


# What a block costs its worker, in bytes read and hashed (BLAKE3 runs at about 5 GB/s a
# core, lz4 at 0.5 and zstd at 0.3): a new block is read, compressed and stored, about
# twelve times the work of hashing it; a block an early scan hashed costs almost nothing
# unless it changed.  Cut by bytes read, an incremental whose changes sit in one disk
# (the ext4db set: a database rewritten by a VACUUM beside a file system image changed
# here and there) left one worker compressing them all while the other was done.
COST_NEW, COST_KNOWN = 12, 1 / 32


def _row_costs(d: PlannedDisk) -> npt.NDArray[np.int64]:
    """The work of each row of ``d`` (see :data:`COST_NEW`)."""
    n, bs = len(d.rows), d.block_size
    if d.early is None or d.previous is None:  # read and hashed; new if there is no past
        each = bs * (1 + COST_NEW) if d.previous is None or d.tracked is not None else bs
        return np.full(n, each, dtype=np.int64)
    return np.where(_changed_rows(d, d.early, d.previous), bs * COST_NEW,
                    int(bs * COST_KNOWN)).astype(np.int64)


def _changed_rows(d: PlannedDisk, early: BlockScan, previous: Manifest) -> npt.NDArray[np.bool_]:
    """Which rows of ``d`` the early scan found changed since ``previous`` (a block the
    previous manifest does not hold was a hole: its digest is zeros, as a zero block's)."""
    n = len(d.rows)
    words = fast.DIGEST_SIZE // 8  # (a disk with no data: zero rows of 4 words)
    now = np.frombuffer(early.digests, np.uint64, n * words).reshape(n, words)
    before = np.zeros_like(now)
    if len(previous.rows):
        at = np.minimum(np.searchsorted(previous.rows, d.rows), len(previous.rows) - 1)
        held = previous.rows[at] == d.rows
        before[held] = previous.row_digests[at[held]].view(np.uint64)
    changed: npt.NDArray[np.bool_] = (now != before).any(axis=1)
    return changed


def _latest_healthy(vault: Vault, vm: str, warnings: list[str]) -> PointRecord | None:
    """The VM's latest point that can be read; damaged records (and points based on them)
    are passed over, and said so."""
    damage: list[str] = []
    prev = vault.latest(vm, damage)
    if damage:
        warnings += damage
        warnings.append(f"backing up against {prev.id}, the latest point of VM {vm} that can "
                        "be read" if prev is not None else
                        f"no point of VM {vm} can be read: taking a full baseline")
    return prev


def _newer_point_lost(vault: Vault, vm: str, prev: PointRecord | None,
                      damage: bool) -> str | None:
    """Why no change hint may be used against ``prev``: a point of the VM was committed
    after it, so what a source says changed since the disk's latest point says nothing
    of the changes between ``prev`` and that one.  That point is based on ``prev`` but
    created before it (``--now``, a clock set back), or was forgotten (``cbt forget``
    keeps the newest point it removes as a hidden record until a newer point exists),
    or is lost (its record damaged, or moved to ``quarantine/`` by ``verify --repair``).
    None: ``prev`` is the last point committed.  A lost record's point is known by its
    name (unencrypted vault), else by its file's time against ``prev``'s record."""
    import re

    from cbt.format.records import id_order, is_point_id

    if prev is None:
        return None
    records, damaged = vault.scan_records()
    gone = [r.id for r in records if r.vm == vm and r.hidden
            and (r.created, id_order(r.id)) > (prev.created, id_order(prev.id))]
    if gone:  # (cbt forget keeps the newest point it removes hidden until the next backup)
        return (f"point {gone[-1]}, newer than {prev.id}, was forgotten: what the change "
                "source says changed since the disk's latest point cannot be used")
    after = [r.id for r in records if r.parent == prev.id]
    if after:
        return (f"point {after[0]} was committed after {prev.id} (created before it): what "
                "the change source says changed since the disk's latest point cannot be used")
    quarantined = vault.storage.list("quarantine/points")
    if not (damage or quarantined):
        return None
    try:
        since = vault.storage.stat(vault.point_name(prev.id)).mtime
    except OSError:
        since = -math.inf  # (every record that hides its point counts as newer)
    newer = [r.id for r in records if r.vm == vm and not r.hidden
             and (r.created, id_order(r.id)) > (prev.created, id_order(prev.id))]
    for name in [d.name for d in damaged] + quarantined:
        leaf = re.sub(r"\.json(\.[0-9]+)?$", "", name.rsplit("/", 1)[-1])  # (set aside: .N)
        if vault.keys is None and is_point_id(leaf):
            if leaf.startswith(vm + ".") and id_order(leaf) > id_order(prev.id):
                newer.append(leaf)
            continue
        try:  # (a name that hides its point: by the file's time)
            later = vault.storage.stat(name).mtime >= since
        except OSError:
            later = True
        if later:
            newer.append("a point record set aside or damaged")
    if not newer:
        return None
    return (f"a point newer than {prev.id} is lost ({newer[0]}): what the change source "
            "says changed since the disk's latest point cannot be used")


def _plan_disk(vault: Vault, request: BackupRequest, prev: PointRecord | None, spec: DiskSpec,
               warnings: list[str], lost: str | None = None,
               remote: Executor | None = None) -> PlannedDisk:
    """One disk's plan; a disk on another host (``remote``: its workers) is opened and
    mapped there."""
    parent = prev.disk(spec.label) if prev else None
    block_size = request.block_size
    bs = parent.block_size if parent else (block_size or DEFAULT_BACKUP_BLOCK_SIZE)
    source, ranges = (_open_disk(spec, bs) if remote is None else _checked_disk(
        spec.label, bs, _labelled(remote.submit(_open_disk_there, spec, bs).result,
                                  spec.label)))
    if parent and block_size and block_size != parent.block_size:
        raise CbtValueError(
            f"disk {spec.label}: block size is fixed at {format_size(parent.block_size)} "
            f"by its first backup; --block-size {format_size(block_size)} differs")
    hint = _choose_hint(request, spec.label, parent, bs, source.size)
    if hint.tracked and lost is not None:
        hint = ChangeHint.hash(lost)
    d = PlannedDisk(spec=spec, source=source, block_size=bs, parent=parent,
                    seq=parent.seq + 1 if parent else 0, ranges=ranges, rows=range_rows(ranges),
                    digests=np.zeros(0, dtype=np.uint8), flags=np.zeros(0, dtype=np.uint8),
                    hint=hint, host=request.hosts.get(spec.label) if remote else None)
    d.previous = _previous_manifest(vault, prev, d, warnings)
    if hint.tracked and d.previous is None:  # (said so: a full baseline of this disk)
        d.hint = ChangeHint.hash("previous point unreadable")
    if d.hint.tracked and d.previous is not None:
        d.tracked = _tracked_rows(d, d.previous, request.verify_fraction)
        d.rows = d.tracked.alloc[d.tracked.read]
        d.ranges = row_runs(d.rows)
    d.digests = np.zeros((len(d.rows), fast.DIGEST_SIZE), dtype=np.uint8)
    d.flags = np.zeros(len(d.rows), dtype=np.uint8)
    return d


def _open_disk(spec: DiskSpec, block_size: int) -> tuple[SourceSpec, list[BlockRange]]:
    """Open a disk where it lies: its source's spec, and its data's block ranges."""
    with spec.open() as source:
        return source.spec(), source.block_ranges(block_size)


def _open_disk_there(spec: DiskSpec, block_size: int) -> tuple[SourceSpec, list[BlockRange]]:
    """:func:`_open_disk` on the disk's host (a cluster's worker there).  A qcow2 image
    there is refused: it is read through ``qemu-nbd``, which cbt runs on the coordinator's
    host only (read raw, its container file would be backed up, not the guest's disk)."""
    from cbt.source.qcow2 import is_qcow2

    if spec.nbd is None and spec.read_from is None and is_qcow2(spec.path):
        raise CbtValueError(f"disk {spec.label}: {spec.path} is a qcow2 image on another "
                            "host: cbt reads qcow2 images through qemu-nbd on its own host "
                            "only (run the backup there)")
    return _open_disk(spec, block_size)


def _checked_disk(label: str, block_size: int,
                  got: object) -> tuple[SourceSpec, list[BlockRange]]:
    """What a worker of another host says of a disk, taken as input: a source of a known
    kind and a size, and block ranges sorted, apart and inside the disk."""
    def bad(why: str) -> CbtIOError:
        return CbtIOError(errno.EIO, f"disk {label}: its host's worker sent {why}")

    if not (isinstance(got, tuple) and len(got) == 2 and isinstance(got[0], SourceSpec)
            and isinstance(got[1], list)):
        raise bad("no source and ranges")
    source, ranges = got
    if source.kind not in ("image", "nbd") or not isinstance(source.size, int) \
            or isinstance(source.size, bool) or not 0 <= source.size < 1 << 62:
        raise bad(f"a source of kind {source.kind!r}, size {source.size!r}")
    end, last, out = -(-source.size // block_size), 0, []
    for r in ranges:
        if not (isinstance(r, tuple) and len(r) == 2
                and all(isinstance(x, int | np.integer) and not isinstance(x, bool)
                        for x in r) and last <= r[0] < r[1] <= end):
            raise bad(f"block range {r!r}, not sorted, apart and inside its {end} blocks")
        last = int(r[1])
        out.append((int(r[0]), last))
    return source, out


def _labelled(call: Callable[[], _T], label: str) -> _T:
    """``call()``, an OSError of a worker's saying which disk it concerns."""
    try:
        return call()
    except OSError as exc:
        raise CbtIOError(exc.errno, f"disk {label}: {exc.strerror or exc}") from None


def _choose_hint(request: BackupRequest, label: str, parent: DiskRecord | None,
                 block_size: int, size: int) -> ChangeHint:
    """What changed in the disk since its previous point, as its change source says.

    A hint file is read and checked first (bad input fails the run before it
    writes anything, a first backup too); then the first that applies: no
    previous point (a hash scan, no reason), ``--full-scan``, the hint file,
    the snapshots' change source, else a hash scan.  A disk whose size changed
    is hash-scanned whatever its source said.
    """
    path = request.hints.get(label)
    hint_file = read_hint_file(path, block_size, size) if path is not None else None
    if parent is None:
        return ChangeHint.hash()
    if request.full_scan:
        return ChangeHint.hash("--full-scan")
    if hint_file is not None:
        hint = (hint_file.hint() if hint_file.size_a == parent.size else
                ChangeHint.hash("disk resized"))
    elif request.changes is not None:
        hint = request.changes(label, parent, block_size, size)
    else:
        hint = ChangeHint.hash()
    if parent.size != size:
        return ChangeHint.hash("disk resized")
    return hint


def _tracked_rows(d: PlannedDisk, previous: Manifest, fraction: float) -> TrackedRows:
    """Which allocated blocks a tracked disk reads (vectorised: no per-block Python).

    The hint's ranges, every block the previous point holds no row for (a hole
    then), and the verification sample: of the blocks the source calls
    unchanged that the previous point held (DATA or ZERO: an allocated block of
    zeros is read like any other, so a write into it cannot hide), those of
    this run's turn in the rotation.
    """
    alloc = d.rows
    prev_rows = previous.rows
    if len(prev_rows):
        pos = np.minimum(np.searchsorted(prev_rows, alloc), len(prev_rows) - 1)
        held = prev_rows[pos] == alloc
    else:
        pos = np.zeros(len(alloc), dtype=np.intp)
        held = np.zeros(len(alloc), dtype=bool)
    changed = _in_ranges(alloc, d.hint.ranges or ())
    sample = held & ~changed & sample_mask(alloc, d.seq, fraction, d.block_size)
    read = changed | ~held | sample
    return TrackedRows(alloc=alloc, read=read, prev_pos=pos.astype(np.intp),
                       sample=np.nonzero(sample[read])[0])


def _in_ranges(blocks: npt.NDArray[np.uint64],
               ranges: Sequence[BlockRange]) -> npt.NDArray[np.bool_]:
    """Which of the (sorted) ``blocks`` fall in any of ``ranges`` (as a source gave them:
    sorted and merged here, so a source's unsorted or overlapping ranges lose nothing)."""
    if not ranges or not len(blocks):
        return np.zeros(len(blocks), dtype=bool)
    r = np.array(ranges, dtype=np.uint64).reshape(-1, 2)
    r = r[np.argsort(r[:, 0], kind="stable")]
    ends = np.maximum.accumulate(r[:, 1])
    first = np.r_[True, r[1:, 0] > ends[:-1]]  # a range past every end before it
    starts_at = np.nonzero(first)[0]
    r = np.stack([r[starts_at, 0], np.maximum.reduceat(r[:, 1], starts_at)], axis=1)
    k = np.searchsorted(r[:, 1], blocks, side="right")  # the first range ending past it
    inside = k < len(r)
    inside[inside] = r[k[inside], 0] <= blocks[inside]
    return inside


def sample_mask(blocks: npt.NDArray[np.uint64], seq: int, fraction: float,
                block_size: int = 1) -> npt.NDArray[np.bool_]:
    """The blocks whose turn it is to be verified in the run of chain position ``seq``.

    A rotation of period ``p = ceil(1 / fraction)`` over runs of
    :data:`SAMPLE_RUN` bytes (``r`` blocks; runs, not single blocks: the sample
    is read in a few long reads, not a seek a block): block ``b`` is verified
    when ``(turn(b // r) + seq) % p == 0``, where ``turn`` is the run's number
    scrambled (:func:`scramble`) so no pattern of the disk's layout lines up
    with the rotation.  Each run checks about ``fraction`` of the blocks, and
    every block is checked once in any ``p`` consecutive runs; a fraction of 1
    checks all, 0 none.
    """
    if fraction <= 0:
        return np.zeros(len(blocks), dtype=bool)
    # (a fraction below 2**-62 is a period of 2**62: its turn comes next to never)
    period = max(1, math.ceil(1 / fraction - 1e-9)) if fraction >= 2.0**-62 else 1 << 62
    if period == 1:
        return np.ones(len(blocks), dtype=bool)
    run = np.uint64(max(1, SAMPLE_RUN // block_size))
    p = np.uint64(period)
    turn: npt.NDArray[np.bool_] = (scramble(blocks // run) % p + np.uint64(seq % period)) % p == 0
    return turn


def scramble(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """SplitMix64's finaliser: a fixed pseudo-random bijection of 64-bit numbers."""
    z = x.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


def row_runs(rows: npt.NDArray[np.uint64]) -> list[BlockRange]:
    """The runs of consecutive block numbers in the sorted ``rows``."""
    starts, ends = manifest_row_runs(rows)
    return list(zip(starts.tolist(), ends.tolist(), strict=True))


def _shard_task(disk: PlannedDisk, shard: Shard) -> ShardTask:
    early = None
    if disk.early is not None and shard.ranges:
        at = int(np.searchsorted(disk.rows, shard.ranges[0][0]))  # the shard's first row
        early = (memoryview(disk.early.digests)[at * fast.DIGEST_SIZE:],
                 memoryview(disk.early.flags)[at:])
    return ShardTask(shard.disk, disk.spec.label, disk.source, disk.block_size, shard.ranges,
                     early, disk.spec.path)


def _take_early_scan(early: PendingScan, disks: list[PlannedDisk], request: BackupRequest) -> None:
    """Wait for the early scan; each disk it covers (same file, size, block size) takes its result.

    Only disks with a previous point use it: a first backup stores every block,
    and reads each once, hashing and storing it in the same pass; a tracked disk
    reads only what changed.
    """
    match: dict[int, PlannedDisk] = {}
    for k, (source, block_size, size) in enumerate(early.disks()):
        for d in disks:  # (a tracked disk reads only what changed: no early scan)
            if (d.parent is not None and d.tracked is None
                    and all(d is not e for e in match.values())
                    and os.path.abspath(d.source.path) == source
                    and (d.block_size, d.size) == (block_size, size)):
                match[k] = d
                break
    progress = request.progress

    def report(k: int, done: int, total: int) -> None:
        if progress and k in match:
            progress(request.vm, match[k].spec.label, done, total)

    if not match:
        return
    try:
        scans = early.wait(disk_progress=report)
    except (CbtError, OSError):  # the early scan is only a head start: hash as usual
        return
    for k, d in match.items():
        if scans[k].ranges == d.ranges:  # (its rows are the same blocks: extents unchanged)
            d.early = scans[k]


# -- 3. transfer -------------------------------------------------------------------------


class WorkerVault:
    """What a worker is handed of the vault: its spec (keys included) and the run's index.

    Made once per run.  Forked workers and threads share the parent's loaded
    index; pickled for a worker process, it carries only the vault's spec and
    the index's identity (its segments), and the worker reopens the vault from
    the spec (no passphrase, no key derivation) and loads the index through it
    (unsealing an encrypted vault's segments), once per process and run
    (:func:`_worker_vault`).
    """

    def __init__(self, spec: VaultSpec, token: tuple[str, ...],
                 cache: index_mod.IndexCache | None = None) -> None:
        self.spec = spec
        self.token = token
        self._cache = cache or index_mod.IndexCache()
        self._vault: Vault | None = None

    @classmethod
    def of(cls, vault: Vault, index: index_mod.Index) -> WorkerVault:
        made = cls(vault.spec(), index.token(), index_mod.IndexCache(index))
        _LOADED[(made.spec.storage, made.token)] = made
        return made

    def vault(self) -> Vault:
        """The vault, reopened from its spec (once per WorkerVault)."""
        if self._vault is None:
            self._vault = Vault.from_spec(self.spec)
        return self._vault

    def index(self) -> index_mod.Index:
        vault = self.vault()
        return self._cache.get(vault.storage, self.token, vault.load_index)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_worker_vault, (self.spec, self.token))


# The runs' WorkerVaults with their loaded index, by (storage, index): a pool process
# forked from the run's process finds the index already loaded here.  A cache, never
# an input: a worker that finds nothing loads the index itself.
_LOADED: weakref.WeakValueDictionary[tuple[StorageSpec, tuple[str, ...]], WorkerVault] = (
    weakref.WeakValueDictionary())


def forget_runs() -> None:
    """Drop the runs' WorkerVaults this process keeps (a cluster's worker, after a run:
    their vaults' keys go with them)."""
    _worker_vault.cache_clear()
    _LOADED.clear()


@functools.lru_cache(maxsize=1)
def _worker_vault(spec: VaultSpec, token: tuple[str, ...]) -> WorkerVault:
    """A worker process's copy of a run's WorkerVault: one per (vault, index), so the
    shards of one run on one process load the index once (none at all when the pool
    process was forked from the run's, which had it loaded)."""
    return _LOADED.get((spec.storage, token)) or WorkerVault(spec, token)


def transfer(vault: Vault, request: BackupRequest, planned: Plan) -> list[ShardResult]:
    """Run every shard (forked workers, or the request's Executor); results in shard order,
    each checked (:func:`check_result`)."""
    worker_vault = WorkerVault.of(vault, planned.index)
    report = _progress_report(request, planned)
    if request.executor is None and not vault.storage.forkable:
        # a forked worker's writes to this storage would be lost with it: threads share it
        with ThreadPoolExecutor(request.workers or default_workers()) as pool:
            return _on_executor([pool] * len(planned.shards), worker_vault, planned.shards,
                                report)
    if request.executor is None:
        # (the workers' batched lookups would each decode the small segments whole: once
        # here instead, inherited)
        planned.index.warm(sum(s.blocks for s in planned.shards))
        try:  # (isolated: a disk page that cannot be read kills the reader, not cbt)
            results = fork_map(functools.partial(_labelled_shard, worker_vault),
                               planned.shards, report,
                               ignore_stop_signals=request.ignore_stop_signals, isolate=True)
            return [check_result(s, r) for s, r in zip(planned.shards, results, strict=True)]
        except WorkerError as exc:
            if exc.task is None:
                raise
            shard = planned.shards[exc.task]
            err = explain_death(exc, (shard.source.path, shard.source.size))
            raise CbtIOError(err.errno, f"disk {shard.name}: {err.strerror}") from None
    executors = ([planned.placed[s.disk][0] for s in planned.shards] if planned.placed
                 else [request.executor] * len(planned.shards))
    return _on_executor(executors, worker_vault, planned.shards, report)


def _progress_report(request: BackupRequest,
                     planned: Plan) -> Callable[[list[int]], None] | None:
    """Bytes done per disk from bytes done per shard, for the request's progress."""
    progress = request.progress
    if progress is None:
        return None
    disks, shards = planned.disks, planned.shards
    # bytes read: a tracked disk counts what it reads; a second pass (a hint that lied)
    # goes on from the first, for the disks it reads
    totals = [d.read_before + d.to_read for d in disks]
    active = sorted({s.disk for s in shards})

    def report(done: list[int]) -> None:
        # (a disk of the early scan counted its bytes then: it stays full)
        per_disk = [tot if d.early else d.read_before
                    for d, tot in zip(disks, totals, strict=True)]
        for s, n in zip(shards, done, strict=True):
            if not disks[s.disk].early:
                per_disk[s.disk] += int(n)
        for k in active:
            progress(request.vm, disks[k].spec.label, per_disk[k], totals[k])

    return report


def _on_executor(executors: list[Executor], worker_vault: WorkerVault, shards: list[ShardTask],
                 report: Callable[[list[int]], None] | None) -> list[ShardResult]:
    """Each shard on its executor; results in shard order."""
    done = [0] * len(shards)
    futures = {ex.submit(_run_shard, worker_vault, s): k
               for k, (ex, s) in enumerate(zip(executors, shards, strict=True))}
    results: list[ShardResult | None] = [None] * len(shards)
    try:
        for fut in as_completed(futures):
            k = futures[fut]
            result = results[k] = check_result(shards[k], fut.result())
            done[k] = result.bytes_read
            if report:
                report(done)
    except BaseException:
        for fut in futures:
            fut.cancel()
        raise
    return [r for r in results if r is not None]


def _run_shard(worker_vault: WorkerVault, shard: ShardTask) -> ShardResult:
    """Entry point for an Executor (no progress counter to report to)."""
    return _labelled_shard(worker_vault, shard, lambda n: None)


def _labelled_shard(worker_vault: WorkerVault, shard: ShardTask, report: Report) -> ShardResult:
    """Run a shard; an error says which disk it concerns."""
    try:
        return _transfer_shard(worker_vault, shard, report)
    except OSError as exc:
        raise CbtIOError(exc.errno, f"disk {shard.name}: {exc.strerror or exc}") from None
    except CbtError as exc:
        raise CbtIOError(errno.EIO, f"disk {shard.name}: {exc}") from None


@dataclass
class ShardResult:
    """What a worker sends back: its blocks' digests and flags, and the blocks it stored."""

    disk: int
    bytes_read: int
    block_digests: npt.NDArray[np.uint8]  # the shard's blocks, in range order
    block_flags: npt.NDArray[np.uint8]
    digests: npt.NDArray[np.uint8]  # the blocks it stored, and where
    pack_uuid: npt.NDArray[np.uint8]
    offset: npt.NDArray[np.uint64]
    stored: npt.NDArray[np.uint32]
    raw: npt.NDArray[np.uint32]
    seconds: float
    shard: str = ""  # the shard's key (:attr:`ShardTask.key`)


_RESULT_SHAPES = {"block_digests": (np.uint8, 32), "block_flags": (np.uint8, 0),
                  "digests": (np.uint8, 32), "pack_uuid": (np.uint8, 16),
                  "offset": (np.uint64, 0), "stored": (np.uint32, 0), "raw": (np.uint32, 0)}


def check_result(shard: ShardTask, r: object) -> ShardResult:
    """A worker's result as the coordinator takes it: the shard's own (its key and disk),
    one digest and flag per block of it, entries of equal lengths, each a block of at most
    the block size that the shard found DATA.  A worker elsewhere (an Executor, a
    cluster) is not cbt's own process: what it sends is input, and nothing it got wrong
    reaches a point (:func:`_check_packs` and :func:`_check_held` at the commit)."""
    def bad(why: str) -> CbtIOError:
        return CbtIOError(errno.EIO, f"disk {shard.name}: a worker's result {why}: "
                                     "nothing committed")

    if not isinstance(r, ShardResult):
        raise bad(f"is a {type(r).__name__}, not a shard's")
    if r.shard != shard.key or r.disk != shard.disk:
        raise bad("is another shard's")
    k = len(r.offset) if isinstance(r.offset, np.ndarray) else -1
    for name, (dtype, width) in _RESULT_SHAPES.items():
        a = getattr(r, name)
        rows = shard.blocks if name.startswith("block_") else k
        if not isinstance(a, np.ndarray) or a.dtype != dtype or \
                a.shape != ((rows, width) if width else (rows,)):
            raise bad(f"has {name} of the wrong shape or type")
    if (r.block_flags > fast.FLAG_HOLE).any():
        raise bad("has unknown block flags")
    if k and ((r.raw == 0) | (r.raw > shard.block_size) | (r.stored == 0)).any():
        raise bad("has impossible block lengths")
    if r.bytes_read != bytes_to_read(shard.ranges, shard.block_size, shard.source.size):
        raise bad(f"says {r.bytes_read} bytes read")
    data = r.block_digests[r.block_flags == fast.FLAG_DATA]
    if k and not _among(r.digests, data).all():
        raise bad("stored blocks the shard did not read")
    return r


def _among(needles: npt.NDArray[np.uint8], hay: npt.NDArray[np.uint8]) -> npt.NDArray[np.bool_]:
    """Which digests (rows) of ``needles`` are rows of ``hay``: by their first 8 bytes,
    sorted and searched, then the whole digest (several times faster than ``np.isin`` of
    32-byte rows); a prefix that two rows of ``hay`` share is settled by ``np.isin``."""
    out = np.zeros(len(needles), dtype=bool)
    if not len(needles) or not len(hay):
        return out
    hay = np.ascontiguousarray(hay)
    needles = np.ascontiguousarray(needles)
    keys = hay[:, :8].copy().view(np.uint64).ravel()
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    want = needles[:, :8].copy().view(np.uint64).ravel()
    pos = np.minimum(np.searchsorted(keys, want), len(keys) - 1)
    cand = keys[pos] == want
    out[cand] = (hay[order[pos[cand]]] == needles[cand]).all(axis=1)
    shared = cand & ~out  # (the prefix is there but not this digest at its first row)
    if shared.any():
        out[shared] = np.isin(needles[shared].view("V32").ravel(), hay.view("V32").ravel())
    return out


# (digest, pack uuid, offset, stored length, raw length) of a block a shard stored
_Entry = tuple[bytes, bytes, int, int, int]


def _transfer_shard(worker_vault: WorkerVault, shard: ShardTask, report: Report) -> ShardResult:
    """Hash a shard's blocks and store those the vault lacks (runs in a worker)."""
    started = time.perf_counter()
    bs = shard.block_size
    vault = worker_vault.vault()
    index = worker_vault.index()
    cipher = vault.keys.cipher if vault.keys is not None else None
    digests = np.zeros((shard.blocks, fast.DIGEST_SIZE), dtype=np.uint8)
    flags = np.zeros(shard.blocks, dtype=np.uint8)
    # (an early scan's digest is older than the bytes read now, snapshot or not: a
    # stored block is hashed again as it is copied, as on a live disk)
    store = _Store(index, bs, rehash=shard.source.live or shard.prehash is not None,
                   id_key=vault.id_key)
    with open_source(shard.source) as source, \
            _PackSink(vault.storage, cipher, vault.codec) as sink:
        ahead = _Prefetch(getattr(source, "fd", -1) if shard.prehash is None else -1,
                          shard.ranges, bs)
        rows = hash_shard(source, bs, shard.ranges, digests.reshape(-1).data, flags.data, report,
                          packed=True, prehashed=shard.prehash, key=vault.id_key)
        batch = _Batch(store, sink, digests, flags)
        with closing(rows), batch:
            for at, window in rows:
                n = fast.nblocks(len(window), bs)
                ahead.advance(at + n)
                batch.add(at, n, window)
        entries = sink.finish()
    k = len(entries)
    return ShardResult(
        disk=shard.disk,
        bytes_read=bytes_to_read(shard.ranges, bs, shard.source.size),
        block_digests=digests,
        block_flags=flags,
        digests=np.frombuffer(b"".join(e[0] for e in entries), np.uint8).reshape(k, 32),
        pack_uuid=np.frombuffer(b"".join(e[1] for e in entries), np.uint8).reshape(k, 16),
        offset=np.array([e[2] for e in entries], dtype=np.uint64),
        stored=np.array([e[3] for e in entries], dtype=np.uint32),
        raw=np.array([e[4] for e in entries], dtype=np.uint32),
        seconds=time.perf_counter() - started,
        shard=shard.key,
    )


class _Batch:
    """Consecutive windows of a shard, kept mapped until :data:`BATCH_BLOCKS` blocks or
    :data:`BATCH_BYTES` bytes: their index lookups are one call, not one a window (a
    tracked disk's windows are often a single block).  Only a mapping outlives the
    next window (a held view keeps it mapped); any other buffer is done at once
    (a window is valid until the next is asked for).
    """

    def __init__(self, store: _Store, sink: _PackSink, digests: npt.NDArray[np.uint8],
                 flags: npt.NDArray[np.uint8]) -> None:
        self.store, self.sink, self.digests, self.flags = store, sink, digests, flags
        self.windows: list[tuple[int, memoryview]] = []
        self.lo = self.hi = 0  # the rows held
        self.bytes = 0

    def add(self, at: int, n: int, window: Window) -> None:
        if not self.windows:
            self.lo = self.hi = at
        self.windows.append((at - self.lo, memoryview(window)))  # (keeps it mapped)
        self.hi = at + n
        self.bytes += len(window)
        if (self.hi - self.lo >= BATCH_BLOCKS or self.bytes >= BATCH_BYTES
                or not isinstance(window, mmap.mmap)):
            self.flush()

    def flush(self) -> None:
        try:
            if self.windows:
                lo, hi = self.lo, self.hi
                self.store.missing(self.sink, self.digests[lo:hi], self.flags[lo:hi],
                                   self.windows)
        finally:
            for _, view in self.windows:
                view.release()  # (the window is unmapped now)
            self.windows, self.bytes = [], 0

    def __enter__(self) -> _Batch:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.flush()
        else:
            for _, view in self.windows:
                view.release()
            self.windows = []


class _Prefetch:
    """Ask the kernel for a shard's blocks a few MiB ahead of its reader.

    The blocks a tracked disk reads are scattered (its changes and the sample):
    mapped one range at a time each costs a round trip to the disk.  Asked for
    ahead (``POSIX_FADV_WILLNEED``, at most :data:`PREFETCH_AHEAD` bytes beyond
    the reader) they are read with a deep queue: measured on a cold 32 GiB
    image, 21,000 scattered 16 KiB blocks took 0.8 s instead of 54.
    """

    def __init__(self, fd: int, ranges: Sequence[BlockRange], block_size: int) -> None:
        self.fd = fd if len(ranges) > 1 else -1  # (one range: the kernel's read-ahead)
        self.ranges = ranges
        self.block_size = block_size
        self.k = 0  # the next range to ask for, from its block ``lo``
        self.lo = ranges[0][0] if ranges else 0
        self.asked = 0  # rows asked for so far
        self.advance(0)

    def advance(self, done: int) -> None:
        """The reader is past ``done`` rows: ask for what lies ahead of it."""
        most = max(1, PREFETCH_AHEAD // self.block_size)
        while self.fd >= 0 and self.k < len(self.ranges) and self.asked - done < most:
            hi = min(self.ranges[self.k][1], self.lo + most)
            try:
                os.posix_fadvise(self.fd, self.lo * self.block_size,
                                 (hi - self.lo) * self.block_size, os.POSIX_FADV_WILLNEED)
            except OSError:
                self.fd = -1  # (only a hint: read as usual)
            self.asked += hi - self.lo
            self.lo = hi
            if hi == self.ranges[self.k][1]:
                self.k += 1
                self.lo = self.ranges[self.k][0] if self.k < len(self.ranges) else 0


class _Store:
    """Which blocks of a window a shard stores: data blocks the index lacks, each once."""

    def __init__(self, index: index_mod.Index, block_size: int, rehash: bool,
                 id_key: bytes | None = None) -> None:
        self.index = index
        self.block_size = block_size
        self.rehash = rehash
        self.id_key = id_key  # an encrypted vault's block ids are keyed BLAKE3
        self.seen: set[bytes] = set()  # digests this shard stored

    def missing(self, sink: _PackSink, digests: npt.NDArray[np.uint8],
                flags: npt.NDArray[np.uint8], windows: Sequence[tuple[int, memoryview]]) -> None:
        """Store the missing blocks of consecutive windows, looked up in one call
        (``digests``/``flags``: their rows; each window: its first row, and its bytes).
        Each is copied (the sink codes it on a thread of its own, after the windows are
        gone); a live disk's copies are hashed again, all at once (:func:`_as_copied`)."""
        data_rows = np.nonzero(flags == fast.FLAG_DATA)[0]
        if not len(data_rows):
            return
        absent = data_rows[self.index.lookup(digests[data_rows]) < 0].tolist()
        step = max(1, PICK_BYTES // self.block_size)  # (copies held at once: a few MiB)
        for k in range(0, len(absent), step):
            self._store(sink, digests, flags, windows, absent[k:k + step])

    def _store(self, sink: _PackSink, digests: npt.NDArray[np.uint8],
               flags: npt.NDArray[np.uint8], windows: Sequence[tuple[int, memoryview]],
               rows: list[int]) -> None:
        """Copy the blocks of ``rows`` not stored yet, and hand them to the sink."""
        while rows:
            picked, again = self._pick(digests, windows, rows)
            if self.rehash:
                copied = _as_copied(digests, flags, picked, self.id_key)
                lost = {d for _, d, _ in picked} - {d for _, d, _ in copied}
                self.seen -= lost  # changed under us: not stored, unless a later row holds it
                picked = copied
                self.seen.update(d for _, d, _ in picked)
                rows = [r for r in again if digests[r].tobytes() in lost]
            else:
                rows = []
            sink.add_many([(d, block) for _, d, block in picked])

    def _pick(self, digests: npt.NDArray[np.uint8], windows: Sequence[tuple[int, memoryview]],
              rows: list[int]) -> tuple[list[tuple[int, bytes, bytes]], list[int]]:
        """The first row of each digest not stored yet, copied, as (row, digest, bytes);
        and the rows skipped as a copy of one picked here."""
        bs = self.block_size
        starts = [first for first, _ in windows]
        picked: list[tuple[int, bytes, bytes]] = []
        again: list[int] = []
        now: set[bytes] = set()
        for row in rows:
            d = digests[row].tobytes()
            if d in self.seen:
                if d in now:
                    again.append(row)
                continue
            self.seen.add(d)
            now.add(d)
            first, view = windows[bisect.bisect_right(starts, row) - 1]
            with view[(row - first) * bs:(row - first + 1) * bs] as block:
                picked.append((row, d, bytes(block)))
        return picked, again


def _as_copied(digests: npt.NDArray[np.uint8], flags: npt.NDArray[np.uint8],
               picked: list[tuple[int, bytes, bytes]],
               id_key: bytes | None = None) -> list[tuple[int, bytes, bytes]]:
    """Blocks of a disk read live, copied: record what each copy holds.

    The disk may have been written since the window was hashed; the point then
    records the block as copied (a live read is crash-consistent at best), so
    the stored bytes always match the manifest's digest (the block's id: keyed
    with ``id_key`` in an encrypted vault).  The copies are hashed in one call;
    a copy that is all zeros now is a ZERO row, not stored.  Returns the blocks to
    store, each under the digest of its copy.
    """
    if not picked:
        return picked
    actual = np.empty((len(picked), fast.DIGEST_SIZE), dtype=np.uint8)
    fast.hash_each([block for _, _, block in picked], actual, key=id_key)
    out = []
    for (row, digest, block), got in zip(picked, actual, strict=True):
        d = got.tobytes()
        if d != digest:
            if block.count(0) == len(block):
                digests[row] = 0
                flags[row] = fast.FLAG_ZERO
                continue
            digests[row] = got
        out.append((row, d, block))
    return out


class _PackSink:
    """A shard's packs: blocks coded by threads, packs filled here, each written
    durably by a thread.

    Blocks come in batches (:meth:`add_many`), cut into runs of :data:`CODE_RUN`
    that the sink's coding threads compress and seal (:func:`encode_blocks`: zstd
    and the cipher release the GIL) while this thread goes on reading and hashing;
    the coded runs are appended in order, at most :data:`CODE_RUNS_IN_FLIGHT` per
    thread waiting.  A shard of new blocks then uses every core, not one, when the
    other shards are done.  The writing threads work while this one goes on.
    Storage with one request in flight (a disk): one thread of this sink's,
    at most PACKS_IN_FLIGHT full packs waiting in memory for it.  Storage worth
    more (S3: :attr:`Storage.in_flight`): the process's shared uploader, whose
    ``in_flight`` puts are shared by every shard of the process; this sink
    waits when they are all busy, and keeps at most ``in_flight`` packs of its
    own pending.  A failed put fails the shard when its pack is settled: its
    error is the shard's, and nothing is committed.
    """

    def __init__(self, storage: Storage, cipher: Cipher | None = None,
                 codec: int = CODEC_ZSTD, threads: int | None = None) -> None:
        self._storage = storage
        self._cipher = cipher  # an encrypted vault's: every blob sealed
        self._codec = codec  # the vault's compression
        self._writer = PackWriter(cipher=cipher, codec=codec)
        shared = storage.in_flight > 1
        self._uploader = (shared_uploader(storage.in_flight) if shared
                          else Uploader(PACKS_IN_FLIGHT, threads=1))
        self._own = not shared
        self._pending = storage.in_flight if shared else PACKS_IN_FLIGHT
        self._in_flight: deque[tuple[Future[None], PackWriter]] = deque()
        self._entries: list[_Entry] = []
        self._threads = threads or min(CODE_THREADS, default_workers())
        self._coders = ThreadPoolExecutor(self._threads, thread_name_prefix="cbt-code")
        self._coding: deque[Future[list[Coded]]] = deque()

    def add_many(self, blocks: list[tuple[bytes, bytes]]) -> None:
        """Store blocks ``(digest, data)``, in this order, coded on the sink's threads."""
        for k in range(0, len(blocks), CODE_RUN):
            self._coding.append(self._coders.submit(encode_blocks, blocks[k:k + CODE_RUN],
                                                    self._cipher, self._codec))
            while len(self._coding) > CODE_RUNS_IN_FLIGHT * self._threads:
                self._append(self._coding.popleft().result())

    def _append(self, coded: list[Coded]) -> None:
        for blob in coded:
            self._writer.add_coded(blob)
            if len(self._writer) >= TARGET_PACK_SIZE:
                self._flush()

    def finish(self) -> list[_Entry]:
        """Write the last pack, wait for every write; the stored blocks' entries."""
        while self._coding:
            self._append(self._coding.popleft().result())
        self._flush()
        self._settle(0)
        return self._entries

    def _flush(self) -> None:
        writer, self._writer = self._writer, self._writer.fresh()
        if writer.entries:
            self._settle(self._pending - 1)
            put = self._uploader.put(self._storage, pack_name(writer.pack_id), writer.finish())
            self._in_flight.append((put, writer))

    def _settle(self, keep: int) -> None:
        """Wait until at most ``keep`` puts are pending; those done already are settled
        too (a done pack's memory goes now)."""
        while len(self._in_flight) > keep or (self._in_flight and self._in_flight[0][0].done()):
            put, done = self._in_flight.popleft()
            put.result()  # a failed write (ENOSPC...) fails the shard here
            pid = uuid.UUID(hex=done.pack_id).bytes
            self._entries.extend((d, pid, off, st, raw) for d, off, st, raw in done.entries)

    def __enter__(self) -> _PackSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self._coders.shutdown(wait=True, cancel_futures=True)
        self._coding.clear()
        for put, _ in self._in_flight:
            put.cancel()
        if self._own:
            self._uploader.close()
        else:  # (the shared uploader lives on: wait for this sink's puts only)
            for put, _ in self._in_flight:
                if not put.cancelled():
                    put.exception()
        self._in_flight.clear()


# -- 3b. verify what the change sources said ------------------------------------------


def verify_hints(vault: Vault, request: BackupRequest, planned: Plan) -> list[ShardResult]:
    """Check each tracked disk's sample against its previous point; hash-scan a disk whose
    source lied (in this run: the rest of its allocated blocks), and warn.

    Run after the transfer's results are filled in; returns the second pass's results.
    """
    lied: list[int] = []
    for k, d in enumerate(planned.disks):
        source = d.hint.source
        if d.tracked is not None and d.previous is not None and _sample_lied(d, d.previous):
            lied.append(k)
            planned.warnings.append(
                f"disk {d.spec.label}: change source {source} missed changes "
                f"({d.hint.reason}; {d.hint_mismatches} of {d.verified_blocks} verified "
                "blocks differ): hash-scanned the disk")
            _read_the_rest(d)
        elif d.tracked is not None and _sample_lost(d, planned.index):
            lied.append(k)
            planned.warnings.append(
                f"disk {d.spec.label}: {d.hint.reason} (damaged, set aside by repair?): "
                "hash-scanned the disk, so every block the vault lacks is stored again")
            _read_the_rest(d)
    if not lied:
        return []
    cut = _cut(planned.disks, lied, request, planned.placed)
    tasks = [_shard_task(planned.disks[s.disk], s) for s in cut]
    second = Plan(planned.index, planned.prev, planned.disks, tasks, planned.warnings,
                  planned.placed)
    results = transfer(vault, request, second)
    _fill(planned.disks, tasks, results)
    planned.shards += tasks
    return results


def _sample_lied(d: PlannedDisk, previous: Manifest) -> bool:
    """Compare the sample's digests and flags with the previous point's; record the count."""
    t = d.tracked
    assert t is not None
    pos = t.prev_pos[t.read][t.sample]
    differ = ((d.digests[t.sample] != previous.row_digests[pos]).any(axis=1)
              | (d.flags[t.sample] != previous.row_flags[pos]))
    d.verified_blocks = len(t.sample)
    d.hint_mismatches = int(np.count_nonzero(differ))
    if not d.hint_mismatches:
        return False
    first = int(d.rows[t.sample[int(np.argmax(differ))]])
    d.hint = ChangeHint.hash(f"hint mismatch at block {first}")
    return True


def _sample_lost(d: PlannedDisk, index: index_mod.Index) -> bool:
    """Whether a DATA block of the sample (unchanged: the previous point holds it) is
    missing from the vault's index: the vault lost blocks of the previous point, which a
    tracked disk would copy, unseen, into the new one (a hash scan stores them again)."""
    t = d.tracked
    assert t is not None
    at = t.sample[d.flags[t.sample] == fast.FLAG_DATA]
    if not len(at):
        return False
    missing = index.lookup(np.ascontiguousarray(d.digests[at])) < 0
    if not missing.any():
        return False
    first = int(d.rows[at[int(np.argmax(missing))]])
    d.hint = ChangeHint.hash(f"block {first} of the previous point missing from the vault")
    return True


def _read_the_rest(d: PlannedDisk) -> None:
    """Make a tracked disk a hash-scanned one: its rows every allocated block, those read
    kept, the rest to read now."""
    t = d.tracked
    assert t is not None
    digests = np.zeros((len(t.alloc), fast.DIGEST_SIZE), dtype=np.uint8)
    flags = np.zeros(len(t.alloc), dtype=np.uint8)
    digests[t.read], flags[t.read] = d.digests, d.flags
    d.rows, d.digests, d.flags, d.tracked = t.alloc, digests, flags, None
    d.ranges = row_runs(t.alloc[~t.read])
    d.read_before = d.bytes_read


# -- 4. commit ---------------------------------------------------------------------------


def commit(vault: Vault, request: BackupRequest, planned: Plan, results: list[ShardResult],
           started: float, tracking: Mapping[str, TrackingBase] | None = None) -> PointRecord:
    """Write the manifests, then the index segment and the point record (the commit).

    ``results`` are every shard's, filled into the disks already (:func:`_fill`);
    ``tracking``: the tracking base kept of each disk (its identity is recorded).
    """
    created = request.created or utc_now()
    point_id = request.point_id or vault.unused_point_id(request.vm, created)
    # (the DATA blocks read this run, before the rows the previous point holds join them)
    read = _read_data(planned.disks)
    for d in planned.disks:
        _manifest_rows(d)
    new = _gather(planned, results)
    _check_packs(vault.storage, new)
    tracking = tracking or {}
    disks = [_commit_disk(vault, request.vm, planned.prev, d, point_id, created,
                          tracking.get(d.spec.label)) for d in planned.disks]
    record = PointRecord(
        id=point_id, vm=request.vm, created=created, consistency=request.consistency[0],
        consistency_reason=request.consistency[1],
        parent=planned.prev.id if planned.prev else None, disks=disks,
        bytes_new=sum(d.bytes_new for d in disks),
        bytes_stored=sum(d.bytes_stored for d in disks),
        seconds=round(time.perf_counter() - started, 6), warnings=planned.warnings,
        slot=request.slot)
    # a gc in progress (or another run's commit) finishes first
    with gc_lock(vault.storage, None, not vault.encrypted):
        check_held(vault.storage)  # (a holder that lost its lease writes no segment)
        index = _after_gc(vault, planned, new["digests"])
        _check_held(index, read, new["digests"])
        _write_segment(vault, point_id, new, index)
        record.seconds = round(time.perf_counter() - started, 6)
        commit_point(vault, point_id, record.to_json())
        # (under the gc lock: see there; the point is committed: a failed merge is a
        # warning of this run, never its failure)
        record.warnings.extend(_maybe_merge_segments(vault))
    return record


def _read_data(disks: list[PlannedDisk]) -> npt.NDArray[np.uint8]:
    """The digests of the DATA blocks the run's workers read."""
    parts = [d.digests[d.flags == fast.FLAG_DATA] for d in disks]
    return np.ascontiguousarray(np.concatenate(parts) if parts else
                                np.zeros((0, fast.DIGEST_SIZE), np.uint8))


def _check_packs(storage: Storage, new: dict[str, Any]) -> None:
    """Each pack the run's new index entries name is in the vault and long enough for its
    entries' blobs: a worker's claim of a pack it never wrote is never committed."""
    if not len(new["offset"]):
        return
    ids, where = np.unique(np.ascontiguousarray(new["pack_uuid"]).view("V16").ravel(),
                           return_inverse=True)
    ends = np.zeros(len(ids), dtype=np.uint64)
    np.maximum.at(ends, where.ravel(), new["offset"] + new["stored"].astype(np.uint64))
    names = [pack_name(uuid.UUID(bytes=i.tobytes()).hex) for i in ids]

    def size(name: str) -> int:
        try:
            return storage.stat(name).size
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
            return -1

    with ThreadPoolExecutor(max(1, min(16, storage.in_flight))) as pool:
        sizes = list(pool.map(size, names))
    for name, got, end in zip(names, sizes, ends.tolist(), strict=True):
        if got < end:
            raise CbtIOError(errno.EIO, f"a worker's result names blocks in {name}, which the "
                             "vault " + ("lacks" if got < 0 else f"holds shorter ({got} "
                             f"bytes, not {end})") + ": nothing committed")


def _check_held(index: index_mod.Index, read: npt.NDArray[np.uint8],
                stored: npt.NDArray[np.uint8]) -> None:
    """Every DATA block read this run is in the vault: in its index, or stored by a worker
    now (a worker's digest of a block it neither found nor stored fails the commit)."""
    missing = read[index.lookup(read) < 0]
    if not len(missing):
        return
    lost = ~_among(missing, stored)
    if lost.any():
        raise CbtIOError(errno.EIO, f"{int(lost.sum())} blocks of the point are neither in the "
                         "vault nor stored by its workers (a worker's result names blocks it "
                         "did not store?): nothing committed")


def _fill(disks: list[PlannedDisk], shards: list[ShardTask],
          results: list[ShardResult]) -> None:
    """Each shard's digests and flags into its disk's rows; bytes read and time."""
    for s, r in zip(shards, results, strict=True):
        d = disks[s.disk]
        if s.ranges:
            lo = int(np.searchsorted(d.rows, s.ranges[0][0]))
            if lo + s.blocks <= len(d.rows) and int(d.rows[lo + s.blocks - 1]) == \
                    s.ranges[-1][1] - 1:  # consecutive rows of its disk (a first pass)
                at: Any = slice(lo, lo + s.blocks)
            else:
                at = np.searchsorted(d.rows, range_rows(s.ranges))
            d.digests[at] = r.block_digests
            d.flags[at] = r.block_flags
        d.bytes_read += r.bytes_read
        d.seconds = max(d.seconds, r.seconds)


def _gather(planned: Plan, results: list[ShardResult]) -> dict[str, Any]:
    """The run's new index entries, and each disk's bytes new and stored."""
    new = _new_entries(results)
    for key in ("raw", "stored"):
        per_disk = np.bincount(new["disk"], weights=new[key], minlength=len(planned.disks))
        for d, n in zip(planned.disks, per_disk.astype(np.int64).tolist(), strict=True):
            setattr(d, "bytes_new" if key == "raw" else "bytes_stored", n)
    return new


def _manifest_rows(d: PlannedDisk) -> None:
    """A tracked disk's rows become every allocated block: those read, and the rest
    with the previous point's digest and flag (vectorised)."""
    t, previous = d.tracked, d.previous
    if t is None or previous is None:
        return
    digests = np.zeros((len(t.alloc), fast.DIGEST_SIZE), dtype=np.uint8)
    flags = np.zeros(len(t.alloc), dtype=np.uint8)
    digests[t.read], flags[t.read] = d.digests, d.flags
    kept = ~t.read
    pos = t.prev_pos[kept]
    digests[kept], flags[kept] = previous.row_digests[pos], previous.row_flags[pos]
    d.rows, d.digests, d.flags, d.tracked = t.alloc, digests, flags, None


def _commit_disk(vault: Vault, vm: str, prev: PointRecord | None, d: PlannedDisk, point_id: str,
                 created: str, base: TrackingBase | None = None) -> DiskRecord:
    """Write one disk's manifest (full, or a delta against its chain base)."""
    import blake3

    # (a path of another host is recorded as given: this host's directory means nothing there)
    path = d.spec.path if d.host is not None else str(Path(d.spec.path).absolute())
    manifest = Manifest.sparse(d.block_size, d.size, d.rows, d.digests, d.flags, source=path,
                               created=created)
    previous = d.previous
    if previous is not None and prev is not None:
        changed = changed_blocks(previous, manifest)
        base_point = vault.chain_base(vm, d.spec.label, d.seq, prev)
    else:
        changed, base_point = manifest.blocks, None
    name = vault.manifest_name(point_id, d.spec.label)
    if base_point is not None:
        based_on_prev = previous is not None and prev is not None and base_point.id == prev.id
        delta = manifest.delta_from(previous if based_on_prev and previous is not None else
                                    vault.resolve(base_point, d.spec.label))
        delta.metadata = {"cbt.base": base_point.id, "cbt.seq": str(d.seq)}
        data = delta.to_bytes()
    else:
        data = manifest.to_bytes()
    stored = vault.seal("manifest", name, data)  # (the checksum is of what is stored)
    vault.storage.put(name, stored)
    return DiskRecord(
        label=d.spec.label, path=path, size=d.size, block_size=d.block_size,
        blocks=manifest.blocks, changed_blocks=changed, bytes_read=d.bytes_read,
        bytes_new=d.bytes_new, bytes_stored=d.bytes_stored,
        seconds=round(d.seconds + (d.early.seconds if d.early else 0.0), 6),
        manifest=name, manifest_checksum=blake3.blake3(stored).hexdigest(),
        seq=d.seq if base_point is not None else 0,
        base=base_point.id if base_point is not None else None,
        change_source=d.change_source, change_source_reason=d.hint.reason,
        verified_blocks=d.verified_blocks, hint_mismatches=d.hint_mismatches,
        tracking_base=base.to_json() if base is not None else None)


def _previous_manifest(vault: Vault, prev: PointRecord | None, d: PlannedDisk,
                       warnings: list[str]) -> Manifest | None:
    """The disk's manifest at the point this run follows; None: a first backup, or one that
    cannot be resolved (damaged), after which the disk takes a new full baseline (said so,
    keeping its block size)."""
    if d.parent is None or prev is None:
        return None
    try:
        return vault.resolve(prev, d.spec.label)
    except (CbtError, OSError) as exc:
        warnings.append(f"disk {d.spec.label}: the manifest of point {prev.id} cannot be read "
                        f"({exc}); taking a full baseline of this disk")
        return None


def _after_gc(vault: Vault, planned: Plan,
              stored_now: npt.NDArray[np.uint8]) -> index_mod.Index:
    """If a gc ran during this backup, make sure every block the point uses still exists.

    gc rewrites the index whenever it removes anything, so unchanged segments
    mean nothing moved.  Otherwise: blocks this run deduplicated against that
    gc declared dead are brought back from the trash, and the fresh index
    (not the stale one) decides which orphan packs this run's segment adopts.
    """
    from cbt.repo.trash import rescue

    current = set(vault.segment_names())
    if current == set(planned.index.segments) | set(planned.index.damaged):
        return planned.index
    fresh = vault.load_index()
    need: set[bytes] = set()
    for d in planned.disks:
        data = d.digests[d.flags == fast.FLAG_DATA]
        missing = data[fresh.lookup(data) < 0]
        need.update(row.tobytes() for row in missing)
    need -= {row.tobytes() for row in stored_now}
    if need:
        still = rescue(vault.storage, need)
        if still:
            raise CbtIOError(errno.EIO, f"{len(still)} blocks this backup relies on vanished "
                             "from the vault (removed by gc?); run the backup again")
        fresh = vault.load_index()
    return fresh


_ENTRY_KEYS = ("digests", "pack_uuid", "offset", "stored", "raw")


def _new_entries(results: list[ShardResult]) -> dict[str, Any]:
    """The blocks this run stored, one entry per digest however many workers raced to
    store it (the first wins; the spare copy is left for gc), with the disk of each."""
    cols = {k: np.concatenate([getattr(r, k) for r in results]) if results else
            np.zeros(0) for k in _ENTRY_KEYS}
    disk = np.concatenate([np.full(len(r.offset), r.disk, dtype=np.int64) for r in results]) \
        if results else np.zeros(0, dtype=np.int64)
    digests = np.ascontiguousarray(cols["digests"], dtype=np.uint8).reshape(-1, 32)
    _, first = np.unique(digests.view("V32").ravel(), return_index=True)
    keep = np.sort(first)
    out = {k: v[keep] for k, v in cols.items()}
    out["digests"] = digests[keep]
    out["disk"] = disk[keep]
    return out


def _write_segment(vault: Vault, point_id: str, new: dict[str, Any],
                   index: index_mod.Index) -> None:
    """Index entries for this run's packs and the orphan packs it adopted."""
    parts: dict[str, list[Any]] = {k: [new[k]] for k in _ENTRY_KEYS}
    if index.orphans:
        from cbt.format.pack import pack_id_of

        adopted = index_mod.entries_for_packs(index, {pack_id_of(n) for n in index.orphans})
        for k in parts:
            parts[k].append(adopted[k])
    if not any(len(v) for v in parts["offset"]):
        return
    segments.write_entries(vault, point_id, {k: np.concatenate(v) for k, v in parts.items()})


def _maybe_merge_segments(vault: Vault) -> list[str]:
    """Compact the index's segments in tiers (:func:`cbt.repo.segments.compact`: a merge
    streams, whatever the vault's size), after the commit; the warnings (a merge that
    failed: a damaged page of a segment it read, a full disk).  Under the gc lock: a gc
    between a merge's reading segments and its writing the merged one would trash a
    dead pack that segment then names again (a later backup would deduplicate against
    it, and a later gc empty the trash under it)."""
    for _step in range(COMPACT_STEPS):
        try:
            if segments.compact(vault) is None:
                return []
        except CbtError as exc:
            # (a merge that fails leaves nothing: its segment is written whole or not
            # at all, and its inputs are retired only after)
            return [f"index segments not merged: {exc} (the point is committed; "
                    "cbt verify --repair rebuilds a damaged index)"]
    return []

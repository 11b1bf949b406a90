"""Mount: read the disks of recovery points as byte ranges, every block verified.

What ``cbt mount`` serves (the FUSE adapter is :mod:`cbt.cli.mount_cmd`; nothing
here knows of FUSE).  :func:`mount_tree` lays out the files: one point's disks as
``LABEL.img``, or every point's as ``VM/POINT/LABEL.img``.  Each file is a
:class:`DiskReader`; all of them share one :class:`BlockCache` and one read-ahead
thread.  A read of ``size`` bytes at ``offset`` (:meth:`DiskReader.read`):

1. Clip it to the disk; the blocks it touches, and their rows in the point's
   manifest (resolved when the file is read; the manifests resolved last are kept,
   at most ``Shared.manifest_limit`` bytes of them, least recently used out first,
   so a mount of many points does not keep every manifest it ever read).
2. A hole or an all-zero block reads as zeros: the vault is not touched.
3. A DATA block is looked up in the cache by its block id (content-addressed: a
   block shared by disks or points is read once); one a read-ahead is fetching
   right now is waited for.
4. The rest are fetched: grouped by pack (:func:`cbt.ops.restore.plan_disk`, as a
   restore plans them) and read by :func:`cbt.ops.restore.read_verified`, which
   decrypts, decompresses and checks every block against its id (keyed in an
   encrypted vault), then kept in the cache.  A block that fails is a
   :class:`~cbt.ops.restore.DamagedPointError` for this read only (never wrong
   data); the cache keeps nothing of it.
5. The read is joined from views of its blocks and of a zeros buffer (one copy).
6. Read-ahead: a read that starts where the last read of the same file ended (or
   in its last block) is sequential; once less than half a window lies read
   ahead of it, the DATA blocks of the next window (``Shared.read_ahead`` bytes,
   :data:`READ_AHEAD` by default) not cached yet are fetched on the read-ahead
   thread (one window per file at a time), so the next reads find them in the
   cache.  Its failures are dropped: the read that needs the block fetches it
   again and reports the error itself.

The cache holds at most its ``limit`` of block bytes, least recently used out first.
Readers are safe to call from many threads at once.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from cbt.core.errors import CbtValueError
from cbt.core.native import fast
from cbt.ops.restore import DamagedPointError, _Scratch, image_name, plan_disk, read_verified

if TYPE_CHECKING:
    from cbt.format.manifest import Manifest
    from cbt.format.records import PointRecord
    from cbt.repo.index import Index
    from cbt.repo.vault import Vault

DEFAULT_CACHE = 256 << 20  # bytes of blocks the cache keeps (``cbt mount --cache``)
READ_AHEAD = 4 << 20  # bytes fetched ahead of a sequential reader
MANIFESTS = 512 << 20  # bytes of resolved manifests kept (the one in use always is)


class BlockCache:
    """Verified blocks by block id, at most ``limit`` bytes, least recently used out first;
    and the ids being fetched right now (so two readers do not fetch one block twice)."""

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise CbtValueError(f"cache size {limit}: not a size")
        self.limit = limit
        self.used = 0
        self._blocks: OrderedDict[bytes, bytes] = OrderedDict()
        self._pending: dict[bytes, threading.Event] = {}
        self._lock = threading.Lock()

    def get(self, key: bytes) -> bytes | None:
        with self._lock:
            data = self._blocks.get(key)
            if data is not None:
                self._blocks.move_to_end(key)
            return data

    def put(self, key: bytes, data: bytes) -> None:
        with self._lock:
            if key in self._blocks or len(data) > self.limit:
                return
            self._blocks[key] = data
            self.used += len(data)
            while self.used > self.limit:
                _, old = self._blocks.popitem(last=False)
                self.used -= len(old)

    def claim(self, keys: list[bytes]) -> tuple[list[int], list[threading.Event]]:
        """Of ``keys`` (not cached), the positions this caller must fetch (now marked as
        being fetched) and the events of those another caller is fetching already."""
        mine, theirs = [], []
        ours = threading.Event()  # (one for the whole claim: set once, when released)
        with self._lock:
            for i, key in enumerate(keys):
                if key in self._blocks:
                    continue
                event = self._pending.get(key)
                if event is None:
                    self._pending[key] = ours
                    mine.append(i)
                elif event is not ours and event not in theirs:
                    theirs.append(event)
        return mine, theirs

    def release(self, keys: list[bytes]) -> None:
        """The fetch of ``keys`` is over (done or failed): wake whoever waits for them."""
        with self._lock:
            events = {id(e): e for key in keys if (e := self._pending.pop(key, None))}
        for event in events.values():
            event.set()


@dataclass
class Shared:
    """What every file of one mount shares: the vault, its index, the cache, the
    read-ahead thread, and counters (what the tests and the benchmark look at)."""

    vault: Vault
    index: Index
    cache: BlockCache
    read_ahead: int = READ_AHEAD
    ahead: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(
        1, thread_name_prefix="cbt-read-ahead"))
    packs_read: int = 0  # pack jobs fetched (a job: the blocks one fetch needs of one pack)
    blocks_read: int = 0  # blocks fetched from the vault and verified
    _guard: threading.Lock = field(default_factory=threading.Lock)  # (counters, manifests)
    resolving: threading.Lock = field(default_factory=threading.Lock)  # (one at a time)
    manifest_limit: int = MANIFESTS
    manifests: OrderedDict[tuple[str, str], Manifest] = field(default_factory=OrderedDict)

    def __post_init__(self) -> None:
        self.spec = self.vault.spec()  # (what a pack job names: its storage and keys)

    def manifest(self, point: PointRecord, label: str) -> Manifest:
        """1: the resolved manifest of one disk, kept among the last ``manifest_limit``
        bytes of them (the vault's own cache of every one it resolved is dropped).  A
        kept one is had at once, even while another is being resolved (slowly, from a
        stalled server, say)."""
        key = (point.id, label)
        m = self._kept(key)
        if m is not None:
            return m
        with self.resolving:  # (the vault's manifest cache: one resolve at a time)
            m = self._kept(key)  # (resolved meanwhile by another reader)
            if m is not None:
                return m
            try:
                m = self.vault.resolve(point, label)
            finally:
                self.vault.forget_manifests()
            with self._guard:
                self.manifests[key] = m
                used = sum(map(_manifest_bytes, self.manifests.values()))
                while used > self.manifest_limit and len(self.manifests) > 1:
                    used -= _manifest_bytes(self.manifests.popitem(last=False)[1])
            return m

    def _kept(self, key: tuple[str, str]) -> Manifest | None:
        with self._guard:
            m = self.manifests.get(key)
            if m is not None:
                self.manifests.move_to_end(key)
            return m

    def counted(self, packs: int, blocks: int) -> None:
        with self._guard:
            self.packs_read += packs
            self.blocks_read += blocks

    def close(self) -> None:
        self.ahead.shutdown(wait=True, cancel_futures=True)


def _manifest_bytes(m: Manifest) -> int:
    return int(m.rows.nbytes + m.row_digests.nbytes + m.row_flags.nbytes)


_scratch = threading.local()
_ZEROS = memoryview(bytes(4 << 20))  # what a hole or zero block reads as (blocks are <= 4M)


class DiskReader:
    """Reads of one disk of one point (the module's steps)."""

    def __init__(self, shared: Shared, point: PointRecord, label: str) -> None:
        disk = point.disk(label)
        if disk is None:
            raise CbtValueError(f"point {point.id} has no disk {label!r}")
        self.shared, self.point, self.label = shared, point, label
        self.size = disk.size
        self._lock = threading.Lock()
        self._last_end = -1  # the block after the last one read (sequential reads)
        self._ahead_to = 0  # the block after the last one read ahead
        self._ahead_busy = False

    def manifest(self) -> Manifest:
        return self.shared.manifest(self.point, self.label)

    def read(self, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` (fewer at the end of the disk; none past it)."""
        if offset < 0 or size < 0:
            raise CbtValueError(f"read of {size} bytes at {offset}: out of range")
        m = self.manifest()
        end = min(offset + size, m.disk_size)
        if offset >= end:
            return b""
        bs = m.block_size
        first, last = offset // bs, (end - 1) // bs
        rows = np.arange(first, last + 1, dtype=np.int64)
        blocks = self._blocks(m, rows)
        pieces: list[memoryview] = []
        for blk in range(first, last + 1):
            lo = blk * bs
            a, b = max(lo, offset), min(lo + bs, end)
            data = blocks.get(blk)
            if data is not None and len(data) != min(bs, m.disk_size - lo):
                # (a cached block is keyed by its id alone: a forged manifest may name,
                # for a full block, the id of a short one another disk's tail cached)
                raise DamagedPointError(f"point {self.point.id} disk {self.label} block "
                                        f"{blk}: content has the wrong length")
            pieces.append(_ZEROS[:b - a] if data is None else memoryview(data)[a - lo:b - lo])
        self._maybe_read_ahead(m, first, last + 1)
        return b"".join(pieces)  # (the one copy)

    def _blocks(self, m: Manifest, rows: npt.NDArray[np.int64]) -> dict[int, bytes]:
        """2-4: the DATA blocks among ``rows`` (block number -> content); the others are
        zeros, left out."""
        digests, flags = m.at(rows)
        data = flags == fast.FLAG_DATA
        rows, keys = rows[data], [d.tobytes() for d in digests[data]]
        cache = self.shared.cache
        got: dict[int, bytes] = {}
        for _ in range(3):  # (a block another fetch was for, evicted at once: fetched here)
            want = [i for i, k in enumerate(keys) if int(rows[i]) not in got]
            for i in want:
                hit = cache.get(keys[i])
                if hit is not None:
                    got[int(rows[i])] = hit
            missing = [i for i in want if int(rows[i]) not in got]
            if not missing:
                return got
            mine, theirs = cache.claim([keys[i] for i in missing])
            if mine:
                got.update(self._fetch(m, rows[[missing[j] for j in mine]]))
            for event in theirs:
                event.wait()
        missing = [i for i in range(len(keys)) if int(rows[i]) not in got]
        got.update(self._fetch(m, rows[missing], claimed=False))
        return got

    def _fetch(self, m: Manifest, rows: npt.NDArray[np.int64], claimed: bool = True
               ) -> dict[int, bytes]:
        """4: read the blocks ``rows`` from the vault, verified, into the cache."""
        shared = self.shared
        keys = [d.tobytes() for d in m.at(rows)[0]] if claimed else []
        scratch = getattr(_scratch, "buf", None)
        if scratch is None:
            scratch = _scratch.buf = _Scratch()
        got: dict[int, bytes] = {}
        try:
            jobs = plan_disk(shared.spec, shared.index, self.point.id, self.label, m,
                             "", rows)
            for job in jobs:
                views = read_verified(shared.vault, job, scratch)
                for blk, digest, view in zip(job.blocks.tolist(), job.digests, views,
                                             strict=True):
                    got[blk] = bytes(view)
                    shared.cache.put(digest.tobytes(), got[blk])
                del views
                shared.counted(1, len(job.blocks))
        finally:
            shared.cache.release(keys)
        return got

    def _maybe_read_ahead(self, m: Manifest, first: int, end: int) -> None:
        """5: after a sequential read, fetch the next window on the read-ahead thread."""
        shared = self.shared
        window = max(1, shared.read_ahead // m.block_size)
        with self._lock:
            sequential = self._last_end - 1 <= first <= self._last_end
            self._last_end = end
            if (not sequential or self._ahead_busy or shared.read_ahead <= 0
                    or end + window // 2 < self._ahead_to):
                return  # (half a window still ahead of the reader: not yet)
            start, stop = max(end, self._ahead_to), min(m.blocks, end + window)
            if start >= stop:
                return
            self._ahead_busy, self._ahead_to = True, stop
        try:
            shared.ahead.submit(self._ahead, m, start, stop)
        except RuntimeError:  # shut down: the mount is going
            with self._lock:
                self._ahead_busy = False

    def _ahead(self, m: Manifest, start: int, stop: int) -> None:
        try:
            rows = np.arange(start, stop, dtype=np.int64)
            digests, flags = m.at(rows)
            data = flags == fast.FLAG_DATA
            rows, keys = rows[data], [d.tobytes() for d in digests[data]]
            cache = self.shared.cache
            todo = [i for i, k in enumerate(keys) if cache.get(k) is None]
            mine, _ = cache.claim([keys[i] for i in todo])
            if mine:
                self._fetch(m, rows[[todo[j] for j in mine]])
        except Exception:  # the read that needs the block fetches it and reports it
            pass
        finally:
            with self._lock:
                self._ahead_busy = False


@dataclass(frozen=True)
class MountFile:
    """One file of a mount: its path parts under the mount point, and its reader."""

    parts: tuple[str, ...]
    reader: DiskReader


def mount_tree(shared: Shared, points: list[PointRecord], one: bool) -> list[MountFile]:
    """The files of a mount: ``LABEL.img`` of each disk of the one point (``one``), else
    ``VM/POINT/LABEL.img`` of every point's disks.  A label that is no plain name is an
    error (:func:`cbt.ops.restore.image_name`)."""
    out = []
    for p in points:
        for d in p.disks:
            name = image_name(p, d.label)
            parts = (name,) if one else (p.vm, p.id, name)
            out.append(MountFile(parts, DiskReader(shared, p, d.label)))
    return out

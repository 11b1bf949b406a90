"""The vault index: block digest -> (pack, offset, stored length).

On disk it is a set of *segments* (``index/<run>.arrow``, Arrow IPC files with
a magic, a format version and a checksum), one written by each backup run for
the packs it created, merged into one when there are many.  A pack that no
segment covers (left by a killed run) is indexed from its own trailer, so the
next run reuses its blocks instead of sending them again.

An :class:`Index` is composed of *parts* (:class:`IndexPart`: a number of
entries, their packs, ``lookup``, ``gather``, ``chunks``), searched in order;
callers see entries only through the index's own calls, never as whole
columns, so a part need not be in memory (a segment searched where it lies
is one).  Today :func:`load` merges everything into one :class:`MemoryPart`:
numpy arrays sorted by the digest's first 8 bytes, where ``lookup`` answers
for a whole window of digests at once with ``searchsorted`` (no Python loop
per block; about 60 bytes an entry).  Where one entry is handed around it is
an :class:`IndexEntry` (:meth:`Index.entry`, :meth:`Index.find`).

1. Load: every segment (retrying when a writer merges them meanwhile), then
   the trailers of packs no segment covers (:func:`load`), merged into one part.
2. Look up digests in bulk (:meth:`Index.lookup`): each part in turn, asked
   only for the digests the parts before it lack; a position is the part's
   base (the entries of the parts before it) plus its row there.
3. Read entries at positions (:meth:`Index.locate`: grouped by part, one
   ``gather`` each, pack numbers mapped into the index's one ``pack_ids``), or
   all of them a chunk at a time (:meth:`Index.chunks`: gc's sweep, the
   entries a merged segment keeps, :func:`select_entries`).
4. A run keeps its loaded index in an :class:`IndexCache` it hands to its
   workers (no module state), keyed by the segments and orphans it saw.

An encrypted vault's segments are sealed under opaque names: the vault lists
and reads them (``Vault.load_index`` passes ``segment_names`` and ``read``);
the digests in them are the vault's keyed block ids.
"""

from __future__ import annotations

import errno
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from cbt.core.errors import CbtError, CbtIOError
from cbt.format import index_segment
from cbt.format.index_segment import CorruptIndexError, prefix_keys
from cbt.format.pack import (
    CorruptPackError,
    is_pack_name,
    pack_id_of,
    read_pack_trailer,
    scan_blobs,
)
from cbt.format.paged_index import PagedIndexError, PagedSegment
from cbt.repo.storage import Storage
from cbt.repo.trash import read_segment_range, segment_trash_name

if TYPE_CHECKING:
    from cbt.core.crypto import Cipher

MERGE_AT = 16  # Arrow segments at which cbt before issue 18 merged them (bench --legacy)
CHUNK = 65536  # entries :meth:`Index.chunks` hands out at a time (about 3 MB)


class IndexEntry(NamedTuple):
    """Where one block is stored: its blob is ``stored`` bytes after the blob header at
    ``offset`` in pack ``pack`` (an id), ``raw`` bytes once decompressed."""

    digest: bytes
    pack: str
    offset: int
    stored: int
    raw: int


class Located(NamedTuple):
    """Index entries at some positions (:meth:`Index.locate`, :meth:`Index.chunks`), one
    array per column, row i for the i-th position asked.  ``pack`` numbers are into
    :attr:`Index.pack_ids`.  Read-only: the arrays may be views of the index itself."""

    digests: npt.NDArray[np.uint8]  # (k, 32)
    pack: npt.NDArray[np.uint32]
    offset: npt.NDArray[np.uint64]
    stored: npt.NDArray[np.uint32]
    raw: npt.NDArray[np.uint32]


class IndexPart(Protocol):
    """One sorted run of index entries an :class:`Index` is composed of: the merged
    in-memory arrays (:class:`MemoryPart`) or a segment searched where it lies.  Rows
    are numbered 0..n-1; a row's ``pack`` is a number into the part's own ``pack_ids``.
    ``gather`` and ``lookup`` answer row i for the i-th item asked (any order, repeats
    allowed); ``chunks`` yields every row once, in row order, about ``entries`` at a
    time (a paged segment rounds to whole pages).  The dicts carry ``digests`` (k, 32)
    uint8, ``pack`` uint32, ``offset`` uint64, ``stored`` and ``raw`` uint32."""

    @property
    def n(self) -> int: ...

    @property
    def pack_ids(self) -> list[str]: ...

    def lookup(self, digests: npt.NDArray[np.uint8]) -> npt.NDArray[np.int64]: ...

    def gather(self, rows: npt.NDArray[np.int64]) -> dict[str, npt.NDArray[Any]]: ...

    def chunks(self, entries: int = CHUNK) -> Iterator[dict[str, npt.NDArray[Any]]]: ...


@dataclass
class MemoryPart:
    """Entries merged into numpy arrays sorted by the digest's first 8 bytes (``keys``),
    one entry per digest: :meth:`lookup` is one ``searchsorted`` for a whole window."""

    digests: npt.NDArray[np.uint8]  # (n, 32)
    pack: npt.NDArray[np.uint32]  # (n,) index into pack_ids
    offset: npt.NDArray[np.uint64]
    stored: npt.NDArray[np.uint32]
    raw: npt.NDArray[np.uint32]
    pack_ids: list[str]
    keys: npt.NDArray[np.uint64]

    @property
    def n(self) -> int:
        return int(self.keys.shape[0])

    @classmethod
    def build(cls, parts: list[dict[str, Any]]) -> MemoryPart:
        """Merge parts (dicts of arrays with a ``pack_ids`` list) keeping one entry per digest
        (the first part's, where two have it)."""
        where: dict[str, int] = {}
        cols: dict[str, list[Any]] = {k: [] for k in ("digests", "pack", "offset", "stored",
                                                      "raw")}
        for part in parts:
            remap = np.array([where.setdefault(p, len(where)) for p in part["pack_ids"]],
                             dtype=np.uint32)
            cols["digests"].append(part["digests"])
            cols["pack"].append(remap[part["pack"]] if len(remap) else part["pack"])
            for k in ("offset", "stored", "raw"):
                cols[k].append(part[k])
        pack_ids = sorted(where, key=where.__getitem__)
        if parts:
            digests = np.concatenate(cols["digests"]).reshape(-1, 32)
            arrays = {k: np.concatenate(cols[k]) for k in ("pack", "offset", "stored", "raw")}
        else:
            digests = np.zeros((0, 32), dtype=np.uint8)
            arrays = {"pack": np.zeros(0, np.uint32), "offset": np.zeros(0, np.uint64),
                      "stored": np.zeros(0, np.uint32), "raw": np.zeros(0, np.uint32)}
        keys = prefix_keys(digests)
        # Sorting by the 8-byte prefix is enough: copies of a digest share it, so they
        # end up next to each other (a different digest with the same prefix between
        # two copies would only leave a harmless duplicate entry).  Segments are
        # written sorted, and a stable sort (timsort) of sorted runs is nearly linear.
        order = np.argsort(keys, kind="stable")
        keep = np.ones(len(order), dtype=bool)
        if len(order) > 1:
            sorted_keys = keys[order]
            same = np.nonzero(sorted_keys[1:] == sorted_keys[:-1])[0] + 1  # rare: compare all
            keep[same] = (digests[order[same]] != digests[order[same - 1]]).any(axis=1)
        order = order[keep]
        return cls(
            digests=np.ascontiguousarray(digests[order]),
            pack=arrays["pack"][order].astype(np.uint32),
            offset=arrays["offset"][order].astype(np.uint64),
            stored=arrays["stored"][order].astype(np.uint32),
            raw=arrays["raw"][order].astype(np.uint32),
            pack_ids=pack_ids,
            keys=keys[order],
        )

    def lookup(self, digests: npt.NDArray[np.uint8]) -> npt.NDArray[np.int64]:
        """Row of each digest, or -1 where it is absent."""
        m = len(digests)
        out = np.full(m, -1, dtype=np.int64)
        n = self.n
        if m == 0 or n == 0:
            return out
        q = prefix_keys(digests)
        pos = np.searchsorted(self.keys, q, side="left")
        inside = pos < n
        cand = np.where(inside, pos, 0)
        hit = inside & (self.keys[cand] == q)
        # (np.take: a gather of 32-byte rows that is ~10x faster than fancy indexing)
        exact = hit & (np.take(self.digests, cand, axis=0) == digests).all(axis=1)
        out[exact] = cand[exact]
        for i in np.nonzero(hit & ~exact)[0]:  # same 8-byte prefix, other digest: rare
            j = int(cand[i])
            while j < n and self.keys[j] == q[i]:
                if bytes(self.digests[j]) == bytes(digests[i]):
                    out[i] = j
                    break
                j += 1
        return out

    def gather(self, rows: npt.NDArray[np.int64]) -> dict[str, npt.NDArray[Any]]:
        return {"digests": np.take(self.digests, rows, axis=0), "pack": self.pack[rows],
                "offset": self.offset[rows], "stored": self.stored[rows], "raw": self.raw[rows]}

    def chunks(self, entries: int = CHUNK) -> Iterator[dict[str, npt.NDArray[Any]]]:
        for a in range(0, self.n, max(1, entries)):
            b = min(a + max(1, entries), self.n)
            yield {"digests": self.digests[a:b], "pack": self.pack[a:b],
                   "offset": self.offset[a:b], "stored": self.stored[a:b], "raw": self.raw[a:b]}


class Index:
    """The vault index: :attr:`parts` searched in order, one global numbering over them.

    A position is a part's base (the entries of the parts before it) plus its row there;
    a digest in two parts is found in the first.  Pack numbers are into :attr:`pack_ids`,
    the union of the parts' (each part's own numbers remapped).  Callers see entries only
    through :meth:`lookup`, :meth:`locate`, :meth:`entry`, :meth:`find` and
    :meth:`chunks`, never as whole columns, so a part need not be in memory.
    """

    def __init__(self, parts: Sequence[IndexPart], segments: list[str], orphans: list[str],
                 damaged: dict[str, str] | None = None) -> None:
        self.parts = list(parts)
        self.segments = segments
        self.orphans = orphans  # packs indexed from their trailers (no segment yet)
        # segments that could not be read (damaged): name -> what is wrong; the packs they
        # covered are indexed from their own trailers (or blob headers) instead
        self.damaged = damaged if damaged is not None else {}
        where: dict[str, int] = {}
        self._remap: list[npt.NDArray[np.uint32] | None] = []
        for part in self.parts:
            remap = np.array([where.setdefault(p, len(where)) for p in part.pack_ids],
                             dtype=np.uint32)
            # (the first part's numbers, and any part's that match, need no remapping)
            same = bool((remap == np.arange(len(remap), dtype=np.uint32)).all())
            self._remap.append(None if same else remap)
        self.pack_ids = list(where)  # (insertion order: the numbers given)
        self._bases = np.cumsum([0] + [p.n for p in self.parts], dtype=np.int64)

    def __len__(self) -> int:
        return int(self._bases[-1])

    @classmethod
    def empty(cls) -> Index:
        return cls.build([], [], [])

    @classmethod
    def build(cls, parts: list[dict[str, Any]], segments: list[str],
              orphans: list[str]) -> Index:
        """One :class:`MemoryPart` of ``parts`` merged (one entry per digest)."""
        return cls([MemoryPart.build(parts)], segments, orphans)

    def lookup(self, digests: npt.NDArray[np.uint8]) -> npt.NDArray[np.int64]:
        """Position of each digest in the index, or -1 where it is absent: each part is
        asked only for the digests the parts before it do not have."""
        m = len(digests)
        if len(self.parts) == 1:
            return self.parts[0].lookup(digests)
        out = np.full(m, -1, dtype=np.int64)
        todo = np.arange(m)
        for base, part in zip(self._bases.tolist(), self.parts, strict=False):
            if len(todo) == 0:
                break
            if part.n == 0:
                continue
            rows = part.lookup(digests if len(todo) == m else np.ascontiguousarray(
                digests[todo]))
            hit = rows >= 0
            out[todo[hit]] = rows[hit] + base
            todo = todo[~hit]
        return out

    def warm(self, queries: int) -> None:
        """Before forking workers that will look up about ``queries`` ids in batches: the
        paged segments they would each decode whole (:meth:`PagedSegment.warm`) decoded
        here once, inherited by every worker."""
        for part in self.parts:
            if isinstance(part, PagedSegment):
                part.warm(queries)

    def locate(self, positions: npt.NDArray[np.int64]) -> Located:
        """The entries at ``positions`` (as :meth:`lookup` gives them), row i for the i-th."""
        pos = np.asarray(positions, dtype=np.int64).reshape(-1)
        if len(pos) and (int(pos.min()) < 0 or int(pos.max()) >= len(self)):
            raise IndexError(f"index position out of range 0..{len(self) - 1}")
        if len(self.parts) == 1:
            return self._located(0, self.parts[0].gather(pos))
        k = len(pos)
        out = Located(np.empty((k, 32), np.uint8), np.empty(k, np.uint32),
                      np.empty(k, np.uint64), np.empty(k, np.uint32), np.empty(k, np.uint32))
        # group the positions by part (one sort, not a pass per part: segments are many)
        which = np.searchsorted(self._bases, pos, side="right") - 1
        order = np.argsort(which, kind="stable")
        bounds = np.searchsorted(which[order], np.arange(len(self.parts) + 1))
        for i, base in enumerate(self._bases[:-1].tolist()):
            sel = order[bounds[i]:bounds[i + 1]]
            if len(sel) == 0:
                continue
            got = self._located(i, self.parts[i].gather(pos[sel] - base))
            out.digests[sel] = got.digests
            out.pack[sel] = got.pack
            out.offset[sel] = got.offset
            out.stored[sel] = got.stored
            out.raw[sel] = got.raw
        return out

    def _located(self, i: int, d: dict[str, npt.NDArray[Any]]) -> Located:
        """A part's dict of columns, its pack numbers made global."""
        remap = self._remap[i]
        pack = d["pack"] if remap is None else remap[d["pack"]]
        return Located(d["digests"], pack, d["offset"], d["stored"], d["raw"])

    def chunks(self, entries: int | None = None) -> Iterator[tuple[int, Located]]:
        """Every entry of every part once, in position order, about ``entries`` (default
        :data:`CHUNK`) at a time, each chunk with the position of its first entry.
        An entry in two parts comes twice (its copy in the later part is one
        :meth:`lookup` never finds)."""
        size = CHUNK if entries is None else entries  # (read at the call: tests lower it)
        for i, part in enumerate(self.parts):
            at = int(self._bases[i])
            for d in part.chunks(size):
                got = self._located(i, d)
                yield at, got
                at += len(got.offset)

    def copies(self, base: int, got: Located, among: npt.NDArray[np.bool_]
               ) -> npt.NDArray[np.bool_]:
        """Which entries of a chunk of :meth:`chunks` (``among`` them) are copies of an entry
        at an earlier position: the same digest, pack and offset.  A merge killed after
        its segment was written, before its inputs were retired, leaves every entry of
        those inputs twice; :meth:`lookup` finds the first copy only, so a count of the
        entries no point references must leave the other out (it is not a dead blob:
        gc and verify would count the same blob live and dead).  Only ``among`` is
        looked up (the unreferenced ones: few, normally)."""
        out = np.zeros(len(got.offset), dtype=bool)
        if len(self.parts) < 2 or base < int(self._bases[1]):
            return out  # (no copy in the first part: one entry per digest there)
        cand = np.nonzero(among)[0]
        if not len(cand):
            return out
        pos = self.lookup(np.ascontiguousarray(got.digests[cand]))
        own = base + cand
        elsewhere = (pos >= 0) & (pos != own)
        if not elsewhere.any():
            return out
        cand, pos = cand[elsewhere], pos[elsewhere]
        first = self.locate(pos)
        same = (first.pack == got.pack[cand]) & (first.offset == got.offset[cand])
        out[cand[same]] = True
        return out

    def sorted_streams(self, keep: npt.NDArray[np.bool_] | None = None,
                       entries: int | None = None) -> list[Iterator[dict[str, Any]]]:
        """Per part, its entries (those ``keep``, over positions, marks) in digest order
        as chunks in segment form (digests, pack_uuid, offset, stored, raw): the inputs
        of :func:`cbt.repo.compact.merge`.  A paged part streams; the in-memory part,
        sorted by 8 bytes only, is sorted whole (it is in memory already)."""
        size = CHUNK if entries is None else entries
        uuids = uuid_table(self.pack_ids)
        return [self._sorted_stream(i, keep, size, uuids) for i in range(len(self.parts))]

    def _sorted_stream(self, i: int, keep: npt.NDArray[np.bool_] | None, size: int,
                       uuids: npt.NDArray[np.uint8]) -> Iterator[dict[str, Any]]:
        part, at = self.parts[i], int(self._bases[i])
        held: list[dict[str, Any]] = []
        for d in part.chunks(size):
            got = self._located(i, d)
            n = len(got.offset)
            mask = np.ones(n, dtype=bool) if keep is None else keep[at:at + n]
            at += n
            chunk = {"digests": got.digests[mask], "pack_uuid": uuids[got.pack[mask]],
                     "offset": got.offset[mask], "stored": got.stored[mask],
                     "raw": got.raw[mask]}
            if isinstance(part, MemoryPart):
                held.append(chunk)
            elif n:
                yield chunk
        if held:
            whole = {k: np.concatenate([c[k] for c in held]) for k in held[0]}
            keys = whole["digests"].reshape(-1, 32).view("S32").ravel()
            order = np.argsort(keys, kind="stable")
            for a in range(0, len(order), size):
                rows = order[a:a + size]
                yield {k: v[rows] for k, v in whole.items()}

    def entry(self, pos: int) -> IndexEntry:
        """The entry at a position :meth:`lookup` returned."""
        e = self.locate(np.array([pos], dtype=np.int64))
        return IndexEntry(e.digests[0].tobytes(), self.pack_ids[int(e.pack[0])],
                          int(e.offset[0]), int(e.stored[0]), int(e.raw[0]))

    def find(self, digest: bytes) -> IndexEntry | None:
        """The entry of one digest, or None."""
        pos = int(self.lookup(np.frombuffer(digest, dtype=np.uint8).reshape(1, 32))[0])
        return None if pos < 0 else self.entry(pos)

    def token(self) -> tuple[str, ...]:
        """What this index was loaded from: equal tokens, equal indexes."""
        return (*self.segments, "|", *self.orphans, "|", *sorted(self.damaged))


class IndexCache:
    """The index a run loaded, for its workers; passed to them, never a global.

    Threads share one cache; a forked worker inherits a copy with the index
    already in it; a worker elsewhere starts with an empty cache and loads
    the index once, for every shard of the same run (the same token).
    """

    def __init__(self, index: Index | None = None) -> None:
        self._index = index
        self._mutex = threading.Lock()

    def get(self, storage: Storage, token: tuple[str, ...],
            loader: Callable[[], Index] | None = None) -> Index:
        """The index with this token: the cached one, or loaded from ``storage``
        (by ``loader`` when given: an encrypted vault's unseals its segments)."""
        with self._mutex:
            if self._index is None or self._index.token() != token:
                self._index = loader() if loader is not None else load(storage)
            return self._index


# -- segments on disk ----------------------------------------------------------


def read_segment(data: bytes, where: str) -> dict[str, Any]:
    """A segment's checked entries, each row's pack as a number into ``pack_ids``."""
    part = index_segment.read_segment(data, where)
    return {**part, **_pack_numbers(part.pop("packs"))}


def _pack_numbers(packs: npt.NDArray[np.uint8]) -> dict[str, Any]:
    """Each row's pack (16 uuid bytes) as a number into a list of pack ids.

    numpy's unique is 7x faster on 8-byte integers than on 16-byte records, so
    it runs on the uuid's first 8 bytes, and the result is checked against all
    16 (two packs sharing 8 random bytes fall back to the slow way).
    """
    n = len(packs)
    if n == 0:
        return {"pack": np.zeros(0, dtype=np.uint32), "pack_ids": []}
    head = np.ascontiguousarray(packs[:, :8]).view("<u8").ravel()
    _, first, inverse = np.unique(head, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    uuids = packs[first]
    if not (uuids[inverse] == packs).all():
        _, first, inverse = np.unique(packs.view("V16").ravel(), return_index=True,
                                      return_inverse=True)
        inverse = inverse.reshape(-1)
        uuids = packs[first]
    return {"pack": inverse.astype(np.uint32),
            "pack_ids": [uuid.UUID(bytes=u.tobytes()).hex for u in uuids]}


def trailer_part(storage: Storage, name: str) -> dict[str, Any]:
    """Index entries of one pack, read from its trailer."""
    entries = read_pack_trailer(lambda offset, length: storage.read_range(name, offset, length),
                                storage.size(name), storage.where(name))
    n = len(entries)
    return {
        "digests": np.frombuffer(entries["digest"].tobytes(), dtype=np.uint8).reshape(n, 32),
        "pack": np.zeros(n, dtype=np.uint32),
        "pack_ids": [pack_id_of(name)],
        "offset": entries["offset"].astype(np.uint64),
        "stored": entries["stored"].astype(np.uint32),
        "raw": entries["raw"].astype(np.uint32),
    }


def load(storage: Storage, warnings: list[str] | None = None,
         segment_names: Callable[[], list[str]] | None = None,
         read: Callable[[str], bytes] | None = None, headers: bool = False,
         open_paged: Callable[[str], IndexPart] | None = None,
         exclude: Mapping[str, str] | None = None) -> Index:
    """Open every segment, then index packs no segment covers from their trailers.

    ``segment_names`` lists the segments and ``read`` reads a legacy (Arrow) one whole
    (an encrypted vault's unseal them); by default, plain ``index/*.arrow`` files.
    ``open_paged`` opens a paged segment (its name ends in ``.cbtidx``): only its head
    is read, its pages stay where they lie, each a part of the index.  The legacy
    segments and the orphan packs' trailers are merged into one :class:`MemoryPart`,
    asked last.
    Readers take no lock: when a writer merges segments under our feet (the
    merged one is written before the old ones go), a segment listed a moment
    ago can vanish; then we list again.

    A damaged segment is skipped (named in ``warnings`` and ``Index.damaged``):
    the packs it covered are indexed from their own trailers like any pack no
    segment covers, and with ``headers`` a pack whose trailer is lost too from
    its blob headers (a reader that checks every block it reads: restore,
    verify), as repair does.  A paged segment's page is checked when a lookup reads
    it: a damaged one raises :class:`PagedIndexError` naming the segment, and
    :func:`skipping_damaged` loads again with it in ``exclude`` (name -> why), so
    it is set aside like a segment damaged at its head.
    """
    names = segment_names or (lambda: [s for s in storage.list("index") if s.endswith(".arrow")])
    get = read or storage.get
    for _attempt in range(20):
        try:
            listed = names()
            segments, parts, paged, damaged = _read_segments(
                storage, [n for n in listed if n not in (exclude or {})], get, open_paged)
            damaged.update({n: why for n, why in (exclude or {}).items() if n in listed})
            break
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
    else:
        raise CorruptIndexError(f"index segments of {storage.root} keep changing; retry")
    pack_names = storage.list("packs")
    paged = _own_segments(storage, pack_names, paged, segments, damaged)
    for why in damaged.values():
        if warnings is not None:
            warnings.append(f"ignoring damaged index segment: {why}; its packs are indexed "
                            "from their own trailers")
    covered = {p for part in parts for p in part["pack_ids"]}
    covered.update(p for seg in paged for p in seg.pack_ids)
    orphans = []
    for name in pack_names:
        if not is_pack_name(name) or pack_id_of(name) in covered:
            continue
        try:
            parts.append(trailer_part(storage, name))
            orphans.append(name)
        except CorruptPackError as exc:
            part = header_part(storage, name) if headers else None
            if part is not None:
                parts.append(part)
                orphans.append(name)
            elif warnings is not None:
                warnings.append(f"ignoring unreadable pack: {exc}")
    memory: list[IndexPart] = [MemoryPart.build(parts)] if parts or not paged else []
    # (the paged segments first: a digest both in one and in an orphan pack, a racing
    # worker's spare copy, resolves to the segment's entry, and gc drops the spare)
    return Index([*paged, *memory], segments, orphans, damaged)


def open_paged(storage: Storage, name: str, cipher: Cipher | None) -> PagedSegment:
    """The segment ``name``, its head read and checked, its pages left where they lie."""
    size = stored_size(storage, name)
    return PagedSegment.open(lambda offset, length: read_segment_range(storage, name, offset,
                                                                       length),
                             size, name=name, where=storage.where(name), cipher=cipher)


def stored_size(storage: Storage, name: str) -> int:
    """The size of segment ``name``, where it was listed or in the trash."""
    try:
        return storage.size(name)
    except CbtIOError as exc:
        if exc.errno != errno.ENOENT:
            raise
    return storage.size(segment_trash_name(name))


_T = TypeVar("_T")
SKIP_AT_MOST = 64  # damaged segments a command sets aside before it gives up


def skipping_damaged(load_index: Callable[[dict[str, str]], Index],
                     run: Callable[[Index], _T]) -> _T:
    """``run`` on the index ``load_index`` loads (given the segments to set aside); when a
    paged segment's page turns out damaged, again on an index without that segment (its
    packs then indexed from their trailers), as if it had been damaged at its head."""
    exclude: dict[str, str] = {}
    while True:
        index = load_index(dict(exclude))
        try:
            return run(index)
        except PagedIndexError as exc:
            if exc.segment is None or exc.segment in exclude or len(exclude) >= SKIP_AT_MOST:
                raise
            exclude[exc.segment] = str(exc)


def _own_segments(storage: Storage, pack_names: list[str], paged: list[IndexPart],
                  segments: list[str], damaged: dict[str, str]) -> list[IndexPart]:
    """The paged segments that name a pack of this vault (:func:`foreign_segments`); the
    others are moved from ``segments`` to ``damaged``."""
    names = [n for n in segments if n.endswith(PAGED_SUFFIX)]
    if len(names) != len(paged):
        return paged  # (not ours to judge: a caller's own segment names)
    foreign = foreign_segments(storage, pack_names, dict(zip(names, paged, strict=True)))
    for name in foreign:
        segments.remove(name)
    damaged.update(foreign)
    return [seg for name, seg in zip(names, paged, strict=True) if name not in foreign]


def foreign_segments(storage: Storage, pack_names: list[str], paged: dict[str, IndexPart]
                     ) -> dict[str, str]:
    """The paged segments (name -> why) none of whose packs the vault holds (in
    ``packs/``, listed as ``pack_names``, or in its trash): a plain vault's segment
    copied from another vault (nothing authenticates it).  Searched, such a segment
    would answer for the blocks it lists with packs that are not here: a backup would
    deduplicate against them (its point unrestorable), a restore of a point whose
    blocks the vault does hold would fail, and a merge would make its entries part of
    a segment of this vault.  (A segment some of whose packs are missing is kept:
    those packs are lost, and verify names them.)"""
    present = {pack_id_of(n) for n in pack_names if is_pack_name(n)}
    foreign = [n for n, seg in paged.items()
               if seg.pack_ids and not any(p in present for p in seg.pack_ids)]
    if foreign:
        from cbt.repo.trash import TRASH

        trashed = {n.rsplit("/", 1)[-1].removesuffix(".pack") for n in storage.list(TRASH)}
        foreign = [n for n in foreign if not any(p in trashed for p in paged[n].pack_ids)]
    return {n: f"{storage.where(n)} names {len(paged[n].pack_ids)} packs, none of them in "
               "this vault (copied from another vault?)" for n in foreign}


PAGED_SUFFIX = ".cbtidx"  # a paged segment's name ends so (cbt.repo.vault.PAGED)


def _read_segments(storage: Storage, names: list[str], get: Callable[[str], bytes],
                   open_paged: Callable[[str], IndexPart] | None
                   ) -> tuple[list[str], list[dict[str, Any]], list[IndexPart], dict[str, str]]:
    """The segments that opened, the legacy ones' entries, the paged ones, and the
    damaged ones (name -> why); a segment gone meanwhile raises ENOENT (the caller
    lists again)."""
    segments, parts, paged, damaged = [], [], [], {}
    for name in names:
        try:
            if name.endswith(PAGED_SUFFIX):
                if open_paged is None:
                    raise CorruptIndexError(f"{storage.where(name)}: a paged index segment, "
                                            "and no way to open it given")
                paged.append(open_paged(name))
            else:
                parts.append(read_segment(get(name), storage.where(name)))
            segments.append(name)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                raise
            damaged[name] = str(exc)
        except CbtError as exc:
            damaged[name] = str(exc)
    return segments, parts, paged, damaged


def header_part(storage: Storage, name: str) -> dict[str, Any] | None:
    """Index entries of one pack whose trailer is lost, from its blob headers (None when
    none parses).  Unchecked: only for readers that check each block they read."""
    try:
        blobs = scan_blobs(storage.get(name))
    except OSError:
        return None
    if not blobs:
        return None
    n = len(blobs)
    return {
        "digests": np.frombuffer(b"".join(b[0] for b in blobs), dtype=np.uint8).reshape(n, 32),
        "pack": np.zeros(n, dtype=np.uint32),
        "pack_ids": [pack_id_of(name)],
        "offset": np.array([b[1] for b in blobs], dtype=np.uint64),
        "stored": np.array([b[2] for b in blobs], dtype=np.uint32),
        "raw": np.array([b[3] for b in blobs], dtype=np.uint32),
    }


def segment_entries(entries: Sequence[IndexEntry]) -> dict[str, Any]:
    """Entries in segment form (:func:`segment_bytes`)."""
    n = len(entries)
    digests = np.frombuffer(b"".join(e.digest for e in entries), dtype=np.uint8)
    packs = np.frombuffer(b"".join(uuid.UUID(hex=e.pack).bytes for e in entries), dtype=np.uint8)
    return {
        "digests": digests.reshape(n, 32),
        "pack_uuid": packs.reshape(n, 16),
        "offset": np.array([e.offset for e in entries], dtype=np.uint64),
        "stored": np.array([e.stored for e in entries], dtype=np.uint32),
        "raw": np.array([e.raw for e in entries], dtype=np.uint32),
    }


def uuid_table(pack_ids: list[str]) -> npt.NDArray[np.uint8]:
    """Pack uuids as rows of 16 bytes, one per pack number."""
    return np.frombuffer(b"".join(uuid.UUID(hex=p).bytes for p in pack_ids) or b"",
                         dtype=np.uint8).reshape(-1, 16)


def select_entries(index: Index,
                   pick: Callable[[int, Located], npt.NDArray[np.bool_]]) -> dict[str, Any]:
    """The entries ``pick`` keeps, in segment form and index order: it is given each chunk
    of :meth:`Index.chunks` (its first position and entries) and says which to keep, so
    only a chunk and the kept entries are held at once."""
    uuids = uuid_table(index.pack_ids)
    cols: dict[str, list[Any]] = {"digests": [np.zeros((0, 32), np.uint8)],
                                  "pack_uuid": [np.zeros((0, 16), np.uint8)],
                                  "offset": [np.zeros(0, np.uint64)],
                                  "stored": [np.zeros(0, np.uint32)],
                                  "raw": [np.zeros(0, np.uint32)]}
    for base, got in index.chunks():
        mask = pick(base, got)
        if not mask.any():
            continue
        cols["digests"].append(got.digests[mask])
        cols["pack_uuid"].append(uuids[got.pack[mask]])
        for k in ("offset", "stored", "raw"):
            cols[k].append(getattr(got, k)[mask])
    return {k: np.concatenate(v) for k, v in cols.items()}


def entries_for_packs(index: Index, packs: set[str]) -> dict[str, Any]:
    """The index entries whose pack is in ``packs``, in segment form (streamed: see
    :func:`select_entries`)."""
    sel = np.array([i for i, p in enumerate(index.pack_ids) if p in packs], dtype=np.uint32)
    if len(sel) == len(index.pack_ids):
        return select_entries(index, lambda _base, got: np.ones(len(got.offset), dtype=bool))
    return select_entries(index, lambda _base, got: np.isin(got.pack, sel))

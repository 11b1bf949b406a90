"""Paged index segments: a vault index segment searched where it lies, never loaded whole.

A segment maps block ids (32-byte digests, in ascending byte order) to where the
block is stored: pack number, offset, stored and raw length.  It is written as a
stream (no seeking: an object store takes a stream of parts) and read by ranges.

Layout (all integers little-endian)::

    page 0 .. page P-1    data pages, PAGE_ENTRIES entries each (the last may hold
                          fewer), columnar: digests [k*32], pack u32 [k],
                          offset u64 [k], stored u32 [k], raw u32 [k]  (52 B/entry)
    head                  pack uuids [npacks*16]        (pack number -> uuid)
                          fences [P*8]                  first 8 bytes of each page's
                                                        first digest
                          spans [P] u8                  1 when the page before ends
                                                        with that same 8-byte prefix
                          page checks [P*16]            BLAKE3 of each page as stored
                          filter [nblocks*64]           blocked Bloom filter
    trailer  96 B         b"CBTPGIX1", u32 version, u32 flags (1 = sealed),
                          u32 page entries, u32 filter probes, u64 entries,
                          u64 packs, u64 filter blocks, u64 head offset,
                          u64 head length, BLAKE3 of the head as stored [16],
                          BLAKE3 of the trailer's first 80 bytes [16]

In a sealed (encrypted) segment each page and the head are sealed on their own
with the vault's AEAD (``nonce || ciphertext || tag``, :data:`OVERHEAD` bytes
more).  A page's associated data is the magic, the segment's name and the page
number; the head's is the magic, the name and the trailer's counts.  The head,
authenticated, holds every page's check (so the page count too): a page moved
to another place or segment, swapped, or left from an older segment of the same
name fails.  Every size follows from the trailer's counts without decrypting.

Writing (:class:`PagedWriter`), for entries given in ascending digest order:

1. Refuse an entry not above the one before (out of order or duplicate).
2. Number each new pack uuid in order of first appearance.
3. Set the entry's filter bits: block = digest bytes 8..16 (as an integer)
   modulo the block count, then 7 bit positions in that 512-bit block from
   bytes 16..24, 9 bits each.  (Ids are uniformly random; the fences use bytes
   0..8, so the filter's bits are independent of them.)
4. Each time PAGE_ENTRIES entries are pending, write them as one page (sealed
   when a cipher is given) and keep its fence, span flag and check.
5. On finish: the last (short) page, the head, the trailer.

Reading (:class:`PagedSegment`):

1. Open: read the trailer, check its checksum, magic, version and that every
   count fits the segment's size *before* allocating anything; read the head,
   check its checksum (and unseal it); keep it (:attr:`PagedSegment.head_bytes`).
2. :meth:`~PagedSegment.maybe`: the filter; False means certainly absent.
3. :meth:`~PagedSegment.lookup`: ids the filter passes go to the last page whose
   fence is <= their 8-byte prefix (and the pages before it while a span flag says
   a run of equal prefixes crosses into it).  Wanted pages are read in ascending
   order, adjacent ones in one read, at most :data:`BATCH_PAGES` at a time; each
   page is checked (its BLAKE3 against the head, digests strictly ascending and
   within its fences, pack numbers known) before use.  The pages of a batch are
   consecutive slices of one sorted run, so one ``searchsorted`` over their
   concatenated digests finds every id of the batch.
4. :meth:`~PagedSegment.gather`: the entries at given rows, reading each page once
   (:meth:`~PagedSegment.find`: a lookup that returns the entries too).
5. :meth:`~PagedSegment.chunks`: every entry in order, a bounded number of pages
   at a time.

Compaction streams the union of several segments' :meth:`~PagedSegment.chunks`
into a writer (:func:`cbt.repo.segments.merge_paged`).

Memory: an open segment holds its head, 1.72 bytes an entry (the filter 1.5, the
fences, span flags and checks 0.2, 16 bytes a pack), and at most
:data:`CACHE_PAGES` pages' plaintexts (426 KB); a lookup adds one batch of
pages (read, checked, decoded: a few MB) and the filter's temporaries for
:data:`FILTER_STEP` ids.  A segment asked about most of its pages at once is kept
decoded whole (resident: 72 bytes an entry), within :data:`RESIDENT_BYTES` for all the
segments of a process.  A writer holds the head it is building and the
entries of one unfinished page, besides what its caller hands it.
"""

from __future__ import annotations

import struct
import sys
import threading
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import blake3
import numpy as np
import numpy.typing as npt

from cbt.core.crypto import OVERHEAD, AuthenticationError, Cipher
from cbt.core.native import fast
from cbt.format.index_segment import CorruptIndexError

# Do not modify: this magic, version and layout identify and decode every paged
# index segment ever written.
PAGED_MAGIC = b"CBTPGIX1"
PAGED_VERSION = 1
TRAILER = struct.Struct("<8sIIIIQQQQQ16s16s")
TRAILER_SIZE = TRAILER.size  # 96
FLAG_SEALED = 1
ENTRY_SIZE = 32 + 4 + 8 + 4 + 4  # digest, pack, offset, stored, raw
CHECK_SIZE = 16
FILTER_BLOCK = 64  # bytes: one cache line, 512 bits
FILTER_PROBES = 7  # 7 positions x 9 bits from one 64-bit word
# 128 entries: a page is 6.6 KB (two 4 KiB disk pages: a lookup that misses the
# filter's "certainly not" reads that much), and the head spends 25 bytes a page
# (fence, span flag, check), 0.2 bytes an entry.  64 doubles that per-entry cost;
# 1024 reads 53 KB per lookup for little gain on a local disk.
PAGE_ENTRIES = 128
# 12 bits an entry: measured 0.40% false positives on random ids at 7 probes
# (10 bits: 0.98%), 1.5 MB per million entries.
FILTER_BITS = 12
BATCH_PAGES = 128  # pages read and decoded at once by lookup/gather: 852 KB of pages
CACHE_PAGES = 64  # plaintexts of the pages read last, kept: 64 x 6.6 KB = 426 KB
# A lookup that asks about as many ids as the segment has pages or more (a backup
# worker's batch of 2048 read blocks, a restore's plan) reads nearly every page anyway:
# such a segment is read, checked and decoded whole once and kept decoded ("resident"),
# every later lookup one search over it.  Segments of a process are resident within
# RESIDENT_BYTES in all (72 bytes an entry decoded: 16 MiB is about 230,000 entries; a
# larger segment, or one past the budget, stays paged).  Measured on the ext4db set's
# vault (77,000 entries, two segments), 38 lookups of 2048 present ids: 0.32 s paged,
# 0.17 with every page's plaintext cached (each lookup decodes its pages again),
# 0.015 in memory.
RESIDENT_BYTES = 16 << 20
RESIDENT_ENTRY = ENTRY_SIZE + 8 + 8 + 4  # the columns, the key, the row, the page sizes
MIN_PAGE_ENTRIES, MAX_PAGE_ENTRIES = 64, 1024
# ids a filter pass takes at once: bounds its temporaries (about 60 bytes an id per
# probe array: 8192 ids -> ~3.5 MB) while keeping the per-call overhead negligible
FILTER_STEP = 8192

assert TRAILER_SIZE == 96


class _Budget:
    """The process's bytes of resident segments (threads share it; a forked child has a
    copy of its own, as it has copies of the segments)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> bool:
        with self._lock:
            if self.used + nbytes > self.limit:
                return False
            self.used += nbytes
            return True

    def give(self, nbytes: int) -> None:
        with self._lock:
            self.used -= nbytes


RESIDENT = _Budget(RESIDENT_BYTES)


class PagedIndexError(CorruptIndexError):
    """A paged index segment fails its checks (truncated, altered, crafted, or not one);
    ``segment`` is its name in the vault, when known (a reader may then set it aside)."""

    def __init__(self, message: str, segment: str | None = None) -> None:
        super().__init__(message)
        self.segment = segment


def filter_blocks(total: int) -> int:
    """Blocks of the filter of a segment of at most ``total`` entries."""
    return -(-total * FILTER_BITS // (FILTER_BLOCK * 8))


def distinct(a: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """The distinct values of ``a``, sorted: ``np.unique(a)``, which imports ``numpy.ma``
    for it (about 8 ms of every command that opens an index: ``cbt restore``'s start)."""
    s = np.sort(a)
    return s[np.concatenate(([True], s[1:] != s[:-1]))] if len(s) else s


def _page_count(n: int, per: int) -> int:
    return -(-n // per)


def _layout(n: int, per: int, npacks: int, nblocks: int, sealed: bool) -> tuple[int, int]:
    """(bytes of the data pages, bytes of the head as stored)."""
    npages = _page_count(n, per)
    extra = OVERHEAD if sealed else 0
    pages = n * ENTRY_SIZE + npages * extra
    head = npacks * 16 + npages * (8 + 1 + CHECK_SIZE) + nblocks * FILTER_BLOCK + extra
    return pages, head


def segment_size(n: int, npacks: int, sealed: bool, total: int | None = None) -> int:
    """Bytes of a segment of ``n`` entries in ``npacks`` packs (its filter sized for
    ``total``, default ``n``), as :class:`PagedWriter` writes it."""
    pages, head = _layout(n, PAGE_ENTRIES, npacks, filter_blocks(n if total is None else total),
                          sealed)
    return pages + head + TRAILER_SIZE


def _page_aad(name: str, page: int) -> bytes:
    return PAGED_MAGIC + b"page\0" + name.encode() + b"\0" + page.to_bytes(8, "little")


def _head_aad(name: str, counts: bytes) -> bytes:
    return PAGED_MAGIC + b"head\0" + name.encode() + b"\0" + counts


def _check(data: bytes | memoryview) -> bytes:
    return bytes(blake3.blake3(data).digest(length=CHECK_SIZE))


def prefix_keys(digests: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint64]:
    """The first 8 bytes of each digest as an integer (big-endian: sort order = byte order)."""
    return np.ascontiguousarray(digests[:, :8]).view(">u8").ravel().astype(np.uint64)


def _sortable(digests: npt.NDArray[np.uint8]) -> npt.NDArray[Any]:
    """Digests as 32-byte strings: numpy orders and searches them as memcmp does."""
    return np.ascontiguousarray(digests).view("S32").ravel()


def _filter_slots(digests: npt.NDArray[np.uint8], nblocks: int
                  ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8]]:
    """Byte index (m, probes) and bit mask (m, probes) of each digest's filter bits."""
    h1 = np.ascontiguousarray(digests[:, 8:16]).view("<u8").ravel()
    h2 = np.ascontiguousarray(digests[:, 16:24]).view("<u8").ravel()
    block = (h1 % np.uint64(nblocks)).astype(np.int64) * FILTER_BLOCK
    shifts = np.arange(FILTER_PROBES, dtype=np.uint64) * np.uint64(9)
    pos = ((h2[:, None] >> shifts[None, :]) & np.uint64(511)).astype(np.int64)
    return block[:, None] + (pos >> 3), np.left_shift(1, pos & 7).astype(np.uint8)


def _as_digests(digests: Any) -> npt.NDArray[np.uint8]:
    a = np.ascontiguousarray(digests, dtype=np.uint8)
    if a.ndim != 2 or a.shape[1] != 32:
        a = a.reshape(-1, 32)
    return a


# -- writing ---------------------------------------------------------------------


class PagedWriter:
    """Streams entries, given in ascending digest order across calls, into a segment.

    Memory is bounded by the head (filter, fences, page checks, pack table) and
    one pending page, never by the entries.  ``total`` is an upper bound of the
    entries (it sizes the filter); more is a :class:`ValueError`.
    """

    def __init__(self, write: Callable[[bytes | memoryview], object], *, total: int, name: str,
                 cipher: Cipher | None = None) -> None:
        if total < 0:
            raise ValueError("total must be >= 0")
        self._write = write
        self._total = total
        self._name = name
        self._cipher = cipher
        self._nblocks = filter_blocks(total)
        self._filter = np.zeros(self._nblocks * FILTER_BLOCK, dtype=np.uint8)
        self._packs: dict[bytes, int] = {}
        self._fences = bytearray()
        self._spans = bytearray()
        self._checks = bytearray()
        self._pending: list[dict[str, npt.NDArray[Any]]] = []
        self._npending = 0
        self._last: bytes | None = None  # the last digest added
        self._prev_prefix: bytes | None = None  # the last page's last 8-byte prefix
        self._n = 0
        self._written = 0
        self._done = False

    def add(self, digests: npt.ArrayLike, pack_uuid: npt.ArrayLike, offset: npt.ArrayLike,
            stored: npt.ArrayLike, raw: npt.ArrayLike) -> None:
        if self._done:
            raise ValueError("segment already finished")
        d = _as_digests(digests)
        m = len(d)
        packs = np.ascontiguousarray(pack_uuid, dtype=np.uint8).reshape(m, 16)
        cols: dict[str, npt.NDArray[Any]] = {
            "offset": np.asarray(offset, dtype=np.uint64).reshape(m),
            "stored": np.asarray(stored, dtype=np.uint32).reshape(m),
            "raw": np.asarray(raw, dtype=np.uint32).reshape(m)}
        if m == 0:
            return
        if self._n + m > self._total:
            raise ValueError(f"more entries than the total given ({self._total})")
        s = _sortable(d)
        if m > 1 and not (s[1:] > s[:-1]).all():
            raise ValueError("digests not strictly ascending (out of order or duplicate)")
        if self._last is not None and not d[0].tobytes() > self._last:
            raise ValueError("digests not strictly ascending (out of order or duplicate)")
        self._last = d[-1].tobytes()
        # numbers for the packs, in order of first appearance (so that the bytes do not
        # depend on how the entries were split into calls); few distinct packs per
        # call: a loop over those
        uniq, first, inverse = np.unique(packs.view("V16").ravel(), return_index=True,
                                         return_inverse=True)
        numbers = np.zeros(len(uniq), dtype=np.uint32)
        for i in np.argsort(first, kind="stable").tolist():
            numbers[i] = self._packs.setdefault(uniq[i].tobytes(), len(self._packs))
        cols["pack"] = numbers[inverse.reshape(-1)]
        cols["digests"] = d
        for i in range(0, m if self._nblocks else 0, FILTER_STEP):
            where, bits = _filter_slots(d[i:i + FILTER_STEP], self._nblocks)
            np.bitwise_or.at(self._filter, where.ravel(), bits.ravel())
        self._n += m
        self._pending.append(cols)
        self._npending += m
        while self._npending >= PAGE_ENTRIES:
            self._page(PAGE_ENTRIES)
        # what waits for the next page is copied: the caller may reuse its arrays
        self._pending = [{c: a.copy() for c, a in part.items()} for part in self._pending]

    def _take(self, k: int) -> dict[str, npt.NDArray[Any]]:
        """The first ``k`` pending entries, removed from the pending list."""
        parts: dict[str, list[npt.NDArray[Any]]] = {c: [] for c in self._pending[0]}
        need = k
        while need:
            head = self._pending[0]
            take = min(need, len(head["offset"]))
            for c, a in head.items():
                parts[c].append(a[:take])
            if take == len(head["offset"]):
                self._pending.pop(0)
            else:
                self._pending[0] = {c: a[take:] for c, a in head.items()}
            need -= take
        self._npending -= k
        return {c: np.concatenate(v) for c, v in parts.items()}

    def _page(self, k: int) -> None:
        cols = self._take(k)
        number = len(self._spans)
        plain = b"".join((cols["digests"].tobytes(), cols["pack"].astype("<u4").tobytes(),
                          cols["offset"].astype("<u8").tobytes(),
                          cols["stored"].astype("<u4").tobytes(),
                          cols["raw"].astype("<u4").tobytes()))
        data = (self._cipher.seal(plain, _page_aad(self._name, number))
                if self._cipher is not None else plain)
        first = cols["digests"][0, :8].tobytes()
        self._fences += first
        self._spans.append(1 if self._prev_prefix == first else 0)
        self._prev_prefix = cols["digests"][-1, :8].tobytes()
        self._checks += _check(data)
        self._emit(data)

    def _emit(self, data: bytes | memoryview) -> None:
        self._write(data)
        self._written += len(data)

    def finish(self) -> int:
        """Write the last page, the head and the trailer; the bytes written in all."""
        if self._done:
            raise ValueError("segment already finished")
        if self._npending:
            self._page(self._npending)
        self._done = True
        sealed = self._cipher is not None
        uuids = b"".join(self._packs)  # dict order = pack numbers
        head = b"".join((uuids, bytes(self._fences), bytes(self._spans), bytes(self._checks),
                         self._filter.tobytes()))
        head_offset = self._written
        counts = _counts(sealed, self._n, len(self._packs), self._nblocks, head_offset,
                         len(head) + (OVERHEAD if sealed else 0))
        if self._cipher is not None:
            head = self._cipher.seal(head, _head_aad(self._name, counts))
        self._emit(head)
        first = counts + _check(head)
        self._emit(first + _check(first))
        return self._written


def _counts(sealed: bool, n: int, npacks: int, nblocks: int, head_offset: int,
            head_length: int) -> bytes:
    """The trailer's first 64 bytes: magic, version, flags and counts."""
    return TRAILER.pack(PAGED_MAGIC, PAGED_VERSION, FLAG_SEALED if sealed else 0,
                        PAGE_ENTRIES, FILTER_PROBES, n, npacks, nblocks, head_offset,
                        head_length, b"", b"")[:64]


# -- reading ---------------------------------------------------------------------


class _Pages:
    """Decoded pages, concatenated in ascending page order (a sorted run)."""

    def __init__(self, pages: npt.NDArray[np.int64], sizes: npt.NDArray[np.int64],
                 cols: tuple[npt.NDArray[Any], ...], per: int) -> None:
        self.pages = pages
        self.start = np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.int64)
        # (keys: each digest's 8-byte prefix as an integer, as the decode checked them)
        self.digests, self.pack, self.offset, self.stored, self.raw, self.keys = cols
        # the segment row of each position
        self.rows = (np.repeat(pages * per - self.start, sizes)
                     + np.arange(int(sizes.sum()), dtype=np.int64))

    def select(self, pos: npt.NDArray[np.int64]) -> dict[str, npt.NDArray[Any]]:
        return {"digests": self.digests[pos], "pack": self.pack[pos],
                "offset": self.offset[pos], "stored": self.stored[pos], "raw": self.raw[pos]}


def _empty_entries(k: int = 0) -> dict[str, npt.NDArray[Any]]:
    return {"digests": np.zeros((k, 32), np.uint8), "pack": np.zeros(k, np.uint32),
            "offset": np.zeros(k, np.uint64), "stored": np.zeros(k, np.uint32),
            "raw": np.zeros(k, np.uint32)}


def trailer_entries(read_range: Callable[[int, int], bytes], size: int, *, where: str) -> int:
    """The entry count a segment's trailer gives (trailer read and checked: checksum,
    magic, version, the count bounded by the size), without reading its head: what
    choosing segments to merge needs of each (:func:`cbt.repo.segments.compact`), so
    that choosing does not hold every segment's filter beside the index's own."""
    def fail(what: str) -> Any:
        raise PagedIndexError(f"corrupt index segment {where}: {what}")

    if size < TRAILER_SIZE:
        fail(f"{size} bytes, too short for a paged index segment")
    trailer = read_range(size - TRAILER_SIZE, TRAILER_SIZE)
    if len(trailer) != TRAILER_SIZE:
        fail(f"the trailer truncated (read {len(trailer)} of {TRAILER_SIZE} bytes)")
    magic, version, *_counts, trailer_check = TRAILER.unpack(trailer)
    n = _counts[3]  # (flags, page entries, probes, then the entries)
    if magic != PAGED_MAGIC:
        fail("not a paged index segment (bad magic)")
    if _check(trailer[:80]) != trailer_check:
        fail("trailer checksum mismatch")
    if version > PAGED_VERSION:
        raise PagedIndexError(f"index segment {where} is from a newer cbt (format {version})")
    if version != PAGED_VERSION:
        fail(f"unknown format version {version}")
    if n > size // ENTRY_SIZE:
        fail(f"counts do not fit its size ({n} entries in {size} bytes)")
    return int(n)


class PagedSegment:
    """An open paged segment: its head in memory, its pages read when needed."""

    n: int
    pack_ids: list[str]  # uuid hex of each pack number
    head_bytes: int  # memory the open segment holds (not counting the page cache)
    _read_range: Callable[[int, int], bytes]
    _read_many: Callable[[list[tuple[int, int]]], Sequence[bytes]]
    _where: str
    _name: str
    _cipher: Cipher | None
    _cache: OrderedDict[int, bytes]  # page -> checked plaintext
    _lock: threading.Lock
    _resident: _Pages | None  # every page decoded, once the segment is resident
    _resident_tried: bool
    _cache_pages: int
    _per: int
    _sealed: bool
    _npages: int
    _nblocks: int
    _uuids: npt.NDArray[np.uint8]
    _fences: npt.NDArray[np.uint64]
    _spans: npt.NDArray[np.bool_]
    _checks: npt.NDArray[np.uint8]  # (pages, CHECK_SIZE): BLAKE3 of each page as stored
    _filter: npt.NDArray[np.uint8]

    def __init__(self) -> None:  # use open()
        raise TypeError("use PagedSegment.open")

    @classmethod
    def open(cls, read_range: Callable[[int, int], bytes], size: int, *, name: str,
             where: str, cipher: Cipher | None = None, cache_pages: int = CACHE_PAGES,
             read_many: Callable[[list[tuple[int, int]]], Sequence[bytes]] | None = None
             ) -> PagedSegment:
        """Read and check the trailer and head (nothing else).

        ``read_range(offset, length)`` returns those bytes of the segment (fewer: it
        is truncated); an ``OSError`` it raises (the segment gone) is the caller's.
        ``read_many(ranges)``, when given, reads several (offset, length) ranges and
        returns their bytes in order (concurrently, for an object store); by default
        one ``read_range`` after the other.  ``cache_pages`` bounds the decoded pages
        kept (6.6 KB each; 0: none).
        """
        self = object.__new__(cls)
        self._read_many = read_many or (lambda ranges: [read_range(o, k) for o, k in ranges])
        self._cache_pages = cache_pages
        self._read_range = read_range
        self._where = where
        self._name = name
        self._cipher = cipher
        self._cache = OrderedDict()
        self._lock = threading.Lock()
        self._resident = None
        self._resident_tried = False
        if size < TRAILER_SIZE:
            self._fail(f"{size} bytes, too short for a paged index segment")
        trailer = self._read(size - TRAILER_SIZE, TRAILER_SIZE, "the trailer")
        (magic, version, flags, per, probes, n, npacks, nblocks, head_offset, head_length,
         head_check, trailer_check) = TRAILER.unpack(trailer)
        if magic != PAGED_MAGIC:
            self._fail("not a paged index segment (bad magic)")
        if _check(trailer[:80]) != trailer_check:
            self._fail("trailer checksum mismatch")
        if version > PAGED_VERSION:
            raise PagedIndexError(f"index segment {where} is from a newer cbt "
                                  f"(format {version})")
        if version != PAGED_VERSION:
            self._fail(f"unknown format version {version}")
        sealed = bool(flags & FLAG_SEALED)
        if flags & ~FLAG_SEALED:
            self._fail(f"unknown flags {flags:#x}")
        if sealed and cipher is None:
            self._fail("sealed, and no key was given")
        if not sealed and cipher is not None:
            # in an encrypted vault nothing unauthenticated is used
            self._fail("not sealed, in an encrypted vault")
        if not MIN_PAGE_ENTRIES <= per <= MAX_PAGE_ENTRIES:
            self._fail(f"page entries {per} out of range")
        if probes != FILTER_PROBES:
            self._fail(f"filter probes {probes}, not {FILTER_PROBES}")
        # every count bounded by the size before anything is computed from it
        if n > size // ENTRY_SIZE or npacks > n or nblocks > size // FILTER_BLOCK:
            self._fail(f"counts do not fit its size ({n} entries, {npacks} packs, "
                       f"{nblocks} filter blocks in {size} bytes)")
        if n and not nblocks:
            self._fail("entries but no filter")
        pages_len, head_len = _layout(n, per, npacks, nblocks, sealed)
        if (head_offset != pages_len or head_length != head_len
                or pages_len + head_len + TRAILER_SIZE != size):
            self._fail(f"sizes do not add up ({n} entries, {npacks} packs, {nblocks} filter "
                       f"blocks, head {head_offset}+{head_length}, size {size})")
        head = self._read(head_offset, head_length, "the head")
        if _check(head) != head_check:
            self._fail("head checksum mismatch")
        if cipher is not None:
            try:
                head = cipher.open(head, _head_aad(name, trailer[:64]))
            except AuthenticationError:
                self._fail("head fails authentication (altered, moved, or not of this vault)")
        npages = _page_count(n, per)
        view = memoryview(head)
        at = 0

        def take(length: int) -> npt.NDArray[np.uint8]:
            nonlocal at
            part = np.frombuffer(view[at:at + length], dtype=np.uint8).copy()
            at += length
            return part

        uuids = take(npacks * 16).reshape(npacks, 16)
        fences = take(npages * 8).view(">u8").astype(np.uint64)
        spans = take(npages)
        checks = take(npages * CHECK_SIZE).reshape(npages, CHECK_SIZE)
        self._filter = take(nblocks * FILTER_BLOCK)
        if npacks > 1 and len(distinct(uuids.view("V16").ravel())) != npacks:
            self._fail("a pack listed twice")
        if npages > 1 and not (fences[1:] >= fences[:-1]).all():
            self._fail("fences out of order")
        if (spans > 1).any() or (npages and spans[0]):
            self._fail("bad span flags")
        self.n = n
        self._per = per
        self._sealed = sealed
        self._npages = npages
        self._nblocks = nblocks
        self._uuids = uuids
        self._fences = fences
        self._spans = spans.astype(bool)
        self._checks = checks
        self.pack_ids = [uuid.UUID(bytes=u.tobytes()).hex for u in uuids]
        self.head_bytes = (uuids.nbytes + fences.nbytes + self._spans.nbytes
                           + checks.nbytes + self._filter.nbytes
                           + sys.getsizeof(self.pack_ids)
                           + sum(sys.getsizeof(p) for p in self.pack_ids))
        return self

    # -- errors and raw reads --

    def _fail(self, what: str, page: int | None = None) -> Any:
        at = f" page {page} of {self._npages}" if page is not None else ""
        raise PagedIndexError(f"corrupt index segment {self._where}{at}: {what}", self._name)

    def _read(self, offset: int, length: int, what: str) -> bytes:
        data = self._read_range(offset, length)
        if len(data) != length:
            self._fail(f"{what} truncated (read {len(data)} of {length} bytes at {offset})")
        return data

    # -- the filter --

    def maybe(self, digests: npt.ArrayLike) -> npt.NDArray[np.bool_]:
        """False for each digest certainly not in this segment (True: maybe)."""
        q = _as_digests(digests)
        out = np.zeros(len(q), dtype=bool)
        if not self._nblocks or self.n == 0:
            return out
        for i in range(0, len(q), FILTER_STEP):
            where, bits = _filter_slots(q[i:i + FILTER_STEP], self._nblocks)
            out[i:i + FILTER_STEP] = ((self._filter[where] & bits) != 0).all(axis=1)
        return out

    # -- pages --

    def _page_span(self, page: int) -> tuple[int, int]:
        """(offset, stored length) of a page."""
        extra = OVERHEAD if self._sealed else 0
        full = self._per * ENTRY_SIZE + extra
        k = self._page_size(page)
        return page * full, k * ENTRY_SIZE + extra

    def _unseal(self, page: int, data: memoryview) -> bytes:
        """A sealed page's plaintext (its check against the head already held)."""
        assert self._cipher is not None
        try:
            plain = self._cipher.open(data, _page_aad(self._name, page))
        except AuthenticationError:
            self._fail("fails authentication (altered, moved, or not of this vault)", page)
        k = self._page_size(page)
        if len(plain) != k * ENTRY_SIZE:
            self._fail(f"{len(plain)} bytes, not {k * ENTRY_SIZE}", page)
        return plain

    def _page_size(self, page: int) -> int:
        return min(self._per, self.n - page * self._per)

    def _decode(self, pages: npt.NDArray[np.int64], plain: bytes, k: int
                ) -> tuple[npt.NDArray[Any], ...]:
        """Columns (digests, pack, offset, stored, raw, and the digests' 8-byte prefix keys)
        of pages of ``k`` entries each,
        their plaintexts concatenated; checked all at once: digests strictly ascending
        in each page and within its fences, pack numbers in the table."""
        r = len(pages)
        buf = np.frombuffer(plain, dtype=np.uint8).reshape(r, k * ENTRY_SIZE)
        at = [0]

        def col(width: int, dtype: str) -> npt.NDArray[Any]:
            part = buf[:, at[0]:at[0] + k * width]
            at[0] += k * width
            return np.ascontiguousarray(part).view(dtype).reshape(-1)

        digests = col(32, "u1").reshape(r * k, 32)
        pack = col(4, "<u4").astype(np.uint32, copy=False)
        offset = col(8, "<u8").astype(np.uint64, copy=False)
        stored = col(4, "<u4").astype(np.uint32, copy=False)
        raw = col(4, "<u4").astype(np.uint32, copy=False)
        s = _sortable(digests).reshape(r, k)
        bad = ~(s[:, 1:] > s[:, :-1]).all(axis=1)
        if bad.any():
            self._fail("digests not strictly ascending", int(pages[np.argmax(bad)]))
        keys = prefix_keys(digests).reshape(r, k)
        bad = keys[:, 0] != self._fences[pages]
        if bad.any():
            self._fail("first digest differs from its fence", int(pages[np.argmax(bad)]))
        nxt = np.minimum(pages + 1, self._npages - 1)
        bound = self._fences[nxt]
        # the last digest stays below the next page's fence, or equal to it when a run
        # of one 8-byte prefix crosses the boundary (the next page's span flag)
        bad = (pages + 1 < self._npages) & (
            (keys[:, -1] > bound) | ((keys[:, -1] == bound) & ~self._spans[nxt]))
        if bad.any():
            self._fail("digests beyond the next page's fence", int(pages[np.argmax(bad)]))
        if r and int(pack.max()) >= len(self._uuids):
            worst = int(np.argmax(pack.reshape(r, k).max(axis=1) >= len(self._uuids)))
            self._fail(f"pack number {int(pack.reshape(r, k)[worst].max())} of "
                       f"{len(self._uuids)} packs", int(pages[worst]))
        return digests, pack, offset, stored, raw, keys.reshape(-1)

    def _load(self, pages: npt.NDArray[np.int64], cache: bool = True) -> _Pages:
        """These pages (ascending, distinct), decoded and checked: cached ones from the
        cache, the rest read with adjacent pages in one read."""
        got: dict[int, bytes | memoryview] = {}
        todo: list[int] = []
        with self._lock:  # (threads may share a segment: the cache is its one state)
            for p in pages.tolist():
                hit = self._cache.get(p) if cache else None
                if hit is not None:
                    self._cache.move_to_end(p)
                    got[p] = hit
                else:
                    todo.append(p)
        if todo:
            want = np.array(todo, dtype=np.int64)
            stride = self._per * ENTRY_SIZE + (OVERHEAD if self._sealed else 0)
            ends = (want + 1) * stride
            ends[-1] = sum(self._page_span(todo[-1]))
            views: list[memoryview] = []
            # runs of adjacent pages: one read each (all of a batch's reads handed over
            # at once: an object store's reader may run them concurrently)
            cuts = np.flatnonzero(np.diff(want) != 1) + 1
            runs = list(zip(np.concatenate(([0], cuts)).tolist(),
                            np.concatenate((cuts, [len(todo)])).tolist(), strict=True))
            ranges = [(todo[lo] * stride, int(ends[hi - 1]) - todo[lo] * stride)
                      for lo, hi in runs]
            datas = self._read_many(ranges)
            for (lo, hi), (start, length), data in zip(runs, ranges, datas, strict=True):
                if len(data) != length:
                    self._fail(f"pages {todo[lo]}-{todo[hi - 1]} truncated (read {len(data)} "
                               f"of {length} bytes at {start})")
                view = memoryview(data)
                views += [view[p * stride - start:end - start]
                          for p, end in zip(todo[lo:hi], ends[lo:hi].tolist(), strict=True)]
            # every page's BLAKE3 in one call (the core's, GIL released), then against
            # the head's checks all at once
            sums = np.empty((len(views), 32), dtype=np.uint8)
            fast.hash_each(views, sums)
            bad = (sums[:, :CHECK_SIZE] != self._checks[want]).any(axis=1)
            if bad.any():
                self._fail("checksum mismatch", todo[int(np.argmax(bad))])
            if self._cipher is None:
                got.update(zip(todo, views, strict=True))
            else:
                got.update((p, self._unseal(p, v)) for p, v in zip(todo, views, strict=True))
            if cache and self._cache_pages > 0:
                with self._lock:
                    for p in todo[-self._cache_pages:]:
                        # (bytes of its own: a cached page must not pin the whole read)
                        self._cache[p] = bytes(got[p])
                    while len(self._cache) > self._cache_pages:
                        self._cache.popitem(last=False)
        # every page is full but the segment's last: decode the full ones at once
        plist = pages.tolist()
        short = bool(plist) and self._page_size(plist[-1]) < self._per
        full = pages[:-1] if short else pages
        # (bytes of their own: the columns returned must not point into a caller's
        # buffer, a mapped file that may be closed)
        parts = [self._decode(full, b"".join(got[p] for p in plist[:len(full)]), self._per)]
        if short:
            last = plist[-1]
            parts.append(self._decode(pages[-1:], bytes(got[last]), self._page_size(last)))
        cols = tuple(np.concatenate([part[c] for part in parts]) if len(parts) > 1
                     else parts[0][c] for c in range(6))
        sizes = np.full(len(pages), self._per, dtype=np.int64)
        if short:
            sizes[-1] = self._page_size(plist[-1])
        loaded = _Pages(pages, sizes, cols, self._per)
        # Pages join into one sorted run: each page's first digest above the last one
        # before it (fences see 8 bytes: a run of one prefix across pages needs this)
        if len(pages) > 1:
            firsts = loaded.start[1:]
            bad = ~(_sortable(loaded.digests[firsts]) > _sortable(loaded.digests[firsts - 1]))
            if bad.any():
                self._fail("digests not above the page before", int(pages[1:][np.argmax(bad)]))
        return loaded

    def _batches(self, pages: npt.NDArray[np.int64], size: int, cache: bool = True
                 ) -> Iterator[tuple[int, int, _Pages]]:
        """(first, end, decoded pages[first:end]) for runs of at most ``size`` pages."""
        for i in range(0, len(pages), size):
            yield i, min(i + size, len(pages)), self._load(pages[i:i + size], cache)

    # -- queries --

    def lookup(self, digests: npt.ArrayLike) -> npt.NDArray[np.int64]:
        """The row of each digest, -1 where it is absent."""
        return self._search(_as_digests(digests), None)

    def find(self, digests: npt.ArrayLike
             ) -> tuple[npt.NDArray[np.int64], dict[str, npt.NDArray[Any]]]:
        """:meth:`lookup` and :meth:`gather` in one pass (each page read once): the row of
        each digest (-1 absent) and the entry of each (zeros where absent)."""
        q = _as_digests(digests)
        entries = _empty_entries(len(q))
        return self._search(q, entries), entries

    def _search(self, q: npt.NDArray[np.uint8], entries: dict[str, npt.NDArray[Any]] | None
                ) -> npt.NDArray[np.int64]:
        out = np.full(len(q), -1, dtype=np.int64)
        if len(q) == 0 or self.n == 0:
            return out
        if self._resident is not None:  # (no filter, no pages: one search)
            self._match(self._resident, q, prefix_keys(q), np.arange(len(q)), out, entries)
            return out
        qi = np.nonzero(self.maybe(q))[0]
        if not len(qi):
            return out
        keys = prefix_keys(q[qi])
        page = np.searchsorted(self._fences, keys, side="right").astype(np.int64) - 1
        keep = page >= 0
        qi, keys, page = qi[keep], keys[keep], page[keep]
        # A run of digests sharing an 8-byte prefix may cross into this page from the
        # ones before (rare: adversarial ids); those pages are candidates too.
        more = np.nonzero(self._spans[page] & (self._fences[page] == keys))[0]
        if len(more):
            extra_q, extra_p = [], []
            for j in more.tolist():
                p = int(page[j])
                while self._spans[p] and int(self._fences[p]) == int(keys[j]):
                    p -= 1
                    extra_q.append(int(qi[j]))
                    extra_p.append(p)
            qi = np.concatenate((qi, np.array(extra_q, dtype=np.int64)))
            page = np.concatenate((page, np.array(extra_p, dtype=np.int64)))
        qkeys = prefix_keys(q)
        whole = self._whole(len(distinct(page)))
        if whole is not None:  # (every page decoded already: one search over them all)
            self._match(whole, q, qkeys, qi, out, entries)
            return out
        order = np.argsort(page, kind="stable")
        qi, page = qi[order], page[order]
        wanted = distinct(page)
        bounds = np.searchsorted(page, wanted, side="left")
        for first, end, batch in self._batches(wanted, BATCH_PAGES):
            lo = int(bounds[first])
            hi = int(bounds[end]) if end < len(wanted) else len(page)
            self._match(batch, q, qkeys, qi[lo:hi], out, entries)
        return out

    @staticmethod
    def _match(batch: _Pages, q: npt.NDArray[np.uint8], qkeys: npt.NDArray[np.uint64],
               asked: npt.NDArray[np.int64], out: npt.NDArray[np.int64],
               entries: dict[str, npt.NDArray[Any]] | None) -> None:
        """The ids ``q[asked]`` searched in decoded pages: ``out`` (and ``entries``) set
        where found.  By the 8-byte prefix first (integers: several times faster than
        32-byte strings), then the whole digest; an id whose prefix matches another
        digest's (a crafted vault's, or one in 2^64) is searched by all 32 bytes."""
        run_keys = batch.keys
        pos = np.minimum(np.searchsorted(run_keys, qkeys[asked]), len(run_keys) - 1)
        same = run_keys[pos] == qkeys[asked]
        found = same & (np.take(batch.digests, pos, axis=0) == q[asked]).all(axis=1)
        odd = np.nonzero(same & ~found)[0]
        if len(odd):
            run = _sortable(batch.digests)
            want = _sortable(q[asked[odd]])
            at_odd = np.minimum(np.searchsorted(run, want), len(run) - 1)
            hit = run[at_odd] == want
            pos[odd[hit]] = at_odd[hit]
            found[odd[hit]] = True
        at = asked[found]
        out[at] = batch.rows[pos[found]]
        if entries is not None:
            for c, a in batch.select(pos[found]).items():
                entries[c][at] = a

    def warm(self, queries: int) -> bool:
        """Make the segment resident now if ``queries`` ids asked at once would (a process
        about to fork workers that will ask them: they inherit it, decoded once); whether
        it is resident (never an error: a page that cannot be read is the lookups')."""
        return self._whole(min(queries, self._npages)) is not None

    def _whole(self, pages: int) -> _Pages | None:
        """Every page decoded, if this segment is resident, or becomes so now: asked for
        ``pages`` pages at once, at least a quarter of them, and within the process's
        :data:`RESIDENT` budget (tried once: a segment that does not fit stays paged)."""
        if (self._resident is not None or self._resident_tried or self.n == 0
                or pages * 4 < self._npages):
            return self._resident
        with self._lock:
            if self._resident_tried:
                return self._resident
            self._resident_tried = True
            cost = self.n * RESIDENT_ENTRY
            if not RESIDENT.take(cost):
                return None
        try:
            whole = self._load(np.arange(self._npages, dtype=np.int64), cache=False)
        except (PagedIndexError, OSError):
            # (a damaged page, or one the storage cannot read: paged, as before, a lookup
            # fails only if it needs that page)
            RESIDENT.give(cost)
            return None
        except BaseException:
            RESIDENT.give(cost)
            raise
        weakref.finalize(self, RESIDENT.give, cost)
        self._resident = whole
        return whole

    def gather(self, rows: npt.ArrayLike) -> dict[str, npt.NDArray[Any]]:
        """The entries at these rows (in the order given): digests (k, 32), pack (numbers
        into :attr:`pack_ids`), offset, stored, raw."""
        r = np.asarray(rows, dtype=np.int64).reshape(-1)
        out = _empty_entries(len(r))
        if not len(r):
            return out
        if int(r.min()) < 0 or int(r.max()) >= self.n:
            raise ValueError(f"rows out of range 0..{self.n - 1}")
        if self._resident is not None:  # (row i is at position i: pages are full but the last)
            for c, a in self._resident.select(r).items():
                out[c][:] = a
            return out
        page = r // self._per
        order = np.argsort(page, kind="stable")
        page_sorted = page[order]
        wanted = distinct(page_sorted)
        bounds = np.searchsorted(page_sorted, wanted, side="left")
        for first, end, batch in self._batches(wanted, BATCH_PAGES):
            lo = int(bounds[first])
            hi = int(bounds[end]) if end < len(wanted) else len(r)
            idx = order[lo:hi]
            which = np.searchsorted(batch.pages, page[idx])
            pos = batch.start[which] + r[idx] % self._per
            for c, a in batch.select(pos).items():
                out[c][idx] = a
        return out

    def chunks(self, entries: int = 65536) -> Iterator[dict[str, npt.NDArray[Any]]]:
        """Every entry in row order, about ``entries`` at a time (whole pages)."""
        per_chunk = max(1, entries // self._per)
        last = b""  # the digest before this chunk: the order holds across chunks too
        for start in range(0, self._npages, per_chunk):
            pages = np.arange(start, min(start + per_chunk, self._npages), dtype=np.int64)
            batch = self._load(pages, cache=False)
            if not batch.digests[0].tobytes() > last:
                self._fail("digests not above the page before", start)
            last = batch.digests[-1].tobytes()
            yield {"digests": batch.digests, "pack": batch.pack, "offset": batch.offset,
                   "stored": batch.stored, "raw": batch.raw}

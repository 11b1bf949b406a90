"""Verify: prove that every point can be restored, or name what cannot.

1. Every index segment and point record must pass its checksum (in an
   encrypted vault: its authentication; a sealed file that fails it is a
   problem naming the file).
2. For each point and disk: the manifest files (full and deltas) pass their
   checksums and match the record; every DATA block is in the index.
3. For each pack the index points into: the pack exists, is long enough for
   every entry, and its own trailer agrees with the index (same digest at the
   same offset and length), so an index that disagrees with the packs is
   found without reading any data (only the pack's header and trailer are
   read, unless the trailer is damaged or disagrees: then the whole pack, whose
   blob headers are the truth).
4. With ``data``: every referenced blob is read (pack by pack, sequentially),
   opened (an encrypted vault's), decompressed and re-hashed (keyed BLAKE3 in
   an encrypted vault).  With a ``subset`` (:class:`DataSubset`), only the
   packs of that part: ``n/m`` is the nth of m parts of the packs by pack id
   (each pack in one part, for good: m runs cover every pack once); ``N%``
   the packs whose place (its id's first 64 bits: ids are random) falls in a
   window of N% of the ids; window w+1 starts where window w ends, so windows
   w .. w+100/N-1 read every pack once, however the vault grows meanwhile (a
   place by the packs' bytes would shift old packs past the window as new ones
   come); a window reads about N% of the bytes, a whole cycle exactly all of
   them.  The window is the caller's (``day``; default: days since 1970-01-01
   UTC); ``cbt verify`` takes the next one a run (:mod:`cbt.jobs.verify_record`).
5. Index entries no point references (left by a killed run) and files a killed
   run left are *unreferenced*: reported in bytes, not a problem.

Each problem names point, disk, block and pack where they are known, one per
damaged file: the blocks of one disk of one point that one pack fails (or that
the index lacks) are one problem naming the first and counting them all
(``count``).  A damaged point record is a problem of its own point (and of the
points based on it) only; a damaged index segment is a problem, while the
packs it covered are indexed from their trailers or blob headers.
``repair`` rebuilds the index from the packs themselves (trailers, or blob
headers when a trailer is lost), indexing only blobs whose content matches
their digest, then verifies again to say which points remain damaged.
"""

from __future__ import annotations

import contextlib
import errno
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Any

import blake3
import numpy as np
import numpy.typing as npt

from cbt.core.crypto import Cipher
from cbt.core.errors import CbtError, CbtValueError
from cbt.format.pack import (
    BLOB,
    CorruptPackError,
    blob_length,
    decode_blob,
    is_pack_name,
    pack_id_of,
    pack_name,
    read_pack_trailer,
    read_trailer,
    scan_blobs,
)
from cbt.format.records import PointRecord
from cbt.ops.marks import Marks
from cbt.repo import index as index_mod
from cbt.repo import segments
from cbt.repo.index import Index, IndexEntry, Located, skipping_damaged
from cbt.repo.lock import check_held, exclusive_lock, gc_lock
from cbt.repo.trash import retire_segment
from cbt.repo.vault import Vault

MAX_PROBLEMS = 1000
# entries step 5 streams at a time: the index's default chunk (65,536) decodes into
# about 15 MB of transient arrays, a step in every verify's peak whatever the vault
UNREFERENCED_CHUNK = 8192
LOCATE_STEP = 1 << 16  # index positions step 3 locates the referenced entries of at once
QUARANTINE = "quarantine"
DAY = 86400

MAX_PARTS = 1_000_000
_SUBSET_PERCENT = re.compile(r"([0-9]+(?:\.[0-9]+)?|\.[0-9]+) *%")
_SUBSET_PART = re.compile(r"([0-9]+) */ *([0-9]+)")

Progress = Callable[[int, int], None]
"""``progress(done, total)``: bytes of the packs checked (read whole or by trailer)."""


@dataclass(frozen=True)
class DataSubset:
    """A part of the packs to read for ``verify --read-data-subset``: ``n/m`` (``part`` of
    ``parts``, 1-based) or ``N%`` (``percent``).  See the module doc, step 4."""

    part: int = 0
    parts: int = 0
    percent: float = 0.0

    @classmethod
    def parse(cls, text: str) -> DataSubset:
        """``"n/m"`` (1 <= n <= m <= 1000000) or ``"N%"`` (0 < N <= 100, may be
        fractional), in plain decimal digits (not ``1_0/20``, ``1e-3%`` nor ``nan%``)."""
        t = text.strip()
        if (m := _SUBSET_PERCENT.fullmatch(t)) is not None:
            pc = float(m[1])
            if 0.0 < pc <= 100.0:
                return cls(percent=pc)
        elif (m := _SUBSET_PART.fullmatch(t)) is not None:
            n, parts = int(m[1]), int(m[2])
            if 1 <= n <= parts <= MAX_PARTS:
                return cls(part=n, parts=parts)
        raise CbtValueError(f"not a data subset: {text!r} (use N% with 0 < N <= 100, or n/m "
                            f"with 1 <= n <= m <= {MAX_PARTS})")

    def choose(self, sizes: dict[str, int], day: int) -> set[str]:
        """The pack ids (of ``sizes``: id -> bytes) this part reads in window ``day`` (the
        day by default: days since 1970-01-01, UTC; cbt verify's run count goes on from it).

        ``N%``: a pack is read when its place falls in the window ``day`` of the ring of
        places (``2**64``).  In whole numbers (the ring ``2**64 * 100 * den`` long for
        ``N`` = num/den), so that one window ends exactly where the next one starts:
        every pack once in 100/N windows (floats left gaps and overlaps)."""
        if self.parts:
            return {p for p in sizes if _place(p) * self.parts // 2**64 == self.part - 1}
        pc = Fraction(repr(self.percent))  # (the decimal given, exactly)
        ring = 2**64 * 100 * pc.denominator
        width = 2**64 * pc.numerator
        start = day * width % ring
        return {p for p in sizes
                if (_place(p) * 100 * pc.denominator - start) % ring < width}

    def describe(self, day: int) -> str:
        if self.parts:
            return f"{self.part}/{self.parts}"
        start = (day * self.percent / 100.0) % 1.0
        return f"{self.percent:g}% (window {day}: from {100 * start:.4g}% of the pack ids)"


def _place(pack_id: str) -> int:
    """Where a pack sits among all (its id's first 64 bits: ids are random)."""
    return int(pack_id[:16], 16)


@dataclass(frozen=True)
class Problem:
    """One thing wrong, with the point, disk, block and pack where they are known.

    Problems are grouped per damaged file: the blocks of one disk of one point that one
    pack fails (or the index lacks) are one problem, ``block`` the first of them and
    ``count`` how many; a manifest that cannot be resolved counts the disk's blocks; a
    damaged point record or index segment counts None (not known block by block)."""

    point: str | None
    disk: str | None
    block: int | None
    pack: str | None
    problem: str
    count: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"point": self.point, "disk": self.disk, "block": self.block, "pack": self.pack,
                "problem": self.problem, "count": self.count}


@dataclass
class VerifyResult:
    points: int
    blocks_checked: int
    data: bool
    problems: list[Problem]
    unreferenced_bytes: int
    seconds: float
    warnings: list[str]
    data_subset: str | None = None  # the part read (``DataSubset.describe``)
    packs_data_checked: int = 0  # packs whose blocks were read and re-hashed
    bytes_data_checked: int = 0  # their bytes

    def to_dict(self) -> dict[str, Any]:
        """The JSON of ``cbt verify --json``, plus ``seconds`` (which the command drops)."""
        return {"points": self.points, "blocks_checked": self.blocks_checked,
                "data": self.data, "problems": [p.to_dict() for p in self.problems],
                "unreferenced_bytes": self.unreferenced_bytes, "seconds": self.seconds,
                "warnings": list(self.warnings), "data_subset": self.data_subset,
                "packs_data_checked": self.packs_data_checked,
                "bytes_data_checked": self.bytes_data_checked}

    def __getitem__(self, key: str) -> Any:
        """``result["problems"]``: the keys of :meth:`to_dict`, for scripts written when
        ``Vault.verify`` returned that dict."""
        return self.to_dict()[key]


@dataclass
class RepairStats:
    """What the rebuild of the index found in the packs."""

    packs_read: int = 0
    blobs_indexed: int = 0
    blobs_damaged: int = 0
    packs_quarantined: int = 0
    damaged_points: list[str] = field(default_factory=list)
    # damaged point records moved to quarantine/ (their names in the vault), and the
    # points lost with them (theirs where known, and every point based on one)
    records_quarantined: list[str] = field(default_factory=list)
    lost_points: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RepairResult:
    """The verify run after the repair, and what the repair did."""

    verify: VerifyResult
    repair: RepairStats

    @property
    def problems(self) -> list[Problem]:
        return self.verify.problems

    def to_dict(self) -> dict[str, Any]:
        """The JSON of ``cbt verify --repair --json`` (verify's, plus ``repair``)."""
        return {**self.verify.to_dict(), "repair": self.repair.to_dict()}


@dataclass
class _Disk:
    """A visible point's disk whose manifest resolved: its blocks are looked up again only
    to name bad blobs (keeping every point's rows and positions until then cost 16 bytes
    per block of every point)."""

    point: PointRecord
    label: str


@dataclass
class _Checked:
    """Step 2's findings: the entries points reference, and where."""

    referenced: Marks  # (a bit per index position)
    disks: list[_Disk] = field(default_factory=list)
    blocks: int = 0


def verify(vault: Vault, ref: str | None = None, data: bool = False,
           subset: DataSubset | None = None, day: int | None = None,
           progress: Progress | None = None) -> VerifyResult:
    """Steps 1 to 5 of the module doc, over every point or the point ``ref``; with a
    ``subset`` the data of its packs only (``day``: for ``N%``, the window, by default
    the day: days since 1970-01-01 UTC)."""
    started = time.perf_counter()
    when = int(time.time() // DAY) if day is None else day
    problems: list[Problem] = []
    warnings: list[str] = []

    def load(exclude: dict[str, str]) -> Index:
        problems.clear()
        warnings.clear()
        try:
            return vault.load_index(warnings, headers=True, exclude=exclude)
        except CbtError as exc:
            problems.append(Problem(None, None, None, None, str(exc)))
            return Index.empty()

    def check(index: Index) -> tuple[list[PointRecord], _Checked, _Reading, int]:
        # (again from the start when a page of a segment turns out damaged: that segment
        # is then one of the damaged ones, its packs indexed from their trailers)
        problems.extend(Problem(None, None, None, None, f"damaged index segment: {why}")
                        for why in index.damaged.values())
        points = _load_points(vault, ref, problems)
        checked = _check_manifests(vault, index, points, problems)
        reading = _Reading(data or subset is not None, subset, when, progress)
        bad = _check_packs(vault, index, checked.referenced, reading)
        if bad:
            problems.extend(_name_bad_blocks(vault, index, bad, checked.disks))
        unreferenced = 0 if ref is not None else _unreferenced(vault, index, checked.referenced)
        return points, checked, reading, unreferenced

    points, checked, reading, unreferenced = skipping_damaged(load, check)
    return VerifyResult(
        points=sum(not p.hidden for p in points), blocks_checked=checked.blocks,
        data=reading.data, problems=problems[:MAX_PROBLEMS], unreferenced_bytes=unreferenced,
        seconds=round(time.perf_counter() - started, 6), warnings=warnings,
        data_subset=None if subset is None else subset.describe(when),
        packs_data_checked=reading.packs, bytes_data_checked=reading.bytes)


@dataclass
class _Reading:
    """Which packs step 4 reads, and what it read."""

    data: bool
    subset: DataSubset | None
    day: int
    progress: Progress | None
    chosen: set[str] | None = None  # (None: every pack, when ``data``)
    packs: int = 0
    bytes: int = 0

    def wants(self, pid: str) -> bool:
        return self.data and (self.chosen is None or pid in self.chosen)


def _load_points(vault: Vault, ref: str | None, problems: list[Problem]) -> list[PointRecord]:
    """Step 1: the point records (each passes its checksum, or its authentication); a
    damaged one is a problem naming its file (and its point, where the name says it)."""
    if ref is not None:
        return [vault.point(ref)]
    points, damaged = vault.scan_records()
    problems += [Problem(d.point, None, None, None, d.message) for d in damaged]
    return points


def _check_manifests(vault: Vault, index: Index, points: list[PointRecord],
                     problems: list[Problem]) -> _Checked:
    """Step 2: manifests match their records; every DATA block is in the index."""
    checked = _Checked(referenced=Marks(len(index)))
    for point in points:
        for disk in point.disks:
            name = vault.manifest_name(point.id, disk.label)
            try:
                raw = vault.storage.get(name)
                if blake3.blake3(raw).hexdigest() != disk.manifest_checksum:
                    problems.append(Problem(point.id, disk.label, None, None,
                                            f"manifest {name} differs from the one "
                                            "the point recorded", disk.blocks))
                    continue
                manifest = vault.resolve(point, disk.label)
            except (CbtError, OSError) as exc:
                problems.append(Problem(point.id, disk.label, None, None, str(exc), disk.blocks))
                continue
            if manifest.disk_size != disk.size:
                problems.append(Problem(point.id, disk.label, None, None,
                                        "manifest size differs from the point record",
                                        disk.blocks))
            if point.hidden:
                continue  # a pruned base: its manifests must resolve, its blocks may be gone
            blocks, digests = manifest.data_rows()
            rows = blocks.astype(np.int64)
            pos = index.lookup(digests)
            absent = rows[pos < 0]
            if len(absent):
                problems.append(Problem(point.id, disk.label, int(absent[0]), None,
                                        "block missing from the vault index", len(absent)))
            checked.referenced.set(pos[pos >= 0])
            checked.disks.append(_Disk(point, disk.label))
            checked.blocks += len(rows)
    return checked


def _cipher(vault: Vault) -> Cipher | None:
    return vault.keys.cipher if vault.keys is not None else None


def _check_packs(vault: Vault, index: Index, referenced: Marks,
                 reading: _Reading) -> dict[int, str]:
    """Steps 3 and 4: index position -> what is wrong with its blob, for every referenced
    entry, pack by pack."""
    bad: dict[int, str] = {}
    # each referenced entry's pack number, located a bounded range at a time: a locate
    # returns whole entries (digest included, ~60 bytes each); only the 4-byte pack
    # number is kept of them
    pos_parts, pack_parts = [np.zeros(0, np.int64)], [np.zeros(0, np.uint32)]
    for got in referenced.positions(LOCATE_STEP):
        if len(got):
            pos_parts.append(got)
            pack_parts.append(index.locate(got).pack.copy())
    positions, packs = np.concatenate(pos_parts), np.concatenate(pack_parts)
    del pos_parts, pack_parts
    if len(positions) == 0:
        return bad
    order = np.argsort(packs, kind="stable")
    positions, packs = positions[order], packs[order]
    bounds = np.nonzero(np.diff(packs.astype(np.int64)))[0] + 1
    runs = [(index.pack_ids[int(packs[s])], positions[s:e])
            for s, e in zip(np.r_[0, bounds], np.r_[bounds, len(positions)], strict=True)]
    listed = vault.storage.sizes("packs")  # (one listing on S3; 0: not there)
    sizes = {pid: listed.get(pack_name(pid), 0) for pid, _pos in runs}
    if reading.data and reading.subset is not None:
        reading.chosen = reading.subset.choose(sizes, reading.day)
    total, done = sum(sizes.values()), 0
    for pid, pos in runs:
        if reading.progress is not None:
            reading.progress(done, total)
        whole = reading.wants(pid)
        if whole:
            reading.packs += 1
            reading.bytes += sizes[pid]
        if whole or not _trailer_agrees(vault, index, pid, pos, sizes[pid]):
            _check_pack(vault, index, pid, pos, whole, bad)
        done += sizes[pid]
    if reading.progress is not None:
        reading.progress(total, total)
    return bad


def _trailer_agrees(vault: Vault, index: Index, pid: str, pos: npt.NDArray[np.int64],
                    size: int) -> bool:
    """Step 3 from the pack's header and trailer alone (``size``: the pack's, as listed):
    every entry of ``pos`` is listed there, inside the pack.  False (read the whole pack:
    its errors, or its blob headers, say what is wrong) on any doubt."""
    name = pack_name(pid)
    if size <= 0:
        return False
    try:
        trailer = read_pack_trailer(lambda off, n: vault.storage.read_range(name, off, n),
                                    size, f"pack {pid}")
    except (OSError, CorruptPackError):
        return False
    at = index.locate(pos)
    if (at.offset.astype(np.int64) + blob_length(at.stored) > size).any():
        return False
    listed = {(bytes(t["digest"]), int(t["offset"]), int(t["stored"])) for t in trailer}
    return all(e in listed for e in _triples(at))


def _triples(at: Located) -> list[tuple[bytes, int, int]]:
    """(digest, offset, stored) of each entry, as a pack's trailer lists its blobs."""
    return list(zip([d.tobytes() for d in at.digests], at.offset.tolist(), at.stored.tolist(),
                    strict=True))


def _check_pack(vault: Vault, index: Index, pid: str, pos: npt.NDArray[np.int64], data: bool,
                bad: dict[int, str]) -> None:
    """Steps 3 and 4 for the entries ``pos`` of one pack (read whole), into ``bad``."""
    try:
        blob = vault.storage.get(pack_name(pid))
    except OSError as exc:  # (there but unreadable is not missing: the error says what)
        said = str(exc.strerror or exc)  # (storage's own line starts "unreadable in vault")
        why = ("pack missing" if exc.errno in (errno.ENOENT, None)
               else f"pack {said}" if said.startswith("unreadable")
               else f"pack unreadable: {said}")
        bad.update((int(p), why) for p in pos)
        return
    at = index.locate(pos)
    ends = at.offset.astype(np.int64) + blob_length(at.stored)
    short = pos[ends > len(blob)]
    bad.update((int(p), "pack truncated before this block") for p in short)
    try:
        listed = {(bytes(t["digest"]), int(t["offset"]), int(t["stored"]))
                  for t in read_trailer(blob, f"pack {pid}")}
    except CorruptPackError:
        # trailer lost (a cut pack): the blob headers still say what is where
        listed = {(d, off, stored) for d, off, stored, _raw in scan_blobs(blob)}
    entries = {p: IndexEntry(d, pid, off, stored, raw) for p, (d, off, stored), raw
               in zip(pos.tolist(), _triples(at), at.raw.tolist(), strict=True)}
    if any((e.digest, e.offset, e.stored) not in listed for e in entries.values()):
        # a trailer can lie (its checksum is unkeyed): the blob headers are the truth
        listed |= {(d, off, stored) for d, off, stored, _raw in scan_blobs(blob)}
    for p, e in entries.items():
        if (e.digest, e.offset, e.stored) not in listed and p not in bad:
            bad[p] = "index disagrees with the pack (no such blob at this offset)"
    if not data:
        return
    cipher = _cipher(vault)
    for p, e in entries.items():
        if p in bad:
            continue
        try:
            decode_blob(memoryview(blob)[e.offset:e.offset + blob_length(e.stored)], e.digest,
                        f"pack {pid}", cipher=cipher, id_key=vault.id_key)
        except CorruptPackError as exc:
            bad[p] = str(exc).removeprefix(f"pack {pid}: ")


def _name_bad_blocks(vault: Vault, index: Index, bad: dict[int, str],
                     disks: list[_Disk]) -> list[Problem]:
    """The bad blobs as problems of the points, disks and blocks that use them: one per
    point, disk, pack and kind of damage, naming its first block and counting them all
    (each disk's blocks looked up again: one manifest at a time in memory)."""
    where = np.fromiter(bad, dtype=np.int64, count=len(bad))
    packs = [index.pack_ids[k] for k in index.locate(where).pack.tolist()]
    pack_of = dict(zip(where.tolist(), packs, strict=True))
    out = []
    for d in disks:
        blocks, digests = vault.resolve(d.point, d.label).data_rows()
        pos = index.lookup(digests)
        hit = np.isin(pos, where)
        groups: dict[tuple[str, str], list[int]] = {}
        for r, p in zip(blocks[hit].tolist(), pos[hit].tolist(), strict=True):
            key = (pack_of[p], bad[p])
            groups.setdefault(key, []).append(int(r))
        out += [Problem(d.point.id, d.label, min(rows), pack, problem, len(rows))
                for (pack, problem), rows in groups.items()]
    return out


def _unreferenced(vault: Vault, index: Index, referenced: Marks) -> int:
    """Step 5: bytes of entries no point references, and of what killed runs left."""
    unreferenced = 0
    # (streamed: a small chunk of the index at a time, whatever its size)
    for base, got in index.chunks(UNREFERENCED_CHUNK):
        dead = ~referenced.get(base, base + len(got.stored))
        dead &= ~index.copies(base, got, dead)  # (a blob listed twice: counted once)
        unreferenced += int(got.stored[dead].astype(np.int64).sum()) + BLOB.size * int(dead.sum())
    try:
        leftovers = vault.leftovers()  # temporary files, manifests of uncommitted points
    except CbtError:
        return unreferenced  # an unreadable point record: already a problem of step 1
    for name in leftovers:
        with contextlib.suppress(OSError):
            unreferenced += vault.storage.size(name)
    return unreferenced


# -- repair ----------------------------------------------------------------------------------

def repair(vault: Vault, wait: float = 0.0) -> RepairResult:
    """Rebuild the index from the packs, then verify; healthy data is not touched.

    1. With the vault alone (no backup runs), read every pack; index each blob (from the
       trailer, or the blob headers when it is lost) whose content matches
       its digest.
    2. Write the new segment, then remove the old ones: a crash in between
       leaves the vault readable (run repair again).
    3. Move packs with no healthy blob to ``quarantine/`` (kept, not deleted).
    4. Move damaged point records, and those whose own manifests are damaged,
       with their manifests to ``quarantine/``: their points, and those based
       on them, are lost (``lost_points``); gc can free what only they held.
    5. Verify, and name the points that remain damaged.
    """
    stats = RepairStats()
    healthy: list[IndexEntry] = []
    quarantined: list[str] = []
    reveal = not vault.encrypted
    # alone (no backup), and no gc beside it: both rewrite the index, gc trashes packs
    with exclusive_lock(vault.storage, wait, reveal), gc_lock(vault.storage, wait, reveal):
        for name in vault.storage.list("packs"):
            if not is_pack_name(name):
                continue  # not laid out as a pack: neither read nor moved
            try:
                content = vault.storage.get(name)
            except OSError:
                continue
            stats.packs_read += 1
            found = _healthy_blobs(vault, content, name, stats)
            if not found:
                # no segment will cover it, so the index would adopt it again from its
                # trailer: set it aside instead
                quarantined.append(name)
            healthy.extend(found)
        check_held(vault.storage)  # (still alone: an S3 lease renewed in time)
        _replace_segments(vault, healthy)
        for q in quarantined:
            vault.storage.rename(q, f"{QUARANTINE}/{q.rsplit('/', 1)[-1]}")
        check_held(vault.storage)
        stats.records_quarantined, stats.lost_points = _quarantine_records(vault)
    stats.blobs_indexed = len(healthy)
    stats.packs_quarantined = len(quarantined)
    result = verify(vault)
    stats.damaged_points = sorted({p.point for p in result.problems if p.point})
    return RepairResult(result, stats)


def _quarantine_records(vault: Vault) -> tuple[list[str], list[str]]:
    """Step 4: move each damaged point record, and the record of each point whose own
    manifest is damaged or gone, to ``quarantine/`` with its manifests (those first, so a
    crash leaves nothing a backup would take for a killed run's leftovers); the record
    names moved, and the points lost: theirs where known (a sealed record's name hides
    it, unless a point based on it names it), and every visible point based on one.
    A point whose damaged manifest is of one disk stays where a point that needs none
    of the damaged files is based on its other, healthy manifests (lost, not moved):
    only its damaged manifests are moved (so gc can name its blocks again)."""
    records, damaged = vault.scan_records()
    bad: dict[str, str | None] = {d.name: d.point for d in damaged}
    by_id = {r.id: r for r in records}
    visible = {r.id for r in records if not r.hidden}
    broken = {r.id: labels for r in records if (labels := _damaged_labels(vault, r))}
    needs = {r.id: _chain(r, by_id) for r in records}
    lost = {q for q, need in needs.items() if any(lb in broken.get(p, ()) for p, lb in need)}
    gone = lost | set(vault.unavailable(records))  # (or based on a damaged record)
    for pid, labels in broken.items():
        if not any(p == pid for q, need in needs.items() if q not in gone for p, _lb in need):
            bad[vault.point_name(pid)] = pid
            continue
        for label in sorted(labels):
            try:
                _set_aside(vault, vault.manifest_name(pid, label))
            except OSError as exc:
                if exc.errno != errno.ENOENT:  # (gone, or no file: nothing to move)
                    raise
    lost &= visible
    if not bad:
        return [], sorted(lost)
    names = set(bad)
    lost |= {pid for pid in bad.values() if pid is not None and (pid in visible
                                                                   or pid not in by_id)}
    lost |= {disk.base for r in records for disk in r.disks if disk.base is not None
             and disk.base not in by_id and vault.point_name(disk.base) in names}
    left = [r for r in records if vault.point_name(r.id) not in names]
    lost |= set(vault.unavailable(left, names)) & visible
    moved = []
    for name in sorted(names):
        link = not vault.storage.exists(name)  # (a link or a folder where a record was)
        if link and not _is_link(vault, name):
            continue  # a folder stays (its point stays lost), and so do its manifests
        for m in vault.storage.list(vault.manifest_dir_of(name)):
            _set_aside(vault, m)
        if link:
            vault.storage.delete(name)  # a link itself holds nothing to keep
            vault.storage.sync("points")
        else:
            _set_aside(vault, name)
        moved.append(name)
    return moved, sorted(lost)


def _is_link(vault: Vault, name: str) -> bool:
    """Whether ``name`` is a symbolic link (which the storage refuses to stat)."""
    try:
        vault.storage.stat(name)
    except OSError as exc:
        return exc.errno == errno.ELOOP
    return False


def _chain(point: PointRecord, by_id: dict[str, PointRecord]) -> set[tuple[str, str]]:
    """(point, disk) of every manifest resolving ``point`` reads: its own and its bases'."""
    out: set[tuple[str, str]] = set()
    for disk in point.disks:
        pid: str | None = point.id
        while pid is not None and (pid, disk.label) not in out:
            out.add((pid, disk.label))
            below = by_id[pid].disk(disk.label) if pid in by_id else None
            pid = below.base if below is not None else None
    return out


def _damaged_labels(vault: Vault, point: PointRecord) -> set[str]:
    """The disks of the point whose manifest is gone, or differs from what its record says."""
    out = set()
    for disk in point.disks:
        name = vault.manifest_name(point.id, disk.label)
        try:
            raw = vault.storage.get(name)
            if blake3.blake3(raw).hexdigest() != disk.manifest_checksum:
                out.add(disk.label)
                continue
            vault.read_manifest_file(name)
        except (CbtError, OSError):
            out.add(disk.label)
    return out


def _set_aside(vault: Vault, name: str) -> None:
    """Move ``name`` under ``quarantine/`` (the same path below it; an earlier one of the
    same name is kept: a number is added)."""
    dst, n = f"{QUARANTINE}/{name}", 1
    while vault.storage.exists(dst):
        dst, n = f"{QUARANTINE}/{name}.{n}", n + 1
    vault.storage.rename(name, dst)


def _healthy_blobs(vault: Vault, content: bytes, name: str,
                   stats: RepairStats) -> list[IndexEntry]:
    """Step 1 for one pack: the entries of its blobs whose content matches their digest
    (sealed blobs: that open under the vault's key and match their keyed id).

    The trailer says where the blobs are, but its checksum is unkeyed (anyone can rewrite
    it, in an encrypted vault too): when some of its entries are not sound blobs, the
    blob headers are walked as well, so a lying trailer costs no healthy blob."""
    try:
        listed = [(bytes(t["digest"]), int(t["offset"]), int(t["stored"]), int(t["raw"]))
                  for t in read_trailer(content, name)]
    except CorruptPackError:
        listed = scan_blobs(content)
    out = _sound_blobs(vault, content, name, listed)
    if len(out) < len(listed):
        seen = {e.offset for e in out} | {e.digest for e in out}
        out += _sound_blobs(vault, content, name, [b for b in scan_blobs(content)
                                                   if b[0] not in seen and b[1] not in seen])
    healthy = {e.digest for e in out}
    stats.blobs_damaged += sum(1 for b in listed if b[0] not in healthy)
    return out


def _sound_blobs(vault: Vault, content: bytes, name: str,
                 listed: list[tuple[bytes, int, int, int]]) -> list[IndexEntry]:
    pid, cipher = pack_id_of(name), _cipher(vault)
    out = []
    for digest, off, stored, raw in listed:
        try:
            decode_blob(memoryview(content)[off:off + blob_length(stored)], digest, name,
                        cipher=cipher, id_key=vault.id_key)
        except CorruptPackError:
            continue
        out.append(IndexEntry(digest, pid, off, stored, raw))
    return out


def _replace_segments(vault: Vault, healthy: list[IndexEntry]) -> None:
    """Step 2: the new segment first (when any blob is healthy), then the old ones go."""
    old = vault.segment_names()
    name = segments.write_entries(vault, f"repaired-{uuid.uuid4().hex}",
                                  index_mod.segment_entries(healthy)) if healthy else None
    for s in old:
        if s != name:
            retire_segment(vault.storage, s)

"""Issue 13 part B: a tracked incremental reads only what changed, and never misses a change.

Driven by hint files (``--changed-ranges``; the API's ``hints``): real sparse
files on the test's file system, plain and encrypted vaults, every point
restored and compared byte for byte with the copy kept of the disk when it was
backed up.  The expected bytes read are computed here from the documented
rules (hint ranges, the rotating sample of blocks the previous point held as
DATA or ZERO, holes of the previous point), with numpy and SEEK_DATA, never with cbt.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from helpers.truth import data_block_mask
from helpers.vaults import PASSWORD, FinishedScan, fast_kdf

import cbt
from cbt.core.errors import CbtValueError
from cbt.format.records import DiskRecord
from cbt.ops.backup import BackupRequest, backup
from cbt.source.changes import ChangeHint, TrackingBase
from cbt.source.disks import DiskSpec
from cbt.source.scan import start_scan

BS = 4096
BLOCKS = 2048
SIZE = BLOCKS * BS


def _vault(root: Path, encrypted: bool) -> cbt.Vault:
    if encrypted:
        return cbt.Vault.init(root / "vault", encryption="aes-256-gcm", passphrase=PASSWORD,
                              kdf=fast_kdf())
    return cbt.Vault.init(root / "vault")


def _disk(path: Path, seed: int, size: int = SIZE) -> Path:
    """Random data with holes: blocks 40-59 and 200-219 never written."""
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for lo, hi in ((0, 40), (60, 200), (220, size // BS)):
            f.seek(lo * BS)
            f.write(rng.integers(0, 256, (hi - lo) * BS, dtype=np.uint8).tobytes())
    return path


def _write(path: Path, off: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(data)


def _hint(path: Path, ranges: list[tuple[int, int]], size_a: int = SIZE,
          size_b: int = SIZE) -> Path:
    path.write_text(json.dumps({"block_size": BS, "size_a": size_a, "size_b": size_b,
                                "blocks": 0, "ranges": [list(r) for r in sorted(ranges)]}))
    return path


class History:
    """A disk, its vault, and the copy of the disk kept at each point."""

    def __init__(self, root: Path, encrypted: bool, seed: int = 1) -> None:
        self.root = root
        self.vault = _vault(root, encrypted)
        self.disk = _disk(root / "disk.img", seed)
        self.kept: list[tuple[str, bytes]] = []
        self.runs = 0

    def backup(self, **kw: object) -> cbt.PointRecord:
        self.runs += 1
        p = self.vault.backup("vm", [f"d={self.disk}"], block_size=BS, workers=1,
                              created=f"2024-01-01T00:{self.runs // 60:02d}:"
                                      f"{self.runs % 60:02d}Z", **kw)  # type: ignore[arg-type]
        self.kept.append((p.id, self.disk.read_bytes()))
        return p

    def restored(self, pid: str) -> bytes:
        out = self.root / "restored.img"
        self.vault.restore(pid, out, disk="d", workers=1, force=True)
        try:
            return out.read_bytes()
        finally:
            out.unlink()

    def check_all(self) -> None:
        for pid, truth in self.kept:
            assert self.restored(pid) == truth, pid


M64 = (1 << 64) - 1
RUN = (256 << 10) // BS  # blocks in a run of the sample (SAMPLE_RUN, 256 KiB)


def _splitmix(x: int) -> int:
    """SplitMix64's finaliser, in Python integers (the documented scramble)."""
    z = (x * 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def _turn(block: int, seq: int, period: int) -> bool:
    return (_splitmix(block // RUN) % period + seq) % period == 0


def _sample(prev_data: np.ndarray, alloc: np.ndarray, changed: np.ndarray, seq: int,
            fraction: float) -> np.ndarray:
    """The documented sample: held by the previous point (DATA or ZERO), allocated now, not
    called changed, and the block's turn: (scramble(block // RUN) % p + seq) % p == 0,
    p = ceil(1/fraction)."""
    if fraction == 0:
        return np.zeros(len(alloc), dtype=bool)
    period = math.ceil(1 / fraction)
    turn = np.array([_turn(b, seq, period) for b in range(len(alloc))])
    return prev_data & alloc & ~changed & turn


def _alloc_bytes(path: Path) -> int:
    """Bytes in the allocated blocks of ``path`` (its last block ends with the file)."""
    size = path.stat().st_size
    blocks = np.nonzero(data_block_mask(path, BS))[0]
    return int(np.minimum((blocks + 1) * BS, size).sum() - (blocks * BS).sum())


def _differing(a: bytes, b: bytes) -> int:
    """Blocks that differ between two copies of the same size."""
    x, y = (np.frombuffer(v, dtype=np.uint8).reshape(-1, BS) for v in (a, b))
    return int((x != y).any(axis=1).sum())


def _data_blocks(data: bytes) -> np.ndarray:
    """Blocks holding a nonzero byte."""
    a = np.frombuffer(data, dtype=np.uint8).reshape(-1, BS)
    return a.any(axis=1)


@pytest.mark.parametrize("encrypted", [False, True])
def test_exact_hint_reads_changed_blocks_plus_sample(tmp_path: Path, encrypted: bool) -> None:
    h = History(tmp_path, encrypted)
    first = h.backup(hints={"d": _hint(tmp_path / "h0.json", [])})
    d0 = first.disks[0]
    assert (d0.change_source, d0.change_source_reason) == ("hash", None)  # a first backup
    alloc0 = data_block_mask(h.disk, BS)
    assert d0.bytes_read == int(alloc0.sum()) * BS
    prev_data = alloc0 & _data_blocks(h.disk.read_bytes())
    # writes straddling block boundaries, a 1-byte write, a block of zeros over data
    writes = [(3 * BS + 100, 2 * BS), (100 * BS + 4095, 2), (150 * BS + 7, 1), (10 * BS, BS)]
    for k, (off, n) in enumerate(writes):
        _write(h.disk, off, bytes(n) if k == 3 else os.urandom(n))
    p = h.backup(hints={"d": _hint(tmp_path / "h1.json", writes)}, verify_fraction=0.25)
    d = p.disks[0]
    changed = np.zeros(BLOCKS, dtype=bool)
    for off, n in writes:
        changed[off // BS:-(-(off + n) // BS)] = True
    alloc = data_block_mask(h.disk, BS)
    sample = _sample(prev_data, alloc, changed, 1, 0.25)
    assert (d.change_source, d.change_source_reason) == ("hint-file", None)
    assert d.verified_blocks == int(sample.sum()) > 0
    assert d.hint_mismatches == 0
    assert d.bytes_read == int((changed & alloc).sum() + sample.sum()) * BS
    assert d.changed_blocks == _differing(h.kept[0][1], h.disk.read_bytes())
    h.check_all()


@pytest.mark.parametrize("encrypted", [False, True])
def test_lying_hint_caught_in_the_same_run_at_fraction_one(tmp_path: Path,
                                                           encrypted: bool) -> None:
    h = History(tmp_path, encrypted)
    h.backup()
    prev_data = data_block_mask(h.disk, BS) & _data_blocks(h.disk.read_bytes())
    _write(h.disk, 5 * BS, os.urandom(10))
    _write(h.disk, 170 * BS + 9, b"\x01")  # omitted from the hint
    _write(h.disk, 180 * BS, os.urandom(BS))  # omitted too
    p = h.backup(hints={"d": _hint(tmp_path / "lie.json", [(5 * BS, 10)])}, verify_fraction=1.0)
    d = p.disks[0]
    assert d.change_source == "hash"
    assert d.change_source_reason == "hint mismatch at block 170"
    assert d.hint_mismatches == 2
    prev_data[5] = False
    assert d.verified_blocks == int(prev_data.sum())
    assert d.bytes_read == int(data_block_mask(h.disk, BS).sum()) * BS  # every block, once
    assert d.changed_blocks == 3
    assert any("missed changes" in w and "block 170" in w for w in p.warnings)
    h.check_all()


def test_lying_hint_caught_within_the_rotation_at_the_default(tmp_path: Path) -> None:
    h = History(tmp_path, False)
    h.backup()
    _write(h.disk, 77 * BS + 1, b"\xff\xfe")  # a change no hint will ever name
    empty = _hint(tmp_path / "empty.json", [])
    caught_at = None
    for run in range(1, 33):
        d = h.backup(hints={"d": empty}).disks[0]
        if d.change_source == "hash":
            assert d.change_source_reason == "hint mismatch at block 77"
            assert d.hint_mismatches == 1
            caught_at = run
            break
        assert d.change_source == "hint-file"
        # the lie is in the point until caught (what a lying source costs)
        assert h.restored(h.kept[-1][0]) != h.kept[-1][1]
    assert caught_at is not None and caught_at <= 32
    assert caught_at == min(k for k in range(1, 33) if _turn(77, k, 32))  # its turn
    pid, truth = h.kept[-1]
    assert h.restored(pid) == truth
    # and the run after is tracked again, and reads only its sample
    assert h.backup(hints={"d": empty}).disks[0].change_source == "hint-file"


def test_holes_of_the_previous_point_are_always_read(tmp_path: Path) -> None:
    h = History(tmp_path, False)
    h.backup()
    _write(h.disk, 45 * BS, os.urandom(3 * BS))  # into the hole, no hint says so
    _punch(h.disk, 120 * BS, 4 * BS)  # and a punched hole, not named either
    p = h.backup(hints={"d": _hint(tmp_path / "h.json", [])}, verify_fraction=0.0)
    d = p.disks[0]
    assert (d.change_source, d.verified_blocks, d.hint_mismatches) == ("hint-file", 0, 0)
    assert d.bytes_read == 3 * BS  # the blocks that were holes; nothing else
    assert d.changed_blocks == 7
    h.check_all()


def _punch(path: Path, off: int, length: int) -> None:
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    fd = os.open(path, os.O_RDWR)
    try:
        assert libc.fallocate(fd, 0x01 | 0x02, off, length) == 0
    finally:
        os.close(fd)


@pytest.mark.parametrize("encrypted", [False, True])
def test_verify_fraction_zero_reads_only_the_change(tmp_path: Path, encrypted: bool) -> None:
    h = History(tmp_path, encrypted)
    h.backup()
    _write(h.disk, 7 * BS + 5, b"abc")
    d = h.backup(hints={"d": _hint(tmp_path / "h.json", [(7 * BS + 5, 3)])},
                 verify_fraction=0).disks[0]
    assert (d.change_source, d.verified_blocks, d.bytes_read) == ("hint-file", 0, BS)
    assert d.changed_blocks == 1
    h.check_all()


def test_full_scan_overrides_the_hint(tmp_path: Path) -> None:
    h = History(tmp_path, False)
    h.backup()
    _write(h.disk, 0, b"x")
    d = h.backup(hints={"d": _hint(tmp_path / "h.json", [(0, 1)])}, full_scan=True).disks[0]
    assert (d.change_source, d.change_source_reason) == ("hash", "--full-scan")
    assert d.bytes_read == int(data_block_mask(h.disk, BS).sum()) * BS
    h.check_all()


def test_no_hint_is_a_plain_hash_scan(tmp_path: Path) -> None:
    h = History(tmp_path, False)
    h.backup()
    d = h.backup().disks[0]
    assert (d.change_source, d.change_source_reason, d.verified_blocks) == ("hash", None, 0)


@pytest.mark.parametrize("says_old_size", [True, False])
def test_resized_disk_is_hash_scanned(tmp_path: Path, says_old_size: bool) -> None:
    h = History(tmp_path, False)
    h.backup()
    os.truncate(h.disk, SIZE + 3 * BS + 17)
    _write(h.disk, SIZE + BS, os.urandom(100))
    new = SIZE + 3 * BS + 17
    hint = _hint(tmp_path / "h.json", [(SIZE, new - SIZE)],
                 size_a=SIZE if says_old_size else new, size_b=new)
    d = h.backup(hints={"d": hint}).disks[0]
    assert (d.change_source, d.change_source_reason) == ("hash", "disk resized")
    assert d.bytes_read == _alloc_bytes(h.disk)
    h.check_all()


def test_hint_for_an_unknown_disk_is_refused(tmp_path: Path) -> None:
    h = History(tmp_path, False)
    with pytest.raises(CbtValueError, match="'nope'"):
        h.backup(hints={"nope": _hint(tmp_path / "h.json", [])})
    assert h.vault.points() == []


def test_early_scan_is_not_taken_for_a_tracked_disk(tmp_path: Path) -> None:
    h = History(tmp_path, False)
    h.backup()
    scans = start_scan([(h.disk, BS)]).wait()  # (the disk as it is before the change)
    _write(h.disk, 12 * BS, os.urandom(2 * BS))
    req = BackupRequest("vm", [DiskSpec("d", str(h.disk))], workers=1,
                        early=FinishedScan(scans),  # type: ignore[arg-type]
                        hints={"d": str(_hint(tmp_path / "h.json", [(12 * BS, 2 * BS)]))},
                        verify_fraction=0)
    p = backup(h.vault, req)
    h.kept.append((p.id, h.disk.read_bytes()))
    d = p.disks[0]
    assert (d.change_source, d.bytes_read, d.changed_blocks) == ("hint-file", 2 * BS, 2)
    h.check_all()


@pytest.mark.parametrize("encrypted", [False, True])
def test_source_changes_and_settle(tmp_path: Path, encrypted: bool) -> None:
    h = History(tmp_path, encrypted)
    calls: list[object] = []
    base = TrackingBase("file", dev=1, ino=2, size=SIZE, ctime_ns=3, mtime_ns=4)

    def changes(label: str, parent: DiskRecord | None, bs: int, size: int) -> ChangeHint:
        calls.append(("changes", label, parent.seq if parent else None, bs, size))
        return ChangeHint("fiemap", ((30, 32),))

    def before() -> list[str]:
        calls.append("before_commit")
        return []

    def settle() -> dict[str, TrackingBase]:
        calls.append("settle")
        return {"d": base}

    def run(n: int) -> DiskRecord:
        req = BackupRequest("vm", [DiskSpec("d", str(h.disk))], block_size=BS, workers=1,
                            created=f"2024-01-02T00:00:0{n}Z", changes=changes, settle=settle,
                            before_commit=before, verify_fraction=0.5)
        p = backup(h.vault, req)
        h.kept.append((p.id, h.disk.read_bytes()))
        return h.vault.load_point(p.id).disks[0]  # (as recorded)

    first = run(0)
    assert calls == ["before_commit", "settle"]  # a first backup asks no source
    assert (first.change_source, first.tracking_base) == ("hash", base.to_json())
    _write(h.disk, 30 * BS + 5, b"x" * (BS + 1))  # blocks 30, 31
    calls.clear()
    d = run(1)
    assert calls == [("changes", "d", 0, BS, SIZE), "before_commit", "settle"]
    assert (d.change_source, d.change_source_reason, d.hint_mismatches) == ("fiemap", None, 0)
    assert d.tracking_base == base.to_json()
    assert d.changed_blocks == 2
    h.check_all()


def test_a_source_that_falls_back_says_why(tmp_path: Path) -> None:
    h = History(tmp_path, False)
    h.backup()
    req = BackupRequest("vm", [DiskSpec("d", str(h.disk))], workers=1,
                        changes=lambda *_: ChangeHint.hash("base replaced"))
    d = backup(h.vault, req).disks[0]
    assert (d.change_source, d.change_source_reason, d.tracking_base) == \
        ("hash", "base replaced", None)
    assert d.bytes_read == _alloc_bytes(h.disk)


@pytest.mark.parametrize("fraction", [1 / 32, 0.1, 0.5, 1.0])
def test_sample_rotation_covers_every_block_and_does_not_alias(fraction: float) -> None:
    from cbt.ops.backup import sample_mask

    bs = 16 << 10
    # allocated like a striped file system: 1 MiB of every 4 MiB, over 8 GiB
    blocks = np.concatenate([np.arange(o, o + 64, dtype=np.uint64)
                             for o in range(0, (8 << 30) // bs, 256)])
    period = math.ceil(1 / fraction)
    hits = np.zeros(len(blocks), dtype=np.int64)
    for seq in range(100, 100 + period):
        m = sample_mask(blocks, seq, fraction, bs)
        hits += m
        # about the fraction in every run, whatever the layout's own period
        assert abs(m.mean() - 1 / period) < 0.25 / period, (seq, m.mean())
    assert (hits == 1).all()  # each block exactly once in any `period` runs
    assert not sample_mask(blocks, 7, 0.0, bs).any()


def test_tracked_backup_extends_a_format1_vault_with_a_diff_as_hint(tmp_path: Path) -> None:
    """The committed format-1 vault: restore a disk of its latest point, change it, and back
    it up with ``cbt diff --json`` of the two images as the hint file."""
    import shutil

    from helpers.cli import cbt as run_cbt

    fixture = Path(__file__).parents[1] / "fixtures" / "vault-format1"
    vault_dir = Path(shutil.copytree(fixture, tmp_path / "vault"))
    v = cbt.Vault.open(vault_dir)
    latest = v.latest("web")
    assert latest is not None
    label = latest.disks[0].label
    old_img = tmp_path / "old.img"
    v.restore(latest.id, old_img, disk=label, workers=1)
    disk = tmp_path / "disk.img"
    shutil.copyfile(old_img, disk)
    size = disk.stat().st_size
    _write(disk, size // 3, b"tracked!" * 700)  # ~5.5 KiB straddling blocks
    _write(disk, size - 1, b"\x07")  # the last byte
    r = run_cbt("diff", old_img, disk, "--block-size", "4K", "--json")
    assert r.returncode == 1, r.stderr  # (1: they differ)
    hint = tmp_path / "hint.json"
    hint.write_text(r.stdout)
    p = v.backup("web", [f"{label}={disk}"], workers=1, hints={label: hint},
                 verify_fraction=1.0)
    d = p.disks[0]
    assert (d.change_source, d.change_source_reason, d.hint_mismatches) == \
        ("hint-file", None, 0)
    record = json.loads((vault_dir / "points" / f"{p.id}.json").read_text())
    assert record["format_version"] == 1
    out = tmp_path / "restored.img"
    v.restore(p.id, out, disk=label, workers=1)
    assert out.read_bytes() == disk.read_bytes()


def test_a_source_ranges_unsorted_and_overlapping_lose_nothing(tmp_path: Path) -> None:
    h = History(tmp_path, False)
    h.backup()
    for b in (5, 6, 7, 90, 300, 301):
        _write(h.disk, b * BS + 11, os.urandom(7))
    req = BackupRequest("vm", [DiskSpec("d", str(h.disk))], workers=1, verify_fraction=0,
                        changes=lambda *_: ChangeHint("fiemap", ((300, 302), (5, 7), (6, 8),
                                                                 (90, 91), (2, 4))))
    p = backup(h.vault, req)
    h.kept.append((p.id, h.disk.read_bytes()))
    d = p.disks[0]
    assert (d.change_source, d.changed_blocks, d.bytes_read) == ("fiemap", 6, 8 * BS)
    h.check_all()


@pytest.mark.parametrize("encrypted", [False, True])
def test_a_lie_over_allocated_zero_blocks_is_caught(tmp_path: Path, encrypted: bool) -> None:
    """A thick disk: blocks written with zeros are allocated ZERO blocks, not holes.  A write
    into one that the hint omits is caught by the sample like any other (it is read)."""
    h = History(tmp_path, encrypted)
    _write(h.disk, 0, bytes(30 * BS))  # blocks 0-29: allocated, all zeros
    first = h.backup()
    assert first.disks[0].bytes_read == int(data_block_mask(h.disk, BS).sum()) * BS
    _write(h.disk, 12 * BS + 3, b"secret")  # into a ZERO block; the hint names block 100
    _write(h.disk, 100 * BS, os.urandom(BS))
    p = h.backup(hints={"d": _hint(tmp_path / "lie.json", [(100 * BS, BS)])},
                 verify_fraction=1.0)
    d = p.disks[0]
    assert (d.change_source, d.change_source_reason) == ("hash", "hint mismatch at block 12")
    assert d.hint_mismatches == 1
    assert d.verified_blocks == int(data_block_mask(h.disk, BS).sum()) - 1  # all but block 100
    h.check_all()


@pytest.mark.parametrize("encrypted", [False, True])
@pytest.mark.parametrize("repaired", [False, True])
def test_a_hint_is_not_applied_to_an_older_point_when_the_latest_is_lost(
        tmp_path: Path, encrypted: bool, repaired: bool) -> None:
    """A hint says what changed since the disk's latest point.  When that point's record is
    damaged (or set aside by ``verify --repair``), the run follows an older point: the
    hint, which knows nothing of the changes in between, must not be used."""
    from cbt.ops.verify import repair

    h = History(tmp_path, encrypted)
    h.backup()
    before = set(h.vault.storage.list("points"))
    _write(h.disk, 50 * BS, os.urandom(BS))
    h.backup(hints={"d": _hint(tmp_path / "h2.json", [(50 * BS, BS)])}, verify_fraction=0)
    (latest,) = set(h.vault.storage.list("points")) - before
    record = tmp_path / "vault" / latest
    raw = bytearray(record.read_bytes())
    raw[len(raw) // 2] ^= 1
    record.write_bytes(raw)
    if repaired:
        assert repair(h.vault).repair.records_quarantined == [latest]
        assert h.vault.storage.list("points") == sorted(before)
    _write(h.disk, 60 * BS, os.urandom(BS))
    p = h.backup(hints={"d": _hint(tmp_path / "h3.json", [(60 * BS, BS)])}, verify_fraction=0)
    d = p.disks[0]
    assert d.change_source == "hash"
    assert d.change_source_reason is not None and "is lost" in d.change_source_reason
    assert d.bytes_read == int(data_block_mask(h.disk, BS).sum()) * BS
    pid, truth = h.kept[-1]
    assert h.restored(pid) == truth
    # and the run after is tracked again: its previous point is the latest
    _write(h.disk, 70 * BS, os.urandom(BS))
    d = h.backup(hints={"d": _hint(tmp_path / "h4.json", [(70 * BS, BS)])},
                 verify_fraction=0).disks[0]
    assert (d.change_source, d.bytes_read) == ("hint-file", BS)
    pid, truth = h.kept[-1]
    assert h.restored(pid) == truth


@pytest.mark.parametrize("fraction", [1e-19, 1e-300, 5e-324])
def test_a_tiny_verify_fraction_checks_next_to_nothing(tmp_path: Path, fraction: float) -> None:
    """Any fraction from 0 to 1 is valid: one too small for a period of 64 bits verifies
    (next to) nothing, it does not crash the run."""
    h = History(tmp_path, False)
    h.backup()
    _write(h.disk, 7 * BS, os.urandom(BS))
    d = h.backup(hints={"d": _hint(tmp_path / "h.json", [(7 * BS, BS)])},
                 verify_fraction=fraction).disks[0]
    assert (d.change_source, d.verified_blocks, d.bytes_read) == ("hint-file", 0, BS)
    h.check_all()


@pytest.mark.parametrize("encrypted", [False, True])
def test_a_hint_is_not_applied_when_the_last_point_committed_is_not_the_latest(
        tmp_path: Path, encrypted: bool) -> None:
    """A point committed with a time before the VM's latest (``--now``, a clock set back)
    is not the run's previous point, though its hint was since that one: no hint is used
    until the previous point is the one committed last."""
    h = History(tmp_path, encrypted)

    def run(at: str, write: int) -> DiskRecord:
        _write(h.disk, write * BS, os.urandom(BS))
        hint = _hint(tmp_path / f"h{write}.json", [(write * BS, BS)])
        p = h.vault.backup("vm", [f"d={h.disk}"], block_size=BS, workers=1, created=at,
                           hints={"d": hint}, verify_fraction=0)
        h.kept.append((p.id, h.disk.read_bytes()))
        return p.disks[0]

    run("2024-01-01T00:00:01Z", 10)
    assert run("2024-01-01T00:00:09Z", 50).change_source == "hint-file"
    back = run("2024-01-01T00:00:05Z", 60)  # (its previous point: the one at :09)
    assert (back.change_source, back.bytes_read) == ("hint-file", BS)
    d = run("2024-01-01T00:00:10Z", 70)  # follows :09 (the latest), its hint is since :05
    assert d.change_source == "hash"
    assert d.change_source_reason is not None and "committed after" in d.change_source_reason
    assert run("2024-01-01T00:00:11Z", 80).change_source == "hint-file"
    h.check_all()


@pytest.mark.parametrize("encrypted", [False, True])
def test_a_block_the_vault_lost_is_stored_again_by_a_tracked_run(tmp_path: Path,
                                                                 encrypted: bool) -> None:
    """A tracked disk copies its unchanged blocks' digests from the previous point.  A
    block of it that the vault lost (damaged, dropped from the index by repair) would be
    copied unseen into the new point, which a hash scan would have stored again: a sample
    block missing from the index hash-scans the disk (at fraction 1 in the same run)."""
    from cbt.ops.verify import repair

    h = History(tmp_path, encrypted)
    h.backup()
    (pack,) = [p for p in (tmp_path / "vault" / "packs").rglob("*") if p.is_file()]
    raw = bytearray(pack.read_bytes())
    raw[200] ^= 1  # inside the first blob: repair drops that block from the index
    pack.write_bytes(raw)
    assert repair(h.vault).repair.blobs_damaged == 1
    _write(h.disk, 7 * BS, os.urandom(BS))
    p = h.backup(hints={"d": _hint(tmp_path / "h.json", [(7 * BS, BS)])}, verify_fraction=1)
    d = p.disks[0]
    assert (d.change_source, d.change_source_reason) == (
        "hash", "block 0 of the previous point missing from the vault")
    assert d.hint_mismatches == 0
    assert any("hash-scanned the disk" in w for w in p.warnings)
    pid, truth = h.kept[-1]
    assert h.restored(pid) == truth  # the disk was readable: the new point must restore
    assert not h.vault.verify(pid, data=True).problems

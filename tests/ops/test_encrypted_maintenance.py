"""Maintenance of an encrypted vault through the Python API (issue 11): verify,
verify --data, repair, prune, gc and restore after them; sealed files that fail
authentication are verify problems naming the file; the lock holder record
names no command; and a whole encrypted vault, read byte by byte, shows none of
its VM's name, labels, host paths, disk data or plain digests (while an
unencrypted one shows them all, so the test can fail).

Truth: copies of the disks taken at backup time, BLAKE3 of their blocks by the
``blake3`` package, the files of the vault read with ``os.walk``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import blake3
import numpy as np
import pytest
from helpers import KIB, MIB
from helpers.images import assert_same_bytes, copy_disk, fast_random, write_at
from helpers.vaults import PASSWORD, fast_kdf

from cbt.api import Vault
from cbt.format.records import JobRecord, KeptSnapshots
from cbt.ops.gc import gc
from cbt.ops.prune import PruneRequest, prune
from cbt.ops.verify import repair, verify
from cbt.repo.registry import kept_snapshots, list_jobs, register_snapshots, save_job

BS = 16 * KIB
ENC = "aes-256-gcm"
VM = "zebravm"
LABELS = ("zebralabel", "zebrasecond")
MARKER = b"ZEBRA-MARKER-6f1c2a9e-do-not-leak"



def _new(path: Path, encryption: str = ENC) -> Vault:
    if encryption == "none":
        return Vault.init(path)
    return Vault.init(path, encryption=encryption, passphrase=PASSWORD, kdf=fast_kdf())


def _disk(path: Path, blocks: int, seed: int, zero_every: int = 5) -> Path:
    """Random blocks (incompressible: stored as they are unencrypted), each holding
    :data:`MARKER` once at a block-dependent offset; every ``zero_every``-th all zero."""
    data = bytearray(fast_random(blocks * BS, seed))
    for b in range(blocks):
        if b % zero_every == zero_every - 1:
            data[b * BS:(b + 1) * BS] = bytes(BS)
            continue
        at = b * BS + (b * 977) % (BS - len(MARKER))
        data[at:at + len(MARKER)] = MARKER
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data))
    return path


def _vault_files(root: Path) -> dict[str, bytes]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = Path(dirpath, f)
            out[str(p.relative_to(root))] = p.read_bytes()
    return out


def _history(tmp_path: Path, encryption: str = ENC) -> tuple[Vault, list[str],
                                                              list[dict[str, Path]]]:
    """Two points of two disks: a full backup, then an incremental with a quarter of
    the blocks of one disk rewritten; copies of the disks at each point."""
    v = _new(tmp_path / "vault", encryption)
    disks = {LABELS[0]: _disk(tmp_path / "host" / "a.img", 64, 1),
             LABELS[1]: _disk(tmp_path / "host" / "b.img", 32, 2)}
    specs = [f"{lb}={p}" for lb, p in disks.items()]
    ids, copies = [], []
    for day in range(2):
        if day:
            for b in range(0, 64, 4):
                write_at(disks[LABELS[0]], b * BS, fast_random(BS, 100 + b))
        ids.append(v.backup(VM, specs, block_size=BS, workers=1).id)
        copies.append({lb: copy_disk(p, tmp_path / f"day{day}" / f"{lb}.img")
                       for lb, p in disks.items()})
    return v, ids, copies


def _restores(v: Vault, point: str, copies: dict[str, Path], out: Path) -> None:
    v.restore(point, out)
    for lb, copy in copies.items():
        assert_same_bytes(out / f"{lb}.img", copy)


def _flip(path: Path, at: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0x01
    path.write_bytes(bytes(raw))


# -- the cycle -----------------------------------------------------------------------------


def test_verify_and_verify_data_are_clean_and_restore_agrees(tmp_path: Path) -> None:
    v, ids, copies = _history(tmp_path)
    assert v.encrypted
    r = verify(v)
    assert r.problems == [] and r.points == 2 and r.warnings == []
    rd = verify(v, data=True)
    assert rd.problems == [] and rd.data
    assert rd.blocks_checked == r.blocks_checked > 0
    for day, pid in enumerate(ids):
        _restores(v, pid, copies[day], tmp_path / f"r{day}")


def test_verify_data_names_a_sealed_blob_that_fails_authentication(tmp_path: Path) -> None:
    v, _ids, _ = _history(tmp_path)
    index = v.load_index()
    pack = Path(v.root, "packs")
    e = index.entry(0)
    victim = next(pack.rglob(f"{e.pack}.pack"))
    _flip(victim, e.offset + 48 + e.stored // 2)  # inside the sealed payload
    assert verify(v).problems == []  # headers and trailers agree: only --data opens blobs
    problems = verify(v, data=True).problems
    assert problems and {p.problem for p in problems} == {"blob fails authentication"}
    assert {p.pack for p in problems} == {e.pack}
    # repair indexes every blob but that one, and names the points that use it
    out = repair(v)
    assert out.repair.blobs_damaged == 1
    assert out.repair.blobs_indexed == len(index) - 1
    assert set(out.repair.damaged_points) == {p.point for p in problems}


def test_repair_after_losing_an_index_segment(tmp_path: Path) -> None:
    v, ids, copies = _history(tmp_path)
    before = v.load_index()
    segments = v.segment_names()
    assert segments and all(re.fullmatch(r"index/[0-9a-f]{32}\.cbtidx", s) for s in segments)
    Path(v.root, segments[0]).unlink()
    out = repair(v)
    assert out.problems == []
    assert out.repair.blobs_indexed == len(before) and out.repair.blobs_damaged == 0
    after = v.segment_names()
    assert len(after) == 1 and after[0] not in segments
    assert re.fullmatch(r"index/[0-9a-f]{32}\.cbtidx", after[0])
    assert "repaired" not in after[0]
    assert os.listdir(Path(v.root, "index")) == [after[0].split("/")[1]]
    assert verify(v, data=True).problems == []
    _restores(v, ids[1], copies[1], tmp_path / "r")


@pytest.mark.parametrize("kind", ["point", "manifest", "segment"])
def test_a_sealed_file_failing_authentication_is_a_problem_naming_it(tmp_path: Path,
                                                                      kind: str) -> None:
    v, ids, _ = _history(tmp_path)
    name = {"point": v.point_name(ids[0]),
            "manifest": v.manifest_name(ids[1], LABELS[0]),
            "segment": v.segment_names()[0]}[kind]
    _flip(Path(v.root, name), 20)
    r = verify(v)  # no exception: a problem
    assert any(name in p.problem for p in r.problems), r.problems  # (in its path)
    if kind == "manifest":
        assert any(p.point == ids[1] and p.disk == LABELS[0] for p in r.problems)


def test_a_sealed_point_record_moved_to_another_name_fails(tmp_path: Path) -> None:
    """Swapping two sealed records (each valid where it was written) is found."""
    v, ids, _ = _history(tmp_path)
    a, b = Path(v.root, v.point_name(ids[0])), Path(v.root, v.point_name(ids[1]))
    ra, rb = a.read_bytes(), b.read_bytes()
    a.write_bytes(rb)
    b.write_bytes(ra)
    problems = verify(v).problems
    for p in (a, b):
        assert any(str(p) in x.problem and "fails authentication" in x.problem
                   for x in problems), problems


def test_prune_hides_and_deletes_then_gc_frees_and_restore_still_works(tmp_path: Path) -> None:
    """Three points; the middle one goes.  Day 2's delta is based on day 1 (not on day
    1's successor), so pruning day 1 would hide it; pruning day 2 deletes it, records
    and manifests.  gc then frees day 2's own blocks, rewriting packs with sealed blobs
    copied as they are; the others restore bit for bit."""
    v, ids, copies = _history(tmp_path)
    disk = tmp_path / "host" / "a.img"
    for b in range(0, 64, 2):
        write_at(disk, b * BS, fast_random(BS, 500 + b))
    ids.append(v.backup(VM, [f"{LABELS[0]}={disk}", f"{LABELS[1]}={tmp_path / 'host' / 'b.img'}"],
                        block_size=BS, workers=1).id)
    copies.append({LABELS[0]: copy_disk(disk, tmp_path / "day2" / "a.img"),
                   LABELS[1]: copies[1][LABELS[1]]})
    gone = ids[1]
    record = v.load_point(gone)
    names = [v.point_name(gone)] + [v.manifest_name(gone, d.label) for d in record.disks]
    assert all(Path(v.root, n).exists() for n in names)
    res = prune(v, PruneRequest(keep=lambda pts: {p.id: ([] if p.id == gone else ["k"])
                                                  for p in pts},
                                expired=lambda vm, created: False))
    assert [(x.recovery_point, x.keep) for x in res.points] == [
        (ids[0], True), (gone, False), (ids[2], True)]
    hidden = [r for r in v.records() if r.hidden]
    if hidden:  # day 3 based on day 2: it stays, hidden, its record sealed again
        assert [r.id for r in hidden] == [gone]
        assert Path(v.root, v.point_name(gone)).read_bytes()[:8] == b"CBTSEAL1"
    else:
        assert not any(Path(v.root, n).exists() for n in names)
    assert [p.id for p in v.points()] == [ids[0], ids[2]]
    packs_before = sorted(p.name for p in Path(v.root, "packs").rglob("*.pack"))
    out = gc(v, grace=0.0)
    assert out.packs_removed + out.packs_rewritten > 0 and out.bytes_freed > 0
    assert sorted(p.name for p in Path(v.root, "packs").rglob("*.pack")) != packs_before
    segments = v.segment_names()
    assert len(segments) == 1 and re.fullmatch(r"index/[0-9a-f]{32}\.cbtidx", segments[0])
    assert verify(v, data=True).problems == []
    _restores(v, ids[0], copies[0], tmp_path / "r0")
    _restores(v, ids[2], copies[2], tmp_path / "r2")


# -- the lock holder and the registry --------------------------------------------------------


def test_lock_holder_names_no_command_in_an_encrypted_vault(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    disk = _disk(tmp_path / "zebrahost" / "d.img", 8, 3)
    argv = ["cbt", "backup", str(tmp_path / "e"), VM, str(disk)]
    monkeypatch.setattr(sys, "argv", argv)
    for enc in ("none", ENC):
        v = _new(tmp_path / enc, enc)
        v.backup(VM, [f"{LABELS[0]}={disk}"], block_size=BS, workers=1)
        [vm_lock] = Path(v.root, "locks").iterdir()  # the VM's lock, left with its holder
        holder = json.loads(vm_lock.read_bytes())
        assert holder["pid"] == os.getpid() and holder["host"] and holder["since"]
        if enc == "none":
            assert vm_lock.name == f"vm-{VM}"
            assert VM in holder["command"] and str(disk) in holder["command"]
        else:
            assert holder["command"] is None and VM not in vm_lock.name
            for lock in (vm_lock, Path(v.root, "gc.lock")):
                raw = lock.read_bytes()
                assert VM.encode() not in raw and b"zebrahost" not in raw


def test_registry_records_are_sealed_under_opaque_names(tmp_path: Path) -> None:
    v = _new(tmp_path / "v")
    job = JobRecord(id=f"{VM}.20260101T000000Z.abcdef", vm=VM, policy="p",
                    start="2026-01-01T00:00:00Z", status="succeeded")
    kept = KeptSnapshots(f"{VM}.20260101T000000Z", VM, "2026-01-01T00:00:00Z",
                         {LABELS[0]: f"/host/{VM}/{LABELS[0]}.img"},
                         [f"/host/{VM}/{LABELS[0]}.img"])
    save_job(v, job)
    register_snapshots(v, kept)
    files = _vault_files(Path(v.root))
    registry = {k: b for k, b in files.items() if k.startswith(("jobs/", "snapshots/"))}
    assert set(registry) == {v.job_name(job.id), v.kept_name(kept.recovery_point)}
    for name, raw in registry.items():
        assert name.endswith(".sealed") and VM not in name
        assert raw.startswith(b"CBTSEAL1") and VM.encode() not in raw
    assert [j.to_json() for j in list_jobs(v, VM)] == [job.to_json()]
    assert kept_snapshots(v) == {kept.recovery_point: kept}
    # a damaged record is skipped, and said so where there is a warnings list
    _flip(Path(v.root, v.job_name(job.id)), 30)
    _flip(Path(v.root, v.kept_name(kept.recovery_point)), 30)
    warnings: list[str] = []
    assert list_jobs(v, VM, warnings) == []
    assert kept_snapshots(v, warnings) == {}
    assert len(warnings) == 2
    for w, name in zip(warnings, (v.job_name(job.id), v.kept_name(kept.recovery_point)),
                       strict=True):
        assert v.storage.where(name) in w and "fails authentication" in w
    # a record moved under another's name fails too (its name is in the associated data)
    other = JobRecord(id=f"{VM}.20260102T000000Z.abcdef", vm=VM, policy="p",
                      start="2026-01-02T00:00:00Z")
    save_job(v, other)
    shutil.copy(Path(v.root, v.job_name(other.id)), Path(v.root, v.job_name(job.id)))
    warnings = []
    assert [j.id for j in list_jobs(v, None, warnings)] == [other.id]
    assert len(warnings) == 1


def test_an_unencrypted_registry_keeps_format_1_names(tmp_path: Path) -> None:
    v = _new(tmp_path / "v", "none")
    job = JobRecord(id="web.20260101T000000Z.abcdef", vm="web", policy="p",
                    start="2026-01-01T00:00:00Z")
    save_job(v, job)
    register_snapshots(v, KeptSnapshots("web.20260101T000000Z", "web", "2026-01-01T00:00:00Z",
                                        {}, []))
    assert Path(v.root, "jobs", f"{job.id}.json").read_bytes() == job.to_json()
    assert Path(v.root, "snapshots", "web.20260101T000000Z.json").exists()
    Path(v.root, "jobs", "broken.json").write_bytes(b"{not json")
    warnings: list[str] = []
    assert [j.id for j in list_jobs(v, None, warnings)] == [job.id]
    assert len(warnings) == 1 and "broken.json" in warnings[0]


# -- nothing in an encrypted vault reveals what it holds -----------------------------------


def _windows(images: list[Path], n: int, seed: int) -> list[bytes]:
    """``n`` distinct 64-byte windows sampled from the non-zero blocks of ``images``."""
    rng = np.random.default_rng(seed)
    out: set[bytes] = set()
    datas = [p.read_bytes() for p in images]
    while len(out) < n:
        d = datas[int(rng.integers(len(datas)))]
        b = int(rng.integers(len(d) // BS))
        block = d[b * BS:(b + 1) * BS]
        if block.count(0) == BS:
            continue
        at = int(rng.integers(BS - 64))
        if block[at:at + 64].count(0) < 8:  # disk data, not a run of zeros
            out.add(block[at:at + 64])
    return sorted(out)


def _found_windows(blob: bytes, windows: list[bytes]) -> set[bytes]:
    """Which of ``windows`` occur anywhere in ``blob`` (by their first 8 bytes, at
    every offset, then compared whole)."""
    a = np.frombuffer(blob, dtype=np.uint8)
    if len(a) < 64:
        return set()
    n = len(a) - 7
    keys = np.zeros(n, dtype=np.uint64)
    for k in range(8):
        keys |= a[k:k + n].astype(np.uint64) << np.uint64(8 * k)
    prefixes = np.array([int.from_bytes(w[:8], "little") for w in windows], dtype=np.uint64)
    want = set(windows)
    return {bytes(blob[h:h + 64]) for h in np.nonzero(np.isin(keys, prefixes))[0].tolist()} & want


def _block_digests(images: list[Path]) -> list[bytes]:
    out = []
    for p in images:
        d = p.read_bytes()
        for b in range(len(d) // BS):
            block = d[b * BS:(b + 1) * BS]
            if block.count(0) != BS:
                out.append(blake3.blake3(block).digest())
    return out


def _leaks(tmp_path: Path, encryption: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Build a vault (two points, a repair, a kept snapshot and a job record; the command
    line names the VM and the disk), then count what its files show."""
    host = tmp_path / "zebrahostdir"
    disks = [_disk(host / f"{LABELS[0]}.img", 96, 7), _disk(host / f"{LABELS[1]}.img", 48, 8)]
    vault = tmp_path / "vault"
    monkeypatch.setattr(sys, "argv", ["cbt", "backup", str(vault), VM, str(disks[0])])
    v = _new(vault, encryption)
    specs = [f"{lb}={p}" for lb, p in zip(LABELS, disks, strict=True)]
    first = v.backup(VM, specs, block_size=BS, workers=1)
    write_at(disks[0], 3 * BS, fast_random(BS - len(MARKER), 99) + MARKER)
    second = v.backup(VM, specs, block_size=BS, workers=1)
    assert repair(v).problems == []
    save_job(v, JobRecord(id=f"{VM}.20260101T000000Z.abcdef", vm=VM, policy="zebrapolicy",
                          start=first.created, recovery_point=first.id, status="succeeded"))
    register_snapshots(v, KeptSnapshots.of(second, {LABELS[0]: str(disks[0])},
                                           [str(disks[0])]))
    files = _vault_files(vault)
    names = "\n".join(files).encode()
    blob = b"\0".join(files.values())
    words = [VM.encode(), *(lb.encode() for lb in LABELS), str(host).encode(),
             b"zebrahostdir", MARKER]
    digests = _block_digests(disks)
    windows = _windows(disks, 2000, seed=11)
    return {
        "names": sum(w in names for w in words),
        "words": sum(w in blob for w in words),
        "digests": sum(d in blob for d in digests),
        "hex_digests": sum(d.hex().encode() in blob for d in digests),
        "windows": len(set().union(*(_found_windows(b, windows) for b in files.values()))),
        "distinct_windows": len(set(windows)),
    }


@pytest.mark.parametrize("encryption", ["aes-256-gcm", "chacha20-poly1305"])
def test_an_encrypted_vault_reveals_nothing_it_holds(tmp_path: Path, encryption: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    assert _leaks(tmp_path, encryption, monkeypatch) == {
        "names": 0, "words": 0, "digests": 0, "hex_digests": 0, "windows": 0,
        "distinct_windows": 2000}


def test_an_unencrypted_vault_reveals_it_all(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The same reading finds everything in a ``--encryption none`` vault: the search
    above can fail.  (Format 1 stores no hex digests: that count is 0 here too.)"""
    found = _leaks(tmp_path, "none", monkeypatch)
    assert found["names"] >= 2  # the VM in point names, the labels in manifest names
    assert found["words"] == 6  # VM, labels, host path, its folder, the marker
    assert found["digests"] == len(_block_digests([tmp_path / "zebrahostdir" / f"{lb}.img"
                                                   for lb in LABELS])) > 0
    assert found["windows"] == found["distinct_windows"] == 2000


def test_disk_image_helper_is_what_the_leak_test_assumes(tmp_path: Path) -> None:
    """Every non-zero block holds the marker once; a fifth of the blocks are zero."""
    d = _disk(tmp_path / "d.img", 20, 5).read_bytes()
    blocks = [d[i * BS:(i + 1) * BS] for i in range(20)]
    assert sum(b.count(0) == BS for b in blocks) == 4
    assert all(b.count(MARKER) == 1 for b in blocks if b.count(0) != BS)
    assert len(d) == 20 * BS < MIB

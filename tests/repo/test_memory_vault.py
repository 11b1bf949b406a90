"""gc, verify, repair and prune on a vault whose storage is in memory.

The vault is made by real backups on a local directory and copied object by
object into a MemoryStorage; every operation then runs on both copies and
must give the same result (the local one is what the rest of the suite
checks), and what the memory vault still holds is read back block by block
against the disk images themselves.
"""

from __future__ import annotations

import errno
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import blake3
import numpy as np
import pytest

import cbt as cbt_api
from cbt.format.pack import BLOB, decode_blob, pack_name
from cbt.format.records import PointRecord
from cbt.ops.gc import gc
from cbt.ops.prune import PruneRequest, prune
from cbt.ops.verify import repair, verify
from cbt.repo.storage import LocalStorage, MemoryStorage, Storage
from cbt.repo.vault import Vault

BS = 64 << 10
SIZE = 2 << 20


def _images(tmp_path: Path) -> list[np.ndarray]:
    """Three days of one disk: random, then each half rewritten in turn."""
    rng = np.random.default_rng(7)
    day1 = rng.integers(0, 256, SIZE, dtype=np.uint8)
    day2 = day1.copy()
    day2[: SIZE // 2] = rng.integers(0, 256, SIZE // 2, dtype=np.uint8)
    day3 = day2.copy()
    day3[SIZE // 2:] = rng.integers(0, 256, SIZE // 2, dtype=np.uint8)
    return [day1, day2, day3]


def _local_vault(tmp_path: Path) -> tuple[Vault, list[np.ndarray]]:
    days = _images(tmp_path)
    v = cbt_api.Vault.init(tmp_path / "v")
    disk = tmp_path / "os.img"
    for n, data in enumerate(days):
        disk.write_bytes(data.tobytes())
        v.backup("vm", [disk], block_size=BS, workers=2, created=f"2026-01-0{n + 1}T00:00:00Z")
    return Vault.open(tmp_path / "v"), days


def _copy(src: Storage) -> MemoryStorage:
    mem = MemoryStorage()
    for name in src.list(""):
        if name not in ("lock", "gc.lock") and not name.startswith("locks/"):  # not objects
            mem.put(name, src.get(name))
    return mem


def _keep_latest(points: list[PointRecord]) -> dict[str, list[str]]:
    return {p.id: (["latest"] if p is points[-1] else []) for p in points}


def _same(a: dict[str, object], b: dict[str, object]) -> None:
    a, b = dict(a), dict(b)
    a.pop("seconds", None)
    b.pop("seconds", None)
    assert a == b


def _read_back(vault: Vault, point: PointRecord, data: np.ndarray) -> None:
    """Every block of the point, from its pack in the vault, is the disk's block."""
    m = vault.resolve(point, "os")
    index = vault.load_index()
    pos = index.lookup(m.digests)
    assert (pos >= 0).all()
    for blk, p in enumerate(pos.tolist()):
        e = index.entry(p)
        blob = vault.storage.read_range(pack_name(e.pack), e.offset, BLOB.size + e.stored)
        got = bytes(decode_blob(blob, e.digest, e.pack))
        want = data[blk * BS:(blk + 1) * BS].tobytes()
        assert got == want and blake3.blake3(want).digest() == m.digests[blk].tobytes()


def test_gc_verify_prune_on_memory_storage(tmp_path: Path) -> None:
    local, days = _local_vault(tmp_path)
    mem = Vault.open_on(_copy(local.storage))
    assert isinstance(mem.storage, MemoryStorage)
    _same(verify(mem, data=True).to_dict(), verify(local, data=True).to_dict())
    assert verify(mem).problems == [] and len(mem.points()) == 3

    request = PruneRequest(keep=_keep_latest, expired=lambda vm, created: False)
    pruned = prune(mem, request)
    assert pruned.to_dict() == prune(local, request).to_dict()
    assert [p.keep for p in pruned.points] == [False, False, True]
    assert [p.id for p in mem.points()] == [p.id for p in local.points()]
    assert mem.storage.list("points") == local.storage.list("points")

    freed = gc(mem, grace=3600)  # dead packs go to the trash and stay there
    assert freed.to_dict() == gc(local, grace=3600).to_dict()
    assert freed.packs_removed + freed.packs_rewritten > 0 and freed.bytes_freed > 0
    assert mem.storage.list("trash") == local.storage.list("trash") != []
    assert gc(mem, grace=0).trash_emptied == len(local.storage.list("trash"))
    assert mem.storage.list("trash") == []

    after = verify(mem, data=True)
    assert after.problems == [] and after.points == 1
    _same(after.to_dict(), verify(local, data=True).to_dict())
    _read_back(mem, mem.points()[-1], days[2])


def test_repair_on_memory_storage(tmp_path: Path) -> None:
    local, _days = _local_vault(tmp_path)
    mem = Vault.open_on(_copy(local.storage))
    for v in (local, mem):  # the same damage to both: the index lost, one pack unreadable
        for s in v.storage.list("index"):
            v.storage.delete(s)
        victim = v.storage.list("packs")[0]
        v.storage.put(victim, b"\0" * v.storage.size(victim))
    fixed, want = repair(mem), repair(local)
    _same(fixed.to_dict(), want.to_dict())
    assert fixed.repair.packs_quarantined == 1
    assert mem.storage.list("quarantine") == local.storage.list("quarantine")
    assert fixed.repair.damaged_points  # the zeroed pack held blocks of some point


def test_backup_then_gc_verify_prune_on_memory_storage(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # whatever a worker writes by mistake lands here
    days = _images(tmp_path)
    v = cbt_api.Vault.create(MemoryStorage())
    disk = tmp_path / "os.img"
    with ThreadPoolExecutor(2) as pool:
        for n, data in enumerate(days):
            disk.write_bytes(data.tobytes())
            v.backup("vm", [disk], block_size=BS, executor=pool,
                     created=f"2026-01-0{n + 1}T00:00:00Z")
    assert verify(v, data=True).problems == []
    prune(v, PruneRequest(keep=_keep_latest, expired=lambda vm, created: False))
    assert gc(v, grace=0).bytes_freed > 0
    assert verify(v, data=True).problems == []
    _read_back(v, v.points()[-1], days[2])
    # restore workers are forked: each inherits the process's memory storage to read from
    v.restore(v.points()[-1].id, tmp_path / "out")
    assert np.array_equal(np.fromfile(tmp_path / "out" / "os.img", np.uint8), days[2])
    assert sorted(os.listdir(tmp_path)) == ["os.img", "out"], "nothing written beside the disk"


def test_local_copy_is_untouched(tmp_path: Path) -> None:
    """The copy shares nothing with the directory it came from."""
    local, _days = _local_vault(tmp_path)
    before = {n: local.storage.get(n) for n in local.storage.list("")}
    mem = _copy(local.storage)
    for n in mem.list("packs"):
        mem.delete(n)
    assert {n: local.storage.get(n) for n in local.storage.list("")} == before
    assert isinstance(local.storage, LocalStorage)


def test_default_workers_on_memory_storage_are_threads(tmp_path: Path) -> None:
    """A backup with no executor forks its workers; on a memory storage their packs would
    vanish with them, so it runs them as threads: every block is there afterwards."""
    days = _images(tmp_path)
    v = cbt_api.Vault.create(MemoryStorage())
    disk = tmp_path / "os.img"
    disk.write_bytes(days[0].tobytes())
    point = v.backup("vm", [disk], block_size=BS, workers=2)
    assert point.bytes_stored > 0
    assert verify(v, data=True).problems == []
    _read_back(v, point, days[0])


def test_a_forked_process_cannot_write_a_memory_storage() -> None:
    """A child's write would be lost with it: it is refused, and the parent's copy is
    untouched."""
    mem = MemoryStorage()
    mem.put("a", b"parent")
    pid = os.fork()
    if pid == 0:  # the child: reading the inherited copy works, writing is refused
        ok = mem.get("a") == b"parent"
        try:
            mem.put("a", b"child")
        except OSError as exc:
            ok = ok and exc.errno == errno.EPERM and "forked" in str(exc)
        else:
            ok = False
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert mem.get("a") == b"parent"

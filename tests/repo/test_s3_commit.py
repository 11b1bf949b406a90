"""The commit without rename (cbt.repo.trash): moves that copy then delete, on S3.

A crash between the copy and the delete leaves a pack under both names; that
must be harmless to readers, gc, the index and the next backup.  A move that
keeps the mtime is preceded by a touch, so a kill between them never leaves a
pack in the trash with its old time.  A copy reads a pack a gc on SRC moved to
the trash meanwhile.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from helpers import MIB
from helpers.images import assert_same_bytes, write_at, write_random_disk
from helpers.s3 import S3Server, fresh_bucket
from helpers.vaults import PASSWORD, fast_kdf

import cbt as cbt_api
from cbt.format.pack import pack_id_of, pack_name
from cbt.ops.gc import gc
from cbt.repo.storage import LocalStorage, Storage
from cbt.repo.trash import move_to_trash, trash_name


def _vault(location: str | Path) -> cbt_api.Vault:
    return cbt_api.Vault.init(location, "aes-256-gcm", PASSWORD.encode(), fast_kdf())


def _settle() -> None:
    """Wait until what was just written is older than gc's cutoff on S3: the server's
    mtimes are whole seconds, and gc keeps what may be newer than its measure of the
    server's clock (``Storage.clock_offset``)."""
    time.sleep(2.2)


def _packs(storage: Storage) -> list[str]:
    return [n for n in storage.list("packs") if n.endswith(".pack")]


def test_a_pack_under_both_names_is_harmless(s3_env: S3Server, tmp_path: Path) -> None:
    """A gc killed between the copy and the delete of its trash move: the pack is in
    packs/ and trash/.  Restore, verify, the next backup, gc and its trash emptying all
    go on, and nothing committed is lost."""
    v = _vault(f"s3://{fresh_bucket()}/both")
    disk = write_random_disk(tmp_path / "os.img", 3 * MIB, seed=1)
    truth = tmp_path / "truth.img"
    truth.write_bytes(disk.read_bytes())
    p1 = v.backup("web", [f"os={disk}"])
    for name in _packs(v.storage):  # the copy half of a move to the trash, as if killed
        v.storage.put(trash_name(pack_id_of(name)), v.storage.get(name))
    assert v.verify(data=True).problems == []
    v.restore(p1.id, tmp_path / "a")
    assert_same_bytes(tmp_path / "a" / "os.img", truth)
    write_at(disk, MIB, b"\x11" * 65536)
    p2 = v.backup("web", [f"os={disk}"])
    assert sum(d.bytes_new for d in p2.disks) <= 2 * 65536  # deduplicated against packs/
    for _ in range(2):  # empties the trash copies (and what the first run trashed)
        _settle()
        gc(v, grace=0)
    assert v.storage.list("trash") == []  # the packs/ copies stay, in use
    assert v.verify(data=True).problems == []
    v.restore(p1.id, tmp_path / "b")
    assert_same_bytes(tmp_path / "b" / "os.img", truth)
    v.restore(p2.id, tmp_path / "c")
    assert_same_bytes(tmp_path / "c" / "os.img", disk)


def test_a_dead_pack_under_both_names_is_collected(s3_env: S3Server, tmp_path: Path) -> None:
    """The same with a dead pack: its packs/ copy (indexed again from its trailer) is
    trashed by the next gc, and the trash emptied; the live point restores."""
    v = _vault(f"s3://{fresh_bucket()}/dead")
    old = write_random_disk(tmp_path / "old.img", 2 * MIB, seed=2)
    gone = v.backup("tmp", [f"os={old}"])
    disk = write_random_disk(tmp_path / "os.img", 2 * MIB, seed=3)
    kept = v.backup("web", [f"os={disk}"])
    v.storage.delete(v.point_name(gone.id))  # forgotten (what prune does to a record)
    _settle()
    gc(v, grace=3600)
    trashed = [n for n in v.storage.list("trash") if n.endswith(".pack")]
    assert trashed, "gc trashed nothing"
    for name in trashed:  # put back in packs/ too: a move killed after its copy
        v.storage.put(pack_name(pack_id_of(name)), v.storage.get(name))
    for _ in range(2):  # trashes the packs/ copies, then empties the trash
        _settle()
        gc(v, grace=0)
    assert v.storage.list("trash") == []
    assert not {pack_name(pack_id_of(n)) for n in trashed} & set(_packs(v.storage))
    assert v.verify(data=True).problems == []
    v.restore(kept.id, tmp_path / "out")
    assert_same_bytes(tmp_path / "out" / "os.img", disk)


def test_a_move_to_the_trash_killed_midway_never_keeps_the_old_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where rename keeps the mtime (a directory), the pack is touched first: a kill
    between the two leaves it in packs/, never in the trash looking long trashed."""
    storage = LocalStorage.create(tmp_path / "v")
    pid = "0" * 32
    storage.put(pack_name(pid), b"pack")
    old = 1_000_000_000.0
    os.utime(storage.path(pack_name(pid)), (old, old))

    def killed(src: str, dst: str) -> None:
        raise KeyboardInterrupt  # (the kill lands between the two steps)

    monkeypatch.setattr(storage, "rename", killed)
    with pytest.raises(KeyboardInterrupt):
        move_to_trash(storage, pid)
    assert not storage.exists(trash_name(pid))
    assert storage.stat(pack_name(pid)).mtime > old + 1  # (newer than gc's cutoff now)
    monkeypatch.undo()
    move_to_trash(storage, pid)
    assert storage.stat(trash_name(pid)).mtime > old + 1 and not storage.exists(pack_name(pid))


def test_copy_reads_packs_a_gc_on_src_trashed_meanwhile(s3_env: S3Server,
                                                       tmp_path: Path) -> None:
    """SRC on S3: while a copy runs, the point's record goes (a prune) and gc trashes its
    packs; the copy, which loaded SRC's index before, reads them from the trash."""
    src = _vault(f"s3://{fresh_bucket()}/src")
    disk = write_random_disk(tmp_path / "os.img", 2 * MIB, seed=4)
    point = src.backup("web", [f"os={disk}"])
    dst = _vault(tmp_path / "dst")
    fired: list[int] = []

    def progress(done: int, total: int) -> None:
        if not fired:
            fired.append(done)
            src.storage.delete(src.point_name(point.id))
            _settle()
            gc(src, grace=3600)
            assert _packs(src.storage) == [] and src.storage.list("trash")

    result = src.copy(dst, points=[point.id], progress=progress)
    assert fired and [p.id for p in result.points] == [point.id]
    dst.restore(point.id, tmp_path / "out")
    assert_same_bytes(tmp_path / "out" / "os.img", disk)


def test_repair_quarantines_on_s3_and_again_after_a_kill(s3_env: S3Server,
                                                         tmp_path: Path) -> None:
    """verify --repair's moves into quarantine/ on S3 (copy, then delete): a pack that
    is all damage is set aside; left under both names (a kill after the copy), the next
    repair sets it aside again, and the vault's other point still restores."""
    from cbt.ops.verify import QUARANTINE, repair

    v = _vault(f"s3://{fresh_bucket()}/q")
    bad_disk = write_random_disk(tmp_path / "bad.img", MIB, seed=5)
    v.backup("bad", [f"os={bad_disk}"])
    bad = _packs(v.storage)
    disk = write_random_disk(tmp_path / "os.img", MIB, seed=6)
    good = v.backup("web", [f"os={disk}"])
    for name in bad:  # every blob of the first point's packs damaged
        raw = bytearray(v.storage.get(name))
        for at in range(64, len(raw) - 4096, 4096):
            raw[at] ^= 0xFF
        v.storage.put(name, bytes(raw))
    repair(v)
    assert not set(bad) & set(_packs(v.storage))
    assert {f"{QUARANTINE}/{n.rsplit('/', 1)[-1]}" for n in bad} <= set(v.storage.list(QUARANTINE))
    for name in bad:  # as if the move had been killed after its copy
        v.storage.put(name, v.storage.get(f"{QUARANTINE}/{name.rsplit('/', 1)[-1]}"))
    repair(v)
    assert not set(bad) & set(_packs(v.storage))
    v.restore(good.id, tmp_path / "out")
    assert_same_bytes(tmp_path / "out" / "os.img", disk)

"""``cbt.ops.copy``: points copied between vaults, re-identified under DST's key."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import pytest
from helpers.packs import pack_files, trailer_entries
from helpers.vaults import PASSWORD, History3, fast_kdf, vault_state

import cbt as cbt_api
from cbt.core.errors import CbtValueError
from cbt.ops.copy import CopyError, copy
from cbt.ops.gc import gc
from cbt.repo.lock import VaultLockedError, exclusive_lock

OTHER = "another passphrase 22"
FORMAT1 = Path(__file__).parent.parent / "fixtures" / "vault-format1"


def _encrypted(path: Path, passphrase: str) -> cbt_api.Vault:
    return cbt_api.Vault.init(path, encryption="aes-256-gcm", passphrase=passphrase,
                              kdf=fast_kdf())


def _plain(path: Path) -> cbt_api.Vault:
    return cbt_api.Vault.init(path)


def _restores_truth(v: cbt_api.Vault, h: History3, out: Path) -> None:
    for pid, copies in zip(h.points, h.copies, strict=True):
        v.restore(pid, out / pid, workers=1)
        for label, truth in copies.items():
            got = (out / pid / f"{label}.img").read_bytes()
            assert got == truth.read_bytes(), (pid, label)


def _blobs(vault: Path) -> int:
    return sum(len(trailer_entries(p)) for p in pack_files(vault))


def test_plain_to_encrypted_to_encrypted_to_plain(pristine: History3, tmp_path: Path) -> None:
    """Every pairing of plain and encrypted (two passphrases): each DST restores the same
    bytes, holds every point with its id, time and change records, and verifies clean."""
    src = cbt_api.Vault.open(pristine.vault)
    e1 = _encrypted(tmp_path / "e1", PASSWORD)
    e2 = _encrypted(tmp_path / "e2", OTHER)
    p3 = _plain(tmp_path / "p3")
    chain = [src, e1, e2, p3]
    for a, b in itertools.pairwise(chain):
        res = copy(a, b)
        assert [p.id for p in res.points] == pristine.points
        assert all(not p.skipped and p.blocks_new > 0 for p in res.points[:1])
    for i, v in enumerate(chain[1:]):
        _restores_truth(v, pristine, tmp_path / f"out{i}")
        theirs, ours = src.load_point(pristine.points[1]), v.load_point(pristine.points[1])
        assert (ours.created, ours.consistency, ours.parent) == \
            (theirs.created, theirs.consistency, theirs.parent)
        assert [d.change_source for d in ours.disks] == [d.change_source for d in theirs.disks]
        assert ours.copied_from == chain[i].config["id"]
        assert not v.verify(data=True).problems
    # block ids differ between the two keys (re-identified), and equal between plains
    ids = {k: {d for p in pack_files(Path(v.root)) for d, *_ in trailer_entries(p)}
           for k, v in (("src", src), ("e1", e1), ("e2", e2), ("p3", p3))}
    assert ids["src"] == ids["p3"] and not ids["e1"] & ids["e2"] and not ids["src"] & ids["e1"]
    assert src.load_point(pristine.points[0]).copied_from is None


def test_second_copy_sends_nothing(pristine: History3, tmp_path: Path) -> None:
    src = cbt_api.Vault.open(pristine.vault)
    dst = _encrypted(tmp_path / "dst", PASSWORD)
    first = copy(src, dst)
    assert sum(p.bytes_sent for p in first.points) > 0
    blobs = _blobs(tmp_path / "dst")
    assert blobs == _blobs(pristine.vault)  # each block once: nothing sent twice
    again = copy(src, dst)
    assert all(p.skipped and p.bytes_sent == 0 and p.blocks_read == 0 for p in again.points)
    assert again.to_dict()["bytes_sent"] == 0 and _blobs(tmp_path / "dst") == blobs


def test_incremental_copy_reads_only_changed_blocks(pristine: History3, tmp_path: Path) -> None:
    """Points copied one at a time: a child's unchanged blocks are known from its parent in
    DST (re-identified once), so the last point reads only the one block it changed."""
    src = cbt_api.Vault.open(pristine.vault)
    dst = _encrypted(tmp_path / "dst", PASSWORD)
    copy(src, dst, refs=pristine.points[:2])
    res = copy(src, dst, refs=[pristine.points[2]])
    assert [(p.blocks_read, p.blocks_new) for p in res.points] == [(1, 1)]
    _restores_truth(dst, pristine, tmp_path / "out")


def test_named_points_and_vm(pristine: History3, tmp_path: Path) -> None:
    src = cbt_api.Vault.open(pristine.vault)
    dst = _plain(tmp_path / "dst")
    res = copy(src, dst, refs=[pristine.points[2]])
    assert [p.id for p in res.points] == [pristine.points[2]]
    assert dst.point_ids() == [pristine.points[2]]  # a full manifest: stands alone
    dst.restore(pristine.points[2], tmp_path / "out")
    assert (tmp_path / "out" / "os.img").read_bytes() == pristine.copies[2]["os"].read_bytes()
    with pytest.raises(CbtValueError, match="no recovery point of VM 'nope'"):
        copy(src, dst, vm="nope")
    assert [p.id for p in src.copy(dst, vm="vm").points] == pristine.points  # (the API)


def test_same_vault_and_clash_are_errors(pristine: History3, tmp_path: Path) -> None:
    src = cbt_api.Vault.open(pristine.vault)
    with pytest.raises(CbtValueError, match="same vault"):
        copy(src, cbt_api.Vault.open(pristine.vault))
    other = pristine.clone(tmp_path / "other")
    dst = _plain(tmp_path / "dst")
    copy(cbt_api.Vault.open(other.vault), dst, refs=[pristine.points[0]])
    # another point under the same id: DST's point 0 made from different content
    name = dst.point_name(pristine.points[0])
    rec = dst.load_point(pristine.points[0])
    rec.consistency = "application"
    dst.storage.put(name, rec.to_json())
    with pytest.raises(CopyError, match=f"another point under the id {pristine.points[0]}"):
        copy(src, dst)


def test_corrupt_block_in_src_fails_naming_point_and_block(pristine: History3,
                                                           tmp_path: Path) -> None:
    h = pristine.clone(tmp_path / "src")
    pack = h.pack_path(h.packs[2][0])  # the one block point 2 added
    digest, offset, _st, _raw = trailer_entries(pack)[0]
    raw = bytearray(pack.read_bytes())
    raw[offset + 48 + 10] ^= 0xFF  # a byte of the blob's payload
    pack.write_bytes(bytes(raw))
    dst = _encrypted(tmp_path / "dst", PASSWORD)
    with pytest.raises(CopyError, match=f"point {h.points[2]}: block {digest.hex()}"):
        copy(cbt_api.Vault.open(h.vault), dst)
    assert sorted(dst.point_ids()) == h.points[:2]  # the points before it, no half point
    assert not dst.verify(data=True).problems


def test_gc_on_dst_keeps_what_copied_points_need(pristine: History3, tmp_path: Path) -> None:
    src = cbt_api.Vault.open(pristine.vault)
    dst = _encrypted(tmp_path / "dst", PASSWORD)
    copy(src, dst)
    result = gc(dst, grace=0.0)
    assert result.packs_removed == 0
    _restores_truth(dst, pristine, tmp_path / "out")


def test_format1_fixture_as_source(tmp_path: Path) -> None:
    shutil.copytree(FORMAT1, tmp_path / "src")
    src = cbt_api.Vault.open(tmp_path / "src")
    dst = _encrypted(tmp_path / "dst", PASSWORD)
    res = copy(src, dst)
    ids = [p.id for p in src.points()]
    assert sorted(p.id for p in res.points) == sorted(ids)
    for pid in ids:
        src.restore(pid, tmp_path / "a" / pid)
        dst.restore(pid, tmp_path / "b" / pid)
        for f in (tmp_path / "a" / pid).iterdir():
            assert (tmp_path / "b" / pid / f.name).read_bytes() == f.read_bytes()
    assert not dst.verify(data=True).problems


def test_dst_writer_lock_held_and_src_untouched(pristine: History3, tmp_path: Path) -> None:
    src = cbt_api.Vault.open(pristine.vault)
    dst = _plain(tmp_path / "dst")
    before = vault_state(pristine.vault)
    with exclusive_lock(dst.storage), pytest.raises(VaultLockedError, match="is locked by"):
        copy(src, dst)
    assert dst.point_ids() == []
    seen: list[tuple[int, int]] = []
    copy(src, dst, progress=lambda done, total: seen.append((done, total)))
    assert seen[-1][0] == seen[-1][1] == pristine.bs  # point 2: one block read
    assert vault_state(pristine.vault) == before  # SRC only read


def test_copy_holds_each_vms_lock_in_dst(pristine: History3, tmp_path: Path) -> None:
    """A copy of VM vm's points into DST never runs beside a backup of vm there (that
    backup's parent would fork): refused naming the holder, or waited for."""
    import threading

    from cbt.repo.lock import vm_lock

    src = cbt_api.Vault.open(pristine.vault)
    dst = _plain(tmp_path / "dst")
    with vm_lock(dst, "vm"), pytest.raises(VaultLockedError, match=r"^\[Errno 11\] VM vm of "):
        copy(src, dst)
    assert dst.point_ids() == []
    held, go = threading.Event(), threading.Event()

    def backup_of_vm() -> None:
        with vm_lock(dst, "vm"):
            held.set()
            go.wait(30)
    t = threading.Thread(target=backup_of_vm)
    t.start()
    held.wait(30)
    threading.Timer(0.5, go.set).start()
    res = copy(src, dst, wait=30)
    t.join()
    assert [p.id for p in res.points] == pristine.points

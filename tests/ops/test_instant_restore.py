"""`cbt restore --instant` from the snapshots a job kept (issue 6).

With ``instant_restore_days`` a job keeps its snapshots; `cbt restore POINT
--instant` restores from them (a reflink clone where the target is on the same
file system), re-hashing against the point's manifest unless --no-verify, says
which source it used per disk, and falls back to the vault where there is no
usable snapshot: none kept, expired by `cbt prune`, or tampered with.  Every
restore is compared byte for byte with a copy of the disk taken at backup time,
after the live disk has moved on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import MIB
from helpers.cli import backup_cli as backup_point
from helpers.cli import cbt
from helpers.images import assert_same_bytes, copy_disk, scribble, write_random_disk
from helpers.jobs import one_point, write_config
from helpers.system import loop_xfs
from helpers.vaults import files_equal_to, prune, restore

INSTANT_DISK_KEYS = {"label", "to", "size", "bytes_written", "blocks_verified", "source"}


def _instant(vault: Path, point: str, to: Path, *extra: object,
             warnings: list[str] | None = None) -> dict[str, dict[str, object]]:
    """``cbt restore --instant --json``: label -> disk entry (shape checked); its
    warnings are appended to ``warnings`` when given."""
    out = restore(vault, point, to, "--instant", *extra)
    assert set(out) == {"recovery_point", "disks", "seconds", "warnings"}, out
    assert out["recovery_point"] == point
    if warnings is not None:
        warnings += out["warnings"]
    disks = {}
    for d in out["disks"]:
        assert set(d) == INSTANT_DISK_KEYS, d
        disks[d["label"]] = d
    return disks


def _flip_byte(path: Path, offset: int) -> None:
    data = np.memmap(path, dtype=np.uint8, mode="r+")
    data[offset] ^= 0x5A
    data.flush()
    del data


@pytest.mark.slow
def test_instant_restore_from_kept_copy_snapshots(tmp_path: Path) -> None:
    os_disk = write_random_disk(tmp_path / "disks" / "os.img", 4 * MIB, seed=31)
    db_disk = write_random_disk(tmp_path / "disks" / "db.img", 2 * MIB, seed=32)
    cfg = write_config(
        tmp_path / "cbt.toml",
        {"p": {"schedule": "daily 12:00", "instant_restore_days": 2}},
        {"web": {"policy": "p", "disks": {"os": "disks/os.img", "db": "disks/db.img"},
                 "snapshot": "copy", "snapshot_dir": "snaps"}})
    vault = tmp_path / "vault"
    assert cbt("init", "--encryption", "none", vault).returncode == 0
    snaps = tmp_path / "snaps"

    p1 = one_point(cfg, now="2026-08-01T12:00:00Z")
    assert {d["label"]: d["snapshot"] for d in p1["disks"]} == {"os": "copy", "db": "copy"}
    t1 = {lb: copy_disk(d, tmp_path / "truth" / f"1-{lb}.img")
          for lb, d in (("os", os_disk), ("db", db_disk))}
    scribble(os_disk, seed=1)
    scribble(db_disk, seed=2)
    p2 = one_point(cfg, now="2026-08-02T12:00:00Z")
    t2 = {lb: copy_disk(d, tmp_path / "truth" / f"2-{lb}.img")
          for lb, d in (("os", os_disk), ("db", db_disk))}
    scribble(os_disk, seed=3)  # the live disks move on
    scribble(db_disk, seed=4)
    id1, id2 = p1["recovery_point"], p2["recovery_point"]
    # the kept snapshots are there, one per disk and point
    for t in (*t1.values(), *t2.values()):
        assert len(files_equal_to(snaps, t)) == 1, t

    got = _instant(vault, id1, tmp_path / "o1")
    for lb in ("os", "db"):
        src = str(got[lb]["source"])
        assert src.startswith("snapshot") and "not verified" not in src, src
        assert_same_bytes(tmp_path / "o1" / f"{lb}.img", t1[lb])

    got = _instant(vault, id2, tmp_path / "o2", "--no-verify")
    for lb in ("os", "db"):
        src = str(got[lb]["source"])
        assert src.startswith("snapshot") and "not verified" in src, src
        assert_same_bytes(tmp_path / "o2" / f"{lb}.img", t2[lb])

    # a tampered snapshot: the re-hash finds it; that disk comes from the vault, with a
    # warning; the other disk still from its snapshot
    (kept_db,) = files_equal_to(snaps, t2["db"])
    _flip_byte(kept_db, 12345)
    warnings: list[str] = []
    got = _instant(vault, id2, tmp_path / "o3", warnings=warnings)
    assert got["db"]["source"] == "vault", got
    assert str(got["os"]["source"]).startswith("snapshot"), got
    assert any("db" in w for w in warnings), f"a tampered snapshot must be reported: {warnings}"
    assert_same_bytes(tmp_path / "o3" / "db.img", t2["db"])
    assert_same_bytes(tmp_path / "o3" / "os.img", t2["os"])

    # prune at 08-03 18:00: P1 (08-01 12:00) is more than 2 days old, P2 is not
    dry = prune(cfg, "2026-08-03T18:00:00Z", dry_run=True)
    assert dry["snapshots_expired"] == 2, dry
    for t in t1.values():
        assert len(files_equal_to(snaps, t)) == 1, "--dry-run removed a snapshot"
    out = prune(cfg, "2026-08-03T18:00:00Z")
    assert all(p["keep"] for p in out["points"])  # no retention table: points stay
    assert out["snapshots_expired"] == 2, out  # P1's two disks
    for t in t1.values():
        assert files_equal_to(snaps, t) == [], "expired snapshot still there"
    assert len(files_equal_to(snaps, t2["os"])) == 1
    got = _instant(vault, id1, tmp_path / "o4")
    for lb in ("os", "db"):
        assert got[lb]["source"] == "vault", got
        assert_same_bytes(tmp_path / "o4" / f"{lb}.img", t1[lb])
    # later, P2's go too
    out = prune(cfg, "2026-08-10T00:00:00Z")
    assert out["snapshots_expired"] == 2, out
    assert files_equal_to(snaps, t2["os"]) == []
    got = _instant(vault, id2, tmp_path / "o5")
    assert {got[lb]["source"] for lb in ("os", "db")} == {"vault"}
    assert_same_bytes(tmp_path / "o5" / "os.img", t2["os"])
    assert_same_bytes(tmp_path / "o5" / "db.img", t2["db"])


@pytest.mark.slow
def test_instant_restore_without_a_kept_snapshot_uses_the_vault(tmp_path: Path) -> None:
    disk = write_random_disk(tmp_path / "d.img", 1 * MIB, seed=33)
    vault = tmp_path / "vault"
    assert cbt("init", "--encryption", "none", vault).returncode == 0
    point = backup_point(vault, "plain", f"os={disk}", now="2026-08-01T00:00:00Z")
    truth = copy_disk(disk, tmp_path / "truth.img")
    scribble(disk, seed=5)
    got = _instant(vault, point["recovery_point"], tmp_path / "o")
    assert got["os"]["source"] == "vault"
    assert_same_bytes(tmp_path / "o" / "os.img", truth)
    # the API: the same restore, typed; one disk to a file of its own
    import cbt as cbt_api

    res = cbt_api.Vault.open(vault).restore(point["recovery_point"], tmp_path / "one.raw",
                                            disk="os", instant=True)
    assert [(d.label, d.to, d.source) for d in res.disks] == [("os", str(tmp_path / "one.raw"),
                                                               "vault")]
    assert set(res.to_dict()["disks"][0]) == INSTANT_DISK_KEYS and res.warnings == []
    assert_same_bytes(tmp_path / "one.raw", truth)


@pytest.mark.slow
def test_instant_restore_reflink_on_xfs(tmp_path: Path) -> None:
    with loop_xfs(tmp_path) as mnt:
        disk = write_random_disk(mnt / "disks" / "os.img", 8 * MIB, seed=34)
        cfg = write_config(
            mnt / "cbt.toml",
            {"p": {"schedule": "daily 12:00", "instant_restore_days": 2}},
            {"web": {"policy": "p", "disks": {"os": "disks/os.img"}, "snapshot": "reflink"}})
        vault = mnt / "vault"
        assert cbt("init", "--encryption", "none", vault).returncode == 0
        p1 = one_point(cfg, now="2026-09-01T12:00:00Z")
        assert p1["disks"][0]["snapshot"] == "reflink"
        t1 = copy_disk(disk, tmp_path / "truth" / "1.img")
        scribble(disk, seed=6)
        p2 = one_point(cfg, now="2026-09-02T12:00:00Z")
        t2 = copy_disk(disk, tmp_path / "truth" / "2.img")
        scribble(disk, seed=7)
        id1, id2 = p1["recovery_point"], p2["recovery_point"]
        snap_root = mnt / "disks"

        # same file system: a reflink clone, re-hashed
        got = _instant(vault, id1, mnt / "o1")
        assert "reflink" in str(got["os"]["source"]), got
        assert str(got["os"]["source"]).startswith("snapshot")
        assert_same_bytes(mnt / "o1" / "os.img", t1)
        # another file system: copied from the snapshot
        got = _instant(vault, id2, tmp_path / "o2")
        assert str(got["os"]["source"]).startswith("snapshot"), got
        assert_same_bytes(tmp_path / "o2" / "os.img", t2)

        bases = sorted(snap_root.rglob("os.base.img"))
        assert len(bases) == 1, bases  # the tracking base of the disk
        # 09-03 18:00: P1 is past 2 days, P2 is not
        out = prune(cfg, "2026-09-03T18:00:00Z")
        assert out["snapshots_expired"] == 1, out
        assert files_equal_to(snap_root, t1) == []
        assert bases[0].exists()
        got = _instant(vault, id1, mnt / "o3")
        assert got["os"]["source"] == "vault"
        assert_same_bytes(mnt / "o3" / "os.img", t1)
        # much later: P2's kept snapshot expires too; the tracking base never does
        out = prune(cfg, "2026-09-20T00:00:00Z")
        assert out["snapshots_expired"] == 1, out
        assert bases[0].exists()
        assert_same_bytes(bases[0], t2)  # the last committed snapshot: P2's
        got = _instant(vault, id2, mnt / "o4")
        assert got["os"]["source"] == "vault"
        assert_same_bytes(mnt / "o4" / "os.img", t2)

        # and the next job still works, its kept snapshot too
        p3 = one_point(cfg, now="2026-09-20T12:00:00Z")
        t3 = copy_disk(disk, tmp_path / "truth" / "3.img")
        scribble(disk, seed=8)
        got = _instant(vault, p3["recovery_point"], mnt / "o5")
        assert "reflink" in str(got["os"]["source"]), got
        assert_same_bytes(mnt / "o5" / "os.img", t3)
        restore(vault, id2, mnt / "o6")
        assert_same_bytes(mnt / "o6" / "os.img", t2)


def test_instant_restore_never_reads_a_host_file_a_crafted_registry_names(tmp_path: Path) -> None:
    # the kept-snapshots registry is read from the vault: an entry rewritten to name
    # any host file (here a "secret" of the disk's size) must not be copied into the
    # restore, even with --no-verify; the disk comes from the vault, with a warning
    import json

    disk = write_random_disk(tmp_path / "disks" / "os.img", 1 * MIB, seed=41)
    cfg = write_config(
        tmp_path / "cbt.toml", {"p": {"schedule": "daily 12:00", "instant_restore_days": 2}},
        {"web": {"policy": "p", "disks": {"os": "disks/os.img"}, "snapshot": "copy",
                 "snapshot_dir": "snaps"}})
    vault = tmp_path / "vault"
    assert cbt("init", "--encryption", "none", vault).returncode == 0
    point = one_point(cfg, now="2026-08-01T12:00:00Z")["recovery_point"]
    truth = copy_disk(disk, tmp_path / "truth.img")
    secret = write_random_disk(tmp_path / "secret.img", 1 * MIB, seed=42)
    entry_path = vault / "snapshots" / f"{point}.json"
    entry = json.loads(entry_path.read_text())
    assert entry["disks"]["os"].startswith(str(tmp_path / "snaps"))  # a real kept snapshot
    for forged in (str(secret), str(tmp_path / "snaps" / "web" / ".." / ".." / "secret.img")):
        entry["disks"]["os"] = forged
        entry_path.write_text(json.dumps(entry))
        warnings: list[str] = []
        out = tmp_path / f"o{len(forged)}"
        got = _instant(vault, point, out, "--no-verify", warnings=warnings)
        assert got["os"]["source"] == "vault", got
        assert any("not a snapshot" in w for w in warnings), warnings
        assert_same_bytes(out / "os.img", truth)

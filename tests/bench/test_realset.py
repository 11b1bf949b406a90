"""The ext4db bench set (bench/realset.py): day 1 differs from day 0 as its recipe says.

Built by bench/race.py at a tiny size (a 32 MiB image, a 16 MiB database) in seconds;
needs root for the loop device.  The truth is read independently of the builder: the
images are mounted read-only here and compared with the machine's own files, the
databases are read with plain SQL, and the shares come from the module's constants.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import race
import realset
from helpers.system import loop_device, need_root_tools

pytestmark = pytest.mark.root
FS = 32 << 20  # the image; the database is about FS / 2


@contextlib.contextmanager
def read_only(image: Path, mnt: Path) -> Iterator[Path]:
    with loop_device(image) as dev:
        mnt.mkdir()
        subprocess.run(["mount", "-o", "ro,noload", dev, str(mnt)], check=True)
        try:
            yield mnt
        finally:
            subprocess.run(["umount", str(mnt)], check=True)


def files(top: Path) -> dict[str, bytes]:
    """Every regular file under ``top`` (not symlinks, not lost+found): path -> bytes."""
    out = {}
    for d, dirs, names in os.walk(top):
        dirs[:] = [x for x in dirs if not (d == str(top) and x == "lost+found")]
        for n in names:
            p = Path(d) / n
            if p.is_file() and not p.is_symlink():
                out[str(p.relative_to(top))] = p.read_bytes()
    return out


def rows(path: Path) -> dict[str, int]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return {t: db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                for t in ("documents", "customers", "orders", "events")}
    finally:
        db.close()


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> race.DataSet:
    """The set as bench/race.py makes it, at --size 64M."""
    need_root_tools("mke2fs", "e2fsck", "losetup", "mount")
    ds = race.ext4db_set(tmp_path_factory.mktemp("race"), 2 * FS)
    race.build(ds)
    return ds


@pytest.fixture
def built(made: race.DataSet) -> Path:
    return made.root


def test_race_reuses_the_set_until_its_recipe_changes(made: race.DataSet) -> None:
    assert made.recipe["fs_size"] == FS and made.recipe["db_size"] == FS // 2
    assert [d.label for d in made.disks] == ["ext4", "db"]
    stamps = [p.stat().st_mtime_ns for p in made.files()]
    assert race._is_current(made)
    race.build(made)  # reused: nothing rewritten
    assert [p.stat().st_mtime_ns for p in made.files()] == stamps
    other = race.DataSet(made.key, made.title, made.root, made.disks,
                         {**made.recipe, "seed": made.recipe["seed"] + 1})
    assert not race._is_current(other)


def test_images_are_clean_ext4_and_nothing_stays_attached(built: Path) -> None:
    for day in (0, 1):
        image = built / f"day{day}" / realset.IMAGE
        assert image.stat().st_size == FS
        subprocess.run(["e2fsck", "-fn", str(image)], check=True, capture_output=True)
        attached = subprocess.run(["losetup", "-j", str(image)], capture_output=True,
                                  text=True, check=True).stdout
        assert attached == ""
    assert not [m for m in Path("/proc/mounts").read_text().splitlines() if "cbt-ext4db" in m]


def test_day0_holds_the_machines_files_and_day1_changed_them(built: Path,
                                                            tmp_path: Path) -> None:
    with read_only(built / "day0" / realset.IMAGE, tmp_path / "a") as a, \
            read_only(built / "day1" / realset.IMAGE, tmp_path / "b") as b:
        old, new = files(a), files(b)
    # Day 0: real files of this machine, byte for byte, from both roots.
    assert old and all(Path("/", rel).read_bytes() == data for rel, data in old.items())
    assert {rel.split("/")[1] for rel in old} == {"share", "lib"}
    k = len(old)
    gone = [p for p in old if p not in new]
    same_size = [p for p in old if p in new and len(new[p]) == len(old[p])]
    rewritten = [p for p in same_size if new[p] != old[p]]
    grown = [p for p in old if p in new and len(new[p]) > len(old[p])]
    assert len(gone) == round(k * realset.DELETE)
    assert len(rewritten) == round(k * realset.MODIFY)
    assert len(grown) == round(k * realset.APPEND)
    assert all(new[p].startswith(old[p]) for p in grown)  # appended, not rewritten
    assert "var/log/syslog" in new and "var/log/syslog" not in old
    added = {p: d for p, d in new.items() if p.startswith("home/user/day1/")}
    assert len(added.pop("home/user/day1/download.bin")) == int(FS * realset.DOWNLOAD)
    copied = {p: d for p, d in new.items() if p.startswith("opt/day1/")}
    for prefix, got in (("home/user/day1/", added), ("opt/day1/", copied)):
        assert got  # files of the machine that were not in day 0
        for p, data in got.items():
            rel = p[len(prefix):]
            assert rel not in old and Path("/", rel).read_bytes() == data
    # The rest is untouched.
    changed = set(gone) | set(rewritten) | set(grown)
    assert all(new[p] == old[p] for p in old if p not in changed)


def test_the_database_was_updated_pruned_grown_and_vacuumed(built: Path) -> None:
    a, b = built / "day0" / realset.DATABASE, built / "day1" / realset.DATABASE
    before, after = rows(a), rows(b)
    assert all(before.values())
    ins = {t: round(n * realset.DB_INSERT) for t, n in before.items()}
    assert after == {
        "documents": before["documents"] + ins["documents"],
        "customers": before["customers"] + ins["customers"],
        "orders": before["orders"] - round(before["orders"] * realset.DB_DELETE)
        + ins["orders"],
        "events": before["events"] - round(before["events"] * realset.DB_PRUNE)
        + ins["events"]}
    db = sqlite3.connect(f"file:{b}?mode=ro", uri=True)
    try:
        db.execute("ATTACH ? AS old", (f"file:{a}?mode=ro",))
        emails = db.execute("SELECT count(*) FROM customers c JOIN old.customers o "
                            "USING (id) WHERE c.email != o.email").fetchone()[0]
        assert emails == round(before["customers"] * realset.DB_UPDATE)
        totals = db.execute("SELECT count(*), sum(abs(c.total - o.total - 1) < 1e-6) "
                            "FROM orders c JOIN old.orders o USING (id) "
                            "WHERE c.total != o.total").fetchone()
        n = round(before["orders"] * realset.DB_UPDATE)
        assert totals[0] == totals[1]  # every changed total went up by one
        assert n - round(before["orders"] * realset.DB_DELETE) <= totals[0] <= n
        oldest = db.execute("SELECT min(id) FROM events").fetchone()[0]
        assert oldest == round(before["events"] * realset.DB_PRUNE) + 1  # the oldest pruned
        assert db.execute("SELECT count(*) FROM sqlite_master WHERE type = 'index'"
                          ).fetchone()[0] == 4
        assert db.execute("PRAGMA main.freelist_count").fetchone()[0] == 0  # vacuumed
    finally:
        db.close()
    changes = json.loads((built / "day1" / "changes.json").read_text())
    assert changes["db"]["rows_after"] == after


def test_the_share_of_changed_blocks_is_a_days_not_a_rewrite(built: Path) -> None:
    block = 16 << 10
    for name, most in ((realset.IMAGE, 0.5), (realset.DATABASE, 0.9)):
        a = (built / "day0" / name).read_bytes()
        b = (built / "day1" / name).read_bytes()
        n = -(-max(len(a), len(b)) // block)
        changed = sum(a[i * block:(i + 1) * block] != b[i * block:(i + 1) * block]
                      for i in range(n))
        assert 0 < changed < most * n, (name, changed, n)

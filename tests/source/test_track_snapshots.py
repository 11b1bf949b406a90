"""Tracking bases of ``SnapshotSet`` on real XFS (reflink) and btrfs loop file systems:
``settle`` makes them (durably, before the commit) and names them, ``changes`` trusts
one only while it is the base recorded, and says why it does not otherwise.

Truth: the base and the new snapshot compared byte for byte; a copy of the disk as
each "point" saw it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import MIB, PAGE
from helpers.tracking import (
    blocks_of,
    btrfs,
    changed_blocks,
    coarser,
    fs_area,
    make_tracked_disk,
    mutate,
    xor_write,
)

from cbt.source.changes import ChangeHint, TrackingBase
from cbt.source.snapshot import SnapshotSet, reflink, take
from cbt.source.track import changed_ranges, identify

BS = 16 * 1024
SIZE = 8 * MIB + 3000
HOLES = ((MIB, MIB),)
VM = "web"


def job_id(n: int) -> str:
    return f"{VM}.20260101T00000{n}Z.abc{n:03d}"


@pytest.fixture
def site(fs: tuple[str, Path], request: pytest.FixtureRequest) -> Iterator[Site]:
    with fs_area(*fs, request.node.name) as d:
        yield Site(fs[0], d)


class Site:
    """One disk of VM ``web`` on the file system, snapshotted by its provider."""

    def __init__(self, kind: str, d: Path) -> None:
        self.kind, self.dir = kind, d
        self.provider = "btrfs" if kind == "btrfs" else "reflink"
        self.disk = make_tracked_disk(d / "os.img", SIZE, 1, HOLES)
        self.snapdir = d / ".cbt-snapshots" / VM if kind != "btrfs" else d / ".cbt-snapshots"
        self.n = 0

    def take(self) -> SnapshotSet:
        self.n += 1
        return take(VM, job_id(self.n), {"os": str(self.disk)}, {"os": self.provider}, None)

    def base_file(self) -> Path:
        if self.kind == "btrfs":
            return self.dir / ".cbt-snapshots" / f"{VM}.base" / "os.img"
        return self.snapdir / "os.base.img"

    def run(self, keep: bool = False) -> tuple[TrackingBase, Path]:
        """A job: snapshot, settle, commit; the base's identity and a copy of what it read."""
        snaps = self.take()
        copy = self.dir.parent / f"{self.dir.name}.point{self.n}"
        shutil.copyfile(snaps.read_paths["os"], copy)
        settled = snaps.settle(keep=keep)
        snaps.commit(keep=keep)
        return settled["os"], copy

    def changes(self, snaps: SnapshotSet, recorded: TrackingBase | None) -> ChangeHint:
        return snaps.changes("os", BS, os.path.getsize(self.disk), recorded)


def assert_exact(hint: ChangeHint, previous: Path, snaps: SnapshotSet) -> None:
    """A fiemap hint: exactly the blocks that differ between the point's copy and now."""
    assert hint.source == "fiemap" and hint.reason is None, hint
    assert hint.ranges is not None
    truth = coarser(changed_blocks(previous, snaps.read_paths["os"], PAGE), BS // PAGE)
    assert blocks_of(hint.ranges) == truth
    assert truth


@pytest.mark.root
@pytest.mark.parametrize("keep", [False, True])
def test_each_run_is_tracked_against_the_last(site: Site, keep: bool) -> None:
    snaps = site.take()
    assert site.changes(snaps, None) == ChangeHint.hash("no tracking base")
    snaps.discard()
    recorded, copy = site.run(keep)
    assert recorded == identify(str(site.base_file()),
                                str(site.base_file().parent) if site.kind == "btrfs" else None)
    assert recorded.kind == ("subvolume" if site.kind == "btrfs" else "file")
    for round_ in range(3):
        mutate(site.disk, round_, truncate_tail=50_000 if round_ == 1 else 0)
        snaps = site.take()
        assert_exact(site.changes(snaps, recorded), copy, snaps)
        copy2 = site.dir.parent / f"{site.dir.name}.copy{round_}"
        shutil.copyfile(snaps.read_paths["os"], copy2)
        recorded = snaps.settle(keep)["os"]
        snaps.commit(keep)
        assert identify(str(site.base_file()), recorded.subvolume_uuid and str(
            site.base_file().parent)) == recorded  # the commit left the base alone
        copy = copy2
    kept = sorted(p.name for p in site.snapdir.iterdir())
    if site.kind == "btrfs":
        assert kept == sorted([f"{VM}.base"] + ([f"{VM}.{job_id(k)}" for k in range(2, 6)]
                                                if keep else []))
    else:
        assert kept == sorted(["os.base.img"] + ([f"os.{job_id(k)}.img" for k in range(2, 6)]
                                                 if keep else []))


@pytest.mark.root
def test_removing_a_kept_snapshot_leaves_the_base_trusted(site: Site) -> None:
    """Instant restore keeps each snapshot; prune removes it later.  The base is its own
    reference (a clone, or a snapshot of the snapshot), so its identity survives that."""
    recorded, copy = site.run(keep=True)
    for p in site.snapdir.iterdir():
        if job_id(1) in p.name:
            if p.is_dir():
                btrfs("subvolume", "delete", str(p))
            else:
                p.unlink()
    mutate(site.disk, 4)
    snaps = site.take()
    assert_exact(site.changes(snaps, recorded), copy, snaps)
    snaps.discard()


def _swap_in_current(site: Site) -> Path:
    """Put a clone of the disk as it is now where the base is; the base moves aside."""
    base = site.base_file()
    if site.kind != "btrfs":
        os.rename(base, base.with_name("saved.img"))
        reflink(str(site.disk), str(base))
        return base.with_name("saved.img")
    sub = base.parent
    os.rename(sub, sub.with_name("saved"))
    btrfs("subvolume", "snapshot", "-r", str(site.dir), str(sub))
    return sub.with_name("saved")


def _swap_back(site: Site, saved: Path) -> str:
    """Undo :func:`_swap_in_current`; what the identity says then."""
    base = site.base_file()
    if site.kind != "btrfs":
        os.replace(saved, base)
        return "base changed"  # a rename changes the file's change time: conservative
    btrfs("subvolume", "delete", str(base.parent))
    os.rename(saved, base.parent)
    return "fiemap"  # the subvolume and the file in it are as they were


@pytest.mark.root
def test_untrusted_bases_fall_back_to_a_hash_scan(site: Site) -> None:
    recorded, _ = site.run()
    base = site.base_file()
    mutate(site.disk, 5)
    snaps = site.take()
    assert site.changes(snaps, None).reason == "no tracking base"
    # a base replaced by a clone of the current disk: it shares every extent with the new
    # snapshot (a FIEMAP comparison alone says "nothing changed"); the identity catches it
    saved = _swap_in_current(site)
    assert changed_ranges(str(base), snaps.read_paths["os"], PAGE) == []
    assert site.changes(snaps, recorded) == ChangeHint.hash("base replaced")
    back = _swap_back(site, saved)
    hint = site.changes(snaps, recorded)
    assert (hint.source if back == "fiemap" else hint.reason) == back, hint
    snaps.discard()
    recorded, _ = site.run()
    snaps = site.take()
    assert site.changes(snaps, recorded).source == "fiemap"
    if site.kind == "btrfs":  # a read-only snapshot made writable, to rewrite it
        btrfs("property", "set", "-ts", str(base.parent), "ro", "false")
    # the same base rewritten in place: one byte, same size
    fd = os.open(base, os.O_RDWR)
    try:
        xor_write(fd, 5 * PAGE, 1, np.random.default_rng(0))
    finally:
        os.close(fd)
    assert site.changes(snaps, recorded) == ChangeHint.hash("base changed")
    os.unlink(base)
    assert site.changes(snaps, recorded) == ChangeHint.hash("no tracking base")
    os.symlink(snaps.read_paths["os"], base)  # never followed
    hint = site.changes(snaps, recorded)
    assert hint.source == "hash" and "not a regular file" in str(hint.reason), hint
    assert hint.reason == f"tracking base unusable: {base} is not a regular file", hint
    snaps.discard()



@pytest.mark.root
@pytest.mark.parametrize("absolute", [False, True])
def test_a_disk_named_by_a_symbolic_link_is_snapshotted_and_tracked(site: Site,
                                                                    absolute: bool) -> None:
    """A VM's disk given as a link to its image (``vm.img -> images/os.img``): the
    snapshot holds the image itself (a btrfs snapshot holds the link, which an
    absolute link would lead back to the live disk), settle names its base, and the
    next run is tracked against it."""
    (site.dir / "images").mkdir()
    real = site.dir / "images" / "os.img"
    os.rename(site.disk, real)
    link = site.dir / "vm.img"
    os.symlink(real if absolute else Path("images") / "os.img", link)
    site.disk = link
    snaps = site.take()
    assert not os.path.islink(snaps.read_paths["os"])
    copy = site.dir.parent / f"{site.dir.name}.point"
    shutil.copyfile(snaps.read_paths["os"], copy)
    mutate(real, 1)  # the live disk, after the snapshot: the snapshot does not see it
    assert changed_blocks(copy, snaps.read_paths["os"], PAGE) == set()
    recorded = snaps.settle()["os"]
    snaps.commit()
    mutate(real, 2)
    snaps = site.take()
    assert_exact(site.changes(snaps, recorded), copy, snaps)
    snaps.discard()
    os.unlink(link)
    os.rename(real, site.dir / "os.img")
    shutil.rmtree(site.dir / "images")  # (on XFS the snapshots and base went beside the image)



@pytest.mark.root
@pytest.mark.parametrize("keep", [False, True])
def test_a_link_planted_at_the_base_is_replaced_never_followed(site: Site, keep: bool) -> None:
    """A symbolic link where the base goes, to a folder (on btrfs a subvolume): settle
    replaces the link; what it leads to stays whole (removing the base followed the
    link and deleted the subvolume it named)."""
    victim = site.dir / "victim"
    if site.kind == "btrfs":
        btrfs("subvolume", "create", str(victim))
    else:
        victim.mkdir()
    (victim / "data").write_bytes(b"precious")
    base = site.base_file() if site.kind != "btrfs" else site.base_file().parent
    base.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(victim, base)
    try:
        recorded, copy = site.run(keep)
        assert (victim / "data").read_bytes() == b"precious"
        assert not base.is_symlink()
        mutate(site.disk, 3)
        snaps = site.take()
        assert_exact(site.changes(snaps, recorded), copy, snaps)
        snaps.discard()
    finally:
        if site.kind == "btrfs" and victim.exists():
            btrfs("subvolume", "delete", str(victim))



@pytest.mark.root
def test_a_link_from_another_file_system_snapshots_where_the_image_lies(
        site: Site, tmp_path: Path) -> None:
    """A disk named by a link on a file system that cannot clone (here ext4 or the like),
    leading to an image on XFS or btrfs: ``auto`` snapshots the image where it lies, as
    it would the image named directly (it read the live disk: the clone was tried beside
    the link)."""
    from cbt.source.snapshot import resolve_provider

    link = tmp_path / "os.img"
    os.symlink(site.disk, link)
    providers = resolve_provider("auto", VM, {"os": str(link)}, None)
    assert providers == {"os": site.provider}
    snaps = take(VM, job_id(1), {"os": str(link)}, providers, None)
    try:
        assert Path(snaps.read_paths["os"]).parent == site.snapdir / (
            f"{VM}.{job_id(1)}" if site.kind == "btrfs" else "")
    finally:
        snaps.discard()
    assert not (tmp_path / ".cbt-snapshots" / VM).exists() or not any(
        (tmp_path / ".cbt-snapshots" / VM).iterdir())


@pytest.mark.root
def test_a_resized_disk_is_hashed(site: Site) -> None:
    recorded, _ = site.run()
    for new_size in (SIZE + MIB, SIZE - 3 * PAGE):
        os.truncate(site.disk, new_size)
        snaps = site.take()
        assert site.changes(snaps, recorded) == ChangeHint.hash("disk resized")
        snaps.discard()


@pytest.mark.root
def test_copy_and_none_have_no_source(site: Site) -> None:
    for provider in ("copy", "none"):
        snaps = take(VM, job_id(9), {"os": str(site.disk)}, {"os": provider}, None)
        assert snaps.changes("os", BS, SIZE, None) == ChangeHint.hash(None)
        assert snaps.settle() == {}
        snaps.commit()


# -- kills between snapshot and commit ---------------------------------------------------------

KILLED = textwrap.dedent('''
    import json, os, signal, sys
    from cbt.source.snapshot import take
    vm, job, disk, provider, keep, kill_before_settle = sys.argv[1:7]
    snaps = take(vm, job, {"os": disk}, {"os": provider}, None)
    if kill_before_settle == "1":
        os.kill(os.getpid(), signal.SIGKILL)
    settled = snaps.settle(keep=keep == "1")
    print(json.dumps(settled["os"].to_json()))
''')


def _killed_run(site: Site, job: str, keep: bool, step: int | None, where: Path) -> None:
    """take + settle in a process SIGKILLed at its durable step ``step`` (None: after
    the snapshot, before settle)."""
    counter = where / f"counter-{step}"
    counter.write_text("0")
    env = {**os.environ, "CBT_CRASH_AT": str(step or 10**9), "CBT_CRASH_COUNTER": str(counter)}
    r = subprocess.run([sys.executable, "-c", KILLED, VM, job, str(site.disk), site.provider,
                        "1" if keep else "0", "1" if step is None else "0"],
                       env=env, capture_output=True, text=True, start_new_session=True,
                       timeout=60, check=False)
    assert r.returncode == -signal.SIGKILL, (step, r.returncode, r.stderr)
    counter.unlink()


def _recover(site: Site, job: str) -> None:
    """What ``recover`` does with a dead job's snapshots: remove those named by its id."""
    from cbt.source.snapshot import remove_snapshot

    for p in site.snapdir.iterdir():
        if f".{job}" in p.name:
            remove_snapshot(str(p))


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.parametrize("keep", [False, True])
def test_a_kill_between_snapshot_and_commit_never_leaves_a_wrong_base(
        site: Site, keep: bool, tmp_path: Path) -> None:
    """SIGKILL after the snapshot, and at each durable step of settle: the base left is
    the committed point's (its changes are then exact) or its identity tells it is not."""
    recorded, copy = site.run(keep)
    outcomes = []
    for step in (None, 1, 2, 3, 4):
        mutate(site.disk, 10 + (step or 0))
        killed = job_id(7)
        try:
            _killed_run(site, killed, keep, step, tmp_path)
        except AssertionError:
            if step is not None and step > 1:
                break  # settle has fewer durable steps: it finished
            raise
        _recover(site, killed)
        assert [p.name for p in site.snapdir.iterdir() if killed in p.name] == []
        snaps = site.take()
        hint = site.changes(snaps, recorded)
        if hint.tracked:
            assert_exact(hint, copy, snaps)
        else:
            assert hint.reason in ("base replaced", "base changed", "no tracking base"), hint
        outcomes.append(hint.source)
        snaps.discard()
    assert outcomes[0] == "fiemap"  # killed before settle: the base is still the point's
    assert "hash" in outcomes  # killed in settle: detected

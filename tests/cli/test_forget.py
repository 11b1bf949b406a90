"""`cbt forget VAULT POINT...` (issue 16): remove named points as prune does.

A vault holds five points of VM ``web`` (disk seqs 0..4: seq 1 and 2 are deltas
on 0, seq 3 on 2, seq 4 on 0) and one of VM ``db``.  Which point is a base of which
is read from the point records' files here, not from cbt.  Forgetting a point a
kept one is based on hides it ("named; hidden, ..."), the others are deleted
("named"); every point left restores bit for bit; an unknown name, or a backup
holding the vault, removes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.cli import cbt, cbt_json, one_error_line
from helpers.images import assert_same_bytes, copy_disk, random_bytes, scribble, write_disk
from helpers.shapes import PRUNE_KEYS, PRUNE_POINT_KEYS
from helpers.vaults import listed_ids, vault_state

from cbt.api import Vault
from cbt.repo.lock import shared_lock
from cbt.repo.stores import storage_at
from cbt.source.disks import DiskSpec

HIDDEN = "named; hidden, as kept points are based on it"
LAST = ("named; hidden until VM db's next point (so that backup uses no change hint made "
        "since this one)")


@pytest.fixture
def history(tmp_path: Path) -> tuple[Path, list[str], str, dict[str, Path]]:
    disk = write_disk(tmp_path / "os.img", random_bytes(256 << 10, seed=1))
    vault = Vault.init(tmp_path / "vault")
    truth: dict[str, Path] = {}
    web = []
    for day in range(1, 6):
        if day > 1:
            scribble(disk, seed=day, pages=3)
        pid = vault.backup("web", [DiskSpec("os", str(disk))], workers=1,
                           created=f"2026-04-0{day}T10:00:00Z").id
        truth[pid] = copy_disk(disk, tmp_path / "truth" / f"{pid}.img")
        web.append(pid)
    db = vault.backup("db", [DiskSpec("os", str(disk))], workers=1,
                      created="2026-04-06T10:00:00Z").id
    truth[db] = copy_disk(disk, tmp_path / "truth" / f"{db}.img")
    return tmp_path / "vault", web, db, truth


def _record(vault: Path, pid: str) -> dict[str, object]:
    return dict(json.loads((vault / "points" / f"{pid}.json").read_text()))


def _base(vault: Path, pid: str) -> str | None:
    disks = _record(vault, pid)["disks"]
    assert isinstance(disks, list)
    return disks[0]["base"]


def _forget(vault: Path, *args: object) -> dict[str, object]:
    out = cbt_json("forget", vault, *args)
    assert set(out) == PRUNE_KEYS, out
    for p in out["points"]:
        assert set(p) == PRUNE_POINT_KEYS and p["keep"] is False, p
    return out


def test_forget_hides_bases_deletes_the_rest(
        history: tuple[Path, list[str], str, dict[str, Path]], tmp_path: Path) -> None:
    vault, web, db, truth = history
    # the skip chain, from the records: 1, 2 and 4 on 0; 3 on 2
    assert [_base(vault, p) for p in web] == [None, web[0], web[0], web[2], web[0]]
    before = vault_state(vault)
    dry = _forget(vault, web[1], web[2][:-3], "db.latest", web[0], "--dry-run")
    assert vault_state(vault) == before, "--dry-run changed the vault"
    out = _forget(vault, web[1], web[2][:-3], "db.latest", web[0])
    assert {k: v for k, v in dry.items() if k != "dry_run"} == {
        k: v for k, v in out.items() if k != "dry_run"}
    got = {p["recovery_point"]: p["reasons"] for p in out["points"]}
    # web[0]: web[3] and web[4] are kept and based on it (web[3] through web[2])
    # db's only point goes: hidden until db's next point (no change hint since it then)
    assert got == {web[1]: ["named"], web[2]: [HIDDEN], db: [LAST], web[0]: [HIDDEN]}
    assert sorted(listed_ids(vault)) == sorted([web[3], web[4]])
    assert not (vault / "points" / f"{web[1]}.json").exists()
    assert not list((vault / "manifests").glob(f"{web[1]}/*")), "its manifests stay"
    assert _record(vault, web[2])["hidden"] is True
    for pid in (web[3], web[4]):
        r = cbt("restore", vault, pid, "--to", tmp_path / "out" / pid)
        assert r.returncode == 0, r.stderr
        assert_same_bytes(tmp_path / "out" / pid / "os.img", truth[pid])
    # forgetting the bases' dependants too: the hidden bases go with them (web's newest
    # point, and db's, stay hidden until their VMs' next points)
    out = _forget(vault, web[3], "web.latest")
    assert {p["recovery_point"] for p in out["points"]} == {web[3], web[4]}
    assert listed_ids(vault) == []
    assert sorted(p.name for p in (vault / "points").iterdir()) == [
        f"{db}.json", f"{web[4]}.json"]


def test_forget_human_output_and_quiet(
        history: tuple[Path, list[str], str, dict[str, Path]]) -> None:
    vault, web, _db, _truth = history
    r = cbt("forget", vault, web[1])
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["remove", web[1], "named"]
    assert "cbt gc" in lines[-1] and len(lines) == 2
    r = cbt("forget", vault, web[3], "-q")
    assert r.returncode == 0 and r.stdout.split() == ["remove", web[3], "named"], r.stdout


@pytest.mark.parametrize("name", ["nosuch", "web.", "2026-04", "nosuch.latest"])
def test_unknown_point_removes_nothing(
        history: tuple[Path, list[str], str, dict[str, Path]], name: str) -> None:
    vault, web, _db, _truth = history
    before = vault_state(vault)
    line = one_error_line(cbt("forget", vault, web[1], name))
    assert name.removesuffix(".latest") in line, line
    assert vault_state(vault) == before


def test_forget_needs_the_vault_alone(
        history: tuple[Path, list[str], str, dict[str, Path]]) -> None:
    vault, web, _db, _truth = history
    before = vault_state(vault)
    with shared_lock(storage_at(str(vault))):  # a backup holds the vault
        line = one_error_line(cbt("forget", vault, web[1]))
    assert "--wait" in line, line
    assert vault_state(vault) == before
    assert web[1] in listed_ids(vault)


# a forget killed (SIGKILL) at its k-th change to a record or manifest (k from 1; 0:
# never, print how many changes there were)
_KILLED_FORGET = r"""
import os, signal, sys
from cbt.api import Vault
from cbt.ops.prune import forget
from cbt.repo.storage import LocalStorage
at, seen = int(sys.argv[1]), [0]
def killing(method):
    def wrapper(self, name, *args):
        if name.startswith(("points/", "manifests/")):
            seen[0] += 1
            if seen[0] == at:
                os.kill(os.getpid(), signal.SIGKILL)
        return method(self, name, *args)
    return wrapper
LocalStorage.put = killing(LocalStorage.put)
LocalStorage.delete = killing(LocalStorage.delete)
forget(Vault.open(sys.argv[2]), sys.argv[3:])
print(seen[0])
"""


def test_forget_killed_at_any_step_leaves_a_sound_vault(
        history: tuple[Path, list[str], str, dict[str, Path]], tmp_path: Path) -> None:
    """Forget web[1..3] and db (web[2] is web[3]'s base, both deleted), killed at each
    change in turn: no point is left based on a record that is gone, verify passes,
    the kept web[0] and web[4] restore bit for bit, and forgetting again what is still
    listed finishes the job."""
    import shutil
    import subprocess
    import sys

    vault, web, db, truth = history
    named = [web[1], web[2], web[3], db]
    run = [sys.executable, "-c", _KILLED_FORGET]
    probe = tmp_path / "probe"
    shutil.copytree(vault, probe)
    done = subprocess.run([*run, "0", str(probe), *named], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    steps = int(done.stdout)
    assert steps >= 6
    for k in range(1, steps + 1):
        v = tmp_path / f"killed{k}"
        shutil.copytree(vault, v)
        r = subprocess.run([*run, str(k), str(v), *named], capture_output=True, text=True)
        assert r.returncode == -9, (k, r.stderr)
        r = cbt("verify", v)  # (a point based on a record that is gone: a problem)
        assert r.returncode == 0 and r.stderr == "", (k, r.stdout, r.stderr)
        left = [p for p in named if p in listed_ids(v)]
        if left:
            _forget(v, *left)
        assert listed_ids(v) == [web[0], web[4]], k
        for pid in (web[0], web[4]):
            r = cbt("restore", v, pid, "--to", tmp_path / f"out{k}" / pid)
            assert r.returncode == 0, (k, r.stderr)
            assert_same_bytes(tmp_path / f"out{k}" / pid / "os.img", truth[pid])


def test_forgetting_an_unavailable_point_says_so(
        history: tuple[Path, list[str], str, dict[str, Path]]) -> None:
    """web[3] is based on web[2], whose record is damaged here: naming web[3] is one
    error line, and nothing changes (it used to say 'removed 0 points', exit 0)."""
    vault, web, _db, _truth = history
    rec = vault / "points" / f"{web[2]}.json"
    rec.write_text(rec.read_text()[:-20])
    before = vault_state(vault)
    line = one_error_line(cbt("forget", vault, web[1], web[3]))
    assert web[3] in line and "unavailable" in line, line
    assert vault_state(vault) == before


def test_forget_and_stats_on_s3(env: dict[str, str], tmp_path: Path) -> None:
    """An encrypted vault at s3://: three points of one disk (the 2nd and 3rd based on the
    1st); forgetting the 1st hides it (the others are based on it), then the 2nd
    deletes it; after each, gc: the referenced bytes drop by the unique bytes stats gave
    before; verify --data passes and the 3rd restores bit for bit."""
    from helpers.s3 import fresh_bucket

    vault = f"s3://{fresh_bucket()}/v"
    cbt_json("init", vault, "--kdf-log-n", "10", env=env)
    disk = write_disk(tmp_path / "os.img", random_bytes(256 << 10, seed=7))
    ids = []
    for day in (1, 2, 3):
        if day > 1:
            scribble(disk, seed=day, pages=3)
        r = cbt("backup", vault, "--vm", "web", f"os={disk}", "--json", env=env)
        assert r.returncode == 0, r.stderr
        ids.append(json.loads(r.stdout.splitlines()[-1])["recovery_point"])
    truth = copy_disk(disk, tmp_path / "truth.img")
    stored = {}
    for pid, why in ((ids[0], HIDDEN), (ids[1], "named")):
        before = cbt_json("stats", vault, env=env)
        stored = {p["recovery_point"]: p["stored_bytes"] for p in before["points"]}
        unique = {p["recovery_point"]: p["unique_bytes"] for p in before["points"]}
        out = cbt_json("forget", vault, pid, env=env)
        assert [(p["recovery_point"], p["reasons"]) for p in out["points"]] == [(pid, [why])]
        cbt_json("gc", vault, "--grace", "0", env=env)
        after = cbt_json("stats", vault, env=env)
        assert after["referenced_bytes"] == before["referenced_bytes"] - unique[pid], pid
    assert [p["recovery_point"] for p in cbt_json("list", vault, env=env)["points"]] == [
        ids[2]]
    assert after["referenced_bytes"] == stored[ids[2]]
    assert cbt_json("verify", vault, "--data", env=env)["problems"] == []
    r = cbt("restore", vault, ids[2], "--to", tmp_path / "out", env=env)
    assert r.returncode == 0, r.stderr
    assert_same_bytes(tmp_path / "out" / "os.img", truth)


def test_naming_more_points_reads_the_records_no_more_often(
        history: tuple[Path, list[str], str, dict[str, Path]], tmp_path: Path) -> None:
    """Forgetting one point or four (ids, a prefix, VM.latest) reads the record of a point
    it keeps equally often: the names are resolved from one reading of the records (each
    name read every record again: on S3, a request per point per name)."""
    import shutil
    import subprocess
    import sys

    vault, web, _db, _truth = history
    count = r"""
import sys
from cbt.api import Vault
from cbt.ops.prune import forget
from cbt.repo.storage import LocalStorage
reads = [0]
real = LocalStorage.get
def get(self, name, *args, **kw):
    reads[0] += name == sys.argv[2]
    return real(self, name, *args, **kw)
LocalStorage.get = get
forget(Vault.open(sys.argv[1]), sys.argv[3:])
print(reads[0])
"""
    seen = []
    for names in ([web[1]], [web[1], web[3][:-3], "db.latest", web[2]]):
        v = tmp_path / f"v{len(names)}"
        shutil.copytree(vault, v)
        r = subprocess.run([sys.executable, "-c", count, str(v), f"points/{web[4]}.json",
                            *names], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        seen.append(int(r.stdout))
        assert web[4] in listed_ids(v)
    assert seen[0] > 0 and seen[1] == seen[0], seen


def test_forgetting_the_latest_point_leaves_no_change_hint_wrong(tmp_path: Path) -> None:
    """prune always keeps a VM's newest point; forget may remove it.  Then the next backup
    is made against the point before, and a --changed-ranges hint kept since the last
    backup misses what changed in between (the restore differed from the disk): the
    removed newest point stays as a hidden record until a newer point exists, and that
    backup reads every block instead.  Forgetting another point meanwhile keeps the
    hidden record; once a newer point exists, the next forget deletes it."""
    size = 1 << 20
    disk = write_disk(tmp_path / "os.img", random_bytes(size, seed=3))
    vault = tmp_path / "v"
    assert cbt("init", vault, "--encryption", "none").returncode == 0
    ids = []
    for k in range(3):
        if k:
            with disk.open("r+b") as f:  # block k changes before point k
                f.seek(k * 65536)
                f.write(bytes([k]) * 65536)
        r = cbt("backup", vault, "--vm", "web", f"os={disk}", "--json")
        assert r.returncode == 0, r.stderr
        ids.append(json.loads(r.stdout.splitlines()[-1])["recovery_point"])
    out = _forget(vault, "web.latest")
    assert out["points"][0]["reasons"][0].startswith("named; hidden until VM web's next")
    assert _record(vault, ids[2])["hidden"] is True
    _forget(vault, ids[0])  # (another forget keeps the hidden record)
    assert _record(vault, ids[2])["hidden"] is True
    with disk.open("r+b") as f:  # changed since the forgotten point: the hint says so
        f.seek(512 << 10)
        f.write(b"B" * 65536)
    hint = tmp_path / "hint.json"
    hint.write_text(json.dumps({"block_size": 65536, "size_a": size, "size_b": size,
                                "ranges": [[512 << 10, 65536]]}))
    r = cbt("backup", vault, "--vm", "web", f"os={disk}", "--changed-ranges", f"os={hint}",
            "--json")
    assert r.returncode == 0, r.stderr
    assert "was forgotten" in r.stdout, r.stdout  # (the disk's change_source_reason)
    r = cbt("restore", vault, "web.latest", "--to", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert_same_bytes(tmp_path / "out" / "os.img", disk)
    _forget(vault, ids[1])  # a newer point exists: the hidden record goes now
    assert not (vault / "points" / f"{ids[2]}.json").exists()
    assert cbt("verify", vault).returncode == 0

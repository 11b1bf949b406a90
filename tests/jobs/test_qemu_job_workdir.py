"""The work folder ``<QMP socket>.cbt`` attacked: the socket may sit in a folder others
can write (``/tmp``) while cbt runs as root.  Whatever is found at the folder's path or
inside it (a link, a folder of another user, a FIFO or a link named like an overlay), cbt
follows, chowns and writes nothing outside it: it refuses in one line or removes only its
own names."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from helpers.jobs import write_config
from helpers.qmp_daemon import Daemon, storage_daemon
from helpers.system import need

from cbt.api import Vault
from cbt.jobs.config import load
from cbt.jobs.job import JobRequest, JobResult
from cbt.jobs.runner import run_vm
from cbt.source.qemu import scope_of

MIB = 1 << 20
VM = "web"


@pytest.fixture
def daemon(tmp_path: Path):
    with storage_daemon(tmp_path, {"os": 2 * MIB}) as d:
        yield d


def _setup(root: Path, d: Daemon) -> tuple[Vault, Path]:
    vault = Vault.init(root / "vault", encryption="none")
    cfg = write_config(root / "cbt.toml", {"p": {"schedule": "daily 02:00"}},
                       {VM: {"policy": "p", "qmp": str(d.qmp), "disks": {"os": "os"}}})
    return vault, cfg


def _run(cfg: Path) -> JobResult:
    return run_vm(load(cfg), VM, JobRequest())


def test_a_link_at_the_work_folder_is_refused(tmp_path: Path, daemon: Daemon) -> None:
    _setup(tmp_path, daemon)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(0o755)
    (tmp_path / "qmp.sock.cbt").symlink_to(elsewhere)
    res = _run(tmp_path / "cbt.toml")
    assert res.point is None and "\n" not in (res.error or "")
    assert "work folder" in (res.error or "") and "not a folder" in (res.error or "")
    assert stat.S_IMODE(elsewhere.stat().st_mode) == 0o755 and not any(elsewhere.iterdir())


def test_a_work_folder_of_another_user_is_refused(tmp_path: Path, daemon: Daemon) -> None:
    need(os.geteuid() == 0, "needs root (a folder of another user)")
    _setup(tmp_path, daemon)
    work = tmp_path / "qmp.sock.cbt"
    work.mkdir(0o777)
    os.chmod(work, 0o777)
    (work / "planted").write_bytes(b"theirs")
    os.chown(work, 4242, 4242)  # made first by someone else (the socket is root's)
    res = _run(tmp_path / "cbt.toml")
    assert res.point is None and "\n" not in (res.error or "")
    assert f"work folder {work} belongs to uid 4242" in (res.error or "")
    st = work.stat()  # not taken over: owner and mode as they were
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (4242, 0o777)
    assert (work / "planted").read_bytes() == b"theirs"


def test_things_named_like_overlays_are_never_followed(tmp_path: Path,
                                                       daemon: Daemon) -> None:
    """A link and a FIFO named like this scope's overlays (a killed run's names) are
    removed, never followed; another scope's files are left alone."""
    vault, cfg = _setup(tmp_path, daemon)
    work = tmp_path / "qmp.sock.cbt"
    work.mkdir(0o700)
    scope = scope_of(str(vault.config["id"]), VM)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (work / f"cbt-{scope}-n0123abcd-0.qcow2").symlink_to(victim)
    os.mkfifo(work / f"cbt-{scope}-n0123abcd-0-f.qcow2")
    other = work / "cbt-00000000-n0123abcd-0.qcow2"  # another vault's
    other.write_bytes(b"other")
    res = _run(cfg)
    assert res.point is not None, res.error
    assert victim.read_bytes() == b"precious"
    assert sorted(p.name for p in work.iterdir()) == [other.name]
    assert any("released" in w and "n0123abcd-0.qcow2" in w for w in res.point.warnings)


def test_a_work_folder_swapped_for_a_link_after_the_check(tmp_path: Path,
                                                          daemon: Daemon) -> None:
    """Its owner (QEMU's user) may swap the checked folder for a link to anywhere before
    the overlays are made: cut opens it without following and refuses, creating nothing."""
    from cbt.source.qemu import QemuError, QmpSession, cut, resolve_disks

    target = tmp_path / "etc"
    target.mkdir()
    link = tmp_path / "qmp.sock.cbt"
    link.symlink_to(target)
    with QmpSession(daemon.qmp) as s:
        with pytest.raises(QemuError, match="not a folder"), \
                cut(s, resolve_disks(s), "p1", link, scope="0123abcd"):
            pass
        assert not any(target.iterdir())
        names = {n["node-name"] for n in s.command("query-named-block-nodes", {"flat": True})}
        assert names == {"os", "os-file"}

"""Review of -q on the commands that remove: with -q a run names only the points it removed
(prune listed every point kept, and its summary, as forget does not) and gc says nothing
(its figures are a summary of what was done); prune's dry run still answers in full."""

from __future__ import annotations

from pathlib import Path

from helpers import MIB
from helpers.cli import cbt
from helpers.images import fs_image, scribble


def _config(tmp_path: Path) -> tuple[Path, Path]:
    disk = fs_image(tmp_path / "os.img", MIB, 1)
    cfg = tmp_path / "cbt.toml"
    cfg.write_text(f'vault = "{tmp_path / "vault"}"\n[policy.p]\nschedule = "daily 02:00"\n'
                   f'retention = {{ last = 1 }}\n[vm.web]\npolicy = "p"\n'
                   f'disks = {{ os = "{disk}" }}\n')
    assert cbt("init", tmp_path / "vault", "--encryption", "none").returncode == 0
    for day in (1, 2, 3):
        scribble(disk, seed=day)
        r = cbt("backup", "--config", cfg, "--now", f"2026-01-0{day}T02:00:00Z", "-q")
        assert r.returncode == 0, r.stderr
    return tmp_path / "vault", cfg


def _quiet(*args: object) -> None:
    r = cbt(*args, "-q")
    assert r.returncode == 0, (args, r.stderr)
    assert r.stdout == "" and r.stderr == "", (args, r.stdout, r.stderr)


def test_removing_quietly(tmp_path: Path) -> None:
    vault, cfg = _config(tmp_path)
    now = ("--now", "2026-01-04T00:00:00Z")
    dry = cbt("prune", "--config", cfg, *now, "--dry-run", "-q")
    gone = [x for x in dry.stdout.splitlines() if x.startswith("remove ")]
    assert dry.returncode == 0 and len(gone) == 2, dry.stdout
    r = cbt("prune", "--config", cfg, *now, "-q")
    assert r.returncode == 0 and r.stdout.splitlines() == gone, r.stdout
    listed = cbt("list", vault).stdout.splitlines()[1:]
    assert len(listed) == 1
    point = listed[0].split()[0]
    dry = cbt("forget", vault, point, "--dry-run", "-q")
    assert dry.returncode == 0 and point in dry.stdout, dry.stdout
    r = cbt("forget", vault, point, "-q")
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and len(lines) == 1 and lines[0].split()[:2] == ["remove", point]
    assert cbt("list", vault).stdout.splitlines()[1:] == []
    _quiet("gc", vault, "--grace", "0")

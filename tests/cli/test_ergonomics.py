"""Everyday output: -q says only what was asked, -v says more, tables with headers, one unit
system (binary) in summaries and progress bars, bars with speed and time left."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import KIB, MIB
from helpers.cli import cbt, cbt_argv, cbt_json, clean_env
from helpers.images import fs_image, read, scribble
from helpers.truth import nonzero_blocks
from helpers.vaults import make_two_points

two_points = pytest.fixture(scope="module")(make_two_points)


def _plain_vault(tmp_path: Path, *extra: object) -> tuple[Path, Path]:
    vault, disk = tmp_path / "vault", tmp_path / "os.img"
    assert cbt("init", vault, "--encryption", "none", *extra).returncode == 0
    fs_image(disk, 2 * MIB, 1)
    return vault, disk


def test_quiet_commands_that_report_what_they_did_print_nothing(tmp_path: Path) -> None:
    vault, disk = tmp_path / "vault", tmp_path / "os.img"
    fs_image(disk, 2 * MIB, 1)
    steps = [("init", vault, "--encryption", "none"),
             ("backup", vault, "--vm", "web", disk, "--block-size", "64K"),
             ("backup", vault, "--vm", "web", disk, "--block-size", "64K"),
             ("restore", vault, "web.latest", "--to", tmp_path / "out")]
    for args in steps:
        r = cbt(*args, "-q")
        assert r.returncode == 0, (args, r.stderr)
        assert r.stdout == "" and r.stderr == "", (args, r.stdout, r.stderr)
    assert (tmp_path / "out" / "os.img").read_bytes() == disk.read_bytes()
    assert cbt("init", tmp_path / "v2", "--encryption", "none", "-q").stdout == ""
    r = cbt("copy", vault, tmp_path / "v2", "--quiet")
    assert r.returncode == 0 and r.stdout == "", r.stdout
    # without -q each of them says what it did
    assert "initialised" in cbt("init", tmp_path / "v3", "--encryption", "none").stdout
    assert "restored" in cbt("restore", vault, "web.latest", "--to", tmp_path / "o2").stdout
    assert "copied" in cbt("copy", vault, tmp_path / "v3").stdout


def test_quiet_keeps_what_was_asked_for(two_points: tuple[Path, list[str]]) -> None:
    vault, ids = two_points
    loud, quiet = cbt("list", vault), cbt("list", vault, "-q")
    assert loud.returncode == quiet.returncode == 0
    assert quiet.stdout == loud.stdout and all(i in quiet.stdout for i in ids)
    show = cbt("show", vault, ids[0], "-q")
    assert show.returncode == 0 and ids[0] in show.stdout
    diff = cbt("diff", f"{vault}::{ids[0]}", f"{vault}::{ids[1]}", "-q")
    assert diff.returncode == 1 and "db" in diff.stdout


def test_quiet_scan_keeps_its_result_not_its_notice(tmp_path: Path) -> None:
    disk = fs_image(tmp_path / "os.img", MIB, 1)
    loud = cbt("scan", disk, "-o", tmp_path / "m.arrow").stdout.splitlines()
    quiet = cbt("scan", disk, "-o", tmp_path / "m2.arrow", "-q").stdout.splitlines()
    assert loud[-1] == f"  manifest written to {tmp_path / 'm.arrow'}"
    assert [x.split(" in ")[0] for x in quiet] == [x.split(" in ")[0] for x in loud[:-1]]
    assert (tmp_path / "m2.arrow").exists()


def test_list_is_a_table_with_headers(two_points: tuple[Path, list[str]]) -> None:
    vault, ids = two_points
    lines = cbt("list", vault).stdout.splitlines()
    assert lines[0].split() == ["point", "vm", "created", "consistency", "new", "disks"]
    assert [line.split()[0] for line in lines[1:]] == ids
    points = cbt_json("list", vault)["points"]
    for line, p in zip(lines[1:], points, strict=True):
        # every column starts where its header does
        for header, value in (("vm", p["vm"]), ("created", p["created"]),
                              ("consistency", p["consistency"])):
            assert line.index(f"  {value} ") + 2 == lines[0].index(f"  {header} ") + 2, line
        assert "os 1.0 MiB" in line and "db 512.0 KiB" in line


def test_jobs_is_a_table_with_headers(tmp_path: Path) -> None:
    disk = tmp_path / "os.img"
    fs_image(disk, MIB, 1)
    cfg = tmp_path / "cbt.toml"
    cfg.write_text(f'vault = "{tmp_path / "vault"}"\n[policy.p]\nschedule = "daily 02:00"\n'
                   f'retention = {{ daily = 7 }}\n[vm.web]\npolicy = "p"\n'
                   f'disks = {{ os = "{disk}" }}\n')
    assert cbt("init", tmp_path / "vault", "--encryption", "none").returncode == 0
    assert cbt("backup", "--config", cfg, "-q").returncode == 0
    lines = cbt("jobs", tmp_path / "vault").stdout.splitlines()
    assert lines[0].split() == ["start", "vm", "status", "consistency", "point", "or", "error"]
    (job,) = cbt_json("jobs", tmp_path / "vault")["jobs"]
    assert lines[1].split() == [job["start"], "web", "succeeded", job["consistency"],
                                job["recovery_point"]]
    assert cbt("jobs", tmp_path / "vault", "--vm", "none", "-q").stdout == ""
    assert cbt("jobs", tmp_path / "vault", "--vm", "none").stdout == "no jobs\n"


def test_verbose_says_how_each_disk_was_read_and_restored(tmp_path: Path) -> None:
    vault, disk = _plain_vault(tmp_path)
    r = cbt("backup", vault, "--vm", "web", disk, "-v", "--block-size", "64K")
    assert r.returncode == 0, r.stderr
    assert re.search(r"cbt: disk os: .*os\.img, change source hash \(the VM's first point: "
                     r"every block read\); "
                     r"32 of 32 blocks changed", r.stderr), r.stderr
    scribble(disk, 2)
    r = cbt("backup", vault, "--vm", "web", disk, "-v")
    point = cbt_json("show", vault, "web.latest")["disks"][0]
    assert f"{point['changed_blocks']} of 32 blocks changed" in r.stderr, r.stderr
    quiet_stderr = cbt("backup", vault, "--vm", "web", disk).stderr
    assert "cbt: disk os" not in quiet_stderr
    r = cbt("restore", vault, "web.latest", "--to", tmp_path / "out", "--verbose")
    data = int(nonzero_blocks(read(disk), 64 * KIB).sum())
    assert f"cbt: disk os: read from the vault, {data} blocks verified" in r.stderr, r.stderr


def test_backup_summary_is_a_table_in_binary_units(tmp_path: Path) -> None:
    vault, disk = _plain_vault(tmp_path)
    lines = cbt("backup", vault, "--vm", "web", disk).stdout.splitlines()
    assert lines[1].split() == ["disk", "size", "changed", "read", "new", "stored", "source"]
    assert lines[2].split()[:4] == ["os", "2.0", "MiB", str(2 * MIB // (16 * KIB))]
    out = cbt("scan", disk).stdout
    assert re.search(r"\(\d+\.\d (KiB|MiB|GiB)/s\)", out) and "GB/s" not in out, out


def test_progress_texts_are_binary_with_speed_and_time_left() -> None:
    from cbt.cli._common import bytes_text, eta_text, rate_text

    assert bytes_text(3 * MIB // 2, 64 * MIB) == "1.5 MiB / 64.0 MiB"
    assert bytes_text(0, None) == "0 B / ?"
    assert rate_text(10 * MIB, 2.0) == "5.0 MiB/s"
    assert rate_text(10, 0.0) == "?/s"
    # a quarter done in 10 s: 30 s left at that speed
    assert eta_text(MIB, 4 * MIB, 10.0) == "0:00:30"
    assert eta_text(1, 3602, 1.0) == "1:00:01"
    assert eta_text(0, MIB, 5.0) == "-:--:--"


def _on_a_terminal(args: list[object], tmp_path: Path) -> tuple[int, str]:
    """Run cbt with stderr on a pseudo-terminal; its exit code and what the terminal got."""
    master, slave = pty.openpty()
    env = clean_env({"TERM": "xterm", "COLUMNS": "160"})
    proc = subprocess.Popen(cbt_argv(*args), stdout=subprocess.DEVNULL, stderr=slave,
                            stdin=subprocess.DEVNULL, env=env, cwd=tmp_path)
    os.close(slave)
    got = b""
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 60)
            if not ready:
                break
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed its end
                break
            if not chunk:
                break
            got += chunk
    finally:
        os.close(master)
        code = proc.wait(60)
    return code, got.decode(errors="replace")


def test_backup_and_restore_bars_show_binary_speed_and_eta(tmp_path: Path) -> None:
    vault, disk = _plain_vault(tmp_path)
    fs_image(disk, 16 * MIB, 1)
    for args in (["backup", vault, "--vm", "web", disk],
                 ["restore", vault, "web.latest", "--to", tmp_path / "out"]):
        code, term = _on_a_terminal(args, tmp_path)
        assert code == 0, term
        assert re.search(r"\d+\.\d MiB / 1\d\.\d MiB", term), term
        assert re.search(r"\d+\.\d (KiB|MiB|GiB)/s", term) and "eta " in term, term
        assert not re.search(r"\d MB\b|MB/s", term), term
    code, term = _on_a_terminal(["backup", vault, "--vm", "web", disk, "-q"], tmp_path)
    assert code == 0 and "MiB" not in term, term


def _auto_truth(folder: Path) -> tuple[str, str]:
    """(provider auto must choose, file system name) for disks in ``folder``, probed here:
    btrfs, else a reflink clone that cp can make, else none.  The name is findmnt's (the
    type as mounted: ``stat -f`` says ``ext2/ext3`` of an ext4, which the demo printed)."""
    kind = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "-T", str(folder)],
                          capture_output=True, text=True, check=True).stdout.strip()
    if kind == "btrfs":
        return "btrfs", kind
    probe, clone = folder / "probe", folder / "probe.clone"
    probe.write_bytes(b"x" * 4096)
    cloned = subprocess.run(["cp", "--reflink=always", str(probe), str(clone)],
                            capture_output=True, check=False).returncode == 0
    probe.unlink()
    clone.unlink(missing_ok=True)
    return ("reflink" if cloned else "none"), kind


def test_demo_tells_what_happened_and_where_its_files_are(tmp_path: Path) -> None:
    d = tmp_path / "demo"
    r = cbt("demo", "--dir", d, "--size", "8M")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    # the first backup is the full baseline, not "N blocks changed"
    from cbt.core.sizes import human_bytes

    days = cbt_json("list", d / "vault", env={"CBT_PASSWORD_FILE": str(d / "password")})
    blocks = [sum(-(-x["size"] // x["block_size"]) for x in p["disks"])
              for p in days["points"]]
    # what day 1 read: the disks' bytes less their holes (the demo's disks are sparse)
    first = cbt_json("show", d / "vault", days["points"][0]["recovery_point"],
                     env={"CBT_PASSWORD_FILE": str(d / "password")})
    read = sum(x["bytes_read"] for x in first["disks"])
    assert read < sum(x["size"] for x in first["disks"])
    assert re.search(rf"day 1: .*\n\s+full baseline: all {blocks[0]} blocks taken, "
                     rf"{human_bytes(read)} read \(holes are not\)", out), out
    assert re.search(rf"day 2: .*\n\s+\d+ of {blocks[1]} blocks changed since day 1", out), out
    want, kind = _auto_truth(d / "disks")
    assert f'snapshot "auto" chose {want}: ' in out and f"({kind})" in out, out
    # where the files are, how big (as du counts), how to remove them
    du = int(subprocess.run(["du", "-sB1", str(d)], capture_output=True, text=True,
                            check=True).stdout.split()[0])
    assert f"The demo's files take {human_bytes(du)} on disk" in out, (du, out)
    assert f"    rm -rf -- {d}\n" in out
    subprocess.run(["rm", "-rf", "--", str(d)], check=True)
    assert not d.exists()


def test_demo_json_and_quiet(tmp_path: Path) -> None:
    report = cbt_json("demo", "--dir", tmp_path / "j", "--size", "8M")
    want, kind = _auto_truth(tmp_path / "j" / "disks")
    assert set(report["days"][0]["snapshots"].values()) == {want}
    assert kind in report["snapshot_reason"]
    day1 = report["days"][0]
    assert day1["changed_blocks"] == day1["blocks"] and day1["bytes_new"] > 0
    du = int(subprocess.run(["du", "-sB1", str(tmp_path / "j")], capture_output=True,
                            text=True, check=True).stdout.split()[0])
    assert report["bytes_on_disk"] == du
    assert report["remove_command"] == f"rm -rf -- {tmp_path / 'j'}"
    r = cbt("demo", "--dir", tmp_path / "q", "--size", "8M", "-q")
    assert r.returncode == 0 and r.stdout == "", r.stdout


def test_top_level_help_says_what_each_command_does_now() -> None:
    """`cbt --help` (issue 16: its lines had fallen behind the commands): every command on
    one line of 80 columns, and the lines name what the issue added (the daemon's
    maintenance, verify's subsets, the maps, mount, completion, man)."""
    from cbt.cli.main import COMMANDS

    r = cbt("--help", env={"COLUMNS": "80"})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    start = lines.index("  COMMAND") + 1
    section = lines[start:lines.index("", start)]
    listed: dict[str, str] = {}
    name = ""
    for line in section:
        if line.startswith(" " * 5):  # a description below its long name, never a 2nd line
            assert name and not listed[name], (name, line)
            listed[name] = line.strip()
        else:
            name, _, text = line.strip().partition(" ")
            listed[name] = text.strip()
        assert len(line) <= 80, line
    assert list(listed) == list(COMMANDS)
    wanted = {"daemon": ("prune", "gc", "maintenance"), "verify": ("--read-data-subset",
              "--data"), "stats": ("--map",), "diff": ("--map",), "mount": ("FUSE",),
              "forget": ("named",), "demo": ("explaining",), "completion": ("bash", "zsh"),
              "man": ("manual",)}
    for name, words in wanted.items():
        assert all(w in listed[name] for w in words), (name, listed[name])


def test_help_and_man_page_use_binary_units_only() -> None:
    """Issue 16: one unit system everywhere.  The text a user reads about sizes (every
    command's --help, all of them in the man page) says KiB/MiB/GiB, never kB/MB/GB."""
    page = cbt("man").stdout
    assert "MiB" in page
    decimal = re.compile(r"\d ?[kKMGTP]B\b|\b[kKMGTP]B/s\b|\s[MGTP]B\b")
    assert not decimal.findall(page), [line for line in page.splitlines()
                                       if decimal.search(line)]


def test_entry_collects_garbage_only_while_the_command_works(tmp_path: Path) -> None:
    """The console script (``entry``) keeps the cyclic collector off through start-up
    (parsing), on while the command runs, and freezes what is left at the end; a process
    that calls ``main`` itself keeps its collector as it was."""
    img = tmp_path / "disk.img"
    img.write_bytes(os.urandom(3 * 64 * KIB))
    probe = (
        "import gc, json, sys\n"
        "import cbt.cli.scan_cmd as m\n"
        "add, run = m.add_arguments, m.run\n"
        "def spy_add(p):\n"
        "    print('parsing', gc.isenabled()); add(p)\n"
        "def spy_run(args):\n"
        "    print('running', gc.isenabled()); return run(args)\n"
        "m.add_arguments, m.run = spy_add, spy_run\n"
        "from cbt.cli.main import entry, main\n"
        "mode, sys.argv = sys.argv[1], ['cbt', 'scan', '--json', sys.argv[2]]\n"
        "if mode == 'entry, then main':\n"
        "    sys.argv[1] = 'no-such-command'\n"
        "    try:\n"
        "        entry()\n"
        "    except SystemExit as exc:\n"
        "        print('entry', exc.code, gc.isenabled())\n"
        "    sys.argv[1] = 'scan'\n"
        "if mode != 'entry':\n"
        "    gc.disable()\n"
        "code = entry() if mode == 'entry' else main()\n"
        "print('after', code, gc.isenabled())\n")
    said = {}
    for mode in ("entry", "main", "entry, then main"):
        r = subprocess.run([sys.executable, "-c", probe, mode, str(img)], capture_output=True,
                           text=True, env=clean_env(), check=True)
        lines = [x for x in r.stdout.splitlines() if not x.startswith("{")]
        assert json.loads(r.stdout.splitlines()[-2])["data_blocks"] == 3, r.stdout
        said[mode] = lines
    assert said["entry"] == ["parsing False", "running True", "after 0 True"]
    assert said["main"] == ["parsing False", "running False", "after 0 False"]
    # an entry() that ends before any command ran leaves the collector on as it found it,
    # and a main() after it in the same process leaves it off as its caller set it
    assert said["entry, then main"] == ["entry 2 True", "parsing False", "running False",
                                        "after 0 False"]

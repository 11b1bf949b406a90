"""Configuration files: ``cbt config check FILE [--json]`` and ``cbt.config.load``.

The issue's full example resolves (paths against the config's folder, hook
programs on PATH, inline-table hooks the same as a ``[vm.NAME.hooks]`` table)
and prints the plan ``{"vault","vms":[{"name","policy","disks":[{"label",
"path","snapshot"}]}],"warnings"}``.  Every mistake is one line on stderr,
exit 2, naming the dotted key and ``FILE:LINE`` where it can be found; the
expected line is found in the test's own text, not by cbt.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any

import pytest
from helpers.cli import cbt, one_error_line
from helpers.shapes import CHECK_DISK_KEYS, CHECK_KEYS, CHECK_VM_KEYS
from helpers.system import can_reflink

from cbt.cli.main import main
from cbt.jobs.config import ConfigError, load

FULL = """\
vault = "vault"                    # relative paths resolve against the config file's folder
[policy.daily]
schedule = "daily 02:00"           # daily HH:MM[,..] | weekly mon..sun[,..] HH:MM[,..] | every Nh
timezone = "Europe/Madrid"         # default UTC
retention = { daily = 7, weekly = 4, monthly = 12, yearly = 3 }
instant_restore_days = 2           # 0-30
[vm.web]
policy = "daily"
disks = { os = "disks/os.img", db = "disks/db.img" }
snapshot = "auto"                  # auto | reflink | btrfs | copy | none
snapshot_dir = ".cbt-snapshots"    # default: beside each disk
block_size = "64K"                 # or integer bytes
[vm.web.hooks]                     # optional
pre = ["/usr/local/bin/quiesce"]
post = ["/usr/local/bin/resume"]
timeout = 30                       # seconds, default 60
on_pre_failure = "fallback"        # default; or "fail"
provides = "application"           # default; or "file-system"
"""

INLINE = """\
vault = "store/vault"
[policy.nightly]
schedule = "weekly mon,thu 01:30,13:30"
[vm.db]
policy = "nightly"
disks = { data = "images/data.raw" }
snapshot = "copy"
block_size = 131072
hooks = { pre = ["cbt-test-quiesce", "--flush"], post = ["cbt-test-resume"], timeout = 3 }
"""


def make_files(root: Path, *rel: str) -> None:
    for r in rel:
        (root / r).parent.mkdir(parents=True, exist_ok=True)
        (root / r).write_bytes(b"\1" * 8192)


def path_programs(bindir: Path, *names: str) -> None:
    bindir.mkdir(parents=True, exist_ok=True)
    for n in names:
        p = bindir / n
        p.write_text("#!/bin/sh\nexit 0\n")
        p.chmod(p.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def check_json(cfg: Path, cwd: Path | None = None,
               env: dict[str, str] | None = None) -> dict[str, object]:
    r = cbt("config", "check", cfg, "--json", cwd=cwd, env=env)
    assert r.returncode == 0, (r.stdout, r.stderr)
    obj = json.loads(r.stdout)
    assert set(obj) == CHECK_KEYS, obj
    for vm in obj["vms"]:
        assert set(vm) == CHECK_VM_KEYS, vm
        for d in vm["disks"]:
            assert set(d) == CHECK_DISK_KEYS, d
    return obj


# -- valid configurations ---------------------------------------------------------------------


def test_full_example_resolves_against_the_config_folder(tmp_path: Path) -> None:
    cfgdir = (tmp_path / "etc" / "cbt").resolve()
    cfgdir.mkdir(parents=True)
    make_files(cfgdir, "disks/os.img", "disks/db.img")
    cfg = cfgdir / "cbt.toml"
    cfg.write_text(FULL)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # run from another folder: nothing may resolve against the working directory
    obj = check_json(cfg, cwd=elsewhere)
    auto = "reflink" if can_reflink(cfgdir / "disks") else "none"
    assert obj == {
        "vault": str(cfgdir / "vault"),
        "vms": [{"name": "web", "policy": "daily", "disks": [
            {"label": "os", "path": str(cfgdir / "disks" / "os.img"), "snapshot": auto},
            {"label": "db", "path": str(cfgdir / "disks" / "db.img"), "snapshot": auto}],
            "qmp": None, "guest_agent": None, "nbd": None, "host": None}],
        "maintenance": None, "warnings": [],
    }
    # human output too
    r = cbt("config", "check", cfg, cwd=elsewhere)
    assert r.returncode == 0, r.stderr
    assert "web" in r.stdout and str(cfgdir / "disks" / "os.img") in r.stdout

    c = load(cfg)
    assert c.vault == str(cfgdir / "vault")
    pol = c.policies["daily"]
    assert pol.schedule.kind == "daily" and pol.schedule.times == ((2, 0),)
    assert pol.timezone == "Europe/Madrid" and pol.instant_restore_days == 2
    r_ = pol.retention
    assert (r_.daily, r_.weekly, r_.monthly, r_.yearly, r_.keep_all) == (7, 4, 12, 3, False)
    vm = c.vms["web"]
    assert vm.policy == "daily" and vm.snapshot == "auto"
    assert vm.disks == {"os": str(cfgdir / "disks" / "os.img"),
                        "db": str(cfgdir / "disks" / "db.img")}
    assert Path(vm.snapshot_dir or "") == cfgdir / ".cbt-snapshots"
    assert vm.block_size == 64 * 1024
    assert vm.hooks is not None
    assert vm.hooks.pre == ("/usr/local/bin/quiesce",)
    assert vm.hooks.post == ("/usr/local/bin/resume",)
    assert vm.hooks.timeout == 30
    assert vm.hooks.on_pre_failure == "fallback" and vm.hooks.provides == "application"


def test_inline_hooks_and_programs_on_path(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    cfgdir = tmp_path.resolve()
    make_files(cfgdir, "images/data.raw")
    bindir = cfgdir / "bin"
    path_programs(bindir, "cbt-test-quiesce", "cbt-test-resume")
    cfg = cfgdir / "inline.toml"
    cfg.write_text(INLINE)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    c = load(cfg)
    assert c.vault == str(cfgdir / "store" / "vault")
    assert c.policies["nightly"].schedule.kind == "weekly"
    assert c.policies["nightly"].schedule.days == (0, 3)
    assert c.policies["nightly"].schedule.times == ((1, 30), (13, 30))
    assert c.policies["nightly"].timezone == "UTC"
    assert c.policies["nightly"].retention.keep_all
    vm = c.vms["db"]
    assert vm.block_size == 131072 and vm.snapshot == "copy" and vm.snapshot_dir is None
    assert vm.hooks is not None
    assert vm.hooks.pre == (str(bindir / "cbt-test-quiesce"), "--flush")
    assert vm.hooks.post == (str(bindir / "cbt-test-resume"),)
    assert vm.hooks.timeout == 3
    assert vm.hooks.on_pre_failure == "fallback" and vm.hooks.provides == "application"
    obj = check_json(cfg, env={"PATH": os.environ["PATH"]})
    assert obj["vms"] == [{"name": "db", "policy": "nightly", "disks": [
        {"label": "data", "path": str(cfgdir / "images" / "data.raw"), "snapshot": "copy"}],
        "qmp": None, "guest_agent": None, "nbd": None, "host": None}]

    # the same hooks as a table mean the same thing
    table = INLINE.replace(
        'hooks = { pre = ["cbt-test-quiesce", "--flush"], post = ["cbt-test-resume"], '
        'timeout = 3 }',
        '[vm.db.hooks]\npre = ["cbt-test-quiesce", "--flush"]\npost = ["cbt-test-resume"]\n'
        'timeout = 3')
    assert table != INLINE
    cfg2 = cfgdir / "table.toml"
    cfg2.write_text(table)
    assert load(cfg2).vms["db"].hooks == vm.hooks


def test_defaults_and_forced_providers(tmp_path: Path) -> None:
    root = tmp_path.resolve()
    make_files(root, "a.img", "b.img", "c.img")
    cfg = root / "min.toml"
    cfg.write_text('vault = "/abs/vault"\n[policy.p]\nschedule = "every 6h"\n'
                   '[vm.a]\npolicy = "p"\ndisks = { a = "a.img" }\n'
                   '[vm.b]\npolicy = "p"\ndisks = { b = "b.img" }\nsnapshot = "copy"\n'
                   '[vm.c]\npolicy = "p"\ndisks = { c = "c.img" }\nsnapshot = "none"\n')
    c = load(cfg)
    assert c.vault == "/abs/vault"
    assert c.policies["p"].schedule.kind == "every" and c.policies["p"].schedule.hours == 6
    a = c.vms["a"]
    assert (a.snapshot, a.snapshot_dir, a.block_size, a.hooks) == ("auto", None, None, None)
    assert c.policies["p"].instant_restore_days == 0
    obj = check_json(cfg)
    got = {vm["name"]: [d["snapshot"] for d in vm["disks"]] for vm in obj["vms"]}
    auto = "reflink" if can_reflink(root) else "none"
    assert got == {"a": [auto], "b": ["copy"], "c": ["none"]}


@pytest.mark.parametrize("schedule", ["daily 00:00", "daily 02:00,14:30", "weekly sun 23:59",
                                      "weekly mon,tue,wed 06:00,18:00", "every 1h",
                                      "every 8h", "every 24h"])
def test_good_schedules(tmp_path: Path, schedule: str) -> None:
    cfg = tmp_path / "s.toml"
    cfg.write_text(f'vault = "v"\n[policy.p]\nschedule = "{schedule}"\n')
    assert load(cfg).policies["p"].schedule.text == schedule


# -- errors: one line, exit 2, the dotted key and FILE:LINE ------------------------------------


def _edit(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, old
    return text.replace(old, new)


# (id, edit of FULL: (old, new), dotted key, the text of the line to point at or None)
BAD = [
    ("top-unknown", ('vault = "vault"', 'vault = "vault"\nvalt = "x"'), "valt", 'valt = "x"'),
    ("top-table-unknown", ("[vm.web]\n", "[vms.web]\npolicy = \"daily\"\n[vm.web]\n"), "vms",
     "[vms.web]"),
    ("policy-unknown", ('timezone = "Europe/Madrid"', 'schedul = "daily 03:00"'),
     "policy.daily.schedul", "schedul ="),
    ("retention-unknown", ("monthly = 12, yearly = 3 }", "monthly = 12, minutely = 3 }"),
     "policy.daily.retention.minutely", "minutely = 3"),
    ("within-word", ("yearly = 3 }", 'yearly = 3, within = "2 weeks" }'),
     "policy.daily.retention.within", "2 weeks"),
    ("within-order", ("yearly = 3 }", 'yearly = 3, within = "3d1y" }'),
     "policy.daily.retention.within", "3d1y"),
    ("within-zero", ("yearly = 3 }", 'yearly = 3, within = "0d" }'),
     "policy.daily.retention.within", '"0d"'),
    ("within-number", ("yearly = 3 }", "yearly = 3, within = 14 }"),
     "policy.daily.retention.within", "within = 14"),
    ("last-negative", ("yearly = 3 }", "yearly = 3, last = -2 }"),
     "policy.daily.retention.last", "last = -2"),
    ("retention-negative", ("daily = 7,", "daily = -1,"), "policy.daily.retention.daily",
     "daily = -1"),
    ("vm-unknown", ('snapshot = "auto"', 'snapshots = "auto"'), "vm.web.snapshots",
     "snapshots ="),
    ("hooks-unknown", ('provides = "application"', 'provide = "application"'),
     "vm.web.hooks.provide", "provide ="),
    ("missing-vault", ('vault = "vault"', '#'), "vault", None),
    ("missing-schedule", ('schedule = "daily 02:00"', '#'), "policy.daily", "[policy.daily]",
     "schedule"),
    ("missing-policy", ('policy = "daily"', '#'), "vm.web", "[vm.web]", "policy"),
    ("missing-disks", ('disks = { os = "disks/os.img", db = "disks/db.img" }', '#'),
     "vm.web", "[vm.web]", "disks"),
    ("unknown-policy", ('policy = "daily"', 'policy = "hourly"'), "vm.web.policy",
     'policy = "hourly"'),
    ("daily-25", ('"daily 02:00"', '"daily 25:00"'), "policy.daily.schedule", "daily 25:00"),
    ("daily-minute", ('"daily 02:00"', '"daily 02:60"'), "policy.daily.schedule",
     "daily 02:60"),
    ("weekly-xyz", ('"daily 02:00"', '"weekly xyz 02:00"'), "policy.daily.schedule",
     "weekly xyz"),
    ("every-5h", ('"daily 02:00"', '"every 5h"'), "policy.daily.schedule", "every 5h"),
    ("every-0h", ('"daily 02:00"', '"every 0h"'), "policy.daily.schedule", "every 0h"),
    ("monthly", ('"daily 02:00"', '"monthly 1 02:00"'), "policy.daily.schedule", "monthly 1"),
    ("timezone", ('"Europe/Madrid"', '"Mars/Olympus_Mons"'), "policy.daily.timezone",
     "Mars/Olympus_Mons"),
    ("instant-31", ("instant_restore_days = 2", "instant_restore_days = 31"),
     "policy.daily.instant_restore_days", "instant_restore_days = 31"),
    ("instant-negative", ("instant_restore_days = 2", "instant_restore_days = -1"),
     "policy.daily.instant_restore_days", "instant_restore_days = -1"),
    ("block-size-3K", ('block_size = "64K"', 'block_size = "3K"'), "vm.web.block_size",
     'block_size = "3K"'),
    ("block-size-word", ('block_size = "64K"', 'block_size = "big"'), "vm.web.block_size",
     'block_size = "big"'),
    ("block-size-8M", ('block_size = "64K"', "block_size = 8388608"), "vm.web.block_size",
     "block_size = 8388608"),
    ("snapshot-zfs", ('snapshot = "auto"', 'snapshot = "zfs"'), "vm.web.snapshot",
     'snapshot = "zfs"'),
    ("pre-string", ('pre = ["/usr/local/bin/quiesce"]', 'pre = "/usr/local/bin/quiesce"'),
     "vm.web.hooks.pre", 'pre = "/usr/local/bin/quiesce"'),
    ("pre-empty", ('pre = ["/usr/local/bin/quiesce"]', "pre = []"), "vm.web.hooks.pre",
     "pre = []"),
    ("pre-not-on-path", ('pre = ["/usr/local/bin/quiesce"]', 'pre = ["cbt-no-such-quiesce"]'),
     "vm.web.hooks.pre", "cbt-no-such-quiesce"),
    ("post-not-on-path", ('post = ["/usr/local/bin/resume"]', 'post = ["cbt-no-such-thaw"]'),
     "vm.web.hooks.post", "cbt-no-such-thaw"),
    ("on-pre-failure", ('on_pre_failure = "fallback"', 'on_pre_failure = "retry"'),
     "vm.web.hooks.on_pre_failure", 'on_pre_failure = "retry"'),
    ("provides", ('provides = "application"', 'provides = "block"'), "vm.web.hooks.provides",
     'provides = "block"'),
    ("timeout-zero", ("timeout = 30", "timeout = 0"), "vm.web.hooks.timeout", "timeout = 0"),
    ("timeout-string", ("timeout = 30", 'timeout = "30"'), "vm.web.hooks.timeout",
     'timeout = "30"'),
    ("timeout-bool", ("timeout = 30", "timeout = true"), "vm.web.hooks.timeout",
     "timeout = true"),
    ("disk-label", ('os = "disks/os.img"', '"-os" = "disks/os.img"'), "vm.web.disks.-os",
     '"-os" ='),
    ("vault-number", ('vault = "vault"', "vault = 3"), "vault", "vault = 3"),
    ("vm-name", ("[vm.web]\n", '[vm."web server"]\n'), "vm.web server", '[vm."web server"]'),
]


def _expected_line(text: str, needle: str | None) -> int | None:
    if needle is None:
        return None
    hits = [no for no, line in enumerate(text.splitlines(), 1)
            if needle in line.split("#")[0] or (needle.startswith("[") and
                                                  line.startswith(needle))]
    assert len(hits) == 1, (needle, hits)
    return hits[0]


def _check_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, dotted: str,
                 line: int | None) -> str:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as info:
        load(cfg)
    code = main(["config", "check", str(cfg), "--json"])
    out, err = capsys.readouterr()
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    msg = lines[0]
    assert msg.startswith("cbt: error: "), msg
    assert str(info.value) in msg
    where = f"{cfg}:{line}: " if line is not None else f"{cfg}"
    assert where in msg, (msg, where)
    assert re.search(rf"(^|[\s:]){re.escape(dotted)}:", msg), (msg, dotted)
    obj = json.loads(out)
    assert obj["type"] == "error" and obj["message"] in msg
    return msg


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_config_errors_name_key_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         case: tuple[Any, ...]) -> None:
    _id, edit, dotted, needle, *also = case
    text = _edit(FULL, *edit)
    msg = _check_error(tmp_path, capsys, text, dotted, _expected_line(text, needle))
    for word in also:  # a missing key: the message names it too
        assert repr(word) in msg or f" {word}" in msg, msg


INLINE_FULL = FULL.replace(
    '[vm.web.hooks]                     # optional\npre = ["/usr/local/bin/quiesce"]\n'
    'post = ["/usr/local/bin/resume"]\ntimeout = 30                       # seconds, default 60\n'
    'on_pre_failure = "fallback"        # default; or "fail"\n'
    'provides = "application"           # default; or "file-system"\n',
    'hooks = { pre = ["/usr/local/bin/quiesce"], post = ["/usr/local/bin/resume"], '
    'timeout = 30 }\n')

BAD_INLINE = [
    ("inline-timeout", ("timeout = 30 }", "timeout = -3 }"), "vm.web.hooks.timeout"),
    ("inline-unknown", ("timeout = 30 }", "timout = 30 }"), "vm.web.hooks.timout"),
    ("inline-pre-string", ('pre = ["/usr/local/bin/quiesce"]', 'pre = "quiesce"'),
     "vm.web.hooks.pre"),
    ("inline-provides", ("timeout = 30 }", 'timeout = 30, provides = "disk" }'),
     "vm.web.hooks.provides"),
    ("inline-not-on-path", ('post = ["/usr/local/bin/resume"]', 'post = ["cbt-no-such-x"]'),
     "vm.web.hooks.post"),
]


def test_inline_example_is_valid(tmp_path: Path) -> None:
    assert INLINE_FULL != FULL and "hooks = {" in INLINE_FULL
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text(FULL)
    b.write_text(INLINE_FULL)
    ha, hb = load(a).vms["web"].hooks, load(b).vms["web"].hooks
    assert ha == hb


@pytest.mark.parametrize("edit,dotted", [c[1:] for c in BAD_INLINE],
                         ids=[c[0] for c in BAD_INLINE])
def test_inline_hook_errors_point_at_the_hooks_line(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str],
                                                    edit: tuple[str, str], dotted: str) -> None:
    text = _edit(INLINE_FULL, *edit)
    _check_error(tmp_path, capsys, text, dotted, _expected_line(text, "hooks = {"))


def test_invalid_toml_names_the_line(tmp_path: Path) -> None:
    cfg = tmp_path / "broken.toml"
    text = FULL.replace("timeout = 30 ", "timeout = = 30 ")
    cfg.write_text(text)
    line = _expected_line(text, "timeout = = 30")
    r = cbt("config", "check", cfg, "--json")
    msg = one_error_line(r)
    assert str(cfg) in msg
    assert re.search(rf"(:{line}\b|line {line}\b)", msg), msg
    assert json.loads(r.stdout)["type"] == "error"


def test_missing_config_file_and_backup_reports_config_errors(tmp_path: Path) -> None:
    msg = one_error_line(cbt("config", "check", tmp_path / "nope.toml"))
    assert "nope.toml" in msg
    cfg = tmp_path / "bad.toml"
    text = _edit(FULL, "timeout = 30", "timeout = 0")
    cfg.write_text(text)
    line = _expected_line(text, "timeout = 0")
    # cbt backup --config validates the same way, before doing anything
    r = cbt("backup", "--config", cfg, "--json")
    msg = one_error_line(r)
    assert f"{cfg}:{line}: vm.web.hooks.timeout:" in msg
    assert not (tmp_path / "vault").exists()


def test_hook_program_found_on_path_at_check_time(tmp_path: Path) -> None:
    """A program that is not on PATH is an error; put on PATH, the same file is fine."""
    bindir = tmp_path / "bin"
    path_programs(bindir, "cbt-test-quiesce", "cbt-test-resume")
    make_files(tmp_path, "images/data.raw")
    cfg = tmp_path / "c.toml"
    cfg.write_text(INLINE)
    bare = {"PATH": os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                                    if p and Path(p) != bindir)}
    r = cbt("config", "check", cfg, env=bare)
    msg = one_error_line(r)
    assert "vm.db.hooks.pre" in msg and "cbt-test-quiesce" in msg
    assert f"{cfg}:{_expected_line(INLINE, 'hooks = {')}:" in msg
    ok = cbt("config", "check", cfg, env={"PATH": f"{bindir}{os.pathsep}{bare['PATH']}"})
    assert ok.returncode == 0, ok.stderr


def test_a_config_nested_too_deeply_is_one_line(tmp_path: Path) -> None:
    """tomllib recurses into nested arrays: a config of 5,000 of them is an error naming
    the file, not a RecursionError's traceback."""
    cfg = tmp_path / "deep.toml"
    cfg.write_text("vault = " + "[" * 5000 + "]" * 5000 + "\n")
    msg = one_error_line(cbt("config", "check", cfg))
    assert str(cfg) in msg and "nested too deeply" in msg, msg

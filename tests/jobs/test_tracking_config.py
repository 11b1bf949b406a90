"""A VM's change tracking in its config: ``change_tracking`` (auto | hash) and
``verify_fraction`` (0 to 1); a bad value is one line naming the file, line and key,
exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cbt.cli.main import main
from cbt.jobs.config import ConfigError, load

BASE = """\
vault = "vault"
[policy.daily]
schedule = "daily 02:00"
[vm.web]
policy = "daily"
disks = { os = "disks/os.img" }
"""


def test_defaults(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(BASE)
    vm = load(cfg).vms["web"]
    assert (vm.change_tracking, vm.verify_fraction) == ("auto", 1 / 32)


@pytest.mark.parametrize(("text", "mode", "fraction"), [
    ('change_tracking = "hash"', "hash", 1 / 32),
    ('change_tracking = "auto"\nverify_fraction = 1', "auto", 1.0),
    ("verify_fraction = 0", "auto", 0.0),
    ("verify_fraction = 0.25", "auto", 0.25),
])
def test_good_values(tmp_path: Path, text: str, mode: str, fraction: float) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(BASE + text + "\n")
    vm = load(cfg).vms["web"]
    assert (vm.change_tracking, vm.verify_fraction) == (mode, fraction)
    assert isinstance(vm.verify_fraction, float)


@pytest.mark.parametrize(("text", "key"), [
    ('change_tracking = "fiemap"', "change_tracking"),
    ("change_tracking = true", "change_tracking"),
    ("verify_fraction = 1.5", "verify_fraction"),
    ("verify_fraction = -0.1", "verify_fraction"),
    ("verify_fraction = nan", "verify_fraction"),
    ("verify_fraction = inf", "verify_fraction"),
    ('verify_fraction = "1/32"', "verify_fraction"),
    ("verify_fraction = true", "verify_fraction"),
])
def test_bad_values_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    text: str, key: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(BASE + text + "\n")
    with pytest.raises(ConfigError):
        load(cfg)
    code = main(["config", "check", str(cfg), "--json"])
    out, err = capsys.readouterr()
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"cbt: error: {cfg}:7: vm.web.{key}: "), lines[0]
    assert json.loads(out)["type"] == "error"

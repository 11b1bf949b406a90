"""Jobs of different VMs at once into one vault (``cbt backup --config F --vm VM``).

A job of VM ``a`` is held in its post hook (the hook waits for a file the test makes)
while the job of VM ``b`` runs: it succeeds beside it, and its recovery (which closes
its own VM's jobs that died) leaves ``a``'s running job alone; a second job of ``a``
is refused naming the first.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from helpers import MIB
from helpers.cli import cbt, cleanup_group, one_error_line, start_cbt, wait_for
from helpers.images import make_disk
from helpers.jobs import job_config, jobs_json, one_point

HOLD = ("import pathlib, sys, time\n"
        "g = pathlib.Path(sys.argv[1])\n"
        "(g / 'in-post').write_text('')\n"
        "deadline = time.monotonic() + 60\n"
        "while not (g / 'go').exists() and time.monotonic() < deadline:\n"
        "    time.sleep(0.05)\n")


@pytest.mark.slow
def test_jobs_of_two_vms_at_once(tmp_path: Path) -> None:
    gates = tmp_path / "gates"
    gates.mkdir()
    disks = {vm: make_disk(tmp_path / "disks" / f"{vm}.img", 2 * MIB, seed=90 + i)
             for i, vm in enumerate(("a", "b"))}
    cbt("init", tmp_path / "vault", "--encryption", "none").check_returncode()
    cfg = job_config(tmp_path / "cbt.toml", {
        "a": {"disks": {"d": str(disks["a"])}, "snapshot": "none", "block_size": "64K",
              "hooks": {"post": [sys.executable, "-c", HOLD, str(gates)], "timeout": 60}},
        "b": {"disks": {"d": str(disks["b"])}, "snapshot": "none", "block_size": "64K"}},
        vault=str(tmp_path / "vault"))
    first = start_cbt("backup", "--config", cfg, "--vm", "a", "--json")
    with cleanup_group(first):
        wait_for(lambda: (gates / "in-post").exists() or first.poll() is not None,
                 what="the first job's post hook")
        assert first.poll() is None
        [running] = jobs_json(tmp_path / "vault", "a")
        assert running["status"] == "running"
        t0 = time.monotonic()
        one_point(cfg, vm="b")  # beside it
        assert time.monotonic() - t0 < 60
        assert [j["status"] for j in jobs_json(tmp_path / "vault", "a")] == ["running"], \
            "b's recovery touched a's running job"
        line = one_error_line(cbt("backup", "--config", cfg, "--vm", "a"))
        assert f"VM a of vault {tmp_path / 'vault'} is locked by pid {first.pid} " in line, line
        (gates / "go").write_text("")
        _out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    statuses = [j["status"] for j in jobs_json(tmp_path / "vault", "a")]
    assert "running" not in statuses and "interrupted" not in statuses, statuses
    r = cbt("verify", tmp_path / "vault")
    assert r.returncode == 0, r.stderr

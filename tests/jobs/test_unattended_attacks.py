"""Attacks on unattended running (issue 16, review of part U): hostile vault records
in the metrics, hostile state records, hostile text in the daemon's log lines.  Each
test drives the real command (or the real daemon) and judges what it wrote with the
tests' own parser (:mod:`helpers.prom`) or the file system."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from helpers.cli import cbt
from helpers.images import write_random_disk
from helpers.jobs import write_config
from helpers.prom import get as _get
from helpers.prom import parse_textfile
from helpers.vaults import forge_record, listed_ids


def _one_vm(tmp_path: Path, extra: str = "") -> Path:
    write_random_disk(tmp_path / "disks" / "os.img", 64 << 10, seed=1)
    cfg = write_config(tmp_path / "cbt.toml", {"p": {"schedule": "every 1h"}},
                       {"web": {"policy": "p", "disks": {"os": "disks/os.img"},
                                "snapshot": "none"}})
    if extra:
        cfg.write_text(cfg.read_text() + extra)
    assert cbt("init", "--encryption", "none", tmp_path / "vault").returncode == 0
    return cfg


def test_a_crafted_consistency_level_neither_breaks_the_metrics_nor_bloats_them(
        tmp_path: Path) -> None:
    """A point record (checksum recomputed, as anyone can) whose consistency holds a
    lone surrogate (JSON's ``\\ud800``), a quote, a backslash, a newline, an escape
    character and 10 000 more characters: run-due --metrics still writes a file the
    exposition format's parser reads (valid UTF-8), its label is the first 128
    characters with the surrogate as U+FFFD; the file stays small."""
    cfg = _one_vm(tmp_path)
    r = cbt("run-due", "--config", cfg)
    assert r.returncode == 0, r.stderr
    [point] = listed_ids(tmp_path / "vault")
    level = 'crash\ud800"x\\\n\x1b[31m' + "y" * 10_000

    def change(body: dict[str, Any]) -> None:
        body["consistency"] = level

    forge_record(tmp_path / "vault", point, change)
    metrics = tmp_path / "cbt.prom"
    r = cbt("run-due", "--config", cfg, "--metrics", metrics)
    assert r.returncode == 0, r.stderr
    raw = metrics.read_bytes()
    assert len(raw) < 8192, len(raw)
    samples, _ = parse_textfile(raw.decode("utf-8"))  # (strict: valid UTF-8)
    label = level[:128].replace("\ud800", "\ufffd")
    assert _get(samples, "cbt_last_consistency", vm="web", consistency=label) == 1.0
    assert _get(samples, "cbt_last_consistency", vm="web", consistency="crash") == 0.0

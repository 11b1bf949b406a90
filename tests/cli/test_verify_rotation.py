"""``cbt verify --read-data-subset N%`` reads the next window each run (issue 16: "a
rotating part of the data per run"), from a small record per vault in the state folder
(``$XDG_STATE_HOME/cbt``, in the test's tmp_path by the autouse fixture).

Moved by the day, the window stayed put for runs at a period of 100/N days (every 2
days at 50%, every 10 or 30 at 10%) and for every run of a day.  The vault here holds
a damaged block in one pack: exactly one run of a cycle of 100/N runs finds it, and the
cycle reads each pack's data once (the packs a run read, by their count and bytes,
add up to the vault's).  The record is untrusted input: a damaged one is a warning and
the run reads the day's window.
"""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import KIB, MIB
from helpers.cli import cbt
from helpers.images import write_random_disk
from helpers.packs import pack_files, trailer_entries

import cbt.ops.backup as backup_mod
from cbt.api import Vault
from cbt.jobs.verify_record import record_path
from cbt.ops.verify import DataSubset

BLOB_HEADER = struct.calcsize("<4s32sBBHII")  # documented blob header


@pytest.fixture
def vault(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dict[str, int], str]:
    """A vault of many small packs, one byte of one blob's data flipped: its dir, the
    packs' sizes by id, and the damaged pack's id."""
    monkeypatch.setattr(backup_mod, "TARGET_PACK_SIZE", 256 * KIB)
    disk = write_random_disk(tmp_path / "d.img", 6 * MIB, seed=5)
    Vault.init(tmp_path / "vault").backup("vm", [f"d={disk}"], block_size=64 * KIB, workers=1)
    packs = {f.stem: f.stat().st_size for f in pack_files(tmp_path / "vault")}
    damaged = sorted(packs)[len(packs) // 3]
    f = next(p for p in pack_files(tmp_path / "vault") if p.stem == damaged)
    _digest, offset, stored, _raw = trailer_entries(f)[0]
    data = bytearray(f.read_bytes())
    data[offset + BLOB_HEADER + stored // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    return tmp_path / "vault", packs, damaged


def _run(vault: Path, subset: str) -> tuple[dict[str, Any], str]:
    r = cbt("verify", vault, "--read-data-subset", subset, "--json")
    assert r.returncode in (0, 2), r.stderr
    out = json.loads(r.stdout)
    return out, r.stderr


def _window(out: dict[str, Any]) -> int:
    return int(out["data_subset"].split("(window ", 1)[1].split(":", 1)[0])


def _today() -> set[int]:
    now = time.time() // 86400
    return {int(now), int(now) + 1}  # (a run may cross midnight UTC)


@pytest.mark.parametrize("percent", ["25", "12.5"])
def test_each_run_reads_the_next_window_and_a_cycle_reads_every_pack_once(
        vault: tuple[Path, dict[str, int], str], percent: str) -> None:
    where, packs, damaged = vault
    runs = round(100 / float(percent))
    outs = [_run(where, f"{percent}%")[0] for _ in range(runs)]
    windows = [_window(o) for o in outs]
    assert windows[0] in _today()
    assert windows == list(range(windows[0], windows[0] + runs))  # one step a run
    found = [any(p["pack"] == damaged for p in o["problems"]) for o in outs]
    assert found.count(True) == 1, found
    # each window's packs, as the subset chooses them, are what the run read
    chosen = [DataSubset.parse(f"{percent}%").choose(packs, w) for w in windows]
    assert [o["packs_data_checked"] for o in outs] == [len(c) for c in chosen]
    assert [o["bytes_data_checked"] for o in outs] == [sum(packs[p] for p in c)
                                                       for c in chosen]
    assert sum(o["packs_data_checked"] for o in outs) == len(packs)
    assert sum(o["bytes_data_checked"] for o in outs) == sum(packs.values())
    assert found.index(True) == next(i for i, c in enumerate(chosen) if damaged in c)
    # the next run starts the next cycle where the first began (mod 100/N windows)
    again = _run(where, f"{percent}%")[0]
    assert _window(again) == windows[-1] + 1
    assert DataSubset.parse(f"{percent}%").choose(packs, _window(again)) == chosen[0]


def test_the_record_is_the_users_and_says_where_the_cycle_is(
        vault: tuple[Path, dict[str, int], str]) -> None:
    where, _packs, _damaged = vault
    out, _err = _run(where, "25%")
    path = record_path(str(where), 25.0)
    assert path.parent == Path(os.environ["XDG_STATE_HOME"]) / "cbt"
    assert path.stat().st_mode & 0o777 == 0o600
    rec = json.loads(path.read_text())
    assert (rec["vault"], rec["percent"], rec["window"]) == (str(where), 25.0, _window(out))
    # another N starts a cycle of its own at the day, in a record of its own; n/m and
    # --data leave the records be
    other, _ = _run(where, "50%")
    assert _window(other) in _today()
    assert record_path(str(where), 50.0) != path
    before = path.read_bytes()
    assert cbt("verify", where, "--read-data-subset", "1/3", "-q").returncode in (0, 2)
    assert cbt("verify", where, "--data", "-q").returncode in (0, 2)
    assert path.read_bytes() == before


def test_a_run_that_fails_records_nothing(tmp_path: Path) -> None:
    r = cbt("verify", tmp_path / "none", "--read-data-subset", "25%")
    assert r.returncode == 2
    assert not record_path(str(tmp_path / "none"), 25.0).exists()


@pytest.mark.parametrize("damage", ["garbage", "array", "negative", "bool", "symlink",
                                    "fifo", "huge", "percent too large", "percent nan",
                                    "nested"])
def test_a_damaged_record_is_a_warning_and_the_day_window(
        vault: tuple[Path, dict[str, int], str], tmp_path: Path, damage: str) -> None:
    where, _packs, _damaged = vault
    _run(where, "25%")
    path = record_path(str(where), 25.0)
    good = json.loads(path.read_text())
    path.unlink()
    if damage == "garbage":
        path.write_bytes(b"\x00{not json")
    elif damage == "array":
        path.write_text("[1, 2]")
    elif damage in ("negative", "bool"):
        path.write_text(json.dumps({**good, "window": -5 if damage == "negative" else True}))
    elif damage == "symlink":
        (tmp_path / "elsewhere.json").write_text(json.dumps(good))
        path.symlink_to(tmp_path / "elsewhere.json")
    elif damage == "fifo":
        os.mkfifo(path)
    elif damage == "percent too large":  # (a float of it overflows)
        path.write_text(json.dumps(good)[:-1] + ', "percent": 1' + "0" * 400 + "}")
    elif damage == "percent nan":
        path.write_text(json.dumps(good)[:-1] + ', "percent": NaN}')
    elif damage == "nested":  # (json's parser recurses)
        path.write_text("[" * 2000 + "]" * 2000)  # (under the 4 KiB cap)
    else:
        path.write_text(" " * 100_000 + json.dumps(good))
    out, err = _run(where, "25%")
    assert _window(out) in _today()
    warned = [w for w in out["warnings"] if "verify's record" in w]
    assert len(warned) == 1 and str(path) in warned[0] and "ignored" in warned[0], out
    # written anew, a plain record (a link is replaced, not followed)
    assert not path.is_symlink() and json.loads(path.read_text())["window"] == _window(out)
    if damage == "symlink":
        assert json.loads((tmp_path / "elsewhere.json").read_text()) == good
    assert _window(_run(where, "25%")[0]) == _window(out) + 1
    assert "Traceback" not in err


def test_two_percentages_of_one_vault_each_keep_their_cycle(
        vault: tuple[Path, dict[str, int], str]) -> None:
    """A daily 10% and a weekly 25% of one vault: each N's runs move on from its own last
    window, whatever the other ran in between."""
    where, _packs, _damaged = vault
    ten = [_window(_run(where, "10%")[0])]
    quarter = [_window(_run(where, "25%")[0])]
    for _ in range(3):
        ten.append(_window(_run(where, "10%")[0]))
        quarter.append(_window(_run(where, "25%")[0]))
    assert ten == list(range(ten[0], ten[0] + 4))
    assert quarter == list(range(quarter[0], quarter[0] + 4))

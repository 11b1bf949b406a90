"""``cbt copy SRC DST``: the command line, its passphrases, errors, and kills mid-way."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from helpers.cli import cbt, crash_env, one_error_line, result_lines, run_in_session
from helpers.damage import flip_byte
from helpers.packs import pack_files, trailer_entries
from helpers.vaults import PASSWORD, encrypted_env, make_two_points

two_points = pytest.fixture(scope="module")(make_two_points)

OTHER = "the destination's own 33"


def _init(vault: Path, env: dict[str, str] | None) -> None:
    extra = ["--kdf-log-n", "10"] if env else ["--encryption", "none"]
    r = cbt("init", vault, *extra, env=env)
    assert r.returncode == 0, r.stderr


def _envs(tmp_path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """SRC's environment (CBT_PASSWORD_FILE), and DST's (its passphrase in CBT_PASSWORD)."""
    src = encrypted_env(tmp_path)
    return src, {**os.environ, "CBT_PASSWORD": OTHER}


def _copy(*args: object, env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    r = cbt("copy", *args, "--json", env=env)
    assert r.returncode == 0, r.stderr
    return result_lines(r.stdout)


def _restored(vault: Path, point: str, to: Path, env: dict[str, str] | None) -> dict[str, bytes]:
    r = cbt("restore", vault, point, "--to", to, env=env)
    assert r.returncode == 0, r.stderr
    return {f.name: f.read_bytes() for f in to.iterdir()}


def _blobs(vault: Path) -> int:
    return sum(len(trailer_entries(p)) for p in pack_files(vault))


def _verify_clean(vault: Path, env: dict[str, str] | None) -> None:
    r = cbt("verify", vault, "--data", "--json", env=env)
    assert r.returncode == 0, (r.stdout, r.stderr)


def test_plain_to_encrypted_then_encrypted_to_encrypted(two_points: tuple[Path, list[str]],
                                                        tmp_path: Path) -> None:
    src, ids = two_points
    src_env, dst_env = _envs(tmp_path)
    e1, e2 = tmp_path / "e1", tmp_path / "e2"
    _init(e1, src_env)
    _init(e2, dst_env)
    pw = tmp_path / "pw"
    pw.write_text(PASSWORD + "\n")
    lines = _copy(src, e1, "--to-password-file", pw)
    assert [x["recovery_point"] for x in lines[:-1]] == ids
    assert lines[-1]["type"] == "summary" and lines[-1]["points_copied"] == 2
    assert lines[0]["bytes_sent"] > 0 and lines[0]["blocks_new"] > 0
    # encrypted -> encrypted: SRC's passphrase in CBT_PASSWORD_FILE, DST's in CBT_TO_PASSWORD
    env = {**src_env, "CBT_TO_PASSWORD": OTHER}
    lines = _copy(e1, e2, env=env)
    assert lines[-1]["points_copied"] == 2
    for pid in ids:
        want = _restored(src, pid, tmp_path / "a" / pid, None)
        assert _restored(e2, pid, tmp_path / "b" / pid, dst_env) == want
    _verify_clean(e2, dst_env)
    again = _copy(e1, e2, env=env)
    assert again[-1] == {"type": "summary", "points_copied": 0, "points_skipped": 2,
                         "bytes_sent": 0, "blocks_new": 0, "warnings": []}
    # encrypted -> plain, one point named, by VM
    p3 = tmp_path / "p3"
    _init(p3, None)
    lines = _copy(e2, p3, "--vm", "web", ids[1], env={**os.environ, "CBT_PASSWORD": OTHER})
    assert [x["recovery_point"] for x in lines[:-1]] == [ids[1]]
    assert _restored(p3, ids[1], tmp_path / "c", None) == \
        _restored(src, ids[1], tmp_path / "d", None)


def test_errors_are_one_line_exit_2(two_points: tuple[Path, list[str]], tmp_path: Path) -> None:
    src, _ids = two_points
    _src_env, dst_env = _envs(tmp_path)
    dst = tmp_path / "dst"
    _init(dst, dst_env)
    assert "same vault" in one_error_line(cbt("copy", src, src))
    to_env = {**os.environ, "CBT_TO_PASSWORD": OTHER}
    line = one_error_line(cbt("copy", src, dst, "web.20990101T000000Z", env=to_env))
    assert "no recovery point" in line
    wrong = {**os.environ, "CBT_TO_PASSWORD": "not it"}
    assert "passphrase" in one_error_line(cbt("copy", src, dst, env=wrong))
    no_pass = {k: v for k, v in os.environ.items() if not k.startswith("CBT_")}
    assert "CBT_TO_PASSWORD" in one_error_line(cbt("copy", src, dst, env=no_pass))
    assert not list(pack_files(dst))  # nothing written


def test_corrupt_block_in_src_names_point_and_block(two_points: tuple[Path, list[str]],
                                                    tmp_path: Path) -> None:
    src, ids = two_points
    shutil.copytree(src, tmp_path / "src")
    for p in pack_files(tmp_path / "src"):
        flip_byte(p, 0.3)
    dst = tmp_path / "dst"
    _init(dst, None)
    line = one_error_line(cbt("copy", tmp_path / "src", dst))
    assert f"point {ids[0]}: block " in line
    assert list((dst / "points").iterdir()) == []  # no half point
    _verify_clean(dst, None)


def test_copy_killed_at_each_step_then_resumed(two_points: tuple[Path, list[str]],
                                               tmp_path: Path) -> None:
    """SIGKILLed at a durable step (CBT_CRASH_AT), DST holds whole points only, and the
    copy run again finishes, reusing the blocks already stored (nothing stored twice)."""
    src, ids = two_points
    _, dst_env = _envs(tmp_path)
    whole = tmp_path / "whole"
    _init(whole, dst_env)
    full = _copy(src, whole, env={**dst_env, "CBT_TO_PASSWORD": OTHER})[-1]
    env = {**os.environ, "CBT_TO_PASSWORD": OTHER}
    step, killed = 1, 0
    while True:
        dst = tmp_path / f"dst{step}"
        _init(dst, dst_env)
        r = run_in_session("copy", src, dst, "--json", env={**env, **crash_env(step, tmp_path)})
        if r.returncode == 0:
            break
        assert r.returncode == -9, (r.returncode, r.stderr)
        killed += 1
        _verify_clean(dst, dst_env)  # whole points only (an unfinished one is no problem)
        resumed = _copy(src, dst, env=env)[-1]
        assert resumed["points_copied"] + resumed["points_skipped"] == 2
        assert resumed["blocks_new"] <= full["blocks_new"]
        assert _blobs(dst) == _blobs(whole)  # what the killed run stored was reused
        _verify_clean(dst, dst_env)
        assert _restored(dst, ids[1], tmp_path / f"r{step}", dst_env) == \
            _restored(src, ids[1], tmp_path / f"s{step}", None)
        step += 3
    assert killed >= 3


@pytest.mark.parametrize("named", [False, True], ids=["every point", "the child alone"])
def test_another_point_under_the_same_id_in_dst_is_never_taken_for_srcs(
        tmp_path: Path, named: bool) -> None:
    """Two vaults backing up one VM in the same second hold two different points under one
    id. Where the vaults name blocks differently (an encrypted SRC) their digests cannot be
    compared: DST's point was taken for SRC's, and its blocks for SRC's blocks (the copied
    child restored DST's data; verify said ok).  Now: an error naming the id, or (the
    child alone) nothing learned from DST's point: the copy restores SRC's bytes."""
    src_env, _ = _envs(tmp_path)
    src, dst = tmp_path / "src", tmp_path / "dst"
    _init(src, src_env)
    _init(dst, None)
    x, y, x2 = (tmp_path / n for n in ("x.img", "y.img", "x2.img"))
    x.write_bytes(os.urandom(256 << 10))
    y.write_bytes(os.urandom(256 << 10))
    x2.write_bytes(x.read_bytes()[:100] + b"changed" + x.read_bytes()[107:])
    for vault, disk, when, env in ((src, x, "03", src_env), (dst, y, "03", None),
                                   (src, x2, "04", src_env)):
        r = cbt("backup", vault, "--vm", "web", "--now", f"2026-11-30T{when}:00:00Z",
                f"disk={disk}", env=env)
        assert r.returncode == 0, r.stderr
    child = "web.20261130T040000Z"
    env = {**src_env, "CBT_TO_PASSWORD": ""}
    r = cbt("copy", src, dst, *([child] if named else []), env=env)
    if not named:
        assert r.returncode != 0
        assert "holds another point under the id web.20261130T030000Z" in one_error_line(r)
        return
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    assert _restored(dst, child, out, None) == {"disk.img": x2.read_bytes()}

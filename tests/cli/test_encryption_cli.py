"""Encrypted vaults on the command line: init, where the passphrase comes from, prompts,
wrong passphrases, unencrypted vaults that never ask, and manifest export.

Every test runs the real ``cbt`` executable; encrypted vaults are made with
``cbt init --kdf-log-n 10 --password-file F`` (the default scrypt cost is for users).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import select
import subprocess
import termios
import time
from pathlib import Path

import blake3
import numpy as np
import pyarrow as pa
import pytest
from helpers import MIB
from helpers.cli import backup_cli, cbt, cbt_argv, cbt_json, clean_env, one_error_line
from helpers.images import assert_same_disk, fs_image, read, write_at
from helpers.truth import file_digest, truth_hash
from helpers.vaults import PASSWORD

import cbt as cbt_api

BS = 16 * 1024


def tree_snapshot(root: Path) -> dict[str, tuple[str, int, int]]:
    """Relative path -> (content digest, mode, mtime_ns) of every file and folder under root."""
    out: dict[str, tuple[str, int, int]] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath, name)
            st = p.lstat()
            digest = file_digest(p) if p.is_file() else "dir"
            out[str(p.relative_to(root))] = (digest, st.st_mode, st.st_mtime_ns)
    return out


def password_file(path: Path, text: str) -> Path:
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def pw(tmp_path: Path) -> Path:
    return password_file(tmp_path / "pw", PASSWORD)


def init_encrypted(vault: Path, pw: Path, *more: object) -> dict[str, object]:
    return cbt_json("init", vault, "--kdf-log-n", 10, "--password-file", pw, *more)


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    return fs_image(tmp_path / "os.img", 2 * MIB, 1101)


# -- init ------------------------------------------------------------------------------------


def test_init_is_encrypted_by_default(tmp_path: Path, pw: Path) -> None:
    out = init_encrypted(tmp_path / "v", pw)
    assert set(out) == {"vault", "format_version", "encryption", "compression", "id_key", "key",
                        "warnings"}
    assert out["encryption"] == "aes-256-gcm" and out["format_version"] == 3
    assert out["compression"] == "zstd"
    assert out["id_key"] == "blake3-keyed"
    config = json.loads((tmp_path / "v" / "config").read_text())
    assert (config["encryption"], config["format_version"]) == ("aes-256-gcm", 3)
    assert sorted(p.name for p in (tmp_path / "v" / "keys").iterdir()) == [f"{out['key']}.json"]
    slot = json.loads((tmp_path / "v" / "keys" / f"{out['key']}.json").read_text())
    assert (slot["kdf"], slot["log_n"]) == ("scrypt", 10)
    # the other AEAD, and none
    out = init_encrypted(tmp_path / "c", pw, "--encryption", "chacha20-poly1305")
    assert out["encryption"] == "chacha20-poly1305"
    out = cbt_json("init", tmp_path / "plain", "--encryption", "none")
    assert (out["encryption"], out["format_version"], out["key"]) == ("none", 3, None)
    assert not (tmp_path / "plain" / "keys").exists()


def test_init_without_a_passphrase_and_no_terminal_creates_nothing(tmp_path: Path) -> None:
    r = cbt("init", tmp_path / "v")
    line = one_error_line(r)
    assert "no passphrase was given" in line
    for hint in ("--password-file FILE", "CBT_PASSWORD_FILE", "CBT_PASSWORD", "terminal",
                 "--encryption none"):
        assert hint in line, (hint, line)
    assert not (tmp_path / "v").exists()
    (tmp_path / "empty").mkdir()
    one_error_line(cbt("init", tmp_path / "empty"))
    assert list((tmp_path / "empty").iterdir()) == []
    # --json: the same message as a JSON error object
    r = cbt("init", tmp_path / "v", "--json")
    assert r.returncode == 2 and json.loads(r.stdout)["type"] == "error"
    assert not (tmp_path / "v").exists()


def test_init_refuses_bad_options(tmp_path: Path, pw: Path) -> None:
    for args in (("--encryption", "rot13"), ("--kdf-log-n", 9), ("--kdf-log-n", 25),
                 ("--kdf-log-n", "x")):
        one_error_line(cbt("init", tmp_path / "v", "--password-file", pw, *args))
        assert not (tmp_path / "v").exists()
    line = one_error_line(cbt("init", tmp_path / "v", "--password-file", tmp_path / "nope"))
    assert str(tmp_path / "nope") in line
    assert not (tmp_path / "v").exists()


def test_every_command_that_opens_a_vault_takes_a_password_file() -> None:
    from cbt.cli.main import COMMANDS

    opens = {"init", "backup", "list", "show", "restore", "verify", "jobs", "run-due", "daemon",
             "prune", "gc", "diff", "key", "copy", "forget", "stats", "mount"}
    assert opens <= set(COMMANDS)
    for name in COMMANDS:
        r = cbt(name, "--help")
        assert r.returncode == 0, r.stderr
        assert ("--password-file FILE" in r.stdout) == (name in opens), name


# -- opening: wrong passphrase, precedence, unencrypted vaults ------------------------------


@pytest.mark.parametrize("points", [False, True])
def test_a_wrong_passphrase_touches_nothing(tmp_path: Path, pw: Path, disk: Path, points: bool
                                            ) -> None:
    vault = tmp_path / "v"
    init_encrypted(vault, pw)
    env = {"CBT_PASSWORD_FILE": str(pw)}
    point = "web.20260101T000000Z"
    if points:
        backup_cli(vault, "web", disk, now="2026-01-01T00:00:00Z", env=env)
        write_at(disk, 0, b"changed" * 1000)
    before = tree_snapshot(vault)
    wrong = password_file(tmp_path / "wrong", "not the passphrase")
    new = password_file(tmp_path / "new", "a new one")
    (tmp_path / "out").mkdir()
    for args in (("list", vault), ("show", vault, point), ("verify", vault, "--data"),
                 ("backup", vault, "--vm", "web", disk), ("gc", vault),
                 ("verify", vault, "--repair"), ("jobs", vault),
                 ("restore", vault, point, "--to", tmp_path / "out"),
                 ("show", vault, point, "--manifest", "os", "-o", tmp_path / "m.arrow"),
                 ("key", "list", vault), ("key", "add", vault, "--new-password-file", new),
                 ("key", "passwd", vault, "--new-password-file", new),
                 ("diff", f"{vault}::{point}", f"{vault}::{point}")):
        r = cbt(*args, "--password-file", wrong, env=env)
        assert one_error_line(r) == "cbt: error: wrong passphrase", args
        r = cbt(*args, env={"CBT_PASSWORD": "not it either"})
        assert one_error_line(r) == "cbt: error: wrong passphrase", args
    assert tree_snapshot(vault) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "os.img", "out", "pw", "v",
                                                         "wrong"]
    assert list((tmp_path / "out").iterdir()) == []


def test_a_missing_passphrase_says_how_to_give_one(tmp_path: Path, pw: Path) -> None:
    vault = tmp_path / "v"
    init_encrypted(vault, pw)
    before = tree_snapshot(vault)
    for args in (("list", vault), ("gc", vault), ("key", "list", vault)):
        line = one_error_line(cbt(*args))
        assert f"vault {vault} is encrypted and no passphrase was given" in line
        assert "--password-file FILE" in line and "CBT_PASSWORD" in line
    assert tree_snapshot(vault) == before


def test_password_file_beats_env_file_beats_env_password(tmp_path: Path) -> None:
    vault = tmp_path / "v"
    right = password_file(tmp_path / "right", "right one")
    wrong = password_file(tmp_path / "wrong", "wrong one")
    init_encrypted(vault, right)

    def opens(*args: object, **env: str) -> bool:
        r = cbt("list", vault, *args, env=env)
        if r.returncode != 0:
            assert one_error_line(r) == "cbt: error: wrong passphrase"
        return r.returncode == 0

    assert opens("--password-file", right, CBT_PASSWORD_FILE=str(wrong), CBT_PASSWORD="wrong one")
    assert not opens("--password-file", wrong, CBT_PASSWORD_FILE=str(right),
                     CBT_PASSWORD="right one")
    assert opens(CBT_PASSWORD_FILE=str(right), CBT_PASSWORD="wrong one")
    assert not opens(CBT_PASSWORD_FILE=str(wrong), CBT_PASSWORD="right one")
    assert opens(CBT_PASSWORD="right one")
    assert not opens(CBT_PASSWORD="wrong one")
    # a file's passphrase is its first line, without its ending (\r\n too)
    (tmp_path / "crlf").write_bytes(b"right one\r\nsecond line\n")
    assert opens("--password-file", tmp_path / "crlf")


def test_an_unencrypted_vault_never_asks(tmp_path: Path, disk: Path) -> None:
    vault = tmp_path / "v"
    cbt_json("init", vault, "--encryption", "none")
    missing = tmp_path / "no-such-password-file"  # never read: the vault needs none
    point = backup_cli(vault, "web", disk, "--password-file", missing,
                       now="2026-01-01T00:00:00Z")["recovery_point"]
    assert cbt_json("list", vault)["points"][0]["recovery_point"] == point
    for args in (("show", vault, point), ("verify", vault, "--data"), ("jobs", vault),
                 ("gc", vault), ("list", vault, "--password-file", missing)):
        cbt_json(*args)
    out = cbt_json("restore", vault, point, "--to", tmp_path / "out")
    assert_same_disk(out["disks"][0]["to"], disk, BS)
    # and on a terminal it does not prompt either (it would wait for an answer)
    code, stdout, transcript = on_pty(["list", vault], [])
    assert code == 0 and point in stdout and "passphrase" not in transcript


def test_the_whole_cycle_with_a_password_file(tmp_path: Path, pw: Path, disk: Path) -> None:
    vault = tmp_path / "v"
    init_encrypted(vault, pw)
    first = backup_cli(vault, "web", disk, "--password-file", pw, now="2026-01-01T00:00:00Z")
    write_at(disk, 3 * BS, os.urandom(BS))
    second = backup_cli(vault, "web", disk, "--password-file", pw, now="2026-01-02T00:00:00Z")
    assert second["disks"][0]["changed_blocks"] == 1
    ids = [p["recovery_point"] for p in cbt_json("list", vault, "--password-file", pw)["points"]]
    assert ids == [first["recovery_point"], second["recovery_point"]]
    assert cbt_json("verify", vault, "--data", "--password-file", pw)["problems"] == []
    out = cbt_json("restore", vault, "web.latest", "--to", tmp_path / "out",
                   "--password-file", pw)
    assert_same_disk(out["disks"][0]["to"], disk, BS)
    r = cbt("diff", f"{vault}::{ids[0]}", f"{vault}::{ids[1]}", "--password-file", pw, "--json")
    assert r.returncode == 1, r.stderr
    assert json.loads(r.stdout)["changed_blocks"] == 1


# -- prompts on a terminal -------------------------------------------------------------------


def _take_terminal() -> None:
    """In the child (a new session): make its stdin, a pty, the controlling terminal."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def on_pty(args: list[object], answers: list[str], env: dict[str, str] | None = None,
           timeout: float = 60) -> tuple[int, str, str]:
    """Run cbt with stdin and stderr on a pty, answering each prompt in turn.

    Returns the exit code, stdout (a pipe) and what appeared on the terminal.
    """
    master, slave = os.openpty()
    p = subprocess.Popen(cbt_argv(*args), stdin=slave, stderr=slave, stdout=subprocess.PIPE,
                         env=clean_env(env), start_new_session=True, preexec_fn=_take_terminal,
                         text=True)
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + timeout
    pending = list(answers)

    def read_some() -> bool:
        nonlocal seen
        ready, _, _ = select.select([master], [], [], 0.1)
        if not ready:
            return True
        try:
            chunk = os.read(master, 4096)
        except OSError as exc:  # EIO: every end of the pty is closed (the process is gone)
            assert exc.errno == errno.EIO
            return False
        seen += chunk
        return bool(chunk)

    try:
        asked = 0
        while time.monotonic() < deadline:
            if pending and seen.count(b": ") > asked:
                asked += 1
                os.write(master, pending.pop(0).encode() + b"\n")
            if not read_some() and p.poll() is not None:
                break
            if p.poll() is not None and not pending:
                while read_some() and select.select([master], [], [], 0)[0]:
                    pass
                break
        stdout, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        os.close(master)
    return p.returncode, stdout, seen.decode(errors="replace")


def test_init_on_a_terminal_asks_twice(tmp_path: Path) -> None:
    vault = tmp_path / "v"
    code, _, transcript = on_pty(["init", vault, "--kdf-log-n", 10],
                                 ["first answer", "second answer"])
    assert code == 2
    assert "do not match" in transcript and transcript.count("passphrase") >= 1
    assert "repeat it" in transcript
    assert not vault.exists()
    code, stdout, transcript = on_pty(["init", vault, "--kdf-log-n", 10, "--json"],
                                      ["typed secret", "typed secret"])
    assert code == 0, transcript
    assert json.loads(stdout)["encryption"] == "aes-256-gcm"
    assert "typed secret" not in transcript  # not echoed
    # the typed passphrase opens it; asked once when opening
    assert cbt("list", vault, env={"CBT_PASSWORD": "typed secret"}).returncode == 0
    code, stdout, transcript = on_pty(["list", vault, "--json"], ["typed secret"])
    assert code == 0, transcript
    assert transcript.count(f"passphrase of {vault}") == 1
    assert json.loads(stdout)["points"] == []
    code, _, transcript = on_pty(["list", vault], ["typed wrong"])
    assert code == 2 and "wrong passphrase" in transcript


def test_init_on_a_terminal_refuses_an_empty_passphrase(tmp_path: Path) -> None:
    code, _, transcript = on_pty(["init", tmp_path / "v", "--kdf-log-n", 10], [""])
    assert code == 2 and "empty passphrase" in transcript
    code, _, transcript = on_pty(["init", tmp_path / "v", "--kdf-log-n", 10], ["\x04"])
    assert code == 2 and "no passphrase typed" in transcript, transcript  # Ctrl-D
    assert "Traceback" not in transcript
    assert not (tmp_path / "v").exists()


def test_a_file_or_the_environment_beats_the_prompt(tmp_path: Path, pw: Path) -> None:
    code, _, transcript = on_pty(["init", tmp_path / "v", "--kdf-log-n", 10, "--json",
                                       "--password-file", pw], [])
    assert code == 0 and "passphrase" not in transcript
    code, _, transcript = on_pty(["list", tmp_path / "v"], [],
                                      env={"CBT_PASSWORD": PASSWORD})
    assert code == 0 and "passphrase" not in transcript


# -- show --manifest -o ----------------------------------------------------------------------


def read_arrow(path: Path) -> pa.Table:
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_file(source).read_all()


@pytest.mark.parametrize("encrypted", [False, True])
def test_show_manifest_writes_a_plain_arrow_file(tmp_path: Path, pw: Path, disk: Path,
                                                 encrypted: bool) -> None:
    vault = tmp_path / "v"
    if encrypted:
        init_encrypted(vault, pw)
    else:
        cbt_json("init", vault, "--encryption", "none")
    env = {"CBT_PASSWORD_FILE": str(pw)}
    backup_cli(vault, "web", f"os={disk}", now="2026-01-01T00:00:00Z", env=env)
    write_at(disk, 5 * BS, os.urandom(2 * BS))
    point = backup_cli(vault, "web", f"os={disk}", now="2026-01-02T00:00:00Z",
                       env=env)["recovery_point"]  # a delta: the export resolves it
    out = tmp_path / "os.arrow"
    line = cbt_json("show", vault, point, "--manifest", "os", "-o", out, env=env)
    kind = "blake3-keyed" if encrypted else "blake3"
    assert set(line) == {"manifest", "recovery_point", "disk", "blocks", "block_size",
                         "disk_size", "digest_kind", "vault_id", "warnings"}
    assert line["manifest"] == str(out) and line["blocks"] == len(read(disk)) // BS
    assert (line["digest_kind"], line["recovery_point"], line["disk"]) == (kind, point, "os")
    table = read_arrow(out)
    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    config = json.loads((vault / "config").read_text())
    assert meta["cbt.digest_kind"] == kind and meta["cbt.vault_id"] == config["id"]
    assert table.column_names == ["block", "digest", "flags"]
    # no row for a hole (format 2): the rows say which blocks they are
    rows = table.column("block").to_numpy()
    n = line["blocks"]
    assert meta["cbt.format_version"] == "2" and 0 < len(rows) < n
    digests = np.zeros((n, 32), dtype=np.uint8)
    digests[rows] = np.frombuffer(b"".join(table.column("digest").to_pylist()),
                                  dtype=np.uint8).reshape(-1, 32)
    file_flags = np.full(n, 2, dtype=np.uint8)  # HOLE where there is no row
    file_flags[rows] = table.column("flags").to_numpy()
    v = cbt_api.Vault.open(vault, passphrase=PASSWORD)
    want = v.resolve(v.point(point), "os")
    assert np.array_equal(digests, want.digests)
    assert np.array_equal(file_flags, want.flags)
    # against independent truth: plain or keyed BLAKE3 of each block as it is now
    data = read(disk)
    truth, flags = truth_hash(data, BS)
    assert np.array_equal(file_flags == 0, flags == 0)
    if encrypted:
        assert v.id_key is not None
        for i in np.flatnonzero(flags == 0)[:20].tolist():
            block = bytes(data[i * BS:(i + 1) * BS])
            assert bytes(digests[i]) == blake3.blake3(block, key=v.id_key).digest()
            assert bytes(digests[i]) != bytes(truth[i])
    else:
        assert np.array_equal(digests, truth)
    # no overwrite without --force; --force replaces it
    before = file_digest(out)
    line_err = one_error_line(cbt("show", vault, point, "--manifest", "os", "-o", out, env=env))
    assert "exists" in line_err and "--force" in line_err and file_digest(out) == before
    cbt_json("show", vault, point, "--manifest", "os", "-o", out, "--force", env=env)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    # against a scan -o manifest of the same image: identical when the ids are plain BLAKE3
    scanned = tmp_path / "scan.arrow"
    cbt_json("scan", disk, "--block-size", "16K", "-o", scanned)
    r = cbt("diff", out, scanned)
    if encrypted:
        line_err = one_error_line(r)
        assert "blake3-keyed" in line_err and "cannot be compared" in line_err
        one_error_line(cbt("diff", scanned, out))
        one_error_line(cbt("diff", out, disk))  # an image hashes with plain BLAKE3
        r = cbt("diff", out, out)  # two exports of one vault compare
        assert r.returncode == 0 and "identical" in r.stdout, r.stderr
    else:
        assert r.returncode == 0 and "identical" in r.stdout, r.stderr


def test_show_manifest_refuses_bad_requests(tmp_path: Path, pw: Path, disk: Path) -> None:
    vault = tmp_path / "v"
    init_encrypted(vault, pw)
    env = {"CBT_PASSWORD_FILE": str(pw)}
    point = backup_cli(vault, "web", f"os={disk}", env=env)["recovery_point"]
    out = tmp_path / "m.arrow"
    assert "no disk" in one_error_line(cbt("show", vault, point, "--manifest", "nope", "-o",
                                           out, env=env))
    one_error_line(cbt("show", vault, point, "--manifest", "os", env=env))
    one_error_line(cbt("show", vault, point, "-o", out, env=env))
    assert one_error_line(cbt("show", vault, point, "--manifest", "os", "-o", out)).endswith(
        "or run on a terminal to be asked")
    assert not out.exists()


# -- the commands of a configuration ----------------------------------------------------------


def _config(tmp_path: Path, disk: Path) -> Path:
    from helpers.jobs import job_config

    return job_config(tmp_path / "cbt.toml", {"web": {"disks": {"os": str(disk)},
                                                      "snapshot": "none"}}, vault="v")


def test_config_commands_refuse_a_wrong_passphrase(tmp_path: Path, pw: Path, disk: Path) -> None:
    init_encrypted(tmp_path / "v", pw)
    cfg = _config(tmp_path, disk)
    before = tree_snapshot(tmp_path / "v")
    wrong = password_file(tmp_path / "wrong", "not it")
    env = {"CBT_PASSWORD_FILE": str(pw)}  # --password-file beats it
    r = cbt("backup", "--config", cfg, "--password-file", wrong, env=env)
    assert r.returncode == 2 and "wrong passphrase" in r.stderr, r.stderr
    r = cbt("run-due", "--config", cfg, "--now", "2026-01-01T03:00:00Z", "--password-file",
            wrong, env=env)
    assert r.returncode == 2 and "wrong passphrase" in r.stderr, r.stderr
    line = one_error_line(cbt("prune", "--config", cfg, "--password-file", wrong, env=env))
    assert line == "cbt: error: wrong passphrase"
    assert tree_snapshot(tmp_path / "v") == before


def test_config_commands_take_the_password_file(tmp_path: Path, pw: Path, disk: Path) -> None:
    init_encrypted(tmp_path / "v", pw)
    cfg = _config(tmp_path, disk)
    r = cbt("backup", "--config", cfg, "--now", "2026-01-01T00:00:00Z", "--password-file", pw,
            "--json")
    assert r.returncode == 0, r.stderr
    r = cbt("run-due", "--config", cfg, "--now", "2026-01-02T03:00:00Z", "--password-file", pw,
            "--json")
    assert r.returncode == 0, r.stderr
    points = cbt_json("list", tmp_path / "v", "--password-file", pw)["points"]
    assert len(points) == 2
    assert cbt_json("prune", "--config", cfg, "--dry-run", "--password-file", pw,
                    "--now", "2026-01-03T00:00:00Z")["points"]

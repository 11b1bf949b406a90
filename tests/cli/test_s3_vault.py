"""Vaults at ``s3://BUCKET/PREFIX`` through the command line, against a real S3 server.

One SeaweedFS server for the module (tests/helpers/s3.py); each test takes its own
bucket.  Where the server is and who cbt is come only from the standard ``AWS_*``
variables the server gives.
"""

from __future__ import annotations

import os
from pathlib import Path

from helpers import MIB
from helpers.cli import cbt, cbt_json, one_error_line, result_lines
from helpers.images import assert_same_bytes, write_at, write_random_disk
from helpers.s3 import S3Server, fresh_bucket
from helpers.vaults import PASSWORD


def run_json(*args: object, env: dict[str, str]) -> dict[str, object]:
    return cbt_json(*args, env=env)


def test_the_whole_cycle_on_s3(env: dict[str, str], tmp_path: Path) -> None:
    """init (a missing bucket made; encrypted by default), backup twice, list, show, diff,
    verify --data, restore bit for bit, gc: all at s3://."""
    vault = f"s3://{fresh_bucket()}/vaults/web"
    made = run_json("init", vault, "--kdf-log-n", "10", env=env)
    assert made["vault"] == vault and made["format_version"] == 3, made
    assert made["encryption"] != "none" and made["key"], made
    disk = write_random_disk(tmp_path / "os.img", 4 * MIB, seed=1)
    truth1 = tmp_path / "truth1.img"
    truth1.write_bytes(disk.read_bytes())
    p1 = run_json("backup", vault, "--vm", "web", f"os={disk}", env=env)
    assert p1["type"] == "point", p1
    write_at(disk, MIB, b"\x5a" * 65536)
    p2 = run_json("backup", vault, "--vm", "web", f"os={disk}", env=env)
    assert p2["recovery_point"] != p1["recovery_point"], p2
    listed = run_json("list", vault, env=env)
    assert [p["recovery_point"] for p in listed["points"]] == [p1["recovery_point"],
                                                             p2["recovery_point"]]
    assert listed["points"][1]["parent"] == p1["recovery_point"], listed
    shown = run_json("show", vault, "web.latest", env=env)
    assert shown["recovery_point"] == p2["recovery_point"], shown
    r = cbt("diff", f"{vault}::{p1['recovery_point']}", f"{vault}::{p2['recovery_point']}",
            "--json", env=env)
    assert r.returncode == 1, r.stderr  # they differ
    changed = result_lines(r.stdout)[-1]
    assert changed["changed_bytes"] > 0, changed
    verified = run_json("verify", vault, "--data", env=env)
    assert verified["problems"] == [] and verified["data"] is True, verified
    for point, truth in ((p1, truth1), (p2, disk)):
        out = tmp_path / f"out-{point['recovery_point']}"
        run_json("restore", vault, point["recovery_point"], "--to", out, env=env)
        assert_same_bytes(out / "os.img", truth)
    run_json("gc", vault, "--grace", "0", env=env)
    assert run_json("verify", vault, "--data", env=env)["problems"] == []


def test_a_config_file_naming_s3(env: dict[str, str], tmp_path: Path) -> None:
    """``vault = "s3://..."``: backup --config, jobs, prune --config, run through s3://."""
    vault = f"s3://{fresh_bucket()}/v"
    run_json("init", vault, "--kdf-log-n", "10", env=env)
    disk = write_random_disk(tmp_path / "os.img", 2 * MIB, seed=2)
    cfg = tmp_path / "cbt.toml"
    cfg.write_text(f'vault = "{vault}"\n[policy.p]\nschedule = "daily 02:00"\n'
                   'retention = { daily = 1 }\n'
                   f'[vm.web]\npolicy = "p"\nsnapshot = "none"\ndisks = {{ os = "{disk}" }}\n')
    checked = run_json("config", "check", cfg, env=env)
    assert checked["vault"] == vault, checked
    ids = []
    for day in ("2026-01-01T02:00:00Z", "2026-01-02T02:00:00Z"):
        r = cbt("backup", "--config", cfg, "--now", day, "--json", env=env)
        assert r.returncode == 0, r.stderr
        ids += [ln["recovery_point"] for ln in result_lines(r.stdout) if ln.get("type") == "point"]
    assert len(ids) == 2, ids
    r = cbt("run-due", "--config", cfg, "--now", "2026-01-03T03:00:00Z", "--json", env=env)
    assert r.returncode == 0, r.stderr
    ids += [ln["recovery_point"] for ln in result_lines(r.stdout) if ln.get("type") == "point"]
    assert len(ids) == 3, (ids, r.stdout)
    jobs = run_json("jobs", vault, env=env)
    assert len(jobs["jobs"]) == 3, jobs
    pruned = run_json("prune", "--config", cfg, "--now", "2026-01-03T04:00:00Z", env=env)
    assert [p["recovery_point"] for p in pruned["points"] if not p["keep"]] == ids[:2], pruned
    listed = run_json("list", vault, env=env)
    assert [p["recovery_point"] for p in listed["points"]] == [ids[2]], listed
    run_json("gc", vault, "--grace", "0", env=env)
    out = tmp_path / "out"
    run_json("restore", vault, ids[2], "--to", out, env=env)
    assert_same_bytes(out / "os.img", disk)


def test_key_commands_on_s3(env: dict[str, str], tmp_path: Path) -> None:
    vault = f"s3://{fresh_bucket()}/k"
    run_json("init", vault, "--kdf-log-n", "10", env=env)
    other = tmp_path / "other"
    other.write_text("another passphrase\n")
    added = run_json("key", "add", vault, "--new-password-file", other, "--kdf-log-n", "10",
                     env=env)
    keys = run_json("key", "list", vault, env=env)
    assert len(keys["keys"]) == 2, keys
    assert added["vault"] == vault, added


# -- errors: one clear line, non-zero exit -----------------------------------------------------


def test_a_missing_bucket_is_named(env: dict[str, str]) -> None:
    bucket = fresh_bucket()
    for argv in (("list", f"s3://{bucket}/v"), ("verify", f"s3://{bucket}/v")):
        msg = one_error_line(cbt(*argv, env=env))
        assert f"bucket s3://{bucket} does not exist" in msg, msg


def test_credentials_that_may_not_make_the_bucket_are_named(env: dict[str, str],
                                                            s3: S3Server) -> None:
    bucket = fresh_bucket()
    msg = one_error_line(cbt("init", f"s3://{bucket}/v", "--encryption", "none",
                             env={**env, **s3.limited_env}))
    assert f"cannot create bucket s3://{bucket}: the credentials do not allow it" in msg, msg
    run_json("init", f"s3://{bucket}/v", "--encryption", "none", env=env)  # an admin's
    made = run_json("init", f"s3://{bucket}/w", "--encryption", "none",
                    env={**env, **s3.limited_env})  # the bucket is there: no need to make it
    assert made["vault"] == f"s3://{bucket}/w", made


def test_wrong_credentials_are_named(env: dict[str, str]) -> None:
    vault = f"s3://{fresh_bucket()}/v"
    run_json("init", vault, "--encryption", "none", env=env)
    for argv in (("list", vault), ("init", f"s3://{fresh_bucket()}/w", "--encryption", "none")):
        msg = one_error_line(cbt(*argv, env={**env, "AWS_SECRET_ACCESS_KEY": "wrong"}))
        assert "s3://" in msg and "403" in msg and "check the AWS credentials" in msg, msg


def test_an_endpoint_that_refuses_is_named(env: dict[str, str]) -> None:
    bucket = fresh_bucket()
    for argv in (("list", f"s3://{bucket}/v"),
                 ("init", f"s3://{bucket}/v", "--encryption", "none")):
        msg = one_error_line(cbt(*argv, env={**env, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"},
                                 timeout=120))
        assert f"s3://{bucket}" in msg and "cannot reach the S3 endpoint" in msg, msg


def test_half_a_set_of_credentials_is_refused(env: dict[str, str]) -> None:
    half = {k: v for k, v in env.items() if k != "AWS_SECRET_ACCESS_KEY"}
    msg = one_error_line(cbt("list", f"s3://{fresh_bucket()}/v", env=half))
    assert "AWS_ACCESS_KEY_ID is set without AWS_SECRET_ACCESS_KEY" in msg, msg


def test_copy_both_ways_and_between_buckets(env: dict[str, str], tmp_path: Path) -> None:
    """directory -> S3, S3 -> another bucket, S3 -> directory: each restores bit for bit,
    sends only what DST lacks, and says where the point came from (show, list --json)."""
    local = tmp_path / "local"
    run_json("init", local, "--kdf-log-n", "10", env=env)
    disk = write_random_disk(tmp_path / "os.img", 3 * MIB, seed=5)
    point = run_json("backup", local, "--vm", "web", f"os={disk}", env=env)["recovery_point"]
    one, two = f"s3://{fresh_bucket()}/one", f"s3://{fresh_bucket()}/two/x"
    back = tmp_path / "back"
    for vault in (one, two, back):
        run_json("init", vault, "--kdf-log-n", "10", env=env)
    pw = env["CBT_PASSWORD_FILE"]
    for src, dst in ((local, one), (one, two), (two, back)):
        r = cbt("copy", src, dst, "--to-password-file", pw, "--json", env=env)
        assert r.returncode == 0, r.stderr
        summary = result_lines(r.stdout)[-1]
        assert summary["points_copied"] == 1 and summary["bytes_sent"] > 0, summary
        again = result_lines(cbt("copy", src, dst, "--to-password-file", pw, "--json",
                                 env=env).stdout)[-1]
        assert again["points_skipped"] == 1 and again["bytes_sent"] == 0, again
        shown = run_json("show", dst, point, env=env)
        listed = run_json("list", dst, env=env)["points"]
        assert shown["copied_from"] == listed[0]["copied_from"] == _vault_id(src, env), shown
        text = cbt("show", dst, point, env=env).stdout
        assert f"copied from vault {shown['copied_from']}" in text, text
        out = tmp_path / f"out-{len(list(tmp_path.iterdir()))}"
        run_json("restore", dst, point, "--to", out, env=env)
        assert_same_bytes(out / "os.img", disk)
    assert run_json("list", local, env=env)["points"][0]["copied_from"] is None


def _vault_id(vault: object, env: dict[str, str]) -> str:
    """The id in a vault's config (the one copies name), read through the API."""
    from cbt.repo.vault import Vault

    saved = dict(os.environ)
    os.environ.update(env)
    try:
        return str(Vault.open(str(vault), PASSWORD.encode()).config["id"])
    finally:
        os.environ.clear()
        os.environ.update(saved)

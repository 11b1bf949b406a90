"""Folder markers in the bucket: ``p/``, ``p/packs/``... (zero-byte objects whose key
ends with ``/``), as a console's "create folder", ``pyarrow.fs``, a file-system view
of the bucket or a tool copying a directory vault in make them.  The client lists
them without their ``/``: the prefix's own marker was "a key outside the prefix",
and every command on the vault failed.  And prefixes inside a vault's own: no new
vault there.  Against the real server.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs
from helpers import MIB
from helpers.cli import cbt, cbt_json, one_error_line
from helpers.images import assert_same_bytes, write_random_disk
from helpers.s3 import REGION, S3Server, fresh_bucket


def _folders(s3: S3Server, bucket: str, *keys: str) -> None:
    """Folder markers made as a client makes them (``KEY/``, empty)."""
    fs = pafs.S3FileSystem(access_key=s3.access_key, secret_key=s3.secret_key,
                           region=REGION, endpoint_override=s3.endpoint.split("://")[1],
                           scheme="http")
    for key in keys:
        fs.create_dir(f"{bucket}/{key}", recursive=False)


def test_folder_markers_are_no_objects(s3: S3Server, env: dict[str, str],
                                       tmp_path: Path) -> None:
    bucket = fresh_bucket()
    vault = f"s3://{bucket}/p"
    cbt_json("init", f"s3://{bucket}/other", "--kdf-log-n", "10", env=env)  # (the bucket)
    _folders(s3, bucket, "p")  # made in a console before cbt init: still empty
    cbt_json("init", vault, "--kdf-log-n", "10", env=env)
    disk = write_random_disk(tmp_path / "os.img", MIB, seed=11)
    p1 = cbt_json("backup", vault, "--vm", "web", f"os={disk}", env=env)
    _folders(s3, bucket, "p/packs", "p/points", "p/index", "p/trash", "p/keys",
             "p/packs/zz", "p/manifests")
    listed = cbt_json("list", vault, env=env)
    assert [p["recovery_point"] for p in listed["points"]] == [p1["recovery_point"]], listed
    assert cbt_json("verify", vault, "--data", env=env)["problems"] == []
    write_random_disk(disk, MIB, seed=12)
    p2 = cbt_json("backup", vault, "--vm", "web", f"os={disk}", env=env)
    cbt_json("gc", vault, "--grace", "0", env=env)
    out = tmp_path / "out"
    cbt_json("restore", vault, p2["recovery_point"], "--to", out, env=env)
    assert_same_bytes(out / "os.img", disk)


def test_no_vault_inside_another(env: dict[str, str], tmp_path: Path) -> None:
    """A vault at s3://b/manifests/x inside the vault at s3://b: the outer one's next
    backup removed the inner one's objects (manifests no point of its owns)."""
    bucket = fresh_bucket()
    cbt_json("init", f"s3://{bucket}", "--kdf-log-n", "10", env=env)
    cbt_json("init", f"s3://{bucket}-2/a/v", "--kdf-log-n", "10", env=env)
    for inner, outer in ((f"s3://{bucket}/manifests/x", f"s3://{bucket}"),
                         (f"s3://{bucket}-2/a/v/inner", f"s3://{bucket}-2/a/v")):
        line = one_error_line(cbt("init", inner, "--kdf-log-n", "10", env=env))
        assert f"is inside the vault {outer} " in line, line
    cbt_json("init", f"s3://{bucket}-2/a/w", "--kdf-log-n", "10", env=env)  # (beside it)

"""What cbt writes locally (restore's --to, show's and scan's -o) is never a URL: ``--to
s3://b/x`` made a folder ``s3:`` here and restored into it, silently (the bug the S3
issue began with, for init)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import MIB
from helpers.cli import cbt, cbt_json, one_error_line
from helpers.images import write_random_disk


@pytest.mark.parametrize("args", [
    ("restore", "{v}", "web.latest", "--to", "s3://bucket/x"),
    ("restore", "{v}", "web.latest", "--disk", "os", "--to", "S3://bucket/x.img"),
    ("show", "{v}", "web.latest", "--manifest", "os", "-o", "s3://bucket/m.arrow"),
    ("scan", "{disk}", "-o", "file://m.arrow"),
])
def test_a_url_is_no_local_output(tmp_path: Path, args: tuple[str, ...]) -> None:
    v = tmp_path / "v"
    disk = write_random_disk(tmp_path / "os.img", MIB, seed=41)
    cbt_json("init", v, "--encryption", "none")
    cbt_json("backup", v, "--vm", "web", f"os={disk}")
    before = sorted(p.name for p in tmp_path.iterdir())
    r = cbt(*[a.format(v=v, disk=disk) for a in args], cwd=tmp_path)
    assert "is a URL" in one_error_line(r)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # (no folder s3: made)


@pytest.mark.parametrize("prefix", ["x\x1b]0;title\x07y", "a\u200bb\u0085", "p" * 600])
def test_an_s3_prefix_with_control_characters_or_too_long(tmp_path: Path, prefix: str) -> None:
    """Refused before any request, quoted (a config file's vault is untrusted: its
    control characters reached the terminal raw in the client's error line)."""
    r = cbt("list", f"s3://bucket/{prefix}", cwd=tmp_path,
            env={"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "k",
                 "AWS_SECRET_ACCESS_KEY": "s"})
    line = one_error_line(r)
    assert "invalid S3 prefix" in line and "\x1b" not in line and "\x85" not in line, line

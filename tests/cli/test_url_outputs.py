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

"""The command line as scripts see it: a separate process, its output and exit code.

Conventions under test (DESIGN.md, issue 2): exit 0 success, 1 differences
found (diff), 2 errors; an error is exactly one line on stderr with no
traceback, and with ``--json`` also ``{"type":"error","message":...}`` on stdout;
``--json`` prints exactly the keys the issue lists.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from helpers.cli import cbt as run_cli
from helpers.images import SparseImage
from helpers.images import read as read_image
from helpers.shapes import DIFF_KEYS, SCAN_KEYS
from helpers.system import need
from helpers.truth import HOLE, ZERO, fs_has_page_holes, truth_diff

import cbt
from cbt.format.manifest import Manifest

KIB = 1024
MIB = 1024 * KIB


@pytest.fixture
def image(tmp_path: Path) -> SparseImage:
    """A 2 MiB + 300 byte sparse image: data, written zeros, a hole, a short tail."""
    need(fs_has_page_holes(tmp_path), f"no 4 KiB holes on the file system of {tmp_path}")
    d = tmp_path / "work"
    d.mkdir()
    img = SparseImage(d / "disk.img", 2 * MIB + 300)
    img.write_random(0, 512 * KIB, seed=1)
    img.write(512 * KIB, bytes(256 * KIB))
    img.write_random(MIB + 4 * KIB, 10, seed=2)  # a few bytes inside a 64K block
    img.write_random(2 * MIB - 100, 400, seed=3)
    return img


def listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def assert_error(r: subprocess.CompletedProcess[str], as_json: bool = False,
                 mentions: tuple[str, ...] = ()) -> None:
    """Exit 2, exactly one line on stderr, no traceback; the JSON error with --json."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    assert r.stderr.endswith("\n") and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.strip(), "the error line is empty"
    for text in mentions:
        assert text in r.stderr, (text, r.stderr)
    if as_json:
        lines = r.stdout.splitlines()
        assert len(lines) == 1, r.stdout
        obj = json.loads(lines[0])
        assert obj["type"] == "error"
        assert isinstance(obj["message"], str) and obj["message"]
        assert "\n" not in obj["message"]
    else:
        assert r.stdout == ""


# -- help -----------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["--help"], ["scan", "--help"], ["diff", "--help"],
                                  ["demo", "--help"], ["-h"]])
def test_help(args: list[str]) -> None:
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert "usage:" in r.stdout
    assert r.stderr == ""


def test_every_subcommand_documents_json_and_exit_codes() -> None:
    top = run_cli("--help").stdout
    for cmd in ("scan", "diff", "demo"):
        assert cmd in top
        assert "--json" in run_cli(cmd, "--help").stdout
    assert "Exit code" in top


def test_version() -> None:
    r = run_cli("--version")
    assert r.returncode == 0
    assert cbt.__version__ in r.stdout
    from cbt.core.native import fast

    assert f"BLAKE3 kernel: {fast.kernel}" in r.stdout


def test_version_says_why_a_forced_kernel_does_not_run() -> None:
    import os
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "cbt.cli.main", "--version"], capture_output=True,
                       text=True, env={**os.environ, "CBT_KERNEL": "bogus"}, timeout=60)
    assert r.returncode == 0, r
    assert "BLAKE3 kernel: none: CBT_KERNEL=bogus: unknown BLAKE3 kernel 'bogus'" in r.stdout


# -- scan --------------------------------------------------------------------------------


@pytest.mark.parametrize("bs", [None, 4 * KIB, MIB])
def test_scan_json(image: SparseImage, bs: int | None) -> None:
    d = image.path.parent
    before = listing(d)
    args = ["scan", "--json", "disk.img"] + (["--block-size", f"{bs // KIB}K"] if bs else [])
    r = run_cli(*args, cwd=d)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert len(r.stdout.splitlines()) == 1
    out = json.loads(r.stdout)
    assert set(out) == SCAN_KEYS
    block = bs or 64 * KIB
    _, flags, read = image.expected(block)
    assert out["path"] == str(image.path.absolute())
    assert out["size"] == image.size
    assert out["block_size"] == block
    assert out["blocks"] == len(flags) == -(-image.size // block)
    assert out["data_blocks"] == int((flags == 0).sum())
    assert out["zero_blocks"] == int((flags == ZERO).sum())
    assert out["hole_blocks"] == int((flags == HOLE).sum())
    assert out["bytes_read"] == read
    assert isinstance(out["seconds"], float) and out["seconds"] >= 0
    assert out["warnings"] == []
    assert listing(d) == before  # without -o nothing is written


@pytest.mark.parametrize(("text", "value"), [("4K", 4096), ("4096", 4096), ("64k", 65536),
                                           ("65536", 65536), ("1M", MIB), ("4M", 4 * MIB)])
def test_size_strings(text: str, value: int) -> None:
    assert cbt.parse_size(text) == value


@pytest.mark.parametrize("text", ["65536", "1M"])
def test_block_size_in_bytes_or_units(image: SparseImage, text: str) -> None:
    r = run_cli("scan", "--json", "--block-size", text, image.path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["block_size"] == cbt.parse_size(text)


def test_scan_json_counts_are_nontrivial(image: SparseImage) -> None:
    """The fixture exercises every flag at 4K, so the counts above mean something."""
    _, flags, _ = image.expected(4 * KIB)
    assert {0, ZERO, HOLE} <= set(flags.tolist())


@pytest.mark.parametrize("workers", ["1", "2"])
def test_scan_output_writes_only_the_manifest(image: SparseImage, workers: str) -> None:
    d = image.path.parent
    r = run_cli("scan", "--block-size", "4K", "--workers", workers, "-o", "disk.arrow",
                "disk.img", cwd=d)
    assert r.returncode == 0, r.stderr
    assert listing(d) == ["disk.arrow", "disk.img"]  # and no temporary file left
    m = Manifest.read(d / "disk.arrow")
    digests, flags, _ = image.expected(4 * KIB)
    assert np.array_equal(m.digests, digests)
    assert np.array_equal(m.flags, flags)
    assert m.disk_size == image.size
    assert pa.ipc.open_file(str(d / "disk.arrow")).read_all().num_rows == len(flags)


def test_scan_output_with_json(image: SparseImage, tmp_path: Path) -> None:
    out = tmp_path / "m.arrow"
    r = run_cli("scan", "--json", "-o", out, image.path)
    assert r.returncode == 0, r.stderr
    assert set(json.loads(r.stdout)) == SCAN_KEYS
    assert Manifest.read(out).disk_size == image.size


def test_scan_human_output(image: SparseImage) -> None:
    r = run_cli("scan", image.path)
    assert r.returncode == 0
    assert str(image.path) in r.stdout
    assert r.stderr == ""  # no progress bar when stderr is not a terminal


def test_scan_output_into_missing_directory(image: SparseImage, tmp_path: Path) -> None:
    r = run_cli("scan", "-o", tmp_path / "nope" / "m.arrow", image.path)
    assert_error(r)
    assert not (tmp_path / "nope").exists()


def test_failed_scan_writes_nothing(tmp_path: Path) -> None:
    d = tmp_path / "w"
    d.mkdir()
    r = run_cli("scan", "-o", "m.arrow", "missing.img", cwd=d)
    assert_error(r, mentions=("missing.img",))
    assert listing(d) == []


# -- diff ---------------------------------------------------------------------------------


def _pair(image: SparseImage) -> tuple[Path, Path]:
    b = image.path.with_name("b.img")
    data = bytearray(image.content.tobytes())
    data[64 * KIB - 2:64 * KIB + 2] = b"\x07" * 4  # straddles two 64K blocks
    data[MIB + 4 * KIB] ^= 0xFF
    data += b"tail"
    b.write_bytes(bytes(data))
    return image.path, b


def test_diff_exit_codes_and_json(image: SparseImage) -> None:
    a, b = _pair(image)
    same = run_cli("diff", "--json", a, a)
    assert same.returncode == 0, same.stderr
    want_same = truth_diff(read_image(a), read_image(a), 64 * KIB)
    assert json.loads(same.stdout) == want_same
    differ = run_cli("diff", "--json", a, b)
    assert differ.returncode == 1, differ.stderr
    out = json.loads(differ.stdout)
    assert set(out) == DIFF_KEYS
    assert out == truth_diff(read_image(a), read_image(b), 64 * KIB)
    assert out["size_b"] == out["size_a"] + 4
    assert len(out["ranges"]) == 3


@pytest.mark.slow
def test_diff_human_output_and_ranges(image: SparseImage) -> None:
    a, b = _pair(image)
    want = truth_diff(read_image(a), read_image(b), 4 * KIB)
    r = run_cli("diff", "--block-size", "4K", "--ranges", a, b)
    assert r.returncode == 1
    listed = [[int(v) for v in line.split()] for line in r.stdout.splitlines()
              if len(line.split()) == 2 and all(v.isdigit() for v in line.split())]
    assert listed == want["ranges"]
    plain = run_cli("diff", "--block-size", "4K", a, b)
    assert plain.returncode == 1
    assert plain.stdout.strip() and len(plain.stdout.splitlines()) < len(r.stdout.splitlines())
    same = run_cli("diff", a, a)
    assert same.returncode == 0 and same.stdout.strip()


@pytest.mark.slow
def test_diff_manifest_and_image(image: SparseImage, tmp_path: Path) -> None:
    a, b = _pair(image)
    ma = tmp_path / "a.arrow"
    assert run_cli("scan", "--block-size", "4K", "-o", ma, a).returncode == 0
    r = run_cli("diff", "--json", ma, b)
    assert r.returncode == 1
    assert json.loads(r.stdout) == truth_diff(read_image(a), read_image(b), 4 * KIB)
    r = run_cli("diff", "--json", "--block-size", "1M", ma, a)  # the manifest's 4K wins
    assert r.returncode == 0
    out = json.loads(r.stdout)
    assert out["block_size"] == 4 * KIB and len(out["warnings"]) == 1


def test_diff_warning_is_one_line_on_stderr(image: SparseImage, tmp_path: Path) -> None:
    a, b = _pair(image)
    ma = tmp_path / "a.arrow"
    cbt.scan(a, 4 * KIB).write(ma)
    r = run_cli("diff", "--block-size", "1M", ma, b)
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and "warning" in lines[0] and "4K" in lines[0], r.stderr


def test_progress_only_on_a_terminal(image: SparseImage) -> None:
    """With stderr on a terminal a progress bar may go there; stdout stays clean JSON."""
    import pty
    import select

    controller, terminal = pty.openpty()
    try:
        try:
            proc = subprocess.run([sys.executable, "-m", "cbt.cli.main", "scan", "--json",
                                   image.path], stdout=subprocess.PIPE, stderr=terminal,
                                  text=True, timeout=60, check=False)
        finally:
            os.close(terminal)
        seen = b""
        while select.select([controller], [], [], 0.5)[0]:
            try:
                chunk = os.read(controller, 1 << 16)
            except OSError:  # EIO: the terminal's other end is closed
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(controller)
    assert proc.returncode == 0
    assert set(json.loads(proc.stdout)) == SCAN_KEYS
    assert b"Traceback" not in seen


# -- every bad input: exit 2, one line -------------------------------------------------------


def _unreadable(tmp_path: Path) -> Path:
    """A path that exists but cannot be opened for reading, even by root."""
    if os.geteuid() != 0:
        p = tmp_path / "secret.img"
        if not p.exists():
            p.write_bytes(b"x" * 100)
            p.chmod(0)
        return p
    p = Path("/proc/sys/vm/drop_caches")  # write-only, for root too
    try:
        os.close(os.open(p, os.O_RDONLY))
    except OSError:
        return p
    need(False, "no path here that root cannot read")
    raise AssertionError  # unreachable


def _manifest(tmp_path: Path, bs: str) -> Path:
    img = tmp_path / f"m{bs}.img"
    if not img.exists():
        img.write_bytes(np.random.default_rng(1).integers(0, 256, 300_000, np.uint8).tobytes())
    out = tmp_path / f"m{bs}.arrow"
    cbt.scan(img, cbt.parse_size(bs), workers=1).write(out)
    return out


def _truncated_manifest(tmp_path: Path) -> Path:
    m = _manifest(tmp_path, "4K")
    raw = m.read_bytes()
    m.write_bytes(raw[:len(raw) // 2])
    assert m.read_bytes().startswith(b"ARROW1")
    return m


def _garbage_manifest(tmp_path: Path) -> Path:
    p = tmp_path / "garbage.arrow"
    p.write_bytes(b"ARROW1" + bytes(range(256)) * 4)
    return p


def _non_utf8_manifest(tmp_path: Path) -> Path:
    """A manifest whose metadata was altered into bytes that are not UTF-8."""
    table = pa.ipc.open_file(str(_manifest(tmp_path, "4K"))).read_all()
    meta = dict(table.schema.metadata)
    meta[b"cbt.source"] = b"\xff\xfe" + meta[b"cbt.source"]
    table = table.replace_schema_metadata(meta)
    p = tmp_path / "latin.arrow"
    with pa.OSFile(str(p), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    return p


def _image(tmp_path: Path) -> Path:
    p = tmp_path / "ok.img"
    p.write_bytes(b"\x01" * 10_000)
    return p


# name -> (args given the tmp dir, texts the message must contain)
BadCase = Callable[[Path], tuple[list[object], tuple[str, ...]]]
BAD_DIFF: dict[str, BadCase] = {
    "missing-file": lambda t: ([t / "missing.img", _image(t)], ("missing.img",)),
    "missing-second": lambda t: ([_image(t), t / "missing.img"], ("missing.img",)),
    "directory": lambda t: ([t, _image(t)], (str(t),)),
    "unreadable": lambda t: ([_unreadable(t), _image(t)], (str(_unreadable(t)),)),
    "char-device": lambda t: (["/dev/null", _image(t)], ("/dev/null",)),
    "truncated-manifest": lambda t: ([_truncated_manifest(t), _image(t)], ("m4K.arrow",)),
    "garbage-manifest": lambda t: ([_image(t), _garbage_manifest(t)], ("garbage.arrow",)),
    "non-utf8-manifest": lambda t: ([_non_utf8_manifest(t), _image(t)], ("latin.arrow",)),
    "two-block-sizes": lambda t: ([_manifest(t, "4K"), _manifest(t, "64K")], ()),
    "block-size-5000": lambda t: ([_image(t), _image(t), "--block-size", "5000"], ("5000",)),
    "block-size-abc": lambda t: ([_image(t), _image(t), "--block-size", "abc"], ("abc",)),
    "block-size-2K": lambda t: ([_image(t), _image(t), "--block-size", "2K"], ()),
    "block-size-8M": lambda t: ([_image(t), _image(t), "--block-size", "8M"], ()),
    "workers-0": lambda t: ([_image(t), _image(t), "--workers", "0"], ()),
    "one-argument": lambda t: ([_image(t)], ()),
}
BAD_SCAN: dict[str, BadCase] = {
    "missing-file": lambda t: ([t / "missing.img"], ("missing.img",)),
    "directory": lambda t: ([t], (str(t),)),
    "unreadable": lambda t: ([_unreadable(t)], (str(_unreadable(t)),)),
    "char-device": lambda t: (["/dev/null"], ("/dev/null",)),
    "block-size-5000": lambda t: ([_image(t), "--block-size", "5000"], ("5000",)),
    "block-size-abc": lambda t: ([_image(t), "--block-size", "abc"], ("abc",)),
    "no-image": lambda t: ([], ()),
}


@pytest.mark.parametrize("as_json", [False, True], ids=["human", "json"])
@pytest.mark.parametrize("case", list(BAD_DIFF))
def test_diff_bad_input(tmp_path: Path, case: str, as_json: bool) -> None:
    args, mentions = BAD_DIFF[case](tmp_path)
    r = run_cli("diff", *args, *(["--json"] if as_json else []))
    assert_error(r, as_json, mentions)


@pytest.mark.parametrize("as_json", [False, True], ids=["human", "json"])
@pytest.mark.parametrize("case", list(BAD_SCAN))
def test_scan_bad_input(tmp_path: Path, case: str, as_json: bool) -> None:
    args, mentions = BAD_SCAN[case](tmp_path)
    r = run_cli("scan", *args, *(["--json"] if as_json else []))
    assert_error(r, as_json, mentions)


@pytest.mark.parametrize("cmd", ["scan", "diff"])
def test_fifo_is_refused_not_waited_on(tmp_path: Path, cmd: str) -> None:
    """A named pipe is not a disk: refuse it at once instead of blocking in open()."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    args = [fifo] if cmd == "scan" else [fifo, _image(tmp_path)]
    try:
        r = run_cli(cmd, *args, timeout=5)
    except subprocess.TimeoutExpired:
        pytest.fail(f"cbt {cmd} on a FIFO hung (still blocked after 5 s)")
    assert_error(r, mentions=(str(fifo),))


def test_unmappable_file_error_names_the_path() -> None:
    """A sysfs attribute opens and has a size but cannot be mapped: say which file."""
    path = Path("/sys/kernel/uevent_seqnum")
    need(path.is_file(), f"{path} is not here")
    r = run_cli("scan", path)
    assert_error(r, mentions=(str(path),))
    r = run_cli("diff", path, path)
    assert_error(r, mentions=(str(path),))


def test_bare_command_is_a_usage_error() -> None:
    r = run_cli()
    assert r.returncode == 2
    assert "Traceback" not in r.stderr


# -- demo -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_demo(tmp_path: Path) -> None:
    d = tmp_path / "demo"
    r = run_cli("demo", "--dir", d, "--size", "32M", "--json")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 1
    report = json.loads(r.stdout)
    assert report["agrees_with_truth"] is True
    assert report["warnings"] == []
    days = report["days"]
    assert [x["consistency"] for x in days] == ["application", "crash", "application"]
    assert "pre hook failed (exit 3)" in days[1]["consistency_reason"]
    assert days[0]["bytes_new"] > 0
    # Independently: the restore equals the disks byte for byte ...
    for label in ("os", "db"):
        assert read_image(d / "restored" / f"{label}.img").tobytes() == \
            read_image(d / "disks" / f"{label}.img").tobytes()
    # ... and the diff of days 2 and 3 equals a numpy comparison of their contents.
    by_label = {x["label"]: x for x in report["diff"]["disks"]}
    for label in ("os", "db"):
        bs = by_label[label]["block_size"]
        want = truth_diff(read_image(d / f"day2-{label}.img"),
                          read_image(d / "disks" / f"{label}.img"), bs)
        assert by_label[label]["changed_blocks"] == want["changed_blocks"] > 0
        assert by_label[label]["ranges"] == want["ranges"]
    # The vault the demo leaves behind is encrypted, its passphrase in a private file;
    # opened with it, it verifies clean, data included.
    assert report["password_file"] == str(d / "password")
    assert (d / "password").stat().st_mode & 0o777 == 0o600
    v = run_cli("verify", "--data", d / "vault", "--json",
                env={"CBT_PASSWORD_FILE": report["password_file"]})
    assert v.returncode == 0, v.stderr
    assert json.loads(v.stdout)["problems"] == []


@pytest.mark.slow
def test_demo_human_output(tmp_path: Path) -> None:
    r = run_cli("demo", "--dir", tmp_path / "demo", "--size", "8M")
    assert r.returncode == 0, r.stderr
    assert "all checks passed" in r.stdout
    assert "crash (pre hook failed" in r.stdout


@pytest.mark.parametrize("as_json", [False, True], ids=["human", "json"])
def test_demo_refuses_a_non_empty_directory(tmp_path: Path, as_json: bool) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    r = run_cli("demo", "--dir", tmp_path, "--size", "8M", *(["--json"] if as_json else []))
    assert_error(r, as_json, (str(tmp_path),))
    assert listing(tmp_path) == ["keep.txt"]

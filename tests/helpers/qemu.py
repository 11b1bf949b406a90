"""Real QEMU tools for the tests: images, ``qemu-nbd``, ``qemu-storage-daemon``, ``qemu-io``.

Every server is started by the test and always stopped (killed and reaped in
``finally``); its unix socket lives in the test's ``tmp_path`` (or, where that
path is too long for a socket, a short folder removed afterwards).  The truth
the tests compare with comes from QEMU's own tools: ``qemu-img convert`` for
the bytes, ``qemu-img map`` for the allocation.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from helpers.system import need

QEMU_TOOLS = ("qemu-img", "qemu-io", "qemu-nbd", "qemu-storage-daemon")


def need_qemu(*tools: str) -> None:
    """Skip (fail in CI) without the QEMU tools (``qemu-utils``, ``qemu-system-common``)."""
    for tool in tools or QEMU_TOOLS:
        need(shutil.which(tool) is not None,
             f"needs {tool} (apt-get install qemu-utils qemu-system-common)")


def run(*args: str) -> str:
    r = subprocess.run(args, capture_output=True, text=True, check=False, timeout=60)
    assert r.returncode == 0, f"{' '.join(args)}: {r.stderr.strip()}"
    return r.stdout


def create(path: Path, size: int, fmt: str = "qcow2", cluster: int = 65536) -> Path:
    opts = ["-o", f"cluster_size={cluster}"] if fmt == "qcow2" else []
    run("qemu-img", "create", "-q", "-f", fmt, *opts, str(path), str(size))
    return path


def write(target: str, fmt: str, writes: list[tuple[int, int, int]]) -> None:
    """``qemu-io`` writes ``(offset, length, pattern byte)`` to an image or an NBD URI."""
    cmds: list[str] = []
    for off, n, pattern in writes:
        cmds += ["-c", f"write -P {pattern} {off} {n}"]
    run("qemu-io", "-f", fmt, *cmds, target)


def raw_bytes(image: Path, fmt: str, tmp: Path) -> bytes:
    """The image's disk, byte for byte, as ``qemu-img convert`` sees it."""
    out = tmp / (image.name + ".raw")
    run("qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", str(image), str(out))
    data = out.read_bytes()
    out.unlink()
    return data


def allocated(image: Path, fmt: str) -> list[tuple[int, int]]:
    """Byte ranges ``qemu-img map`` reports as holding data (not a hole), merged."""
    out: list[tuple[int, int]] = []
    for e in json.loads(run("qemu-img", "map", "-U", "-f", fmt, "--output=json", str(image))):
        if not e["data"]:
            continue
        a, b = e["start"], e["start"] + e["length"]
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


@contextlib.contextmanager
def socket_path(tmp_path: Path) -> Iterator[str]:
    """A path for a unix socket (at most 107 bytes), its folder removed afterwards."""
    path = tmp_path / "nbd.sock"
    if len(str(path)) < 100:
        yield str(path)
        return
    short = tempfile.mkdtemp(prefix="cbt-nbd-", dir="/tmp")
    try:
        yield f"{short}/nbd.sock"
    finally:
        shutil.rmtree(short, ignore_errors=True)


def _wait_listening(proc: subprocess.Popen[bytes], sock: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise AssertionError(f"{proc.args!r} exited {proc.returncode}: {err.strip()}")
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(sock)
                return
            except OSError:
                time.sleep(0.02)
    raise AssertionError(f"{proc.args!r} never listened on {sock}")


@contextlib.contextmanager
def server(args: list[str], sock: str) -> Iterator[subprocess.Popen[bytes]]:
    """Run a server until the block ends (then kill it and reap it)."""
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        _wait_listening(proc, sock)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        if proc.stderr:
            proc.stderr.close()
        with contextlib.suppress(FileNotFoundError):
            Path(sock).unlink()


@contextlib.contextmanager
def qemu_nbd(image: Path, sock: str, fmt: str = "qcow2", export: str = "disk",
             bitmap: str | None = None,
             shared: int = 16) -> Iterator[subprocess.Popen[bytes]]:
    """``qemu-nbd`` serving ``image`` read-only to ``shared`` clients at a time."""
    need_qemu("qemu-nbd")
    args = ["qemu-nbd", "--read-only", "--persistent", f"--shared={shared}", f"--socket={sock}",
            f"--format={fmt}", f"--export-name={export}", str(image)]
    if bitmap is not None:
        args[1:1] = [f"--bitmap={bitmap}"]
    with server(args, sock) as proc:
        yield proc


@contextlib.contextmanager
def storage_daemon(image: Path, sock: str, export: str = "disk",
                   bitmaps: tuple[str, ...] = ()) -> Iterator[subprocess.Popen[bytes]]:
    """``qemu-storage-daemon`` with a writable NBD export of a qcow2 and its dirty bitmaps."""
    need_qemu("qemu-storage-daemon")
    exp = {"type": "nbd", "id": "exp0", "node-name": "disk0", "name": export,
           "writable": True, "bitmaps": list(bitmaps)}
    args = ["qemu-storage-daemon",
            "--blockdev", f"driver=file,filename={image},node-name=file0",
            "--blockdev", "driver=qcow2,file=file0,node-name=disk0",
            "--nbd-server", f"addr.type=unix,addr.path={sock},max-connections=16",
            "--export", json.dumps(exp)]
    with server(args, sock) as proc:
        yield proc


def uri(sock: str, export: str = "disk") -> str:
    return f"nbd+unix:///{export}?socket={sock}"


# -- offline qcow2 images (issue 14 part O) ---------------------------------------------------


def image_bitmaps(image: Path) -> dict[str, list[str]]:
    """The image's persistent bitmaps: name -> flags (``auto``, ``in-use``), as
    ``qemu-img info`` says."""
    doc = json.loads(run("qemu-img", "info", "-U", "--output=json", str(image)))
    bitmaps = doc.get("format-specific", {}).get("data", {}).get("bitmaps", [])
    return {b["name"]: sorted(b["flags"]) for b in bitmaps}


def guest_writes(image: Path, seed: int, count: int, size: int,
                 fmt: str = "qcow2") -> list[tuple[int, int, int]]:
    """``count`` writes at random offsets (4 KiB to 200 KiB, 512-byte aligned, random
    pattern bytes) made with ``qemu-io``, as a guest would; returns them."""
    import random

    rnd = random.Random(seed)
    writes = []
    for _ in range(count):
        n = rnd.randrange(8, 400) * 512
        off = rnd.randrange(0, (size - n) // 512) * 512
        writes.append((off, n, rnd.randrange(1, 256)))
    write(str(image), fmt, writes)
    return writes


@contextlib.contextmanager
def held_open(image: Path, fmt: str = "qcow2",
              kill: bool = False) -> Iterator[subprocess.Popen[bytes]]:
    """``qemu-io`` holding ``image`` open for writing (locked, as a running QEMU holds it)
    until the block ends; then it quits (closing the image cleanly), or with ``kill``
    is SIGKILLed; reaped either way."""
    proc = subprocess.Popen(["qemu-io", "-f", fmt, str(image)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"write -P 77 0 512\n")
        proc.stdin.flush()
        _wrote(proc)
        yield proc
        if not kill:
            proc.stdin.write(b"quit\n")
            proc.stdin.flush()
            proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        for f in (proc.stdin, proc.stdout):
            if f is not None:
                f.close()


def kill_while_writing(image: Path, writes: list[tuple[int, int, int]]) -> None:
    """Write to ``image`` through ``qemu-io`` and SIGKILL it with the image open: its
    persistent bitmaps stay marked in use (inconsistent), as after QEMU was killed."""
    with held_open(image, kill=True) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        for off, n, pattern in writes:
            proc.stdin.write(f"write -P {pattern} {off} {n}\n".encode())
            proc.stdin.flush()
            _wrote(proc)


def _wrote(proc: subprocess.Popen[bytes]) -> None:
    """Wait for ``qemu-io``'s answer to a write (its lines up to ``wrote ...``)."""
    assert proc.stdout is not None
    while b"wrote" not in (line := proc.stdout.readline()):
        assert line, "qemu-io exited"


def nbd_servers_of(image: Path) -> list[int]:
    """PIDs of ``qemu-nbd`` processes serving ``image`` (none must outlive a backup)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"qemu-nbd") and (str(image).encode() in argv
                                                       or _holds(d, image)):
            found.append(int(d.name))
    return found


def _holds(proc: Path, image: Path) -> bool:
    """Whether the process ``proc`` (its /proc folder) has ``image`` open (cbt passes
    qemu-nbd the image as an open file, ``/dev/fd/N``)."""
    want = os.path.realpath(image)
    try:
        return any(os.path.realpath(fd) == want for fd in (proc / "fd").iterdir())
    except OSError:
        return False


def cbt_bitmap(vault: str | os.PathLike[str], point: str) -> str:
    """The bitmap point ``point`` of ``vault`` leaves on its disks: ``cbt-<scope>-<point>``,
    the scope from the vault's id and the point's VM (as the jobs name them)."""
    from cbt.source.qemu import bitmap_name, scope_of

    vault_id = json.loads((Path(vault) / "config").read_text())["id"]
    return bitmap_name(point, scope_of(vault_id, point.split(".", 1)[0]))

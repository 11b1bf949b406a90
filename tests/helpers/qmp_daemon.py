"""A real ``qemu-storage-daemon`` for QMP tests: qcow2 disks, a QMP socket, FUSE guest views.

Each disk ``NAME`` is a qcow2 file under the test's directory served as node
``NAME`` and exported writable through FUSE on the regular file ``NAME.guest``:
the test writes there as a guest would (the NBD server is left to cbt).  The
daemon is always stopped (and the FUSE mounts released) when the context ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cbt.source.qemu import QmpSession, bitmap_name, scope_of
from helpers.qemu import create, need_qemu
from helpers.system import need


def need_fuse_qemu() -> None:
    """The QEMU tools, and /dev/fuse for qemu-storage-daemon's FUSE exports."""
    need_qemu("qemu-storage-daemon", "qemu-img", "qemu-io")
    need(os.path.exists("/dev/fuse"), "needs /dev/fuse for qemu-storage-daemon's FUSE export")


@dataclass
class Daemon:
    root: Path
    disks: list[str]
    qmp: Path
    proc: subprocess.Popen[bytes] | None = None
    qmp2: Path | None = None  # a second monitor (a second cbt instance's)

    def image(self, name: str) -> Path:
        return self.root / f"{name}.qcow2"

    def guest(self, name: str) -> Path:
        return self.root / f"{name}.guest"

    def write(self, name: str, offset: int, data: bytes) -> None:
        """Write as the guest would (through the FUSE export), flushed."""
        fd = os.open(self.guest(name), os.O_WRONLY)
        try:
            os.pwrite(fd, data, offset)
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(self, name: str) -> bytes:
        return self.guest(name).read_bytes()

    def bitmaps(self, node: str) -> dict[str, dict[str, Any]]:
        """The named dirty bitmaps of ``node``: name -> what QEMU says of it."""
        with QmpSession(self.qmp) as s:
            for n in s.command("query-named-block-nodes", {"flat": True}):
                if n["node-name"] == node:
                    return {b["name"]: b for b in n.get("dirty-bitmaps", []) if "name" in b}
        raise AssertionError(f"no node {node}")

    def leftovers(self) -> set[str]:
        """What no cbt run may leave in QEMU once done: nodes and exports named ``cbt-...``,
        and any block job."""
        with QmpSession(self.qmp) as s:
            names = {n["node-name"] for n in s.command("query-named-block-nodes", {"flat": True})}
            names |= {e["id"] for e in s.command("query-block-exports")}
            jobs = {j["id"] for j in s.command("query-jobs")}
        return {n for n in names if n.startswith("cbt-")} | jobs

    def start(self) -> None:
        args = ["qemu-storage-daemon"]
        for name in self.disks:
            self.guest(name).touch(exist_ok=True)
            args += ["--blockdev", f"driver=file,node-name={name}-file,filename={self.image(name)}",
                     "--blockdev", f"driver=qcow2,node-name={name},file={name}-file",
                     "--export", f"type=fuse,id={name}-fuse,node-name={name},"
                     f"mountpoint={self.guest(name)},writable=on"]
        args += ["--chardev", f"socket,id=qmp,path={self.qmp},server=on,wait=off",
                 "--monitor", "chardev=qmp"]
        if self.qmp2 is not None:
            args += ["--chardev", f"socket,id=qmp2,path={self.qmp2},server=on,wait=off",
                     "--monitor", "chardev=qmp2"]
        self.proc = subprocess.Popen(args, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while not (self.qmp.exists() and (self.qmp2 is None or self.qmp2.exists())
                   and all(os.path.ismount(self.guest(n)) for n in self.disks)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                self.stop()
                raise RuntimeError(f"qemu-storage-daemon did not start: {err}")
            time.sleep(0.02)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        mounted = Path("/proc/mounts").read_text().split()
        for name in self.disks:
            if str(self.guest(name)) in mounted:  # a killed daemon leaves its FUSE mount
                subprocess.run(["umount", "-l", str(self.guest(name))], check=False,
                               capture_output=True)
        for sock in (self.qmp, self.qmp2):
            if sock is not None:
                with contextlib.suppress(FileNotFoundError):
                    sock.unlink()


def vault_bitmap(vault: Path, point: str, vm: str) -> str:
    """The bitmap a point of ``vm`` in the vault at ``vault`` leaves (scoped by vault and VM)."""
    vault_id = json.loads((vault / "config").read_text())["id"]
    return bitmap_name(point, scope_of(vault_id, vm))


@contextlib.contextmanager
def storage_daemon(root: Path, disks: dict[str, int], *,
                   second_monitor: bool = False) -> Iterator[Daemon]:
    """A started daemon serving fresh qcow2 disks ``name -> size``; always stopped.
    ``second_monitor``: a second QMP socket ``qmp2.sock`` (QEMU serves one client per
    monitor: two cbt instances reading the VM at once need one each)."""
    need_fuse_qemu()
    for name, size in disks.items():
        create(root / f"{name}.qcow2", size)
    d = Daemon(root=root, disks=list(disks), qmp=root / "qmp.sock",
               qmp2=root / "qmp2.sock" if second_monitor else None)
    d.start()
    try:
        yield d
    finally:
        d.stop()


def read_nbd(uri: str, dest: Path) -> bytes:
    """The export's whole content, read by qemu-img (independent of cbt's NBD client)."""
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(dest)], check=True)
    return dest.read_bytes()


def dirty_extents(nbd_socket: Path, export: str, bitmap: str) -> list[tuple[int, int]]:
    """``(offset, length)`` of the regions the exported bitmap calls dirty, by qemu-img map."""
    import json
    opts = (f"driver=nbd,server.type=unix,server.path={nbd_socket},export={export},"
            f"x-dirty-bitmap=qemu:dirty-bitmap:{bitmap}")
    r = subprocess.run(["qemu-img", "map", "--output=json", "--image-opts", opts],
                       check=True, capture_output=True, text=True)
    # with x-dirty-bitmap, qemu-img reports dirty regions as data=false (inverted)
    return [(e["start"], e["length"]) for e in json.loads(r.stdout) if not e["data"]]


# -- the guest agent, on this host, unable to touch it ---------------------------------------

# the only rpcs a host-side qemu-ga may run in the tests: everything else (freeze and
# thaw of THIS machine's file systems, files, exec, shutdown, users...) is blocked
GA_ALLOWED = ("guest-sync-delimited", "guest-sync", "guest-ping", "guest-info",
              "guest-fsfreeze-status")


def qemu_ga_path() -> str:
    """qemu-ga (package qemu-guest-agent; in /usr/sbin, often not on a user's PATH)."""
    import shutil

    found = shutil.which("qemu-ga") or next(
        (p for p in ("/usr/sbin/qemu-ga", "/usr/bin/qemu-ga") if os.access(p, os.X_OK)), None)
    need(found is not None, "needs qemu-ga (apt-get install qemu-guest-agent)")
    assert found is not None
    return found


def ga_blocked(qemu_ga: str) -> list[str]:
    """Every rpc this qemu-ga knows but :data:`GA_ALLOWED` (checked: freeze/thaw are in)."""
    r = subprocess.run([qemu_ga, "-b", "?"], capture_output=True, text=True, timeout=20)
    rpcs = (r.stdout + r.stderr).split()
    blocked = [x for x in rpcs if x.startswith("guest-") and x not in GA_ALLOWED]
    for must in ("guest-fsfreeze-freeze", "guest-fsfreeze-freeze-list", "guest-fsfreeze-thaw",
                 "guest-shutdown", "guest-exec", "guest-file-open"):
        assert must in blocked, (must, rpcs)
    return blocked


@contextlib.contextmanager
def host_guest_agent(root: Path) -> Iterator[Path]:
    """A real qemu-ga on this host listening on ``root/ga.sock`` (unix-listen), with every
    rpc that could touch the host blocked (``-b``: it can never freeze this machine's file
    systems); its socket path.  Always stopped."""
    qemu_ga = qemu_ga_path()
    sock = root / "ga.sock"
    args = [qemu_ga, "-m", "unix-listen", "-p", str(sock), "-f", str(root / "ga.pid"),
            "-t", str(root), "-b", ",".join(ga_blocked(qemu_ga))]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode() if proc.stderr and proc.poll() else ""
                raise RuntimeError(f"qemu-ga did not start: {err}")
            time.sleep(0.02)
        yield sock
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
        for leftover in (sock, root / "ga.pid"):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()

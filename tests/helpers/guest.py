"""A real Linux guest under TCG, built from Debian packages: kernel, busybox, ``qemu-ga``.

The guest (a kernel and an initramfs) is built once per test session (per set
of package versions and version of this module) into :data:`CACHE_ROOT`, a
folder of the session's base temp dir that the session fixture
(``tests/jobs/conftest.py``) sets and pytest removes at the session's end
(``cbt-guest-<key>``, under a lock so parallel test workers do not race); the
build happens in a folder beside it, never in the system temp directory, and
nothing of it outlives the session:

- the kernel from ``apt-get download`` of the Debian cloud kernel (what
  ``linux-image-cloud-amd64`` depends on), unpacked with ``dpkg-deb -x``; the
  modules the guest needs (virtio PCI, ``virtio_blk``, ``virtio_console``; ext4
  is built in) with their dependencies from each module's ``depends=``;
- ``busybox`` from ``busybox-static``, and ``qemu-ga`` from ``qemu-guest-agent``
  with the shared libraries it needs (found by ``ldd``) and their loader;
- an ``init`` script that loads the modules, mounts the virtio disk's ext4 on
  ``/mnt``, starts ``qemu-ga`` on the virtio-serial port
  ``org.qemu.guest_agent.0`` (with an fsfreeze hook that says ``cbt-fsfreeze
  freeze|thaw`` on the console and can be made slow or failing) and says
  ``cbt-guest-ready`` on the console.

A test boots it with ``qemu-system-x86_64 -accel tcg`` (KVM hangs on this
machine: never used), one or two qcow2 virtio disks (each an ext4 made by
``mkfs.ext4`` on the host; nodes ``vda``/``vdb``, devices ``vda-dev``/``vdb-dev``,
mounted on ``/mnt`` and ``/mnt2``), a QMP socket, the agent's chardev socket and
the serial console in a log file.  ``cbt-writer`` (in the guest, started through
the agent's ``guest-exec``) writes files ``DIR/N`` of a known pattern, each
synced, then appends ``N`` to ``DIR/log`` (synced), for each of its folders in
turn, and prints ``cbt-wrote N`` on the console: so a frozen file system is
visible from the host (no new marker), and a point of the disks is checked
against what the guest had written (with two disks, in one global order).

The guest always dies with its context (QEMU killed and reaped); its sockets
live in a short folder under ``/tmp`` removed afterwards.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import gzip
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from helpers.qemu import need_qemu, run
from helpers.system import need

CACHE_ROOT: Path | None = None  # set by the session fixture (tests/jobs/conftest.py)
KERNEL_META = "linux-image-cloud-amd64"
PACKAGES = ("busybox-static", "qemu-guest-agent")
MODULES = ("virtio_blk", "virtio_console", "virtio_pci")
FILE_SIZE = 16384  # bytes of each file cbt-writer writes

INIT = r"""#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs run /run
mount -t tmpfs tmp /tmp
for m in $(cat /lib/modules/order); do
    insmod /lib/modules/$m.ko || echo "cbt-guest-error: insmod $m"
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
mount -t ext4 /dev/vda /mnt || echo "cbt-guest-error: cannot mount /dev/vda"
if [ -b /dev/vdb ]; then
    mkdir -p /mnt2
    mount -t ext4 /dev/vdb /mnt2 || echo "cbt-guest-error: cannot mount /dev/vdb"
fi
mkdir -p /dev/virtio-ports
for p in /sys/class/virtio-ports/*; do
    ln -s "/dev/${p##*/}" "/dev/virtio-ports/$(cat "$p/name")"
done
block=$(sed -n 's/.*cbt_qga_block=\([^ ]*\).*/\1/p' /proc/cmdline)
mkdir -p /run/qga
LD_LIBRARY_PATH=/lib/qga /usr/sbin/qemu-ga -m virtio-serial \
    -p /dev/virtio-ports/org.qemu.guest_agent.0 -t /run/qga ${block:+-b $block} \
    --fsfreeze-hook=/etc/qemu/fsfreeze-hook \
    </dev/null >/dev/console 2>&1 &
echo "cbt-guest-ready"
while true; do sleep 60; done
"""

# cbt-writer DIR...: file N to every DIR in turn (each synced, then logged in DIR/log,
# synced), for N = 1, 2, ... until the first DIR holds "stop"
WRITER = r"""#!/bin/sh
n=0
for d in "$@"; do mkdir -p "$d"; done
while [ ! -e "$1/stop" ]; do
    n=$((n+1))
    for d in "$@"; do
        yes "cbt-file-$n" | head -c FILE_SIZE > "$d/$n"
        sync
        echo "$n" >> "$d/log"
        sync
    done
    echo "cbt-wrote $n" > /dev/console
done
echo "cbt-writer-done $n" > /dev/console
""".replace("FILE_SIZE", str(FILE_SIZE))


# what qemu-ga runs before a freeze and after a thaw (where a guest quiesces its
# applications): says so on the console; /run/freeze-sleep (seconds) makes the
# freeze slow, /run/freeze-fail makes it fail, as an application refusing would
HOOK = r"""#!/bin/sh
echo "cbt-fsfreeze $1" > /dev/console
if [ "$1" = freeze ]; then
    [ -e /run/freeze-sleep ] && sleep "$(cat /run/freeze-sleep)"
    [ -e /run/freeze-fail ] && { echo "application refused to quiesce" >&2; exit 3; }
fi
exit 0
"""


def file_content(n: int) -> bytes:
    """What ``cbt-writer`` puts in file ``n``."""
    line = f"cbt-file-{n}\n".encode()
    return (line * (FILE_SIZE // len(line) + 1))[:FILE_SIZE]


# -- building -----------------------------------------------------------------------------


def need_guest_tools() -> None:
    need_qemu("qemu-system-x86_64", "qemu-img")
    for tool in ("apt-get", "apt-cache", "dpkg-deb", "ldd", "mkfs.ext4", "debugfs"):
        need(shutil.which(tool) is not None,
             f"needs {tool} (ci/system-deps.sh installs what the guest tests need)")


def _apt_field(package: str, name: str) -> str:
    r = subprocess.run(["apt-cache", "show", "--no-all-versions", package],
                       capture_output=True, text=True, check=False)
    m = re.search(rf"^{name}: (.*)$", r.stdout, re.M)
    need(r.returncode == 0 and m is not None,
         f"apt knows no {package} (run apt-get update; ci/system-deps.sh does)")
    assert m is not None
    return m.group(1).strip()


def _packages() -> dict[str, str]:
    """Package -> version of what the guest is built from (apt's candidates)."""
    kernel = _apt_field(KERNEL_META, "Depends").split(",")[0].split()[0]
    return {p: _apt_field(p, "Version") for p in (kernel, *PACKAGES)}


def _cpio(entries: list[tuple[str, int, bytes, int]]) -> bytes:
    """A newc cpio archive of ``(name, mode, data, rdev)``."""
    out = bytearray()
    for ino, (name, mode, data, rdev) in enumerate([*entries, ("TRAILER!!!", 0, b"", 0)], 1):
        raw = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, os.major(rdev), os.minor(rdev),
                  len(raw), 0)
        out += b"070701" + b"".join(b"%08X" % f for f in fields) + raw
        out += b"\0" * (-len(out) % 4) + data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


def _module_order(moddir: Path) -> list[str]:
    """The modules the guest loads, dependencies first (from each module's ``depends=``)."""
    paths = {p.stem: p for p in moddir.rglob("*.ko")}
    order: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        m = re.search(rb"\0depends=([^\0]*)\0", paths[name].read_bytes())
        for dep in (m.group(1).decode().split(",") if m else []):
            if dep:
                visit(dep.replace("-", "_"))
        order.append(name)

    for name in MODULES:
        visit(name)
    return order


def _libraries(binary: Path) -> list[Path]:
    """The shared libraries ``binary`` loads, and the loader (from ``ldd``)."""
    out = run("ldd", str(binary))
    assert "not found" not in out, f"qemu-ga needs libraries this machine lacks:\n{out}"
    return [Path(p) for p in re.findall(r"(/\S+) \(0x", out)]


def _initramfs(tree: Path, kernel_release: str) -> bytes:
    moddir = tree / "lib/modules" / kernel_release
    order = _module_order(moddir)
    paths = {p.stem: p for p in moddir.rglob("*.ko")}
    qga = tree / "usr/sbin/qemu-ga"
    d, x, f = stat.S_IFDIR | 0o755, stat.S_IFREG | 0o755, stat.S_IFREG | 0o644
    entries: list[tuple[str, int, bytes, int]] = [
        (n, d, b"", 0) for n in ("bin", "dev", "proc", "sys", "run", "tmp", "mnt", "lib",
                                 "lib/modules", "lib/qga", "lib64", "usr", "usr/sbin", "etc")]
    entries += [("dev/console", stat.S_IFCHR | 0o600, b"", os.makedev(5, 1)),
                ("init", x, INIT.encode(), 0), ("bin/cbt-writer", x, WRITER.encode(), 0),
                ("etc/qemu", d, b"", 0), ("etc/qemu/fsfreeze-hook", x, HOOK.encode(), 0),
                ("bin/busybox", x, (tree / "bin/busybox").read_bytes(), 0),
                ("usr/sbin/qemu-ga", x, qga.read_bytes(), 0),
                ("lib/modules/order", f, "\n".join(order).encode() + b"\n", 0)]
    entries += [(f"lib/modules/{m}.ko", f, paths[m].read_bytes(), 0) for m in order]
    for lib in _libraries(qga):
        dest = "lib64/" if lib.name.startswith("ld-linux") else "lib/qga/"
        entries.append((dest + lib.name, x, lib.resolve().read_bytes(), 0))
    applets = run(str(tree / "bin/busybox"), "--list").split()
    entries += [(f"bin/{a}", stat.S_IFLNK | 0o777, b"busybox", 0)
                for a in applets if a not in ("busybox", "init")]
    return gzip.compress(_cpio(entries), compresslevel=6)


def _build(dest: Path, packages: dict[str, str]) -> None:
    """Download, unpack and assemble the guest into ``dest`` (a fresh folder)."""
    work = dest / "build"
    work.mkdir()
    try:
        specs = [f"{p}={v}" for p, v in packages.items()]
        r = subprocess.run(["apt-get", "download", *specs], cwd=work, capture_output=True,
                           text=True, check=False, timeout=600)
        assert r.returncode == 0, (f"apt-get download {' '.join(specs)}: {r.stderr.strip()} "
                                   "(stale package lists? run apt-get update)")
        tree = work / "root"
        for deb in sorted(work.glob("*.deb")):
            run("dpkg-deb", "-x", str(deb), str(tree))
        kernel = next(iter(packages)).removeprefix("linux-image-")
        shutil.copyfile(tree / f"boot/vmlinuz-{kernel}", dest / "vmlinuz")
        (dest / "initrd.gz").write_bytes(_initramfs(tree, kernel))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def guest_image() -> tuple[Path, Path]:
    """``(kernel, initramfs)`` of the test guest, built once per package versions."""
    need_guest_tools()
    packages = _packages()
    recipe = json.dumps(packages, sort_keys=True).encode() + Path(__file__).read_bytes()
    key = hashlib.sha256(recipe).hexdigest()[:16]  # the packages, and how it is built
    root = CACHE_ROOT
    assert root is not None, "helpers.guest.CACHE_ROOT: set by the guest_cache fixture"
    cache = root / f"cbt-guest-{key}"
    with open(root / "cbt-guest.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (cache / "initrd.gz").exists():
            for old in root.glob("cbt-guest-*"):  # half-built, or versions unused a day
                if old.is_dir() and (old.suffix == ".part"
                                     or time.time() - old.stat().st_mtime > 86400):
                    shutil.rmtree(old, ignore_errors=True)
            part = root / f"cbt-guest-{key}.part"
            part.mkdir()
            try:
                _build(part, packages)
                part.rename(cache)
            finally:
                shutil.rmtree(part, ignore_errors=True)
        os.utime(cache)  # in use: kept
    return cache / "vmlinuz", cache / "initrd.gz"


def ext4_disk(path: Path, size: int) -> Path:
    """A qcow2 holding a fresh ext4 (``mkfs.ext4`` on a raw file, then converted)."""
    raw = path.with_suffix(".raw")
    run("mkfs.ext4", "-q", "-F", "-L", "cbtguest", str(raw), f"{size // 1024}k")
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path))
    raw.unlink()
    return path


# -- the agent, as the tests speak to it ------------------------------------------------


class AgentError(Exception):
    pass


def agent_call(sock: Path, command: str, arguments: dict[str, Any] | None = None,
               timeout: float = 30) -> Any:
    """One agent command on a fresh connection (closed afterwards: cbt connects too)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(str(sock))
        f = s.makefile("rwb")
        sync_id = int.from_bytes(os.urandom(4), "big")
        f.write(b"\xff" + json.dumps({"execute": "guest-sync-delimited",
                                      "arguments": {"id": sync_id}}).encode() + b"\n")
        f.flush()
        while True:  # skip whatever an earlier client left unread, up to the delimiter
            line = f.readline()
            assert line, "the agent closed the connection"
            line = line.split(b"\xff")[-1].strip()
            with contextlib.suppress(ValueError):
                if json.loads(line).get("return") == sync_id:
                    break
        msg: dict[str, Any] = {"execute": command}
        if arguments is not None:
            msg["arguments"] = arguments
        f.write(json.dumps(msg).encode() + b"\n")
        f.flush()
        reply = json.loads(f.readline())
    if "error" in reply:
        raise AgentError(reply["error"].get("desc", str(reply["error"])))
    return reply["return"]


# -- a running guest ----------------------------------------------------------------------


@dataclass
class Guest:
    disks: list[Path]  # vda (on /mnt), vdb (on /mnt2): devices vda-dev, vdb-dev
    console: Path
    sockets: Path
    proc: subprocess.Popen[bytes] | None = None
    boot_seconds: float = 0.0
    execs: list[int] = field(default_factory=list)

    @property
    def disk(self) -> Path:
        return self.disks[0]

    @property
    def qmp(self) -> Path:
        return self.sockets / "qmp.sock"

    @property
    def qga(self) -> Path:
        return self.sockets / "qga.sock"

    def agent(self, command: str, arguments: dict[str, Any] | None = None,
              timeout: float = 30) -> Any:
        return agent_call(self.qga, command, arguments, timeout)

    def spawn(self, script: str) -> int:
        """Start ``sh -c script`` in the guest (``guest-exec``); its pid in the guest."""
        pid = int(self.agent("guest-exec", {"path": "/bin/sh", "arg": ["-c", script],
                                            "capture-output": True})["pid"])
        self.execs.append(pid)
        return pid

    def status(self, pid: int) -> dict[str, Any]:
        st: dict[str, Any] = self.agent("guest-exec-status", {"pid": pid})
        for k in ("out-data", "err-data"):
            if k in st:
                st[k] = base64.b64decode(st[k]).decode(errors="replace")
        return st

    def sh(self, script: str, timeout: float = 60) -> str:
        """Run ``sh -c script`` in the guest to its end; its stdout (fails unless exit 0)."""
        pid = self.spawn(script)
        deadline = time.monotonic() + timeout
        while not (st := self.status(pid))["exited"]:
            assert time.monotonic() < deadline, f"guest command still running: {script}"
            time.sleep(0.1)
        assert st.get("exitcode") == 0, f"guest: {script}: {st}"
        return str(st.get("out-data", ""))

    def log(self) -> str:
        return self.console.read_text(errors="replace") if self.console.exists() else ""

    def wrote(self) -> list[int]:
        """The files ``cbt-writer`` has finished (synced and logged), in order."""
        return [int(n) for n in re.findall(r"^cbt-wrote (\d+)", self.log(), re.M)]

    def freeze_hooks(self) -> list[str]:
        """The guest's fsfreeze hook calls so far (``freeze``, ``thaw``), in order."""
        return re.findall(r"^cbt-fsfreeze (\w+)", self.log(), re.M)

    def around_freeze(self, k: int) -> tuple[int, int]:
        """Files the writer had finished when the ``k``-th freeze (1-based) began, and
        when the thaw after it began: a point cut between them holds 1..n, from the
        first to at most one more than the second (one finished but not yet said)."""
        events = re.findall(r"^cbt-(wrote \d+|fsfreeze \w+)", self.log(), re.M)
        wrote, freezes, at = 0, 0, None
        for e in events:
            if e.startswith("wrote"):
                wrote = int(e.split()[1])
            elif e == "fsfreeze freeze":
                freezes += 1
                if freezes == k:
                    at = wrote
            elif e == "fsfreeze thaw" and at is not None:
                return at, wrote
        raise AssertionError(f"no freeze {k} and thaw on the console:\n{self.log()[-3000:]}")

    def wait_console(self, pattern: str, timeout: float = 120) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.log(), re.M)
            if m:
                return m
            assert self.proc is not None and self.proc.poll() is None, \
                f"the guest died:\n{self.log()[-3000:]}"
            assert time.monotonic() < deadline, \
                f"no {pattern!r} on the guest's console:\n{self.log()[-3000:]}"
            time.sleep(0.1)

    def wait_wrote(self, count: int, timeout: float = 120) -> list[int]:
        """Wait until the writer has finished ``count`` more files than now."""
        target = len(self.wrote()) + count
        deadline = time.monotonic() + timeout
        while len(done := self.wrote()) < target:
            assert time.monotonic() < deadline, f"the writer is stuck at {done[-1:]}"
            time.sleep(0.1)
        return done


def _disk_args(node: str, path: Path) -> list[str]:
    return ["-blockdev", f"driver=file,node-name={node}-file,filename={path}",
            "-blockdev", f"driver=qcow2,node-name={node},file={node}-file",
            "-device", f"virtio-blk-pci,drive={node},id={node}-dev"]


def _qemu_args(g: Guest, kernel: Path, initrd: Path, append: str) -> list[str]:
    disks = [a for i, d in enumerate(g.disks) for a in _disk_args(f"vd{'ab'[i]}", d)]
    return ["qemu-system-x86_64", "-accel", "tcg", "-m", "256", "-smp", "1",
            "-nographic", "-nodefaults", "-no-reboot", "-monitor", "none",
            "-serial", f"file:{g.console}",
            "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", f"console=ttyS0 panic=-1 loglevel=4 {append}".strip(),
            *disks,
            "-chardev", f"socket,id=qmp,path={g.qmp},server=on,wait=off",
            "-mon", "chardev=qmp,mode=control",
            "-device", "virtio-serial-pci",
            "-chardev", f"socket,id=qga,path={g.qga},server=on,wait=off",
            "-device", "virtserialport,chardev=qga,name=org.qemu.guest_agent.0"]


@contextlib.contextmanager
def running_guest(tmp_path: Path, disk_size: int = 64 << 20,
                  agent_block: tuple[str, ...] = (), disk: Path | None = None,
                  name: str = "vda", two_disks: bool = False) -> Iterator[Guest]:
    """A booted guest with a fresh ext4 disk on ``/mnt`` and its agent answering.

    ``agent_block``: agent commands ``qemu-ga`` refuses (``-b``), e.g. to make a
    freeze fail.  ``disk``: boot with this qcow2 (an ext4) instead of a fresh
    one.  ``name``: of its files in ``tmp_path`` (a second guest in one test).
    ``two_disks``: a second fresh ext4 disk, on ``/mnt2``.  Killed and reaped
    when the block ends.
    """
    kernel, initrd = guest_image()
    disks = [disk or ext4_disk(tmp_path / f"{name}.qcow2", disk_size)]
    if two_disks:
        disks.append(ext4_disk(tmp_path / f"{name}-b.qcow2", disk_size))
    sockets = Path(tempfile.mkdtemp(prefix="cbt-g-", dir="/tmp"))
    g = Guest(disks=disks, console=tmp_path / f"{name}-console.log", sockets=sockets)
    append = f"cbt_qga_block={','.join(agent_block)}" if agent_block else ""
    start = time.monotonic()
    with (tmp_path / f"{name}-qemu.err").open("wb") as err:
        g.proc = subprocess.Popen(_qemu_args(g, kernel, initrd, append),
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    try:
        g.wait_console(r"cbt-guest-ready")
        while True:  # qemu-ga opens its port a moment after init said ready
            try:
                g.agent("guest-ping", timeout=5)
                break
            except (OSError, AssertionError, ValueError):
                g.wait_console(r"cbt-guest-ready", timeout=0)  # still alive?
                assert time.monotonic() - start < 180, f"the agent never answered:\n{g.log()}"
                time.sleep(0.2)
        g.boot_seconds = time.monotonic() - start
        yield g
    finally:
        if g.proc.poll() is None:
            g.proc.kill()
        g.proc.wait(timeout=30)
        shutil.rmtree(sockets, ignore_errors=True)


# -- reading a disk image's ext4 from the host ---------------------------------------------


def debugfs(image: Path, request: str) -> str:
    """``debugfs -R request`` on a raw ext4 image (read-only); its output."""
    r = subprocess.run(["debugfs", "-R", request, str(image)], capture_output=True,
                       text=False, check=False, timeout=60)
    assert r.returncode == 0, f"debugfs {request}: {r.stderr.decode(errors='replace')}"
    return r.stdout.decode(errors="replace")


def read_file(image: Path, path: str) -> bytes:
    r = subprocess.run(["debugfs", "-R", f"cat {path}", str(image)], capture_output=True,
                       check=False, timeout=60)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    return r.stdout


def needs_recovery(image: Path) -> bool:
    """Does the ext4's superblock say its journal must be replayed (mounted, not frozen)?"""
    out = run("dumpe2fs", "-h", str(image))
    m = re.search(r"^Filesystem features:(.*)$", out, re.M)
    assert m is not None, out
    return "needs_recovery" in m.group(1).split()


def fsck_clean(image: Path) -> str:
    """``e2fsck -fn``: the file system's check, read-only; its output (fails unless clean)."""
    r = subprocess.run(["e2fsck", "-f", "-n", str(image)], capture_output=True, text=True,
                       check=False, timeout=120)
    assert r.returncode == 0, f"e2fsck -fn {image}: {r.returncode}\n{r.stdout}{r.stderr}"
    return r.stdout


def check_writer_files(image: Path, directory: str = "/w") -> list[int]:
    """Every file the image's writer log names is there, byte for byte; the logged numbers."""
    logged = [int(n) for n in read_file(image, f"{directory}/log").split()]
    assert logged == list(range(1, len(logged) + 1)), logged
    for n in logged:
        assert read_file(image, f"{directory}/{n}") == file_content(n), f"file {n} differs"
    return logged

"""Offline qcow2 images: read as the guest sees them, tracked by persistent dirty bitmaps.

A qcow2 image (known by its magic ``QFI\\xfb``, whatever its name) of a VM that is
not running is read through ``qemu-nbd``: its virtual disk (guest data, holes as
holes), never its container file.  For each run (:func:`open_offline`):

1. :func:`inspect` the image with ``qemu-img info`` (its answer is untrusted
   input: checked).  An image a running QEMU has open is locked: that disk
   fails with QEMU's one-line lock error.
2. Recover: every other ``cbt-<vm>.`` bitmap (a run killed before it could settle)
   is merged into the previous point's bitmap ``cbt-<previous point id>`` when that
   one is usable, then removed; an unusable previous bitmap (in use after QEMU
   was killed: inconsistent; disabled) is removed too.
3. ``qemu-img bitmap --add`` the new persistent, enabled bitmap ``cbt-<point id>``
   (:func:`cbt.source.qemu.bitmap_name`): QEMU keeps it up to date the next time
   the VM runs, and the next run reads what it marks.
4. ``qemu-nbd`` serves the image read-only on a private unix socket (shared by
   the workers), publishing the previous bitmap as ``qemu:dirty-bitmap:NAME``;
   :meth:`OfflineSet.changes` turns it into a ``qemu-bitmap`` change hint (a
   missing, inconsistent or disabled bitmap, or a first backup: a hash scan,
   with the reason).
5. :meth:`OfflineSet.close` always stops ``qemu-nbd`` (it also dies with cbt:
   ``PR_SET_PDEATHSIG``) and settles the bitmaps: after the point's commit the
   previous bitmap is removed; otherwise the new one is merged back into it and
   removed, so no change is ever lost.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from cbt.core.errors import CbtError
from cbt.format.records import DiskRecord
from cbt.source.changes import ChangeHint
from cbt.source.disks import DiskSpec, NbdExport
from cbt.source.plan import BlockRange
from cbt.source.qemu import bitmap_name

__all__ = [
    "QCOW2_MAGIC", "ChangesFn", "ImageBitmap", "OfflineDisk", "OfflineSet", "Qcow2Error",
    "Qcow2Info",    "inspect", "is_qcow2", "open_offline", "qemu_img", "stop_signals", "tool",
]

QCOW2_MAGIC = b"QFI\xfb"
EXPORT = "disk"
TOOL_TIMEOUT = 60.0  # seconds for one qemu-img call
START_TIMEOUT = 30.0  # seconds for qemu-nbd to listen
PACKAGE = "qemu-utils"  # the Debian package with qemu-img and qemu-nbd
_MAX_INFO = 4 << 20  # bytes of qemu-img info's JSON read at most
_PR_SET_PDEATHSIG = 1

ChangesFn = Callable[[str, DiskRecord | None, int, int], ChangeHint]


class Qcow2Error(CbtError):
    """An offline qcow2 image cannot be read: a tool missing, the image locked or odd."""


def is_qcow2(path: str) -> bool:
    """Whether ``path`` holds a qcow2 image: its first four bytes are ``QFI\\xfb``.

    Unreadable or shorter: not qcow2 (the backup then reports the path itself).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return os.pread(fd, 4, 0) == QCOW2_MAGIC
    except OSError:
        return False
    finally:
        os.close(fd)


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise Qcow2Error(f"{name} not found: reading a qcow2 image needs QEMU's tools "
                         f"(Debian package {PACKAGE})")
    return path


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    line = lines[0] if lines else "no message"
    line = line.removeprefix("qemu-img: ").removeprefix("qemu-nbd: ")
    return line if len(line) <= 300 else line[:297] + "..."


def qemu_img(path: str, *args: str, timeout: float | None = TOOL_TIMEOUT) -> str:
    """Run ``qemu-img ARGS`` (bounded in time unless ``timeout`` is None); its stdout, or
    :class:`Qcow2Error`: one line naming the image ``path``."""
    cmd = [tool("qemu-img"), *args]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, check=False,
                           timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise Qcow2Error(f"{path}: qemu-img {args[0]} did not finish in "
                         f"{timeout:g} s") from None
    if r.returncode != 0:
        raise _img_error(path, args[0], r.stderr)
    return r.stdout


def _img_error(path: str, what: str, stderr: str) -> Qcow2Error:
    if "lock" in stderr:
        return Qcow2Error(f"{path}: in use by a running QEMU ({_first_line(stderr)}): back it "
                          "up through the VM's qmp, or when the VM is stopped")
    return Qcow2Error(f"{path}: qemu-img {what} failed: {_first_line(stderr)}")


# -- the image ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageBitmap:
    """One persistent bitmap of a qcow2 image, as ``qemu-img info`` reports it."""

    name: str
    enabled: bool  # flag "auto": recording writes when QEMU opens the image
    in_use: bool  # flag "in-use": QEMU had it open and did not close it (inconsistent)
    granularity: int


@dataclass(frozen=True)
class Qcow2Info:
    """What cbt needs of a qcow2 image: its virtual size and its bitmaps."""

    path: str
    size: int
    bitmaps: tuple[ImageBitmap, ...] = ()

    def bitmap(self, name: str) -> ImageBitmap | None:
        return next((b for b in self.bitmaps if b.name == name), None)


def inspect(path: str) -> Qcow2Info:
    """``qemu-img info`` of the qcow2 ``path``, checked (it describes an untrusted header).

    Refused: a backing file whose format the image does not name (QEMU would probe
    it: a raw backing file could pass itself off as an image naming any host file),
    an external data file, sizes or bitmaps that do not parse.
    """
    out = qemu_img(path, "info", "--output=json", "-f", "qcow2", _plain(path))
    if len(out) > _MAX_INFO:
        raise Qcow2Error(f"{path}: qemu-img info said too much")
    try:
        doc = json.loads(out)
    except ValueError:
        raise Qcow2Error(f"{path}: qemu-img info is not JSON") from None
    if not isinstance(doc, dict):
        raise Qcow2Error(f"{path}: qemu-img info is not a JSON object")
    size = doc.get("virtual-size")
    if type(size) is not int or not 0 < size < 2**63:
        raise Qcow2Error(f"{path}: qcow2 virtual size {size!r} is not a positive integer")
    if "backing-filename" in doc and "backing-filename-format" not in doc:
        raise Qcow2Error(f"{path}: its backing file {str(doc['backing-filename'])[:200]!r} has "
                         "no format in the image (qemu-img rebase -u -F FORMAT names it)")
    spec = doc.get("format-specific")
    data = spec.get("data") if isinstance(spec, dict) else None
    data = data if isinstance(data, dict) else {}
    if data.get("data-file") is not None:
        raise Qcow2Error(f"{path}: a qcow2 image with an external data file is not supported")
    return Qcow2Info(path, size, _parse_bitmaps(path, data.get("bitmaps", [])))


def _parse_bitmaps(path: str, raw: object) -> tuple[ImageBitmap, ...]:
    if not isinstance(raw, list):
        raise Qcow2Error(f"{path}: qemu-img info's bitmaps are not a list")
    out = []
    for b in raw:
        name = b.get("name") if isinstance(b, dict) else None
        flags = b.get("flags", []) if isinstance(b, dict) else None
        gran = b.get("granularity") if isinstance(b, dict) else None
        if (not isinstance(name, str) or not isinstance(flags, list)
                or type(gran) is not int or gran <= 0):
            raise Qcow2Error(f"{path}: qemu-img info describes a bitmap cbt cannot read")
        out.append(ImageBitmap(name, "auto" in flags, "in-use" in flags, gran))
    return tuple(out)


def _bitmap(path: str, name: str, *ops: str) -> None:
    """``qemu-img bitmap OPS -f qcow2 PATH NAME`` (the image must not be in use)."""
    qemu_img(path, "bitmap", *ops, "-f", "qcow2", _plain(path), name)


def _plain(path: str) -> str:
    """``path`` as QEMU must take it: absolute, so that no ``json:`` or ``nbd:`` prefix
    of a relative name can make it a protocol."""
    return os.path.abspath(path)


def _unusable(info: Qcow2Info, previous: str | None) -> str | None:
    """Why the previous bitmap cannot say what changed (None: it can)."""
    if previous is None:
        return "first backup: no previous bitmap"
    bm = info.bitmap(previous)
    if bm is None:
        return f"bitmap {previous} missing in {info.path}"
    if bm.in_use:
        return (f"bitmap {previous} in {info.path} is inconsistent (QEMU stopped "
                "uncleanly)")
    if not bm.enabled:
        return f"bitmap {previous} in {info.path} is disabled (it did not record writes)"
    return None


def _recover(info: Qcow2Info, previous: str | None, usable: bool, ours: str) -> list[str]:
    """Fold this VM's other bitmaps (``ours``: ``cbt-<vm>.``; a killed run's) into the
    previous one; remove them and an unusable previous one.  Returns the names removed.
    Another VM's bitmaps (the same image backed up under another name) are left alone."""
    removed = []
    for bm in info.bitmaps:
        if not bm.name.startswith(ours) or (usable and bm.name == previous):
            continue
        if usable and previous is not None and not bm.in_use and bm.name != previous:
            _bitmap(info.path, previous, "--merge", bm.name)
        _bitmap(info.path, bm.name, "--remove")
        removed.append(bm.name)
    return removed


# -- the run ------------------------------------------------------------------------------


@dataclass
class OfflineDisk:
    """One offline qcow2 disk of a run: its bitmaps and its ``qemu-nbd``."""

    label: str
    path: str
    size: int
    new_bitmap: str
    previous: str | None  # the previous point's bitmap when usable (published over NBD)
    reason: str | None  # why not (a hash scan)
    socket: str = ""
    proc: subprocess.Popen[bytes] | None = None
    added: bool = False

    @property
    def spec(self) -> DiskSpec:
        return DiskSpec(self.label, self.path, nbd=NbdExport(self.socket, EXPORT))


@dataclass
class OfflineSet:
    """The offline qcow2 disks of one run; :meth:`commit` once the point is stored,
    :meth:`close` always."""

    point_id: str
    disks: dict[str, OfflineDisk] = field(default_factory=dict)
    workdir: str = ""
    committed: bool = False
    closed: bool = False

    def specs(self, specs: list[DiskSpec]) -> list[DiskSpec]:
        """``specs`` with each offline qcow2 disk read through its ``qemu-nbd``."""
        return [self.disks[s.label].spec if s.label in self.disks else s for s in specs]

    def changes(self, fallback: ChangesFn | None = None) -> ChangesFn:
        """The change source for a BackupRequest: the bitmap of a qcow2 disk, else
        ``fallback`` (else a hash scan)."""
        def changes(label: str, parent: DiskRecord | None, block_size: int,
                    size: int) -> ChangeHint:
            if label in self.disks:
                return self.hint(label, block_size)
            if fallback is not None:
                return fallback(label, parent, block_size, size)
            return ChangeHint.hash()
        return changes

    def hint(self, label: str, block_size: int) -> ChangeHint:
        """What the previous point's bitmap marks, in blocks of ``block_size``."""
        from cbt.source.nbd import NbdError, NbdSource

        d = self.disks[label]
        if d.previous is None:
            return ChangeHint.hash(d.reason)
        try:
            with NbdSource(d.socket, EXPORT, bitmaps=(d.previous,)) as src:
                dirty = src.dirty_ranges(d.previous)
        except NbdError as exc:
            return ChangeHint.hash(f"bitmap {d.previous} unreadable over NBD: {exc}")
        return ChangeHint("qemu-bitmap", _blocks(dirty, block_size))

    @property
    def consistency(self) -> tuple[str, str]:
        """What a point of these disks alone is: an image at rest, as consistent as the VM
        left it (cleanly shut down or not: cbt cannot tell)."""
        return "crash", "offline qcow2 image"

    def commit(self) -> None:
        self.committed = True

    def stop(self) -> None:
        """Stop every ``qemu-nbd`` once every disk is read (the images are free again: a
        post hook may start the VM); :meth:`close` does it anyway."""
        for d in self.disks.values():
            _stop(d)
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def close(self) -> list[str]:
        """Stop every ``qemu-nbd``, then settle the bitmaps (see the module's step 5).

        Never raises (it runs while another error may be on its way): what could not
        be settled is returned, and the next run settles it (its step 2)."""
        if self.closed:
            return []
        self.closed = True
        errors: list[str] = []
        self.stop()
        for d in self.disks.values():
            try:
                _settle(d, self.committed)
            except (Qcow2Error, OSError) as exc:
                errors.append(f"disk {d.label}: bitmaps left for the next run: {exc}")
        return errors


def _blocks(dirty: list[tuple[int, int]], block_size: int) -> tuple[BlockRange, ...]:
    out: list[BlockRange] = []
    for a, b in dirty:
        lo, hi = a // block_size, -(-b // block_size)
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(hi, out[-1][1]))
        else:
            out.append((lo, hi))
    return tuple(out)


def _settle(d: OfflineDisk, committed: bool) -> None:
    if not d.added:
        return
    if committed:
        if d.previous is not None:
            _bitmap(d.path, d.previous, "--remove")
        return
    if d.previous is not None:
        _bitmap(d.path, d.previous, "--merge", d.new_bitmap)
    _bitmap(d.path, d.new_bitmap, "--remove")


def _die_with_parent() -> None:  # (in the forked child, before exec)
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _start(d: OfflineDisk, workdir: str) -> None:
    """``qemu-nbd``: the image read-only, any number of clients, the previous bitmap."""
    d.socket = os.path.join(workdir, f"{len(os.listdir(workdir))}.sock")
    args = [tool("qemu-nbd"), "--read-only", "--persistent", "--shared=0", "--format=qcow2",
            f"--socket={d.socket}", f"--export-name={EXPORT}"]
    if d.previous is not None:
        args.append(f"--bitmap={d.previous}")
    args.append(_plain(d.path))
    d.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, preexec_fn=_die_with_parent)
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if d.proc.poll() is not None:
            err = d.proc.stderr.read().decode(errors="replace") if d.proc.stderr else ""
            _stop(d)
            if "lock" in err:
                raise Qcow2Error(f"{d.path}: in use by a running QEMU ({_first_line(err)})")
            raise Qcow2Error(f"{d.path}: qemu-nbd failed: {_first_line(err)}")
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(d.socket)
                return
            except OSError:
                pass
        if time.monotonic() > deadline:
            _stop(d)
            raise Qcow2Error(f"{d.path}: qemu-nbd did not listen in {START_TIMEOUT:g} s")
        time.sleep(0.02)


def _stop(d: OfflineDisk) -> None:
    proc, d.proc = d.proc, None
    if proc is None:
        return
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    if proc.stderr is not None:
        proc.stderr.close()


def _prepare(label: str, path: str, point_id: str, previous_point: str | None) -> OfflineDisk:
    info = inspect(path)
    previous = bitmap_name(previous_point) if previous_point else None
    why = _unusable(info, previous)
    new = bitmap_name(point_id)
    _recover(info, previous, why is None, new.split(".", 1)[0] + ".")
    return OfflineDisk(label, path, info.size, new, None if why else previous, why)


def _short_dir() -> str:
    """A private folder for the sockets, short enough for a unix socket path
    (``cbt-q-<pid>-XXXX``); those a killed run left are removed first."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    if not os.path.isdir(base) or len(base) > 60:
        base = "/tmp"
    _sweep(base)
    return tempfile.mkdtemp(prefix=f"cbt-q-{os.getpid()}-", dir=base)


def _sweep(base: str) -> None:
    """Remove socket folders of runs that are gone (ours: our uid, sockets only)."""
    import re

    with contextlib.suppress(OSError), os.scandir(base) as entries:
        for e in entries:
            m = re.fullmatch(r"cbt-q-([1-9][0-9]{0,9})-[A-Za-z0-9_]{1,16}", e.name)
            if not m or not e.is_dir(follow_symlinks=False) or int(m.group(1)) == os.getpid():
                continue
            if e.stat(follow_symlinks=False).st_uid != os.getuid() or _alive(int(m.group(1))):
                continue
            with contextlib.suppress(OSError):
                for f in os.scandir(e.path):
                    if f.name.endswith(".sock") and not f.is_dir(follow_symlinks=False):
                        os.unlink(f.path)
                os.rmdir(e.path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


@contextlib.contextmanager
def open_offline(disks: Mapping[str, str], point_id: str,
                 previous_point: str | None) -> Iterator[OfflineSet]:
    """The qcow2 disks among ``disks`` (label -> path) served for one run (see the module).

    ``previous_point``: the id of the VM's point this run follows (its bitmaps say
    what changed).  Call :meth:`OfflineSet.commit` once the point is committed.
    """
    with stop_signals():
        offline = OfflineSet(point_id)
        try:
            for label, path in disks.items():
                if is_qcow2(path):
                    d = _prepare(label, path, point_id, previous_point)
                    offline.disks[label] = d
                    _bitmap(path, d.new_bitmap, "--add")
                    d.added = True
            if offline.disks:
                offline.workdir = _short_dir()
                for d in offline.disks.values():
                    _start(d, offline.workdir)
            yield offline
        finally:
            offline.close()


class Stopped(CbtError, KeyboardInterrupt):
    """SIGTERM arrived: the run stops, cleaning up (``qemu-nbd`` stopped, bitmaps merged)."""


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """SIGTERM raises :class:`Stopped` in the main thread while the block runs (there
    only: elsewhere the caller's handling stays)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: object) -> None:
        raise Stopped(f"stopped by {signal.Signals(signum).name}")

    old = signal.getsignal(signal.SIGTERM)
    if old not in (signal.SIG_DFL, None):  # (a job's or a daemon's handler stays)
        yield
        return
    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)

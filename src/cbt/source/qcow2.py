"""Offline qcow2 images: read as the guest sees them, tracked by persistent dirty bitmaps.

A qcow2 image (known by its magic ``QFI\\xfb``, whatever its name) of a VM that is
not running is read through ``qemu-nbd``: its virtual disk (guest data, holes as
holes), never its container file.  For each run (:func:`open_offline`):

1. :func:`pin` the image: it and its backing chain are opened once by cbt and
   checked (:class:`Pinned`: no protocol names, devices, FIFOs, loops, probed
   formats, external data files, nor a backing file the image's owner could not
   read); every QEMU tool is given these open files (``/dev/fd/N``), so an image
   replaced meanwhile is never what is read.  ``qemu-img info``'s answer is
   untrusted input: checked.  An image a running QEMU has open is locked: that disk
   fails with QEMU's one-line lock error.
2. Recover: every other ``cbt-<vm>.`` bitmap (a run killed before it could settle)
   is merged into the previous point's bitmap ``cbt-<previous point id>`` when that
   one is usable, then removed; an unusable previous bitmap (in use after QEMU
   was killed: inconsistent; disabled) is removed too.
3. Where no bitmap can be added (the image read-only, or too little room on its
   file system: QEMU would exit 0 having left every bitmap inconsistent), the image
   is left untouched and the disk is hashed, saying why.  Otherwise
   ``qemu-img bitmap --add`` the new persistent, enabled bitmap ``cbt-<point id>``
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
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial

from cbt.core.durable import pid_alive
from cbt.core.errors import CbtError, untrusted_json
from cbt.format.records import DiskRecord
from cbt.source.changes import ChangeHint
from cbt.source.disks import DiskSpec, NbdExport
from cbt.source.nbd import NBDMAGIC
from cbt.source.plan import BlockRange

__all__ = [
    "QCOW2_MAGIC", "ChangesFn", "ImageBitmap", "OfflineDisk", "OfflineSet", "Pinned",
    "Qcow2Error", "Qcow2Info", "inspect", "is_qcow2", "open_offline", "pin", "qemu_img",
    "stop_signals", "tool", "unnamed_qcow2_warnings",
]

QCOW2_MAGIC = b"QFI\xfb"
QCOW2_SUFFIX = ".qcow2"  # a qcow2 image is named so (and has the magic): see is_qcow2
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
    """Whether ``path`` is a qcow2 image to read as the guest sees it: a regular file named
    ``*.qcow2`` whose first four bytes are ``QFI\\xfb``.

    Unreadable or shorter: not qcow2 (the backup then reports the path itself).  The
    name and the header together, never the header alone: a guest writes what it likes at
    the start of its raw disk, and a qcow2 header there must not make cbt (as root) read
    the header's backing file into the backup, nor write bitmaps into the guest's data
    (QEMU's own lesson: never probe the format of a raw image).  So a block device is a
    raw disk whatever it starts with, and so is an image not named ``.qcow2``
    (:func:`unnamed_qcow2_warnings` says so).
    """
    return path.lower().endswith(QCOW2_SUFFIX) and _has_magic(path)


def _has_magic(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode) and os.pread(fd, 4, 0) == QCOW2_MAGIC
    except OSError:
        return False
    finally:
        os.close(fd)


def unnamed_qcow2_warnings(disks: Mapping[str, str]) -> list[str]:
    """A warning for each disk (label -> path) that starts with a qcow2 header but is not
    named ``.qcow2``: it is backed up as a raw image (its container file)."""
    return [f"disk {label}: {path} starts with a qcow2 header but is not named "
            f"{QCOW2_SUFFIX}: backed up as a raw image (its container file, not the guest's "
            f"view); name a qcow2 image {QCOW2_SUFFIX} to back up what its guest sees"
            for label, path in disks.items()
            if not path.lower().endswith(QCOW2_SUFFIX) and _has_magic(path)]


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


_LONG = ("convert", "compare")  # qemu-img commands that copy a disk


def qemu_img(path: str, *args: str, timeout: float | None = TOOL_TIMEOUT,
             fds: tuple[int, ...] = ()) -> str:
    """Run ``qemu-img ARGS`` (bounded in time unless ``timeout`` is None; given the open
    files ``fds``; a long one, :data:`_LONG`, dies with cbt as ``qemu-nbd`` does, a short
    one that rewrites metadata finishes: killed, it would leave every bitmap of the image
    inconsistent); its stdout, or :class:`Qcow2Error`: one line naming the image ``path``."""
    cmd = [tool("qemu-img"), *args]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, check=False,
                           timeout=timeout, stdin=subprocess.DEVNULL, pass_fds=fds,
                           preexec_fn=partial(_die_with_parent, os.getpid())
                           if args[0] in _LONG else None)
    except subprocess.TimeoutExpired:
        raise Qcow2Error(f"{path}: qemu-img {args[0]} did not finish in "
                         f"{timeout:g} s") from None
    stderr = _named(r.stderr, cmd, path)
    if r.returncode != 0:
        raise _img_error(path, args[0], stderr)
    if args[0] == "bitmap" and stderr.strip():
        # (qemu-img exits 0 when it could not store the bitmaps on close, a full disk:
        # "Lost persistent bitmaps ...", every one of them left marked in use)
        raise Qcow2Error(f"{path}: qemu-img bitmap failed: {_first_line(stderr)}")
    return r.stdout


def _named(text: str, cmd: list[str], path: str) -> str:
    """QEMU's message with cbt's ``json:`` and ``/dev/fd/N`` names shown as ``path``."""
    for arg in cmd:
        if arg.startswith(("json:", "/dev/fd/")):
            text = text.replace(arg, path)
    return text


def _locked(stderr: str) -> bool:
    """QEMU's image locking refused it (``Failed to get "write" lock``; not any message
    that merely names a node ``#block12``)."""
    return re.search(r'Failed to get (shared )?"[a-z ]+" lock', stderr) is not None


def _img_error(path: str, what: str, stderr: str) -> Qcow2Error:
    if _locked(stderr):
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
    cluster: int = 65536

    def bitmap(self, name: str) -> ImageBitmap | None:
        return next((b for b in self.bitmaps if b.name == name), None)


def inspect(path: str) -> Qcow2Info:
    """``qemu-img info`` of the qcow2 ``path``, checked (it describes an untrusted header),
    and its backing chain checked (:class:`Pinned`)."""
    info, pinned = pin(path)
    pinned.close()
    return info


MAX_CHAIN = 16  # backing files followed at most
BACKING_FORMATS = ("qcow2", "raw")


@dataclass
class Pinned:
    """An image and its backing chain, each file opened once by cbt and checked; QEMU's
    tools are given these open files (``/dev/fd/N`` in a ``json:`` name), never a name
    it would resolve again: an image swapped after it was inspected, or a backing name
    the header changed meanwhile, is never what QEMU reads.

    Refused in the chain: a file that is not a regular file (a device, a FIFO), a
    backing name that is a QEMU protocol (``json:``, ``nbd:``...), a backing format
    other than qcow2 or raw or none named (QEMU would probe it), an external data file,
    more than :data:`MAX_CHAIN` files, and a backing file the image's owner could not
    read (a header is the image owner's word: cbt, often root, must not read
    ``/etc/shadow`` into the backup for them)."""

    path: str
    fds: list[int] = field(default_factory=list)
    top: dict[str, object] = field(default_factory=dict)  # for qemu-img (no backing)
    chain: dict[str, object] = field(default_factory=dict)  # for qemu-nbd: every file
    ident: tuple[int, int] = (0, 0)  # the image file's (st_dev, st_ino)

    def name(self, whole: bool = False) -> str:
        return "json:" + json.dumps(self.chain if whole else self.top)

    def close(self) -> None:
        fds, self.fds = self.fds, []
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def pin(path: str) -> tuple[Qcow2Info, Pinned]:
    """Open the qcow2 ``path`` and its backing chain once, check them (:class:`Pinned`);
    the caller closes the :class:`Pinned`."""
    pinned = Pinned(path)
    try:
        fd, top = _open_file(path, path)
        pinned.fds.append(fd)
        pinned.ident = (top.st_dev, top.st_ino)
        if os.pread(fd, 4, 0) != QCOW2_MAGIC:
            raise Qcow2Error(f"{path}: no longer a qcow2 image")
        node: dict[str, object] = _node("qcow2", fd)
        pinned.top, pinned.chain = dict(node), node
        doc = _info(path, fd, "qcow2", pinned)
        cluster = doc.get("cluster-size")
        info = Qcow2Info(path, _size(path, doc), _parse_bitmaps(path, _data(path, doc)
                                                                .get("bitmaps", [])),
                         cluster if type(cluster) is int and 0 < cluster <= 2 << 20
                         else 2 << 20)
        _follow(pinned, node, doc, top)
        return info, pinned
    except BaseException:
        pinned.close()
        raise


def _node(fmt: str, fd: int) -> dict[str, object]:
    return {"driver": fmt, "file": {"driver": "file", "filename": f"/dev/fd/{fd}"}}


def _open_file(path: str, image: str) -> tuple[int, os.stat_result]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise Qcow2Error(f"{image}: cannot open {path}: {exc.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise Qcow2Error(f"{image}: {path} is not a regular file: refusing to read it")
    return fd, st


def _info(path: str, fd: int, fmt: str, pinned: Pinned) -> dict[str, object]:
    out = qemu_img(path, "info", "--output=json", "-f", fmt, f"/dev/fd/{fd}",
                   fds=tuple(pinned.fds))
    if len(out) > _MAX_INFO:
        raise Qcow2Error(f"{path}: qemu-img info said too much")
    try:
        doc = untrusted_json(out)
    except ValueError:
        raise Qcow2Error(f"{path}: qemu-img info is not JSON") from None
    if not isinstance(doc, dict):
        raise Qcow2Error(f"{path}: qemu-img info is not a JSON object")
    return doc


def _size(path: str, doc: dict[str, object]) -> int:
    size = doc.get("virtual-size")
    if type(size) is not int or not 0 < size < 2**63:
        raise Qcow2Error(f"{path}: qcow2 virtual size {size!r} is not a positive integer")
    return size


def _data(path: str, doc: dict[str, object]) -> dict[str, object]:
    spec = doc.get("format-specific")
    data = spec.get("data") if isinstance(spec, dict) else None
    data = data if isinstance(data, dict) else {}
    if data.get("data-file") is not None:
        raise Qcow2Error(f"{path}: a qcow2 image with an external data file is not supported")
    return data


def _follow(pinned: Pinned, node: dict[str, object], doc: dict[str, object],
            top: os.stat_result) -> None:
    """Pin the backing chain the header ``doc`` names below ``node`` (see :class:`Pinned`)."""
    where, seen = pinned.path, {(top.st_dev, top.st_ino)}
    while (backing := doc.get("backing-filename")) is not None:
        fmt = doc.get("backing-filename-format")
        shown = str(backing)[:200]
        if fmt is None:
            raise Qcow2Error(f"{pinned.path}: its backing file {shown!r} has no format in "
                             "the image (qemu-img rebase -u -F FORMAT names it)")
        if fmt not in BACKING_FORMATS:
            raise Qcow2Error(f"{pinned.path}: its backing file {shown!r} has format "
                             f"{str(fmt)[:40]!r} (cbt reads only qcow2 or raw ones)")
        if not isinstance(backing, str) or not backing or _has_protocol(backing):
            raise Qcow2Error(f"{pinned.path}: its backing file {shown!r} is not a file "
                             "name (a QEMU protocol): refusing to follow it")
        if len(pinned.fds) > MAX_CHAIN:
            raise Qcow2Error(f"{pinned.path}: its backing chain is longer than {MAX_CHAIN}")
        where = os.path.join(os.path.dirname(_plain(where)), backing)
        fd, st = _open_file(where, pinned.path)
        pinned.fds.append(fd)
        if (st.st_dev, st.st_ino) in seen:
            raise Qcow2Error(f"{pinned.path}: its backing chain loops at {where}")
        seen.add((st.st_dev, st.st_ino))
        if not _owner_may_read(top, st):
            raise Qcow2Error(f"{pinned.path}: its backing file {where} is not readable by the "
                             f"image's owner (uid {top.st_uid}): refusing to read it")
        child = _node(str(fmt), fd)
        node["backing"] = child
        if fmt == "raw":
            return
        node, doc = child, _info(where, fd, "qcow2", pinned)
        _data(where, doc)
    node["backing"] = None


def _has_protocol(name: str) -> bool:
    """QEMU's ``path_has_protocol``: a ``:`` before any ``/`` makes a protocol name."""
    head = name.split("/", 1)[0]
    return ":" in head


def _owner_may_read(top: os.stat_result, st: os.stat_result) -> bool:
    """Whether the owner of the image ``top`` could read the backing file ``st`` (or owns
    it, or is cbt's own user or root, who could anyway)."""
    if top.st_uid in (0, os.geteuid()) or st.st_uid == top.st_uid:
        return True
    if st.st_gid == top.st_gid and st.st_mode & stat.S_IRGRP:
        return True
    return bool(st.st_mode & stat.S_IROTH)


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


def _bitmap(image: Pinned, name: str, *ops: str) -> None:
    """``qemu-img bitmap OPS IMAGE NAME`` (the image must not be in use)."""
    qemu_img(image.path, "bitmap", *ops, image.name(), name, fds=tuple(image.fds))


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


_STAMP = re.compile(r"[0-9]{8}T[0-9]{6}Z(?:-[1-9][0-9]{0,8})?")


def _ours(name: str, prefix: str, previous: str | None) -> bool:
    """Whether the bitmap ``name`` is one of this VM's runs' (``prefix`` then a point id's
    time, as :func:`cbt.source.qemu.bitmap_name` makes them): a user's ``cbt-web.mine``
    is not cbt's to merge or remove."""
    if name == previous:
        return True
    return name.startswith(prefix) and _STAMP.fullmatch(name[len(prefix):]) is not None


def _recover(image: Pinned, info: Qcow2Info, previous: str | None, usable: bool,
             ours: str) -> list[str]:
    """Fold this VM's other bitmaps (``ours``: ``cbt-<vm>.``; a killed run's) into the
    previous one; remove them and an unusable previous one.  Returns the names removed.
    Another VM's bitmaps (the same image backed up under another name) are left alone."""
    removed = []
    for bm in info.bitmaps:
        if not _ours(bm.name, ours, previous) or (usable and bm.name == previous):
            continue
        if usable and previous is not None and not bm.in_use and bm.name != previous:
            _bitmap(image, previous, "--merge", bm.name)
        _bitmap(image, bm.name, "--remove")
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
    image: Pinned  # the image and its backing chain, opened once
    socket: str = ""
    proc: subprocess.Popen[bytes] | None = None
    added: bool = False
    tracked: bool = True  # False: no bitmap can be added (read-only, no room): hashed

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
            finally:
                d.image.close()
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
            _bitmap(d.image, d.previous, "--remove")
        return
    if d.previous is not None:
        _bitmap(d.image, d.previous, "--merge", d.new_bitmap)
    _bitmap(d.image, d.new_bitmap, "--remove")


def _die_with_parent(parent: int) -> None:  # (in the forked child, before exec)
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # (cbt died before the prctl: no signal would come)
        os._exit(1)


def _start(d: OfflineDisk, workdir: str) -> None:
    """``qemu-nbd``: the image read-only, any number of clients, the previous bitmap."""
    d.socket = os.path.join(workdir, f"{len(os.listdir(workdir))}.sock")
    args = [tool("qemu-nbd"), "--read-only", "--persistent", "--shared=0",
            f"--socket={d.socket}", f"--export-name={EXPORT}"]
    if d.previous is not None:
        args.append(f"--bitmap={d.previous}")
    args.append(d.image.name(whole=True))
    d.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, pass_fds=tuple(d.image.fds),
                              preexec_fn=partial(_die_with_parent, os.getpid()))
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if d.proc.poll() is not None:
            err = d.proc.stderr.read().decode(errors="replace") if d.proc.stderr else ""
            err = _named(err, args, d.path)
            _stop(d)
            if _locked(err):
                raise Qcow2Error(f"{d.path}: in use by a running QEMU ({_first_line(err)})")
            raise Qcow2Error(f"{d.path}: qemu-nbd failed: {_first_line(err)}")
        if _greets(d.socket):
            return
        if time.monotonic() > deadline:
            _stop(d)
            raise Qcow2Error(f"{d.path}: qemu-nbd did not listen in {START_TIMEOUT:g} s")
        time.sleep(0.02)


def _greets(path: str) -> bool:
    """Whether the NBD server on ``path`` sends its greeting: it listens before it opens
    the image, so a bare connect succeeds even when the open is about to fail (locked);
    the greeting comes only once the image is open and the server serves."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(1.0)
        try:
            s.connect(path)
            got = b""
            while len(got) < 8:
                part = s.recv(8 - len(got))
                if not part:
                    return False
                got += part
        except OSError:  # (not listening yet, reset, or no greeting within the timeout)
            return False
    return int.from_bytes(got, "big") == NBDMAGIC


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


def _prepare(label: str, path: str, point_id: str, previous_point: str | None,
             scope: str) -> OfflineDisk:
    from cbt.source.qemu import bitmap_name  # (not at import: it brings asyncio, ~30 ms
    # of every backup's start-up that reads no qcow2 image)

    info, image = pin(path)
    try:
        new = bitmap_name(point_id, scope)
        untracked = _cannot_add(image, info)
        if untracked is not None:  # (the image is left as it is: read, never written)
            return OfflineDisk(label, path, info.size, new, None, untracked, image,
                               tracked=False)
        previous = bitmap_name(previous_point, scope) if previous_point else None
        why = _unusable(info, previous)
        _recover(image, info, previous, why is None, new.split(".", 1)[0] + ".")
    except BaseException:
        image.close()
        raise
    return OfflineDisk(label, path, info.size, new, None if why else previous, why, image)


def _cannot_add(image: Pinned, info: Qcow2Info) -> str | None:
    """Why no bitmap can be added to the image (None: it can): it cannot be opened for
    writing (a read-only file system or file), or its file system has too little room
    to store the bitmaps again (QEMU rewrites them all when it closes the image; where
    it cannot, it leaves every one marked inconsistent and still exits 0)."""
    fd = image.fds[0]
    try:
        os.close(os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        return f"no bitmap can be added to {info.path}: {exc.strerror} (hash scan)"
    vfs = os.fstatvfs(fd)
    free, need = vfs.f_bavail * vfs.f_frsize, _room(info)
    if free < need:
        return (f"no bitmap can be added to {info.path}: {free} bytes free on its file "
                f"system, {need} needed to store its bitmaps (hash scan)")
    return None


MAX_BITMAP = 64 << 20  # bytes a new bitmap may take in memory and in the image


def granularity(size: int) -> int:
    """The new bitmap's granularity: QEMU's default 64 KiB, or larger for a disk so big
    its bitmap would take more than :data:`MAX_BITMAP` (QEMU refuses past 512 MiB)."""
    gran = 65536
    while -(-size // gran) > MAX_BITMAP * 8:
        gran *= 2
    return gran


def _room(info: Qcow2Info) -> int:
    """Bytes QEMU may need to store the image's bitmaps and a new one when it closes it
    (new copies are written before the old ones, already counted as used, are freed):
    each one's data (as if every bit were set) and table, the directory, a margin."""
    c = info.cluster
    need = 4 * c + len(info.bitmaps) * 1100  # (a directory entry: name up to 1023 bytes)
    for gran in [b.granularity for b in info.bitmaps] + [granularity(info.size)]:
        data = -(-info.size // gran) // 8 + 1
        need += (-(-data // c) + 1) * c  # its data clusters, its table
    return need + (1 << 20)


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
    with contextlib.suppress(OSError), os.scandir(base) as entries:
        for e in entries:
            m = re.fullmatch(r"cbt-q-([1-9][0-9]{0,9})-[A-Za-z0-9_]{1,16}", e.name)
            if not m or not e.is_dir(follow_symlinks=False) or int(m.group(1)) == os.getpid():
                continue
            if e.stat(follow_symlinks=False).st_uid != os.getuid() or pid_alive(int(m.group(1))):
                continue
            with contextlib.suppress(OSError):
                for f in os.scandir(e.path):
                    if f.name.endswith(".sock") and not f.is_dir(follow_symlinks=False):
                        os.unlink(f.path)
                os.rmdir(e.path)


@contextlib.contextmanager
def open_offline(disks: Mapping[str, str], point_id: str, previous_point: str | None,
                 scope: str = "") -> Iterator[OfflineSet]:
    """The qcow2 disks among ``disks`` (label -> path) served for one run (see the module).

    ``previous_point``: the id of the VM's point this run follows (its bitmaps say
    what changed); ``scope``: the vault's and VM's (:func:`cbt.source.qemu.scope_of`),
    in every bitmap name, as a running VM's job names them (an image backed up into two
    vaults keeps a bitmap for each, and a VM's bitmaps serve it stopped or running).
    Call :meth:`OfflineSet.commit` once the point is committed.
    """
    with stop_signals():
        offline = OfflineSet(point_id)
        try:
            for label, path in disks.items():
                if is_qcow2(path):
                    d = _prepare(label, path, point_id, previous_point, scope)
                    offline.disks[label] = d
                    _check_unique(offline, d)
                    if d.tracked:
                        _bitmap(d.image, d.new_bitmap, "--add", "-g",
                                str(granularity(d.size)))
                        d.added = True
            if offline.disks:
                offline.workdir = _short_dir()
                for d in offline.disks.values():
                    _start(d, offline.workdir)
            yield offline
        finally:
            offline.close()


def _check_unique(offline: OfflineSet, d: OfflineDisk) -> None:
    """One image under two labels would get the same bitmap twice: refused."""
    for other in offline.disks.values():
        if other is not d and other.image.ident == d.image.ident:
            raise Qcow2Error(f"disks {other.label} and {d.label} are the same qcow2 image "
                             f"({d.path}): name it once")


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

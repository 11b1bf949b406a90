"""QEMU through QMP: a VM's disks, persistent dirty bitmaps, one-moment views, NBD exports.

A running QEMU (or ``qemu-storage-daemon``) is driven through its QMP socket
with QEMU's own ``qemu.qmp`` library.  That library is asyncio; :class:`QmpSession`
runs it in a private event loop on a private thread and gives a synchronous,
timed API, so callers (jobs) stay synchronous.

The backup moment (:func:`cut`) is ONE QMP ``transaction`` over all disks: per
disk it disables the previous point's bitmap (freezing "what changed since the
previous point"), adds a new persistent bitmap named from the point id
(``cbt-<scope>-<point id>``) and starts ``blockdev-backup sync=none`` into a temporary qcow2
fleecing overlay (QEMU 7.2's copy-before-write: the overlay keeps the old data
of every block the guest writes afterwards, so reading the overlay gives the
disk as it was at the moment).  QEMU 7.2 has the ``snapshot-access`` driver,
but it needs a ``copy-before-write`` filter inserted above the disk's node,
and 7.2 cannot re-point a running device at a new node (no
``x-blockdev-replace``); ``blockdev-backup`` inserts that filter itself, and
the whole moment (overlays, transaction, exports) measured 0.05-0.07 s here.
Each view is then exported read-only over NBD
with the previous bitmap published as ``qemu:dirty-bitmap:NAME``.

Teardown (export, job, overlay node and file, NBD server if we started it)
always runs.  On :meth:`Moment.commit` the previous bitmap is removed; otherwise
the new bitmap is merged back into the previous one, so no change is ever lost.
A bitmap left by a killed run is merged back by :func:`recover` before a run.
A previous bitmap that is missing, inconsistent (QEMU was killed), not ours or
a resized disk is reported in :attr:`Moment.reasons`: the caller hash-scans.

Scope: two cbt instances (two vaults) may back up the same VM, even at once.
Everything made in QEMU and in the work folder carries a scope (:func:`scope_of`:
8 hex digits of the vault's id and the VM's name): bitmaps
``cbt-<scope>-<point id>``, overlay nodes ``cbt-<scope>-n<tag>-<i>`` (and
``-f``, their file nodes; 31 characters at most), exports ``...-e...``, jobs
``...-j...``, cbt's NBD socket ``nbd-<scope>.sock``.  :func:`release_leftovers`,
:func:`recover` and the bitmaps' settling touch only their own scope's names.
QEMU runs one NBD server: two instances share it only through ``nbd``.
A forked process (a transfer worker) lets go of the QMP connection it inherits.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import sys
import threading
import time
import weakref
from collections.abc import Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from cbt.core.errors import CbtError, CbtValueError

__all__ = [
    "BITMAP_PREFIX", "Bitmap", "Moment", "QemuDisk", "QemuError", "QmpSession", "View",
    "bitmap_name", "cut", "nbd_socket_name", "recover", "release_leftovers", "resolve_disks",
    "scope_of",
]

BITMAP_PREFIX = "cbt-"
# what cut() names in QEMU: cbt-[<scope>-]<kind><tag>-<disk index>[-c|-f], kind n (overlay
# node; -f its file node), e (export), j (backup job; -c the overlay's creation job)
_OURS = re.compile(r"cbt-(?:([0-9a-f]{8})-)?([nej])[0-9a-f]{8}-[0-9]{1,3}(?:-[cf])?")
_PROTOCOL_DRIVERS = frozenset({
    "file", "host_device", "host_cdrom", "nbd", "iscsi", "rbd", "ssh", "http", "https",
    "null-co", "null-aio", "nvme", "gluster", "copy-before-write", "snapshot-access",
})
# nodes a job (or an administrator) puts over a disk: the disk stays the node below
_FILTER_DRIVERS = frozenset({
    "copy-before-write", "snapshot-access", "throttle", "compress", "preallocate",
    "mirror_top", "commit_top", "blkdebug", "blklogwrites", "blkverify",
})
DEFAULT_TIMEOUT = 30.0

T = TypeVar("T")


class QemuError(CbtError):
    """QMP failed: QEMU unreachable, a command refused, a timeout."""


def scope_of(vault_id: str, vm: str) -> str:
    """The scope of what one vault's job of one VM makes in QEMU: 8 hex digits.

    Two cbt instances (two vaults) may back up the same running VM: each names
    its bitmaps, overlays, exports, jobs and work files with its own scope and
    only ever releases, merges or removes names of its own scope.
    """
    return hashlib.sha256(f"{vault_id}\0{vm}".encode()).hexdigest()[:8]


def _prefix(scope: str) -> str:
    if scope and not re.fullmatch(r"[0-9a-f]{8}", scope):
        raise CbtValueError(f"scope {scope!r}: not 8 hex digits")
    return f"{BITMAP_PREFIX}{scope}-" if scope else BITMAP_PREFIX


def bitmap_name(point_id: str, scope: str = "") -> str:
    """The persistent bitmap a point leaves on each disk: ``cbt-<scope>-<point id>``
    (``cbt-<point id>`` without a scope).

    A point id (``web.20261130T034400Z-2``) is unique and tells an administrator
    looking at ``query-block`` which point the bitmap belongs to.
    """
    # a point id is a VM name (up to 64 characters), a time and a suffix; QEMU takes
    # bitmap names of up to 1023 bytes
    if not re.fullmatch(r"[0-9A-Za-z_.-]{1,200}", point_id):
        raise CbtValueError(f"point id {point_id!r}: not usable in a bitmap name")
    return _prefix(scope) + point_id


def _own_bitmap(name: str, scope: str) -> bool:
    """A bitmap of this scope (without a scope: any cbt bitmap of no scope)."""
    if scope:
        return name.startswith(_prefix(scope))
    return name.startswith(BITMAP_PREFIX) and not re.match(r"cbt-[0-9a-f]{8}-", name)


def _ours(name: str, scope: str, kinds: str = "nej") -> bool:
    """A node, export or job of this scope (cut's names)."""
    m = _OURS.fullmatch(name)
    return m is not None and (m.group(1) or "") == scope and m.group(2) in kinds


def nbd_socket_name(scope: str = "") -> str:
    """cbt's private NBD socket in the work folder (one per scope)."""
    return f"nbd-{scope}.sock" if scope else "nbd.sock"


# -- the synchronous session ---------------------------------------------------------------


def _first_line(text: str) -> str:
    return (text.splitlines() or [""])[0][:200]


_SESSIONS: weakref.WeakSet[QmpSession] = weakref.WeakSet()


def _release_in_child() -> None:
    """After a fork (a transfer worker): let go of every QMP connection of the parent.

    Close-on-exec does not help with fork: a worker would keep QEMU's monitor (one
    client at a time) connected after its parent died, and could talk on it.  The
    socket's descriptor becomes /dev/null in the child (its number stays valid, so
    nothing else is ever closed by mistake) and the session refuses every command.
    """
    for session in list(_SESSIONS):
        session._forsake()


os.register_at_fork(after_in_child=_release_in_child)


class QmpSession:
    """A synchronous QMP connection; every command is bounded by ``timeout`` seconds."""

    def __init__(self, socket: str | os.PathLike[str], timeout: float = DEFAULT_TIMEOUT) -> None:
        from qemu.qmp import QMPClient  # imported here: only QEMU users pay for it

        self.socket = str(socket)
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="cbt-qmp",
                                        daemon=True)
        self._thread.start()
        self._client = QMPClient("cbt")
        self._fd: int | None = None
        self._pid = os.getpid()
        try:
            self._run(self._client.connect(self.socket))
            writer = self._client._writer  # (qemu.qmp names no public way to its socket)
            sock = writer.get_extra_info("socket") if writer is not None else None
            self._fd = sock.fileno() if sock is not None else None
            _SESSIONS.add(self)
        except QemuError as exc:  # connected, no greeting: someone else has the monitor
            self._stop_loop()
            raise QemuError(f"{self.socket}: cannot connect to QMP: {exc}; a QEMU monitor "
                            "serves one client at a time (libvirt keeps its VMs' monitors: "
                            "give QEMU a second -qmp socket for cbt)") from None
        except Exception as exc:
            self._stop_loop()
            raise QemuError(f"{self.socket}: cannot connect to QMP: {exc}") from None

    def _forsake(self) -> None:
        """In a forked child: the parent's connection is no longer this process's."""
        if self._fd is not None:
            null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            os.dup2(null, self._fd, inheritable=False)
            os.close(null)
            self._fd = None

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if os.getpid() != self._pid:  # a forked child: no loop thread, not its monitor
            coro.close()
            raise QemuError(f"{self.socket}: a QMP session cannot be used in a forked process")
        fut = asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro, self.timeout), self._loop)
        try:
            return fut.result(self.timeout + 5)
        except TimeoutError:
            fut.cancel()
            raise QemuError(f"{self.socket}: QMP timed out after {self.timeout:g} s") from None
        except BaseException:  # a signal's abort: the command QEMU runs finishes first, so
            with contextlib.suppress(BaseException):  # the teardown sees what it made
                fut.result(self.timeout + 5)
            raise

    def command(self, name: str, args: Mapping[str, object] | None = None) -> Any:
        """Run one QMP command; its ``return`` value, or :class:`QemuError` naming it."""
        from qemu.qmp import ExecuteError, QMPError

        try:
            return self._run(self._client.execute(name, dict(args) if args else None))
        except ExecuteError as exc:
            raise QemuError(f"{self.socket}: QMP {name} failed: {exc}") from None
        except QMPError as exc:  # the connection, not the command: QEMU stopped?
            raise QemuError(f"{self.socket}: QMP {name}: connection to QEMU lost (did it "
                            f"stop?): {_first_line(str(exc))}") from None

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(self.timeout)
        self._loop.close()

    def close(self) -> None:
        _SESSIONS.discard(self)
        if os.getpid() != self._pid:
            return
        with contextlib.suppress(Exception):
            self._run(self._client.disconnect())
        self._stop_loop()

    def __enter__(self) -> QmpSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_until(self, what: str, done: Any) -> None:
        """Poll ``done()`` until true, or :class:`QemuError` after the timeout."""
        deadline = time.monotonic() + self.timeout
        while not done():
            if time.monotonic() > deadline:
                raise QemuError(f"{self.socket}: timed out waiting for {what}")
            time.sleep(0.02)


# -- disks and bitmaps ---------------------------------------------------------------------


@dataclass(frozen=True)
class Bitmap:
    """One dirty bitmap of a node, as QEMU reports it."""

    name: str
    persistent: bool
    recording: bool
    inconsistent: bool
    granularity: int
    count: int


@dataclass(frozen=True)
class QemuDisk:
    """One disk of the VM: the node cbt reads, its size and format, its bitmaps."""

    label: str
    node: str
    device: str | None
    size: int
    format: str
    bitmaps: tuple[Bitmap, ...] = ()
    filename: str | None = None  # the image file QEMU reports (None: not a plain path)

    def bitmap(self, name: str) -> Bitmap | None:
        return next((b for b in self.bitmaps if b.name == name), None)


def _bitmaps(info: Mapping[str, Any]) -> tuple[Bitmap, ...]:
    return tuple(Bitmap(name=b["name"], persistent=bool(b.get("persistent")),
                        recording=bool(b.get("recording")),
                        inconsistent=bool(b.get("inconsistent")),
                        granularity=int(b.get("granularity", 0)), count=int(b.get("count", 0)))
                 for b in info.get("dirty-bitmaps", ())
                 if isinstance(b.get("name"), str))  # a running backup job's has none


def _nodes(session: QmpSession) -> dict[str, Mapping[str, Any]]:
    return {n["node-name"]: n for n in session.command("query-named-block-nodes", {"flat": True})}


def _disk(label: str, info: Mapping[str, Any], device: str | None) -> QemuDisk:
    image = info.get("image", {})
    return QemuDisk(label=label, node=info["node-name"], device=device,
                    size=int(image.get("virtual-size", 0)), format=str(info.get("drv")),
                    bitmaps=_bitmaps(info), filename=_filename(info.get("file")))


def _filename(value: object) -> str | None:
    """A node's image file as QEMU reports it, if it is a plain absolute path."""
    if isinstance(value, str) and value.startswith("/") and "\0" not in value \
            and len(value) < 4096 and value.isprintable():
        return value
    return None


def _devices(session: QmpSession) -> dict[str, tuple[str, bool, bool]]:
    """Device id (or backend name) -> (node name, writable, removable), from query-block."""
    out: dict[str, tuple[str, bool, bool]] = {}
    for b in session.command("query-block"):
        inserted = b.get("inserted")
        dev = _device_id(b.get("qdev") or "") or b.get("device")
        if inserted and dev:
            out[dev] = (inserted["node-name"], not inserted.get("ro", False),
                        bool(b.get("removable")))
    return out


def _device_id(qdev: str) -> str:
    """``-device ...,id=vda`` -> ``vda``: query-block gives a QOM path for virtio devices."""
    parts = qdev.split("/")
    if qdev.startswith("/machine/peripheral/") and len(parts) > 3:
        return parts[3]
    return qdev


def _top_nodes(session: QmpSession, nodes: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Writable format nodes no other node uses as a child (qemu-storage-daemon has no devices)."""
    graph = session.command("x-debug-query-block-graph")
    by_id = {n["id"]: n for n in graph["nodes"]}

    def above(parent: Mapping[str, Any]) -> bool:
        """A node over a disk that is not a disk of its own: a filter a running job
        inserted (another cbt's copy-before-write) or a fleecing overlay."""
        name = str(parent.get("name"))
        return _OURS.fullmatch(name) is not None or \
            nodes.get(name, {}).get("drv") in _FILTER_DRIVERS
    children = {by_id[e["child"]]["name"] for e in graph["edges"]
                if by_id[e["parent"]]["type"] == "block-driver"
                and not above(by_id[e["parent"]])}
    return [name for name, info in nodes.items()
            if name not in children and not info.get("ro")
            and info.get("drv") not in _PROTOCOL_DRIVERS | _FILTER_DRIVERS
            and not _OURS.fullmatch(name)]


def resolve_disks(session: QmpSession,
                  mapping: Mapping[str, str] | None = None) -> dict[str, QemuDisk]:
    """``label -> disk`` for the mapping (label -> node name or device id).

    Without a mapping: every writable, non-removable disk of the VM, labelled by
    its device id (a ``qemu-storage-daemon`` has no devices: its writable top
    format nodes, labelled by node name).  QEMU's replies are untrusted: one of an
    unexpected shape is a :class:`QemuError` naming the command.
    """
    try:
        return _resolve(session, mapping)
    except CbtError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise QemuError(f"{session.socket}: unexpected reply while resolving the disks "
                        f"(query-block, query-named-block-nodes, x-debug-query-block-graph): "
                        f"{type(exc).__name__}: {_first_line(str(exc))[:100]}") from None


def _resolve(session: QmpSession, mapping: Mapping[str, str] | None) -> dict[str, QemuDisk]:
    nodes = _nodes(session)
    devices = _devices(session)
    if mapping is None:
        picked = {dev: node for dev, (node, writable, removable) in devices.items()
                  if writable and not removable}
        if not devices:
            picked = {node: node for node in _top_nodes(session, nodes)}
        return {label: _disk(label, nodes[node], label if devices else None)
                for label, node in sorted(picked.items())}
    out: dict[str, QemuDisk] = {}
    for label, name in mapping.items():
        if name in devices:
            out[label] = _disk(label, nodes[devices[name][0]], name)
        elif name in nodes:
            out[label] = _disk(label, nodes[name], None)
        else:
            raise CbtValueError(f"{session.socket}: disk {label!r}: no block node or device "
                                f"named {name!r}")
    seen: dict[str, str] = {}
    for label, disk in out.items():  # one node read twice: two bitmaps of one name on it
        if disk.node in seen:
            raise CbtValueError(f"{session.socket}: disks {seen[disk.node]!r} and {label!r} "
                                f"are the same block node {disk.node!r}")
        seen[disk.node] = label
    return out


def _unusable(disk: QemuDisk, previous: str | None, previous_size: int | None,
             scope: str) -> str | None:
    """Why the previous bitmap cannot say what changed on ``disk`` (None: it can)."""
    if previous is None:
        return "first backup: no previous bitmap"
    if not _own_bitmap(previous, scope):
        return f"bitmap {previous!r} is not cbt's"
    if previous_size is not None and previous_size != disk.size:
        return f"disk resized from {previous_size} to {disk.size} bytes"
    bm = disk.bitmap(previous)
    if bm is None:
        return f"bitmap {previous} missing on node {disk.node}"
    if bm.inconsistent:
        return f"bitmap {previous} on node {disk.node} is inconsistent (QEMU stopped uncleanly)"
    if not bm.persistent:
        return f"bitmap {previous} on node {disk.node} is not persistent (not cbt's)"
    return None


def recover(session: QmpSession, disks: Mapping[str, QemuDisk],
            previous: str | None, scope: str = "") -> dict[str, list[str]]:
    """Before a run: fold bitmaps left by a killed run back into ``previous``.

    Every other bitmap of ``scope`` on a disk is merged into the previous point's
    bitmap (when that one is usable; a superset never loses a change), which is
    re-enabled; the leftovers, and inconsistent ones, are removed.  A bitmap of
    another scope (another vault's) is never touched.  Returns ``label -> names
    removed``.
    """
    done: dict[str, list[str]] = {}
    for label, disk in disks.items():
        prev = disk.bitmap(previous) if previous else None
        usable = prev is not None and not prev.inconsistent
        removed: list[str] = []
        for bm in disk.bitmaps:
            if not _own_bitmap(bm.name, scope) or bm.name == previous:
                continue
            if usable and not bm.inconsistent:
                session.command("block-dirty-bitmap-merge", {
                    "node": disk.node, "target": previous, "bitmaps": [bm.name]})
            session.command("block-dirty-bitmap-remove", {"node": disk.node, "name": bm.name})
            removed.append(bm.name)
        if usable and prev is not None and not prev.recording:
            session.command("block-dirty-bitmap-enable", {"node": disk.node, "name": previous})
        if removed:
            done[label] = removed
    return done


# -- the moment ----------------------------------------------------------------------------


@dataclass
class View:
    """One disk's point-in-time view, exported read-only over NBD."""

    label: str
    disk: QemuDisk
    export: str  # NBD export name
    node: str  # the fleecing overlay node
    overlay: Path
    job: str
    bitmap: str | None  # the previous bitmap, published as qemu:dirty-bitmap:NAME (None: hash)
    new_bitmap: str

    @property
    def bitmap_context(self) -> str | None:
        return None if self.bitmap is None else f"qemu:dirty-bitmap:{self.bitmap}"


@dataclass
class Moment:
    """Every disk of the VM at one moment; :meth:`commit` when the point is stored."""

    nbd_socket: Path
    views: dict[str, View]
    reasons: dict[str, str]  # label -> why the bitmap cannot be used (hash scan)
    previous: str | None = None  # the previous point's bitmap name, as the caller gave it
    started_server: bool = False
    committed: bool = False
    scope: str = ""
    left: str | None = None  # committed, then tearing down or settling the bitmaps failed

    def uri(self, label: str) -> str:
        return f"nbd+unix:///{self.views[label].export}?socket={self.nbd_socket}"

    def commit(self) -> None:
        self.committed = True


def _remove_inconsistent(session: QmpSession, disks: Mapping[str, QemuDisk],
                         scope: str) -> None:
    for disk in disks.values():
        for bm in disk.bitmaps:
            if bm.inconsistent and _own_bitmap(bm.name, scope):
                session.command("block-dirty-bitmap-remove", {"node": disk.node, "name": bm.name})


def _prepare(session: QmpSession, disks: Mapping[str, QemuDisk], point_id: str,
             previous: str | None, previous_sizes: Mapping[str, int],
             workdir: Path, scope: str) -> tuple[dict[str, View], dict[str, str]]:
    """Overlay nodes (one per disk) and what each view will publish."""
    views: dict[str, View] = {}
    reasons: dict[str, str] = {}
    new = bitmap_name(point_id, scope)
    # QEMU node names hold at most 31 characters (a point id alone may be longer): the
    # overlays, jobs and exports are named by the scope and a short digest of the point
    # id (cbt-<scope>-n<tag>-<i>-f: 25 characters and the disk index)
    tag = hashlib.sha256(point_id.encode()).hexdigest()[:8]
    pre = _prefix(scope)
    if len(disks) > 999:
        raise QemuError(f"{session.socket}: {len(disks)} disks: at most 999 in one point")
    for i, (label, disk) in enumerate(sorted(disks.items())):
        why = _unusable(disk, previous, previous_sizes.get(label), scope)
        if why is not None:
            reasons[label] = why
        views[label] = View(label=label, disk=disk, export=f"{pre}e{tag}-{i}",
                            node=f"{pre}n{tag}-{i}", overlay=workdir / f"{pre}n{tag}-{i}.qcow2",
                            job=f"{pre}j{tag}-{i}",
                            bitmap=None if why else previous, new_bitmap=new)
    return views, reasons


def _add_overlay(session: QmpSession, view: View) -> None:
    # the work folder is opened without following a link (its owner may have swapped it
    # for one), the overlay made new in it (never an existing file, FIFO or link)
    try:
        dfd = os.open(view.overlay.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        raise QemuError(f"work folder {view.overlay.parent}: {exc.strerror} (not a folder?)"
                        ) from None
    try:
        owner = os.fstat(dfd)
        try:
            fd = os.open(view.overlay.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                         0o600, dir_fd=dfd)
        except FileExistsError:
            raise QemuError(f"{view.overlay}: something is already there (cbt makes its "
                            "overlays new): remove it") from None
        try:  # QEMU may run as another user: the file is the owner's of the work folder
            if os.geteuid() == 0 and (owner.st_uid, owner.st_gid) != (0, 0):
                os.fchown(fd, owner.st_uid, owner.st_gid)
        finally:
            os.close(fd)
    finally:
        os.close(dfd)
    session.command("blockdev-add", {"driver": "file", "node-name": view.node + "-f",
                                     "filename": str(view.overlay)})
    try:
        session.command("blockdev-create", {"job-id": view.job + "-c", "options": {
            "driver": "qcow2", "file": view.node + "-f", "size": view.disk.size}})
        _wait_job_gone(session, view.job + "-c", dismiss=True)
    finally:
        session.command("blockdev-del", {"node-name": view.node + "-f"})
    session.command("blockdev-add", {
        "driver": "qcow2", "node-name": view.node, "backing": view.disk.node,
        "file": {"driver": "file", "filename": str(view.overlay)}})


def _wait_job_gone(session: QmpSession, job: str, *, dismiss: bool = False) -> None:
    def gone() -> bool:
        for j in session.command("query-jobs"):
            if j["id"] != job:
                continue
            if j.get("error"):
                raise QemuError(f"{session.socket}: job {job} failed: {j['error']}")
            if dismiss and j["status"] == "concluded":
                session.command("job-dismiss", {"id": job})
            return False
        return True
    session.wait_until(f"job {job}", gone)


def _transaction(session: QmpSession, views: Mapping[str, View]) -> None:
    actions: list[dict[str, object]] = []
    for v in views.values():
        if v.bitmap is not None:
            actions.append({"type": "block-dirty-bitmap-disable",
                            "data": {"node": v.disk.node, "name": v.bitmap}})
        actions.append({"type": "block-dirty-bitmap-add", "data": {
            "node": v.disk.node, "name": v.new_bitmap, "persistent": True}})
        actions.append({"type": "blockdev-backup", "data": {
            "job-id": v.job, "device": v.disk.node, "target": v.node, "sync": "none"}})
    session.command("transaction", {"actions": actions})


def _export(session: QmpSession, moment: Moment, nbd_socket: Path | None,
            workdir: Path, scope: str) -> None:
    if nbd_socket is None:
        moment.nbd_socket = workdir / nbd_socket_name(scope)
        try:
            session.command("nbd-server-start", {"addr": {"type": "unix", "data": {
                "path": str(moment.nbd_socket)}}})
        except QemuError as exc:
            if "already running" not in str(exc):
                raise
            raise QemuError(f"{session.socket}: this QEMU already runs an NBD server (one at "
                            "a time): give its socket as the VM's nbd") from None
        moment.started_server = True
    for v in moment.views.values():
        args: dict[str, object] = {"type": "nbd", "id": v.export, "node-name": v.node,
                                   "name": v.export, "writable": False}
        if v.bitmap is not None:
            args["bitmaps"] = [{"node": v.disk.node, "name": v.bitmap}]
        try:
            session.command("block-export-add", args)
        except QemuError as exc:
            if nbd_socket is None or "NBD server not running" not in str(exc):
                raise
            raise QemuError(f"{session.socket}: nbd {nbd_socket} is given, but this QEMU "
                            "runs no NBD server (leave nbd out: cbt starts its own)") from None


def _quiet(session: QmpSession, name: str, args: Mapping[str, object]) -> None:
    with contextlib.suppress(QemuError):
        session.command(name, args)


def _release(session: QmpSession, exports: set[str], jobs: set[str], nodes: set[str],
             files: list[Path], stop_server: bool) -> None:
    """Exports (clients cut off), jobs, nodes, overlay files, the NBD server: all gone."""
    for export in exports & {e["id"] for e in session.command("query-block-exports")}:
        _quiet(session, "block-export-del", {"id": export, "mode": "hard"})
    session.wait_until("NBD exports to close", lambda: not (
        {e["id"] for e in session.command("query-block-exports")} & exports))
    running = {j["id"] for j in session.command("query-jobs")}
    for job in sorted(jobs & running):
        _quiet(session, "block-job-cancel", {"device": job, "force": True})
    for job in sorted(jobs):
        _wait_job_gone(session, job, dismiss=True)
    present = set(_nodes(session))
    for node in sorted(nodes & present):  # "X" before "X-f": the overlay before its file
        _quiet(session, "blockdev-del", {"node-name": node})
    for path in files:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    if stop_server:
        _quiet(session, "nbd-server-stop", {})


def _teardown(session: QmpSession, moment: Moment) -> None:
    views = moment.views.values()
    _release(session, {v.export for v in views}, {v.job for v in views} | {
        v.job + "-c" for v in views}, {v.node for v in views} | {v.node + "-f" for v in views},
        [v.overlay for v in views], moment.started_server)


def release_leftovers(session: QmpSession, workdir: Path, scope: str = "") -> list[str]:
    """What a killed run left in QEMU and ``workdir``: exports, jobs, overlays, our NBD server.

    A killed run leaves copy-before-write in the VM's write path and its
    overlay growing: this removes what :func:`cut` names with this ``scope``
    (never another scope's: another vault's run may be reading its view) and
    stops the NBD server when its socket is this scope's private one.
    Returns the names released.
    """
    exports = {e["id"] for e in session.command("query-block-exports")
               if _ours(str(e["id"]), scope, "e")}
    jobs = {j["id"] for j in session.command("query-jobs") if _ours(str(j["id"]), scope, "j")}
    nodes = {n for n in _nodes(session) if _ours(n, scope, "n")}
    files = sorted(p for p in workdir.glob(f"{BITMAP_PREFIX}*.qcow2")
                   if _ours(p.name[:-len(".qcow2")], scope, "n"))
    ours = workdir / nbd_socket_name(scope)
    _release(session, exports, jobs, nodes, files, stop_server=ours.exists())
    with contextlib.suppress(FileNotFoundError):
        ours.unlink()
    return sorted(exports | jobs | nodes | {f.name for f in files})


def _settle_bitmaps(session: QmpSession, moment: Moment, added: bool) -> None:
    """Commit: drop the previous bitmaps.  Otherwise: fold the new ones back into them."""
    if not added:
        return
    for v in moment.views.values():
        node = v.disk.node
        if moment.committed:
            # the previous cbt bitmap goes even when unusable (resized disk); an
            # inconsistent one was removed before the moment
            stale = v.disk.bitmap(moment.previous) if moment.previous else None
            if stale is not None and _own_bitmap(stale.name, moment.scope) \
                    and not stale.inconsistent and stale.name != v.new_bitmap:
                session.command("block-dirty-bitmap-remove", {"node": node, "name": stale.name})
            continue
        if v.bitmap is not None:
            session.command("block-dirty-bitmap-merge", {
                "node": node, "target": v.bitmap, "bitmaps": [v.new_bitmap]})
            session.command("block-dirty-bitmap-enable", {"node": node, "name": v.bitmap})
        session.command("block-dirty-bitmap-remove", {"node": node, "name": v.new_bitmap})


@contextlib.contextmanager
def cut(session: QmpSession, disks: Mapping[str, QemuDisk], point_id: str, workdir: Path, *,
        previous: str | None = None, previous_sizes: Mapping[str, int] | None = None,
        nbd_socket: Path | None = None, on_cut: Callable[[], object] | None = None,
        scope: str = "") -> Iterator[Moment]:
    """Every disk at one moment, exported read-only over NBD, for the ``with`` block.

    ``on_cut`` runs right after the transaction, before the exports (a job
    thaws its guest there: frozen no longer than the moment needs).

    ``previous``: the previous point's bitmap name; ``previous_sizes``: label ->
    the disk's size at that point (a resized disk is hash-scanned).
    ``nbd_socket``: an NBD server this QEMU already runs (else cbt starts one
    on ``workdir/nbd.sock`` and stops it).  Call :meth:`Moment.commit` once the
    point is stored: the previous bitmap is then removed; otherwise the new
    bitmap is merged back into it.  ``scope`` (:func:`scope_of`) names what this
    makes in QEMU and the work folder.
    """
    _remove_inconsistent(session, disks, scope)
    views, reasons = _prepare(session, disks, point_id, previous, previous_sizes or {}, workdir,
                              scope)
    moment = Moment(nbd_socket=nbd_socket or workdir / nbd_socket_name(scope), views=views,
                    reasons=reasons, previous=previous, scope=scope)
    added = False
    try:
        for v in views.values():
            _add_overlay(session, v)
        _transaction(session, views)
        added = True
        if on_cut is not None:
            on_cut()
        _export(session, moment, nbd_socket, workdir, scope)
        yield moment
    finally:
        failing = sys.exc_info()[1]
        try:
            try:
                _teardown(session, moment)
            finally:
                _settle_bitmaps(session, moment, added)
        except QemuError as exc:
            # what went wrong first stays the error (QEMU gone: the teardown fails too);
            # a stored point stays stored; what is left in QEMU the next run releases
            # and folds back
            if failing is not None:
                failing.add_note(f"then: {exc}")
            elif moment.committed:
                moment.left = str(exc)
            else:
                raise

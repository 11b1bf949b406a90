"""The job of a running QEMU VM (``qmp`` in its configuration).

The flow of :mod:`cbt.jobs.job` (recover, record the job, hooks, transfer,
record the end), with QEMU making the point-in-time view
(:mod:`cbt.source.qemu`):

1. Connect to QMP; release what a killed run left (overlay nodes, exports,
   jobs, cbt's private NBD server); resolve the disks (``disks``, or every
   writable, non-removable disk); fold bitmaps left by a killed run back into
   the previous point's bitmap (:func:`cbt.source.qemu.recover`).
2. Quiesce: the host pre hook, then with ``guest_agent`` a
   ``guest-fsfreeze-freeze`` (timeout: the hooks' timeout, else 60 s).  A
   failure of either falls back to crash consistency and says why (or fails
   the job with ``on_pre_failure = "fail"``).  An agent freeze alone gives
   ``file-system``; with a host pre hook that succeeded, or ``provides =
   "application"`` written in ``hooks``, ``application``.
3. One QMP transaction over every disk (:func:`cbt.source.qemu.cut`), then at
   once the thaw and the post hook, also whenever anything failed.
4. Transfer: each view read over NBD, one worker per disk; the previous
   point's bitmap says what changed (``qemu-bitmap``), else every allocated
   block is hashed, with the reason (first backup, missing, inconsistent or
   foreign bitmap, resized disk, ``change_tracking = "hash"``).
5. Once the point is committed the previous bitmap goes; on any failure or
   abort the new one is merged back into it.

The work folder (fleecing overlays, cbt's private NBD socket) is
``<QMP socket>.cbt`` beside the QMP socket: QEMU created its socket there, so
that file system is one QEMU can reach, and the path stays short enough for a
unix socket.  When cbt runs as root and the QMP socket is another user's (QEMU
dropped its privileges), the folder (mode 0700) and the overlays belong to that
user, so QEMU can create and write them and nobody else can read the old data
they hold.  A folder found there must be a folder (not a link) of ours or of the
socket's owner; it is changed only through a descriptor opened without following
links, and the overlays are made new in it (never an existing file, FIFO or link).
The overlays hold the old data of every block the guest writes while the disks
are read: on a tmpfs (``/run``) that is RAM (and swap), so a busy guest and a long
transfer cost memory there; put the QMP socket on a disk-backed file system for
big, busy VMs.

Two vaults may back up one VM: what each makes in QEMU is scoped by the vault and
the VM (:func:`cbt.source.qemu.scope_of`).  SIGTERM and SIGINT wait while the thaw,
QEMU's teardown and the session's close run (:func:`cbt.jobs.signals.signals_deferred`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from cbt.format.records import NAME_RE, DiskRecord, JobRecord, PointRecord
from cbt.jobs.config import VMConfig
from cbt.jobs.hooks import HookResult
from cbt.jobs.job import Job, JobFailed
from cbt.jobs.signals import signals_deferred
from cbt.ops.backup import BackupRequest, backup_locked
from cbt.repo.registry import save_job
from cbt.source.changes import ChangeHint
from cbt.source.disks import DiskSpec, NbdExport
from cbt.source.guest_agent import GuestAgent, GuestAgentError
from cbt.source.nbd import NbdSource
from cbt.source.plan import block_ranges
from cbt.source.qemu import (
    Moment,
    QemuDisk,
    QmpSession,
    bitmap_name,
    cut,
    nbd_socket_name,
    recover,
    release_leftovers,
    resolve_disks,
    scope_of,
)

__all__ = ["PROVIDER", "AgentResult", "QemuJob", "thaw_interrupted", "workdir_for"]

PROVIDER = "qemu"  # what a QEMU disk's snapshot provider is called (jobs, config check)
AGENT_TIMEOUT = 60.0  # freeze/thaw without hooks.timeout
MAX_SOCKET_PATH = 107  # bytes of a unix socket path
T = TypeVar("T")


@dataclass
class AgentResult:
    """One guest agent call (freeze or thaw), recorded beside the hooks in the job record."""

    phase: str  # guest-freeze or guest-thaw
    ok: bool
    file_systems: int | None
    seconds: float
    error: str | None = None

    def describe(self) -> str:
        what = "freeze" if self.phase == "guest-freeze" else "thaw"
        if self.ok:
            return f"guest agent {what} succeeded ({self.file_systems} file systems)"
        return f"guest agent {what} failed: {self.error}"

    def to_record(self) -> dict[str, Any]:
        """An entry of the job record's ``hooks``, with their keys (and ``file_systems``)."""
        return {"phase": self.phase, "ok": self.ok, "exit_code": None, "timed_out": False,
                "seconds": round(self.seconds, 3), "error": self.error, "stdout": "",
                "stderr": "", "file_systems": self.file_systems}


def agent_call(socket: str, phase: str, timeout: float) -> AgentResult:
    """Sync with the agent, then freeze or thaw; never raises :class:`GuestAgentError`."""
    started = time.monotonic()
    try:
        with GuestAgent(socket, timeout) as ga:
            if phase == "guest-freeze":
                ga.sync()
                n = ga.freeze()
            else:
                n = ga.sync_and_thaw()
    except GuestAgentError as exc:
        return AgentResult(phase, False, None, time.monotonic() - started, str(exc))
    return AgentResult(phase, True, n, time.monotonic() - started)


def _agent_timeout(vmc: VMConfig) -> float:
    return vmc.hooks.timeout if vmc.hooks else AGENT_TIMEOUT


def thaw_interrupted(vmc: VMConfig, rec: JobRecord, warnings: list[str]) -> None:
    """A dead job of this VM may have left its guest frozen: thaw it (recover)."""
    agent = [h.get("phase") for h in rec.hooks
             if isinstance(h, dict) and h.get("phase") in ("guest-freeze", "guest-thaw")]
    if not vmc.guest_agent or not agent or agent[-1] != "guest-freeze":
        return
    res = agent_call(vmc.guest_agent, "guest-thaw", _agent_timeout(vmc))
    rec.hooks.append(res.to_record())
    if not res.ok:
        warnings.append(f"thaw of interrupted job {rec.id}: {res.describe()}")


def workdir_for(vmc: VMConfig, scope: str = "") -> Path:
    """``<QMP socket>.cbt``: created (0700), owned by the QMP socket's owner when we are root.

    The socket may sit in a folder others can write (``/tmp``): a folder already
    there must be a real folder (not a symlink) owned by us or by the socket's
    owner; it is changed through a descriptor opened without following links,
    so nothing outside it is ever chowned or chmodded.
    """
    assert vmc.qmp is not None
    qmp = Path(vmc.qmp)
    work = qmp.with_name(qmp.name + ".cbt")
    sock = work / nbd_socket_name(scope)
    if vmc.nbd is None and len(os.fsencode(sock)) > MAX_SOCKET_PATH:
        raise JobFailed(f"vm {vmc.name}: the QMP socket's path is too long for cbt's NBD "
                        f"socket beside it ({sock}): give the VM's nbd")
    try:
        owner = os.stat(qmp)  # (a link to the socket is fine: its owner counts)
    except FileNotFoundError:
        raise JobFailed(f"vm {vmc.name}: no QMP socket {qmp} (is the VM running?)") from None
    if not stat.S_ISSOCK(owner.st_mode):
        raise JobFailed(f"vm {vmc.name}: qmp {qmp} is not a socket")
    with contextlib.suppress(FileExistsError):
        os.mkdir(work, 0o700)
    try:
        fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        raise JobFailed(f"vm {vmc.name}: work folder {work} is not a folder (a symlink or "
                        "another file is there): remove it") from None
    try:
        here = os.fstat(fd)
        if here.st_uid not in (os.geteuid(), owner.st_uid):
            raise JobFailed(f"vm {vmc.name}: work folder {work} belongs to uid {here.st_uid}, "
                            f"not to us nor to the QMP socket's owner: remove it")
        if os.geteuid() == 0 and (here.st_uid, here.st_gid) != (owner.st_uid, owner.st_gid):
            os.fchown(fd, owner.st_uid, owner.st_gid)
        if stat.S_IMODE(here.st_mode) != 0o700:
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)
    return work


class _ExitWhole(contextlib.AbstractContextManager[T]):
    """A context whose exit (``cut``'s teardown and bitmaps, the QMP session's close: a
    monitor left connected serves nobody else) runs under :func:`signals_deferred`."""

    def __init__(self, inner: contextlib.AbstractContextManager[T]) -> None:
        self.inner = inner

    def __enter__(self) -> T:
        return self.inner.__enter__()

    def __exit__(self, *exc: Any) -> bool | None:
        with signals_deferred():
            return self.inner.__exit__(*exc)


def disk_path(disk: QemuDisk) -> str:
    """How a point names a QEMU disk: its image file, else ``qemu:<node>``."""
    return disk.filename or f"{PROVIDER}:{disk.node}"


def qemu_changes(moment: Moment, hash_only: bool, label: str, parent: DiskRecord | None,
                 block_size: int, size: int) -> ChangeHint:
    """What the previous point's bitmap says changed in ``label`` (blocks any dirty byte
    touches: the bitmap's granularity may differ from the block size), or why not."""
    if hash_only:
        return ChangeHint.hash('change_tracking = "hash"')
    why = moment.reasons.get(label)
    view = moment.views[label]
    if why is None and parent is not None and parent.path != disk_path(view.disk):
        # every disk carries the point's bitmap name: another disk's is not this label's
        why = f"disk {label} was {parent.path}, now {disk_path(view.disk)}"
    if why is not None or view.bitmap is None:
        return ChangeHint.hash(why or "no previous bitmap")
    with NbdSource(str(moment.nbd_socket), view.export, bitmaps=(view.bitmap,)) as src:
        extents = src.dirty_ranges(view.bitmap)
    return ChangeHint("qemu-bitmap", tuple(block_ranges(extents, block_size)))


class QemuJob(Job):
    """The job of a running QEMU VM: steps 1 to 5 of the module docstring."""

    disks: dict[str, QemuDisk]
    scope = ""  # scope_of(the vault's id, the VM): names what this job makes in QEMU
    agent: AgentResult | None = None  # the freeze
    freezing = False  # a freeze was attempted: thaw is due

    def _steps(self) -> PointRecord:
        vmc = self.vmc
        self.scope = scope_of(str(self.vault.config["id"]), vmc.name)
        workdir = workdir_for(vmc, self.scope)
        parent = self.vault.latest(vmc.name)
        previous = bitmap_name(parent.id, self.scope) if parent is not None else None
        with _ExitWhole(QmpSession(str(vmc.qmp))) as session:
            self.open_qemu(session, workdir, previous)
            self.pre_hook()
            try:
                self.freeze()
                with _ExitWhole(cut(
                        session, self.disks, self.point_id, workdir, previous=previous,
                        previous_sizes={d.label: d.size for d in parent.disks}
                        if parent is not None else {},
                        nbd_socket=Path(vmc.nbd) if vmc.nbd else None,
                        on_cut=self.after_cut, scope=self.scope)) as moment:
                    point = self.transfer_views(moment)
                    moment.commit()
                if moment.left:  # (said, not stored: the point is)
                    point.warnings.append(f"the point is stored, but QEMU could not be "
                                          f"cleaned up after it: {moment.left}")
            finally:
                self.thaw()
                self.post_hook()
        return point

    def after_cut(self) -> None:
        """Step 3: thaw and the post hook, right after the transaction."""
        self.thaw()
        self.post_hook()

    def open_qemu(self, session: QmpSession, workdir: Path, previous: str | None) -> None:
        """Step 1: leftovers released, disks resolved, a killed run's bitmaps folded back."""
        vmc = self.vmc
        released = release_leftovers(session, workdir, self.scope)
        if released:
            self.warnings.append(f"released what an earlier run left in QEMU: "
                                 f"{', '.join(released)}")
        mapping = vmc.disks or None
        disks = resolve_disks(session, mapping)
        for label, disk in disks.items():  # (a label QEMU chose: its device id or node)
            if not NAME_RE.match(label):
                raise JobFailed(f"vm {vmc.name}: QEMU's disk {label!r} (node {disk.node!r}) "
                                f"is no usable label: name it in disks, e.g. disks = "
                                f"{{ {re.sub(r'[^A-Za-z0-9_-]', '_', label)[:64] or 'disk'} = "
                                f"{json.dumps(label)} }}")
        folded = recover(session, disks, previous, self.scope)
        if folded:
            self.warnings.append("bitmaps an earlier run left folded into "
                                 f"{previous or 'nothing (removed)'}: " + ", ".join(
                                     f"{label}: {' '.join(names)}"
                                     for label, names in sorted(folded.items())))
            disks = resolve_disks(session, mapping)
        if not disks:
            raise JobFailed(f"vm {vmc.name}: QEMU at {vmc.qmp} has no writable disk to back up")
        self.disks = disks
        self.providers = {label: PROVIDER for label in disks}

    def freeze(self) -> None:
        """Step 2 (after the pre hook): the guest agent's freeze, recorded; a failure falls
        back like a failed pre hook."""
        vmc = self.vmc
        if not vmc.guest_agent:
            return
        self.record.hook_pending = True  # a dead job's recover thaws the guest
        self.hooks_started = True
        self.freezing = True
        self.record.hooks.append({"phase": "guest-freeze", "ok": False, "exit_code": None,
                                  "timed_out": False, "seconds": 0.0, "error": "running",
                                  "stdout": "", "stderr": "", "file_systems": None})
        save_job(self.vault, self.record)
        self.agent = agent_call(vmc.guest_agent, "guest-freeze", _agent_timeout(vmc))
        self.record.hooks[-1] = self.agent.to_record()
        if not self.agent.ok and vmc.hooks and vmc.hooks.on_pre_failure == "fail":
            raise JobFailed(f"{self.agent.describe()} (on_pre_failure = \"fail\")")

    def thaw(self) -> None:
        """Step 3: thaw once, whenever a freeze was attempted (even one that failed)."""
        if not self.freezing:
            return
        assert self.vmc.guest_agent is not None
        with signals_deferred():  # a signal now would leave the guest frozen
            res = agent_call(self.vmc.guest_agent, "guest-thaw", _agent_timeout(self.vmc))
            self.freezing = False
            self.record.hooks.append(res.to_record())
            save_job(self.vault, self.record)  # a dead job's recover need not thaw again
        if not res.ok and self.agent is not None and self.agent.ok:
            self.warnings.append(res.describe())

    def transfer_views(self, moment: Moment) -> PointRecord:
        """Step 4: each disk's view over NBD, the bitmap's changes; commit the point."""
        vmc, request = self.vmc, self.request
        specs = [DiskSpec(label, disk_path(self.disks[label]),
                          nbd=NbdExport(str(moment.nbd_socket), view.export))
                 for label, view in moment.views.items()]
        return backup_locked(self.vault, BackupRequest(
            vmc.name, specs, block_size=vmc.block_size, workers=request.workers,
            progress=request.progress, created=request.created,
            consistency=qemu_consistency(vmc, self.pre, self.agent),
            executor=request.executor, point_id=self.point_id, warnings=self.warnings,
            slot=request.slot, before_commit=self.post_hook,
            ignore_stop_signals=request.finish_on_stop_signal,
            full_scan=request.full_scan, verify_fraction=vmc.verify_fraction,
            changes=partial(qemu_changes, moment, vmc.change_tracking == "hash")))


def qemu_consistency(vmc: VMConfig, pre: HookResult | None,
                     agent: AgentResult | None) -> tuple[str, str]:
    """Level and reason: what quiesced the VM (and what failed) before the one moment."""
    cut_how = "every disk cut at one moment (one QMP transaction)"
    failed = [r.describe() for r in (pre, agent) if r is not None and not r.ok]
    if failed:
        return "crash", "; ".join([*failed, cut_how])
    hooks = vmc.hooks
    if pre is not None:  # succeeded
        level = hooks.provides if hooks else "application"
        done = ["pre hook succeeded"] + ([agent.describe()] if agent else [])
        return level, "; ".join([*done, cut_how])
    if agent is not None:
        level = ("application" if hooks and hooks.provides_given
                 and hooks.provides == "application" else "file-system")
        return level, f"{agent.describe()}; {cut_how}"
    none = "no pre hook" if hooks and hooks.post else "no hooks"
    return "crash", f"{none}, no guest agent; {cut_how}"


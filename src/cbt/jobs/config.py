"""Configuration: a TOML file naming the vault, the policies and the VMs.

1. Parse with ``tomllib``.
2. Walk the document against the schema below: unknown keys, wrong types and
   bad values are errors naming the dotted key (``vm.web.hooks.timeout``) and
   the line where it can be found.
3. Resolve paths: ``vault`` (an ``s3://BUCKET/PREFIX`` is kept as it is), disk
   paths and ``snapshot_dir`` against the config file's folder; a hook's
   argv[0] without ``/`` on PATH.  Hooks run in the config file's folder.

Shape (everything but ``vault``, ``policy.*.schedule``, ``vm.*.policy`` and
``vm.*.disks`` has the default shown)::

    vault = "vault"
    [policy.daily]
    schedule = "daily 02:00"
    timezone = "UTC"
    retention = { daily = 7, weekly = 4, monthly = 12, yearly = 3 }   # absent: keep all
                  # also last = N, hourly = N, within = "1y2m3d4h" (restic's --keep-*)
    instant_restore_days = 0
    [vm.web]
    policy = "daily"
    disks = { os = "disks/os.img", db = "disks/db.img" }
    snapshot = "auto"             # auto | reflink | btrfs | copy | none
    snapshot_dir = ""             # default: beside each disk
    block_size = "16K"
    change_tracking = "auto"      # or "hash": always read every allocated block
    verify_fraction = 0.03125     # 0 to 1: the unchanged blocks re-hashed each run (1/32)
    host = ""                     # the host that holds the disks ("": this one)
    [vm.web.hooks]
    pre = ["/usr/local/bin/quiesce"]
    post = ["/usr/local/bin/resume"]
    timeout = 60
    on_pre_failure = "fallback"   # or "fail"
    provides = "application"      # or "file-system"
    [maintenance]                 # absent: the daemon never prunes nor collects garbage
    schedule = "daily 03:00"      # required in the table; the syntax of policy schedules
    timezone = "UTC"
    prune = true                  # remove the points the policies' retention no longer keeps
    gc = true                     # then free the blocks no point references
    gc_grace = 3600               # seconds trashed packs stay readable (gc --grace)
    wait = 3600                   # seconds prune waits for running backups (then next slot)
    state_dir = ""                # where the daemon records the slot done (default: systemd's
                                  # $STATE_DIRECTORY, else $XDG_STATE_HOME/cbt, ~/.local/state/cbt)

A VM whose disks lie on another host names it (``host = "hv1"``): its backup runs on a
Dask cluster (``cbt backup --config F --executor dask://HOST:PORT``), each disk opened,
mapped and read by the workers that serve that host (started with ``--resources
host-hv1=1``; :mod:`cbt.jobs.dask_executor`).  The coordinator cannot snapshot a disk
it does not see: such a VM is read live (``snapshot = "none"``, the default with
``host``; a pre hook may quiesce it), and ``qmp`` is not allowed with it.

A running QEMU VM (:mod:`cbt.jobs.qemu`) names its QMP socket instead of disk
paths; ``snapshot`` and ``snapshot_dir`` are not allowed then (QEMU makes the
point-in-time view)::

    [vm.web]
    policy = "daily"
    qmp = "/run/qemu/web.qmp"       # QMP socket of the QEMU (or qemu-storage-daemon)
    guest_agent = "/run/qemu/web.qga"   # optional: freeze/thaw through the guest agent
    disks = { os = "os", db = "db" }    # optional: label -> block node name or device id
                                        # (default: every writable, non-removable disk)
    nbd = "/run/qemu/web.nbd"       # optional: socket of an NBD server QEMU already runs

Its ``hooks`` run around the guest agent's freeze (pre hook, freeze, the cut,
thaw, post hook); the freeze's timeout is ``hooks.timeout``.  An agent freeze
alone gives ``file-system`` consistency, ``application`` when ``provides =
"application"`` is written in ``hooks`` (the guest's own fsfreeze hook scripts
quiesce its applications).
"""

from __future__ import annotations

import os
import re
import shutil
import tomllib
import zoneinfo
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cbt.core.errors import CbtError, CbtValueError
from cbt.core.sizes import parse_size
from cbt.jobs.policy import Policy, Retention, Schedule, parse_schedule, parse_within
from cbt.repo.storage import check_location, is_url
from cbt.source.changes import DEFAULT_VERIFY_FRACTION, TRACKING_MODES

PROVIDERS = ("auto", "reflink", "btrfs", "copy", "none")
Provider = Literal["auto", "reflink", "btrfs", "copy", "none"]
OnPreFailure = Literal["fallback", "fail"]
Provides = Literal["application", "file-system"]  # the level a succeeded pre hook gives
ChangeTracking = Literal["auto", "hash"]  # cbt.source.changes.TRACKING_MODES


MAX_HOOK_TIMEOUT = 86400.0  # hooks.timeout: seconds, above 0, at most a day
MAX_KEEP = 100_000  # each retention count


class ConfigError(CbtError, ValueError):
    """A configuration file is malformed: says which key and where."""


@dataclass(frozen=True)
class Hooks:
    pre: tuple[str, ...] = ()
    post: tuple[str, ...] = ()
    timeout: float = 60.0
    on_pre_failure: OnPreFailure = "fallback"
    provides: Provides = "application"
    cwd: str | None = None  # hooks run in the config file's folder
    # ``provides`` was written in the file (a QEMU VM's agent freeze alone then counts as
    # ``application``: the guest's fsfreeze hook scripts quiesce its applications)
    provides_given: bool = field(default=False, compare=False)


@dataclass(frozen=True)
class VMConfig:
    name: str
    policy: str
    disks: dict[str, str]  # label -> absolute path
    snapshot: Provider = "auto"
    snapshot_dir: str | None = None
    block_size: int | None = None
    hooks: Hooks | None = None
    # ``auto``: the cheapest change source that can be trusted; ``hash``: read every block
    change_tracking: ChangeTracking = "auto"
    verify_fraction: float = DEFAULT_VERIFY_FRACTION  # of the unchanged blocks, re-hashed
    # a running QEMU VM: its QMP socket (absolute); ``disks`` then maps label -> block
    # node name or device id (empty: every writable, non-removable disk of the VM)
    qmp: str | None = None
    guest_agent: str | None = None  # the QEMU guest agent's socket (absolute): freeze/thaw
    nbd: str | None = None  # an NBD server the QEMU already runs (absolute socket path)
    host: str | None = None  # the host that holds the disks (a Dask cluster's workers read them)

    @property
    def qemu(self) -> bool:
        """Whether this VM is a running QEMU (``qmp`` set)."""
        return self.qmp is not None


@dataclass(frozen=True)
class Maintenance:
    """``[maintenance]``: when ``cbt daemon`` runs prune and gc (:mod:`cbt.jobs.scheduler`)."""

    schedule: Schedule
    timezone: str = "UTC"
    prune: bool = True
    gc: bool = True
    gc_grace: float = 3600.0
    wait: float = 3600.0  # for prune's exclusive lock (and gc's): then the next slot
    state_dir: str | None = None  # absolute; None: $STATE_DIRECTORY, $XDG_STATE_HOME/cbt, ...
    max_unused: float | None = None  # gc --max-unused (percent); None: gc's default


@dataclass(frozen=True)
class Config:
    path: str
    vault: str
    policies: dict[str, Policy]
    vms: dict[str, VMConfig]
    warnings: list[str] = field(default_factory=list)
    maintenance: Maintenance | None = None


class _Where:
    """Finds the line of a dotted key in the TOML text (for error messages)."""

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()

    def line(self, dotted: str) -> int | None:
        parts = dotted.split(".")
        table: list[str] = []
        best = None
        for no, raw in enumerate(self.lines, 1):
            line = raw.split("#", 1)[0].strip()
            m = re.match(r"^\[\s*([^\]]+?)\s*\]$", line)
            if m:
                table = [p.strip().strip('"') for p in m.group(1).split(".")]
                if table[:len(parts)] == parts:  # [vm.web] for vm.web, [vms.web] for vms
                    return no
                continue
            m = re.match(r'^"?([A-Za-z0-9_-]+)"?\s*=', line)
            if not m:
                continue
            full = [*table, m.group(1)]
            if full == parts:
                return no
            # a key inside an inline table on this line (hooks = { timeout = 3 })
            if parts[: len(full)] == full and len(parts) > len(full):
                rest = parts[len(full):]
                if re.search(r"[{,]\s*\"?" + re.escape(rest[-1]) + r"\"?\s*=", line):
                    return no
                best = best or no
        return best


def _err(where: _Where, path: str, dotted: str, message: str) -> ConfigError:
    line = where.line(dotted)
    at = f"{path}:{line}" if line else path
    return ConfigError(f"{at}: {dotted}: {message}")


def _check_keys(where: _Where, path: str, prefix: str, table: dict[str, Any],
                allowed: set[str], required: set[str] = frozenset()) -> None:  # type: ignore[assignment]
    for key in table:
        if key not in allowed:
            raise _err(where, path, f"{prefix}{key}", f"unknown key (allowed: "
                       f"{', '.join(sorted(allowed))})")
    for key in sorted(required):
        if key not in table:
            raise _err(where, path, prefix.rstrip(".") or key,
                       f"missing required key {key!r}" if prefix else "missing required key")


def _typed(where: _Where, path: str, dotted: str, value: Any, kind: type | tuple[type, ...],
           what: str) -> Any:
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise _err(where, path, dotted, f"must be {what}")
    if not isinstance(value, kind):
        raise _err(where, path, dotted, f"must be {what}")
    return value


def load(path: str | os.PathLike[str]) -> Config:
    """Read, validate and resolve a configuration file."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError(f"no such config file: {p}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {p}: {exc}") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    except RecursionError:  # (tomllib recurses into nested arrays and tables)
        raise ConfigError(f"{p}: not valid TOML: nested too deeply") from None
    return parse(doc, text, str(p))


def parse(doc: dict[str, Any], text: str, path: str) -> Config:
    where = _Where(text)
    base = Path(path).resolve().parent
    _check_keys(where, path, "", doc, {"vault", "policy", "vm", "maintenance"}, {"vault"})
    vault = _typed(where, path, "vault", doc["vault"], str,
                   "a path or s3://BUCKET/PREFIX (string)")
    try:
        check_location(vault)
    except CbtValueError as exc:
        raise _err(where, path, "vault", str(exc)) from None
    policies: dict[str, Policy] = {}
    for name, table in _typed(where, path, "policy", doc.get("policy", {}), dict,
                              "a table of policies").items():
        policies[name] = _policy(where, path, name, table)
    vms: dict[str, VMConfig] = {}
    for name, table in _typed(where, path, "vm", doc.get("vm", {}), dict,
                              "a table of VMs").items():
        vms[name] = _vm(where, path, base, name, table, policies)
    maintenance = (_maintenance(where, path, base, doc["maintenance"])
                   if "maintenance" in doc else None)
    if not is_url(vault):  # (an s3:// location is where it says, not under the file's folder)
        vault = str((base / vault).resolve())
    return Config(path=path, vault=vault, policies=policies, vms=vms, maintenance=maintenance)


MAX_MAINTENANCE_SECONDS = 7 * 86400.0  # gc_grace and wait: up to a week


def _maintenance(where: _Where, path: str, base: Path, table: Any) -> Maintenance:
    """The ``[maintenance]`` table."""
    pre = "maintenance."
    _typed(where, path, "maintenance", table, dict, "a table")
    _check_keys(where, path, pre, table, {"schedule", "timezone", "prune", "gc", "gc_grace",
                                          "wait", "state_dir", "max_unused"}, {"schedule"})
    schedule, tz = _schedule(where, path, pre, table)
    flags = {k: _typed(where, path, pre + k, table.get(k, True), bool, "true or false")
             for k in ("prune", "gc")}
    seconds = {}
    for key in ("gc_grace", "wait"):
        value = _typed(where, path, pre + key, table.get(key, 3600), (int, float),
                       "a number of seconds")
        if not 0 <= value <= MAX_MAINTENANCE_SECONDS:  # nan and inf too
            raise _err(where, path, pre + key, f"must be a number of seconds from 0 to "
                       f"{MAX_MAINTENANCE_SECONDS:.0f} (a week)")
        seconds[key] = float(value)
    state_dir = None
    if table.get("state_dir", ""):
        sd = _typed(where, path, pre + "state_dir", table["state_dir"], str, "a path")
        if "\0" in sd:
            raise _err(where, path, pre + "state_dir", "must be a path")
        state_dir = str((base / sd).absolute())
    max_unused = None
    if "max_unused" in table:
        max_unused = float(_typed(where, path, pre + "max_unused", table["max_unused"],
                                  (int, float), "a percentage"))
        if not 0 <= max_unused <= 100:  # nan too
            raise _err(where, path, pre + "max_unused", "must be a percentage from 0 to 100")
    return Maintenance(schedule, tz, flags["prune"], flags["gc"], seconds["gc_grace"],
                       seconds["wait"], state_dir, max_unused)


def _schedule(where: _Where, path: str, pre: str, table: dict[str, Any]) -> tuple[Schedule, str]:
    """A table's ``schedule`` and ``timezone`` (a policy's, or maintenance's)."""
    try:
        schedule = parse_schedule(_typed(where, path, pre + "schedule", table["schedule"], str,
                                         "a string"))
    except CbtValueError as exc:
        raise _err(where, path, pre + "schedule", str(exc)) from None
    tz = _typed(where, path, pre + "timezone", table.get("timezone", "UTC"), str, "a string")
    try:
        zoneinfo.ZoneInfo(tz)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise _err(where, path, pre + "timezone", f"unknown time zone {tz!r}") from None
    return schedule, tz


def _policy(where: _Where, path: str, name: str, table: Any) -> Policy:
    pre = f"policy.{name}."
    _typed(where, path, pre[:-1], table, dict, "a table")
    _check_keys(where, path, pre, table,
                {"schedule", "timezone", "retention", "instant_restore_days"}, {"schedule"})
    schedule, tz = _schedule(where, path, pre, table)
    retention = Retention(keep_all=True)
    if "retention" in table:
        retention = _retention(where, path, pre + "retention",
                               _typed(where, path, pre + "retention", table["retention"], dict,
                                      "a table"))
    days = _typed(where, path, pre + "instant_restore_days",
                  table.get("instant_restore_days", 0), int, "a whole number")
    if not 0 <= days <= 30:
        raise _err(where, path, pre + "instant_restore_days", "must be from 0 to 30")
    return Policy(name, schedule, tz, retention, days)


RETENTION_COUNTS = ("last", "hourly", "daily", "weekly", "monthly", "yearly")


def _retention(where: _Where, path: str, dotted: str, r: dict[str, Any]) -> Retention:
    """A policy's retention table: whole-number counts, and ``within`` (a duration)."""
    _check_keys(where, path, dotted + ".", r, {*RETENTION_COUNTS, "within"})
    counts: dict[str, Any] = {}
    for k, v in r.items():
        key = f"{dotted}.{k}"
        if k == "within":
            try:
                counts[k] = parse_within(_typed(where, path, key, v, str, "a string"))
            except CbtValueError as exc:
                raise _err(where, path, key, str(exc)) from None
            continue
        _typed(where, path, key, v, int, "a whole number")
        if not 0 <= v <= MAX_KEEP:
            raise _err(where, path, key, f"must be from 0 to {MAX_KEEP}")
        counts[k] = v
    return Retention(**counts)


def _argv(where: _Where, path: str, dotted: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise _err(where, path, dotted, "must be a non-empty list of strings (an argv, "
                   "never a shell string)")
    prog = value[0]
    if "/" not in prog:
        found = shutil.which(prog)
        if found is None:
            raise _err(where, path, dotted, f"{prog!r} not found on PATH")
        prog = found
    return (prog, *value[1:])


def _vm(where: _Where, path: str, base: Path, name: str, table: Any,
        policies: dict[str, Policy]) -> VMConfig:
    from cbt.format.records import NAME_RE

    pre = f"vm.{name}."
    if not NAME_RE.match(name):
        raise _err(where, path, pre[:-1], "invalid VM name (letters, digits, '_', '-')")
    _typed(where, path, pre[:-1], table, dict, "a table")
    qemu = "qmp" in table
    _check_keys(where, path, pre, table, {"policy", "disks", "snapshot", "snapshot_dir",
                                         "block_size", "hooks", "change_tracking",
                                         "verify_fraction", "qmp", "guest_agent", "nbd",
                                         "host"},
                {"policy"} if qemu else {"policy", "disks"})
    policy = _typed(where, path, pre + "policy", table["policy"], str, "a policy name")
    if policy not in policies:
        raise _err(where, path, pre + "policy", f"no policy named {policy!r}")
    sockets = _qemu_sockets(where, path, base, pre, table)
    disks = (_qemu_disks(where, path, pre, table.get("disks", {})) if qemu
             else _disks(where, path, base, pre, table["disks"]))
    host = _host(where, path, pre, table)
    snapshot = _typed(where, path, pre + "snapshot",
                      table.get("snapshot", "auto" if host is None else "none"), str,
                      "a string")
    if snapshot not in PROVIDERS:
        raise _err(where, path, pre + "snapshot", f"must be one of {', '.join(PROVIDERS)}")
    snapshot_dir = None
    if "snapshot_dir" in table:
        sd = _typed(where, path, pre + "snapshot_dir", table["snapshot_dir"], str, "a path")
        snapshot_dir = str((base / sd).absolute())
    block_size = None
    if "block_size" in table:
        block_size = _block_size(where, path, pre + "block_size", table["block_size"])
    hooks = None
    if "hooks" in table:
        hooks = _hooks(where, path, base, pre + "hooks", table["hooks"])
    tracking, fraction = _tracking(where, path, pre, table)
    return VMConfig(name, policy, disks, snapshot, snapshot_dir, block_size, hooks, tracking,
                    fraction, *sockets, host=host)


HOST_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:\[\]-]{0,252}")


def _host(where: _Where, path: str, pre: str, table: dict[str, Any]) -> str | None:
    """A VM's ``host`` (None: this one); such a VM is read live, never from QEMU."""
    if "host" not in table:
        return None
    host: str = _typed(where, path, pre + "host", table["host"], str, "a host name (string)")
    if host == "":  # (the default the shape shows: this host)
        return None
    if not HOST_RE.fullmatch(host):
        raise _err(where, path, pre + "host", f"{host!r} is not a host name")
    if "qmp" in table:
        raise _err(where, path, pre + "host", "not allowed with qmp (a QEMU VM is backed up "
                   "from its own host)")
    if table.get("snapshot", "none") != "none" or "snapshot_dir" in table:
        raise _err(where, path, pre + "snapshot" if "snapshot" in table else
                   pre + "snapshot_dir", "a VM on another host is read live (snapshot = "
                   "\"none\"): cbt cannot snapshot a disk it does not see (a pre hook may "
                   "quiesce the VM)")
    return host


def _qemu_sockets(where: _Where, path: str, base: Path, pre: str, table: dict[str, Any]
                  ) -> tuple[str | None, str | None, str | None]:
    """A QEMU VM's ``qmp``, ``guest_agent`` and ``nbd`` sockets (absolute), all None for
    a VM of image files; ``snapshot`` and ``snapshot_dir`` are refused beside ``qmp``."""
    found: dict[str, str] = {}
    for key in ("qmp", "guest_agent", "nbd"):
        if key in table:
            value = _typed(where, path, pre + key, table[key], str, "a socket path (string)")
            if not value or "\0" in value:
                raise _err(where, path, pre + key, "must be a socket path")
            found[key] = str((base / value).absolute())
    if "qmp" not in found:
        for key in found:
            raise _err(where, path, pre + key, "needs qmp (the QMP socket of the VM's QEMU)")
        return None, None, None
    for key in ("snapshot", "snapshot_dir"):
        if key in table:
            raise _err(where, path, pre + key, "not allowed with qmp: QEMU makes the "
                       "point-in-time view of a running VM's disks")
    return found["qmp"], found.get("guest_agent"), found.get("nbd")


def _qemu_disks(where: _Where, path: str, pre: str, value: Any) -> dict[str, str]:
    """A QEMU VM's ``disks``: label -> block node name or device id (may be empty)."""
    from cbt.format.records import NAME_RE

    disks_t = _typed(where, path, pre + "disks", value, dict,
                     "a table of label = block node name or device id")
    disks = {}
    for label, name in disks_t.items():
        if not NAME_RE.match(label):
            raise _err(where, path, f"{pre}disks.{label}", "invalid disk label")
        _typed(where, path, f"{pre}disks.{label}", name, str,
               "a block node name or device id (string)")
        if not re.fullmatch(r"[A-Za-z0-9_.#/+-]{1,128}", name):
            raise _err(where, path, f"{pre}disks.{label}",
                       f"{name!r} is not a block node name or device id")
        disks[label] = name
    return disks


def _tracking(where: _Where, path: str, pre: str, table: dict[str, Any]
              ) -> tuple[ChangeTracking, float]:
    """A VM's ``change_tracking`` and ``verify_fraction``."""
    mode = _typed(where, path, pre + "change_tracking", table.get("change_tracking", "auto"),
                  str, "a string")
    if mode not in TRACKING_MODES:
        raise _err(where, path, pre + "change_tracking",
                   f"must be one of {', '.join(TRACKING_MODES)}")
    fraction = _typed(where, path, pre + "verify_fraction",
                      table.get("verify_fraction", DEFAULT_VERIFY_FRACTION), (int, float),
                      "a number from 0 to 1")
    if not 0 <= fraction <= 1:  # nan too
        raise _err(where, path, pre + "verify_fraction", "must be a number from 0 to 1")
    return ("hash" if mode == "hash" else "auto"), float(fraction)


def _disks(where: _Where, path: str, base: Path, pre: str, value: Any) -> dict[str, str]:
    from cbt.format.records import NAME_RE

    disks_t = _typed(where, path, pre + "disks", value, dict, "a table of label = path")
    if not disks_t:
        raise _err(where, path, pre + "disks", "needs at least one disk")
    disks = {}
    for label, dpath in disks_t.items():
        if not NAME_RE.match(label):
            raise _err(where, path, f"{pre}disks.{label}", "invalid disk label")
        _typed(where, path, f"{pre}disks.{label}", dpath, str, "a path (string)")
        disks[label] = str((base / dpath).absolute())
    return disks


def _block_size(where: _Where, path: str, dotted: str, value: Any) -> int:
    try:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise CbtValueError("must be a size such as 16K or integer bytes")
        block_size = parse_size(value)
        from cbt.core.native import fast

        fast.check_block_size(block_size)
    except CbtValueError as exc:
        raise _err(where, path, dotted, str(exc)) from None
    except OverflowError:  # beyond the core's integers
        raise _err(where, path, dotted, "block size must be a power of two from 4K to 4M"
                   ) from None
    return block_size


def _hooks(where: _Where, path: str, base: Path, dotted: str, value: Any) -> Hooks:
    h = _typed(where, path, dotted, value, dict, "a table")
    hp = dotted + "."
    _check_keys(where, path, hp, h, {"pre", "post", "timeout", "on_pre_failure", "provides"})
    timeout = _typed(where, path, hp + "timeout", h.get("timeout", 60), (int, float),
                     "a number of seconds")
    if not 0 < timeout <= MAX_HOOK_TIMEOUT:  # nan, inf, zero, negative, too large
        raise _err(where, path, hp + "timeout", f"must be a number of seconds above 0 and at "
                   f"most {MAX_HOOK_TIMEOUT:.0f} (a day)")
    opf = _typed(where, path, hp + "on_pre_failure", h.get("on_pre_failure", "fallback"),
                 str, "a string")
    if opf not in ("fallback", "fail"):
        raise _err(where, path, hp + "on_pre_failure", "must be 'fallback' or 'fail'")
    provides = _typed(where, path, hp + "provides", h.get("provides", "application"), str,
                      "a string")
    if provides not in ("application", "file-system"):
        raise _err(where, path, hp + "provides", "must be 'application' or 'file-system'")
    return Hooks(
        pre=_argv(where, path, hp + "pre", h["pre"]) if "pre" in h else (),
        post=_argv(where, path, hp + "post", h["post"]) if "post" in h else (),
        timeout=float(timeout), on_pre_failure=opf, provides=provides, cwd=str(base),
        provides_given="provides" in h)

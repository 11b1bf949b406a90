"""Prometheus textfile metrics of scheduled backups (``run-due`` and ``daemon --metrics``).

For node_exporter's textfile collector (``--collector.textfile.directory``):

1. Per VM of the config, from the vault (so a one-shot ``run-due`` and a restarted
   daemon say the same): its newest visible point created at or before now (one
   from the future would hide that backups stopped): its creation time, how long it
   took, bytes read, new and stored, consistency level; and whether the latest slot
   of its schedule has a point.  From this process: how many of its jobs failed.
2. Maintenance (the daemon's prune and gc): from its state record
   (:mod:`cbt.jobs.scheduler`).
3. Format: ``# HELP`` and ``# TYPE`` lines, then samples; names start with ``cbt_``;
   label values escaped as the exposition format says (backslash, double quote,
   newline), valid UTF-8 (a lone surrogate, which a JSON record from an untrusted
   vault may hold, becomes U+FFFD) and at most :data:`MAX_LABEL` characters (a
   crafted consistency level neither breaks the file nor bloats it).
4. Write to a hidden temporary file in the same folder (the collector reads only
   ``*.prom``), fsync, rename over FILE (:func:`cbt.core.durable.atomic_file`): a
   scrape never sees half a file.  Mode 0644, whatever the umask: the exporter
   runs as another user.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from cbt.core.durable import atomic_file
from cbt.core.timefmt import parse_now
from cbt.format.records import PointRecord

LEVELS = ("application", "file-system", "crash")
MAX_LABEL = 128  # characters of a label value (the longest VM name is 64)
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class VMMetrics:
    """What the metrics say about one VM."""

    vm: str
    point: PointRecord | None  # its newest visible point
    slot_missed: bool  # its latest slot has no point
    failures: int  # its jobs that failed in this process


@dataclass(frozen=True)
class MaintenanceMetrics:
    """The daemon's last maintenance run (unix seconds; None: never)."""

    last_run: float | None
    last_ok: bool
    last_success: float | None


def escape_label(value: str) -> str:
    """A label value as the text exposition format writes it (step 3)."""
    value = _SURROGATE.sub("\ufffd", value[:MAX_LABEL])
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _unix(rfc3339: str) -> float:
    return parse_now(rfc3339).timestamp()


def _family(name: str, kind: str, help_text: str,
            samples: Iterable[tuple[dict[str, str], float]]) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        text = ",".join(f'{k}="{escape_label(v)}"' for k, v in labels.items())
        lines.append(f"{name}{{{text}}} {_number(value)}" if text else f"{name} {_number(value)}")
    return lines


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def render(vms: list[VMMetrics], maintenance: MaintenanceMetrics | None = None) -> str:
    """The text of the metrics file."""
    done = [(m, m.point) for m in vms if m.point is not None]
    per_point: list[tuple[str, str, Callable[[PointRecord], float]]] = [
        ("cbt_last_success_timestamp_seconds", "Creation time of the VM's newest recovery "
         "point (unix seconds)", lambda p: _unix(p.created)),
        ("cbt_last_duration_seconds", "Seconds the VM's newest point took to read and store "
         "its disks", lambda p: p.seconds),
        ("cbt_last_read_bytes", "Bytes read from the VM's disks for its newest point",
         lambda p: sum(d.bytes_read for d in p.disks)),
        ("cbt_last_new_bytes", "Bytes of the VM's newest point the vault did not hold yet",
         lambda p: p.bytes_new),
        ("cbt_last_stored_bytes", "Bytes the vault stored for the VM's newest point "
         "(compressed, encrypted)", lambda p: p.bytes_stored),
    ]
    lines: list[str] = []
    for name, text, get in per_point:
        lines += _family(name, "gauge", text, (({"vm": m.vm}, get(p)) for m, p in done))
    lines += _family(
        "cbt_last_consistency", "gauge", "1 for the consistency level of the VM's newest "
        "point (application, file-system, crash), 0 for the others",
        ((({"vm": m.vm, "consistency": level}), float(level == p.consistency))
         for m, p in done for level in _levels(p.consistency)))
    lines += _family("cbt_slot_missed", "gauge", "1 when the latest slot of the VM's schedule "
                     "has no point (its job failed or has not run yet)",
                     (({"vm": m.vm}, float(m.slot_missed)) for m in vms))
    lines += _family("cbt_job_failures_total", "counter", "Jobs of the VM that failed since "
                     "this process started (the daemon; run-due: this run)",
                     (({"vm": m.vm}, float(m.failures)) for m in vms))
    if maintenance is not None:
        lines += _maintenance(maintenance)
    return "\n".join(lines) + "\n"


def _levels(level: str) -> tuple[str, ...]:
    return LEVELS if level in LEVELS else (*LEVELS, level)


def _maintenance(m: MaintenanceMetrics) -> list[str]:
    lines: list[str] = []
    if m.last_run is not None:
        lines += _family("cbt_maintenance_last_run_timestamp_seconds", "gauge",
                         "When the daemon's last maintenance run (prune, gc) ended",
                         [({}, m.last_run)])
        lines += _family("cbt_maintenance_last_run_success", "gauge",
                         "1 when the daemon's last maintenance run did all it was to do",
                         [({}, float(m.last_ok))])
    if m.last_success is not None:
        lines += _family("cbt_maintenance_last_success_timestamp_seconds", "gauge",
                         "When the daemon's last maintenance run that did all it was to do "
                         "ended", [({}, m.last_success)])
    return lines


def write_textfile(path: str | os.PathLike[str], text: str) -> None:
    """Step 4: ``text`` into ``path``, whole or not at all; readable by everyone (the
    exporter runs as another user; cbt's units set a umask of 077)."""
    with atomic_file(path) as f:
        os.fchmod(f.fileno(), 0o644)
        f.write(text.encode())

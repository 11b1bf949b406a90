"""Work with configuration files.

  cbt config check FILE [--json]

Validates FILE (unknown keys, types, schedules, time zones, hooks on PATH)
and prints the resolved plan: the vault, and for each VM its policy and each
disk with its path and the snapshot provider it will use ("auto" resolved by
probing the file system).  Errors name the dotted key and the line.

A running QEMU VM (``qmp``) shows its QMP socket, guest agent and NBD socket,
and each disk as the block node name or device id it names, with provider
"qemu" (QEMU makes the point-in-time view); without ``disks``, one line says
every writable, non-removable disk of the VM is backed up.  Nothing connects to
QEMU here.

--json prints {"vault","vms":[{"name","policy","disks":[{"label","path",
"snapshot"}],"qmp","guest_agent","nbd","host"}],"warnings"}; "qmp", "guest_agent"
and "nbd" are null for a VM of image files; a QEMU disk's "path" is its node name or
device id; "host" is the host that holds a VM's disks (config key ``host``: read
there by a Dask cluster's workers), null for this one; "maintenance" is
{"schedule","timezone","prune","gc","gc_grace","wait","state_file"} (the daemon's
prune and gc, and the file recording the slot done), null without the table.
"""

from __future__ import annotations

import argparse
from typing import Any

from cbt.cli._common import EXIT_OK, add_json, print_json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["check"], help="what to do: check")
    p.add_argument("file", metavar="FILE", help="the configuration file (TOML)")
    add_json(p)


def run(args: argparse.Namespace) -> int:
    from cbt.jobs.config import load
    from cbt.source.snapshot import resolve_provider

    config = load(args.file)
    vms: list[dict[str, Any]] = []
    for vm in config.vms.values():
        providers = ({label: "qemu" for label in vm.disks} if vm.qemu else
                     resolve_provider(vm.snapshot, vm.name, vm.disks, vm.snapshot_dir))
        vms.append({"name": vm.name, "policy": vm.policy,
                    "disks": [{"label": label, "path": path, "snapshot": providers[label]}
                              for label, path in vm.disks.items()],
                    "qmp": vm.qmp, "guest_agent": vm.guest_agent, "nbd": vm.nbd,
                    "host": vm.host})
    m = _maintenance(config)
    if args.json:
        print_json({"vault": config.vault, "vms": vms, "maintenance": m,
                    "warnings": config.warnings})
        return EXIT_OK
    print(f"{args.file}: ok; vault {config.vault}")
    for name, policy in config.policies.items():
        print(f"  policy {name}: {policy.schedule.text} ({policy.timezone})")
    if m is not None:
        steps = " then ".join(k for k in ("prune", "gc") if m[k]) or "nothing"
        print(f"  maintenance: {m['schedule']} ({m['timezone']}): {steps}; "
              f"state {m['state_file']}")
    for plan in vms:
        host = f" on host {plan['host']}" if plan["host"] is not None else ""
        print(f"  vm {plan['name']} (policy {plan['policy']}){host}")
        _print_qemu(plan)
        for d in plan["disks"]:
            print(f"    {d['label']:<12} {d['snapshot']:<8} {d['path']}")
    return EXIT_OK


def _maintenance(config: Any) -> dict[str, Any] | None:
    """The ``[maintenance]`` table as ``--json`` says it (None without it)."""
    from cbt.jobs.scheduler import state_path

    m = config.maintenance
    if m is None:
        return None
    return {"schedule": m.schedule.text, "timezone": m.timezone, "prune": m.prune,
            "gc": m.gc, "gc_grace": m.gc_grace, "wait": m.wait,
            "state_file": str(state_path(config))}


def _print_qemu(plan: dict[str, Any]) -> None:
    """A QEMU VM's sockets, and what its disks are when none are named."""
    if plan["qmp"] is None:
        return
    print(f"    qmp          {plan['qmp']}")
    for key in ("guest_agent", "nbd"):
        if plan[key] is not None:
            print(f"    {key:<12} {plan[key]}")
    if not plan["disks"]:
        print(f"    {'(all)':<12} {'qemu':<8} every writable, non-removable disk of the VM")

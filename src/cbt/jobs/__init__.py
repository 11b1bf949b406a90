"""Layer 5: backup jobs as policies run them.

``config`` (TOML), ``policy`` (schedules, retention), ``retention`` (a config's
retention applied to a vault), ``hooks``, ``job`` (one VM's job: hooks,
snapshots, transfer, commit, history), ``qemu`` (the job of a running QEMU VM),
``runner`` (recover, then run a VM's job), ``scheduler`` (due slots, run-due,
daemon) and ``demo``.

``cbt.jobs.run`` (-> ``list[JobResult]``) and ``JobRequest`` load on first use,
so that importing ``cbt.jobs.config`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cbt.jobs.job import JobRequest, JobResult
    from cbt.jobs.runner import run

_JOB_NAMES = ("JobRequest", "JobResult", "run")


def __getattr__(name: str) -> object:
    if name in _JOB_NAMES:
        from cbt.jobs import job, runner

        return getattr(runner if name == "run" else job, name)
    raise AttributeError(f"module 'cbt.jobs' has no attribute {name!r}")


__all__ = ["JobRequest", "JobResult", "run"]

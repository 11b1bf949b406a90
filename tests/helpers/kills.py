"""A child process that SIGKILLs itself after its N-th durable storage call, and copies of
the vault it is let loose on (the kill-at-every-step tests of gc and index merges)."""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Iterator
from pathlib import Path

from cbt.repo.stores import storage_at

# Python source a child runs first: ``killing(storage, names, kill_at)`` wraps those
# methods of ``storage`` so that the process SIGKILLs itself after the ``kill_at``-th
# call returned; ``steps[0]`` counts the calls.
KILLING = r"""
import os, signal, sys

steps = [0]


def killing(storage, names, kill_at):
    def wrap(method):
        def step(*args, **kwargs):
            out = method(*args, **kwargs)
            steps[0] += 1
            if steps[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        return step
    for name in names:
        setattr(storage, name, wrap(getattr(storage, name)))
"""


def kill_steps(shard: int = 0, shards: int = 1) -> Iterator[int]:
    """The steps one shard of a kill-at-every-step test kills its child at: ``shard + 1``,
    ``shard + 1 + shards``, ... until that test stops at its first child that finishes.
    The ``shards`` tests together kill at every step of the run (each step is tried by
    exactly one of them), and run side by side under pytest-xdist: on S3 each step
    waits out whole-second times, so one test trying them all took minutes."""
    return itertools.count(shard + 1, shards)


def copy_vault(src: Path | str, dst: Path | str) -> None:
    """The vault at ``src`` copied to ``dst`` (a directory's with its files' times; an
    S3 vault's object by object, its times then the copy's)."""
    if isinstance(src, Path):
        shutil.copytree(src, dst)
        return
    a, b = storage_at(src), storage_at(dst)
    for name in a.list(""):
        b.put(name, a.get(name))

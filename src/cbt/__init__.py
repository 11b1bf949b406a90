"""cbt: changed-block tracker and incremental disk-image backup engine.

Python API (the command line calls exactly these)::

    import cbt
    m = cbt.scan("disk.img", block_size=64 * 1024)   # -> cbt.Manifest
    m.write("disk.arrow")                            # Arrow IPC, durable
    cs = cbt.diff("old.arrow", "disk.img")           # -> cbt.ChangeSet
    cs.changed_blocks, cs.ranges                     # (offset, length) runs

    vault = cbt.Vault.init("vault")                  # or cbt.Vault.open("vault")
    point = vault.backup("web", ["os=disks/os.img", "disks/db.img"])
    vault.points(vm="web"); vault.restore(point.id, "out/"); vault.verify(data=True)

Importing cbt loads the compiled core and refuses a missing or stale build.
"""

from __future__ import annotations

import os as _os
import sys as _sys

if _os.path.basename(_sys.argv[0] if _sys.argv else "") == "cbt" and "numpy" not in _sys.modules:
    # The command line: numpy's OpenBLAS would start and spin a thread per core at
    # import, competing with the scan on a small machine; cbt uses no BLAS.  (A
    # program importing cbt as a library keeps its own BLAS settings.)
    _os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from cbt._core import fast as _fast
from cbt.diff import ChangeSet, diff, diff_images, diff_manifests
from cbt.errors import CbtError, CbtIOError, CbtValueError, CorruptManifestError
from cbt.manifest import Manifest
from cbt.scan import DEFAULT_BLOCK_SIZE, scan
from cbt.sizes import parse_size
from cbt.vault import Vault

__version__ = "0.1.0"

_SUBMODULES = ("jobs", "config", "policy", "prune", "gc", "restore", "verify", "scheduler",
               "backup", "synth")


def __getattr__(name: str) -> object:
    """``cbt.jobs`` and the other modules load on first use (start-up time counts)."""
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"cbt.{name}")
    raise AttributeError(f"module 'cbt' has no attribute {name!r}")


__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "CbtError",
    "CbtIOError",
    "CbtValueError",
    "ChangeSet",
    "CorruptManifestError",
    "Manifest",
    "Vault",
    "__version__",
    "diff",
    "diff_images",
    "diff_manifests",
    "parse_size",
    "scan",
]

del _fast

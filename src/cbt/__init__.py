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

import types as _types
from typing import TYPE_CHECKING

from cbt._core import fast as _fast  # refuses a missing or stale core at import
from cbt.errors import CbtError, CbtIOError, CbtValueError, CorruptManifestError

if TYPE_CHECKING:
    from cbt.diff import ChangeSet, diff, diff_images, diff_manifests
    from cbt.manifest import Manifest
    from cbt.scan import DEFAULT_BLOCK_SIZE, scan
    from cbt.sizes import parse_size
    from cbt.vault import Vault

__version__ = "0.1.0"

# The API loads on first use: ``cbt scan`` must not pay for numpy, pyarrow or
# the vault at start-up (a whole process is what races b3sum).
_API = {
    "scan": "cbt.scan", "DEFAULT_BLOCK_SIZE": "cbt.scan",
    "diff": "cbt.diff", "diff_images": "cbt.diff", "diff_manifests": "cbt.diff",
    "ChangeSet": "cbt.diff", "Manifest": "cbt.manifest", "Vault": "cbt.vault",
    "parse_size": "cbt.sizes",
}
_SUBMODULES = ("jobs", "config", "policy", "prune", "gc", "restore", "verify", "scheduler",
               "backup", "synth", "manifest", "vault", "sizes", "parallel", "disks")


def __getattr__(name: str) -> object:
    """The API names and ``cbt.jobs`` (and the other modules) load on first use."""
    import importlib

    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"cbt.{name}")
    raise AttributeError(f"module 'cbt' has no attribute {name!r}")


class _Package(_types.ModuleType):
    """The module object of ``cbt``: ``cbt.scan`` and ``cbt.diff`` stay functions.

    Importing a submodule binds it as an attribute of its package, and the
    functions share their modules' names: that binding gets the function.
    """

    def __setattr__(self, name: str, value: object) -> None:
        if name in ("scan", "diff") and isinstance(value, _types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package


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

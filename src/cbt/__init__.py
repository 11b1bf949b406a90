"""cbt: changed-block tracker and incremental disk-image backup engine.

Python API (the command line calls exactly these)::

    import cbt
    m = cbt.scan("disk.img", block_size=64 * 1024)   # -> cbt.Manifest
    m.write("disk.arrow")                            # Arrow IPC, durable
    cs = cbt.diff("old.arrow", "disk.img")           # -> cbt.ChangeSet
    cs.changed_blocks, cs.ranges                     # (offset, length) runs

    vault = cbt.Vault.init("vault")                  # or cbt.Vault.open("vault")
    # or at "s3://bucket/prefix" (AWS_* settings; init makes a missing bucket)
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

from typing import TYPE_CHECKING

from cbt.core.errors import CbtError, CbtIOError, CbtValueError, CorruptManifestError
from cbt.core.native import fast as _fast  # refuses a missing or stale core at import

if TYPE_CHECKING:
    from cbt import jobs
    from cbt.api import DEFAULT_BLOCK_SIZE, Vault, diff, scan
    from cbt.core.sizes import parse_size
    from cbt.format.manifest import Manifest
    from cbt.ops.changeset import ChangeSet, diff_images
    from cbt.ops.diff import PointDiff, diff_manifests

__version__ = "0.1.0"

# The API loads on first use: ``cbt scan`` must not pay for numpy, pyarrow or
# the vault at start-up (a whole process is what races b3sum).
_API = {
    "scan": "cbt.api", "diff": "cbt.api", "Vault": "cbt.api", "DEFAULT_BLOCK_SIZE": "cbt.api",
    "diff_images": "cbt.ops.changeset", "diff_manifests": "cbt.ops.diff",
    "ChangeSet": "cbt.ops.changeset", "PointDiff": "cbt.ops.diff",
    "Manifest": "cbt.format.manifest", "parse_size": "cbt.core.sizes",
}


def __getattr__(name: str) -> object:
    """The API names and ``cbt.jobs`` load on first use."""
    import importlib

    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    if name == "jobs":
        return importlib.import_module("cbt.jobs")
    raise AttributeError(f"module 'cbt' has no attribute {name!r}")


__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "CbtError",
    "CbtIOError",
    "CbtValueError",
    "ChangeSet",
    "CorruptManifestError",
    "Manifest",
    "PointDiff",
    "Vault",
    "__version__",
    "diff",
    "diff_images",
    "diff_manifests",
    "jobs",
    "parse_size",
    "scan",
]

del _fast

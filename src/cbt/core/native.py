"""Loads the compiled core and refuses a missing or stale build.

There is no silent pure-Python fallback: a cbt without its compiled core would
be an order of magnitude slower, and nobody should find that out from a backup
window.  ``_reference`` exists for tests only.
"""

from __future__ import annotations

from types import ModuleType

from cbt.core.errors import CbtError

# The API_VERSION of _fast.pyx this Python code was written against.
EXPECTED_API_VERSION = 5


class CoreMissingError(ImportError, CbtError):
    """The compiled core is absent or was built from other sources."""


def load() -> ModuleType:
    try:
        import cbt.core._fast as _fast
    except ImportError as exc:
        raise CoreMissingError(
            f"cbt's compiled core (cbt.core._fast) is missing: {exc}; "
            "reinstall with 'pip install .' (needs a C compiler)"
        ) from exc
    found = getattr(_fast, "API_VERSION", None)
    if found != EXPECTED_API_VERSION:
        raise CoreMissingError(
            f"cbt's compiled core is stale: API version {found}, expected "
            f"{EXPECTED_API_VERSION}; rebuild with 'pip install .'"
        )
    return _fast


fast = load()

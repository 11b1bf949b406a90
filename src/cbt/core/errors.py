"""The one error hierarchy of cbt.

Every error cbt raises on purpose subclasses both :class:`CbtError` and the
builtin it behaves like (``CbtIOError(OSError, CbtError)``), so callers can catch
either.  The command line turns any ``CbtError`` into one line on stderr and
exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class CbtError(Exception):
    """Base class of every error cbt raises deliberately."""


class CbtValueError(ValueError, CbtError):
    """Bad argument: wrong block size, strided buffer, malformed size string."""


class CbtIOError(OSError, CbtError):
    """A disk, image or file could not be opened, read or written."""


class CorruptManifestError(ValueError, CbtError):
    """A manifest file is truncated, altered or not a cbt manifest at all."""

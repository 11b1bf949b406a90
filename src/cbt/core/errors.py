"""The one error hierarchy of cbt.

Every error cbt raises on purpose subclasses both :class:`CbtError` and the
builtin it behaves like (``CbtIOError(OSError, CbtError)``), so callers can catch
either.  The command line turns any ``CbtError`` into one line on stderr and
exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from typing import Any


class CbtError(Exception):
    """Base class of every error cbt raises deliberately."""


class CbtValueError(ValueError, CbtError):
    """Bad argument: wrong block size, strided buffer, malformed size string."""


class CbtIOError(OSError, CbtError):
    """A disk, image or file could not be opened, read or written.

    ``str()`` is the message alone, as the command line prints it (not
    ``[Errno 5] ...``), also where it is quoted inside another error's message.
    """

    def __str__(self) -> str:
        if self.strerror and self.filename is None:
            return str(self.strerror)
        return super().__str__()


class CorruptManifestError(ValueError, CbtError):
    """A manifest file is truncated, altered or not a cbt manifest at all."""


class SourceReadError(CbtIOError):
    """A disk (image file or block device) failed to read, or shrank while it was read.

    ``path`` is the disk, ``offset`` the first byte that could not be read; the
    message names both and the error.
    """

    def __init__(self, err: int, message: str, path: str, offset: int) -> None:
        super().__init__(err, message)
        self.path = path
        self.offset = offset

    def __reduce__(self) -> tuple[object, ...]:  # (sent back from a forked worker)
        return (type(self), (self.errno, self.strerror, self.path, self.offset))


def untrusted_json(data: bytes | str) -> Any:
    """``json.loads`` of bytes cbt did not write itself (a vault's records and config, a
    hint file, a state record, a guest's or QEMU tool's reply): a document nested too
    deeply for the parser, which recurses, is a ``ValueError`` like any other that is not
    JSON (it was a ``RecursionError``, a traceback past every reader's checks)."""
    import json

    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None

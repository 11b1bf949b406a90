"""Type aliases for buffer-protocol arguments (bytes, bytearray, mmap, numpy)."""

from __future__ import annotations

import mmap

import numpy as np

ReadableBuffer = bytes | bytearray | memoryview | mmap.mmap | np.ndarray
WritableBuffer = bytearray | memoryview | mmap.mmap | np.ndarray

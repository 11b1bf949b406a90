"""Type stub of the compiled core (src/cbt/core/_fast.pyx)."""

from typing import Final

import numpy as np
import numpy.typing as npt

from .buffers import ReadableBuffer, WritableBuffer

API_VERSION: Final[int]
DIGEST_SIZE: Final[int]
FLAG_DATA: Final[int]
FLAG_ZERO: Final[int]
FLAG_HOLE: Final[int]
MIN_BLOCK: Final[int]
MAX_BLOCK: Final[int]
ALL_KERNELS: Final[tuple[str, ...]]
kernel: str

def kernels() -> list[str]: ...
def use_kernel(name: str) -> None: ...
def kernel_error() -> str | None: ...

def check_block_size(block_size: int) -> None: ...
def nblocks(length: int, block_size: int) -> int: ...
def zero_flags(data: ReadableBuffer, block_size: int, flags: WritableBuffer) -> int: ...
def hash_blocks(
    data: ReadableBuffer, block_size: int, digests: WritableBuffer, flags: WritableBuffer,
    key: bytes | None = None,
) -> int: ...
def hash_each(
    buffers: list[ReadableBuffer], digests: WritableBuffer, key: bytes | None = None
) -> int: ...
def compare_digests(a: ReadableBuffer, b: ReadableBuffer, out: WritableBuffer) -> int: ...
def compare_buffers(
    a: ReadableBuffer, b: ReadableBuffer, block_size: int, out: WritableBuffer
) -> int: ...
def bitmap_runs(
    bitmap: ReadableBuffer, block_size: int, total_size: int
) -> npt.NDArray[np.uint64]: ...

STORED_RAW: Final[int]
STORED_LZ4: Final[int]
DECODE_OK: Final[int]
DECODE_BAD_CODEC: Final[int]
DECODE_BAD_PAYLOAD: Final[int]
DECODE_BAD_DIGEST: Final[int]

def lz4_decode(src: ReadableBuffer, out: WritableBuffer) -> bool: ...
def decode_check(
    src: ReadableBuffer, starts: ReadableBuffer, ends: ReadableBuffer, codecs: ReadableBuffer,
    sizes: ReadableBuffer, out: WritableBuffer, digests: ReadableBuffer,
    key: bytes | None = None,
) -> tuple[int, int]: ...

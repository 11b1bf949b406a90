"""Builds the compiled core only; all metadata lives in pyproject.toml.

The core is one extension: the Cython module and cbt's BLAKE3 in C
(src/cbt/core/blake3/: the portable kernel, and on x86 the SSE4.1, AVX2 and
AVX-512 ones, each compiled for its instruction set by a target attribute in
its own file and chosen at run time, so the build runs on any x86-64), and its
LZ4 block decoder in C (src/cbt/core/lz4/: what a restore of an lz4 vault runs).
"""

from Cython.Build import cythonize
from setuptools import Extension, setup

B3 = "src/cbt/core/blake3"
LZ4 = "src/cbt/core/lz4"

setup(
    ext_modules=cythonize(
        [
            Extension(
                "cbt.core._fast",
                ["src/cbt/core/_fast.pyx"]
                + [f"{B3}/{name}.c" for name in ("portable", "dispatch", "sse41", "avx2",
                                                 "avx512")]
                + [f"{LZ4}/decode.c"],
                include_dirs=[B3, LZ4],
                depends=[f"{B3}/cbt_blake3.h", f"{B3}/lanes_simd.h", f"{LZ4}/cbt_lz4.h"],
                extra_compile_args=["-O3"],
            )
        ],
        compiler_directives={"language_level": "3"},
    ),
)

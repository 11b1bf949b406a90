# Declarations of the native core's C-level kernels, for other Cython modules.
from libc.stdint cimport uint8_t, uint64_t

cdef int _zero_kernel(const uint8_t *data, Py_ssize_t length, Py_ssize_t block_size,
                      uint8_t *flags, Py_ssize_t *zeros) noexcept nogil
cdef int _compare_digest_kernel(const uint8_t *a, const uint8_t *b, Py_ssize_t n,
                                uint8_t *out, Py_ssize_t *changed) noexcept nogil
cdef int _compare_buffer_kernel(const uint8_t *a, const uint8_t *b, Py_ssize_t length,
                                Py_ssize_t block_size, uint8_t *out,
                                Py_ssize_t *changed) noexcept nogil

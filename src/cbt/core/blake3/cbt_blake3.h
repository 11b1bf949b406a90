/* cbt's BLAKE3: constants, the lane API and the many-input entry point.
 *
 * Written from the BLAKE3 specification (BLAKE3-team/BLAKE3-specs, blake3.pdf).
 * A "lane function" runs W independent compression chains at once, one per SIMD
 * lane: lane l compresses `nblocks` consecutive 64-byte blocks starting at in[l],
 * chaining from the same starting value `cv`, with its own 64-bit counter and
 * its own extra flags on its last block, and writes its 32-byte chaining value to
 * out[l].  A full chunk is such a chain of 16 blocks; a parent node is a chain of
 * one block (its message is two adjacent chaining values).  See dispatch.c for
 * how whole inputs are turned into lanes.
 */
#ifndef CBT_BLAKE3_H
#define CBT_BLAKE3_H

#include <stddef.h>
#include <stdint.h>

#define CBT_B3_BLOCK 64
#define CBT_B3_CHUNK 1024
#define CBT_B3_OUT 32
#define CBT_B3_MAX_LANES 16

enum {
    CBT_B3_CHUNK_START = 1,
    CBT_B3_CHUNK_END = 2,
    CBT_B3_PARENT = 4,
    CBT_B3_ROOT = 8,
    CBT_B3_KEYED_HASH = 16,
};

enum {
    CBT_B3_PORTABLE = 0,
    CBT_B3_SSE41 = 1,
    CBT_B3_AVX2 = 2,
    CBT_B3_AVX512 = 3,
    CBT_B3_NKERNELS = 4,
};

extern const uint32_t cbt_b3_iv[8];

/* Row r: the message word order of round r (the permutation 2, 6, 3, 10, 7, 0, 4, 13,
 * 1, 11, 12, 5, 9, 14, 15, 8 applied r times).  Static, so that the rounds' message
 * indices are compile-time constants in every kernel. */
__attribute__((unused)) static const uint8_t CBT_B3_SCHEDULE[7][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8},
    {3, 4, 10, 12, 13, 2, 7, 14, 6, 5, 9, 0, 11, 15, 8, 1},
    {10, 7, 12, 9, 14, 3, 13, 15, 4, 0, 11, 2, 5, 8, 1, 6},
    {12, 13, 9, 11, 15, 10, 14, 8, 7, 2, 5, 3, 0, 1, 6, 4},
    {9, 14, 11, 5, 8, 12, 15, 1, 13, 3, 0, 10, 2, 6, 4, 7},
    {11, 15, 5, 0, 1, 9, 8, 6, 14, 10, 2, 12, 3, 4, 7, 13},
};

/* The seven rounds of a compression, R(r) being round r (every kernel unrolls them). */
#define CBT_B3_ROUNDS(R) \
    do {                 \
        R(0);            \
        R(1);            \
        R(2);            \
        R(3);            \
        R(4);            \
        R(5);            \
        R(6);            \
    } while (0)

typedef void (*cbt_b3_lanes_fn)(const uint8_t *const *in, const uint64_t *counter,
                                const uint32_t *last_flags, uint8_t *const *out,
                                size_t nblocks, const uint32_t cv[8], uint32_t flags,
                                uint32_t first_flags);

/* One compression, the chaining value (the output's first 8 words) in place. */
void cbt_b3_compress(uint32_t cv[8], const uint8_t block[CBT_B3_BLOCK], uint32_t block_len,
                     uint64_t counter, uint32_t flags);

void cbt_b3_lanes_portable(const uint8_t *const *in, const uint64_t *counter,
                           const uint32_t *last_flags, uint8_t *const *out, size_t nblocks,
                           const uint32_t cv[8], uint32_t flags, uint32_t first_flags);
#if defined(__x86_64__) || defined(__i386__)
void cbt_b3_lanes_sse41(const uint8_t *const *in, const uint64_t *counter,
                        const uint32_t *last_flags, uint8_t *const *out, size_t nblocks,
                        const uint32_t cv[8], uint32_t flags, uint32_t first_flags);
void cbt_b3_lanes_avx2(const uint8_t *const *in, const uint64_t *counter,
                       const uint32_t *last_flags, uint8_t *const *out, size_t nblocks,
                       const uint32_t cv[8], uint32_t flags, uint32_t first_flags);
void cbt_b3_lanes_avx512(const uint8_t *const *in, const uint64_t *counter,
                         const uint32_t *last_flags, uint8_t *const *out, size_t nblocks,
                         const uint32_t cv[8], uint32_t flags, uint32_t first_flags);
#endif

/* Dispatch (dispatch.c). */
const char *cbt_b3_kernel_name(int kernel);     /* NULL for an unknown index */
int cbt_b3_kernel_supported(int kernel);        /* 1 if this CPU can run it */
int cbt_b3_best_kernel(void);
int cbt_b3_use_kernel(int kernel);              /* 0, or -1 if unsupported */
int cbt_b3_current_kernel(void);

/* BLAKE3 (32-byte output) of n inputs: outs[i] = BLAKE3(inputs[i][0:lens[i]]), keyed
 * with the 32-byte key when key is not NULL.  Returns 0, or -1 out of memory. */
int cbt_b3_hash_many(const uint8_t *const *inputs, const size_t *lens, uint8_t *const *outs,
                     size_t n, const uint8_t *key);

#endif

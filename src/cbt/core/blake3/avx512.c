/* The AVX-512 lane function: 16 lanes of 32-bit words in 512-bit vectors
 * (AVX-512F; the rotations are single vprord instructions). */
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#include <string.h>

#include "cbt_blake3.h"

#define W 16
#define KTARGET __attribute__((target("avx512f,avx512vl")))
#define LANES_FN cbt_b3_lanes_avx512
typedef __m512i V;

KTARGET static inline V v_set1(uint32_t x) { return _mm512_set1_epi32((int)x); }
KTARGET static inline V v_add(V a, V b) { return _mm512_add_epi32(a, b); }
KTARGET static inline V v_xor(V a, V b) { return _mm512_xor_si512(a, b); }
KTARGET static inline V v_or(V a, V b) { return _mm512_or_si512(a, b); }
KTARGET static inline V v_loadu(const uint32_t *p) { return _mm512_loadu_si512((const void *)p); }
KTARGET static inline void v_storeu(uint32_t *p, V x) { _mm512_storeu_si512((void *)p, x); }
KTARGET static inline V v_rot16(V x) { return _mm512_ror_epi32(x, 16); }
KTARGET static inline V v_rot12(V x) { return _mm512_ror_epi32(x, 12); }
KTARGET static inline V v_rot8(V x) { return _mm512_ror_epi32(x, 8); }
KTARGET static inline V v_rot7(V x) { return _mm512_ror_epi32(x, 7); }

/* Rows r[0..15] (the 16 words of a block of lanes 0..15) to columns m[j] (word j of
 * the 16 lanes): 32-bit then 64-bit interleaves inside each 128-bit quarter, then
 * two rounds of quarter shuffles. */
KTARGET static inline void load_msg(const uint8_t *const *in, size_t off, V m[16])
{
    V r[16], t[16], u[16];
    for (int l = 0; l < 16; l++)
        r[l] = _mm512_loadu_si512((const void *)(in[l] + off));
    for (int p = 0; p < 8; p++) {
        t[2 * p] = _mm512_unpacklo_epi32(r[2 * p], r[2 * p + 1]);
        t[2 * p + 1] = _mm512_unpackhi_epi32(r[2 * p], r[2 * p + 1]);
    }
    /* u[4g + j], quarter q: rows 4g..4g+3, word 4q + j */
    for (int g = 0; g < 4; g++) {
        u[4 * g] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
        u[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
        u[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
        u[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
    }
    for (int j = 0; j < 4; j++) {
        V s0 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0x44);      /* A0 A1 B0 B1 */
        V s1 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0x44); /* C0 C1 D0 D1 */
        V s2 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0xEE);      /* A2 A3 B2 B3 */
        V s3 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0xEE); /* C2 C3 D2 D3 */
        m[j] = _mm512_shuffle_i32x4(s0, s1, 0x88);
        m[4 + j] = _mm512_shuffle_i32x4(s0, s1, 0xDD);
        m[8 + j] = _mm512_shuffle_i32x4(s2, s3, 0x88);
        m[12 + j] = _mm512_shuffle_i32x4(s2, s3, 0xDD);
    }
}

#include "lanes_simd.h"
#endif

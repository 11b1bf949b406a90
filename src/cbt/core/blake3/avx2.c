/* The AVX2 lane function: 8 lanes of 32-bit words in 256-bit vectors. */
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#include <string.h>

#include "cbt_blake3.h"

#define W 8
#define KTARGET __attribute__((target("avx2")))
#define LANES_FN cbt_b3_lanes_avx2
typedef __m256i V;

KTARGET static inline V v_set1(uint32_t x) { return _mm256_set1_epi32((int)x); }
KTARGET static inline V v_add(V a, V b) { return _mm256_add_epi32(a, b); }
KTARGET static inline V v_xor(V a, V b) { return _mm256_xor_si256(a, b); }
KTARGET static inline V v_or(V a, V b) { return _mm256_or_si256(a, b); }
KTARGET static inline V v_loadu(const uint32_t *p) { return _mm256_loadu_si256((const V *)p); }
KTARGET static inline void v_storeu(uint32_t *p, V x) { _mm256_storeu_si256((V *)p, x); }
KTARGET static inline V v_rot16(V x)
{
    return _mm256_shuffle_epi8(x, _mm256_set_epi8(13, 12, 15, 14, 9, 8, 11, 10, 5, 4, 7, 6, 1, 0, 3, 2,
                                                  13, 12, 15, 14, 9, 8, 11, 10, 5, 4, 7, 6, 1, 0, 3, 2));
}
KTARGET static inline V v_rot8(V x)
{
    return _mm256_shuffle_epi8(x, _mm256_set_epi8(12, 15, 14, 13, 8, 11, 10, 9, 4, 7, 6, 5, 0, 3, 2, 1,
                                                  12, 15, 14, 13, 8, 11, 10, 9, 4, 7, 6, 5, 0, 3, 2, 1));
}
KTARGET static inline V v_rot12(V x) { return _mm256_or_si256(_mm256_srli_epi32(x, 12), _mm256_slli_epi32(x, 20)); }
KTARGET static inline V v_rot7(V x) { return _mm256_or_si256(_mm256_srli_epi32(x, 7), _mm256_slli_epi32(x, 25)); }

/* Rows r[0..7] (8 words of lanes 0..7) to columns (word j of the 8 lanes). */
KTARGET static inline void transpose8(V r[8])
{
    V t0 = _mm256_unpacklo_epi32(r[0], r[1]), t1 = _mm256_unpackhi_epi32(r[0], r[1]);
    V t2 = _mm256_unpacklo_epi32(r[2], r[3]), t3 = _mm256_unpackhi_epi32(r[2], r[3]);
    V t4 = _mm256_unpacklo_epi32(r[4], r[5]), t5 = _mm256_unpackhi_epi32(r[4], r[5]);
    V t6 = _mm256_unpacklo_epi32(r[6], r[7]), t7 = _mm256_unpackhi_epi32(r[6], r[7]);
    V u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);
    V u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);
    V u4 = _mm256_unpacklo_epi64(t4, t6), u5 = _mm256_unpackhi_epi64(t4, t6);
    V u6 = _mm256_unpacklo_epi64(t5, t7), u7 = _mm256_unpackhi_epi64(t5, t7);
    r[0] = _mm256_permute2x128_si256(u0, u4, 0x20);
    r[4] = _mm256_permute2x128_si256(u0, u4, 0x31);
    r[1] = _mm256_permute2x128_si256(u1, u5, 0x20);
    r[5] = _mm256_permute2x128_si256(u1, u5, 0x31);
    r[2] = _mm256_permute2x128_si256(u2, u6, 0x20);
    r[6] = _mm256_permute2x128_si256(u2, u6, 0x31);
    r[3] = _mm256_permute2x128_si256(u3, u7, 0x20);
    r[7] = _mm256_permute2x128_si256(u3, u7, 0x31);
}

KTARGET static inline void load_msg(const uint8_t *const *in, size_t off, V m[16])
{
    for (int half = 0; half < 2; half++) {
        V r[8];
        for (int l = 0; l < 8; l++)
            r[l] = _mm256_loadu_si256((const V *)(in[l] + off + 32 * half));
        transpose8(r);
        for (int j = 0; j < 8; j++)
            m[8 * half + j] = r[j];
    }
}

#include "lanes_simd.h"
#endif

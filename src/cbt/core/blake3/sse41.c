/* The SSE4.1 lane function: 4 lanes of 32-bit words in 128-bit vectors. */
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#include <string.h>

#include "cbt_blake3.h"

#define W 4
#define KTARGET __attribute__((target("sse4.1")))
#define LANES_FN cbt_b3_lanes_sse41
typedef __m128i V;

KTARGET static inline V v_set1(uint32_t x) { return _mm_set1_epi32((int)x); }
KTARGET static inline V v_add(V a, V b) { return _mm_add_epi32(a, b); }
KTARGET static inline V v_xor(V a, V b) { return _mm_xor_si128(a, b); }
KTARGET static inline V v_or(V a, V b) { return _mm_or_si128(a, b); }
KTARGET static inline V v_loadu(const uint32_t *p) { return _mm_loadu_si128((const V *)p); }
KTARGET static inline void v_storeu(uint32_t *p, V x) { _mm_storeu_si128((V *)p, x); }
KTARGET static inline V v_rot16(V x)
{
    return _mm_shuffle_epi8(x, _mm_set_epi8(13, 12, 15, 14, 9, 8, 11, 10, 5, 4, 7, 6, 1, 0, 3, 2));
}
KTARGET static inline V v_rot8(V x)
{
    return _mm_shuffle_epi8(x, _mm_set_epi8(12, 15, 14, 13, 8, 11, 10, 9, 4, 7, 6, 5, 0, 3, 2, 1));
}
KTARGET static inline V v_rot12(V x) { return _mm_or_si128(_mm_srli_epi32(x, 12), _mm_slli_epi32(x, 20)); }
KTARGET static inline V v_rot7(V x) { return _mm_or_si128(_mm_srli_epi32(x, 7), _mm_slli_epi32(x, 25)); }

/* Rows r[0..3] (4 words of lanes 0..3) to columns (word j of the 4 lanes). */
KTARGET static inline void transpose4(V r[4])
{
    V t0 = _mm_unpacklo_epi32(r[0], r[1]), t1 = _mm_unpackhi_epi32(r[0], r[1]);
    V t2 = _mm_unpacklo_epi32(r[2], r[3]), t3 = _mm_unpackhi_epi32(r[2], r[3]);
    r[0] = _mm_unpacklo_epi64(t0, t2);
    r[1] = _mm_unpackhi_epi64(t0, t2);
    r[2] = _mm_unpacklo_epi64(t1, t3);
    r[3] = _mm_unpackhi_epi64(t1, t3);
}

KTARGET static inline void load_msg(const uint8_t *const *in, size_t off, V m[16])
{
    for (int g = 0; g < 4; g++) {
        V r[4];
        for (int l = 0; l < 4; l++)
            r[l] = _mm_loadu_si128((const V *)(in[l] + off + 16 * g));
        transpose4(r);
        for (int j = 0; j < 4; j++)
            m[4 * g + j] = r[j];
    }
}

#include "lanes_simd.h"
#endif

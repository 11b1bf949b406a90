/* The portable BLAKE3 compression function and its one-lane lane function.
 *
 * Straight from the specification: the state is 16 words (the chaining value,
 * four IV words, the counter's two halves, the block length and the flags); seven
 * rounds of eight G mixes (four on the columns, four on the diagonals), the message
 * words permuted between rounds (CBT_B3_SCHEDULE holds the seven orders); the new
 * chaining value is state[i] ^ state[i + 8].
 */
#include <string.h>

#include "cbt_blake3.h"

const uint32_t cbt_b3_iv[8] = {
    0x6A09E667u, 0xBB67AE85u, 0x3C6EF372u, 0xA54FF53Au,
    0x510E527Fu, 0x9B05688Cu, 0x1F83D9ABu, 0x5BE0CD19u,
};

static inline uint32_t rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

static inline uint32_t load_le(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static inline void store_le(uint8_t *p, uint32_t w)
{
    p[0] = (uint8_t)w;
    p[1] = (uint8_t)(w >> 8);
    p[2] = (uint8_t)(w >> 16);
    p[3] = (uint8_t)(w >> 24);
}

#define G(a, b, c, d, x, y)                                                        \
    do {                                                                           \
        v[a] += v[b] + (x); v[d] = rotr(v[d] ^ v[a], 16);                          \
        v[c] += v[d];       v[b] = rotr(v[b] ^ v[c], 12);                          \
        v[a] += v[b] + (y); v[d] = rotr(v[d] ^ v[a], 8);                           \
        v[c] += v[d];       v[b] = rotr(v[b] ^ v[c], 7);                           \
    } while (0)

/* Unrolled, so that every message index is a constant (words stay in registers). */
#define ROUND(r)                                                                   \
    do {                                                                           \
        const uint8_t *s = CBT_B3_SCHEDULE[r];                                     \
        G(0, 4, 8, 12, m[s[0]], m[s[1]]);                                          \
        G(1, 5, 9, 13, m[s[2]], m[s[3]]);                                          \
        G(2, 6, 10, 14, m[s[4]], m[s[5]]);                                         \
        G(3, 7, 11, 15, m[s[6]], m[s[7]]);                                         \
        G(0, 5, 10, 15, m[s[8]], m[s[9]]);                                         \
        G(1, 6, 11, 12, m[s[10]], m[s[11]]);                                       \
        G(2, 7, 8, 13, m[s[12]], m[s[13]]);                                        \
        G(3, 4, 9, 14, m[s[14]], m[s[15]]);                                        \
    } while (0)

void cbt_b3_compress(uint32_t cv[8], const uint8_t block[CBT_B3_BLOCK], uint32_t block_len,
                     uint64_t counter, uint32_t flags)
{
    uint32_t m[16], v[16];
    for (int i = 0; i < 16; i++)
        m[i] = load_le(block + 4 * i);
    for (int i = 0; i < 8; i++)
        v[i] = cv[i];
    for (int i = 0; i < 4; i++)
        v[8 + i] = cbt_b3_iv[i];
    v[12] = (uint32_t)counter;
    v[13] = (uint32_t)(counter >> 32);
    v[14] = block_len;
    v[15] = flags;
    CBT_B3_ROUNDS(ROUND);
    for (int i = 0; i < 8; i++)
        cv[i] = v[i] ^ v[i + 8];
}

void cbt_b3_lanes_portable(const uint8_t *const *in, const uint64_t *counter,
                           const uint32_t *last_flags, uint8_t *const *out, size_t nblocks,
                           const uint32_t cv[8], uint32_t flags, uint32_t first_flags)
{
    uint32_t h[8];
    memcpy(h, cv, sizeof h);
    for (size_t b = 0; b < nblocks; b++) {
        uint32_t f = flags | (b == 0 ? first_flags : 0) | (b + 1 == nblocks ? last_flags[0] : 0);
        cbt_b3_compress(h, in[0] + b * CBT_B3_BLOCK, CBT_B3_BLOCK, counter[0], f);
    }
    for (int i = 0; i < 8; i++)
        store_le(out[0] + 4 * i, h[i]);
}

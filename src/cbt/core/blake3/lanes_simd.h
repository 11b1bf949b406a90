/* The body of a SIMD lane function, shared by sse41.c, avx2.c and avx512.c.
 *
 * The includer defines W (lanes), V (the vector type), KTARGET (the target
 * attribute), LANES_FN (the function's name) and these KTARGET inline functions:
 * v_set1, v_add, v_xor, v_or, v_rot16/12/8/7, v_loadu, v_storeu and load_msg (the
 * 16 message words of block `b` of all W lanes, transposed: m[i] holds word i of
 * every lane).  Word-sliced state: v[i] holds state word i of every lane, so one
 * vector instruction does one step of the compression function in all W lanes.
 *
 * Chunk lanes prefetch, at each block, the same block of the next batch (PREFETCH
 * bytes on: the blocks of hash_blocks lie side by side, so the next W chunks follow
 * these).  Measured on a 64 MiB buffer, this took the AVX-512 kernel from 0.70x to
 * ~1.08x the blake3 package's one-thread speed; a prefetch within the lane's own
 * chunk, or two batches ahead, did less.  A prefetch never faults, so a guess past
 * the end of a buffer (or of a scattered input of hash_each) is harmless.
 */

#define PREFETCH (W * CBT_B3_CHUNK)

#define G(a, b, c, d, x, y)                                                        \
    do {                                                                           \
        v[a] = v_add(v_add(v[a], v[b]), (x));                                      \
        v[d] = v_rot16(v_xor(v[d], v[a]));                                         \
        v[c] = v_add(v[c], v[d]);                                                  \
        v[b] = v_rot12(v_xor(v[b], v[c]));                                         \
        v[a] = v_add(v_add(v[a], v[b]), (y));                                      \
        v[d] = v_rot8(v_xor(v[d], v[a]));                                          \
        v[c] = v_add(v[c], v[d]);                                                  \
        v[b] = v_rot7(v_xor(v[b], v[c]));                                          \
    } while (0)

#define ROUND(r)                                                                   \
    do {                                                                           \
        G(0, 4, 8, 12, m[CBT_B3_SCHEDULE[r][0]], m[CBT_B3_SCHEDULE[r][1]]);        \
        G(1, 5, 9, 13, m[CBT_B3_SCHEDULE[r][2]], m[CBT_B3_SCHEDULE[r][3]]);        \
        G(2, 6, 10, 14, m[CBT_B3_SCHEDULE[r][4]], m[CBT_B3_SCHEDULE[r][5]]);       \
        G(3, 7, 11, 15, m[CBT_B3_SCHEDULE[r][6]], m[CBT_B3_SCHEDULE[r][7]]);       \
        G(0, 5, 10, 15, m[CBT_B3_SCHEDULE[r][8]], m[CBT_B3_SCHEDULE[r][9]]);       \
        G(1, 6, 11, 12, m[CBT_B3_SCHEDULE[r][10]], m[CBT_B3_SCHEDULE[r][11]]);     \
        G(2, 7, 8, 13, m[CBT_B3_SCHEDULE[r][12]], m[CBT_B3_SCHEDULE[r][13]]);      \
        G(3, 4, 9, 14, m[CBT_B3_SCHEDULE[r][14]], m[CBT_B3_SCHEDULE[r][15]]);      \
    } while (0)

KTARGET void LANES_FN(const uint8_t *const *in, const uint64_t *counter,
                      const uint32_t *last_flags, uint8_t *const *out, size_t nblocks,
                      const uint32_t cv[8], uint32_t flags, uint32_t first_flags)
{
    uint32_t lo[W], hi[W], tmp[8][W];
    V h[8], m[16], v[16];
    V clo, chi, last, iv0, iv1, iv2, iv3, blen;

    for (int l = 0; l < W; l++) {
        lo[l] = (uint32_t)counter[l];
        hi[l] = (uint32_t)(counter[l] >> 32);
    }
    clo = v_loadu(lo);
    chi = v_loadu(hi);
    last = v_loadu(last_flags);
    for (int i = 0; i < 8; i++)
        h[i] = v_set1(cv[i]);
    iv0 = v_set1(cbt_b3_iv[0]);
    iv1 = v_set1(cbt_b3_iv[1]);
    iv2 = v_set1(cbt_b3_iv[2]);
    iv3 = v_set1(cbt_b3_iv[3]);
    blen = v_set1(CBT_B3_BLOCK);
    for (size_t b = 0; b < nblocks; b++) {
        V f = v_set1(flags | (b == 0 ? first_flags : 0));
        if (b + 1 == nblocks)
            f = v_or(f, last);
        if (nblocks > 1)  /* chunks: the same block of the next batch, if contiguous */
            for (int l = 0; l < W; l++)
                _mm_prefetch((const char *)(in[l] + b * CBT_B3_BLOCK + PREFETCH), _MM_HINT_T0);
        load_msg(in, b * CBT_B3_BLOCK, m);
        for (int i = 0; i < 8; i++)
            v[i] = h[i];
        v[8] = iv0;
        v[9] = iv1;
        v[10] = iv2;
        v[11] = iv3;
        v[12] = clo;
        v[13] = chi;
        v[14] = blen;
        v[15] = f;
        CBT_B3_ROUNDS(ROUND);
        for (int i = 0; i < 8; i++)
            h[i] = v_xor(v[i], v[i + 8]);
    }
    for (int i = 0; i < 8; i++)
        v_storeu(tmp[i], h[i]);
    for (int l = 0; l < W; l++) {
        uint32_t w[8];
        for (int i = 0; i < 8; i++)
            w[i] = tmp[i][l];
        memcpy(out[l], w, sizeof w); /* x86: little-endian, as BLAKE3's output */
    }
}

#undef G
#undef ROUND

/* Kernel dispatch and the many-input BLAKE3 driver.
 *
 * cbt_b3_hash_many hashes many independent inputs (disk blocks of 4 KiB..4 MiB, or
 * any lengths) by turning their work into lanes of the selected kernel:
 *
 * 1. Inputs are taken in groups of about GROUP_CHUNKS chunks (one input alone if it
 *    is larger), so that the group's chaining values stay in the L1/L2 cache.
 * 2. Every full 1024-byte chunk of every input of the group is one lane: 16 blocks,
 *    counter = the chunk's index in its input, CHUNK_START on the first block,
 *    CHUNK_END on the last (and ROOT when the chunk is its input's only one).
 *    Lanes are queued and run W at a time (16 AVX-512, 8 AVX2, 4 SSE4.1); what is
 *    left over runs on the next narrower kernel, down to the portable one.  A short
 *    last chunk (or the one empty chunk of an empty input) is compressed by the
 *    scalar function.  Chaining values go to a buffer, each input's side by side.
 * 3. Then the tree, level by level for all inputs at once: adjacent pairs of
 *    chaining values are parents (one-block lanes, counter 0, PARENT), an odd last
 *    one is carried up unchanged.  This is BLAKE3's tree (its left subtrees are
 *    complete), a level of parents being again many one-block inputs.  The parent of
 *    the last pair gets ROOT and writes the input's digest straight to its output.
 * Keyed hashing: the key's words replace the IV as the starting chaining value,
 * and KEYED_HASH is set on every compression.
 */
#include <stdlib.h>
#include <string.h>

#include "cbt_blake3.h"

#define GROUP_CHUNKS 1024

typedef struct {
    const char *name;
    size_t width;
    cbt_b3_lanes_fn fn;
} kernel_t;

static const kernel_t KERNELS[CBT_B3_NKERNELS] = {
    {"portable", 1, cbt_b3_lanes_portable},
#if defined(__x86_64__) || defined(__i386__)
    {"sse41", 4, cbt_b3_lanes_sse41},
    {"avx2", 8, cbt_b3_lanes_avx2},
    {"avx512", 16, cbt_b3_lanes_avx512},
#else
    {"sse41", 4, NULL},
    {"avx2", 8, NULL},
    {"avx512", 16, NULL},
#endif
};

static _Atomic int current = -1; /* (set by use_kernel while other threads may hash) */

const char *cbt_b3_kernel_name(int kernel)
{
    if (kernel < 0 || kernel >= CBT_B3_NKERNELS)
        return NULL;
    return KERNELS[kernel].name;
}

int cbt_b3_kernel_supported(int kernel)
{
    switch (kernel) {
    case CBT_B3_PORTABLE:
        return 1;
#if defined(__x86_64__) || defined(__i386__)
    case CBT_B3_SSE41:
        __builtin_cpu_init();
        return __builtin_cpu_supports("sse4.1") != 0;
    case CBT_B3_AVX2:
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") != 0 && __builtin_cpu_supports("sse4.1") != 0;
    case CBT_B3_AVX512:
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx512f") != 0 && __builtin_cpu_supports("avx512vl") != 0
               && __builtin_cpu_supports("avx2") != 0 && __builtin_cpu_supports("sse4.1") != 0;
#endif
    default:
        return 0;
    }
}

int cbt_b3_best_kernel(void)
{
    int k = CBT_B3_NKERNELS - 1;
    while (k > 0 && !cbt_b3_kernel_supported(k))
        k--;
    return k;
}

int cbt_b3_use_kernel(int kernel)
{
    if (!cbt_b3_kernel_supported(kernel))
        return -1;
    current = kernel;
    return 0;
}

int cbt_b3_current_kernel(void)
{
    if (current < 0)
        current = cbt_b3_best_kernel();
    return current;
}

/* Lanes waiting for a kernel: all of one shape (nblocks, flags) at a time. */
typedef struct {
    const uint8_t *in[CBT_B3_MAX_LANES];
    uint64_t counter[CBT_B3_MAX_LANES];
    uint32_t last[CBT_B3_MAX_LANES];
    uint8_t *out[CBT_B3_MAX_LANES];
    size_t n;
    size_t nblocks;
    const uint32_t *cv;
    uint32_t flags, first;
    int kernel;
} queue_t;

/* Run every queued lane: full widths on the queue's kernel, the rest narrower. */
static void drain(queue_t *q)
{
    size_t i = 0;
    for (int k = q->kernel; k >= 0 && i < q->n; k--) {
        const kernel_t *kk = &KERNELS[k];
        if (kk->fn == NULL)
            continue;
        while (q->n - i >= kk->width) {
            kk->fn(&q->in[i], &q->counter[i], &q->last[i], &q->out[i], q->nblocks, q->cv,
                   q->flags, q->first);
            i += kk->width;
        }
    }
    q->n = 0;
}

static inline void push(queue_t *q, const uint8_t *in, uint64_t counter, uint32_t last,
                        uint8_t *out)
{
    q->in[q->n] = in;
    q->counter[q->n] = counter;
    q->last[q->n] = last;
    q->out[q->n] = out;
    if (++q->n == KERNELS[q->kernel].width)
        drain(q);
}

static void store_cv(uint8_t *out, const uint32_t h[8])
{
    for (int i = 0; i < 8; i++) {
        out[4 * i] = (uint8_t)h[i];
        out[4 * i + 1] = (uint8_t)(h[i] >> 8);
        out[4 * i + 2] = (uint8_t)(h[i] >> 16);
        out[4 * i + 3] = (uint8_t)(h[i] >> 24);
    }
}

/* A chunk shorter than 1024 bytes (maybe empty): scalar, block by block. */
static void short_chunk(const uint8_t *p, size_t len, uint64_t counter, const uint32_t key[8],
                        uint32_t flags, uint8_t *out)
{
    uint32_t h[8];
    uint8_t block[CBT_B3_BLOCK];
    size_t nb = len == 0 ? 1 : (len + CBT_B3_BLOCK - 1) / CBT_B3_BLOCK;
    memcpy(h, key, sizeof h);
    for (size_t b = 0; b < nb; b++) {
        size_t bl = b + 1 < nb ? CBT_B3_BLOCK : len - b * CBT_B3_BLOCK;
        uint32_t f = (flags & ~(uint32_t)CBT_B3_ROOT) | (b == 0 ? CBT_B3_CHUNK_START : 0);
        memset(block, 0, sizeof block);
        memcpy(block, p + b * CBT_B3_BLOCK, bl);
        if (b + 1 == nb)
            f |= CBT_B3_CHUNK_END | (flags & CBT_B3_ROOT);
        cbt_b3_compress(h, block, (uint32_t)bl, counter, f);
    }
    store_cv(out, h);
}

static size_t nchunks(size_t len)
{
    return len == 0 ? 1 : (len + CBT_B3_CHUNK - 1) / CBT_B3_CHUNK;
}

/* Inputs [a, b) of one group: chunks, then the tree (steps 2 and 3 above). */
static void hash_group(const uint8_t *const *inputs, const size_t *lens, uint8_t *const *outs,
                       size_t a, size_t b, const uint32_t key[8], uint32_t base, int kernel,
                       uint8_t *cur, uint8_t *nxt, size_t *count)
{
    queue_t q;
    size_t off = 0;
    q.n = 0;
    q.kernel = kernel;
    q.cv = key;
    q.nblocks = CBT_B3_CHUNK / CBT_B3_BLOCK;
    q.flags = base;
    q.first = CBT_B3_CHUNK_START;
    for (size_t i = a; i < b; i++) {
        size_t n = nchunks(lens[i]), full = lens[i] / CBT_B3_CHUNK;
        uint32_t root = n == 1 ? CBT_B3_ROOT : 0;
        for (size_t c = 0; c < full; c++)
            push(&q, inputs[i] + c * CBT_B3_CHUNK, c, CBT_B3_CHUNK_END | root,
                 root ? outs[i] : cur + (off + c) * CBT_B3_OUT);
        if (full < n)
            short_chunk(inputs[i] + full * CBT_B3_CHUNK, lens[i] - full * CBT_B3_CHUNK, full,
                        key, base | root, root ? outs[i] : cur + (off + full) * CBT_B3_OUT);
        count[i - a] = n;
        off += n;
    }
    drain(&q);

    q.nblocks = 1;
    q.flags = base | CBT_B3_PARENT;
    q.first = 0;
    for (;;) {
        int more = 0;
        off = 0;
        for (size_t i = a; i < b; i++) {
            size_t c = count[i - a], pairs = c / 2;
            size_t base_off = off;
            off += nchunks(lens[i]);
            if (c < 2)
                continue;
            for (size_t j = 0; j < pairs; j++)
                push(&q, cur + (base_off + 2 * j) * CBT_B3_OUT, 0, c == 2 ? CBT_B3_ROOT : 0,
                     c == 2 ? outs[i] : nxt + (base_off + j) * CBT_B3_OUT);
            if (c & 1)
                memcpy(nxt + (base_off + pairs) * CBT_B3_OUT,
                       cur + (base_off + c - 1) * CBT_B3_OUT, CBT_B3_OUT);
            count[i - a] = pairs + (c & 1);
            more |= count[i - a] > 1;
        }
        drain(&q);
        if (!more)
            break;
        uint8_t *t = cur;
        cur = nxt;
        nxt = t;
    }
}

int cbt_b3_hash_many(const uint8_t *const *inputs, const size_t *lens, uint8_t *const *outs,
                     size_t n, const uint8_t *key)
{
    uint32_t kw[8];
    uint32_t base = 0;
    int kernel = cbt_b3_current_kernel();
    size_t cap = 0, i = 0;
    uint8_t *bufs = NULL;
    size_t *count = NULL;

    if (key != NULL) {
        for (int w = 0; w < 8; w++)
            kw[w] = (uint32_t)key[4 * w] | (uint32_t)key[4 * w + 1] << 8
                    | (uint32_t)key[4 * w + 2] << 16 | (uint32_t)key[4 * w + 3] << 24;
        base = CBT_B3_KEYED_HASH;
    } else {
        memcpy(kw, cbt_b3_iv, sizeof kw);
    }
    while (i < n) {
        size_t j = i, chunks = 0;
        while (j < n && (j == i || chunks + nchunks(lens[j]) <= GROUP_CHUNKS))
            chunks += nchunks(lens[j++]);
        if (chunks > cap) {
            size_t want = chunks < GROUP_CHUNKS ? GROUP_CHUNKS : chunks;
            uint8_t *nb = realloc(bufs, 2 * want * CBT_B3_OUT);
            size_t *nc = realloc(count, want * sizeof *count);
            if (nb != NULL)
                bufs = nb;
            if (nc != NULL)
                count = nc;
            if (nb == NULL || nc == NULL) {
                free(bufs);
                free(count);
                return -1;
            }
            cap = want;
        }
        hash_group(inputs, lens, outs, i, j, kw, base, kernel, bufs, bufs + cap * CBT_B3_OUT,
                   count);
        i = j;
    }
    free(bufs);
    free(count);
    return 0;
}

/* The LZ4 block decoder (see cbt_lz4.h for the format and the rules it keeps).
 *
 * Speed comes from copying 16 or 8 bytes at a time wherever both buffers have room
 * for it past the bytes that matter ("wild" copies: what they write past the end of a
 * run of literals or a match is overwritten by the next sequence, and the output must
 * be filled exactly, so nothing of it is left).  A match copies itself from its offset
 * back, 16 bytes at a time when that is 16 or more, 8 when it is 8 or more (each copy
 * then reads only bytes already written); a shorter period (a run of zeros, say) is
 * laid down to 8 bytes, which are stored again every whole number of periods
 * (repeat_short: no load of a byte just stored, which would wait for the store).  Near
 * the end of the output, where no whole copy fits, tail_match lays a short period down
 * to 16 bytes or more byte by byte, then copies while there is room, then bytes.
 */
#include <string.h>

#include "cbt_lz4.h"

#define MIN_MATCH 4      /* a match is at least 4 bytes: its length byte says less 4 */
#define LAST_LITERALS 5  /* the last 5 bytes of a block are literals */
#define MATCH_LIMIT 12   /* a match starts at least 12 bytes before the block's end */
#define WILD 16

static inline void copy16(uint8_t *d, const uint8_t *s) { memcpy(d, s, WILD); }
static inline void copy8(uint8_t *d, const uint8_t *s) { memcpy(d, s, 8); }

/* A length of 15 or more: the bytes that follow are added until one is not 255.
 * 0, or -1 if the input ends first.  (No overflow: each byte adds at most 255.) */
static inline int more_length(const uint8_t **ip, const uint8_t *iend, size_t *len)
{
    const uint8_t *p = *ip;
    unsigned b;
    do {
        if (p >= iend)
            return -1;
        b = *p++;
        *len += b;
    } while (b == 255);
    *ip = p;
    return 0;
}

/* A match near the end of the output (too little room for whole copies past it):
 * laid down to whole periods of at least 16 bytes byte by byte, then copied 16 bytes
 * at a time while there is room, the rest byte by byte. */
static void tail_match(uint8_t *op, const uint8_t *m, size_t off, size_t len,
                       const uint8_t *oend)
{
    uint8_t *const mend = op + len;
    if (off < WILD) {
        size_t period = off * ((WILD + off - 1) / off);
        size_t k = period < len ? period : len;
        for (size_t i = 0; i < k; i++)
            op[i] = m[i];  /* (reads what this loop just wrote: the pattern repeats) */
        op += k;
        if (op == mend)
            return;
        m = op - period;
    }
    while (op < mend && (size_t)(oend - op) >= WILD) {
        copy16(op, m);
        op += WILD;
        m += WILD;
    }
    while (op < mend)
        *op++ = *m++;
}

/* A match whose period (offset) is under 8 bytes, with room for 8 bytes past its end:
 * its first 8 bytes laid down byte by byte, then that 8-byte pattern stored every whole
 * number of periods up to 8 bytes (no load of what was just stored: a load that overlaps
 * a store still in flight waits for it). */
static inline void repeat_short(uint8_t *op, const uint8_t *m, size_t off, size_t len)
{
    uint64_t pat;
    for (size_t i = 0; i < 8; i++)
        op[i] = m[i];
    memcpy(&pat, op, 8);
    size_t step = off * (8 / off);
    for (size_t done = step; done < len; done += step)
        memcpy(op + done, &pat, 8);
}

int cbt_lz4_decode(const uint8_t *src, size_t n, uint8_t *dst, size_t cap)
{
    if (n == 0)
        return -1;
    if (cap == 0)
        return n == 1 && src[0] == 0 ? 0 : -1;  /* the empty block: one token, no literals */

    /* (only now: src or dst may be NULL with n or cap 0, and NULL + 0 is undefined in C) */
    const uint8_t *ip = src;
    const uint8_t *const iend = src + n;
    uint8_t *op = dst;
    uint8_t *const oend = dst + cap;
    for (;;) {
        /* The common sequence, far from both ends: fewer than 15 literals and a match
         * of at most 18 bytes (neither length has more bytes), copied in whole 16 or
         * 8 byte moves with no other check than the offset's: 32 bytes of input and
         * 64 of output ahead cover every byte these moves touch and the end rules. */
        if ((size_t)(iend - ip) >= 32 && (size_t)(oend - op) >= 64) {
            unsigned t = *ip;
            size_t lit = t >> 4, len = (t & 15) + MIN_MATCH;
            if (lit < 15 && len < 15 + MIN_MATCH) {
                copy16(op, ip + 1);
                ip += 1 + lit;
                op += lit;
                size_t off = (size_t)ip[0] | (size_t)ip[1] << 8;
                ip += 2;
                if (off - 1 >= (size_t)(op - dst))
                    return -1;  /* 0, or before the block's start */
                const uint8_t *m = op - off;
                if (off >= 8) {
                    copy8(op, m);
                    copy8(op + 8, m + 8);
                    memcpy(op + 16, m + 16, 2);  /* (no more than the 18 bytes it can be) */
                    op += len;
                    continue;
                }
                repeat_short(op, m, off, len);
                op += len;
                continue;
            }
        }

        unsigned token = *ip++;  /* (ip < iend: checked before each token) */

        /* literals */
        size_t lit = token >> 4;
        if (lit == 15 && more_length(&ip, iend, &lit) < 0)
            return -1;
        if ((size_t)(iend - ip) >= lit + WILD && (size_t)(oend - op) >= lit + WILD) {
            uint8_t *d = op;
            const uint8_t *s = ip;
            copy16(d, s);  /* (most runs of literals are shorter than 16) */
            while ((size_t)(d - op) + WILD < lit) {
                d += WILD;
                s += WILD;
                copy16(d, s);
            }
        } else {
            if (lit > (size_t)(iend - ip) || lit > (size_t)(oend - op))
                return -1;
            memcpy(op, ip, lit);
        }
        ip += lit;
        op += lit;
        if (ip == iend)
            break;  /* the last sequence: literals only */

        /* the match */
        if (iend - ip < 2)
            return -1;
        size_t off = (size_t)ip[0] | (size_t)ip[1] << 8;
        ip += 2;
        if (off == 0 || off > (size_t)(op - dst))
            return -1;  /* before the block's start (no dictionary) */
        size_t len = token & 15;
        if (len == 15 && more_length(&ip, iend, &len) < 0)
            return -1;
        len += MIN_MATCH;
        if ((size_t)(oend - op) < MATCH_LIMIT || len > (size_t)(oend - op) - LAST_LITERALS)
            return -1;
        if (ip >= iend)
            return -1;  /* a block ends with literals, never with a match */

        uint8_t *const mend = op + len;
        const uint8_t *m = op - off;
        if ((size_t)(oend - op) < len + WILD) {
            tail_match(op, m, off, len, oend);
        } else if (off >= WILD) {  /* each copy reads only bytes written before it */
            do {
                copy16(op, m);
                op += WILD;
                m += WILD;
            } while (op < mend);
        } else if (off >= 8) {
            do {
                copy8(op, m);
                op += 8;
                m += 8;
            } while (op < mend);
        } else {
            repeat_short(op, m, off, len);
        }
        op = mend;  /* (a whole copy may have gone past it) */
    }
    return op == oend ? 0 : -1;
}

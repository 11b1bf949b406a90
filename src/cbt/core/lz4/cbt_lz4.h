/* cbt's LZ4 block decoder: what a restore of an lz4 vault spends most of its time in.
 *
 * Written from the LZ4 block format description (lz4/lz4, doc/lz4_Block_format.md):
 * a block is a run of sequences, each a token byte (literal count in its high four
 * bits, match length less 4 in its low four; 15 in either means more length bytes
 * follow, each added, until one is not 255), the literals, then a two-byte little-endian
 * offset back into the output (not 0) and the match copied from there (it may overlap
 * what it writes).  The last sequence has literals only: the block ends after them.
 *
 * Untrusted input: every length and offset is checked against both buffers before it
 * is used, so no input reads or writes outside src[0:n] and dst[0:cap].  The format's
 * end rules are kept as lz4's own safe decoder keeps them (a match starts at least 12
 * bytes before the end of the output and ends at least 5 before it), and the output
 * must be exactly `cap` bytes: a block that decodes to fewer or more is refused.
 */
#ifndef CBT_LZ4_H
#define CBT_LZ4_H

#include <stddef.h>
#include <stdint.h>

/* Decode the lz4 block src[0:n] into exactly dst[0:cap]: 0, or -1 if the block is
 * malformed or does not decode to exactly cap bytes (dst[0:cap] is then garbage). */
int cbt_lz4_decode(const uint8_t *src, size_t n, uint8_t *dst, size_t cap);

#endif

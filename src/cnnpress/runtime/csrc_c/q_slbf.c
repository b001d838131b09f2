/* The integer SLBF conv (cnnpress_q.h): split-transform-merge over tiles of CNNP_TILE output
 * positions, as the float kernel, on centred int8 inputs. A bank filter's response is the sum
 * of the inputs under its +1 bits minus the sum under its -1 bits, so the patch, bank and
 * gather loops only add and subtract int32 values (their indices too: running offsets); the
 * one multiplication per output value is its requantization. Scratch (int32,
 * cnnpress.methods.slbf._c_scratch): one channel's doubled patches, the m responses and the
 * all-taps row, the n sums of the tile, and, when the selections are Huffman-coded, the
 * decoder's tables and the selections decoded once into their fixed-width form. */
#include "cnnp_internal.h"
#include "cnnpress_q.h"

/* The sizes of one conv that the tile loops need, multiplied out once per conv, so that the
 * patch, bank, response and gather functions step through their arrays by running offsets
 * and pointers only: SLBF's inner loops, index arithmetic included, have no multiplication
 * (tests/test_q_kernels.py disassembles them; one by CNNP_TILE, a power of two, is a shift).
 * Multiplication-free there, the kernel suits cores without a fast multiplier. */
typedef struct {
    int kk;           /* taps per channel: kh * kw */
    int taps;         /* bits per bank filter: d * kk */
    int32_t plane_in; /* h * w */
    int32_t dh_w;     /* one tap row down the input: dh * w */
    uint32_t sel_row; /* bits of one output's selections: s * code_bits */
} cnnp_q_sizes;

/* patch[q][e] = 2 (x - zi) of channel xc under tap q = ky * kw + kx at the tile's positions
 * (0: padding). Lane e's input row ih0[e] starts at xc + row0[e] (ih0[e] * w), tap row ky
 * dy * w = ky * dh * w further: running offsets. */
static void cnnp_q_patches(const cnnp_conv_t *p, const cnnp_q_sizes *n, const int8_t *xc,
                           int32_t zi, const int *ih0, const int *iw0, const int32_t *row0,
                           int32_t *patch)
{
    int ky, kx, dy, dx, e;
    int32_t dyw;
    for (ky = 0, dy = 0, dyw = 0; ky < p->kh; ky++, dy += p->dh, dyw += n->dh_w)
        for (kx = 0, dx = 0; kx < p->kw; kx++, dx += p->dw, patch += CNNP_TILE)
            for (e = 0; e < CNNP_TILE; e++) {
                int ih = ih0[e] + dy, iw = iw0[e] + dx;
                int32_t v = ih >= 0 && ih < p->h && iw >= 0 && iw < p->w
                                ? (int32_t)xc[row0[e] + dyw + iw] - zi
                                : 0;
                patch[e] = v + v;
            }
}

/* z[t][e] += the doubled patch values under the 1 bits of taps [first, first + kk) of bank
 * filter t; all[e] += the doubled values under every tap. Filter t's bits start at bit
 * t * taps of the bank: a running bit index. */
static void cnnp_q_bank(const uint8_t *bank, int m, int taps, int first, int kk,
                        const int32_t *restrict patch, int32_t *restrict z,
                        int32_t *restrict all)
{
    const int32_t *row;
    uint32_t start = (uint32_t)first; /* filter t's first bit, t * taps + first */
    int t, q, e;
    for (q = 0, row = patch; q < kk; q++, row += CNNP_TILE)
        for (e = 0; e < CNNP_TILE; e++) all[e] += row[e];
    for (t = 0; t < m; t++, z += CNNP_TILE, start += (uint32_t)taps) {
        uint32_t b = start;
        for (q = 0, row = patch; q < kk; q++, b++, row += CNNP_TILE)
            if ((bank[b >> 3] >> (b & 7u)) & 1u)
                for (e = 0; e < CNNP_TILE; e++) z[e] += row[e];
    }
}

/* z[t][e]: bank filter t's +-1 response to slice xs at the tile's positions: 2 * (sum
 * under the 1 bits) - (sum under all bits) = z - all / 2, all even. */
static void cnnp_q_responses(const cnnp_conv_t *p, const cnnp_q_sizes *n, const int8_t *xs,
                             int32_t zi, const int *ih0, const int *iw0, const int32_t *row0,
                             const uint8_t *bank, int32_t *patch, int32_t *z)
{
    int cd, first, t, e, size = (p->m + 1) * CNNP_TILE;
    int32_t *restrict all = z + p->m * CNNP_TILE, *zt;
    for (e = 0; e < size; e++) z[e] = 0;
    for (cd = 0, first = 0; cd < p->d; cd++, first += n->kk, xs += n->plane_in) {
        cnnp_q_patches(p, n, xs, zi, ih0, iw0, row0, patch);
        cnnp_q_bank(bank, p->m, n->taps, first, n->kk, patch, z, all);
    }
    for (e = 0; e < CNNP_TILE; e++) all[e] /= 2;
    for (t = 0, zt = z; t < p->m; t++, zt += CNNP_TILE)
        for (e = 0; e < CNNP_TILE; e++) zt[e] -= all[e];
}

/* acc[i][e] += the response output i's selection for slice j names: selection
 * k = i * s + j of `codes`, at bit k * code_bits = b (j's first), a running offset. */
static void cnnp_q_gather(const cnnp_conv_t *p, const cnnp_q_sizes *n, const int32_t *restrict z,
                          const uint8_t *codes, uint32_t b, int32_t *restrict acc)
{
    int i, e;
    for (i = 0; i < p->n; i++, b += n->sel_row, acc += CNNP_TILE) {
        const int32_t *restrict zt = z + cnnp_bits_from(codes, b, p->code_bits) * CNNP_TILE;
        for (e = 0; e < CNNP_TILE; e++) acc[e] += zt[e];
    }
}

/* The tile's n sums, requantized, to y at flat output positions [at, at + count). */
static void cnnp_q_slbf_store(const cnnp_qctx *ctx, const cnnp_conv_t *p, const cnnp_q_t *q,
                              const int32_t *acc, int32_t at, int count, int8_t *y)
{
    int32_t plane = (int32_t)p->oh * p->ow, v;
    const int32_t *rq = ctx->qdata + q->rq;
    int i, e;
    for (i = 0; i < p->n; i++) {
        int8_t *out = y + (int32_t)i * plane + at;
        const int32_t *a = acc + i * CNNP_TILE;
        cnnp_q_channel c = cnnp_q_decode(rq, i);
        for (e = 0; e < count; e++) {
            v = cnnp_q_apply(&c, a[e]);
            if (p->res)
                out[e] = (int8_t)cnnp_q_add(q, q->zp, cnnp_q_clamp(q->zp + v, q->qmin, q->qmax),
                                            out[e]);
            else
                out[e] = (int8_t)cnnp_q_clamp(q->zo + v, q->lo, q->hi);
        }
    }
}

void cnnp_q_conv_slbf(const cnnp_qctx *ctx, const cnnp_conv_t *p, const cnnp_q_t *q)
{
    cnnp_q_sizes n;
    int s = p->c / p->d, kk = p->kh * p->kw, j, e, count;
    int32_t plane_in = (int32_t)p->h * p->w, plane = (int32_t)p->oh * p->ow, at;
    const uint8_t *bank = ctx->weights + p->code, *codes = ctx->weights + p->sel;
    const int8_t *x = cnnp_q_at(ctx, p->x);
    int8_t *y = cnnp_q_at(ctx, p->y);
    int32_t *patch = ctx->scratch, *z = patch + kk * CNNP_TILE;
    int32_t *acc = z + (p->m + 1) * CNNP_TILE, *rest = acc + p->n * CNNP_TILE;
    int ih0[CNNP_TILE], iw0[CNNP_TILE];
    int32_t row0[CNNP_TILE];
    uint32_t b;
    n.kk = kk;
    n.taps = p->d * kk;
    n.plane_in = plane_in;
    n.dh_w = (int32_t)p->dh * p->w;
    n.sel_row = (uint32_t)s * (uint32_t)p->code_bits;
    if (p->huff & 1) { /* Huffman-coded selections: decoded once into fixed-width codes */
        cnnp_huff coded;
        uint8_t *unpacked = (uint8_t *)(rest + CNNP_HUFF_INTS(1 << p->code_bits));
        cnnp_huff_init(&coded, codes, 1 << p->code_bits, rest);
        cnnp_huff_unpack(&coded, (int32_t)p->n * s, p->code_bits, unpacked);
        codes = unpacked;
    }
    for (at = 0; at < plane; at += CNNP_TILE) {
        count = plane - at < CNNP_TILE ? (int)(plane - at) : CNNP_TILE;
        for (e = 0; e < CNNP_TILE; e++) { /* lanes past the plane read nothing (all padding) */
            int32_t o = at + e;
            ih0[e] = e < count ? (int)(o / p->ow) * p->sh - p->ph : -16384;
            iw0[e] = e < count ? (int)(o % p->ow) * p->sw - p->pw : -16384;
            row0[e] = (int32_t)ih0[e] * p->w;
        }
        for (e = 0; e < p->n * CNNP_TILE; e++) acc[e] = 0;
        for (j = 0, b = 0; j < s; j++, b += (uint32_t)p->code_bits) {
            cnnp_q_responses(p, &n, x + (int32_t)j * p->d * plane_in, q->zi, ih0, iw0, row0,
                             bank, patch, z);
            cnnp_q_gather(p, &n, z, codes, b, acc);
        }
        cnnp_q_slbf_store(ctx, p, q, acc, at, count, y);
    }
}

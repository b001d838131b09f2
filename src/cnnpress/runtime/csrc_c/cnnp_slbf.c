/* cnnpress C runtime: the SLBF conv kernel (see cnnpress_rt.h). */
#include "cnnp_internal.h"

/* SLBF, split-transform-merge over tiles of CNNP_TILE output positions (row-major, across
 * rows): for each slice, the tile's d x kh x kw patches go through all m bank filters (+-1
 * weights: adds and subtracts along the tile), one input channel of the slice at a time;
 * then each output channel adds the response its selection for that slice names. Every inner
 * loop runs along the tile, so it has a fixed length and no branch (the compiler vectorises
 * it); a tile's lanes past the plane compute zeros that are never stored. Scratch
 * (cnnpress.methods.slbf._c_scratch): one channel's kh x kw patches, the m responses and the
 * n sums of the tile; Huffman-coded selections decoded once into their fixed-width form (with
 * the decoder's tables); with a residual, each output channel's y = sum * a + b. */

/* The kh x kw patches of channel xc at the tile's positions: patch[q][e] for tap q. */
static void cnnp_slbf_patches(const cnnp_conv_t *p, const float *xc, const int *ih0,
                              const int *iw0, float *patch)
{
    int q, e;
    for (q = 0; q < p->kh * p->kw; q++) {
        int dy = (q / p->kw) * p->dh, dx = (q % p->kw) * p->dw;
        float *row = patch + q * CNNP_TILE;
        for (e = 0; e < CNNP_TILE; e++) {
            int ih = ih0[e] + dy, iw = iw0[e] + dx;
            row[e] = ih >= 0 && ih < p->h && iw >= 0 && iw < p->w ? xc[(int32_t)ih * p->w + iw]
                                                                    : 0.0f;
        }
    }
}

/* z[t][e] += twice the patch values under the 1 bits of taps [first, first + kk) of bank
 * filter t (taps bits each); all[e] += the patch values under every tap. The +-1 response is
 * then z - all: the 1 bits' sum minus the 0 bits' sum, with half the additions. */
static void cnnp_slbf_bank(const uint8_t *bank, int m, int taps, int first, int kk,
                           const float *restrict patch, float *restrict z,
                           float *restrict all)
{
    int t, q, e;
    for (q = 0; q < kk; q++)
        for (e = 0; e < CNNP_TILE; e++) all[e] += patch[q * CNNP_TILE + e];
    for (t = 0; t < m; t++) {
        float *restrict zt = z + t * CNNP_TILE;
        uint32_t b = (uint32_t)t * (uint32_t)taps + (uint32_t)first;
        for (q = 0; q < kk; q++, b++)
            if ((bank[b >> 3] >> (b & 7u)) & 1u)
                for (e = 0; e < CNNP_TILE; e++) zt[e] += 2.0f * patch[q * CNNP_TILE + e];
    }
}

/* z[t][e]: bank filter t's +-1 response to slice xs (d channels) at the tile's positions.
 * Scratch: patch (kh x kw rows), then z (m rows and the all row after them). */
static void cnnp_slbf_responses(const cnnp_conv_t *p, const float *xs, const int *ih0,
                                const int *iw0, const uint8_t *bank, float *patch, float *z)
{
    int kk = p->kh * p->kw, cd, t, e;
    int32_t plane_in = (int32_t)p->h * p->w;
    float *restrict all = z + p->m * CNNP_TILE;
    for (e = 0; e < (p->m + 1) * CNNP_TILE; e++) z[e] = 0.0f;
    for (cd = 0; cd < p->d; cd++) {
        cnnp_slbf_patches(p, xs + (int32_t)cd * plane_in, ih0, iw0, patch);
        cnnp_slbf_bank(bank, p->m, p->d * kk, cd * kk, kk, patch, z, all);
    }
    for (t = 0; t < p->m; t++) {
        float *restrict zt = z + t * CNNP_TILE;
        for (e = 0; e < CNNP_TILE; e++) zt[e] -= all[e];
    }
}

/* acc[i][e] += the response that output i's selection for slice j names (selection
 * k = i * s + j of the fixed-width `codes`). */
static void cnnp_slbf_gather(const cnnp_conv_t *p, const float *restrict z,
                             const uint8_t *codes, int j, float *restrict acc)
{
    int s = p->c / p->d, i, e;
    for (i = 0; i < p->n; i++) {
        int32_t k = (int32_t)i * s + j;
        const float *restrict zt = z + cnnp_bits_at(codes, k, p->code_bits) * CNNP_TILE;
        float *restrict a = acc + i * CNNP_TILE;
        for (e = 0; e < CNNP_TILE; e++) a[e] += zt[e];
    }
}

/* The tile's n sums to y at flat output positions [at, at + count). */
static void cnnp_slbf_store(const cnnp_conv_t *p, const float *acc, const float *ab,
                            int32_t at, int count, float *y)
{
    int32_t plane = (int32_t)p->oh * p->ow;
    int i, e;
    for (i = 0; i < p->n; i++) {
        float *out = y + (int32_t)i * plane + at;
        const float *a = acc + i * CNNP_TILE;
        if (p->res) /* the residual is where the output goes */
            for (e = 0; e < count; e++)
                out[e] = cnnp_act(&p->epi, a[e] * ab[2 * i] + ab[2 * i + 1] + out[e]);
        else
            for (e = 0; e < count; e++) out[e] = a[e];
    }
}

void cnnp_conv_slbf(const cnnp_ctx *ctx, const cnnp_conv_t *p, const float *x, float *y)
{
    int s = p->c / p->d, kk = p->kh * p->kw, i, j, e, count;
    int32_t plane_in = (int32_t)p->h * p->w, plane = (int32_t)p->oh * p->ow, at;
    const uint8_t *bank = cnnp_w(ctx, p->code), *codes = cnnp_w(ctx, p->sel);
    float *patch = ctx->scratch, *z = patch + kk * CNNP_TILE, *acc = z + (p->m + 1) * CNNP_TILE;
    float *ab = acc + p->n * CNNP_TILE;
    int ih0[CNNP_TILE], iw0[CNNP_TILE];
    if (p->huff & 1) { /* Huffman-coded selections: decoded once into fixed-width codes */
        cnnp_huff coded;
        int32_t *tables = (int32_t *)ab, *unpacked = tables + CNNP_HUFF_INTS(1 << p->code_bits);
        int32_t words = ((int32_t)p->n * s * p->code_bits + 31) / 32;
        cnnp_huff_init(&coded, codes, 1 << p->code_bits, tables);
        cnnp_huff_unpack(&coded, (int32_t)p->n * s, p->code_bits, (uint8_t *)unpacked);
        codes = (const uint8_t *)unpacked;
        ab = (float *)(unpacked + words);
    }
    if (p->res)
        for (i = 0; i < p->n; i++) cnnp_out_ab(ctx, p, i, ab + 2 * i, ab + 2 * i + 1);
    for (at = 0; at < plane; at += CNNP_TILE) {
        count = plane - at < CNNP_TILE ? (int)(plane - at) : CNNP_TILE;
        for (e = 0; e < CNNP_TILE; e++) { /* lanes past the plane read nothing (all padding) */
            int32_t o = at + e;
            ih0[e] = e < count ? (int)(o / p->ow) * p->sh - p->ph : -16384;
            iw0[e] = e < count ? (int)(o % p->ow) * p->sw - p->pw : -16384;
        }
        for (e = 0; e < p->n * CNNP_TILE; e++) acc[e] = 0.0f;
        for (j = 0; j < s; j++) {
            cnnp_slbf_responses(p, x + (int32_t)j * p->d * plane_in, ih0, iw0, bank, patch, z);
            cnnp_slbf_gather(p, z, codes, j, acc);
        }
        cnnp_slbf_store(p, acc, ab, at, count, y);
    }
}

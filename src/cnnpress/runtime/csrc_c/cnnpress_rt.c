/* cnnpress C runtime: reference kernels (see cnnpress_rt.h). */
#include "cnnpress_rt.h"

#include <math.h>
#include <string.h>

static const float *cnnp_src(const cnnp_ctx *ctx, cnnp_ref r)
{
    if (CNNP_REF_BASE(r) == CNNP_INPUT) return ctx->input + CNNP_REF_OFF(r);
    if (CNNP_REF_BASE(r) == CNNP_LOGITS) return ctx->logits + CNNP_REF_OFF(r);
    return ctx->arena + CNNP_REF_OFF(r);
}

static float *cnnp_dst(const cnnp_ctx *ctx, cnnp_ref r)
{
    return (CNNP_REF_BASE(r) == CNNP_LOGITS ? ctx->logits : ctx->arena) + CNNP_REF_OFF(r);
}

static const uint8_t *cnnp_w(const cnnp_ctx *ctx, cnnp_arr a)
{
    return ctx->weights + a;
}

float cnnp_half(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    uint32_t bits;
    float f;
    if (exp == 0x1fu) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else { /* subnormal: man * 2^-24 */
        f = (float)man * 5.9604644775390625e-8f;
        return sign ? -f : f;
    }
    memcpy(&f, &bits, sizeof f);
    return f;
}

static float cnnp_f32(const uint8_t *a)
{
    uint32_t bits = (uint32_t)a[0] | (uint32_t)a[1] << 8 | (uint32_t)a[2] << 16 |
                    (uint32_t)a[3] << 24;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Value i of a float array stored at float_bits; for int8 ("q8") the array has `rows`
 * float32 scales first, one per row of row_len values. */
float cnnp_float_at(int float_bits, const uint8_t *a, int32_t i, int32_t rows, int32_t row_len)
{
    if (float_bits == 32) return cnnp_f32(a + 4 * i);
    if (float_bits == 16) return cnnp_half((uint16_t)(a[2 * i] | a[2 * i + 1] << 8));
    return (float)(int8_t)a[4 * rows + i] * cnnp_f32(a + 4 * (i / row_len));
}

static float cnnp_vec(const cnnp_ctx *ctx, cnnp_arr a, int32_t i)
{
    return cnnp_float_at(ctx->float_bits, cnnp_w(ctx, a), i, 1, INT32_MAX);
}

uint32_t cnnp_bits(const uint8_t *p, int32_t i, int bits)
{
    uint32_t o = (uint32_t)i * (uint32_t)bits, v = 0;
    uint32_t first = o >> 3, shift = o & 7u, need = (shift + (uint32_t)bits + 7u) >> 3, k;
    for (k = 0; k < need; k++) v |= (uint32_t)p[first + k] << (8u * k);
    return (v >> shift) & ((1u << bits) - 1u);
}

void cnnp_huff_init(cnnp_huff *h, const uint8_t *data, int alphabet, int32_t *tables)
{
    int32_t *first = tables, *count = tables + CNNP_HUFF_MAX + 1;
    int32_t *offset = tables + 2 * (CNNP_HUFF_MAX + 1);
    uint16_t *symbols = (uint16_t *)(tables + 3 * (CNNP_HUFF_MAX + 1));
    int s, l;
    for (l = 0; l <= CNNP_HUFF_MAX; l++) count[l] = 0;
    for (s = 0; s < alphabet; s++) count[cnnp_bits(data, s, 5)]++;
    count[0] = 0;
    first[0] = offset[0] = 0;
    for (l = 1; l <= CNNP_HUFF_MAX; l++) {
        first[l] = (first[l - 1] + count[l - 1]) << 1;
        offset[l] = offset[l - 1] + count[l - 1];
    }
    for (l = 1; l <= CNNP_HUFF_MAX; l++) { /* symbols sorted by (length, symbol) */
        int32_t at = offset[l];
        for (s = 0; s < alphabet; s++)
            if ((int)cnnp_bits(data, s, 5) == l) symbols[at++] = (uint16_t)s;
    }
    h->bits = data + ((uint32_t)alphabet * 5u + 7u) / 8u;
    h->pos = 0;
    h->first = first;
    h->count = count;
    h->offset = offset;
    h->symbols = symbols;
}

uint32_t cnnp_huff_next(cnnp_huff *h)
{
    int32_t code = 0;
    int l;
    for (l = 1; l <= CNNP_HUFF_MAX; l++) {
        code = (code << 1) | ((h->bits[h->pos >> 3] >> (h->pos & 7u)) & 1);
        h->pos++;
        if (code >= h->first[l] && code - h->first[l] < h->count[l])
            return h->symbols[h->offset[l] + code - h->first[l]];
    }
    return 0; /* a damaged stream (the loader's checks refuse one) */
}

/* Batch norm of channel ch as y = x * a + b. */
static void cnnp_bn_ab(const cnnp_ctx *ctx, const cnnp_epi *e, int ch, float *a, float *b)
{
    *a = 1.0f;
    *b = 0.0f;
    if (e->bn_kind == CNNP_BN_FOLDED) {
        *a = cnnp_vec(ctx, e->bn[0], ch);
        *b = cnnp_vec(ctx, e->bn[1], ch);
    } else if (e->bn_kind == CNNP_BN_FULL) {
        float w = e->bn[0] >= 0 ? cnnp_vec(ctx, e->bn[0], ch) : 1.0f;
        float bias = e->bn[1] >= 0 ? cnnp_vec(ctx, e->bn[1], ch) : 0.0f;
        *a = w / sqrtf(cnnp_vec(ctx, e->bn[3], ch) + e->eps);
        *b = bias - cnnp_vec(ctx, e->bn[2], ch) * *a;
    }
}

static float cnnp_act(const cnnp_epi *e, float v)
{
    if (e->act == CNNP_ACT_RELU) return v < 0.0f ? 0.0f : v;
    if (e->act == CNNP_ACT_CLAMP) return v < e->lo ? e->lo : (v > e->hi ? e->hi : v);
    return v;
}

static void cnnp_apply_epi(const cnnp_ctx *ctx, const cnnp_epi *e, float *y, int c,
                           int32_t plane)
{
    int ch;
    int32_t i;
    if (e->bn_kind == CNNP_BN_NONE && e->act == CNNP_ACT_NONE) return;
    for (ch = 0; ch < c; ch++) {
        float a, b, *row = y + (int32_t)ch * plane;
        cnnp_bn_ab(ctx, e, ch, &a, &b);
        for (i = 0; i < plane; i++)
            row[i] = cnnp_act(e, e->bn_kind == CNNP_BN_NONE ? row[i] : row[i] * a + b);
    }
}

/* A conv's output channel oc as y = acc * a + b: its scale and bias, then its batch norm. */
static void cnnp_out_ab(const cnnp_ctx *ctx, const cnnp_conv_t *p, int oc, float *a, float *b)
{
    float s = p->scale_n ? cnnp_vec(ctx, p->scale, p->scale_n == 1 ? 0 : oc) : 1.0f;
    float c = p->bias >= 0 ? cnnp_vec(ctx, p->bias, oc) : 0.0f, bn_a, bn_b;
    cnnp_bn_ab(ctx, &p->epi, oc, &bn_a, &bn_b);
    *a = s * bn_a;
    *b = c * bn_a + bn_b;
}

void cnnp_epilogue(const cnnp_ctx *ctx, const cnnp_epi_t *p)
{
    const float *x = cnnp_src(ctx, p->x);
    float *y = cnnp_dst(ctx, p->y);
    if (x != y) memmove(y, x, sizeof(float) * (size_t)p->c * (size_t)p->plane);
    cnnp_apply_epi(ctx, &p->epi, y, p->c, p->plane);
}

/* The output rows (or columns) o in [lo, hi] whose input index o*s - p + k*d lies in [0, n). */
static void cnnp_range(int n, int out, int s, int pad, int kd, int *lo, int *hi)
{
    int first = pad - kd, last = n - 1 + pad - kd;
    *lo = first <= 0 ? 0 : (first + s - 1) / s;
    *hi = last < 0 ? -1 : last / s;
    if (*hi > out - 1) *hi = out - 1;
}

/* y[oc] += v * x[ic] shifted by the kernel tap (ky, kx), over every output position. */
static void cnnp_axpy(const cnnp_conv_t *p, const float *xc, float *yc, float v, int ky, int kx)
{
    int oh0, oh1, ow0, ow1, oh, ow;
    cnnp_range(p->h, p->oh, p->sh, p->ph, ky * p->dh, &oh0, &oh1);
    cnnp_range(p->w, p->ow, p->sw, p->pw, kx * p->dw, &ow0, &ow1);
    for (oh = oh0; oh <= oh1; oh++) {
        const float *xr = xc + (int32_t)(oh * p->sh - p->ph + ky * p->dh) * p->w;
        float *yr = yc + (int32_t)oh * p->ow;
        int iw = ow0 * p->sw - p->pw + kx * p->dw;
        for (ow = ow0; ow <= ow1; ow++, iw += p->sw) yr[ow] += v * xr[iw];
    }
}

/* The next stored weight of a dense, binary, sparse or k-means conv: its flat index in the
 * (n, c/groups, kh, kw) weight and its value; 0 when there is none left. */
typedef struct { int32_t k, entry, at; cnnp_huff code, pos; } cnnp_walk;

static int cnnp_next(const cnnp_ctx *ctx, const cnnp_conv_t *p, cnnp_walk *it, int32_t total,
                     int32_t *idx, float *v)
{
    int32_t k = it->k;
    if (p->pos >= 0) { /* sparse positions: bitmap or relative gaps with fillers */
        if (k >= p->kept) return 0;
        if (p->pos_bits == 0) {
            while (it->at < total && !cnnp_bits(cnnp_w(ctx, p->pos), it->at, 1)) it->at++;
            *idx = it->at++;
        } else {
            uint32_t filler = (1u << p->pos_bits) - 1u, g;
            for (;;) {
                g = (p->huff & 2) ? cnnp_huff_next(&it->pos)
                                  : cnnp_bits(cnnp_w(ctx, p->pos), it->entry, p->pos_bits);
                it->entry++;
                if (g != filler) break;
                it->at += (int32_t)filler;
            }
            it->at += (int32_t)g + 1;
            *idx = it->at - 1;
        }
    } else {
        if (k >= total) return 0;
        *idx = k;
    }
    it->k = k + 1;
    if (p->kind == CNNP_W_BINARY) {
        *v = cnnp_bits(cnnp_w(ctx, p->code), *idx, 1) ? 1.0f : -1.0f;
    } else if (p->kind == CNNP_W_KMEANS) {
        uint32_t j = (p->huff & 1) ? cnnp_huff_next(&it->code)
                                   : cnnp_bits(cnnp_w(ctx, p->code), k, p->code_bits);
        *v = cnnp_vec(ctx, p->wt, (int32_t)j);
    } else if (p->kind == CNNP_W_SPARSE) {
        *v = cnnp_vec(ctx, p->wt, k);
    } else {
        *v = cnnp_float_at(ctx->float_bits, cnnp_w(ctx, p->wt), *idx, p->n, total / p->n);
    }
    return 1;
}

static void cnnp_conv_stream(const cnnp_ctx *ctx, const cnnp_conv_t *p, const float *x, float *y)
{
    int cg = p->c / p->groups, ng = p->n / p->groups, taps = p->kh * p->kw;
    int32_t plane_in = (int32_t)p->h * p->w, plane = (int32_t)p->oh * p->ow;
    int32_t total = (int32_t)p->n * cg * taps, idx;
    cnnp_walk it;
    float v;
    int32_t *tables = (int32_t *)ctx->scratch;
    memset(&it, 0, sizeof it);
    if (p->huff & 1) { /* Huffman-coded k-means indices: the decoder's tables in scratch */
        cnnp_huff_init(&it.code, cnnp_w(ctx, p->code), 1 << p->code_bits, tables);
        tables += CNNP_HUFF_INTS(1 << p->code_bits);
    }
    if (p->huff & 2) {
        cnnp_huff_init(&it.pos, cnnp_w(ctx, p->pos), 1 << p->pos_bits, tables);
        tables += CNNP_HUFF_INTS(1 << p->pos_bits);
    }
    if (p->res) { /* one output channel at a time in scratch, then added to the residual */
        float *acc = (float *)tables, a, b;
        int have = cnnp_next(ctx, p, &it, total, &idx, &v), oc;
        int32_t i;
        for (oc = 0; oc < p->n; oc++) {
            float *out = y + (int32_t)oc * plane;
            memset(acc, 0, sizeof(float) * (size_t)plane);
            for (; have && idx / (cg * taps) == oc; have = cnnp_next(ctx, p, &it, total, &idx, &v)) {
                int rest = idx % (cg * taps), tap = rest % taps;
                cnnp_axpy(p, x + (int32_t)((oc / ng) * cg + rest / taps) * plane_in, acc, v,
                          tap / p->kw, tap % p->kw);
            }
            cnnp_out_ab(ctx, p, oc, &a, &b);
            for (i = 0; i < plane; i++) out[i] = cnnp_act(&p->epi, acc[i] * a + b + out[i]);
        }
        return;
    }
    memset(y, 0, sizeof(float) * (size_t)p->n * (size_t)plane);
    while (cnnp_next(ctx, p, &it, total, &idx, &v)) {
        int oc = idx / (cg * taps), rest = idx % (cg * taps);
        int ic = (oc / ng) * cg + rest / taps, tap = rest % taps;
        cnnp_axpy(p, x + (int32_t)ic * plane_in, y + (int32_t)oc * plane, v, tap / p->kw,
                  tap % p->kw);
    }
}

/* SLBF, split-transform-merge over tiles of CNNP_TILE output positions (row-major, across
 * rows): for each slice, the tile's d x kh x kw patches go through all m bank filters (+-1
 * weights: adds and subtracts along the tile), one input channel of the slice at a time;
 * then each output channel adds the response its selection for that slice names. Every inner
 * loop runs along the tile, so it has a fixed length and no branch (the compiler vectorises
 * it); a tile's lanes past the plane compute zeros that are never stored. Scratch
 * (cnnpress.runtime.c_lower.slbf_scratch): one channel's kh x kw patches, the m responses and
 * the n sums of the tile; the selections decoded once when Huffman-coded; with a residual,
 * each output channel's y = sum * a + b. */

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

/* acc[i][e] += the response that output i's selection for slice j names. */
static void cnnp_slbf_gather(const cnnp_conv_t *p, const float *restrict z,
                             const uint16_t *decoded, const uint8_t *sel, int j,
                             float *restrict acc)
{
    int s = p->c / p->d, i, e;
    for (i = 0; i < p->n; i++) {
        int32_t k = (int32_t)i * s + j;
        const float *restrict zt =
            z + (decoded ? decoded[k] : cnnp_bits(sel, k, p->code_bits)) * CNNP_TILE;
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

static void cnnp_conv_slbf(const cnnp_ctx *ctx, const cnnp_conv_t *p, const float *x, float *y)
{
    int s = p->c / p->d, kk = p->kh * p->kw, i, j, e, count;
    int32_t plane_in = (int32_t)p->h * p->w, plane = (int32_t)p->oh * p->ow, at;
    const uint8_t *bank = cnnp_w(ctx, p->code), *sel = cnnp_w(ctx, p->sel);
    float *patch = ctx->scratch, *z = patch + kk * CNNP_TILE, *acc = z + (p->m + 1) * CNNP_TILE;
    float *ab = acc + p->n * CNNP_TILE;
    uint16_t *decoded = 0;
    int ih0[CNNP_TILE], iw0[CNNP_TILE];
    if (p->huff & 1) { /* Huffman-coded selections: decoded once, in order */
        cnnp_huff coded;
        int32_t *tables = (int32_t *)ab, k;
        cnnp_huff_init(&coded, sel, 1 << p->code_bits, tables);
        decoded = (uint16_t *)(tables + CNNP_HUFF_INTS(1 << p->code_bits));
        for (k = 0; k < (int32_t)p->n * s; k++) decoded[k] = (uint16_t)cnnp_huff_next(&coded);
        ab = (float *)decoded + ((int32_t)p->n * s + 1) / 2;
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
            cnnp_slbf_gather(p, z, decoded, sel, j, acc);
        }
        cnnp_slbf_store(p, acc, ab, at, count, y);
    }
}

void cnnp_conv(const cnnp_ctx *ctx, const cnnp_conv_t *p)
{
    const float *x = cnnp_src(ctx, p->x);
    float *y = cnnp_dst(ctx, p->y);
    int32_t plane = (int32_t)p->oh * p->ow, i;
    int oc;
    if (p->kind == CNNP_W_SLBF) cnnp_conv_slbf(ctx, p, x, y);
    else cnnp_conv_stream(ctx, p, x, y);
    if (p->res) return; /* scale, bias, batch norm, residual and activation are done */
    for (oc = 0; oc < p->n; oc++) {
        float a = p->scale_n ? cnnp_vec(ctx, p->scale, p->scale_n == 1 ? 0 : oc) : 1.0f;
        float b = p->bias >= 0 ? cnnp_vec(ctx, p->bias, oc) : 0.0f;
        float *row = y + (int32_t)oc * plane;
        if (p->scale_n)
            for (i = 0; i < plane; i++) row[i] *= a;
        if (p->bias >= 0)
            for (i = 0; i < plane; i++) row[i] += b;
    }
    cnnp_apply_epi(ctx, &p->epi, y, p->n, plane);
}

/* Walk every index of an ndim-dimensional shape, row-major, calling back with offsets. */
#define CNNP_FOR_EACH(ndim, shape, body)                                                     \
    do {                                                                                     \
        int32_t ix_[CNNP_MAX_DIMS] = {0}, n_ = 1;                                             \
        int d_;                                                                              \
        for (d_ = 0; d_ < (ndim); d_++) n_ *= (shape)[d_];                                    \
        while (n_-- > 0) {                                                                   \
            body;                                                                            \
            for (d_ = (ndim) - 1; d_ >= 0; d_--) {                                           \
                if (++ix_[d_] < (shape)[d_]) break;                                          \
                ix_[d_] = 0;                                                                 \
            }                                                                                \
        }                                                                                    \
    } while (0)

static int32_t cnnp_offset(const int32_t *ix, const int32_t *stride, int ndim)
{
    int32_t off = 0;
    int d;
    for (d = 0; d < ndim; d++) off += ix[d] * stride[d];
    return off;
}

void cnnp_binary(const cnnp_ctx *ctx, const cnnp_binary_t *p)
{
    const float *a = cnnp_src(ctx, p->a), *b = p->b_const ? 0 : cnnp_src(ctx, p->b);
    float *y = cnnp_dst(ctx, p->y);
    int32_t out = 0, total = 1;
    int d;
    CNNP_FOR_EACH(p->ndim, p->shape, {
        float u = a[cnnp_offset(ix_, p->sa, p->ndim)];
        float v = p->b_const ? p->b_value : b[cnnp_offset(ix_, p->sb, p->ndim)];
        y[out++] = p->op == CNNP_ADD ? u + v : (p->op == CNNP_SUB ? u - v : u * v);
    });
    for (d = 0; d < p->ndim; d++) total *= p->shape[d];
    cnnp_apply_epi(ctx, &p->epi, y, p->channels, total / p->channels);
}

void cnnp_ewise(const cnnp_ctx *ctx, const cnnp_ewise_t *p)
{
    const float *a = cnnp_src(ctx, p->a), *b = p->b_const ? 0 : cnnp_src(ctx, p->b);
    float *y = cnnp_dst(ctx, p->y);
    int32_t i;
    for (i = 0; i < p->n; i++) {
        float u = a[i], v = p->b_const ? p->b_value : b[i];
        y[i] = p->op == CNNP_ADD ? u + v : (p->op == CNNP_SUB ? u - v : u * v);
    }
    cnnp_apply_epi(ctx, &p->epi, y, p->channels, p->n / p->channels);
}

void cnnp_copy(const cnnp_ctx *ctx, const cnnp_copy_t *p)
{
    const float *x = cnnp_src(ctx, p->x);
    float *y = cnnp_dst(ctx, p->y);
    CNNP_FOR_EACH(p->ndim, p->shape, {
        y[cnnp_offset(ix_, p->sy, p->ndim)] = x[cnnp_offset(ix_, p->sx, p->ndim)];
    });
}

void cnnp_fill(const cnnp_ctx *ctx, const cnnp_fill_t *p)
{
    float *y = cnnp_dst(ctx, p->y);
    int32_t i;
    for (i = 0; i < p->n; i++) y[i] = p->value;
}

static void cnnp_window(const cnnp_pool_t *p, int o, int vertical, int *lo, int *hi, int *size)
{
    int n = vertical ? p->h : p->w, out = vertical ? p->oh : p->ow;
    int k = vertical ? p->kh : p->kw, s = vertical ? p->sh : p->sw;
    int pad = vertical ? p->ph : p->pw, d = vertical ? p->dh : p->dw;
    if (p->kind == CNNP_ADAPTIVE_AVG || p->kind == CNNP_ADAPTIVE_MAX) {
        *lo = (int)(((int32_t)o * n) / out);
        *hi = (int)((((int32_t)o + 1) * n + out - 1) / out);
        *size = *hi - *lo;
        return;
    }
    *lo = o * s - pad;
    if (p->kind == CNNP_AVGPOOL) { /* as PyTorch: the padded window counts where asked */
        *hi = *lo + k < n + pad ? *lo + k : n + pad;
        *size = *hi - *lo;
        if (*lo < 0) *lo = 0;
        if (*hi > n) *hi = n;
        return;
    }
    *hi = *lo + (k - 1) * d + 1 < n ? *lo + (k - 1) * d + 1 : n;
    while (*lo < 0) *lo += d;
    *size = 0;
}

void cnnp_pool(const cnnp_ctx *ctx, const cnnp_pool_t *p)
{
    const float *x = cnnp_src(ctx, p->x);
    float *y = cnnp_dst(ctx, p->y);
    int c, oh, ow, ih, iw, h0, h1, hs, w0, w1, ws;
    int max = p->kind == CNNP_MAXPOOL || p->kind == CNNP_ADAPTIVE_MAX;
    int step_h = p->kind == CNNP_MAXPOOL ? p->dh : 1, step_w = p->kind == CNNP_MAXPOOL ? p->dw : 1;
    for (c = 0; c < p->c; c++) {
        const float *xc = x + (int32_t)c * p->h * p->w;
        for (oh = 0; oh < p->oh; oh++) {
            cnnp_window(p, oh, 1, &h0, &h1, &hs);
            for (ow = 0; ow < p->ow; ow++) {
                float acc = max ? -INFINITY : 0.0f;
                cnnp_window(p, ow, 0, &w0, &w1, &ws);
                for (ih = h0; ih < h1; ih += step_h)
                    for (iw = w0; iw < w1; iw += step_w) {
                        float v = xc[(int32_t)ih * p->w + iw];
                        if (max) acc = v > acc || v != v ? v : acc;
                        else acc += v;
                    }
                if (!max) {
                    int count = p->kind == CNNP_AVGPOOL && p->count_include_pad
                                    ? hs * ws : (h1 - h0) * (w1 - w0);
                    acc /= (float)count;
                }
                y[((int32_t)c * p->oh + oh) * p->ow + ow] = acc;
            }
        }
    }
}

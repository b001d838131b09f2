/* Integer convs and linear layers over dense int8, binary, sparse and k-means weights
 * (cnnpress_q.h): one output channel at a time, its int32 sums in scratch, then requantized
 * into the int8 output (or added to the residual the output overwrites). */
#include <string.h>

#include "cnnpress_q.h"

/* acc += v * (x - zi) over the output positions that kernel tap (ky, kx) reaches; padding
 * adds nothing (its centred value is 0). */
static void cnnp_q_axpy(const cnnp_conv_t *p, const int8_t *xc, int32_t zi, int32_t *acc,
                        int32_t v, int ky, int kx)
{
    int oh0, oh1, ow0, ow1, oh, ow;
    cnnp_q_range(p->h, p->oh, p->sh, p->ph, ky * p->dh, &oh0, &oh1);
    cnnp_q_range(p->w, p->ow, p->sw, p->pw, kx * p->dw, &ow0, &ow1);
    for (oh = oh0; oh <= oh1; oh++) {
        const int8_t *xr = xc + (int32_t)(oh * p->sh - p->ph + ky * p->dh) * p->w;
        int32_t *ar = acc + (int32_t)oh * p->ow;
        int iw = ow0 * p->sw - p->pw + kx * p->dw;
        for (ow = ow0; ow <= ow1; ow++, iw += p->sw) ar[ow] += v * ((int32_t)xr[iw] - zi);
    }
}

/* The next stored weight: its flat index in the (n, c/groups, kh, kw) weight and its
 * integer value (+-1 signs; int8 values, codebook entries and kept values); 0 at the end. */
typedef struct { int32_t k, entry, at; cnnp_huff code, pos; } cnnp_q_walk;

static int32_t cnnp_q_position(const cnnp_qctx *ctx, const cnnp_conv_t *p, cnnp_q_walk *it,
                               int32_t total)
{
    const uint8_t *pos = ctx->weights + p->pos;
    uint32_t filler = (1u << p->pos_bits) - 1u, g;
    if (p->pos_bits == 0) {
        while (it->at < total && !cnnp_bits(pos, it->at, 1)) it->at++;
        return it->at++;
    }
    for (;;) {
        g = (p->huff & 2) ? cnnp_huff_next(&it->pos) : cnnp_bits(pos, it->entry, p->pos_bits);
        it->entry++;
        if (g != filler) break;
        it->at += (int32_t)filler;
    }
    it->at += (int32_t)g + 1;
    return it->at - 1;
}

static int cnnp_q_next(const cnnp_qctx *ctx, const cnnp_conv_t *p, cnnp_q_walk *it,
                       int32_t total, int32_t *idx, int32_t *v)
{
    int32_t k = it->k;
    if (p->pos >= 0) {
        if (k >= p->kept) return 0;
        *idx = cnnp_q_position(ctx, p, it, total);
    } else {
        if (k >= total) return 0;
        *idx = k;
    }
    it->k = k + 1;
    if (p->kind == CNNP_W_BINARY) {
        *v = cnnp_bits(ctx->weights + p->code, *idx, 1) ? 1 : -1;
    } else if (p->kind == CNNP_W_KMEANS) { /* a q8 codebook: one scale, then the entries */
        uint32_t j = (p->huff & 1) ? cnnp_huff_next(&it->code)
                                   : cnnp_bits(ctx->weights + p->code, k, p->code_bits);
        *v = (int8_t)ctx->weights[p->wt + 4 + (int32_t)j];
    } else if (p->kind == CNNP_W_SPARSE) { /* q8 kept values: one scale, then the values */
        *v = (int8_t)ctx->weights[p->wt + 4 + k];
    } else { /* q8 dense weights: n scales (one per output channel), then the values */
        *v = (int8_t)ctx->weights[p->wt + 4 * (int32_t)p->n + *idx];
    }
    return 1;
}

/* Output channel oc's sums to int8: requantized, then clamped or added to the residual. */
static void cnnp_q_store(const cnnp_qctx *ctx, const cnnp_conv_t *p, const cnnp_q_t *q, int oc,
                         const int32_t *acc, int8_t *out)
{
    int32_t plane = (int32_t)p->oh * p->ow, i, v;
    cnnp_q_channel c = cnnp_q_decode(ctx->qdata + q->rq, oc);
    for (i = 0; i < plane; i++) {
        v = cnnp_q_apply(&c, acc[i]);
        if (p->res)
            out[i] = (int8_t)cnnp_q_add(q, q->zp, cnnp_q_clamp(q->zp + v, q->qmin, q->qmax),
                                        out[i]);
        else
            out[i] = (int8_t)cnnp_q_clamp(q->zo + v, q->lo, q->hi);
    }
}

void cnnp_q_conv(const cnnp_qctx *ctx, const cnnp_conv_t *p, const cnnp_q_t *q)
{
    int cg = p->c / p->groups, ng = p->n / p->groups, taps = p->kh * p->kw, oc, have;
    int32_t plane_in = (int32_t)p->h * p->w, plane = (int32_t)p->oh * p->ow;
    int32_t total = (int32_t)p->n * cg * taps, idx, v;
    const int8_t *x = cnnp_q_at(ctx, p->x);
    int8_t *y = cnnp_q_at(ctx, p->y);
    int32_t *tables = ctx->scratch, *acc;
    cnnp_q_walk it;
    if (p->kind == CNNP_W_SLBF) {
        cnnp_q_conv_slbf(ctx, p, q);
        return;
    }
    memset(&it, 0, sizeof it);
    if (p->huff & 1) { /* Huffman-coded k-means indices: the decoder's tables in scratch */
        cnnp_huff_init(&it.code, ctx->weights + p->code, 1 << p->code_bits, tables);
        tables += CNNP_HUFF_INTS(1 << p->code_bits);
    }
    if (p->huff & 2) {
        cnnp_huff_init(&it.pos, ctx->weights + p->pos, 1 << p->pos_bits, tables);
        tables += CNNP_HUFF_INTS(1 << p->pos_bits);
    }
    acc = tables;
    have = cnnp_q_next(ctx, p, &it, total, &idx, &v);
    for (oc = 0; oc < p->n; oc++) {
        memset(acc, 0, sizeof(int32_t) * (size_t)plane);
        for (; have && idx / (cg * taps) == oc; have = cnnp_q_next(ctx, p, &it, total, &idx, &v)) {
            int rest = idx % (cg * taps), tap = rest % taps;
            cnnp_q_axpy(p, x + (int32_t)((oc / ng) * cg + rest / taps) * plane_in, q->zi, acc, v,
                        tap / p->kw, tap % p->kw);
        }
        cnnp_q_store(ctx, p, q, oc, acc, y + (int32_t)oc * plane);
    }
}

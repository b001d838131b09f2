/* cnnpress C runtime: the conv kernel (dense, binary, sparse and k-means weights streamed;
 * SLBF in cnnp_slbf.c), also a linear layer's (see cnnpress_rt.h). */
#include "cnnp_internal.h"

#include <string.h>

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
            while (it->at < total && !cnnp_bits_at(cnnp_w(ctx, p->pos), it->at, 1)) it->at++;
            *idx = it->at++;
        } else {
            uint32_t filler = (1u << p->pos_bits) - 1u, g;
            for (;;) {
                g = (p->huff & 2) ? cnnp_huff_decode(&it->pos)
                                  : cnnp_bits_at(cnnp_w(ctx, p->pos), it->entry, p->pos_bits);
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
        *v = cnnp_bits_at(cnnp_w(ctx, p->code), *idx, 1) ? 1.0f : -1.0f;
    } else if (p->kind == CNNP_W_KMEANS) {
        uint32_t j = (p->huff & 1) ? cnnp_huff_decode(&it->code)
                                   : cnnp_bits_at(cnnp_w(ctx, p->code), k, p->code_bits);
        *v = cnnp_vec(ctx, p->wt, (int32_t)j);
    } else if (p->kind == CNNP_W_SPARSE) {
        *v = cnnp_vec(ctx, p->wt, k);
    } else {
        *v = cnnp_float_in(ctx->float_bits, cnnp_w(ctx, p->wt), *idx, p->n, total / p->n);
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

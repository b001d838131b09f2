/* cnnpress C runtime: max, average and adaptive pooling (see cnnpress_rt.h). */
#include "cnnp_internal.h"

#include <math.h>

void cnnp_pool_window(const cnnp_pool_t *p, int o, int vertical, int *lo, int *hi, int *size)
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
            cnnp_pool_window(p, oh, 1, &h0, &h1, &hs);
            for (ow = 0; ow < p->ow; ow++) {
                float acc = max ? -INFINITY : 0.0f;
                cnnp_pool_window(p, ow, 0, &w0, &w1, &ws);
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

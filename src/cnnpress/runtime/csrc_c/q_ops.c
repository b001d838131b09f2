/* Integer kernels besides convs (cnnpress_q.h): a batch norm or activation alone, add, sub
 * and mul (TFLite's ADD and MUL), strided copies (also requantizing, quantizing the float
 * input and dequantizing the logits), fills and pooling in the input's own scale. */
#include <math.h>

#include "cnnpress_q.h"

void cnnp_q_epilogue(const cnnp_qctx *ctx, const cnnp_epi_t *p, const cnnp_q_t *q)
{
    const int8_t *x = cnnp_q_at(ctx, p->x);
    int8_t *y = cnnp_q_at(ctx, p->y);
    const int32_t *rq = ctx->qdata + q->rq;
    int32_t ch, i;
    for (ch = 0; ch < p->c; ch++) {
        cnnp_q_channel c = cnnp_q_decode(rq, ch);
        for (i = 0; i < p->plane; i++) {
            int32_t at = ch * p->plane + i;
            y[at] = (int8_t)cnnp_q_clamp(q->zo + cnnp_q_apply(&c, x[at] - q->zi), q->lo, q->hi);
        }
    }
}

static int8_t cnnp_q_op(int op, const cnnp_q_t *q, int32_t a, int32_t b)
{
    if (op == CNNP_MUL)
        return (int8_t)cnnp_q_clamp(q->zo + cnnp_q_mul((a - q->zi) * (b - q->zb), q->mo, q->so),
                                    q->lo, q->hi);
    return (int8_t)cnnp_q_add(q, q->zi, a, b); /* sub: q->m2 is negative */
}

void cnnp_q_ewise(const cnnp_qctx *ctx, const cnnp_ewise_t *p, const cnnp_q_t *q)
{
    const int8_t *a = cnnp_q_at(ctx, p->a), *b = cnnp_q_at(ctx, p->b);
    int8_t *y = cnnp_q_at(ctx, p->y);
    int32_t i;
    for (i = 0; i < p->n; i++) y[i] = cnnp_q_op(p->op, q, a[i], b[i]);
}

/* Steps through every index of a shape, row-major: the offsets along two stride lists. */
typedef struct { int32_t ix[CNNP_MAX_DIMS], u, v; } cnnp_q_iter;

static void cnnp_q_step(cnnp_q_iter *it, int ndim, const int32_t *shape, const int32_t *su,
                        const int32_t *sv)
{
    int d;
    for (d = ndim - 1; d >= 0; d--) {
        it->u += su[d];
        it->v += sv[d];
        if (++it->ix[d] < shape[d]) return;
        it->u -= su[d] * shape[d];
        it->v -= sv[d] * shape[d];
        it->ix[d] = 0;
    }
}

static int32_t cnnp_q_count(int ndim, const int32_t *shape)
{
    int32_t n = 1;
    int d;
    for (d = 0; d < ndim; d++) n *= shape[d];
    return n;
}

void cnnp_q_binary(const cnnp_qctx *ctx, const cnnp_binary_t *p, const cnnp_q_t *q)
{
    const int8_t *a = cnnp_q_at(ctx, p->a), *b = cnnp_q_at(ctx, p->b);
    int8_t *y = cnnp_q_at(ctx, p->y);
    cnnp_q_iter it = {{0}, 0, 0};
    int32_t i, n = cnnp_q_count(p->ndim, p->shape);
    for (i = 0; i < n; i++) {
        y[i] = cnnp_q_op(p->op, q, a[it.u], b[it.v]);
        cnnp_q_step(&it, p->ndim, p->shape, p->sa, p->sb);
    }
}

/* One value of a copy: requantized, quantized from the float input, or kept. */
static int8_t cnnp_q_value(const cnnp_q_t *q, int32_t x)
{
    if (q->mo == 0) return (int8_t)x;
    return (int8_t)cnnp_q_clamp(q->zo + cnnp_q_mul(x - q->zi, q->mo, q->so), q->lo, q->hi);
}

static int8_t cnnp_q_quantize(const cnnp_q_t *q, float x)
{
    float v = x * q->scale, a;
    if (v > 1e6f) v = 1e6f;
    if (v < -1e6f) v = -1e6f;
    a = floorf(fabsf(v) + 0.5f);
    return (int8_t)cnnp_q_clamp((int32_t)(v < 0.0f ? -a : a) + q->zo, q->lo, q->hi);
}

void cnnp_q_copy(const cnnp_qctx *ctx, const cnnp_copy_t *p, const cnnp_q_t *q)
{
    cnnp_q_iter it = {{0}, 0, 0};
    int32_t i, n = cnnp_q_count(p->ndim, p->shape);
    for (i = 0; i < n; i++) {
        if (q->mode == CNNP_Q_QUANTIZE)
            cnnp_q_at(ctx, p->y)[it.v] = cnnp_q_quantize(q, ctx->input[CNNP_REF_OFF(p->x) + it.u]);
        else if (q->mode == CNNP_Q_DEQUANTIZE)
            ctx->logits[CNNP_REF_OFF(p->y) + it.v] =
                (float)(cnnp_q_at(ctx, p->x)[it.u] - q->zi) * q->scale;
        else
            cnnp_q_at(ctx, p->y)[it.v] = cnnp_q_value(q, cnnp_q_at(ctx, p->x)[it.u]);
        cnnp_q_step(&it, p->ndim, p->shape, p->sx, p->sy);
    }
}

void cnnp_q_fill(const cnnp_qctx *ctx, const cnnp_fill_t *p, const cnnp_q_t *q)
{
    int8_t *y = cnnp_q_at(ctx, p->y);
    int32_t i;
    for (i = 0; i < p->n; i++) y[i] = (int8_t)q->zo;
}

/* Max, or the mean rounded half away from zero, of one window of centred values. */
static int32_t cnnp_q_reduce(const cnnp_pool_t *p, const int8_t *xc, int32_t zi, int h0, int h1,
                             int w0, int w1, int32_t count)
{
    int max = p->kind == CNNP_MAXPOOL || p->kind == CNNP_ADAPTIVE_MAX, ih, iw;
    int step_h = p->kind == CNNP_MAXPOOL ? p->dh : 1, step_w = p->kind == CNNP_MAXPOOL ? p->dw : 1;
    int32_t acc = max ? -256 : 0;
    for (ih = h0; ih < h1; ih += step_h)
        for (iw = w0; iw < w1; iw += step_w) {
            int32_t v = (int32_t)xc[(int32_t)ih * p->w + iw] - zi;
            if (max) acc = v > acc ? v : acc;
            else acc += v;
        }
    if (max) return acc;
    return acc >= 0 ? (acc + count / 2) / count : (acc - count / 2) / count;
}

void cnnp_q_pool(const cnnp_qctx *ctx, const cnnp_pool_t *p, const cnnp_q_t *q)
{
    const int8_t *x = cnnp_q_at(ctx, p->x);
    int8_t *y = cnnp_q_at(ctx, p->y);
    int c, oh, ow, h0, h1, hs, w0, w1, ws;
    for (c = 0; c < p->c; c++) {
        const int8_t *xc = x + (int32_t)c * p->h * p->w;
        for (oh = 0; oh < p->oh; oh++) {
            cnnp_pool_window(p, oh, 1, &h0, &h1, &hs);
            for (ow = 0; ow < p->ow; ow++) {
                int32_t count;
                cnnp_pool_window(p, ow, 0, &w0, &w1, &ws);
                count = p->kind == CNNP_AVGPOOL && p->count_include_pad ? hs * ws
                                                                        : (h1 - h0) * (w1 - w0);
                y[((int32_t)c * p->oh + oh) * p->ow + ow] =
                    (int8_t)(q->zi + cnnp_q_reduce(p, xc, q->zi, h0, h1, w0, w1, count));
            }
        }
    }
}

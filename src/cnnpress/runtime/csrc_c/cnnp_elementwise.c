/* cnnpress C runtime: elementwise kernels: an epilogue alone, broadcast and contiguous
 * binary operations (see cnnpress_rt.h). */
#include "cnnp_internal.h"

#include <string.h>

void cnnp_epilogue(const cnnp_ctx *ctx, const cnnp_epi_t *p)
{
    const float *x = cnnp_src(ctx, p->x);
    float *y = cnnp_dst(ctx, p->y);
    if (x != y) memmove(y, x, sizeof(float) * (size_t)p->c * (size_t)p->plane);
    cnnp_apply_epi(ctx, &p->epi, y, p->c, p->plane);
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

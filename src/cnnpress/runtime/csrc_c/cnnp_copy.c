/* cnnpress C runtime: strided copy and fill (see cnnpress_rt.h). */
#include "cnnp_internal.h"

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

/* cnnpress C runtime: what the kernel files share (not part of the public interface). */
#ifndef CNNP_INTERNAL_H
#define CNNP_INTERNAL_H

#include "cnnpress_rt.h"

#include <string.h>

/* The readers of cnnp_float_at, cnnp_half, cnnp_bits and cnnp_huff_next, inline: the kernels
 * call them once per weight. */
static inline float cnnp_half_to_float(uint16_t h)
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

static inline float cnnp_f32(const uint8_t *a)
{
    uint32_t bits = (uint32_t)a[0] | (uint32_t)a[1] << 8 | (uint32_t)a[2] << 16 |
                    (uint32_t)a[3] << 24;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Value i of a float array stored at float_bits; for int8 ("q8") the array has `rows`
 * float32 scales first, one per row of row_len values. */
static inline float cnnp_float_in(int float_bits, const uint8_t *a, int32_t i, int32_t rows,
                                   int32_t row_len)
{
    if (float_bits == 32) return cnnp_f32(a + 4 * i);
    if (float_bits == 16) return cnnp_half_to_float((uint16_t)(a[2 * i] | a[2 * i + 1] << 8));
    return (float)(int8_t)a[4 * rows + i] * cnnp_f32(a + 4 * (i / row_len));
}

/* The `bits`-bit value that starts at bit o of p (least significant bit first). */
static inline uint32_t cnnp_bits_from(const uint8_t *p, uint32_t o, int bits)
{
    uint32_t first = o >> 3, shift = o & 7u, need = (shift + (uint32_t)bits + 7u) >> 3, k, v = 0;
    for (k = 0; k < need; k++) v |= (uint32_t)p[first + k] << (8u * k);
    return (v >> shift) & ((1u << bits) - 1u);
}

static inline uint32_t cnnp_bits_at(const uint8_t *p, int32_t i, int bits)
{
    return cnnp_bits_from(p, (uint32_t)i * (uint32_t)bits, bits);
}

static inline uint32_t cnnp_huff_decode(cnnp_huff *h)
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

static inline const float *cnnp_src(const cnnp_ctx *ctx, cnnp_ref r)
{
    if (CNNP_REF_BASE(r) == CNNP_INPUT) return ctx->input + CNNP_REF_OFF(r);
    if (CNNP_REF_BASE(r) == CNNP_LOGITS) return ctx->logits + CNNP_REF_OFF(r);
    return ctx->arena + CNNP_REF_OFF(r);
}

static inline float *cnnp_dst(const cnnp_ctx *ctx, cnnp_ref r)
{
    return (CNNP_REF_BASE(r) == CNNP_LOGITS ? ctx->logits : ctx->arena) + CNNP_REF_OFF(r);
}

static inline const uint8_t *cnnp_w(const cnnp_ctx *ctx, cnnp_arr a)
{
    return ctx->weights + a;
}

static inline float cnnp_vec(const cnnp_ctx *ctx, cnnp_arr a, int32_t i)
{
    return cnnp_float_in(ctx->float_bits, cnnp_w(ctx, a), i, 1, INT32_MAX);
}

static inline float cnnp_act(const cnnp_epi *e, float v)
{
    if (e->act == CNNP_ACT_RELU) return v < 0.0f ? 0.0f : v;
    if (e->act == CNNP_ACT_CLAMP) return v < e->lo ? e->lo : (v > e->hi ? e->hi : v);
    return v;
}

/* y = epi(x) in place over c channels of `plane` values each. */
void cnnp_apply_epi(const cnnp_ctx *ctx, const cnnp_epi *e, float *y, int c, int32_t plane);
/* A conv's output channel oc as y = acc * a + b: its scale and bias, then its batch norm. */
void cnnp_out_ab(const cnnp_ctx *ctx, const cnnp_conv_t *p, int oc, float *a, float *b);
/* The SLBF kernel (cnnp_slbf.c) of cnnp_conv: y from x, before cnnp_conv's epilogue. */
void cnnp_conv_slbf(const cnnp_ctx *ctx, const cnnp_conv_t *p, const float *x, float *y);

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

static inline int32_t cnnp_offset(const int32_t *ix, const int32_t *stride, int ndim)
{
    int32_t off = 0;
    int d;
    for (d = 0; d < ndim; d++) off += ix[d] * stride[d];
    return off;
}

#endif

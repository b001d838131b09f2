/* cnnpress C runtime, integer activations: the kernels of a model whose activations are
 * quantized (cnnpress.quantize). Tensors are int8 (q, real = scale * (q - zero)) in one
 * arena; the input comes in as floats and is quantized by the first copy, the logits go out
 * as floats. Every operation has the float runtime's descriptor (cnnpress_rt.h; its float
 * batch-norm and scale fields unused) and a cnnp_q_t with its integer parameters. The
 * arithmetic is TFLite's (cnnpress.fixedpoint): int32 sums, requantization by an int32
 * multiplier and a shift with round-half-away rounding, ADD with a 20-bit left shift. */
#ifndef CNNPRESS_Q_H
#define CNNPRESS_Q_H

#include <stdint.h>

#include "cnnpress_rt.h"

#define CNNP_ADD_SHIFT 20
enum { CNNP_Q_COPY = 0, CNNP_Q_QUANTIZE = 1, CNNP_Q_DEQUANTIZE = 2 };

typedef struct {
    int8_t *arena;          /* int8 activations (liveness-planned, bytes) */
    const float *input;     /* the image, C x H x W floats */
    float *logits;          /* the outputs, floats */
    int32_t *scratch;       /* this kernel's scratch in the arena: int32 sums, decoder tables */
    const uint8_t *weights; /* the weight arrays as the .cnnp file packs them */
    const int32_t *qdata;   /* per-channel requantization: m, bias, shift + 256 * offset */
} cnnp_qctx;

/* An operation's integer parameters (cnnpress.runtime.c_quant). */
typedef struct {
    int32_t mode;           /* copies: CNNP_Q_COPY, _QUANTIZE (float in), _DEQUANTIZE (out) */
    int32_t zi, zb, zp, zo; /* zero points: input (a), b (or the residual), pre-add, output */
    int32_t lo, hi;         /* the output's clamp: the integer range and the activation */
    int32_t qmin, qmax;     /* the integer range (a pre-add value's clamp) */
    int32_t rq;             /* int32 index in qdata of the per-channel requantization */
    int32_t m1, s1, m2, s2; /* ADD: a and b onto a common scale */
    int32_t mo, so;         /* ADD: the sum onto the output; MUL and requantizing copies */
    float scale;            /* quantize: 1 / input scale; dequantize: the scale */
} cnnp_q_t;

/* x * m * 2^(shift - 31), rounded as gemmlowp's SaturatingRoundingDoublingHighMul and
 * RoundingDivideByPOT round (cnnpress.fixedpoint.multiply). */
static inline int32_t cnnp_q_mul(int32_t x, int32_t m, int32_t shift)
{
    int left = shift > 0 ? (int)shift : 0, right = shift > 0 ? 0 : (int)-shift;
    int64_t v = (int64_t)x * ((int64_t)1 << left), ab;
    int32_t high, mask, remainder, threshold;
    if (v > INT32_MAX) v = INT32_MAX;
    if (v < INT32_MIN) v = INT32_MIN;
    ab = v * (int64_t)m;
    high = (int32_t)((ab + (ab >= 0 ? ((int64_t)1 << 30) : (1 - ((int64_t)1 << 30)))) /
                     ((int64_t)1 << 31));
    mask = (int32_t)(((uint32_t)1 << right) - 1u);
    remainder = high & mask;
    threshold = (mask >> 1) + (high < 0 ? 1 : 0);
    return (high >> right) + (remainder > threshold ? 1 : 0);
}

static inline int32_t cnnp_q_clamp(int32_t v, int32_t lo, int32_t hi)
{
    return v < lo ? lo : (v > hi ? hi : v);
}

/* One channel's requantization, decoded from its three qdata values (m, bias,
 * shift + 256 * offset) once for all the channel's outputs. */
typedef struct { int32_t m, bias, shift, offset; } cnnp_q_channel;

static inline cnnp_q_channel cnnp_q_decode(const int32_t *rq, int ch)
{
    const int32_t *r = rq + 3 * ch;
    cnnp_q_channel c;
    c.m = r[0];
    c.bias = r[1];
    c.shift = r[2] & 255;
    if (c.shift > 127) c.shift -= 256;
    c.offset = (r[2] - c.shift) / 256;
    return c;
}

/* A decoded channel's requantization of an int32 sum, before the zero point and clamp. */
static inline int32_t cnnp_q_apply(const cnnp_q_channel *c, int32_t acc)
{
    return c->offset + cnnp_q_mul(acc + c->bias, c->m, c->shift);
}

/* Channel ch's requantization of an int32 sum, before the output zero point and clamp. */
static inline int32_t cnnp_q_requant(const int32_t *rq, int ch, int32_t acc)
{
    cnnp_q_channel c = cnnp_q_decode(rq, ch);
    return cnnp_q_apply(&c, acc);
}

/* TFLite ADD of a (zero q->zi or za) and b (zero q->zb) onto the output. */
static inline int32_t cnnp_q_add(const cnnp_q_t *q, int32_t za, int32_t a, int32_t b)
{
    int32_t u = cnnp_q_mul((a - za) * (1 << CNNP_ADD_SHIFT), q->m1, q->s1);
    int32_t v = cnnp_q_mul((b - q->zb) * (1 << CNNP_ADD_SHIFT), q->m2, q->s2);
    return cnnp_q_clamp(q->zo + cnnp_q_mul(u + v, q->mo, q->so), q->lo, q->hi);
}

/* The int8 tensor at r in the arena. */
static inline int8_t *cnnp_q_at(const cnnp_qctx *ctx, cnnp_ref r)
{
    return ctx->arena + CNNP_REF_OFF(r);
}

/* The output positions o in [lo, hi] whose input index o*s - pad + kd lies in [0, n). */
static inline void cnnp_q_range(int n, int out, int s, int pad, int kd, int *lo, int *hi)
{
    int first = pad - kd, last = n - 1 + pad - kd;
    *lo = first <= 0 ? 0 : (first + s - 1) / s;
    *hi = last < 0 ? -1 : last / s;
    if (*hi > out - 1) *hi = out - 1;
}

void cnnp_q_conv(const cnnp_qctx *ctx, const cnnp_conv_t *p, const cnnp_q_t *q);
void cnnp_q_conv_slbf(const cnnp_qctx *ctx, const cnnp_conv_t *p, const cnnp_q_t *q);
void cnnp_q_epilogue(const cnnp_qctx *ctx, const cnnp_epi_t *p, const cnnp_q_t *q);
void cnnp_q_binary(const cnnp_qctx *ctx, const cnnp_binary_t *p, const cnnp_q_t *q);
void cnnp_q_ewise(const cnnp_qctx *ctx, const cnnp_ewise_t *p, const cnnp_q_t *q);
void cnnp_q_copy(const cnnp_qctx *ctx, const cnnp_copy_t *p, const cnnp_q_t *q);
void cnnp_q_fill(const cnnp_qctx *ctx, const cnnp_fill_t *p, const cnnp_q_t *q);
void cnnp_q_pool(const cnnp_qctx *ctx, const cnnp_pool_t *p, const cnnp_q_t *q);

#endif

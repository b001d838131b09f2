/* cnnpress C runtime: float reading, half floats, bit reading, the Huffman decoder and the
 * epilogue (batch norm, activation) the kernels share (see cnnpress_rt.h). */
#include "cnnp_internal.h"

#include <math.h>

float cnnp_half(uint16_t h)
{
    return cnnp_half_to_float(h);
}

/* Value i of a float array stored at float_bits; for int8 ("q8") the array has `rows`
 * float32 scales first, one per row of row_len values. */
float cnnp_float_at(int float_bits, const uint8_t *a, int32_t i, int32_t rows, int32_t row_len)
{
    return cnnp_float_in(float_bits, a, i, rows, row_len);
}

uint32_t cnnp_bits(const uint8_t *p, int32_t i, int bits)
{
    return cnnp_bits_at(p, i, bits);
}

uint32_t cnnp_huff_next(cnnp_huff *h)
{
    return cnnp_huff_decode(h);
}

void cnnp_huff_unpack(cnnp_huff *h, int32_t count, int bits, uint8_t *out)
{
    uint32_t o = 0, v;
    int32_t k;
    int b;
    memset(out, 0, ((uint32_t)count * (uint32_t)bits + 7u) >> 3);
    for (k = 0; k < count; k++)
        for (v = cnnp_huff_decode(h), b = 0; b < bits; b++, o++)
            out[o >> 3] = (uint8_t)(out[o >> 3] | ((v >> b) & 1u) << (o & 7u));
}

void cnnp_huff_init(cnnp_huff *h, const uint8_t *data, int alphabet, int32_t *tables)
{
    int32_t *first = tables, *count = tables + CNNP_HUFF_MAX + 1;
    int32_t *offset = tables + 2 * (CNNP_HUFF_MAX + 1);
    uint16_t *symbols = (uint16_t *)(tables + 3 * (CNNP_HUFF_MAX + 1));
    int s, l;
    for (l = 0; l <= CNNP_HUFF_MAX; l++) count[l] = 0;
    for (s = 0; s < alphabet; s++) count[cnnp_bits_at(data, s, 5)]++;
    count[0] = 0;
    first[0] = offset[0] = 0;
    for (l = 1; l <= CNNP_HUFF_MAX; l++) {
        first[l] = (first[l - 1] + count[l - 1]) << 1;
        offset[l] = offset[l - 1] + count[l - 1];
    }
    for (l = 1; l <= CNNP_HUFF_MAX; l++) { /* symbols sorted by (length, symbol) */
        int32_t at = offset[l];
        for (s = 0; s < alphabet; s++)
            if ((int)cnnp_bits_at(data, s, 5) == l) symbols[at++] = (uint16_t)s;
    }
    h->bits = data + ((uint32_t)alphabet * 5u + 7u) / 8u;
    h->pos = 0;
    h->first = first;
    h->count = count;
    h->offset = offset;
    h->symbols = symbols;
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

void cnnp_apply_epi(const cnnp_ctx *ctx, const cnnp_epi *e, float *y, int c, int32_t plane)
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
void cnnp_out_ab(const cnnp_ctx *ctx, const cnnp_conv_t *p, int oc, float *a, float *b)
{
    float s = p->scale_n ? cnnp_vec(ctx, p->scale, p->scale_n == 1 ? 0 : oc) : 1.0f;
    float c = p->bias >= 0 ? cnnp_vec(ctx, p->bias, oc) : 0.0f, bn_a, bn_b;
    cnnp_bn_ab(ctx, &p->epi, oc, &bn_a, &bn_b);
    *a = s * bn_a;
    *b = c * bn_a + bn_b;
}

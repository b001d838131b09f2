/* cnnpress C runtime: reference kernels over packed weights (C99, no malloc, no I/O).
 *
 * Written by `cnnpress export --c`. Every weight array is a byte array holding exactly the
 * bytes of the .cnnp file: floats as float32 / float16 (little-endian) or int8 with float32
 * scales first ("q8"), bit-packed integers as one little-endian bit stream (value i in bits
 * [i*b, (i+1)*b), LSB first). Tensors are NCHW floats for one image, at float offsets in
 * the context's arena, in the input or in the logits. */
#ifndef CNNPRESS_RT_H
#define CNNPRESS_RT_H

#include <stdint.h>

#define CNNP_MAX_DIMS 6
/* Output positions an SLBF kernel computes at once (cnnpress.runtime.c_lower.TILE). */
#define CNNP_TILE 16

enum { CNNP_ARENA = 0, CNNP_INPUT = 1, CNNP_LOGITS = 2 };
enum { CNNP_W_DENSE = 0, CNNP_W_BINARY = 1, CNNP_W_SPARSE = 2, CNNP_W_KMEANS = 3, CNNP_W_SLBF = 4 };
enum { CNNP_BN_NONE = 0, CNNP_BN_FOLDED = 1, CNNP_BN_FULL = 2 };
enum { CNNP_ACT_NONE = 0, CNNP_ACT_RELU = 1, CNNP_ACT_CLAMP = 2 };
enum { CNNP_ADD = 0, CNNP_SUB = 1, CNNP_MUL = 2 };
enum { CNNP_MAXPOOL = 0, CNNP_AVGPOOL = 1, CNNP_ADAPTIVE_AVG = 2, CNNP_ADAPTIVE_MAX = 3 };

/* Where a tensor is: a float offset times 4 plus its base (arena, input or logits). */
typedef int32_t cnnp_ref;
#define CNNP_REF_BASE(r) ((int)((r) & 3))
#define CNNP_REF_OFF(r) ((r) >> 2)
/* Where a weight array is: a byte offset in the model's one weight blob, -1 for none. */
typedef int32_t cnnp_arr;

typedef struct {
    float *arena;           /* activations (liveness-planned) */
    const float *input;     /* the image, C x H x W */
    float *logits;          /* the outputs */
    float *scratch;         /* this kernel's scratch in the arena (SLBF bank responses) */
    const uint8_t *weights; /* every weight array, as the .cnnp file's payload packs them */
    int float_bits;         /* 32, 16 or 8: how the model's float arrays are stored */
} cnnp_ctx;

/* What follows a layer, per channel: batch norm (folded: scale, shift; full: weight, bias,
 * running mean, running variance, weight and bias maybe absent), then an activation. */
typedef struct {
    int16_t bn_kind, act;
    cnnp_arr bn[4];
    float eps, lo, hi;
} cnnp_epi;

/* A conv (or a linear layer: h = w = 1, k = 1) over weights of one of the CNNP_W_ kinds. */
typedef struct {
    cnnp_ref x, y;
    int16_t c, h, w, n, oh, ow, kh, kw, sh, sw, ph, pw, dh, dw, groups;
    int16_t kind;
    int16_t code_bits;   /* k-means: index bits; SLBF: selection bits */
    int16_t pos_bits;    /* 0: bitmap, else relative gaps of pos_bits bits */
    int16_t d, m;        /* SLBF: slice channels, bank filters */
    int16_t scale_n;     /* per-filter scales: 0, 1 (BinaryConnect) or n (BWN alpha, SLBF) */
    int16_t huff;        /* Huffman-coded streams: 1 the indices (code or sel), 2 pos */
    int16_t res;         /* 1: y holds a residual that the output adds before the activation */
    cnnp_arr wt;         /* dense: weights; sparse: kept values; k-means: codebook */
    cnnp_arr code;       /* binary: sign bits (1 = +1); k-means: indices; SLBF: bank bits */
    cnnp_arr pos;        /* sparse and pruned k-means: positions of the kept weights */
    int32_t pos_count;   /* entries of pos */
    int32_t kept;        /* kept weights (sparse and pruned k-means) */
    cnnp_arr sel;        /* SLBF: selections (n x s) */
    cnnp_arr scale, bias;
    cnnp_epi epi;
} cnnp_conv_t;

/* An epilogue alone: y = epi(x) over c channels of `plane` values each. */
typedef struct { cnnp_ref x, y; int32_t c, plane; cnnp_epi epi; } cnnp_epi_t;

/* y = a op b over n contiguous values each (b_const: b is the constant b_value). */
typedef struct {
    cnnp_ref a, b, y;
    int16_t op, b_const;
    int32_t n, channels; /* for the epilogue: dim 1 of the output (1 when none) */
    float b_value;
    cnnp_epi epi;
} cnnp_ewise_t;

/* y = a op b, broadcast by strides (0 along a broadcast axis); b may be a constant. */
typedef struct {
    cnnp_ref a, b, y;
    int16_t op, ndim, b_const;
    float b_value;
    int32_t shape[CNNP_MAX_DIMS], sa[CNNP_MAX_DIMS], sb[CNNP_MAX_DIMS];
    int32_t channels;
    cnnp_epi epi;
} cnnp_binary_t;

/* A strided copy: transpose, slice, pad interior, cat part, shuffle. */
typedef struct {
    cnnp_ref x, y;
    int32_t ndim;
    int32_t shape[CNNP_MAX_DIMS], sx[CNNP_MAX_DIMS], sy[CNNP_MAX_DIMS];
} cnnp_copy_t;

typedef struct { cnnp_ref y; int32_t n; float value; } cnnp_fill_t;

typedef struct {
    cnnp_ref x, y;
    int16_t kind, c, h, w, oh, ow, kh, kw, sh, sw, ph, pw, dh, dw, count_include_pad;
} cnnp_pool_t;

/* A canonical Huffman stream (cnnpress.format.entropy): the code length of each of the
 * `alphabet` symbols at 5 bits, then the codes, most significant bit first. The decoder's
 * tables live in scratch: CNNP_HUFF_INTS(alphabet) int32 values. */
#define CNNP_HUFF_MAX 24
#define CNNP_HUFF_INTS(alphabet) (3 * (CNNP_HUFF_MAX + 1) + ((alphabet) + 1) / 2)
typedef struct {
    const uint8_t *bits;
    uint32_t pos;
    const int32_t *first, *count, *offset;
    const uint16_t *symbols;
} cnnp_huff;

void cnnp_huff_init(cnnp_huff *h, const uint8_t *data, int alphabet, int32_t *tables);
uint32_t cnnp_huff_next(cnnp_huff *h);
/* The next `count` symbols of h, `bits` each, packed as cnnp_bits reads them into `out`
 * ((count * bits + 7) / 8 bytes): a coded stream decoded once into its fixed-width form. */
void cnnp_huff_unpack(cnnp_huff *h, int32_t count, int bits, uint8_t *out);

float cnnp_float_at(int float_bits, const uint8_t *a, int32_t i, int32_t rows, int32_t row_len);
uint32_t cnnp_bits(const uint8_t *p, int32_t i, int bits);
float cnnp_half(uint16_t h);

void cnnp_conv(const cnnp_ctx *ctx, const cnnp_conv_t *p);
void cnnp_epilogue(const cnnp_ctx *ctx, const cnnp_epi_t *p);
void cnnp_binary(const cnnp_ctx *ctx, const cnnp_binary_t *p);
void cnnp_ewise(const cnnp_ctx *ctx, const cnnp_ewise_t *p);
void cnnp_copy(const cnnp_ctx *ctx, const cnnp_copy_t *p);
void cnnp_fill(const cnnp_ctx *ctx, const cnnp_fill_t *p);
void cnnp_pool(const cnnp_ctx *ctx, const cnnp_pool_t *p);
/* Output o's input window [lo, hi) along one axis (vertical: rows) and its size with
 * padding (average pooling), as PyTorch places it; shared by the float and int8 kernels. */
void cnnp_pool_window(const cnnp_pool_t *p, int o, int vertical, int *lo, int *hi, int *size);

#endif

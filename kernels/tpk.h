/* tpk: tpllama's C kernels. They know blocks and matrices, nothing about models.
 *
 * Block formats (byte-identical to GGML):
 *   q40: 32 weights = fp16 scale d + 16 bytes of nibbles; element j < 16 is the low
 *        nibble of qs[j], element j >= 16 the high nibble of qs[j-16]; value = (q - 8) * d.
 *   q80: 32 values = fp16 scale d + 32 int8; value = q * d.
 *
 * Dot products are exact and order-fixed on every code path: per block an int32 sum
 * of products, then acc += (float)isum * (d_w * d_x), blocks summed in increasing
 * order, no fused multiply-add. SIMD variants vectorise across rows, never across the
 * terms of one row's sum, so every path gives the scalar reference's bits.
 *
 * Packed (runtime) layout of a weight matrix: rows are taken TPK_ROWS at a time ("a row
 * group"; the last group is padded with zero rows). Group g, block column b is one
 * contiguous "group block" at byte (g * nb + b) * TPK_ROWS * block_bytes:
 *   q40 (288 bytes): uint16 d[16]; then uint8 qs[4][16][4]: qs[k][i] are bytes
 *        4k..4k+3 of row i's GGML block, so its low nibbles are elements 4k..4k+3 and its
 *        high nibbles elements 16+4k..16+4k+3.
 *   q80 (544 bytes): uint16 d[16]; then uint8 qs[8][16][4]: qs[k][i] are elements
 *        4k..4k+3 of row i, stored with the sign bit flipped (q + 128 as unsigned).
 * A SIMD register of 16 int32 lanes (or 2 x 8, or 4 x 4) then holds one row per lane,
 * and one 4-byte broadcast of the activation feeds all 16 rows.
 *
 * Types with 4-, 5- or 6-bit unsigned quants (q41, q50, q4k, q5k, q6k; GGML Q4_1, Q5_0,
 * Q4_K, Q5_K, Q6_K) are packed the same way, one group block per 32 columns whatever the
 * file's block size, so a matrix can be cut at any multiple of 32 columns and still hold
 * the file's values exactly. Each group block carries, per row, its quants q (0..2^bits-1)
 * in the q40 nibble arrangement plus 1 or 2 bit planes, and the small integer parameters of
 * those 32 values. Sections, in order (bytes per group block):
 *   q41: uint16 d[16]; uint16 m[16]                    value = d*q + m
 *   q50: uint16 d[16]                                  value = d*(q - 16)
 *   q4k, q5k: uint8 sc[16]; uint8 mn[16]               value = d*sc*q - dmin*mn
 *   q6k: int8 sc[2][16] (elements 0..15, 16..31)       value = d*sc[h]*(q - 32)
 *   q50, q5k: uint8 plane[16][4]: byte j of row i holds, at bit k, bit 4 of element 4k+j
 *        and at bit 4+k, bit 4 of element 16+4k+j (k < 4)
 *   q6k: uint8 hb[2][16][4]: byte j of row i in hb[h] holds, at bits 2k and 2k+1, bits 4
 *        and 5 of element 16h+4k+j (k < 4)
 *   uint8 qs[4][16][4]: low 4 bits of every q, as q40 (low nibble: element 4k+j,
 *        high nibble: element 16+4k+j)
 * Group block bytes: q41 320, q50 352, q4k 288, q5k 352, q6k 416.
 * q41 and q50 row groups are their group blocks back to back. The K-quants keep a
 * super-block's fp16 d (and dmin) once per span: a row group is a 64-byte prefix (byte 0:
 * the phase, where its first 32 columns sit in their super-block, 0..7), then spans, each a
 * header uint16 d[16] (q4k, q5k: then uint16 dmin[16]) and the group blocks of the up to 8
 * columns of 32 that come from that super-block; ceil((nb+7)/8) headers' room in all (the
 * unused end is zero). Bytes per 32 weights of one row: 20, 22, 18.5, 22.5, 26.25 (the files
 * hold 20, 22, 18, 22, 26.25).
 * Per block, with A, B the exact int32 sums of q*x over elements 0..15 and 16..31 and
 * S, S0, S1 the activation sums over 0..31, 0..15, 16..31, every path computes in float32
 * (or float64 for the _f64 variants, with (double) operands), in this order, without FMA:
 *   q41: acc = acc + ((float)(A+B)*(d*dx) + (float)S*(m*dx))
 *   q50: acc = acc + (float)(A+B-16*S)*(d*dx)
 *   K-quants, per span: s = s + (float)isum*dx and (q4k, q5k) m = m + (float)mn*sdx for each
 *   block (isum = sc*(A+B), or q6k sc0*(A-32*S0) + sc1*(B-32*S1); sdx = (float)S*dx, in
 *   float64 S*dx exactly), then acc = acc + (d*s - dmin*m) (q6k: acc + d*s).
 */
#ifndef TPK_H
#define TPK_H

#include <stdint.h>

#define TPK_QK 32
#define TPK_Q40_BYTES 18
#define TPK_Q80_BYTES 34
#define TPK_ROWS 16
#define TPK_Q40_GROUP_BYTES (TPK_ROWS * TPK_Q40_BYTES)
#define TPK_Q80_GROUP_BYTES (TPK_ROWS * TPK_Q80_BYTES)

typedef struct {
    uint16_t d;
    uint8_t qs[TPK_QK / 2];
} tpk_block_q40;

typedef struct {
    uint16_t d;
    int8_t qs[TPK_QK];
} tpk_block_q80;

/* Weight types of the generic entry points below (tpk_packed_bytes, tpk_pack_ggml, ...). */
enum {
    TPK_T_Q40 = 0, TPK_T_Q80 = 1, TPK_T_Q41 = 2, TPK_T_Q50 = 3,
    TPK_T_Q4K = 4, TPK_T_Q5K = 5, TPK_T_Q6K = 6, TPK_NTYPES = 7
};

/* SIMD levels, chosen at run time from the CPU's features. */
enum {
    TPK_SCALAR = 0,
    TPK_AVX2 = 1,         /* AVX2 + FMA + F16C */
    TPK_AVX512 = 2,       /* AVX-512 F/BW/VL */
    TPK_AVX512_VNNI = 3,  /* ... + VNNI */
    TPK_NEON = 10,        /* ARMv8 Advanced SIMD (Raspberry Pi 4) */
    TPK_NEON_DOTPROD = 11 /* ... + SDOT (Raspberry Pi 5) */
};

int tpk_detect_level(void);          /* best level this CPU supports */
int tpk_level_supported(int level);  /* 1 if this build and CPU can run `level` */
int tpk_get_level(void);             /* level in use */
int tpk_set_level(int level);        /* force a level (tests); returns the level set, or -1 if unsupported */
const char *tpk_level_name(int level);
/* bytes past the current block that the SIMD matmul kernels prefetch (0: none; default
 * TPK_PREFETCH_DEFAULT); returns the value set, or -1 if out of 0..65536 */
int tpk_set_prefetch(int bytes);
int tpk_get_prefetch(void);
#define TPK_PREFETCH_DEFAULT 1024
int tpk_has_openmp(void);

float tpk_fp16_to_fp32(uint16_t h);
uint16_t tpk_fp32_to_fp16(float f);

/* n must be a multiple of 32. Bit-identical to GGML's quantize_row_q8_0_ref / q4_0_ref.
 * tpk_quantize_q80 runs at the level in use, tpk_quantize_q80_ref is the scalar reference. */
void tpk_quantize_q80(const float *x, tpk_block_q80 *y, int64_t n);
void tpk_quantize_q80_ref(const float *x, tpk_block_q80 *y, int64_t n);
void tpk_quantize_q40(const float *x, tpk_block_q40 *y, int64_t n);
void tpk_dequantize_q80(const tpk_block_q80 *x, float *y, int64_t n);
void tpk_dequantize_q40(const tpk_block_q40 *x, float *y, int64_t n);

/* Packing GGML rows (rows x nb blocks, row r at byte r * row_stride) into the runtime layout. */
int64_t tpk_packed_bytes_q40(int64_t rows, int64_t nb);
int64_t tpk_packed_bytes_q80(int64_t rows, int64_t nb);
void tpk_pack_q40(const uint8_t *w, int64_t row_stride, int64_t rows, int64_t nb, uint8_t *dst);
void tpk_pack_q80(const uint8_t *w, int64_t row_stride, int64_t rows, int64_t nb, uint8_t *dst);
void tpk_unpack_q40(const uint8_t *src, int64_t rows, int64_t nb, tpk_block_q40 *w);
void tpk_unpack_q80(const uint8_t *src, int64_t rows, int64_t nb, tpk_block_q80 *w);

/* y[t * ldy + r] = dot(w row r, x row t) for r < rows, t < ntok; x: ntok x nb GGML q80 blocks.
 * Packed weights, at the level in use; output rows split over nthreads threads. Tokens are
 * taken several at a time, so each weight block loaded serves several tokens. */
void tpk_matmul_q40p(const uint8_t *wp, int64_t rows, int64_t nb,
                     const tpk_block_q80 *x, int64_t ntok, float *y, int64_t ldy, int nthreads);
void tpk_matmul_q80p(const uint8_t *wp, int64_t rows, int64_t nb,
                     const tpk_block_q80 *x, int64_t ntok, float *y, int64_t ldy, int nthreads);

/* The same with rows accumulated in float64 (acc + (double)isum * ((double)d_w * d_x), each
 * term exact): the row-parallel partial sums that ranks all-reduce, so that the total is
 * the same at any rank count. */
void tpk_matmul_q40p_f64(const uint8_t *wp, int64_t rows, int64_t nb,
                         const tpk_block_q80 *x, int64_t ntok, double *y, int64_t ldy, int nthreads);
void tpk_matmul_q80p_f64(const uint8_t *wp, int64_t rows, int64_t nb,
                         const tpk_block_q80 *x, int64_t ntok, double *y, int64_t ldy, int nthreads);

/* The same for n matrices that read the same x (e.g. wq, wk, wv): one parallel region, all
 * their row groups split over the threads together. Matrix i: wp[i], rows[i], output y[i]
 * with row stride ldy[i]. */
void tpk_matmul_q40p_many(int n, const uint8_t *const *wp, const int64_t *rows, int64_t nb,
                          const tpk_block_q80 *x, int64_t ntok, float *const *y, const int64_t *ldy, int nthreads);
void tpk_matmul_q80p_many(int n, const uint8_t *const *wp, const int64_t *rows, int64_t nb,
                          const tpk_block_q80 *x, int64_t ntok, float *const *y, const int64_t *ldy, int nthreads);

/* The scalar reference on plain GGML blocks (w: rows x nb, row-major). */
void tpk_matmul_q40_q80_ref(const tpk_block_q40 *w, int64_t rows, int64_t nb,
                            const tpk_block_q80 *x, int64_t ntok, float *y, int64_t ldy);
void tpk_matmul_q80_q80_ref(const tpk_block_q80 *w, int64_t rows, int64_t nb,
                            const tpk_block_q80 *x, int64_t ntok, float *y, int64_t ldy);
void tpk_matmul_q40_q80_f64_ref(const tpk_block_q40 *w, int64_t rows, int64_t nb,
                                const tpk_block_q80 *x, int64_t ntok, double *y, int64_t ldy);
void tpk_matmul_q80_q80_f64_ref(const tpk_block_q80 *w, int64_t rows, int64_t nb,
                                const tpk_block_q80 *x, int64_t ntok, double *y, int64_t ldy);

/* Generic entry points over every weight type (TPK_T_*): nb counts 32-column blocks.
 * tpk_ggml_block returns the values per GGML block of `type` (32 or 256) and its bytes.
 * tpk_pack_ggml packs rows x nb 32-column blocks that start `first` 32-column blocks into
 * the GGML blocks at w (row r at byte r * row_stride); it returns 0, or -1 for a bad type.
 * tpk_dequantize_packed writes the packed values as float32 (rows, nb*32), each computed
 * as gguf-py computes it. y is float*, or double* when f64. */
int tpk_ggml_block(int type, int *block_bytes);
int64_t tpk_packed_bytes(int type, int64_t rows, int64_t nb);
int tpk_pack_ggml(int type, const uint8_t *w, int64_t row_stride, int64_t rows, int64_t first, int64_t nb,
                  uint8_t *dst);
void tpk_dequantize_packed(int type, const uint8_t *wp, int64_t rows, int64_t nb, float *y);
void tpk_matmul_packed(int type, const uint8_t *wp, int64_t rows, int64_t nb, const tpk_block_q80 *x,
                       int64_t ntok, void *y, int64_t ldy, int f64, int nthreads);
void tpk_matmul_packed_many(int type, int n, const uint8_t *const *wp, const int64_t *rows, int64_t nb,
                            const tpk_block_q80 *x, int64_t ntok, float *const *y, const int64_t *ldy, int nthreads);

/* Fused float32 layer steps (tpk_ops.c); nthreads is an upper bound, small work runs on one. */
/* y = x / sqrt(mean(x^2) + eps) * w for T rows of n (y may be x) */
void tpk_rmsnorm(const float *x, const float *w, float *y, int64_t T, int64_t n, float eps, int nthreads);
/* rotate interleaved pairs (2i, 2i+1) of x (T, heads, hd) in place; cos/sin (T, hd/2) */
void tpk_rope(float *x, int64_t T, int64_t heads, int64_t hd, const float *cos_t, const float *sin_t);
/* out = g / (1 + exp(-g)) * u over n floats (out may be g or u) */
void tpk_silu_mul(const float *g, const float *u, float *out, int64_t n, int nthreads);
/* A KV cache keeps the positions of a kv head in blocks of TPK_KV_BLOCK (the attention's key
 * chunks): position p of kv head h is row h * head_stride + (p / TPK_KV_BLOCK) * block_stride +
 * p % TPK_KV_BLOCK (rows of hd values). A (n_kv, ctx, hd) array is head_stride = ctx * hd,
 * block_stride = TPK_KV_BLOCK * hd; the runtime's cache puts every layer's and head's block of
 * the same positions side by side, so that its memory grows with the positions in 2 MiB pages. */
#define TPK_KV_BLOCK 256
/* Causal attention of T new positions start..start+T-1: stores k, v (T, n_kv, hd) into the
 * caches, then for every position and query head h (q, out: (T, n_heads, hd))
 * softmax(q . K[kv_of_head[h], first..pos] * scale) . V[...], where first is 0, or with a
 * sliding window (window > 0) pos - window + 1: a position sees itself and window - 1 before it.
 * head_stride, block_stride: in values (see TPK_KV_BLOCK). */
void tpk_attention(const float *q, const float *k, const float *v, int64_t T, int64_t n_heads, int64_t n_kv,
                   int64_t hd, const int32_t *kv_of_head, void *kcache, void *vcache, int cache_f16,
                   int64_t head_stride, int64_t block_stride, int64_t start, int64_t window, float scale,
                   float *out, int nthreads);
/* cache_f16: the caches hold IEEE half floats (uint16_t) instead of float32. New keys and
 * values are narrowed by tpk_narrow_f16; attention then runs on their exact float32 values,
 * so its result equals the float32 cache's given the same (narrowed) keys and values. */

/* float16 <-> float32 of n values. Widening is exact (every level gives the same bits);
 * narrowing rounds to nearest even and saturates at +-65504 (NaN stays NaN). */
void tpk_widen_f16(const uint16_t *h, int64_t n, float *y);
void tpk_narrow_f16(const float *x, int64_t n, uint16_t *h);

/* Sum of n floats read once, over nthreads threads: a memory read bandwidth probe. */
double tpk_stream_sum(const float *x, int64_t n, int nthreads);

#endif

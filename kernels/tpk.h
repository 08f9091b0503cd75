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
 */
#ifndef TPK_H
#define TPK_H

#include <stdint.h>

#define TPK_QK 32
#define TPK_Q40_BYTES 18
#define TPK_Q80_BYTES 34

typedef struct {
    uint16_t d;
    uint8_t qs[TPK_QK / 2];
} tpk_block_q40;

typedef struct {
    uint16_t d;
    int8_t qs[TPK_QK];
} tpk_block_q80;

/* SIMD levels, chosen at run time from the CPU's features. */
enum {
    TPK_SCALAR = 0,
    TPK_AVX2 = 1,
    TPK_AVX512 = 2,
    TPK_NEON = 10,
    TPK_NEON_DOTPROD = 11,
};

int tpk_detect_level(void);     /* best level this CPU supports */
int tpk_get_level(void);        /* level in use */
int tpk_set_level(int level);   /* force a level (tests); returns the level set, or -1 if unsupported */
int tpk_has_openmp(void);

float tpk_fp16_to_fp32(uint16_t h);
uint16_t tpk_fp32_to_fp16(float f);

/* n must be a multiple of 32. Bit-identical to GGML's quantize_row_q8_0_ref / q4_0_ref. */
void tpk_quantize_q80(const float *x, tpk_block_q80 *y, int64_t n);
void tpk_quantize_q40(const float *x, tpk_block_q40 *y, int64_t n);
void tpk_dequantize_q80(const tpk_block_q80 *x, float *y, int64_t n);
void tpk_dequantize_q40(const tpk_block_q40 *x, float *y, int64_t n);

/* y[t * ldy + r] = dot(w row r, x row t) for r < rows, t < ntok.
 * w: rows x nb blocks (row-major), x: ntok x nb blocks. */
void tpk_matmul_q40_q80(const tpk_block_q40 *w, int64_t rows, int64_t nb,
                        const tpk_block_q80 *x, int64_t ntok, float *y, int64_t ldy, int nthreads);
void tpk_matmul_q80_q80(const tpk_block_q80 *w, int64_t rows, int64_t nb,
                        const tpk_block_q80 *x, int64_t ntok, float *y, int64_t ldy, int nthreads);


/* The same products with rows accumulated in float64 (tpk_f64.c): partial sums that ranks
 * all-reduce, so the total is the same at every rank count. */
void tpk_matmul_q40_q80_f64(const tpk_block_q40 *w, int64_t rows, int64_t nb,
                            const tpk_block_q80 *x, int64_t ntok, double *y, int64_t ldy, int nthreads);
void tpk_matmul_q80_q80_f64(const tpk_block_q80 *w, int64_t rows, int64_t nb,
                            const tpk_block_q80 *x, int64_t ntok, double *y, int64_t ldy, int nthreads);

#endif

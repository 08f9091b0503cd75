/* Internal interface between tpk.c (reference, packing, dispatch, threads) and the
 * architecture files tpk_x86.c / tpk_arm.c (SIMD variants). Not part of the API. */
#ifndef TPK_IMPL_H
#define TPK_IMPL_H

#include "tpk.h"

#if defined(__x86_64__) || defined(_M_X64)
#define TPK_X86 1
#endif
#if defined(__aarch64__)
#define TPK_ARM64 1
#endif

/* One q80 activation block made ready for the kernels: the scale as float and the
 * offset corrections -8*sum(qs) (q40 weights are stored as unsigned nibbles q, so
 * sum((q-8)*x) = sum(q*x) - 8*sum(x)) and -128*sum(qs) (q80 weights stored as q+128),
 * and for the other types (tpk.h): S = sum(qs), -16*S (q50), -32*S0, -32*S1 (q6k, the
 * two halves of 16), and sdx = S * d for the K-quants' mins. */
typedef struct {
    int8_t qs[TPK_QK];
    float d;     /* a float16 value (the block's scale), which the float64 kernels rely on */
    int32_t s8;
    int32_t s128;
    int32_t sum;
    int32_t s16;
    int32_t h0;
    int32_t h1;
    float sdx;   /* (float)sum * d: the K-quants' min term */
} tpk_xq;

/* Packed layout of the types q41, q50, q4k, q5k, q6k (tpk.h), as compile-time constants
 * of T (a TPK_T_* value) so each kernel instance knows its offsets. KQ_GB: bytes of one
 * group block (16 rows x 32 columns). */
#define KQ_GB(T) ((T) == TPK_T_Q41 ? 320 : (T) == TPK_T_Q50 ? 352 : (T) == TPK_T_Q4K ? 288 : (T) == TPK_T_Q5K ? 352 : 416)
#define KQ_OFF_QS(T) (KQ_GB(T) - 256)
#define KQ_PLANES(T) ((T) == TPK_T_Q50 || (T) == TPK_T_Q5K ? 1 : (T) == TPK_T_Q6K ? 2 : 0)
#define KQ_OFF_QH(T) 32 /* q50: after d[16]; q5k: after sc, mn; q6k: after sc6 */
#define KQ_OFF_M 32     /* q41: fp16 m */
#define KQ_OFF_SC 0     /* q4k, q5k: uint8 sc[16], then uint8 mn[16] */
#define KQ_OFF_MN 16
#define KQ_OFF_SC6 0    /* q6k: int8 sc[2][16] */
#define KQ_IS_K(T) ((T) == TPK_T_Q4K || (T) == TPK_T_Q5K)
/* Only q6k needs A and B apart; the others sum both halves into one accumulator (A, B = 0). */
#define KQ_MERGE(T) ((T) != TPK_T_Q6K)

/* The K-quants (q4k, q5k, q6k) keep a super-block's fp16 d (and dmin) once per "span": the
 * run of up to 8 consecutive group blocks of one row group that come from one GGML
 * super-block. A row group is: a KQ_PREFIX-byte prefix whose byte 0 is the phase (where its
 * first 32 columns sit in their super-block, 0..7), then span after span, each a KQ_HDR
 * header (uint16 d[16]; q4k/q5k: uint16 dmin[16]) and its group blocks. Room is left for
 * the headers of the worst phase (zero bytes at the end when fewer), so a row group's size
 * does not depend on the phase. */
#define KQ_SPANS(T) ((T) == TPK_T_Q4K || (T) == TPK_T_Q5K || (T) == TPK_T_Q6K)
#define KQ_SPAN 8
#define KQ_PREFIX 64
#define KQ_HDR(T) (KQ_IS_K(T) ? 64 : 32)

/* Bytes of one row group of nb group blocks. */
static inline int64_t kq_row_group_bytes(int T, int64_t nb) {
    if (!KQ_SPANS(T)) return nb * KQ_GB(T);
    return KQ_PREFIX + (nb + 2 * KQ_SPAN - 2) / KQ_SPAN * KQ_HDR(T) + nb * KQ_GB(T);
}

/* Group blocks in the span that starts at group block b (of nb; the row group's phase). */
static inline int kq_span_len(int64_t b, int64_t nb, int phase) {
    const int64_t n = KQ_SPAN - (b + phase) % KQ_SPAN;
    return (int)(n < nb - b ? n : nb - b);
}

/* One row group (TPK_ROWS rows, nrows <= TPK_ROWS of them real) times ntok tokens:
 * w: the group's nb group blocks; x: token t's blocks at x + t * nb;
 * y: token t's outputs at element t * ldy of y (rows of this group only), float, or
 * double for the float64-accumulating variants. */
typedef void (*tpk_group_fn)(const uint8_t *w, int64_t nb, const tpk_xq *x, int64_t ntok,
                             void *y, int64_t ldy, int nrows);

/* tpk_kq.c: the q41/q50/q4k/q5k/q6k layout (T a TPK_T_* value of those). */
int64_t tpk_kq_row_group_bytes(int T, int64_t nb);
void tpk_kq_pack(int T, const uint8_t *w, int64_t row_stride, int64_t rows, int64_t first, int64_t nb, uint8_t *dst);
void tpk_kq_dequantize(int T, const uint8_t *wp, int64_t rows, int64_t nb, float *y);
tpk_group_fn tpk_kq_scalar(int T, int f64);

extern float tpk_fp16_table[65536];
/* The packed weights stream from memory once per token. Each SIMD tile asks for the bytes
 * tpk_prefetch_bytes past the group block it is about to multiply (0: none, the hardware
 * prefetcher alone). What pays depends on the machine: on an AMD Zen 3 (AVX2, 12-14 GB/s) one
 * thread's q40 matvec read 66-73% of the streaming read without it and 86-93% 1 KiB ahead (the
 * best of 0.5-8 KiB); on a Zen 4 VM (AVX2 only, 29-31 GB/s) 1 KiB ahead cost 12% against none
 * (docs/kernels.md). tpk_set_prefetch sets it; a prefetch never faults, so asking past a
 * matrix's last block is harmless. */
extern int tpk_prefetch_bytes;
static inline void tpk_prefetch_ahead(const uint8_t *block, int bytes) {
    const int ahead = tpk_prefetch_bytes;
    if (ahead > 0)
        for (int l = 0; l < bytes; l += 64) __builtin_prefetch(block + ahead + l, 0, 3);
}

static inline float tpk_f16(uint16_t h) { return tpk_fp16_table[h]; }

#if defined(TPK_X86)
int tpk_x86_supports(int level);
tpk_group_fn tpk_x86_q40(int level, int f64);
tpk_group_fn tpk_x86_q80(int level, int f64);
tpk_group_fn tpk_x86_kq(int type, int level, int f64);
double tpk_x86_stream_sum(const float *x, int64_t n);
void tpk_x86_quantize_q80_512(const float *x, tpk_block_q80 *y, int64_t n);
void tpk_x86_quantize_q80_avx2(const float *x, tpk_block_q80 *y, int64_t n);
void tpk_x86_widen_f16(const uint16_t *h, int64_t n, float *y);
/* attention's softmax step (tpk_attn_x86.c; tpk_ops.c's loop, the same bits): for the nh rows
 * of n scores (stride apart) m[h] = their largest, l[h] = sum of exp(s - m[h]), s replaced by
 * exp(s - m[h]) */
void tpk_x86_chunk_softmax(float *scores, int64_t nh, int64_t stride, int64_t n, float *m, float *l);
#endif
#if defined(TPK_ARM64)
int tpk_arm_supports(int level);
tpk_group_fn tpk_arm_q40(int level, int f64);
tpk_group_fn tpk_arm_q80(int level, int f64);
tpk_group_fn tpk_arm_kq(int type, int level, int f64);
void tpk_arm_quantize_q80(const float *x, tpk_block_q80 *y, int64_t n);
void tpk_arm_widen_f16(const uint16_t *h, int64_t n, float *y);
#endif

#endif

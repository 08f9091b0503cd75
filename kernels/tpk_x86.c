/* tpk x86-64 SIMD kernels: AVX2, AVX-512 (F/BW/VL) and AVX-512 VNNI, each compiled with
 * a per-function target attribute and chosen at run time, so one build runs on any x86-64.
 *
 * Every kernel multiplies one packed row group (16 rows, see tpk.h) by a tile of tokens.
 * A register holds one int32 per row; a weight register holds 4 consecutive elements of
 * each row and the activation's 4 matching elements are broadcast to every lane, so each
 * lane sums its own row's products exactly. Weights are unsigned (q40: nibble q in 0..15,
 * q80: q + 128) and the offset comes back as the precomputed -8*sum(x) / -128*sum(x) that
 * initialises the int32 sum. Per block, lane r then does exactly the scalar reference's
 *   acc[r] = acc[r] + (float)isum[r] * (d_w[r] * d_x)
 * in float32 (no FMA), blocks in increasing order, so every level returns the same bits
 * (or the same in float64, for row-parallel partial sums).
 * Tokens are taken TT at a time: the weights unpacked for one block serve TT tokens.
 */
#include "tpk_impl.h"

#if defined(TPK_X86)
#include <immintrin.h>
#include <string.h>

#define TGT_AVX2 __attribute__((target("avx2,fma,f16c")))
#define TGT_512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define TGT_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))
#define INLINE static inline __attribute__((always_inline))

int tpk_x86_supports(int level) {
    __builtin_cpu_init();
    const int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    const int avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                       __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    const int vnni = avx512 && __builtin_cpu_supports("avx512vnni");
    switch (level) {
    case TPK_AVX2: return avx2;
    case TPK_AVX512: return avx512;
    case TPK_AVX512_VNNI: return vnni;
    default: return 0;
    }
}

/* An opaque step for an int16 accumulator: integer adds are associative, and without this
 * GCC regroups a block's chain of adds into a tree, keeping every product live at once
 * (AVX2: 16 registers, so they spill to the stack: 16 tokens of a 5632x2048 q40 matrix took
 * 3.1 ms with the tree, 2.4 with the chain, on a Zen 3). */
#define TPK_CHAIN(v) __asm__("" : "+x"(v))
/* A pointer GCC cannot see through: loads made through it are not merged with earlier
 * loads of the same bytes (which would keep those values live, and spilled, in between). */
#define TPK_OPAQUE(p) __asm__ volatile("" : "+r"(p))

INLINE int32_t ld32(const void *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* ================================================================ accumulators
 * Per token, the 16 rows' running sums: float32 (acc + (float)isum * (dw * dx)), or float64
 * for the row-parallel partial sums that ranks add up (acc + (double)isum * ((double)dw *
 * (double)dx), every term exact). F64 is a compile-time constant in every caller. */

typedef struct { __m512 f; __m512d d0, d1; } acc512;

INLINE TGT_512 void acc512_zero(acc512 *a, const int F64) {
    if (F64) a->d0 = a->d1 = _mm512_setzero_pd();
    else a->f = _mm512_setzero_ps();
}

INLINE TGT_512 void acc512_add(acc512 *a, __m512i isum, __m512 dw, float dx, const int F64) {
    if (F64) {
        const __m512d vdx = _mm512_set1_pd((double)dx);
        const __m512d s0 = _mm512_mul_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(dw)), vdx);
        const __m512d s1 = _mm512_mul_pd(_mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(dw), 1))), vdx);
        a->d0 = _mm512_add_pd(a->d0, _mm512_mul_pd(_mm512_cvtepi32_pd(_mm512_castsi512_si256(isum)), s0));
        a->d1 = _mm512_add_pd(a->d1, _mm512_mul_pd(_mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(isum, 1)), s1));
    } else {
        const __m512 scale = _mm512_mul_ps(dw, _mm512_set1_ps(dx));
        a->f = _mm512_add_ps(a->f, _mm512_mul_ps(_mm512_cvtepi32_ps(isum), scale));
    }
}

INLINE TGT_512 void acc512_store(void *y, int64_t at, const acc512 *a, int nrows, const int F64) {
    if (F64) {
        double *o = (double *)y + at;
        if (nrows == TPK_ROWS) {
            _mm512_storeu_pd(o, a->d0);
            _mm512_storeu_pd(o + 8, a->d1);
        } else {
            const unsigned m = (1u << nrows) - 1;
            _mm512_mask_storeu_pd(o, (__mmask8)(m & 0xFF), a->d0);
            _mm512_mask_storeu_pd(o + 8, (__mmask8)(m >> 8), a->d1);
        }
    } else {
        float *o = (float *)y + at;
        if (nrows == TPK_ROWS) _mm512_storeu_ps(o, a->f);
        else _mm512_mask_storeu_ps(o, (__mmask16)((1u << nrows) - 1), a->f);
    }
}

typedef struct { __m256 f; __m256d d0, d1; } acc256;

INLINE TGT_AVX2 void acc256_zero(acc256 *a, const int F64) {
    if (F64) a->d0 = a->d1 = _mm256_setzero_pd();
    else a->f = _mm256_setzero_ps();
}

INLINE TGT_AVX2 void acc256_add(acc256 *a, __m256i isum, __m256 dw, float dx, const int F64) {
    const __m256 sc = _mm256_mul_ps(dw, _mm256_set1_ps(dx));
    if (F64) {
        /* dw and dx are float16 values (11 significant bits each), so their product has at most 22
         * and float32 holds it exactly: (double)(dw * dx) is the reference's (double)dw * (double)dx,
         * for one float multiply instead of two double ones */
        const __m256d s0 = _mm256_cvtps_pd(_mm256_castps256_ps128(sc));
        const __m256d s1 = _mm256_cvtps_pd(_mm256_extractf128_ps(sc, 1));
        /* isum (under 2^21) times that scale has at most 43 significant bits: exact in double, so a
         * fused multiply-add rounds once where the reference rounds once (its product is exact) */
        a->d0 = _mm256_fmadd_pd(_mm256_cvtepi32_pd(_mm256_castsi256_si128(isum)), s0, a->d0);
        a->d1 = _mm256_fmadd_pd(_mm256_cvtepi32_pd(_mm256_extracti128_si256(isum, 1)), s1, a->d1);
    } else {
        a->f = _mm256_add_ps(a->f, _mm256_mul_ps(_mm256_cvtepi32_ps(isum), sc));
    }
}

/* 8 rows (nrows of them real, may be <= 0) */
INLINE TGT_AVX2 void acc256_store(void *y, int64_t at, const acc256 *a, int nrows, const int F64) {
    if (nrows <= 0) return;
    if (F64) {
        double *o = (double *)y + at;
        if (nrows >= 8) {
            _mm256_storeu_pd(o, a->d0);
            _mm256_storeu_pd(o + 4, a->d1);
        } else {
            double tmp[8];
            _mm256_storeu_pd(tmp, a->d0);
            _mm256_storeu_pd(tmp + 4, a->d1);
            memcpy(o, tmp, (size_t)nrows * sizeof(double));
        }
    } else {
        float *o = (float *)y + at;
        if (nrows >= 8) {
            _mm256_storeu_ps(o, a->f);
        } else {
            float tmp[8];
            _mm256_storeu_ps(tmp, a->f);
            memcpy(o, tmp, (size_t)nrows * sizeof(float));
        }
    }
}

/* A group function for each token-tile size: full tiles of TT, then 4, 2, 1 for the rest. */
#define GROUP_FN(name, tile, TGT, TT, F64)                                                           \
    TGT static void name(const uint8_t *w, int64_t nb, const tpk_xq *x, int64_t ntok, void *y,       \
                         int64_t ldy, int nrows) {                                                   \
        int64_t t = 0;                                                                               \
        for (; t + (TT) <= ntok; t += (TT)) tile(w, nb, x + t * nb, y, t * ldy, ldy, nrows, (TT), F64); \
        if ((TT) > 4 && ntok - t >= 4) { tile(w, nb, x + t * nb, y, t * ldy, ldy, nrows, 4, F64); t += 4; } \
        if ((TT) > 2 && ntok - t >= 2) { tile(w, nb, x + t * nb, y, t * ldy, ldy, nrows, 2, F64); t += 2; } \
        if (ntok - t >= 1) tile(w, nb, x + t * nb, y, t * ldy, ldy, nrows, 1, F64);                  \
    }

/* ================================================================ AVX-512 VNNI */

INLINE TGT_VNNI void q40_tile_vnni(const uint8_t *w, int64_t nb, const tpk_xq *x, void *y, int64_t at, int64_t ldy,
                                   int nrows, const int TT, const int F64) {
    acc512 out[8];
    for (int t = 0; t < TT; t++) acc512_zero(&out[t], F64);
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *gb = w + b * TPK_Q40_GROUP_BYTES;
        tpk_prefetch_ahead(gb, TPK_Q40_GROUP_BYTES);
        __m512i acc[8];
        for (int t = 0; t < TT; t++) acc[t] = _mm512_set1_epi32(x[t * nb + b].s8);
        for (int k = 0; k < 4; k++) {
            const __m512i v = _mm512_loadu_si512((const void *)(gb + 32 + 64 * k));
            const __m512i lo = _mm512_and_si512(v, m4);
            const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
            for (int t = 0; t < TT; t++) {
                const int8_t *xq = x[t * nb + b].qs;
                acc[t] = _mm512_dpbusd_epi32(acc[t], lo, _mm512_set1_epi32(ld32(xq + 4 * k)));
                acc[t] = _mm512_dpbusd_epi32(acc[t], hi, _mm512_set1_epi32(ld32(xq + 16 + 4 * k)));
            }
        }
        const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)gb));
        for (int t = 0; t < TT; t++) acc512_add(&out[t], acc[t], dw, x[t * nb + b].d, F64);
    }
    for (int t = 0; t < TT; t++) acc512_store(y, at + t * ldy, &out[t], nrows, F64);
}

INLINE TGT_VNNI void q80_tile_vnni(const uint8_t *w, int64_t nb, const tpk_xq *x, void *y, int64_t at, int64_t ldy,
                                   int nrows, const int TT, const int F64) {
    acc512 out[8];
    for (int t = 0; t < TT; t++) acc512_zero(&out[t], F64);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *gb = w + b * TPK_Q80_GROUP_BYTES;
        tpk_prefetch_ahead(gb, TPK_Q80_GROUP_BYTES);
        __m512i acc[8];
        for (int t = 0; t < TT; t++) acc[t] = _mm512_set1_epi32(x[t * nb + b].s128);
        for (int k = 0; k < 8; k++) {
            const __m512i v = _mm512_loadu_si512((const void *)(gb + 32 + 64 * k));
            for (int t = 0; t < TT; t++)
                acc[t] = _mm512_dpbusd_epi32(acc[t], v, _mm512_set1_epi32(ld32(x[t * nb + b].qs + 4 * k)));
        }
        const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)gb));
        for (int t = 0; t < TT; t++) acc512_add(&out[t], acc[t], dw, x[t * nb + b].d, F64);
    }
    for (int t = 0; t < TT; t++) acc512_store(y, at + t * ldy, &out[t], nrows, F64);
}

GROUP_FN(q40_group_vnni, q40_tile_vnni, TGT_VNNI, 8, 0)
GROUP_FN(q80_group_vnni, q80_tile_vnni, TGT_VNNI, 8, 0)
GROUP_FN(q40_group_vnni_f64, q40_tile_vnni, TGT_VNNI, 4, 1)
GROUP_FN(q80_group_vnni_f64, q80_tile_vnni, TGT_VNNI, 4, 1)

/* ================================================================ AVX-512 F/BW/VL (no VNNI)
 * u8 x s8 products by vpmaddubsw: pairs summed into int16 lanes, then vpmaddwd by 1 into
 * the row's int32 lane. Nibbles are at most 15, so 8 pair sums per int16 lane stay within
 * 8 * 2 * 15 * 128 = 30720 and nothing saturates; q80 weights (q + 128 up to 255) are
 * split into their two nibbles for the same reason and recombined as lo + 16 * hi. */

INLINE TGT_512 void q40_tile_512(const uint8_t *w, int64_t nb, const tpk_xq *x, void *y, int64_t at, int64_t ldy,
                                 int nrows, const int TT, const int F64) {
    acc512 out[8];
    for (int t = 0; t < TT; t++) acc512_zero(&out[t], F64);
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    const __m512i ones = _mm512_set1_epi16(1);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *gb = w + b * TPK_Q40_GROUP_BYTES;
        tpk_prefetch_ahead(gb, TPK_Q40_GROUP_BYTES);
        __m512i acc16[8];
        for (int t = 0; t < TT; t++) acc16[t] = _mm512_setzero_si512();
        for (int k = 0; k < 4; k++) {
            const __m512i v = _mm512_loadu_si512((const void *)(gb + 32 + 64 * k));
            const __m512i lo = _mm512_and_si512(v, m4);
            const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
            for (int t = 0; t < TT; t++) {
                const int8_t *xq = x[t * nb + b].qs;
                acc16[t] = _mm512_add_epi16(acc16[t], _mm512_maddubs_epi16(lo, _mm512_set1_epi32(ld32(xq + 4 * k))));
                acc16[t] = _mm512_add_epi16(acc16[t], _mm512_maddubs_epi16(hi, _mm512_set1_epi32(ld32(xq + 16 + 4 * k))));
            }
        }
        const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)gb));
        for (int t = 0; t < TT; t++) {
            const __m512i isum = _mm512_add_epi32(_mm512_madd_epi16(acc16[t], ones), _mm512_set1_epi32(x[t * nb + b].s8));
            acc512_add(&out[t], isum, dw, x[t * nb + b].d, F64);
        }
    }
    for (int t = 0; t < TT; t++) acc512_store(y, at + t * ldy, &out[t], nrows, F64);
}

INLINE TGT_512 void q80_tile_512(const uint8_t *w, int64_t nb, const tpk_xq *x, void *y, int64_t at, int64_t ldy,
                                 int nrows, const int TT, const int F64) {
    acc512 out[4];
    for (int t = 0; t < TT; t++) acc512_zero(&out[t], F64);
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    const __m512i ones = _mm512_set1_epi16(1);
    const __m512i sixteens = _mm512_set1_epi16(16);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *gb = w + b * TPK_Q80_GROUP_BYTES;
        tpk_prefetch_ahead(gb, TPK_Q80_GROUP_BYTES);
        __m512i lo16[4], hi16[4];
        for (int t = 0; t < TT; t++) lo16[t] = hi16[t] = _mm512_setzero_si512();
        for (int k = 0; k < 8; k++) {
            const __m512i v = _mm512_loadu_si512((const void *)(gb + 32 + 64 * k));
            const __m512i lo = _mm512_and_si512(v, m4);
            const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
            for (int t = 0; t < TT; t++) {
                const __m512i xk = _mm512_set1_epi32(ld32(x[t * nb + b].qs + 4 * k));
                lo16[t] = _mm512_add_epi16(lo16[t], _mm512_maddubs_epi16(lo, xk));
                hi16[t] = _mm512_add_epi16(hi16[t], _mm512_maddubs_epi16(hi, xk));
            }
        }
        const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)gb));
        for (int t = 0; t < TT; t++) {
            __m512i isum = _mm512_add_epi32(_mm512_madd_epi16(lo16[t], ones), _mm512_madd_epi16(hi16[t], sixteens));
            isum = _mm512_add_epi32(isum, _mm512_set1_epi32(x[t * nb + b].s128));
            acc512_add(&out[t], isum, dw, x[t * nb + b].d, F64);
        }
    }
    for (int t = 0; t < TT; t++) acc512_store(y, at + t * ldy, &out[t], nrows, F64);
}

GROUP_FN(q40_group_512, q40_tile_512, TGT_512, 8, 0)
GROUP_FN(q80_group_512, q80_tile_512, TGT_512, 4, 0)
GROUP_FN(q40_group_512_f64, q40_tile_512, TGT_512, 4, 1)
GROUP_FN(q80_group_512_f64, q80_tile_512, TGT_512, 4, 1)

/* ================================================================ AVX2
 * The same arithmetic as AVX-512 F/BW on 256-bit registers: a row group is two halves
 * of 8 rows (bytes 32h..32h+31 of each 64-byte slice), taken one after the other per block
 * so that a tile of 4 tokens fits in the 16 registers (int16 sums, nibbles, mask, one
 * broadcast); TPK_CHAIN and TPK_OPAQUE keep GCC from undoing that (docs/kernels.md). */

/* One token (decode): both halves of a block at once, so the activation's 8 broadcasts serve
 * 16 rows (the 4-token tile takes the halves one after the other to fit its registers). */
INLINE TGT_AVX2 void q40_token_avx2(const uint8_t *w, int64_t nb, const tpk_xq *x, void *y, int64_t at, int nrows,
                                    const int F64) {
    acc256 out0, out1;
    acc256_zero(&out0, F64);
    acc256_zero(&out1, F64);
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *gb = w + b * TPK_Q40_GROUP_BYTES;
        tpk_prefetch_ahead(gb, TPK_Q40_GROUP_BYTES);
        const int8_t *xq = x[b].qs;
        __m256i lo0 = _mm256_setzero_si256(), hi0 = lo0, lo1 = lo0, hi1 = lo0;
        for (int k = 0; k < 4; k++) {
            const __m256i xl = _mm256_set1_epi32(ld32(xq + 4 * k)), xh = _mm256_set1_epi32(ld32(xq + 16 + 4 * k));
            const __m256i v0 = _mm256_loadu_si256((const __m256i *)(gb + 32 + 64 * k));
            const __m256i v1 = _mm256_loadu_si256((const __m256i *)(gb + 64 + 64 * k));
            lo0 = _mm256_add_epi16(lo0, _mm256_maddubs_epi16(_mm256_and_si256(v0, m4), xl));
            hi0 = _mm256_add_epi16(hi0, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v0, 4), m4), xh));
            lo1 = _mm256_add_epi16(lo1, _mm256_maddubs_epi16(_mm256_and_si256(v1, m4), xl));
            hi1 = _mm256_add_epi16(hi1, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v1, 4), m4), xh));
        }
        const __m256i s8 = _mm256_set1_epi32(x[b].s8);
        const __m256i isum0 = _mm256_add_epi32(_mm256_madd_epi16(_mm256_add_epi16(lo0, hi0), ones), s8);
        const __m256i isum1 = _mm256_add_epi32(_mm256_madd_epi16(_mm256_add_epi16(lo1, hi1), ones), s8);
        acc256_add(&out0, isum0, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)gb)), x[b].d, F64);
        acc256_add(&out1, isum1, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(gb + 16))), x[b].d, F64);
    }
    acc256_store(y, at, &out0, nrows, F64);
    acc256_store(y, at + 8, &out1, nrows - 8, F64);
}

INLINE TGT_AVX2 void q40_tile_avx2(const uint8_t *w, int64_t nb, const tpk_xq *x, void *y, int64_t at, int64_t ldy,
                                   int nrows, const int TT, const int F64) {
    if (TT == 1) {
        q40_token_avx2(w, nb, x, y, at, nrows, F64);
        return;
    }
    acc256 out[2][4];
    for (int h = 0; h < 2; h++)
        for (int t = 0; t < TT; t++) acc256_zero(&out[h][t], F64);
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *gb = w + b * TPK_Q40_GROUP_BYTES;
        tpk_prefetch_ahead(gb, TPK_Q40_GROUP_BYTES);
        for (int h = 0; h < 2; h++) {
            const tpk_xq *xh = x + b;
            TPK_OPAQUE(xh);
            __m256i acc16[4];
            for (int k = 0; k < 4; k++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(gb + 32 + 64 * k + 32 * h));
                const __m256i lo = _mm256_and_si256(v, m4);
                const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
                for (int t = 0; t < TT; t++) {
                    const int8_t *xq = xh[t * nb].qs;
                    const __m256i pl = _mm256_maddubs_epi16(lo, _mm256_set1_epi32(ld32(xq + 4 * k)));
                    acc16[t] = k ? _mm256_add_epi16(acc16[t], pl) : pl;
                    TPK_CHAIN(acc16[t]);
                    acc16[t] = _mm256_add_epi16(acc16[t], _mm256_maddubs_epi16(hi, _mm256_set1_epi32(ld32(xq + 16 + 4 * k))));
                    TPK_CHAIN(acc16[t]);
                }
            }
            const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(gb + 16 * h)));
            for (int t = 0; t < TT; t++) {
                const __m256i isum = _mm256_add_epi32(_mm256_madd_epi16(acc16[t], ones), _mm256_set1_epi32(xh[t * nb].s8));
                acc256_add(&out[h][t], isum, dw, xh[t * nb].d, F64);
            }
        }
    }
    for (int t = 0; t < TT; t++) {
        acc256_store(y, at + t * ldy, &out[0][t], nrows, F64);
        acc256_store(y, at + t * ldy + 8, &out[1][t], nrows - 8, F64);
    }
}

INLINE TGT_AVX2 void q80_tile_avx2(const uint8_t *w, int64_t nb, const tpk_xq *x, void *y, int64_t at, int64_t ldy,
                                   int nrows, const int TT, const int F64) {
    acc256 out[2][4];
    for (int h = 0; h < 2; h++)
        for (int t = 0; t < TT; t++) acc256_zero(&out[h][t], F64);
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const __m256i ones = _mm256_set1_epi16(1);
    const __m256i sixteens = _mm256_set1_epi16(16);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *gb = w + b * TPK_Q80_GROUP_BYTES;
        tpk_prefetch_ahead(gb, TPK_Q80_GROUP_BYTES);
        for (int h = 0; h < 2; h++) {
            const tpk_xq *xh = x;
            TPK_OPAQUE(xh);
            __m256i lo16[4], hi16[4];
            for (int t = 0; t < TT; t++) lo16[t] = hi16[t] = _mm256_setzero_si256();
            for (int k = 0; k < 8; k++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(gb + 32 + 64 * k + 32 * h));
                const __m256i lo = _mm256_and_si256(v, m4);
                const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
                for (int t = 0; t < TT; t++) {
                    const __m256i xk = _mm256_set1_epi32(ld32(xh[t * nb + b].qs + 4 * k));
                    lo16[t] = _mm256_add_epi16(lo16[t], _mm256_maddubs_epi16(lo, xk));
                    hi16[t] = _mm256_add_epi16(hi16[t], _mm256_maddubs_epi16(hi, xk));
                    TPK_CHAIN(lo16[t]);
                    TPK_CHAIN(hi16[t]);
                }
            }
            const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(gb + 16 * h)));
            for (int t = 0; t < TT; t++) {
                __m256i isum = _mm256_add_epi32(_mm256_madd_epi16(lo16[t], ones), _mm256_madd_epi16(hi16[t], sixteens));
                isum = _mm256_add_epi32(isum, _mm256_set1_epi32(x[t * nb + b].s128));
                acc256_add(&out[h][t], isum, dw, x[t * nb + b].d, F64);
            }
        }
    }
    for (int t = 0; t < TT; t++) {
        acc256_store(y, at + t * ldy, &out[0][t], nrows, F64);
        acc256_store(y, at + t * ldy + 8, &out[1][t], nrows - 8, F64);
    }
}

GROUP_FN(q40_group_avx2, q40_tile_avx2, TGT_AVX2, 4, 0)
GROUP_FN(q80_group_avx2, q80_tile_avx2, TGT_AVX2, 4, 0)
GROUP_FN(q40_group_avx2_f64, q40_tile_avx2, TGT_AVX2, 4, 1)
GROUP_FN(q80_group_avx2_f64, q80_tile_avx2, TGT_AVX2, 4, 1)

/* ================================================================ q41, q50, q4k, q5k, q6k
 * One tile per level for every type, T a compile-time TPK_T_* constant (tpk.h has the
 * layout and the per-block formula). Per chunk k of 4 elements: the nibbles of 16 rows,
 * plus the high bits moved into bits 4 (and 5) by constant shifts (q50, q5k: a plane byte
 * holds the chunk's bit at bit k for the low nibbles and bit 4+k for the high ones; q6k: a
 * byte of p0 (low) or p1 (high) holds the chunk's 2 bits at bits 2k, 2k+1; 16-bit shifts
 * never carry a wanted bit across a byte here). Elements 0..15 (low nibbles) and 16..31
 * (high nibbles) are summed apart, A and B, where q6k scales them apart; the other types
 * add both into A (VNNI), or with the vpmaddubsw path the 4-bit types do (B stays 0).
 * int16 bounds (vpmaddubsw path): a pair sum is at most 2*63*128 = 16128; 4-bit quants in
 * one accumulator over 4 chunks: 8*2*15*128 = 30720; 5-bit ones apart: 4*2*31*128 = 31744;
 * 6-bit quants widen every 2 chunks. */

#define KQ_ACC16_CHUNKS(T) (KQ_PLANES(T) == 2 ? 2 : 4)
#define KQ_MERGE16(T) (KQ_PLANES(T) == 0)

INLINE TGT_512 void acc512_add2(acc512 *a, __m512i isum, __m512 dw, __m512i isum2, __m512 mw, float dx,
                                const int F64, const int TWO, const int SUB) {
    if (F64) {
        const __m512d vdx = _mm512_set1_pd((double)dx);
        for (int h = 0; h < 2; h++) {
            const __m256 dwh = h ? _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(dw), 1)) : _mm512_castps512_ps256(dw);
            const __m256i ih = h ? _mm512_extracti64x4_epi64(isum, 1) : _mm512_castsi512_si256(isum);
            __m512d t = _mm512_mul_pd(_mm512_cvtepi32_pd(ih), _mm512_mul_pd(_mm512_cvtps_pd(dwh), vdx));
            if (TWO) {
                const __m256 mwh = h ? _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(mw), 1)) : _mm512_castps512_ps256(mw);
                const __m256i i2h = h ? _mm512_extracti64x4_epi64(isum2, 1) : _mm512_castsi512_si256(isum2);
                const __m512d t2 = _mm512_mul_pd(_mm512_cvtepi32_pd(i2h), _mm512_mul_pd(_mm512_cvtps_pd(mwh), vdx));
                t = SUB ? _mm512_sub_pd(t, t2) : _mm512_add_pd(t, t2);
            }
            if (h) a->d1 = _mm512_add_pd(a->d1, t);
            else a->d0 = _mm512_add_pd(a->d0, t);
        }
    } else {
        const __m512 vdx = _mm512_set1_ps(dx);
        __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(dw, vdx));
        if (TWO) {
            const __m512 t2 = _mm512_mul_ps(_mm512_cvtepi32_ps(isum2), _mm512_mul_ps(mw, vdx));
            t = SUB ? _mm512_sub_ps(t, t2) : _mm512_add_ps(t, t2);
        }
        a->f = _mm512_add_ps(a->f, t);
    }
}

/* (isum2 holds one value in every lane: q41's sum of the block's activations) */
INLINE TGT_AVX2 void acc256_add2(acc256 *a, __m256i isum, __m256 dw, __m256i isum2, __m256 mw, float dx,
                                 const int F64, const int TWO, const int SUB) {
    const __m256 vdx = _mm256_set1_ps(dx);
    const __m256 sc = _mm256_mul_ps(dw, vdx), msc = TWO ? _mm256_mul_ps(mw, vdx) : sc;
    if (F64) {
        /* dw, mw and dx are float16 values, so dw*dx and mw*dx are exact in float32 (as for q40,
         * acc256_add) and each term, isum (under 2^21) times one, exact in double: the fused
         * forms round once where the reference rounds (t + t2, then acc + that) */
        const __m256d i2 = _mm256_cvtepi32_pd(_mm256_castsi256_si128(isum2));   /* isum2: one value in every lane */
        for (int h = 0; h < 2; h++) {
            const __m128 sch = h ? _mm256_extractf128_ps(sc, 1) : _mm256_castps256_ps128(sc);
            const __m128i ih = h ? _mm256_extracti128_si256(isum, 1) : _mm256_castsi256_si128(isum);
            __m256d *acc = h ? &a->d1 : &a->d0;
            if (TWO) {
                const __m128 msch = h ? _mm256_extractf128_ps(msc, 1) : _mm256_castps256_ps128(msc);
                const __m256d t = _mm256_mul_pd(_mm256_cvtepi32_pd(ih), _mm256_cvtps_pd(sch));
                const __m256d m = _mm256_cvtps_pd(msch);
                *acc = _mm256_add_pd(*acc, SUB ? _mm256_fnmadd_pd(i2, m, t) : _mm256_fmadd_pd(i2, m, t));
            } else {
                *acc = _mm256_fmadd_pd(_mm256_cvtepi32_pd(ih), _mm256_cvtps_pd(sch), *acc);
            }
        }
    } else {
        __m256 t = _mm256_mul_ps(_mm256_cvtepi32_ps(isum), sc);
        if (TWO) {
            const __m256 t2 = _mm256_mul_ps(_mm256_cvtepi32_ps(isum2), msc);
            t = SUB ? _mm256_sub_ps(t, t2) : _mm256_add_ps(t, t2);
        }
        a->f = _mm256_add_ps(a->f, t);
    }
}

/* Byte shifts by a constant: left for s > 0, right for s < 0 (16-bit lanes, see above). */
INLINE TGT_512 __m512i shl512(__m512i v, const int s) {
    return s >= 0 ? _mm512_slli_epi16(v, (unsigned)s) : _mm512_srli_epi16(v, (unsigned)-s);
}
INLINE TGT_AVX2 __m256i shl256(__m256i v, const int s) {
    return s >= 0 ? _mm256_slli_epi16(v, s) : _mm256_srli_epi16(v, -s);
}

/* Chunk k's quants of 16 rows: low nibbles (elements 4k..4k+3) and high (16+4k..). */
INLINE TGT_512 void kq512_chunk(const uint8_t *gb, const int k, __m512i p0, __m512i p1, __m512i *lo, __m512i *hi,
                                const int T) {
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    const __m512i v = _mm512_loadu_si512((const void *)(gb + KQ_OFF_QS(T) + 64 * k));
    __m512i l = _mm512_and_si512(v, m4), h = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
    if (KQ_PLANES(T) == 1) {
        const __m512i b4 = _mm512_set1_epi8(0x10);
        l = _mm512_or_si512(l, _mm512_and_si512(shl512(p0, 4 - k), b4));
        h = _mm512_or_si512(h, _mm512_and_si512(shl512(p0, -k), b4));
    }
    if (KQ_PLANES(T) == 2) {   /* q6k: chunk k's 2 bits at bits 2k, 2k+1 of p0 (low), p1 (high) */
        const __m512i b45 = _mm512_set1_epi8(0x30);
        l = _mm512_or_si512(l, _mm512_and_si512(shl512(p0, 4 - 2 * k), b45));
        h = _mm512_or_si512(h, _mm512_and_si512(shl512(p1, 4 - 2 * k), b45));
    }
    *lo = l;
    *hi = h;
}

INLINE TGT_AVX2 void kq256_chunk(const uint8_t *gb, const int k, const int half, __m256i p0, __m256i p1, __m256i *lo,
                                 __m256i *hi, const int T) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const __m256i v = _mm256_loadu_si256((const __m256i *)(gb + KQ_OFF_QS(T) + 64 * k + 32 * half));
    __m256i l = _mm256_and_si256(v, m4), h = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
    if (KQ_PLANES(T) == 1) {
        const __m256i b4 = _mm256_set1_epi8(0x10);
        l = _mm256_or_si256(l, _mm256_and_si256(shl256(p0, 4 - k), b4));
        h = _mm256_or_si256(h, _mm256_and_si256(shl256(p0, -k), b4));
    }
    if (KQ_PLANES(T) == 2) {   /* q6k: chunk k's 2 bits at bits 2k, 2k+1 of p0 (low), p1 (high) */
        const __m256i b45 = _mm256_set1_epi8(0x30);
        l = _mm256_or_si256(l, _mm256_and_si256(shl256(p0, 4 - 2 * k), b45));
        h = _mm256_or_si256(h, _mm256_and_si256(shl256(p1, 4 - 2 * k), b45));
    }
    *lo = l;
    *hi = h;
}

/* A, B -> the block's term for 16 rows, added to one token's sums (q41, q50). */
INLINE TGT_512 void kq512_finish(acc512 *out, __m512i A, __m512i B, const uint8_t *gb, const tpk_xq *xb, const int T,
                                 const int F64) {
    const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)gb));
    __m512 mw = dw;
    __m512i isum, isum2 = _mm512_setzero_si512();
    if (T == TPK_T_Q41) {
        mw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(gb + KQ_OFF_M)));
        isum = _mm512_add_epi32(A, B);
        isum2 = _mm512_set1_epi32(xb->sum);
    } else {
        isum = _mm512_add_epi32(_mm512_add_epi32(A, B), _mm512_set1_epi32(xb->s16));
    }
    acc512_add2(out, isum, dw, isum2, mw, xb->d, F64, T == TPK_T_Q41, 0);
}

INLINE TGT_AVX2 void kq256_finish(acc256 *out, __m256i A, __m256i B, const uint8_t *gb, const int half,
                                  const tpk_xq *xb, const int T, const int F64) {
    const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(gb + 16 * half)));
    __m256 mw = dw;
    __m256i isum, isum2 = _mm256_setzero_si256();
    if (T == TPK_T_Q41) {
        mw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(gb + KQ_OFF_M + 16 * half)));
        isum = _mm256_add_epi32(A, B);
        isum2 = _mm256_set1_epi32(xb->sum);
    } else {
        isum = _mm256_add_epi32(_mm256_add_epi32(A, B), _mm256_set1_epi32(xb->s16));
    }
    acc256_add2(out, isum, dw, isum2, mw, xb->d, F64, T == TPK_T_Q41, 0);
}

INLINE TGT_512 void kq512_planes(const uint8_t *gb, __m512i *p0, __m512i *p1, const int T) {
    *p0 = *p1 = _mm512_setzero_si512();
    if (KQ_PLANES(T) >= 1) *p0 = _mm512_loadu_si512((const void *)(gb + KQ_OFF_QH(T)));
    if (KQ_PLANES(T) == 2) *p1 = _mm512_loadu_si512((const void *)(gb + KQ_OFF_QH(T) + 64));
}

INLINE TGT_VNNI void kq_tile_vnni(const uint8_t *w, int64_t nb, const tpk_xq *x, void *y, int64_t at, int64_t ldy,
                                  int nrows, const int TT, const int F64, const int T) {
    acc512 out[4];
    for (int t = 0; t < TT; t++) acc512_zero(&out[t], F64);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *gb = w + b * KQ_GB(T);
        tpk_prefetch_ahead(gb, KQ_GB(T));
        __m512i A[4], B[4], p0, p1;
        kq512_planes(gb, &p0, &p1, T);
        for (int t = 0; t < TT; t++) A[t] = B[t] = _mm512_setzero_si512();
        for (int k = 0; k < 4; k++) {
            __m512i lo, hi;
            kq512_chunk(gb, k, p0, p1, &lo, &hi, T);
            for (int t = 0; t < TT; t++) {
                const int8_t *xq = x[t * nb + b].qs;
                A[t] = _mm512_dpbusd_epi32(A[t], lo, _mm512_set1_epi32(ld32(xq + 4 * k)));
                if (KQ_MERGE(T)) A[t] = _mm512_dpbusd_epi32(A[t], hi, _mm512_set1_epi32(ld32(xq + 16 + 4 * k)));
                else B[t] = _mm512_dpbusd_epi32(B[t], hi, _mm512_set1_epi32(ld32(xq + 16 + 4 * k)));
            }
        }
        for (int t = 0; t < TT; t++) kq512_finish(&out[t], A[t], B[t], gb, x + t * nb + b, T, F64);
    }
    for (int t = 0; t < TT; t++) acc512_store(y, at + t * ldy, &out[t], nrows, F64);
}

INLINE TGT_512 void kq_tile_512(const uint8_t *w, int64_t nb, const tpk_xq *x, void *y, int64_t at, int64_t ldy,
                                int nrows, const int TT, const int F64, const int T) {
    acc512 out[4];
    for (int t = 0; t < TT; t++) acc512_zero(&out[t], F64);
    const __m512i ones = _mm512_set1_epi16(1);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *gb = w + b * KQ_GB(T);
        tpk_prefetch_ahead(gb, KQ_GB(T));
        __m512i A[4], B[4], A16[4], B16[4], p0, p1;
        kq512_planes(gb, &p0, &p1, T);
        for (int t = 0; t < TT; t++) A[t] = B[t] = A16[t] = B16[t] = _mm512_setzero_si512();
        for (int k = 0; k < 4; k++) {
            __m512i lo, hi;
            kq512_chunk(gb, k, p0, p1, &lo, &hi, T);
            for (int t = 0; t < TT; t++) {
                const int8_t *xq = x[t * nb + b].qs;
                const __m512i ph = _mm512_maddubs_epi16(hi, _mm512_set1_epi32(ld32(xq + 16 + 4 * k)));
                A16[t] = _mm512_add_epi16(A16[t], _mm512_maddubs_epi16(lo, _mm512_set1_epi32(ld32(xq + 4 * k))));
                if (KQ_MERGE16(T)) A16[t] = _mm512_add_epi16(A16[t], ph);
                else B16[t] = _mm512_add_epi16(B16[t], ph);
                if ((k + 1) % KQ_ACC16_CHUNKS(T) == 0) {
                    A[t] = _mm512_add_epi32(A[t], _mm512_madd_epi16(A16[t], ones));
                    if (!KQ_MERGE16(T)) B[t] = _mm512_add_epi32(B[t], _mm512_madd_epi16(B16[t], ones));
                    A16[t] = B16[t] = _mm512_setzero_si512();
                }
            }
        }
        for (int t = 0; t < TT; t++) kq512_finish(&out[t], A[t], B[t], gb, x + t * nb + b, T, F64);
    }
    for (int t = 0; t < TT; t++) acc512_store(y, at + t * ldy, &out[t], nrows, F64);
}

INLINE TGT_AVX2 void kq_tile_avx2(const uint8_t *w, int64_t nb, const tpk_xq *x, void *y, int64_t at, int64_t ldy,
                                  int nrows, const int TT, const int F64, const int T) {
    acc256 out[2][4];
    for (int h = 0; h < 2; h++)
        for (int t = 0; t < TT; t++) acc256_zero(&out[h][t], F64);
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *gb = w + b * KQ_GB(T);
        tpk_prefetch_ahead(gb, KQ_GB(T));
        for (int h = 0; h < 2; h++) {
            const tpk_xq *xh = x;
            TPK_OPAQUE(xh);
            __m256i A[4], B[4], A16[4], B16[4];
            __m256i p0 = _mm256_setzero_si256(), p1 = p0;
            if (KQ_PLANES(T) >= 1) p0 = _mm256_loadu_si256((const __m256i *)(gb + KQ_OFF_QH(T) + 32 * h));
            if (KQ_PLANES(T) == 2) p1 = _mm256_loadu_si256((const __m256i *)(gb + KQ_OFF_QH(T) + 64 + 32 * h));
            for (int t = 0; t < TT; t++) A[t] = B[t] = A16[t] = B16[t] = _mm256_setzero_si256();
            for (int k = 0; k < 4; k++) {
                __m256i lo, hi;
                kq256_chunk(gb, k, h, p0, p1, &lo, &hi, T);
                for (int t = 0; t < TT; t++) {
                    const int8_t *xq = xh[t * nb + b].qs;
                    const __m256i ph = _mm256_maddubs_epi16(hi, _mm256_set1_epi32(ld32(xq + 16 + 4 * k)));
                    A16[t] = _mm256_add_epi16(A16[t], _mm256_maddubs_epi16(lo, _mm256_set1_epi32(ld32(xq + 4 * k))));
                    TPK_CHAIN(A16[t]);
                    if (KQ_MERGE16(T)) A16[t] = _mm256_add_epi16(A16[t], ph);
                    else B16[t] = _mm256_add_epi16(B16[t], ph);
                    TPK_CHAIN(A16[t]);
                    if (!KQ_MERGE16(T)) TPK_CHAIN(B16[t]);
                    if ((k + 1) % KQ_ACC16_CHUNKS(T) == 0) {
                        A[t] = _mm256_add_epi32(A[t], _mm256_madd_epi16(A16[t], ones));
                        if (!KQ_MERGE16(T)) B[t] = _mm256_add_epi32(B[t], _mm256_madd_epi16(B16[t], ones));
                        A16[t] = B16[t] = _mm256_setzero_si256();
                    }
                }
            }
            for (int t = 0; t < TT; t++) kq256_finish(&out[h][t], A[t], B[t], gb, h, x + t * nb + b, T, F64);
        }
    }
    for (int t = 0; t < TT; t++) {
        acc256_store(y, at + t * ldy, &out[0][t], nrows, F64);
        acc256_store(y, at + t * ldy + 8, &out[1][t], nrows - 8, F64);
    }
}

/* ---------------------------------------------------------------- q4k, q5k, q6k: spans
 * A row group is walked span by span (tpk_impl.h). Per block and token, the block's int32
 * sum with the sub-block scales applied (q4k, q5k: sc*(A+B); q6k: sc0*(A-32*S0) +
 * sc1*(B-32*S1)) goes into the span's s += (float)isum * dx, and the mins into
 * m += (float)mn * (S*dx); at the span's end, one acc += d*s - dmin*m with the span
 * header's d, dmin: the scalar reference's steps, lane by lane. On the vpmaddubsw paths the
 * scales come in as the vpmaddwd multiplier (a lane's two int16 pair sums times sc), so they
 * cost nothing; every product there is exact (|sum| < 2^31, see the bounds above). */

/* (v, v) as the two int16 halves of every int32 lane of small integers v. */
INLINE TGT_AVX2 __m256i pair16_256(__m256i v) {
    return _mm256_or_si256(_mm256_and_si256(v, _mm256_set1_epi32(0xFFFF)), _mm256_slli_epi32(v, 16));
}
INLINE TGT_512 __m512i pair16_512(__m512i v) {
    return _mm512_or_si512(_mm512_and_si512(v, _mm512_set1_epi32(0xFFFF)), _mm512_slli_epi32(v, 16));
}

/* a += (float)isum * dx, or in float64 (double)isum * (double)dx */
INLINE TGT_AVX2 void acc256_scaled(acc256 *a, __m256i isum, float dx, const int F64) {
    if (F64) {   /* isum (under 2^26) times a float16 value is exact in double: fused, the same bits */
        const __m256d v = _mm256_set1_pd((double)dx);
        a->d0 = _mm256_fmadd_pd(_mm256_cvtepi32_pd(_mm256_castsi256_si128(isum)), v, a->d0);
        a->d1 = _mm256_fmadd_pd(_mm256_cvtepi32_pd(_mm256_extracti128_si256(isum, 1)), v, a->d1);
    } else {
        a->f = _mm256_add_ps(a->f, _mm256_mul_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(dx)));
    }
}
INLINE TGT_512 void acc512_scaled(acc512 *a, __m512i isum, float dx, const int F64) {
    if (F64) {
        const __m512d v = _mm512_set1_pd((double)dx);
        a->d0 = _mm512_add_pd(a->d0, _mm512_mul_pd(_mm512_cvtepi32_pd(_mm512_castsi512_si256(isum)), v));
        a->d1 = _mm512_add_pd(a->d1, _mm512_mul_pd(_mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(isum, 1)), v));
    } else {
        a->f = _mm512_add_ps(a->f, _mm512_mul_ps(_mm512_cvtepi32_ps(isum), _mm512_set1_ps(dx)));
    }
}

/* the mins: a += (float)mn * sdx, or (double)mn * ((double)S * (double)dx) */
INLINE TGT_AVX2 void acc256_mins(acc256 *a, __m256i mn, const tpk_xq *xb, const int F64) {
    if (F64) {   /* a 6-bit min times sum * d (at most 23 significant bits): exact, so fused */
        const __m256d v = _mm256_set1_pd((double)xb->sum * (double)xb->d);
        a->d0 = _mm256_fmadd_pd(_mm256_cvtepi32_pd(_mm256_castsi256_si128(mn)), v, a->d0);
        a->d1 = _mm256_fmadd_pd(_mm256_cvtepi32_pd(_mm256_extracti128_si256(mn, 1)), v, a->d1);
    } else {
        a->f = _mm256_add_ps(a->f, _mm256_mul_ps(_mm256_cvtepi32_ps(mn), _mm256_set1_ps(xb->sdx)));
    }
}
INLINE TGT_512 void acc512_mins(acc512 *a, __m512i mn, const tpk_xq *xb, const int F64) {
    if (F64) {
        const __m512d v = _mm512_set1_pd((double)xb->sum * (double)xb->d);
        a->d0 = _mm512_add_pd(a->d0, _mm512_mul_pd(_mm512_cvtepi32_pd(_mm512_castsi512_si256(mn)), v));
        a->d1 = _mm512_add_pd(a->d1, _mm512_mul_pd(_mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(mn, 1)), v));
    } else {
        a->f = _mm512_add_ps(a->f, _mm512_mul_ps(_mm512_cvtepi32_ps(mn), _mm512_set1_ps(xb->sdx)));
    }
}

/* The span's end: out += d*s - dmin*m (q6k: d*s), d and dmin from the span header. */
INLINE TGT_AVX2 void acc256_span(acc256 *out, const acc256 *s, const acc256 *m, const uint8_t *hdr, const int half,
                                 const int T, const int F64) {
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(hdr + 16 * half)));
    __m256 dmin = d;
    if (KQ_IS_K(T)) dmin = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(hdr + 32 + 16 * half)));
    if (F64) {
        for (int h = 0; h < 2; h++) {
            const __m256d dd = _mm256_cvtps_pd(h ? _mm256_extractf128_ps(d, 1) : _mm256_castps256_ps128(d));
            __m256d t = _mm256_mul_pd(dd, h ? s->d1 : s->d0);
            if (KQ_IS_K(T)) {
                const __m256d md = _mm256_cvtps_pd(h ? _mm256_extractf128_ps(dmin, 1) : _mm256_castps256_ps128(dmin));
                t = _mm256_sub_pd(t, _mm256_mul_pd(md, h ? m->d1 : m->d0));
            }
            if (h) out->d1 = _mm256_add_pd(out->d1, t);
            else out->d0 = _mm256_add_pd(out->d0, t);
        }
    } else {
        __m256 t = _mm256_mul_ps(d, s->f);
        if (KQ_IS_K(T)) t = _mm256_sub_ps(t, _mm256_mul_ps(dmin, m->f));
        out->f = _mm256_add_ps(out->f, t);
    }
}
INLINE TGT_512 void acc512_span(acc512 *out, const acc512 *s, const acc512 *m, const uint8_t *hdr, const int T,
                                const int F64) {
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)hdr));
    __m512 dmin = d;
    if (KQ_IS_K(T)) dmin = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(hdr + 32)));
    if (F64) {
        for (int h = 0; h < 2; h++) {
            const __m512d dd = _mm512_cvtps_pd(h ? _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(d), 1))
                                                 : _mm512_castps512_ps256(d));
            __m512d t = _mm512_mul_pd(dd, h ? s->d1 : s->d0);
            if (KQ_IS_K(T)) {
                const __m512d md = _mm512_cvtps_pd(h ? _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(dmin), 1))
                                                     : _mm512_castps512_ps256(dmin));
                t = _mm512_sub_pd(t, _mm512_mul_pd(md, h ? m->d1 : m->d0));
            }
            if (h) out->d1 = _mm512_add_pd(out->d1, t);
            else out->d0 = _mm512_add_pd(out->d0, t);
        }
    } else {
        __m512 t = _mm512_mul_ps(d, s->f);
        if (KQ_IS_K(T)) t = _mm512_sub_ps(t, _mm512_mul_ps(dmin, m->f));
        out->f = _mm512_add_ps(out->f, t);
    }
}

/* q6k's offsets: sc0*(-32*S0) + sc1*(-32*S1) */
INLINE TGT_AVX2 __m256i q6k_offset256(__m256i sc0, __m256i sc1, const tpk_xq *xb) {
    return _mm256_add_epi32(_mm256_mullo_epi32(sc0, _mm256_set1_epi32(xb->h0)), _mm256_mullo_epi32(sc1, _mm256_set1_epi32(xb->h1)));
}
INLINE TGT_512 __m512i q6k_offset512(__m512i sc0, __m512i sc1, const tpk_xq *xb) {
    return _mm512_add_epi32(_mm512_mullo_epi32(sc0, _mm512_set1_epi32(xb->h0)), _mm512_mullo_epi32(sc1, _mm512_set1_epi32(xb->h1)));
}

/* One group block, 8 rows (half), TT tokens: isum[t] with the scales applied. */
INLINE TGT_AVX2 void kspan256_sums(const uint8_t *gb, const int half, const tpk_xq *x, int64_t nb, int64_t b,
                                   __m256i *isum, const int TT, const int T) {
    TPK_OPAQUE(x);   /* the other half's loads of the same activations are not merged with these */
    __m256i sc0, sc1;
    if (T == TPK_T_Q6K) {
        sc0 = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(gb + KQ_OFF_SC6 + 8 * half)));
        sc1 = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(gb + KQ_OFF_SC6 + 16 + 8 * half)));
    } else {
        sc0 = sc1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(gb + KQ_OFF_SC + 8 * half)));
    }
    const __m256i wA = pair16_256(sc0), wB = T == TPK_T_Q6K ? pair16_256(sc1) : wA;
    __m256i A[4], B[4], A16[4], B16[4];
    __m256i p0 = _mm256_setzero_si256(), p1 = p0;
    if (KQ_PLANES(T) >= 1) p0 = _mm256_loadu_si256((const __m256i *)(gb + KQ_OFF_QH(T) + 32 * half));
    if (KQ_PLANES(T) == 2) p1 = _mm256_loadu_si256((const __m256i *)(gb + KQ_OFF_QH(T) + 64 + 32 * half));
    for (int t = 0; t < TT; t++) A[t] = B[t] = A16[t] = B16[t] = _mm256_setzero_si256();
    for (int k = 0; k < 4; k++) {
        __m256i lo, hi;
        kq256_chunk(gb, k, half, p0, p1, &lo, &hi, T);
        for (int t = 0; t < TT; t++) {
            const int8_t *xq = x[t * nb + b].qs;
            const __m256i ph = _mm256_maddubs_epi16(hi, _mm256_set1_epi32(ld32(xq + 16 + 4 * k)));
            A16[t] = _mm256_add_epi16(A16[t], _mm256_maddubs_epi16(lo, _mm256_set1_epi32(ld32(xq + 4 * k))));
            TPK_CHAIN(A16[t]);
            if (KQ_MERGE16(T)) A16[t] = _mm256_add_epi16(A16[t], ph);
            else B16[t] = _mm256_add_epi16(B16[t], ph);
            TPK_CHAIN(A16[t]);
            if (!KQ_MERGE16(T)) TPK_CHAIN(B16[t]);
            if ((k + 1) % KQ_ACC16_CHUNKS(T) == 0) {
                A[t] = _mm256_add_epi32(A[t], _mm256_madd_epi16(A16[t], wA));
                if (!KQ_MERGE16(T)) B[t] = _mm256_add_epi32(B[t], _mm256_madd_epi16(B16[t], wB));
                A16[t] = B16[t] = _mm256_setzero_si256();
            }
        }
    }
    for (int t = 0; t < TT; t++) {
        isum[t] = _mm256_add_epi32(A[t], B[t]);
        if (T == TPK_T_Q6K) isum[t] = _mm256_add_epi32(isum[t], q6k_offset256(sc0, sc1, x + t * nb + b));
    }
}

INLINE TGT_AVX2 void kspan_tile_avx2(const uint8_t *w, int64_t nb, const tpk_xq *x, void *y, int64_t at, int64_t ldy,
                                     int nrows, const int TT, const int F64, const int T) {
    acc256 out[2][4], s[2][4], m[2][4];
    for (int h = 0; h < 2; h++)
        for (int t = 0; t < TT; t++) acc256_zero(&out[h][t], F64);
    const int phase = w[0];
    const uint8_t *p = w + KQ_PREFIX;
    for (int64_t b = 0; b < nb;) {
        const int n = kq_span_len(b, nb, phase);
        const uint8_t *hdr = p;
        p += KQ_HDR(T);
        for (int h = 0; h < 2; h++)
            for (int t = 0; t < TT; t++) {
                acc256_zero(&s[h][t], F64);
                acc256_zero(&m[h][t], F64);
            }
        for (int j = 0; j < n; j++, b++, p += KQ_GB(T)) {
            tpk_prefetch_ahead(p, KQ_GB(T));
            for (int h = 0; h < 2; h++) {
                __m256i isum[4];
                kspan256_sums(p, h, x, nb, b, isum, TT, T);
                const __m256i mn = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + KQ_OFF_MN + 8 * h)));
                for (int t = 0; t < TT; t++) {
                    acc256_scaled(&s[h][t], isum[t], x[t * nb + b].d, F64);
                    if (KQ_IS_K(T)) acc256_mins(&m[h][t], mn, x + t * nb + b, F64);
                }
            }
        }
        for (int h = 0; h < 2; h++)
            for (int t = 0; t < TT; t++) acc256_span(&out[h][t], &s[h][t], &m[h][t], hdr, h, T, F64);
    }
    for (int t = 0; t < TT; t++) {
        acc256_store(y, at + t * ldy, &out[0][t], nrows, F64);
        acc256_store(y, at + t * ldy + 8, &out[1][t], nrows - 8, F64);
    }
}

/* 16 rows, TT tokens, the vpmaddubsw path (AVX-512 F/BW). */
INLINE TGT_512 void kspan512_sums(const uint8_t *gb, const tpk_xq *x, int64_t nb, int64_t b, __m512i *isum,
                                  const int TT, const int T) {
    __m512i sc0, sc1, p0, p1;
    if (T == TPK_T_Q6K) {
        sc0 = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(gb + KQ_OFF_SC6)));
        sc1 = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(gb + KQ_OFF_SC6 + 16)));
    } else {
        sc0 = sc1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(gb + KQ_OFF_SC)));
    }
    const __m512i wA = pair16_512(sc0), wB = T == TPK_T_Q6K ? pair16_512(sc1) : wA;
    __m512i A[4], B[4], A16[4], B16[4];
    kq512_planes(gb, &p0, &p1, T);
    for (int t = 0; t < TT; t++) A[t] = B[t] = A16[t] = B16[t] = _mm512_setzero_si512();
    for (int k = 0; k < 4; k++) {
        __m512i lo, hi;
        kq512_chunk(gb, k, p0, p1, &lo, &hi, T);
        for (int t = 0; t < TT; t++) {
            const int8_t *xq = x[t * nb + b].qs;
            const __m512i ph = _mm512_maddubs_epi16(hi, _mm512_set1_epi32(ld32(xq + 16 + 4 * k)));
            A16[t] = _mm512_add_epi16(A16[t], _mm512_maddubs_epi16(lo, _mm512_set1_epi32(ld32(xq + 4 * k))));
            if (KQ_MERGE16(T)) A16[t] = _mm512_add_epi16(A16[t], ph);
            else B16[t] = _mm512_add_epi16(B16[t], ph);
            if ((k + 1) % KQ_ACC16_CHUNKS(T) == 0) {
                A[t] = _mm512_add_epi32(A[t], _mm512_madd_epi16(A16[t], wA));
                if (!KQ_MERGE16(T)) B[t] = _mm512_add_epi32(B[t], _mm512_madd_epi16(B16[t], wB));
                A16[t] = B16[t] = _mm512_setzero_si512();
            }
        }
    }
    for (int t = 0; t < TT; t++) {
        isum[t] = _mm512_add_epi32(A[t], B[t]);
        if (T == TPK_T_Q6K) isum[t] = _mm512_add_epi32(isum[t], q6k_offset512(sc0, sc1, x + t * nb + b));
    }
}

/* The same with VNNI: int32 sums by vpdpbusd, then the scales by vpmulld. */
INLINE TGT_VNNI void kspan_vnni_sums(const uint8_t *gb, const tpk_xq *x, int64_t nb, int64_t b, __m512i *isum,
                                     const int TT, const int T) {
    __m512i A[4], B[4], p0, p1;
    kq512_planes(gb, &p0, &p1, T);
    for (int t = 0; t < TT; t++) A[t] = B[t] = _mm512_setzero_si512();
    for (int k = 0; k < 4; k++) {
        __m512i lo, hi;
        kq512_chunk(gb, k, p0, p1, &lo, &hi, T);
        for (int t = 0; t < TT; t++) {
            const int8_t *xq = x[t * nb + b].qs;
            A[t] = _mm512_dpbusd_epi32(A[t], lo, _mm512_set1_epi32(ld32(xq + 4 * k)));
            if (KQ_MERGE(T)) A[t] = _mm512_dpbusd_epi32(A[t], hi, _mm512_set1_epi32(ld32(xq + 16 + 4 * k)));
            else B[t] = _mm512_dpbusd_epi32(B[t], hi, _mm512_set1_epi32(ld32(xq + 16 + 4 * k)));
        }
    }
    if (T == TPK_T_Q6K) {
        const __m512i sc0 = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(gb + KQ_OFF_SC6)));
        const __m512i sc1 = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(gb + KQ_OFF_SC6 + 16)));
        for (int t = 0; t < TT; t++)
            isum[t] = _mm512_add_epi32(_mm512_add_epi32(_mm512_mullo_epi32(sc0, A[t]), _mm512_mullo_epi32(sc1, B[t])),
                                       q6k_offset512(sc0, sc1, x + t * nb + b));
    } else {
        const __m512i sc = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(gb + KQ_OFF_SC)));
        for (int t = 0; t < TT; t++) isum[t] = _mm512_mullo_epi32(sc, A[t]);
    }
}

/* The 16-row span walk, once per level (the target attributes differ). */
#define KSPAN512_TILE(name, TGT, sums)                                                                   \
    INLINE TGT void name(const uint8_t *w, int64_t nb, const tpk_xq *x, void *y, int64_t at, int64_t ldy,  \
                         int nrows, const int TT, const int F64, const int T) {                          \
        acc512 out[4], s[4], m[4];                                                                       \
        for (int t = 0; t < TT; t++) acc512_zero(&out[t], F64);                                          \
        const int phase = w[0];                                                                          \
        const uint8_t *p = w + KQ_PREFIX;                                                                \
        for (int64_t b = 0; b < nb;) {                                                                   \
            const int n = kq_span_len(b, nb, phase);                                                     \
            const uint8_t *hdr = p;                                                                      \
            p += KQ_HDR(T);                                                                              \
            for (int t = 0; t < TT; t++) {                                                               \
                acc512_zero(&s[t], F64);                                                                 \
                acc512_zero(&m[t], F64);                                                                 \
            }                                                                                            \
            for (int j = 0; j < n; j++, b++, p += KQ_GB(T)) {                                            \
                tpk_prefetch_ahead(p, KQ_GB(T));                                                         \
                __m512i isum[4];                                                                         \
                sums(p, x, nb, b, isum, TT, T);                                                          \
                const __m512i mn = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + KQ_OFF_MN))); \
                for (int t = 0; t < TT; t++) {                                                           \
                    acc512_scaled(&s[t], isum[t], x[t * nb + b].d, F64);                                 \
                    if (KQ_IS_K(T)) acc512_mins(&m[t], mn, x + t * nb + b, F64);                         \
                }                                                                                        \
            }                                                                                            \
            for (int t = 0; t < TT; t++) acc512_span(&out[t], &s[t], &m[t], hdr, T, F64);                \
        }                                                                                                \
        for (int t = 0; t < TT; t++) acc512_store(y, at + t * ldy, &out[t], nrows, F64);                 \
    }
KSPAN512_TILE(kspan_tile_512, TGT_512, kspan512_sums)
KSPAN512_TILE(kspan_tile_vnni, TGT_VNNI, kspan_vnni_sums)

/* Group functions: full tiles of TT tokens, then what is left one token at a time. */
#define KQ_GROUP_FN(name, tile, TGT, TT, F64, T)                                                        \
    TGT static void name(const uint8_t *w, int64_t nb, const tpk_xq *x, int64_t ntok, void *y,          \
                         int64_t ldy, int nrows) {                                                      \
        int64_t t = 0;                                                                                  \
        for (; t + (TT) <= ntok; t += (TT)) tile(w, nb, x + t * nb, y, t * ldy, ldy, nrows, (TT), F64, T); \
        if ((TT) > 2 && ntok - t >= 2) { tile(w, nb, x + t * nb, y, t * ldy, ldy, nrows, 2, F64, T); t += 2; } \
        if (ntok - t >= 1) tile(w, nb, x + t * nb, y, t * ldy, ldy, nrows, 1, F64, T);                 \
    }

/* t: the type's name; tiles: kq (q41, q50) or kspan (the K-quants); tt2: AVX2's token tile */
#define KQ_TYPE_FNS(t, T, tiles, tt2)                                      \
    KQ_GROUP_FN(t##_group_vnni, tiles##_tile_vnni, TGT_VNNI, 4, 0, T)      \
    KQ_GROUP_FN(t##_group_vnni_f64, tiles##_tile_vnni, TGT_VNNI, 4, 1, T)  \
    KQ_GROUP_FN(t##_group_512, tiles##_tile_512, TGT_512, 4, 0, T)         \
    KQ_GROUP_FN(t##_group_512_f64, tiles##_tile_512, TGT_512, 4, 1, T)     \
    KQ_GROUP_FN(t##_group_avx2, tiles##_tile_avx2, TGT_AVX2, tt2, 0, T)      \
    KQ_GROUP_FN(t##_group_avx2_f64, tiles##_tile_avx2, TGT_AVX2, tt2, 1, T)  \
    static tpk_group_fn t##_pick(int level, int f64) {                     \
        switch (level) {                                                   \
        case TPK_AVX512_VNNI: return f64 ? t##_group_vnni_f64 : t##_group_vnni; \
        case TPK_AVX512: return f64 ? t##_group_512_f64 : t##_group_512;   \
        case TPK_AVX2: return f64 ? t##_group_avx2_f64 : t##_group_avx2;   \
        default: return NULL;                                              \
        }                                                                  \
    }

/* AVX2 takes 4 tokens at a time where that measured faster (benchmarks/kernels.py, prefill on
 * a Zen 3); q6k's tile has too many live values for 4 (it spills, 20% slower) and takes 2. */
KQ_TYPE_FNS(q41, TPK_T_Q41, kq, 4)
KQ_TYPE_FNS(q50, TPK_T_Q50, kq, 4)
KQ_TYPE_FNS(q4k, TPK_T_Q4K, kspan, 4)
KQ_TYPE_FNS(q5k, TPK_T_Q5K, kspan, 4)
KQ_TYPE_FNS(q6k, TPK_T_Q6K, kspan, 2)

tpk_group_fn tpk_x86_kq(int type, int level, int f64) {
    switch (type) {
    case TPK_T_Q41: return q41_pick(level, f64);
    case TPK_T_Q50: return q50_pick(level, f64);
    case TPK_T_Q4K: return q4k_pick(level, f64);
    case TPK_T_Q5K: return q5k_pick(level, f64);
    case TPK_T_Q6K: return q6k_pick(level, f64);
    default: return NULL;
    }
}

/* ================================================================ q80 quantizer
 * The scalar reference's steps on 16 / 8 lanes: amax (exact), d = amax / 127 and
 * id = 1 / d as scalars, x * id, then roundf (half away from zero) as floor(|v|) plus one
 * when the exact fraction |v| - floor(|v|) is at least 0.5, with v's sign. Conversion and
 * narrowing truncate like the scalar (int8_t) cast, also for the inf/NaN that a denormal
 * block's 1/d can make, so the bytes are identical. */

TGT_512 void tpk_x86_quantize_q80_512(const float *x, tpk_block_q80 *y, int64_t n) {
    const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
    const __m512 half = _mm512_set1_ps(0.5f), one = _mm512_set1_ps(1.0f);
    for (int64_t i = 0; i < n / TPK_QK; i++) {
        const __m512 x0 = _mm512_loadu_ps(x + i * TPK_QK), x1 = _mm512_loadu_ps(x + i * TPK_QK + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_and_ps(x0, absmask), _mm512_and_ps(x1, absmask)));
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = tpk_fp32_to_fp16(d);
        const __m512 vid = _mm512_set1_ps(id);
        for (int h = 0; h < 2; h++) {
            const __m512 v = _mm512_mul_ps(h ? x1 : x0, vid);
            const __m512 a = _mm512_and_ps(v, absmask);
            const __m512 fl = _mm512_roundscale_ps(a, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
            const __mmask16 up = _mm512_cmp_ps_mask(_mm512_sub_ps(a, fl), half, _CMP_GE_OQ);
            const __m512 r = _mm512_mask_add_ps(fl, up, fl, one);
            const __m512 sr = _mm512_or_ps(r, _mm512_andnot_ps(absmask, v));
            _mm_storeu_si128((__m128i *)(y[i].qs + 16 * h), _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(sr)));
        }
    }
}

TGT_AVX2 void tpk_x86_quantize_q80_avx2(const float *x, tpk_block_q80 *y, int64_t n) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f);
    const __m256i lowbyte = _mm256_set1_epi32(0xFF);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t i = 0; i < n / TPK_QK; i++) {
        __m256 v[4];
        __m256 m = _mm256_setzero_ps();
        for (int q = 0; q < 4; q++) {
            v[q] = _mm256_loadu_ps(x + i * TPK_QK + 8 * q);
            m = _mm256_max_ps(m, _mm256_and_ps(v[q], absmask));
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
        const float amax = _mm_cvtss_f32(m4);
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = tpk_fp32_to_fp16(d);
        const __m256 vid = _mm256_set1_ps(id);
        __m256i q32[4];
        for (int q = 0; q < 4; q++) {
            const __m256 s = _mm256_mul_ps(v[q], vid);
            const __m256 a = _mm256_and_ps(s, absmask);
            const __m256 fl = _mm256_round_ps(a, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
            const __m256 up = _mm256_cmp_ps(_mm256_sub_ps(a, fl), half, _CMP_GE_OQ);
            const __m256 r = _mm256_add_ps(fl, _mm256_and_ps(up, one));
            const __m256 sr = _mm256_or_ps(r, _mm256_andnot_ps(absmask, s));
            q32[q] = _mm256_and_si256(_mm256_cvttps_epi32(sr), lowbyte);
        }
        /* low bytes of 32 int32, in order: packs work per 128-bit lane, the permute restores it */
        const __m256i p16a = _mm256_packus_epi32(q32[0], q32[1]);
        const __m256i p16b = _mm256_packus_epi32(q32[2], q32[3]);
        const __m256i p8 = _mm256_packus_epi16(p16a, p16b);
        _mm256_storeu_si256((__m256i *)y[i].qs, _mm256_permutevar8x32_epi32(p8, order));
    }
}

/* ================================================================ dispatch */

tpk_group_fn tpk_x86_q40(int level, int f64) {
    switch (level) {
    case TPK_AVX512_VNNI: return f64 ? q40_group_vnni_f64 : q40_group_vnni;
    case TPK_AVX512: return f64 ? q40_group_512_f64 : q40_group_512;
    case TPK_AVX2: return f64 ? q40_group_avx2_f64 : q40_group_avx2;
    default: return NULL;
    }
}

tpk_group_fn tpk_x86_q80(int level, int f64) {
    switch (level) {
    case TPK_AVX512_VNNI: return f64 ? q80_group_vnni_f64 : q80_group_vnni;
    case TPK_AVX512: return f64 ? q80_group_512_f64 : q80_group_512;
    case TPK_AVX2: return f64 ? q80_group_avx2_f64 : q80_group_avx2;
    default: return NULL;
    }
}

TGT_512 static double stream_sum_512(const float *x, int64_t n) {
    __m512 a = _mm512_setzero_ps(), b = a, c = a, d = a;
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
        a = _mm512_add_ps(a, _mm512_loadu_ps(x + i));
        b = _mm512_add_ps(b, _mm512_loadu_ps(x + i + 16));
        c = _mm512_add_ps(c, _mm512_loadu_ps(x + i + 32));
        d = _mm512_add_ps(d, _mm512_loadu_ps(x + i + 48));
    }
    double s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a, b), _mm512_add_ps(c, d)));
    for (; i < n; i++) s += x[i];
    return s;
}

TGT_AVX2 double tpk_x86_stream_sum(const float *x, int64_t n) {
    if (tpk_get_level() >= TPK_AVX512) return stream_sum_512(x, n);
    __m256 a = _mm256_setzero_ps(), b = a, c = a, d = a;
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        a = _mm256_add_ps(a, _mm256_loadu_ps(x + i));
        b = _mm256_add_ps(b, _mm256_loadu_ps(x + i + 8));
        c = _mm256_add_ps(c, _mm256_loadu_ps(x + i + 16));
        d = _mm256_add_ps(d, _mm256_loadu_ps(x + i + 24));
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, _mm256_add_ps(_mm256_add_ps(a, b), _mm256_add_ps(c, d)));
    double s = 0.0;
    for (int j = 0; j < 8; j++) s += lanes[j];
    for (; i < n; i++) s += x[i];
    return s;
}

/* float16 -> float32, 8 at a time (vcvtph2ps is exact, like the scalar table) */
TGT_AVX2 void tpk_x86_widen_f16(const uint16_t *h, int64_t n, float *y) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
    for (; i < n; i++) y[i] = tpk_f16(h[i]);
}

#endif /* TPK_X86 */

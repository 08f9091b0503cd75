/* tpk: scalar reference kernels and run-time dispatch to SIMD variants. See tpk.h. */
#include "tpk.h"

#include <math.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#define TPK_X86 1
#include <immintrin.h>
#endif

/* ---------------------------------------------------------------- fp16 <-> fp32 */
/* Bit-exact IEEE half conversions (round to nearest even), portable C. */

static inline uint32_t bits_of(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float float_of(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

float tpk_fp16_to_fp32(uint16_t h) {
    const uint32_t w = (uint32_t)h << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const float normalized = float_of((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormalized = float_of((two_w >> 17) | (126u << 23)) - 0.5f;
    const uint32_t result = sign | (two_w < (1u << 27) ? bits_of(denormalized) : bits_of(normalized));
    return float_of(result);
}

uint16_t tpk_fp32_to_fp16(float f) {
    float base = (fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t w = bits_of(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = float_of((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = bits_of(base);
    const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
    const uint32_t mantissa_bits = bits & 0x00000FFFu;
    const uint32_t nonsign = exp_bits + mantissa_bits;
    return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

/* fp16 -> fp32 by table: the kernels read one scale per block. */
static float fp16_table[65536];
static int fp16_table_ready = 0;

static void init_fp16_table(void) {
    if (fp16_table_ready) return;
    for (uint32_t i = 0; i < 65536; i++) fp16_table[i] = tpk_fp16_to_fp32((uint16_t)i);
    fp16_table_ready = 1;
}

static inline float f16(uint16_t h) { return fp16_table[h]; }

/* ---------------------------------------------------------------- dispatch */

static int level_in_use = -1;

int tpk_detect_level(void) {
#if defined(TPK_X86)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return TPK_AVX2;
#endif
    return TPK_SCALAR;
}

int tpk_get_level(void) {
    if (level_in_use < 0) {
        init_fp16_table();
        level_in_use = tpk_detect_level();
    }
    return level_in_use;
}

int tpk_set_level(int level) {
    int best = tpk_detect_level();
    init_fp16_table();
    if (level == TPK_SCALAR || level == best) {
        level_in_use = level;
        return level;
    }
    return -1;
}

int tpk_has_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* ---------------------------------------------------------------- quantizers */

void tpk_quantize_q80(const float *x, tpk_block_q80 *y, int64_t n) {
    const int64_t nb = n / TPK_QK;
    for (int64_t i = 0; i < nb; i++) {
        const float *xb = x + i * TPK_QK;
        float amax = 0.0f;
        for (int j = 0; j < TPK_QK; j++) {
            const float v = fabsf(xb[j]);
            amax = amax > v ? amax : v;
        }
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = tpk_fp32_to_fp16(d);
        for (int j = 0; j < TPK_QK; j++) y[i].qs[j] = (int8_t)roundf(xb[j] * id);
    }
}

void tpk_quantize_q40(const float *x, tpk_block_q40 *y, int64_t n) {
    const int64_t nb = n / TPK_QK;
    for (int64_t i = 0; i < nb; i++) {
        const float *xb = x + i * TPK_QK;
        float amax = 0.0f, max = 0.0f;
        for (int j = 0; j < TPK_QK; j++) {
            if (amax < fabsf(xb[j])) {
                amax = fabsf(xb[j]);
                max = xb[j];
            }
        }
        const float d = max / -8.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = tpk_fp32_to_fp16(d);
        for (int j = 0; j < TPK_QK / 2; j++) {
            const float x0 = xb[j] * id;
            const float x1 = xb[TPK_QK / 2 + j] * id;
            int8_t q0 = (int8_t)(x0 + 8.5f), q1 = (int8_t)(x1 + 8.5f);
            uint8_t u0 = (uint8_t)(q0 < 15 ? q0 : 15), u1 = (uint8_t)(q1 < 15 ? q1 : 15);
            y[i].qs[j] = (uint8_t)(u0 | (u1 << 4));
        }
    }
}

void tpk_dequantize_q80(const tpk_block_q80 *x, float *y, int64_t n) {
    init_fp16_table();
    for (int64_t i = 0; i < n / TPK_QK; i++) {
        const float d = f16(x[i].d);
        for (int j = 0; j < TPK_QK; j++) y[i * TPK_QK + j] = x[i].qs[j] * d;
    }
}

void tpk_dequantize_q40(const tpk_block_q40 *x, float *y, int64_t n) {
    init_fp16_table();
    for (int64_t i = 0; i < n / TPK_QK; i++) {
        const float d = f16(x[i].d);
        for (int j = 0; j < TPK_QK / 2; j++) {
            y[i * TPK_QK + j] = ((x[i].qs[j] & 0x0F) - 8) * d;
            y[i * TPK_QK + TPK_QK / 2 + j] = ((x[i].qs[j] >> 4) - 8) * d;
        }
    }
}

/* ---------------------------------------------------------------- scalar dot products */

static float dot_q40_q80_scalar(const tpk_block_q40 *w, const tpk_block_q80 *x, int64_t nb) {
    float acc = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        int32_t isum = 0;
        for (int j = 0; j < TPK_QK / 2; j++) {
            isum += ((w[b].qs[j] & 0x0F) - 8) * x[b].qs[j];
            isum += ((w[b].qs[j] >> 4) - 8) * x[b].qs[j + TPK_QK / 2];
        }
        const float scale = f16(w[b].d) * f16(x[b].d);
        const float term = (float)isum * scale;
        acc = acc + term;
    }
    return acc;
}

static float dot_q80_q80_scalar(const tpk_block_q80 *w, const tpk_block_q80 *x, int64_t nb) {
    float acc = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        int32_t isum = 0;
        for (int j = 0; j < TPK_QK; j++) isum += w[b].qs[j] * x[b].qs[j];
        const float scale = f16(w[b].d) * f16(x[b].d);
        const float term = (float)isum * scale;
        acc = acc + term;
    }
    return acc;
}

/* ---------------------------------------------------------------- AVX2 dot products */
#if defined(TPK_X86)

__attribute__((target("avx2,fma")))
static inline int32_t hsum_i32_avx2(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(s);
}

/* signed int8 x signed int8 -> 8 x int32 partial sums */
__attribute__((target("avx2,fma")))
static inline __m256i mul_sum_i8_avx2(__m256i a, __m256i b) {
    const __m256i ax = _mm256_sign_epi8(a, a);
    const __m256i sy = _mm256_sign_epi8(b, a);
    const __m256i dot16 = _mm256_maddubs_epi16(ax, sy);
    return _mm256_madd_epi16(dot16, _mm256_set1_epi16(1));
}

__attribute__((target("avx2,fma")))
static float dot_q40_q80_avx2(const tpk_block_q40 *w, const tpk_block_q80 *x, int64_t nb) {
    const __m256i low_mask = _mm256_set1_epi8(0x0F);
    const __m256i eight = _mm256_set1_epi8(8);
    float acc = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        const __m128i packed = _mm_loadu_si128((const __m128i *)w[b].qs);
        __m256i q = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
        q = _mm256_sub_epi8(_mm256_and_si256(q, low_mask), eight);
        const __m256i y = _mm256_loadu_si256((const __m256i *)x[b].qs);
        const int32_t isum = hsum_i32_avx2(mul_sum_i8_avx2(q, y));
        const float scale = f16(w[b].d) * f16(x[b].d);
        const float term = (float)isum * scale;
        acc = acc + term;
    }
    return acc;
}

__attribute__((target("avx2,fma")))
static float dot_q80_q80_avx2(const tpk_block_q80 *w, const tpk_block_q80 *x, int64_t nb) {
    float acc = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        const __m256i q = _mm256_loadu_si256((const __m256i *)w[b].qs);
        const __m256i y = _mm256_loadu_si256((const __m256i *)x[b].qs);
        const int32_t isum = hsum_i32_avx2(mul_sum_i8_avx2(q, y));
        const float scale = f16(w[b].d) * f16(x[b].d);
        const float term = (float)isum * scale;
        acc = acc + term;
    }
    return acc;
}
#endif

/* ---------------------------------------------------------------- matmuls */

typedef float (*dot_q40_fn)(const tpk_block_q40 *, const tpk_block_q80 *, int64_t);
typedef float (*dot_q80_fn)(const tpk_block_q80 *, const tpk_block_q80 *, int64_t);

static dot_q40_fn pick_dot_q40(void) {
#if defined(TPK_X86)
    if (tpk_get_level() >= TPK_AVX2) return dot_q40_q80_avx2;
#endif
    tpk_get_level();
    return dot_q40_q80_scalar;
}

static dot_q80_fn pick_dot_q80(void) {
#if defined(TPK_X86)
    if (tpk_get_level() >= TPK_AVX2) return dot_q80_q80_avx2;
#endif
    tpk_get_level();
    return dot_q80_q80_scalar;
}

void tpk_matmul_q40_q80(const tpk_block_q40 *w, int64_t rows, int64_t nb,
                        const tpk_block_q80 *x, int64_t ntok, float *y, int64_t ldy, int nthreads) {
    const dot_q40_fn dot = pick_dot_q40();
    (void)nthreads;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nthreads > 0 ? nthreads : 1)
#endif
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t t = 0; t < ntok; t++) y[t * ldy + r] = dot(w + r * nb, x + t * nb, nb);
    }
}

void tpk_matmul_q80_q80(const tpk_block_q80 *w, int64_t rows, int64_t nb,
                        const tpk_block_q80 *x, int64_t ntok, float *y, int64_t ldy, int nthreads) {
    const dot_q80_fn dot = pick_dot_q80();
    (void)nthreads;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nthreads > 0 ? nthreads : 1)
#endif
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t t = 0; t < ntok; t++) y[t * ldy + r] = dot(w + r * nb, x + t * nb, nb);
    }
}

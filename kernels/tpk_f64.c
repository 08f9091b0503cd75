/* Matmuls whose rows accumulate in float64: the partial sums that ranks all-reduce.
 *
 * Every block term (int32 isum times two fp16 scales) is exact in float64, so a row's
 * sum is within float64 rounding of the exact value however the blocks are split over
 * ranks. Summed across ranks in float64 and rounded to float32 once, the result is the
 * same at every rank count: the same greedy text on 1 rank or 4.
 */
#include "tpk.h"

#include <math.h>

#if defined(__x86_64__) || defined(_M_X64)
#define TPK_X86 1
#include <immintrin.h>
#endif

static inline double scale_of(uint16_t w, uint16_t x) {
    return (double)tpk_fp16_to_fp32(w) * (double)tpk_fp16_to_fp32(x);
}

static double dot_q40_q80_f64_scalar(const tpk_block_q40 *w, const tpk_block_q80 *x, int64_t nb) {
    double acc = 0.0;
    for (int64_t b = 0; b < nb; b++) {
        int32_t isum = 0;
        for (int j = 0; j < TPK_QK / 2; j++) {
            isum += ((w[b].qs[j] & 0x0F) - 8) * x[b].qs[j];
            isum += ((w[b].qs[j] >> 4) - 8) * x[b].qs[j + TPK_QK / 2];
        }
        acc += (double)isum * scale_of(w[b].d, x[b].d);
    }
    return acc;
}

static double dot_q80_q80_f64_scalar(const tpk_block_q80 *w, const tpk_block_q80 *x, int64_t nb) {
    double acc = 0.0;
    for (int64_t b = 0; b < nb; b++) {
        int32_t isum = 0;
        for (int j = 0; j < TPK_QK; j++) isum += w[b].qs[j] * x[b].qs[j];
        acc += (double)isum * scale_of(w[b].d, x[b].d);
    }
    return acc;
}

#if defined(TPK_X86)
__attribute__((target("avx2,fma")))
static inline int32_t hsum_i32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(s);
}

__attribute__((target("avx2,fma")))
static inline int32_t dot_i8(__m256i a, __m256i b) {
    const __m256i dot16 = _mm256_maddubs_epi16(_mm256_sign_epi8(a, a), _mm256_sign_epi8(b, a));
    return hsum_i32(_mm256_madd_epi16(dot16, _mm256_set1_epi16(1)));
}

__attribute__((target("avx2,fma")))
static double dot_q40_q80_f64_avx2(const tpk_block_q40 *w, const tpk_block_q80 *x, int64_t nb) {
    const __m256i low = _mm256_set1_epi8(0x0F), eight = _mm256_set1_epi8(8);
    double acc = 0.0;
    for (int64_t b = 0; b < nb; b++) {
        const __m128i packed = _mm_loadu_si128((const __m128i *)w[b].qs);
        __m256i q = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
        q = _mm256_sub_epi8(_mm256_and_si256(q, low), eight);
        acc += (double)dot_i8(q, _mm256_loadu_si256((const __m256i *)x[b].qs)) * scale_of(w[b].d, x[b].d);
    }
    return acc;
}

__attribute__((target("avx2,fma")))
static double dot_q80_q80_f64_avx2(const tpk_block_q80 *w, const tpk_block_q80 *x, int64_t nb) {
    double acc = 0.0;
    for (int64_t b = 0; b < nb; b++) {
        const __m256i q = _mm256_loadu_si256((const __m256i *)w[b].qs);
        acc += (double)dot_i8(q, _mm256_loadu_si256((const __m256i *)x[b].qs)) * scale_of(w[b].d, x[b].d);
    }
    return acc;
}
#endif

void tpk_matmul_q40_q80_f64(const tpk_block_q40 *w, int64_t rows, int64_t nb,
                            const tpk_block_q80 *x, int64_t ntok, double *y, int64_t ldy, int nthreads) {
    double (*dot)(const tpk_block_q40 *, const tpk_block_q80 *, int64_t) = dot_q40_q80_f64_scalar;
#if defined(TPK_X86)
    if (tpk_get_level() >= TPK_AVX2) dot = dot_q40_q80_f64_avx2;
#endif
    (void)nthreads;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nthreads > 0 ? nthreads : 1)
#endif
    for (int64_t r = 0; r < rows; r++)
        for (int64_t t = 0; t < ntok; t++) y[t * ldy + r] = dot(w + r * nb, x + t * nb, nb);
}

void tpk_matmul_q80_q80_f64(const tpk_block_q80 *w, int64_t rows, int64_t nb,
                            const tpk_block_q80 *x, int64_t ntok, double *y, int64_t ldy, int nthreads) {
    double (*dot)(const tpk_block_q80 *, const tpk_block_q80 *, int64_t) = dot_q80_q80_f64_scalar;
#if defined(TPK_X86)
    if (tpk_get_level() >= TPK_AVX2) dot = dot_q80_q80_f64_avx2;
#endif
    (void)nthreads;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nthreads > 0 ? nthreads : 1)
#endif
    for (int64_t r = 0; r < rows; r++)
        for (int64_t t = 0; t < ntok; t++) y[t * ldy + r] = dot(w + r * nb, x + t * nb, nb);
}

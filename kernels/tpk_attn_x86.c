/* tpk attention, AVX2: a chunk's softmax step (tpk_ops.c), written with intrinsics.
 *
 * The generic loop, GCC vector extensions built for AVX2, clamps with compare-and-blend
 * pairs and floors by truncating, converting back and correcting; here those are vminps,
 * vmaxps and vroundps. Each gives the same value, so the bits are the same as tpk_ops.c's
 * (tests/test_ops.py runs both); a chunk's softmax step took about 0.8x the time (Zen 4).
 */
#include "tpk_impl.h"

#if defined(TPK_X86)
#include <immintrin.h>

#define TGT_AVX2 __attribute__((target("avx2,fma,f16c")))
#define INLINE static inline __attribute__((always_inline))

/* tpk_ops.c's exp8: Cephes expf, inputs clamped to [-87.3, 88.37] */
TGT_AVX2 INLINE __m256 exp8(__m256 x) {
    x = _mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f));   /* x < c ? x : c, as vmin8 */
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.3365478515625f));  /* x > c ? x : c, as vmax8 */
    const __m256 fx = _mm256_add_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _mm256_set1_ps(0.5f));
    const __m256 tf = _mm256_floor_ps(fx);   /* fx is in (-126, 128): the truncate-and-correct floor's value */
    const __m256i ti = _mm256_cvttps_epi32(tf);
    x = _mm256_sub_ps(x, _mm256_mul_ps(tf, _mm256_set1_ps(0.693359375f)));
    x = _mm256_sub_ps(x, _mm256_mul_ps(tf, _mm256_set1_ps(-2.12194440e-4f)));
    const __m256 z = _mm256_mul_ps(x, x);
    __m256 y = _mm256_set1_ps(1.9875691500E-4f);
    y = _mm256_add_ps(_mm256_mul_ps(y, x), _mm256_set1_ps(1.3981999507E-3f));
    y = _mm256_add_ps(_mm256_mul_ps(y, x), _mm256_set1_ps(8.3334519073E-3f));
    y = _mm256_add_ps(_mm256_mul_ps(y, x), _mm256_set1_ps(4.1665795894E-2f));
    y = _mm256_add_ps(_mm256_mul_ps(y, x), _mm256_set1_ps(1.6666665459E-1f));
    y = _mm256_add_ps(_mm256_mul_ps(y, x), _mm256_set1_ps(5.0000001201E-1f));
    y = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(y, z), x), _mm256_set1_ps(1.0f));
    const __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(ti, _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(pow2n));
}

/* the largest of s[0..n): 8 lanes by key, folded lane 0 first, then the n % 8 tail (as tpk_ops.c) */
TGT_AVX2 INLINE float largest(const float *s, int64_t n) {
    __m256 mx8 = _mm256_set1_ps(-__builtin_inff());
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) mx8 = _mm256_max_ps(mx8, _mm256_loadu_ps(s + j));
    float lanes[8];
    _mm256_storeu_ps(lanes, mx8);
    float mx = lanes[0];
    for (int i = 1; i < 8; i++) mx = lanes[i] > mx ? lanes[i] : mx;
    for (; j < n; j++) mx = s[j] > mx ? s[j] : mx;
    return mx;
}

/* exp(s[j] - mx) in place, and their sum: 8 lanes by key (the tail in lanes 0..), folded as hsum8 */
TGT_AVX2 INLINE float exp_and_sum(float *s, int64_t n, float mx) {
    const __m256 mv = _mm256_set1_ps(mx);
    __m256 sum8 = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv));
        _mm256_storeu_ps(s + j, e);
        sum8 = _mm256_add_ps(sum8, e);
    }
    if (j < n) {
        float part[8] = {0};
        for (int64_t k = 0; k < n - j; k++) part[k] = s[j + k];
        _mm256_storeu_ps(part, exp8(_mm256_sub_ps(_mm256_loadu_ps(part), mv)));
        for (int64_t k = n - j; k < 8; k++) part[k] = 0.0f;
        for (int64_t k = 0; k < n - j; k++) s[j + k] = part[k];
        sum8 = _mm256_add_ps(sum8, _mm256_loadu_ps(part));
    }
    float v[8];
    _mm256_storeu_ps(v, sum8);
    return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]));
}

TGT_AVX2 void tpk_x86_chunk_softmax(float *scores, int64_t nh, int64_t stride, int64_t n, float *m, float *l) {
    for (int64_t h = 0; h < nh; h++) {
        float *s = scores + h * stride;
        m[h] = largest(s, n);
        l[h] = exp_and_sum(s, n, m[h]);
    }
}

#endif /* TPK_X86 */

/* tpk ops: the float32 elementwise and attention steps of a Llama layer, fused so that a
 * decode step makes a handful of C calls per layer instead of dozens of numpy calls.
 *
 * Written once in portable C with GCC vector extensions (8 floats: two SSE or NEON
 * registers, one AVX register). Sums over a vector use a fixed pattern (8 partial sums
 * in lane order, then a fixed tree), so the result does not depend on the machine or on
 * the number of threads. These are not part of the bit-exact matmul contract; they are
 * checked against numpy/float64 to a tolerance (tests/test_ops.py). One step, attention's
 * softmax, also has AVX2 intrinsics (tpk_attn_x86.c) that give this file's bits.
 */
#include "tpk_impl.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

/* 32-byte vectors by value, only between always-inline helpers of this file */
#pragma GCC diagnostic ignored "-Wpsabi"

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

#define INLINE static inline __attribute__((always_inline))

/* x86-64 Linux: also an AVX2 build of the hot loops, picked by the loader (ifunc). The
 * arithmetic is written lane by lane, so both builds give the same bits. */
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define TPK_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define TPK_CLONES
#endif

INLINE v8f load8(const float *p) {
    v8f v;
    memcpy(&v, p, sizeof v);
    return v;
}

INLINE void store8(float *p, v8f v) { memcpy(p, &v, sizeof v); }

INLINE v8f splat8(float x) { return (v8f){x, x, x, x, x, x, x, x}; }

INLINE float hsum8(v8f v) {
    return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]));
}

INLINE float hmax8(v8f v) {
    float m = v[0];
    for (int i = 1; i < 8; i++) m = v[i] > m ? v[i] : m;
    return m;
}

/* dot product with 8 partial sums (the tail, n % 8, in lanes 0..): same bits everywhere */
INLINE float dot8(const float *a, const float *b, int64_t n) {
    v8f acc = splat8(0.0f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) acc = acc + load8(a + i) * load8(b + i);
    for (int l = 0; i < n; i++, l++) acc[l] = acc[l] + a[i] * b[i];
    return hsum8(acc);
}

INLINE v8f vmin8(v8f a, v8f b) {
    const v8i m = (v8i)(a < b);
    return (v8f)((m & (v8i)a) | (~m & (v8i)b));
}

INLINE v8f vmax8(v8f a, v8f b) {
    const v8i m = (v8i)(a > b);
    return (v8f)((m & (v8i)a) | (~m & (v8i)b));
}

/* exp of 8 floats (Cephes expf: 2^n * polynomial, about 1 ulp; inputs clamped to
 * [-87.3, 88.37], so large negative arguments give ~1e-38 rather than 0). */
INLINE v8f exp8(v8f x) {
    x = vmin8(x, splat8(88.3762626647949f));
    x = vmax8(x, splat8(-87.3365478515625f));
    v8f fx = x * splat8(1.44269504088896341f) + splat8(0.5f);
    v8i ti = __builtin_convertvector(fx, v8i);             /* truncation */
    v8f tf = __builtin_convertvector(ti, v8f);
    v8i gt = (v8i)(tf > fx);                                /* floor for negatives */
    ti = ti + gt;                                           /* gt is -1 where true */
    tf = __builtin_convertvector(ti, v8f);
    x = x - tf * splat8(0.693359375f);
    x = x - tf * splat8(-2.12194440e-4f);
    const v8f z = x * x;
    v8f y = splat8(1.9875691500E-4f);
    y = y * x + splat8(1.3981999507E-3f);
    y = y * x + splat8(8.3334519073E-3f);
    y = y * x + splat8(4.1665795894E-2f);
    y = y * x + splat8(1.6666665459E-1f);
    y = y * x + splat8(5.0000001201E-1f);
    y = y * z + x + splat8(1.0f);
    const v8i pow2n = (ti + 127) << 23;
    return y * (v8f)pow2n;
}

INLINE float expf8(float x) {   /* one lane of exp8, for tails (inline: each clone has its own) */
    v8f v = splat8(x);
    return exp8(v)[0];
}

static int threads_for(int nthreads, double work, double min_work) {
    if (nthreads < 1) return 1;
    return work >= min_work ? nthreads : 1;
}

/* ---------------------------------------------------------------- rmsnorm */

TPK_CLONES void tpk_rmsnorm(const float *x, const float *w, float *y, int64_t T, int64_t n, float eps, int nthreads) {
    const int nt = threads_for(nthreads, (double)T * n, 65536.0);
    (void)nt;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
#endif
    for (int64_t t = 0; t < T; t++) {
        const float *xr = x + t * n;
        float *yr = y + t * n;
        double ss = 0.0;
        v8f acc = splat8(0.0f);
        int64_t i = 0;
        for (; i + 8 <= n; i += 8) {   /* 8 partial float sums per 8 x 64 elements, then double */
            const v8f v = load8(xr + i);
            acc = acc + v * v;
            if (((i >> 3) & 63) == 63) {
                ss += hsum8(acc);
                acc = splat8(0.0f);
            }
        }
        ss += hsum8(acc);
        for (; i < n; i++) ss += (double)xr[i] * xr[i];
        const float scale = (float)(1.0 / sqrt(ss / (double)n + (double)eps));
        i = 0;
        const v8f s = splat8(scale);
        for (; i + 8 <= n; i += 8) store8(yr + i, load8(xr + i) * s * load8(w + i));
        for (; i < n; i++) yr[i] = xr[i] * scale * w[i];
    }
}

/* ---------------------------------------------------------------- rope */

void tpk_rope(float *x, int64_t T, int64_t heads, int64_t hd, const float *cos_t, const float *sin_t) {
    const int64_t half = hd / 2;
    for (int64_t t = 0; t < T; t++) {
        const float *c = cos_t + t * half, *s = sin_t + t * half;
        for (int64_t h = 0; h < heads; h++) {
            float *v = x + (t * heads + h) * hd;
            for (int64_t i = 0; i < half; i++) {
                const float x0 = v[2 * i], x1 = v[2 * i + 1];
                v[2 * i] = x0 * c[i] - x1 * s[i];
                v[2 * i + 1] = x0 * s[i] + x1 * c[i];
            }
        }
    }
}

/* ---------------------------------------------------------------- silu(g) * u */

TPK_CLONES void tpk_silu_mul(const float *g, const float *u, float *out, int64_t n, int nthreads) {
    const int nt = threads_for(nthreads, (double)n, 131072.0);
    const int64_t chunks = (n + 1023) / 1024;
    (void)nt;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
#endif
    for (int64_t ch = 0; ch < chunks; ch++) {
        const int64_t end = (ch + 1) * 1024 < n ? (ch + 1) * 1024 : n;
        int64_t i = ch * 1024;
        for (; i + 8 <= end; i += 8) {
            const v8f gv = load8(g + i);
            store8(out + i, gv / (splat8(1.0f) + exp8(-gv)) * load8(u + i));
        }
        for (; i < end; i++) out[i] = g[i] / (1.0f + expf8(-g[i])) * u[i];
    }
}

/* ---------------------------------------------------------------- attention over the KV cache */

/* Flash-decoding layout: the keys of a position are cut at fixed chunk boundaries (absolute
 * key index multiples of KEY_CHUNK, whatever T, the thread count or the window). Each chunk
 * gives a partial result per head (its score maximum m, sum of exp l and unnormalised
 * weighted values), computed by whichever thread; the partials are then folded in chunk
 * order. So one position's result does not depend on T, on the threads or on the batch, and
 * at decode the threads share the keys of a long context even when there are few kv heads.
 * Inside a chunk the keys go by tiles of KEY_TILE (a tile of K or V stays in L1 while every
 * head of the group uses it). Per head the arithmetic is the same whatever the grouping. */
enum { KEY_CHUNK = TPK_KV_BLOCK, KEY_TILE = 32, MAX_BLOCK_ROWS = 16, PARTIALS_FLOATS = 1 << 20 };

#if defined(__clang__)
#define SHUF8(a, b, i0, i1, i2, i3, i4, i5, i6, i7) __builtin_shufflevector(a, b, i0, i1, i2, i3, i4, i5, i6, i7)
#else
#define SHUF8(a, b, i0, i1, i2, i3, i4, i5, i6, i7) __builtin_shuffle(a, b, (v8i){i0, i1, i2, i3, i4, i5, i6, i7})
#endif

/* lane k of the result: the sum of a_k's 8 lanes, as ((0+1)+(2+3))+((4+5)+(6+7)) */
INLINE v8f sum_each8(v8f a0, v8f a1, v8f a2, v8f a3, v8f a4, v8f a5, v8f a6, v8f a7) {
    const v8f t01 = SHUF8(a0, a1, 0, 8, 2, 10, 4, 12, 6, 14) + SHUF8(a0, a1, 1, 9, 3, 11, 5, 13, 7, 15);
    const v8f t23 = SHUF8(a2, a3, 0, 8, 2, 10, 4, 12, 6, 14) + SHUF8(a2, a3, 1, 9, 3, 11, 5, 13, 7, 15);
    const v8f t45 = SHUF8(a4, a5, 0, 8, 2, 10, 4, 12, 6, 14) + SHUF8(a4, a5, 1, 9, 3, 11, 5, 13, 7, 15);
    const v8f t67 = SHUF8(a6, a7, 0, 8, 2, 10, 4, 12, 6, 14) + SHUF8(a6, a7, 1, 9, 3, 11, 5, 13, 7, 15);
    const v8f u03 = SHUF8(t01, t23, 0, 1, 8, 9, 4, 5, 12, 13) + SHUF8(t01, t23, 2, 3, 10, 11, 6, 7, 14, 15);
    const v8f u47 = SHUF8(t45, t67, 0, 1, 8, 9, 4, 5, 12, 13) + SHUF8(t45, t67, 2, 3, 10, 11, 6, 7, 14, 15);
    return SHUF8(u03, u47, 0, 1, 2, 3, 8, 9, 10, 11) + SHUF8(u03, u47, 4, 5, 6, 7, 12, 13, 14, 15);
}

/* the first n < 8 floats at p, the other lanes 0 */
INLINE v8f load_part8(const float *p, int64_t n) {
    v8f v = splat8(0.0f);
    memcpy(&v, p, sizeof(float) * (size_t)n);
    return v;
}

/* s[k] = (q . K[k]) * scale for nk <= 8 keys; the dot products run in 8 lanes (dims d % 8,
 * the hd % 8 tail in lanes 0..) and are summed by sum_each8, so a key's score does not
 * depend on its place in the block. Missing keys reread the last row and are not stored. */
INLINE void score_block(const float *q, const float *K, int64_t nk, int64_t hd, float scale, float *s) {
    const float *r[8];
    for (int64_t k = 0; k < 8; k++) r[k] = K + (k < nk ? k : nk - 1) * hd;
    v8f a0 = splat8(0.0f), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    int64_t d = 0;
    for (; d + 8 <= hd; d += 8) {
        const v8f x = load8(q + d);
        a0 = a0 + x * load8(r[0] + d);
        a1 = a1 + x * load8(r[1] + d);
        a2 = a2 + x * load8(r[2] + d);
        a3 = a3 + x * load8(r[3] + d);
        a4 = a4 + x * load8(r[4] + d);
        a5 = a5 + x * load8(r[5] + d);
        a6 = a6 + x * load8(r[6] + d);
        a7 = a7 + x * load8(r[7] + d);
    }
    if (d < hd) {   /* the hd % 8 tail, zero-padded (adds +0 in the other lanes) */
        const v8f x = load_part8(q + d, hd - d);
        a0 = a0 + x * load_part8(r[0] + d, hd - d);
        a1 = a1 + x * load_part8(r[1] + d, hd - d);
        a2 = a2 + x * load_part8(r[2] + d, hd - d);
        a3 = a3 + x * load_part8(r[3] + d, hd - d);
        a4 = a4 + x * load_part8(r[4] + d, hd - d);
        a5 = a5 + x * load_part8(r[5] + d, hd - d);
        a6 = a6 + x * load_part8(r[6] + d, hd - d);
        a7 = a7 + x * load_part8(r[7] + d, hd - d);
    }
    const v8f sc = scale * sum_each8(a0, a1, a2, a3, a4, a5, a6, a7);
    if (nk == 8) store8(s, sc);
    else
        for (int64_t k = 0; k < nk; k++) s[k] = sc[k];
}

/* Cache lines to prefetch a few at a time, spread evenly over a loop's steps. Software
 * prefetches issued faster than memory answers them are dropped (measured on Zen 3: of a
 * burst of 128 KiB, only the first few KiB arrive), so a chunk's next data is asked for at
 * about the rate the chunk computes. They go to L2, not L1: a chunk's next keys or values
 * (64 KiB at head size 64) would not fit in L1 anyway, and an L1 prefetch holds one of its
 * few miss buffers until the line arrives (on a Zen 4, attention at 4,000 positions from
 * memory took 1.10-1.13x the time with L1 prefetches; same bits). */
typedef struct {
    const char *p;
    int64_t done, lines;
    int64_t rate;     /* lines per step, in 1/256 */
    int64_t credit;   /* in 1/256 lines */
} prefetch_run;

/* the lines of `bytes` at p (none when p is NULL), spread evenly over `steps` calls of prefetch_step */
INLINE prefetch_run prefetch_of(const void *p, int64_t bytes, int64_t steps) {
    const int64_t lines = p ? (bytes + 63) / 64 : 0;
    return (prefetch_run){(const char *)p, 0, lines, (lines * 256 + steps - 1) / (steps > 0 ? steps : 1), 0};
}

INLINE void prefetch_steps(prefetch_run *r, int64_t steps) {
    if (r->done >= r->lines) return;
    for (r->credit += steps * r->rate; r->credit >= 256 && r->done < r->lines; r->credit -= 256, r->done++)
        __builtin_prefetch(r->p + r->done * 64, 0, 2);
}

INLINE void prefetch_step(prefetch_run *r) { prefetch_steps(r, 1); }

/* acc[d] += sum over k < nk of p[k] * V[k][d] for d < hd, key by key in order (64 dims in
 * registers); the rows of V are `stride` floats apart */
INLINE void add_weighted_values(const float *p, const float *V, int64_t nk, int64_t hd, int64_t stride, float *acc,
                                prefetch_run *pf) {
    int64_t d = 0;
    for (; d + 64 <= hd; d += 64) {
        v8f c0 = load8(acc + d), c1 = load8(acc + d + 8), c2 = load8(acc + d + 16), c3 = load8(acc + d + 24);
        v8f c4 = load8(acc + d + 32), c5 = load8(acc + d + 40), c6 = load8(acc + d + 48), c7 = load8(acc + d + 56);
        prefetch_steps(pf, nk);   /* the tile's prefetches at once: key by key, their bookkeeping cost ~10% */
        for (int64_t k = 0; k < nk; k++) {
            const float w = p[k];   /* scalar * vector: a broadcast (splat8 here became 8 inserts) */
            const float *v = V + k * stride + d;
            c0 = c0 + w * load8(v);
            c1 = c1 + w * load8(v + 8);
            c2 = c2 + w * load8(v + 16);
            c3 = c3 + w * load8(v + 24);
            c4 = c4 + w * load8(v + 32);
            c5 = c5 + w * load8(v + 40);
            c6 = c6 + w * load8(v + 48);
            c7 = c7 + w * load8(v + 56);
        }
        store8(acc + d, c0), store8(acc + d + 8, c1), store8(acc + d + 16, c2), store8(acc + d + 24, c3);
        store8(acc + d + 32, c4), store8(acc + d + 40, c5), store8(acc + d + 48, c6), store8(acc + d + 56, c7);
    }
    for (; d + 8 <= hd; d += 8) {
        v8f c = load8(acc + d);
        for (int64_t k = 0; k < nk; k++) c = c + p[k] * load8(V + k * stride + d);
        store8(acc + d, c);
    }
    for (; d < hd; d++) {
        float c = acc[d];
        for (int64_t k = 0; k < nk; k++) c = c + p[k] * V[k * stride + d];
        acc[d] = c;
    }
}

/* exp(s[j] - mx) in place for the keys j < n of one head, and their sum as 8 lanes by key
 * (a last partial block in lanes 0..), folded by hsum8 */
INLINE float exp_and_sum(float *s, int64_t n, float mx) {
    v8f sum8 = splat8(0.0f);
    const v8f mv = splat8(mx);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        const v8f e = exp8(load8(s + j) - mv);
        store8(s + j, e);
        sum8 = sum8 + e;
    }
    if (j < n) {   /* the same exp8 lane by lane; the unused lanes add +0 (the sums are never -0) */
        const int64_t nt = n - j;
        v8f e = exp8(load_part8(s + j, nt) - mv);
        for (int64_t k = nt; k < 8; k++) e[k] = 0.0f;
        memcpy(s + j, &e, sizeof(float) * (size_t)nt);
        sum8 = sum8 + e;
    }
    return hsum8(sum8);
}

/* One chunk's partial for the heads h0..h0+nh-1 sharing one kv head, at one position: keys
 * K[0..n), n <= KEY_CHUNK. Per head: m = the largest score, l = sum of exp(score - m) (8
 * lanes by key, then hsum8), acc = sum of exp(score - m) * value. scores: nh * KEY_CHUNK.
 * K16, V16 (when not NULL): the keys and values are float16 instead, widened a tile at a
 * time into `tile` (KEY_TILE * hd floats, in L1 while every head reads it); K, V unused.
 * Memory is read while this computes (from memory the chunk otherwise waits about as long
 * as it computes): the scores prefetch this chunk's values (when prefetch_v), the weighted
 * values the next chunk's keys next_k (next_bytes of them; NULL: none). avx2: the softmax
 * step is tpk_attn_x86.c's (the same bits, fewer instructions). */
INLINE void attend_chunk_hd(const float *q, int64_t nh, const float *K, const float *V, const uint16_t *K16,
                            const uint16_t *V16, float *tile, int64_t n, int64_t hd, float scale, float *scores,
                            float *m, float *l, float *acc, int prefetch_v, const void *next_k, int64_t next_bytes,
                            int avx2) {
    const void *own_v = !prefetch_v ? NULL : K16 ? (const void *)V16 : (const void *)V;
    prefetch_run pf = prefetch_of(own_v, n * hd * (K16 ? 2 : 4), nh * ((n + 7) / 8));
    for (int64_t j0 = 0; j0 < n; j0 += KEY_TILE) {          /* scores, a tile of keys for every head */
        const int64_t j1 = j0 + KEY_TILE < n ? j0 + KEY_TILE : n;
        const float *Kt = K16 ? tile : K + j0 * hd;          /* the tile's keys */
        if (K16) tpk_widen_f16(K16 + j0 * hd, (j1 - j0) * hd, tile);
        for (int64_t h = 0; h < nh; h++)
            for (int64_t j = j0; j < j1; j += 8) {
                prefetch_step(&pf);
                if (j1 - j >= 8)   /* a full block with nk a constant: as a variable, twice the time */
                    score_block(q + h * hd, Kt + (j - j0) * hd, 8, hd, scale, scores + h * KEY_CHUNK + j);
                else
                    score_block(q + h * hd, Kt + (j - j0) * hd, j1 - j, hd, scale, scores + h * KEY_CHUNK + j);
            }
    }
#if defined(TPK_X86)
    if (avx2) tpk_x86_chunk_softmax(scores, nh, KEY_CHUNK, n, m, l);   /* the loop below, the same bits */
    else
#endif
    for (int64_t h = 0; h < nh; h++) {                      /* exp(score - max), their sum */
        float *s = scores + h * KEY_CHUNK;
        v8f mx8 = splat8(-INFINITY);
        int64_t j = 0;
        for (; j + 8 <= n; j += 8) mx8 = vmax8(mx8, load8(s + j));
        float mx = hmax8(mx8);
        for (; j < n; j++) mx = s[j] > mx ? s[j] : mx;
        m[h] = mx;
        l[h] = exp_and_sum(s, n, mx);
    }
    memset(acc, 0, sizeof(float) * (size_t)(nh * hd));
    pf = prefetch_of(next_k, next_bytes, nh * n * (hd / 64));   /* a step a key per 64 dims */
    for (int64_t j0 = 0; j0 < n; j0 += KEY_TILE) {          /* weighted values, a tile for every head */
        const int64_t nk = j0 + KEY_TILE < n ? KEY_TILE : n - j0;
        const float *Vt = V16 ? tile : V + j0 * hd;          /* the tile's values */
        if (V16) tpk_widen_f16(V16 + j0 * hd, nk * hd, tile);
        for (int64_t h = 0; h < nh; h++)
            add_weighted_values(scores + h * KEY_CHUNK + j0, Vt, nk, hd, hd, acc + h * hd, &pf);
    }
}

/* attend_chunk_hd, built for the common head sizes as constants (unrolled loops, ~6% faster) */
TPK_CLONES static void attend_chunk(const float *q, int64_t nh, const float *K, const float *V, const uint16_t *K16,
                                    const uint16_t *V16, float *tile, int64_t n, int64_t hd, float scale,
                                    float *scores, float *m, float *l, float *acc, int prefetch_v,
                                    const void *next_k, int64_t next_bytes, int avx2) {
    if (hd == 64)
        attend_chunk_hd(q, nh, K, V, K16, V16, tile, n, 64, scale, scores, m, l, acc, prefetch_v, next_k, next_bytes,
                        avx2);
    else if (hd == 128)
        attend_chunk_hd(q, nh, K, V, K16, V16, tile, n, 128, scale, scores, m, l, acc, prefetch_v, next_k, next_bytes,
                        avx2);
    else
        attend_chunk_hd(q, nh, K, V, K16, V16, tile, n, hd, scale, scores, m, l, acc, prefetch_v, next_k, next_bytes,
                        avx2);
}

/* out = the chunks' partials c = 0..nc-1 of one head (`stride` slots apart) folded in order:
 * sum_c exp(m_c - M) acc_c / sum_c exp(m_c - M) l_c, M the largest m_c */
TPK_CLONES static void fold_chunks(const float *m, const float *l, const float *acc, int64_t nc, int64_t stride,
                                   int64_t hd, float *out) {
    float mx = -INFINITY;
    for (int64_t c = 0; c < nc; c++) mx = m[c * stride] > mx ? m[c * stride] : mx;
    memset(out, 0, sizeof(float) * (size_t)hd);
    float total = 0.0f;
    const int64_t hd8 = hd / 8 * 8;
    for (int64_t c = 0; c < nc; c++) {
        const float w = expf8(m[c * stride] - mx);
        const float *a = acc + c * stride * hd;
        total = total + w * l[c * stride];
        for (int64_t d = 0; d < hd8; d += 8) store8(out + d, load8(out + d) + w * load8(a + d));
        for (int64_t d = hd8; d < hd; d++) out[d] = out[d] + w * a[d];
    }
    const float inv = 1.0f / total;
    for (int64_t d = 0; d < hd; d++) out[d] = out[d] * inv;
}

/* the first key position p sees: every earlier one, or the last `window` with a sliding window */
static int64_t first_key(int64_t p, int64_t window) { return window > 0 && p + 1 > window ? p + 1 - window : 0; }

/* the most chunks that a block of `rows` positions (of start..start+T-1) spans */
static int64_t block_chunks(int64_t T, int64_t rows, int64_t start, int64_t window) {
    int64_t chunks = 0;
    for (int64_t t0 = 0; t0 < T; t0 += rows) {
        const int64_t t1 = t0 + rows < T ? t0 + rows : T;
        const int64_t nc = (start + t1 - 1) / KEY_CHUNK - first_key(start + t0, window) / KEY_CHUNK + 1;
        chunks = nc > chunks ? nc : chunks;
    }
    return chunks;
}

/* the runs of consecutive query heads reading the same kv head: run r is heads
 * run_start[r]..run_start[r+1]-1 (run_start has runs + 1 entries) */
static int64_t head_runs(const int32_t *kv_of_head, int64_t n_heads, int64_t *run_start) {
    int64_t runs = 0;
    for (int64_t h = 0; h < n_heads; h++)
        if (h == 0 || kv_of_head[h] != kv_of_head[h - 1]) run_start[runs++] = h;
    run_start[runs] = n_heads;
    return runs;
}

/* where a cache keeps the rows of its kv heads: see TPK_KV_BLOCK (strides in values) */
typedef struct {
    char *base;
    int64_t esize, head_stride, block_stride, hd;
} cache_layout;

/* the row of kv head h at position p; a key chunk's rows follow each other (one block) */
static char *cache_row(const cache_layout *c, int64_t h, int64_t p) {
    return c->base + (h * c->head_stride + (p / TPK_KV_BLOCK) * c->block_stride + (p % TPK_KV_BLOCK) * c->hd) * c->esize;
}

/* a new row of hd float32 values into a cache row: copied, or narrowed to float16 */
static void store_row(char *row, const float *x, int64_t hd, int64_t esize) {
    if (esize == 4) memcpy(row, x, (size_t)hd * sizeof(float));
    else tpk_narrow_f16(x, hd, (uint16_t *)row);
}

void tpk_attention(const float *q, const float *k, const float *v, int64_t T, int64_t n_heads, int64_t n_kv,
                   int64_t hd, const int32_t *kv_of_head, void *kcache, void *vcache, int cache_f16,
                   int64_t head_stride, int64_t block_stride, int64_t start, int64_t window, float scale,
                   float *out, int nthreads) {
    const int64_t esize = cache_f16 ? 2 : 4;
    const cache_layout kl = {(char *)kcache, esize, head_stride, block_stride, hd};
    const cache_layout vl = {(char *)vcache, esize, head_stride, block_stride, hd};
    /* store the new keys and values: k, v are (T, n_kv, hd) */
    for (int64_t t = 0; t < T; t++)
        for (int64_t h = 0; h < n_kv; h++) {
            store_row(cache_row(&kl, h, start + t), k + (t * n_kv + h) * hd, hd, esize);
            store_row(cache_row(&vl, h, start + t), v + (t * n_kv + h) * hd, hd, esize);
        }
    int64_t *run_start = (int64_t *)malloc(sizeof(int64_t) * (size_t)(n_heads + 1));
    const int64_t runs = head_runs(kv_of_head, n_heads, run_start);
    int64_t widest = 0;
    for (int64_t r = 0; r < runs; r++)
        if (run_start[r + 1] - run_start[r] > widest) widest = run_start[r + 1] - run_start[r];
    /* positions go by blocks of rows; the partials of one block: (row, chunk, head). Fewer rows
     * a block when its partials would pass PARTIALS_FLOATS (very long contexts). */
    int64_t rows = T < MAX_BLOCK_ROWS ? T : MAX_BLOCK_ROWS;
    int64_t chunks = block_chunks(T, rows, start, window);
    while (rows > 1 && rows * n_heads * chunks * (hd + 2) > PARTIALS_FLOATS) {
        rows /= 2;
        chunks = block_chunks(T, rows, start, window);
    }
    const size_t slots = (size_t)(rows * n_heads * chunks);
    float *part_m = (float *)malloc(sizeof(float) * slots);
    float *part_l = (float *)malloc(sizeof(float) * slots);
    float *part_acc = (float *)malloc(sizeof(float) * slots * (size_t)hd);
    const int nt = threads_for(nthreads, (double)n_heads * T * (start + T) * hd, 32768.0);
#if defined(TPK_X86)
    const int avx2 = tpk_get_level() >= TPK_AVX2;   /* the softmax step of tpk_attn_x86.c */
#else
    const int avx2 = 0;
#endif
    (void)nt;
#ifdef _OPENMP
#pragma omp parallel num_threads(nt) if (nt > 1)
#endif
    {
        float *scores = (float *)malloc(sizeof(float) * (size_t)(widest * KEY_CHUNK));
        /* a float16 cache: a block of rows widens each task's chunk of keys and values once, for
         * all its rows; a single row (decode) widens a tile at a time (into L1, not L2) */
        const int f16 = esize == 2;
        float *wide = f16 && rows > 1 ? (float *)malloc(sizeof(float) * (size_t)(2 * KEY_CHUNK * hd)) : NULL;
        float *tile = f16 ? (float *)malloc(sizeof(float) * (size_t)(KEY_TILE * hd)) : NULL;
#ifdef _OPENMP
        const int64_t team = omp_get_num_threads();
#else
        const int64_t team = 1;
#endif
        for (int64_t t0 = 0; t0 < T; t0 += rows) {
            const int64_t t1 = t0 + rows < T ? t0 + rows : T;
            const int64_t c0 = first_key(start + t0, window) / KEY_CHUNK;
            const int64_t nc = (start + t1 - 1) / KEY_CHUNK - c0 + 1;   /* <= chunks */
            /* tasks: (run, chunk), each over the block's rows; any thread, any order */
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
            for (int64_t u = 0; u < runs * nc; u++) {
                const int64_t r = u / nc, c = c0 + u % nc;
                const int64_t h0 = run_start[r], nh = run_start[r + 1] - h0, kv = kv_of_head[h0];
                /* the chunk's keys that some row of the block sees, cb..ce-1, as float32 */
                const int64_t lo0 = first_key(start + t0, window);
                const int64_t cb = c * KEY_CHUNK > lo0 ? c * KEY_CHUNK : lo0;
                const int64_t ce = (c + 1) * KEY_CHUNK < start + t1 ? (c + 1) * KEY_CHUNK : start + t1;
                const float *kf = (const float *)cache_row(&kl, kv, cb);
                const float *vf = (const float *)cache_row(&vl, kv, cb);
                const int by_tile = f16 && t1 - t0 == 1;
                if (f16 && !by_tile && cb < ce) {
                    tpk_widen_f16((const uint16_t *)kf, (ce - cb) * hd, wide);
                    tpk_widen_f16((const uint16_t *)vf, (ce - cb) * hd, wide + KEY_CHUNK * hd);
                    kf = wide, vf = wide + KEY_CHUNK * hd;
                }
                for (int64_t t = t0; t < t1; t++) {
                    const int64_t p = start + t, lo = first_key(p, window);
                    const int64_t b = c * KEY_CHUNK > lo ? c * KEY_CHUNK : lo;
                    const int64_t e = (c + 1) * KEY_CHUNK < p + 1 ? (c + 1) * KEY_CHUNK : p + 1;
                    if (b >= e) continue;   /* this chunk is outside the position's keys */
                    const size_t slot = (size_t)(((t - t0) * chunks + c - c0) * n_heads + h0);
                    /* the next rows read the same chunk; after the last, prefetch the chunk of the
                     * task this thread probably takes next (tasks go round the threads in order) */
                    const void *next_k = NULL;
                    int64_t next_bytes = 0;
                    if (t == t1 - 1 && u + team < runs * nc) {
                        const int64_t un = u + team, rn = un / nc, cn = c0 + un % nc, pn = start + t0;
                        const int64_t ln = first_key(pn, window), bn = cn * KEY_CHUNK > ln ? cn * KEY_CHUNK : ln;
                        const int64_t en = (cn + 1) * KEY_CHUNK < pn + 1 ? (cn + 1) * KEY_CHUNK : pn + 1;
                        if (bn < en) {
                            next_k = cache_row(&kl, kv_of_head[run_start[rn]], bn);
                            next_bytes = (en - bn) * hd * esize;
                        }
                    }
                    /* the first row prefetches the chunk's values from the cache (widened chunks are in L2) */
                    const uint16_t *k16 = by_tile ? (const uint16_t *)kf + (b - cb) * hd : NULL;
                    const uint16_t *v16 = by_tile ? (const uint16_t *)vf + (b - cb) * hd : NULL;
                    attend_chunk(q + (t * n_heads + h0) * hd, nh, by_tile ? NULL : kf + (b - cb) * hd,
                                 by_tile ? NULL : vf + (b - cb) * hd, k16, v16, tile, e - b, hd, scale, scores,
                                 part_m + slot, part_l + slot, part_acc + slot * (size_t)hd,
                                 t == t0 && (!f16 || by_tile), next_k, next_bytes, avx2);
                }
            }
            /* each (row, head): its chunks folded in order */
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
            for (int64_t u = 0; u < (t1 - t0) * n_heads; u++) {
                const int64_t t = t0 + u / n_heads, h = u % n_heads, p = start + t;
                const int64_t first = first_key(p, window) / KEY_CHUNK - c0, last = p / KEY_CHUNK - c0;
                const size_t slot = (size_t)(((t - t0) * chunks + first) * n_heads + h);
                fold_chunks(part_m + slot, part_l + slot, part_acc + slot * (size_t)hd, last - first + 1, n_heads,
                            hd, out + (t * n_heads + h) * hd);
            }
        }
        free(scores);
        free(wide);
        free(tile);
    }
    free(part_m);
    free(part_l);
    free(part_acc);
    free(run_start);
}

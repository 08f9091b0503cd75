/* Stand-alone check of the packed matmul kernels against the scalar reference, at every
 * SIMD level this CPU supports (forced with tpk_set_level). Used to test the ARM paths on
 * an x86 machine under qemu (tests/test_kernels_arm.py), and runs natively anywhere:
 *
 *   cc -O2 -ffp-contract=off -Ikernels kernels/test_tpk.c kernels/tpk.c kernels/tpk_x86.c kernels/tpk_arm.c -lm
 *   ./a.out [--expect LEVEL]      (exit 0: every level matched bit for bit)
 *
 * It prints "best level: NAME", the levels tested, then PASS or FAIL. Float32 outputs and the
 * float64-accumulated ones (row-parallel partial sums) are both compared bit for bit.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tpk_impl.h"   /* the packed layout constants (magnitudes) */

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

static uint64_t next_u64(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

/* uniform in [-1, 1) */
static float uniform(void) { return (float)((next_u64() >> 40) * (1.0 / 16777216.0) * 2.0 - 1.0); }

static void random_rows(float *x, int64_t rows, int64_t n) {
    for (int64_t r = 0; r < rows; r++) {
        const float scale = powf(10.0f, 3.0f * uniform());   /* rows of very different sizes */
        for (int64_t j = 0; j < n; j++) {
            float v = uniform() * scale;
            if ((next_u64() & 63) == 0) v = 0.0f;           /* a few exact zeros */
            x[r * n + j] = v;
        }
        if ((next_u64() & 7) == 0)                             /* some all-zero blocks */
            for (int64_t j = 0; j < (n < 32 ? n : 32); j++) x[r * n + j] = 0.0f;
    }
}

static int check(const char *wtype, int64_t rows, int64_t nb, int64_t ntok, const int *levels, int nlevels) {
    const int64_t n = nb * TPK_QK;
    const int q40 = strcmp(wtype, "q40") == 0;
    const int64_t bb = q40 ? TPK_Q40_BYTES : TPK_Q80_BYTES;
    float *wf = malloc(sizeof(float) * (size_t)(rows * n + 1));
    float *xf = malloc(sizeof(float) * (size_t)(ntok * n + 1));
    uint8_t *w = malloc((size_t)(rows * nb * bb + 1));
    tpk_block_q80 *x = malloc(sizeof(tpk_block_q80) * (size_t)(ntok * nb + 1));
    const int64_t pbytes = q40 ? tpk_packed_bytes_q40(rows, nb) : tpk_packed_bytes_q80(rows, nb);
    uint8_t *wp = malloc((size_t)pbytes + 1);
    uint8_t *back = malloc((size_t)(rows * nb * bb + 1));
    float *ref = malloc(sizeof(float) * (size_t)(ntok * rows + 1));
    float *out = malloc(sizeof(float) * (size_t)(ntok * rows + 1));
    double *ref64 = malloc(sizeof(double) * (size_t)(ntok * rows + 1));
    double *out64 = malloc(sizeof(double) * (size_t)(ntok * rows + 1));
    int ok = 1;

    random_rows(wf, rows, n);
    random_rows(xf, ntok, n);
    for (int64_t r = 0; r < rows; r++) {
        if (q40) tpk_quantize_q40(wf + r * n, (tpk_block_q40 *)(w + r * nb * bb), n);
        else tpk_quantize_q80(wf + r * n, (tpk_block_q80 *)(w + r * nb * bb), n);
    }
    for (int64_t t = 0; t < ntok; t++) tpk_quantize_q80(xf + t * n, x + t * nb, n);
    if (q40) {
        tpk_matmul_q40_q80_ref((const tpk_block_q40 *)w, rows, nb, x, ntok, ref, rows);
        tpk_matmul_q40_q80_f64_ref((const tpk_block_q40 *)w, rows, nb, x, ntok, ref64, rows);
        tpk_pack_q40(w, nb * bb, rows, nb, wp);
        tpk_unpack_q40(wp, rows, nb, (tpk_block_q40 *)back);
    } else {
        tpk_matmul_q80_q80_ref((const tpk_block_q80 *)w, rows, nb, x, ntok, ref, rows);
        tpk_matmul_q80_q80_f64_ref((const tpk_block_q80 *)w, rows, nb, x, ntok, ref64, rows);
        tpk_pack_q80(w, nb * bb, rows, nb, wp);
        tpk_unpack_q80(wp, rows, nb, (tpk_block_q80 *)back);
    }
    if (memcmp(w, back, (size_t)(rows * nb * bb)) != 0) {
        printf("  %s rows=%lld nb=%lld: pack/unpack does not round-trip\n", wtype, (long long)rows, (long long)nb);
        ok = 0;
    }
    for (int li = 0; li < nlevels; li++) {
        tpk_set_level(levels[li]);
        for (int threads = 1; threads <= 2; threads++) {
            for (int64_t i = 0; i < ntok * rows; i++) out[i] = NAN;
            if (q40) tpk_matmul_q40p(wp, rows, nb, x, ntok, out, rows, threads);
            else tpk_matmul_q80p(wp, rows, nb, x, ntok, out, rows, threads);
            if (memcmp(out, ref, sizeof(float) * (size_t)(ntok * rows)) != 0) {
                int64_t bad = 0;
                while (bad < ntok * rows && memcmp(out + bad, ref + bad, sizeof(float)) == 0) bad++;
                printf("  MISMATCH %s level=%s threads=%d rows=%lld nb=%lld ntok=%lld: [%lld] %.9g != %.9g\n",
                       wtype, tpk_level_name(levels[li]), threads, (long long)rows, (long long)nb, (long long)ntok,
                       (long long)bad, (double)out[bad], (double)ref[bad]);
                ok = 0;
            }
            for (int64_t i = 0; i < ntok * rows; i++) out64[i] = NAN;
            if (q40) tpk_matmul_q40p_f64(wp, rows, nb, x, ntok, out64, rows, threads);
            else tpk_matmul_q80p_f64(wp, rows, nb, x, ntok, out64, rows, threads);
            if (memcmp(out64, ref64, sizeof(double) * (size_t)(ntok * rows)) != 0) {
                printf("  MISMATCH (float64 sums) %s level=%s threads=%d rows=%lld nb=%lld ntok=%lld\n",
                       wtype, tpk_level_name(levels[li]), threads, (long long)rows, (long long)nb, (long long)ntok);
                ok = 0;
            }
        }
    }
    free(wf); free(xf); free(w); free(x); free(wp); free(back); free(ref); free(out); free(ref64); free(out64);
    return ok;
}

/* A random fp16 of moderate size (either sign), for the scale fields of random GGML blocks. */
static uint16_t random_half(void) { return tpk_fp32_to_fp16(uniform() * 0.02f); }

/* Random but valid GGML blocks of `type` (any bytes, finite fp16 scales), rows x nblk. */
static void random_ggml(int type, uint8_t *w, int64_t rows, int64_t nblk) {
    int bb = 1;
    tpk_ggml_block(type, &bb);
    for (int64_t i = 0; i < rows * nblk * bb; i++) w[i] = (uint8_t)(next_u64() >> 56);
    for (int64_t r = 0; r < rows * nblk; r++) {
        uint8_t *blk = w + r * bb;
        uint16_t h[2] = {random_half(), random_half()};
        if (type == TPK_T_Q6K) memcpy(blk + 208, h, 2);
        else if (type == TPK_T_Q50) memcpy(blk, h, 2);
        else memcpy(blk, h, 4);   /* q41 d, m; q4k/q5k d, dmin */
    }
}

/* A copy of packed weights whose values are the magnitudes of their two float terms
 * (q41: |d|q + |m|, q4k/q5k: |d|sc*q + |dmin|mn): the kernels round those terms apart, so
 * this is the size their rounding error scales with. The K-quants' d, dmin are in their
 * span headers (tpk_impl.h). */
static void magnitudes(int type, uint8_t *wp, int64_t rows, int64_t nb) {
    const int64_t G = (rows + TPK_ROWS - 1) / TPK_ROWS, rgb = tpk_packed_bytes(type, TPK_ROWS, nb);
    for (int64_t g = 0; g < G; g++) {
        uint8_t *rg = wp + g * rgb;
        const int spans = KQ_SPANS(type);
        uint8_t *p = rg + (spans ? KQ_PREFIX : 0);
        for (int64_t b = 0; b < nb;) {
            const int n = spans ? kq_span_len(b, nb, rg[0]) : 1;
            for (int i = 0; i < TPK_ROWS; i++) {
                p[2 * i + 1] &= 0x7F;                                             /* |d| */
                if (type == TPK_T_Q41) p[32 + 2 * i + 1] &= 0x7F;                 /* |m| */
                if (KQ_IS_K(type)) p[32 + 2 * i + 1] |= 0x80;                     /* -|dmin| */
            }
            p += (spans ? KQ_HDR(type) : 0) + n * KQ_GB(type);
            b += n;
        }
    }
}

/* The types beyond q40/q80: every level against the scalar level bit for bit (float32 and
 * float64 sums, 1 and 2 threads), from a column offset inside the GGML blocks; and the
 * scalar level against a float64 product of the dequantized values. */
static int check_kq(int type, int64_t rows, int64_t nb, int64_t first, int64_t ntok, const int *levels, int nlevels) {
    int bb = 1;
    const int64_t per = tpk_ggml_block(type, &bb) / TPK_QK;
    const int64_t nblk = (first + nb + per - 1) / per, n = nb * TPK_QK;
    uint8_t *w = malloc((size_t)(rows * nblk * bb + 1));
    float *xf = malloc(sizeof(float) * (size_t)(ntok * n + 1));
    tpk_block_q80 *x = malloc(sizeof(tpk_block_q80) * (size_t)(ntok * nb + 1));
    uint8_t *wp = malloc((size_t)tpk_packed_bytes(type, rows, nb) + 1);
    float *wd = malloc(sizeof(float) * (size_t)(rows * n + 1)), *xd = malloc(sizeof(float) * (size_t)(ntok * n + 1));
    float *ref = malloc(sizeof(float) * (size_t)(ntok * rows + 1)), *out = malloc(sizeof(float) * (size_t)(ntok * rows + 1));
    double *ref64 = malloc(sizeof(double) * (size_t)(ntok * rows + 1)), *out64 = malloc(sizeof(double) * (size_t)(ntok * rows + 1));
    int ok = 1;
    random_ggml(type, w, rows, nblk);
    random_rows(xf, ntok, n);
    for (int64_t t = 0; t < ntok; t++) tpk_quantize_q80_ref(xf + t * n, x + t * nb, n);
    tpk_pack_ggml(type, w, nblk * bb, rows, first, nb, wp);
    tpk_set_level(TPK_SCALAR);
    tpk_matmul_packed(type, wp, rows, nb, x, ntok, ref, rows, 0, 1);
    tpk_matmul_packed(type, wp, rows, nb, x, ntok, ref64, rows, 1, 1);
    const int64_t pbytes = tpk_packed_bytes(type, rows, nb);
    uint8_t *mag = malloc((size_t)pbytes + 1);
    float *wm = malloc(sizeof(float) * (size_t)(rows * n + 1));
    memcpy(mag, wp, (size_t)pbytes);
    magnitudes(type, mag, rows, nb);
    tpk_dequantize_packed(type, mag, rows, nb, wm);
    tpk_dequantize_packed(type, wp, rows, nb, wd);
    tpk_dequantize_q80(x, xd, ntok * n);
    for (int64_t t = 0; t < ntok; t++)
        for (int64_t r = 0; r < rows; r++) {
            double exact = 0.0, size = 0.0;
            for (int64_t j = 0; j < n; j++) {
                exact += (double)wd[r * n + j] * (double)xd[t * n + j];
                size += fabs((double)wm[r * n + j] * (double)xd[t * n + j]);
            }
            /* gguf's float32 values of q41/q4k/q5k are rounded (d*q + m), the kernels' float64 terms are not */
            const double tol64 = type == TPK_T_Q50 || type == TPK_T_Q6K ? 1e-12 : 1.2e-7;
            if (fabs(ref[t * rows + r] - exact) > 1e-5 * size + 1e-30 || fabs(ref64[t * rows + r] - exact) > tol64 * size + 1e-300) {
                printf("  type %d rows=%lld nb=%lld: scalar kernel is not the dequantized product: %g %g %g size %g\n", type, (long long)rows, (long long)nb, ref[t * rows + r], ref64[t * rows + r], exact, size);
                ok = 0;
            }
        }
    for (int li = 0; li < nlevels; li++) {
        tpk_set_level(levels[li]);
        for (int threads = 1; threads <= 2; threads++) {
            for (int64_t i = 0; i < ntok * rows; i++) { out[i] = NAN; out64[i] = NAN; }
            tpk_matmul_packed(type, wp, rows, nb, x, ntok, out, rows, 0, threads);
            tpk_matmul_packed(type, wp, rows, nb, x, ntok, out64, rows, 1, threads);
            if (memcmp(out, ref, sizeof(float) * (size_t)(ntok * rows)) != 0 ||
                memcmp(out64, ref64, sizeof(double) * (size_t)(ntok * rows)) != 0) {
                printf("  MISMATCH type %d level=%s threads=%d rows=%lld nb=%lld first=%lld ntok=%lld\n", type,
                       tpk_level_name(levels[li]), threads, (long long)rows, (long long)nb, (long long)first, (long long)ntok);
                ok = 0;
            }
        }
    }
    free(mag); free(wm); free(w); free(xf); free(x); free(wp); free(wd); free(xd); free(ref); free(out); free(ref64); free(out64);
    return ok;
}

/* The q80 quantizer at every level against the scalar reference, on random and adversarial rows. */
static int check_quantizer(const int *levels, int nlevels) {
    enum { N = 32 * 12 };
    float x[N];
    tpk_block_q80 ref[N / 32], got[N / 32];
    int ok = 1;
    for (int trial = 0; trial < 200; trial++) {
        random_rows(x, 1, N);
        if (trial % 10 == 1) for (int j = 0; j < 32; j++) x[j] = 0.3f;                 /* all equal */
        if (trial % 10 == 2) for (int j = 0; j < 32; j++) x[j] = (j - 16) * 0.5f;      /* halves */
        if (trial % 10 == 3) for (int j = 0; j < 32; j++) x[j] = 1e-40f * (j - 16);   /* denormals */
        if (trial % 10 == 4) for (int j = 0; j < 32; j++) x[j] = (j & 1 ? 1 : -1) * 3.4e38f;
        if (trial % 10 == 5) for (int j = 0; j < 32; j++) x[j] = 127.0f * (j - 16) / 16.0f + 0.5f;
        tpk_quantize_q80_ref(x, ref, N);
        for (int li = 0; li < nlevels; li++) {
            tpk_set_level(levels[li]);
            tpk_quantize_q80(x, got, N);
            if (memcmp(ref, got, sizeof ref) != 0) {
                printf("  quantize_q80 level=%s trial %d differs from the reference\n", tpk_level_name(levels[li]), trial);
                ok = 0;
            }
        }
    }
    return ok;
}

/* float16 -> float32 (the KV cache's --kv-type f16) at every level: all 65,536 values, the
 * scalar table's bits (NaNs: NaN). */
static int check_widen_f16(const int *levels, int nlevels) {
    static uint16_t h[65536];
    static float ref[65536], got[65536];
    for (int i = 0; i < 65536; i++) h[i] = (uint16_t)i, ref[i] = tpk_fp16_to_fp32((uint16_t)i);
    int ok = 1;
    for (int li = 0; li < nlevels; li++) {
        tpk_set_level(levels[li]);
        tpk_widen_f16(h, 65536 - 3, got);   /* a length that leaves a tail */
        for (int i = 0; i < 65536 - 3; i++)
            if (ref[i] == ref[i] ? memcmp(&ref[i], &got[i], sizeof(float)) != 0 : got[i] == got[i]) {
                printf("  widen_f16 level=%s: 0x%04x gives %g, not %g\n", tpk_level_name(levels[li]), i, got[i], ref[i]);
                ok = 0;
                break;
            }
    }
    return ok;
}

/* A broken kernel must be caught: flip one scale bit in the packed weights. */
static int check_detects_error(const int *levels, int nlevels) {
    const int64_t rows = 20, nb = 3, n = nb * TPK_QK;
    float wf[20 * 96], xf[96];
    tpk_block_q40 w[20 * 3];
    tpk_block_q80 x[3];
    uint8_t wp[2 * 3 * TPK_Q40_GROUP_BYTES];
    float ref[20], out[20];
    random_rows(wf, rows, n);
    random_rows(xf, 1, n);
    for (int64_t r = 0; r < rows; r++) tpk_quantize_q40(wf + r * n, w + r * nb, n);
    for (int64_t r = 0; r < rows; r++) w[r * nb + 1].d = tpk_fp32_to_fp16(0.5f + r);  /* nonzero scales */
    tpk_quantize_q80(xf, x, n);
    tpk_matmul_q40_q80_ref(w, rows, nb, x, 1, ref, rows);
    tpk_pack_q40((const uint8_t *)w, nb * TPK_Q40_BYTES, rows, nb, wp);
    wp[1 * TPK_Q40_GROUP_BYTES + 2 * 5] ^= 1;   /* row 5, block 1: scale off by one ulp */
    int caught = 1;
    for (int li = 0; li < nlevels; li++) {
        tpk_set_level(levels[li]);
        tpk_matmul_q40p(wp, rows, nb, x, 1, out, rows, 1);
        if (memcmp(out, ref, sizeof out) == 0) {
            printf("  level %s: a perturbed scale went unnoticed\n", tpk_level_name(levels[li]));
            caught = 0;
        }
    }
    return caught;
}

int main(int argc, char **argv) {
    const char *expect = NULL;
    for (int i = 1; i < argc; i++)
        if (strcmp(argv[i], "--expect") == 0 && i + 1 < argc) expect = argv[++i];

    static const int all[] = {TPK_SCALAR, TPK_AVX2, TPK_AVX512, TPK_AVX512_VNNI, TPK_NEON, TPK_NEON_DOTPROD};
    int levels[8], nlevels = 0;
    for (unsigned i = 0; i < sizeof all / sizeof all[0]; i++)
        if (tpk_level_supported(all[i])) levels[nlevels++] = all[i];
    const int best = tpk_detect_level();
    printf("best level: %s\n", tpk_level_name(best));
    printf("levels tested:");
    for (int i = 0; i < nlevels; i++) printf(" %s", tpk_level_name(levels[i]));
    printf("\nopenmp: %s\n", tpk_has_openmp() ? "yes" : "no");

    int ok = 1, cases = 0;
    static const int64_t rows_list[] = {1, 5, 16, 17, 31, 48, 70};
    static const int64_t nb_list[] = {1, 2, 3, 8};
    static const int64_t tok_list[] = {1, 2, 3, 5, 8, 9, 13};
    for (int q = 0; q < 2; q++)
        for (unsigned a = 0; a < sizeof rows_list / sizeof rows_list[0]; a++)
            for (unsigned b = 0; b < sizeof nb_list / sizeof nb_list[0]; b++)
                for (unsigned c = 0; c < sizeof tok_list / sizeof tok_list[0]; c++) {
                    ok &= check(q ? "q80" : "q40", rows_list[a], nb_list[b], tok_list[c], levels, nlevels);
                    cases++;
                }
    ok &= check("q40", 300, 64, 17, levels, nlevels);
    ok &= check("q80", 300, 64, 17, levels, nlevels);
    cases += 2;
    static const int kq_types[] = {TPK_T_Q41, TPK_T_Q50, TPK_T_Q4K, TPK_T_Q5K, TPK_T_Q6K};
    static const int64_t kq_shapes[][4] = {   /* rows, nb, first (32-column blocks), tokens */
        {1, 1, 0, 1}, {5, 3, 1, 2}, {16, 8, 0, 3}, {17, 9, 3, 5}, {33, 2, 7, 1}, {70, 12, 5, 9}, {300, 40, 3, 17}};
    int kq_ok = 1;
    for (unsigned ti = 0; ti < sizeof kq_types / sizeof kq_types[0]; ti++)
        for (unsigned si = 0; si < sizeof kq_shapes / sizeof kq_shapes[0]; si++) {
            const int64_t *sh = kq_shapes[si];
            kq_ok &= check_kq(kq_types[ti], sh[0], sh[1], sh[2], sh[3], levels, nlevels);
        }
    printf("q41 q50 q4k q5k q6k at every level bit-identical to scalar: %s\n", kq_ok ? "yes" : "no");
    ok &= kq_ok;
    const int quant_ok = check_quantizer(levels, nlevels);
    printf("q80 quantizer at every level bit-identical to the reference: %s\n", quant_ok ? "yes" : "no");
    ok &= quant_ok;
    const int widen_ok = check_widen_f16(levels, nlevels);
    printf("float16 widening at every level bit-identical to the table: %s\n", widen_ok ? "yes" : "no");
    ok &= widen_ok;
    const int caught = check_detects_error(levels, nlevels);
    printf("%d shapes x %d levels x 1,2 threads x float32/float64 sums; perturbed scale detected: %s\n", cases, nlevels, caught ? "yes" : "no");
    ok &= caught;
    if (expect && strcmp(expect, tpk_level_name(best)) != 0) {
        printf("expected best level %s, got %s\n", expect, tpk_level_name(best));
        ok = 0;
    }
    printf("%s\n", ok ? "PASS" : "FAIL");
    return ok ? 0 : 1;
}

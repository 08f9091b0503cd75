/* alternate the committed attention (base_attention) with the working tree's, per repetition:
 * 22 layers of decode at P, each from its own layer's cache (memory) or layer 0's (HOT) */
#include "tpk.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/mman.h>
void base_attention(const float *q, const float *k, const float *v, int64_t T, int64_t n_heads, int64_t n_kv,
                   int64_t hd, const int32_t *kv_of_head, void *kcache, void *vcache, int cache_f16,
                   int64_t head_stride, int64_t block_stride, int64_t start, int64_t window, float scale,
                   float *out, int nthreads);
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
static int cmp(const void *a, const void *b) { double x = *(double *)a, y = *(double *)b; return x < y ? -1 : x > y; }
int main(int argc, char **argv) {
    const int L = 22, HD = 64, P = argc > 1 ? atoi(argv[1]) : 4000, reps = argc > 2 ? atoi(argv[2]) : 20;
    const int H = argc > 3 ? atoi(argv[3]) : 32, KV = argc > 4 ? atoi(argv[4]) : 4, f16 = getenv("F16") != NULL;
    const int hot = getenv("HOT") != NULL; const int nblk = (P + 256) / 256 + 1;
    const size_t per = (size_t)KV * nblk * 256 * HD, es = f16 ? 2 : 4;
    char **kc = malloc(sizeof(char *) * L), **vc = malloc(sizeof(char *) * L);
    const int blocked = getenv("BLOCKED") != NULL;
    int64_t hs = (int64_t)nblk * 256 * HD, bs = 256 * HD;
    if (blocked) {   /* the runtime's layout: [blocks][layers][kv][256][hd] */
        size_t tot = (size_t)nblk * L * KV * 256 * HD, bytes = (tot * es + (2 << 20)) & ~((size_t)(2 << 20) - 1);
        char *K0 = aligned_alloc(2 << 20, bytes), *V0 = aligned_alloc(2 << 20, bytes);
        madvise(K0, bytes, 14); madvise(V0, bytes, 14);
        for (size_t i = 0; i < tot; i++) {
            float a = rand() / (float)RAND_MAX - 0.5f, b = rand() / (float)RAND_MAX - 0.5f;
            if (f16) { tpk_narrow_f16(&a, 1, (uint16_t *)K0 + i); tpk_narrow_f16(&b, 1, (uint16_t *)V0 + i); }
            else { ((float *)K0)[i] = a; ((float *)V0)[i] = b; }
        }
        for (int l = 0; l < L; l++) { kc[l] = K0 + (size_t)l * KV * 256 * HD * es; vc[l] = V0 + (size_t)l * KV * 256 * HD * es; }
        hs = 256 * HD; bs = (int64_t)L * KV * 256 * HD;
    }
    for (int l = 0; l < L && !blocked; l++) {
        size_t bytes = (per * es + (2 << 20)) & ~((size_t)(2 << 20) - 1);
        kc[l] = aligned_alloc(2 << 20, bytes); madvise(kc[l], bytes, 14);
        vc[l] = aligned_alloc(2 << 20, bytes); madvise(vc[l], bytes, 14);
        for (size_t i = 0; i < per; i++) {
            float a = rand() / (float)RAND_MAX - 0.5f, b = rand() / (float)RAND_MAX - 0.5f;
            if (f16) { tpk_narrow_f16(&a, 1, (uint16_t *)kc[l] + i); tpk_narrow_f16(&b, 1, (uint16_t *)vc[l] + i); }
            else { ((float *)kc[l])[i] = a; ((float *)vc[l])[i] = b; }
        }
    }
    float q[H * HD], k[KV * HD], v[KV * HD], out[H * HD], out2[H * HD];
    for (int i = 0; i < H * HD; i++) q[i] = rand() / (float)RAND_MAX - 0.5f;
    for (int i = 0; i < KV * HD; i++) { k[i] = rand() / (float)RAND_MAX - 0.5f; v[i] = k[i]; }
    int32_t kvh[H]; for (int h = 0; h < H; h++) kvh[h] = h / (H / KV);
    double *tb = malloc(sizeof(double) * reps), *tn = malloc(sizeof(double) * reps), *ratio = malloc(sizeof(double) * reps);
    int same = 1;
    for (int r = 0; r < reps; r++) {
        for (int which = 0; which < 2; which++) {
            int first = (r & 1) ? 1 - which : which;   /* alternate who goes first */
            double t = now();
            for (int l = 0; l < L; l++) {
                void *K_ = kc[hot ? 0 : l], *V_ = vc[hot ? 0 : l];
                if (first == 0) base_attention(q, k, v, 1, H, KV, HD, kvh, K_, V_, f16, hs, bs, P, 0, 0.125f, out, 1);
                else tpk_attention(q, k, v, 1, H, KV, HD, kvh, K_, V_, f16, hs, bs, P, 0, 0.125f, out2, 1);
            }
            t = now() - t;
            if (first == 0) tb[r] = t; else tn[r] = t;
        }
        ratio[r] = tb[r] / tn[r];
        same &= memcmp(out, out2, sizeof out) == 0;
    }
    qsort(tb, reps, sizeof(double), cmp); qsort(tn, reps, sizeof(double), cmp); qsort(ratio, reps, sizeof(double), cmp);
    const double kh = (double)L * H * (P + 1);
    printf("P=%d H=%d KV=%d %s%s%s: base %.2f ms (%.2f ns/key-head, min %.2f), new %.2f ms (%.2f ns, min %.2f); base/new median %.3f [%.3f..%.3f]; same bits: %s\n",
           P, H, KV, hot ? "hot " : "", blocked ? "blocked " : "", f16 ? "f16" : "f32", tb[reps / 2] * 1e3, tb[reps / 2] * 1e9 / kh, tb[0] * 1e9 / kh,
           tn[reps / 2] * 1e3, tn[reps / 2] * 1e9 / kh, tn[0] * 1e9 / kh, ratio[reps / 2], ratio[reps / 4], ratio[3 * reps / 4], same ? "yes" : "NO");
}

/* tpk: scalar reference kernels, packing, run-time dispatch to SIMD variants and threads.
 * See tpk.h for the formats and the exactness contract. */
#include "tpk_impl.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(TPK_ARM64) && defined(__linux__)
#include <sys/auxv.h>
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

/* fp16 -> fp32 by table: the scalar kernels read one scale per block. Filled when the
 * library is loaded. */
float tpk_fp16_table[65536];

__attribute__((constructor)) static void init_fp16_table(void) {
    for (uint32_t i = 0; i < 65536; i++) tpk_fp16_table[i] = tpk_fp16_to_fp32((uint16_t)i);
}

void tpk_widen_f16(const uint16_t *h, int64_t n, float *y) {
#if defined(TPK_X86)
    if (tpk_get_level() >= TPK_AVX2) { tpk_x86_widen_f16(h, n, y); return; }
#elif defined(TPK_ARM64)
    if (tpk_get_level() >= TPK_NEON) { tpk_arm_widen_f16(h, n, y); return; }
#endif
    for (int64_t i = 0; i < n; i++) y[i] = tpk_fp16_table[h[i]];
}

void tpk_narrow_f16(const float *x, int64_t n, uint16_t *h) {
    for (int64_t i = 0; i < n; i++) {
        const float v = x[i] > 65504.0f ? 65504.0f : x[i] < -65504.0f ? -65504.0f : x[i];
        h[i] = tpk_fp32_to_fp16(v);
    }
}

/* ---------------------------------------------------------------- dispatch */

static int level_in_use = -1;

int tpk_level_supported(int level) {
    if (level == TPK_SCALAR) return 1;
#if defined(TPK_X86)
    return tpk_x86_supports(level);
#elif defined(TPK_ARM64)
    return tpk_arm_supports(level);
#else
    return 0;
#endif
}

int tpk_detect_level(void) {
    static const int order[] = {TPK_AVX512_VNNI, TPK_AVX512, TPK_AVX2, TPK_NEON_DOTPROD, TPK_NEON};
    for (unsigned i = 0; i < sizeof order / sizeof order[0]; i++)
        if (tpk_level_supported(order[i])) return order[i];
    return TPK_SCALAR;
}

int tpk_get_level(void) {
    if (level_in_use < 0) {
        const char *env = getenv("TPLLAMA_SIMD");   /* e.g. TPLLAMA_SIMD=avx2 to compare paths */
        int level = -1;
        if (env) {
            static const int all[] = {TPK_SCALAR, TPK_AVX2, TPK_AVX512, TPK_AVX512_VNNI, TPK_NEON, TPK_NEON_DOTPROD};
            for (unsigned i = 0; i < sizeof all / sizeof all[0]; i++)
                if (strcmp(env, tpk_level_name(all[i])) == 0 && tpk_level_supported(all[i])) level = all[i];
        }
        level_in_use = level >= 0 ? level : tpk_detect_level();
    }
    return level_in_use;
}

int tpk_set_level(int level) {
    if (!tpk_level_supported(level)) return -1;
    level_in_use = level;
    return level;
}

int tpk_prefetch_bytes = TPK_PREFETCH_DEFAULT;

int tpk_set_prefetch(int bytes) {
    if (bytes < 0 || bytes > 65536) return -1;
    tpk_prefetch_bytes = bytes;
    return bytes;
}

int tpk_get_prefetch(void) { return tpk_prefetch_bytes; }

const char *tpk_level_name(int level) {
    switch (level) {
    case TPK_SCALAR: return "scalar";
    case TPK_AVX2: return "avx2";
    case TPK_AVX512: return "avx512";
    case TPK_AVX512_VNNI: return "avx512-vnni";
    case TPK_NEON: return "neon";
    case TPK_NEON_DOTPROD: return "neon-dotprod";
    default: return "unknown";
    }
}

int tpk_has_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* ---------------------------------------------------------------- quantizers */

void tpk_quantize_q80_ref(const float *x, tpk_block_q80 *y, int64_t n) {
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

void tpk_quantize_q80(const float *x, tpk_block_q80 *y, int64_t n) {
#if defined(TPK_X86)
    const int level = tpk_get_level();
    if (level >= TPK_AVX512) { tpk_x86_quantize_q80_512(x, y, n); return; }
    if (level >= TPK_AVX2) { tpk_x86_quantize_q80_avx2(x, y, n); return; }
#elif defined(TPK_ARM64)
    if (tpk_get_level() >= TPK_NEON) { tpk_arm_quantize_q80(x, y, n); return; }
#endif
    tpk_quantize_q80_ref(x, y, n);
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
    for (int64_t i = 0; i < n / TPK_QK; i++) {
        const float d = tpk_f16(x[i].d);
        for (int j = 0; j < TPK_QK; j++) y[i * TPK_QK + j] = x[i].qs[j] * d;
    }
}

void tpk_dequantize_q40(const tpk_block_q40 *x, float *y, int64_t n) {
    for (int64_t i = 0; i < n / TPK_QK; i++) {
        const float d = tpk_f16(x[i].d);
        for (int j = 0; j < TPK_QK / 2; j++) {
            y[i * TPK_QK + j] = ((x[i].qs[j] & 0x0F) - 8) * d;
            y[i * TPK_QK + TPK_QK / 2 + j] = ((x[i].qs[j] >> 4) - 8) * d;
        }
    }
}

/* ---------------------------------------------------------------- scalar reference (GGML layout) */

static float dot_q40_q80_ref(const tpk_block_q40 *w, const tpk_block_q80 *x, int64_t nb) {
    float acc = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        int32_t isum = 0;
        for (int j = 0; j < TPK_QK / 2; j++) {
            isum += ((w[b].qs[j] & 0x0F) - 8) * x[b].qs[j];
            isum += ((w[b].qs[j] >> 4) - 8) * x[b].qs[j + TPK_QK / 2];
        }
        const float scale = tpk_f16(w[b].d) * tpk_f16(x[b].d);
        const float term = (float)isum * scale;
        acc = acc + term;
    }
    return acc;
}

static float dot_q80_q80_ref(const tpk_block_q80 *w, const tpk_block_q80 *x, int64_t nb) {
    float acc = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        int32_t isum = 0;
        for (int j = 0; j < TPK_QK; j++) isum += w[b].qs[j] * x[b].qs[j];
        const float scale = tpk_f16(w[b].d) * tpk_f16(x[b].d);
        const float term = (float)isum * scale;
        acc = acc + term;
    }
    return acc;
}

void tpk_matmul_q40_q80_ref(const tpk_block_q40 *w, int64_t rows, int64_t nb,
                            const tpk_block_q80 *x, int64_t ntok, float *y, int64_t ldy) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t t = 0; t < ntok; t++) y[t * ldy + r] = dot_q40_q80_ref(w + r * nb, x + t * nb, nb);
}

void tpk_matmul_q80_q80_ref(const tpk_block_q80 *w, int64_t rows, int64_t nb,
                            const tpk_block_q80 *x, int64_t ntok, float *y, int64_t ldy) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t t = 0; t < ntok; t++) y[t * ldy + r] = dot_q80_q80_ref(w + r * nb, x + t * nb, nb);
}

/* Rows accumulated in float64: every block term (int32 times two fp16 scales) is exact
 * there, so row-parallel partial sums from any split add up to (almost always) the same
 * float32 total; the ranks all-reduce these. */
static double dot_q40_q80_f64_ref(const tpk_block_q40 *w, const tpk_block_q80 *x, int64_t nb) {
    double acc = 0.0;
    for (int64_t b = 0; b < nb; b++) {
        int32_t isum = 0;
        for (int j = 0; j < TPK_QK / 2; j++) {
            isum += ((w[b].qs[j] & 0x0F) - 8) * x[b].qs[j];
            isum += ((w[b].qs[j] >> 4) - 8) * x[b].qs[j + TPK_QK / 2];
        }
        const double scale = (double)tpk_f16(w[b].d) * (double)tpk_f16(x[b].d);
        acc = acc + (double)isum * scale;
    }
    return acc;
}

static double dot_q80_q80_f64_ref(const tpk_block_q80 *w, const tpk_block_q80 *x, int64_t nb) {
    double acc = 0.0;
    for (int64_t b = 0; b < nb; b++) {
        int32_t isum = 0;
        for (int j = 0; j < TPK_QK; j++) isum += w[b].qs[j] * x[b].qs[j];
        const double scale = (double)tpk_f16(w[b].d) * (double)tpk_f16(x[b].d);
        acc = acc + (double)isum * scale;
    }
    return acc;
}

void tpk_matmul_q40_q80_f64_ref(const tpk_block_q40 *w, int64_t rows, int64_t nb,
                                const tpk_block_q80 *x, int64_t ntok, double *y, int64_t ldy) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t t = 0; t < ntok; t++) y[t * ldy + r] = dot_q40_q80_f64_ref(w + r * nb, x + t * nb, nb);
}

void tpk_matmul_q80_q80_f64_ref(const tpk_block_q80 *w, int64_t rows, int64_t nb,
                                const tpk_block_q80 *x, int64_t ntok, double *y, int64_t ldy) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t t = 0; t < ntok; t++) y[t * ldy + r] = dot_q80_q80_f64_ref(w + r * nb, x + t * nb, nb);
}

/* ---------------------------------------------------------------- packing */

static inline int64_t groups_of(int64_t rows) { return (rows + TPK_ROWS - 1) / TPK_ROWS; }

int64_t tpk_packed_bytes_q40(int64_t rows, int64_t nb) { return groups_of(rows) * nb * TPK_Q40_GROUP_BYTES; }
int64_t tpk_packed_bytes_q80(int64_t rows, int64_t nb) { return groups_of(rows) * nb * TPK_Q80_GROUP_BYTES; }

void tpk_pack_q40(const uint8_t *w, int64_t row_stride, int64_t rows, int64_t nb, uint8_t *dst) {
    const int64_t G = groups_of(rows);
    for (int64_t g = 0; g < G; g++) {
        for (int64_t b = 0; b < nb; b++) {
            uint8_t *o = dst + (g * nb + b) * TPK_Q40_GROUP_BYTES;
            for (int i = 0; i < TPK_ROWS; i++) {
                const int64_t r = g * TPK_ROWS + i;
                if (r < rows) {
                    const uint8_t *blk = w + r * row_stride + b * TPK_Q40_BYTES;
                    memcpy(o + 2 * i, blk, 2);
                    for (int k = 0; k < 4; k++) memcpy(o + 32 + 64 * k + 4 * i, blk + 2 + 4 * k, 4);
                } else {  /* padding row: scale 0, nibbles 8 (value 0) */
                    memset(o + 2 * i, 0, 2);
                    for (int k = 0; k < 4; k++) memset(o + 32 + 64 * k + 4 * i, 0x88, 4);
                }
            }
        }
    }
}

void tpk_unpack_q40(const uint8_t *src, int64_t rows, int64_t nb, tpk_block_q40 *w) {
    for (int64_t r = 0; r < rows; r++) {
        const int64_t g = r / TPK_ROWS, i = r % TPK_ROWS;
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *o = src + (g * nb + b) * TPK_Q40_GROUP_BYTES;
            uint8_t *blk = (uint8_t *)(w + r * nb + b);
            memcpy(blk, o + 2 * i, 2);
            for (int k = 0; k < 4; k++) memcpy(blk + 2 + 4 * k, o + 32 + 64 * k + 4 * i, 4);
        }
    }
}

void tpk_pack_q80(const uint8_t *w, int64_t row_stride, int64_t rows, int64_t nb, uint8_t *dst) {
    const int64_t G = groups_of(rows);
    for (int64_t g = 0; g < G; g++) {
        for (int64_t b = 0; b < nb; b++) {
            uint8_t *o = dst + (g * nb + b) * TPK_Q80_GROUP_BYTES;
            for (int i = 0; i < TPK_ROWS; i++) {
                const int64_t r = g * TPK_ROWS + i;
                if (r < rows) {
                    const uint8_t *blk = w + r * row_stride + b * TPK_Q80_BYTES;
                    memcpy(o + 2 * i, blk, 2);
                    for (int k = 0; k < 8; k++)
                        for (int j = 0; j < 4; j++) o[32 + 64 * k + 4 * i + j] = blk[2 + 4 * k + j] ^ 0x80;
                } else {  /* padding row: scale 0, values 0 */
                    memset(o + 2 * i, 0, 2);
                    for (int k = 0; k < 8; k++) memset(o + 32 + 64 * k + 4 * i, 0x80, 4);
                }
            }
        }
    }
}

void tpk_unpack_q80(const uint8_t *src, int64_t rows, int64_t nb, tpk_block_q80 *w) {
    for (int64_t r = 0; r < rows; r++) {
        const int64_t g = r / TPK_ROWS, i = r % TPK_ROWS;
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *o = src + (g * nb + b) * TPK_Q80_GROUP_BYTES;
            uint8_t *blk = (uint8_t *)(w + r * nb + b);
            memcpy(blk, o + 2 * i, 2);
            for (int k = 0; k < 8; k++)
                for (int j = 0; j < 4; j++) blk[2 + 4 * k + j] = o[32 + 64 * k + 4 * i + j] ^ 0x80;
        }
    }
}

/* ---------------------------------------------------------------- scalar kernels (packed layout) */

static inline uint16_t load_u16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }

static inline void store_row(void *y, int64_t at, int f64, float facc, double dacc) {
    if (f64) ((double *)y)[at] = dacc;
    else ((float *)y)[at] = facc;
}

static inline void scalar_group(const uint8_t *w, int64_t nb, const tpk_xq *x, int64_t ntok, void *y,
                                int64_t ldy, int nrows, int q40, int f64) {
    const int64_t gbytes = q40 ? TPK_Q40_GROUP_BYTES : TPK_Q80_GROUP_BYTES;
    for (int64_t t = 0; t < ntok; t++) {
        for (int i = 0; i < nrows; i++) {
            float acc = 0.0f;
            double dacc = 0.0;
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *gb = w + b * gbytes;
                const tpk_xq *xb = x + t * nb + b;
                int32_t isum = 0;
                if (q40) {
                    for (int k = 0; k < 4; k++) {
                        for (int j = 0; j < 4; j++) {
                            const uint8_t q = gb[32 + 64 * k + 4 * i + j];
                            isum += ((q & 0x0F) - 8) * xb->qs[4 * k + j];
                            isum += ((q >> 4) - 8) * xb->qs[16 + 4 * k + j];
                        }
                    }
                } else {
                    for (int k = 0; k < 8; k++)
                        for (int j = 0; j < 4; j++)
                            isum += (int8_t)(gb[32 + 64 * k + 4 * i + j] ^ 0x80) * xb->qs[4 * k + j];
                }
                const float dw = tpk_f16(load_u16(gb + 2 * i));
                if (f64) {
                    const double scale = (double)dw * (double)xb->d;
                    dacc = dacc + (double)isum * scale;
                } else {
                    const float scale = dw * xb->d;
                    const float term = (float)isum * scale;
                    acc = acc + term;
                }
            }
            store_row(y, t * ldy + i, f64, acc, dacc);
        }
    }
}

static void q40_group_scalar(const uint8_t *w, int64_t nb, const tpk_xq *x, int64_t ntok, void *y, int64_t ldy, int nrows) {
    scalar_group(w, nb, x, ntok, y, ldy, nrows, 1, 0);
}
static void q80_group_scalar(const uint8_t *w, int64_t nb, const tpk_xq *x, int64_t ntok, void *y, int64_t ldy, int nrows) {
    scalar_group(w, nb, x, ntok, y, ldy, nrows, 0, 0);
}
static void q40_group_scalar_f64(const uint8_t *w, int64_t nb, const tpk_xq *x, int64_t ntok, void *y, int64_t ldy, int nrows) {
    scalar_group(w, nb, x, ntok, y, ldy, nrows, 1, 1);
}
static void q80_group_scalar_f64(const uint8_t *w, int64_t nb, const tpk_xq *x, int64_t ntok, void *y, int64_t ldy, int nrows) {
    scalar_group(w, nb, x, ntok, y, ldy, nrows, 0, 1);
}

static tpk_group_fn pick_q40(int f64) {
    const int level = tpk_get_level();
    tpk_group_fn fn = NULL;
#if defined(TPK_X86)
    fn = tpk_x86_q40(level, f64);
#elif defined(TPK_ARM64)
    fn = tpk_arm_q40(level, f64);
#endif
    (void)level;
    return fn ? fn : f64 ? q40_group_scalar_f64 : q40_group_scalar;
}

static tpk_group_fn pick_q80(int f64) {
    const int level = tpk_get_level();
    tpk_group_fn fn = NULL;
#if defined(TPK_X86)
    fn = tpk_x86_q80(level, f64);
#elif defined(TPK_ARM64)
    fn = tpk_arm_q80(level, f64);
#endif
    (void)level;
    return fn ? fn : f64 ? q80_group_scalar_f64 : q80_group_scalar;
}

/* ---------------------------------------------------------------- threaded matmul driver */

static void prepare_x(const tpk_block_q80 *x, tpk_xq *out) {
    int32_t s0 = 0, s1 = 0;
    for (int j = 0; j < TPK_QK / 2; j++) {
        out->qs[j] = x->qs[j];
        out->qs[j + TPK_QK / 2] = x->qs[j + TPK_QK / 2];
        s0 += x->qs[j];
        s1 += x->qs[j + TPK_QK / 2];
    }
    const int32_t s = s0 + s1;
    out->d = tpk_f16(x->d);
    out->s8 = -8 * s;
    out->s128 = -128 * s;
    out->sum = s;
    out->s16 = -16 * s;
    out->h0 = -32 * s0;
    out->h1 = -32 * s1;
    out->sdx = (float)s * out->d;
}

/* Activations made ready once per call, in a per-thread buffer that only grows. */
static __thread tpk_xq *xq_buf = NULL;
static __thread int64_t xq_cap = 0;

static tpk_xq *xq_buffer(int64_t n) {
    if (n > xq_cap) {
        free(xq_buf);
        xq_cap = n + n / 4 + 64;
        xq_buf = (tpk_xq *)aligned_alloc(64, ((xq_cap * sizeof(tpk_xq)) + 63) / 64 * 64);
        if (!xq_buf) xq_cap = 0;
    }
    return xq_buf;
}

/* Matrices smaller than this many (group block x token) units run on one thread: below
 * it, waking a second thread costs more than it saves. */
#define TPK_MIN_PARALLEL_WORK 128

/* Several matrices that read the same activations (wq, wk, wv; w1, w3) in one parallel
 * region: their row groups are dealt out to the threads as one list. */
static void matmul_packed(tpk_group_fn fn, int64_t row_group_bytes, int n, const uint8_t *const *wp, const int64_t *rows,
                          int64_t nb, const tpk_block_q80 *x, int64_t ntok, void *const *y, int64_t esize,
                          const int64_t *ldy, int nthreads) {
    if (ntok <= 0 || n <= 0) return;
    int64_t G = 0;
    for (int i = 0; i < n; i++) G += rows[i] > 0 ? groups_of(rows[i]) : 0;
    if (G == 0) return;
    if (nb <= 0) {
        for (int i = 0; i < n; i++)
            for (int64_t t = 0; t < ntok && rows[i] > 0; t++) memset((char *)y[i] + t * ldy[i] * esize, 0, rows[i] * esize);
        return;
    }
    tpk_xq *xq = xq_buffer(ntok * nb);
    if (!xq) abort();
    for (int64_t i = 0; i < ntok * nb; i++) prepare_x(x + i, xq + i);
    int nt = nthreads > 0 ? nthreads : 1;
    if (nt > G) nt = (int)G;
    if (G * nb * ntok < TPK_MIN_PARALLEL_WORK) nt = 1;
    /* Threads claim runs of row groups from a shared counter rather than fixed halves: on a
     * busy machine a thread that starts late finds the work done instead of adding its share
     * after everyone else has finished. Runs are long enough to stream well. */
    const int64_t run = nt > 1 ? (G + 8 * nt - 1) / (8 * nt) : G;
    int64_t next = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads(nt) if (nt > 1)
#endif
    {
        for (;;) {
            int64_t g0;
#ifdef _OPENMP
#pragma omp atomic capture
#endif
            { g0 = next; next += run; }
            if (g0 >= G) break;
            const int64_t g1 = g0 + run < G ? g0 + run : G;
            int64_t first = 0;   /* global index of matrix i's first group */
            for (int i = 0; i < n; i++) {
                const int64_t gi = rows[i] > 0 ? groups_of(rows[i]) : 0;
                const int64_t lo = g0 > first ? g0 - first : 0, hi = g1 - first < gi ? g1 - first : gi;
                for (int64_t g = lo; g < hi; g++) {
                    const int64_t left = rows[i] - g * TPK_ROWS;
                    fn(wp[i] + g * row_group_bytes, nb, xq, ntok, (char *)y[i] + g * TPK_ROWS * esize, ldy[i],
                       left < TPK_ROWS ? (int)left : TPK_ROWS);
                }
                first += gi;
            }
        }
    }
}

void tpk_matmul_q40p(const uint8_t *wp, int64_t rows, int64_t nb,
                     const tpk_block_q80 *x, int64_t ntok, float *y, int64_t ldy, int nthreads) {
    void *out = y;
    matmul_packed(pick_q40(0), nb * TPK_Q40_GROUP_BYTES, 1, &wp, &rows, nb, x, ntok, &out, sizeof(float), &ldy, nthreads);
}

void tpk_matmul_q80p(const uint8_t *wp, int64_t rows, int64_t nb,
                     const tpk_block_q80 *x, int64_t ntok, float *y, int64_t ldy, int nthreads) {
    void *out = y;
    matmul_packed(pick_q80(0), nb * TPK_Q80_GROUP_BYTES, 1, &wp, &rows, nb, x, ntok, &out, sizeof(float), &ldy, nthreads);
}

void tpk_matmul_q40p_f64(const uint8_t *wp, int64_t rows, int64_t nb,
                         const tpk_block_q80 *x, int64_t ntok, double *y, int64_t ldy, int nthreads) {
    void *out = y;
    matmul_packed(pick_q40(1), nb * TPK_Q40_GROUP_BYTES, 1, &wp, &rows, nb, x, ntok, &out, sizeof(double), &ldy, nthreads);
}

void tpk_matmul_q80p_f64(const uint8_t *wp, int64_t rows, int64_t nb,
                         const tpk_block_q80 *x, int64_t ntok, double *y, int64_t ldy, int nthreads) {
    void *out = y;
    matmul_packed(pick_q80(1), nb * TPK_Q80_GROUP_BYTES, 1, &wp, &rows, nb, x, ntok, &out, sizeof(double), &ldy, nthreads);
}

void tpk_matmul_q40p_many(int n, const uint8_t *const *wp, const int64_t *rows, int64_t nb,
                          const tpk_block_q80 *x, int64_t ntok, float *const *y, const int64_t *ldy, int nthreads) {
    matmul_packed(pick_q40(0), nb * TPK_Q40_GROUP_BYTES, n, wp, rows, nb, x, ntok, (void *const *)y, sizeof(float), ldy,
                  nthreads);
}

void tpk_matmul_q80p_many(int n, const uint8_t *const *wp, const int64_t *rows, int64_t nb,
                          const tpk_block_q80 *x, int64_t ntok, float *const *y, const int64_t *ldy, int nthreads) {
    matmul_packed(pick_q80(0), nb * TPK_Q80_GROUP_BYTES, n, wp, rows, nb, x, ntok, (void *const *)y, sizeof(float), ldy,
                  nthreads);
}

/* ---------------------------------------------------------------- every type by its TPK_T_* id */

static tpk_group_fn pick_kq(int type, int f64) {
    const int level = tpk_get_level();
    tpk_group_fn fn = NULL;
#if defined(TPK_X86)
    fn = tpk_x86_kq(type, level, f64);
#elif defined(TPK_ARM64)
    fn = tpk_arm_kq(type, level, f64);
#endif
    (void)level;
    return fn ? fn : tpk_kq_scalar(type, f64);
}

static tpk_group_fn pick(int type, int f64) {
    if (type == TPK_T_Q40) return pick_q40(f64);
    if (type == TPK_T_Q80) return pick_q80(f64);
    return pick_kq(type, f64);
}

/* Bytes of one packed row group (16 rows) of nb 32-column blocks. */
static int64_t row_group_bytes(int type, int64_t nb) {
    if (type == TPK_T_Q40) return nb * TPK_Q40_GROUP_BYTES;
    if (type == TPK_T_Q80) return nb * TPK_Q80_GROUP_BYTES;
    return tpk_kq_row_group_bytes(type, nb);
}

int64_t tpk_packed_bytes(int type, int64_t rows, int64_t nb) {
    if (type < 0 || type >= TPK_NTYPES) return -1;
    return groups_of(rows) * row_group_bytes(type, nb);
}

int tpk_pack_ggml(int type, const uint8_t *w, int64_t row_stride, int64_t rows, int64_t first, int64_t nb,
                  uint8_t *dst) {
    if (type < 0 || type >= TPK_NTYPES || first < 0) return -1;
    if (type == TPK_T_Q40) tpk_pack_q40(w + first * TPK_Q40_BYTES, row_stride, rows, nb, dst);
    else if (type == TPK_T_Q80) tpk_pack_q80(w + first * TPK_Q80_BYTES, row_stride, rows, nb, dst);
    else tpk_kq_pack(type, w, row_stride, rows, first, nb, dst);
    return 0;
}

void tpk_dequantize_packed(int type, const uint8_t *wp, int64_t rows, int64_t nb, float *y) {
    if (type == TPK_T_Q40 || type == TPK_T_Q80) {
        const int64_t bb = type == TPK_T_Q40 ? TPK_Q40_BYTES : TPK_Q80_BYTES;
        uint8_t *row = (uint8_t *)malloc((size_t)(nb * bb) + 1);
        if (!row) abort();
        for (int64_t r = 0; r < rows; r++) {
            /* one row at a time: unpack a 1-row view of group r/16 */
            const uint8_t *grp = wp + (r / TPK_ROWS) * row_group_bytes(type, nb);
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *o = grp + b * (bb == TPK_Q40_BYTES ? TPK_Q40_GROUP_BYTES : TPK_Q80_GROUP_BYTES);
                uint8_t *blk = row + b * bb;
                const int i = (int)(r % TPK_ROWS);
                memcpy(blk, o + 2 * i, 2);
                for (int k = 0; k < (int)(bb - 2) / 4; k++)
                    for (int j = 0; j < 4; j++) blk[2 + 4 * k + j] = o[32 + 64 * k + 4 * i + j] ^ (type == TPK_T_Q80 ? 0x80 : 0);
            }
            if (type == TPK_T_Q40) tpk_dequantize_q40((const tpk_block_q40 *)row, y + r * nb * TPK_QK, nb * TPK_QK);
            else tpk_dequantize_q80((const tpk_block_q80 *)row, y + r * nb * TPK_QK, nb * TPK_QK);
        }
        free(row);
        return;
    }
    tpk_kq_dequantize(type, wp, rows, nb, y);
}

void tpk_matmul_packed(int type, const uint8_t *wp, int64_t rows, int64_t nb, const tpk_block_q80 *x,
                       int64_t ntok, void *y, int64_t ldy, int f64, int nthreads) {
    matmul_packed(pick(type, f64), row_group_bytes(type, nb), 1, &wp, &rows, nb, x, ntok, &y,
                  f64 ? sizeof(double) : sizeof(float), &ldy, nthreads);
}

void tpk_matmul_packed_many(int type, int n, const uint8_t *const *wp, const int64_t *rows, int64_t nb,
                            const tpk_block_q80 *x, int64_t ntok, float *const *y, const int64_t *ldy, int nthreads) {
    matmul_packed(pick(type, 0), row_group_bytes(type, nb), n, wp, rows, nb, x, ntok, (void *const *)y, sizeof(float), ldy,
                  nthreads);
}

/* ---------------------------------------------------------------- bandwidth probe */

static double stream_sum_plain(const float *x, int64_t n) {
    float a[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) a[j] += x[i + j];
    double s = 0.0;
    for (int j = 0; j < 16; j++) s += a[j];
    for (; i < n; i++) s += x[i];
    return s;
}

double tpk_stream_sum(const float *x, int64_t n, int nthreads) {
    double total = 0.0;
    const int nt = nthreads > 0 ? nthreads : 1;
    (void)nt;
#ifdef _OPENMP
#pragma omp parallel num_threads(nt) reduction(+ : total) if (nt > 1)
#endif
    {
        int me = 0, k = 1;
#ifdef _OPENMP
        me = omp_get_thread_num();
        k = omp_get_num_threads();
#endif
        /* chunks of whole 4 KiB pages so threads never share a line */
        const int64_t pages = (n + 1023) / 1024;
        const int64_t p0 = pages * me / k, p1 = pages * (me + 1) / k;
        const int64_t i0 = p0 * 1024 < n ? p0 * 1024 : n, i1 = p1 * 1024 < n ? p1 * 1024 : n;
#if defined(TPK_X86)
        if (tpk_get_level() >= TPK_AVX2) total += tpk_x86_stream_sum(x + i0, i1 - i0);
        else total += stream_sum_plain(x + i0, i1 - i0);
#else
        total += stream_sum_plain(x + i0, i1 - i0);
#endif
    }
    return total;
}

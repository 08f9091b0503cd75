/* tpk: the weight types beyond q40/q80 (q41, q50, q4k, q5k, q6k = GGML Q4_1, Q5_0, Q4_K,
 * Q5_K, Q6_K): decoding their GGML blocks, packing them into the 32-column runtime layout
 * of tpk.h, reading the packed values back (dequantize), and the scalar reference kernel
 * on the packed layout that every SIMD level must match bit for bit. */
#include "tpk_impl.h"

#include <string.h>

/* The 32 values of one row's 32-column block: unsigned quants and their parameters. */
typedef struct {
    uint8_t q[TPK_QK];
    uint16_t d, m;      /* fp16: d; q41 m, or q4k/q5k dmin */
    uint8_t sc, mn;     /* q4k/q5k 6-bit scale and min */
    int8_t sc6[2];      /* q6k scales of elements 0..15 and 16..31 */
} kq_sub;

static inline uint16_t ld16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline void st16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }

int tpk_ggml_block(int type, int *block_bytes) {
    static const int values[TPK_NTYPES] = {32, 32, 32, 32, 256, 256, 256};
    static const int bytes[TPK_NTYPES] = {18, 34, 20, 22, 144, 176, 210};
    if (type < 0 || type >= TPK_NTYPES) return -1;
    if (block_bytes) *block_bytes = bytes[type];
    return values[type];
}

/* ---------------------------------------------------------------- GGML blocks -> sub-blocks */

/* Q4_K/Q5_K: the 6-bit scale and min of sub-block j (0..7) from the 12 packed bytes. */
static void k_scale_min(const uint8_t *s, int j, uint8_t *sc, uint8_t *mn) {
    if (j < 4) {
        *sc = s[j] & 63;
        *mn = s[j + 4] & 63;
    } else {
        *sc = (uint8_t)((s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4));
        *mn = (uint8_t)((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
    }
}

/* Sub-block s (32 values) of one GGML block of type T. */
static void decode(int T, const uint8_t *blk, int s, kq_sub *o) {
    memset(o, 0, sizeof *o);
    switch (T) {
    case TPK_T_Q41:
        o->d = ld16(blk);
        o->m = ld16(blk + 2);
        for (int j = 0; j < 16; j++) {
            o->q[j] = blk[4 + j] & 0x0F;
            o->q[j + 16] = blk[4 + j] >> 4;
        }
        break;
    case TPK_T_Q50: {
        uint32_t qh;
        memcpy(&qh, blk + 2, 4);
        o->d = ld16(blk);
        for (int j = 0; j < 16; j++) {
            o->q[j] = (uint8_t)((blk[6 + j] & 0x0F) | (((qh >> j) & 1) << 4));
            o->q[j + 16] = (uint8_t)((blk[6 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4));
        }
        break;
    }
    case TPK_T_Q4K:
    case TPK_T_Q5K: {
        const int q5 = T == TPK_T_Q5K;
        const uint8_t *qh = blk + 16, *qs = blk + (q5 ? 48 : 16);
        o->d = ld16(blk);
        o->m = ld16(blk + 2);
        k_scale_min(blk + 4, s, &o->sc, &o->mn);
        for (int l = 0; l < 32; l++) {
            o->q[l] = (qs[32 * (s / 2) + l] >> (4 * (s & 1))) & 0x0F;
            if (q5) o->q[l] |= (uint8_t)(((qh[l] >> s) & 1) << 4);
        }
        break;
    }
    case TPK_T_Q6K: {
        const int h = s / 4, c = s % 4;
        const uint8_t *ql = blk + 64 * h + 32 * (c & 1), *qh = blk + 128 + 32 * h;
        o->d = ld16(blk + 208);
        o->sc6[0] = (int8_t)blk[192 + 2 * s];
        o->sc6[1] = (int8_t)blk[192 + 2 * s + 1];
        for (int l = 0; l < 32; l++)
            o->q[l] = (uint8_t)(((ql[l] >> (4 * (c >> 1))) & 0x0F) | (((qh[l] >> (2 * c)) & 3) << 4));
        break;
    }
    }
}

/* ---------------------------------------------------------------- sub-blocks <-> packed layout */

/* Where group block b of a row group (rg, nb group blocks) is, and for the K-quants the
 * header of its span (tpk_impl.h); hdr is NULL for the other types. */
static const uint8_t *locate(int T, const uint8_t *rg, int64_t nb, int64_t b, const uint8_t **hdr) {
    if (!KQ_SPANS(T)) {
        *hdr = NULL;
        return rg + b * KQ_GB(T);
    }
    (void)nb;
    const int phase = rg[0];
    const int64_t s = (b + phase) / KQ_SPAN, b0 = s == 0 ? 0 : s * KQ_SPAN - phase;
    *hdr = rg + KQ_PREFIX + s * KQ_HDR(T) + b0 * KQ_GB(T);
    return rg + KQ_PREFIX + (s + 1) * KQ_HDR(T) + b * KQ_GB(T);
}

/* Row i's d (and m / dmin) live in the group block, or for the K-quants in the span header. */
static void put(int T, uint8_t *gb, uint8_t *hdr, int i, const kq_sub *o) {
    uint8_t *dm = hdr ? hdr : gb;
    st16(dm + 2 * i, o->d);
    if (T == TPK_T_Q41 || KQ_IS_K(T)) st16(dm + 32 + 2 * i, o->m);
    if (KQ_IS_K(T)) {
        gb[KQ_OFF_SC + i] = o->sc;
        gb[KQ_OFF_MN + i] = o->mn;
    }
    if (T == TPK_T_Q6K) {
        gb[KQ_OFF_SC6 + i] = (uint8_t)o->sc6[0];
        gb[KQ_OFF_SC6 + 16 + i] = (uint8_t)o->sc6[1];
    }
    for (int k = 0; k < 4; k++)
        for (int j = 0; j < 4; j++) {
            const uint8_t lo = o->q[4 * k + j], hi = o->q[16 + 4 * k + j];
            gb[KQ_OFF_QS(T) + 64 * k + 4 * i + j] = (uint8_t)((lo & 0x0F) | ((hi & 0x0F) << 4));
        }
    if (KQ_PLANES(T) == 1)
        for (int j = 0; j < 4; j++) {
            uint8_t bits = 0;
            for (int k = 0; k < 4; k++) {
                bits |= (uint8_t)(((o->q[4 * k + j] >> 4) & 1) << k);
                bits |= (uint8_t)(((o->q[16 + 4 * k + j] >> 4) & 1) << (4 + k));
            }
            gb[KQ_OFF_QH(T) + 4 * i + j] = bits;
        }
    if (KQ_PLANES(T) == 2)   /* q6k: bits 4-5 of the low (h = 0) and high (h = 1) elements, 2 per chunk */
        for (int h = 0; h < 2; h++)
            for (int j = 0; j < 4; j++) {
                uint8_t bits = 0;
                for (int k = 0; k < 4; k++) bits |= (uint8_t)(((o->q[16 * h + 4 * k + j] >> 4) & 3) << (2 * k));
                gb[KQ_OFF_QH(T) + 64 * h + 4 * i + j] = bits;
        }
}

static void get(int T, const uint8_t *gb, const uint8_t *hdr, int i, kq_sub *o) {
    const uint8_t *dm = hdr ? hdr : gb;
    memset(o, 0, sizeof *o);
    o->d = ld16(dm + 2 * i);
    if (T == TPK_T_Q41 || KQ_IS_K(T)) o->m = ld16(dm + 32 + 2 * i);
    if (KQ_IS_K(T)) {
        o->sc = gb[KQ_OFF_SC + i];
        o->mn = gb[KQ_OFF_MN + i];
    }
    if (T == TPK_T_Q6K) {
        o->sc6[0] = (int8_t)gb[KQ_OFF_SC6 + i];
        o->sc6[1] = (int8_t)gb[KQ_OFF_SC6 + 16 + i];
    }
    for (int k = 0; k < 4; k++)
        for (int j = 0; j < 4; j++) {
            const uint8_t v = gb[KQ_OFF_QS(T) + 64 * k + 4 * i + j];
            o->q[4 * k + j] = v & 0x0F;
            o->q[16 + 4 * k + j] = v >> 4;
        }
    if (KQ_PLANES(T) == 1)
        for (int j = 0; j < 4; j++) {
            const uint8_t bits = gb[KQ_OFF_QH(T) + 4 * i + j];
            for (int k = 0; k < 4; k++) {
                o->q[4 * k + j] |= (uint8_t)(((bits >> k) & 1) << 4);
                o->q[16 + 4 * k + j] |= (uint8_t)(((bits >> (4 + k)) & 1) << 4);
            }
        }
    if (KQ_PLANES(T) == 2)
        for (int h = 0; h < 2; h++)
            for (int j = 0; j < 4; j++) {
                const uint8_t bits = gb[KQ_OFF_QH(T) + 64 * h + 4 * i + j];
                for (int k = 0; k < 4; k++) o->q[16 * h + 4 * k + j] |= (uint8_t)(((bits >> (2 * k)) & 3) << 4);
            }
}

int64_t tpk_kq_row_group_bytes(int type, int64_t nb) { return kq_row_group_bytes(type, nb); }

void tpk_kq_pack(int T, const uint8_t *w, int64_t row_stride, int64_t rows, int64_t first, int64_t nb, uint8_t *dst) {
    int bb = 1;
    const int per = tpk_ggml_block(T, &bb) / TPK_QK;   /* 32-column blocks per GGML block */
    const int64_t G = (rows + TPK_ROWS - 1) / TPK_ROWS, rgb = kq_row_group_bytes(T, nb);
    kq_sub o;
    for (int64_t g = 0; g < G; g++) {
        uint8_t *rg = dst + g * rgb;
        memset(rg, 0, (size_t)rgb);   /* padding rows and unused headers: all zero, value 0 */
        if (KQ_SPANS(T)) rg[0] = (uint8_t)(first % per);
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *hdr;
            uint8_t *gb = (uint8_t *)locate(T, rg, nb, b, &hdr);
            const int64_t a = first + b;
            for (int i = 0; i < TPK_ROWS && g * TPK_ROWS + i < rows; i++) {
                decode(T, w + (g * TPK_ROWS + i) * row_stride + (a / per) * bb, (int)(a % per), &o);
                put(T, gb, (uint8_t *)hdr, i, &o);
            }
        }
    }
}

/* The values as gguf-py computes them in float32 (tpk.h has the formulas). */
void tpk_kq_dequantize(int T, const uint8_t *wp, int64_t rows, int64_t nb, float *y) {
    kq_sub o;
    const int64_t rgb = kq_row_group_bytes(T, nb);
    for (int64_t r = 0; r < rows; r++)
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *hdr, *gb = locate(T, wp + (r / TPK_ROWS) * rgb, nb, b, &hdr);
            get(T, gb, hdr, (int)(r % TPK_ROWS), &o);
            float *out = y + (r * nb + b) * TPK_QK;
            const float d = tpk_f16(o.d), m = tpk_f16(o.m);
            for (int e = 0; e < TPK_QK; e++) {
                switch (T) {
                case TPK_T_Q41: out[e] = d * (float)o.q[e] + m; break;
                case TPK_T_Q50: out[e] = d * (float)(o.q[e] - 16); break;
                case TPK_T_Q6K: out[e] = (d * (float)o.sc6[e / 16]) * (float)(o.q[e] - 32); break;
                default: out[e] = (d * (float)o.sc) * (float)o.q[e] - m * (float)o.mn; break;
                }
            }
        }
}

/* ---------------------------------------------------------------- scalar reference kernel */

/* The int32 sums of one row's block: isum (scaled by d*dx below) and isum2 (q41's m term,
 * or the K-quants' mn*S; see tpk.h). */
static void block_sums(int T, const kq_sub *o, const tpk_xq *xb, int32_t *isum, int32_t *isum2) {
    int32_t A = 0, B = 0;
    for (int e = 0; e < 16; e++) {
        A += o->q[e] * xb->qs[e];
        B += o->q[16 + e] * xb->qs[16 + e];
    }
    *isum2 = 0;
    switch (T) {
    case TPK_T_Q41: *isum = A + B; *isum2 = xb->sum; break;
    case TPK_T_Q50: *isum = A + B + xb->s16; break;
    case TPK_T_Q6K: *isum = o->sc6[0] * (A + xb->h0) + o->sc6[1] * (B + xb->h1); break;
    default: *isum = o->sc * (A + B); *isum2 = o->mn; break;
    }
}

/* q41, q50: one term per 32-column block. */
static inline void kq_scalar(const uint8_t *w, int64_t nb, const tpk_xq *x, int64_t ntok, void *y, int64_t ldy,
                             int nrows, const int T, const int F64) {
    kq_sub o;
    for (int64_t t = 0; t < ntok; t++)
        for (int i = 0; i < nrows; i++) {
            float acc = 0.0f;
            double dacc = 0.0;
            for (int64_t b = 0; b < nb; b++) {
                const tpk_xq *xb = x + t * nb + b;
                get(T, w + b * KQ_GB(T), NULL, i, &o);
                int32_t isum, isum2;
                block_sums(T, &o, xb, &isum, &isum2);
                const float d = tpk_f16(o.d), m = tpk_f16(o.m);
                if (F64) {
                    double term = (double)isum * ((double)d * (double)xb->d);
                    if (T == TPK_T_Q41) term = term + (double)isum2 * ((double)m * (double)xb->d);
                    dacc = dacc + term;
                } else {
                    float term = (float)isum * (d * xb->d);
                    if (T == TPK_T_Q41) term = term + (float)isum2 * (m * xb->d);
                    acc = acc + term;
                }
            }
            if (F64) ((double *)y)[t * ldy + i] = dacc;
            else ((float *)y)[t * ldy + i] = acc;
        }
}

/* q4k, q5k, q6k: per span, s = sum of isum * dx and (q4k, q5k) m = sum of mn * S*dx over its
 * blocks, then one term d*s - dmin*m (tpk.h). */
static inline void kspan_scalar(const uint8_t *w, int64_t nb, const tpk_xq *x, int64_t ntok, void *y, int64_t ldy,
                                int nrows, const int T, const int F64) {
    kq_sub o;
    const int phase = w[0];
    for (int64_t t = 0; t < ntok; t++)
        for (int i = 0; i < nrows; i++) {
            float acc = 0.0f;
            double dacc = 0.0;
            const uint8_t *p = w + KQ_PREFIX;
            for (int64_t b = 0; b < nb;) {
                const int n = kq_span_len(b, nb, phase);
                const uint8_t *hdr = p;
                p += KQ_HDR(T);
                float s = 0.0f, m = 0.0f;
                double ds = 0.0, dm = 0.0;
                for (int j = 0; j < n; j++, b++, p += KQ_GB(T)) {
                    const tpk_xq *xb = x + t * nb + b;
                    get(T, p, hdr, i, &o);
                    int32_t isum, mn;
                    block_sums(T, &o, xb, &isum, &mn);
                    if (F64) {
                        ds = ds + (double)isum * (double)xb->d;
                        if (KQ_IS_K(T)) dm = dm + (double)mn * ((double)xb->sum * (double)xb->d);
                    } else {
                        s = s + (float)isum * xb->d;
                        if (KQ_IS_K(T)) m = m + (float)mn * xb->sdx;
                    }
                }
                const float d = tpk_f16(ld16(hdr + 2 * i)), dmin = KQ_IS_K(T) ? tpk_f16(ld16(hdr + 32 + 2 * i)) : 0.0f;
                if (F64) dacc = dacc + (KQ_IS_K(T) ? (double)d * ds - (double)dmin * dm : (double)d * ds);
                else acc = acc + (KQ_IS_K(T) ? d * s - dmin * m : d * s);
            }
            if (F64) ((double *)y)[t * ldy + i] = dacc;
            else ((float *)y)[t * ldy + i] = acc;
        }
}

#define SCALAR_FN(name, T, F64)                                                                        \
    static void name(const uint8_t *w, int64_t nb, const tpk_xq *x, int64_t ntok, void *y, int64_t ldy, \
                     int nrows) {                                                                      \
        if (KQ_SPANS(T)) kspan_scalar(w, nb, x, ntok, y, ldy, nrows, T, F64);                          \
        else kq_scalar(w, nb, x, ntok, y, ldy, nrows, T, F64);                                         \
    }
SCALAR_FN(q41_scalar, TPK_T_Q41, 0)
SCALAR_FN(q41_scalar_f64, TPK_T_Q41, 1)
SCALAR_FN(q50_scalar, TPK_T_Q50, 0)
SCALAR_FN(q50_scalar_f64, TPK_T_Q50, 1)
SCALAR_FN(q4k_scalar, TPK_T_Q4K, 0)
SCALAR_FN(q4k_scalar_f64, TPK_T_Q4K, 1)
SCALAR_FN(q5k_scalar, TPK_T_Q5K, 0)
SCALAR_FN(q5k_scalar_f64, TPK_T_Q5K, 1)
SCALAR_FN(q6k_scalar, TPK_T_Q6K, 0)
SCALAR_FN(q6k_scalar_f64, TPK_T_Q6K, 1)

tpk_group_fn tpk_kq_scalar(int type, int f64) {
    switch (type) {
    case TPK_T_Q41: return f64 ? q41_scalar_f64 : q41_scalar;
    case TPK_T_Q50: return f64 ? q50_scalar_f64 : q50_scalar;
    case TPK_T_Q4K: return f64 ? q4k_scalar_f64 : q4k_scalar;
    case TPK_T_Q5K: return f64 ? q5k_scalar_f64 : q5k_scalar;
    case TPK_T_Q6K: return f64 ? q6k_scalar_f64 : q6k_scalar;
    default: return NULL;
    }
}

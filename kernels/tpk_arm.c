/* tpk ARM64 kernels: NEON (every ARMv8-A CPU, e.g. the Raspberry Pi 4's Cortex-A72) and
 * NEON with the dot product instructions (ARMv8.2 dotprod, e.g. the Pi 5's Cortex-A76),
 * chosen at run time from getauxval(AT_HWCAP). The dotprod path carries its own target
 * attribute, so a plain -march=armv8-a build still has it.
 *
 * Same scheme as tpk_x86.c: a register holds 4 rows of a packed row group (one int32
 * lane per row), the 4 activation bytes that match are selected per lane, and per block
 * each lane does the scalar reference's float steps (no FMA) in order. Signed products:
 * q40 nibbles are used as unsigned 0..15 with the -8*sum(x) correction, q80 weights get
 * their sign bit flipped back.
 */
#include "tpk_impl.h"

#if defined(TPK_ARM64)
#include <arm_neon.h>
#include <string.h>
#if defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
#endif

/* GCC: the dotprod code carries its own target, so a plain armv8-a build has it too. Other
 * compilers get it only when the whole build targets dotprod. */
#if defined(__GNUC__) && !defined(__clang__)
#define TPK_HAVE_DOTPROD 1
#define TGT_DOT __attribute__((target("arch=armv8.2-a+dotprod")))
#elif defined(__ARM_FEATURE_DOTPROD)
#define TPK_HAVE_DOTPROD 1
#define TGT_DOT
#endif
#define INLINE static inline __attribute__((always_inline))

int tpk_arm_supports(int level) {
    if (level == TPK_NEON) return 1;
    if (level == TPK_NEON_DOTPROD) {
#if !defined(TPK_HAVE_DOTPROD)
        return 0;
#elif defined(__linux__)
        return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#elif defined(__ARM_FEATURE_DOTPROD)
        return 1;
#else
        return 0;
#endif
    }
    return 0;
}

INLINE uint32_t ld32u(const void *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* 16 fp16 scales -> 4 x float32x4 (FCVTL is in every ARMv8-A). */
INLINE void scales16(const uint8_t *gb, float32x4_t dw[4]) {
    const uint16x8_t h0 = vld1q_u16((const uint16_t *)gb);
    const uint16x8_t h1 = vld1q_u16((const uint16_t *)(gb + 16));
    dw[0] = vcvt_f32_f16(vreinterpret_f16_u16(vget_low_u16(h0)));
    dw[1] = vcvt_f32_f16(vreinterpret_f16_u16(vget_high_u16(h0)));
    dw[2] = vcvt_f32_f16(vreinterpret_f16_u16(vget_low_u16(h1)));
    dw[3] = vcvt_f32_f16(vreinterpret_f16_u16(vget_high_u16(h1)));
}

/* The 16 rows' running sums of one token: float32, or float64 for row-parallel partial sums
 * (F64 is a compile-time constant in every caller). */
typedef struct {
    float32x4_t f[4];
    float64x2_t d[8];
} rowacc;

INLINE void acc_zero(rowacc *a, const int F64) {
    for (int q = 0; q < 4; q++) {
        if (F64) a->d[2 * q] = a->d[2 * q + 1] = vdupq_n_f64(0.0);
        else a->f[q] = vdupq_n_f32(0.0f);
    }
}

INLINE void finish_block(rowacc *a, const int32x4_t isum[4], const float32x4_t dw[4], float dx, const int F64) {
    if (F64) {
        const float64x2_t vdx = vdupq_n_f64((double)dx);
        for (int q = 0; q < 4; q++) {
            const float64x2_t s0 = vmulq_f64(vcvt_f64_f32(vget_low_f32(dw[q])), vdx);
            const float64x2_t s1 = vmulq_f64(vcvt_high_f64_f32(dw[q]), vdx);
            const float64x2_t i0 = vcvtq_f64_s64(vmovl_s32(vget_low_s32(isum[q])));
            const float64x2_t i1 = vcvtq_f64_s64(vmovl_high_s32(isum[q]));
            a->d[2 * q] = vaddq_f64(a->d[2 * q], vmulq_f64(i0, s0));
            a->d[2 * q + 1] = vaddq_f64(a->d[2 * q + 1], vmulq_f64(i1, s1));
        }
    } else {
        const float32x4_t vdx = vdupq_n_f32(dx);
        for (int q = 0; q < 4; q++) {
            const float32x4_t scale = vmulq_f32(dw[q], vdx);
            a->f[q] = vaddq_f32(a->f[q], vmulq_f32(vcvtq_f32_s32(isum[q]), scale));
        }
    }
}

INLINE void store_rows(void *y, int64_t at, const rowacc *a, int nrows, const int F64) {
    if (F64) {
        double tmp[16];
        for (int q = 0; q < 8; q++) vst1q_f64(tmp + 2 * q, a->d[q]);
        memcpy((double *)y + at, tmp, (size_t)nrows * sizeof(double));
    } else {
        float tmp[16];
        for (int q = 0; q < 4; q++) vst1q_f32(tmp + 4 * q, a->f[q]);
        memcpy((float *)y + at, tmp, (size_t)nrows * sizeof(float));
    }
}

#define GROUP_FN(name, tile, TGT, TT, F64)                                                           \
    TGT static void name(const uint8_t *w, int64_t nb, const tpk_xq *x, int64_t ntok, void *y,       \
                         int64_t ldy, int nrows) {                                                   \
        int64_t t = 0;                                                                               \
        for (; t + (TT) <= ntok; t += (TT)) tile(w, nb, x + t * nb, y, t * ldy, ldy, nrows, (TT), F64); \
        if (ntok - t >= 1) tile(w, nb, x + t * nb, y, t * ldy, ldy, nrows, 1, F64);                  \
    }

/* ================================================================ NEON dotprod */
#if defined(TPK_HAVE_DOTPROD)

#define DOT_LANE(acc, w, xv, lane) vdotq_laneq_s32((acc), (w), (xv), (lane))

INLINE TGT_DOT void q40_tile_dot(const uint8_t *w, int64_t nb, const tpk_xq *x, void *y, int64_t at, int64_t ldy,
                                 int nrows, const int TT, const int F64) {
    rowacc out[2];
    for (int t = 0; t < TT; t++) acc_zero(&out[t], F64);
    const uint8x16_t m4 = vdupq_n_u8(0x0F);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *gb = w + b * TPK_Q40_GROUP_BYTES;
        tpk_prefetch_ahead(gb, TPK_Q40_GROUP_BYTES);
        int32x4_t acc[2][4];
        int8x16_t xlo[2], xhi[2];
        for (int t = 0; t < TT; t++) {
            const tpk_xq *xb = x + t * nb + b;
            xlo[t] = vld1q_s8(xb->qs);
            xhi[t] = vld1q_s8(xb->qs + 16);
            for (int q = 0; q < 4; q++) acc[t][q] = vdupq_n_s32(xb->s8);
        }
#define Q40_DOT_K(k)                                                                      \
        for (int q = 0; q < 4; q++) {                                                     \
            const uint8x16_t v = vld1q_u8(gb + 32 + 64 * (k) + 16 * q);                   \
            const int8x16_t lo = vreinterpretq_s8_u8(vandq_u8(v, m4));                    \
            const int8x16_t hi = vreinterpretq_s8_u8(vshrq_n_u8(v, 4));                   \
            for (int t = 0; t < TT; t++) {                                                \
                acc[t][q] = DOT_LANE(acc[t][q], lo, xlo[t], (k));                         \
                acc[t][q] = DOT_LANE(acc[t][q], hi, xhi[t], (k));                         \
            }                                                                             \
        }
        Q40_DOT_K(0) Q40_DOT_K(1) Q40_DOT_K(2) Q40_DOT_K(3)
#undef Q40_DOT_K
        float32x4_t dw[4];
        scales16(gb, dw);
        for (int t = 0; t < TT; t++) finish_block(&out[t], acc[t], dw, x[t * nb + b].d, F64);
    }
    for (int t = 0; t < TT; t++) store_rows(y, at + t * ldy, &out[t], nrows, F64);
}

INLINE TGT_DOT void q80_tile_dot(const uint8_t *w, int64_t nb, const tpk_xq *x, void *y, int64_t at, int64_t ldy,
                                 int nrows, const int TT, const int F64) {
    rowacc out[2];
    for (int t = 0; t < TT; t++) acc_zero(&out[t], F64);
    const uint8x16_t sign = vdupq_n_u8(0x80);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *gb = w + b * TPK_Q80_GROUP_BYTES;
        tpk_prefetch_ahead(gb, TPK_Q80_GROUP_BYTES);
        int32x4_t acc[2][4];
        int8x16_t xlo[2], xhi[2];
        for (int t = 0; t < TT; t++) {
            const tpk_xq *xb = x + t * nb + b;
            xlo[t] = vld1q_s8(xb->qs);
            xhi[t] = vld1q_s8(xb->qs + 16);
            for (int q = 0; q < 4; q++) acc[t][q] = vdupq_n_s32(0);
        }
#define Q80_DOT_K(k, xv, lane)                                                            \
        for (int q = 0; q < 4; q++) {                                                     \
            const int8x16_t v = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(gb + 32 + 64 * (k) + 16 * q), sign)); \
            for (int t = 0; t < TT; t++) acc[t][q] = DOT_LANE(acc[t][q], v, xv[t], (lane)); \
        }
        Q80_DOT_K(0, xlo, 0) Q80_DOT_K(1, xlo, 1) Q80_DOT_K(2, xlo, 2) Q80_DOT_K(3, xlo, 3)
        Q80_DOT_K(4, xhi, 0) Q80_DOT_K(5, xhi, 1) Q80_DOT_K(6, xhi, 2) Q80_DOT_K(7, xhi, 3)
#undef Q80_DOT_K
        float32x4_t dw[4];
        scales16(gb, dw);
        for (int t = 0; t < TT; t++) finish_block(&out[t], acc[t], dw, x[t * nb + b].d, F64);
    }
    for (int t = 0; t < TT; t++) store_rows(y, at + t * ldy, &out[t], nrows, F64);
}

GROUP_FN(q40_group_dot, q40_tile_dot, TGT_DOT, 2, 0)
GROUP_FN(q80_group_dot, q80_tile_dot, TGT_DOT, 2, 0)
GROUP_FN(q40_group_dot_f64, q40_tile_dot, TGT_DOT, 2, 1)
GROUP_FN(q80_group_dot_f64, q80_tile_dot, TGT_DOT, 2, 1)

#endif /* TPK_HAVE_DOTPROD */

/* ================================================================ plain NEON
 * Widening multiplies: vmull_s8 / vmlal_s8 give int16 products of 2 rows x 4 elements
 * (the 4 activation bytes duplicated). q40 accumulates the 8 products a lane gets per
 * block in int16 (at most 8 * 15 * 128 = 15360, no overflow), q80 widens every product
 * pair into int32 with vpadalq_s16. vpaddlq/vpaddq then fold the 4 element positions of
 * a row into its lane. */

INLINE int32x4_t fold_rows16(int16x8_t rows01, int16x8_t rows23) {
    return vpaddq_s32(vpaddlq_s16(rows01), vpaddlq_s16(rows23));
}

INLINE void q40_tile_neon(const uint8_t *w, int64_t nb, const tpk_xq *x, void *y, int64_t at, int64_t ldy,
                          int nrows, const int TT, const int F64) {
    rowacc out[2];
    for (int t = 0; t < TT; t++) acc_zero(&out[t], F64);
    const uint8x16_t m4 = vdupq_n_u8(0x0F);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *gb = w + b * TPK_Q40_GROUP_BYTES;
        tpk_prefetch_ahead(gb, TPK_Q40_GROUP_BYTES);
        int16x8_t a16[2][4][2];
        for (int t = 0; t < TT; t++)
            for (int q = 0; q < 4; q++) a16[t][q][0] = a16[t][q][1] = vdupq_n_s16(0);
        for (int k = 0; k < 4; k++) {
            int8x16_t xl[2], xh[2];
            for (int t = 0; t < TT; t++) {
                const int8_t *xq = x[t * nb + b].qs;
                xl[t] = vreinterpretq_s8_u32(vdupq_n_u32(ld32u(xq + 4 * k)));
                xh[t] = vreinterpretq_s8_u32(vdupq_n_u32(ld32u(xq + 16 + 4 * k)));
            }
            for (int q = 0; q < 4; q++) {
                const uint8x16_t v = vld1q_u8(gb + 32 + 64 * k + 16 * q);
                const int8x16_t lo = vreinterpretq_s8_u8(vandq_u8(v, m4));
                const int8x16_t hi = vreinterpretq_s8_u8(vshrq_n_u8(v, 4));
                for (int t = 0; t < TT; t++) {
                    a16[t][q][0] = vmlal_s8(a16[t][q][0], vget_low_s8(lo), vget_low_s8(xl[t]));
                    a16[t][q][1] = vmlal_high_s8(a16[t][q][1], lo, xl[t]);
                    a16[t][q][0] = vmlal_s8(a16[t][q][0], vget_low_s8(hi), vget_low_s8(xh[t]));
                    a16[t][q][1] = vmlal_high_s8(a16[t][q][1], hi, xh[t]);
                }
            }
        }
        float32x4_t dw[4];
        scales16(gb, dw);
        for (int t = 0; t < TT; t++) {
            const tpk_xq *xb = x + t * nb + b;
            int32x4_t isum[4];
            for (int q = 0; q < 4; q++)
                isum[q] = vaddq_s32(fold_rows16(a16[t][q][0], a16[t][q][1]), vdupq_n_s32(xb->s8));
            finish_block(&out[t], isum, dw, xb->d, F64);
        }
    }
    for (int t = 0; t < TT; t++) store_rows(y, at + t * ldy, &out[t], nrows, F64);
}

INLINE void q80_tile_neon(const uint8_t *w, int64_t nb, const tpk_xq *x, void *y, int64_t at, int64_t ldy,
                          int nrows, const int TT, const int F64) {
    rowacc out[2];
    for (int t = 0; t < TT; t++) acc_zero(&out[t], F64);
    const uint8x16_t sign = vdupq_n_u8(0x80);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *gb = w + b * TPK_Q80_GROUP_BYTES;
        tpk_prefetch_ahead(gb, TPK_Q80_GROUP_BYTES);
        int32x4_t a32[2][4][2];
        for (int t = 0; t < TT; t++)
            for (int q = 0; q < 4; q++) a32[t][q][0] = a32[t][q][1] = vdupq_n_s32(0);
        for (int k = 0; k < 8; k++) {
            int8x16_t xk[2];
            for (int t = 0; t < TT; t++) xk[t] = vreinterpretq_s8_u32(vdupq_n_u32(ld32u(x[t * nb + b].qs + 4 * k)));
            for (int q = 0; q < 4; q++) {
                const int8x16_t v = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(gb + 32 + 64 * k + 16 * q), sign));
                for (int t = 0; t < TT; t++) {
                    a32[t][q][0] = vpadalq_s16(a32[t][q][0], vmull_s8(vget_low_s8(v), vget_low_s8(xk[t])));
                    a32[t][q][1] = vpadalq_s16(a32[t][q][1], vmull_high_s8(v, xk[t]));
                }
            }
        }
        float32x4_t dw[4];
        scales16(gb, dw);
        for (int t = 0; t < TT; t++) {
            int32x4_t isum[4];
            for (int q = 0; q < 4; q++) isum[q] = vpaddq_s32(a32[t][q][0], a32[t][q][1]);
            finish_block(&out[t], isum, dw, x[t * nb + b].d, F64);
        }
    }
    for (int t = 0; t < TT; t++) store_rows(y, at + t * ldy, &out[t], nrows, F64);
}

GROUP_FN(q40_group_neon, q40_tile_neon, , 2, 0)
GROUP_FN(q80_group_neon, q80_tile_neon, , 2, 0)
GROUP_FN(q40_group_neon_f64, q40_tile_neon, , 2, 1)
GROUP_FN(q80_group_neon_f64, q80_tile_neon, , 2, 1)

/* ================================================================ q41, q50, q4k, q5k, q6k
 * One tile per level for every type, T a compile-time TPK_T_* constant (tpk.h has the
 * layout and the per-block formula; tpk_x86.c the same scheme). Chunk k's quants: the
 * nibbles plus the high bits (q50/q5k: a bit plane; q6k: 2-bit pairs) moved into bits 4
 * and 5 by per-byte shifts. The K-quants are walked span by span (KQ_WALK). Elements 0..15
 * (low nibbles) and 16..31 (high) are summed apart, A and B, for q6k, whose halves have
 * their own scales; the other types add both into A (B = 0). Plain NEON keeps the products
 * in int16: q6k 4 per lane and half, at most 4 * 63 * 128 = 32256; the others 8 per lane,
 * at most 8 * 31 * 128 = 31744. */

INLINE uint8x16_t shl8(uint8x16_t v, const int s) { return vshlq_u8(v, vdupq_n_s8((int8_t)s)); }

/* Quants of chunk k of rows 4q..4q+3 (16 bytes): low and high nibble elements. */
INLINE void kq_chunk(const uint8_t *gb, const int k, const int q, uint8x16_t p0, uint8x16_t p1, int8x16_t *lo,
                     int8x16_t *hi, const int T) {
    const uint8x16_t v = vld1q_u8(gb + KQ_OFF_QS(T) + 64 * k + 16 * q);
    uint8x16_t l = vandq_u8(v, vdupq_n_u8(0x0F)), h = vshrq_n_u8(v, 4);
    if (KQ_PLANES(T) == 1) {
        l = vorrq_u8(l, vandq_u8(shl8(p0, 4 - k), vdupq_n_u8(0x10)));
        h = vorrq_u8(h, vandq_u8(shl8(p0, -k), vdupq_n_u8(0x10)));
    }
    if (KQ_PLANES(T) == 2) {   /* q6k: chunk k's 2 bits at bits 2k, 2k+1 of p0 (low), p1 (high) */
        l = vorrq_u8(l, vandq_u8(shl8(p0, 4 - 2 * k), vdupq_n_u8(0x30)));
        h = vorrq_u8(h, vandq_u8(shl8(p1, 4 - 2 * k), vdupq_n_u8(0x30)));
    }
    *lo = vreinterpretq_s8_u8(l);
    *hi = vreinterpretq_s8_u8(h);
}

INLINE void kq_planes(const uint8_t *gb, uint8x16_t p0[4], uint8x16_t p1[4], const int T) {
    for (int q = 0; q < 4; q++) {
        p0[q] = p1[q] = vdupq_n_u8(0);
        if (KQ_PLANES(T) >= 1) p0[q] = vld1q_u8(gb + KQ_OFF_QH(T) + 16 * q);
        if (KQ_PLANES(T) == 2) p1[q] = vld1q_u8(gb + KQ_OFF_QH(T) + 64 + 16 * q);
    }
}

INLINE void widen_u8(const uint8_t *p, int32x4_t out[4]) {
    const uint8x16_t v = vld1q_u8(p);
    const uint16x8_t a = vmovl_u8(vget_low_u8(v)), b = vmovl_u8(vget_high_u8(v));
    out[0] = vreinterpretq_s32_u32(vmovl_u16(vget_low_u16(a)));
    out[1] = vreinterpretq_s32_u32(vmovl_u16(vget_high_u16(a)));
    out[2] = vreinterpretq_s32_u32(vmovl_u16(vget_low_u16(b)));
    out[3] = vreinterpretq_s32_u32(vmovl_u16(vget_high_u16(b)));
}

INLINE void widen_s8(const uint8_t *p, int32x4_t out[4]) {
    const int8x16_t v = vld1q_s8((const int8_t *)p);
    const int16x8_t a = vmovl_s8(vget_low_s8(v)), b = vmovl_s8(vget_high_s8(v));
    out[0] = vmovl_s16(vget_low_s16(a));
    out[1] = vmovl_s16(vget_high_s16(a));
    out[2] = vmovl_s16(vget_low_s16(b));
    out[3] = vmovl_s16(vget_high_s16(b));
}

/* A, B of 16 rows (4 x 4 lanes) -> the block's term, added to one token's sums (q41, q50). */
INLINE void kq_finish(rowacc *a, const int32x4_t A[4], const int32x4_t B[4], const uint8_t *gb, const tpk_xq *xb,
                      const int T, const int F64) {
    float32x4_t dw[4], mw[4];
    int32x4_t isum[4], isum2[4];
    const int TWO = T == TPK_T_Q41;
    scales16(gb, dw);
    if (TWO) scales16(gb + KQ_OFF_M, mw);
    else for (int q = 0; q < 4; q++) mw[q] = dw[q];
    for (int q = 0; q < 4; q++) {
        if (T == TPK_T_Q41) {
            isum[q] = vaddq_s32(A[q], B[q]);
            isum2[q] = vdupq_n_s32(xb->sum);
        } else {
            isum[q] = vaddq_s32(vaddq_s32(A[q], B[q]), vdupq_n_s32(xb->s16));
            isum2[q] = vdupq_n_s32(0);
        }
    }
    const float dx = xb->d;
    if (F64) {
        const float64x2_t vdx = vdupq_n_f64((double)dx);
        for (int q = 0; q < 4; q++)
            for (int h = 0; h < 2; h++) {
                const float64x2_t dd = vmulq_f64(h ? vcvt_high_f64_f32(dw[q]) : vcvt_f64_f32(vget_low_f32(dw[q])), vdx);
                const int64x2_t i1 = h ? vmovl_high_s32(isum[q]) : vmovl_s32(vget_low_s32(isum[q]));
                float64x2_t t = vmulq_f64(vcvtq_f64_s64(i1), dd);
                if (TWO) {
                    const float64x2_t md = vmulq_f64(h ? vcvt_high_f64_f32(mw[q]) : vcvt_f64_f32(vget_low_f32(mw[q])), vdx);
                    const int64x2_t i2 = h ? vmovl_high_s32(isum2[q]) : vmovl_s32(vget_low_s32(isum2[q]));
                    t = vaddq_f64(t, vmulq_f64(vcvtq_f64_s64(i2), md));
                }
                a->d[2 * q + h] = vaddq_f64(a->d[2 * q + h], t);
            }
    } else {
        const float32x4_t vdx = vdupq_n_f32(dx);
        for (int q = 0; q < 4; q++) {
            float32x4_t t = vmulq_f32(vcvtq_f32_s32(isum[q]), vmulq_f32(dw[q], vdx));
            if (TWO) t = vaddq_f32(t, vmulq_f32(vcvtq_f32_s32(isum2[q]), vmulq_f32(mw[q], vdx)));
            a->f[q] = vaddq_f32(a->f[q], t);
        }
    }
}

/* q4k, q5k, q6k (tpk_x86.c has the scheme): one block's A, B of 16 rows, the scales applied,
 * into the span's sums s += (float)isum * dx and m += (float)mn * (S*dx). */
INLINE void kspan_block(rowacc *s, rowacc *m, const int32x4_t A[4], const int32x4_t B[4], const uint8_t *gb,
                        const tpk_xq *xb, const int T, const int F64) {
    int32x4_t isum[4], mn[4];
    if (T == TPK_T_Q6K) {
        int32x4_t s0[4], s1[4];
        widen_s8(gb + KQ_OFF_SC6, s0);
        widen_s8(gb + KQ_OFF_SC6 + 16, s1);
        for (int q = 0; q < 4; q++)
            isum[q] = vaddq_s32(vmulq_s32(s0[q], vaddq_s32(A[q], vdupq_n_s32(xb->h0))),
                                vmulq_s32(s1[q], vaddq_s32(B[q], vdupq_n_s32(xb->h1))));
    } else {
        int32x4_t sc[4];
        widen_u8(gb + KQ_OFF_SC, sc);
        widen_u8(gb + KQ_OFF_MN, mn);
        for (int q = 0; q < 4; q++) isum[q] = vmulq_s32(sc[q], vaddq_s32(A[q], B[q]));
    }
    if (F64) {
        const float64x2_t vdx = vdupq_n_f64((double)xb->d), vsdx = vdupq_n_f64((double)xb->sum * (double)xb->d);
        for (int q = 0; q < 4; q++)
            for (int h = 0; h < 2; h++) {
                const int64x2_t i1 = h ? vmovl_high_s32(isum[q]) : vmovl_s32(vget_low_s32(isum[q]));
                s->d[2 * q + h] = vaddq_f64(s->d[2 * q + h], vmulq_f64(vcvtq_f64_s64(i1), vdx));
                if (KQ_IS_K(T)) {
                    const int64x2_t i2 = h ? vmovl_high_s32(mn[q]) : vmovl_s32(vget_low_s32(mn[q]));
                    m->d[2 * q + h] = vaddq_f64(m->d[2 * q + h], vmulq_f64(vcvtq_f64_s64(i2), vsdx));
                }
            }
    } else {
        const float32x4_t vdx = vdupq_n_f32(xb->d), vsdx = vdupq_n_f32(xb->sdx);
        for (int q = 0; q < 4; q++) {
            s->f[q] = vaddq_f32(s->f[q], vmulq_f32(vcvtq_f32_s32(isum[q]), vdx));
            if (KQ_IS_K(T)) m->f[q] = vaddq_f32(m->f[q], vmulq_f32(vcvtq_f32_s32(mn[q]), vsdx));
        }
    }
}

/* The span's end: out += d*s - dmin*m (q6k: d*s). */
INLINE void kspan_end(rowacc *out, const rowacc *s, const rowacc *m, const uint8_t *hdr, const int T, const int F64) {
    float32x4_t d[4], dmin[4];
    scales16(hdr, d);
    if (KQ_IS_K(T)) scales16(hdr + 32, dmin);
    for (int q = 0; q < 4; q++) {
        if (F64) {
            for (int h = 0; h < 2; h++) {
                const float64x2_t dd = h ? vcvt_high_f64_f32(d[q]) : vcvt_f64_f32(vget_low_f32(d[q]));
                float64x2_t t = vmulq_f64(dd, s->d[2 * q + h]);
                if (KQ_IS_K(T)) {
                    const float64x2_t md = h ? vcvt_high_f64_f32(dmin[q]) : vcvt_f64_f32(vget_low_f32(dmin[q]));
                    t = vsubq_f64(t, vmulq_f64(md, m->d[2 * q + h]));
                }
                out->d[2 * q + h] = vaddq_f64(out->d[2 * q + h], t);
            }
        } else {
            float32x4_t t = vmulq_f32(d[q], s->f[q]);
            if (KQ_IS_K(T)) t = vsubq_f32(t, vmulq_f32(dmin[q], m->f[q]));
            out->f[q] = vaddq_f32(out->f[q], t);
        }
    }
}

/* Walks the blocks of a row group: q41/q50 one after another; the K-quants span by span
 * (tpk_impl.h), their sums s, m restarted per span and folded in at its end. SUMS computes
 * the block at gb (index b) into A[t], B[t] for every token. */
#define KQ_WALK(T, TT, F64, SUMS)                                                              \
    do {                                                                                        \
        rowacc s_[2], m_[2];                                                                    \
        const int spans_ = KQ_SPANS(T), phase_ = spans_ ? w[0] : 0;                             \
        const uint8_t *p_ = w + (spans_ ? KQ_PREFIX : 0);                                       \
        for (int64_t b = 0; b < nb;) {                                                          \
            const int n_ = spans_ ? kq_span_len(b, nb, phase_) : 1;                             \
            const uint8_t *hdr_ = p_;                                                           \
            if (spans_) {                                                                       \
                p_ += KQ_HDR(T);                                                                \
                for (int t = 0; t < TT; t++) {                                                  \
                    acc_zero(&s_[t], F64);                                                      \
                    acc_zero(&m_[t], F64);                                                      \
                }                                                                               \
            }                                                                                   \
            for (int j_ = 0; j_ < n_; j_++, b++, p_ += KQ_GB(T)) {                              \
                const uint8_t *gb = p_;                                                         \
                tpk_prefetch_ahead(gb, KQ_GB(T));                                               \
                int32x4_t A[2][4], B[2][4];                                                     \
                SUMS(gb, x, nb, b, A, B, TT, T);                                                \
                for (int t = 0; t < TT; t++) {                                                  \
                    if (spans_) kspan_block(&s_[t], &m_[t], A[t], B[t], gb, x + t * nb + b, T, F64); \
                    else kq_finish(&out[t], A[t], B[t], gb, x + t * nb + b, T, F64);            \
                }                                                                               \
            }                                                                                   \
            if (spans_)                                                                         \
                for (int t = 0; t < TT; t++) kspan_end(&out[t], &s_[t], &m_[t], hdr_, T, F64);  \
        }                                                                                       \
    } while (0)

/* A[t], B[t] of one block: the dot product instructions, one 16-byte activation half per token. */
#if defined(TPK_HAVE_DOTPROD)
INLINE TGT_DOT void kq_dot_sums(const uint8_t *gb, const tpk_xq *x, int64_t nb, int64_t b, int32x4_t A[2][4],
                                int32x4_t B[2][4], const int TT, const int T) {
    uint8x16_t p0[4], p1[4];
    kq_planes(gb, p0, p1, T);
    int8x16_t xlo[2], xhi[2];
    for (int t = 0; t < TT; t++) {
        xlo[t] = vld1q_s8(x[t * nb + b].qs);
        xhi[t] = vld1q_s8(x[t * nb + b].qs + 16);
        for (int q = 0; q < 4; q++) A[t][q] = B[t][q] = vdupq_n_s32(0);
    }
#define KQ_DOT_K(k)                                                             \
    for (int q = 0; q < 4; q++) {                                               \
        int8x16_t lo, hi;                                                       \
        kq_chunk(gb, (k), q, p0[q], p1[q], &lo, &hi, T);                        \
        for (int t = 0; t < TT; t++) {                                          \
            A[t][q] = vdotq_laneq_s32(A[t][q], lo, xlo[t], (k));                \
            if (KQ_MERGE(T)) A[t][q] = vdotq_laneq_s32(A[t][q], hi, xhi[t], (k)); \
            else B[t][q] = vdotq_laneq_s32(B[t][q], hi, xhi[t], (k));           \
        }                                                                       \
    }
    KQ_DOT_K(0) KQ_DOT_K(1) KQ_DOT_K(2) KQ_DOT_K(3)
#undef KQ_DOT_K
}

INLINE TGT_DOT void kq_tile_dot(const uint8_t *w, int64_t nb, const tpk_xq *x, void *y, int64_t at, int64_t ldy,
                                int nrows, const int TT, const int F64, const int T) {
    rowacc out[2];
    for (int t = 0; t < TT; t++) acc_zero(&out[t], F64);
    KQ_WALK(T, TT, F64, kq_dot_sums);
    for (int t = 0; t < TT; t++) store_rows(y, at + t * ldy, &out[t], nrows, F64);
}
#endif

/* The same with plain NEON: int16 products (bounds above), folded to int32 per block. */
INLINE void kq_neon_sums(const uint8_t *gb, const tpk_xq *x, int64_t nb, int64_t b, int32x4_t A[2][4],
                         int32x4_t B[2][4], const int TT, const int T) {
    uint8x16_t p0[4], p1[4];
    kq_planes(gb, p0, p1, T);
    int16x8_t a16[2][4][2], b16[2][4][2];
    for (int t = 0; t < TT; t++)
        for (int q = 0; q < 4; q++) a16[t][q][0] = a16[t][q][1] = b16[t][q][0] = b16[t][q][1] = vdupq_n_s16(0);
    for (int k = 0; k < 4; k++) {
        int8x16_t xl[2], xh[2];
        for (int t = 0; t < TT; t++) {
            const int8_t *xq = x[t * nb + b].qs;
            xl[t] = vreinterpretq_s8_u32(vdupq_n_u32(ld32u(xq + 4 * k)));
            xh[t] = vreinterpretq_s8_u32(vdupq_n_u32(ld32u(xq + 16 + 4 * k)));
        }
        for (int q = 0; q < 4; q++) {
            int8x16_t lo, hi;
            kq_chunk(gb, k, q, p0[q], p1[q], &lo, &hi, T);
            for (int t = 0; t < TT; t++) {
                a16[t][q][0] = vmlal_s8(a16[t][q][0], vget_low_s8(lo), vget_low_s8(xl[t]));
                a16[t][q][1] = vmlal_high_s8(a16[t][q][1], lo, xl[t]);
                int16x8_t *hb = KQ_MERGE(T) ? a16[t][q] : b16[t][q];
                hb[0] = vmlal_s8(hb[0], vget_low_s8(hi), vget_low_s8(xh[t]));
                hb[1] = vmlal_high_s8(hb[1], hi, xh[t]);
            }
        }
    }
    for (int t = 0; t < TT; t++)
        for (int q = 0; q < 4; q++) {
            A[t][q] = fold_rows16(a16[t][q][0], a16[t][q][1]);
            B[t][q] = KQ_MERGE(T) ? vdupq_n_s32(0) : fold_rows16(b16[t][q][0], b16[t][q][1]);
        }
}

INLINE void kq_tile_neon(const uint8_t *w, int64_t nb, const tpk_xq *x, void *y, int64_t at, int64_t ldy,
                         int nrows, const int TT, const int F64, const int T) {
    rowacc out[2];
    for (int t = 0; t < TT; t++) acc_zero(&out[t], F64);
    KQ_WALK(T, TT, F64, kq_neon_sums);
    for (int t = 0; t < TT; t++) store_rows(y, at + t * ldy, &out[t], nrows, F64);
}

#define KQ_GROUP_FN(name, tile, TGT, TT, F64, T)                                                        \
    TGT static void name(const uint8_t *w, int64_t nb, const tpk_xq *x, int64_t ntok, void *y,          \
                         int64_t ldy, int nrows) {                                                      \
        int64_t t = 0;                                                                                  \
        for (; t + (TT) <= ntok; t += (TT)) tile(w, nb, x + t * nb, y, t * ldy, ldy, nrows, (TT), F64, T); \
        if (ntok - t >= 1) tile(w, nb, x + t * nb, y, t * ldy, ldy, nrows, 1, F64, T);                 \
    }

#if defined(TPK_HAVE_DOTPROD)
#define KQ_DOT_FNS(t, T)                                          \
    KQ_GROUP_FN(t##_group_dot, kq_tile_dot, TGT_DOT, 2, 0, T)     \
    KQ_GROUP_FN(t##_group_dot_f64, kq_tile_dot, TGT_DOT, 2, 1, T)
#define KQ_DOT_CASE(t) case TPK_NEON_DOTPROD: return f64 ? t##_group_dot_f64 : t##_group_dot;
#else
#define KQ_DOT_FNS(t, T)
#define KQ_DOT_CASE(t)
#endif

#define KQ_TYPE_FNS(t, T)                                          \
    KQ_DOT_FNS(t, T)                                               \
    KQ_GROUP_FN(t##_group_neon, kq_tile_neon, , 2, 0, T)           \
    KQ_GROUP_FN(t##_group_neon_f64, kq_tile_neon, , 2, 1, T)       \
    static tpk_group_fn t##_pick(int level, int f64) {             \
        switch (level) {                                           \
        KQ_DOT_CASE(t)                                             \
        case TPK_NEON: return f64 ? t##_group_neon_f64 : t##_group_neon; \
        default: return NULL;                                      \
        }                                                          \
    }

KQ_TYPE_FNS(q41, TPK_T_Q41)
KQ_TYPE_FNS(q50, TPK_T_Q50)
KQ_TYPE_FNS(q4k, TPK_T_Q4K)
KQ_TYPE_FNS(q5k, TPK_T_Q5K)
KQ_TYPE_FNS(q6k, TPK_T_Q6K)

tpk_group_fn tpk_arm_kq(int type, int level, int f64) {
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
 * The scalar reference's steps on 4 lanes (see tpk_x86.c): amax, d and id as scalars,
 * x * id, roundf as floor(|v|) + (fraction >= 0.5) with v's sign; the conversion
 * saturates and the narrowing truncates, like the scalar (int8_t) cast on AArch64. */
void tpk_arm_quantize_q80(const float *x, tpk_block_q80 *y, int64_t n) {
    const float32x4_t half = vdupq_n_f32(0.5f), one = vdupq_n_f32(1.0f);
    for (int64_t i = 0; i < n / TPK_QK; i++) {
        float32x4_t v[8];
        float32x4_t m = vdupq_n_f32(0.0f);
        for (int q = 0; q < 8; q++) {
            v[q] = vld1q_f32(x + i * TPK_QK + 4 * q);
            m = vmaxq_f32(m, vabsq_f32(v[q]));
        }
        const float amax = vmaxvq_f32(m);
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = tpk_fp32_to_fp16(d);
        const float32x4_t vid = vdupq_n_f32(id);
        int16x8_t h[4];
        for (int q = 0; q < 8; q += 2) {
            int32x4_t r32[2];
            for (int e = 0; e < 2; e++) {
                const float32x4_t s = vmulq_f32(v[q + e], vid);
                const float32x4_t a = vabsq_f32(s);
                const float32x4_t fl = vrndmq_f32(a);
                const uint32x4_t up = vcgeq_f32(vsubq_f32(a, fl), half);
                const float32x4_t r = vaddq_f32(fl, vreinterpretq_f32_u32(vandq_u32(up, vreinterpretq_u32_f32(one))));
                const uint32x4_t sign = vandq_u32(vreinterpretq_u32_f32(s), vdupq_n_u32(0x80000000u));
                r32[e] = vcvtq_s32_f32(vreinterpretq_f32_u32(vorrq_u32(vreinterpretq_u32_f32(r), sign)));
            }
            h[q / 2] = vcombine_s16(vmovn_s32(r32[0]), vmovn_s32(r32[1]));
        }
        vst1q_s8(y[i].qs, vcombine_s8(vmovn_s16(h[0]), vmovn_s16(h[1])));
        vst1q_s8(y[i].qs + 16, vcombine_s8(vmovn_s16(h[2]), vmovn_s16(h[3])));
    }
}

tpk_group_fn tpk_arm_q40(int level, int f64) {
    switch (level) {
#if defined(TPK_HAVE_DOTPROD)
    case TPK_NEON_DOTPROD: return f64 ? q40_group_dot_f64 : q40_group_dot;
#endif
    case TPK_NEON: return f64 ? q40_group_neon_f64 : q40_group_neon;
    default: return NULL;
    }
}

tpk_group_fn tpk_arm_q80(int level, int f64) {
    switch (level) {
#if defined(TPK_HAVE_DOTPROD)
    case TPK_NEON_DOTPROD: return f64 ? q80_group_dot_f64 : q80_group_dot;
#endif
    case TPK_NEON: return f64 ? q80_group_neon_f64 : q80_group_neon;
    default: return NULL;
    }
}

/* float16 -> float32, 4 at a time (fcvtl is exact, like the scalar table) */
void tpk_arm_widen_f16(const uint16_t *h, int64_t n, float *y) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(y + i, vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(h + i))));
    for (; i < n; i++) y[i] = tpk_f16(h[i]);
}

#endif /* TPK_ARM64 */

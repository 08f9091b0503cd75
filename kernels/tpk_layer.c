/* tpk layer: a sublayer's kernels in one call (see tpk_layer.h). Each step below is the
 * call tpllama/model.py makes for it, with the same arguments. */
#include "tpk_layer.h"

#include <string.h>
#include <time.h>

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* phase timing: `mark` starts a step, `charge` adds the time since to a phase (no-ops untimed) */
typedef struct { int64_t *ns, t; } phase_clock;
static void mark(phase_clock *c) { if (c->ns) c->t = now_ns(); }
static void charge(phase_clock *c, int phase) {
    if (!c->ns) return;
    const int64_t t = now_ns();
    c->ns[phase] += t - c->t;
    c->t = t;
}

static int64_t align64(int64_t n) { return (n + 63) / 64 * 64; }

/* take `bytes` from a scratch area */
static void *carve(uint8_t **at, int64_t bytes) {
    void *p = *at;
    *at += align64(bytes);
    return p;
}

static int64_t q80_bytes(int64_t T, int64_t n) { return T * (n / TPK_QK) * TPK_Q80_BYTES; }

/* the q80 blocks of T rows of n (n a multiple of 32, so no block spans two rows: one call) */
static void quantize_rows(const float *x, uint8_t *q, int64_t T, int64_t n) {
    tpk_quantize_q80(x, (tpk_block_q80 *)q, T * n);
}

/* y += a over n floats (numpy's float32 +=) */
static void add_into(float *y, const float *a, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = y[i] + a[i];
}

/* x += add, then h = rmsnorm(x) * norm and its q80 rows (model.py: settle, rmsnorm, Activation.q80) */
static void add_norm_quantize(float *x, const float *add, int64_t T, int64_t dim, const float *norm, float eps,
                              float *h, uint8_t *hq, int nthreads, phase_clock *clk) {
    mark(clk);
    if (add) add_into(x, add, T * dim);
    tpk_rmsnorm(x, norm, h, T, dim, eps, nthreads);
    charge(clk, TPK_PHASE_NORM);
    quantize_rows(h, hq, T, dim);
    charge(clk, TPK_PHASE_QUANTIZE);
}

/* y_i = m_i . xq (T rows, float32, row stride m_i.rows) for matrices reading the same input:
 * one parallel region when they share a type (matrix.py: matmul_all), else one call each */
static void matmul_all(int n, const tpk_matrix *const *m, const uint8_t *xq, int64_t T, float *const *y,
                       int nthreads) {
    int same = n > 1;
    for (int i = 1; i < n; i++) same = same && m[i]->type == m[0]->type && m[i]->nb == m[0]->nb;
    if (same) {
        const uint8_t *wp[8];
        int64_t rows[8];
        for (int i = 0; i < n; i++) wp[i] = m[i]->data, rows[i] = m[i]->rows;
        tpk_matmul_packed_many(m[0]->type, n, wp, rows, m[0]->nb, (const tpk_block_q80 *)xq, T, y, rows, nthreads);
        return;
    }
    for (int i = 0; i < n; i++)
        if (m[i]->rows)
            tpk_matmul_packed(m[i]->type, m[i]->data, m[i]->rows, m[i]->nb, (const tpk_block_q80 *)xq, T, y[i],
                              m[i]->rows, 0, nthreads);
}

/* out = m . xq in float64 partial sums (matrix.py: Matrix.partial_sums) */
static void partial_sums(const tpk_matrix *m, const uint8_t *xq, int64_t T, double *out, int nthreads) {
    tpk_matmul_packed(m->type, m->data, m->rows, m->nb, (const tpk_block_q80 *)xq, T, out, m->rows, 1, nthreads);
}

/* y[t] += b for each of T rows of n */
static void add_rows(float *y, const float *b, int64_t T, int64_t n) {
    for (int64_t t = 0; t < T; t++) add_into(y + t * n, b, n);
}

int64_t tpk_attention_sublayer_work(const tpk_attention_sublayer *s, int64_t T) {
    const int64_t qw = s->n_heads * s->hd, kw = s->n_kv * s->hd;
    return align64(4 * T * s->dim) + align64(q80_bytes(T, s->dim)) + align64(4 * T * qw) + 2 * align64(4 * T * kw) +
           align64(4 * T * qw) + align64(q80_bytes(T, qw));
}

int64_t tpk_ffn_sublayer_work(const tpk_ffn_sublayer *s, int64_t T) {
    return align64(4 * T * s->dim) + align64(q80_bytes(T, s->dim)) + 2 * align64(4 * T * s->hidden) +
           align64(q80_bytes(T, s->hidden));
}

/* each segment's rows attend over their own slot (model.py: RankModel.attend, segment by segment) */
static void attend_segments(const tpk_attention_sublayer *s, const float *q, const float *k, const float *v,
                            const tpk_kv_layer *cache, const tpk_segment *segs, int64_t nseg, float *o,
                            int nthreads) {
    const int64_t qw = s->n_heads * s->hd, kw = s->n_kv * s->hd;
    int64_t row = 0;
    for (int64_t i = 0; i < nseg; i++) {
        const tpk_segment g = segs[i];
        if (s->n_heads && g.rows)   /* a rank may hold no heads (then no kv heads either) */
            tpk_attention(q + row * qw, s->n_kv ? k + row * kw : NULL, s->n_kv ? v + row * kw : NULL, g.rows,
                          s->n_heads, s->n_kv, s->hd, s->kv_of_head, (char *)cache->k + g.slot * cache->slot_bytes,
                          (char *)cache->v + g.slot * cache->slot_bytes, cache->f16, cache->head_stride,
                          cache->block_stride, g.start, s->window, s->scale, o + row * qw, nthreads);
        row += g.rows;
    }
}

void tpk_attention_sublayer_run(const tpk_attention_sublayer *s, float *x, const float *add, int64_t T,
                                const float *cos_t, const float *sin_t, const tpk_kv_layer *cache,
                                const tpk_segment *segs, int64_t nseg, double *out, uint8_t *work, int nthreads,
                                int64_t *phase_ns) {
    const int64_t qw = s->n_heads * s->hd, kw = s->n_kv * s->hd;
    phase_clock clk = {phase_ns, 0};
    uint8_t *at = work;
    float *h = carve(&at, 4 * T * s->dim);
    uint8_t *hq = carve(&at, q80_bytes(T, s->dim));
    float *q = carve(&at, 4 * T * qw), *k = carve(&at, 4 * T * kw), *v = carve(&at, 4 * T * kw);
    float *o = carve(&at, 4 * T * qw);
    uint8_t *oq = carve(&at, q80_bytes(T, qw));

    add_norm_quantize(x, add, T, s->dim, s->norm, s->eps, h, hq, nthreads, &clk);
    const tpk_matrix *qkv[3] = {&s->wq, &s->wk, &s->wv};
    float *const qkv_out[3] = {q, k, v};
    matmul_all(3, qkv, hq, T, qkv_out, nthreads);
    charge(&clk, TPK_PHASE_MATMUL);
    if (s->bq) {
        add_rows(q, s->bq, T, qw);
        add_rows(k, s->bk, T, kw);
        add_rows(v, s->bv, T, kw);
    }
    if (s->q_norm) {   /* each head's hd values as a row (model.py: head_rmsnorm) */
        tpk_rmsnorm(q, s->q_norm, q, T * s->n_heads, s->hd, s->eps, nthreads);
        tpk_rmsnorm(k, s->k_norm, k, T * s->n_kv, s->hd, s->eps, nthreads);
    }
    charge(&clk, TPK_PHASE_NORM);
    tpk_rope(q, T, s->n_heads, s->hd, cos_t, sin_t);
    tpk_rope(k, T, s->n_kv, s->hd, cos_t, sin_t);
    charge(&clk, TPK_PHASE_ROPE);
    attend_segments(s, q, k, v, cache, segs, nseg, o, nthreads);
    charge(&clk, TPK_PHASE_ATTENTION);
    quantize_rows(o, oq, T, qw);
    charge(&clk, TPK_PHASE_QUANTIZE);
    partial_sums(&s->wo, oq, T, out, nthreads);
    charge(&clk, TPK_PHASE_MATMUL);
}

void tpk_ffn_sublayer_run(const tpk_ffn_sublayer *s, float *x, const float *add, int64_t T, double *out,
                          uint8_t *work, int nthreads, int64_t *phase_ns) {
    phase_clock clk = {phase_ns, 0};
    uint8_t *at = work;
    float *h = carve(&at, 4 * T * s->dim);
    uint8_t *hq = carve(&at, q80_bytes(T, s->dim));
    float *gate = carve(&at, 4 * T * s->hidden), *up = carve(&at, 4 * T * s->hidden);
    uint8_t *gq = carve(&at, q80_bytes(T, s->hidden));

    add_norm_quantize(x, add, T, s->dim, s->norm, s->eps, h, hq, nthreads, &clk);
    const tpk_matrix *gate_up[2] = {&s->w1, &s->w3};
    float *const gate_up_out[2] = {gate, up};
    matmul_all(2, gate_up, hq, T, gate_up_out, nthreads);
    charge(&clk, TPK_PHASE_MATMUL);
    tpk_silu_mul(gate, up, gate, T * s->hidden, nthreads);
    charge(&clk, TPK_PHASE_SILU);
    quantize_rows(gate, gq, T, s->hidden);
    charge(&clk, TPK_PHASE_QUANTIZE);
    partial_sums(&s->w2, gq, T, out, nthreads);
    charge(&clk, TPK_PHASE_MATMUL);
}

/* total = partial rounded to float32, as the reduce of one rank (numpy's astype) does */
static void round_totals(const double *partial, float *total, int64_t n) {
    for (int64_t i = 0; i < n; i++) total[i] = (float)partial[i];
}

void tpk_layers_run(int n, const tpk_attention_sublayer *const *att, const tpk_ffn_sublayer *const *ffn,
                    const tpk_kv_layer *cache, float *x, int64_t T, const float *cos_t, const float *sin_t,
                    const tpk_segment *segs, int64_t nseg, double *partial, float *total, uint8_t *work,
                    int nthreads, int64_t *phase_ns) {
    if (n <= 0) return;
    const int64_t size = T * att[0]->dim;
    for (int i = 0; i < n; i++) {
        tpk_attention_sublayer_run(att[i], x, i ? total : NULL, T, cos_t, sin_t, &cache[i], segs, nseg, partial,
                                   work, nthreads, phase_ns);
        round_totals(partial, total, size);
        tpk_ffn_sublayer_run(ffn[i], x, total, T, partial, work, nthreads, phase_ns);
        round_totals(partial, total, size);
    }
    add_into(x, total, size);
}

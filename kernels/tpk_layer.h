/* tpk layer: a Llama sublayer's kernel calls made in one C call, for short passes (a decode
 * step) whose Python between the kernels would otherwise cost 5-12% of the step: each weight
 * matrix streamed from memory evicts the interpreter's data from the caches, so every Python
 * step after a matmul runs cold. The only C that knows a layer's order of operations; it
 * makes exactly the calls tpllama/model.py makes one by one (same kernels, same arguments,
 * same order), so it gives the same bits, and model.py stays the reference. */
#ifndef TPK_LAYER_H
#define TPK_LAYER_H

#include "tpk.h"

typedef struct {           /* a packed weight matrix (tpk.h's runtime layout) */
    int type;              /* TPK_T_* */
    const uint8_t *data;
    int64_t rows, nb;      /* output rows, 32-column blocks of input */
} tpk_matrix;

typedef struct {           /* one rank's share of an attention sublayer */
    const float *norm;     /* (dim,) */
    tpk_matrix wq, wk, wv, wo;
    int64_t dim, n_heads, n_kv, hd, window;
    const int32_t *kv_of_head;   /* (n_heads,): the local kv head each local query head reads */
    const float *bq, *bk, *bv;   /* NULL, or biases added to q, k, v (Qwen2) */
    const float *q_norm, *k_norm;   /* NULL, or (hd,) RMSNorm weights of every q and k head (Qwen3) */
    float eps, scale;
} tpk_attention_sublayer;

typedef struct {           /* one rank's share of an FFN sublayer: w2(silu(w1 h) * w3 h) */
    const float *norm;     /* (dim,) */
    tpk_matrix w1, w3, w2;
    int64_t dim, hidden;
    float eps;
} tpk_ffn_sublayer;

typedef struct {           /* where a layer lives in a KV cache of slots (tpk_attention's arguments) */
    void *k, *v;           /* slot 0's */
    int f16;
    int64_t head_stride, block_stride, ctx;
    int64_t slot_bytes;    /* from one slot's layer to the next slot's */
} tpk_kv_layer;

typedef struct {           /* consecutive rows of a pass that belong to one sequence (model.Segment) */
    int64_t slot, start, rows;   /* its cache slot, the position of its first row */
} tpk_segment;

/* Time spent by kind of kernel, in ns, added to when a sublayer is given a timing array */
enum { TPK_PHASE_NORM, TPK_PHASE_QUANTIZE, TPK_PHASE_MATMUL, TPK_PHASE_ROPE, TPK_PHASE_ATTENTION,
       TPK_PHASE_SILU, TPK_PHASES };

/* Scratch bytes a sublayer needs for T rows */
int64_t tpk_attention_sublayer_work(const tpk_attention_sublayer *s, int64_t T);
int64_t tpk_ffn_sublayer_work(const tpk_ffn_sublayer *s, int64_t T);

/* x (T, dim) += add (when not NULL; the previous sublayer's total), then
 * out (T, dim) float64 = wo . attention(rope(wq h), rope(wk h), wv h) with h = rmsnorm(x)
 * (q, k, v plus their biases, then q and k RMS-normed head by head, where the model has them):
 * the rank's partial sums. The rows are nseg segments (their rows add up to T), each attending
 * over its own slot, where its new keys and values go; cos_t, sin_t (T, hd/2) at each row's
 * position. work: tpk_attention_sublayer_work bytes, 64-byte aligned. */
void tpk_attention_sublayer_run(const tpk_attention_sublayer *s, float *x, const float *add, int64_t T,
                                const float *cos_t, const float *sin_t, const tpk_kv_layer *cache,
                                const tpk_segment *segs, int64_t nseg, double *out, uint8_t *work, int nthreads,
                                int64_t *phase_ns);

/* x (T, dim) += add (when not NULL), then out (T, dim) float64 = w2(silu(w1 h) * w3 h), h = rmsnorm(x) */
void tpk_ffn_sublayer_run(const tpk_ffn_sublayer *s, float *x, const float *add, int64_t T, double *out,
                          uint8_t *work, int nthreads, int64_t *phase_ns);

/* For a rank that holds the whole model, so that an all-reduce of a sublayer's float64 partial
 * sums only rounds them to float32: layers 0..n-1 in turn (att[i], ffn[i], cache[i]), each
 * sublayer's total = (float)partial added to x by the next, the last one's added at the end.
 * partial: T * dim doubles, total: T * dim floats of scratch besides `work`. */
void tpk_layers_run(int n, const tpk_attention_sublayer *const *att, const tpk_ffn_sublayer *const *ffn,
                    const tpk_kv_layer *cache, float *x, int64_t T, const float *cos_t, const float *sin_t,
                    const tpk_segment *segs, int64_t nseg, double *partial, float *total, uint8_t *work,
                    int nthreads, int64_t *phase_ns);

#endif

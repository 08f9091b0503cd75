"""The math of one rank's Llama forward pass. No MPI in here.

Reads like the paper: for each layer, x += attention(rmsnorm(x)); x += ffn(rmsnorm(x)).
Other architectures are small differences inside attention: Qwen2 adds biases to q, k and v,
Qwen3 RMS-norms each head of q and k before rope, Mistral may limit attention to a sliding
window; and in the FFN: Qwen3-MoE routes each token to its top-k experts, each expert the same
FFN as a dense layer's.
A rank computes only its own heads and FFN units, so the two sublayer outputs are partial
sums (float64) that `reduce` (an all-reduce across ranks) completes and rounds to float32; a
prompt may run as micro-batches so that one's all-reduce travels while the next computes.
With one rank this is the whole model. The weights are plain data (weights.py): a step reads
no file and makes no MPI call of its own.

A pass of a few rows (a decode step of one or more sequences) makes the same kernel calls from
C, a sublayer per call (K.FusedLayer, kernels/tpk_layer.c), with the same bits: the methods below
stay the reference, and run everything else.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Union

import numpy as np

from .config import ModelConfig
from .matrix import Activation, Matrix, matmul_all
from .memory import lazy_zeros
from .plan import DEFAULT_KV_TYPE, KV_TYPES
from .weights import LayerWeights, RankWeights
from . import _kernels as K

# Passes of up to this many rows (decode steps of up to 16 sequences, short prompts) run each sublayer's
# kernels in one C call (K.FusedLayer) when the model allows: the same calls and bits as the
# steps below, without the Python between them, which runs with caches emptied by every
# matrix read (7-12% of a TinyLlama decode step on a Zen 3). Longer passes are compute-bound.
FUSED_MAX_ROWS = 16

Reduce = Callable[[np.ndarray], np.ndarray]   # (T, dim) float64 partial sums -> (T, dim) float32 totals
StartReduce = Callable[[np.ndarray], "PendingTotal"]   # the same, returning at once: .wait() gives the totals


class _Finished:
    """A total that is already there (forward's blocking reduce, as a pending one)."""

    def __init__(self, total: np.ndarray):
        self.total = total

    def wait(self) -> np.ndarray:
        return self.total


def row_groups(n_rows: int, parts: int) -> List[slice]:
    """n_rows split into `parts` consecutive slices (fewer when there are fewer rows)."""
    parts = max(1, min(parts, n_rows))
    bounds = [n_rows * k // parts for k in range(parts + 1)]
    return [slice(lo, hi) for lo, hi in zip(bounds, bounds[1:])]


def kv_cache_array(slots: int, layers: int, kv_heads: int, ctx: int, head_dim: int, dtype) -> np.ndarray:
    """Zeros for ctx positions (rounded up to whole blocks) in KVCache's layout, (slots, blocks,
    layers, kv_heads, K.KV_BLOCK, head_dim), resident as written, in huge pages where there are any."""
    shape = (slots, -(-ctx // K.KV_BLOCK), layers, kv_heads, K.KV_BLOCK, head_dim)
    return lazy_zeros(shape, dtype, huge_pages=True)


class KVCache:
    """Keys and values of this rank's kv heads for every position seen so far, in `slots`
    independent sequences (slot 0 is the one-conversation API's; tpllama.batching uses them all).

    The positions go in blocks of K.KV_BLOCK (the attention kernel's key chunks), and a block
    holds those positions for every layer and kv head: (slots, blocks, layers, kv heads,
    KV_BLOCK, head_dim). A slot's memory then fills from its front as positions are written, in
    2 MiB pages (one TLB entry where 4 KiB pages needed 512: attention at a long context reads
    the whole cache every token), and unused slot space costs address space, not memory."""

    def __init__(self, config: ModelConfig, n_local_kv_heads: int, ctx: int, slots: int = 1,
                 kv_type: str = DEFAULT_KV_TYPE):
        dtype = KV_TYPES[kv_type]    # f16: keys and values rounded to float16 as they are stored
        self.k = kv_cache_array(slots, config.n_layers, n_local_kv_heads, ctx, config.head_dim, dtype)
        self.v = kv_cache_array(slots, config.n_layers, n_local_kv_heads, ctx, config.head_dim, dtype)
        self.ctx = ctx
        self.slots = slots

    def layer(self, slot: int, layer: int):
        """The key and value caches of one slot's layer, as attention takes them:
        (blocks, kv heads, KV_BLOCK, head_dim) views."""
        return self.k[slot, :, layer], self.v[slot, :, layer]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


@dataclass(frozen=True)
class Segment:
    """Consecutive rows of a forward pass that belong to one sequence: its cache slot and the
    position of its first row. A decode step of B sequences is B segments of one row each."""
    slot: int
    start: int
    length: int


def segments_in(segments: Sequence[Segment], rows: slice) -> List[Segment]:
    """The parts of a pass's segments that fall in its rows rows.start..rows.stop, in order."""
    out, at = [], 0
    for s in segments:
        lo, hi = max(rows.start, at), min(rows.stop, at + s.length)
        if lo < hi:
            out.append(Segment(s.slot, s.start + lo - at, hi - lo))
        at += s.length
    return out


def segments_of(start: Union[int, Sequence[Segment]], n_tokens: int) -> List[Segment]:
    """forward's `start`: a position (one sequence in slot 0) or the segments themselves."""
    if isinstance(start, (int, np.integer)):
        return [Segment(0, int(start), n_tokens)]
    segments = list(start)
    if sum(s.length for s in segments) != n_tokens:
        raise ValueError(f"the segments cover {sum(s.length for s in segments)} rows, not the {n_tokens} tokens")
    return segments


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float, threads: int = 1) -> np.ndarray:
    """(T, dim) -> (T, dim): x / sqrt(mean(x^2) + eps) * weight."""
    return K.rmsnorm(np.ascontiguousarray(x, dtype=np.float32), weight, eps, threads)


def head_rmsnorm(x: np.ndarray, weight: np.ndarray, head_dim: int, eps: float, threads: int = 1) -> np.ndarray:
    """(T, heads * head_dim) -> the same with every head RMS-normed on its own (weight: (head_dim,))."""
    return rmsnorm(x.reshape(-1, head_dim), weight, eps, threads).reshape(x.shape)


def rope_tables(inv_freq: np.ndarray, positions: np.ndarray):
    """cos, sin (T, head_dim/2) float32 for the given positions."""
    angles = positions[:, None].astype(np.float64) * inv_freq[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x: np.ndarray, head_dim: int, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate interleaved pairs (2i, 2i+1) of every head of x (T, heads * head_dim), in place."""
    K.rope(x, head_dim, cos, sin)
    return x


def route(router: Matrix, h: Activation, k: int, renormalise: bool):
    """The top-k experts of each token and their weights: softmax over the router's logits
    (float64, so ranks agree on near ties), the k largest, renormalised to sum to 1 when the
    model says so. (T, dim) -> (T, k) expert ids, (T, k) float64 weights."""
    logits = router.partial_sums(h)                               # (T, n_experts)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    chosen = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    weights = np.take_along_axis(probs, chosen, axis=1)
    if renormalise:
        weights /= weights.sum(axis=1, keepdims=True)
    return chosen, weights


def silu_mul(gate: np.ndarray, up: np.ndarray, threads: int = 1) -> np.ndarray:
    """silu(gate) * up, written over gate."""
    return K.silu_mul(gate, up, threads)


class RankModel:
    """One rank's share of the model: its weights, its KV cache, and the forward pass over them."""

    def __init__(self, weights: RankWeights, ctx: int, slots: int = 1, kv_type: str = DEFAULT_KV_TYPE):
        self.w = weights
        self.config = c = weights.config
        self.threads = weights.threads
        shard = weights.shard
        self.cache = KVCache(c, len(shard.kv_heads), ctx, slots, kv_type)
        self.inv_freq = c.rope_frequencies()
        self.scale = np.float32(1.0 / np.sqrt(c.head_dim))
        # the local kv head that each local query head reads
        group = c.kv_group
        self.kv_of_head = np.array([h // group - shard.kv_heads.start for h in shard.heads], dtype=np.int32)
        self.phase_ns = np.zeros(len(K.FUSED_PHASES), dtype=np.int64)   # the fused layers' kernel time, by kind
        # every head and FFN unit here: the partial sums are the totals (the one-rank all-reduce rounds them)
        self.whole_model = len(shard.heads) == c.n_heads and len(shard.ffn) == c.hidden_dim
        self.fused = fused_layers(self, FUSED_MAX_ROWS)

    # ------------------------------------------------------------ fused layers

    def fused_attention(self, layer: int, x: np.ndarray, add: Optional[np.ndarray], segments: np.ndarray, cos, sin):
        """x += add, then attention(layer, rmsnorm(x)) by the layer's FusedLayer: (T, dim) float64
        partial sums. segments: (n, 3) int64 rows of (slot, start, rows)."""
        return self.fused[layer].attention(x, add, segments, cos, sin)

    def fused_feed_forward(self, layer: int, x: np.ndarray, add: Optional[np.ndarray]) -> np.ndarray:
        """x += add, then feed_forward(rmsnorm(x)) by the layer's FusedLayer: (T, dim) float64 partial sums."""
        return self.fused[layer].feed_forward(x, add)

    # ------------------------------------------------------------ one layer

    def attention(self, layer: int, lw: LayerWeights, h: Activation, segments: List[Segment], cos, sin) -> np.ndarray:
        """(T, dim) normed input -> (T, dim) float64 partial output of this rank's heads. The
        projections run over all T rows at once; each segment attends over its own slot."""
        c = self.config
        hd = c.head_dim
        q, k, v = matmul_all((lw.wq, lw.wk, lw.wv), h)            # (T, local_heads * hd), (T, local_kv * hd) x 2
        if lw.bq is not None:                                     # qwen2
            q += lw.bq
            k += lw.bk
            v += lw.bv
        if lw.q_norm is not None:                                 # qwen3
            q = head_rmsnorm(q, lw.q_norm, hd, c.norm_eps, self.threads)
            k = head_rmsnorm(k, lw.k_norm, hd, c.norm_eps, self.threads)
        apply_rope(q, hd, cos, sin)
        apply_rope(k, hd, cos, sin)
        out = np.concatenate([self.attend(layer, s, q[r], k[r], v[r]) for s, r in _row_ranges(segments)])
        return lw.wo.partial_sums(Activation(out))                # out: (T, local_heads * hd)

    def attend(self, layer: int, seg: Segment, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        """One segment's k, v go into its slot at positions start..; each position attends to
        its slot's positions 0..itself, or with a sliding window (Mistral) to itself and the
        sliding_window - 1 positions before it. (length, local_heads * hd)."""
        kcache, vcache = self.cache.layer(seg.slot, layer)
        return K.attention(q, k, v, kcache, vcache, seg.start, self.kv_of_head, self.scale, self.threads,
                           self.config.sliding_window)

    def feed_forward(self, lw: LayerWeights, h: Activation) -> np.ndarray:
        """(T, dim) -> (T, dim) float64 partial output of this rank's FFN units."""
        if lw.experts is not None:
            return self.experts_feed_forward(lw, h)
        return self.ffn(lw.w1, lw.w3, lw.w2, h)

    def ffn(self, w1: Matrix, w3: Matrix, w2: Matrix, h: Activation) -> np.ndarray:
        """w2(silu(w1 h) * w3 h): (T, dim) -> (T, dim) float64 partial sums over this rank's units."""
        gate, up = matmul_all((w1, w3), h)                        # (T, local_ffn) x 2
        return w2.partial_sums(Activation(silu_mul(gate, up, self.threads)))

    def experts_feed_forward(self, lw: LayerWeights, h: Activation) -> np.ndarray:
        """Mixture of experts: each token's FFN output is the router-weighted sum of its top-k
        experts' FFNs. Every rank routes (the router is whole on each, so all pick the same
        experts) and runs its slice of each chosen expert once over all the tokens routed to it."""
        c = self.config
        chosen, weights = route(lw.router, h, c.n_experts_used, c.expert_weights_norm)    # (T, k) x 2
        out = np.zeros((h.x.shape[0], c.dim), dtype=np.float64)
        for e in np.unique(chosen):
            tokens, slot = np.nonzero(chosen == e)                # a token picks an expert at most once
            ex = lw.experts[e]
            out[tokens] += weights[tokens, slot, None] * self.ffn(ex.w1, ex.w3, ex.w2, Activation(h.x[tokens]))
        return out

    # ------------------------------------------------------------ whole pass

    def forward(self, tokens: np.ndarray, start: Union[int, Sequence[Segment]], reduce: Reduce,
                micro_batches: int = 1, start_reduce: Optional[StartReduce] = None) -> np.ndarray:
        """Token ids (T,) at positions start.. of slot 0, or in the given segments (several
        sequences in one pass: tpllama.batching) -> final normed hidden states (T, dim).

        micro_batches > 1 (with start_reduce, a reduce that returns at once with a pending sum)
        runs the rows as that many consecutive micro-batches, one sublayer of each in turn, so
        that one micro-batch's all-reduce travels while the next one computes. Every operation
        works row by row (a row attends to the cache, where the earlier micro-batch's keys
        already are), so the result is bit-identical to one batch."""
        c = self.config
        segments = segments_of(start, len(tokens))
        for s in segments:
            if s.start + s.length > self.cache.ctx:
                raise ValueError(f"context full: {s.start + s.length} tokens exceed the context size {self.cache.ctx}")
        positions = np.concatenate([np.arange(s.start, s.start + s.length) for s in segments])
        cos, sin = rope_tables(self.inv_freq, positions)
        if self.fused and len(tokens) <= FUSED_MAX_ROWS:
            return self._forward_fused(tokens, segments, reduce, cos, sin)
        x = self.w.embedding(tokens)                              # (T, dim)
        groups = row_groups(len(tokens), micro_batches if start_reduce else 1)
        begin = start_reduce or (lambda partial: _Finished(reduce(partial)))
        parts = [segments_in(segments, rows) for rows in groups]   # each micro-batch's rows of each sequence
        pending: List[Optional[object]] = [None] * len(groups)

        def settle(g: int) -> None:                               # add micro-batch g's last sublayer
            if pending[g] is not None:
                total, pending[g] = pending[g], None
                x[groups[g]] += total.wait()

        try:
            for i, lw in enumerate(self.w.layers):
                for g, rows in enumerate(groups):                 # x += attention(rmsnorm(x))
                    settle(g)
                    h = Activation(rmsnorm(x[rows], lw.attn_norm, c.norm_eps, self.threads))
                    pending[g] = begin(self.attention(i, lw, h, parts[g], cos[rows], sin[rows]))
                for g, rows in enumerate(groups):                 # x += ffn(rmsnorm(x))
                    settle(g)
                    h = Activation(rmsnorm(x[rows], lw.ffn_norm, c.norm_eps, self.threads))
                    pending[g] = begin(self.feed_forward(lw, h))
        finally:   # also after a failure: no all-reduce is left half done (the other ranks finish theirs)
            for g in range(len(groups)):
                settle(g)
        return rmsnorm(x, self.w.output_norm, c.norm_eps, self.threads)

    def _forward_fused(self, tokens: np.ndarray, segments: List[Segment], reduce: Reduce, cos, sin) -> np.ndarray:
        """forward for a few rows (a decode step of one or more sequences), a sublayer per C
        call: each adds the last sublayer's total to x before its own rmsnorm, as forward's
        settle does."""
        c = self.config
        x = self.w.embedding(tokens)                              # (T, dim)
        segs = np.array([(s.slot, s.start, s.length) for s in segments], dtype=np.int64).reshape(-1, 3)
        if self.whole_model and type(self.w.layers) is list:
            # reduce would only round each partial sum to float32: in C, without a return to Python
            K.fused_stack(self.fused, x, segs, cos, sin)
        else:
            total = None
            for i, _ in enumerate(self.w.layers):   # iterating mapped layers asks for the next one's pages
                total = _as_f32(reduce(self.fused_attention(i, x, total, segs, cos, sin)))
                total = _as_f32(reduce(self.fused_feed_forward(i, x, total)))
            x += total
        return rmsnorm(x, self.w.output_norm, c.norm_eps, self.threads)

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        """(T, dim) -> (T, local_vocab): this rank's slice of the vocabulary."""
        return self.w.output(Activation(np.ascontiguousarray(hidden)))


def _as_f32(total: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(total, dtype=np.float32)


def _packed(m: Optional[Matrix]):
    """A FusedLayer's matrix tuple, or None for a matrix the C steps cannot take (f32, absent)."""
    if m is None or m.wtype == "f32":
        return None
    return (m.wtype, m.data, m.rows, m.cols)


def fused_layers(model: "RankModel", max_rows: int) -> Optional[List["K.FusedLayer"]]:
    """model's layers as K.FusedLayer (sharing one scratch area) when every one is a Llama layer
    of packed matrices (Qwen2's biases and Qwen3's q/k norms included); None otherwise (experts,
    f32 matrices: forward's own steps run them)."""
    c, threads = model.config, model.threads
    layers = []
    for i in range(len(model.w.layers)):
        lw = model.w.layers[i]       # by index: iterating mapped layers would ask for every layer's pages now
        mats = [_packed(m) for m in (lw.wq, lw.wk, lw.wv, lw.wo, lw.w1, lw.w3, lw.w2)]
        if None in mats or lw.experts is not None or c.head_dim % 2:
            return None
        biases = (lw.bq, lw.bk, lw.bv) if lw.bq is not None else None
        qk_norms = (lw.q_norm, lw.k_norm) if lw.q_norm is not None else None
        layers.append(K.FusedLayer(lw.attn_norm, *mats[:4], lw.ffn_norm, *mats[4:], model.kv_of_head, c.head_dim,
                                   c.norm_eps, model.scale, c.sliding_window, model.cache.k, model.cache.v, i,
                                   threads, model.phase_ns, biases, qk_norms))
    if not layers:
        return None
    work = K.aligned_bytes(max(layer.work_bytes(max_rows) for layer in layers))
    for layer in layers:
        layer.use_work(work, max_rows)
    return layers


def _row_ranges(segments: Sequence[Segment]):
    """(segment, slice of its rows) in order."""
    row = 0
    for s in segments:
        yield s, slice(row, row + s.length)
        row += s.length

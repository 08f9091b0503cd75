"""The math of one rank's Llama forward pass. No MPI in here.

Reads like the paper: for each layer, x += attention(rmsnorm(x)); x += ffn(rmsnorm(x)).
A rank computes only its own heads and FFN units, so the two sublayer outputs are partial
sums (float64) that `reduce` (an all-reduce across ranks) completes and rounds to float32.
With one rank this is the whole model, and `single_rank` is its reduce.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .config import ModelConfig
from .loader import LayerWeights, RankWeights
from .matrix import Activation
from .memory import lazy_zeros

Reduce = Callable[[np.ndarray], np.ndarray]   # (T, dim) float64 partial sums -> (T, dim) float32 totals


def single_rank(partial: np.ndarray) -> np.ndarray:
    """The reduce of a one-rank job: the partial sum is the total."""
    return partial.astype(np.float32)


class KVCache:
    """Keys and values of this rank's kv heads for every position seen so far."""

    def __init__(self, config: ModelConfig, n_local_kv_heads: int, ctx: int):
        shape = (config.n_layers, n_local_kv_heads, ctx, config.head_dim)
        self.k = lazy_zeros(shape)   # (layers, local_kv_heads, ctx, head_dim); resident as it fills
        self.v = lazy_zeros(shape)
        self.ctx = ctx

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @staticmethod
    def bytes_needed(config: ModelConfig, n_local_kv_heads: int, ctx: int) -> int:
        return 2 * 4 * config.n_layers * n_local_kv_heads * ctx * config.head_dim


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """(T, dim) -> (T, dim): x / sqrt(mean(x^2) + eps) * weight."""
    ms = np.mean(x * x, axis=-1, keepdims=True, dtype=np.float32)
    return (x / np.sqrt(ms + np.float32(eps))) * weight


def rope_tables(inv_freq: np.ndarray, positions: np.ndarray):
    """cos, sin (T, head_dim/2) float32 for the given positions."""
    angles = positions[:, None].astype(np.float64) * inv_freq[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate interleaved pairs (2i, 2i+1) of every head. x: (T, heads, head_dim)."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    c, s = cos[:, None, :], sin[:, None, :]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * c - x1 * s
    out[..., 1::2] = x0 * s + x1 * c
    return out


def silu(x: np.ndarray) -> np.ndarray:
    return x / (np.float32(1.0) + np.exp(-x))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


class RankModel:
    """One rank's share of the model: its weights, its KV cache, and the forward pass over them."""

    def __init__(self, weights: RankWeights, ctx: int):
        self.w = weights
        self.config = c = weights.config
        shard = weights.shard
        self.cache = KVCache(c, len(shard.kv_heads), ctx)
        self.inv_freq = c.rope_frequencies()
        self.scale = np.float32(1.0 / np.sqrt(c.head_dim))
        # local query heads grouped by the local kv head they read: [(kv_local, q_local_slice)]
        group = c.kv_group
        self.head_groups = []
        for kv in shard.kv_heads:
            first = max(shard.heads.start, kv * group)
            last = min(shard.heads.stop, (kv + 1) * group)
            self.head_groups.append((kv - shard.kv_heads.start,
                                     slice(first - shard.heads.start, last - shard.heads.start)))

    # ------------------------------------------------------------ one layer

    def attention(self, layer: int, lw: LayerWeights, h: Activation, start: int, cos, sin) -> np.ndarray:
        """(T, dim) normed input -> (T, dim) float64 partial output of this rank's heads."""
        c, T, hd = self.config, h.x.shape[0], self.config.head_dim
        q = apply_rope(lw.wq(h).reshape(T, -1, hd), cos, sin)     # (T, local_heads, hd)
        k = apply_rope(lw.wk(h).reshape(T, -1, hd), cos, sin)     # (T, local_kv, hd)
        v = lw.wv(h).reshape(T, -1, hd)                           # (T, local_kv, hd)
        end = start + T
        self.cache.k[layer, :, start:end] = k.transpose(1, 0, 2)
        self.cache.v[layer, :, start:end] = v.transpose(1, 0, 2)
        out = np.empty_like(q)                                    # (T, local_heads, hd)
        mask = None
        if T > 1:  # causal: position start+t sees keys 0..start+t
            mask = np.arange(end)[None, :] > (start + np.arange(T))[:, None]
        for kv, heads in self.head_groups:
            keys = self.cache.k[layer, kv, :end]                  # (end, hd)
            values = self.cache.v[layer, kv, :end]                # (end, hd)
            qh = q[:, heads].transpose(1, 0, 2)                   # (group, T, hd)
            scores = (qh @ keys.T) * self.scale                   # (group, T, end)
            if mask is not None:
                scores[:, mask] = -np.inf
            out[:, heads] = (softmax(scores) @ values).transpose(1, 0, 2)
        return lw.wo.partial_sums(Activation(out.reshape(T, -1)))

    def feed_forward(self, lw: LayerWeights, h: Activation) -> np.ndarray:
        """(T, dim) -> (T, dim) float64 partial output of this rank's FFN units."""
        return lw.w2.partial_sums(Activation(silu(lw.w1(h)) * lw.w3(h)))

    # ------------------------------------------------------------ whole pass

    def forward(self, tokens: np.ndarray, start: int, reduce: Reduce) -> np.ndarray:
        """Token ids (T,) at positions start.. -> final normed hidden states (T, dim)."""
        c = self.config
        if start + len(tokens) > self.cache.ctx:
            raise ValueError(f"context full: {start + len(tokens)} tokens exceed the context size {self.cache.ctx}")
        x = self.w.embedding(tokens)                              # (T, dim)
        cos, sin = rope_tables(self.inv_freq, np.arange(start, start + len(tokens)))
        for i, lw in enumerate(self.w.layers):
            h = Activation(rmsnorm(x, lw.attn_norm, c.norm_eps))
            x = x + reduce(self.attention(i, lw, h, start, cos, sin))
            h = Activation(rmsnorm(x, lw.ffn_norm, c.norm_eps))
            x = x + reduce(self.feed_forward(lw, h))
        return rmsnorm(x, self.w.output_norm, c.norm_eps)

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        """(T, dim) -> (T, local_vocab): this rank's slice of the vocabulary."""
        return self.w.output(Activation(np.ascontiguousarray(hidden)))

"""One rank's weights as plain data: what the model math reads, nothing about files.

The loader fills these containers; model.py computes with them. Matrices are the runtime's
packed Matrix objects, norms float32 vectors, and the token embedding a table of the file's
rows (memory-mapped bytes in the file's own element type) that a step indexes: only the
rows of the step's tokens are read and widened to float32.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

import numpy as np

from .config import ModelConfig
from .errors import ModelFormatError
from .matrix import Matrix
from .plan import RankSlice


@dataclass
class ExpertWeights:
    """A rank's slice of one expert of a mixture-of-experts layer: the same FFN as a dense layer's."""
    w1: Matrix              # (local_ffn, dim)   gate
    w3: Matrix              # (local_ffn, dim)   up
    w2: Matrix              # (dim, local_ffn)   down

    @property
    def nbytes(self) -> int:
        return self.w1.nbytes + self.w3.nbytes + self.w2.nbytes


@dataclass
class LayerWeights:
    attn_norm: np.ndarray   # (dim,)
    wq: Matrix              # (local_heads * head_dim, dim)
    wk: Matrix              # (local_kv_heads * head_dim, dim)
    wv: Matrix              # (local_kv_heads * head_dim, dim)
    wo: Matrix              # (dim, local_heads * head_dim)
    ffn_norm: np.ndarray    # (dim,)
    w1: Optional[Matrix] = None   # (local_ffn, dim)   gate   (None in a mixture-of-experts layer)
    w3: Optional[Matrix] = None   # (local_ffn, dim)   up
    w2: Optional[Matrix] = None   # (dim, local_ffn)   down
    # what some architectures add (None elsewhere), float32, q/k ones in interleaved rotary order
    bq: Optional[np.ndarray] = None      # (local_heads * head_dim,)     qwen2: biases of q, k, v
    bk: Optional[np.ndarray] = None      # (local_kv_heads * head_dim,)
    bv: Optional[np.ndarray] = None      # (local_kv_heads * head_dim,)
    q_norm: Optional[np.ndarray] = None  # (head_dim,)                   qwen3: RMSNorm of each q and k head
    k_norm: Optional[np.ndarray] = None  # (head_dim,)
    # qwen3moe: the FFN is a mixture of experts, each rank holding its slice of every expert
    router: Optional[Matrix] = None                    # (n_experts, dim) f32, whole on every rank
    experts: Optional[List[ExpertWeights]] = None      # n_experts slices

    @property
    def nbytes(self) -> int:
        matrices = (self.wq, self.wk, self.wv, self.wo, self.w1, self.w3, self.w2, self.router)
        vectors = (self.attn_norm, self.ffn_norm, self.bq, self.bk, self.bv, self.q_norm, self.k_norm)
        return (sum(m.nbytes for m in matrices if m is not None) + sum(v.nbytes for v in vectors if v is not None)
                + sum(e.nbytes for e in self.experts or ()))


@dataclass
class EmbeddingTable:
    """The token embedding: rows of the file's bytes (vocab, bytes_per_row), usually a memory
    map, and the function that widens rows of its element type to float32."""
    rows: np.ndarray                                  # uint8 (vocab, bytes_per_row)
    widen: Callable[[np.ndarray], np.ndarray]         # uint8 (n, bytes_per_row) -> float32 (n, dim)
    source: str = ""                                  # "file: tensor" for error messages

    @property
    def vocab_size(self) -> int:
        return self.rows.shape[0]

    def __call__(self, token_ids) -> np.ndarray:
        """(T,) ids -> (T, dim) float32."""
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        bad = ids[(ids < 0) | (ids >= self.vocab_size)]
        if bad.size:   # a negative id would silently read a row from the end
            raise ValueError(f"token id {int(bad[0])} is outside the vocabulary (0..{self.vocab_size - 1})")
        values = np.ascontiguousarray(self.widen(np.ascontiguousarray(self.rows[ids])), dtype=np.float32)
        values = values.reshape(len(ids), -1)
        if not np.isfinite(values).all():      # every rank reads the same rows: they all raise this
            bad = int(ids[np.flatnonzero(~np.isfinite(values).all(axis=1))[0]])
            raise ModelFormatError(f"{self.source} row {bad} (the embedding of token {bad}) holds a non-finite "
                                   "value; the file is corrupt, download it again", collective=True)
        return values


@dataclass
class RankWeights:
    config: ModelConfig
    shard: RankSlice
    embedding: EmbeddingTable
    layers: List[LayerWeights]
    output_norm: np.ndarray  # (dim,)
    output: Matrix           # (local_vocab, dim)
    threads: int = 1         # kernel threads of this rank

    @property
    def nbytes(self) -> int:
        """Bytes of weights this rank holds in memory (the embedding stays in the file)."""
        return self.output.nbytes + self.output_norm.nbytes + sum(layer.nbytes for layer in self.layers)

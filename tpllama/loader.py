"""Reads one rank's shard of the weights from the model file and converts it to runtime types.

Only the rows/columns the plan gives this rank are read (memory-mapped, slice by slice),
converted a few rows at a time, so a rank never holds a whole tensor it does not own.
Source blocks that already are a runtime format (Q4_0 -> q40, Q8_0 -> q80) are copied
as they are; everything else is dequantized and re-quantized with GGML's quantizers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

import numpy as np

from .config import ModelConfig
from .errors import ModelFormatError, TpllamaError
from .formats import ModelReader, layer_names
from .matrix import QK, WEIGHT_TYPES, Matrix, runtime_type, _QUANTIZE
from .plan import RankSlice

CONVERT_ROWS = 256  # rows dequantized at a time while converting (bounds the transient memory)


@dataclass
class LayerWeights:
    attn_norm: np.ndarray   # (dim,)
    wq: Matrix              # (local_heads * head_dim, dim)
    wk: Matrix              # (local_kv_heads * head_dim, dim)
    wv: Matrix              # (local_kv_heads * head_dim, dim)
    wo: Matrix              # (dim, local_heads * head_dim)
    ffn_norm: np.ndarray    # (dim,)
    w1: Matrix              # (local_ffn, dim)   gate
    w3: Matrix              # (local_ffn, dim)   up
    w2: Matrix              # (dim, local_ffn)   down


class Embedding:
    """Token embedding rows read from the model file on demand (never loaded whole)."""

    def __init__(self, reader: ModelReader, name: str = "token_embd.weight"):
        self.reader = reader
        self.name = name

    def __call__(self, token_ids) -> np.ndarray:
        """(T,) ids -> (T, dim) float32."""
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        vocab = self.reader.shape(self.name)[0]
        bad = ids[(ids < 0) | (ids >= vocab)]
        if bad.size:   # a negative id would silently read a row from the end
            raise ValueError(f"token id {int(bad[0])} is outside the vocabulary (0..{vocab - 1})")
        rows = self.reader.read(self.name, rows=ids)
        if not np.isfinite(rows).all():      # every rank reads the same rows: they all raise this
            bad = int(ids[np.flatnonzero(~np.isfinite(rows).all(axis=1))[0]])
            raise ModelFormatError(f"{self.reader.path}: tensor {self.name!r} row {bad} (the embedding of token {bad}) "
                                   "holds a non-finite value; the file is corrupt, download it again", collective=True)
        return rows


@dataclass
class RankWeights:
    config: ModelConfig
    shard: RankSlice
    embedding: Embedding
    layers: List[LayerWeights]
    output_norm: np.ndarray  # (dim,)
    output: Matrix           # (local_vocab, dim)
    threads: int = 1         # kernel threads of this rank

    @property
    def nbytes(self) -> int:
        """Bytes of weights this rank holds in memory (the embedding stays in the file)."""
        total = self.output.nbytes + self.output_norm.nbytes
        for layer in self.layers:
            total += sum(m.nbytes for m in (layer.wq, layer.wk, layer.wv, layer.wo, layer.w1, layer.w2, layer.w3))
            total += layer.attn_norm.nbytes + layer.ffn_norm.nbytes
        return total


def require_finite(reader: ModelReader, name: str, values: np.ndarray, first_row: int = 0) -> np.ndarray:
    """values (read from tensor `name`, rows from first_row), or a one-line error if any is NaN or
    infinite: such a model only ever produces garbage, so say so at load instead of decoding it."""
    finite = np.isfinite(values)
    if not finite.all():
        bad = np.argwhere(~finite)[0]
        row = f" row {first_row + int(bad[0])}" if values.ndim == 2 else ""
        raise ModelFormatError(f"{reader.path}: tensor {name!r}{row} holds a non-finite value "
                               f"({values[tuple(bad)]}); the file is corrupt, download it again")
    return values


def _require_finite_scales(reader: ModelReader, name: str, wtype: str, blocks: np.ndarray, first_row: int):
    """The float16 scale at the start of every q40/q80 block passed through as it is."""
    block_bytes = {"q40": 18, "q80": 34}[wtype]
    scales = blocks.reshape(blocks.shape[0], -1, block_bytes)[:, :, :2].copy().view(np.float16)[:, :, 0]
    require_finite(reader, name, scales, first_row)


def _rows_of(r: range, per_unit: int) -> slice:
    return slice(r.start * per_unit, r.stop * per_unit)


def load_matrix(reader: ModelReader, name: str, rows: slice, cols: slice, wtype: str, threads: int = 1) -> Matrix:
    """Read W[rows, cols] of tensor `name`, convert it to runtime type `wtype`, and let go of the
    file's pages it touched."""
    try:
        return _convert(reader, name, rows, cols, wtype, threads)
    finally:
        reader.release(name)


def _convert(reader: ModelReader, name: str, rows: slice, cols: slice, wtype: str, threads: int) -> Matrix:
    n_rows = len(range(*rows.indices(reader.shape(name)[0])))
    n_cols = len(range(*cols.indices(reader.shape(name)[1])))
    wtype = runtime_type(wtype, n_cols)
    if wtype != "f32":
        passed = reader.read_blocks(name, rows, cols)
        if passed is not None and passed[0] == wtype:
            _require_finite_scales(reader, name, wtype, passed[1], rows.indices(reader.shape(name)[0])[0])
            return Matrix(wtype, n_rows, n_cols, passed[1], threads)
    row0 = rows.indices(reader.shape(name)[0])[0]
    if wtype == "f32":
        data = require_finite(reader, name, reader.read(name, rows, cols), row0)
    else:
        block_bytes = {"q40": 18, "q80": 34}[wtype]
        data = np.empty((n_rows, n_cols // QK * block_bytes), dtype=np.uint8)
        for r in range(0, n_rows, CONVERT_ROWS):
            chunk = slice(row0 + r, row0 + min(r + CONVERT_ROWS, n_rows))
            data[r:r + CONVERT_ROWS] = _QUANTIZE[wtype](require_finite(reader, name, reader.read(name, chunk, cols),
                                                                       chunk.start))
    return Matrix(wtype, n_rows, n_cols, data, threads)


def _norm(reader: ModelReader, name: str) -> np.ndarray:
    return require_finite(reader, name, reader.read(name))


def load_rank_weights(reader: ModelReader, shard: RankSlice, wtype: str = "q40", threads: int = 1,
                      progress: Optional[Callable[[int, int], None]] = None) -> RankWeights:
    """This rank's weights: its heads, kv heads, FFN units and vocab rows of every layer."""
    if wtype not in WEIGHT_TYPES:
        raise TpllamaError(f"--weight-type {wtype!r}: expected one of {', '.join(WEIGHT_TYPES)}")
    reader.check_tensors()    # readers check at open; a vocab-only GGUF is only caught here
    c = reader.config
    hd = c.head_dim
    q_rows, kv_rows = _rows_of(shard.heads, hd), _rows_of(shard.kv_heads, hd)
    ffn = slice(shard.ffn.start, shard.ffn.stop)
    every = slice(None)
    layers = []
    for i in range(c.n_layers):
        n = layer_names(i)
        layers.append(LayerWeights(
            attn_norm=_norm(reader, n["attn_norm"]),
            wq=load_matrix(reader, n["wq"], q_rows, every, wtype, threads),
            wk=load_matrix(reader, n["wk"], kv_rows, every, wtype, threads),
            wv=load_matrix(reader, n["wv"], kv_rows, every, wtype, threads),
            wo=load_matrix(reader, n["wo"], every, q_rows, wtype, threads),
            ffn_norm=_norm(reader, n["ffn_norm"]),
            w1=load_matrix(reader, n["w1"], ffn, every, wtype, threads),
            w3=load_matrix(reader, n["w3"], ffn, every, wtype, threads),
            w2=load_matrix(reader, n["w2"], every, ffn, wtype, threads),
        ))
        if progress:
            progress(i + 1, c.n_layers + 1)
    output_name = "token_embd.weight" if c.tie_embeddings or not reader.has("output.weight") else "output.weight"
    output = load_matrix(reader, output_name, slice(shard.vocab.start, shard.vocab.stop), every, wtype, threads)
    if progress:
        progress(c.n_layers + 1, c.n_layers + 1)
    return RankWeights(config=c, shard=shard, embedding=Embedding(reader), layers=layers,
                       output_norm=_norm(reader, "output_norm.weight"), output=output, threads=threads)

"""Reads one rank's shard of the weights from the model file in the runtime types a TypePlan chose,
into the plain containers of weights.py.

Only the rows/columns the plan gives this rank are read (memory-mapped, slice by slice),
converted a few rows at a time, so a rank never holds a whole tensor it does not own.
A matrix that runs in its file's own type gets the file's blocks as they are (Matrix.from_ggml:
nothing dequantized or re-quantized); any other is dequantized and quantized with GGML's
quantizers, or kept as float32.
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional, Tuple, Union

import numpy as np

from .errors import ModelFormatError
from .formats import ModelReader
from .matrix import Matrix, _QUANTIZE
from .plan import RankSlice
from .tensors import EMBEDDING, EXPERT_ROLES, OUTPUT_NORM, expert_name, layer_names
from .typeplan import TypePlan, choose_types, output_tensor_name
from .weights import EmbeddingTable, ExpertWeights, LayerWeights, RankWeights
from .wtypes import BY_GGML, weight_type

CONVERT_ROWS = 256  # rows dequantized at a time while converting (bounds the transient memory)


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
    """The float16 scales (and mins) of every GGML block passed through as it is."""
    t = weight_type(wtype)
    per_block = blocks.reshape(blocks.shape[0], -1, t.block_bytes)
    for at in t.fp16_offsets:
        require_finite(reader, name, per_block[:, :, at:at + 2].copy().view(np.float16)[:, :, 0], first_row)


def _rows_of(r: range, per_unit: int) -> slice:
    return slice(r.start * per_unit, r.stop * per_unit)


def load_matrix(reader: ModelReader, name: str, rows: slice, cols: slice, wtype: str, threads: int = 1) -> Matrix:
    """Read W[rows, cols] of tensor `name` as runtime type `wtype`, and let go of the file's
    pages it touched."""
    try:
        return _convert(reader, name, rows, cols, wtype, threads)
    finally:
        reader.release(name)


def _convert(reader: ModelReader, name: str, rows: slice, cols: slice, wtype: str, threads: int) -> Matrix:
    n_rows = len(range(*rows.indices(reader.shape(name)[0])))
    c0, c1, _ = cols.indices(reader.shape(name)[1])
    n_cols = c1 - c0
    if wtype == "f32":
        data = require_finite(reader, name, reader.read(name, rows, cols), rows.indices(reader.shape(name)[0])[0])
        return Matrix("f32", n_rows, n_cols, data, threads)
    unit = weight_type(wtype).unit
    if n_cols % unit:
        raise ValueError(f"{name}: {n_cols} columns are not whole {wtype} units of {unit}")
    own = BY_GGML.get(reader.dtype(name))
    if own is not None and own.name == wtype and c0 % unit == 0:
        blocks, first_col = reader.read_blocks(name, rows, cols)     # the file's values, untouched
        _require_finite_scales(reader, name, wtype, blocks, rows.indices(reader.shape(name)[0])[0])
        return Matrix.from_ggml(wtype, blocks, first_col, n_cols, threads)
    return Matrix.from_ggml(wtype, _quantized(reader, name, rows, cols, wtype, n_rows, n_cols), 0, n_cols, threads)


def _quantized(reader: ModelReader, name: str, rows: slice, cols: slice, wtype: str, n_rows: int, n_cols: int) -> np.ndarray:
    """GGML `wtype` blocks of W[rows, cols], converted CONVERT_ROWS rows at a time."""
    row0 = rows.indices(reader.shape(name)[0])[0]
    t = weight_type(wtype)
    data = np.empty((n_rows, n_cols // t.block * t.block_bytes), dtype=np.uint8)
    for r in range(0, n_rows, CONVERT_ROWS):
        chunk = slice(row0 + r, row0 + min(r + CONVERT_ROWS, n_rows))
        data[r:r + CONVERT_ROWS] = _QUANTIZE[wtype](require_finite(reader, name, reader.read(name, chunk, cols),
                                                                   chunk.start))
    return data


def _vector(reader: ModelReader, name: str) -> np.ndarray:
    return require_finite(reader, name, reader.read(name))


def _architecture_vectors(reader: ModelReader, names: dict, q_rows: slice, kv_rows: slice) -> dict:
    """The vectors this architecture adds to a layer, this rank's part of them (float32)."""
    c = reader.config
    out = {}
    if c.qkv_bias:
        out.update(bq=_vector(reader, names["bq"])[q_rows], bk=_vector(reader, names["bk"])[kv_rows],
                   bv=_vector(reader, names["bv"])[kv_rows])
    if c.qk_norm:
        out.update(q_norm=_vector(reader, names["q_norm"]), k_norm=_vector(reader, names["k_norm"]))
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def _experts(reader: ModelReader, names: dict, ffn: slice, load) -> dict:
    """A mixture-of-experts layer's router (whole, float32: every rank routes) and this rank's
    slice of every expert: rows `ffn` of its w1 and w3, those columns of its w2."""
    every = slice(None)
    experts = []
    for e in range(reader.config.n_experts):
        w = {role: expert_name(names[stacked], e) for stacked, role in EXPERT_ROLES.items()}
        experts.append(ExpertWeights(w1=load(w["w1"], ffn, every), w3=load(w["w3"], ffn, every),
                                     w2=load(w["w2"], every, ffn)))
    return {"router": load_matrix(reader, names["router"], every, every, "f32"), "experts": experts}


def embedding_table(reader: ModelReader) -> EmbeddingTable:
    """The token embedding as a table over the file's mapped rows (nothing read until a step
    indexes it: each step widens only its tokens' rows)."""
    t = reader.tensor(EMBEDDING)
    if t.row_permutation is not None or len(t.shape) != 2:
        raise ModelFormatError(f"{reader.path}: tensor {EMBEDDING!r} is not a plain (vocab, dim) table")
    return EmbeddingTable(rows=t.raw, widen=t.dtype.dequantize, source=f"{reader.path}: tensor {EMBEDDING!r}")


def load_rank_weights(reader: ModelReader, shard: RankSlice, types: Union[TypePlan, str] = "auto", threads: int = 1,
                      progress: Optional[Callable[[int, int], None]] = None) -> RankWeights:
    """This rank's weights: its heads, kv heads, FFN units and vocab rows of every layer, each
    matrix in the runtime type `types` chose for the whole matrix (a --weight-type name: chosen here)."""
    parts = dict(rank_weight_parts(reader, shard, types, threads, progress))
    layers = [parts.pop(i) for i in range(reader.config.n_layers)]
    return RankWeights(config=reader.config, shard=shard, embedding=embedding_table(reader), layers=layers,
                       output_norm=parts["output_norm"], output=parts["output"], threads=threads)


def rank_weight_parts(reader: ModelReader, shard: RankSlice, types: Union[TypePlan, str] = "auto", threads: int = 1,
                      progress: Optional[Callable[[int, int], None]] = None) -> Iterator[Tuple[object, object]]:
    """This rank's weights one part at a time, so a caller can write each away before the next
    is converted: (layer index, LayerWeights) for every layer, then ("output_norm", vector) and
    ("output", Matrix)."""
    reader.check_tensors()    # readers check at open; a vocab-only GGUF is only caught here
    if isinstance(types, str):
        types = choose_types(reader, types)
    c = reader.config
    hd = c.head_dim
    q_rows, kv_rows = _rows_of(shard.heads, hd), _rows_of(shard.kv_heads, hd)
    ffn = slice(shard.ffn.start, shard.ffn.stop)
    every = slice(None)
    load = lambda name, rows, cols: load_matrix(reader, name, rows, cols, types.runtime(name), threads)
    for i in range(c.n_layers):
        n = layer_names(i)
        yield i, LayerWeights(
            attn_norm=_vector(reader, n["attn_norm"]),
            wq=load(n["wq"], q_rows, every),
            wk=load(n["wk"], kv_rows, every),
            wv=load(n["wv"], kv_rows, every),
            wo=load(n["wo"], every, q_rows),
            ffn_norm=_vector(reader, n["ffn_norm"]),
            **(_experts(reader, n, ffn, load) if c.moe else
               dict(w1=load(n["w1"], ffn, every), w3=load(n["w3"], ffn, every), w2=load(n["w2"], every, ffn))),
            **_architecture_vectors(reader, n, q_rows, kv_rows),
        )
        if progress:
            progress(i + 1, c.n_layers + 1)
    yield "output_norm", _vector(reader, OUTPUT_NORM)
    yield "output", load(output_tensor_name(reader), slice(shard.vocab.start, shard.vocab.stop), every)
    if progress:
        progress(c.n_layers + 1, c.n_layers + 1)

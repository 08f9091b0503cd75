"""What every model reader shares: tensors as memory-mapped rows of raw bytes, read slice by slice.

A reader (GGUF, HF safetensors, llama2.c) only builds a table name -> RawTensor over its
memory map and says where its tokenizer is (`tokenizer_source`). Everything else, slicing,
widening rows to float32 (with the element types of tpllama.filetypes), handing out the
file's own blocks (for matrices that run in the file's type) and checking the tensors
against the config, lives here, so every format behaves the same.

Tensor names and shapes are tpllama.tensors' (GGUF's names, (rows, cols) = (out_features,
in_features)), and attn_q/attn_k rows (and the q/k biases and norms) are in the interleaved
rotary order (pairs 2i, 2i+1) that llama GGUFs and llama2.c use: a reader whose file keeps
HF's rotate-half order (HF directories; qwen2/qwen3 GGUFs) calls interleave_rotary_rows.
A stacked 3-D tensor (GGUF's experts, (n_experts, rows, cols)) is rows of bytes like a matrix;
tensor(expert_name(stacked, e)) is expert e's 2-D matrix, a view of its rows, so the loader reads
one expert like any matrix, whether the file stacks the experts (GGUF) or not (HF).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Union

import numpy as np

from ..errors import ModelFormatError
from ..filetypes import DTYPES, DType
from ..memory import advise
from ..tensors import OUTPUT, ROTARY_ROLES, expected_shapes, expert_name, layer_names, split_expert_name
from .tokenizer_source import TokenizerSource

Rows = Union[slice, Sequence[int], np.ndarray]


@dataclass
class RawTensor:
    """One tensor over the file's memory map: raw is uint8 (rows, bytes_per_row), nothing read yet."""
    name: str
    shape: tuple          # (rows, cols), (n,) for vectors, or (n_experts, rows, cols) stacked
    dtype: DType
    raw: np.ndarray
    row_permutation: Optional[np.ndarray] = None  # logical row r is stored at raw row row_permutation[r]

    @property
    def rows(self) -> int:
        return math.prod(self.shape[:-1])

    @property
    def cols(self) -> int:
        return self.shape[-1]

    @property
    def nbytes(self) -> int:
        return self.raw.nbytes


class ModelReader:
    """Lazy access to a model file's tensors. Subclasses fill self.tensors and self.config."""

    format_name = "model"

    def __init__(self, path: str):
        self.path = str(path)
        self.tensors: Dict[str, RawTensor] = {}
        self.config = None
        self._maps: list = []   # (mmap, first address) of every mapped file

    def tokenizer_source(self) -> TokenizerSource:
        """Where this model's tokenizer is (for tpllama.tokenizer): by default, files beside the model."""
        return TokenizerSource.beside_file(self.path, self.config.vocab_size)

    def map_file(self, path: str) -> np.ndarray:
        """The file as a read-only uint8 array over a memory map (nothing read yet)."""
        mapped = np.memmap(path, dtype=np.uint8, mode="r")
        self.add_mapping(mapped)
        return mapped.view(np.ndarray)   # a plain view: np.memmap's per-slice bookkeeping is slow

    def add_mapping(self, mapped: np.memmap):
        if getattr(mapped, "_mmap", None) is not None:
            self._maps.append((mapped._mmap, mapped.__array_interface__["data"][0], mapped.nbytes))

    def release(self, name: str):
        """Drop a tensor's file pages from this process once its slice is converted (Linux).

        They stay in the page cache, shared and reclaimable, but no longer count in this
        rank's resident memory: a rank that touched every page of a row-parallel tensor to copy
        its columns does not keep the whole tensor resident."""
        raw = self.tensor(name).raw
        start = raw.__array_interface__["data"][0]
        for mm, base, size in self._maps:
            if base <= start < base + size:
                advise(mm, "MADV_DONTNEED", start - base, start - base + raw.nbytes)
                return

    # ------------------------------------------------------------ table

    def tensor(self, name: str) -> RawTensor:
        t = self.tensors.get(name)
        if t is None:
            t = self._expert_view(name)
        if t is None:
            raise ModelFormatError(f"{self.path}: tensor {name!r} is missing")
        return t

    def has(self, name: str) -> bool:
        return name in self.tensors or self._expert_view(name) is not None

    def _expert_view(self, name: str) -> Optional[RawTensor]:
        """Expert e's matrix of a stacked 3-D tensor (expert_name(stacked, e)): a view of its rows."""
        split = split_expert_name(name)
        stacked = self.tensors.get(split[0]) if split else None
        if stacked is None or len(stacked.shape) != 3 or not 0 <= split[1] < stacked.shape[0]:
            return None
        rows = stacked.shape[1]
        return RawTensor(name, stacked.shape[1:], stacked.dtype, stacked.raw[split[1] * rows:(split[1] + 1) * rows])

    def shape(self, name: str) -> tuple:
        return self.tensor(name).shape

    def dtype(self, name: str) -> str:
        return self.tensor(name).dtype.name

    # ------------------------------------------------------------ reads (only the slice's bytes are touched)

    def _row_index(self, t: RawTensor, rows: Rows):
        if t.row_permutation is None:
            return rows
        return t.row_permutation[rows]

    def _block_range(self, t: RawTensor, cols: slice):
        c0, c1, step = cols.indices(t.cols)
        if step != 1:
            raise ValueError("column slices must be contiguous")
        bs = t.dtype.block_size
        return c0, c1, c0 // bs, -(-c1 // bs)

    def read(self, name: str, rows: Union[Rows, int] = slice(None), cols: slice = slice(None)) -> np.ndarray:
        """Dequantized float32 (len(rows), len(cols)); one row (an int) and a 1-D tensor come back 1-D."""
        t = self.tensor(name)
        if len(t.shape) == 1:
            values = t.dtype.dequantize(np.ascontiguousarray(t.raw)).reshape(-1)
            return (values if t.row_permutation is None else values[t.row_permutation])[cols]
        if isinstance(rows, (int, np.integer)):
            r = range(t.rows)[rows]          # IndexError when out of range, negative counts from the end
            return self.read(name, slice(r, r + 1), cols)[0]
        c0, c1, b0, b1 = self._block_range(t, cols)
        bb = t.dtype.block_bytes
        raw = t.raw[self._row_index(t, rows)][:, b0 * bb:b1 * bb]
        out = t.dtype.dequantize(np.ascontiguousarray(raw))
        out = out.reshape(raw.shape[0], (b1 - b0) * t.dtype.block_size)
        first = c0 - b0 * t.dtype.block_size
        return np.ascontiguousarray(out[:, first:first + (c1 - c0)], dtype=np.float32)

    def read_blocks(self, name: str, rows: Rows = slice(None), cols: slice = slice(None)):
        """(uint8 blocks, first_col): the file's own blocks (rows, nblocks*block_bytes) that cover
        the columns, and where the first wanted column sits inside them; nothing is converted."""
        t = self.tensor(name)
        if len(t.shape) != 2:
            raise ValueError(f"{name} is not a matrix")
        c0, c1, b0, b1 = self._block_range(t, cols)
        bb = t.dtype.block_bytes
        blocks = np.ascontiguousarray(t.raw[self._row_index(t, rows)][:, b0 * bb:b1 * bb])
        return blocks, c0 - b0 * t.dtype.block_size

    def interleave_rotary_rows(self):
        """Present q/k rows (and the q/k biases and per-head norms) stored in HF's rotate-half order
        in interleaved order, the order of the rope kernels: a permutation within each head."""
        c = self.config
        heads = {"wq": c.n_heads, "bq": c.n_heads, "wk": c.n_kv_heads, "bk": c.n_kv_heads, "q_norm": 1, "k_norm": 1}
        for i in range(c.n_layers):
            names = layer_names(i)
            for role in ROTARY_ROLES:
                t = self.tensors.get(names[role])
                if t is not None:
                    t.row_permutation = rotary_interleave_permutation(heads[role], c.head_dim)

    def close(self):
        self.tensors = {}
        self._maps = []

    def check_tensors(self):
        """Every tensor the model math uses is present with the shape the config gives it, so a
        malformed file fails here with its name instead of deep inside a forward pass."""
        c = self.config
        for name, want in expected_shapes(c).items():
            t = self.tensors.get(name)
            if t is None and len(want) == 3:    # experts stored one by one (HF)
                self._check_experts(name, want)
                continue
            if t is None:
                if name == OUTPUT:      # absent: tied to the token embedding
                    continue
                raise ModelFormatError(f"{self.path}: tensor {name!r} is missing (a {c.n_layers}-layer {c.arch} model needs it)")
            got = t.shape
            if len(want) == 1 and len(got) == 2 and got[0] == 1:
                got = got[1:]
            if tuple(got) != want:
                self._wrong_shape(name, tuple(got), want)

    def _check_experts(self, stacked: str, want: tuple):
        """Every expert's matrix of a stacked tensor the file stores one by one: present, its shape."""
        c = self.config
        for e in range(want[0]):
            t = self.tensors.get(expert_name(stacked, e))
            if t is None:
                raise ModelFormatError(f"{self.path}: tensor {expert_name(stacked, e)!r} (expert {e}) is missing "
                                       f"(a {c.n_layers}-layer {c.arch} model with {c.n_experts} experts needs it)")
            if tuple(t.shape) != want[1:]:
                self._wrong_shape(t.name, tuple(t.shape), want[1:])

    def _wrong_shape(self, name: str, got: tuple, want: tuple):
        c = self.config
        experts = f", {c.n_experts} experts" if c.moe else ""
        raise ModelFormatError(f"{self.path}: tensor {name!r} has shape {got}, expected {want} "
                               f"(dim {c.dim}, {c.n_heads}/{c.n_kv_heads} heads of {c.head_dim}, "
                               f"FFN {c.hidden_dim}{experts}, vocab {c.vocab_size})")


def raw_rows(buf: np.ndarray, offset: int, nbytes: int, rows: int) -> np.ndarray:
    """A (rows, nbytes/rows) uint8 view of buf[offset:offset+nbytes], no copy."""
    return buf[offset:offset + nbytes].reshape(rows, nbytes // rows)


def make_tensor(name: str, shape: Sequence[int], dtype_name: str, buf: np.ndarray, offset: int, path: str) -> RawTensor:
    """A RawTensor over buf; shape is (rows, cols) or (n,). Checks the type and the block alignment."""
    dt = DTYPES.get(dtype_name)
    if dt is None:
        raise ModelFormatError(f"{path}: tensor {name!r} has type {dtype_name}, which is not supported "
                               f"(supported: {', '.join(DTYPES)})")
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (1, 2, 3) or min(shape) <= 0 or offset < 0:
        raise ModelFormatError(f"{path}: tensor {name!r} has shape {shape} at offset {offset}; "
                               "expected a 1-D, 2-D or 3-D (stacked experts) tensor with positive sizes")
    cols = shape[-1]
    rows = math.prod(shape[:-1])
    if cols % dt.block_size:
        raise ModelFormatError(f"{path}: tensor {name!r} has {cols} columns, not a multiple of the {dtype_name} block size {dt.block_size}")
    nbytes = rows * (cols // dt.block_size) * dt.block_bytes
    end = offset + nbytes
    if end > buf.shape[0]:
        raise ModelFormatError(f"{path}: file is truncated (tensor {name!r} ends at byte {end}, file has {buf.shape[0]}); download it again")
    return RawTensor(name, shape, dt, raw_rows(buf, offset, nbytes, rows))


def rotary_interleave_permutation(n_heads: int, head_dim: int) -> np.ndarray:
    """Row order that turns HF's rotate-half q/k rows into interleaved pairs.

    Logical (interleaved) row h*hd + 2i + j is HF row h*hd + j*hd/2 + i."""
    h, i, j = np.meshgrid(np.arange(n_heads), np.arange(head_dim // 2), np.arange(2), indexing="ij")
    return (h * head_dim + j * (head_dim // 2) + i).reshape(-1)

"""Runtime weight matrices: y = x @ W.T for a batch of activation rows.

Quantized matrices (q40, q41, q50, q80, q4k, q5k, q6k: the GGML types Q4_0, Q4_1, Q5_0,
Q8_0, Q4_K, Q5_K, Q6_K) multiply q80-quantized activations in the C kernels; f32 matrices
(and any matrix whose input width is not a multiple of 32) use numpy. An Activation
quantizes its rows once, however many matrices read it (wq, wk and wv share one).

A quantized Matrix is built from a file's GGML blocks (`from_ggml`, any column range that
starts and ends at multiples of 32) and keeps exactly their values, repacked in the
kernels' runtime layout (16 rows interleaved, one group block per 32 columns, see
kernels/tpk.h). `blocks()` gives the GGML blocks back for q40/q80, whose layout holds them
byte for byte; `dequantized()` gives the values of every type.
"""
from __future__ import annotations

import mmap
import threading
from typing import List, Optional, Sequence

import numpy as np

from . import _kernels as K
from .wtypes import weight_type

QK = K.QK
WEIGHT_TYPES = ("q40", "q80", "f32")     # the types a float matrix can be quantized to (from_float)
PACKED_TYPES = K.PACKED_TYPES            # every type the kernels multiply

_QUANTIZE = {"q40": K.quantize_q40, "q80": K.quantize_q80}
_BLOCK_BYTES = {"q40": K.Q40_BYTES, "q80": K.Q80_BYTES}   # types whose packed layout holds GGML blocks


class _WeightArena:
    """Memory for packed weights, in mappings that ask for transparent huge pages.

    Decode streams every weight once per token; with 4 KiB pages the hardware prefetcher
    stops at each page boundary and the TLB misses often, which costs a third of the
    bandwidth on small matrices (2048 x 2048 q40 is 2.4 MB). Matrices are placed one after
    another in 2 MiB-aligned chunks (a layer's weights end up adjacent); large ones get a
    mapping of their own. A chunk is unmapped when the last matrix in it is gone."""

    CHUNK = 128 * 2**20
    HUGE = 2 * 2**20

    def __init__(self):
        self._buf: Optional[np.ndarray] = None
        self._used = 0
        self._lock = threading.Lock()

    def _map(self, size: int) -> np.ndarray:
        mm = mmap.mmap(-1, size + self.HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mm, "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                mm.madvise(mmap.MADV_HUGEPAGE)
            except OSError:
                pass
        buf = np.frombuffer(mm, dtype=np.uint8)
        off = (-buf.ctypes.data) % self.HUGE
        return buf[off:off + size]

    def scratch(self, nbytes: int) -> np.ndarray:
        """A flat uint8 array of nbytes in a mapping of its own (huge pages asked), unmapped when
        the array and its views are gone: for memory that must not outlive its use (empty() may
        place small arrays in a chunk that stays mapped)."""
        return self._map(-(-max(nbytes, 1) // self.HUGE) * self.HUGE)[:nbytes]

    def empty(self, nbytes: int) -> np.ndarray:
        """A flat uint8 array of nbytes, 64-byte aligned, uninitialised (zeros)."""
        if not hasattr(mmap, "MAP_ANONYMOUS") or nbytes < 64 * 1024:
            return K.aligned_bytes(nbytes)      # small: ordinary memory
        n = -(-nbytes // 64) * 64
        with self._lock:
            if n > self.CHUNK // 8:
                return self._map(-(-n // self.HUGE) * self.HUGE)[:nbytes]
            if self._buf is None or self._used + n > self._buf.shape[0]:
                self._buf, self._used = self._map(self.CHUNK), 0
            out = self._buf[self._used:self._used + nbytes]
            self._used += n
            return out


_ARENA = _WeightArena()


class Activation:
    """Rows of activations (T, n) float32 with their q80 form made on first use."""

    __slots__ = ("x", "_q80")

    def __init__(self, x: np.ndarray):
        self.x = x
        self._q80: Optional[np.ndarray] = None

    @property
    def q80(self) -> np.ndarray:
        if self._q80 is None:
            self._q80 = K.quantize_q80(self.x)
        return self._q80


def runtime_type(wtype: str, cols: int) -> str:
    """The type a matrix of input width `cols` gets: blocks need whole units of 32."""
    return wtype if cols % weight_type(wtype).unit == 0 else "f32"


class Matrix:
    """A (rows, cols) weight matrix in one runtime type."""

    def __init__(self, wtype: str, rows: int, cols: int, data: np.ndarray, threads: int = 1, packed: bool = False):
        """data: a packed type: its GGML blocks, uint8 (rows, cols/block_values*block_bytes),
        repacked here unless `packed` (then it is already the flat packed array); f32: float32
        (rows, cols)."""
        self.wtype = wtype      # "f32" or one of PACKED_TYPES
        self.rows = rows        # output features
        self.cols = cols        # input features
        self.threads = threads
        if wtype == "f32":
            self.data = data    # float32 (rows, cols)
            return
        if wtype not in PACKED_TYPES:
            raise ValueError(f"unknown weight type {wtype!r}")
        if not packed:
            values, bb = K.ggml_block(wtype)
            if cols % values or data.shape != (rows, cols // values * bb):
                raise ValueError(f"{wtype} blocks of shape {data.shape} do not hold {rows} x {cols} weights")
            data = K.pack_ggml(wtype, data, 0, cols, _ARENA.empty(K.packed_bytes(wtype, rows, cols // QK)))
        # flat uint8: the 32-column blocks of 16 rows side by side (kernels/tpk.h), tail rows padded
        self.data = data
        if cols % QK or self.data.shape != (K.packed_bytes(wtype, rows, cols // QK),):
            raise ValueError(f"{wtype} matrix data does not hold {rows} x {cols} weights")

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def __call__(self, a: Activation, out: Optional[np.ndarray] = None) -> np.ndarray:
        """(T, cols) activations -> (T, rows) float32 (written into `out` if given)."""
        if self.wtype == "f32":
            return np.matmul(a.x, self.data.T, out=out)
        if out is None:
            out = np.empty((a.x.shape[0], self.rows), dtype=np.float32)
        K.matmul_packed(self.wtype, self.data, self.rows, self.cols // QK, a.q80, out, self.threads)
        return out

    def partial_sums(self, a: Activation) -> np.ndarray:
        """(T, cols) -> (T, rows) float64: a rank's share of a row-parallel product.

        Rows accumulate in float64 (every block term is exact there), so partial sums from
        any split of the columns add up to the same total once rounded to float32."""
        if self.wtype == "f32":
            return a.x.astype(np.float64) @ self.data.T.astype(np.float64)
        out = np.empty((a.x.shape[0], self.rows), dtype=np.float64)
        K.matmul_packed(self.wtype, self.data, self.rows, self.cols // QK, a.q80, out, self.threads)
        return out

    def blocks(self) -> np.ndarray:
        """q40/q80: the weights as GGML blocks (rows, cols/32*block_bytes), byte-identical to what
        was loaded. The other types' runtime layout keeps their values, not their GGML blocks."""
        if self.wtype not in _BLOCK_BYTES:
            raise ValueError(f"a {self.wtype} matrix has no GGML blocks at run time (use dequantized())")
        return K.unpack(self.wtype, self.data, self.rows, self.cols // QK)

    def dequantized(self) -> np.ndarray:
        """The weights as float32 (rows, cols), as gguf-py dequantizes them; for tests and debugging."""
        if self.wtype == "f32":
            return self.data
        return K.dequantize_packed(self.wtype, self.data, self.rows, self.cols // QK)

    @classmethod
    def from_ggml(cls, wtype: str, blocks: np.ndarray, first_col: int, n_cols: int, threads: int = 1) -> "Matrix":
        """The n_cols columns starting first_col values into `blocks`, uint8 (rows, nblocks*block_bytes)
        of the GGML type that `wtype` names (f32: the float32 bytes), every value kept. first_col
        and n_cols are multiples of 32; rows may be a strided view (e.g. of a memory-mapped file)."""
        rows = blocks.shape[0]
        if wtype == "f32":
            values = np.ascontiguousarray(blocks).view(np.float32)[:, first_col:first_col + n_cols]
            if values.shape != (rows, n_cols):
                raise ValueError(f"f32 rows of {values.shape[1]} values do not hold columns {first_col}..{first_col + n_cols}")
            return cls("f32", rows, n_cols, np.ascontiguousarray(values), threads)
        if wtype not in PACKED_TYPES:
            raise ValueError(f"unknown weight type {wtype!r}")
        data = K.pack_ggml(wtype, blocks, first_col, n_cols, _ARENA.empty(K.packed_bytes(wtype, rows, n_cols // QK)))
        return cls(wtype, rows, n_cols, data, threads, packed=True)

    @classmethod
    def from_float(cls, w: np.ndarray, wtype: str, threads: int = 1) -> "Matrix":
        """Quantize float32 weights (rows, cols) to q40/q80, or keep them f32 (also when cols % 32)."""
        rows, cols = w.shape
        wtype = runtime_type(wtype, cols)
        if wtype != "f32" and wtype not in _QUANTIZE:
            raise ValueError(f"no quantizer for {wtype}: float weights can become one of {', '.join(WEIGHT_TYPES)}")
        w = np.ascontiguousarray(w, dtype=np.float32)
        data = w if wtype == "f32" else _QUANTIZE[wtype](w)
        return cls(wtype, rows, cols, data, threads)


def matmul_all(mats: Sequence[Matrix], a: Activation) -> List[np.ndarray]:
    """[m(a) for m in mats]; quantized matrices of one type share one kernel call (one pass of
    the threads over all their rows: wq, wk, wv or w1, w3)."""
    first = mats[0]
    if (1 < len(mats) <= 8 and first.wtype != "f32"
            and all(m.wtype == first.wtype and m.cols == first.cols for m in mats)):
        outs = [np.empty((a.x.shape[0], m.rows), dtype=np.float32) for m in mats]
        K.matmul_packed_many(first.wtype, [m.data for m in mats], [m.rows for m in mats], first.cols // QK,
                             a.q80, outs, max(m.threads for m in mats))
        return outs
    return [m(a) for m in mats]

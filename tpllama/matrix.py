"""Runtime weight matrices: y = x @ W.T for a batch of activation rows.

q40 and q80 matrices multiply q80-quantized activations in the C kernels; f32 matrices
(and any matrix whose input width is not a multiple of 32) use numpy. An Activation
quantizes its rows once, however many matrices read it (wq, wk and wv share one).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from . import _kernels as K

QK = K.QK
WEIGHT_TYPES = ("q40", "q80", "f32")
BYTES_PER_WEIGHT = {"q40": K.Q40_BYTES / QK, "q80": K.Q80_BYTES / QK, "f32": 4.0}

_QUANTIZE = {"q40": K.quantize_q40, "q80": K.quantize_q80}
_DEQUANTIZE = {"q40": K.dequantize_q40, "q80": K.dequantize_q80}
_MATMUL = {"q40": K.matmul_q40_q80, "q80": K.matmul_q80_q80}
_MATMUL_F64 = {"q40": K.matmul_q40_q80_f64, "q80": K.matmul_q80_q80_f64}


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
    """The type a matrix of input width `cols` gets: blocks need whole groups of 32."""
    return wtype if cols % QK == 0 else "f32"


class Matrix:
    """A (rows, cols) weight matrix in one runtime type."""

    def __init__(self, wtype: str, rows: int, cols: int, data: np.ndarray, threads: int = 1):
        self.wtype = wtype      # "q40" | "q80" | "f32"
        self.rows = rows        # output features
        self.cols = cols        # input features
        self.data = data        # q40/q80: uint8 (rows, cols/32*block_bytes); f32: float32 (rows, cols)
        self.threads = threads

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def __call__(self, a: Activation) -> np.ndarray:
        """(T, cols) activations -> (T, rows) float32."""
        if self.wtype == "f32":
            return a.x @ self.data.T
        out = np.empty((a.x.shape[0], self.rows), dtype=np.float32)
        _MATMUL[self.wtype](self.data, a.q80, out, self.threads)
        return out

    def partial_sums(self, a: Activation) -> np.ndarray:
        """(T, cols) -> (T, rows) float64: a rank's share of a row-parallel product.

        Rows accumulate in float64 (every block term is exact there), so partial sums from
        any split of the columns add up to the same total once rounded to float32."""
        if self.wtype == "f32":
            return a.x.astype(np.float64) @ self.data.T.astype(np.float64)
        out = np.empty((a.x.shape[0], self.rows), dtype=np.float64)
        _MATMUL_F64[self.wtype](self.data, a.q80, out, self.threads)
        return out

    def dequantized(self) -> np.ndarray:
        """The weights as float32 (rows, cols); for tests and debugging."""
        if self.wtype == "f32":
            return self.data
        return _DEQUANTIZE[self.wtype](self.data)

    @classmethod
    def from_float(cls, w: np.ndarray, wtype: str, threads: int = 1) -> "Matrix":
        """Quantize float32 weights (rows, cols) to `wtype` (falling back to f32 when cols % 32)."""
        rows, cols = w.shape
        wtype = runtime_type(wtype, cols)
        w = np.ascontiguousarray(w, dtype=np.float32)
        data = w if wtype == "f32" else _QUANTIZE[wtype](w)
        return cls(wtype, rows, cols, data, threads)

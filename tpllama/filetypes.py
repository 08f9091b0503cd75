"""The element types a model file stores (F32, F16, BF16 and GGML's blocks) and how rows of
each widen to float32: facts about the bytes, shared by the readers and the weights.

A row of a block type is a run of whole blocks (block_size values in block_bytes bytes);
`dequantize` turns uint8 (rows, nblocks * block_bytes) into float32 (rows, nblocks * block_size).
GGML's block types dequantize with gguf-py's reference code, except Q4_0 and Q8_0, which the
runtime's C kernels dequantize (imported on first use, so this imports without the build).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict

import numpy as np
from gguf import GGMLQuantizationType, quants


def _bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    # numpy has no bfloat16: widen the 16 bits into the top half of a float32.
    return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def _gguf_dequant(qtype: GGMLQuantizationType) -> Callable[[np.ndarray], np.ndarray]:
    return lambda raw: quants.dequantize(raw, qtype).astype(np.float32, copy=False)


@dataclass(frozen=True)
class DType:
    name: str
    block_size: int      # elements per block along a row
    block_bytes: int
    dequantize: Callable[[np.ndarray], np.ndarray]  # uint8 (rows, nblocks*block_bytes) -> float32 (rows, nblocks*block_size)


def _plain(name, np_dtype):
    size = np.dtype(np_dtype).itemsize
    return DType(name, 1, size, lambda raw: raw.view(np_dtype).astype(np.float32))


DTYPES: Dict[str, DType] = {
    "F32": _plain("F32", np.float32),
    "F16": _plain("F16", np.float16),
    "BF16": DType("BF16", 1, 2, _bf16_to_f32),
}
for _q in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"):
    _t = GGMLQuantizationType[_q]
    _bs, _bb = quants.GGML_QUANT_SIZES[_t]
    DTYPES[_q] = DType(_q, _bs, _bb, _gguf_dequant(_t))


# The runtime's own block types dequantize in C: the embedding rows each token reads
# (gathered from the mapped file) and the conversion of Q4_0/Q8_0 slices.
def _kernel_dequant(fn_name: str) -> Callable[[np.ndarray], np.ndarray]:
    def dequantize(raw: np.ndarray) -> np.ndarray:
        from . import _kernels
        return getattr(_kernels, fn_name)(np.ascontiguousarray(raw).reshape(raw.shape[0] if raw.ndim == 2 else 1, -1))
    return dequantize


DTYPES["Q4_0"] = DType("Q4_0", 32, 18, _kernel_dequant("dequantize_q40"))
DTYPES["Q8_0"] = DType("Q8_0", 32, 34, _kernel_dequant("dequantize_q80"))

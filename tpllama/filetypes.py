"""The element types a model file stores (F32, F16, BF16 and GGML's blocks) and how rows of
each widen to float32: facts about the bytes, shared by the readers and the weights.

A row of a block type is a run of whole blocks (block_size values in block_bytes bytes);
`dequantize` turns uint8 (rows, nblocks * block_bytes) into float32 (rows, nblocks * block_size).
GGML's block types dequantize with gguf-py's reference code, except Q4_0 and Q8_0, which the
runtime's C kernels dequantize (imported on first use, so this imports without the build).
gguf-py itself is imported on first use too: it costs a start about 70 ms (it imports yaml), and a
warm start that maps its shard files never dequantizes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict

import numpy as np


# GGUF's type numbers (ggml_type) and block geometry of the block types tpllama reads, facts of the
# GGUF spec (tests/test_filetypes.py checks them against gguf-py's GGMLQuantizationType and
# GGML_QUANT_SIZES): name -> (type number, values per block, bytes per block).
GGML_TYPES: Dict[str, tuple] = {
    "F32": (0, 1, 4), "F16": (1, 1, 2), "Q4_0": (2, 32, 18), "Q4_1": (3, 32, 20), "Q5_0": (6, 32, 22),
    "Q5_1": (7, 32, 24), "Q8_0": (8, 32, 34), "Q2_K": (10, 256, 84), "Q3_K": (11, 256, 110),
    "Q4_K": (12, 256, 144), "Q5_K": (13, 256, 176), "Q6_K": (14, 256, 210), "BF16": (30, 1, 2),
}
GGML_TYPE_NAMES: Dict[int, str] = {number: name for name, (number, _, _) in GGML_TYPES.items()}


def ggml_type_name(number: int) -> str:
    """The name of a GGUF tensor type number; ValueError for a number that is no GGML type."""
    name = GGML_TYPE_NAMES.get(number)
    if name is None:                        # a type tpllama does not read: gguf-py knows its name
        from gguf import GGMLQuantizationType
        name = GGMLQuantizationType(number).name
    return name


def _bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    # numpy has no bfloat16: widen the 16 bits into the top half of a float32.
    return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def _gguf_dequant(name: str) -> Callable[[np.ndarray], np.ndarray]:
    def dequantize(raw: np.ndarray) -> np.ndarray:
        from gguf import GGMLQuantizationType, quants
        return quants.dequantize(raw, GGMLQuantizationType[name]).astype(np.float32, copy=False)
    return dequantize


@dataclass(frozen=True)
class DType:
    name: str
    block_size: int      # elements per block along a row
    block_bytes: int
    dequantize: Callable[[np.ndarray], np.ndarray]  # uint8 (rows, nblocks*block_bytes) -> float32 (rows, nblocks*block_size)


def _plain(name, np_dtype):
    size = np.dtype(np_dtype).itemsize
    return DType(name, 1, size, lambda raw: raw.view(np_dtype).astype(np.float32))


# GGML's block types the runtime runs itself widen in C: the embedding rows each token reads
# (gathered from the mapped file) and the conversion of slices. Their values equal gguf-py's
# (tests/test_kernels.py, tests/test_native_types.py, tests/test_filetypes.py).
def _kernel_dequant(fn_name: str) -> Callable[[np.ndarray], np.ndarray]:
    def dequantize(raw: np.ndarray) -> np.ndarray:
        from . import _kernels
        return getattr(_kernels, fn_name)(_as_rows(raw))
    return dequantize


def _packed_dequant(ggml: str, wtype: str) -> Callable[[np.ndarray], np.ndarray]:
    """Rows of a block type the kernels run packed: packed, then read back as float32."""
    _, block_size, block_bytes = GGML_TYPES[ggml]

    def dequantize(raw: np.ndarray) -> np.ndarray:
        from . import _kernels
        raw = _as_rows(raw)
        values = raw.shape[1] // block_bytes * block_size
        packed = _kernels.pack_ggml(wtype, raw, 0, values)
        return _kernels.dequantize_packed(wtype, packed, raw.shape[0], values // 32)
    return dequantize


def _as_rows(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).reshape(raw.shape[0] if raw.ndim == 2 else 1, -1)


_IN_C = {"Q4_0": _kernel_dequant("dequantize_q40"), "Q8_0": _kernel_dequant("dequantize_q80"),
         **{q: _packed_dequant(q, w) for q, w in
            (("Q4_1", "q41"), ("Q5_0", "q50"), ("Q4_K", "q4k"), ("Q5_K", "q5k"), ("Q6_K", "q6k"))}}

DTYPES: Dict[str, DType] = {
    "F32": _plain("F32", np.float32),
    "F16": _plain("F16", np.float16),
    "BF16": DType("BF16", 1, 2, _bf16_to_f32),
}
for _q in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"):
    _, _bs, _bb = GGML_TYPES[_q]
    DTYPES[_q] = DType(_q, _bs, _bb, _IN_C.get(_q) or _gguf_dequant(_q))   # gguf-py's reference for the rest

"""The one table of weight types: GGML block facts of each type a file may hold, and how
tpllama runs it. Pure Python, imports nothing compiled, so the plan and the docs can use it
in an unbuilt tree; tests check it once against what the C kernels report.

Names: tpllama's short runtime names (q40, q41, ...) beside GGML's (Q4_0, Q4_1, ...).
A quantized runtime type multiplies 8-bit activation blocks ("q80": 32 values + fp16 scale)
and can be cut into column slices at multiples of `unit` (32) without changing any value,
so row-parallel slices keep the file's weights at every rank count.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple


@dataclass(frozen=True)
class WeightType:
    name: str               # tpllama's name ("q40")
    ggml: str               # GGML's name ("Q4_0"), as gguf.GGMLQuantizationType spells it
    block: int              # values per GGML block along a row
    block_bytes: int        # bytes per GGML block in the file
    bits: float             # bits per weight in the file (block_bytes * 8 / block)
    native: bool            # tpllama has packed SIMD kernels for it (else it is converted)
    runtime_bytes_per_32: Optional[float] = None  # bytes per 32 weights of one row once packed (None: f32/float)
    activation: Optional[str] = "q80"              # format the activations are quantized to (None: float)
    unit: int = 32          # column slices must start and end at multiples of this
    fp16_offsets: Tuple[int, ...] = ()   # byte offsets of the fp16 scales/mins inside a GGML block
    span_header: int = 0    # K-quants: bytes per row of a span header (d, dmin once per super-block), else 0

    @property
    def quantized(self) -> bool:
        return self.activation is not None


def _q(name, ggml, block, block_bytes, native, runtime32, fp16_offsets, span_header=0):
    return WeightType(name, ggml, block, block_bytes, block_bytes * 8 / block, native, runtime32,
                      fp16_offsets=fp16_offsets, span_header=span_header)


# Runtime bytes per 32 weights: the packed layouts in kernels/tpk.h (for the K-quants the span
# header's share included: a row's d, dmin once per 8 blocks of 32). A type that is not native
# yet has None there; set both when its kernels land.
TYPES: Dict[str, WeightType] = {t.name: t for t in (
    WeightType("f32", "F32", 1, 4, 32.0, True, None, None, 1),
    WeightType("f16", "F16", 1, 2, 16.0, False, None, None, 1),
    WeightType("bf16", "BF16", 1, 2, 16.0, False, None, None, 1),
    _q("q40", "Q4_0", 32, 18, True, 18, (0,)),
    _q("q41", "Q4_1", 32, 20, True, 20, (0, 2)),
    _q("q50", "Q5_0", 32, 22, True, 22, (0,)),
    _q("q80", "Q8_0", 32, 34, True, 34, (0,)),
    _q("q4k", "Q4_K", 256, 144, True, 18.5, (0, 2), span_header=4),
    _q("q5k", "Q5_K", 256, 176, True, 22.5, (0, 2), span_header=4),
    _q("q6k", "Q6_K", 256, 210, True, 26.25, (208,), span_header=2),
)}

BY_GGML: Dict[str, WeightType] = {t.ggml: t for t in TYPES.values()}

# What `--weight-type` accepts: "auto" (each tensor in its file's own type where tpllama runs it)
# or one type forced on every matrix: only the types tpllama can quantize any weights to.
RUNTIME_TYPES = tuple(n for n, t in TYPES.items() if t.native)
FORCED_TYPES = ("f32", "q40", "q80")
WEIGHT_TYPE_CHOICES = ("auto",) + FORCED_TYPES

ROWS_PER_GROUP = 16   # the kernels pack rows 16 at a time (the last group padded)
SPAN = 8              # K-quant blocks of 32 per span header (one GGML super-block)
SPAN_PREFIX = 64      # K-quants: bytes before a row group's first span (its phase)


def weight_type(name: str) -> WeightType:
    """The entry for a tpllama name ("q40") or a GGML name ("Q4_0")."""
    t = TYPES.get(name) or BY_GGML.get(name)
    if t is None:
        raise KeyError(f"unknown weight type {name!r}")
    return t


def runtime_bytes(name: str, rows: int, cols: int) -> int:
    """Bytes of a (rows, cols) matrix of runtime type `name` once loaded (rows padded to 16 for
    packed quantized types)."""
    t = weight_type(name)
    if not t.quantized:
        return rows * cols * 4
    if t.runtime_bytes_per_32 is None:
        raise ValueError(f"{t.name} has no runtime layout yet")
    groups = -(-rows // ROWS_PER_GROUP)
    nb = cols // 32
    if not t.span_header:
        return int(groups * ROWS_PER_GROUP * nb * t.runtime_bytes_per_32)
    # a row group: prefix, then spans; room for the headers of the worst phase, ceil((nb + 7) / 8)
    block = t.runtime_bytes_per_32 - t.span_header / SPAN
    headers = (nb + 2 * SPAN - 2) // SPAN
    return int(groups * (SPAN_PREFIX + ROWS_PER_GROUP * (headers * t.span_header + nb * block)))

"""--rank-weights auto: each rank times its own decode matvec at start, and the ranks' speeds
become the split's weights (plan.make_plan gives each rank heads and FFN units in proportion).

The probe needs no model file (a rank that gets its weights from rank 0 has none): it builds a
matrix of the model's FFN shape in the runtime type most of the model's matrices run in, from
random GGML blocks with finite scales, copies it until the copies are larger than a CPU cache
holds, and times matvecs over them with the rank's own thread count for a bounded time. The
ranks of one host probe at the same moment, so they share its memory bandwidth as they will
while decoding. Speeds are rounded to 1/16 of the fastest so that a rerun on the same machines
usually gets the same split (and so the same shard files).

The same probe chooses how far ahead the SIMD kernels ask for weights (`--prefetch auto`): its
passes alternate the candidate distances and the fastest median wins. Which pays depends on the
machine (1 KiB ahead made one thread's q40 matvec 1.2-1.4x faster on a Zen 3, 0.85-0.9x on a
Zen 4 VM: docs/kernels.md); the arithmetic is the same either way.
"""
from __future__ import annotations

import time
from collections import Counter
from typing import Dict, List, Sequence, Tuple

import numpy as np

from . import _kernels as K
from .config import ModelConfig
from .matrix import QK, Activation, Matrix, _ARENA, runtime_type
from .wtypes import weight_type

PROBE_SECONDS = 0.25          # time spent in matvecs (plus one warm-up pass)
PROBE_FOOTPRINT = 64 * 2**20  # bytes of weights streamed per pass: beyond what a cache holds
PROBE_ROWS = 4096             # rows of the probe matrix at most (the model's FFN width below that)
SPEED_STEPS = 16              # speeds are rounded to multiples of 1/16 of the fastest rank's
PREFETCH_CHOICES = (0, 1024)  # bytes ahead the kernels ask for weights: none (the hardware's prefetcher alone), 1 KiB
PREFETCH_SECONDS = 0.2        # time spent choosing among them


def probe_type(types) -> str:
    """The runtime type most of the model's weight matrices run in (a TypePlan)."""
    return Counter(types.runtime(name) for name in types.kinds).most_common(1)[0][0]


def probe_matrices(wtype: str, rows: int, cols: int, threads: int, footprint: int, seed: int = 0) -> List[Matrix]:
    """Copies of one (rows, cols) matrix of random weights in runtime type `wtype` (scales finite),
    about `footprint` bytes in all (at least one copy, at most 256), in one scratch mapping that
    goes away with them (the weights' arena keeps its chunks)."""
    rng = np.random.default_rng(seed)
    wtype = runtime_type(wtype, cols)
    if wtype == "f32":
        return [Matrix("f32", rows, cols, rng.standard_normal((rows, cols), dtype=np.float32), threads)]
    t = weight_type(wtype)
    blocks = rng.integers(0, 256, size=(rows, cols // t.block, t.block_bytes), dtype=np.uint8)
    scale = np.array([0.01], dtype=np.float16).view(np.uint8)
    for at in t.fp16_offsets:
        blocks[:, :, at:at + 2] = scale
    nbytes = K.packed_bytes(wtype, rows, cols // QK)
    stride = -(-nbytes // 64) * 64
    copies = max(1, min(256, footprint // stride))
    buffer = _ARENA.scratch(copies * stride)
    first = K.pack_ggml(wtype, blocks.reshape(rows, -1), 0, cols, buffer[:nbytes])
    mats = []
    for i in range(copies):
        data = buffer[i * stride:i * stride + nbytes]
        data[:] = first
        mats.append(Matrix(wtype, rows, cols, data, threads, packed=True))
    return mats


def probe_passes(config: ModelConfig, wtype: str, threads: int, footprint: int = PROBE_FOOTPRINT):
    """(one_pass, nbytes): a function making one-token matvecs of the model's FFN shape over all
    the probe's copies (warmed up by one pass here), and the bytes of weights one pass reads."""
    mats = probe_matrices(wtype, min(config.hidden_dim, PROBE_ROWS), config.dim, threads, footprint)
    a = Activation(np.random.default_rng(1).standard_normal((1, config.dim), dtype=np.float32))

    def one_pass():
        for m in mats:
            m(a)
    one_pass()
    return one_pass, sum(m.nbytes for m in mats)


def matvec_speed(config: ModelConfig, wtype: str, threads: int, seconds: float = PROBE_SECONDS,
                 footprint: int = PROBE_FOOTPRINT) -> float:
    """GB/s of `wtype` weights this process streams through one-token matvecs of the model's
    FFN shape with `threads` threads: one warm-up pass over the copies, then passes for
    about `seconds` (at least one)."""
    one_pass, nbytes = probe_passes(config, wtype, threads, footprint)
    passes, start = 0, time.perf_counter()
    while True:
        one_pass()
        passes += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return passes * nbytes / elapsed / 1e9


def prefetch_speeds(config: ModelConfig, wtype: str, threads: int, choices: Sequence[int] = PREFETCH_CHOICES,
                    seconds: float = PREFETCH_SECONDS, footprint: int = PROBE_FOOTPRINT) -> Dict[int, float]:
    """GB/s of the probe's one-token matvecs at each prefetch distance (bytes; 0: none): passes
    over the copies alternate the distances, in turn first, for about `seconds` (one pass of
    each at least); the median pass of each. The kernels' distance is restored afterwards."""
    before = K.prefetch()
    samples: Dict[int, List[float]] = {c: [] for c in choices}
    try:
        one_pass, nbytes = probe_passes(config, wtype, threads, footprint)
        start = time.perf_counter()
        while not samples[choices[0]] or time.perf_counter() - start < seconds:
            order = choices if len(samples[choices[0]]) % 2 == 0 else tuple(reversed(choices))
            for c in order:
                K.set_prefetch(c)
                t = time.perf_counter()
                one_pass()
                samples[c].append(nbytes / (time.perf_counter() - t) / 1e9)
    finally:
        K.set_prefetch(before)
    return {c: float(np.median(v)) for c, v in samples.items()}


def fastest_prefetch(speeds: Dict[int, float]) -> int:
    """The distance of the highest speed (the first listed of equals)."""
    return max(speeds, key=lambda c: speeds[c])


def weights_from_speeds(speeds: Sequence[float], steps: int = SPEED_STEPS) -> Tuple[float, ...]:
    """Split weights from measured speeds: each over the fastest, rounded to a multiple of
    1/steps (at least 1/steps)."""
    fastest = max(speeds)
    if not fastest > 0:
        raise ValueError(f"measured speeds must be positive, got {list(speeds)}")
    return tuple(max(1, round(steps * s / fastest)) / steps for s in speeds)

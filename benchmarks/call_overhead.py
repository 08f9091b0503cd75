#!/usr/bin/env python3
"""What one call of each per-step kernel costs at the default model's shapes (SmolLM2-135M on one
rank: dim 576, 9 query / 3 kv heads of 64, FFN 1536, 10 cached positions), where the C work is
small and the Python face of the kernels is a visible part of it.

    python benchmarks/call_overhead.py [--against OTHER_CHECKOUT] [--reps 5]

Prints microseconds per call (best of --reps repetitions of 2,000 calls) and, per decode step,
the calls a layer makes times the model's 30 layers. With --against (another built checkout,
e.g. a `git worktree` of an older commit) the other build's kernels are timed in the same
process, alternating with this one's, and the table gives both and what a step saves.
Writes JSON to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import sys
import timeit
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO))      # `benchmarks`, after any installed tpllama: _common picks which one runs
from benchmarks._common import machine_header, machine_info, other_kernels, write_results  # noqa: E402
from tpllama import _kernels as K  # noqa: E402

LAYERS = 30
DIM, HEADS, KV_HEADS, HEAD_DIM, FFN, POSITIONS = 576, 9, 3, 64, 1536, 10
# calls a decode step's layer makes (tpllama/model.py): 2 norms, q80 of the attention and FFN inputs
# and of the two row-parallel inputs, rope of q and k, one attention, wqkv and w1/w3 in one call
# each, wo and w2, one silu*mul
PER_LAYER = {"rmsnorm": 2, "quantize_q80": 4, "rope": 2, "attention": 1, "matmul_packed_many": 2,
             "matmul_packed": 2, "silu_mul": 1}


def calls(kernels) -> dict:
    """name -> a call of that kernel at the shapes above (q80 weights: the type does not matter here)."""
    r = np.random.default_rng(0)
    x = r.standard_normal((1, DIM)).astype(np.float32)
    w = np.ones(DIM, np.float32)
    xq = kernels.quantize_q80(x)
    wp = kernels.pack("q80", kernels.quantize_q80(r.standard_normal((DIM, DIM)).astype(np.float32)))
    q = r.standard_normal((1, HEADS * HEAD_DIM)).astype(np.float32)
    kv = r.standard_normal((1, KV_HEADS * HEAD_DIM)).astype(np.float32)
    kc, vc = np.zeros((KV_HEADS, 512, HEAD_DIM), np.float32), np.zeros((KV_HEADS, 512, HEAD_DIM), np.float32)
    kv_of_head = (np.arange(HEADS) // (HEADS // KV_HEADS)).astype(np.int32)
    cos = np.ones((1, HEAD_DIM // 2), np.float32)
    gate, up = np.ones((1, FFN), np.float32), np.ones((1, FFN), np.float32)
    out = np.empty((1, DIM), np.float32)
    outs = [np.empty((1, DIM), np.float32) for _ in range(3)]
    return {
        "rmsnorm": lambda: kernels.rmsnorm(x, w, 1e-5, 1),
        "quantize_q80": lambda: kernels.quantize_q80(x),
        "rope": lambda: kernels.rope(q, HEAD_DIM, cos, cos),
        "attention": lambda: kernels.attention(q, kv, kv, kc, vc, POSITIONS, kv_of_head, np.float32(0.125), 1),
        "matmul_packed_many": lambda: kernels.matmul_packed_many("q80", [wp] * 3, [DIM] * 3, DIM // 32, xq, outs, 1),
        "matmul_packed": lambda: kernels.matmul_packed("q80", wp, DIM, DIM // 32, xq, out, 1),
        "silu_mul": lambda: kernels.silu_mul(gate, up, 1),
    }


def best_us(f, reps: int) -> float:
    return min(timeit.repeat(f, number=2000, repeat=reps)) / 2000 * 1e6


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--against", type=Path, help="another built checkout whose kernels to time alongside")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json", help="results file (default benchmarks/results/call_overhead-<time>.json)")
    a = p.parse_args(argv)
    builds = {"this": calls(K)}
    if a.against:
        builds["other"] = calls(other_kernels(a.against))
    info = machine_info()
    print(machine_header(info) + f"; best of {a.reps} x 2,000 calls")
    times = {b: {} for b in builds}
    for name in PER_LAYER:
        for _ in range(a.reps):                      # alternated, so both see the same noise
            for b, fs in builds.items():
                times[b][name] = min(times[b].get(name, float("inf")), best_us(fs[name], 1))
    head = "| kernel | calls a layer | this build, us/call |" + (" other build, us/call | saved a step, ms |" if a.against else "")
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for name, n in PER_LAYER.items():
        row = f"| {name} | {n} | {times['this'][name]:.2f} |"
        if a.against:
            row += f" {times['other'][name]:.2f} | {(times['other'][name] - times['this'][name]) * n * LAYERS / 1e3:.2f} |"
        print(row)
    step = {b: sum(times[b][name] * n for name, n in PER_LAYER.items()) * LAYERS / 1e3 for b in builds}
    line = f"these calls of a decode step ({LAYERS} layers): {step['this']:.2f} ms"
    if a.against:
        line += f" (other build {step['other']:.2f} ms: {step['other'] - step['this']:.2f} ms saved)"
    print(line)
    out = write_results("call_overhead", {"meta": info, "per_layer": PER_LAYER, "layers": LAYERS, "us_per_call": times,
                                          "ms_per_step": step, "against": str(a.against) if a.against else None},
                        a.json)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

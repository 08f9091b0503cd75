#!/usr/bin/env python3
"""A model of ms/token on clusters of Raspberry Pis, from what is measured here and what is
assumed about the Pis (every assumption is a named constant below, and printed).

    python benchmarks/cluster_model.py                       # assumptions only
    python benchmarks/cluster_model.py --kernels benchmarks/results/kernels-*.json \
        --allreduce benchmarks/results/allreduce-netem-1gbit.json

ms/token = compute + sync, where
  compute = max over ranks of (weight bytes of the rank / its streaming rate); with
            --rank-weights proportional to node speed every rank finishes together, so
            compute = weights / (sum of node rates);
  sync    = 2 x layers all-reduces of dim values per token (+ a token broadcast and a
            candidate gather), each costing min(ring, recursive doubling) over links of
            latency a and bandwidth b:
              ring:                2(K-1) a + 2(K-1)/K x bytes / b
              recursive doubling:  log2(K) (a + bytes / b)
The node rate is the Pi's memory bandwidth times the fraction of streaming bandwidth that
tpllama's decode kernel reaches on this machine (measured: --kernels), because decoding
reads every weight once per token.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO))      # `benchmarks`, after any installed tpllama: _common picks which one runs
import benchmarks._common  # noqa: E402,F401  (chooses the tpllama)
from tpllama.bench.make_model import SHAPES as MODEL_SHAPES  # noqa: E402

# ---------------------------------------------------------------- assumptions (stated, not measured here)
PI5_BANDWIDTH_GBS = 9.0     # Pi 5 (LPDDR4X-4267, 32-bit): ~9 GB/s read with 4 cores; distributed-llama's
                            # 436 ms/token for 3.9 GB of Llama 2 7B q40 on one Pi 5 implies the same
PI4_RATE_GBS = 2.8          # Pi 4 / CM4 (Cortex-A72, no dotprod): compute-bound q40 x q80, about
                            # what distributed-llama's mixed Pi 5 + CM4 figures imply
GBE_LATENCY_MS = 0.2        # one-way latency of a message through MPI over 1 GbE on a Pi
GBE_BANDWIDTH_MBS = 117.0   # TCP payload rate of 1 Gbit/s Ethernet

DLLAMA = {  # distributed-llama's published figures, Llama 2 7B q40
    ("pi5", 1): 436, ("pi5", 2): 297, ("pi5", 4): 241, ("mixed", 2): 749, ("mixed", 4): 491,
}
DLLAMA_TRAFFIC_MB_4 = 2.75


def weight_bytes(shape) -> float:
    """q40 bytes of a shape's matrices (the embedding stays in the file), as tpllama's plan counts them."""
    from tpllama.config import ModelConfig
    from tpllama.plan import make_plan
    from tpllama.plan import weight_bytes as plan_bytes
    config = ModelConfig(dim=shape.dim, hidden_dim=shape.ffn, n_layers=shape.layers, n_heads=shape.heads,
                         n_kv_heads=shape.kv_heads, vocab_size=shape.vocab, max_seq_len=shape.ctx)
    return plan_bytes(config, make_plan(config, 1)[0], "q40")


SHAPES = [(MODEL_SHAPES["llama2-7b"], "Llama 2 7B"), (MODEL_SHAPES["llama3-8b"], "Llama 3 8B")]
SYNC_BYTES = {"f64": 8.0, "f32": 4.0, "bf16": 2.0, "q80": 34 / 32}


def allreduce_ms(k: int, nbytes: float, latency_ms: float, mbs: float) -> float:
    if k == 1:
        return 0.0
    per_byte_ms = 1e3 / (mbs * 1e6)
    ring = 2 * (k - 1) * latency_ms + 2 * (k - 1) / k * nbytes * per_byte_ms
    doubling = math.ceil(math.log2(k)) * (latency_ms + nbytes * per_byte_ms)
    return min(ring, doubling)


def sync_ms(shape, k: int, sync: str, latency_ms: float, mbs: float) -> float:
    if k == 1:
        return 0.0
    per_layer = 2 * allreduce_ms(k, shape.dim * SYNC_BYTES[sync], latency_ms, mbs)
    small = 2 * math.ceil(math.log2(k)) * latency_ms        # token broadcast + candidate gather
    return shape.layers * per_layer + small


def traffic_mb(shape, k: int, sync: str) -> float:
    """Bytes a rank sends per token with a ring all-reduce (what a switch port carries)."""
    if k == 1:
        return 0.0
    return 2 * shape.layers * 2 * (k - 1) / k * shape.dim * SYNC_BYTES[sync] / 1e6


def kernel_efficiency(path_glob: str) -> float:
    """tpllama decode GB/s over streaming-read GB/s at 1 thread, median over the matrix shapes."""
    files = sorted(glob.glob(path_glob))
    if not files:
        return 1.0
    data = json.load(open(files[-1]))
    ratios = sorted(row["decode_fraction_of_bandwidth"] for row in data["results"] if row["threads"] == 1)
    return ratios[len(ratios) // 2] if ratios else 1.0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernels", default="benchmarks/results/kernels-*.json", help="kernels.py result (efficiency)")
    p.add_argument("--allreduce", default=None, help="allreduce.py --netem result (fitted MPI overhead on links)")
    p.add_argument("--efficiency", type=float, default=None, help="override the kernel efficiency")
    args = p.parse_args(argv)
    eff = args.efficiency if args.efficiency is not None else min(1.0, kernel_efficiency(args.kernels))
    latency, mbs = GBE_LATENCY_MS, GBE_BANDWIDTH_MBS
    measured = ""
    if args.allreduce:
        fits = json.load(open(args.allreduce))
        two = fits.get("2") or next(v for k, v in fits.items() if k.isdigit())
        measured = (f"; measured here over a shaped 1 Gbit/s link: {two['latency_ms']:.3f} ms + bytes / "
                    f"{two['bandwidth_MBps']:.0f} MB/s per all-reduce of 2 ranks")
    pi5, pi4 = PI5_BANDWIDTH_GBS * eff, PI4_RATE_GBS
    print(f"assumptions: Pi 5 {PI5_BANDWIDTH_GBS} GB/s x kernel efficiency {eff:.2f} = {pi5:.1f} GB/s of weights; "
          f"Pi 4/CM4 {pi4} GB/s; 1 GbE {latency} ms latency, {mbs} MB/s{measured}\n")
    for shape, title in SHAPES:
        w = weight_bytes(shape)
        print(f"{title}: {w / 1e9:.2f} GB of q40 weights, {2 * shape.layers} all-reduces of {shape.dim} values per token")
        print(f"{'nodes':>6} {'cluster':>7} {'compute':>8} " + " ".join(f"{'sync ' + s:>9} {'total':>6}" for s in SYNC_BYTES)
              + f" {'MB/tok f64':>10} {'q80':>5}  distributed-llama")
        for kind in ("pi5", "mixed"):
            for k in (1, 2, 4, 8):
                if kind == "mixed" and k == 1:
                    continue
                if k > shape.heads:
                    continue
                rates = [pi5] * k if kind == "pi5" else [pi5] * (k // 2) + [pi4] * (k - k // 2)
                compute = w / (sum(rates) * 1e9) * 1e3          # weighted split: everyone finishes together
                cells = []
                for s in SYNC_BYTES:
                    sy = sync_ms(shape, k, s, latency, mbs)
                    cells.append(f"{sy:>9.1f} {compute + sy:>6.0f}")
                ref = DLLAMA.get((kind, k)) if title == "Llama 2 7B" else None
                print(f"{k:>6} {kind:>7} {compute:>8.1f} " + " ".join(cells)
                      + f" {traffic_mb(shape, k, 'f64'):>10.2f} {traffic_mb(shape, k, 'q80'):>5.2f}  {ref or ''}")
        print()
    print(f"distributed-llama reports {DLLAMA_TRAFFIC_MB_4} MB per token at 4 nodes (Llama 2 7B).")


if __name__ == "__main__":
    main()

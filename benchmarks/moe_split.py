#!/usr/bin/env python3
"""Whole experts per rank against a slice of every expert: how long a decoded token waits.

A mixture-of-experts token runs k of E experts. Split by whole experts (E/R per rank), a token's
decode step lasts as long as its busiest rank, which runs however many of the k picked experts
it holds; split as tpllama splits them (every rank a 1/R slice of every expert), every rank
runs k slices, k/R experts' work. This samples routings and prints the busiest rank's mean
load against k/R, the slowdown of whole experts at best: routing uniformly at random, as
evenly as a router can spread its picks (trained routers are more skewed).

    python benchmarks/moe_split.py                              # Qwen3-30B-A3B: 8 of 128
    python benchmarks/moe_split.py --experts 64 --top-k 4 --ranks 2,4
"""
from __future__ import annotations

import argparse

import numpy as np


def busiest_rank_load(experts: int, k: int, ranks: int, samples: int, seed: int = 0) -> float:
    """Mean number of a token's k experts held by its busiest rank, experts dealt out to ranks
    in contiguous blocks of experts/ranks, over `samples` uniformly random routings."""
    rng = np.random.default_rng(seed)
    picks = np.argsort(rng.random((samples, experts)), axis=1)[:, :k]
    owner = picks * ranks // experts
    load = np.stack([(owner == r).sum(axis=1) for r in range(ranks)], axis=1)
    return float(load.max(axis=1).mean())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--ranks", default="2,4,8", help="comma-separated rank counts")
    p.add_argument("--samples", type=int, default=200_000)
    a = p.parse_args(argv)
    print(f"{a.top_k} of {a.experts} experts per token, {a.samples:,} uniformly random routings\n")
    print("| ranks | busiest rank, whole experts | every rank, a slice of every expert | slowdown of whole experts |")
    print("|---|---|---|---|")
    for ranks in (int(r) for r in a.ranks.split(",")):
        busiest = busiest_rank_load(a.experts, a.top_k, ranks, a.samples)
        print(f"| {ranks} | {busiest:.2f} experts | {a.top_k / ranks:.2f} experts | {busiest * ranks / a.top_k:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

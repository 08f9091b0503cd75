"""What batching can give on this machine: the time of one decode step that carries B sequences.

    python benchmarks/batch_ceiling.py [--shape tinyllama-1.1b] [--type q40] [--threads 1,2] [--batch 1,2,4,8]

The server's throughput with N clients (benchmarks/serve_load.py) cannot beat N times the time of
a one-sequence step over the time of an N-sequence step: that is what perfect scheduling with no
server, HTTP or sampling cost would give. This script measures those steps in one process, one
rank (tpllama.load, then the rank's own forward pass of B one-token segments, each in its own KV
cache slot at position 100, and the logits of the B rows), alternating batch sizes, medians of
--reps. It prints ms per step, the cost of each sequence beyond the first, and the ceiling
N x t(1) / t(N) next to the goal of issue 13 (4 clients >= 3x, 8 clients >= 5x); with
--against-steps, also each step with model.py's own steps (a kernel call at a time) instead of a
C call per sublayer, alternated, and their ratio. Writes JSON to benchmarks/results/.

One step reads the weights once whatever B, but multiplies every row of them by B tokens: when
one token's arithmetic already takes a good part of the time that reading takes, as with the
int8 products of an AVX2 core (docs/performance.md), the step grows by that much per sequence.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO))      # `benchmarks`, after any installed tpllama: _common picks which one runs
from benchmarks._common import Quiet, add_model_arguments, bench_model, machine_header, machine_info, median, spread, write_results  # noqa: E402

POSITION = 100          # cached positions of every sequence: a short conversation
GOALS = {4: 3.0, 8: 5.0}


def step_seconds(rank_model, batch: int) -> float:
    """One decode step of `batch` sequences: their forward pass and their logits."""
    from tpllama.model import Segment
    segments = [Segment(slot=s, start=POSITION, length=1) for s in range(batch)]
    tokens = np.arange(100, 100 + batch)
    t = time.perf_counter()
    rank_model.logits(rank_model.forward(tokens, segments, lambda partial: partial))
    return time.perf_counter() - t


def measure(model_path: str, threads: int, batches, reps: int, quiet: Quiet, against_steps: bool = False):
    """{B: step seconds per repetition}, and the same with model.py's own steps instead of a C
    call per sublayer when against_steps (else None)."""
    import tpllama
    model = tpllama.load(model_path, tokenizer="none", threads=threads, ctx_size=256, parallel=max(batches),
                         shard_cache=False)
    rm = model.rank_model
    fused = rm.fused
    for b in batches:                      # warm-up: caches, pages, thread pool
        step_seconds(rm, b)
    times = {b: [] for b in batches}
    steps = {b: [] for b in batches} if against_steps else None
    for _ in range(reps):
        for b in batches:                  # alternating, so a busy moment hits every size alike
            quiet.wait()
            times[b].append(step_seconds(rm, b))
            if against_steps:
                rm.fused = None
                steps[b].append(step_seconds(rm, b))
                rm.fused = fused
    return times, steps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(p, default_type="q40")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    p.add_argument("--batch", default="1,2,4,8", help="comma-separated sequences per step (must include 1)")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--no-quiet", action="store_true", help="do not wait for the rest of the machine to be idle")
    p.add_argument("--against-steps", action="store_true",
                   help="also time each step with model.py's own steps instead of a C call per sublayer, alternated")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/batch_ceiling-<time>.json)")
    args = p.parse_args(argv)
    batches = sorted({int(b) for b in args.batch.split(",")})
    if batches[0] != 1:
        p.error("--batch must include 1 (the ceiling is relative to a one-sequence step)")
    model_path = bench_model(args.model, args.shape, args.type)
    info = machine_info()
    print(machine_header(info), flush=True)
    quiet = Quiet(enabled=not args.no_quiet)
    results = {}
    for threads in [int(t) for t in args.threads.split(",")]:
        times, steps = measure(model_path, threads, batches, args.reps, quiet, args.against_steps)
        one = median(times[1])
        rows = []
        print(f"\n{os.path.basename(model_path)}, 1 rank, {threads} thread(s), sequences at position {POSITION}")
        against = f" {'model.py steps, ms':>22} {'ratio':>6}" if steps else ""
        print(f"{'B':>3} {'ms per step':>22} {'ms per extra sequence':>22} {'ceiling B x t(1)/t(B)':>22}  goal{against}")
        for b in batches:
            t = median(times[b])
            extra = (t - one) / (b - 1) * 1e3 if b > 1 else float("nan")
            ceiling = b * one / t
            goal = f">= {GOALS[b]:.0f}x" if b in GOALS else ""
            row = {"batch": b, "step_s": times[b], "median_s": t, "extra_ms": extra, "ceiling": ceiling}
            tail = ""
            if steps:
                row.update(steps_s=steps[b], steps_over_fused=median(steps[b]) / t)
                tail = f" {spread([x * 1e3 for x in steps[b]]):>22} {row['steps_over_fused']:>5.2f}x"
            print(f"{b:>3} {spread([x * 1e3 for x in times[b]]):>22} {extra:>22.1f} {ceiling:>21.2f}x  {goal:<6}{tail}")
            rows.append(row)
        results[threads] = rows
    out = write_results("batch_ceiling", {"model": model_path, "position": POSITION, "results": results,
                                          "machine": info, "busy_repetitions": quiet.noisy}, args.out)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

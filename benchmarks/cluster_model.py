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

--here checks the same model against runs on this machine's namespace hosts (sweep.py --netem,
rank_weights.py --netem) from this machine's measured inputs, and prints predicted against
measured with the error:

    python benchmarks/cluster_model.py --here --one-rank R/one/*.json R/one16/*.json R/one16scalar/*.json \
        --allreduce R/allreduce-netem-1gbit.json --measured R/netem/sweep-*.json --measured-slow R/rank_weights-X.json

  inputs   a 1-rank sweep point (1 thread) per kernel level and prompt length: its decode ms per
           token and prefill ms are the single-node compute; allreduce.py --netem's all-reduce
           times on the shaped links at 2 and 4 ranks, read at the payload (interpolated
           between the measured sizes, not the straight-line fit, which misses small payloads);
  compute  each sublayer ends in an all-reduce, so a step is, per layer, the slowest rank's
           attention then the slowest rank's FFN (and, once, the output rows): rank i's part of
           a sublayer is its share of that sublayer's weights (the plan, tpllama.plan.make_plan)
           over its rate (the 1-rank run's weights / time at its kernel level), every part of a
           step's work taken as proportional to the weights it reads; with --rank-weights auto,
           the split is the one its probe chose in each measured run (like the kernel levels,
           an input of the run, not a result; runs that chose different splits are compared
           apart);
  cores    the scheduler shares the cores evenly among the processes that want to run: each of
           K ranks gets min(1, cores / (K + other work's cores)) of a core, the 1-rank run got
           min(1, cores / (1 + its other work)); the other work is what sweep.py and
           rank_weights.py measured during each run (OthersCpu: busy cores minus the run's own
           CPU time), so 4 ranks on 2 cores, or 2 ranks beside another job, compute slower;
  sync     2 x layers all-reduces of dim (decode) or prompt x dim (prefill) float64 values at
           the measured time for that payload, plus a token broadcast and a candidate gather
           (each the smallest payload's time); for decode, the time measured as decode meets
           all-reduces (allreduce.py --between-ms: after a little work, without a barrier), which
           on hosts that share cores includes waiting for a rank that was descheduled.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
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
    from tpllama.plan import make_plan
    from tpllama.plan import weight_bytes as plan_bytes
    config = shape.config()
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


# ---------------------------------------------------------------- this machine's namespace hosts (--here)

def allreduce_times(path: str, key: str = "seconds") -> dict:
    """allreduce.py's measured all-reduce times: {ranks: [(payload bytes, ms), ...]}; key
    "seconds_between": those measured as decode meets them (after work, no barrier), where present."""
    data = json.load(open(path))
    return {int(k): sorted((int(n), 1e3 * t) for n, t in (v.get(key) or v["seconds"]).items())
            for k, v in data.items() if k.isdigit()}


def allreduce_at(points, nbytes: float) -> float:
    """ms of one all-reduce of nbytes: log-log interpolation between the measured payloads
    (the nearest end's time outside them, scaled by bytes above the largest)."""
    if nbytes <= points[0][0]:
        return points[0][1]
    for (n0, t0), (n1, t1) in zip(points, points[1:]):
        if nbytes <= n1:
            f = math.log(nbytes / n0) / math.log(n1 / n0)
            return math.exp(math.log(t0) + f * math.log(t1 / t0))
    n, t = points[-1]
    return t * nbytes / n


def one_rank_points(paths) -> dict:
    """1-rank, 1-thread sweep rows by (kernel level, prompt tokens): what one node computes alone."""
    rows = {}
    for path in paths:
        for r in json.load(open(path))["rows"]:
            if r.get("ranks") == 1 and r.get("threads") == 1 and "error" not in r:
                rows[(r.get("simd_levels", ["?"])[0], r["pp"])] = r
    return rows


def sublayer_elements(config, shard):
    """Weight elements a rank reads per token: (attention per layer, FFN per layer, output)."""
    hd, d = config.head_dim, config.dim
    attention = 2 * len(shard.heads) * hd * d + 2 * len(shard.kv_heads) * hd * d
    return attention, 3 * len(shard.ffn) * d, len(shard.vocab) * d


def step_compute_ms(plan, rates, with_output: bool = True) -> float:
    """Per layer the slowest rank's attention, then the slowest rank's FFN, then the slowest
    rank's output rows; rates in weight elements per ms of each rank."""
    parts = [sublayer_elements(plan.config, s) for s in plan.ranks]
    attention = max(a / r for (a, _, _), r in zip(parts, rates))
    ffn = max(f / r for (_, f, _), r in zip(parts, rates))
    output = max(o / r for (_, _, o), r in zip(parts, rates)) if with_output else 0.0
    return plan.config.n_layers * (attention + ffn) + output


def whole_elements(config, with_output: bool = True) -> float:
    from tpllama.plan import make_plan
    a, f, o = sublayer_elements(config, make_plan(config, 1).ranks[0])
    return config.n_layers * (a + f) + (o if with_output else 0)


def core_share(processes: int, others: float, cores: int) -> float:
    """The share of a core each of `processes` busy processes gets while other work keeps
    `others` cores busy: the scheduler shares the cores evenly among what wants to run."""
    return min(1.0, cores / (processes + others))


def predict_here(config, alone: dict, levels, weights, times, decode_times, cores: int, pp: int,
                 others: float = 0.0) -> dict:
    """Predicted decode ms/token and prefill tokens/s of len(levels) ranks of 1 thread, rank i
    at kernel level levels[i], split by `weights` (None: even), over links of `times` (and
    `decode_times` for decode's all-reduces), while other work keeps `others` cores busy."""
    from tpllama.plan import make_plan
    k = len(levels)
    plan = make_plan(config, k, weights)
    # the 1-rank runs had core_share(1, their others) of a core, each of these ranks gets core_share(k, others)
    over = [core_share(1, alone[(lv, pp)].get("others_cores", 0.0), cores) / core_share(k, others, cores)
            for lv in levels]
    decode_rates = [whole_elements(config) / alone[(lv, pp)]["decode_ms"] / o for lv, o in zip(levels, over)]
    prefill_rates = [whole_elements(config, False) / (1e3 * pp / alone[(lv, pp)]["pp_median"]) / o
                     for lv, o in zip(levels, over)]
    small = 2 * times[k][0][1] if k > 1 else 0.0
    per_layer = 2 * config.n_layers
    decode_sync = per_layer * allreduce_at(decode_times[k], config.dim * 8) + small if k > 1 else 0.0
    prefill_sync = per_layer * allreduce_at(times[k], pp * config.dim * 8) + small if k > 1 else 0.0
    decode = step_compute_ms(plan, decode_rates) + decode_sync
    prefill = step_compute_ms(plan, prefill_rates, with_output=False) + prefill_sync
    return {"decode_ms": decode, "decode_sync_ms": decode_sync, "pp_tokens_per_s": 1e3 * pp / prefill,
            "prefill_sync_ms": prefill_sync, "weights": list(plan.weights)}


def error_pct(predicted: float, measured: float) -> str:
    return f"{100 * (predicted - measured) / measured:+.0f}%"


def compare_row(label, pred, decode_ms, pp_tps) -> str:
    return (f"| {label} | {pred['decode_ms']:.1f} | {decode_ms:.1f} | {error_pct(pred['decode_ms'], decode_ms)} | "
            f"{pred['pp_tokens_per_s']:.1f} | {pp_tps:.1f} | {error_pct(pred['pp_tokens_per_s'], pp_tps)} |")


def here(args) -> int:
    """--here: predictions of the namespace-host runs beside their measured figures."""
    from benchmarks._common import median
    if args.model:
        from tpllama.formats import open_model
        config = open_model(args.model).config
    else:
        config = MODEL_SHAPES[args.shape].config()
    alone = one_rank_points(args.one_rank)
    times = allreduce_times(args.allreduce)
    decode_times = allreduce_times(args.allreduce, "seconds_between")
    cores = args.cores
    best = min(alone, key=lambda key: alone[key]["decode_ms"])[0]      # the fast node's kernel level
    print(f"{args.model or args.shape}: 1-rank inputs " + "; ".join(
        f"{lv} pp{pp}: decode {r['decode_ms']:.1f} ms/token, prefill {r['pp_median']:.1f} tok/s"
        for (lv, pp), r in sorted(alone.items())) + f"; {cores} cores")
    for k, pts in sorted(times.items()):
        print(f"all-reduce on the links, {k} ranks: {allreduce_at(pts, config.dim * 8):.3f} ms at "
              f"{config.dim * 8 // 1024} KiB after a barrier, {allreduce_at(decode_times[k], config.dim * 8):.3f} ms "
              f"as decode meets it; {allreduce_at(pts, 64 * config.dim * 8):.2f} ms at "
              f"{64 * config.dim * 8 // 1024} KiB (pp64)")
    head = ("| run | decode ms/token predicted | measured | error | prompt tok/s predicted | measured | error |\n"
            "|---|---|---|---|---|---|---|")
    lines = [head]
    if args.measured:
        for r in json.load(open(args.measured))["rows"]:
            if "error" in r or r["ranks"] < 2:
                continue
            others = r.get("others_cores", 0.0) if args.others else 0.0
            pred = predict_here(config, alone, [best] * r["ranks"], None, times, decode_times, cores, r["pp"], others)
            on = f" on {cores} cores" if r["ranks"] > cores else ""
            lines.append(compare_row(f"{r['ranks']} ranks x 1 thread{on}, pp{r['pp']}/tg{r['tg']}"
                                     + (f", other work {others:.1f} cores" if args.others else ""), pred,
                                     r["decode_ms"], r["pp_median"]))
    if args.measured_slow:
        data = json.load(open(args.measured_slow))
        slow, pp = data["simd"], data["runs"]["even"][0]["pp"]
        levels = [best, slow]
        # auto's split is what its probe chose in each run (an input of the run, like its kernel
        # levels): the runs are grouped by split, each group predicted with its own
        groups = [("even", (1.0, 1.0), data["runs"]["even"])]
        for weights in sorted({tuple(r["split_weights"]) for r in data["runs"]["auto"]}, reverse=True):
            groups.append(("auto", weights, [r for r in data["runs"]["auto"] if tuple(r["split_weights"]) == weights]))
        for split, weights, runs in groups:
            others = median([r.get("others_cores", 0.0) for r in runs]) if args.others else 0.0
            pred = predict_here(config, alone, levels, weights, times, decode_times, cores, pp, others)
            tg = median([x for r in runs for x in r["tg_tokens_per_s"]])
            pps = median([x for r in runs for x in r["pp_tokens_per_s"]])
            lines.append(compare_row(f"2 ranks, rank 1 {slow}, {split} split (rank 1 weight {weights[1]:g}, "
                                     f"{len(runs)} run(s)), pp{pp}/tg{runs[0]['tg']}"
                                     + (f", other work {others:.1f} cores" if args.others else ""),
                                     pred, 1e3 / tg, pps))
    print("\n".join(lines))
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernels", default="benchmarks/results/kernels-*.json", help="kernels.py result (efficiency)")
    p.add_argument("--allreduce", default=None, help="allreduce.py --netem result (fitted MPI overhead on links)")
    p.add_argument("--efficiency", type=float, default=None, help="override the kernel efficiency")
    p.add_argument("--here", action="store_true", help="predict this machine's namespace-host runs (see above)")
    p.add_argument("--one-rank", nargs="+", default=[], help="--here: sweep.py JSON with 1-rank, 1-thread points")
    p.add_argument("--measured", default=None, help="--here: sweep.py --netem JSON to compare with")
    p.add_argument("--measured-slow", default=None, help="--here: rank_weights.py --simd --netem JSON to compare with")
    p.add_argument("--model", default=None, help="--here: the model the runs used (default: the --shape model)")
    p.add_argument("--shape", default="tinyllama-1.1b", help="--here: the random-weight shape the runs used")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="--here: cores the hosts share")
    p.add_argument("--no-others", dest="others", action="store_false",
                   help="--here: ignore the other work measured during each run (as on an idle machine)")
    args = p.parse_args(argv)
    if args.here:
        if not args.one_rank or not args.allreduce:
            p.error("--here needs --one-rank (1-rank sweep JSON) and --allreduce (allreduce.py --netem JSON)")
        return here(args)
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

#!/usr/bin/env python3
"""Attention kernel benchmark: the attention of one decode step over a long KV cache, and of a
long prompt's prefill, on the TinyLlama-1.1B shape (22 layers, 32 query / 4 kv heads, head
size 64) as one rank holds it at 1 and 2 ranks (32/4 and 16/2 heads).

    python benchmarks/attention.py [--positions 100,2048,4000] [--prompt-len 2048] [--threads 1,2] [--reps 5]
                                   [--kv-type f32,f16] [--layout blocked,rows] [--against OTHER_CHECKOUT]

Decode: one token's attention calls, one per layer, each over its own layer's cache, laid out
as the runtime's KV cache (as in the model, the 22 caches together are far larger than any CPU
cache, so they come from memory); ms per token and the cache bytes read per second. Prefill: the prompt in chunks of
the runtime's PREFILL_CHUNK rows, one layer, times 22; prompt tokens per second of attention
alone. With several --kv-type values (f32, f16: the runtime's --kv-type) their repetitions
alternate, and the f16 / f32 time ratio is printed; so with several --layout values (blocked:
the runtime's; rows: a (kv, ctx, hd) array a layer in 4 KiB pages, the layout before it), and
with --against (another built checkout, e.g. of an earlier commit: its kernels on the same
layouts, or on the rows layout if it predates the blocked one). Each figure is the median (min-max) of --reps repetitions, each started on a quiet
machine when one comes within 5 s (benchmarks/_common.Quiet). Prints a table; writes JSON to
benchmarks/results/.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO))      # `benchmarks`, after any installed tpllama: _common picks which one runs
from benchmarks._common import (Quiet, machine_header, machine_info, median, other_kernels, spread,  # noqa: E402
                               write_results)
from tpllama import _kernels as K  # noqa: E402
from tpllama.memory import lazy_zeros  # noqa: E402
from tpllama.model import kv_cache_array  # noqa: E402
from tpllama.plan import KV_TYPES, PREFILL_CHUNK  # noqa: E402

LAYERS, HEAD_DIM = 22, 64
RANK_SHAPES = {1: (32, 4), 2: (16, 2)}     # ranks -> (query heads, kv heads) on one rank
# blocked: the runtime's KVCache (blocks of positions for every layer, 2 MiB pages); rows: the
# layout before 2026-11-29, a (kv heads, ctx, head_dim) array per layer in 4 KiB pages
LAYOUTS = ("blocked", "rows")


def caches(layers: int, n_kv: int, ctx: int, seed: int, kv_type: str, layout: str):
    """`layers` pairs of key and value caches holding random values (rounded to kv_type's
    type, as the runtime's cache stores them), in one of LAYOUTS."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(KV_TYPES[kv_type])
    if layout == "blocked":
        k, v = (kv_cache_array(1, layers, n_kv, ctx, HEAD_DIM, dtype) for _ in range(2))
        for a in (k, v):
            for b in range(a.shape[1]):                   # a block at a time: no float32 copy of it all
                a[0, b] = rng.standard_normal(a.shape[2:], dtype=np.float32)
        return [(k[0, :, layer], v[0, :, layer]) for layer in range(layers)]
    out = []
    for _ in range(layers):
        pair = tuple(lazy_zeros((n_kv, ctx, HEAD_DIM), dtype, huge_pages=False) for _ in range(2))
        for a in pair:
            a[...] = rng.standard_normal(a.shape, dtype=np.float32)
        out.append(pair)
    return out


def print_ratios(samples: dict, what: str) -> None:
    """Each variant's time over the first's, when several ran (medians of alternated repetitions)."""
    first = next(iter(samples))
    for name in list(samples)[1:]:
        print(f"{what}: {name} / {first} time {median(samples[name]) / median(samples[first]):.2f}x", flush=True)


def alternated(variants, reps: int, quiet, seconds) -> dict:
    """{variant name: reps times of seconds(name, kernels)}, the variants taken in turn in each
    repetition so that the machine's noise falls alike on all of them."""
    samples = {name: [] for name, *_ in variants}
    for _ in range(reps):
        for name, kernels, *_ in variants:
            quiet.wait()
            samples[name].append(seconds(name, kernels))
    return samples


def rows(T: int, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((T, n * HEAD_DIM), dtype=np.float32)


def decode_seconds(kernels, layer_caches, position: int, heads: int, n_kv: int, threads: int) -> float:
    """One decode step's attention at `position`: a call per layer, each on its own cache."""
    q, kv = rows(1, heads, 1), rows(1, n_kv, 2)
    kv_of_head = (np.arange(heads) // (heads // n_kv)).astype(np.int32)
    scale = np.float32(HEAD_DIM ** -0.5)
    t = time.perf_counter()
    for kc, vc in layer_caches:
        kernels.attention(q, kv, kv, kc, vc, position, kv_of_head, scale, threads)
    return time.perf_counter() - t


def prefill_seconds(kernels, kc, vc, prompt: int, heads: int, n_kv: int, threads: int) -> float:
    """One layer's attention over a prompt of `prompt` tokens in chunks of PREFILL_CHUNK, x LAYERS."""
    kv_of_head = (np.arange(heads) // (heads // n_kv)).astype(np.int32)
    scale = np.float32(HEAD_DIM ** -0.5)
    total = 0.0
    for start in range(0, prompt, PREFILL_CHUNK):
        T = min(PREFILL_CHUNK, prompt - start)
        q, kv = rows(T, heads, start), rows(T, n_kv, start + 1)
        t = time.perf_counter()
        kernels.attention(q, kv, kv, kc, vc, start, kv_of_head, scale, threads)
        total += time.perf_counter() - t
    return total * LAYERS


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--positions", default="100,2048,4000", help="cached positions of the decode steps")
    p.add_argument("--prompt-len", type=int, default=2048, help="prefill prompt tokens (0: no prefill)")
    p.add_argument("--ranks", default="1,2", help="rank counts whose per-rank head shapes to run (1, 2)")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--kv-type", default="f32", help="cache value types, comma-separated: f32, f16 (alternated)")
    p.add_argument("--layout", default="blocked",
                   help="cache layouts, comma-separated: blocked (the runtime's), rows (the one before it); alternated")
    p.add_argument("--against", type=Path,
                   help="another built checkout: its kernels alternated with this build's (on the rows layout "
                        "when it predates the blocked one)")
    p.add_argument("--no-quiet", action="store_true", help="do not wait for the rest of the machine to be idle")
    p.add_argument("--json", help="results file (default benchmarks/results/attention-<time>.json)")
    a = p.parse_args(argv)
    try:
        positions = [int(v) for v in a.positions.split(",")]
        threads = [int(v) for v in a.threads.split(",")]
        ranks = [int(v) for v in a.ranks.split(",")]
        kv_types = a.kv_type.split(",")
        layouts = a.layout.split(",")
    except ValueError:
        p.error("--positions, --threads and --ranks take comma-separated integers, e.g. 100,4000")
    if any(t not in KV_TYPES for t in kv_types):
        p.error("--kv-type takes f32, f16 or both, comma-separated")
    if any(layout not in LAYOUTS for layout in layouts):
        p.error(f"--layout takes {', '.join(LAYOUTS)} or both, comma-separated")
    # (name, kernels, kv type, layout), alternated; --against: the other build on the same layouts,
    # or on the rows layout when it is older than the blocked one (no KV_BLOCK)
    variants = [(f"{t} {lay}", K, t, lay) for t in kv_types for lay in layouts]
    if a.against:
        other = other_kernels(a.against)
        other_layouts = layouts if hasattr(other, "KV_BLOCK") else ["rows"]
        variants += [(f"{t} {lay}, other build", other, t, lay) for t in kv_types for lay in other_layouts]
    if any(r not in RANK_SHAPES for r in ranks):
        p.error(f"--ranks: one of {', '.join(map(str, RANK_SHAPES))}")
    if any(v < 0 for v in positions) or a.prompt_len < 0 or any(t < 1 for t in threads) or a.reps < 1:
        p.error("--positions and --prompt-len must be >= 0, --threads and --reps >= 1")
    quiet = Quiet(limit=5.0, enabled=not a.no_quiet)   # at most 5 s of waiting per repetition
    info = machine_info(bandwidth_threads=(1,))
    print(machine_header(info) + f"; medians (min-max) of {a.reps} repetitions", flush=True)
    results = []
    for r in ranks:
        heads, n_kv = RANK_SHAPES[r]
        for pos in positions:
            layer_caches = {name: caches(LAYERS, n_kv, pos + 1, pos, t, lay) for name, _, t, lay in variants}
            for th in threads:
                step = lambda name, kernels, cached=layer_caches: decode_seconds(kernels, cached[name], pos, heads,
                                                                                  n_kv, th)
                for name, kernels, *_ in variants:
                    step(name, kernels)                                  # warm-up
                samples = alternated(variants, a.reps, quiet, step)
                for name, _, t, lay in variants:
                    ms = [1e3 * s for s in samples[name]]
                    nbytes = 2 * LAYERS * n_kv * (pos + 1) * HEAD_DIM * np.dtype(KV_TYPES[t]).itemsize
                    results.append({"ranks": r, "threads": th, "variant": name, "kv_type": t, "layout": lay,
                                    "what": f"decode at {pos}", "ms": ms, "GBps": nbytes / median(samples[name]) / 1e9})
                    print(f"{r} rank(s), {th} thread(s), {name} cache: decode at {pos}: {spread(ms)} ms/token "
                          f"(KV cache read at {nbytes / median(samples[name]) / 1e9:.1f} GB/s)", flush=True)
                print_ratios(samples, f"{r} rank(s), {th} thread(s): decode at {pos}")
            del layer_caches
        if a.prompt_len:
            kv = {name: caches(1, n_kv, a.prompt_len, 7, t, lay)[0] for name, _, t, lay in variants}
            for th in threads:
                samples = alternated(variants, a.reps, quiet, lambda name, kernels: prefill_seconds(
                    kernels, *kv[name], a.prompt_len, heads, n_kv, th))
                for name, _, t, lay in variants:
                    tps = [a.prompt_len / s for s in samples[name]]
                    results.append({"ranks": r, "threads": th, "variant": name, "kv_type": t, "layout": lay,
                                    "what": f"prefill {a.prompt_len}", "tokens_per_s": tps})
                    print(f"{r} rank(s), {th} thread(s), {name} cache: prefill of {a.prompt_len} (attention alone, "
                          f"{LAYERS} layers): {spread(tps)} tok/s", flush=True)
                print_ratios(samples, f"{r} rank(s), {th} thread(s): prefill of {a.prompt_len}")
    if quiet.noisy:
        print(f"({quiet.noisy} repetitions started on a busy machine)")
    out = write_results("attention", {"meta": info, "results": results}, a.json)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

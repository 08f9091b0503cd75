"""End-to-end speed of tpllama on a random-weight model of a real shape (one rank).

    python benchmarks/model_speed.py [--shape tinyllama-1.1b] [--threads 1,2] [--reps 5]

Writes the model with tpllama.bench.make_model on first use (cached), loads it with
tpllama.load(path, tokenizer="none", threads=T, ctx_size=256), and times the model's own
steps (Model.prefill, Model.decode_step): 64-token prompt processing, then decode steps (one token each, logits of
the rank's vocabulary computed as in generation). Prints tokens/s (median and range), the
weight bytes read per token and the GB/s that makes next to the streaming read bandwidth
measured in the same run (at the start and again right after each thread count's decode; the
higher is the reference, and a decode above it is flagged), and where a decode step's time goes:
inside the C kernels, by kind, or outside them (Python, numpy, the embedding row read). --against-steps also decodes with model.py's
own steps (a kernel call at a time) instead of a C call per sublayer, alternated, and prints the
ratio. Writes JSON to benchmarks/results/. Other
engines' figures come from benchmarks/compare_llamacpp.py, run on the same machine.
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
from benchmarks._common import Quiet, machine_header, machine_info, median, spread, stream_bandwidth, write_results  # noqa: E402

KERNEL_FUNCTIONS = ("matmul_packed", "matmul_packed_many", "quantize_q80", "rmsnorm", "rope", "silu_mul", "attention")
# the kinds of kernel time a step's breakdown prints (tpllama._kernels.FUSED_PHASES, for the fused layers)
PHASES = ("matmuls", "attention", "norms", "rope", "silu", "quantize")
PHASE_OF = {"matmul_packed": "matmuls", "matmul_packed_many": "matmuls", "quantize_q80": "quantize",
            "rmsnorm": "norms", "rope": "rope", "silu_mul": "silu", "attention": "attention"}


def default_model_path(shape: str) -> str:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tpllama" / "bench"
    return str(cache / f"{shape}-random-q40.gguf")


class KernelTimer:
    """Wraps the kernel functions that the model calls, adding up the time spent inside them."""

    def __init__(self):
        from tpllama import _kernels as K
        self.K = K
        self.saved = {}
        self.ns = {name: 0 for name in KERNEL_FUNCTIONS}
        self.calls = {name: 0 for name in KERNEL_FUNCTIONS}

    def __enter__(self):
        for name in KERNEL_FUNCTIONS:
            fn = getattr(self.K, name)
            self.saved[name] = fn
            setattr(self.K, name, self._wrap(name, fn))
        return self

    def _wrap(self, name, fn):
        ns, calls, clock = self.ns, self.calls, time.perf_counter_ns

        def timed(*args, **kwargs):
            t = clock()
            out = fn(*args, **kwargs)
            ns[name] += clock() - t
            calls[name] += 1
            return out
        return timed

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(self.K, name, fn)


def measure(model, prompt, steps, reps, quiet):
    """Medians over reps of: prompt tokens/s, decode tokens/s (median step of each rep)."""
    pp, dec = [], []
    for rep in range(reps):
        quiet.wait()
        model.reset()
        t = time.perf_counter()
        model.prefill(prompt)
        pp.append(len(prompt) / (time.perf_counter() - t))
        tok, step_ms = 7, []
        for i in range(steps):
            t = time.perf_counter()
            model.decode_step(tok)
            step_ms.append(1e3 * (time.perf_counter() - t))
            tok = 100 + i
        dec.append(1e3 / median(step_ms))
    return median(pp), median(dec), pp, dec


def fused_against_steps(model, prompt, steps, reps, quiet):
    """Decode tokens/s with each sublayer's kernels in one C call (the default) and with
    model.py's own steps, repetitions alternated: {"fused": [...], "steps": [...]}."""
    rm = model.rank_model
    fused = rm.fused
    out = {"fused": [], "steps": []}
    try:
        for rep in range(reps):
            for name, layers in (("fused", fused), ("steps", None)):
                rm.fused = layers
                out[name].append(measure(model, prompt, steps, 1, quiet)[1])
    finally:
        rm.fused = fused
    return out


def profile_decode(model, prompt, steps, quiet):
    """Split decode steps into time inside the kernels, by kind, and outside them. A decode step
    runs each sublayer's kernels in one C call (tpllama.model.FUSED_MAX_ROWS), which adds its
    kernels' time to the rank model's phase_ns; the calls made from Python are timed here."""
    rm = model.rank_model
    quiet.wait()
    model.reset()
    model.prefill(prompt)
    fused_before = rm.phase_ns.copy()
    with KernelTimer() as kt:
        t = time.perf_counter()
        for i in range(steps):
            model.decode_step(100 + i)
        total = time.perf_counter() - t
    from tpllama import _kernels as K
    phases = {p: 0.0 for p in PHASES}
    for name, ns in kt.ns.items():
        phases[PHASE_OF[name]] += ns / 1e9
    for name, ns in zip(K.FUSED_PHASES, rm.phase_ns - fused_before):
        phases[name] += ns / 1e9
    kernel = sum(phases.values())
    return {"step_ms": 1e3 * total / steps, "kernel_ms": 1e3 * kernel / steps,
            "outside_ms": 1e3 * (total - kernel) / steps, "outside_fraction": (total - kernel) / total,
            "fused_layers": rm.fused is not None,
            "python_kernel_calls_per_step": sum(kt.calls.values()) / steps,
            "per_phase_ms": {k: 1e3 * v / steps for k, v in phases.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="tinyllama-1.1b")
    p.add_argument("--model", help="GGUF file (default: ~/.cache/tpllama/bench/SHAPE-random-q40.gguf, written if absent)")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--steps", type=int, default=32, help="decode steps per repetition")
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--level", help="force a SIMD level")
    p.add_argument("--against-steps", action="store_true",
                   help="also decode with model.py's own steps instead of a C call per sublayer, repetitions "
                        "alternated, and print the ratio")
    p.add_argument("--no-quiet", action="store_true")
    p.add_argument("--json")
    a = p.parse_args(argv)

    import tpllama
    from tpllama import _kernels as K
    from tpllama.bench.make_model import ensure_model
    if a.level:
        K.set_simd_level(a.level)
    path = a.model or default_model_path(a.shape)
    if not a.model:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        ensure_model(path, a.shape)
    quiet = Quiet(enabled=not a.no_quiet)
    threads = [int(t) for t in a.threads.split(",")]
    info = machine_info(threads)
    print(machine_header(info), flush=True)
    print(f"# {os.path.basename(path)}; medians (min-max) of {a.reps} repetitions "
          f"({a.prompt}-token prompt, {a.steps} decode steps each)", flush=True)
    from tpllama.plan import weight_bytes
    results = {}
    for th in threads:
        t0 = time.time()
        model = tpllama.load(path, tokenizer="none", threads=th, ctx_size=a.ctx)
        load_s = time.time() - t0
        rng = np.random.default_rng(0)
        prompt = [int(t) for t in rng.integers(3, model.config.vocab_size, a.prompt)]
        measure(model, prompt, 4, 1, Quiet(enabled=False))        # warm up
        pp, dec, pp_all, dec_all = measure(model, prompt, a.steps, a.reps, quiet)
        prof = profile_decode(model, prompt, a.steps, quiet)
        against = fused_against_steps(model, prompt, a.steps, a.reps, quiet) if a.against_steps else None
        per_token = weight_bytes(model.config, model.shard, model.types)
        # the streaming read again, right after the decode: the higher of before and after is the
        # reference (a shared machine's memory can move during a run)
        after = median(stream_bandwidth([th])[th])
        bandwidth = max(info["bandwidth_GBps"][th], after)
        results[th] = {"load_s": load_s, "pp_tok_s": pp, "decode_tok_s": dec, "pp_samples": pp_all,
                       "decode_samples": dec_all, "decode_profile": prof,
                       "weights_MB": model.rank_model.w.nbytes / 1e6, "weight_bytes_per_token": per_token,
                       "decode_weights_GBps": per_token * dec / 1e9, "bandwidth_GBps": bandwidth,
                       "bandwidth_before_GBps": info["bandwidth_GBps"][th], "bandwidth_after_GBps": after,
                       "decode_fraction_of_bandwidth": per_token * dec / 1e9 / bandwidth,
                       "fused_against_steps": against}
        r = results[th]
        print(f"threads {th}: prompt {spread(pp_all)} tok/s   decode {spread(dec_all)} tok/s   "
              f"(loaded in {load_s:.1f} s)", flush=True)
        print(f"  decode reads {per_token / 1e6:.0f} MB of weights per token: {r['decode_weights_GBps']:.1f} GB/s, "
              f"{100 * r['decode_fraction_of_bandwidth']:.0f}% of the {bandwidth:.1f} GB/s streaming read "
              f"measured at {th} thread(s) (the higher of {info['bandwidth_GBps'][th]:.1f} at the start and "
              f"{after:.1f} after the decode)", flush=True)
        if r["decode_fraction_of_bandwidth"] > 1:
            print(f"  # note: decode read faster than the streaming read measured before and after it: the memory "
                  f"this machine gives moved during the run, so this share says nothing; run again", flush=True)
        if against:
            f, st = against["fused"], against["steps"]
            if f and st and min(st) > 0:
                print(f"  alternated: decode {spread(f)} tok/s with a C call per sublayer, {spread(st)} with model.py's "
                      f"steps: {median(f) / median(st):.2f}x (per pair: "
                      f"{', '.join(f'{x / y:.2f}' for x, y in zip(f, st))})", flush=True)
        model.close()
        del model
    for th in threads:
        ratio = results[th]["pp_tok_s"] / results[th]["decode_tok_s"]
        results[th]["pp_over_decode"] = ratio
        print(f"pp{a.prompt} / decode at {th} thread(s): {ratio:.1f}x")
    print()
    print("decode step, inside the C kernels vs outside them (Python, numpy, embedding read, the logits' copy):")
    for th in threads:
        pr = results[th]["decode_profile"]
        detail = ", ".join(f"{k} {v:.2f}" for k, v in pr["per_phase_ms"].items())
        how = "a C call per sublayer" if pr["fused_layers"] else "model.py's steps"
        print(f"  threads {th}: step {pr['step_ms']:.2f} ms = kernels {pr['kernel_ms']:.2f} ms + outside "
              f"{pr['outside_ms']:.2f} ms ({100 * pr['outside_fraction']:.1f}%), layers by {how} "
              f"[{detail} ms]")
    if quiet.noisy:
        print(f"# note: {quiet.noisy} repetitions started while other processes kept the machine busy")
    out = write_results(f"model-{Path(a.model).stem if a.model else a.shape}", {"machine": info, "model": path, "shape": a.shape, "reps": a.reps,
                                             "prompt_tokens": a.prompt, "decode_steps": a.steps, "ctx": a.ctx,
                                             "results": {str(k): v for k, v in results.items()},
                                             "noisy_reps": quiet.noisy}, a.json)
    print(f"# wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

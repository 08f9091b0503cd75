"""End-to-end speed of tpllama on a random-weight model of a real shape (one rank).

    PYTHONPATH=. python benchmarks/model_speed.py [--shape tinyllama-1.1b] [--threads 1,2] [--reps 5]

Writes the model with tpllama.bench.make_model on first use (cached), loads it with
tpllama.load(path, tokenizer="none", threads=T, ctx_size=256), and times the model's own
steps (Model.prefill, Model.decode_step): 64-token prompt processing, then decode steps (one token each, logits of
the rank's vocabulary computed as in generation). Prints tokens/s next to the reference bars
and the targets, and where a decode step's time goes: inside the C kernels, or outside them
(Python, numpy, the embedding row read). Writes JSON to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import Quiet, machine_info, median, write_results  # noqa: E402

# tokens/s on these 2-core machines (TinyLlama shape, random Q4_0): the best C++ engine with its
# repacked AVX-512 weights, the same engine on plain Q4_0 blocks, and distributed-llama.
BARS = {
    "tinyllama-1.1b": {
        "cpp": {"decode": {1: 30, 2: 49}, "pp64": {1: 59, 2: 111}},
        "cpp-plain-q4_0": {"decode": {1: 16, 2: 29}},
        "distributed-llama": {"decode": {1: 11, 2: 21}},
        "target": {"decode": {1: 27, 2: 44}, "pp64": {1: 44, 2: 83}},
    },
    "llama2-7b": {"cpp": {"decode": {1: 4.7}}},
}

KERNEL_FUNCTIONS = ("matmul_packed", "matmul_packed_many", "quantize_q80", "rmsnorm", "rope", "silu_mul", "attention")


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


def profile_decode(model, prompt, steps, quiet):
    """Split decode steps into time inside the kernels and outside them."""
    quiet.wait()
    model.reset()
    model.prefill(prompt)
    with KernelTimer() as kt:
        t = time.perf_counter()
        for i in range(steps):
            model.decode_step(100 + i)
        total = time.perf_counter() - t
    kernel = sum(kt.ns.values()) / 1e9
    return {"step_ms": 1e3 * total / steps, "kernel_ms": 1e3 * kernel / steps,
            "outside_ms": 1e3 * (total - kernel) / steps, "outside_fraction": (total - kernel) / total,
            "kernel_calls_per_step": sum(kt.calls.values()) / steps,
            "per_kernel_ms": {k: 1e3 * v / 1e9 / steps for k, v in kt.ns.items()}}


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
    info = machine_info()
    threads = [int(t) for t in a.threads.split(",")]
    print(f"# {info['cpu']}, {info['cores']} cores, SIMD {K.simd_level()}; {os.path.basename(path)}; "
          f"medians of {a.reps} repetitions ({a.prompt}-token prompt, {a.steps} decode steps each)", flush=True)
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
        results[th] = {"load_s": load_s, "pp_tok_s": pp, "decode_tok_s": dec, "pp_samples": pp_all,
                       "decode_samples": dec_all, "decode_profile": prof,
                       "weights_MB": model.rank_model.w.nbytes / 1e6}
        print(f"threads {th}: prompt {pp:6.1f} tok/s   decode {dec:6.2f} tok/s   "
              f"(loaded in {load_s:.1f} s, {results[th]['weights_MB']:.0f} MB of weights)", flush=True)
        model.close()
        del model

    bars = BARS.get(a.shape, {})
    print()
    print(f"{'':10} {'threads':>7} | {'tpllama':>8} {'target':>7} {'C++':>6} {'C++ plain':>9} {'dllama':>6}")
    for kind, key in (("decode", "decode_tok_s"), ("pp64", "pp_tok_s")):
        for th in threads:
            def bar(name):
                v = bars.get(name, {}).get(kind, {}).get(th)
                return f"{v:g}" if v is not None else "-"
            ok = ""
            target = bars.get("target", {}).get(kind, {}).get(th)
            if target is not None:
                ok = "  ok" if results[th][key] >= target else "  BELOW TARGET"
            print(f"{kind:10} {th:>7} | {results[th][key]:8.1f} {bar('target'):>7} {bar('cpp'):>6} "
                  f"{bar('cpp-plain-q4_0'):>9} {bar('distributed-llama'):>6}{ok}")
    for th in threads:
        ratio = results[th]["pp_tok_s"] / results[th]["decode_tok_s"]
        results[th]["pp_over_decode"] = ratio
        print(f"pp64 / decode at {th} thread(s): {ratio:.1f}x" + ("  (target >= 2x)" if th == 2 else ""))
    print()
    print("decode step, inside the C kernels vs outside them (Python, numpy, embedding read):")
    for th in threads:
        pr = results[th]["decode_profile"]
        detail = ", ".join(f"{k} {v:.2f}" for k, v in pr["per_kernel_ms"].items())
        print(f"  threads {th}: step {pr['step_ms']:.2f} ms = kernels {pr['kernel_ms']:.2f} ms + outside "
              f"{pr['outside_ms']:.2f} ms ({100 * pr['outside_fraction']:.1f}%), "
              f"{pr['kernel_calls_per_step']:.0f} kernel calls/step [{detail} ms]")
    if quiet.noisy:
        print(f"# note: {quiet.noisy} repetitions started while other processes kept the machine busy")
    out = write_results(f"model-{a.shape}", {"machine": info, "model": path, "shape": a.shape, "reps": a.reps,
                                             "prompt_tokens": a.prompt, "decode_steps": a.steps, "ctx": a.ctx,
                                             "results": {str(k): v for k, v in results.items()}, "bars": bars,
                                             "noisy_reps": quiet.noisy}, a.json)
    print(f"# wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

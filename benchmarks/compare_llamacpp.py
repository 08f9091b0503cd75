#!/usr/bin/env python3
"""tpllama against llama.cpp (its Python bindings, llama-cpp-python) on one machine: the same
GGUF, the same thread count, prompt processing and decode, alternating the two in one run.

    python benchmarks/compare_llamacpp.py --shape tinyllama-1.1b --threads 1,2
    python benchmarks/compare_llamacpp.py --shape tinyllama-1.1b --type q4km --threads 1,2
    python benchmarks/compare_llamacpp.py --model model.gguf --threads 2 --reps 5

--shape writes (once, cached) a random-weight GGUF of that shape: `--type q40` (default) all
Q4_0, `--type q4km` laid out as llama.cpp's Q4_K_M (Q4_K; Q6_K for the output matrix and for
attn_v/ffn_down in llama.cpp's use_more_bits layers, 10 of TinyLlama's 22). tpllama runs every file at its default weight type, `auto`: each matrix in
the file's own type, as llama.cpp does.

llama-cpp-python is installed on demand (`pip install llama-cpp-python` compiles llama.cpp:
several minutes). Both run in this process on one rank: tpllama through tpllama.load, llama.cpp
through llama_cpp.Llama; each repetition runs one then the other, in alternating order, so
noise from the shared machine falls on both. Prints tokens/s and tpllama / llama.cpp ratios;
writes JSON to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO))      # `benchmarks`, after any installed tpllama: _common picks which one runs
from benchmarks._common import Quiet, bench_model, machine_header, machine_info, median, spread, write_results  # noqa: E402
from tpllama.bench.make_model import TYPES as FILE_TYPES  # noqa: E402


def llama_cpp_module():
    try:
        return importlib.import_module("llama_cpp")
    except ImportError:
        print("installing llama-cpp-python (compiles llama.cpp; several minutes)...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "llama-cpp-python"], check=True)
        return importlib.import_module("llama_cpp")


class TpllamaRunner:
    name = "tpllama"

    def __init__(self, path, threads, ctx):
        import tpllama
        self.model = tpllama.load(path, threads=threads, ctx_size=ctx, tokenizer="none")

    def prompt(self, tokens):
        self.model.reset()
        self.model.prefill(tokens)

    def decode(self, tokens):
        for token in tokens:
            self.model.decode_step(token)     # computes this rank's logits, as llama.cpp does


class LlamaCppRunner:
    name = "llama.cpp"

    def __init__(self, path, threads, ctx, batch):
        llama_cpp = llama_cpp_module()
        self.llm = llama_cpp.Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=ctx,
                                   n_batch=batch, n_ubatch=batch, verbose=False, logits_all=False)

    def prompt(self, tokens):
        self.llm.reset()
        self.llm.eval(tokens)

    def decode(self, tokens):
        for token in tokens:
            self.llm.eval([token])


def file_tensor_types(path):
    """GGML type name -> how many tensors of the file have it."""
    from collections import Counter
    from gguf import GGUFReader
    return dict(Counter(t.tensor_type.name for t in GGUFReader(path).tensors).most_common())


def time_runner(runner, prompt, decode, quiet):
    """(prompt tokens/s, decode tokens/s). Decode feeds a fixed token sequence: the cost of a step
    does not depend on which token it is, and both engines get the same one."""
    quiet.wait()
    t0 = time.perf_counter()
    runner.prompt(prompt)
    t1 = time.perf_counter()
    runner.decode(decode)
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), len(decode) / (t2 - t1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model")
    src.add_argument("--shape", help="a random-weight model of a named shape (tpllama.bench.make_model)")
    p.add_argument("--type", default="q40", choices=FILE_TYPES,
                   help="file type of the --shape model (default q40; q4km: llama.cpp's Q4_K_M layout)")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--pp", type=int, default=64)
    p.add_argument("--tg", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--no-quiet-wait", action="store_true", help="do not wait for an idle machine before each run")
    args = p.parse_args(argv)
    path = bench_model(args.model, args.shape, args.type)
    quiet = Quiet(enabled=not args.no_quiet_wait)
    ctx = args.pp + args.tg + 16
    rng = np.random.default_rng(0)
    threads_list = [int(t) for t in args.threads.split(",")]
    results = {"machine": machine_info(threads_list), "model": path, "file_tensors": file_tensor_types(path),
               "command": " ".join(sys.argv), "points": []}
    print(machine_header(results["machine"]))
    print(f"{path}: pp{args.pp} / tg{args.tg}, {args.reps} alternating repetitions")
    print(f"file tensors: {', '.join(f'{n} {t}' for t, n in results['file_tensors'].items())}")
    print(f"{'threads':>7} {'engine':>10} {'pp tok/s':>9} {'tg tok/s':>9}")
    for threads in threads_list:
        runners = [TpllamaRunner(path, threads, ctx), LlamaCppRunner(path, threads, ctx, args.pp)]
        if "tpllama_weights" not in results:
            results["tpllama_weights"] = runners[0].model.types.summary()
            print(f"tpllama {results['tpllama_weights']}\n")
        vocab = runners[0].model.config.vocab_size
        prompt = [int(t) for t in rng.integers(3, vocab, size=args.pp)]
        decode = [int(t) for t in rng.integers(3, vocab, size=args.tg)]
        for r in runners:                      # warm-up, not measured
            time_runner(r, prompt, decode[:4], Quiet(enabled=False))
        measured = {r.name: {"pp": [], "tg": []} for r in runners}
        for rep in range(args.reps):
            order = runners if rep % 2 == 0 else runners[::-1]
            for r in order:
                pp, tg = time_runner(r, prompt, decode, quiet)
                measured[r.name]["pp"].append(pp)
                measured[r.name]["tg"].append(tg)
        for name, m in measured.items():
            print(f"{threads:>7} {name:>10} {median(m['pp']):>9.1f} {median(m['tg']):>9.2f}   "
                  f"(pp {spread(m['pp'])}, tg {spread(m['tg'])})")
        ours, theirs = measured["tpllama"], measured["llama.cpp"]
        pp_ratio = median(ours["pp"]) / median(theirs["pp"])
        tg_ratio = median(ours["tg"]) / median(theirs["tg"])
        print(f"{threads:>7} {'ratio':>10} {pp_ratio:>8.2f}x {tg_ratio:>8.2f}x   (tpllama / llama.cpp)")
        results["points"].append({"threads": threads, "runs": measured, "pp_ratio": pp_ratio, "tg_ratio": tg_ratio})
        del runners
    if quiet.noisy:
        print(f"\nnote: {quiet.noisy} runs started while other processes were busy", file=sys.stderr)
    print(f"\nwrote {write_results('compare-llamacpp', results)}")


if __name__ == "__main__":
    main()

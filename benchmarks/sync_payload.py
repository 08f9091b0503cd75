"""What a smaller all-reduce payload does to the text: greedy tokens and logits at 1-4 ranks per sync type.

    python benchmarks/sync_payload.py [--models stories,smollm2,tinyllama] [--ranks 1,2,3,4] [-n 48]

The row-parallel matmuls (wo, w2) leave each rank a partial sum; `--sync-type` sets what the
all-reduce carries: f64 (the default), f32, bf16 or q80. For every model, rank count and sync
type this runs greedy decoding of a few prompts under mpirun and compares against one rank
(where nothing is reduced): the first token that differs, and the largest difference of the
prompt's last logits over the logits' spread. A payload could become the default only if it
kept every greedy token on every model and rank count. Writes JSON to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO))      # `benchmarks`, after any installed tpllama: _common picks which one runs
from benchmarks._common import bench_model, child_env, machine_header, machine_info, write_results  # noqa: E402

PROMPTS = ["Once upon a time", "The three most important inventions of the last century are",
           "def fibonacci(n):", "Question: Why is the sky blue?\nAnswer:"]
SYNC_TYPES = ("f64", "f32", "bf16", "q80")


def models(names):
    from tpllama.fetch import fetch
    shared = REPO.parent / "shared" / "models"
    known = {"stories": lambda: str(shared / "stories260K" / "stories260K.gguf"),
             "smollm2": lambda: fetch(quiet=True),
             "tinyllama": lambda: bench_model(None, "tinyllama-1.1b", "q40")}
    for name in names:
        if name not in known:
            raise SystemExit(f"error: --models: unknown model {name!r} (known: {', '.join(known)})")
        yield name, known[name]()


def worker(model_path: str, sync_type: str, n: int) -> None:
    """Under mpirun: greedy tokens of every prompt and the last logits of each prompt; rank 0 prints them."""
    import numpy as np
    import tpllama
    m = tpllama.load(model_path, sync_type=sync_type, threads=1, ctx_size=256, verbose=False)
    out = {"tokens": [], "logits": []}
    for prompt in PROMPTS:
        ids = m.tokenizer.encode(prompt)
        m.reset()
        out["logits"].append(np.asarray(m.forward(ids, 0)[-1], dtype=np.float64).tolist())
        m.reset()
        out["tokens"].append(list(m.generate(prompt, n, temperature=0.0).tokens))
    if m.par.is_root:
        print("RESULT " + json.dumps(out), flush=True)


def run(model_path: str, ranks: int, sync_type: str, n: int) -> dict:
    env = child_env(dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1"))
    cmd = ["mpirun", "-n", str(ranks), "--oversubscribe", "--bind-to", "none", "--mca", "mpi_yield_when_idle", "1",
           sys.executable, __file__, "--worker", model_path, sync_type, str(n)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise SystemExit(f"error: {model_path} at {ranks} ranks, {sync_type}: no result (exit {proc.returncode}):\n"
                     f"{proc.stderr[-2000:]}")


def compare(reference: dict, got: dict) -> dict:
    import numpy as np
    first = []
    for want, have in zip(reference["tokens"], got["tokens"]):
        diff = next((i for i, (a, b) in enumerate(zip(want, have)) if a != b), None)
        first.append(diff)
    deviation = max(float(np.max(np.abs(np.array(a) - np.array(b))) / np.std(a))
                    for a, b in zip(reference["logits"], got["logits"]))
    return {"first_different_token": first, "prompts_changed": sum(d is not None for d in first),
            "max_logit_diff_over_std": deviation}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="stories,smollm2,tinyllama")
    p.add_argument("--ranks", default="1,2,3,4")
    p.add_argument("-n", type=int, default=48, help="greedy tokens per prompt (default 48)")
    p.add_argument("--out", default=None)
    p.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker[0], args.worker[1], int(args.worker[2]))
    ranks = [int(r) for r in args.ranks.split(",")]
    machine = machine_info()
    print(machine_header(machine), flush=True)
    rows = []
    print(f"{'model':10} {'ranks':>5} {'sync':>5} {'prompts changed':>16} {'first different token':>24} "
          f"{'max |dlogit|/std':>17}")
    for name, path in models(args.models.split(",")):
        reference = run(path, 1, "f64", args.n)
        for r in ranks:
            for sync in SYNC_TYPES if r > 1 else ("f64",):
                got = reference if r == 1 else run(path, r, sync, args.n)
                row = dict(model=name, ranks=r, sync=sync, **compare(reference, got))
                rows.append(row)
                first = ",".join("-" if d is None else str(d) for d in row["first_different_token"])
                print(f"{name:10} {r:>5} {sync:>5} {row['prompts_changed']:>9} of {len(PROMPTS):<4} {first:>24} "
                      f"{row['max_logit_diff_over_std']:>17.2e}", flush=True)
    out = write_results("sync_payload", {"prompts": PROMPTS, "tokens": args.n, "rows": rows, "machine": machine},
                        args.out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

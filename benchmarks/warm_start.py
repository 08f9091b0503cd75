"""Cold vs. warm start: time to first token with and without the per-rank shard files.

    python benchmarks/warm_start.py [--shape tinyllama-1.1b] [--type q4km] [--ranks 2] [--reps 5]

Each repetition runs `mpirun -n RANKS` twice over a fresh shard cache folder: the cold run
converts every rank's slice from the model file and writes its shard file (and, for a GGUF
SentencePiece vocabulary, the tokenizer snapshot); the warm run maps the shard files (tpllama's
default for a shard file found at start) and reads the tokenizer back. Both runs have the model
file in the page cache (it was just read), so
the difference is the conversion, not the disk. Rank 0 reports when loading ended and when the
first token was sampled, counted from the call to tpllama.load and from the moment this script
launched mpirun (the same clock: mpirun's start, Python's imports and MPI's start, the same for
both runs, included). Then it decodes DECODE_TOKENS more tokens, so that the table also shows
that a warm start's weights (its shard file mapped, not read) decode as fast as converted ones.
The ranks run with Python's bytecode cache on (PYTHONDONTWRITEBYTECODE removed from their
environment), as an installed package runs; without it every start compiles tpllama's modules.
Prints the medians and the cold/warm ratios; writes JSON to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO))      # `benchmarks`, after any installed tpllama: _common picks which one runs
from benchmarks._common import Quiet, child_env, machine_header, add_model_arguments, bench_model, machine_info, median, write_results  # noqa: E402


DECODE_TOKENS = 32


def worker(model_path: str, folder: str) -> None:
    """One start under mpirun: load, sample one token; rank 0 prints the times as JSON."""
    launched = float(os.environ["WARM_START_LAUNCHED"])      # time.time() just before mpirun, on this host
    import tpllama
    from mpi4py import MPI
    MPI.COMM_WORLD.Barrier()
    called = time.time()
    m = tpllama.load(model_path, ctx_size=256, shard_cache=folder)
    loaded = time.time()
    m.generate([1, 2, 3, 4], 1, temperature=0.0)
    first = time.time()
    m.generate([1, 2, 3, 4], DECODE_TOKENS + 1, temperature=0.0, ignore_eos=True)
    decode = (time.time() - first) / (DECODE_TOKENS + 1)     # nearly all decode steps (a 4-token prefill)
    if m.par.is_root:
        print("RESULT " + json.dumps({"launch_to_load_call_s": called - launched, "load_s": loaded - called,
                                      "first_token_s": first - called, "first_token_from_launch_s": first - launched,
                                      "decode_tokens_per_s": 1 / decode, "hit": m.shard_file.hit}), flush=True)


def one_start(ranks: int, model_path: str, folder: str) -> dict:
    env = child_env(dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1"))
    env.pop("PYTHONDONTWRITEBYTECODE", None)   # bytecode cached, as in any installed package (see main)
    env["WARM_START_LAUNCHED"] = repr(time.time())
    cmd = ["mpirun", "-n", str(ranks), "--oversubscribe", "--bind-to", "none", "--mca", "mpi_yield_when_idle", "1",
           sys.executable, __file__, "--worker", model_path, folder]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise SystemExit(f"error: the run printed no result (exit {proc.returncode}):\n{proc.stderr[-2000:]}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(p)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/warm_start-<time>.json)")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(*args.worker)
    model_path = bench_model(args.model, args.shape, args.type)
    info = machine_info()
    print(machine_header(info), flush=True)
    if os.environ.get("PYTHONDONTWRITEBYTECODE"):
        print("# PYTHONDONTWRITEBYTECODE is set here; the ranks run without it, so that a start imports "
              "tpllama's cached bytecode as an installed package does instead of compiling every module",
              flush=True)
    quiet = Quiet()
    runs = []
    for rep in range(args.reps):
        folder = tempfile.mkdtemp(prefix="tpllama-shards-")
        try:
            quiet.wait()
            cold = one_start(args.ranks, model_path, folder)
            quiet.wait()
            warm = one_start(args.ranks, model_path, folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        if cold["hit"] or not warm["hit"]:
            raise SystemExit(f"error: expected a cold then a warm start, got hits {cold['hit']}, {warm['hit']}")
        runs.append({"cold": cold, "warm": warm})
        print(f"rep {rep + 1}: cold first token {cold['first_token_s']:.2f} s, warm {warm['first_token_s']:.2f} s")
    keys = ("launch_to_load_call_s", "load_s", "first_token_s", "first_token_from_launch_s", "decode_tokens_per_s")
    table = {phase: {key: median([r[phase][key] for r in runs]) for key in keys} for phase in ("cold", "warm")}
    ratio = table["cold"]["first_token_s"] / table["warm"]["first_token_s"]
    ratio_launch = table["cold"]["first_token_from_launch_s"] / table["warm"]["first_token_from_launch_s"]
    print(f"\n{os.path.basename(model_path)} on {args.ranks} rank(s), median of {args.reps} (seconds; decode in "
          f"tokens/s over {DECODE_TOKENS} tokens)")
    print(f"{'start':6} {'mpirun+imports+MPI':>19} {'load':>8} {'first token':>12} {'from launch':>12} {'decode':>8}")
    for phase in ("cold", "warm"):
        t = table[phase]
        print(f"{phase:6} {t['launch_to_load_call_s']:19.2f} {t['load_s']:8.2f} {t['first_token_s']:12.2f} "
              f"{t['first_token_from_launch_s']:12.2f} {t['decode_tokens_per_s']:8.1f}")
    print(f"warm start is {ratio:.1f}x faster from tpllama.load to the first token (goal: >= 5x), "
          f"{ratio_launch:.1f}x counting mpirun's start, Python's imports and MPI's start; warm decode "
          f"{table['warm']['decode_tokens_per_s'] / table['cold']['decode_tokens_per_s']:.2f}x the cold start's")
    out = write_results("warm_start", {"model": model_path, "ranks": args.ranks, "runs": runs, "median": table,
                                       "speedup_first_token": ratio, "speedup_from_launch": ratio_launch, "machine": info,
                                       "busy_repetitions": quiet.noisy}, args.out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

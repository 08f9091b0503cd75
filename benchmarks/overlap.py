"""Prefill with and without overlapped all-reduces and split sums, on namespace hosts behind a shaped link.

    python benchmarks/overlap.py [--shape tinyllama-1.1b] [--ranks 2] [--prompts 64,512] [--rate 1gbit] [--reps 4]
                                  [--threads 1] [--ways off/mpi,on/mpi,off/split,on/split]

Each rank is its own "host" (a network namespace, benchmarks/hosts.py) whose link is shaped to
--rate. In one job, every rank loads the model twice, with overlap off and on (--overlap), and
prefills each prompt length alternately four ways: overlap off or on, and large payloads summed
by MPI's all-reduce ("mpi", as before the split sum) or by tpllama.parallel's split sum
("split", the default between hosts): the median prefill time, and of it the time spent waiting for
all-reduces (the rest is compute), and the speed against overlap off with MPI's all-reduce.
Overlap hides waiting; whether prefill gets faster depends on whether the compute keeps its
speed meanwhile. Needs root. Writes JSON to benchmarks/results/.
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
from benchmarks._common import add_model_arguments, bench_model, child_env, machine_header, machine_info, median, write_results  # noqa: E402


WAYS = ("off/mpi", "on/mpi", "off/split", "on/split")


def worker(model_path: str, lengths, reps: int, threads: int, ways) -> None:
    """Under mpirun: per prompt length and overlap setting, the prefill times and waiting times."""
    import time
    import tpllama
    from tpllama.parallel import _Courier
    pause = _Courier.PAUSE_S
    models = {o: tpllama.load(model_path, ctx_size=max(lengths) + 8, overlap=o, threads=threads, verbose=False)
              for o in (False, True)}
    out = {}
    for n in lengths:
        ids = [1] + [(37 * i) % 30000 + 3 for i in range(n - 1)]
        runs = {}
        for _ in range(reps):
            for way in ways:
                overlap, summed, *wait = way.split("/")
                m = models[overlap == "on"]
                m.par.split_sums = summed == "split"
                _Courier.PAUSE_S = 0 if wait == ["block"] else pause
                m.reset()
                m.par.comm.Barrier()
                waited, t0 = m.par.counters.seconds, time.perf_counter()
                m.prefill(ids)
                runs.setdefault(way, []).append((time.perf_counter() - t0, m.par.counters.seconds - waited))
        out[n] = runs
    if models[True].par.is_root:
        print("RESULT " + json.dumps({"micro_batches": models[True].micro_batches, "runs": out}), flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(p, default_type="q40")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--prompts", default="64,512", help="prompt lengths (default 64,512)")
    p.add_argument("--rate", default="1gbit", help="link rate (tc tbf), default 1gbit")
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="threads per rank (default 1)")
    p.add_argument("--ways", default=",".join(WAYS), help=f"OVERLAP/SUM[/block], comma-separated (default {','.join(WAYS)}); "
                   "/block: the courier waits inside MPI instead of polling")
    p.add_argument("--out", default=None)
    p.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker[0], [int(n) for n in args.worker[1].split(",")], int(args.worker[2]), int(args.worker[3]),
                      args.worker[4].split(","))
    from benchmarks.hosts import namespace_hosts, unavailable_reason
    reason = unavailable_reason()
    if reason:
        raise SystemExit(f"error: cannot make namespace hosts here: {reason}")
    model_path = bench_model(args.model, args.shape, args.type)
    machine = machine_info()
    print(machine_header(machine), flush=True)
    env = child_env(dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS=str(args.threads)))
    with namespace_hosts(args.ranks, rate=args.rate) as cluster:
        cmd = ["mpirun", "-n", str(args.ranks)] + cluster.mpirun_args() + [
            sys.executable, __file__, "--worker", model_path, args.prompts, str(args.reps), str(args.threads), args.ways]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    result = next((json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")), None)
    if result is None:
        raise SystemExit(f"error: the run printed no result (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    print(f"{os.path.basename(model_path)}, {args.ranks} ranks on namespace hosts at {args.rate}, "
          f"{args.threads} thread(s) each, median of {args.reps} ({machine['cpu']}, {machine['simd']})")
    print(f"{'prompt':>6} {'overlap':>7} {'sum':>11} {'prefill ms':>11} {'tok/s':>7} {'waiting ms':>11} "
          f"{'compute ms':>11} {'speed-up':>8}")
    table = []
    for n, modes in result["runs"].items():
        before = median([r[0] for r in modes["off/mpi"]]) if "off/mpi" in modes else float("nan")
        for mode, runs in modes.items():
            overlap, _, summed = mode.partition("/")
            total, waited = median([r[0] for r in runs]), median([r[1] for r in runs])
            table.append({"prompt": int(n), "overlap": overlap, "sum": summed, "prefill_s": total, "waiting_s": waited,
                          "speedup": before / total})
            print(f"{n:>6} {overlap:>7} {summed:>11} {total * 1000:11.0f} {int(n) / total:7.1f} {waited * 1000:11.0f} "
                  f"{(total - waited) * 1000:11.0f} {before / total:7.2f}x")
    out = write_results("overlap", {"model": model_path, "ranks": args.ranks, "rate": args.rate, "threads": args.threads, "table": table,
                                    "raw": result, "machine": machine}, args.out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""--rank-weights auto against the even split on two ranks, one of them throttled.

    python benchmarks/rank_weights.py --shape tinyllama-1.1b --throttle 0.5 --reps 3

Rank 1 runs in a cgroup v1 cpu group capped at --throttle of one core (root; the way a slower
node beside a faster one is emulated on one machine, ../shared/NOTES-hosts-on-one-machine.md);
rank 0 runs free. Each rank uses --threads threads. The two splits are run alternately, each a
fresh `mpirun -n 2 python -m tpllama.bench.point` (load, one warm-up run, --reps measured runs of
pp prompt tokens and tg generated tokens), --rounds times. Prints decode and prompt tokens/s of
both (medians and ranges), the ratio auto / even, the speeds the ranks measured and the split
auto chose. Writes JSON to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO))      # `benchmarks`, after any installed tpllama: _common picks which one runs
from benchmarks._common import (Quiet, bench_model, child_env, machine_header, machine_info, median, spread,  # noqa: E402
                                write_results)
from benchmarks.hosts import CgroupUnavailable, cgroup_v1  # noqa: E402
from benchmarks.sweep import mpirun_binary  # noqa: E402

# The quota comes in the shortest slices the kernel takes (1 ms per period of 1 ms / fraction):
# a slow CPU is slow all the time, while a long period lets the rank run at full speed and then
# stop, and a decode step's 2 x layers all-reduces would mostly wait out the stops.
QUOTA_US = 1000


@contextmanager
def throttled_group(fraction: float):
    """A cgroup v1 cpu group capped at `fraction` of a core, removed at the end."""
    try:
        with cgroup_v1("cpu", {"cpu.cfs_period_us": round(QUOTA_US / fraction), "cpu.cfs_quota_us": QUOTA_US},
                       name="tpllama-bench") as group:
            yield group
    except CgroupUnavailable as e:
        raise SystemExit(f"error: --throttle: {e}") from None


def run_split(model: str, rank_weights: str, group: Path, args) -> dict:
    """One mpirun of two ranks, rank 1 in the throttled group; the point's RESULT."""
    point = ["-m", "tpllama.bench.point", "-m", model, "-t", str(args.threads), "--pp", str(args.pp),
             "--tg", str(args.tg), "--reps", str(args.reps), "--rank-weights", rank_weights, "-q"]
    join = f'echo $$ > {group}/cgroup.procs && exec "$0" "$@"'
    cmd = [mpirun_binary(), "--oversubscribe", "--bind-to", "none", "--mca", "mpi_yield_when_idle", "1",
           "-n", "1", sys.executable, *point, ":", "-n", "1", "sh", "-c", join, sys.executable, *point]
    env = child_env(dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1"))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise SystemExit(f"error: the {rank_weights} run printed no result (exit {proc.returncode}):\n{proc.stderr[-2000:]}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model file (default: a random-weight model of --shape)")
    p.add_argument("--shape", default="tinyllama-1.1b")
    p.add_argument("--type", default="q40", help="file type of the --shape model")
    p.add_argument("--throttle", type=float, default=0.5, help="rank 1's share of one core (default 0.5)")
    p.add_argument("--threads", type=int, default=1, help="threads per rank (default 1)")
    p.add_argument("--pp", type=int, default=16)
    p.add_argument("--tg", type=int, default=32)
    p.add_argument("--reps", type=int, default=2, help="measured runs per mpirun (after one warm-up)")
    p.add_argument("--rounds", type=int, default=2, help="alternations of even and auto")
    p.add_argument("--timeout", type=int, default=900)
    p.add_argument("--quiet-limit", type=float, default=60,
                   help="seconds to wait before each mpirun for other processes to use under half a core (0: no wait)")
    args = p.parse_args(argv)
    if not 0 < args.throttle <= 1:
        p.error(f"--throttle {args.throttle}: expected a share of one core in (0, 1]")
    model = bench_model(args.model, args.shape, args.type)
    info = machine_info((args.threads,))
    print(machine_header(info), flush=True)
    print(f"# {os.path.basename(model)}, 2 ranks x {args.threads} thread(s), rank 1 capped at {args.throttle:g} of a core; "
          f"pp{args.pp} / tg{args.tg}, {args.rounds} rounds x {args.reps} runs", flush=True)
    runs = {"even": [], "auto": []}
    quiet = Quiet(threshold=0.5, limit=args.quiet_limit, enabled=args.quiet_limit > 0)
    with throttled_group(args.throttle) as group:
        for rnd in range(args.rounds):
            for split in ("even", "auto") if rnd % 2 == 0 else ("auto", "even"):
                quiet.wait()
                r = run_split(model, "1,1" if split == "even" else "auto", group, args)
                runs[split].append(r)
                speeds = r["rank_speeds_GBps"]
                print(f"round {rnd + 1} {split:4}: decode {spread(r['tg_tokens_per_s'])} tok/s, prompt "
                      f"{spread(r['pp_tokens_per_s'])} tok/s; FFN units {r['ffn_units']}"
                      + (f"; measured {', '.join(f'{s:.2f}' for s in speeds)} GB/s" if speeds else ""), flush=True)
    tg = {k: [x for r in v for x in r["tg_tokens_per_s"]] for k, v in runs.items()}
    pp = {k: [x for r in v for x in r["pp_tokens_per_s"]] for k, v in runs.items()}
    ratio_tg, ratio_pp = median(tg["auto"]) / median(tg["even"]), median(pp["auto"]) / median(pp["even"])
    print(f"\n{'split':6} {'decode tok/s':>24} {'prompt tok/s':>24}")
    for k in ("even", "auto"):
        print(f"{k:6} {spread(tg[k]):>24} {spread(pp[k]):>24}")
    print(f"auto / even: decode {ratio_tg:.2f}x, prompt {ratio_pp:.2f}x (goal: decode >= 1.3x)")
    if quiet.noisy:
        print(f"# note: {quiet.noisy} of {2 * args.rounds} runs started while other processes kept the machine busy")
    out = write_results("rank_weights", {"machine": info, "model": model, "throttle": args.throttle,
                                         "threads": args.threads, "runs": runs, "decode_ratio": ratio_tg,
                                         "prompt_ratio": ratio_pp, "command": " ".join(sys.argv),
                                         "busy_runs": quiet.noisy})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

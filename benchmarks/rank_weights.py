#!/usr/bin/env python3
"""--rank-weights auto against the even split on two ranks, one of them a slower node.

    python benchmarks/rank_weights.py --shape tinyllama-1.1b --simd scalar --rounds 2 --reps 2
    python benchmarks/rank_weights.py --shape tinyllama-1.1b --simd scalar --netem
    python benchmarks/rank_weights.py --shape tinyllama-1.1b --throttle 0.5 --reps 3

Rank 1 is made slower in one of two ways, rank 0 runs free:
  --simd LEVEL   rank 1's kernels run LEVEL (TPLLAMA_SIMD, e.g. scalar) instead of the best the
                 CPU has: slower all the time, the way a CM4 (no dotprod, compute-bound) is beside
                 a Pi 5; every level gives the same bits, so the text must not change;
  --throttle F   rank 1 runs in a cgroup v1 cpu group capped at F of a core (root): the kernel
                 runs it at full speed and then stops it for the rest of each period, which
                 decode's many all-reduces wait out whatever the split.
With --netem each rank runs on its own namespace host behind a 1 Gbit/s shaped link (as
sweep.py --netem); otherwise both share this machine over shared memory. Each rank uses
--threads threads. The two splits are run alternately, each a fresh mpirun of
tpllama.bench.point (load, one warm-up run, --reps measured runs of pp prompt tokens and tg
generated tokens), --rounds times. Prints decode and prompt tokens/s of both (medians and
ranges), the ratio auto / even, the speeds the ranks measured, the split auto chose, the load
average at each run, and whether both splits generated the same tokens. Writes JSON to
benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO))      # `benchmarks`, after any installed tpllama: _common picks which one runs
from benchmarks._common import (OthersCpu, Quiet, bench_model, child_env, machine_header, machine_info, median, spread,  # noqa: E402
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


def hosts(netem: bool, rate: str):
    """Two namespace hosts behind shaped links (--netem), or None: this machine."""
    if not netem:
        return nullcontext(None)
    from benchmarks.hosts import namespace_hosts, unavailable_reason
    reason = unavailable_reason()
    if reason:
        raise SystemExit(f"error: --netem: cannot make hosts here ({reason})")
    return namespace_hosts(2, rate=rate)


def slow_rank_command(point, group, simd):
    """The command line of rank 1: in the throttled cgroup, or with its kernels at `simd`."""
    if simd:
        return ["-x", f"TPLLAMA_SIMD={simd}", sys.executable, *point]
    join = f'echo $$ > {group}/cgroup.procs && exec "$0" "$@"'
    return ["sh", "-c", join, sys.executable, *point]


def run_split(model: str, rank_weights: str, group, cluster, args) -> dict:
    """One mpirun of two ranks, rank 1 the slow one; the point's RESULT."""
    point = ["-m", "tpllama.bench.point", "-m", model, "-t", str(args.threads), "--pp", str(args.pp),
             "--tg", str(args.tg), "--reps", str(args.reps), "--rank-weights", rank_weights, "-q"]
    launch = [mpirun_binary()] + (cluster.mpirun_args() if cluster else
                                  ["--oversubscribe", "--bind-to", "none", "--mca", "mpi_yield_when_idle", "1"])
    cmd = launch + ["-n", "1", sys.executable, *point, ":", "-n", "1", *slow_rank_command(point, group, args.simd)]
    env = child_env(dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1"))
    env.pop("TPLLAMA_SIMD", None)          # rank 0 runs the best level
    with OthersCpu() as others:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=others.env(env), timeout=args.timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return dict(json.loads(line[len("RESULT "):]), others_cores=others.cores)
    raise SystemExit(f"error: the {rank_weights} run printed no result (exit {proc.returncode}):\n{proc.stderr[-2000:]}")


def describe_slow_rank(args) -> str:
    if args.simd:
        return f"rank 1's kernels at {args.simd} (TPLLAMA_SIMD)"
    return f"rank 1 capped at {args.throttle:g} of a core"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model file (default: a random-weight model of --shape)")
    p.add_argument("--shape", default="tinyllama-1.1b")
    p.add_argument("--type", default="q40", help="file type of the --shape model")
    slow = p.add_mutually_exclusive_group()
    slow.add_argument("--simd", default=None, help="rank 1's kernel level (TPLLAMA_SIMD), e.g. scalar")
    slow.add_argument("--throttle", type=float, default=None, help="rank 1's share of one core (default 0.5)")
    p.add_argument("--netem", action="store_true", help="each rank on its own namespace host behind a shaped link")
    p.add_argument("--rate", default="1gbit", help="link rate with --netem (tc tbf), default 1gbit")
    p.add_argument("--threads", type=int, default=1, help="threads per rank (default 1)")
    p.add_argument("--pp", type=int, default=16)
    p.add_argument("--tg", type=int, default=32)
    p.add_argument("--reps", type=int, default=2, help="measured runs per mpirun (after one warm-up)")
    p.add_argument("--rounds", type=int, default=2, help="alternations of even and auto")
    p.add_argument("--timeout", type=int, default=900)
    p.add_argument("--quiet-limit", type=float, default=60,
                   help="seconds to wait before each mpirun for other processes to use under half a core (0: no wait)")
    args = p.parse_args(argv)
    if args.simd is None and args.throttle is None:
        args.throttle = 0.5
    if args.throttle is not None and not 0 < args.throttle <= 1:
        p.error(f"--throttle {args.throttle}: expected a share of one core in (0, 1]")
    model = bench_model(args.model, args.shape, args.type)
    info = machine_info((args.threads,))
    print(machine_header(info), flush=True)
    where = "namespace hosts behind a shaped " + args.rate + " link" if args.netem else "this machine"
    print(f"# {os.path.basename(model)}, 2 ranks x {args.threads} thread(s) on {where}, {describe_slow_rank(args)}; "
          f"pp{args.pp} / tg{args.tg}, {args.rounds} rounds x {args.reps} runs", flush=True)
    runs = {"even": [], "auto": []}
    quiet = Quiet(threshold=0.5, limit=args.quiet_limit, enabled=args.quiet_limit > 0)
    with ExitStack() as stack:
        group = None if args.simd else stack.enter_context(throttled_group(args.throttle))
        cluster = stack.enter_context(hosts(args.netem, args.rate))
        for rnd in range(args.rounds):
            for split in ("even", "auto") if rnd % 2 == 0 else ("auto", "even"):
                quiet.wait()
                r = run_split(model, "1,1" if split == "even" else "auto", group, cluster, args)
                r["load_average"] = os.getloadavg()[0]
                runs[split].append(r)
                speeds = r["rank_speeds_GBps"]
                print(f"round {rnd + 1} {split:4}: decode {spread(r['tg_tokens_per_s'])} tok/s, prompt "
                      f"{spread(r['pp_tokens_per_s'])} tok/s; FFN units {r['ffn_units']}, kernels {r['simd_levels']}"
                      + (f"; measured {', '.join(f'{s:.2f}' for s in speeds)} GB/s" if speeds else "")
                      + f"; load average {r['load_average']:.1f}, other work {r['others_cores']:.1f} cores", flush=True)
    tg = {k: [x for r in v for x in r["tg_tokens_per_s"]] for k, v in runs.items()}
    pp = {k: [x for r in v for x in r["pp_tokens_per_s"]] for k, v in runs.items()}
    ratio_tg, ratio_pp = median(tg["auto"]) / median(tg["even"]), median(pp["auto"]) / median(pp["even"])
    tokens = [r["tokens"] for v in runs.values() for r in v]
    same_text = all(t == tokens[0] for t in tokens)
    print(f"\n{'split':6} {'decode tok/s':>24} {'prompt tok/s':>24} {'decode ms/token':>16}")
    for k in ("even", "auto"):
        print(f"{k:6} {spread(tg[k]):>24} {spread(pp[k]):>24} {1e3 / median(tg[k]):>16.1f}")
    print(f"auto / even: decode {ratio_tg:.2f}x, prompt {ratio_pp:.2f}x (goal: decode >= 1.3x); generated tokens "
          + ("identical in every run" if same_text else "DIFFER between runs"))
    if quiet.noisy:
        print(f"# note: {quiet.noisy} of {2 * args.rounds} runs started while other processes kept the machine busy")
    out = write_results("rank_weights", {"machine": info, "model": model, "throttle": args.throttle, "simd": args.simd,
                                         "netem": args.netem, "rate": args.rate if args.netem else None,
                                         "threads": args.threads, "runs": runs, "decode_ratio": ratio_tg,
                                         "prompt_ratio": ratio_pp, "same_text": same_text,
                                         "command": " ".join(sys.argv), "busy_runs": quiet.noisy})
    print(f"wrote {out}")
    return 0 if same_text else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Cost of one of tpllama's all-reduces (Parallel.allreduce_sum of float64 partials: between
hosts, MPI's own all-reduce below SPLIT_MIN_BYTES and the split sum from there on) against its
payload: the input of the cluster model in docs/performance.md (ms per token = weights /
bandwidth + collectives x this cost).

    python benchmarks/allreduce.py --ranks 2,4                    # ranks on this machine (shared memory)
    python benchmarks/allreduce.py --ranks 2,4 --netem            # each rank its own host, 1 Gbit/s links

Prints, per rank count, the median time of an all-reduce of float64 payloads from
1 KiB to 4 MiB, and the fitted latency (ms) and bandwidth (MB/s) of t = a + bytes / b;
writes JSON to --out.

Then, as decode meets them (--between-ms C, default 1; 0: skip): all-reduces without a barrier,
each after a fixed amount of numpy work per rank that takes C ms on an idle core; the time a
rank spends in the all-reduce, averaged over the repetitions, of the rank that waits least
(the sweep's "sync ms" is measured the same way). On hosts that share cores with each other or
with other work this is the sync a decode step sees: a rank that was descheduled arrives late.
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
from benchmarks._common import child_env, machine_header, machine_info  # noqa: E402
SIZES = [2**k for k in range(10, 23)]       # payload bytes: 1 KiB .. 4 MiB

WORKER = r"""
import json, sys, time
import numpy as np
from mpi4py import MPI
from tpllama.parallel import Parallel
comm = MPI.COMM_WORLD
par = Parallel(comm)
sizes, reps, between_ms = json.loads(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
out = {}
for nbytes in sizes:
    buf = np.ones(nbytes // 8, dtype=np.float64)
    for _ in range(3):
        par.allreduce_sum(buf)
    times = []
    for _ in range(reps):
        comm.Barrier()
        t0 = time.perf_counter()
        par.allreduce_sum(buf)
        times.append(time.perf_counter() - t0)
    worst = comm.reduce(sorted(times)[len(times) // 2], op=MPI.MAX, root=0)
    out[nbytes] = worst
between = {}
if between_ms > 0:
    a, x = np.ones((256, 256), dtype=np.float32), np.ones(256, dtype=np.float32)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 0.2:       # how many products take between_ms on this core
        a @ x
        n += 1
    n = comm.bcast(max(1, round(n * between_ms / 200)), root=0)
    for nbytes in sizes:
        buf = np.ones(nbytes // 8, dtype=np.float64)
        waits = []
        for _ in range(3 + reps):
            for _ in range(n):
                a @ x
            t0 = time.perf_counter()
            par.allreduce_sum(buf)
            waits.append(time.perf_counter() - t0)
        between[nbytes] = comm.reduce(sum(waits[3:]) / reps, op=MPI.MIN, root=0)
if comm.rank == 0:
    print("RESULT " + json.dumps({"barrier": out, "between": between}))
"""


def fit(points):
    """Least-squares t = a + bytes / b over (bytes, seconds): latency a (ms), bandwidth b (MB/s)."""
    import numpy as np
    x = np.array([p[0] for p in points], dtype=float)
    y = np.array([p[1] for p in points], dtype=float)
    slope, intercept = np.polyfit(x, y, 1)
    return max(intercept, 0.0) * 1000, (1 / slope) / 1e6 if slope > 0 else float("inf")


def run(k, args, cluster=None):
    env = child_env(dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1"))
    from benchmarks.sweep import mpirun_binary
    cmd = [mpirun_binary(), "-n", str(k)]
    cmd += cluster.mpirun_args() if cluster else ["--oversubscribe", "--bind-to", "none", "--mca", "mpi_yield_when_idle", "1"]
    cmd += [sys.executable, "-c", WORKER, json.dumps(SIZES), str(args.reps), str(args.between_ms)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            out = json.loads(line[7:])
            return ({int(n): t for n, t in out["barrier"].items()}, {int(n): t for n, t in out["between"].items()})
    raise SystemExit(f"{k} ranks failed: {proc.stderr[-2000:]}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", default="2,4")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--netem", action="store_true", help="each rank on its own namespace host behind a shaped link")
    p.add_argument("--rate", default="1gbit")
    p.add_argument("--between-ms", type=float, default=1.0,
                   help="also time all-reduces after this much work per rank, without a barrier (0: skip)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args(argv)
    info = machine_info()
    print(machine_header(info), flush=True)
    results = {}
    for k in (int(x) for x in args.ranks.split(",")):
        if args.netem:
            from benchmarks.hosts import namespace_hosts
            with namespace_hosts(k, rate=args.rate) as cluster:
                times, between = run(k, args, cluster)
        else:
            times, between = run(k, args)
        latency, bandwidth = fit(sorted(times.items()))
        results[k] = {"seconds": times, "latency_ms": latency, "bandwidth_MBps": bandwidth,
                      "between_ms": args.between_ms, "seconds_between": between,
                      "load_average": os.getloadavg()[0]}
        print(f"\n{k} ranks{' on ' + args.rate + ' links' if args.netem else ' on this machine'}: "
              f"fit t = {latency:.3f} ms + bytes / {bandwidth:.0f} MB/s; load average {os.getloadavg()[0]:.1f}")
        print(f"{'payload':>10} {'ms':>9}" + (f" {'ms after ' + str(args.between_ms) + ' ms of work':>24}" if between else ""))
        for n, t in sorted(times.items()):
            print(f"{n / 1024:>8.0f}Ki {t * 1000:>9.3f}" + (f" {between[n] * 1000:>24.3f}" if between else ""))
    results["machine"] = info
    Path(args.out).mkdir(parents=True, exist_ok=True)
    name = f"allreduce-{'netem-' + args.rate if args.netem else 'local'}.json"
    (Path(args.out) / name).write_text(json.dumps(results, indent=1))
    print(f"\nwrote {Path(args.out) / name}")


if __name__ == "__main__":
    main()

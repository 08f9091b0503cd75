#!/usr/bin/env python3
"""Benchmark sweep over rank and thread counts, the way distributed inference is reported.

    python benchmarks/sweep.py --model model.gguf --ranks 1,2,4 --threads 1,2
    python benchmarks/sweep.py --shape tinyllama-1.1b --ranks 1,2 --threads 1 --oversubscribe
    python benchmarks/sweep.py --shape tinyllama-1.1b --ranks 2,4 --netem     # hosts on a shaped 1 Gbit/s link
    python benchmarks/sweep.py --shape tinyllama-1.1b --ranks 1,2 --threads 1 --prompt-len 2048 --ctx 4000 --tg 16

For each point it launches `mpirun -n R python -m tpllama.bench.point` and prints one row:
prompt tokens/s (pp64), decode tokens/s (tg64, median and spread of the repetitions), ms per
token split into compute and sync, kB sent/received per token per rank, peak RSS per rank and
in total. It writes JSON, a markdown table and (with matplotlib) a PNG plot to --out.

--ctx M measures long prompts and long contexts instead: per point, the prefill of --prompt-len
tokens and decode tokens/s near positions 100, --prompt-len and M, each with the share of the
step time spent in the attention kernel (rank 0), decode at M over decode at 100, and
attention's slowdown at M: the step at M over the same step with the attention time of a step
at 100 (from each measurement's own attention share, so the rest of the step's drift between
the two measurements, minutes apart on a shared machine, does not enter it).

--netem puts every rank on its own "host" (a network namespace) whose link is shaped with
tc to --rate (1 Gbit/s); this kernel has no netem qdisc, so link latency (--latency-ms, 0.2 ms)
is added by a model: each all-reduce of K ranks pays 2(K-1) link latencies (ring algorithm),
reported in its own column next to the measured sync.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import List, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO))      # `benchmarks`, after any installed tpllama: _common picks which one runs
from benchmarks._common import OthersCpu, bench_model, child_env, machine_header, machine_info  # noqa: E402


def mpirun_binary() -> str:
    local = os.path.join(sysconfig.get_path("scripts"), "mpirun")
    return local if os.path.exists(local) else "mpirun"


def run_point(model: str, ranks: int, threads: int, args, cluster=None, overlap: Optional[str] = None) -> dict:
    """One mpirun of tpllama.bench.point; its RESULT as a dict (or an 'error')."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    env = child_env(env)
    launch = [mpirun_binary(), "-n", str(ranks)]
    if cluster is not None:
        launch += cluster.mpirun_args()
    else:
        launch += ["--bind-to", "none", "--mca", "mpi_yield_when_idle", "1"]
        if args.oversubscribe:
            launch.append("--oversubscribe")
    cmd = launch + [sys.executable, "-m", "tpllama.bench.point", "-m", model, "-t", str(threads),
                    "--pp", str(args.pp), "--tg", str(args.tg), "--reps", str(args.reps),
                    "--weight-type", args.weight_type, "--sync-type", args.sync_type, "--kv-type", args.kv_type]
    if overlap == "on":
        cmd.append("--overlap")
    if args.ctx:
        cmd += ["--long-ctx", str(args.ctx)]
    with OthersCpu() as others:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=others.env(env), timeout=args.timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return dict(json.loads(line[len("RESULT "):]), others_cores=others.cores, load_average=os.getloadavg()[0])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"ranks": ranks, "threads": threads, "error": f"exit {proc.returncode}: {tail}"}


def overlap_modes(choice: str, ranks: int) -> List[str]:
    return ["off", "on"] if choice == "both" and ranks > 1 else [choice]


def overlap_table(rows: List[dict], pp: int, tg: int) -> str:
    """Without against with overlapped prefill all-reduces, per point (--overlap both)."""
    lines = [f"| ranks | threads/rank | pp{pp} off | pp{pp} on | ratio | tg{tg} off | tg{tg} on | ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for off in (r for r in rows if r.get("overlap") == "off" and "error" not in r):
        on = next((r for r in rows if r.get("overlap") == "on" and r["ranks"] == off["ranks"]
                   and r["threads"] == off["threads"] and "error" not in r), None)
        if on:
            lines.append(f"| {off['ranks']} | {off['threads']} | {off['pp_median']:.1f} | {on['pp_median']:.1f} | "
                         f"{on['pp_median'] / off['pp_median']:.2f}x | {off['tg_median']:.2f} | {on['tg_median']:.2f} | "
                         f"{on['tg_median'] / off['tg_median']:.2f}x |")
    return "\n".join(lines)


def summarize(r: dict, latency_ms: float, collectives_per_token: int) -> dict:
    """Medians and spreads of one point's repetitions, and the modelled link latency."""
    if "error" in r:
        return r
    tg, pp = r["tg_tokens_per_s"], r["pp_tokens_per_s"]
    k = r["ranks"]
    latency = latency_ms * collectives_per_token * 2 * (k - 1) if k > 1 else 0.0
    return {
        **r,
        "pp_median": statistics.median(pp), "tg_median": statistics.median(tg),
        "tg_spread": (max(tg) - min(tg)) / 2 if len(tg) > 1 else 0.0,
        "compute_ms": max(r["decode_compute_ms"]), "sync_ms": min(r["decode_sync_ms"]),
        "modelled_latency_ms": latency,
        "total_rss_mib": sum(r["peak_rss_mib"]),
    }


def attention_slowdown(short: dict, long: dict) -> float:
    """How many times slower attention makes the long step than the same step with the short
    step's attention: t_long / (t_long - attention_long + attention_short), each from its own
    steps' times and attention shares. Unlike the ratio of the two speeds, it does not move
    with the rest of the step, which on a shared machine changes between the two measurements
    (taken a prefill of minutes apart)."""
    t_short, t_long = 1 / short["tokens_per_s"], 1 / long["tokens_per_s"]
    return t_long / (t_long - long["attention_share"] * t_long + short["attention_share"] * t_short)


def long_context_table(rows: List[dict]) -> str:
    """--ctx rows: prefill, decode near 100 / the prompt's end / M, attention's share of each."""
    if not rows:
        return ""
    head = ["ranks", "threads/rank", "prefill tok/s (attention %)"]
    first = next((r for r in rows if "error" not in r), None)
    positions = [d["position"] for d in first["decode"]] if first else []
    head += [f"decode at {p} tok/s (attention %)" for p in positions] + ["decode at the last / the first",
                                                                          "attention's slowdown at the last"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['ranks']} | {r['threads']} | failed: {r['error']}" + " |" * (len(head) - 2))
            continue
        cells = [r["ranks"], r["threads"], f"{r['pp_tokens_per_s']:.1f} ({100 * r['pp_attention_share']:.0f}%)"]
        cells += [f"{d['tokens_per_s']:.2f} ({100 * d['attention_share']:.0f}%)" for d in r["decode"]]
        cells.append(f"{r['decode'][-1]['tokens_per_s'] / r['decode'][0]['tokens_per_s']:.2f}x")
        cells.append(f"{attention_slowdown(r['decode'][0], r['decode'][-1]):.2f}x")
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def markdown_table(rows: List[dict], with_latency: bool, pp: int = 64, tg: int = 64) -> str:
    head = ["ranks", "threads/rank", f"pp{pp} tok/s", f"tg{tg} tok/s (median ± spread)", "ms/token", "compute ms",
            "sync ms", "sent kB/token/rank", "recv kB/token/rank", "peak RSS/rank MiB", "total RSS MiB"]
    if with_latency:
        head.insert(7, "+ modelled latency ms")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['ranks']} | {r['threads']} | " + f"failed: {r['error']}" + " |" * (len(head) - 2))
            continue
        cells = [r["ranks"], r["threads"], f"{r['pp_median']:.1f}", f"{r['tg_median']:.2f} ± {r['tg_spread']:.2f}",
                 f"{r['decode_ms']:.1f}", f"{r['compute_ms']:.1f}", f"{r['sync_ms']:.1f}",
                 f"{max(r['sent_kb_per_token']):.0f}", f"{max(r['recv_kb_per_token']):.0f}",
                 "/".join(f"{m:.0f}" for m in r["peak_rss_mib"]), f"{r['total_rss_mib']:.0f}"]
        if with_latency:
            cells.insert(7, f"{r['modelled_latency_ms']:.1f}")
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def plot(rows: List[dict], path: Path) -> Optional[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install tpllama[plot]); no plot"
    ok = [r for r in rows if "error" not in r]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for threads in sorted({r["threads"] for r in ok}):
        pts = [r for r in ok if r["threads"] == threads]
        a.errorbar([r["ranks"] for r in pts], [r["tg_median"] for r in pts], yerr=[r["tg_spread"] for r in pts],
                   marker="o", label=f"decode, {threads} thread(s)/rank")
        a.plot([r["ranks"] for r in pts], [r["pp_median"] for r in pts], marker="s", ls="--",
               label=f"prompt, {threads} thread(s)/rank")
    a.set_xlabel("ranks")
    a.set_ylabel("tokens/s")
    a.legend()
    labels = [f"{r['ranks']}x{r['threads']}" for r in ok]
    a.set_xticks(sorted({r["ranks"] for r in ok}))
    b.bar(labels, [r["compute_ms"] for r in ok], label="compute")
    b.bar(labels, [r["sync_ms"] for r in ok], bottom=[r["compute_ms"] for r in ok], label="sync")
    b.set_xlabel("ranks x threads")
    b.set_ylabel("ms per decoded token")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="model file or directory")
    src.add_argument("--shape", help="a random-weight model of a named shape (tpllama.bench.make_model), cached")
    p.add_argument("--ranks", default="1,2,4")
    p.add_argument("--threads", default="1,2", help="threads per rank")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--pp", "--prompt-len", dest="pp", type=int, default=64, help="prompt tokens (default 64)")
    p.add_argument("--ctx", type=int, default=None, metavar="M",
                   help="long contexts: prefill of --prompt-len tokens, decode near 100, --prompt-len and M")
    p.add_argument("--tg", type=int, default=64)
    p.add_argument("--weight-type", default="auto", help="as tpllama.generate's (default auto: the file's own types)")
    p.add_argument("--sync-type", default="f64")
    p.add_argument("--kv-type", default="f32", choices=("f32", "f16"), help="KV cache values, as tpllama.generate's")
    p.add_argument("--oversubscribe", action="store_true", help="allow ranks x threads above the core count")
    p.add_argument("--netem", action="store_true", help="each rank on its own namespace host behind a shaped link")
    p.add_argument("--rate", default="1gbit", help="link rate with --netem (tc tbf), default 1gbit")
    p.add_argument("--latency-ms", type=float, default=0.2, help="modelled one-way link latency with --netem")
    p.add_argument("--overlap", choices=("off", "on", "both"), default="off",
                   help="prefill all-reduces overlapping compute (tpllama's --overlap; default off); both: "
                        "each multi-rank point without, then with, and a table of the ratios")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per point")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="directory for JSON, markdown, PNG")
    args = p.parse_args(argv)

    model = bench_model(args.model, args.shape)
    ranks = [int(x) for x in args.ranks.split(",")]
    threads = [int(x) for x in args.threads.split(",")]
    cores = os.cpu_count() or 1
    from tpllama.formats import open_model
    n_layers = open_model(model).config.n_layers
    rows = []
    machine = machine_info(threads)
    print(machine_header(machine), flush=True)
    print(f"model {model}, {args.weight_type} weights, {args.sync_type} sync, {args.kv_type} kv cache, pp{args.pp}/tg{args.tg}, "
          f"{args.reps} reps, {cores} cores ({machine['cpu']}, {machine['simd']})", flush=True)
    for k in ranks:
        for t in threads:
            if k * t > cores and not (args.oversubscribe or args.netem):
                print(f"skip {k} ranks x {t} threads: more than {cores} cores (use --oversubscribe)", flush=True)
                continue
            if args.netem and k > 1:
                from benchmarks.hosts import namespace_hosts, unavailable_reason
                reason = unavailable_reason()
                if reason:
                    print(f"--netem: cannot make hosts here ({reason}); skipping", file=sys.stderr)
                    return 2
                with namespace_hosts(k, rate=args.rate) as cluster:
                    points = [(o, run_point(model, k, t, args, cluster, o)) for o in overlap_modes(args.overlap, k)]
            else:
                points = [(o, run_point(model, k, t, args, None, o)) for o in overlap_modes(args.overlap, k)]
            for o, r in points:
                if args.ctx:
                    rows.append(r)
                    print(long_context_table([r]).splitlines()[-1], flush=True)
                    continue
                row = dict(summarize(r, args.latency_ms if args.netem else 0.0, 2 * n_layers), overlap=o)
                rows.append(row)
                print(markdown_table([row], args.netem, args.pp, args.tg).splitlines()[-1] + f" overlap {o}"
                      + (f"; other work kept {r['others_cores']:.1f} cores busy, load average {r['load_average']:.1f}"
                         if "others_cores" in r else ""), flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"sweep-{Path(model).stem}-{stamp}"
    table = long_context_table(rows) if args.ctx else markdown_table(rows, args.netem, args.pp, args.tg)
    meta = {"date": stamp, "command": " ".join(sys.argv), **machine, "model": model,
            "netem": args.netem, "rate": args.rate if args.netem else None,
            "latency_ms": args.latency_ms if args.netem else None}
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / f"{name}.md").write_text(f"{meta['date']} `{meta['command']}` on {meta['cpu']} ({cores} cores)\n\n{table}\n")
    print("\n" + table)
    if args.overlap == "both":
        print("\n" + overlap_table(rows, args.pp, args.tg))
    note = "long contexts: no plot" if args.ctx else plot(rows, out / f"{name}.png")
    print(note or f"wrote {out / name}.json, .md, .png")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Serving many clients at once: aggregate tokens/s of the API server for 1, 2, 4, 8 concurrent clients.

    python benchmarks/serve_load.py [--shape tinyllama-1.1b] [--type q40] [--ranks 1,2] [--clients 1,2,4,8]
                                    [--tokens 32] [--requests 2] [--threads N]

For each rank count it starts `mpirun -n RANKS python -m tpllama.serve --parallel MAX(clients)` on
127.0.0.1 (loopback only: nothing leaves the machine), sends one warm-up request, then for each
client count runs that many client threads at once, each sending --requests streamed completions
one after another (different prompts, greedy, --tokens tokens each). It measures every request's
time to first token (TTFT) and every client's generated tokens/s, and the aggregate: all tokens
over the wall time of the round. Every request, round and server start has a time limit.
Prints a table (median and p90 over requests and clients) and writes JSON to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO))      # `benchmarks`, after any installed tpllama: _common picks which one runs
from benchmarks._common import Quiet, add_model_arguments, bench_model, child_env, machine_header, machine_info, median, write_results  # noqa: E402

PROMPTS = ["Once upon a time", "The weather today", "In a small village", "The history of the city",
           "My favourite recipe", "A letter to a friend", "The rules of the game", "On the first day of school"]
REQUEST_LIMIT = 600.0     # seconds a request may take before the round is called failed
START_LIMIT = 900.0       # seconds the server may take to load


def p90(values):
    v = sorted(values)
    return v[min(len(v) - 1, int(round(0.9 * (len(v) - 1))))] if v else float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, ranks: int, port: int, parallel: int, threads: int, ctx: int) -> subprocess.Popen:
    env = child_env(dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1"))
    cmd = ["mpirun", "-n", str(ranks), "--oversubscribe", "--bind-to", "none", "--mca", "mpi_yield_when_idle", "1",
           sys.executable, "-m", "tpllama.serve", "-m", model, "--host", "127.0.0.1", "--port", str(port),
           "--parallel", str(parallel), "-t", str(threads), "-c", str(ctx), "-q"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + START_LIMIT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"error: the server exited {proc.returncode}:\n{proc.stderr.read()[-2000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise SystemExit(f"error: the server did not answer /health within {START_LIMIT:.0f} s")


def stream_request(port: int, prompt: str, tokens: int) -> dict:
    """One streamed completion: its time to first token, tokens generated and duration."""
    body = json.dumps({"prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}})
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_LIMIT)
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    first, generated = None, 0
    for line in resp:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        event = json.loads(line[6:])
        if first is None and event.get("choices") and event["choices"][0].get("text"):
            first = time.perf_counter() - t0
        if event.get("usage"):
            generated = event["usage"]["completion_tokens"]
    conn.close()
    return {"ttft_s": first if first is not None else float("nan"), "tokens": generated,
            "seconds": time.perf_counter() - t0}


def round_of(port: int, clients: int, requests: int, tokens: int) -> dict:
    """`clients` threads at once, each sending `requests` requests in turn."""
    results = [[] for _ in range(clients)]
    errors = []

    def client(k: int):
        try:
            for r in range(requests):
                results[k].append(stream_request(port, PROMPTS[(k + r * clients) % len(PROMPTS)] + f" ({k}.{r})",
                                                 tokens))
        except Exception as e:   # reported with the round
            errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(REQUEST_LIMIT * requests)
    wall = time.perf_counter() - t0
    if errors or any(t.is_alive() for t in threads):
        raise SystemExit(f"error: a client failed or timed out: {errors[:3]}")
    every = [r for rs in results for r in rs]
    per_client = [sum(r["tokens"] for r in rs) / sum(r["seconds"] for r in rs) for rs in results]
    total = sum(r["tokens"] for r in every)
    return {"clients": clients, "requests": len(every), "tokens": total, "wall_s": wall,
            "aggregate_tok_s": total / wall,
            "ttft_median_s": median([r["ttft_s"] for r in every]), "ttft_p90_s": p90([r["ttft_s"] for r in every]),
            "client_tok_s_median": median(per_client), "client_tok_s_p90": p90(per_client)}


def throughput_plot(rows, width: int = 48) -> str:
    """A text bar chart of aggregate tokens/s against concurrent clients, one block per rank count,
    each bar beside what perfect batching would give (clients x the 1-client rate, '|')."""
    top = max(max(r["aggregate_tok_s"] for r in rows),
              max(r["clients"] * next(b["aggregate_tok_s"] for b in rows if b["ranks"] == r["ranks"]) for r in rows))
    scale = width / top if top > 0 else 0.0
    lines = [f"aggregate tokens/s ('#': measured, '|': clients x the 1-client rate; full width = {top:.1f} tok/s)"]
    for ranks in sorted({r["ranks"] for r in rows}):
        mine = [r for r in rows if r["ranks"] == ranks]
        base = mine[0]["aggregate_tok_s"]
        lines.append(f"{ranks} rank(s):")
        for r in mine:
            bar = "#" * round(r["aggregate_tok_s"] * scale)
            ideal = round(r["clients"] * base * scale)
            cells = bar.ljust(max(ideal, len(bar)))
            if ideal > len(bar):
                cells = cells[:ideal - 1] + "|"
            lines.append(f"  {r['clients']:>2} clients {cells} {r['aggregate_tok_s']:.1f} ({r['aggregate_tok_s'] / base:.2f}x)")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(p, default_type="q40")
    p.add_argument("--ranks", default="1,2", help="rank counts, comma-separated (default 1,2)")
    p.add_argument("--clients", default="1,2,4,8", help="concurrent clients, comma-separated (default 1,2,4,8)")
    p.add_argument("--tokens", type=int, default=32, help="tokens per request (default 32)")
    p.add_argument("--requests", type=int, default=2, help="requests each client sends in turn (default 2)")
    p.add_argument("--threads", type=int, default=None, help="threads per rank (default: cores / ranks)")
    p.add_argument("--ctx", type=int, default=512, help="context per slot (default 512)")
    p.add_argument("--output", default=None, help="JSON file (default: benchmarks/results/serve_load-<time>.json)")
    p.add_argument("--plot", metavar="JSON", help="only print the chart of an earlier run's JSON file")
    args = p.parse_args(argv)
    if args.plot:
        print(throughput_plot(json.loads(Path(args.plot).read_text())["rows"]))
        return
    model = bench_model(args.model, args.shape, args.type)
    machine = machine_info()
    print(machine_header(machine), flush=True)
    clients = [int(c) for c in args.clients.split(",")]
    quiet = Quiet(limit=30.0)
    rows = []
    for ranks in [int(r) for r in args.ranks.split(",")]:
        threads = args.threads or max(1, (os.cpu_count() or 1) // ranks)
        port = free_port()
        server = start_server(model, ranks, port, max(clients), threads, args.ctx)
        try:
            stream_request(port, "warm up", 4)
            for n in clients:
                load = quiet.wait()
                row = dict(round_of(port, n, args.requests, args.tokens), ranks=ranks, threads=threads,
                           others_load=round(load, 2))
                rows.append(row)
                base = next(r["aggregate_tok_s"] for r in rows if r["ranks"] == ranks)
                print(f"ranks {ranks}  clients {n}: {row['aggregate_tok_s']:7.2f} tok/s aggregate "
                      f"({row['aggregate_tok_s'] / base:4.2f}x of 1 client)  TTFT median {row['ttft_median_s']:6.2f} s "
                      f"p90 {row['ttft_p90_s']:6.2f} s  per client median {row['client_tok_s_median']:6.2f} tok/s "
                      f"p90 {row['client_tok_s_p90']:6.2f}", flush=True)
        finally:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
    out = write_results("serve_load", {"machine": machine, "model": model, "tokens": args.tokens,
                                       "requests_per_client": args.requests, "noisy_rounds": quiet.noisy,
                                       "rows": rows}, args.output)
    print(throughput_plot(rows))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

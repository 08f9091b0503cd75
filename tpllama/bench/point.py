"""One benchmark point: load a model on the ranks of this MPI job, then time prompt processing
(pp: a prompt of N tokens) and text generation (tg: N greedy tokens), a few times.

    mpirun -n 2 python -m tpllama.bench.point -m model.gguf -t 1 --pp 64 --tg 64 --reps 3

Rank 0 prints one line `RESULT {json}`: tokens/s of each repetition, the per-token time split
into compute and sync, bytes sent and received per token by each rank, and each rank's peak RSS.
The sweep (benchmarks/sweep.py) runs this for every rank and thread count.
"""
from __future__ import annotations

import json
import statistics

import numpy as np


def run_point(model, pp: int, tg: int, reps: int, seed: int = 0) -> dict:
    """Collective: the measurements of `reps` runs of pp prompt tokens then tg generated tokens."""
    rng = np.random.default_rng(seed)
    vocab = model.config.vocab_size
    runs = []
    for _ in range(reps + 1):                      # the first run warms caches and is dropped
        model.reset()
        prompt = [int(t) for t in rng.integers(3, vocab, size=pp)]
        g = model.generate(prompt, tg, temperature=0.0, ignore_eos=True)
        s = g.stats
        runs.append({
            "pp_tokens_per_s": s.prefill_tokens_per_s, "tg_tokens_per_s": s.decode_tokens_per_s,
            "decode_ms": s.mean("decode", "total_ms"), "decode_compute_ms": s.mean("decode", "compute_ms"),
            "decode_sync_ms": s.mean("decode", "sync_ms"),
            "sent_bytes_per_token": s.mean("decode", "sent_bytes"), "recv_bytes_per_token": s.mean("decode", "recv_bytes"),
        })
    runs = runs[1:]
    per_rank = model.par.gather_object(runs)
    from ..stats import peak_rss_bytes
    rss = model.par.gather_object(peak_rss_bytes())
    if not model.par.is_root:
        return {}

    def med(key, rank=0):
        return statistics.median(r[key] for r in per_rank[rank])

    return {
        "ranks": model.par.size, "threads": model.threads, "pp": pp, "tg": tg, "reps": reps,
        "pp_tokens_per_s": [r["pp_tokens_per_s"] for r in runs],
        "tg_tokens_per_s": [r["tg_tokens_per_s"] for r in runs],
        "decode_ms": med("decode_ms"),
        # sync is where ranks wait for each other: the slowest rank waits least
        "decode_compute_ms": [med("decode_compute_ms", r) for r in range(len(per_rank))],
        "decode_sync_ms": [med("decode_sync_ms", r) for r in range(len(per_rank))],
        "sent_kb_per_token": [med("sent_bytes_per_token", r) / 1024 for r in range(len(per_rank))],
        "recv_kb_per_token": [med("recv_bytes_per_token", r) / 1024 for r in range(len(per_rank))],
        "peak_rss_mib": [b / 2**20 for b in rss],
        "weight_type": model.options.weight_type, "sync_type": model.par.sync_type,
        "model": model.config.name, "rank_speeds_GBps": model.rank_speeds, "split_weights": list(model.plan.weights),
        "ffn_units": [len(s.ffn) for s in model.plan.ranks],
    }


def main(argv=None) -> int:
    from .. import cli
    p = cli.RankAwareParser(prog="python -m tpllama.bench.point", description=__doc__.split("\n\n")[0])
    p.add_argument("--pp", type=int, default=64, help="prompt tokens (default 64)")
    p.add_argument("--tg", type=int, default=64, help="generated tokens (default 64)")
    p.add_argument("--reps", type=int, default=3, help="measured repetitions after one warm-up (default 3)")
    cli.add_model_args(p)
    args = p.parse_args(argv)
    import tpllama
    opts = cli.load_options(args)
    opts["verbose"] = False
    opts["ctx_size"] = opts["ctx_size"] or args.pp + args.tg + 8
    model = tpllama.load(args.model, **opts)
    result = run_point(model, args.pp, args.tg, args.reps)
    if model.par.is_root:
        print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    from .. import cli
    cli.run(main)

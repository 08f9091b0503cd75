"""One benchmark point: load a model on the ranks of this MPI job, then time prompt processing
(pp: a prompt of N tokens) and text generation (tg: N greedy tokens), a few times.

    mpirun -n 2 python -m tpllama.bench.point -m model.gguf -t 1 --pp 64 --tg 64 --reps 3

Rank 0 prints one line `RESULT {json}`: tokens/s of each repetition, the per-token time split
into compute and sync, bytes sent and received per token by each rank, each rank's peak RSS and SIMD
level ($TPLLAMA_SIMD), and the greedy tokens of each run.
The sweep (benchmarks/sweep.py) runs this for every rank and thread count.

With --long-ctx M it measures long prompts and long contexts instead (run_long_context): the
prefill of --pp tokens, and --tg decode steps at positions near 100, near --pp and near M, each
with the share of the time spent in the attention kernel.
"""
from __future__ import annotations

import json
import statistics
import time
from contextlib import contextmanager

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
            "tokens": list(g.tokens),
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
        "weight_type": model.options.weight_type, "sync_type": model.par.sync_type, "kv_type": model.options.kv_type,
        "model": model.config.name, "rank_speeds_GBps": model.rank_speeds, "split_weights": list(model.plan.weights),
        "ffn_units": [len(s.ffn) for s in model.plan.ranks],
        "simd_levels": [level for level, _ in model.simd_levels],
        "tokens": [r["tokens"] for r in runs],     # greedy tokens of each run (the seed fixes the prompts)
    }


@contextmanager
def attention_seconds(model):
    """Adds up the time this rank spends in the attention kernel while the block runs: a list
    whose one element is the running total, complete when the block has ended. Calls from Python
    are timed here; the fused layers (a sublayer's kernels in one C call) add their attention
    time to the rank model's phase_ns."""
    from .. import _kernels as K
    inner, total = K.attention, [0.0]
    phases, at = model.rank_model.phase_ns, K.FUSED_PHASES.index("attention")
    fused_before = int(phases[at])

    def timed(*args, **kwargs):
        t = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            total[0] += time.perf_counter() - t
    K.attention = timed
    try:
        yield total
    finally:
        K.attention = inner
        total[0] += (int(phases[at]) - fused_before) / 1e9


def _timed(model, fn) -> dict:
    """Seconds of fn() and the attention kernel's seconds inside it."""
    with attention_seconds(model) as attention:
        t = time.perf_counter()
        fn()
        seconds = time.perf_counter() - t
    return {"seconds": seconds, "attention_seconds": attention[0]}


def _decode_at(model, tg: int, rng) -> dict:
    """tg decode steps after the cached positions (the first at `position`): median step,
    attention's share of all steps."""
    vocab, start = model.config.vocab_size, len(model.history)
    steps = []
    for _ in range(tg):
        token = int(rng.integers(3, vocab))
        steps.append(_timed(model, lambda: model.decode_step(token)))
    total = sum(s["seconds"] for s in steps)
    return {"position": start, "tokens_per_s": 1 / statistics.median(s["seconds"] for s in steps),
            "attention_share": sum(s["attention_seconds"] for s in steps) / total}


def run_long_context(model, pp: int, ctx_pos: int, tg: int, short_pos: int = 100, seed: int = 0) -> dict:
    """Collective: decode near position short_pos; the prefill of pp tokens and decode near pp;
    prefill on to ctx_pos and decode there. Rank 0's times, attention's share of each."""
    rng = np.random.default_rng(seed)
    vocab = model.config.vocab_size
    prompt = lambda n: [int(t) for t in rng.integers(3, vocab, size=n)]
    model.reset()
    model.prefill(prompt(short_pos))
    near_short = _decode_at(model, tg, rng)
    model.reset()
    tokens = prompt(pp)
    prefill = _timed(model, lambda: model.prefill(tokens))
    near_pp = _decode_at(model, tg, rng)
    model.prefill(prompt(max(0, ctx_pos - len(model.history))))
    near_ctx = _decode_at(model, tg, rng)
    out = {"ranks": model.par.size, "threads": model.threads, "pp": pp, "tg": tg,
           "pp_tokens_per_s": pp / prefill["seconds"], "pp_attention_share": prefill["attention_seconds"] / prefill["seconds"],
           "decode": [near_short, near_pp, near_ctx], "model": model.config.name, "kv_type": model.options.kv_type}
    return out if model.par.is_root else {}


def main(argv=None) -> int:
    from .. import cli
    p = cli.RankAwareParser(prog="python -m tpllama.bench.point", description=__doc__.split("\n\n")[0])
    p.add_argument("--pp", type=int, default=64, help="prompt tokens (default 64)")
    p.add_argument("--tg", type=int, default=64, help="generated tokens (default 64)")
    p.add_argument("--reps", type=int, default=3, help="measured repetitions after one warm-up (default 3)")
    p.add_argument("--long-ctx", type=int, default=None, metavar="M",
                   help="measure long contexts instead: prefill of --pp tokens, decode near 100, --pp and M")
    cli.add_model_args(p)
    args = p.parse_args(argv)
    import tpllama
    opts = cli.load_options(args)
    opts["verbose"] = False
    longest = max(args.pp, args.long_ctx or 0, 100 if args.long_ctx else 0)
    opts["ctx_size"] = opts["ctx_size"] or longest + 2 * args.tg + 8
    model = tpllama.load(args.model, **opts)
    if args.long_ctx:
        result = run_long_context(model, args.pp, args.long_ctx, args.tg)
    else:
        result = run_point(model, args.pp, args.tg, args.reps)
    if model.par.is_root:
        print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    from .. import cli
    cli.run(main)

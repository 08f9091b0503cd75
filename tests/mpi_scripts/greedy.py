"""Greedy text of a prompt. Args: MODEL WTYPE N_TOKENS PROMPT [--tokenizer PATH] [--rank-weights W] [--sync S]
[--kv-type T]
[--cpu-cgroup DIR: this rank joins that cgroup v1 cpu group once its imports are done]"""
import argparse
import json
import os

from mpi4py import MPI

import tpllama

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("wtype")
p.add_argument("n", type=int)
p.add_argument("prompt")
p.add_argument("--tokenizer", default=None)
p.add_argument("--rank-weights", default=None)
p.add_argument("--sync", default="f64")
p.add_argument("--kv-type", default="f32")
p.add_argument("--raw", action="store_true")
p.add_argument("--cpu-cgroup", default=None)
a = p.parse_args()
if a.cpu_cgroup:
    import tpllama.engine, tpllama.formats, tpllama.tokenizer  # noqa: E401,F401  (imports at full speed)
    with open(os.path.join(a.cpu_cgroup, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
model = tpllama.load(a.model, weight_type=a.wtype, tokenizer=a.tokenizer, rank_weights=a.rank_weights,
                     sync_type=a.sync, kv_type=a.kv_type, ctx_size=512)
g = model.generate(a.prompt, a.n, temperature=0.0, chat=False)
if MPI.COMM_WORLD.rank == 0:
    print("RESULT " + json.dumps({"text": g.text, "tokens": g.tokens, "prompt_tokens": g.prompt_tokens,
                                  "ranks": MPI.COMM_WORLD.size, "kv_dtype": str(model.rank_model.cache.k.dtype),
                                  "weight_bytes": model.rank_model.w.nbytes, "speeds": model.rank_speeds,
                                  "simd_levels": [level for level, _ in model.simd_levels],
                                  "split": [{"heads": len(s.heads), "ffn": len(s.ffn), "vocab": len(s.vocab)}
                                            for s in model.plan.ranks]}))

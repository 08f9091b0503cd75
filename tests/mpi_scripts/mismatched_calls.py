"""Ranks that call the library with different arguments (each once hung, or garbled the text):
load options must be the same on every rank (every rank raises the same error); a call's
arguments are rank 0's on every rank, as its prompt is; a bad argument on one rank raises on
every rank. Args: MODEL. Prints RESULT {...} on rank 0: per case, each rank's outcome."""
import json
import sys

from mpi4py import MPI

import tpllama
from tpllama.errors import TpllamaError

comm = MPI.COMM_WORLD
r = comm.rank
path = sys.argv[1]


def outcome(fn):
    try:
        return ["ok", fn()]
    except TpllamaError as e:
        return ["error", str(e)]


results = {}
for name, options in (("ctx_size", dict(ctx_size=64 if r == 0 else 128)),
                      ("rank_weights", dict(rank_weights="2,1" if r == 0 else "1,2")),
                      ("kv_type", dict(kv_type="f32" if r == 0 else "f16"))):
    results[f"load {name}"] = outcome(lambda: tpllama.load(path, threads=1, **options) and None)
model = tpllama.load(path, ctx_size=128, threads=1, parallel=3)
prompt = "Once upon a time"
results["max_new_tokens"] = outcome(lambda: model.generate(prompt, 6 if r == 0 else 20, temperature=0).tokens)
results["temperature"] = outcome(lambda: model.generate(prompt, 6, temperature=0 if r == 0 else 0.8).tokens)
results["bad temperature on rank 1"] = outcome(lambda: model.generate(prompt, 6, temperature=0 if r == 0 else -1).tokens)
results["start_pos"] = outcome(lambda: model.forward([1, 403, 407], start_pos=0 if r == 0 else 2).shape[0])
results["token_ids"] = outcome(lambda: model.forward([1, 403, 407] if r == 0 else [1, 403], start_pos=0).shape[0])
results["prompts"] = outcome(lambda: [g.tokens for g in model.generate_batch(
    ["One day", "A cat"] + (["The dog"] if r else []), 5, temperature=0)])
results["greedy"] = outcome(lambda: model.generate(prompt, 6, temperature=0).tokens)   # still in step
everyone = comm.gather(results, root=0)
if r == 0:
    print("RESULT " + json.dumps({"ranks": everyone}))

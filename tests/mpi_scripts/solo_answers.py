"""The library's answers to completion requests, each generated alone from an empty cache.
Args: MODEL CTX REQUESTS_JSON (a list of {prompt, max_tokens, temperature, seed}).
Prints RESULT: a list of {text, completion_tokens, finish_reason}."""
import json
import sys

from mpi4py import MPI

import tpllama

model_path, ctx, requests = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
model = tpllama.load(model_path, ctx_size=ctx, threads=1)
result = []
for r in requests:
    model.reset()
    g = model.generate(r["prompt"], r["max_tokens"], temperature=r["temperature"], seed=r["seed"])
    result.append({"text": g.text, "completion_tokens": len(g.tokens), "finish_reason": g.finish_reason})
if MPI.COMM_WORLD.rank == 0:
    print("RESULT " + json.dumps(result))

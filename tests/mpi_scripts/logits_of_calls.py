"""Logits of given forward calls on several models, one load after another; rank 0 saves each
model's logits to its OUT (.npy). Args: WTYPE JOBS_JSON, where the file holds a list of
[MODEL, OUT, [[ids, start], ...]]: the reference's tokens, so no rank count picks its own; an
optional fourth item N also saves the greedy continuation of N tokens after the first call's ids
to OUT.json (the runtime's own generate, its tokens picked by this rank count)."""
import json
import sys

import numpy as np
from mpi4py import MPI

import tpllama

wtype, jobs_file = sys.argv[1:3]
jobs = json.load(open(jobs_file))
for model_path, out, calls, *greedy in jobs:
    model = tpllama.load(model_path, weight_type=wtype, tokenizer="none", ctx_size=64, threads=1, shard_cache=False)
    logits = np.concatenate([model.forward(ids, start) for ids, start in calls])
    tokens = model.generate(calls[0][0], greedy[0], temperature=0.0, chat=False).tokens if greedy else None
    if MPI.COMM_WORLD.rank == 0:
        np.save(out, logits)
        if greedy:
            with open(out + ".json", "w") as f:
                json.dump(tokens, f)
    model.close()
if MPI.COMM_WORLD.rank == 0:
    print("RESULT " + json.dumps({"ranks": MPI.COMM_WORLD.size, "models": len(jobs)}))

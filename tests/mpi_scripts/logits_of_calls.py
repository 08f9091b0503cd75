"""Logits of given forward calls on several models, one load after another; rank 0 saves each
model's logits to its OUT (.npy). Args: WTYPE JOBS_JSON, where the file holds a list of
[MODEL, OUT, [[ids, start], ...]]: the reference's tokens, so no rank count picks its own."""
import json
import sys

import numpy as np
from mpi4py import MPI

import tpllama

wtype, jobs_file = sys.argv[1:3]
jobs = json.load(open(jobs_file))
for model_path, out, calls in jobs:
    model = tpllama.load(model_path, weight_type=wtype, tokenizer="none", ctx_size=64, threads=1, shard_cache=False)
    logits = np.concatenate([model.forward(ids, start) for ids, start in calls])
    if MPI.COMM_WORLD.rank == 0:
        np.save(out, logits)
    model.close()
if MPI.COMM_WORLD.rank == 0:
    print("RESULT " + json.dumps({"ranks": MPI.COMM_WORLD.size, "models": len(jobs)}))

"""Logits of a prompt and a few greedy steps; rank 0 saves them to OUT (.npy). Args: MODEL WTYPE PROMPT_JSON OUT [SYNC]"""
import json
import sys

import numpy as np
from mpi4py import MPI

import tpllama

model_path, wtype, prompt_file, out = sys.argv[1:5]
sync = sys.argv[5] if len(sys.argv) > 5 else "f64"
model = tpllama.load(model_path, weight_type=wtype, tokenizer="none", ctx_size=64, threads=1, sync_type=sync)
prompt = json.load(open(prompt_file))
rows = [model.forward(prompt, 0)]
for _ in range(4):
    rows.append(model.forward([int(rows[-1][-1].argmax())], len(model.history)))
if MPI.COMM_WORLD.rank == 0:
    np.save(out, np.concatenate(rows))
    print("RESULT " + json.dumps({"ranks": MPI.COMM_WORLD.size, "calls": model.par.counters.calls}))

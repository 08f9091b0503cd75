"""Logits of every position of a token list, one forward pass; rank 0 saves them to OUT (.npy).
Args: MODEL WTYPE TOKENS_JSON OUT"""
import json
import sys

import numpy as np
from mpi4py import MPI

import tpllama

model_path, wtype, tokens_file, out = sys.argv[1:5]
tokens = json.load(open(tokens_file))
model = tpllama.load(model_path, weight_type=wtype, tokenizer="none", ctx_size=max(64, len(tokens)), threads=1)
logits = model.forward(tokens, 0)
if MPI.COMM_WORLD.rank == 0:
    np.save(out, logits)
    print("RESULT " + json.dumps({"ranks": MPI.COMM_WORLD.size, "positions": int(logits.shape[0])}))

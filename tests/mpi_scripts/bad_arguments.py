"""The library's argument checks on every rank: seed=-1 is a random seed (it used to deadlock on 2
ranks), and a bad argument raises the same ParameterError on every rank, after which the ranks are
still in step. Args: MODEL. Prints RESULT {...} on rank 0."""
import json
import math
import sys

from mpi4py import MPI

import tpllama
from tpllama.checks import ParameterError

comm = MPI.COMM_WORLD
model = tpllama.load(sys.argv[1], weight_type="f32", ctx_size=64, threads=1)
texts = [model.generate("Once", 12, temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=-1).text for _ in range(3)]
errors = []
for bad in (dict(temperature=math.nan), dict(top_p=2.0), dict(max_new_tokens=-1)):
    try:
        model.generate("Once", **dict(dict(max_new_tokens=4), **bad))
    except ParameterError as e:
        errors.append(str(e))
for ids, pos in (([], 0), ([1.5], 0), ([1], -1)):
    try:
        model.forward(ids, start_pos=pos)
    except ParameterError as e:
        errors.append(str(e))
after = model.generate("Once", 8, temperature=0.0).text   # still in step
everyone = comm.gather((texts, errors, after), root=0)
if comm.rank == 0:
    print("RESULT " + json.dumps({"ranks": everyone}))

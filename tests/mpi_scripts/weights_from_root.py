"""Load MODEL (a path relative to each rank's working folder, which only some ranks have) with
a shard cache in SHARDS (also relative: one per "host") and generate greedily. Prints RESULT
on rank 0: the text, and per rank whether it had the file and the weight bytes sent/received."""
import json
import os
import sys

from mpi4py import MPI

import tpllama

model_path, shards = sys.argv[1], sys.argv[2]
model = tpllama.load(model_path, weight_type="q40", shard_cache=shards, threads=1)
text = model.generate("Once upon a time", 30, temperature=0.0).text
c = model.par.counters
mine = {"rank": MPI.COMM_WORLD.rank, "has_file": os.path.exists(model_path), "sent": c.weight_bytes_sent,
        "received": c.weight_bytes_received, "hit": model.shard_file.hit}
everyone = MPI.COMM_WORLD.gather(mine, root=0)
if MPI.COMM_WORLD.rank == 0:
    print("RESULT " + json.dumps({"text": text, "ranks": everyone}))

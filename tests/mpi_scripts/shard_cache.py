"""Load a model with a shard cache folder and generate greedily; every rank reports whether it
read its shard file. Args: MODEL FOLDER. Prints RESULT on rank 0."""
import json
import os
import sys

from mpi4py import MPI

import tpllama

path, folder = sys.argv[1], sys.argv[2]
model = tpllama.load(path, weight_type="q40", shard_cache=folder, threads=1)
text = model.generate("Once upon a time", 30, temperature=0.0).text
mine = {"rank": MPI.COMM_WORLD.rank, "hit": model.shard_file.hit, "file": os.path.basename(model.shard_file.path)}
everyone = MPI.COMM_WORLD.gather(mine, root=0)
if MPI.COMM_WORLD.rank == 0:
    print("RESULT " + json.dumps({"text": text, "ranks": everyone}))

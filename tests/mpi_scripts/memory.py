"""What each rank holds after loading: the loader's count, the plan's estimate and the resident memory.
Args: MODEL [RANK_WEIGHTS]. Prints RESULT (one entry per rank) on rank 0."""
import json
import sys

from mpi4py import MPI

import tpllama
from tpllama.formats import open_model
from tpllama.plan import make_plan, weight_bytes
from tpllama.stats import resident_anon_bytes

path = sys.argv[1]
rank_weights = sys.argv[2] if len(sys.argv) > 2 else None
config = open_model(path).config
whole = weight_bytes(config, make_plan(config, 1)[0], "q40")      # W: the model's matrices at q40
before = resident_anon_bytes()
model = tpllama.load(path, weight_type="q40", tokenizer="none", ctx_size=256, threads=1, rank_weights=rank_weights)
after = resident_anon_bytes()
mine = {"rank": MPI.COMM_WORLD.rank, "held": model.load_report["weight_bytes"],
        "planned": weight_bytes(config, model.shard, "q40"), "resident_growth": model.load_report["resident_growth"],
        "whole_load_growth": after - before,
        "kv_cache": model.rank_model.cache.nbytes}
everyone = MPI.COMM_WORLD.gather(mine, root=0)
if MPI.COMM_WORLD.rank == 0:
    print("RESULT " + json.dumps({"whole": whole, "ranks": everyone}))

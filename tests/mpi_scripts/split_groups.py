"""tpllama as a library inside another MPI job: 4 ranks split into two groups of 2, each group
generates its own prompt at the same time. Args: MODEL. Prints RESULT {prompt: text} on world rank 0."""
import json
import sys

from mpi4py import MPI

import tpllama

PROMPTS = ["Once upon a time", "The dog"]
world = MPI.COMM_WORLD
color = world.rank // 2
group = world.Split(color, key=world.rank)
model = tpllama.load(sys.argv[1], comm=group, weight_type="f32", ctx_size=256)
text = model.generate(PROMPTS[color], 30, temperature=0.0).text
texts = world.gather((PROMPTS[color], text, group.rank), root=0)
if world.rank == 0:
    print("RESULT " + json.dumps({"texts": {p: t for p, t, r in texts if r == 0}}))
group.Free()

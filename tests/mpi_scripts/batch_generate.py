"""Batched generation against solo generation. Args: MODEL RANKS_UNUSED

Loads MODEL with 3 KV cache slots; generates 5 prompts (more than the slots: the last ones are
admitted while the others decode) alone with Model.generate, then together through a Batch
whose steps hold at most 5 rows (so prompts are read in chunks beside the others' decode rows),
greedy and with a seed per prompt. Prints RESULT with every token list and the all-reduces and
rows of each step."""
import json
import sys

from mpi4py import MPI

import tpllama
from tpllama.batching import Batch, Request
from tpllama.sampler import SamplingParams

PROMPTS = ["Once upon a time", "The cat sat on the mat and looked at the big red ball in the garden", "One day",
           "Lily and Tom went to the park", "A big dog"]
N = 24

model = tpllama.load(sys.argv[1], ctx_size=256, threads=1, parallel=3)
greedy = [SamplingParams(temperature=0)] * len(PROMPTS)
seeded = [SamplingParams(temperature=0.9, seed=11 + i) for i in range(len(PROMPTS))]
result = {"solo": {}, "batch": {}, "steps": [], "n_layers": model.config.n_layers}
for name, params in (("greedy", greedy), ("seeded", seeded)):
    solo = []
    for prompt, p in zip(PROMPTS, params):
        model.reset()
        solo.append(model.generate(prompt, N, sampling=p).tokens)
    result["solo"][name] = solo
    batch = Batch(model, step_tokens=5)
    ids = [batch.add(Request(model.encode_prompt(prompt), N, p)) for prompt, p in zip(PROMPTS, params)]
    while not batch.idle:
        before = model.par.counters.calls.get("allreduce", 0)
        batch.step()
        result["steps"].append([model.par.counters.calls.get("allreduce", 0) - before, batch.last.sequences,
                                batch.last.rows])
    result["batch"][name] = [batch.take(i).tokens for i in ids]
result["generate_batch"] = [g.tokens for g in model.generate_batch(PROMPTS, N, temperature=0)]
if MPI.COMM_WORLD.rank == 0:
    print("RESULT " + json.dumps(result))

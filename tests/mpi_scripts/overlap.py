"""Prefill with and without overlapped all-reduces (overlap=True: micro-batches whose sums travel
while the next computes). Args: MODEL. Prints RESULT on rank 0: whether the logits and greedy
text are bit-identical, the all-reduces per prefill chunk each way, and what a failure on rank
1 in the middle of an overlapped prefill did on every rank."""
import json
import sys

import numpy as np
from mpi4py import MPI

import tpllama

world = MPI.COMM_WORLD
MODEL = sys.argv[1]
PROMPT_IDS = [1] + [(37 * i) % 500 + 3 for i in range(150)]     # a chunk of 128 and one of 23


def load(overlap):
    return tpllama.load(MODEL, ctx_size=256, threads=1, overlap=overlap)


def reduces(model, ids):
    before = model.par.counters.calls.get("allreduce", 0)
    model.forward(ids, 0)
    return model.par.counters.calls.get("allreduce", 0) - before


plain, overlapped = load(False), load(True)
result = {"micro_batches": [plain.micro_batches, overlapped.micro_batches],
          "same_logits": bool(np.array_equal(plain.forward(PROMPT_IDS, 0), overlapped.forward(PROMPT_IDS, 0))),
          "same_short_logits": bool(np.array_equal(plain.forward(PROMPT_IDS[:40], 0),
                                                   overlapped.forward(PROMPT_IDS[:40], 0))),
          "reduces_40": [reduces(plain, PROMPT_IDS[:40]), reduces(overlapped, PROMPT_IDS[:40])],
          "reduces_8": [reduces(plain, PROMPT_IDS[:8]), reduces(overlapped, PROMPT_IDS[:8])]}
reference = plain.generate("Once upon a time there was", 24, temperature=0.0).text
result["same_text"] = overlapped.generate("Once upon a time there was", 24, temperature=0.0).text == reference

# rank 1 fails in its third FFN sublayer of an overlapped 40-token prefill: both ranks raise, none hangs
rm = overlapped.rank_model
real_ffn, calls = rm.feed_forward, [0]


def failing_ffn(*args):
    calls[0] += 1
    if calls[0] == 3:
        raise ZeroDivisionError("injected in an overlapped prefill")
    return real_ffn(*args)


if world.rank == 1:
    rm.feed_forward = failing_ffn
try:
    overlapped.forward(PROMPT_IDS[:40], 0)
    outcome = ["ok"]
except Exception as e:
    outcome = [type(e).__name__, str(e)]
rm.feed_forward = real_ffn
outcomes = world.gather(outcome)
after = overlapped.generate("Once upon a time there was", 24, temperature=0.0).text   # the job goes on in step
if world.rank == 0:
    result.update(failure=outcomes, text_after_failure=after == reference)
    print("RESULT " + json.dumps(result), flush=True)

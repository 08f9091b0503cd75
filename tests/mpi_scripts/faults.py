"""Inject an exception on one rank at each place a library call can fail, and record what every
rank sees. Args: MODEL. Prints RESULT {"cases": {case: [outcome of rank 0, rank 1, ...]},
"final": [text per rank]} on rank 0, where an outcome is [exception class, message, collective]
or ["ok", text]. The job must come back from every case (no rank left in a collective)."""
import json
import sys

from mpi4py import MPI

import tpllama
import tpllama.engine
from tpllama.sampler import Sampler

world = MPI.COMM_WORLD
MODEL = sys.argv[1]
PROMPT = "Once upon a time"


def outcome(fn):
    try:
        result = fn()
        return ["ok", getattr(result, "text", None)]
    except Exception as e:
        return [type(e).__name__, str(e), bool(getattr(e, "collective", False))]


def on_rank(rank, fn):
    """fn on one rank only: the fault is there and nowhere else."""
    return fn() if world.rank == rank else None


def failing_after(n_calls, exc, real):
    """real, but raising exc from its n_calls-th call on."""
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] >= n_calls:
            raise exc
        return real(*args, **kwargs)
    return wrapper


def load(**kw):
    return tpllama.load(MODEL, weight_type="f32", ctx_size=256, threads=1, **kw)


cases = {}

# loading: an exception of a class tpllama does not know, on rank 1's plan
real_make_plan = tpllama.engine.make_plan
on_rank(1, lambda: setattr(tpllama.engine, "make_plan", failing_after(1, ValueError("injected at load"), real_make_plan)))
cases["load"] = outcome(load)
tpllama.engine.make_plan = real_make_plan

# loading: rank 1 cannot read its host's free memory, inside a section that gathers it
import tpllama.memory  # noqa: E402
real_memory = tpllama.memory.available_bytes
on_rank(1, lambda: setattr(tpllama.memory, "available_bytes", failing_after(1, OSError("injected in host facts"),
                                                                            real_memory)))
cases["host_facts"] = outcome(load)
tpllama.memory.available_bytes = real_memory

model = load()

# seed -1: whatever it means, every rank must end the same way
cases["seed_minus_one"] = outcome(lambda: model.generate(PROMPT, 6, seed=-1, temperature=0.8))

# a callback that fails on rank 1 only, at the third token
cases["on_token"] = outcome(lambda: model.generate(
    PROMPT, 8, temperature=0.0, on_token=failing_after(3, ValueError("injected in on_token"), lambda t: None)
    if world.rank == 1 else None))

# rank 0's cancel check fails
cases["cancel"] = outcome(lambda: model.generate(
    PROMPT, 8, temperature=0.0, cancel=failing_after(2, KeyError("injected in cancel"), lambda: False)
    if world.rank == 0 else None))

# rank 0's sampler fails
real_pick = Sampler.pick
on_rank(0, lambda: setattr(Sampler, "pick", failing_after(2, RuntimeError("injected in sampling"), real_pick)))
cases["sampling"] = outcome(lambda: model.generate(PROMPT, 8, temperature=0.8, seed=1))
Sampler.pick = real_pick

# rank 0's tokenizer fails
real_encode = model.tokenizer.encode
on_rank(0, lambda: setattr(model.tokenizer, "encode", failing_after(1, LookupError("injected in encode"), real_encode)))
cases["encode"] = outcome(lambda: model.generate(PROMPT, 8, temperature=0.0))
model.tokenizer.encode = real_encode

# rank 1's forward pass fails between two all-reduces: in the prompt, then while decoding
rm = model.rank_model
real_ffn = rm.feed_forward
layers = model.config.n_layers
for case, n in (("forward_prefill", 3), ("forward_decode", 2 * layers + 3)):
    model.reset()
    on_rank(1, lambda: setattr(rm, "feed_forward", failing_after(n, ZeroDivisionError(f"injected in {case}"), real_ffn)))
    cases[case] = outcome(lambda: model.generate(PROMPT, 8, temperature=0.0))
    rm.feed_forward = real_ffn

# the same while decoding with each sublayer's kernels in one C call (a model of packed matrices;
# stories260K's heads of 8 leave wo in f32, so it runs model.py's steps)
import os  # noqa: E402
import tempfile  # noqa: E402
from tpllama.bench.make_model import SHAPES, write_model  # noqa: E402
folder = world.bcast(tempfile.mkdtemp() if world.rank == 0 else None)
packed_path = os.path.join(folder, "tiny-q40.gguf")
if world.rank == 0:
    write_model(packed_path, SHAPES["tiny"], "q40", quiet=True)
world.Barrier()
packed = tpllama.load(packed_path, tokenizer="none", ctx_size=64, threads=1)
prm = packed.rank_model
assert prm.fused is not None
real_fused_ffn = prm.fused_feed_forward
on_rank(1, lambda: setattr(prm, "fused_feed_forward", failing_after(
    SHAPES["tiny"].layers + 2, ZeroDivisionError("injected in a fused layer"), real_fused_ffn)))
cases["forward_decode_fused"] = outcome(lambda: (packed.prefill([5, 6, 7]), packed.decode_step(8)))
prm.fused_feed_forward = real_fused_ffn
cases["fused_after_failure"] = outcome(lambda: type("R", (), {"text": str(int(packed.decode_step(9).argmax()))})())
packed.close()

# the logits API: rank 1 fails in its forward pass
on_rank(1, lambda: setattr(rm, "feed_forward", failing_after(2, ArithmeticError("injected in forward()"), real_ffn)))
cases["forward_api"] = outcome(lambda: model.forward([1, 2, 3, 4], 0))
rm.feed_forward = real_ffn

# the step API without a LocalFailure of the caller's: the ranks agree before prefill/decode_step return
model.reset()
on_rank(1, lambda: setattr(rm, "feed_forward", failing_after(2, ArithmeticError("injected in prefill()"), real_ffn)))
cases["prefill_api"] = outcome(lambda: model.prefill([1, 2, 3, 4]))
rm.feed_forward = real_ffn
model.reset()
on_rank(1, lambda: setattr(rm, "feed_forward", failing_after(layers + 2, ArithmeticError("injected in decode_step()"),
                                                             real_ffn)))
cases["decode_step_api"] = outcome(lambda: (model.prefill([1, 2, 3]), model.decode_step(4)))
rm.feed_forward = real_ffn

# a reader that stops early on one rank: rank 1 leaves its loop after one piece, rank 0 reads on
# (outcome: the text each rank read); then rank 0 leaves early, which cancels rank 1's generation


def read_stream(leaves_early):
    pieces = []
    for piece in model.stream(PROMPT, 10, temperature=0.0):
        pieces.append(piece)
        if leaves_early:
            break
    return type("Read", (), {"text": "".join(pieces)})


cases["reader_leaves_on_rank_1"] = outcome(lambda: read_stream(world.rank == 1))
cases["reader_leaves_on_rank_0"] = outcome(lambda: read_stream(world.rank == 0))
cases["reader_leaves_on_rank_0"].append(model.last_finish_reason)

# after all of that, the ranks are still in step and the cache is sound
model.reset()
model.generate(PROMPT + ", there", 4, temperature=0.0)   # leaves a cached prefix that the next call reuses
final = model.generate(PROMPT, 12, temperature=0.0).text

everyone = world.gather((cases, final), root=0)
if world.rank == 0:
    merged = {case: [rank_cases[case] for rank_cases, _ in everyone] for case in cases}
    print("RESULT " + json.dumps({"cases": merged, "final": [f for _, f in everyone]}), flush=True)

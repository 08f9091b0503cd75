"""Count collectives and their payload bytes per decoded token through a wrapper of the communicator.
Args: MODEL SYNC_TYPE N_TOKENS. Prints RESULT with per-step counts on rank 0."""
import json
import sys

import numpy as np
from mpi4py import MPI

import tpllama

COLLECTIVES = {"Allreduce", "Allgather", "Allgatherv", "Bcast", "Gather", "Gatherv", "Reduce",
               "Alltoall", "Scatter", "bcast", "allgather", "gather", "allreduce", "Barrier", "barrier"}


def payload(args):
    """Bytes of the send buffer of a buffer-style collective (0 for pickled objects)."""
    if not args:
        return 0
    buf = args[0]
    if buf is MPI.IN_PLACE and len(args) > 1:
        buf = args[1]
    if isinstance(buf, (list, tuple)):
        buf = buf[0]
    return buf.nbytes if isinstance(buf, np.ndarray) else 0


class CountingComm:
    """Passes everything to the real communicator, logging each collective call."""

    def __init__(self, comm):
        self._comm = comm
        self.log = []

    def __getattr__(self, name):
        attr = getattr(self._comm, name)
        if name in COLLECTIVES:
            def counted(*args, **kwargs):
                self.log.append((name, payload(args)))
                return attr(*args, **kwargs)
            return counted
        return attr


model_path, sync, n_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
comm = CountingComm(MPI.COMM_WORLD)
model = tpllama.load(model_path, comm=comm, weight_type="q40", sync_type=sync, ctx_size=256, threads=1)
steps = []
before = len(comm.log)


def on_token(_):
    # called once per sampled token: everything logged since the last call belongs to one step
    global before
    steps.append(comm.log[before:])
    before = len(comm.log)


g = model.generate("Once upon a time", n_tokens, temperature=0.0, on_token=on_token)
if MPI.COMM_WORLD.rank == 0:
    summary = []
    for step in steps:
        kinds = {}
        for name, nbytes in step:
            k = kinds.setdefault(name, [0, 0])
            k[0] += 1
            k[1] += nbytes
        summary.append(kinds)
    print("RESULT " + json.dumps({"steps": summary, "n_layers": model.config.n_layers, "dim": model.config.dim,
                                  "tokens": g.tokens, "stats": g.stats.as_dict()}))

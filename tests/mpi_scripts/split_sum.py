"""Parallel.allreduce_sum and start_allreduce_sum of float64 partials against a reference made
on rank 0 from every rank's partials (numpy, float64, in rank order, rounded to float32) and
against MPI's own float64 all-reduce; payloads on both sides of SPLIT_MIN_BYTES, odd sizes.
Prints RESULT on rank 0."""
import json

import numpy as np
from mpi4py import MPI

from tpllama.parallel import SPLIT_MIN_BYTES, Parallel

comm = MPI.COMM_WORLD
par = Parallel(comm)
par.split_sums = True      # as between hosts (these ranks share one)
rng = np.random.default_rng(100 + comm.rank)
split_rows = SPLIT_MIN_BYTES // (8 * 576)
shapes = [(1, 576), (split_rows, 576), (split_rows + 1, 576), (3, 64 * 1024 + 7), (64, 2048), (2, 3)]
result = {"split_rows": split_rows, "cases": []}
for shape in shapes:
    # wide exponents and signs, as partial sums of matmuls have
    partial = rng.standard_normal(shape) * np.exp2(rng.integers(-30, 30, size=shape))
    everyone = comm.gather(partial, root=0)
    before = par.counters.snapshot()
    total = par.allreduce_sum(partial.copy())
    after = par.counters.snapshot()
    pending = [par.start_allreduce_sum(partial.copy()) for _ in range(3)]  # several on their way at once
    started = [p.wait() for p in pending]
    mpi = partial.copy()
    comm.Allreduce(MPI.IN_PLACE, mpi)
    mpi = mpi.astype(np.float32)
    totals = comm.gather(total, root=0)
    if comm.rank == 0:
        reference = everyone[0].copy()
        for p in everyone[1:]:
            reference += p
        reference = reference.astype(np.float32)
        result["cases"].append({
            "shape": list(shape), "split": partial.nbytes >= SPLIT_MIN_BYTES,
            "dtype": str(total.dtype), "same_shape": total.shape == tuple(shape),
            "equals_reference": bool(np.array_equal(total, reference)),
            "started_equal": all(np.array_equal(s, total) for s in started),
            "ranks_agree": all(np.array_equal(t, total) for t in totals),
            "differs_from_mpi": int(np.count_nonzero(total != mpi)),
            "sent": after[1] - before[1], "received": after[2] - before[2], "elements": partial.size})
plain = Parallel(comm)                # left to decide: ranks on one host keep MPI's all-reduce
before = plain.counters.snapshot()
plain.allreduce_sum(np.ones((64, 576)))
result["decided"] = plain.split_sums
result["decided_bytes"] = plain.counters.snapshot()[1] - before[1]
if comm.rank == 0:
    print("RESULT " + json.dumps(result), flush=True)

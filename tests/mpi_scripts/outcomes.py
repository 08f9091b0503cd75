"""follow.Outcomes on 2 ranks, through cli.run as the server uses it. Args: CASE.

same-place: both ranks fail at the same point of a "generation": both learn rank 0's failure,
            and the next collective works (prints RESULT).
rank-1-only: rank 1 fails while rank 0 waits in a collective: the job must end with one message."""
import json
import sys

from mpi4py import MPI

from tpllama import cli
from tpllama.follow import Outcomes
from tpllama.parallel import Parallel


def main():
    par = Parallel(MPI.COMM_WORLD)
    outcomes = Outcomes(par, timeout=3.0)
    case = sys.argv[1]
    error = None
    try:
        if case == "same-place" or par.rank == 1:
            raise ValueError(f"bad value on rank {par.rank}")
        par.comm.bcast(None, root=1)          # rank 0 waits for rank 1, which never comes
    except ValueError as e:
        error = e
    failure = outcomes.agree(error)
    total = par.comm.allreduce(1)             # still in step: a collective works
    if par.rank == 0:
        print("RESULT " + json.dumps({"failure": failure, "total": total}), flush=True)
    return 0


cli.run(main)

"""Ranks that always agree: an exception of any class on one rank reaches every rank, which all
raise the same error, and the job goes on in step; no module but parallel.py talks to MPI."""
import ast
from pathlib import Path

import pytest

from mpi_util import run_script

REPO = Path(__file__).resolve().parents[1]

INJECTED = {   # case of tests/mpi_scripts/faults.py -> the class it raises on one rank
    "load": "ValueError", "on_token": "ValueError", "cancel": "KeyError", "sampling": "RuntimeError",
    "encode": "LookupError", "forward_prefill": "ZeroDivisionError", "forward_decode": "ZeroDivisionError",
    "forward_api": "ArithmeticError",
}


@pytest.fixture(scope="module")
def faults(stories_bin):
    # a rank left behind in a collective would hang the job: the timeout turns that into a failure
    return run_script(2, "faults.py", stories_bin, timeout=120)


@pytest.mark.parametrize("case", sorted(INJECTED))
def test_an_exception_on_one_rank_is_raised_on_every_rank(faults, case):
    ranks = faults["cases"][case]
    assert len(ranks) == 2
    assert ranks[0] == ranks[1], ranks                       # same class, same message, on both ranks
    cls, message, collective = ranks[0]
    assert cls == INJECTED[case] and "injected" in message and collective, ranks[0]


def test_seed_minus_one_ends_the_same_way_on_every_rank(faults):
    """It used to deadlock: rank 0's sampler refused the seed while rank 1 waited for a token."""
    ranks = faults["cases"]["seed_minus_one"]
    assert ranks[0] == ranks[1], ranks


def test_ranks_stay_in_step_after_the_faults(faults):
    # the stories260K model's known greedy continuation (as in test_parallel's CLI test)
    assert faults["final"] == [", there was a little girl named Lily. She"] * 2


MPI_CALLS = {"comm", "Get_rank", "Get_size", "Abort", "Split_type", "Ibarrier", "Barrier", "Allreduce", "Allgather",
             "Allgatherv", "Bcast", "Gather", "Gatherv", "allgather", "allreduce", "bcast"}


def _mpi_uses(path: Path):
    """Lines of a module that import mpi4py, name MPI or reach into a communicator (x.comm, x.Bcast...);
    passing a `comm` argument along is fine."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr in MPI_CALLS:
            yield node.lineno, node.attr
        elif isinstance(node, ast.Name) and node.id == "MPI":
            yield node.lineno, node.id
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            yield from ((node.lineno, m) for m in modules if m.startswith("mpi4py"))


def test_only_parallel_py_calls_mpi():
    offenders = [f"{path.relative_to(REPO)}:{line}: {name}"
                 for path in sorted((REPO / "tpllama").rglob("*.py")) if path.name != "parallel.py"
                 for line, name in _mpi_uses(path)]
    assert not offenders, "MPI outside tpllama/parallel.py:\n" + "\n".join(offenders)

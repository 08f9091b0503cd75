"""Ranks that always agree: an exception of any class on one rank reaches every rank, which all
raise the same error, and the job goes on in step; no module but parallel.py talks to MPI; a
rank that opened a different model stops the job at load with one message."""
import ast
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from mpi_util import mpi_env, mpirun_cmd, run_script

REPO = Path(__file__).resolve().parents[1]

INJECTED = {   # case of tests/mpi_scripts/faults.py -> the class it raises on one rank
    "load": "ValueError", "host_facts": "OSError", "on_token": "ValueError", "cancel": "KeyError", "sampling": "RuntimeError",
    "encode": "LookupError", "forward_prefill": "ZeroDivisionError", "forward_decode": "ZeroDivisionError",
    "forward_decode_fused": "ZeroDivisionError", "forward_api": "ArithmeticError", "prefill_api": "ArithmeticError", "decode_step_api": "ArithmeticError",
}


@pytest.fixture(scope="module")
def faults(stories_bin):
    # a rank left behind in a collective would hang the job: the timeout turns that into a failure
    return run_script(2, "faults.py", stories_bin, timeout=120)


@pytest.mark.parametrize("case", sorted(INJECTED))
@pytest.mark.mpi
def test_an_exception_on_one_rank_is_raised_on_every_rank(faults, case):
    ranks = faults["cases"][case]
    assert len(ranks) == 2
    assert ranks[0] == ranks[1], ranks                       # same class, same message, on both ranks
    cls, message, collective = ranks[0]
    assert cls == INJECTED[case] and "injected" in message and collective, ranks[0]


@pytest.mark.mpi
def test_ranks_decode_in_step_after_a_failure_in_a_fused_layer(faults):
    ranks = faults["cases"]["fused_after_failure"]
    assert ranks[0][0] == ranks[1][0] == "ok", ranks


@pytest.mark.mpi
def test_seed_minus_one_ends_the_same_way_on_every_rank(faults):
    """It used to deadlock: rank 0's sampler refused the seed while rank 1 waited for a token."""
    ranks = faults["cases"]["seed_minus_one"]
    assert ranks[0] == ranks[1], ranks


@pytest.mark.mpi
def test_a_reader_that_stops_early_on_one_rank_leaves_the_ranks_in_step(faults):
    """Leaving the loop over stream() on rank 1 only used to leave rank 0 waiting in a collective."""
    full = faults["final"][0]
    rank0, rank1 = faults["cases"]["reader_leaves_on_rank_1"]
    assert rank0[0] == rank1[0] == "ok"
    assert full.startswith(rank0[1]) and len(rank0[1]) > len(rank1[1]) > 0 and rank0[1].startswith(rank1[1])
    # rank 0 stopping early cancels the generation everywhere
    rank0, rank1 = faults["cases"]["reader_leaves_on_rank_0"]
    assert rank0[2] == rank1[2] == "cancelled"
    assert full.startswith(rank1[1]) and len(rank1[1]) < len(full)


@pytest.mark.mpi
def test_ranks_stay_in_step_after_the_faults(faults):
    # the stories260K model's known greedy continuation (as in test_parallel's CLI test)
    assert faults["final"] == [", there was a little girl named Lily. She"] * 2


def test_together_raises_the_same_class_and_message_marked_collective():
    """At one rank too: any class comes back as itself (or, if other processes could not rebuild
    it, as a TpllamaError naming it), marked collective, with the original as its cause."""
    from tpllama.errors import TpllamaError
    from tpllama.parallel import Parallel

    class LocalError(Exception):      # not importable by name in another process
        pass

    par = Parallel()
    cases = [(lambda: 1 / 0, ZeroDivisionError, "division by zero"),
             (lambda: {}["key"], KeyError, "'key'"),
             (lambda: int("x"), ValueError, "invalid literal for int() with base 10: 'x'"),
             (lambda: bytes([255]).decode(), TpllamaError, "UnicodeDecodeError: 'utf-8' codec can't decode byte 0xff"),
             (lambda: (_ for _ in ()).throw(LocalError("mine")), TpllamaError, "LocalError: mine")]
    for fn, cls, message in cases:
        with pytest.raises(cls) as info:
            par.together(fn)
        assert type(info.value) is cls and str(info.value).startswith(message) and info.value.collective
        assert info.value.__cause__ is not None


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


# ---------------------------------------------------------------- every rank holds the same model

def _copy_with(src: Path, dest: Path, edit) -> Path:
    """A copy of a GGUF file, edited in place through gguf-py's reader (a stale or other copy)."""
    from gguf import GGUFReader
    shutil.copy(src, dest)
    reader = GGUFReader(str(dest), "r+")
    edit(reader)
    reader.data.flush()
    del reader
    return dest


def _fewer_layers(reader):
    reader.fields["llama.block_count"].parts[-1][0] -= 1        # the last layer's tensors stay, unused


def _other_weights(reader):
    for t in reader.tensors:                                   # every weight moves one place: same shapes
        t.data[...] = np.roll(np.array(t.data), 1)


@pytest.mark.mpi
@pytest.mark.parametrize("variant", ["fewer_layers", "other_weights"])
def test_a_different_model_on_one_rank_stops_every_rank_with_one_message(stories_gguf, tmp_path, variant):
    """Rank 1 opens a different file: it used to hang (fewer layers) or garble the text silently."""
    other = _copy_with(stories_gguf, tmp_path / f"{variant}.gguf", globals()[f"_{variant}"])
    base = ["-m", "tpllama.generate", "-p", "Once upon a time", "-n", "8", "--temp", "0", "-q"]
    cmd = mpirun_cmd(1, base + ["-m", str(stories_gguf)])
    cmd += [":", "-n", "1", cmd[cmd.index("--mca") + 3]] + base + ["-m", str(other)]   # MPMD: rank 1's own file
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=mpi_env(),
                            cwd=str(REPO), start_new_session=True)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    elapsed = time.time() - t0
    assert proc.returncode != 0, out
    lines = [line for line in err.splitlines() if "different models" in line]
    assert len(lines) == 1, err
    host = socket.gethostname()
    assert f"rank 0 on {host}: {stories_gguf} (5 layers)" in lines[0]
    layers = 4 if variant == "fewer_layers" else 5
    assert f"rank 1 on {host}: {other} ({layers} layers)" in lines[0]
    assert ("different configs: n_layers 5 against 4" if variant == "fewer_layers" else "different weights") in lines[0]
    assert "Traceback" not in err and out == ""
    assert elapsed < 30, f"the job took {elapsed:.1f} s to end"


def test_the_fingerprint_is_the_same_for_the_same_file_and_differs_for_others(stories_gguf, tmp_path):
    from tpllama.fingerprint import fingerprint
    from tpllama.formats import open_model
    same = shutil.copy(stories_gguf, tmp_path / "same.gguf")
    other = _copy_with(stories_gguf, tmp_path / "other.gguf", _other_weights)
    a, b, c = (fingerprint(open_model(str(p))) for p in (stories_gguf, same, other))
    assert a == b
    assert a.config == c.config and a.table == c.table and a.weights != c.weights

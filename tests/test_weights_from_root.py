"""Ranks without the model file get their converted weights from rank 0, once.

Two "hosts" are two working folders of one mpirun (MPMD: one app context per rank, each with
its own --wdir): the model path is the same relative name on both, but only host 0's folder
has the file; each folder has its own shard cache."""
import json
import os
import shutil
import sys

import pytest

from mpi_util import SCRIPTS, mpi_env, mpirun_path, run_mpirun

pytestmark = pytest.mark.mpi


def _run(folders, timeout=240):
    """mpirun with one rank per folder; rank r runs in folders[r]."""
    script = str(SCRIPTS / "weights_from_root.py")
    cmd = [mpirun_path(), "--oversubscribe", "--bind-to", "none", "--mca", "mpi_yield_when_idle", "1"]
    for i, folder in enumerate(folders):
        cmd += ([":"] if i else []) + ["-n", "1", "--wdir", str(folder), sys.executable, script, "model.gguf", "shards"]
    return run_mpirun(cmd, timeout=timeout, env=mpi_env())


def _result(proc):
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise AssertionError(f"no RESULT (exit {proc.returncode})\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


@pytest.fixture
def hosts(tmp_path, stories_gguf):
    a, b = tmp_path / "host0", tmp_path / "host1"
    a.mkdir()
    b.mkdir()
    shutil.copy(stories_gguf, a / "model.gguf")
    return a, b


def test_a_rank_without_the_file_gets_its_weights_once_and_the_same_text(hosts, tmp_path, stories_gguf):
    a, b = hosts
    both = tmp_path / "both"
    both.mkdir()
    shutil.copy(stories_gguf, both / "model.gguf")
    reference = _result(_run([both, both]))
    first = _result(_run([a, b]))
    second = _result(_run([a, b]))
    assert first["text"] == reference["text"] == second["text"] and len(reference["text"]) > 20
    r0, r1 = first["ranks"]
    assert r0["has_file"] and not r1["has_file"]
    assert r0["sent"] == r1["received"] > 0
    assert not (b / "model.gguf").exists()
    assert sorted(os.path.splitext(f)[1] for f in os.listdir(b / "shards")) == [".tpshard", ".tptok"]   # + tokenizer
    assert all(r["sent"] == r["received"] == 0 for r in second["ranks"]), "the second start sent weights again"
    assert all(r["hit"] for r in second["ranks"])


def test_a_receiver_that_cannot_write_ends_the_job_with_its_reason(hosts):
    a, b = hosts
    (b / "shards").write_text("a file where the shard folder should be")
    proc = _run([a, b], timeout=120)
    assert proc.returncode != 0
    assert "cannot write the shard file" in proc.stderr


def test_no_weights_from_root_keeps_the_missing_file_an_error(hosts):
    a, b = hosts
    proc = run_mpirun([mpirun_path(), "--oversubscribe", "-n", "1", "--wdir", str(a), sys.executable, "-c",
                       "import tpllama; tpllama.load('model.gguf', weights_from_root=False, threads=1)", ":",
                       "-n", "1", "--wdir", str(b), sys.executable, "-c",
                       "import tpllama; tpllama.load('model.gguf', weights_from_root=False, threads=1)"],
                      timeout=120, env=mpi_env())
    assert proc.returncode != 0 and "no such file" in proc.stderr, proc.stderr[-2000:]

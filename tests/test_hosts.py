"""A real hostfile over TCP: two hosts made with network namespaces on this machine, launched
by mpirun through a launch agent (ip netns exec instead of ssh). The text must equal one rank's."""
import subprocess
import sys

import pytest

from mpi_util import REPO, mpi_env, mpirun, mpirun_path
from benchmarks.hosts import namespace_hosts, unavailable_reason

pytestmark = pytest.mark.mpi


@pytest.fixture(scope="module")
def two_hosts():
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"cannot make hosts with network namespaces here: {reason}")
    with namespace_hosts(2) as cluster:
        yield cluster


def generate_args(model, *extra):
    return ["-m", "tpllama.generate", "-m", str(model), "-p", "Once upon a time", "--temp", "0", "-n", "40", *extra]


def test_hostfile_over_tcp_gives_the_single_rank_text(two_hosts, stories_bin):
    alone = mpirun(1, generate_args(stories_bin, "--weight-type", "f32"))
    cmd = [mpirun_path(), "-n", "2", *two_hosts.mpirun_args(), sys.executable,
           *generate_args(stories_bin, "--weight-type", "f32", "-v")]
    cluster = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=mpi_env(), cwd=str(REPO))
    assert cluster.returncode == 0, cluster.stderr[-3000:]
    assert cluster.stdout == alone.stdout
    # the memory plan names each rank's host: two different machines as far as MPI knows
    plan_rows = [line.split() for line in cluster.stderr.splitlines() if line.strip()[:1].isdigit() and "tpl-node" in line]
    assert {row[1] for row in plan_rows} == {"tpl-node1", "tpl-node2"}, cluster.stderr[-2000:]


def test_hostfile_default_model(two_hosts, smollm2):
    prompt = ["-m", "tpllama.generate", "-m", str(smollm2), "--raw", "-p", "The capital of France is", "--temp", "0", "-n", "12"]
    alone = mpirun(1, prompt)
    cmd = [mpirun_path(), "-n", "2", *two_hosts.mpirun_args(), sys.executable, *prompt]
    cluster = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=mpi_env(), cwd=str(REPO))
    assert cluster.returncode == 0, cluster.stderr[-3000:]
    assert cluster.stdout == alone.stdout

"""A real hostfile over TCP: two hosts made with network namespaces on this machine, launched
by mpirun through a launch agent (ip netns exec instead of ssh). The text must equal one rank's."""
import sys

import pytest

from mpi_util import REPO, mpi_env, mpirun, mpirun_path, run_mpirun, script_result
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
    cluster = run_mpirun(cmd, timeout=180, env=mpi_env(), cwd=str(REPO))
    assert cluster.returncode == 0, cluster.stderr[-3000:]
    assert cluster.stdout == alone.stdout
    # the memory plan names each rank's host: two different machines as far as MPI knows
    plan_rows = [line.split() for line in cluster.stderr.splitlines() if line.strip()[:1].isdigit() and "tpl-node" in line]
    assert {row[1] for row in plan_rows} == {"tpl-node1", "tpl-node2"}, cluster.stderr[-2000:]


def test_hostfile_default_model(two_hosts, smollm2):
    prompt = ["-m", "tpllama.generate", "-m", str(smollm2), "--raw", "-p", "The capital of France is", "--temp", "0", "-n", "12"]
    alone = mpirun(1, prompt)
    cmd = [mpirun_path(), "-n", "2", *two_hosts.mpirun_args(), sys.executable, *prompt]
    cluster = run_mpirun(cmd, timeout=180, env=mpi_env(), cwd=str(REPO))
    assert cluster.returncode == 0, cluster.stderr[-3000:]
    assert cluster.stdout == alone.stdout


def test_a_host_without_the_model_file_gets_its_weights_over_tcp_once(two_hosts, stories_gguf, tmp_path):
    """Only host 1's rank 0 has the model (its working folder); host 2's rank gets its slice over
    TCP from rank 0 and keeps it in its shard file: the second start sends nothing."""
    import shutil
    from mpi_util import SCRIPTS
    a, b = tmp_path / "host1", tmp_path / "host2"
    a.mkdir()
    b.mkdir()
    shutil.copy(stories_gguf, a / "model.gguf")
    script = [sys.executable, str(SCRIPTS / "weights_from_root.py"), "model.gguf", "shards"]
    alone = run_mpirun([mpirun_path(), "-n", "1", "--wdir", str(a), *script], timeout=120, env=mpi_env())
    cmd = [mpirun_path(), *two_hosts.mpirun_args(), "-n", "1", "--host", two_hosts.hosts[0].address, "--wdir", str(a),
           *script, ":", "-n", "1", "--host", two_hosts.hosts[1].address, "--wdir", str(b), *script]

    first, second = (script_result(run_mpirun(cmd, timeout=180, env=mpi_env()), "weights_from_root.py on two hosts")
                     for _ in range(2))
    assert first["text"] == second["text"] == script_result(alone, "weights_from_root.py alone")["text"]
    assert first["ranks"][0]["sent"] == first["ranks"][1]["received"] > 0 and not first["ranks"][1]["has_file"]
    assert all(r["sent"] == r["received"] == 0 for r in second["ranks"])


def test_long_prompts_between_hosts_are_summed_split_with_the_single_rank_text(two_hosts, smollm2):
    """Between hosts a prompt chunk's all-reduces go by the split sum (reduce-scatter in float64,
    all-gather of the float32 totals); text equals one rank's, overlapped or not."""
    from mpi_util import SCRIPTS
    probe = run_mpirun([mpirun_path(), "-n", "2", *two_hosts.mpirun_args(), sys.executable,
                        str(SCRIPTS / "split_sum.py")], timeout=120, env=mpi_env(), cwd=str(REPO))
    probed = script_result(probe, "split_sum.py on two hosts")
    assert probed["decided"] is True                                 # two hosts: split
    n, own = 64 * 576, 64 * 576 // 2
    assert probed["decided_bytes"] == 8 * (n - own) + 4 * own
    text = ("The history of the printing press begins in the fifteenth century, when metal movable type "
            "changed how books were made, sold and read across Europe. ") * 6
    prompt = ["-m", "tpllama.generate", "-m", str(smollm2), "--raw", "-p", text, "--temp", "0", "-n", "12"]
    alone = mpirun(1, prompt)
    for extra in ([], ["--overlap"]):
        cmd = [mpirun_path(), "-n", "2", *two_hosts.mpirun_args(), sys.executable, *prompt, *extra]
        cluster = run_mpirun(cmd, timeout=180, env=mpi_env(), cwd=str(REPO))
        assert cluster.returncode == 0, cluster.stderr[-3000:]
        assert cluster.stdout == alone.stdout, extra

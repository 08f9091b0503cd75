"""The README's two commands work as written: the first in a fresh virtual environment from the
root of a fresh copy of the repository (and the installed tpllama from any other folder), the
second is what CI runs. Both are read out of README.md, so the README and the tests cannot drift."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def readme_commands():
    """The README's first two ```bash blocks, as they are written."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    return [b.strip() for b in blocks[:2]]


def fresh_copy(destination: Path) -> Path:
    """The repository's files as a clone would have them (tracked and new files, no build outputs)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=str(REPO),
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return destination


def test_ci_runs_the_readme_second_command():
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in ci, "the last step of .ci/run is the README's test command, as written"


def test_the_first_command_installs_in_place_so_the_checkout_runs_from_its_root():
    first = readme_commands()[0]
    assert first.startswith("pip install -e . && mpirun -n 2 python -m tpllama.generate -p ")


def test_a_source_tree_without_its_build_says_what_to_do(tmp_path):
    """`python -m` from a checkout with no build imports the checkout: one line, not an ImportError."""
    tree = fresh_copy(tmp_path / "tpllama")
    out = subprocess.run([sys.executable, "-m", "tpllama.generate", "-p", "hi"], cwd=str(tree), capture_output=True,
                         text=True, timeout=120, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        f"error: tpllama's C kernels are not built in the source tree {tree}, which Python imports first when run "
        "from there; build them in place with `pip install -e .` (as the README does) or `python setup.py "
        "build_ext --inplace`, or run from another folder"], out.stderr


@pytest.mark.slow
@pytest.mark.mpi
def test_the_readme_first_command_in_a_fresh_venv(tmp_path, smollm2):
    """Verbatim, from the root of a fresh copy, in a new venv (pip's cache and index serve the
    packages; the default model is already in tpllama's cache: the smollm2 fixture saw to that)."""
    tree = fresh_copy(tmp_path / "tpllama")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # as root, the README's note: Open MPI wants these; and ranks that share this machine's few
    # cores with other jobs must not spin while they wait (mpirun reads OMPI_MCA_* from the environment)
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_mpi_yield_when_idle="1")
    script = f"source {venv}/bin/activate && {readme_commands()[0]}"
    out = subprocess.run(["bash", "-c", script], cwd=str(tree), capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, f"{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    answer = out.stdout.split("Successfully installed")[-1].splitlines()[1:]
    assert len(" ".join(answer).split()) >= 10, out.stdout[-3000:]
    assert "generated:" in out.stderr and "Traceback" not in out.stderr and "error" not in out.stderr.lower()

    # the installed (editable) tpllama runs from any other folder too
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = (f"source {venv}/bin/activate && mpirun -n 2 python -m tpllama.generate -p 'Hi' -n 4 --temp 0 -q")
    out = subprocess.run(["bash", "-c", script], cwd=str(elsewhere), capture_output=True, text=True, timeout=300,
                         env=env)
    assert out.returncode == 0 and out.stdout.strip(), out.stderr

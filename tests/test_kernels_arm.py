"""The ARM64 kernels, tested on any host: kernels/test_tpk.c cross-compiled with
aarch64-linux-gnu-gcc and run under qemu-aarch64 checks every ARM level against the scalar
reference bit for bit (matmuls of every weight type, the q80 quantizer, float16 widening).

  armv8.2-a+dotprod build on `-cpu max`:        best level neon-dotprod (Raspberry Pi 5)
  plain armv8-a build on `-cpu cortex-a72`:     best level neon (Raspberry Pi 4)
  plain armv8-a build on `-cpu max`:            still finds neon-dotprod at run time

Install the tools with: apt-get install -y gcc-aarch64-linux-gnu qemu-user
"""
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KERNELS = REPO / "kernels"
SOURCES = [KERNELS / "test_tpk.c", KERNELS / "tpk.c", KERNELS / "tpk_kq.c", KERNELS / "tpk_x86.c", KERNELS / "tpk_arm.c"]
SYSROOT = "/usr/aarch64-linux-gnu"

CC = shutil.which("aarch64-linux-gnu-gcc")
QEMU = shutil.which("qemu-aarch64")

pytestmark = pytest.mark.skipif(
    CC is None or QEMU is None,
    reason=("ARM cross-test needs aarch64-linux-gnu-gcc and qemu-aarch64 "
            f"(missing: {', '.join(n for n, p in (('aarch64-linux-gnu-gcc', CC), ('qemu-aarch64', QEMU)) if p is None)}); "
            "apt-get install -y gcc-aarch64-linux-gnu qemu-user"))


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    out = tmp_path_factory.mktemp("arm")
    exes = {}
    for name, march, openmp in [("dotprod", "armv8.2-a+dotprod", True), ("plain", "armv8-a", True)]:
        exe = out / f"test_tpk_{name}"
        cmd = [CC, "-O2", "-std=gnu11", "-ffp-contract=off", "-Wall", "-Werror", f"-march={march}",
               f"-I{KERNELS}", *map(str, SOURCES), "-o", str(exe), "-lm"]
        if openmp:
            cmd.insert(1, "-fopenmp")
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 and openmp:   # a cross toolchain without libgomp: single-threaded build
            cmd.remove("-fopenmp")
            done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stderr}"
        exes[name] = exe
    return exes


def run_under_qemu(exe, cpu, expect):
    done = subprocess.run([QEMU, "-L", SYSROOT, "-cpu", cpu, str(exe), "--expect", expect],
                          capture_output=True, text=True, timeout=600)
    return done.returncode, done.stdout + done.stderr


@pytest.mark.parametrize("build,cpu,expect,levels", [
    ("dotprod", "max", "neon-dotprod", ["scalar", "neon", "neon-dotprod"]),
    ("plain", "cortex-a72", "neon", ["scalar", "neon"]),
    ("plain", "max", "neon-dotprod", ["scalar", "neon", "neon-dotprod"]),
])
def test_arm_levels_bit_identical(builds, build, cpu, expect, levels):
    rc, out = run_under_qemu(builds[build], cpu, expect)
    assert f"best level: {expect}" in out, out
    assert f"levels tested: {' '.join(levels)}" in out, out
    assert "q80 quantizer at every level bit-identical to the reference: yes" in out, out
    assert "q41 q50 q4k q5k q6k at every level bit-identical to scalar: yes" in out, out
    assert "float16 widening at every level bit-identical to the table: yes" in out, out
    assert "perturbed scale detected: yes" in out, out
    assert rc == 0 and out.rstrip().endswith("PASS"), out

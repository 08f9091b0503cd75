"""Build of tpllama's C kernels behind a thin Cython module (tpllama._kernels).

Flags are chosen per architecture: x86-64 builds SIMD variants with per-function
target attributes and picks one at run time (one build runs on any x86-64 CPU);
ARM64 does the same with NEON/dotprod. OpenMP is probed, and the build falls back
to single-threaded kernels when the compiler cannot link it.
Environment overrides: TPLLAMA_CFLAGS (extra flags), TPLLAMA_NO_OPENMP=1.
"""
import os
import platform
import shutil
import subprocess
import sys
import tempfile

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

KERNEL_SOURCES = ["kernels/tpk.c", "kernels/tpk_kq.c", "kernels/tpk_x86.c", "kernels/tpk_arm.c", "kernels/tpk_ops.c",
                  "kernels/tpk_attn_x86.c", "kernels/tpk_layer.c"]


def _compiler_accepts(compiler, flags, source):
    """True if `compiler` builds and links `source` with `flags`."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write(source)
        try:
            objs = compiler.compile([src], output_dir=tmp, extra_postargs=flags)
            compiler.link_executable(objs, os.path.join(tmp, "probe"), extra_postargs=flags)
        except Exception:
            return False
    return True


OPENMP_PROBE = "#include <omp.h>\nint main(void){int n=0;\n#pragma omp parallel\n{n=omp_get_num_threads();}\nreturn n<1;}\n"


class KernelBuildExt(build_ext):
    def build_extensions(self):
        machine = platform.machine().lower()
        # -ffp-contract=off: no fused multiply-add, so every code path rounds like the scalar reference.
        compile_args = ["-O3", "-std=gnu11", "-fno-strict-aliasing", "-ffp-contract=off"]
        link_args = []
        if machine in ("x86_64", "amd64"):
            compile_args += ["-mtune=generic"]
        elif machine in ("aarch64", "arm64"):
            compile_args += ["-march=armv8-a"]
        if os.environ.get("TPLLAMA_NO_OPENMP") != "1":
            if _compiler_accepts(self.compiler, ["-fopenmp"], OPENMP_PROBE):
                compile_args.append("-fopenmp")
                link_args.append("-fopenmp")
            else:
                print("tpllama: OpenMP not available, kernels will run single-threaded", file=sys.stderr)
        compile_args += os.environ.get("TPLLAMA_CFLAGS", "").split()
        for ext in self.extensions:
            ext.extra_compile_args = compile_args
            ext.extra_link_args = link_args
        super().build_extensions()


extensions = [
    Extension(
        "tpllama._kernels",
        sources=["kernels/_kernels.pyx"] + KERNEL_SOURCES,
        include_dirs=["kernels", numpy.get_include()],
        depends=["kernels/tpk.h", "kernels/tpk_impl.h", "kernels/tpk_layer.h"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )
]

setup(
    ext_modules=cythonize(extensions, language_level=3, compiler_directives={"boundscheck": False, "wraparound": False}),
    cmdclass={"build_ext": KernelBuildExt},
)

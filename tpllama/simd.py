"""$TPLLAMA_SIMD: the kernels' code path of one process, chosen by the user.

By default the kernels run the best SIMD level the CPU has. TPLLAMA_SIMD=scalar (or avx2,
neon, ...) forces a lower one in this process: a way to make one rank of a job a slower node
(e.g. `mpirun -n 1 ... : -n 1 -x TPLLAMA_SIMD=scalar ...` emulates a Pi 5 beside a slower
CM4), or to step around a CPU feature that misbehaves. Every level returns the scalar
reference's bits, so the text does not change; only the speed does.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional

from .errors import TpllamaError

SIMD_ENV = "TPLLAMA_SIMD"


def choose_simd_level(environ: Mapping[str, str] = os.environ) -> Optional[str]:
    """Force the level named by $TPLLAMA_SIMD (if set and not empty) and return its name;
    None when unset. TpllamaError (one line, naming the variable and the choices) for a
    level that is unknown or that this build and CPU cannot run."""
    name = environ.get(SIMD_ENV, "").strip().lower()
    if not name:
        return None
    from . import _kernels as K
    supported = K.supported_simd_levels()
    if name not in supported:
        known = list(K.LEVEL_NAMES.values())
        why = "not a kernel level" if name not in known else "not supported by this CPU or build"
        raise TpllamaError(f"{SIMD_ENV}={environ[SIMD_ENV]}: {why}; choose one of {', '.join(supported)} "
                           f"(or unset it for the best, {K.best_simd_level()})")
    K.set_simd_level(name)
    return name

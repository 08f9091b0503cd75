"""Shared helpers of the benchmark scripts: quiet-machine waits, medians, results files.

The development machines are shared: other people's test runs take cores at random
moments, and a 2-thread measurement that overlaps one is meaningless. So every timed
repetition first waits (up to a limit) until the rest of the machine has been idle for a
moment, records how busy it was, and the scripts report medians over repetitions.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

RESULTS = Path(__file__).resolve().parent / "results"


def _busy_jiffies():
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    values = [int(v) for v in parts]
    idle = values[3] + values[4]                     # idle + iowait
    return sum(values[:8]) - idle


def _own_jiffies():
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return (ru.ru_utime + ru.ru_stime) * os.sysconf("SC_CLK_TCK")


def others_load(window: float = 0.25) -> float:
    """CPU cores kept busy by other processes over the last `window` seconds (Linux; else 0)."""
    if not os.path.exists("/proc/stat"):
        return 0.0
    b0, o0 = _busy_jiffies(), _own_jiffies()
    time.sleep(window)
    b1, o1 = _busy_jiffies(), _own_jiffies()
    return max(0.0, (b1 - b0) - (o1 - o0)) / os.sysconf("SC_CLK_TCK") / window


class Quiet:
    """wait(): block until other processes use less than `threshold` cores (at most `limit` s)."""

    def __init__(self, threshold: float = 0.1, limit: float = 60.0, enabled: bool = True):
        self.threshold, self.limit, self.enabled = threshold, limit, enabled
        self.waited = 0.0
        self.noisy = 0          # repetitions that started on a busy machine anyway

    def wait(self) -> float:
        if not self.enabled:
            return 0.0
        t0 = time.time()
        load = others_load()
        while load > self.threshold and time.time() - t0 < self.limit:
            load = others_load(0.5)
        self.waited += time.time() - t0
        if load > self.threshold:
            self.noisy += 1
        return load


def median(values):
    v = sorted(values)
    n = len(v)
    if n == 0:
        return float("nan")
    return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])


def machine_info() -> dict:
    from tpllama import _kernels as K
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent).stdout.strip()
    except OSError:
        commit = ""
    return {"cpu": cpu, "cores": os.cpu_count(), "machine": platform.machine(), "python": sys.version.split()[0],
            "simd": K.simd_level(), "simd_levels": K.supported_simd_levels(), "openmp": K.has_openmp(),
            "commit": commit, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def write_results(name: str, data: dict, path: Optional[str] = None) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = Path(path) if path else RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(data, indent=2))
    return out


def add_model_arguments(p, default_type: str = "q4km") -> None:
    """--model, or --shape and --type of a random-weight model (see bench_model)."""
    p.add_argument("--model", default=None, help="model file (default: a random-weight model of --shape)")
    p.add_argument("--shape", default="tinyllama-1.1b")
    p.add_argument("--type", default=default_type, help="file type of the random-weight model (q40, q80, f32, f16, q4km)")


def bench_model(model: Optional[str], shape: Optional[str], file_type: str = "q40") -> str:
    """The model a benchmark runs: a given path, or a cached random-weight model of a named shape
    and file type (tpllama.bench.make_model.TYPES)."""
    if model:
        return model
    from tpllama.bench.make_model import ensure_model
    cache = Path(os.environ.get("TPLLAMA_CACHE", "~/.cache/tpllama")).expanduser() / "bench"
    cache.mkdir(parents=True, exist_ok=True)
    name = f"{shape}.gguf" if file_type == "q40" else f"{shape}-{file_type}.gguf"
    return ensure_model(str(cache / name), shape, file_type)

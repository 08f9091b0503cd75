"""Shared helpers of the benchmark scripts: which tpllama they run, quiet-machine waits, medians
with spread, the machine header (CPU, SIMD level, streaming bandwidth measured now), results files.

Importing this module picks the tpllama the benchmarks measure: the checkout's own when its C
kernels are built in place (`python setup.py build_ext --inplace`), else the installed one (after
`pip install .` the checkout's tpllama/ has no kernels and must not shadow the installed package).

The development machines are shared: other people's test runs take cores at random
moments, and a 2-thread measurement that overlaps one is meaningless. So every timed
repetition first waits (up to a limit) until the rest of the machine has been idle for a
moment, records how busy it was, and the scripts report medians over repetitions.
"""
from __future__ import annotations

import importlib.machinery
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

RESULTS = Path(__file__).resolve().parent / "results"
REPO = RESULTS.parents[1]


def checkout_is_built(root: Path = REPO) -> bool:
    """True if root/tpllama holds a C kernels module built for this Python."""
    return any((root / "tpllama" / f"_kernels{suffix}").exists()
               for suffix in importlib.machinery.EXTENSION_SUFFIXES)


def choose_tpllama() -> None:
    """Put the checkout first on sys.path if its kernels are built; else leave the installed tpllama
    to be found, and stop with one clear line if there is none."""
    root = str(REPO)
    if "tpllama" not in sys.modules:
        while root in sys.path:
            sys.path.remove(root)
        if checkout_is_built():
            sys.path.insert(0, root)
    try:
        import tpllama._kernels  # noqa: F401
    except ImportError as e:
        sys.exit(f"error: cannot import tpllama with its C kernels ({e}): install it (`pip install .`) "
                 f"or build the checkout's kernels (`python setup.py build_ext --inplace` in {REPO})")
    if root not in sys.path:
        sys.path.append(root)          # `benchmarks` itself, for `benchmarks.hosts` and friends


choose_tpllama()


def child_env(env: Optional[dict] = None) -> dict:
    """Environment for subprocesses (mpirun ranks) that must import the same tpllama as this one,
    with the MPI transports tpllama's command line picks (no libfabric probe: tpllama.cli)."""
    import tpllama
    from tpllama.cli import skip_libfabric_probe
    env = dict(os.environ if env is None else env)
    skip_libfabric_probe(env)
    root = str(Path(tpllama.__file__).resolve().parents[1])
    if root == str(REPO):
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env


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


def _process_jiffies(marker: str) -> dict:
    """pid -> CPU jiffies (user + system) of the running processes whose environment holds `marker`."""
    found = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if marker.encode() not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            found[int(pid)] = int(fields[11]) + int(fields[12])      # utime, stime
        except OSError:
            continue
    return found


class OthersCpu:
    """Context manager: `cores`, the CPU cores that other work kept busy, on average, while the
    block ran: busy cores minus this process's CPU time and that of the processes started with
    `env` (the run's mpirun, daemons and ranks, sampled every `every` s: ranks on namespace hosts
    are not this process's children). On a machine shared with other work, the input that says
    how much of it a run got (Linux; else 0). Usage:

        with OthersCpu() as others:
            subprocess.run(cmd, env=others.env(env))
    """

    def __init__(self, every: float = 0.25):
        self.marker = f"TPLLAMA_BENCH_RUN={os.getpid()}-{time.time_ns()}"
        self.every, self.cores = every, 0.0
        self._seen, self._stop = {}, None

    def env(self, env: dict) -> dict:
        """`env` with the marker of this run's processes."""
        key, value = self.marker.split("=", 1)
        return dict(env, **{key: value})

    def _sample(self):
        while not self._stop.wait(self.every):
            for pid, jiffies in _process_jiffies(self.marker).items():
                self._seen[pid] = max(jiffies, self._seen.get(pid, 0))

    def __enter__(self):
        import threading
        if os.path.exists("/proc/stat"):
            self._start = (_busy_jiffies(), _own_jiffies(), time.time())
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._stop is not None:
            self._stop.set()
            self._thread.join()
            b0, o0, t0 = self._start
            ranks = sum(self._seen.values())
            busy = _busy_jiffies() - b0 - (_own_jiffies() - o0) - ranks
            self.cores = max(0.0, busy) / os.sysconf("SC_CLK_TCK") / max(time.time() - t0, 1e-3)
        return False


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


def spread(values) -> str:
    """'median (min-max)' of repetitions, the way the benchmarks print a figure."""
    if not values:
        return "-"
    return f"{median(values):.3g} ({min(values):.3g}-{max(values):.3g})"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":")[0].strip() in ("model name", "Model"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def last_level_cache_bytes() -> int:
    """Size of the largest CPU cache Linux reports (0 if unknown)."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip()
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG") or 0) * scale)
    return max(sizes, default=0)


def stream_bandwidth(threads, reps: int = 3) -> dict:
    """Streaming read GB/s at each thread count, measured now: a C sum over a buffer 4x the last-level
    cache (at least 256 MiB), so no cache holds it. {threads: [GB/s of each repetition]}."""
    from tpllama import _kernels as K
    from tpllama.matrix import _ARENA
    import numpy as np
    size = max(256 * 2**20, 4 * last_level_cache_bytes())
    x = _ARENA.empty(size).view(np.float32)
    x[:] = 1.0
    samples = {}
    for th in threads:
        K.stream_sum(x, th)                       # first touch and thread start-up
        for _ in range(reps):
            t = time.perf_counter()
            K.stream_sum(x, th)
            samples.setdefault(th, []).append(x.nbytes / (time.perf_counter() - t) / 1e9)
    return samples


def machine_info(bandwidth_threads=(1,)) -> dict:
    """The machine and software a run measured, with the streaming bandwidth at `bandwidth_threads`
    measured now (none: the caller measures it itself)."""
    import tpllama
    from tpllama import _kernels as K
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent).stdout.strip()
    except OSError:
        commit = ""
    bandwidth = stream_bandwidth(bandwidth_threads) if bandwidth_threads else {}
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "machine": platform.machine(), "python": sys.version.split()[0],
            "simd": K.simd_level(), "simd_levels": K.supported_simd_levels(), "openmp": K.has_openmp(),
            "tpllama": str(Path(tpllama.__file__).resolve().parent), "commit": commit,
            "bandwidth_GBps": {th: median(v) for th, v in bandwidth.items()},
            "bandwidth_samples": {th: v for th, v in bandwidth.items()},
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def machine_header(info: dict) -> str:
    """One '# ...' line naming the CPU, SIMD level and the bandwidth measured in this run."""
    bw = ", ".join(f"{spread(v)} GB/s at {th} thread(s)" for th, v in info["bandwidth_samples"].items())
    return (f"# {info['cpu']}, {info['cores']} cores, SIMD {info['simd']}, OpenMP {info['openmp']}; "
            f"streaming read {bw or 'measured below'}; tpllama from {info['tpllama']}")


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


def other_kernels(checkout: Path):
    """Another checkout's built tpllama._kernels, loaded beside this one under another package name."""
    built = sorted((checkout / "tpllama").glob("_kernels.*.so"))
    if not built:
        sys.exit(f"--against {checkout}: no built tpllama/_kernels*.so there (python setup.py build_ext --inplace)")
    package = Path(tempfile.mkdtemp()) / "tpllama_other"
    package.mkdir()
    (package / "__init__.py").write_text("")
    shutil.copy(built[0], package / built[0].name)
    sys.path.insert(0, str(package.parent))
    from tpllama_other import _kernels as other
    return other

#!/usr/bin/env python3
"""Cost of the model fingerprint the ranks compare at load (tpllama/fingerprint.py), next to
what a full sha256 of the file would cost, on the default model or a given file.

    python benchmarks/fingerprint.py                    # SmolLM2-135M-Instruct Q4_1 from the cache
    python benchmarks/fingerprint.py -m model.gguf --reps 5

Prints the median time with the file's pages in memory (warm) and after dropping them from
the page cache (cold: what a freshly booted node pays), the bytes sampled, and the time of
hashing the whole file; writes JSON to --out.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO))      # `benchmarks`, after any installed tpllama: _common picks which one runs
from benchmarks._common import machine_header, machine_info, median, spread, write_results  # noqa: E402


def drop_page_cache(path: str):
    """Ask the kernel to forget the file's cached pages (Linux; a no-op where unsupported)."""
    if hasattr(os, "posix_fadvise"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-m", "--model", default=None, help="model file (default: the cached default model)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    from tpllama.fetch import fetch, sha256_of
    from tpllama.fingerprint import _samples, fingerprint
    from tpllama.formats import open_model
    path = args.model or fetch(quiet=True)
    info = machine_info()
    print(machine_header(info), flush=True)
    cold = []
    for _ in range(args.reps):   # a fresh map each time: pages a process has mapped are not dropped
        fresh = open_model(path)
        drop_page_cache(path)
        cold.append(timed(lambda: fingerprint(fresh)))
        fresh.close()
    reader = open_model(path)
    warm = [timed(lambda: fingerprint(reader)) for _ in range(args.reps)]
    sampled = sum(len(s) for t in reader.tensors.values() for s in _samples(t.raw))
    full = timed(lambda: sha256_of(path))
    result = {"model": os.path.basename(path), "file_bytes": os.path.getsize(path), "tensors": len(reader.tensors),
              "sampled_bytes": sampled, "fingerprint_warm_ms": 1000 * median(warm),
              "fingerprint_cold_ms": 1000 * median(cold), "full_sha256_ms": 1000 * full, "machine": info}
    print(f"{result['model']}: {result['tensors']} tensors, {sampled / 1024:.0f} KiB sampled of "
          f"{result['file_bytes'] / 2**20:.0f} MiB; fingerprint {result['fingerprint_warm_ms']:.1f} ms warm, "
          f"{result['fingerprint_cold_ms']:.1f} ms cold; a full sha256 {result['full_sha256_ms']:.0f} ms")
    print(f"(median (min-max) ms: warm {spread([1000 * t for t in warm])}, cold {spread([1000 * t for t in cold])})")
    print(f"results: {write_results('fingerprint', result, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Decode from mapped shard files against the disk's read speed (models larger than memory).

    python benchmarks/mapped_speed.py [--shape tinyllama-1.1b] [--type q4km] [--tokens 8]

Loads the model on one rank with mmap=True (the shard file is written on first use), then
times decode steps two ways: with the page cache cold (before each step the shard file's
pages are unmapped and dropped, so every weight comes from the disk, as for a model larger
than memory) and warm (the file's pages cached). The bound for the cold case is the disk's
best read speed in the sitting (the shard file read by 4 threads after dropping it from the
page cache, probed before every cold step) divided by the bytes each token reads.
Prints the table and the fraction of the bound reached; writes JSON to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import mmap
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO))      # `benchmarks`, after any installed tpllama: _common picks which one runs
from benchmarks._common import Quiet, add_model_arguments, bench_model, machine_header, machine_info, median, write_results  # noqa: E402


def drop_cached_pages(model) -> None:
    """Unmap the shard file's pages from this process and drop them from the page cache."""
    layers = model.rank_model.w.layers
    layers.mapping.madvise(mmap.MADV_DONTNEED)
    fd = os.open(model.shard_file.path, os.O_RDONLY)
    try:
        os.fsync(fd)      # a shard file written by this load has dirty pages, which cannot be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def decode_steps(model, n: int, cold: bool, quiet: Quiet, disk_speeds: list) -> list:
    """Seconds of n decode steps (each a one-token generate after the cached prompt). Cold: before
    each step the disk's read speed is probed (appended to disk_speeds), then the pages dropped."""
    from tpllama.shardcache import read_bandwidth
    ids = [1, 300, 400, 500]
    model.generate(ids, 1, temperature=0.0)          # the prompt is in the KV cache from here on
    times = []
    for _ in range(n):
        quiet.wait()
        if cold:
            drop_cached_pages(model)
            disk_speeds.append(read_bandwidth(model.shard_file.path, 512 * 2**20) or 0.0)
            drop_cached_pages(model)
        t0 = time.perf_counter()
        g = model.generate(ids, 1, temperature=0.0, ignore_eos=True)
        times.append(time.perf_counter() - t0)
        ids = ids + g.tokens
    return times


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(p)
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import tpllama
    from tpllama.plan import weight_bytes
    model_path = bench_model(args.model, args.shape, args.type)
    info = machine_info((args.threads or 1,))
    print(machine_header(info), flush=True)
    model = tpllama.load(model_path, mmap=True, ctx_size=256, threads=args.threads)
    per_token = weight_bytes(model.config, model.shard, model.types)
    quiet = Quiet()
    speeds: list = []
    cold = median(decode_steps(model, args.tokens, True, quiet, speeds))
    warm = median(decode_steps(model, args.tokens, False, quiet, speeds))
    # the bound: the fastest the disk read in this sitting (a virtual disk's speed varies a lot)
    disk = max(speeds) if speeds and max(speeds) > 0 else None
    bound = disk / per_token if disk else None
    print(f"\n{os.path.basename(model_path)}, mapped, 1 rank, {model.threads} thread(s); "
          f"{per_token / 2**20:,.0f} MiB of weights per token")
    print(f"disk read speed (page cache dropped, {len(speeds)} probes): median {median(speeds) / 1e6:,.0f} MB/s, "
          f"best {disk / 1e6:,.0f} MB/s -> bound {bound:.2f} tokens/s" if disk else
          "disk read speed: could not be measured")
    print(f"{'page cache':12} {'s/token':>8} {'tokens/s':>9}")
    print(f"{'cold':12} {cold:8.3f} {1 / cold:9.2f}")
    print(f"{'warm':12} {warm:8.3f} {1 / warm:9.2f}")
    if bound:
        print(f"cold decode reaches {100 / cold / bound:.0f}% of the disk bound")
    out = write_results("mapped_speed", {"model": model_path, "bytes_per_token": per_token, "disk_Bps_probes": speeds, "disk_Bps": disk,
                                         "cold_s_per_token": cold, "warm_s_per_token": warm,
                                         "bound_tokens_per_s": bound, "threads": model.threads,
                                         "machine": info, "busy_repetitions": quiet.noisy}, args.out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Kernel benchmark: q40 decode matvec GB/s next to this machine's memory read bandwidth and
numpy's float32 matvec, and 64-token prefill GFLOP/s, at 1 and 2 threads; then every weight
type (q40, q41, q50, q80, q4k, q5k, q6k) on TinyLlama-1.1B's FFN shapes, its decode read
bandwidth next to q40's.

    python benchmarks/kernels.py [--reps 5] [--threads 1,2] [--level avx2]
                                 [--types q40,q4k,q6k] [--type-shapes 5632x2048]

Decode streams weights that are not in any cache: each repetition runs the matvec over
enough copies of the matrix (>= 512 MiB, 256 MiB per type in the per-type table) that every
byte comes from memory, like a model's decode step. The types take turns within each
repetition, so a busy machine slows them alike. Bandwidth is a C streaming sum over 1 GiB
(tpk_stream_sum) in the same run. Prints tables, writes JSON to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import ctypes
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO))      # `benchmarks`, after any installed tpllama: _common picks which one runs
from benchmarks._common import Quiet, machine_header, machine_info, median, write_results  # noqa: E402
from tpllama import _kernels as K  # noqa: E402
from tpllama.matrix import _ARENA  # noqa: E402

SHAPES = [(2048, 2048), (5632, 2048), (4096, 4096), (11008, 4096)]
COLD_BYTES = 512 * 2**20
TYPE_SHAPES = [(5632, 2048), (2048, 5632)]     # TinyLlama-1.1B's w1/w3 and w2
TYPE_COLD_BYTES = 256 * 2**20
# where the fp16 scales of each type's GGML block are (random bytes elsewhere are valid blocks)
FP16_FIELDS = {"q40": (0,), "q80": (0,), "q41": (0, 2), "q50": (0,), "q4k": (0, 2), "q5k": (0, 2), "q6k": (208,)}


def blas_set_threads(n: int) -> bool:
    """Set the OpenBLAS thread count of numpy (found among the loaded libraries); False if not found."""
    try:
        with open("/proc/self/maps") as f:
            libs = {line.split()[-1] for line in f if "blas" in line.lower() and ".so" in line}
    except OSError:
        return False
    for lib in libs:
        try:
            handle = ctypes.CDLL(lib)
        except OSError:
            continue
        for sym in ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_", "openblas_set_num_threads",
                    "scipy_openblas_set_num_threads"):
            fn = getattr(handle, sym, None)
            if fn is not None:
                fn(ctypes.c_int(n))
                return True
    return False


def random_q40(rows: int, cols: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    blocks = np.empty((rows, cols // 32 * K.Q40_BYTES), np.uint8)
    for r in range(0, rows, 1024):
        blocks[r:r + 1024] = K.quantize_q40(rng.standard_normal((min(1024, rows - r), cols), dtype=np.float32) * 0.02)
    return blocks


def random_ggml(wtype: str, rows: int, cols: int, seed: int) -> np.ndarray:
    """Valid GGML blocks of wtype (random bytes, small finite fp16 scales): speed does not
    depend on the values."""
    rng = np.random.default_rng(seed)
    values, bb = K.ggml_block(wtype)
    b = rng.integers(0, 256, (rows, cols // values, bb), dtype=np.uint8)
    for off in FP16_FIELDS[wtype]:
        b[:, :, off:off + 2] = (rng.standard_normal((rows, cols // values)) * 0.01).astype(np.float16).view(
            np.uint8).reshape(rows, cols // values, 2)
    return b.reshape(rows, -1)


def per_type(types, shapes, threads, reps, quiet):
    """Decode and 64-token prefill of every type on each shape, the types taking turns."""
    out = []
    for si, (rows, cols) in enumerate(shapes):
        nb = cols // 32
        copies = {}
        for wt in types:
            blocks = random_ggml(wt, rows, cols, si)
            n = K.packed_bytes(wt, rows, nb)
            copies[wt] = [K.pack_ggml(wt, blocks, 0, cols, _ARENA.empty(n))
                          for _ in range(max(2, -(-TYPE_COLD_BYTES // n)))]
            del blocks
        rng = np.random.default_rng(200 + si)
        x1 = K.quantize_q80(rng.standard_normal((1, cols), dtype=np.float32))
        x64 = K.quantize_q80(rng.standard_normal((64, cols), dtype=np.float32))
        y1, y64 = np.empty((1, rows), np.float32), np.empty((64, rows), np.float32)
        res = {(wt, th): {"decode": [], "prefill": []} for wt in types for th in threads}
        for wt in types:
            for th in threads:
                K.matmul_packed(wt, copies[wt][0], rows, nb, x64, y64, th)
        for rep in range(reps):
            for th in threads:
                for wt in types:
                    quiet.wait()
                    t = time.perf_counter()
                    for c in copies[wt]:
                        K.matmul_packed(wt, c, rows, nb, x1, y1, th)
                    res[wt, th]["decode"].append((time.perf_counter() - t) / len(copies[wt]))
                    t = time.perf_counter()
                    K.matmul_packed(wt, copies[wt][rep % len(copies[wt])], rows, nb, x64, y64, th)
                    res[wt, th]["prefill"].append(time.perf_counter() - t)
        for th in threads:
            base = None
            for wt in types:
                dec, pre = median(res[wt, th]["decode"]), median(res[wt, th]["prefill"])
                nbytes = copies[wt][0].nbytes
                row = {"type": wt, "rows": rows, "cols": cols, "threads": th, "weight_bytes": nbytes,
                       "bytes_per_weight": nbytes / (-(-rows // K.ROWS) * K.ROWS * cols),
                       "decode_ms": 1e3 * dec, "decode_GBps": nbytes / dec / 1e9,
                       "prefill64_ms": 1e3 * pre, "prefill64_GFLOPs": 2 * rows * cols * 64 / pre / 1e9}
                if wt == "q40":
                    base = row
                if base is not None:
                    row["GBps_vs_q40"] = row["decode_GBps"] / base["decode_GBps"]
                    row["decode_time_vs_q40"] = row["decode_ms"] / base["decode_ms"]
                out.append(row)
        del copies
    return out


def print_by_prefetch(rows_out, distances):
    """The q40 decode GB/s at each prefetch distance, with float32 sums (most matrices) and float64
    sums (wo, w2: the row-parallel partial sums), each as a share of the streaming read."""
    name = lambda d: "none" if d == 0 else f"{d} B"
    print(f"\nq40 decode at each prefetch distance (--prefetch; alternated): GB/s and % of the streaming read, "
          "float32 sums / float64 sums (wo, w2)")
    print(f"{'matrix':>12} {'thr':>3} | " + " | ".join(f"{name(d):>23}" for d in distances))
    for r in rows_out:
        cells = []
        for d in distances:
            by = r["decode_GBps_by_prefetch"][str(d)]
            cells.append(f"{by['f32']:5.1f} {100 * by['f32'] / r['bandwidth_GBps']:3.0f}% / "
                         f"{by['f64']:5.1f} {100 * by['f64'] / r['bandwidth_GBps']:3.0f}%")
        print(f"{r['rows']:>6}x{r['cols']:<5} {r['threads']:>3} | " + " | ".join(f"{c:>23}" for c in cells))


def print_types(rows_out):
    hdr = (f"{'type':>4} {'matrix':>11} {'thr':>3} | {'B/weight':>8} | {'decode ms':>9} {'GB/s':>6} {'vs q40':>6} "
           f"{'time vs q40':>11} | {'pp64 ms':>8} {'GFLOP/s':>8}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows_out:
        vs = f"{100 * r['GBps_vs_q40']:5.0f}%" if "GBps_vs_q40" in r else "     -"
        tv = f"{r['decode_time_vs_q40']:10.2f}x" if "decode_time_vs_q40" in r else "          -"
        print(f"{r['type']:>4} {r['rows']:>5}x{r['cols']:<5} {r['threads']:>3} | {r['bytes_per_weight']:8.4f} | "
              f"{r['decode_ms']:9.3f} {r['decode_GBps']:6.1f} {vs} {tv} | {r['prefill64_ms']:8.2f} "
              f"{r['prefill64_GFLOPs']:8.1f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5, help="repetitions of every measurement (medians are reported)")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--level", help="force a SIMD level (default: the best one)")
    p.add_argument("--shapes", help="e.g. 2048x2048,11008x4096 (q40 table; 'none' skips it)")
    p.add_argument("--types", default=",".join(K.PACKED_TYPES),
                   help="weight types of the per-type table, q40 first as the baseline ('none' skips it)")
    p.add_argument("--type-shapes", help="shapes of the per-type table (default: TinyLlama's 5632x2048,2048x5632)")
    p.add_argument("--prefetch", default="1024,0",
                   help="prefetch distances in bytes (0: none) at which the q40 decode is timed, alternated; the "
                        "first is used for everything else (default 1024,0: the kernels' built-in distance, then none)")
    p.add_argument("--no-quiet", action="store_true", help="do not wait for the rest of the machine to be idle")
    p.add_argument("--json", help="results file (default benchmarks/results/kernels-<time>.json)")
    a = p.parse_args(argv)
    if a.level:
        K.set_simd_level(a.level)
    threads = [int(t) for t in a.threads.split(",")]
    def parse_shapes(text, default):
        if text == "none":
            return []
        return [tuple(int(v) for v in s.split("x")) for s in text.split(",")] if text else default
    shapes = parse_shapes(a.shapes, SHAPES)
    type_shapes = parse_shapes(a.type_shapes, TYPE_SHAPES)
    types = [] if a.types == "none" else sorted(a.types.split(","), key=lambda t: t != "q40")
    for t in types:
        if t not in K.PACKED_TYPES:
            p.error(f"--types: unknown type {t!r} (known: {', '.join(K.PACKED_TYPES)})")
    try:
        distances = [int(d) for d in a.prefetch.split(",")]
        for d in distances:
            K.set_prefetch(d)
    except ValueError as e:
        p.error(f"--prefetch {a.prefetch}: expected bytes from 0 to 65536, comma-separated ({e})")
    K.set_prefetch(distances[0])
    quiet = Quiet(enabled=not a.no_quiet)
    info = machine_info(bandwidth_threads=())      # measured below, over 1 GiB with quiet waits
    print(machine_header(info) + f"; medians of {a.reps} repetitions", flush=True)

    # ---- memory read bandwidth: streaming sum over 1 GiB
    x = _ARENA.empty(2**30).view(np.float32)
    x[:] = 1.0
    bandwidth = {}
    for th in threads:
        K.stream_sum(x, th)
    for rep in range(a.reps):
        for th in threads:
            quiet.wait()
            t = time.perf_counter()
            K.stream_sum(x, th)
            bandwidth.setdefault(th, []).append(x.nbytes / (time.perf_counter() - t) / 1e9)
    del x
    bw = {th: median(v) for th, v in bandwidth.items()}
    print("memory read bandwidth (1 GiB streaming sum): " + ", ".join(f"{bw[t]:.1f} GB/s at {t} thread(s)" for t in threads),
          flush=True)

    blas_ok = blas_set_threads(1)
    rows_out = []
    for si, (rows, cols) in enumerate(shapes):
        nb = cols // 32
        blocks = random_q40(rows, cols, si)
        # in the runtime's huge-page arena, as a loaded model's matrices are (tpllama.matrix)
        copies = [K.pack("q40", blocks, _ARENA.empty(K.packed_bytes("q40", rows, nb)))
                  for _ in range(max(2, -(-COLD_BYTES // K.packed_bytes("q40", rows, nb))))]
        packed = copies[0]
        del blocks
        rng = np.random.default_rng(100 + si)
        x1 = K.quantize_q80(rng.standard_normal((1, cols), dtype=np.float32))
        x64 = K.quantize_q80(rng.standard_normal((64, cols), dtype=np.float32))
        y1 = np.empty((1, rows), np.float32)
        y64 = np.empty((64, rows), np.float32)
        w32 = [rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(0.02)
               for _ in range(max(2, -(-COLD_BYTES // (rows * cols * 4))))]
        xf = rng.standard_normal(cols, dtype=np.float32)
        y1d = np.empty((1, rows), np.float64)
        res = {th: {"prefill": [], "numpy": [], "by_prefetch": {d: {"f32": [], "f64": []} for d in distances}}
               for th in threads}
        for th in threads:   # warm up: page in, start the threads
            K.matmul_packed("q40", packed, rows, nb, x64, y64, th)
        for rep in range(a.reps):
            for th in threads:
                quiet.wait()
                for d in distances if rep % 2 == 0 else distances[::-1]:   # alternated, each first in turn
                    K.set_prefetch(d)
                    for sums, y in (("f32", y1), ("f64", y1d)):
                        t = time.perf_counter()
                        for c in copies:
                            K.matmul_packed("q40", c, rows, nb, x1, y, th)
                        res[th]["by_prefetch"][d][sums].append((time.perf_counter() - t) / len(copies))
                K.set_prefetch(distances[0])
                t = time.perf_counter()
                K.matmul_packed("q40", copies[rep % len(copies)], rows, nb, x64, y64, th)
                res[th]["prefill"].append(time.perf_counter() - t)
                blas_set_threads(th)
                t = time.perf_counter()
                for w in w32:
                    w @ xf
                res[th]["numpy"].append((time.perf_counter() - t) / len(w32))
                blas_set_threads(1)
        for th in threads:
            pre, npy = median(res[th]["prefill"]), median(res[th]["numpy"])
            dec = median(res[th]["by_prefetch"][distances[0]]["f32"])   # the main table: the first distance
            rows_out.append({
                "rows": rows, "cols": cols, "threads": th, "weight_bytes": packed.nbytes,
                "decode_ms": 1e3 * dec, "decode_GBps": packed.nbytes / dec / 1e9,
                "bandwidth_GBps": bw[th], "decode_fraction_of_bandwidth": packed.nbytes / dec / 1e9 / bw[th],
                "numpy_f32_ms": 1e3 * npy, "numpy_f32_GBps": rows * cols * 4 / npy / 1e9, "speedup_vs_numpy": npy / dec,
                "prefill64_ms": 1e3 * pre, "prefill64_GFLOPs": 2 * rows * cols * 64 / pre / 1e9,
                "prefill64_vs_decode_x64": 64 * dec / pre,
                "decode_GBps_by_prefetch": {str(d): {k: packed.nbytes / median(v) / 1e9 for k, v in by.items()}
                                            for d, by in res[th]["by_prefetch"].items()},
            })
        del copies, w32

    hdr = "" if not rows_out else (f"{'matrix':>12} {'thr':>3} | {'decode ms':>9} {'GB/s':>6} {'bw GB/s':>7} {'% bw':>5} | "
           f"{'numpy f32 ms':>12} {'GB/s':>6} {'speedup':>7} | {'pp64 ms':>8} {'GFLOP/s':>8} {'vs 64 dec':>9}")
    if hdr:
        print(hdr)
        print("-" * len(hdr))
    for r in rows_out:
        print(f"{r['rows']:>6}x{r['cols']:<5} {r['threads']:>3} | {r['decode_ms']:9.3f} {r['decode_GBps']:6.1f} "
              f"{r['bandwidth_GBps']:7.1f} {100 * r['decode_fraction_of_bandwidth']:4.0f}% | {r['numpy_f32_ms']:12.3f} "
              f"{r['numpy_f32_GBps']:6.1f} {r['speedup_vs_numpy']:6.1f}x | {r['prefill64_ms']:8.2f} "
              f"{r['prefill64_GFLOPs']:8.1f} {r['prefill64_vs_decode_x64']:8.1f}x")
    if rows_out:
        print_by_prefetch(rows_out, distances)
    type_rows = per_type(types, type_shapes, threads, a.reps, quiet) if types and type_shapes else []
    if type_rows:
        print("\nper weight type (decode GB/s of the packed bytes; 'vs q40': that bandwidth over q40's):")
        print_types(type_rows)
    notes = []
    if not blas_ok:
        notes.append("numpy's BLAS thread count could not be set: its column uses its default threads")
    if quiet.noisy:
        notes.append(f"{quiet.noisy} repetitions started while other processes kept the machine busy")
    for n in notes:
        print("# note:", n)
    out = write_results("kernels", {"machine": info, "simd": K.simd_level(), "reps": a.reps,
                                    "bandwidth_GBps": {str(k): v for k, v in bw.items()},
                                    "bandwidth_samples": {str(k): v for k, v in bandwidth.items()},
                                    "results": rows_out, "types": type_rows, "notes": notes,
                                    "quiet_wait_s": quiet.waited}, a.json)
    print(f"# wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

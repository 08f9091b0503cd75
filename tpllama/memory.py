"""Memory that becomes resident only where it is written."""
from __future__ import annotations

import mmap
from typing import Optional

import numpy as np


def advise(mapping: mmap.mmap, advice: str, start: int, end: int) -> None:
    """madvise(mmap.<advice>) on the pages covering bytes start..end of a mapping; nothing where
    the platform lacks that advice or refuses it (a hint, never an error)."""
    flag = getattr(mmap, advice, None)
    if flag is None:
        return
    page = mmap.PAGESIZE
    lo = start // page * page
    hi = min(len(mapping), -(-end // page) * page)
    try:
        mapping.madvise(flag, lo, hi - lo)
    except (OSError, ValueError):
        pass


def proc_kib_field(path: str, field: str) -> Optional[int]:
    """Bytes of a "Field:   N kB" line of a Linux /proc file; None where there is none."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_bytes() -> int:
    """Memory this host can give without swapping: the kernel's MemAvailable (what psutil reports
    too, read here directly: importing psutil costs a start about 40 ms); psutil elsewhere."""
    available = proc_kib_field("/proc/meminfo", "MemAvailable")
    if available is not None:
        return available
    import psutil
    return int(psutil.virtual_memory().available)


def lazy_zeros(shape, dtype=np.float32) -> np.ndarray:
    """Zeros whose pages are allocated on first write, 4 KiB at a time.

    np.zeros is lazy too, but with transparent huge pages one write into a 2 MiB region
    makes all of it resident: a KV cache sized for the whole context (rows of 2 MiB per
    layer and head) would then be resident after the first token."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if nbytes == 0:
        return np.zeros(shape, dtype)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        buf.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(buf, dtype=dtype).reshape(shape)   # the array keeps the mapping alive

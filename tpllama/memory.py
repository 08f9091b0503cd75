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


def lazy_zeros(shape, dtype=np.float32, huge_pages: bool = False) -> np.ndarray:
    """Zeros whose pages are allocated on first write: 4 KiB at a time, or with huge_pages 2 MiB at
    a time where the kernel gives transparent huge pages.

    np.zeros is lazy too, but numpy asks for huge pages for large arrays, and then one write into
    a 2 MiB region makes all of it resident. Huge pages suit an array that fills from its front (resident memory
    then follows what is written) and is read through end to end (a TLB miss per 2 MiB instead of
    per 4 KiB: the KV cache's blocked layout, tpllama.model.KVCache)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if nbytes == 0:
        return np.zeros(shape, dtype)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    advise(buf, "MADV_HUGEPAGE" if huge_pages else "MADV_NOHUGEPAGE", 0, nbytes)
    return np.frombuffer(buf, dtype=dtype).reshape(shape)   # the array keeps the mapping alive

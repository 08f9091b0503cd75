# cython: language_level=3, boundscheck=False, wraparound=False
"""Thin Python face of the C kernels in tpk.c (see tpk.h for the block formats).

Arrays of blocks are uint8 numpy arrays of shape (rows, n_blocks * block_bytes).
Every function releases the GIL around the C call.
"""
import numpy as np
cimport numpy as cnp
from libc.stdint cimport int64_t, uint8_t, uint16_t

cnp.import_array()

cdef extern from "tpk.h":
    int TPK_QK
    int TPK_Q40_BYTES
    int TPK_Q80_BYTES
    int TPK_SCALAR, TPK_AVX2, TPK_AVX512, TPK_NEON, TPK_NEON_DOTPROD
    ctypedef struct tpk_block_q40:
        pass
    ctypedef struct tpk_block_q80:
        pass
    int tpk_detect_level() nogil
    int tpk_get_level() nogil
    int tpk_set_level(int level) nogil
    int tpk_has_openmp() nogil
    void tpk_quantize_q80(const float *x, tpk_block_q80 *y, int64_t n) nogil
    void tpk_quantize_q40(const float *x, tpk_block_q40 *y, int64_t n) nogil
    void tpk_dequantize_q80(const tpk_block_q80 *x, float *y, int64_t n) nogil
    void tpk_dequantize_q40(const tpk_block_q40 *x, float *y, int64_t n) nogil
    void tpk_matmul_q40_q80(const tpk_block_q40 *w, int64_t rows, int64_t nb,
                            const tpk_block_q80 *x, int64_t ntok, float *y, int64_t ldy, int nthreads) nogil
    void tpk_matmul_q80_q80(const tpk_block_q80 *w, int64_t rows, int64_t nb,
                            const tpk_block_q80 *x, int64_t ntok, float *y, int64_t ldy, int nthreads) nogil
    void tpk_matmul_q40_q80_f64(const tpk_block_q40 *w, int64_t rows, int64_t nb,
                                const tpk_block_q80 *x, int64_t ntok, double *y, int64_t ldy, int nthreads) nogil
    void tpk_matmul_q80_q80_f64(const tpk_block_q80 *w, int64_t rows, int64_t nb,
                                const tpk_block_q80 *x, int64_t ntok, double *y, int64_t ldy, int nthreads) nogil

QK = TPK_QK
Q40_BYTES = TPK_Q40_BYTES
Q80_BYTES = TPK_Q80_BYTES

LEVEL_NAMES = {TPK_SCALAR: "scalar", TPK_AVX2: "avx2", TPK_AVX512: "avx512",
               TPK_NEON: "neon", TPK_NEON_DOTPROD: "neon-dotprod"}


def simd_level():
    """Name of the SIMD code path in use."""
    return LEVEL_NAMES[tpk_get_level()]


def best_simd_level():
    return LEVEL_NAMES[tpk_detect_level()]


def set_simd_level(str name):
    """Force a code path ("scalar" or the best one); for tests. Raises if unsupported."""
    for level, level_name in LEVEL_NAMES.items():
        if level_name == name and tpk_set_level(level) == level:
            return
    raise ValueError(f"SIMD level {name!r} is not supported on this CPU (best: {best_simd_level()})")


def has_openmp():
    return bool(tpk_has_openmp())


cdef int64_t _blocks(int64_t n) except -1:
    if n % TPK_QK:
        raise ValueError(f"row length {n} is not a multiple of {TPK_QK}")
    return n // TPK_QK


def quantize_q80(const float[:, ::1] x):
    """float32 (rows, n) -> q80 blocks (rows, n/32*34), bit-identical to GGML Q8_0."""
    cdef int64_t rows = x.shape[0], n = x.shape[1], nb = _blocks(n), r
    out = np.empty((rows, nb * TPK_Q80_BYTES), dtype=np.uint8)
    cdef uint8_t[:, ::1] o = out
    if rows and nb:
        with nogil:
            for r in range(rows):
                tpk_quantize_q80(&x[r, 0], <tpk_block_q80 *>&o[r, 0], n)
    return out


def quantize_q40(const float[:, ::1] x):
    """float32 (rows, n) -> q40 blocks (rows, n/32*18), bit-identical to GGML Q4_0."""
    cdef int64_t rows = x.shape[0], n = x.shape[1], nb = _blocks(n), r
    out = np.empty((rows, nb * TPK_Q40_BYTES), dtype=np.uint8)
    cdef uint8_t[:, ::1] o = out
    if rows and nb:
        with nogil:
            for r in range(rows):
                tpk_quantize_q40(&x[r, 0], <tpk_block_q40 *>&o[r, 0], n)
    return out


def dequantize_q80(const uint8_t[:, ::1] q):
    cdef int64_t rows = q.shape[0], nb = q.shape[1] // TPK_Q80_BYTES, r
    out = np.empty((rows, nb * TPK_QK), dtype=np.float32)
    cdef float[:, ::1] o = out
    if rows and nb:
        with nogil:
            for r in range(rows):
                tpk_dequantize_q80(<const tpk_block_q80 *>&q[r, 0], &o[r, 0], nb * TPK_QK)
    return out


def dequantize_q40(const uint8_t[:, ::1] q):
    cdef int64_t rows = q.shape[0], nb = q.shape[1] // TPK_Q40_BYTES, r
    out = np.empty((rows, nb * TPK_QK), dtype=np.float32)
    cdef float[:, ::1] o = out
    if rows and nb:
        with nogil:
            for r in range(rows):
                tpk_dequantize_q40(<const tpk_block_q40 *>&q[r, 0], &o[r, 0], nb * TPK_QK)
    return out


def matmul_q40_q80(const uint8_t[:, ::1] w, const uint8_t[:, ::1] xq, float[:, ::1] out, int nthreads=1):
    """out[t, r] = dot(w[r], xq[t]): w (rows, nb*18) q40, xq (ntok, nb*34) q80, out (ntok, rows) float32."""
    cdef int64_t rows = w.shape[0], nb = w.shape[1] // TPK_Q40_BYTES, ntok = xq.shape[0]
    if xq.shape[1] != nb * TPK_Q80_BYTES or out.shape[0] != ntok or out.shape[1] != rows:
        raise ValueError("matmul_q40_q80: shapes do not match")
    if rows and ntok:
        with nogil:
            tpk_matmul_q40_q80(<const tpk_block_q40 *>&w[0, 0], rows, nb, <const tpk_block_q80 *>&xq[0, 0],
                               ntok, &out[0, 0], out.shape[1], nthreads)
    return out


def matmul_q80_q80(const uint8_t[:, ::1] w, const uint8_t[:, ::1] xq, float[:, ::1] out, int nthreads=1):
    """out[t, r] = dot(w[r], xq[t]): w (rows, nb*34) q80, xq (ntok, nb*34) q80, out (ntok, rows) float32."""
    cdef int64_t rows = w.shape[0], nb = w.shape[1] // TPK_Q80_BYTES, ntok = xq.shape[0]
    if xq.shape[1] != nb * TPK_Q80_BYTES or out.shape[0] != ntok or out.shape[1] != rows:
        raise ValueError("matmul_q80_q80: shapes do not match")
    if rows and ntok:
        with nogil:
            tpk_matmul_q80_q80(<const tpk_block_q80 *>&w[0, 0], rows, nb, <const tpk_block_q80 *>&xq[0, 0],
                               ntok, &out[0, 0], out.shape[1], nthreads)
    return out


def matmul_q40_q80_f64(const uint8_t[:, ::1] w, const uint8_t[:, ::1] xq, double[:, ::1] out, int nthreads=1):
    """As matmul_q40_q80, rows accumulated in float64 (partial sums for an exact all-reduce)."""
    cdef int64_t rows = w.shape[0], nb = w.shape[1] // TPK_Q40_BYTES, ntok = xq.shape[0]
    if xq.shape[1] != nb * TPK_Q80_BYTES or out.shape[0] != ntok or out.shape[1] != rows:
        raise ValueError("matmul_q40_q80_f64: shapes do not match")
    if rows and ntok:
        with nogil:
            tpk_matmul_q40_q80_f64(<const tpk_block_q40 *>&w[0, 0], rows, nb, <const tpk_block_q80 *>&xq[0, 0],
                                   ntok, &out[0, 0], out.shape[1], nthreads)
    return out


def matmul_q80_q80_f64(const uint8_t[:, ::1] w, const uint8_t[:, ::1] xq, double[:, ::1] out, int nthreads=1):
    """As matmul_q80_q80, rows accumulated in float64."""
    cdef int64_t rows = w.shape[0], nb = w.shape[1] // TPK_Q80_BYTES, ntok = xq.shape[0]
    if xq.shape[1] != nb * TPK_Q80_BYTES or out.shape[0] != ntok or out.shape[1] != rows:
        raise ValueError("matmul_q80_q80_f64: shapes do not match")
    if rows and ntok:
        with nogil:
            tpk_matmul_q80_q80_f64(<const tpk_block_q80 *>&w[0, 0], rows, nb, <const tpk_block_q80 *>&xq[0, 0],
                                   ntok, &out[0, 0], out.shape[1], nthreads)
    return out

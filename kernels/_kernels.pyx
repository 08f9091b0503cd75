# cython: language_level=3, boundscheck=False, wraparound=False
"""Thin Python face of the C kernels in tpk.c (see tpk.h for the block formats).

Arrays of GGML blocks are uint8 numpy arrays of shape (rows, n_blocks * block_bytes);
packed matrices (the runtime layout, see tpk.h) are flat uint8 arrays made by pack_q40 /
pack_q80. Every function releases the GIL around the C call.
"""
import numpy as np
cimport numpy as cnp
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t
from libc.stdlib cimport free, malloc

cnp.import_array()

cdef extern from "tpk.h":
    int TPK_QK
    int TPK_Q40_BYTES
    int TPK_Q80_BYTES
    int TPK_ROWS
    int TPK_KV_BLOCK
    int TPK_SCALAR, TPK_AVX2, TPK_AVX512, TPK_AVX512_VNNI, TPK_NEON, TPK_NEON_DOTPROD
    ctypedef struct tpk_block_q40:
        pass
    ctypedef struct tpk_block_q80:
        pass
    int tpk_detect_level() nogil
    int tpk_level_supported(int level) nogil
    int tpk_get_level() nogil
    int tpk_set_level(int level) nogil
    int tpk_has_openmp() nogil
    int tpk_set_prefetch(int bytes) nogil
    int tpk_get_prefetch() nogil
    void tpk_quantize_q80(const float *x, tpk_block_q80 *y, int64_t n) nogil
    void tpk_quantize_q40(const float *x, tpk_block_q40 *y, int64_t n) nogil
    void tpk_dequantize_q80(const tpk_block_q80 *x, float *y, int64_t n) nogil
    void tpk_dequantize_q40(const tpk_block_q40 *x, float *y, int64_t n) nogil
    int64_t tpk_packed_bytes_q40(int64_t rows, int64_t nb) nogil
    int64_t tpk_packed_bytes_q80(int64_t rows, int64_t nb) nogil
    void tpk_pack_q40(const uint8_t *w, int64_t row_stride, int64_t rows, int64_t nb, uint8_t *dst) nogil
    void tpk_pack_q80(const uint8_t *w, int64_t row_stride, int64_t rows, int64_t nb, uint8_t *dst) nogil
    void tpk_unpack_q40(const uint8_t *src, int64_t rows, int64_t nb, tpk_block_q40 *w) nogil
    void tpk_unpack_q80(const uint8_t *src, int64_t rows, int64_t nb, tpk_block_q80 *w) nogil
    void tpk_matmul_q40p(const uint8_t *wp, int64_t rows, int64_t nb,
                         const tpk_block_q80 *x, int64_t ntok, float *y, int64_t ldy, int nthreads) nogil
    void tpk_matmul_q80p(const uint8_t *wp, int64_t rows, int64_t nb,
                         const tpk_block_q80 *x, int64_t ntok, float *y, int64_t ldy, int nthreads) nogil
    void tpk_matmul_q40p_f64(const uint8_t *wp, int64_t rows, int64_t nb,
                             const tpk_block_q80 *x, int64_t ntok, double *y, int64_t ldy, int nthreads) nogil
    void tpk_matmul_q80p_f64(const uint8_t *wp, int64_t rows, int64_t nb,
                             const tpk_block_q80 *x, int64_t ntok, double *y, int64_t ldy, int nthreads) nogil
    void tpk_matmul_q40p_many(int n, const uint8_t *const *wp, const int64_t *rows, int64_t nb,
                              const tpk_block_q80 *x, int64_t ntok, float *const *y, const int64_t *ldy, int nthreads) nogil
    void tpk_matmul_q80p_many(int n, const uint8_t *const *wp, const int64_t *rows, int64_t nb,
                              const tpk_block_q80 *x, int64_t ntok, float *const *y, const int64_t *ldy, int nthreads) nogil
    void tpk_matmul_q40_q80_ref(const tpk_block_q40 *w, int64_t rows, int64_t nb,
                                const tpk_block_q80 *x, int64_t ntok, float *y, int64_t ldy) nogil
    void tpk_matmul_q80_q80_ref(const tpk_block_q80 *w, int64_t rows, int64_t nb,
                                const tpk_block_q80 *x, int64_t ntok, float *y, int64_t ldy) nogil
    void tpk_matmul_q40_q80_f64_ref(const tpk_block_q40 *w, int64_t rows, int64_t nb,
                                    const tpk_block_q80 *x, int64_t ntok, double *y, int64_t ldy) nogil
    void tpk_matmul_q80_q80_f64_ref(const tpk_block_q80 *w, int64_t rows, int64_t nb,
                                    const tpk_block_q80 *x, int64_t ntok, double *y, int64_t ldy) nogil
    int tpk_ggml_block(int type, int *block_bytes) nogil
    int64_t tpk_packed_bytes(int type, int64_t rows, int64_t nb) nogil
    int tpk_pack_ggml(int type, const uint8_t *w, int64_t row_stride, int64_t rows, int64_t first, int64_t nb,
                      uint8_t *dst) nogil
    void tpk_dequantize_packed(int type, const uint8_t *wp, int64_t rows, int64_t nb, float *y) nogil
    void tpk_matmul_packed(int type, const uint8_t *wp, int64_t rows, int64_t nb, const tpk_block_q80 *x,
                           int64_t ntok, void *y, int64_t ldy, int f64, int nthreads) nogil
    void tpk_matmul_packed_many(int type, int n, const uint8_t *const *wp, const int64_t *rows, int64_t nb,
                                const tpk_block_q80 *x, int64_t ntok, float *const *y, const int64_t *ldy,
                                int nthreads) nogil
    double tpk_stream_sum(const float *x, int64_t n, int nthreads) nogil
    void tpk_rmsnorm(const float *x, const float *w, float *y, int64_t T, int64_t n, float eps, int nthreads) nogil
    void tpk_rope(float *x, int64_t T, int64_t heads, int64_t hd, const float *cos_t, const float *sin_t) nogil
    void tpk_silu_mul(const float *g, const float *u, float *out, int64_t n, int nthreads) nogil
    void tpk_attention(const float *q, const float *k, const float *v, int64_t T, int64_t n_heads, int64_t n_kv,
                       int64_t hd, const int32_t *kv_of_head, void *kcache, void *vcache, int cache_f16,
                       int64_t head_stride, int64_t block_stride, int64_t start, int64_t window, float scale,
                       float *out, int nthreads) nogil
    void tpk_widen_f16(const uint16_t *h, int64_t n, float *y) nogil
    void tpk_narrow_f16(const float *x, int64_t n, uint16_t *h) nogil

QK = TPK_QK
KV_BLOCK = TPK_KV_BLOCK   # positions a block of the runtime's KV cache layout
Q40_BYTES = TPK_Q40_BYTES
Q80_BYTES = TPK_Q80_BYTES
ROWS = TPK_ROWS   # rows interleaved in the packed layout

LEVEL_NAMES = {TPK_SCALAR: "scalar", TPK_AVX2: "avx2", TPK_AVX512: "avx512", TPK_AVX512_VNNI: "avx512-vnni",
               TPK_NEON: "neon", TPK_NEON_DOTPROD: "neon-dotprod"}


def simd_level():
    """Name of the SIMD code path in use."""
    return LEVEL_NAMES[tpk_get_level()]


def best_simd_level():
    return LEVEL_NAMES[tpk_detect_level()]


def supported_simd_levels():
    """Every code path this build can run on this CPU, scalar first."""
    return [name for level, name in LEVEL_NAMES.items() if tpk_level_supported(level)]


def set_simd_level(str name):
    """Force a code path (one of supported_simd_levels()); for tests. Raises if unsupported."""
    for level, level_name in LEVEL_NAMES.items():
        if level_name == name and tpk_set_level(level) == level:
            return
    raise ValueError(f"SIMD level {name!r} is not supported here (supported: {', '.join(supported_simd_levels())})")


def set_prefetch(int nbytes):
    """How far ahead (bytes) the SIMD matmul kernels ask for weights that stream from memory;
    0: none (the hardware prefetcher alone). Process-wide. Raises if outside 0..65536."""
    if tpk_set_prefetch(nbytes) < 0:
        raise ValueError(f"prefetch distance {nbytes} is outside 0..65536 bytes")


def prefetch():
    """The matmul kernels' prefetch distance in bytes (0: none)."""
    return tpk_get_prefetch()


def has_openmp():
    return bool(tpk_has_openmp())


cdef int64_t _blocks(int64_t n) except -1:
    if n % TPK_QK:
        raise ValueError(f"row length {n} is not a multiple of {TPK_QK}")
    return n // TPK_QK


# The hot per-step wrappers take numpy arrays and read their pointers after these checks
# (typed memoryviews cost about 0.6 us an argument: 1.8 of an rmsnorm's 2.2 us, some 0.7 ms of a
# SmolLM2 decode step).
_DTYPE_NAMES = {cnp.NPY_FLOAT32: "float32", cnp.NPY_FLOAT64: "float64", cnp.NPY_UINT8: "uint8",
                cnp.NPY_INT32: "int32", cnp.NPY_FLOAT16: "float16", cnp.NPY_UINT16: "uint16"}


cdef cnp.ndarray _arr(obj, int typenum, int ndim, str what, bint writable=False):
    """obj as a C-contiguous ndarray of that type and dimension count (writable if asked), or ValueError."""
    if (not isinstance(obj, np.ndarray) or cnp.PyArray_TYPE(<cnp.ndarray>obj) != typenum
            or cnp.PyArray_NDIM(<cnp.ndarray>obj) != ndim or not cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>obj)):
        raise ValueError(f"{what} must be a C-contiguous {ndim}-d {_DTYPE_NAMES[typenum]} array")
    if writable and not cnp.PyArray_ISWRITEABLE(<cnp.ndarray>obj):
        raise ValueError(f"{what} must be writable")
    return <cnp.ndarray>obj


cdef inline int64_t _dim(cnp.ndarray a, int i):
    return cnp.PyArray_DIM(a, i)


cdef inline cnp.ndarray _empty2(int64_t rows, int64_t cols, int typenum):
    cdef cnp.npy_intp dims[2]
    dims[0] = rows
    dims[1] = cols
    return cnp.PyArray_EMPTY(2, dims, typenum, 0)


def quantize_q80(x_array):
    """float32 (rows, n) -> q80 blocks (rows, n/32*34), bit-identical to GGML Q8_0."""
    cdef cnp.ndarray x = _arr(x_array, cnp.NPY_FLOAT32, 2, "quantize_q80: x")
    cdef int64_t rows = _dim(x, 0), n = _dim(x, 1), nb = _blocks(n), r
    cdef cnp.ndarray out = _empty2(rows, nb * TPK_Q80_BYTES, cnp.NPY_UINT8)
    cdef const float *xp = <const float *>cnp.PyArray_DATA(x)
    cdef uint8_t *op = <uint8_t *>cnp.PyArray_DATA(out)
    if rows and nb:
        with nogil:
            for r in range(rows):
                tpk_quantize_q80(xp + r * n, <tpk_block_q80 *>(op + r * nb * TPK_Q80_BYTES), n)
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



def aligned_bytes(int64_t n):
    """A flat uint8 array of n bytes starting on a 64-byte boundary (one cache line)."""
    raw = np.empty(n + 64, dtype=np.uint8)
    off = (-raw.ctypes.data) % 64
    return raw[off:off + n]


# tpllama's names of the packed weight types (tpk.h's TPK_T_* ids)
TYPE_IDS = {"q40": 0, "q80": 1, "q41": 2, "q50": 3, "q4k": 4, "q5k": 5, "q6k": 6}
PACKED_TYPES = tuple(TYPE_IDS)


cdef int _type_id(str wtype) except -1:
    t = TYPE_IDS.get(wtype)
    if t is None:
        raise ValueError(f"unknown packed weight type {wtype!r} (known: {', '.join(TYPE_IDS)})")
    return t


def ggml_block(str wtype):
    """(values, bytes) of one GGML block of the file type that `wtype` runs."""
    cdef int bb = 0
    cdef int values = tpk_ggml_block(_type_id(wtype), &bb)
    return values, bb


def packed_bytes(str wtype, int64_t rows, int64_t nb):
    """Bytes of a packed (rows x nb*32) matrix of `wtype` (rows padded to 16)."""
    return tpk_packed_bytes(_type_id(wtype), rows, nb)


def pack_ggml(str wtype, const uint8_t[:, :] blocks, int64_t first_col, int64_t n_cols, out=None):
    """GGML blocks (rows, nblocks*block_bytes) of the file type `wtype` runs (rows may be
    strided) -> flat packed array of the n_cols columns starting first_col values into those
    blocks (both multiples of 32), every value unchanged; written into `out` when given."""
    cdef int t = _type_id(wtype), bb = 0, bv
    cdef int64_t rows = blocks.shape[0], stride = blocks.strides[0], nb, have
    bv = tpk_ggml_block(t, &bb)
    if blocks.shape[1] % bb:
        raise ValueError(f"row of {blocks.shape[1]} bytes is not whole {wtype} blocks of {bb} bytes")
    if first_col < 0 or n_cols < 0 or first_col % TPK_QK or n_cols % TPK_QK:
        raise ValueError(f"columns {first_col}..{first_col + n_cols} do not start and end at multiples of {TPK_QK}")
    have = blocks.shape[1] // bb * bv
    if first_col + n_cols > have:
        raise ValueError(f"columns {first_col}..{first_col + n_cols} are beyond the {have} values the blocks hold")
    if rows > 1 and blocks.shape[1] > 1 and blocks.strides[1] != 1:
        raise ValueError("pack_ggml: the bytes of a row must be contiguous")
    nb = n_cols // TPK_QK
    if out is None:
        out = aligned_bytes(tpk_packed_bytes(t, rows, nb))
    elif out.shape != (tpk_packed_bytes(t, rows, nb),):
        raise ValueError("pack_ggml: output array has the wrong size")
    cdef uint8_t[::1] o = out
    if rows and nb:
        with nogil:
            tpk_pack_ggml(t, &blocks[0, 0], stride, rows, first_col // TPK_QK, nb, &o[0])
    return out


def dequantize_packed(str wtype, const uint8_t[::1] packed, int64_t rows, int64_t nb):
    """Packed matrix -> float32 (rows, nb*32): the values, computed as gguf-py computes them."""
    cdef int t = _type_id(wtype)
    if packed.shape[0] != tpk_packed_bytes(t, rows, nb):
        raise ValueError("dequantize_packed: size does not match rows and blocks")
    out = np.empty((rows, nb * TPK_QK), dtype=np.float32)
    cdef float[:, ::1] o = out
    if rows and nb:
        with nogil:
            tpk_dequantize_packed(t, &packed[0], rows, nb, &o[0, 0])
    return out


def pack(str wtype, const uint8_t[:, :] blocks, out=None):
    """GGML blocks (rows, nb*block_bytes), rows may be strided -> flat packed array (see tpk.h),
    written into `out` (flat uint8 of packed_bytes()) when given."""
    cdef int64_t rows = blocks.shape[0], bb, nb, stride
    bb = TPK_Q40_BYTES if wtype == "q40" else TPK_Q80_BYTES
    if wtype not in ("q40", "q80"):
        raise ValueError(wtype)
    if blocks.shape[1] % bb:
        raise ValueError(f"row of {blocks.shape[1]} bytes is not whole {wtype} blocks")
    nb = blocks.shape[1] // bb
    if rows > 1 and nb and blocks.strides[1] != 1:
        raise ValueError("pack: the bytes of a row must be contiguous")
    if out is None:
        out = aligned_bytes(packed_bytes(wtype, rows, nb))
    elif out.shape != (packed_bytes(wtype, rows, nb),):
        raise ValueError("pack: output array has the wrong size")
    cdef uint8_t[::1] o = out
    stride = blocks.strides[0]
    if rows and nb:
        with nogil:
            if wtype == "q40":
                tpk_pack_q40(&blocks[0, 0], stride, rows, nb, &o[0])
            else:
                tpk_pack_q80(&blocks[0, 0], stride, rows, nb, &o[0])
    return out


def unpack(str wtype, const uint8_t[::1] packed, int64_t rows, int64_t nb):
    """Packed array -> GGML blocks (rows, nb*block_bytes), byte-identical to what was packed."""
    bb = TPK_Q40_BYTES if wtype == "q40" else TPK_Q80_BYTES
    if packed.shape[0] != packed_bytes(wtype, rows, nb):
        raise ValueError("unpack: size does not match rows and blocks")
    out = np.empty((rows, nb * bb), dtype=np.uint8)
    cdef uint8_t[:, ::1] o = out
    if rows and nb:
        with nogil:
            if wtype == "q40":
                tpk_unpack_q40(&packed[0], rows, nb, <tpk_block_q40 *>&o[0, 0])
            else:
                tpk_unpack_q80(&packed[0], rows, nb, <tpk_block_q80 *>&o[0, 0])
    return out


def matmul_packed(str wtype, wp_array, int64_t rows, int64_t nb, xq_array, out_array, int nthreads=1):
    """out[t, r] = dot(w row r, xq row t): wp packed (rows x nb blocks of 32), xq (ntok, nb*34) q80,
    out (ntok, >= rows), row stride out.shape[1]: float32, or float64 for rows accumulated in
    float64 (row-parallel partial sums). Returns out."""
    cdef int t = _type_id(wtype)
    cdef cnp.ndarray wp = _arr(wp_array, cnp.NPY_UINT8, 1, "matmul_packed: weights")
    cdef cnp.ndarray xq = _arr(xq_array, cnp.NPY_UINT8, 2, "matmul_packed: activations")
    cdef bint f64 = isinstance(out_array, np.ndarray) and cnp.PyArray_TYPE(<cnp.ndarray>out_array) == cnp.NPY_FLOAT64
    cdef cnp.ndarray out = _arr(out_array, cnp.NPY_FLOAT64 if f64 else cnp.NPY_FLOAT32, 2, "matmul_packed: out",
                                writable=True)
    cdef int64_t ntok = _dim(xq, 0), ldy = _dim(out, 1)
    if _dim(wp, 0) != tpk_packed_bytes(t, rows, nb):
        raise ValueError("matmul_packed: weights do not match rows and blocks")
    if _dim(xq, 1) != nb * TPK_Q80_BYTES or _dim(out, 0) != ntok or ldy < rows:
        raise ValueError("matmul_packed: shapes do not match")
    cdef const uint8_t *w = <const uint8_t *>cnp.PyArray_DATA(wp)
    cdef const tpk_block_q80 *x = <const tpk_block_q80 *>cnp.PyArray_DATA(xq)
    cdef void *y = cnp.PyArray_DATA(out)
    if rows and ntok:
        with nogil:
            tpk_matmul_packed(t, w if nb else NULL, rows, nb, x if nb else NULL, ntok, y, ldy, f64, nthreads)
    return out_array


DEF MAX_MANY = 8


def matmul_packed_many(str wtype, list weights, list rows_list, int64_t nb, xq_array, list outs, int nthreads=1):
    """matmul_packed for up to 8 matrices of the same type and input width reading the same xq,
    in one parallel region. weights[i]: packed, rows_list[i]: its rows, outs[i]: (ntok, >= rows)."""
    cdef int n = len(weights), i
    cdef const uint8_t *wp[MAX_MANY]
    cdef int64_t rows[MAX_MANY]
    cdef int64_t ldy[MAX_MANY]
    cdef float *y[MAX_MANY]
    cdef cnp.ndarray w, o
    cdef int t = _type_id(wtype)
    cdef cnp.ndarray xq = _arr(xq_array, cnp.NPY_UINT8, 2, "matmul_packed_many: activations")
    cdef int64_t ntok = _dim(xq, 0)
    if n > MAX_MANY or len(rows_list) != n or len(outs) != n:
        raise ValueError("matmul_packed_many: up to 8 matrices, with as many row counts and outputs")
    if _dim(xq, 1) != nb * TPK_Q80_BYTES:
        raise ValueError("matmul_packed_many: activations do not match the input width")
    for i in range(n):
        w = _arr(weights[i], cnp.NPY_UINT8, 1, f"matmul_packed_many: weights {i}")
        o = _arr(outs[i], cnp.NPY_FLOAT32, 2, f"matmul_packed_many: out {i}", writable=True)
        rows[i] = rows_list[i]
        if _dim(w, 0) != tpk_packed_bytes(t, rows[i], nb) or _dim(o, 0) != ntok or _dim(o, 1) < rows[i]:
            raise ValueError(f"matmul_packed_many: matrix {i} does not match")
        wp[i] = <const uint8_t *>cnp.PyArray_DATA(w) if _dim(w, 0) else NULL
        y[i] = <float *>cnp.PyArray_DATA(o) if _dim(o, 0) and _dim(o, 1) else NULL
        ldy[i] = _dim(o, 1)
    if ntok and nb:
        with nogil:
            tpk_matmul_packed_many(t, n, wp, rows, nb, <const tpk_block_q80 *>cnp.PyArray_DATA(xq), ntok, y, ldy,
                                   nthreads)
    elif ntok:
        for i in range(n):
            outs[i][:, :rows[i]] = 0
    return outs


def matmul_ref(str wtype, const uint8_t[:, ::1] w, const uint8_t[:, ::1] xq, out_array):
    """The scalar reference on GGML blocks: w (rows, nb*block_bytes), xq (ntok, nb*34), out (ntok, rows)
    float32, or float64 for rows accumulated in float64."""
    cdef float[:, ::1] out
    cdef double[:, ::1] out64
    cdef int64_t rows = w.shape[0], ntok = xq.shape[0], nb
    cdef bint q40 = wtype == "q40", f64 = out_array.dtype == np.float64
    bb = TPK_Q40_BYTES if q40 else TPK_Q80_BYTES
    nb = w.shape[1] // bb
    if xq.shape[1] != nb * TPK_Q80_BYTES or out_array.shape != (ntok, rows):
        raise ValueError("matmul_ref: shapes do not match")
    if not rows or not ntok:
        return out_array
    if nb == 0:
        out_array[:, :] = 0
        return out_array
    if f64:
        out64 = out_array
        with nogil:
            if q40:
                tpk_matmul_q40_q80_f64_ref(<const tpk_block_q40 *>&w[0, 0], rows, nb, <const tpk_block_q80 *>&xq[0, 0],
                                           ntok, &out64[0, 0], rows)
            else:
                tpk_matmul_q80_q80_f64_ref(<const tpk_block_q80 *>&w[0, 0], rows, nb, <const tpk_block_q80 *>&xq[0, 0],
                                           ntok, &out64[0, 0], rows)
    else:
        out = out_array
        with nogil:
            if q40:
                tpk_matmul_q40_q80_ref(<const tpk_block_q40 *>&w[0, 0], rows, nb, <const tpk_block_q80 *>&xq[0, 0],
                                       ntok, &out[0, 0], rows)
            else:
                tpk_matmul_q80_q80_ref(<const tpk_block_q80 *>&w[0, 0], rows, nb, <const tpk_block_q80 *>&xq[0, 0],
                                       ntok, &out[0, 0], rows)
    return out_array


def stream_sum(const float[::1] x, int nthreads=1):
    """Sum of x read once over nthreads threads (a memory read bandwidth probe)."""
    cdef double s = 0.0
    if x.shape[0]:
        with nogil:
            s = tpk_stream_sum(&x[0], x.shape[0], nthreads)
    return s


# ---------------------------------------------------------------- fused float32 layer steps

def rmsnorm(x_array, w_array, float eps, int nthreads=1):
    """(T, n) -> (T, n) float32: x / sqrt(mean(x^2) + eps) * w."""
    cdef cnp.ndarray x = _arr(x_array, cnp.NPY_FLOAT32, 2, "rmsnorm: x")
    cdef cnp.ndarray w = _arr(w_array, cnp.NPY_FLOAT32, 1, "rmsnorm: weight")
    cdef int64_t T = _dim(x, 0), n = _dim(x, 1)
    if _dim(w, 0) != n:
        raise ValueError("rmsnorm: weight length does not match")
    cdef cnp.ndarray out = _empty2(T, n, cnp.NPY_FLOAT32)
    cdef const float *xp = <const float *>cnp.PyArray_DATA(x)
    cdef const float *wp = <const float *>cnp.PyArray_DATA(w)
    cdef float *op = <float *>cnp.PyArray_DATA(out)
    if T and n:
        with nogil:
            tpk_rmsnorm(xp, wp, op, T, n, eps, nthreads)
    return out


def rope(x_array, int64_t head_dim, cos_array, sin_array):
    """Rotate the interleaved pairs of every head of x (T, heads * head_dim) in place; cos, sin (T, head_dim/2)."""
    cdef cnp.ndarray x = _arr(x_array, cnp.NPY_FLOAT32, 2, "rope: x", writable=True)
    cdef cnp.ndarray cos = _arr(cos_array, cnp.NPY_FLOAT32, 2, "rope: cos")
    cdef cnp.ndarray sin = _arr(sin_array, cnp.NPY_FLOAT32, 2, "rope: sin")
    cdef int64_t T = _dim(x, 0), width = _dim(x, 1)
    if head_dim <= 0 or head_dim % 2 or width % head_dim:
        raise ValueError("rope: width is not whole heads of even size")
    if _dim(cos, 0) != T or _dim(sin, 0) != T or _dim(cos, 1) != head_dim // 2 or _dim(sin, 1) != head_dim // 2:
        raise ValueError("rope: cos/sin tables do not match")
    cdef float *xp = <float *>cnp.PyArray_DATA(x)
    cdef const float *cp = <const float *>cnp.PyArray_DATA(cos)
    cdef const float *sp = <const float *>cnp.PyArray_DATA(sin)
    if T and width:
        with nogil:
            tpk_rope(xp, T, width // head_dim, head_dim, cp, sp)


def silu_mul(g_array, u_array, int nthreads=1):
    """g = silu(g) * u in place (T, n); returns g."""
    cdef cnp.ndarray g = _arr(g_array, cnp.NPY_FLOAT32, 2, "silu_mul: gate", writable=True)
    cdef cnp.ndarray u = _arr(u_array, cnp.NPY_FLOAT32, 2, "silu_mul: up")
    if _dim(g, 0) != _dim(u, 0) or _dim(g, 1) != _dim(u, 1):
        raise ValueError("silu_mul: shapes do not match")
    cdef int64_t n = _dim(g, 0) * _dim(g, 1)
    cdef float *gp = <float *>cnp.PyArray_DATA(g)
    cdef const float *up = <const float *>cnp.PyArray_DATA(u)
    if n:
        with nogil:
            tpk_silu_mul(gp, up, gp, n, nthreads)
    return g_array


def attention(q_array, k_array, v_array, kcache, vcache, int64_t start, kv_of_head_array, float scale,
              int nthreads=1, int64_t window=0):
    """Causal attention for T new positions start..: q (T, heads*hd), k, v (T, kv*hd) are stored
    into the caches first, then attended to. A cache is a C-contiguous (kv, ctx, hd) array, or the
    runtime's blocked layout: a (blocks, kv, KV_BLOCK, hd) view whose blocks of positions may lie
    apart (contiguous within a block). Float32, or float16 (k, v rounded to nearest, saturating at
    +-65504; attention then reads them back exactly). window > 0: each position attends only to
    itself and the window - 1 positions before it (a sliding window). Returns (T, heads*hd) float32."""
    cdef cnp.ndarray q = _arr(q_array, cnp.NPY_FLOAT32, 2, "attention: q")
    cdef cnp.ndarray k = _arr(k_array, cnp.NPY_FLOAT32, 2, "attention: k")
    cdef cnp.ndarray v = _arr(v_array, cnp.NPY_FLOAT32, 2, "attention: v")
    cdef cnp.ndarray koh = _arr(kv_of_head_array, cnp.NPY_INT32, 1, "attention: kv_of_head")
    cdef int64_t n_kv, ctx, hd, head_stride, block_stride
    cdef cnp.ndarray kc = _cache_array(kcache, "kcache", &n_kv, &ctx, &hd, &head_stride, &block_stride)
    cdef int64_t vn_kv, vctx, vhd, vhead_stride, vblock_stride
    cdef cnp.ndarray vc = _cache_array(vcache, "vcache", &vn_kv, &vctx, &vhd, &vhead_stride, &vblock_stride)
    cdef int64_t T = _dim(q, 0)
    cdef int64_t n_heads = _dim(koh, 0)
    cdef int f16 = cnp.PyArray_TYPE(kc) == cnp.NPY_FLOAT16
    if (cnp.PyArray_TYPE(vc) != cnp.PyArray_TYPE(kc) or vn_kv != n_kv or vctx != ctx or vhd != hd
            or vhead_stride != head_stride or vblock_stride != block_stride):
        raise ValueError("attention: caches differ")
    if (_dim(q, 1) != n_heads * hd or _dim(k, 1) != n_kv * hd or _dim(v, 1) != n_kv * hd or _dim(k, 0) != T
            or _dim(v, 0) != T):
        raise ValueError("attention: shapes do not match")
    if window < 0:
        raise ValueError(f"attention: window {window} is negative")
    if start < 0 or start + T > ctx:
        raise ValueError(f"attention: positions {start}..{start + T} do not fit the cache of {ctx}")
    _check_kv_of_head(koh, n_kv, "attention")
    cdef const int32_t *kvh = <const int32_t *>cnp.PyArray_DATA(koh)
    cdef cnp.ndarray out = _empty2(T, n_heads * hd, cnp.NPY_FLOAT32)
    cdef const float *qp = <const float *>cnp.PyArray_DATA(q)
    cdef const float *kp = <const float *>cnp.PyArray_DATA(k)
    cdef const float *vp = <const float *>cnp.PyArray_DATA(v)
    cdef void *kcp = cnp.PyArray_DATA(kc)
    cdef void *vcp = cnp.PyArray_DATA(vc)
    cdef float *op = <float *>cnp.PyArray_DATA(out)
    if T and n_heads and hd:
        with nogil:
            tpk_attention(qp, kp if n_kv else NULL, vp if n_kv else NULL, T, n_heads, n_kv, hd, kvh, kcp, vcp,
                          f16, head_stride, block_stride, start, window, scale, op, nthreads)
    return out


cdef int _check_kv_of_head(cnp.ndarray koh, int64_t n_kv, str what) except -1:
    """every query head's kv head (int32) one of the n_kv"""
    cdef const int32_t *kvh = <const int32_t *>cnp.PyArray_DATA(koh)
    cdef int64_t i
    for i in range(_dim(koh, 0)):
        if kvh[i] < 0 or kvh[i] >= n_kv:
            raise ValueError(f"{what}: kv head index out of range")
    return 0


cdef cnp.ndarray _cache_array(cache, str name, int64_t *n_kv, int64_t *ctx, int64_t *hd, int64_t *head_stride,
                              int64_t *block_stride):
    """A KV cache argument, writable float32 or float16: a C-contiguous (kv, ctx, hd) array, or a
    (blocks, kv, KV_BLOCK, hd) one contiguous but for its first axis. Its sizes and strides (in values)."""
    if (not isinstance(cache, np.ndarray) or cnp.PyArray_NDIM(<cnp.ndarray>cache) not in (3, 4)
            or cnp.PyArray_TYPE(<cnp.ndarray>cache) not in (cnp.NPY_FLOAT32, cnp.NPY_FLOAT16)):
        raise ValueError(f"attention: {name} must be a 3-d or 4-d float32 or float16 array")
    cdef cnp.ndarray c = <cnp.ndarray>cache
    if not cnp.PyArray_ISWRITEABLE(c):
        raise ValueError(f"attention: {name} must be writable")
    cdef int64_t esize = cnp.PyArray_ITEMSIZE(c)
    if cnp.PyArray_NDIM(c) == 3:
        if not cnp.PyArray_IS_C_CONTIGUOUS(c):
            raise ValueError(f"attention: {name} must be C-contiguous")
        n_kv[0], ctx[0], hd[0] = _dim(c, 0), _dim(c, 1), _dim(c, 2)
        head_stride[0], block_stride[0] = ctx[0] * hd[0], TPK_KV_BLOCK * hd[0]
        return c
    n_kv[0], hd[0] = _dim(c, 1), _dim(c, 3)
    if (_dim(c, 2) != TPK_KV_BLOCK or cnp.PyArray_STRIDE(c, 3) != esize or cnp.PyArray_STRIDE(c, 2) != hd[0] * esize
            or (n_kv[0] > 1 and cnp.PyArray_STRIDE(c, 1) != TPK_KV_BLOCK * hd[0] * esize)
            or cnp.PyArray_STRIDE(c, 0) < n_kv[0] * TPK_KV_BLOCK * hd[0] * esize or cnp.PyArray_STRIDE(c, 0) % esize):
        raise ValueError(f"attention: {name} must be (blocks, kv, {TPK_KV_BLOCK}, hd), contiguous within a block")
    ctx[0] = _dim(c, 0) * TPK_KV_BLOCK
    head_stride[0], block_stride[0] = TPK_KV_BLOCK * hd[0], cnp.PyArray_STRIDE(c, 0) // esize
    return c


def widen_f16(h):
    """float16 bits (uint16) -> float32 (exact), by the kernels' widening at the current SIMD level."""
    return _convert_f16(h, True)


def narrow_f16(x):
    """float32 -> float16 bits (uint16): round to nearest even, saturating at +-65504 (NaN stays NaN)."""
    return _convert_f16(x, False)


cdef cnp.ndarray _convert_f16(values, bint widen):
    cdef cnp.ndarray src = _arr(values, cnp.NPY_UINT16 if widen else cnp.NPY_FLOAT32, 1,
                                "widen_f16: h" if widen else "narrow_f16: x")
    cdef cnp.npy_intp n = _dim(src, 0)
    cdef cnp.ndarray out = cnp.PyArray_EMPTY(1, &n, cnp.NPY_FLOAT32 if widen else cnp.NPY_UINT16, 0)
    cdef void *sp = cnp.PyArray_DATA(src)
    cdef void *op = cnp.PyArray_DATA(out)
    if n:
        with nogil:
            if widen:
                tpk_widen_f16(<const uint16_t *>sp, n, <float *>op)
            else:
                tpk_narrow_f16(<const float *>sp, n, <uint16_t *>op)
    return out


# ---------------------------------------------------------------- a layer's kernels in one call (tpk_layer.h)

cdef extern from "tpk_layer.h":
    ctypedef struct tpk_matrix:
        int type
        const uint8_t *data
        int64_t rows, nb
    ctypedef struct tpk_attention_sublayer:
        const float *norm
        tpk_matrix wq, wk, wv, wo
        int64_t dim, n_heads, n_kv, hd, window
        const int32_t *kv_of_head
        const float *bq
        const float *bk
        const float *bv
        const float *q_norm
        const float *k_norm
        float eps, scale
    ctypedef struct tpk_ffn_sublayer:
        const float *norm
        tpk_matrix w1, w3, w2
        int64_t dim, hidden
        float eps
    ctypedef struct tpk_kv_layer:
        void *k
        void *v
        int f16
        int64_t head_stride, block_stride, ctx, slot_bytes
    ctypedef struct tpk_segment:
        int64_t slot, start, rows
    int TPK_PHASES
    int64_t tpk_attention_sublayer_work(const tpk_attention_sublayer *s, int64_t T) nogil
    int64_t tpk_ffn_sublayer_work(const tpk_ffn_sublayer *s, int64_t T) nogil
    void tpk_attention_sublayer_run(const tpk_attention_sublayer *s, float *x, const float *add, int64_t T,
                                    const float *cos_t, const float *sin_t, const tpk_kv_layer *cache,
                                    const tpk_segment *segs, int64_t nseg, double *out, uint8_t *work, int nthreads,
                                    int64_t *phase_ns) nogil
    void tpk_ffn_sublayer_run(const tpk_ffn_sublayer *s, float *x, const float *add, int64_t T, double *out,
                              uint8_t *work, int nthreads, int64_t *phase_ns) nogil
    void tpk_layers_run(int n, const tpk_attention_sublayer *const *att, const tpk_ffn_sublayer *const *ffn,
                        const tpk_kv_layer *cache, float *x, int64_t T, const float *cos_t, const float *sin_t,
                        const tpk_segment *segs, int64_t nseg, double *partial, float *total, uint8_t *work,
                        int nthreads, int64_t *phase_ns) nogil

# the kinds of kernel time a FusedLayer adds to its phase_ns array, in order
FUSED_PHASES = ("norms", "quantize", "matmuls", "rope", "attention", "silu")


cdef tpk_matrix _matrix(m, int64_t rows, int64_t cols, str what) except *:
    """(wtype, packed data, rows, cols) checked against the rows and columns the layer needs"""
    wtype, data, m_rows, m_cols = m
    cdef cnp.ndarray d = _arr(data, cnp.NPY_UINT8, 1, f"FusedLayer: {what}")
    cdef tpk_matrix out
    out.type = _type_id(wtype)
    out.rows, out.nb = m_rows, _blocks(m_cols)
    if m_rows != rows or m_cols != cols or _dim(d, 0) != tpk_packed_bytes(out.type, out.rows, out.nb):
        raise ValueError(f"FusedLayer: {what} is not a packed {rows} x {cols} matrix")
    out.data = <const uint8_t *>cnp.PyArray_DATA(d)
    return out


cdef cnp.ndarray _layer_cache(cache, str name, int64_t layer, int64_t *n_kv, int64_t *ctx, int64_t *hd,
                              int64_t *head_stride, int64_t *block_stride):
    """One layer of the runtime's whole KV cache (slots, blocks, layers, kv, KV_BLOCK, hd): slot 0's
    (blocks, kv, KV_BLOCK, hd) view of it, checked as attention checks its caches"""
    if not isinstance(cache, np.ndarray) or cache.ndim != 6 or not 0 <= layer < cache.shape[2]:
        raise ValueError(f"FusedLayer: {name} must be (slots, blocks, layers, kv, {TPK_KV_BLOCK}, hd) with the layer "
                         "among its layers")
    return _cache_array(cache[0, :, layer], name, n_kv, ctx, hd, head_stride, block_stride)


cdef class FusedLayer:
    """One rank's share of a Llama layer (attention and FFN sublayers, packed weights only) whose
    kernels run in one C call per sublayer; the same calls, in the same order, as tpllama/model.py
    makes one by one, so the same bits. For short passes (decode), where the Python between the
    kernels runs with caches emptied by each matrix read.

    Matrices are (wtype, packed data, rows, cols) tuples; kcache, vcache the runtime's whole
    caches (slots, blocks, layers, kv, KV_BLOCK, hd), of which this layer is `layer`; work: a
    uint8 scratch array of at least work_bytes(max_rows) bytes (layers may share one); phase_ns:
    None, or int64 (len(FUSED_PHASES),) to which the kernels' time is added."""
    cdef tpk_attention_sublayer att
    cdef tpk_ffn_sublayer ffn
    cdef tpk_kv_layer cache
    cdef int64_t slots, max_rows
    cdef int nthreads
    cdef int64_t *phase
    cdef object keep      # the arrays the structs point into
    cdef cnp.ndarray work

    def __init__(self, attn_norm, wq, wk, wv, wo, ffn_norm, w1, w3, w2, kv_of_head, int64_t head_dim, float eps,
                 float scale, int64_t window, kcache, vcache, int64_t layer, int nthreads=1, phase_ns=None,
                 biases=None, qk_norms=None):
        cdef cnp.ndarray an = _arr(attn_norm, cnp.NPY_FLOAT32, 1, "FusedLayer: attn_norm")
        cdef cnp.ndarray fn = _arr(ffn_norm, cnp.NPY_FLOAT32, 1, "FusedLayer: ffn_norm")
        cdef cnp.ndarray koh = _arr(kv_of_head, cnp.NPY_INT32, 1, "FusedLayer: kv_of_head")
        cdef int64_t dim = _dim(an, 0), hd = head_dim, n_heads = _dim(koh, 0)
        cdef int64_t n_kv, ctx, cache_hd, head_stride, block_stride
        cdef cnp.ndarray kc = _layer_cache(kcache, "kcache", layer, &n_kv, &ctx, &cache_hd, &head_stride, &block_stride)
        cdef int64_t vn_kv, vctx, vhd, vhead_stride, vblock_stride
        cdef cnp.ndarray vc = _layer_cache(vcache, "vcache", layer, &vn_kv, &vctx, &vhd, &vhead_stride, &vblock_stride)
        if (<object>kcache).shape != (<object>vcache).shape or kcache.dtype != vcache.dtype or kcache.strides != vcache.strides:
            raise ValueError("FusedLayer: caches differ")
        cdef int64_t hidden = w1[2]
        if hd <= 0 or hd % 2 or cache_hd != hd or _dim(fn, 0) != dim:
            raise ValueError("FusedLayer: head size or norms do not match")
        _check_kv_of_head(koh, n_kv, "FusedLayer")
        self.att.norm = <const float *>cnp.PyArray_DATA(an)
        self.att.wq = _matrix(wq, n_heads * hd, dim, "wq")
        self.att.wk = _matrix(wk, n_kv * hd, dim, "wk")
        self.att.wv = _matrix(wv, n_kv * hd, dim, "wv")
        self.att.wo = _matrix(wo, dim, n_heads * hd, "wo")
        self.att.dim, self.att.n_heads, self.att.n_kv, self.att.hd = dim, n_heads, n_kv, hd
        self.att.window, self.att.kv_of_head = window, <const int32_t *>cnp.PyArray_DATA(koh)
        self.att.eps, self.att.scale = eps, scale
        self.att.bq = self.att.bk = self.att.bv = self.att.q_norm = self.att.k_norm = NULL
        if biases is not None:      # (bq, bk, bv): Qwen2
            bq, bk, bv = (_arr(b, cnp.NPY_FLOAT32, 1, f"FusedLayer: {n}") for b, n in zip(biases, ("bq", "bk", "bv")))
            if _dim(bq, 0) != n_heads * hd or _dim(bk, 0) != n_kv * hd or _dim(bv, 0) != n_kv * hd:
                raise ValueError("FusedLayer: biases do not match the heads")
            self.att.bq, self.att.bk = <const float *>cnp.PyArray_DATA(bq), <const float *>cnp.PyArray_DATA(bk)
            self.att.bv = <const float *>cnp.PyArray_DATA(bv)
        if qk_norms is not None:    # (q_norm, k_norm) of each head: Qwen3
            qn, kn = (_arr(w, cnp.NPY_FLOAT32, 1, f"FusedLayer: {n}") for w, n in zip(qk_norms, ("q_norm", "k_norm")))
            if _dim(qn, 0) != hd or _dim(kn, 0) != hd:
                raise ValueError("FusedLayer: q/k norms do not match the head size")
            self.att.q_norm, self.att.k_norm = <const float *>cnp.PyArray_DATA(qn), <const float *>cnp.PyArray_DATA(kn)
        self.ffn.norm = <const float *>cnp.PyArray_DATA(fn)
        self.ffn.w1 = _matrix(w1, hidden, dim, "w1")
        self.ffn.w3 = _matrix(w3, hidden, dim, "w3")
        self.ffn.w2 = _matrix(w2, dim, hidden, "w2")
        self.ffn.dim, self.ffn.hidden, self.ffn.eps = dim, hidden, eps
        self.cache.f16 = cnp.PyArray_TYPE(kc) == cnp.NPY_FLOAT16
        self.cache.head_stride, self.cache.block_stride, self.cache.ctx = head_stride, block_stride, ctx
        self.slots, self.cache.slot_bytes = kcache.shape[0], kcache.strides[0]
        self.cache.k, self.cache.v = cnp.PyArray_DATA(kc), cnp.PyArray_DATA(vc)
        self.nthreads = nthreads
        self.phase = NULL
        if phase_ns is not None:
            self.phase = <int64_t *>cnp.PyArray_DATA(_arr(phase_ns, cnp.NPY_INT64, 1, "FusedLayer: phase_ns",
                                                          writable=True))
            if len(phase_ns) != TPK_PHASES:
                raise ValueError(f"FusedLayer: phase_ns must have {TPK_PHASES} entries")
        self.keep = (an, fn, koh, kc, vc, wq, wk, wv, wo, w1, w3, w2, phase_ns, biases, qk_norms)
        self.work, self.max_rows = None, 0

    def work_bytes(self, int64_t rows):
        """Scratch bytes the larger sublayer needs for `rows` rows."""
        return max(tpk_attention_sublayer_work(&self.att, rows), tpk_ffn_sublayer_work(&self.ffn, rows))

    def use_work(self, work, int64_t max_rows):
        """Take `work` (64-byte aligned uint8, work_bytes(max_rows) or more) as scratch for passes of up to max_rows rows."""
        cdef cnp.ndarray w = _arr(work, cnp.NPY_UINT8, 1, "FusedLayer: work", writable=True)
        if _dim(w, 0) < self.work_bytes(max_rows) or (<size_t>cnp.PyArray_DATA(w)) % 64:
            raise ValueError(f"FusedLayer: work must be 64-byte aligned and hold {self.work_bytes(max_rows)} bytes")
        self.work, self.max_rows = w, max_rows

    cdef float *_rows(self, x, int64_t *T) except NULL:
        cdef cnp.ndarray a = _arr(x, cnp.NPY_FLOAT32, 2, "FusedLayer: x", writable=True)
        T[0] = _dim(a, 0)
        if _dim(a, 1) != self.att.dim or not 0 < T[0] <= self.max_rows:
            raise ValueError(f"FusedLayer: x must be (1..{self.max_rows}, {self.att.dim})")
        return <float *>cnp.PyArray_DATA(a)

    cdef const float *_add(self, add, int64_t T) except? NULL:
        if add is None:
            return NULL
        cdef cnp.ndarray a = _arr(add, cnp.NPY_FLOAT32, 2, "FusedLayer: add")
        if _dim(a, 0) != T or _dim(a, 1) != self.att.dim:
            raise ValueError("FusedLayer: add must be shaped as x")
        return <const float *>cnp.PyArray_DATA(a)

    cdef int _check_rope(self, int64_t T, cnp.ndarray cos, cnp.ndarray sin) except -1:
        if (_dim(cos, 0) != T or _dim(sin, 0) != T or _dim(cos, 1) != self.att.hd // 2
                or _dim(sin, 1) != self.att.hd // 2):
            raise ValueError("FusedLayer: cos/sin tables do not match")
        return 0

    cdef cnp.ndarray _segments(self, segments, int64_t T):
        """(n, 3) int64 rows of (slot, start, rows), checked: they cover the T rows and fit the cache"""
        cdef cnp.ndarray a = _arr(segments, cnp.NPY_INT64, 2, "FusedLayer: segments")
        if _dim(a, 1) != 3:
            raise ValueError("FusedLayer: segments must be (n, 3): slot, start, rows")
        cdef const tpk_segment *g = <const tpk_segment *>cnp.PyArray_DATA(a)
        cdef int64_t i, rows = 0
        for i in range(_dim(a, 0)):
            if (not 0 <= g[i].slot < self.slots or g[i].start < 0 or g[i].rows < 0
                    or g[i].start + g[i].rows > self.cache.ctx):
                raise ValueError(f"FusedLayer: positions {g[i].start}..{g[i].start + g[i].rows} of slot {g[i].slot} "
                                 "do not fit the cache")
            rows += g[i].rows
        if rows != T:
            raise ValueError(f"FusedLayer: the segments cover {rows} rows, not {T}")
        return a

    cdef tuple _pass(self, x, segments, cos_array, sin_array, int64_t *T, float **xp):
        """A pass's rows (T of them, at xp), checked with its segments and rope tables: (segments, cos, sin)"""
        xp[0] = self._rows(x, T)
        cdef cnp.ndarray cos = _arr(cos_array, cnp.NPY_FLOAT32, 2, "FusedLayer: cos")
        cdef cnp.ndarray sin = _arr(sin_array, cnp.NPY_FLOAT32, 2, "FusedLayer: sin")
        self._check_rope(T[0], cos, sin)
        return self._segments(segments, T[0]), cos, sin

    def attention(self, x, add, segments, cos_array, sin_array):
        """x (T, dim) float32 += add (None, or the last sublayer's (T, dim) float32 total); returns
        the attention sublayer's (T, dim) float64 partial sums. segments: (n, 3) int64 rows of
        (slot, start, rows), x's rows in that order, each attending over its own cache slot at
        positions start.., where its keys and values go. cos, sin: (T, hd/2) float32."""
        cdef int64_t T
        cdef float *xp
        cdef cnp.ndarray segs, cos, sin
        segs, cos, sin = self._pass(x, segments, cos_array, sin_array, &T, &xp)
        cdef const float *ap = self._add(add, T)
        cdef int64_t nseg = _dim(segs, 0)
        cdef cnp.ndarray out = _empty2(T, self.att.dim, cnp.NPY_FLOAT64)
        with nogil:
            tpk_attention_sublayer_run(&self.att, xp, ap, T, <const float *>cnp.PyArray_DATA(cos),
                                       <const float *>cnp.PyArray_DATA(sin), &self.cache,
                                       <const tpk_segment *>cnp.PyArray_DATA(segs), nseg,
                                       <double *>cnp.PyArray_DATA(out), <uint8_t *>cnp.PyArray_DATA(self.work),
                                       self.nthreads, self.phase)
        return out

    def feed_forward(self, x, add):
        """x (T, dim) float32 += add (as in attention); returns the FFN sublayer's (T, dim) float64 partial sums."""
        cdef int64_t T
        cdef float *xp = self._rows(x, &T)
        cdef const float *ap = self._add(add, T)
        cdef cnp.ndarray out = _empty2(T, self.att.dim, cnp.NPY_FLOAT64)
        with nogil:
            tpk_ffn_sublayer_run(&self.ffn, xp, ap, T, <double *>cnp.PyArray_DATA(out),
                                 <uint8_t *>cnp.PyArray_DATA(self.work), self.nthreads, self.phase)
        return out


def fused_stack(list layers, x, segments, cos_array, sin_array):
    """For a rank that holds the whole model (an all-reduce of its partial sums only rounds them
    to float32): every FusedLayer's attention and FFN in turn in one C call, each total added
    to x (T, dim) by the next sublayer and the last one at the end, as forward does. segments,
    cos, sin: as FusedLayer.attention takes them. The layers share one work array. Returns x."""
    cdef int n = len(layers), i
    if n == 0:
        return x
    cdef FusedLayer first = <FusedLayer?>layers[0], fl
    cdef int64_t T
    cdef float *xp
    cdef cnp.ndarray segs, cos, sin
    segs, cos, sin = first._pass(x, segments, cos_array, sin_array, &T, &xp)
    cdef int64_t nseg = _dim(segs, 0)
    cdef cnp.ndarray partial = _empty2(T, first.att.dim, cnp.NPY_FLOAT64)
    cdef cnp.ndarray total = _empty2(T, first.att.dim, cnp.NPY_FLOAT32)
    cdef const tpk_attention_sublayer **att = <const tpk_attention_sublayer **>malloc(n * sizeof(void *))
    cdef const tpk_ffn_sublayer **ffn = <const tpk_ffn_sublayer **>malloc(n * sizeof(void *))
    cdef tpk_kv_layer *caches = <tpk_kv_layer *>malloc(n * sizeof(tpk_kv_layer))
    try:
        if att == NULL or ffn == NULL or caches == NULL:
            raise MemoryError()
        for i in range(n):
            fl = <FusedLayer?>layers[i]
            if (fl.work is not first.work or fl.att.dim != first.att.dim or fl.max_rows != first.max_rows
                    or fl.slots != first.slots or fl.cache.ctx != first.cache.ctx or fl.att.hd != first.att.hd):
                raise ValueError("fused_stack: the layers must share their shapes, cache and work array")
            caches[i] = fl.cache
            att[i], ffn[i] = &fl.att, &fl.ffn
        with nogil:
            tpk_layers_run(n, att, ffn, caches, xp, T, <const float *>cnp.PyArray_DATA(cos),
                           <const float *>cnp.PyArray_DATA(sin), <const tpk_segment *>cnp.PyArray_DATA(segs),
                           nseg, <double *>cnp.PyArray_DATA(partial), <float *>cnp.PyArray_DATA(total),
                           <uint8_t *>cnp.PyArray_DATA(first.work), first.nthreads, first.phase)
    finally:
        free(att)
        free(ffn)
        free(caches)
    return x

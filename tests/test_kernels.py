"""The C kernels: quantizers bit-identical to GGML (gguf-py), and every SIMD level's matmul
bit-identical to the scalar reference, for shapes that exercise tails of the 16-row
interleave, token tiles and threads. ARM levels are checked under qemu in test_kernels_arm.py.
"""
import warnings

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from tpllama import _kernels as K
from tpllama.matrix import Activation, Matrix, matmul_all

LEVELS = K.supported_simd_levels()
QTYPES = {"q40": GGMLQuantizationType.Q4_0, "q80": GGMLQuantizationType.Q8_0}
QUANTIZE = {"q40": K.quantize_q40, "q80": K.quantize_q80}
BLOCK_BYTES = {"q40": K.Q40_BYTES, "q80": K.Q80_BYTES}


@pytest.fixture(autouse=True)
def best_level_afterwards():
    yield
    K.set_simd_level(K.best_simd_level())


# ---------------------------------------------------------------- quantizers

F32_MAX = np.finfo(np.float32).max


def _adversarial():
    rng = np.random.default_rng(7)
    return {
        "random": rng.standard_normal((8, 256)),
        "zeros": np.zeros((2, 64)),
        "all-equal": np.full((2, 64), 0.3),
        "all-equal-negative": np.full((2, 64), -7.25),
        "plus-minus-max": np.tile([F32_MAX, -F32_MAX], (2, 32)),
        "one-max": np.concatenate([np.full((1, 31), 1.0), [[F32_MAX]]], axis=1),
        "large": rng.standard_normal((4, 64)) * 1e30,
        "beyond-fp16": rng.standard_normal((4, 64)) * 1e7,
        "tiny": rng.standard_normal((4, 64)) * 1e-36,
        "denormal": np.full((2, 64), 1e-40),
        "denormal-mixed": np.array([[1e-40, 0.0, -1e-40, 3e-45] * 16]),
        "min-equals-max": np.array([[-3.0, 3.0] + [1.0] * 30 + [3.0, -3.0] + [0.5] * 30]),
        "max-first-negative": np.array([[-2.0] + [2.0] * 31]),
        "halves": np.array([[k * 0.5 for k in range(-32, 32)]]),
        "round-half-q80": np.array([[127.0] + [k + 0.5 for k in range(-16, 15)]]),
        "round-half-q40": np.array([[-8.0] + [k + 0.5 for k in range(-8, 8)] * 2][:1])[:, :32],
        "sparse": np.where(rng.random((4, 128)) < 0.9, 0.0, rng.standard_normal((4, 128))),
        "mixed-scales": rng.standard_normal((6, 96)) * np.logspace(-20, 20, 6)[:, None],
    }


@pytest.mark.parametrize("wtype", ["q80", "q40"])
@pytest.mark.parametrize("case", sorted(_adversarial()))
def test_quantizer_bit_identical_to_gguf(wtype, case):
    x = np.ascontiguousarray(_adversarial()[case], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # gguf-py's fp16 overflow on huge values
        want = gguf_quantize(x, QTYPES[wtype]).reshape(x.shape[0], -1)
    for level in LEVELS:     # q80 has SIMD quantizers (activations are quantized every step)
        K.set_simd_level(level)
        got = QUANTIZE[wtype](x)
        assert got.dtype == np.uint8 and got.shape == want.shape
        assert np.array_equal(got, want), f"{case} {level}: first difference at {np.argwhere(got != want)[:3].tolist()}"


@pytest.mark.parametrize("wtype", ["q80", "q40"])
def test_dequantize_matches_gguf(wtype):
    x = np.random.default_rng(3).standard_normal((5, 128)).astype(np.float32)
    blocks = QUANTIZE[wtype](x)
    ours = (K.dequantize_q40 if wtype == "q40" else K.dequantize_q80)(blocks)
    assert np.array_equal(ours, gguf_dequantize(blocks, QTYPES[wtype]).reshape(5, 128))


# ---------------------------------------------------------------- packing

@pytest.mark.parametrize("wtype", ["q40", "q80"])
@pytest.mark.parametrize("rows,nb", [(0, 2), (1, 1), (15, 3), (16, 2), (17, 1), (33, 4), (5, 0)])
def test_pack_round_trip(wtype, rows, nb):
    rng = np.random.default_rng(rows * 10 + nb)
    blocks = QUANTIZE[wtype](rng.standard_normal((rows, nb * 32)).astype(np.float32))
    packed = K.pack(wtype, blocks)
    assert packed.nbytes == -(-rows // K.ROWS) * K.ROWS * nb * BLOCK_BYTES[wtype]
    assert np.array_equal(K.unpack(wtype, packed, rows, nb), blocks)


def test_pack_accepts_strided_rows():
    blocks = K.quantize_q40(np.random.default_rng(0).standard_normal((40, 128)).astype(np.float32))
    sub = blocks[:, 18:54]     # blocks 1..2 of every row: rows are strided
    assert np.array_equal(K.unpack("q40", K.pack("q40", sub), 40, 2), sub)


# ---------------------------------------------------------------- matmuls: every level == scalar reference

def _operands(wtype, rows, nb, ntok, seed):
    rng = np.random.default_rng(seed)
    # rows of very different magnitudes, a few zero blocks, so the float sums are not all alike
    w = rng.standard_normal((rows, nb * 32)).astype(np.float32) * np.logspace(-3, 3, max(rows, 1))[:rows, None]
    x = rng.standard_normal((ntok, nb * 32)).astype(np.float32) * np.logspace(-2, 2, max(ntok, 1))[:ntok, None]
    if rows and nb > 1:
        w[::3, 32:64] = 0.0
    if ntok and nb > 2:
        x[::2, 64:96] = 0.0
    wq = QUANTIZE[wtype](np.ascontiguousarray(w.astype(np.float32)))
    xq = K.quantize_q80(np.ascontiguousarray(x.astype(np.float32)))
    return wq, xq


def _reference(wtype, wq, xq, rows, dtype=np.float32):
    out = np.empty((xq.shape[0], rows), dtype=dtype)
    return K.matmul_ref(wtype, wq, xq, out)


def _packed(wtype, packed, rows, nb, xq, threads, dtype=np.float32):
    out = np.full((xq.shape[0], rows), np.nan, dtype=dtype)
    return K.matmul_packed(wtype, packed, rows, nb, xq, out, threads)


SHAPES = [(1, 1), (5, 2), (15, 1), (16, 3), (17, 2), (31, 5), (33, 1), (48, 4), (70, 8), (100, 3), (257, 2)]
TOKENS = [1, 2, 3, 4, 5, 7, 8, 9, 13, 16, 17, 33, 64, 70]


@pytest.mark.parametrize("sums", ["float32", "float64"])
@pytest.mark.parametrize("wtype", ["q40", "q80"])
@pytest.mark.parametrize("level", LEVELS)
def test_every_level_bit_identical_to_reference(wtype, level, sums):
    """float32 sums (the runtime's products), and float64 sums (row-parallel partial sums)."""
    dtype = np.dtype(sums)
    K.set_simd_level(level)
    assert K.simd_level() == level
    checked = 0
    for si, (rows, nb) in enumerate(SHAPES):
        for ntok in TOKENS:
            if rows * nb * ntok > 60000 and ntok not in (1, 70):
                continue
            wq, xq = _operands(wtype, rows, nb, ntok, seed=si * 100 + ntok)
            ref = _reference(wtype, wq, xq, rows, dtype)
            packed = K.pack(wtype, wq)
            for threads in (1, 2):
                got = _packed(wtype, packed, rows, nb, xq, threads, dtype)
                assert np.array_equal(got, ref), (
                    f"{wtype} level={level} rows={rows} nb={nb} ntok={ntok} threads={threads}: "
                    f"max diff {np.nanmax(np.abs(got - ref)):.3g}")
                checked += 1
    assert checked > 100


@pytest.mark.parametrize("wtype", ["q40", "q80"])
@pytest.mark.parametrize("level", LEVELS)
def test_model_sized_matmul_bit_identical(wtype, level):
    """Shapes like a real layer: long rows (many blocks), a ragged row count, a prompt's tokens."""
    K.set_simd_level(level)
    for rows, nb, ntok in [(250, 64, 1), (250, 64, 37), (40, 176, 5)]:
        wq, xq = _operands(wtype, rows, nb, ntok, seed=rows + nb + ntok)
        packed = K.pack(wtype, wq)
        for dtype in (np.float32, np.float64):
            ref = _reference(wtype, wq, xq, rows, dtype)
            for threads in (1, 2):
                assert np.array_equal(_packed(wtype, packed, rows, nb, xq, threads, dtype), ref)


def test_the_prefetch_distance_changes_no_result():
    """--prefetch only asks memory earlier: every distance gives the reference's bits."""
    rows, nb, ntok = 70, 40, 1
    before = K.prefetch()
    try:
        for wtype in ("q40", "q80"):
            wq, xq = _operands(wtype, rows, nb, ntok, seed=5)
            packed = K.pack(wtype, wq)
            for dtype in (np.float32, np.float64):
                ref = _reference(wtype, wq, xq, rows, dtype)
                for distance in (0, 64, 1024, 65536):
                    K.set_prefetch(distance)
                    assert K.prefetch() == distance
                    assert np.array_equal(_packed(wtype, packed, rows, nb, xq, 2, dtype), ref), distance
        for bad in (-1, 65537):
            with pytest.raises(ValueError, match="outside 0..65536"):
                K.set_prefetch(bad)
    finally:
        K.set_prefetch(before)


@pytest.mark.parametrize("wtype", ["q40", "q80"])
def test_extreme_bytes_exact(wtype):
    """Every level stays exact for any bytes, also int8 -128 and the largest nibbles everywhere
    (the int16 partial sums of the AVX2/AVX-512 paths must not saturate)."""
    rows, nb, ntok = 19, 3, 5
    rng = np.random.default_rng(11)
    wq = rng.integers(0, 256, (rows, nb * BLOCK_BYTES[wtype]), dtype=np.uint8)
    xq = rng.integers(0, 256, (ntok, nb * K.Q80_BYTES), dtype=np.uint8)
    for blocks, bb in ((wq, BLOCK_BYTES[wtype]), (xq, K.Q80_BYTES)):
        d = blocks.reshape(blocks.shape[0], nb, bb)
        d[:, :, :2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)   # finite scales
    wq[0, 2:BLOCK_BYTES[wtype]] = 0xFF if wtype == "q40" else 0x80       # nibbles 15 / int8 -128
    wq[1, 2:BLOCK_BYTES[wtype]] = 0x00 if wtype == "q40" else 0x7F
    xq[0, 2:K.Q80_BYTES] = 0x80                                          # activations -128
    xq[1, 2:K.Q80_BYTES] = 0x7F
    packed = K.pack(wtype, wq)
    for dtype in (np.float32, np.float64):
        ref = _reference(wtype, wq, xq, rows, dtype)
        for level in LEVELS:
            K.set_simd_level(level)
            for threads in (1, 2):
                assert np.array_equal(_packed(wtype, packed, rows, nb, xq, threads, dtype), ref), level


@pytest.mark.parametrize("wtype", ["q40", "q80"])
@pytest.mark.parametrize("level", LEVELS)
def test_matmul_close_to_float64(wtype, level):
    """The exact kernels compute the dequantized product: within 1e-5 of a float64 matmul,
    relative to the size of the row's terms (sum of |w_j x_j|)."""
    K.set_simd_level(level)
    rows, nb, ntok = 45, 64, 6
    wq, xq = _operands(wtype, rows, nb, ntok, seed=5)
    w = (K.dequantize_q40 if wtype == "q40" else K.dequantize_q80)(wq).astype(np.float64)
    x = K.dequantize_q80(xq).astype(np.float64)
    got = _packed(wtype, K.pack(wtype, wq), rows, nb, xq, 2).astype(np.float64)
    want = x @ w.T
    size = np.abs(x) @ np.abs(w).T
    assert np.all(np.abs(got - want) <= 1e-5 * size + 1e-30), np.max(np.abs(got - want) / (size + 1e-30))
    got64 = _packed(wtype, K.pack(wtype, wq), rows, nb, xq, 2, np.float64)   # float64 sums: to float64 rounding
    assert np.all(np.abs(got64 - want) <= 1e-12 * size + 1e-300)


@pytest.mark.parametrize("wtype", ["q40", "q80"])
@pytest.mark.parametrize("level", LEVELS)
def test_many_matrices_in_one_call(wtype, level):
    """wq/wk/wv-style calls: several matrices (ragged, empty ones too) read the same activations."""
    K.set_simd_level(level)
    nb = 3
    row_counts = [40, 16, 0, 7, 33]
    for ntok in (1, 5, 17):
        mats, refs = [], []
        for i, rows in enumerate(row_counts):
            wq, xq = _operands(wtype, rows, nb, ntok, seed=7)
            mats.append(K.pack(wtype, wq))
            refs.append(wq)
        xq = _operands(wtype, 1, nb, ntok, seed=99)[1]
        for threads in (1, 2):
            outs = [np.full((ntok, r), np.nan, np.float32) for r in row_counts]
            K.matmul_packed_many(wtype, mats, row_counts, nb, xq, outs, threads)
            for wq, rows, out in zip(refs, row_counts, outs):
                assert np.array_equal(out, _reference(wtype, wq, xq, rows)), (rows, ntok, threads)
    ms = [Matrix.from_float(np.random.default_rng(i).standard_normal((r, 64)).astype(np.float32), wtype, threads=2)
          for i, r in enumerate((48, 8, 8))]
    a = Activation(np.random.default_rng(5).standard_normal((3, 64)).astype(np.float32))
    for m, out in zip(ms, matmul_all(ms, a)):
        assert np.array_equal(out, m(a))


def test_exactness_test_can_fail():
    """One ulp off in one scale of one row must be seen by the bit-exact comparison."""
    rows, nb, ntok = 20, 3, 4
    wq, xq = _operands("q40", rows, nb, ntok, seed=1)
    ref = _reference("q40", wq, xq, rows)
    for level in LEVELS:
        K.set_simd_level(level)
        packed = K.pack("q40", wq)
        packed[1 * K.ROWS * K.Q40_BYTES + 2 * 5] ^= 1      # row 5, block 1: low bit of its fp16 scale
        got = _packed("q40", packed, rows, nb, xq, 1)
        assert not np.array_equal(got, ref), level
        assert np.array_equal(np.delete(got, 5, axis=1), np.delete(ref, 5, axis=1)), level


# ---------------------------------------------------------------- Matrix (packing in the runtime)

@pytest.mark.parametrize("wtype", ["q40", "q80"])
def test_matrix_packs_and_gives_blocks_back(wtype):
    w = np.random.default_rng(2).standard_normal((37, 96)).astype(np.float32)
    m = Matrix.from_float(w, wtype, threads=2)
    blocks = QUANTIZE[wtype](w)
    assert np.array_equal(m.blocks(), blocks)
    assert m.nbytes == 48 * 3 * BLOCK_BYTES[wtype]      # 37 rows padded to 3 groups of 16
    deq = (K.dequantize_q40 if wtype == "q40" else K.dequantize_q80)(blocks)
    assert np.array_equal(m.dequantized(), deq)
    a = Activation(np.random.default_rng(3).standard_normal((3, 96)).astype(np.float32))
    ref = _reference(wtype, blocks, a.q80, 37)
    assert np.array_equal(m(a), ref)
    out = np.empty((3, 37), np.float32)
    assert m(a, out=out) is out and np.array_equal(out, ref)


@pytest.mark.parametrize("wtype", ["q40", "q80"])
def test_matrix_empty_shapes(wtype):
    a = Activation(np.ones((2, 64), np.float32))
    zero_rows = Matrix.from_float(np.zeros((0, 64), np.float32), wtype)
    assert zero_rows(a).shape == (2, 0) and zero_rows.nbytes == 0
    zero_cols = Matrix.from_float(np.zeros((5, 0), np.float32), wtype)
    assert zero_cols.wtype == wtype
    assert np.array_equal(zero_cols(Activation(np.ones((2, 0), np.float32))), np.zeros((2, 5), np.float32))


def test_matrix_built_from_loader_blocks():
    """The loader's pass-through: GGML blocks in, the same blocks out."""
    w = np.random.default_rng(4).standard_normal((50, 64)).astype(np.float32)
    blocks = K.quantize_q40(w)
    m = Matrix("q40", 50, 64, blocks)
    assert np.array_equal(m.blocks(), blocks)
    with pytest.raises(ValueError):
        Matrix("q40", 51, 64, blocks)


def test_stream_sum():
    x = np.ones(1 << 20, np.float32)
    for threads in (1, 2):
        assert K.stream_sum(x, threads) == float(1 << 20)
    assert K.stream_sum(np.arange(1000, dtype=np.float32), 2) == 999 * 1000 / 2

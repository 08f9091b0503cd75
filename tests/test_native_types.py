"""Every GGML type tpllama runs natively (q41, q50, q4k, q5k, q6k beside q40/q80): a Matrix
made from a file's blocks holds exactly the values gguf-py dequantizes, for any column range
cut at multiples of 32; its products equal a float64 product of those values and of the
dequantized q80 activations (to float32 rounding); every SIMD level this CPU has returns the
scalar level's bits. The ARM levels of the same kernels are checked under qemu
(test_kernels_arm.py).

Blocks are gguf-py's quantization of random floats where gguf-py has a quantizer (Q4_1,
Q5_0), else random bytes with finite fp16 scales (any bytes are valid K-quant blocks).
"""
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from tpllama import _kernels as K
from tpllama import wtypes
from tpllama.matrix import Activation, Matrix, matmul_all

from gguf_writer import gguf_tensor_bytes, gguf_tensor_table

LEVELS = K.supported_simd_levels()
NEW_TYPES = ["q41", "q50", "q4k", "q5k", "q6k"]
GGML = {name: GGMLQuantizationType[wtypes.TYPES[name].ggml] for name in NEW_TYPES + ["q40", "q80"]}
FP16_FIELDS = {"q41": (0, 2), "q50": (0,), "q4k": (0, 2), "q5k": (0, 2), "q6k": (208,), "q40": (0,), "q80": (0,)}
# the types whose values gguf-py rounds once (d*q + m, d*sc*q - dmin*m): their float64
# sums are exact terms of unrounded values, so they match float64 of gguf's values to float32 rounding
ROUNDED_VALUES = {"q41", "q4k", "q5k"}


@pytest.fixture(autouse=True)
def best_level_afterwards():
    yield
    K.set_simd_level(K.best_simd_level())


def random_blocks(wtype, rows, nblk, seed, scale=0.02):
    """Valid GGML blocks (rows, nblk*block_bytes) of wtype."""
    rng = np.random.default_rng(seed)
    values, bb = K.ggml_block(wtype)
    if wtype in ("q41", "q50"):
        w = rng.standard_normal((rows, nblk * values)).astype(np.float32) * np.logspace(-2, 1, max(rows, 1))[:rows, None]
        return gguf_quantize(w, GGML[wtype]).reshape(rows, nblk * bb)
    b = rng.integers(0, 256, (rows, nblk, bb), dtype=np.uint8)
    for off in FP16_FIELDS[wtype]:
        half = (rng.standard_normal((rows, nblk)) * scale).astype(np.float16)
        b[:, :, off:off + 2] = half.view(np.uint8).reshape(rows, nblk, 2)
    return b.reshape(rows, nblk * bb)


def file_values(wtype, blocks):
    return gguf_dequantize(blocks, GGML[wtype]).reshape(blocks.shape[0], -1)


def term_magnitudes(wtype, blocks):
    """|d|q + |m| (q41), |d|sc*q + |dmin|m (q4k, q5k), |value| otherwise: the size of the two
    float terms the kernels round apart, built by gguf-py from the blocks with signs changed."""
    b = blocks.copy().reshape(blocks.shape[0], -1, K.ggml_block(wtype)[1])
    if wtype in ROUNDED_VALUES:
        b[:, :, 1] &= 0x7F                       # d >= 0
        b[:, :, 3] = (b[:, :, 3] & 0x7F) | (0x80 if wtype != "q41" else 0)   # q41: m >= 0; K: -|dmin|
    return np.abs(file_values(wtype, b.reshape(blocks.shape))).astype(np.float64)


def activations(ntok, n, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((ntok, n)).astype(np.float32) * np.logspace(-2, 2, max(ntok, 1))[:ntok, None]
    if n > 64:
        x[::2, 32:64] = 0.0
    return Activation(np.ascontiguousarray(x, dtype=np.float32))


def product(m, a, dtype=np.float32):
    out = np.full((a.x.shape[0], m.rows), np.nan, dtype)
    return K.matmul_packed(m.wtype, m.data, m.rows, m.cols // 32, a.q80, out, m.threads)


# ---------------------------------------------------------------- the type table and the C side agree

@pytest.mark.parametrize("wtype", NEW_TYPES + ["q40", "q80"])
def test_runtime_bytes_match_the_kernels(wtype):
    t = wtypes.TYPES[wtype]
    assert t.native and (t.block, t.block_bytes) == K.ggml_block(wtype)
    for rows, cols in [(1, 32), (16, 256), (17, 96), (100, 512), (576, 1536), (49, 2816)]:
        assert wtypes.runtime_bytes(wtype, rows, cols) == K.packed_bytes(wtype, rows, cols // 32)
        assert Matrix.from_ggml(wtype, random_blocks(wtype, rows, -(-cols // t.block), 1), 0, cols).nbytes == \
            wtypes.runtime_bytes(wtype, rows, cols)


# ---------------------------------------------------------------- the file's values, at any cut

SLICES = {32: [(0, 96), (32, 64), (64, 32)], 256: [(0, 768), (32, 704), (96, 64), (224, 320), (480, 32)]}


@pytest.mark.parametrize("wtype", NEW_TYPES + ["q40", "q80"])
def test_from_ggml_keeps_every_value(wtype):
    values = K.ggml_block(wtype)[0]
    for rows in (1, 15, 16, 37):
        blocks = random_blocks(wtype, rows, 3, seed=rows)
        want = file_values(wtype, blocks)
        for first, n in SLICES[values]:
            m = Matrix.from_ggml(wtype, blocks, first, n, threads=2)
            assert (m.wtype, m.rows, m.cols) == (wtype, rows, n)
            assert np.array_equal(m.dequantized(), want[:, first:first + n]), (rows, first, n)


def test_from_ggml_reads_strided_rows_and_rejects_bad_cuts():
    blocks = random_blocks("q4k", 40, 4, seed=3)
    view = blocks[::2]                                      # every other row of a larger array
    m = Matrix.from_ggml("q4k", view, 288, 320)
    assert np.array_equal(m.dequantized(), file_values("q4k", np.ascontiguousarray(view))[:, 288:608])
    for first, n in [(16, 64), (0, 48), (960, 128), (-32, 64)]:
        with pytest.raises(ValueError):
            Matrix.from_ggml("q4k", blocks, first, n)


def test_layouts_without_ggml_blocks_say_so():
    m = Matrix.from_ggml("q6k", random_blocks("q6k", 4, 1, seed=0), 0, 256)
    with pytest.raises(ValueError, match="no GGML blocks"):
        m.blocks()
    with pytest.raises(ValueError, match="no quantizer"):
        Matrix.from_float(np.ones((2, 64), np.float32), "q4k")


def test_constructor_packs_whole_rows_of_blocks():
    blocks = random_blocks("q5k", 20, 2, seed=4)
    m = Matrix("q5k", 20, 512, blocks)
    assert np.array_equal(m.dequantized(), file_values("q5k", blocks))
    with pytest.raises(ValueError):
        Matrix("q5k", 20, 480, blocks)


def test_default_model_q4_1_matrices_hold_the_file_values(smollm2):
    """SmolLM2's own Q4_1 blocks (and its Q8_0 embedding), read by the tests' GGUF parser."""
    table = gguf_tensor_table(smollm2)
    for name, first, n in [("blk.0.ffn_down.weight", 0, 1536), ("blk.3.attn_output.weight", 192, 288),
                           ("blk.5.ffn_gate.weight", 32, 512), ("token_embd.weight", 64, 256)]:
        wtype = wtypes.BY_GGML[table[name][1]].name
        blocks = gguf_tensor_bytes(smollm2, name)[:300]
        m = Matrix.from_ggml(wtype, blocks, first, n)
        assert np.array_equal(m.dequantized(), file_values(wtype, blocks)[:, first:first + n]), name


# ---------------------------------------------------------------- products

@pytest.mark.parametrize("wtype", NEW_TYPES)
@pytest.mark.parametrize("level", LEVELS)
def test_product_is_the_float64_product_of_the_values(wtype, level):
    """float32 sums within 1e-5 of float64 of gguf's values times the dequantized activations,
    relative to the size of the terms; float64 sums to float64 rounding (or to gguf's float32
    rounding of the values, for the types whose values it rounds)."""
    K.set_simd_level(level)
    rows, nblk = 45, 2 if K.ggml_block(wtype)[0] == 256 else 20
    blocks = random_blocks(wtype, rows, nblk, seed=5)
    first, n = (96, 384) if K.ggml_block(wtype)[0] == 256 else (64, 512)
    m = Matrix.from_ggml(wtype, blocks, first, n, threads=2)
    a = activations(6, n, seed=6)
    x = K.dequantize_q80(a.q80).astype(np.float64)
    w = file_values(wtype, blocks)[:, first:first + n].astype(np.float64)
    want = x @ w.T
    size = x.__abs__() @ term_magnitudes(wtype, blocks)[:, first:first + n].T
    got = m(a).astype(np.float64)
    assert np.all(np.abs(got - want) <= 1e-5 * size + 1e-30), np.max(np.abs(got - want) / (size + 1e-30))
    tol64 = 1.2e-7 if wtype in ROUNDED_VALUES else 1e-12
    got64 = m.partial_sums(a)
    assert got64.dtype == np.float64
    assert np.all(np.abs(got64 - want) <= tol64 * size + 1e-300), np.max(np.abs(got64 - want) / (size + 1e-30))


SHAPES = [(1, 1), (5, 2), (15, 1), (16, 3), (17, 2), (33, 5), (70, 8), (257, 2)]   # rows, 32-column blocks
TOKENS = [1, 2, 3, 4, 5, 8, 9, 17, 33]


@pytest.mark.parametrize("sums", ["float32", "float64"])
@pytest.mark.parametrize("wtype", NEW_TYPES)
def test_every_level_bit_identical_to_scalar(wtype, sums):
    """Ragged row counts, token tiles and their tails, 1 and 2 threads, column offsets that start
    at every place inside a K-quant super-block (so spans of every length)."""
    dtype = np.dtype(sums)
    per = K.ggml_block(wtype)[0] // 32
    checked = 0
    for si, (rows, nb) in enumerate(SHAPES):
        first = (3 * si + 3) % per
        blocks = random_blocks(wtype, rows, -(-(first + nb) // per), seed=si)
        m = Matrix.from_ggml(wtype, blocks, first * 32, nb * 32)
        for ntok in TOKENS:
            a = activations(ntok, nb * 32, seed=si * 100 + ntok)
            K.set_simd_level("scalar")
            ref = product(m, a, dtype)
            for level in LEVELS:
                K.set_simd_level(level)
                for threads in (1, 2):
                    m.threads = threads
                    got = product(m, a, dtype)
                    assert np.array_equal(got, ref), (
                        f"{wtype} level={level} rows={rows} nb={nb} ntok={ntok} threads={threads}: "
                        f"max diff {np.nanmax(np.abs(got - ref)):.3g}")
                    checked += 1
    assert checked >= len(SHAPES) * len(TOKENS) * 2


@pytest.mark.parametrize("wtype", NEW_TYPES)
def test_extreme_bytes_exact(wtype):
    """The largest quants (all bits set) against activations of -128 and 127, and the smallest:
    no int16 partial sum of a SIMD path may saturate."""
    rows, nblk = 19, 2
    values, bb = K.ggml_block(wtype)
    for fill in (0xFF, 0x00, 0xAA):
        blocks = np.full((rows, nblk * bb), fill, np.uint8)
        blocks.reshape(rows, nblk, bb)[:, :, :] = np.where(np.arange(rows)[:, None, None] % 2, fill, 0xFF - fill)
        for off in FP16_FIELDS[wtype]:
            blocks.reshape(rows, nblk, bb)[:, :, off:off + 2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
        m = Matrix.from_ggml(wtype, blocks, 0, nblk * values)
        xq = np.zeros((4, nblk * values // 32, 34), np.uint8)
        xq[:, :, :2] = np.frombuffer(np.float16(0.5).tobytes(), np.uint8)
        xq[0, :, 2:] = 0x80                     # -128
        xq[1, :, 2:] = 0x7F                     # 127
        xq[2, :, 2:] = np.where(np.arange(32) % 2, 0x80, 0x7F)
        xq[3, :, 2:] = np.random.default_rng(fill).integers(0, 256, 32)
        a = Activation(np.zeros((4, nblk * values), np.float32))
        a._q80 = xq.reshape(4, -1)
        x = K.dequantize_q80(a.q80).astype(np.float64)
        want = x @ file_values(wtype, blocks).astype(np.float64).T
        for dtype in (np.float32, np.float64):
            K.set_simd_level("scalar")
            ref = product(m, a, dtype)
            size = np.abs(x) @ term_magnitudes(wtype, blocks).T
            assert np.all(np.abs(ref - want) <= 1e-5 * size + 1e-30)
            for level in LEVELS:
                K.set_simd_level(level)
                assert np.array_equal(product(m, a, dtype), ref), (wtype, fill, level, dtype)


@pytest.mark.parametrize("wtype", NEW_TYPES)
def test_many_matrices_in_one_call(wtype):
    """wq/wk/wv-style: several matrices of one type (ragged, empty ones too) read the same activations."""
    values = K.ggml_block(wtype)[0]
    mats = [Matrix.from_ggml(wtype, random_blocks(wtype, r, 2, seed=r), 32, 2 * values - 64, threads=2)
            for r in (40, 16, 0, 7, 33)]
    for level in LEVELS:
        K.set_simd_level(level)
        for ntok in (1, 5, 17):
            a = activations(ntok, mats[0].cols, seed=ntok)
            outs = matmul_all(mats[:3], a)
            for m, out in zip(mats[:3], outs):
                assert np.array_equal(out, m(a))
            outs = [np.full((ntok, m.rows), np.nan, np.float32) for m in mats]
            K.matmul_packed_many(wtype, [m.data for m in mats], [m.rows for m in mats], mats[0].cols // 32, a.q80,
                                 outs, 2)
            for m, out in zip(mats, outs):
                assert np.array_equal(out, m(a)), (level, m.rows, ntok)


@pytest.mark.parametrize("wtype", NEW_TYPES)
def test_row_parallel_slices_add_up(wtype):
    """A matrix cut into column slices at multiples of 32 (not of 256): the slices hold the
    whole matrix's values, and their float64 partial sums add up to the whole's."""
    values = K.ggml_block(wtype)[0]
    cols = 3 * values if values == 256 else 768
    blocks = random_blocks(wtype, 24, cols // values, seed=8)
    whole = Matrix.from_ggml(wtype, blocks, 0, cols)
    a = activations(3, cols, seed=9)
    for cuts in ([0, 96, cols], [0, 160, 416, cols], [0, 32, 64, 320, 544, cols]):
        parts = [Matrix.from_ggml(wtype, blocks, lo, hi - lo) for lo, hi in zip(cuts, cuts[1:])]
        assert np.array_equal(np.concatenate([p.dequantized() for p in parts], axis=1), whole.dequantized())
        total = sum(p.partial_sums(Activation(np.ascontiguousarray(a.x[:, lo:hi])))
                    for p, lo, hi in zip(parts, cuts, cuts[1:]))
        assert np.allclose(total, whole.partial_sums(a), rtol=1e-12, atol=1e-300)


def test_exactness_test_can_fail():
    """One ulp off in one row's super-block scale is seen by the bit-exact comparison."""
    blocks = random_blocks("q4k", 20, 1, seed=1)
    m = Matrix.from_ggml("q4k", blocks, 0, 256)
    a = activations(3, 256, seed=2)
    K.set_simd_level("scalar")
    ref = product(m, a)
    m.data[64 + 2 * 5] ^= 1          # the first span's header (after the 64-byte prefix): row 5's fp16 d
    for level in LEVELS:
        K.set_simd_level(level)
        got = product(m, a)
        assert not np.array_equal(got, ref), level
        assert np.array_equal(np.delete(got, 5, axis=1), np.delete(ref, 5, axis=1)), level

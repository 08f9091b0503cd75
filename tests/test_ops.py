"""The fused float32 layer steps in C (kernels/tpk_ops.c) against plain numpy / float64."""
import platform

import numpy as np
import pytest

from tpllama import _kernels as K


def rng(seed=0):
    return np.random.default_rng(seed)


def test_rmsnorm_matches_float64():
    x = (rng(1).standard_normal((7, 2048)) * 3).astype(np.float32)
    w = (1 + 0.1 * rng(2).standard_normal(2048)).astype(np.float32)
    x64 = x.astype(np.float64)
    want = x64 / np.sqrt(np.mean(x64 * x64, axis=-1, keepdims=True) + 1e-5) * w
    for threads in (1, 2):
        got = K.rmsnorm(x, w, 1e-5, threads)
        assert np.allclose(got, want, rtol=1e-6, atol=1e-7)
    odd = x[:, :35].copy()   # a width that is not whole vectors
    want = odd.astype(np.float64) / np.sqrt(np.mean(odd.astype(np.float64) ** 2, axis=-1, keepdims=True) + 1e-6) * w[:35]
    assert np.allclose(K.rmsnorm(odd, w[:35].copy(), 1e-6), want, rtol=1e-6, atol=1e-7)


def test_rope_matches_numpy():
    T, heads, hd = 5, 3, 64
    x = rng(3).standard_normal((T, heads * hd)).astype(np.float32)
    angles = np.arange(10, 10 + T)[:, None] * (1.0 / 10000 ** (np.arange(0, hd, 2) / hd))[None, :]
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    xr = x.reshape(T, heads, hd)
    x0, x1 = xr[..., 0::2], xr[..., 1::2]
    want = np.empty_like(xr)
    want[..., 0::2] = x0 * cos[:, None] - x1 * sin[:, None]
    want[..., 1::2] = x0 * sin[:, None] + x1 * cos[:, None]
    got = x.copy()
    K.rope(got, hd, cos, sin)
    assert np.array_equal(got.reshape(T, heads, hd), want)


def test_silu_mul_matches_float64():
    g = np.concatenate([rng(4).standard_normal(5000) * 4, [-100.0, -87.0, 0.0, 30.0, 88.0, 100.0, -1e-30]])
    g = g.astype(np.float32)[None, :]
    u = rng(5).standard_normal(g.shape).astype(np.float32)
    g64 = g.astype(np.float64)
    want = g64 / (1 + np.exp(-g64)) * u
    for threads in (1, 2):
        got = K.silu_mul(g.copy(), u, threads)
        assert np.allclose(got, want, rtol=2e-6, atol=1e-30)
    big = rng(6).standard_normal((3, 200_000)).astype(np.float32)   # parallel path
    ones = np.ones_like(big)
    assert np.array_equal(K.silu_mul(big.copy(), ones, 1), K.silu_mul(big.copy(), ones, 2))


def attention_float64(q, kc, vc, start, kv_of_head, scale, window=0):
    """window > 0: position p sees keys p - window + 1 .. p (HF's sliding_window_overlay:
    kv_idx > q_idx - sliding_window)."""
    T, n_heads, hd = q.shape[0], len(kv_of_head), kc.shape[2]
    q = q.reshape(T, n_heads, hd).astype(np.float64)
    out = np.empty_like(q)
    for t in range(T):
        first = max(0, start + t + 1 - window) if window else 0
        for h in range(n_heads):
            keys = kc[kv_of_head[h], first:start + t + 1].astype(np.float64)
            s = keys @ q[t, h] * scale
            p = np.exp(s - s.max())
            out[t, h] = (p / p.sum()) @ vc[kv_of_head[h], first:start + t + 1]
    return out.reshape(T, -1)


@pytest.mark.parametrize("T,start,n_heads,n_kv,hd", [(1, 0, 4, 2, 64), (1, 37, 8, 2, 64), (6, 0, 4, 4, 32),
                                                     (9, 20, 6, 3, 24), (3, 5, 2, 1, 8), (70, 3, 4, 1, 64)])
def test_attention_matches_float64(T, start, n_heads, n_kv, hd):
    ctx = start + T + 4
    r = rng(T * 100 + start)
    kc = np.zeros((n_kv, ctx, hd), np.float32)
    vc = np.zeros((n_kv, ctx, hd), np.float32)
    kc[:, :start] = r.standard_normal((n_kv, start, hd))
    vc[:, :start] = r.standard_normal((n_kv, start, hd))
    q = r.standard_normal((T, n_heads * hd)).astype(np.float32)
    k = r.standard_normal((T, n_kv * hd)).astype(np.float32)
    v = r.standard_normal((T, n_kv * hd)).astype(np.float32)
    kv_of_head = (np.arange(n_heads) // (n_heads // n_kv)).astype(np.int32)
    scale = np.float32(1 / np.sqrt(hd))
    outs = []
    for threads in (1, 2):
        kc1, vc1 = kc.copy(), vc.copy()
        outs.append(K.attention(q, k, v, kc1, vc1, start, kv_of_head, scale, threads))
        assert np.array_equal(kc1[:, start:start + T], k.reshape(T, n_kv, hd).transpose(1, 0, 2))
        assert np.array_equal(vc1[:, start:start + T], v.reshape(T, n_kv, hd).transpose(1, 0, 2))
        assert not kc1[:, start + T:].any()
    assert np.array_equal(outs[0], outs[1])
    want = attention_float64(q, kc1, vc1, start, kv_of_head, scale)
    assert np.allclose(outs[0], want, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("T,start,window", [(9, 0, 4), (1, 12, 4), (5, 7, 1), (6, 2, 100)])
def test_attention_with_a_sliding_window_matches_float64(T, start, window):
    n_heads, n_kv, hd, ctx = 4, 2, 16, start + T
    r = rng(window * 1000 + T * 10 + start)
    kc = np.zeros((n_kv, ctx, hd), np.float32)
    vc = np.zeros((n_kv, ctx, hd), np.float32)
    kc[:, :start] = r.standard_normal((n_kv, start, hd))
    vc[:, :start] = r.standard_normal((n_kv, start, hd))
    q, k, v = (r.standard_normal((T, n * hd)).astype(np.float32) for n in (n_heads, n_kv, n_kv))
    kv_of_head = (np.arange(n_heads) // 2).astype(np.int32)
    scale = np.float32(1 / np.sqrt(hd))
    out = K.attention(q, k, v, kc, vc, start, kv_of_head, scale, 2, window)
    assert np.allclose(out, attention_float64(q, kc, vc, start, kv_of_head, scale, window), rtol=1e-5, atol=2e-6)
    if start + T > window:   # the window changes the result: it is not ignored
        assert not np.allclose(out, attention_float64(q, kc, vc, start, kv_of_head, scale), rtol=1e-3, atol=1e-3)


def test_attention_checks_bounds():
    kc = np.zeros((1, 4, 8), np.float32)
    q = np.zeros((2, 8), np.float32)
    with pytest.raises(ValueError):
        K.attention(q, q, q, kc, kc.copy(), 3, np.zeros(1, np.int32), np.float32(1.0))
    with pytest.raises(ValueError):
        K.attention(q, q, q, kc, kc.copy(), 0, np.ones(1, np.int32), np.float32(1.0))


def random_attention_case(seed, T, start, n_heads, n_kv, hd):
    """Caches with random keys/values at 0..start-1, and the new rows q, k, v."""
    r = rng(seed)
    ctx = start + T
    kc = np.zeros((n_kv, ctx, hd), np.float32)
    vc = np.zeros((n_kv, ctx, hd), np.float32)
    kc[:, :start] = r.standard_normal((n_kv, start, hd)) * 2   # peaked softmax: chunk maxima differ
    vc[:, :start] = r.standard_normal((n_kv, start, hd))
    q, k, v = (r.standard_normal((T, n * hd)).astype(np.float32) for n in (n_heads, n_kv, n_kv))
    kv_of_head = (np.arange(n_heads) // (n_heads // n_kv)).astype(np.int32)
    return q, k, v, kc, vc, kv_of_head


# Keys are cut into chunks of 256 (one partial softmax each, folded in order) and tiles of 32:
# contexts of several chunks, ends inside a tile and a block of 8 keys, GQA groups of 1, 2 and 8,
# head sizes 64, 128 and ones with a tail (hd % 8).
@pytest.mark.parametrize("start,n_heads,n_kv,hd", [(700, 8, 8, 64), (1000, 16, 2, 64), (300, 8, 1, 128),
                                                   (530, 6, 3, 20), (257, 4, 2, 36), (255, 2, 1, 8)])
def test_attention_over_long_contexts_matches_float64_at_any_thread_count(start, n_heads, n_kv, hd):
    q, k, v, kc, vc, kv_of_head = random_attention_case(start + hd, 1, start, n_heads, n_kv, hd)
    scale = np.float32(1 / np.sqrt(hd))
    outs = [K.attention(q, k, v, kc, vc, start, kv_of_head, scale, threads) for threads in (1, 2, 3)]
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2])
    want = attention_float64(q, kc, vc, start, kv_of_head, scale)
    assert np.allclose(outs[0], want, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("window", [0, 45, 300])
def test_a_position_gives_the_same_bits_in_a_prefill_chunk_as_in_a_decode_step(window):
    """40 positions from 250 (across the chunk boundary at 256, more rows than one block of 16)
    in one call, against each position alone on the same cache: equal bits, at 1 and 2 threads.
    A window of 45 starts inside a tile, one of 300 inside the first chunk."""
    T, start, n_heads, n_kv, hd = 40, 250, 8, 2, 64
    q, k, v, kc, vc, kv_of_head = random_attention_case(window, T, start, n_heads, n_kv, hd)
    scale = np.float32(1 / np.sqrt(hd))
    chunk = K.attention(q, k, v, kc, vc, start, kv_of_head, scale, 2, window)   # fills the cache
    assert np.allclose(chunk, attention_float64(q, kc, vc, start, kv_of_head, scale, window), rtol=1e-5, atol=2e-6)
    for t in range(T):
        for threads in (1, 2):
            one = K.attention(q[t:t + 1], k[t:t + 1], v[t:t + 1], kc, vc, start + t, kv_of_head, scale, threads,
                              window)
            assert np.array_equal(one[0], chunk[t]), (t, threads)
    split = np.concatenate([K.attention(q[a:b], k[a:b], v[a:b], kc, vc, start + a, kv_of_head, scale, 1, window)
                            for a, b in ((0, 3), (3, 29), (29, 40))])   # other prefill chunkings
    assert np.array_equal(split, chunk)


def test_a_very_long_context_in_smaller_blocks_gives_the_same_bits():
    """At 33,000 cached positions the partial results of 16 rows would pass the kernel's bound
    (2^20 floats), so a prefill chunk goes by blocks of 8 rows: still the bits of each position
    alone, and the float64 result."""
    T, start, n_heads, n_kv, hd = 20, 33000, 8, 1, 64
    q, k, v, kc, vc, kv_of_head = random_attention_case(5, T, start, n_heads, n_kv, hd)
    scale = np.float32(1 / np.sqrt(hd))
    chunk = K.attention(q, k, v, kc, vc, start, kv_of_head, scale, 2)
    for t in (0, 7, 8, 19):
        one = K.attention(q[t:t + 1], k[t:t + 1], v[t:t + 1], kc, vc, start + t, kv_of_head, scale, 1)
        assert np.array_equal(one[0], chunk[t]), t
    want = attention_float64(q[:2], kc, vc, start, kv_of_head, scale)
    assert np.allclose(chunk[:2], want, rtol=1e-5, atol=2e-6)


# ---------------------------------------------------------------- float16 KV cache (--kv-type f16)

@pytest.fixture
def best_level_afterwards():
    yield
    K.set_simd_level(K.best_simd_level())


def test_widening_float16_at_every_level_is_numpys_exact_conversion(best_level_afterwards):
    """All 65,536 half floats, at every SIMD level this CPU has: the value numpy gives (NaNs stay NaN)."""
    bits = np.arange(65536, dtype=np.uint16)
    want = bits.view(np.float16).astype(np.float32)
    for level in K.supported_simd_levels():
        K.set_simd_level(level)
        got = K.widen_f16(bits)
        nan = np.isnan(want)
        assert np.array_equal(np.isnan(got), nan), level
        assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32)), level


def test_narrowing_to_float16_rounds_as_numpy_and_saturates():
    """Round to nearest even as numpy does; beyond the largest half float (65504) the cache keeps
    +-65504 where numpy gives +-inf (an infinite key would turn attention into NaN)."""
    r = rng(7)
    x = np.concatenate([r.standard_normal(4000) * 10.0 ** r.integers(-9, 5, 4000),
                        [0.0, -0.0, 1e-8, -6e-8, 65504.0, 65519.0, 65520.0, 1e6, -1e6, np.inf, -np.inf]]).astype(np.float32)
    got = K.narrow_f16(x).view(np.float16)
    want = np.clip(x, -65504, 65504).astype(np.float16)
    assert np.array_equal(got.view(np.uint16), want.view(np.uint16))
    assert np.isnan(K.narrow_f16(np.array([np.nan], np.float32)).view(np.float16)).all()
    with np.errstate(over="ignore"):
        assert np.float32(65520.0).astype(np.float16) == np.inf    # numpy's own overflow, which the cache avoids


@pytest.mark.parametrize("T,start,n_heads,n_kv,hd,window", [(1, 0, 4, 2, 64, 0), (1, 700, 8, 1, 64, 0),
                                                            (5, 300, 8, 2, 128, 0), (9, 20, 6, 3, 24, 0),
                                                            (40, 250, 8, 2, 64, 45), (1, 600, 4, 4, 40, 0)])
def test_attention_over_a_float16_cache_is_the_float32_one_over_the_same_values(T, start, n_heads, n_kv, hd, window):
    """An f16 cache stores the new keys and values rounded (numpy's float16 of them) and attends
    over exactly those values: the same bits as the float32 cache holding the rounded values, at
    1 and 2 threads, and the float64 result over them."""
    q, k, v, kc, vc, kv_of_head = random_attention_case(T + start + hd, T, start, n_heads, n_kv, hd)
    scale = np.float32(1 / np.sqrt(hd))
    kc16, vc16 = kc.astype(np.float16), vc.astype(np.float16)
    k16, v16 = k.astype(np.float16), v.astype(np.float16)
    kc32, vc32 = kc16.astype(np.float32), vc16.astype(np.float32)
    want = K.attention(q, k16.astype(np.float32), v16.astype(np.float32), kc32, vc32, start, kv_of_head, scale, 1,
                       window)
    for threads in (1, 2):
        kc_, vc_ = kc16.copy(), vc16.copy()
        got = K.attention(q, k, v, kc_, vc_, start, kv_of_head, scale, threads, window)
        assert np.array_equal(got, want), threads
        assert np.array_equal(kc_[:, start:start + T], k16.reshape(T, n_kv, hd).transpose(1, 0, 2))
        assert np.array_equal(vc_[:, start:start + T], v16.reshape(T, n_kv, hd).transpose(1, 0, 2))
    assert np.allclose(want, attention_float64(q, kc32, vc32, start, kv_of_head, scale, window), rtol=1e-5, atol=2e-6)


def test_attention_refuses_caches_it_cannot_use():
    q, k, v, kc, vc, kv_of_head = random_attention_case(1, 1, 4, 2, 1, 8)
    scale = np.float32(0.5)
    for bad, why in [(kc.astype(np.float64), "float32 or float16"), (np.asfortranarray(kc), "C-contiguous")]:
        with pytest.raises(ValueError, match=why):
            K.attention(q, k, v, bad, vc, 4, kv_of_head, scale)
    with pytest.raises(ValueError, match="caches differ"):
        K.attention(q, k, v, kc.astype(np.float16), vc, 4, kv_of_head, scale)


# ---------------------------------------------------------------- the runtime's blocked cache layout

def into_blocked_layout(kc, layers, layer, seed):
    """(kv, ctx, hd) kc copied into the layout of tpllama.model.KVCache (kv_cache_array), at
    `layer` of `layers`, every other value random: the whole array and the layer's view."""
    from tpllama.model import kv_cache_array
    n_kv, ctx, hd = kc.shape
    whole = kv_cache_array(1, layers, n_kv, ctx, hd, kc.dtype)
    whole[...] = rng(seed).standard_normal(whole.shape).astype(kc.dtype)
    view = whole[0, :, layer]                                     # (blocks, kv, KV_BLOCK, hd)
    view[...] = as_blocks(kc, view.shape[0])
    return whole, view


def as_blocks(kc, blocks):
    """(kv, ctx, hd) -> (blocks, kv, KV_BLOCK, hd), the positions past ctx zero."""
    n_kv, ctx, hd = kc.shape
    padded = np.zeros((n_kv, blocks * K.KV_BLOCK, hd), kc.dtype)
    padded[:, :ctx] = kc
    return padded.reshape(n_kv, blocks, K.KV_BLOCK, hd).transpose(1, 0, 2, 3)


@pytest.mark.parametrize("T,start,n_heads,n_kv,hd,window,dtype", [
    (1, 700, 8, 2, 64, 0, np.float32), (40, 250, 8, 2, 64, 45, np.float32), (5, 510, 6, 3, 20, 0, np.float32),
    (1, 0, 4, 1, 64, 0, np.float32), (9, 300, 8, 2, 128, 0, np.float16), (3, 1020, 4, 4, 64, 300, np.float16)])
def test_attention_over_the_blocked_cache_layout_gives_the_same_bits(T, start, n_heads, n_kv, hd, window, dtype):
    """The runtime's cache keeps blocks of KV_BLOCK positions with every layer's and kv head's
    block side by side. Through one layer's view of it, attention gives the bits of a (kv, ctx,
    hd) cache holding the same values, at 1 and 2 threads; the new keys and values land at their
    positions and the other layers' values stay as they were."""
    q, k, v, kc, vc, kv_of_head = random_attention_case(T + start, T, start, n_heads, n_kv, hd)
    kc, vc = kc.astype(dtype), vc.astype(dtype)
    scale = np.float32(1 / np.sqrt(hd))
    kc_rows, vc_rows = kc.copy(), vc.copy()
    want = K.attention(q, k, v, kc_rows, vc_rows, start, kv_of_head, scale, 1, window)
    for threads in (1, 2):
        kwhole, kview = into_blocked_layout(kc, 3, 1, seed=threads)
        vwhole, vview = into_blocked_layout(vc, 3, 1, seed=threads + 10)
        others = [w[0, :, [0, 2]].copy() for w in (kwhole, vwhole)]
        got = K.attention(q, k, v, kview, vview, start, kv_of_head, scale, threads, window)
        assert np.array_equal(got, want), threads
        assert np.array_equal(kview, as_blocks(kc_rows, kview.shape[0]))
        assert np.array_equal(vview, as_blocks(vc_rows, vview.shape[0]))
        assert all(np.array_equal(w[0, :, [0, 2]], o) for w, o in zip((kwhole, vwhole), others))


def test_attention_refuses_blocked_caches_it_cannot_use():
    from tpllama.model import kv_cache_array
    q, k, v, kc, vc, kv_of_head = random_attention_case(1, 1, 4, 2, 2, 8)
    scale = np.float32(0.5)
    whole = kv_cache_array(1, 2, 2, 300, 8, np.float32)
    good = whole[0, :, 0]
    assert K.attention(q, k, v, good, whole[0, :, 1], 4, kv_of_head, scale).shape == (1, 16)
    half_block = np.zeros((2, 2, K.KV_BLOCK // 2, 8), np.float32)
    overlapping = np.lib.stride_tricks.as_strided(good, strides=(K.KV_BLOCK * 8 * 4,) + good.strides[1:])
    for bad in (half_block, good[:, :, :, :4], good[:, ::-1], overlapping):
        with pytest.raises(ValueError, match="contiguous within a block"):
            K.attention(q, k, v, bad, bad.copy() if bad is half_block else whole[0, :, 1], 4, kv_of_head, scale)


def test_the_kv_cache_becomes_resident_as_its_positions_fill():
    """A SmolLM2-shaped cache for 16,384 positions (754 MB, keys and values) with its first 300
    positions written in every layer holds about two blocks of positions (2 x 5.9 MB each for
    keys and values, in 2 MiB pages), not the whole context."""
    from tpllama.model import kv_cache_array
    from tpllama.stats import resident_anon_bytes
    layers, n_kv, n_heads, hd, ctx, T = 30, 3, 9, 64, 16384, 300
    before = resident_anon_bytes()
    kc, vc = (kv_cache_array(1, layers, n_kv, ctx, hd, np.float32) for _ in range(2))
    q, k, v = (rng(1).standard_normal((T, n * hd)).astype(np.float32) for n in (n_heads, n_kv, n_kv))
    kv_of_head = (np.arange(n_heads) // 3).astype(np.int32)
    for layer in range(layers):
        K.attention(q, k, v, kc[0, :, layer], vc[0, :, layer], 0, kv_of_head, np.float32(0.125))
    grown = resident_anon_bytes() - before
    block = layers * n_kv * K.KV_BLOCK * hd * 4
    assert kc.nbytes + vc.nbytes > 700e6
    assert T * layers * n_kv * hd * 4 * 2 <= grown <= 2 * (2 * block + 4 * 2**20) + 8 * 2**20, grown


def test_the_per_step_wrappers_refuse_arrays_they_cannot_use():
    """They read numpy pointers directly (no memoryviews): a wrong type, a strided view or a
    read-only output is a ValueError naming the argument, never a wrong result."""
    x = np.ones((2, 64), np.float32)
    w = np.ones(64, np.float32)
    with pytest.raises(ValueError, match="rmsnorm: x must be a C-contiguous 2-d float32 array"):
        K.rmsnorm(x.astype(np.float64), w, 1e-5)
    with pytest.raises(ValueError, match="rmsnorm: x must be a C-contiguous"):
        K.rmsnorm(np.ones((2, 128), np.float32)[:, ::2], w, 1e-5)
    with pytest.raises(ValueError, match="quantize_q80: x must be"):
        K.quantize_q80([[1.0] * 32])
    frozen = x.copy()
    frozen.flags.writeable = False
    cos = np.ones((2, 4), np.float32)
    with pytest.raises(ValueError, match="rope: x must be writable"):
        K.rope(frozen, 8, cos, cos)
    with pytest.raises(ValueError, match="silu_mul: gate must be writable"):
        K.silu_mul(frozen, x)
    xq = K.quantize_q80(x)
    wp = K.pack("q80", K.quantize_q80(np.ones((16, 64), np.float32)))
    with pytest.raises(ValueError, match="matmul_packed: out must be a C-contiguous 2-d float32 array"):
        K.matmul_packed("q80", wp, 16, 2, xq, np.zeros((2, 16), np.int32))
    good = K.matmul_packed("q80", wp, 16, 2, xq, np.zeros((2, 16), np.float32))
    assert np.allclose(good, 64.0, rtol=1e-2)


@pytest.mark.parametrize("T,start,n_heads,n_kv,hd,window,dtype", [
    (1, 4000, 32, 4, 64, 0, np.float32), (1, 700, 8, 8, 64, 0, np.float32), (1, 530, 6, 3, 20, 45, np.float32),
    (7, 250, 8, 2, 128, 0, np.float32), (3, 1020, 4, 4, 64, 300, np.float16), (1, 2, 2, 1, 8, 0, np.float32)])
def test_attention_gives_the_same_bits_at_every_simd_level(T, start, n_heads, n_kv, hd, window, dtype):
    """Parts of attention have their own SIMD code (kernels/tpk_attn_x86.c: the softmax step);
    every level the machine runs gives the generic C's bits: chunk ends inside a block of 8
    keys (the exp's tail), GQA groups of 1 to 8, a window, prefill rows and float16 caches."""
    q, k, v, kc, vc, kv_of_head = random_attention_case(T + start + hd, T, start, n_heads, n_kv, hd)
    kc, vc = kc.astype(dtype), vc.astype(dtype)
    scale = np.float32(1 / np.sqrt(hd))
    levels = K.supported_simd_levels()
    outs, caches = {}, {}
    try:
        for level in levels:
            K.set_simd_level(level)
            caches[level] = kc.copy(), vc.copy()
            outs[level] = K.attention(q, k, v, *caches[level], start, kv_of_head, scale, 2, window)
    finally:
        K.set_simd_level(K.best_simd_level())
    assert len(outs) >= 2 or platform.machine() not in ("x86_64", "AMD64"), levels
    for level, out in outs.items():
        assert np.array_equal(out, outs["scalar"]), level
    kc, vc = (c.astype(np.float32) for c in caches["scalar"])
    want = attention_float64(q, kc, vc, start, kv_of_head, scale, window)
    assert np.allclose(outs["scalar"], want, rtol=1e-5, atol=2e-6)

"""Short passes (decode steps, prompts of up to 16 tokens) run each sublayer's kernels in one C
call (K.FusedLayer, kernels/tpk_layer.c). It makes the same kernel calls as model.py's own
steps, so its logits must be the same bits, for every weight type, split, cache type, window and
slot. model.py's steps are checked against Hugging Face transformers elsewhere
(tests/test_reference_hf.py, test_formats.py, test_mistral.py), and those tests' decode steps
and short prompts now run through the fused layers too."""
import dataclasses

import numpy as np
import pytest

from tpllama import _kernels as K
from tpllama.bench.make_model import SHAPES, write_model
from tpllama.formats import open_model
from tpllama.loader import load_rank_weights
from tpllama.model import FUSED_MAX_ROWS, RankModel, Segment
from tpllama.plan import make_plan, parse_rank_weights


def to_f32(partial):
    return partial.astype(np.float32)


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """The `tiny` shape (dim 128, 4 heads of 32, 2 kv heads, FFN 256) as random-weight files:
    q40; q4km, whose matrices are Q5_0 and Q8_0 side by side (a layer's wq, wk, wv of two types)."""
    folder = tmp_path_factory.mktemp("fused")
    return {t: write_model(str(folder / f"tiny-{t}.gguf"), SHAPES["tiny"], t, quiet=True) for t in ("q40", "q4km", "q80")}


def with_qwen_parts(weights, biases, qk_norms):
    """The layers given random q/k/v biases (Qwen2) and per-head q/k RMSNorm weights (Qwen3)."""
    rng = np.random.default_rng(2)
    hd = weights.config.head_dim

    def vec(n, offset=0.0):
        return (offset + 0.1 * rng.standard_normal(n)).astype(np.float32)

    layers = []
    for lw in weights.layers:
        q, kv = lw.wq.rows, lw.wk.rows
        extra = {}
        if biases:
            extra.update(bq=vec(q), bk=vec(kv), bv=vec(kv))
        if qk_norms:
            extra.update(q_norm=vec(hd, 1.0), k_norm=vec(hd, 1.0))
        layers.append(dataclasses.replace(lw, **extra))
    return dataclasses.replace(weights, layers=layers)


def rank_models(path, ranks=1, rank=0, kv_type="f32", window=0, threads=1, biases=False, qk_norms=False):
    """The same rank's model twice: fused layers on, and off (model.py's own steps)."""
    reader = open_model(path)
    shard = make_plan(reader.config, ranks, parse_rank_weights(None, ranks))[rank]
    weights = load_rank_weights(reader, shard, "auto", threads)
    if window:
        weights = dataclasses.replace(weights, config=dataclasses.replace(weights.config, sliding_window=window))
    if biases or qk_norms:
        weights = with_qwen_parts(weights, biases, qk_norms)
    fused = RankModel(weights, ctx=96, slots=2, kv_type=kv_type)
    plain = RankModel(weights, ctx=96, slots=2, kv_type=kv_type)
    plain.fused = None
    assert fused.fused is not None, "a plain Llama of packed matrices runs fused"
    return fused, plain


def passes(model, reduce=to_f32):
    """Logits of a 20-token prompt (model.py's steps either way), a 5-token one and 12 decode
    steps in slot 0, then a 3-token prompt and decode steps in slot 1 (each pass's last row),
    then passes of both sequences (every row)."""
    rng = np.random.default_rng(1)
    out, pos = [], 0
    for n in [20, 5] + [1] * 12:
        tokens = rng.integers(3, 500, n)
        out.append(model.logits(model.forward(tokens, pos, reduce)[-1:]))
        pos += n
    pos1 = 0
    for n in [3, 1, 1, FUSED_MAX_ROWS - 2]:
        tokens = rng.integers(3, 500, n)
        out.append(model.logits(model.forward(tokens, [Segment(1, pos1, n)], reduce)[-1:]))
        pos1 += n
    for n0, n1 in [(1, 1), (1, 1), (2, 3), (1, 1)]:     # both sequences in one pass, as tpllama.batching steps
        tokens = rng.integers(3, 500, n0 + n1)
        hidden = model.forward(tokens, [Segment(1, pos1, n1), Segment(0, pos, n0)], reduce)
        out.append(model.logits(hidden))
        pos, pos1 = pos + n0, pos1 + n1
    return out


@pytest.mark.parametrize("wtype,ranks,kv_type,window,threads,qwen", [
    ("q40", 1, "f32", 0, 1, ""),
    ("q40", 1, "f16", 0, 2, ""),
    ("q4km", 1, "f32", 0, 1, ""),
    ("q80", 1, "f32", 5, 1, ""),
    ("q40", 2, "f32", 0, 1, ""),
    ("q4km", 2, "f16", 7, 2, ""),
    ("q40", 1, "f32", 0, 1, "biases"),
    ("q80", 2, "f32", 0, 1, "biases"),
    ("q40", 1, "f32", 0, 2, "qk_norms"),
    ("q4km", 2, "f32", 0, 1, "biases,qk_norms"),
])
def test_fused_layers_give_the_same_bits_as_the_models_own_steps(tiny_files, wtype, ranks, kv_type, window, threads,
                                                                  qwen):
    for rank in range(ranks):
        fused, plain = rank_models(tiny_files[wtype], ranks, rank, kv_type, window, threads,
                                   biases="biases" in qwen, qk_norms="qk_norms" in qwen)
        before, reduces = fused.phase_ns.sum(), []
        got, want = passes(fused, lambda p: reduces.append(1) or to_f32(p)), passes(plain)
        assert fused.phase_ns.sum() > before, "the fused layers ran"
        # one rank holds the whole model: its layers run in one C call, rounding the partial sums as
        # its all-reduce would; ranks of a split return to Python for each sublayer's all-reduce
        assert fused.whole_model == (ranks == 1)
        long_prompt_reduces = 2 * fused.config.n_layers
        assert len(reduces) == (long_prompt_reduces if ranks == 1 else 2 * fused.config.n_layers * len(got))
        assert len(got) == 22
        assert plain.phase_ns.sum() == 0
        for i, (g, w) in enumerate(zip(got, want)):
            assert np.array_equal(g, w), f"pass {i}: largest difference {np.abs(g - w).max()}"
        assert np.array_equal(fused.cache.k, plain.cache.k) and np.array_equal(fused.cache.v, plain.cache.v)


def test_fused_layers_time_their_kernels_by_kind(tiny_files):
    fused, _ = rank_models(tiny_files["q40"])
    fused.forward(np.array([5, 6, 7]), 0, to_f32)
    spent = dict(zip(K.FUSED_PHASES, fused.phase_ns))
    assert set(spent) == {"norms", "quantize", "matmuls", "rope", "attention", "silu"}
    assert all(ns > 0 for ns in spent.values()), spent


def test_models_the_fused_layers_cannot_run_keep_the_models_own_steps(stories_gguf):
    """stories260K's heads of 8 and FFN of 172 make wo and w2 f32 matrices: no fused layers."""
    reader = open_model(str(stories_gguf))
    shard = make_plan(reader.config, 1, parse_rank_weights(None, 1))[0]
    model = RankModel(load_rank_weights(reader, shard, "q80"), ctx=32)
    assert model.fused is None
    model.forward(np.array([1, 403, 407]), 0, to_f32)
    assert model.phase_ns.sum() == 0


def test_a_fused_layer_refuses_rows_and_positions_it_cannot_take(tiny_files):
    fused, _ = rank_models(tiny_files["q40"])
    layer = fused.fused[0]
    dim, half = fused.config.dim, fused.config.head_dim // 2
    cos, sin = np.ones((1, half), np.float32), np.zeros((1, half), np.float32)
    with pytest.raises(ValueError, match="x must be"):
        layer.feed_forward(np.zeros((FUSED_MAX_ROWS + 1, dim), np.float32), None)
    with pytest.raises(ValueError, match="x must be"):
        layer.feed_forward(np.zeros((1, dim + 1), np.float32), None)
    with pytest.raises(ValueError, match="add must be"):
        layer.feed_forward(np.zeros((1, dim), np.float32), np.zeros((2, dim), np.float32))
    def segs(*rows):
        return np.array(rows, dtype=np.int64)

    one = np.zeros((1, dim), np.float32)
    with pytest.raises(ValueError, match="do not fit the cache"):
        layer.attention(one, None, segs((2, 0, 1)), cos, sin)      # slots 0 and 1 only
    with pytest.raises(ValueError, match="do not fit the cache"):
        layer.attention(one, None, segs((0, fused.cache.k.shape[1] * K.KV_BLOCK, 1)), cos, sin)
    with pytest.raises(ValueError, match="cover 2 rows, not 1"):
        layer.attention(one, None, segs((0, 0, 1), (1, 0, 1)), cos, sin)
    with pytest.raises(ValueError, match=r"must be \(n, 3\)"):
        layer.attention(one, None, np.zeros((1, 2), np.int64), cos, sin)
    with pytest.raises(ValueError, match="cos/sin"):
        layer.attention(np.zeros((2, dim), np.float32), None, segs((0, 0, 2)), cos, sin)


def test_fused_layers_still_walk_mapped_layers_in_order(tiny_files):
    """Mapped weights (shardcache.MappedLayers) ask for layer i+1's pages as a loop over the layers
    reaches layer i; a one-rank model whose layers are not a plain list returns to Python per layer."""
    class Walked(list):
        def __iter__(self):
            for i in range(len(self)):
                seen.append(i)
                yield self[i]

    seen = []
    fused, plain = rank_models(tiny_files["q40"])
    fused.w.layers = Walked(fused.w.layers)
    again = RankModel(fused.w, ctx=96, slots=2)
    assert again.fused is not None and seen == [], "making the fused layers asks for no layer's pages"
    got = fused.logits(fused.forward(np.array([5, 6]), 0, to_f32)[-1:])
    assert seen == list(range(fused.config.n_layers)) and fused.phase_ns.sum() > 0
    want = plain.logits(plain.forward(np.array([5, 6]), 0, to_f32)[-1:])     # (the same weights: walked again)
    assert np.array_equal(got, want)

"""The benchmark models: deterministic random-weight GGUF files of real Llama shapes."""
import hashlib
import os

import numpy as np
import pytest
from gguf import GGUFReader

import tpllama
from tpllama.bench import make_model as mm


def md5(path):
    return hashlib.md5(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("bench") / "tiny.gguf")
    assert mm.main(["--shape", "tiny", "-o", path, "-q"]) == 0
    return path


def test_written_once_and_deterministic(tiny, tmp_path):
    first = md5(tiny)
    mtime = os.path.getmtime(tiny)
    mm.ensure_model(tiny, "tiny", quiet=True)                 # cached: not rewritten
    assert os.path.getmtime(tiny) == mtime
    again = str(tmp_path / "again.gguf")
    mm.ensure_model(again, "tiny", quiet=True)
    assert md5(again) == first
    other = str(tmp_path / "seed1.gguf")
    mm.ensure_model(other, "tiny", seed=1, quiet=True)
    assert md5(other) != first
    mm.ensure_model(other, "tiny", seed=0, quiet=True)        # different metadata: rewritten
    assert md5(other) == first


def test_metadata_vocab_and_tensors(tiny):
    r = GGUFReader(tiny)
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("tokenizer.ggml.tokens")}
    shape = mm.SHAPES["tiny"]
    assert f["general.architecture"] == "llama"
    assert f["llama.embedding_length"] == shape.dim and f["llama.block_count"] == shape.layers
    assert f["llama.attention.head_count_kv"] == shape.kv_heads and f["llama.vocab_size"] == shape.vocab
    assert f["tokenizer.ggml.model"] == "llama"
    assert f["tokenizer.ggml.bos_token_id"] == 1 and f["tokenizer.ggml.eos_token_id"] == 2
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == shape.vocab == len(set(tokens))
    assert tokens[:3] == ["<unk>", "<s>", "</s>"] and tokens[3] == "<0x00>" and tokens[258] == "<0xFF>"
    assert tokens[259] == "\u2581" and "\u2581e" in tokens
    types = list(f["tokenizer.ggml.token_type"])
    assert types[3:259] == [6] * 256
    scores = np.array(f["tokenizer.ggml.scores"][259:])
    assert np.all(np.diff(scores) < 0)
    kinds = {t.name: t.tensor_type.name for t in r.tensors}
    assert kinds["blk.0.attn_q.weight"] == "Q4_0" and kinds["blk.0.attn_norm.weight"] == "F32"
    assert [t.name for t in r.tensors] == [n for n, _ in mm.tensor_list(shape)]


def test_loads_and_runs(tiny):
    model = tpllama.load(tiny, tokenizer="none", threads=1, ctx_size=32)
    assert model.config.dim == 128 and model.config.n_kv_heads == 2
    logits = model.forward([1, 300, 301, 5], 0)
    assert logits.shape == (4, 512) and np.all(np.isfinite(logits))
    assert 0.01 < logits.std() < 10


def test_shapes_are_the_real_ones():
    s = mm.SHAPES
    assert (s["tinyllama-1.1b"].dim, s["tinyllama-1.1b"].ffn, s["tinyllama-1.1b"].layers) == (2048, 5632, 22)
    assert (s["llama3-8b"].kv_heads, s["llama3-8b"].vocab) == (8, 128256)
    assert (s["smollm2-135m"].heads, s["smollm2-135m"].kv_heads, s["smollm2-135m"].dim) == (9, 3, 576)
    tokens, scores, types = mm.make_vocab(128256)
    assert len(set(tokens)) == 128256


# ---------------------------------------------------------------- Q4_K_M files

def _relative_rms(approx, exact):
    return float(np.sqrt(np.mean((approx - exact) ** 2) / np.mean(exact ** 2)))


def _awkward_rows(rng):
    """Rows of 512 values: Gaussian, all positive, all negative, sub-blocks of different sizes
    (within 8x of each other: a K-quant's 6-bit sub-block scales cover that), zeros."""
    gauss = rng.standard_normal((6, 512)).astype(np.float32) * 0.02
    positive = np.abs(gauss[:2]) + 0.01
    negative = -np.abs(gauss[:2]) - 0.01
    spread = gauss[:2] * np.repeat(np.float32(2.0) ** rng.integers(-3, 1, 32), 16).astype(np.float32)
    return np.concatenate([gauss, positive, negative, spread, np.zeros((1, 512), np.float32)])


@pytest.mark.parametrize("quantize, ggml, block_bytes, reference", [
    (mm.quantize_q4_k, "Q4_K", 144, "Q4_0"),     # 4 bits: no worse than GGML's own Q4_0
    (mm.quantize_q6_k, "Q6_K", 210, "Q5_0"),     # 6 bits: better than GGML's 5-bit Q5_0
])
def test_k_quant_blocks_dequantize_to_their_input(quantize, ggml, block_bytes, reference):
    import gguf.quants
    from gguf import GGMLQuantizationType as T
    x = _awkward_rows(np.random.default_rng(7))
    blocks = quantize(x)
    assert blocks.dtype == np.uint8 and blocks.shape == (x.shape[0], 2 * block_bytes)
    back = gguf.quants.dequantize(blocks, T[ggml])               # gguf-py's reader of the same bytes
    assert back.shape == x.shape
    assert np.array_equal(back[-1], x[-1])                       # zeros stay exactly zero
    assert np.all(back[6:8] >= 0) and np.all(back[8:10] <= 0)    # one-signed rows keep their sign
    for rows in (slice(0, 6), slice(6, 8), slice(8, 10), slice(10, 12)):
        theirs = gguf.quants.dequantize(gguf.quants.quantize(x[rows], T[reference]), T[reference])
        assert _relative_rms(back[rows], x[rows]) <= _relative_rms(theirs, x[rows]) * 1.01, rows
    bound = {"Q4_K": 0.1, "Q6_K": 0.03}[ggml]                   # ~ one step / sqrt(12) of range / 15 (63)
    assert _relative_rms(back[:6], x[:6]) < bound


def test_q4km_follows_llama_cpp_layout():
    tiny_llama = mm.tensor_types(mm.SHAPES["tinyllama-1.1b"], "q4km")
    more_bits = [0, 1, 4, 7, 10, 13, 16, 19, 20, 21]           # llama.cpp's use_more_bits for 22 layers
    for i in range(22):
        want = "Q6_K" if i in more_bits else "Q4_K"
        assert tiny_llama[f"blk.{i}.attn_v.weight"] == want and tiny_llama[f"blk.{i}.ffn_down.weight"] == want
        assert {tiny_llama[f"blk.{i}.{k}.weight"] for k in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up")} == {"Q4_K"}
        assert tiny_llama[f"blk.{i}.attn_norm.weight"] == "F32"
    assert tiny_llama["token_embd.weight"] == "Q4_K" and tiny_llama["output.weight"] == "Q6_K"
    smol = mm.tensor_types(mm.SHAPES["smollm2-135m"], "q4km")   # rows of 576: not whole super-blocks
    assert smol["token_embd.weight"] == "Q8_0"                   # tied: the output's type, Q6_K's fallback
    assert smol["blk.0.attn_q.weight"] == "Q5_0" and smol["blk.0.attn_v.weight"] == "Q8_0"
    assert smol["blk.4.ffn_down.weight"] == "Q4_K"               # 1536 columns; not a use_more_bits layer
    assert smol["blk.2.ffn_down.weight"] == "Q6_K"               # the first 30 // 8 layers are


K_SHAPE = mm.Shape("tiny-k", 256, 512, 3, 4, 2, 512, ctx=64)   # rows of 256 and 512: K-quants fit


def test_q4km_file_holds_the_weights_and_runs(tmp_path):
    import gguf.quants
    path = mm.write_model(str(tmp_path / "k.gguf"), K_SHAPE, "q4km", quiet=True)
    reader = GGUFReader(path)
    assert reader.fields["general.file_type"].contents() == 15
    types = mm.tensor_types(K_SHAPE, "q4km")
    assert {t.name: t.tensor_type.name for t in reader.tensors} == types
    assert set(types.values()) == {"F32", "Q4_K", "Q6_K"}
    for t in reader.tensors:
        dims = dict(mm.tensor_list(K_SHAPE))[t.name]
        exact = np.concatenate(list(mm._slabs(t.name, dims, 0))).reshape(dims)
        stored = gguf.quants.dequantize(t.data, t.tensor_type).reshape(dims)
        assert _relative_rms(stored, exact) < {"F32": 1e-7, "Q4_K": 0.1, "Q6_K": 0.03}[t.tensor_type.name], t.name
    # tpllama runs it (native q4k/q6k at the default weight type) closer to the float model than
    # the same weights written as Q4_0
    paths = [path] + [mm.write_model(str(tmp_path / f"{t}.gguf"), K_SHAPE, t, quiet=True) for t in ("q40", "f32")]
    tokens = [1, 300, 301, 5, 77]
    q4km, q40, f32 = [tpllama.load(p, tokenizer="none", threads=1, ctx_size=16).forward(tokens, 0) for p in paths]

    def cosine(a, b):
        return np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert np.all(cosine(q4km, f32) > cosine(q40, f32)) and np.all(cosine(q4km, f32) > 0.95), cosine(q4km, f32)


def test_q4km_falls_back_where_rows_are_not_super_blocks(tmp_path):
    path = mm.write_model(str(tmp_path / "t.gguf"), mm.SHAPES["tiny"], "q4km", quiet=True)
    kinds = {t.tensor_type.name for t in GGUFReader(path).tensors}
    assert kinds == {"F32", "Q5_0", "Q8_0", "Q4_K", "Q6_K"}      # dim 128 falls back; ffn_down (256) does not
    logits = tpllama.load(path, tokenizer="none", threads=1, ctx_size=16).forward([1, 300, 5], 0)
    assert np.all(np.isfinite(logits))


def test_f16_file_holds_the_f32_files_values_rounded(tmp_path):
    """An f16 model (as most published checkpoints are converted) is the f32 model's weights in half precision."""
    f32, f16 = (GGUFReader(mm.write_model(str(tmp_path / f"{t}.gguf"), K_SHAPE, t, quiet=True)) for t in ("f32", "f16"))
    assert [t.name for t in f16.tensors] == [t.name for t in f32.tensors]
    for a, b in zip(f32.tensors, f16.tensors):
        want = np.asarray(a.data)
        if want.ndim == 2:
            assert b.tensor_type.name == "F16"
            want = want.astype(np.float16)
        assert np.array_equal(np.asarray(b.data), want), a.name

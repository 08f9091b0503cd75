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

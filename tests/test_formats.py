"""Model file readers (GGUF, HF safetensors, llama2.c) against independent references.

* GGUF files are written here from a tiny HF LlamaForCausalLM the way llama.cpp's
  convert_hf_to_gguf.py does (tests/gguf_writer.py), in F32, F16, BF16, Q8_0, Q4_0 and Q4_1,
  tied and untied: tpllama's logits must equal HF transformers' own on the same (rounded)
  weights; Q4_0/Q8_0 blocks must reach the q40/q80 runtime matrices byte for byte.
* K-quants (Q4_K, Q5_K, Q6_K, and Q2_K/Q3_K) are written as valid random blocks: every row
  and column slice must equal the same slice of gguf.quants.dequantize of the whole tensor.
* Opening a model reads no tensor data; a slice read touches only that slice.
* llama2.c: stories260K.bin against the same model converted to GGUF by llama.cpp.
* Everything else gets a one-line ModelFormatError naming the file, and the CLI prints just
  that line.
"""
from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter, quants

import tpllama
from tpllama.errors import ModelFormatError, TpllamaError
from tpllama.formats import open_model
from tpllama.loader import load_matrix
from tpllama import _kernels as K

from conftest import REPO, SHARED_MODELS
from gguf_writer import (T, encode, gguf_tensor_bytes, gguf_tensor_table, hf_model_to_gguf, hf_to_gguf_tensors,
                         llama_permute, llama_unpermute, random_kquant, round_trip, write_gguf)

def assert_close_logits(ours, ref, what, rel=1e-4):
    scale = np.abs(ref).max()
    err = np.abs(ours - ref).max()
    assert err <= rel * scale, f"{what}: max abs error {err:.3g} > {rel:g} x logit scale {scale:.3g}"


def run_forward(model, calls):
    return np.concatenate([model.forward(ids, start) for ids, start, _ in calls])


# =====================================================================================
# 1. GGUF written from a tiny HF model, in every plain and legacy-quant type
# =====================================================================================

HF_SPECS = {
    # untied, GQA 4/2, rope base other than 10000
    "untied": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=320, rope_theta=500000.0, tie_word_embeddings=False),
    # tied embeddings (no output.weight in the GGUF), GQA 8/2
    "tied": dict(hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=320, rope_theta=10000.0, tie_word_embeddings=True),
}
PLAIN_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
PROMPT = [5, 17, 250, 3, 99, 42, 7, 300, 128, 64, 1, 2]
DECODE_STEPS = 3


def _transformers():
    torch = pytest.importorskip("torch", reason="the HF reference needs torch")
    transformers = pytest.importorskip("transformers", reason="the HF reference needs transformers")
    return torch, transformers


class HFReference:
    """A random LlamaForCausalLM (weights large enough that attention is far from uniform, so a
    wrong rotary order or head mapping shows in the logits) and its float32 state dict."""

    def __init__(self, spec: dict, seed: int = 0):
        torch, transformers = _transformers()
        self.torch = torch
        self.cfg = dict(spec, max_position_embeddings=256, rms_norm_eps=1e-5)
        torch.manual_seed(seed)
        self.model = transformers.LlamaForCausalLM(transformers.LlamaConfig(initializer_range=0.2, **self.cfg)).eval()
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                if "norm" in name:
                    p.copy_(1.0 + 0.2 * torch.randn_like(p))
        self.state = {k: v.detach().numpy().copy() for k, v in self.model.state_dict().items()
                      if "rotary_emb" not in k}

    def logits_with(self, weights: dict):
        """HF's logits (prompt, then greedy decode steps) with these float32 HF-named weights."""
        from tiny_models import reference_logits
        self.model.load_state_dict({k: self.torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()})
        if self.cfg["tie_word_embeddings"]:
            assert self.model.lm_head.weight.data_ptr() == self.model.model.embed_tokens.weight.data_ptr()
        return reference_logits(self.model, [t % self.cfg["vocab_size"] for t in PROMPT], DECODE_STEPS)


@pytest.fixture(scope="module", params=sorted(HF_SPECS))
def hf_ref(request):
    return HFReference(HF_SPECS[request.param])


def load_f32(path):
    return tpllama.load(str(path), weight_type="f32", tokenizer="none", ctx_size=32, threads=1)


@pytest.mark.parametrize("qtype", PLAIN_TYPES)
def test_gguf_logits_match_hf_on_the_same_weights(hf_ref, qtype, tmp_path):
    qt = T[qtype]
    path = hf_model_to_gguf(tmp_path / f"tiny-{qtype}.gguf", hf_ref.state, hf_ref.cfg, qt)
    reader = open_model(path)
    c = reader.config
    cfg = hf_ref.cfg
    assert (c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.max_seq_len) == (
        cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
        cfg["num_key_value_heads"], cfg["vocab_size"], cfg["max_position_embeddings"])
    assert c.rope_theta == cfg["rope_theta"] and c.norm_eps == pytest.approx(1e-5)
    assert c.tie_embeddings == cfg["tie_word_embeddings"] == (not reader.has("output.weight"))
    assert reader.dtype("blk.1.ffn_down.weight") == qtype and reader.dtype("blk.0.attn_norm.weight") == "F32"
    # the reference: HF on the weights the file holds (rounded through gguf.quants), not the originals
    calls = hf_ref.logits_with({k: round_trip(v, qt) for k, v in hf_ref.state.items()})
    ours = run_forward(load_f32(path), calls)
    assert_close_logits(ours, np.concatenate([c[2] for c in calls]), f"{qtype} GGUF vs HF")


def test_gguf_reference_can_fail(hf_ref, tmp_path):
    """The comparison above is tight enough to see a missing rotary permutation and Q4 rounding."""
    unpermuted = dict(hf_ref.state)
    for k in unpermuted:   # undo the permutation the writer applies: GGUF then holds HF's row order
        if k.endswith(("q_proj.weight", "k_proj.weight")):
            heads = hf_ref.cfg["num_attention_heads"] if "q_proj" in k else hf_ref.cfg["num_key_value_heads"]
            unpermuted[k] = llama_unpermute(unpermuted[k], heads)
    calls = hf_ref.logits_with(hf_ref.state)
    ref = np.concatenate([c[2] for c in calls])
    wrong_rope = run_forward(load_f32(hf_model_to_gguf(tmp_path / "noperm.gguf", unpermuted, hf_ref.cfg, T.F32)), calls)
    assert np.abs(wrong_rope - ref).max() > 1e-2 * np.abs(ref).max()
    q4 = run_forward(load_f32(hf_model_to_gguf(tmp_path / "q4.gguf", hf_ref.state, hf_ref.cfg, T.Q4_0)), calls)
    assert np.abs(q4 - ref).max() > 1e-3 * np.abs(ref).max()


@pytest.mark.parametrize("alignment", [64, 1024])
def test_gguf_custom_alignment(tmp_path, alignment):
    cfg, state = small_hf_state()
    tensors = {n: encode(w, T.Q8_0) for n, w in hf_to_gguf_tensors(state, cfg).items()}
    path = write_gguf(tmp_path / "aligned.gguf", tensors, dim=64, hidden=128, layers=1, heads=4, kv_heads=4,
                      vocab=64, alignment=alignment)
    reader = open_model(path)
    assert reader.metadata["general.alignment"] == alignment
    for name, w in hf_to_gguf_tensors(state, cfg).items():
        assert np.array_equal(reader.read(name), round_trip(w, T.Q8_0)), name


def test_llama_permute_matches_tpllama_hf_reader_order():
    """The writer's permutation (llama.cpp's) and the HF reader's row order are the same map."""
    from tpllama.formats.base import rotary_interleave_permutation
    for heads, hd in ((4, 32), (2, 8), (8, 64)):
        w = np.arange(heads * hd, dtype=np.float32)[:, None]
        assert np.array_equal(llama_permute(w, heads, heads)[:, 0],
                              w[rotary_interleave_permutation(heads, hd), 0])
        assert np.array_equal(llama_unpermute(llama_permute(w, heads), heads), w)


def file_blocks(path, name):
    """A tensor's bytes as stored in the file, (rows, bytes per row), found by the tests' own
    parser of the GGUF spec (cross-checked against gguf.GGUFReader in test_spec_parser_...)."""
    return gguf_tensor_bytes(path, name)


def test_spec_parser_agrees_with_gguf_reader(hf_ref, tmp_path):
    path = hf_model_to_gguf(tmp_path / "q41.gguf", hf_ref.state, hf_ref.cfg, T.Q4_1, alignment=64)
    table = gguf_tensor_table(path)
    tensors = GGUFReader(str(path)).tensors
    assert len(table) == len(tensors) == 2 + 9 * hf_ref.cfg["num_hidden_layers"] + (not hf_ref.cfg["tie_word_embeddings"])
    for t in tensors:
        ne, tname, offset, nbytes = table[t.name]
        assert (ne, tname, offset, nbytes) == (tuple(int(n) for n in t.shape), t.tensor_type.name,
                                               int(t.data_offset), int(t.n_bytes))
        assert np.array_equal(gguf_tensor_bytes(path, t.name).reshape(-1), np.asarray(t.data).view(np.uint8).reshape(-1))


def test_string_arrays_read_as_gguf_reader_reads_them(tmp_path):
    """The metadata reader decodes a vocabulary's strings all at once (tpllama/formats/gguf.py):
    empty strings, multibyte characters, a NUL inside a string and strings of 128+ bytes must
    come back exactly as gguf-py's own reader gives them."""
    from tpllama.formats.gguf import read_gguf_metadata
    arrays = {
        "test.plain": ["a", "", "\u2581the", "é語🙂", "x" * 300, "", "<0x0A>"],
        "test.with_nul": ["a", "b\x00c", "", "\x00"],
        "test.one": ["only"],
        "test.empty_strings": ["", "", ""],
    }
    path = tmp_path / "strings.gguf"
    w = GGUFWriter(str(path), "llama")
    for key, values in arrays.items():
        w.add_array(key, values)
    w.add_tensor("t", np.zeros(32, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    theirs = GGUFReader(str(path))
    ours = read_gguf_metadata(str(path))
    for key, values in arrays.items():
        field = theirs.fields[key]
        assert [bytes(field.parts[i]).decode("utf-8") for i in field.data] == values
        assert ours[key] == values, key


@pytest.mark.parametrize("qtype,runtime,asked", [("Q4_0", "q40", "q40"), ("Q8_0", "q80", "q80"),
                                                  ("Q4_0", "q40", "auto"), ("Q8_0", "q80", "auto")])
def test_blocks_pass_through_bit_for_bit(hf_ref, qtype, runtime, asked, tmp_path):
    path = hf_model_to_gguf(tmp_path / f"tiny-{qtype}.gguf", hf_ref.state, hf_ref.cfg, T[qtype])
    model = tpllama.load(str(path), weight_type=asked, tokenizer="none", ctx_size=32, threads=1)
    w = model.rank_model.w
    for i, layer in enumerate(w.layers):
        for attr, role in (("wq", "attn_q"), ("wk", "attn_k"), ("wv", "attn_v"), ("wo", "attn_output"),
                           ("w1", "ffn_gate"), ("w3", "ffn_up"), ("w2", "ffn_down")):
            m = getattr(layer, attr)
            assert m.wtype == runtime
            assert np.array_equal(m.blocks(), file_blocks(path, f"blk.{i}.{role}.weight")), f"{attr} of layer {i}"
    out_name = "token_embd.weight" if hf_ref.cfg["tie_word_embeddings"] else "output.weight"
    assert w.output.wtype == runtime and np.array_equal(w.output.blocks(), file_blocks(path, out_name))
    # column slices on block boundaries pass through too (a rank's share of wo / w2) ...
    reader = model.reader
    name = "blk.0.ffn_down.weight"
    bb = {"q40": 18, "q80": 34}[runtime]
    part = load_matrix(reader, name, slice(8, 40), slice(64, 192), runtime)
    assert np.array_equal(part.blocks(), file_blocks(path, name)[8:40, 64 // 32 * bb:192 // 32 * bb])
    # ... and a slice that cuts blocks is re-quantized from the dequantized slice instead
    part = load_matrix(reader, name, slice(0, 4), slice(16, 80), runtime)
    quantize = {"q40": K.quantize_q40, "q80": K.quantize_q80}[runtime]
    assert np.array_equal(part.blocks(), quantize(reader.read(name, slice(0, 4), slice(16, 80))))
    # a type that differs from the file's is converted, never passed through
    other = "q80" if runtime == "q40" else "q40"
    m = load_matrix(reader, name, slice(None), slice(None), other)
    assert m.wtype == other and m.blocks().shape[1] == reader.shape(name)[1] // 32 * {"q40": 18, "q80": 34}[other]


# =====================================================================================
# 2. K-quants: valid random blocks, sliced reads against gguf.quants.dequantize
# =====================================================================================

K_TYPES = ("Q4_K", "Q5_K", "Q6_K", "Q2_K", "Q3_K")
# typical |weight| per unit of the fp16 super-block scale, to give weights of about 0.1
K_MAGNITUDE = {"Q4_K": 250, "Q5_K": 500, "Q6_K": 1000, "Q2_K": 12, "Q3_K": 60}


def kquant(rows, cols, qtype, rng, target=0.1):
    return random_kquant(rows, cols, T[qtype], rng, scale=target / K_MAGNITUDE[qtype])


@pytest.fixture(scope="module")
def kquant_file(tmp_path_factory):
    """A small llama GGUF that also holds one (7, 1024) tensor per K-quant type (extra tensors are
    ignored by the model but readable); returns (path, {name: (qtype, the raw bytes written)})."""
    rng = np.random.default_rng(7)
    raw = {f"k.{q}": (q, kquant(7, 1024, q, rng)) for q in K_TYPES}
    path = tmp_path_factory.mktemp("kq") / "kquants.gguf"
    small_gguf(path, replace={name: (data, T[q]) for name, (q, data) in raw.items()})
    return path, raw


ROW_SLICES = [slice(None), slice(3, 4), [5], [6, 0, 2], slice(2, 7), np.array([1, 1, 4])]
COL_SLICES = [slice(None), slice(0, 256), slice(100, 356), slice(255, 257), slice(300, 301), slice(17, 1000),
              slice(512, 1024), slice(511, 1024), slice(0, 1), slice(1023, 1024), slice(256, 768), slice(130, 140)]


@pytest.mark.parametrize("qtype", K_TYPES)
def test_kquant_slices_equal_whole_tensor_dequantized(kquant_file, qtype):
    path, raw = kquant_file
    name = f"k.{qtype}"
    full = quants.dequantize(raw[name][1], T[qtype]).astype(np.float32)   # from the bytes the test wrote
    assert full.shape == (7, 1024) and np.isfinite(full).all() and 0.01 < np.abs(full).mean() < 10
    for reader in (open_model(path),):
        assert reader.dtype(name) == qtype and reader.shape(name) == (7, 1024)
        assert np.array_equal(reader.read(name), full)
        for rows in ROW_SLICES:
            for cols in COL_SLICES:
                got = reader.read(name, rows, cols)
                want = full[rows][:, cols]
                assert got.dtype == np.float32 and got.shape == want.shape, (rows, cols)
                assert np.array_equal(got, want), f"{qtype} rows {rows} cols {cols}"
        for row in (0, 4, -1):                       # one row as an int comes back 1-D
            assert np.array_equal(reader.read(name, row, slice(200, 600)), full[row, 200:600])


# A Q4_K_M-like mix (llama.cpp's choice: attn_v, ffn_down and output in Q6_K, the rest Q4_K, norms F32)
KMODEL = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=96, rope_theta=10000.0, tie_word_embeddings=False,
              max_position_embeddings=256, rms_norm_eps=1e-5)


def q4_k_m_type(name):
    if name.endswith(("attn_v.weight", "ffn_down.weight")) or name == "output.weight":
        return "Q6_K"
    return "Q4_K"


def write_kquant_model(path, rng, type_of=q4_k_m_type, tied=False):
    """A model of random K-quant tensors; returns {GGUF name: float32 weights it holds}."""
    c = KMODEL
    d, h, hd = c["hidden_size"], c["intermediate_size"], c["hidden_size"] // c["num_attention_heads"]
    shapes = {"token_embd.weight": (c["vocab_size"], d), "output_norm.weight": (d,)}
    if not tied:
        shapes["output.weight"] = (c["vocab_size"], d)
    for i in range(c["num_hidden_layers"]):
        shapes.update({f"blk.{i}.attn_norm.weight": (d,), f"blk.{i}.ffn_norm.weight": (d,),
                       f"blk.{i}.attn_q.weight": (c["num_attention_heads"] * hd, d),
                       f"blk.{i}.attn_k.weight": (c["num_key_value_heads"] * hd, d),
                       f"blk.{i}.attn_v.weight": (c["num_key_value_heads"] * hd, d),
                       f"blk.{i}.attn_output.weight": (d, c["num_attention_heads"] * hd),
                       f"blk.{i}.ffn_gate.weight": (h, d), f"blk.{i}.ffn_up.weight": (h, d),
                       f"blk.{i}.ffn_down.weight": (d, h)})
    tensors, values = {}, {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            values[name] = (1.0 + 0.2 * rng.standard_normal(shape)).astype(np.float32)
            tensors[name] = (values[name], None)
        else:
            q = type_of(name)
            data = kquant(shape[0], shape[1], q, rng, target=0.05)
            tensors[name] = (data, T[q])
            values[name] = quants.dequantize(data, T[q]).astype(np.float32)
    write_gguf(path, tensors, dim=d, hidden=h, layers=c["num_hidden_layers"], heads=c["num_attention_heads"],
               kv_heads=c["num_key_value_heads"], vocab=c["vocab_size"], context=256)
    return values


def test_q4_k_m_like_model_loads_runs_and_matches_hf(tmp_path):
    values = write_kquant_model(tmp_path / "q4km.gguf", np.random.default_rng(3))
    reader = open_model(tmp_path / "q4km.gguf")
    assert reader.dtype("blk.0.attn_q.weight") == "Q4_K" and reader.dtype("blk.0.ffn_down.weight") == "Q6_K"
    assert reader.dtype("output.weight") == "Q6_K" and reader.dtype("output_norm.weight") == "F32"
    # q40 runtime: K-quant blocks are converted (dequantized, re-quantized) into q40 matrices
    model = tpllama.load(str(tmp_path / "q4km.gguf"), weight_type="q40", tokenizer="none", ctx_size=32, threads=1)
    layer = model.rank_model.w.layers[1]
    assert all(m.wtype == "q40" for m in (layer.wq, layer.wk, layer.wv, layer.wo, layer.w1, layer.w2, layer.w3))
    assert model.rank_model.w.output.wtype == "q40"
    assert np.array_equal(layer.w2.blocks(), K.quantize_q40(values["blk.1.ffn_down.weight"]))
    # a rank's share of a row-parallel matrix: columns that start and end inside 256-blocks
    part = load_matrix(reader, "blk.0.attn_output.weight", slice(None), slice(64, 192), "q40")
    assert np.array_equal(part.blocks(), K.quantize_q40(np.ascontiguousarray(values["blk.0.attn_output.weight"][:, 64:192])))
    part = load_matrix(reader, "blk.0.ffn_down.weight", slice(16, 48), slice(96, 416), "f32")
    assert np.array_equal(part.data, values["blk.0.ffn_down.weight"][16:48, 96:416])
    logits_q40 = model.forward([1, 2, 3, 4], 0)
    assert logits_q40.shape == (4, KMODEL["vocab_size"]) and np.isfinite(logits_q40).all()
    # f32 runtime against HF on the dequantized weights (q/k rows back in HF's order)
    ref = HFReference(KMODEL)
    hf_weights = {}
    for hf_name in ref.state:
        from gguf_writer import gguf_name
        w = values[gguf_name(hf_name)]
        if hf_name.endswith("q_proj.weight"):
            w = llama_unpermute(w, KMODEL["num_attention_heads"])
        elif hf_name.endswith("k_proj.weight"):
            w = llama_unpermute(w, KMODEL["num_key_value_heads"])
        hf_weights[hf_name] = w
    calls = ref.logits_with(hf_weights)
    ours = run_forward(load_f32(tmp_path / "q4km.gguf"), calls)
    assert_close_logits(ours, np.concatenate([c[2] for c in calls]), "Q4_K_M-like GGUF vs HF")


@pytest.mark.parametrize("mix", ["Q5_K", "Q6_K", "Q4_K"])
def test_all_kquant_tied_model_loads(tmp_path, mix):
    write_kquant_model(tmp_path / "k.gguf", np.random.default_rng(4), type_of=lambda n: mix, tied=True)
    model = tpllama.load(str(tmp_path / "k.gguf"), weight_type="q40", tokenizer="none", ctx_size=16, threads=1)
    assert model.config.tie_embeddings and model.rank_model.w.output.wtype == "q40"
    assert np.isfinite(model.forward([3, 1, 4], 0)).all()


# =====================================================================================
# 3. Lazy, sliced reads
# =====================================================================================

def _bases(a):
    while a is not None:
        yield a
        a = getattr(a, "base", None)


def assert_views_of_a_file_map(reader):
    for name, t in reader.tensors.items():
        assert not t.raw.flags.owndata, f"{name} owns a copy of its bytes"
        assert any(isinstance(b, mmap.mmap) for b in _bases(t.raw)), f"{name} is not a view of a memory map"


def test_gguf_tensors_are_views_of_the_memory_map(hf_ref, tmp_path):
    path = hf_model_to_gguf(tmp_path / "m.gguf", hf_ref.state, hf_ref.cfg, T.Q4_1)
    assert_views_of_a_file_map(open_model(path))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hf_tensors_are_views_of_the_memory_map(tmp_path, dtype):
    torch, _ = _transformers()
    from safetensors.torch import save_file
    cfg, state = small_hf_state()
    directory = write_hf_dir(tmp_path / "hf", cfg, {k: torch.from_numpy(v).to(getattr(torch, dtype)) for k, v in state.items()},
                             save_file)
    reader = open_model(directory)
    assert_views_of_a_file_map(reader)
    assert reader.dtype("token_embd.weight") == {"float32": "F32", "bfloat16": "BF16"}[dtype]


def test_llama2c_tensors_are_views_of_the_memory_map(stories_bin):
    assert_views_of_a_file_map(open_model(stories_bin))


def _rss():
    import psutil
    return psutil.Process().memory_info().rss


def write_sparse_gguf(path, dim=4096, vocab=65536, hidden=256):
    """A GGUF of 1.3 GB of (all-zero, sparse) F32 tensors: only the header is written."""
    w = GGUFWriter(str(path), "llama")
    for k, v in dict(context_length=256, embedding_length=dim, block_count=1, feed_forward_length=hidden,
                     head_count=32, head_count_kv=32, vocab_size=vocab).items():
        getattr(w, f"add_{k}")(v)
    shapes = {"token_embd.weight": (vocab, dim), "output_norm.weight": (dim,), "blk.0.attn_norm.weight": (dim,),
              "blk.0.ffn_norm.weight": (dim,), "blk.0.attn_q.weight": (dim, dim), "blk.0.attn_k.weight": (dim, dim),
              "blk.0.attn_v.weight": (dim, dim), "blk.0.attn_output.weight": (dim, dim),
              "blk.0.ffn_gate.weight": (hidden, dim), "blk.0.ffn_up.weight": (hidden, dim),
              "blk.0.ffn_down.weight": (dim, hidden)}
    for name, shape in shapes.items():
        w.add_tensor_info(name, shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    fout = w.fout[0]
    pad = lambda n: -(-n // w.data_alignment) * w.data_alignment   # noqa: E731
    total = pad(fout.tell()) + sum(pad(int(np.prod(s)) * 4) for s in shapes.values())
    fout.truncate(total)
    w.close()
    return total


def test_open_reads_no_tensor_data(tmp_path):
    path = tmp_path / "big.gguf"
    size = write_sparse_gguf(path)
    assert size > 1_000_000_000
    rss0 = _rss()
    t0 = time.perf_counter()
    reader = open_model(path)
    opened = time.perf_counter() - t0
    grown = _rss() - rss0
    assert opened < 5, f"open_model took {opened:.1f} s on a {size >> 20} MiB file"
    assert grown < 64 << 20, f"RSS grew by {grown >> 20} MiB opening a {size >> 20} MiB file"
    assert reader.shape("token_embd.weight") == (65536, 4096)
    rows = reader.read("token_embd.weight", rows=[3, 60000], cols=slice(100, 200))
    assert rows.shape == (2, 100) and not rows.any()
    assert _rss() - rss0 < 64 << 20


class Recorder:
    """Wraps a tensor's dequantize to record the raw bytes each read hands it."""

    def __init__(self, reader, name):
        from dataclasses import replace
        self.calls = []
        t = reader.tensor(name)
        inner = t.dtype.dequantize

        def dequantize(raw):
            self.calls.append(raw.shape)
            return inner(raw)
        t.dtype = replace(t.dtype, dequantize=dequantize)


def test_slice_reads_touch_only_their_rows_and_blocks(kquant_file, tmp_path):
    path, raw = kquant_file
    reader = open_model(path)
    for qtype in ("Q4_K", "Q6_K"):
        bb = quants.GGML_QUANT_SIZES[T[qtype]][1]
        rec = Recorder(reader, f"k.{qtype}")
        reader.read(f"k.{qtype}", slice(2, 4), slice(300, 301))     # one row pair, inside block 1
        reader.read(f"k.{qtype}", [6], slice(255, 257))              # straddles blocks 0 and 1
        reader.read(f"k.{qtype}", [0, 5, 1], slice(512, 1024))       # the last two blocks
        assert rec.calls == [(2, bb), (1, 2 * bb), (3, 2 * bb)]
    # plain types: only the asked-for columns' bytes
    write_sparse_gguf(tmp_path / "big.gguf")
    big = open_model(tmp_path / "big.gguf")
    rec = Recorder(big, "token_embd.weight")
    big.read("token_embd.weight", [7], slice(10, 20))
    assert rec.calls == [(1, 40)]
    # a row range of a tensor is a view, not a copy
    t = big.tensor("token_embd.weight")
    assert np.shares_memory(t.raw[100:200], t.raw) and not t.raw[100:200].flags.owndata


# =====================================================================================
# 4. llama2.c checkpoints
# =====================================================================================

def test_stories_bin_and_gguf_hold_the_same_tensors(stories_bin, stories_gguf):
    b, g = open_model(stories_bin), open_model(stories_gguf)
    assert b.format_name == "llama2.c" and g.format_name == "GGUF"
    shared = set(b.tensors) & set(g.tensors)
    assert set(b.tensors) == shared and set(g.tensors) - shared == {"output.weight"}
    assert len(shared) == 2 + 9 * 5
    for name in sorted(shared):
        assert np.array_equal(b.read(name), g.read(name)), name
    assert np.array_equal(g.read("output.weight"), b.read("token_embd.weight"))   # shared classifier


def test_stories_config_from_each_files_keys(stories_bin, stories_gguf):
    c = open_model(stories_bin).config
    assert (c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.max_seq_len) == \
        (64, 172, 5, 8, 4, 512, 512)
    assert c.tie_embeddings and c.head_dim == 8 and c.rope_theta == 10000.0
    g = open_model(stories_gguf).config
    assert (g.dim, g.hidden_dim, g.n_layers, g.n_heads, g.n_kv_heads, g.vocab_size) == (64, 172, 5, 8, 4, 512)
    assert g.max_seq_len == 2048 and not g.tie_embeddings   # what the GGUF's own keys say


def test_stories_bin_and_gguf_give_the_same_logits(stories_bin, stories_gguf):
    ids = [1, 403, 407, 261, 378]          # "Once upon a time" with BOS
    lb = load_f32(stories_bin).forward(ids, 0)
    lg = load_f32(stories_gguf).forward(ids, 0)
    assert np.abs(lb - lg).max() <= 1e-5 * np.abs(lb).max()
    assert int(lb[-1].argmax()) == 432      # the model's known first greedy token


def test_token_ids_outside_the_vocabulary_are_refused(stories_bin):
    model = load_f32(stories_bin)
    for bad in ([-1], [512], [3, 700]):
        with pytest.raises(TpllamaError, match=r"token_ids\[\d\]=-?\d+: expected a token id from 0 to 511"):
            model.forward(bad, 0)
    assert model.forward([1, 511], 0).shape == (2, 512)


def test_llama2c_unshared_classifier(stories_bin, tmp_path):
    """A negative vocab_size in the header: the classifier follows the weights."""
    data = bytearray(stories_bin.read_bytes())
    header = np.frombuffer(bytes(data[:28]), dtype="<i4").copy()
    header[5] = -header[5]
    classifier = np.random.default_rng(0).standard_normal((512, 64)).astype("<f4")
    path = tmp_path / "unshared.bin"
    path.write_bytes(header.tobytes() + bytes(data[28:]) + classifier.tobytes())
    r = open_model(path)
    assert not r.config.tie_embeddings and r.config.vocab_size == 512
    assert np.array_equal(r.read("output.weight"), classifier)
    assert np.array_equal(r.read("token_embd.weight"), open_model(stories_bin).read("token_embd.weight"))


def test_smollm2_q4_1_gguf(smollm2):
    """The default model (real llama.cpp Q4_1 file, Q8_0 embeddings): config from its keys,
    sliced reads equal gguf.quants.dequantize of the bytes gguf's own reader finds."""
    reader = open_model(smollm2)
    c = reader.config
    assert (c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.hidden_dim, c.vocab_size) == (30, 576, 9, 3, 1536, 49152)
    assert c.tie_embeddings and c.rope_theta == 100000.0 and not reader.has("output.weight")
    assert reader.dtype("token_embd.weight") == "Q8_0" and reader.dtype("blk.3.ffn_down.weight") == "Q4_1"
    for name, rows, cols in (("blk.3.ffn_down.weight", slice(100, 110), slice(64, 800)),
                             ("token_embd.weight", [0, 49151, 7], slice(None))):
        blocks = file_blocks(smollm2, name)[rows]
        want = quants.dequantize(blocks, T[reader.dtype(name)])[:, cols]
        assert np.array_equal(reader.read(name, rows, cols), want), name
    # at the default weight type the Q8_0 output keeps the file's blocks and the Q4_1 matrices
    # the file's values (native q41); forcing q80 re-quantizes them
    out = load_matrix(reader, "token_embd.weight", slice(4096, 4200), slice(None), "q80")
    assert np.array_equal(out.blocks(), file_blocks(smollm2, "token_embd.weight")[4096:4200])
    own = load_matrix(reader, "blk.3.ffn_down.weight", slice(100, 110), slice(64, 800), "q41")
    assert own.wtype == "q41"
    want = quants.dequantize(file_blocks(smollm2, "blk.3.ffn_down.weight")[100:110], T["Q4_1"])[:, 64:800]
    assert np.array_equal(own.dequantized(), want)
    down = load_matrix(reader, "blk.3.ffn_down.weight", slice(100, 110), slice(64, 800), "q80")
    assert np.array_equal(down.blocks(), K.quantize_q80(reader.read("blk.3.ffn_down.weight", slice(100, 110), slice(64, 800))))


# =====================================================================================
# 5. Errors: one line naming the file and what was expected; the CLI prints just that
# =====================================================================================

def small_hf_state(vocab=64, dim=64, hidden=128, layers=1, heads=4, kv_heads=4):
    rng = np.random.default_rng(0)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": dim,
           "intermediate_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
           "num_key_value_heads": kv_heads, "vocab_size": vocab, "hidden_act": "silu",
           "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
           "tie_word_embeddings": False}
    hd = dim // heads
    state = {"model.embed_tokens.weight": (vocab, dim), "model.norm.weight": (dim,), "lm_head.weight": (vocab, dim)}
    for i in range(layers):
        p = f"model.layers.{i}."
        state.update({p + "input_layernorm.weight": (dim,), p + "post_attention_layernorm.weight": (dim,),
                      p + "self_attn.q_proj.weight": (heads * hd, dim), p + "self_attn.k_proj.weight": (kv_heads * hd, dim),
                      p + "self_attn.v_proj.weight": (kv_heads * hd, dim), p + "self_attn.o_proj.weight": (dim, heads * hd),
                      p + "mlp.gate_proj.weight": (hidden, dim), p + "mlp.up_proj.weight": (hidden, dim),
                      p + "mlp.down_proj.weight": (dim, hidden)})
    return cfg, {k: (0.1 * rng.standard_normal(s)).astype(np.float32) for k, s in state.items()}


def write_hf_dir(directory, cfg, state, save_file=None):
    if save_file is None:
        from safetensors.numpy import save_file
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg))
    save_file(state, str(directory / "model.safetensors"))
    return directory


def small_gguf(path, arch="llama", replace=None, drop=(), extra=None, **kw):
    """A valid 1-layer llama GGUF (F32), with some tensors replaced or dropped."""
    cfg, state = small_hf_state()
    tensors = {n: encode(w, T.F32) for n, w in hf_to_gguf_tensors(state, cfg).items() if n not in drop}
    tensors.update(replace or {})
    args = dict(dim=64, hidden=128, layers=1, heads=4, kv_heads=4, vocab=64, arch=arch, extra=extra)
    args.update(kw)
    return write_gguf(path, tensors, **args)


def _cut(src, dst, n):
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[:n] if n >= 0 else data[:len(data) + n])
    return dst


def _gguf_data_start(path):
    r = GGUFReader(str(path))
    return min(int(t.data_offset) for t in r.tensors)


def _bad_hf(d, **changes):
    cfg, state = small_hf_state()
    cfg.update(changes)
    return write_hf_dir(d, cfg, state)


def _sharded_hf_missing_shard(d):
    from safetensors.numpy import save_file
    cfg, state = small_hf_state()
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    names = sorted(state)
    half = {n: state[n] for n in names[: len(names) // 2]}
    save_file(half, str(d / "model-00001-of-00002.safetensors"))
    weight_map = {n: ("model-00001-of-00002.safetensors" if n in half else "model-00002-of-00002.safetensors")
                  for n in names}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d / "model-00002-of-00002.safetensors", d


def _unsupported_type(path, qtype):
    bs, bb = quants.GGML_QUANT_SIZES[T[qtype]]
    data = np.zeros((64, 256 // bs * bb), dtype=np.uint8)
    return small_gguf(path, replace={"blk.0.ffn_gate.weight": (data, T[qtype])}, hidden=256,
                      drop=("blk.0.ffn_up.weight", "blk.0.ffn_down.weight"))


def _patched_gguf(path, patch):
    """A valid small GGUF, then patch(reader) edits its header in place (GGUFReader mode r+)."""
    small_gguf(path)
    r = GGUFReader(str(path), "r+")
    patch(r)
    r.data.flush()
    del r
    return path


def _set_tensor_type(r, name, type_number):
    [t] = [t for t in r.tensors if t.name == name]
    t.field.parts[4][0] = type_number


def _set_version(path, version):
    small_gguf(path)
    data = bytearray(path.read_bytes())
    data[4:8] = version.to_bytes(4, "little")
    path.write_bytes(bytes(data))
    return path


def _hf_truncated(d):
    directory = _bad_hf(d)
    st = directory / "model.safetensors"
    st.write_bytes(st.read_bytes()[:-100])
    return st, directory


def _hf_edited_header(d, edit):
    """A valid HF directory whose safetensors header is then edited by edit(header dict)."""
    import struct
    directory = _bad_hf(d)
    st = directory / "model.safetensors"
    data = st.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    st.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])
    return st, directory


def _llama2c_resized(src, dst, delta):
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[:len(data) + delta] if delta < 0 else data + bytes(delta))
    return dst


# name -> (builder(tmp_path) -> path (or (path to name in the message, path to open)), regex the message must match)
ERROR_CASES = {
    "nonexistent": (lambda d: d / "no-such-model.gguf", r"no such file"),
    "dir-without-config": (lambda d: (d / "empty-dir").mkdir() or d / "empty-dir", r"no config\.json"),
    "png-named-gguf": (lambda d: (d / "image.gguf").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200)) and d / "image.gguf",
                       r"expected a GGUF file"),
    "random-bytes-gguf": (lambda d: (d / "noise.gguf").write_bytes(np.random.default_rng(1).bytes(4096))
                          and d / "noise.gguf", r"expected a GGUF file"),
    "empty-file": (lambda d: (d / "empty.gguf").write_bytes(b"") or d / "empty.gguf", r"empty|expected a GGUF"),
    "gguf-cut-in-magic": (lambda d: _cut(small_gguf(d / "ok.gguf"), d / "cut.gguf", 6), r"truncated"),
    "gguf-cut-in-header": (lambda d: _cut(small_gguf(d / "ok.gguf"), d / "cut.gguf", 300), r"truncated"),
    "gguf-cut-in-tensor-info": (lambda d: _cut(small_gguf(d / "ok.gguf"), d / "cut.gguf",
                                               _gguf_data_start(d / "ok.gguf") - 40), r"truncated"),
    "gguf-cut-in-data": (lambda d: _cut(small_gguf(d / "ok.gguf"), d / "cut.gguf", -1000), r"truncated"),
    "gguf-cut-by-one-byte": (lambda d: _cut(small_gguf(d / "ok.gguf"), d / "cut.gguf", -1), r"truncated"),
    "gguf-arch-gpt2": (lambda d: small_gguf(d / "gpt2.gguf", arch="gpt2"),
                       r"architecture 'gpt2' is not supported \(supported: llama, qwen2, qwen3, qwen3moe\)"),
    "gguf-qwen2-without-biases": (lambda d: small_gguf(d / "qwen2.gguf", arch="qwen2"),
                                  r"blk\.0\.attn_q\.bias.*missing.*qwen2"),
    "gguf-arch-falcon": (lambda d: small_gguf(d / "falcon.gguf", arch="falcon"), r"architecture 'falcon'"),
    "gguf-moe-llama": (lambda d: small_gguf(d / "mixtral.gguf", extra={"llama.expert_count": 8,
                                                                     "llama.expert_used_count": 2}),
                       r"expert"),
    "gguf-type-IQ2_XXS": (lambda d: _unsupported_type(d / "iq2.gguf", "IQ2_XXS"), r"IQ2_XXS.*not supported"),
    "gguf-type-I32": (lambda d: _unsupported_type(d / "i32.gguf", "I32"), r"I32.*not supported"),
    "gguf-type-IQ4_NL": (lambda d: _unsupported_type(d / "iq4.gguf", "IQ4_NL"), r"IQ4_NL.*not supported"),
    "gguf-missing-tensor": (lambda d: small_gguf(d / "missing.gguf", drop=("blk.0.ffn_up.weight",)),
                            r"blk\.0\.ffn_up\.weight.*missing"),
    "gguf-wrong-shape": (lambda d: small_gguf(d / "shape.gguf", replace={
        "blk.0.attn_q.weight": (np.zeros((64, 256), np.float32), None)}), r"attn_q.*shape"),
    "gguf-embedding-vs-vocab": (lambda d: small_gguf(d / "vocab.gguf", vocab=80), r"token_embd.*shape"),
    "gguf-legacy-ggjt": (lambda d: (d / "old.bin").write_bytes(b"tjgg" + bytes(64)) and d / "old.bin", r"GGML/GGJT.*GGUF"),
    "gguf-legacy-ggml": (lambda d: (d / "old.ggml").write_bytes(b"lmgg" + bytes(64)) and d / "old.ggml", r"GGML/GGJT.*GGUF"),
    "hf-gelu": (lambda d: _bad_hf(d / "gelu", hidden_act="gelu"), r"hidden_act 'gelu'.*expected 'silu'"),
    "hf-gemma2": (lambda d: _bad_hf(d / "gemma2", model_type="gemma2", architectures=["Gemma2ForCausalLM"],
                                    sliding_window=4096),
                  r"model_type 'gemma2' \(Gemma2ForCausalLM\) is not supported \(supported: llama, qwen2, qwen3, qwen3moe\)"),
    "hf-missing-shard": (lambda d: _sharded_hf_missing_shard(d / "sharded"), r"missing.*index\.json"),
    "hf-truncated-safetensors": (_hf_truncated, r"truncated"),
    "hf-shape-vs-offsets": (lambda d: _hf_edited_header(
        d / "offsets", lambda h: h["model.norm.weight"].update(shape=[128])), r"model\.norm\.weight.*spans"),
    "hf-dtype-F64": (lambda d: _hf_edited_header(
        d / "f64", lambda h: h["model.norm.weight"].update(dtype="F64", shape=[32])), r"F64.*expected F32, F16 or BF16"),
    "hf-vocab-vs-embedding": (lambda d: _bad_hf(d / "vocab", vocab_size=100), r"token_embd.*shape.*vocab 100"),
    "llama2c-heads-do-not-divide-dim": (lambda d: (d / "odd.bin").write_bytes(
        np.array([64, 172, 5, 7, 7, 512, 512], "<i4").tobytes() + bytes(4096)) and d / "odd.bin", r"not a llama2\.c"),
    "gguf-type-number-99": (lambda d: _patched_gguf(d / "t99.gguf", lambda r: _set_tensor_type(r, "blk.0.attn_q.weight", 99)),
                            r"99"),
    "gguf-version-4": (lambda d: _set_version(d / "v4.gguf", 4), r"version 4"),
    # once reported as a tensor's shape, or as partial rotary embeddings when the rope key kept the old head size
    "gguf-heads-do-not-divide-dim": (lambda d: small_gguf(d / "heads.gguf", heads=5, kv_heads=5),
                                     r"embedding_length' is 64, not a multiple of 'llama\.attention\.head_count' 5"),
    "gguf-heads-do-not-divide-dim-rope-kept": (lambda d: small_gguf(d / "heads7.gguf", heads=7, kv_heads=7,
                                                                    extra={"llama.rope.dimension_count": 16}),
                                               r"not a multiple of 'llama\.attention\.head_count' 7"),
    "gguf-rope-freqs-length": (lambda d: small_gguf(d / "rf.gguf", replace={
        "rope_freqs.weight": (np.ones(5, np.float32), None)}), r"rope_freqs.*expected 8"),
    "zip-named-bin": (lambda d: (d / "pytorch_model.bin").write_bytes(b"PK\x03\x04" + bytes(100))
                      and d / "pytorch_model.bin", r"zip.*expected"),
    "hf-no-weights": (lambda d: (d / "cfg-only").mkdir() or (d / "cfg-only" / "config.json").write_text(
        json.dumps(small_hf_state()[0])) and d / "cfg-only", r"no model\.safetensors"),
    "hf-bad-config-json": (lambda d: (d / "badjson").mkdir() or (d / "badjson" / "config.json").write_text("{oops")
                           and d / "badjson", r"config\.json"),
    "hf-rope-linear": (lambda d: _bad_hf(d / "linear", rope_scaling={"rope_type": "linear", "factor": 2.0}),
                       r"rope_scaling.*linear"),
    "llama2c-truncated": (lambda d: _llama2c_resized(shared_stories(), d / "stories-cut.bin", -100), r"truncated"),
    "llama2c-extra-bytes": (lambda d: _llama2c_resized(shared_stories(), d / "stories-long.bin", 64),
                            r"64 bytes more than the llama2\.c header"),
    "random-bytes-bin": (lambda d: (d / "noise.bin").write_bytes(np.random.default_rng(2).bytes(4096))
                         and d / "noise.bin", r"expected"),
}


def shared_stories():
    from conftest import shared_model
    return shared_model("stories260K", "stories260K.bin")


def build_case(name, d):
    d.mkdir(parents=True, exist_ok=True)
    built = ERROR_CASES[name][0](d)
    if isinstance(built, tuple):    # (path the message must name, path to open)
        return built
    return built, built


def assert_one_line_naming(message, named, pattern):
    import re
    assert "\n" not in message.strip(), f"not one line: {message!r}"
    assert str(named) in message, f"{message!r} does not name {named}"
    assert re.search(pattern, message), f"{message!r} does not match {pattern!r}"


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_bad_model_raises_one_line_error(case, tmp_path):
    named, path = build_case(case, tmp_path)
    with pytest.raises(ModelFormatError) as e:
        open_model(str(path))
    assert_one_line_naming(str(e.value), named, ERROR_CASES[case][1])


def test_formats_md_quotes_the_unsupported_architecture_errors():
    """docs/formats.md shows the exact lines a user sees for an architecture tpllama does not run."""
    from tpllama.config import ModelConfig
    docs = (REPO / "docs" / "formats.md").read_text()
    for make in (lambda: ModelConfig.from_gguf({"general.architecture": "gemma2"}, source="model.gguf"),
                 lambda: ModelConfig.from_hf({"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2"},
                                             source="model/config.json")):
        with pytest.raises(ModelFormatError) as e:
            make()
        assert f"error: {e.value}\n" in docs


def test_vocab_only_gguf_opens_but_does_not_load(tmp_path):
    """llama.cpp's vocab-only GGUFs (llama keys, a vocabulary, no tensors) open for their keys;
    loading weights from one is a one-line error."""
    from tpllama.errors import TpllamaError
    path = write_gguf(tmp_path / "vocab-only.gguf", {}, dim=64, hidden=128, layers=1, heads=4, kv_heads=4, vocab=64)
    reader = open_model(path)
    assert reader.config.dim == 64 and not reader.tensors
    with pytest.raises(TpllamaError) as e:
        tpllama.load(str(path), tokenizer="none", weight_type="f32", ctx_size=16, threads=1)
    assert_one_line_naming(str(e.value), path, r"token_embd\.weight.*missing")


def test_tokenizer_vocab_must_match_the_model(stories_bin):
    from tpllama.errors import TpllamaError
    from tpllama.tokenizer import load_tokenizer
    spm = shared_model_or_skip("llama2-tokenizer", "tokenizer.model")
    with pytest.raises(ModelFormatError) as e:
        load_tokenizer(open_model(stories_bin), str(spm))
    assert_one_line_naming(str(e.value), spm, r"32000 tokens.*512")
    assert str(stories_bin) in str(e.value)
    with pytest.raises(TpllamaError) as e:     # through the library: the same message
        tpllama.load(str(stories_bin), tokenizer=str(spm), weight_type="f32", ctx_size=16, threads=1)
    assert_one_line_naming(str(e.value), spm, r"32000 tokens.*512")
    # the model's own tokenizer fits
    assert load_tokenizer(open_model(stories_bin), str(stories_bin.parent / "tok512.bin")).vocab_size == 512


def shared_model_or_skip(*parts):
    from conftest import shared_model
    return shared_model(*parts)


# One of each kind through the real command line (every case above goes through the same cli.run)
CLI_CASES = ["nonexistent", "dir-without-config", "png-named-gguf", "empty-file", "gguf-cut-in-header",
             "gguf-cut-in-data", "gguf-arch-gpt2", "gguf-qwen2-without-biases", "gguf-type-IQ2_XXS", "gguf-wrong-shape",
             "gguf-legacy-ggjt", "hf-gelu", "hf-gemma2", "hf-missing-shard", "llama2c-truncated",
             "llama2c-extra-bytes", "tokenizer-mismatch"]


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """Every bad model through `python -m tpllama.generate`, the processes run side by side."""
    root = tmp_path_factory.mktemp("cli")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TPLLAMA_DEBUG", None)
    procs = {}
    for case in CLI_CASES:
        try:
            if case == "tokenizer-mismatch":
                if not (SHARED_MODELS / "llama2-tokenizer" / "tokenizer.model").exists() or \
                        not (SHARED_MODELS / "stories260K" / "stories260K.bin").exists():
                    procs[case] = "skip"
                    continue
                named = SHARED_MODELS / "llama2-tokenizer" / "tokenizer.model"
                argv = ["-m", str(SHARED_MODELS / "stories260K" / "stories260K.bin"), "--tokenizer", str(named)]
            else:
                named, path = build_case(case, root / case)
                argv = ["-m", str(path)]
        except pytest.skip.Exception:
            procs[case] = "skip"
            continue
        cmd = [sys.executable, "-m", "tpllama.generate", *argv, "-p", "hi", "-n", "1", "-c", "16"]
        procs[case] = (named, subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE,
                                               stderr=subprocess.PIPE, text=True))
    results = {}
    for case, p in procs.items():
        if p == "skip":
            results[case] = None
            continue
        named, proc = p
        out, err = proc.communicate(timeout=120)
        results[case] = (named, proc.returncode, out, err)
    return results


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_prints_one_error_line(cli_runs, case):
    if cli_runs[case] is None:
        pytest.skip(f"{SHARED_MODELS} is absent")
    named, rc, out, err = cli_runs[case]
    # progress lines (the model, the memory plan) may come first; the failure is one "error:" line
    lines = [line for line in err.strip().splitlines() if "error" in line.lower()]
    assert rc != 0
    assert "Traceback" not in err and len(lines) == 1, f"stderr: {err!r}"
    assert lines[0].startswith("error: "), lines[0]
    pattern = ERROR_CASES[case][1] if case in ERROR_CASES else r"32000 tokens"
    assert_one_line_naming(lines[0], named, pattern)

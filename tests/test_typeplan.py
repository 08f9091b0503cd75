"""Which runtime type each matrix gets (typeplan.py): the file's own type where kernels exist,
never a coarser one by default, and decided on the whole matrix so that every rank count
multiplies the same values. Pure Python: fake readers stand in for model files."""
import dataclasses

import pytest

from tpllama import typeplan, wtypes
from tpllama.config import ModelConfig
from tpllama.errors import TpllamaError
from tpllama.plan import make_plan, matrix_bytes, weight_bytes
from tpllama.typeplan import choose_types, ffn_unit, lowers, quantizable, uniform_types

SMOLLM2 = ModelConfig(dim=576, hidden_dim=1536, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152,
                      max_seq_len=8192, tie_embeddings=True)
STORIES = ModelConfig(dim=64, hidden_dim=172, n_layers=5, n_heads=8, n_kv_heads=4, vocab_size=512, max_seq_len=512)
HEAD48 = ModelConfig(dim=192, hidden_dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=320, max_seq_len=256)


class FakeFile:
    """A model file as typeplan sees it: config, tensor names, GGML type per tensor."""

    def __init__(self, config, matrix_type, output_type=None, per_tensor=None):
        self.config = config
        self.types = dict(per_tensor or {})
        self.matrix_type, self.output_type = matrix_type, output_type or matrix_type

    def has(self, name):
        return name == "token_embd.weight" or not self.config.tie_embeddings

    def dtype(self, name):
        if name in self.types:
            return self.types[name]
        return self.output_type if name in ("output.weight", "token_embd.weight") else self.matrix_type


def kinds_of(tp, kind):
    return {tp.runtime(n) for n, k in tp.kinds.items() if k == kind}


def test_auto_keeps_the_files_own_types():
    """SmolLM2's file: Q4_1 matrices and a Q8_0 output all run in their own kernels."""
    tp = choose_types(FakeFile(SMOLLM2, "Q4_1", "Q8_0"))
    for kind in ("wq", "wk", "wv", "wo", "w1", "w3", "w2"):
        assert kinds_of(tp, kind) == {"q41"}
    assert kinds_of(tp, "output") == {"q80"}
    assert tp.lowered() is None
    assert {c.runtime for c in choose_types(FakeFile(SMOLLM2, "Q4_0", "Q6_K")).choices.values()} == {"q40", "q6k"}


def test_auto_raises_a_type_without_kernels_to_q80(monkeypatch):
    """A file type with no native kernels is converted to q80 (finer), never to a coarser type."""
    t = wtypes.BY_GGML["Q4_1"]
    monkeypatch.setitem(wtypes.BY_GGML, "Q4_1", dataclasses.replace(t, native=False, runtime_bytes_per_32=None))
    monkeypatch.setitem(wtypes.TYPES, t.name, wtypes.BY_GGML["Q4_1"])
    tp = choose_types(FakeFile(SMOLLM2, "Q4_1", "Q8_0"))
    for kind in ("wq", "wk", "wv", "wo", "w1", "w3", "w2"):
        assert kinds_of(tp, kind) == {"q80"}
    assert tp.summary() == ("weights: wq/wk/wv/wo/w1/w3/w2 Q4_1 -> q80 (no native Q4_1 kernels yet; q80 is finer), "
                            "output Q8_0 (file's own)")
    assert tp.lowered() is None


@pytest.mark.parametrize("ggml", ["Q4_1", "Q5_0", "Q4_K", "Q5_K", "Q6_K"])
def test_auto_runs_a_type_in_its_own_kernels_once_they_exist(monkeypatch, ggml):
    """The decision reads the table: flip a type to native and auto keeps it as it is."""
    t = wtypes.BY_GGML[ggml]
    monkeypatch.setitem(wtypes.BY_GGML, ggml, dataclasses.replace(t, native=True, runtime_bytes_per_32=t.block_bytes * 32 / t.block,
                                                                span_header=0))
    monkeypatch.setitem(wtypes.TYPES, t.name, wtypes.BY_GGML[ggml])
    monkeypatch.setattr(typeplan, "WEIGHT_TYPE_CHOICES", wtypes.WEIGHT_TYPE_CHOICES + (t.name,))
    tp = choose_types(FakeFile(SMOLLM2, ggml, "Q8_0"))
    assert kinds_of(tp, "w2") == {t.name} and kinds_of(tp, "output") == {"q80"}
    # forcing it is fine on its own files; no quantizer converts other types into it
    assert kinds_of(choose_types(FakeFile(SMOLLM2, ggml), t.name), "w2") == {t.name}
    with pytest.raises(TpllamaError, match=f"--weight-type {t.name}: a F16 matrix cannot be converted to it"):
        choose_types(FakeFile(SMOLLM2, "F16"), t.name)
    assert tp.summary().startswith(f"weights: wq/wk/wv/wo/w1/w3/w2 {ggml} (file's own)")
    # the memory plan counts the runtime layout the table gives
    assert matrix_bytes(1536, 576, t.name) == 1536 * 576 // 32 * wtypes.BY_GGML[ggml].runtime_bytes_per_32


def test_mixed_files_are_decided_per_tensor():
    """A Q4_K_M file keeps Q6_K in some layers' wv and w2: each tensor is decided on its own."""
    mixed = {"blk.0.attn_v.weight": "Q6_K", "blk.0.ffn_down.weight": "Q6_K", "blk.1.attn_v.weight": "Q8_0"}
    tp = choose_types(FakeFile(SMOLLM2, "Q4_0", "Q6_K", per_tensor=mixed))
    assert tp.runtime("blk.0.attn_v.weight") == "q6k" and tp.runtime("blk.1.attn_v.weight") == "q80"
    assert tp.runtime("blk.2.attn_v.weight") == "q40" and tp.runtime("blk.0.attn_q.weight") == "q40"
    assert "wv Q4_0 (file's own) + Q6_K (file's own) + Q8_0 (file's own)" in tp.summary()


@pytest.mark.parametrize("ggml", ["F32", "F16", "BF16"])
def test_float_files_default_to_q80_and_say_so(ggml):
    tp = choose_types(FakeFile(SMOLLM2, ggml))
    assert {c.runtime for c in tp.choices.values()} == {"q80"}
    assert f"{ggml} -> q80 (quantized from {ggml} for speed; --weight-type f32 keeps the file's values)" in tp.summary()
    exact = choose_types(FakeFile(SMOLLM2, ggml), "f32")
    assert {c.runtime for c in exact.choices.values()} == {"f32"} and exact.lowered() is None


def test_forcing_a_coarser_type_says_it_lowers_precision():
    assert choose_types(FakeFile(SMOLLM2, "Q4_1", "Q8_0"), "q40").lowered() == (
        "--weight-type q40 lowers precision: the file stores wq/wk/wv/wo/w1/w3/w2/output as Q4_1/Q8_0; "
        "the default (auto) never goes below them")
    assert choose_types(FakeFile(SMOLLM2, "Q4_1", "Q8_0"), "q80").lowered() is None   # q80 is finer than Q4_1
    assert choose_types(FakeFile(SMOLLM2, "Q4_0"), "q40").lowered() is None           # the file's own type
    assert "as F16" in choose_types(FakeFile(SMOLLM2, "F16"), "q80").lowered()
    assert lowers("q40", "Q4_K") and lowers("q80", "Q8_0") is False and not lowers("q80", "Q6_K")
    assert lowers("q80", "Q5_1") is False and lowers("q40", "Q5_1")                    # types outside the table


def test_unknown_weight_type_is_one_clear_error():
    with pytest.raises(TpllamaError, match=f"--weight-type 'q41x': expected one of {', '.join(wtypes.WEIGHT_TYPE_CHOICES)}$"):
        choose_types(FakeFile(SMOLLM2, "Q4_0"), "q41x")


def test_quantized_only_when_every_slice_at_every_rank_count_is_whole_blocks():
    """head_dim 48 (wo) and FFN width 172 (w2) cannot be cut into blocks of 32 at every rank
    count: they are f32 whatever the rank count, the other matrices stay quantized."""
    assert quantizable(HEAD48, "wo") == "head size 48 not a multiple of 32"
    assert quantizable(HEAD48, "w2") is None and quantizable(HEAD48, "wq") is None
    assert quantizable(STORIES, "wo") == "head size 8 not a multiple of 32"
    assert quantizable(STORIES, "w2") == "FFN width 172 not a multiple of 32"
    tp = choose_types(FakeFile(HEAD48, "Q4_0"), "q40")
    assert kinds_of(tp, "wo") == {"f32"} and kinds_of(tp, "w2") == {"q40"} and kinds_of(tp, "wq") == {"q40"}
    assert "wo Q4_0 -> f32 (head size 48 not a multiple of 32)" in tp.summary()
    stories = choose_types(FakeFile(STORIES, "F32"))
    assert stories.summary() == (
        "weights: wq/wk/wv/w1/w3/output F32 -> q80 (quantized from F32 for speed; --weight-type f32 keeps the "
        "file's values), wo F32 (head size 8 not a multiple of 32), w2 F32 (FFN width 172 not a multiple of 32)")


@pytest.mark.parametrize("config", [SMOLLM2, STORIES, HEAD48], ids=["smollm2", "stories", "head48"])
def test_plan_cuts_quantized_matrices_between_blocks_at_every_rank_count(config):
    tp = uniform_types(config, "q40")
    for k in range(1, config.n_heads + 1):
        for s in make_plan(config, k).ranks:
            if kinds_of(tp, "w2") == {"q40"}:
                assert s.ffn.start % 32 == 0 and s.ffn.stop % 32 == 0
            if kinds_of(tp, "wo") == {"q40"}:
                assert (s.heads.start * config.head_dim) % 32 == 0
    assert ffn_unit(STORIES) == 1 and ffn_unit(SMOLLM2) == 32


def test_weight_bytes_follow_each_matrix_runtime_type():
    """SmolLM2 at auto: Q4_1 matrices packed at 20 bytes per 32 weights, the Q8_0 output at 34, rows
    packed 16 at a time."""
    tp = choose_types(FakeFile(SMOLLM2, "Q4_1", "Q8_0"))
    c = SMOLLM2
    packed = lambda nbytes: lambda rows, cols: -(-rows // 16) * 16 * cols // 32 * nbytes
    q41, q80 = packed(20), packed(34)
    layer = (q41(576, 576) + 2 * q41(192, 576) + q41(576, 576) + 2 * q41(1536, 576) + q41(576, 1536) + 2 * 4 * 576)
    assert weight_bytes(c, make_plan(c, 1)[0], tp) == 30 * layer + q80(49152, 576) + 4 * 576
    layer80 = (q80(576, 576) + 2 * q80(192, 576) + q80(576, 576) + 2 * q80(1536, 576) + q80(576, 1536) + 2 * 4 * 576)
    assert weight_bytes(c, make_plan(c, 1)[0], "q80") == 30 * layer80 + q80(49152, 576) + 4 * 576
    # head size 48: wo is counted as f32 (4 bytes a weight), the rest as q40
    wo48 = choose_types(FakeFile(HEAD48, "Q4_0"), "q40")
    q40 = lambda rows, cols: -(-rows // 16) * 16 * cols // 32 * 18
    layer = q40(192, 192) + 2 * q40(96, 192) + 192 * 192 * 4 + 2 * q40(256, 192) + q40(192, 256) + 2 * 4 * 192
    assert weight_bytes(HEAD48, make_plan(HEAD48, 1)[0], wo48) == 2 * layer + q40(320, 192) + 4 * 192


def test_docs_show_the_type_table_of_this_tree():
    """docs/formats.md carries the table wtypes gives (regenerate it with python -m tpllama.typeplan)."""
    from pathlib import Path
    from tpllama.typeplan import type_table
    assert type_table() in (Path(__file__).resolve().parents[1] / "docs" / "formats.md").read_text()


def test_the_type_table_agrees_with_gguf_and_the_kernels():
    """wtypes is written by hand in pure Python: its block facts are gguf-py's, and its runtime
    bytes are what the C side packs, for every type it calls native."""
    gguf = pytest.importorskip("gguf")
    K = pytest.importorskip("tpllama._kernels")
    for t in wtypes.TYPES.values():
        block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t.ggml]]
        assert (t.block, t.block_bytes) == (block, nbytes), t.name
    assert K.QK == 32 and K.ROWS == wtypes.ROWS_PER_GROUP
    for t in wtypes.TYPES.values():
        if t.native and t.quantized:
            for rows, cols in ((1, 32), (17, 256), (576, 1536)):
                assert wtypes.runtime_bytes(t.name, rows, cols) == K.packed_bytes(t.name, rows, cols // 32), t.name
    assert set(wtypes.RUNTIME_TYPES) >= {"f32", "q40", "q80"}


def test_plan_and_readers_import_without_the_compiled_kernels():
    """The plan command and the file readers work in an unbuilt tree (the kernels are imported
    only when a Q4_0/Q8_0 tensor is first dequantized)."""
    import subprocess
    import sys
    from pathlib import Path
    code = ("import sys; sys.modules['tpllama._kernels'] = None\n"
            "import tpllama.plan, tpllama.typeplan, tpllama.wtypes, tpllama.tensors, tpllama.filetypes,"
            " tpllama.formats.base, tpllama.formats.gguf, tpllama.formats.hf, tpllama.formats.llama2c\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=str(Path(__file__).resolve().parents[1]), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]

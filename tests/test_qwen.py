"""Qwen2 / Qwen2.5 and Qwen3 (dense) against the reference: HF transformers' Qwen2ForCausalLM
and Qwen3ForCausalLM.

Tiny models (tiny_models.QWEN_SPECS: Qwen2's q/k/v biases, Qwen3's per-head q/k norms with a
head size other than hidden / heads, tied and untied output) are written by the test as HF
directories, and the same weights as GGUF files the way llama.cpp's convert_hf_to_gguf.py
writes them (arch qwen2/qwen3, q/k rows NOT permuted). tpllama's f32 logits over a prompt and
decode steps must match HF's within 1e-4 x the logit scale at 1 rank, and at 2 and 3 ranks
(4 heads over 3 ranks: 2, 1, 1, a kv head held twice) under mpirun.
"""
import json

import numpy as np
import pytest

import tpllama
from gguf_writer import T, hf_model_to_gguf, llama_permute
from mpi_util import run_script
from tiny_models import QWEN_SPECS, reference_logits, rule_prompt, write_hf_model

PROMPT_TOKENS = 12
DECODE_STEPS = 4
TOLERANCE = 1e-4     # x the largest reference logit


def _hf_config(directory) -> dict:
    """config.json with rope_theta at the top level (transformers 5 nests it in rope_parameters)."""
    cfg = json.loads((directory / "config.json").read_text())
    cfg.setdefault("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    return cfg


def _state(torch_model) -> dict:
    return {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """qwen(name) -> (spec, HF directory, GGUF path, HF config, state, reference calls); each made once."""
    made = {}

    def get(name):
        if name not in made:
            spec = QWEN_SPECS[name]
            directory = tmp_path_factory.mktemp(spec.name)
            torch_model = write_hf_model(spec, directory)
            cfg, state = _hf_config(directory), _state(torch_model)
            gguf = hf_model_to_gguf(directory.parent / f"{spec.name}.gguf", state, cfg, T.F32)
            calls = reference_logits(torch_model, rule_prompt(spec, PROMPT_TOKENS), DECODE_STEPS)
            made[name] = (spec, directory, gguf, cfg, state, calls)
        return made[name]
    return get


def load_f32(path, **kw):
    return tpllama.load(str(path), weight_type="f32", tokenizer="none", ctx_size=64, threads=1,
                        shard_cache=kw.pop("shard_cache", False), **kw)


def load_with_config_changes(directory, tmp_path, changes):
    """load_f32 of a copy of an HF directory whose config.json has `changes`."""
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(directory, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg.update(changes)
    (bad / "config.json").write_text(json.dumps(cfg))
    return load_f32(bad)


def run_calls(model, calls) -> np.ndarray:
    return np.concatenate([model.forward(ids, start) for ids, start, _ in calls])


def reference(calls) -> np.ndarray:
    return np.concatenate([c[2] for c in calls])


def assert_matches(ours, calls, what):
    ref = reference(calls)
    assert ours.shape == ref.shape
    scale, err = np.abs(ref).max(), np.abs(ours - ref).max()
    assert err <= TOLERANCE * scale, f"{what}: max abs error {err:.3g} > {TOLERANCE} x logit scale {scale:.3g}"


@pytest.mark.parametrize("name", sorted(QWEN_SPECS))
def test_hf_directory_logits_match_reference(qwen, name):
    spec, directory, _, _, _, calls = qwen(name)
    model = load_f32(directory)
    assert model.config.arch == spec.arch
    assert_matches(run_calls(model, calls), calls, f"{name} (HF directory)")


@pytest.mark.parametrize("name", sorted(QWEN_SPECS))
def test_gguf_logits_match_reference(qwen, name):
    spec, _, gguf, cfg, _, calls = qwen(name)
    model = load_f32(gguf)
    assert (model.config.arch, model.config.head_dim) == (spec.arch, cfg.get("head_dim", spec.hidden // spec.heads))
    assert model.config.tie_embeddings == spec.tied
    assert_matches(run_calls(model, calls), calls, f"{name} (GGUF)")


def test_qwen_logits_match_reference_at_2_and_3_ranks(qwen, tmp_path):
    """Every model, from its HF directory and its GGUF, on 2 and 3 ranks: one mpirun per rank count."""
    names = sorted(QWEN_SPECS)
    for ranks in (2, 3):
        jobs = []
        for name in names:
            _, directory, gguf, _, _, calls = qwen(name)
            replay = [[list(map(int, ids)), start] for ids, start, _ in calls]
            jobs += [[str(path), str(tmp_path / f"{name}-{source}-{ranks}.npy"), replay]
                     for source, path in (("hf", directory), ("gguf", gguf))]
        (tmp_path / f"jobs-{ranks}.json").write_text(json.dumps(jobs))
        assert run_script(ranks, "logits_of_calls.py", "f32", tmp_path / f"jobs-{ranks}.json", timeout=400) == \
            {"ranks": ranks, "models": len(jobs)}
        for name in names:
            for source in ("hf", "gguf"):
                assert_matches(np.load(tmp_path / f"{name}-{source}-{ranks}.npy"), qwen(name)[5],
                               f"{name} ({source}, {ranks} ranks)")


def test_the_reference_test_catches_a_missing_bias_or_norm(qwen):
    """Without Qwen2's biases or Qwen3's q/k norms the logits are off by far more than the tolerance,
    so the tests above check them."""
    for name, field, neutral in (("qwen2", "bq", 0.0), ("qwen2", "bk", 0.0), ("qwen2", "bv", 0.0),
                                 ("qwen3", "q_norm", 1.0), ("qwen3", "k_norm", 1.0)):
        _, directory, _, _, _, calls = qwen(name)
        model = load_f32(directory)
        for layer in model.rank_model.w.layers:
            values = getattr(layer, field)
            setattr(layer, field, np.full_like(values, neutral))
        ref = reference(calls)
        assert np.abs(run_calls(model, calls) - ref).max() > 10 * TOLERANCE * np.abs(ref).max(), (name, field)


def test_qwen_gguf_with_llama_permuted_rows_is_caught(qwen, tmp_path):
    """A qwen GGUF whose q/k rows (and biases, norms) were permuted the llama way gives wrong logits:
    tpllama reads qwen GGUF rows in HF's rotate-half order, as llama.cpp writes them."""
    for name in ("qwen2", "qwen3"):
        spec, _, _, cfg, state, calls = qwen(name)
        permuted = dict(state)
        for key, value in state.items():
            heads = spec.heads if ".q_" in key else spec.kv_heads
            if key.endswith(("q_proj.weight", "k_proj.weight", "q_proj.bias", "k_proj.bias")):
                permuted[key] = llama_permute(value, heads)
            elif key.endswith(("q_norm.weight", "k_norm.weight")):
                permuted[key] = llama_permute(value, 1)
        model = load_f32(hf_model_to_gguf(tmp_path / f"{name}-llama-rows.gguf", permuted, cfg, T.F32))
        ref = reference(calls)
        assert np.abs(run_calls(model, calls) - ref).max() > 10 * TOLERANCE * np.abs(ref).max(), name


def test_shard_file_keeps_biases_and_norms(qwen, tmp_path):
    """A shard file written and read back holds the biases and q/k norms: the logits still match."""
    for name in ("qwen2", "qwen3"):
        _, directory, _, _, _, calls = qwen(name)
        assert not load_f32(directory, shard_cache=str(tmp_path)).shard_file.hit    # writes the shard file
        model = load_f32(directory, shard_cache=str(tmp_path))                       # reads it back
        assert model.shard_file.hit, model.shard_file.note
        assert_matches(run_calls(model, calls), calls, f"{name} (from its shard file)")


@pytest.mark.parametrize("changes, message", [
    ({"attention_bias": True}, r"attention_bias/mlp_bias are not supported for qwen3"),
    ({"use_sliding_window": True, "sliding_window": 16}, r"sliding-window attention \(use_sliding_window\)"),
])
def test_qwen3_options_not_supported_are_refused(qwen, tmp_path, changes, message):
    from tpllama.errors import ModelFormatError
    _, directory, _, _, _, _ = qwen("qwen3")
    with pytest.raises(ModelFormatError, match=message):
        load_with_config_changes(directory, tmp_path, changes)

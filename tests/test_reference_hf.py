"""tpllama's forward pass against the reference Llama: HF transformers' LlamaForCausalLM.

Tiny (briefly trained) models (MHA, GQA, tied and untied embeddings, rope_theta other than 10000,
llama3 rope scaling, bf16 sharded and f16 safetensors) are written by the test as HF
directories; tpllama reads them through its own HF reader.
"""
import numpy as np
import pytest

import tpllama
from tiny_models import SPECS, reference_logits, rule_prompt

PROMPT_TOKENS = 16
DECODE_STEPS = 8


@pytest.fixture(scope="module", params=sorted(SPECS))
def hf_model(request, tiny_hf):
    spec, directory, torch_model = tiny_hf(request.param)
    prompt = rule_prompt(spec, PROMPT_TOKENS)
    return spec, directory, reference_logits(torch_model, prompt, DECODE_STEPS)


def run_calls(model, calls):
    return [model.forward(ids, start) for ids, start, _ in calls]


def test_f32_logits_match_reference(hf_model):
    spec, directory, calls = hf_model
    model = tpllama.load(str(directory), weight_type="f32", tokenizer="none", ctx_size=64, threads=1)
    ours = np.concatenate(run_calls(model, calls))
    ref = np.concatenate([c[2] for c in calls])
    assert ours.shape == ref.shape == (PROMPT_TOKENS + DECODE_STEPS, spec.vocab)
    scale = np.abs(ref).max()
    err = np.abs(ours - ref).max()
    assert err <= 1e-4 * scale, f"{spec.name}: max abs error {err:.3g} > 1e-4 x logit scale {scale:.3g}"


def test_q40_logits_close_to_reference(hf_model):
    spec, directory, calls = hf_model
    model = tpllama.load(str(directory), weight_type="q40", tokenizer="none", ctx_size=64, threads=1)
    assert model.rank_model.w.layers[0].wq.wtype == "q40"
    ours = np.concatenate(run_calls(model, calls))
    ref = np.concatenate([c[2] for c in calls])
    agree = np.mean(ours.argmax(-1) == ref.argmax(-1))
    cos = np.sum(ours * ref, -1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(ref, axis=-1))  # per position
    assert agree >= 0.95, f"{spec.name}: top-1 agrees on {agree:.0%} of positions"
    assert cos.mean() >= 0.99, f"{spec.name}: mean cosine similarity {cos.mean():.4f}"
    assert cos.min() >= 0.98, f"{spec.name}: cosine similarity down to {cos.min():.4f} at one position"


def test_reference_test_can_fail(hf_model, monkeypatch):
    """A deliberately wrong rope (no frequency scaling, theta off by 10%) must be caught."""
    spec, directory, calls = hf_model
    model = tpllama.load(str(directory), weight_type="f32", tokenizer="none", ctx_size=64, threads=1)
    model.rank_model.inv_freq = model.rank_model.inv_freq * 1.1
    ours = np.concatenate(run_calls(model, calls))
    ref = np.concatenate([c[2] for c in calls])
    assert np.abs(ours - ref).max() > 1e-4 * np.abs(ref).max()


def test_f16_kv_cache_logits_close_to_reference(hf_model):
    """--kv-type f16: keys and values rounded to float16 (about 3 significant digits) as they are
    cached; the logits stay within 5e-4 of the logit scale of the reference's (measured: 6-7e-5), top-1 the same."""
    spec, directory, calls = hf_model
    model = tpllama.load(str(directory), weight_type="f32", kv_type="f16", tokenizer="none", ctx_size=64, threads=1)
    assert model.rank_model.cache.k.dtype == model.rank_model.cache.v.dtype == np.float16
    ours = np.concatenate(run_calls(model, calls))
    ref = np.concatenate([c[2] for c in calls])
    scale = np.abs(ref).max()
    err = np.abs(ours - ref).max()
    print(f"{spec.name}: f16 kv cache, max abs error {err / scale:.2e} of the logit scale")
    assert err <= 5e-4 * scale, f"{spec.name}: max abs error {err:.3g} > 5e-4 x logit scale {scale:.3g}"
    assert np.array_equal(ours.argmax(-1), ref.argmax(-1))

"""Mistral (sliding-window attention) and Llama 3.x GGUF rope factors against the reference:
HF transformers' MistralForCausalLM and LlamaForCausalLM.

A tiny MistralForCausalLM with a sliding window of 4 positions and a head size other than
hidden / heads is written by the test as an HF directory, and as a GGUF the way llama.cpp's
convert_hf_to_gguf.py writes it (arch llama, q/k rows permuted), plus the key
`llama.attention.sliding_window` that asks for the window (llama.cpp's converter does not write
it: such a file runs full attention, as llama.cpp runs it). The prompt (12 tokens) and the decode
steps run past the window. tpllama's f32 logits must match HF's within 1e-4 x the logit scale at
1 rank and at 2 and 3 ranks (4 heads over 3 ranks: 2, 1, 1).
"""
import json

import numpy as np
import pytest

import tpllama
from gguf_writer import T, hf_model_to_gguf
from mpi_util import run_script
from tiny_models import MISTRAL_SPECS, reference_logits, rule_prompt, write_hf_model

PROMPT_TOKENS = 12
DECODE_STEPS = 4
TOLERANCE = 1e-4     # x the largest reference logit
WINDOW_KEY = "llama.attention.sliding_window"


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    """(spec, HF directory, GGUF with the window key, HF config, state, reference calls)."""
    spec = MISTRAL_SPECS["mistral"]
    directory = tmp_path_factory.mktemp(spec.name)
    torch_model = write_hf_model(spec, directory)
    cfg = json.loads((directory / "config.json").read_text())
    cfg.setdefault("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    state = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    gguf = hf_model_to_gguf(directory.parent / "mistral.gguf", state, cfg, T.F32,
                            extra={WINDOW_KEY: cfg["sliding_window"]})
    calls = reference_logits(torch_model, rule_prompt(spec, PROMPT_TOKENS), DECODE_STEPS)
    return spec, directory, gguf, cfg, state, calls


def load_f32(path):
    return tpllama.load(str(path), weight_type="f32", tokenizer="none", ctx_size=64, threads=1, shard_cache=False)


def run_calls(model, calls) -> np.ndarray:
    return np.concatenate([model.forward(ids, start) for ids, start, _ in calls])


def reference(calls) -> np.ndarray:
    return np.concatenate([c[2] for c in calls])


def max_error(ours, calls):
    ref = reference(calls)
    assert ours.shape == ref.shape
    return np.abs(ours - ref).max(), np.abs(ref).max()


def assert_matches(ours, calls, what):
    err, scale = max_error(ours, calls)
    assert err <= TOLERANCE * scale, f"{what}: max abs error {err:.3g} > {TOLERANCE} x logit scale {scale:.3g}"


def test_hf_directory_logits_match_reference(mistral):
    spec, directory, _, cfg, _, calls = mistral
    model = load_f32(directory)
    assert (model.config.arch, model.config.sliding_window, model.config.head_dim) == ("llama", 4, 32)
    assert_matches(run_calls(model, calls), calls, "mistral (HF directory)")


def test_gguf_logits_match_reference(mistral):
    _, _, gguf, _, _, calls = mistral
    model = load_f32(gguf)
    assert (model.config.arch, model.config.sliding_window) == ("llama", 4)
    assert_matches(run_calls(model, calls), calls, "mistral (GGUF)")


def test_mistral_logits_match_reference_at_2_and_3_ranks(mistral, tmp_path):
    """The HF directory and the GGUF on 2 and 3 ranks: one mpirun per rank count; the greedy
    tokens are the same as at 1 rank at every position."""
    _, directory, gguf, _, _, calls = mistral
    replay = [[list(map(int, ids)), start] for ids, start, _ in calls]
    greedy = run_calls(load_f32(gguf), calls).argmax(-1)
    for ranks in (2, 3):
        jobs = [[str(path), str(tmp_path / f"{source}-{ranks}.npy"), replay]
                for source, path in (("hf", directory), ("gguf", gguf))]
        (tmp_path / f"jobs-{ranks}.json").write_text(json.dumps(jobs))
        assert run_script(ranks, "logits_of_calls.py", "f32", tmp_path / f"jobs-{ranks}.json", timeout=300) == \
            {"ranks": ranks, "models": 2}
        for source in ("hf", "gguf"):
            ours = np.load(tmp_path / f"{source}-{ranks}.npy")
            assert_matches(ours, calls, f"mistral ({source}, {ranks} ranks)")
            assert (ours.argmax(-1) == greedy).all(), f"mistral ({source}, {ranks} ranks): other greedy tokens"


def test_without_the_window_key_attention_is_full(mistral, tmp_path):
    """The same GGUF without the window key (as llama.cpp's converter writes it) attends to every
    position: it agrees with HF while the prompt fits in the window, and is off by far more than the
    tolerance after it, so the tests above check the window."""
    spec, _, _, cfg, state, calls = mistral
    model = load_f32(hf_model_to_gguf(tmp_path / "no-window.gguf", state, cfg, T.F32))
    assert model.config.sliding_window == 0
    ours, ref = run_calls(model, calls), reference(calls)
    scale, window = np.abs(ref).max(), cfg["sliding_window"]
    assert np.abs(ours[:window] - ref[:window]).max() <= TOLERANCE * scale
    assert np.abs(ours[window:] - ref[window:]).max() > 10 * TOLERANCE * scale


@pytest.mark.parametrize("changes, window", [({"sliding_window": None}, 0), ({"sliding_window": 4096}, 4096),
                                             ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, 0)])
def test_window_from_config_json(mistral, changes, window):
    """A null sliding_window is none (Mistral v0.2+); Llama's config ignores the key, as HF does."""
    from tpllama.config import ModelConfig
    cfg = dict(mistral[3], **changes)
    assert ModelConfig.from_hf(cfg, source="config.json").sliding_window == window


def test_negative_window_is_refused():
    from tpllama.config import ModelConfig
    from tpllama.errors import ModelFormatError
    cfg = {"architectures": ["MistralForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 32, "sliding_window": -1}
    with pytest.raises(ModelFormatError, match=r"config.json: .*sliding_window is -1, expected 0 \(none\)"):
        ModelConfig.from_hf(cfg, source="config.json")


def test_llama3_gguf_with_rope_freqs_matches_reference(tiny_hf, tmp_path):
    """Llama 3.1+ as llama.cpp writes it: no rope scaling keys, the llama3 scaling as per-frequency
    divisors in rope_freqs.weight (LlamaModel.generate_extra_tensors), against HF's llama3 rope."""
    spec, directory, torch_model = tiny_hf("llama3-rope")
    cfg = json.loads((directory / "config.json").read_text())
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    cfg.setdefault("rope_theta", rope.get("rope_theta", spec.rope_theta))
    state = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    head_dim = spec.hidden // spec.heads
    freqs = 1.0 / (cfg["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    low, high = (rope["original_max_position_embeddings"] / rope[k] for k in ("low_freq_factor", "high_freq_factor"))
    factors = []
    for wavelen in 2 * np.pi / freqs:
        smooth = (rope["original_max_position_embeddings"] / wavelen - rope["low_freq_factor"]) / \
                 (rope["high_freq_factor"] - rope["low_freq_factor"])
        factors.append(1.0 if wavelen < high else rope["factor"] if wavelen > low
                       else 1 / ((1 - smooth) / rope["factor"] + smooth))
    gguf = hf_model_to_gguf(tmp_path / "llama3.gguf", state, cfg, T.F32)
    with_factors = hf_model_to_gguf(tmp_path / "llama3-freqs.gguf", dict(state), cfg, T.F32,
                                    tensors_extra={"rope_freqs.weight": np.array(factors, np.float32)})
    calls = reference_logits(torch_model, rule_prompt(spec, PROMPT_TOKENS), DECODE_STEPS)
    assert_matches(run_calls(load_f32(with_factors), calls), calls, "llama3 rope (GGUF rope_freqs.weight)")
    err, scale = max_error(run_calls(load_f32(gguf), calls), calls)
    assert err > 10 * TOLERANCE * scale, "without rope_freqs.weight the llama3 model should be off"

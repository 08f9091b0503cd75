"""Tiny Llama-family models written by the tests themselves, as Hugging Face directories.

The reference implementation is HF transformers' LlamaForCausalLM (Qwen2ForCausalLM,
Qwen3ForCausalLM, Qwen3MoeForCausalLM, MistralForCausalLM for those architectures; CPU torch): the tests write its weights with
save_pretrained and compare tpllama's logits against its own.

A model with random weights has near-flat logits, where any rounding flips the top token;
a trained model is confident. So each tiny model is first trained for a few seconds on a
synthetic rule that needs attention: the next token is pi(x[t-1]) when x[t-2] is even and
sigma(x[t-1]) otherwise (pi, sigma fixed random permutations).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

torch = None
transformers = None


def _import_reference():
    global torch, transformers
    import pytest
    torch = pytest.importorskip("torch", reason="the HF reference needs torch (pip install -e .[test])")
    transformers = pytest.importorskip("transformers", reason="the HF reference needs transformers (pip install -e .[test])")


@dataclass
class TinySpec:
    name: str
    hidden: int = 128
    intermediate: int = 256
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 320
    rope_theta: float = 10000.0
    tied: bool = False
    rope_scaling: Optional[dict] = None
    dtype: str = "float32"          # float32 | float16 | bfloat16 as saved
    max_shard_size: Optional[str] = None
    train_steps: int = 200
    seed: int = 0
    arch: str = "llama"             # llama | qwen2 | qwen3 | qwen3moe | mistral: the transformers classes that write it
    extra: dict = field(default_factory=dict)


SPECS = {
    "mha": TinySpec("mha", heads=4, kv_heads=4),
    "gqa": TinySpec("gqa", heads=4, kv_heads=2, rope_theta=500000.0),
    "gqa-tied": TinySpec("gqa-tied", heads=8, kv_heads=2, hidden=256, tied=True),
    "llama3-rope": TinySpec("llama3-rope", heads=4, kv_heads=1, rope_theta=500000.0,
                            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "bf16-sharded": TinySpec("bf16-sharded", dtype="bfloat16", max_shard_size="100KB"),
    "f16": TinySpec("f16", dtype="float16", tied=True),
    # head size 48: a rank's wo columns (whole heads) are not always whole blocks of 32
    "head48": TinySpec("head48", hidden=192, heads=4, kv_heads=2),
}

# Qwen2 (q/k/v biases) and Qwen3 (per-head q/k norms; head size other than hidden / heads)
QWEN_SPECS = {
    "qwen2": TinySpec("qwen2", arch="qwen2", train_steps=10, hidden=64, intermediate=128, heads=4, kv_heads=2, rope_theta=1e6),
    "qwen2-tied": TinySpec("qwen2-tied", arch="qwen2", train_steps=10, hidden=64, intermediate=128, heads=4, kv_heads=1, tied=True),
    "qwen3": TinySpec("qwen3", arch="qwen3", train_steps=10, hidden=64, intermediate=128, heads=4, kv_heads=2, rope_theta=1e6,
                      extra={"head_dim": 32}),
    "qwen3-tied": TinySpec("qwen3-tied", arch="qwen3", train_steps=10, hidden=64, intermediate=128, heads=4, kv_heads=4, tied=True,
                           extra={"head_dim": 24}),
}

# Mistral: a sliding window of 4 positions (prompts are longer) and a head size other than hidden / heads
MISTRAL_SPECS = {
    "mistral": TinySpec("mistral", arch="mistral", train_steps=10, hidden=64, intermediate=128, heads=4, kv_heads=2,
                        rope_theta=1e6, extra={"sliding_window": 4, "head_dim": 32}),
}


# Qwen3-MoE: 8 experts of FFN width 128 (4 units of 32: 2, 1, 1 at 3 ranks), top 2, renormalised
QWEN_MOE_SPEC = TinySpec("qwen3moe", arch="qwen3moe", train_steps=10, hidden=64, intermediate=128, heads=4, kv_heads=2,
                         rope_theta=1e6, extra={"head_dim": 32, "num_experts": 8, "num_experts_per_tok": 2,
                                                "moe_intermediate_size": 128, "norm_topk_prob": True})


def _classes(arch: str):
    """(config class, model class) of transformers for an architecture."""
    names = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
             "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
             "qwen3moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM")}[arch]
    return tuple(getattr(transformers, n) for n in names)


def write_hf_model(spec: TinySpec, directory: Path):
    """Save a random (briefly trained) model of `spec` into directory; returns the torch model (float32)."""
    _import_reference()
    config_class, model_class = _classes(spec.arch)
    cfg = config_class(
        vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
        max_position_embeddings=256, rope_theta=spec.rope_theta, rope_scaling=spec.rope_scaling,
        tie_word_embeddings=spec.tied, rms_norm_eps=1e-5, **spec.extra,
    )
    torch.manual_seed(spec.seed)
    model = model_class(cfg)
    train(model, spec)
    saved = model.eval().to(getattr(torch, spec.dtype))
    kwargs = {"safe_serialization": True}
    if spec.max_shard_size:
        kwargs["max_shard_size"] = spec.max_shard_size
    saved.save_pretrained(directory, **kwargs)
    # The reference is HF reading the saved files back, computing in float32 (casting the
    # live model instead would leave its rotary buffer rounded to bf16).
    return model_class.from_pretrained(directory, dtype=torch.float32).eval()


class Rule:
    """The synthetic language: next = pi(x[t-1]) if x[t-2] is even else sigma(x[t-1])."""

    def __init__(self, vocab: int, seed: int):
        g = np.random.default_rng(seed)
        self.vocab, self.pi, self.sigma = vocab, g.permutation(vocab), g.permutation(vocab)

    def sample(self, batch: int, length: int, rng) -> np.ndarray:
        x = np.zeros((batch, length), dtype=np.int64)
        x[:, :2] = rng.integers(0, self.vocab, size=(batch, 2))
        for t in range(2, length):
            x[:, t] = np.where(x[:, t - 2] % 2 == 0, self.pi[x[:, t - 1]], self.sigma[x[:, t - 1]])
        return x


def train(model, spec: TinySpec):
    rule, rng = Rule(spec.vocab, spec.seed), np.random.default_rng(spec.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(spec.train_steps):
        x = torch.tensor(rule.sample(16, 24, rng))
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():   # non-trivial norm weights and biases, so one read wrongly is caught
        for name, p in model.named_parameters():
            if "norm" in name:
                p.mul_(1.0 + 0.05 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))


def reference_logits(model, prompt, steps):
    """HF logits for a prompt and `steps` greedy decode steps: (tokens, [(ids, start, logits)])."""
    _import_reference()
    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True)
        calls = [(list(prompt), 0, out.logits[0].numpy())]
        past = out.past_key_values
        pos = len(prompt)
        token = int(out.logits[0, -1].argmax())
        for _ in range(steps):
            out = model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
            calls.append(([token], pos, out.logits[0].numpy()))
            past = out.past_key_values
            pos += 1
            token = int(out.logits[0, -1].argmax())
    return calls


def rule_prompt(spec: TinySpec, n: int = 16, seed: int = 1):
    """A prompt in the model's synthetic language."""
    return [int(t) for t in Rule(spec.vocab, spec.seed).sample(1, n, np.random.default_rng(seed))[0]]

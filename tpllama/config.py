"""ModelConfig: the shape and hyper-parameters of a Llama-family model.

Built from each format's own keys (GGUF metadata, HF config.json, the llama2.c header);
each constructor names the keys by their source names so a reader can check them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .errors import ModelFormatError


@dataclass(frozen=True)
class Llama3RopeScaling:
    """rope_scaling {"rope_type": "llama3", ...} of Llama 3.1+: long wavelengths are slowed down."""
    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    dim: int                   # embedding width
    hidden_dim: int            # FFN width
    n_layers: int
    n_heads: int               # query heads
    n_kv_heads: int            # key/value heads (GQA when fewer than n_heads)
    vocab_size: int
    max_seq_len: int           # the model's trained context
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[Llama3RopeScaling] = None
    rope_freq_factors: Optional[tuple] = None  # GGUF rope_freqs.weight: per-frequency divisors (Llama 3.1 GGUFs)
    tie_embeddings: bool = False  # output matrix is the token embedding
    head_dim: int = 0          # 0: dim // n_heads
    name: str = ""
    extra: dict = field(default_factory=dict, compare=False, repr=False)
    source: str = field(default="", compare=False, repr=False)  # the file it came from, for error messages

    def __post_init__(self):
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.dim // max(self.n_heads, 1))
        problems = []
        if min(self.dim, self.hidden_dim, self.n_layers, self.n_heads, self.n_kv_heads, self.vocab_size) <= 0:
            problems.append("sizes must be positive")
        elif self.n_heads % self.n_kv_heads:
            problems.append(f"{self.n_heads} query heads are not a multiple of {self.n_kv_heads} kv heads")
        elif self.head_dim % 2:
            problems.append(f"head size {self.head_dim} is odd")
        if problems:
            where = self.source or f"model config {self.name}"
            raise ModelFormatError(f"{where}: not a valid Llama config: {'; '.join(problems)}")

    @property
    def kv_group(self) -> int:
        """Query heads per kv head."""
        return self.n_heads // self.n_kv_heads

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def rope_frequencies(self) -> np.ndarray:
        """Inverse frequencies (head_dim/2,) float64, with llama3 scaling applied if configured."""
        inv_freq = 1.0 / (self.rope_theta ** (np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim))
        if self.rope_freq_factors is not None:
            inv_freq = inv_freq / np.asarray(self.rope_freq_factors, dtype=np.float64)
        s = self.rope_scaling
        if s is None:
            return inv_freq
        low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
        high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        smoothed = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
        out = np.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
        medium = (wavelen <= low_freq_wavelen) & (wavelen >= high_freq_wavelen)
        return np.where(medium, smoothed, out)

    # ------------------------------------------------------------ constructors per source

    @classmethod
    def from_gguf(cls, kv: dict, name: str = "", source: str = "") -> "ModelConfig":
        """From GGUF metadata keys `{arch}.embedding_length` etc. (arch is `general.architecture`).
        source: the file, named in error messages."""
        where = source or name
        arch = kv.get("general.architecture")
        if arch != "llama":
            raise ModelFormatError(f"{where}: GGUF architecture {arch!r} is not supported (expected 'llama')")

        def key(k, default=None):
            v = kv.get(f"llama.{k}", default)
            if v is None:
                raise ModelFormatError(f"{where}: GGUF key 'llama.{k}' is missing")
            return v

        if int(kv.get("llama.expert_count") or 0) > 0:
            raise ModelFormatError(f"{where}: mixture-of-experts models (llama.expert_count = {kv['llama.expert_count']}) "
                                   "are not supported (expected a dense llama model)")

        n_heads = int(key("attention.head_count"))
        dim = int(key("embedding_length"))
        vocab = kv.get("llama.vocab_size")
        if vocab is None:
            tokens = kv.get("tokenizer.ggml.tokens")
            vocab = len(tokens) if tokens is not None else 0
        head_dim = int(kv.get("llama.attention.key_length", dim // n_heads))
        rope_dim = int(kv.get("llama.rope.dimension_count", head_dim))
        if rope_dim != head_dim:
            raise ModelFormatError(f"{where}: partial rotary embeddings (rope dimension {rope_dim} of head size {head_dim}) are not supported")
        scaling = None
        if kv.get("llama.rope.scaling.type") not in (None, "none"):
            raise ModelFormatError(f"{where}: rope scaling {kv.get('llama.rope.scaling.type')!r} is not supported")
        return cls(
            dim=dim,
            hidden_dim=int(key("feed_forward_length")),
            n_layers=int(key("block_count")),
            n_heads=n_heads,
            n_kv_heads=int(kv.get("llama.attention.head_count_kv", n_heads)),
            vocab_size=int(vocab),
            max_seq_len=int(kv.get("llama.context_length", 2048)),
            norm_eps=float(kv.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(kv.get("llama.rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            head_dim=head_dim,
            name=str(kv.get("general.name", name)),
            source=source,
        )

    @classmethod
    def from_hf(cls, cfg: dict, name: str = "", source: str = "") -> "ModelConfig":
        """From a Hugging Face config.json (LlamaForCausalLM keys). source: the file, named in errors."""
        where = source or name
        archs = cfg.get("architectures") or ["LlamaForCausalLM"]
        model_type = cfg.get("model_type", "llama")
        if model_type != "llama" and "LlamaForCausalLM" not in archs:
            raise ModelFormatError(f"{where}: model_type {model_type!r} is not supported (expected 'llama')")
        for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
            if k not in cfg:
                raise ModelFormatError(f"{where}: config.json has no {k!r}")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ModelFormatError(f"{where}: hidden_act {cfg['hidden_act']!r} is not supported (expected 'silu')")
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            raise ModelFormatError(f"{where}: attention_bias/mlp_bias are not supported")
        n_heads = int(cfg["num_attention_heads"])
        rope_theta = cfg.get("rope_theta")
        scaling = None
        rs = cfg.get("rope_scaling") or cfg.get("rope_parameters")
        if rs:
            rtype = rs.get("rope_type", rs.get("type", "default"))
            if rope_theta is None:
                rope_theta = rs.get("rope_theta")
            if rtype == "llama3":
                scaling = Llama3RopeScaling(
                    factor=float(rs["factor"]),
                    low_freq_factor=float(rs["low_freq_factor"]),
                    high_freq_factor=float(rs["high_freq_factor"]),
                    original_max_position_embeddings=int(rs["original_max_position_embeddings"]),
                )
            elif rtype != "default":
                raise ModelFormatError(f"{where}: rope_scaling type {rtype!r} is not supported (only 'llama3')")
        return cls(
            dim=int(cfg["hidden_size"]),
            hidden_dim=int(cfg["intermediate_size"]),
            n_layers=int(cfg["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            vocab_size=int(cfg["vocab_size"]),
            max_seq_len=int(cfg.get("max_position_embeddings", 2048)),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=scaling,
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            head_dim=int(cfg.get("head_dim") or int(cfg["hidden_size"]) // n_heads),
            name=name,
            source=source,
        )

    @classmethod
    def from_llama2c(cls, header, name: str = "", source: str = "") -> "ModelConfig":
        """From llama2.c's 7-int header: dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len.
        A negative vocab_size means the classifier is not shared with the embedding."""
        dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = (int(v) for v in header)
        return cls(
            dim=dim,
            hidden_dim=hidden_dim,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            vocab_size=abs(vocab_size),
            max_seq_len=seq_len,
            norm_eps=1e-5,
            rope_theta=10000.0,
            tie_embeddings=vocab_size > 0,
            name=name,
            source=source,
        )

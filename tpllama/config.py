"""ModelConfig: the shape and hyper-parameters of a Llama-family model, and its architecture.

Built from each format's own keys (GGUF metadata, HF config.json, the llama2.c header);
each constructor names the keys by their source names so a reader can check them.
ARCHITECTURES is the one table of the architectures tpllama runs and how each differs from
Llama's math (biases on q/k/v, per-head norms on q/k, the rotary row order of its GGUF files,
a mixture-of-experts FFN). For a mixture-of-experts model, hidden_dim is each expert's FFN width.
HF_ALIASES names the HF classes that are one of them under another name (Mistral is Llama's
math, with a sliding attention window when its config sets one).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .errors import ModelFormatError

# Sane upper bounds for sizes read from a file, checked before anything is allocated: well above
# every released Llama-family model, far below what would make a loader loop or allocate for ever.
LIMITS = {"dim": 1 << 17, "hidden_dim": 1 << 20, "n_layers": 1 << 12, "n_heads": 1 << 12,
          "n_kv_heads": 1 << 12, "vocab_size": 1 << 24, "max_seq_len": 1 << 24, "head_dim": 1 << 13}


@dataclass(frozen=True)
class Architecture:
    """What an architecture changes in the Llama math, and how its files name it."""
    name: str                 # GGUF general.architecture, HF model_type
    hf_class: str             # HF config.json architectures[0]
    qkv_bias: bool            # biases added to q, k and v after their matmuls (Qwen2)
    qk_norm: bool             # RMSNorm over each head of q and k before rope (Qwen3)
    gguf_rotate_half: bool    # its GGUF q/k rows keep HF's rotate-half order (llama.cpp permutes only llama's)
    moe: bool = False         # every layer's FFN is a mixture of experts behind a softmax top-k router (Qwen3-MoE)


ARCHITECTURES = {a.name: a for a in (
    Architecture("llama", "LlamaForCausalLM", qkv_bias=False, qk_norm=False, gguf_rotate_half=False),
    Architecture("qwen2", "Qwen2ForCausalLM", qkv_bias=True, qk_norm=False, gguf_rotate_half=True),
    Architecture("qwen3", "Qwen3ForCausalLM", qkv_bias=False, qk_norm=True, gguf_rotate_half=True),
    Architecture("qwen3moe", "Qwen3MoeForCausalLM", qkv_bias=False, qk_norm=True, gguf_rotate_half=True, moe=True),
)}
MAX_EXPERTS = 1 << 12     # far above any released model (Qwen3-MoE: 128)
SUPPORTED = ", ".join(ARCHITECTURES)
# HF config.json architectures[0] / model_type -> the architecture whose math it is
HF_ALIASES = {"MistralForCausalLM": "llama", "mistral": "llama"}


def gguf_keys(arch: str) -> dict:
    """Config field -> the GGUF key it comes from, for architecture `arch` (keys `{arch}.*`)."""
    keys = {"dim": f"{arch}.embedding_length", "hidden_dim": f"{arch}.feed_forward_length",
            "n_layers": f"{arch}.block_count", "n_heads": f"{arch}.attention.head_count",
            "n_kv_heads": f"{arch}.attention.head_count_kv", "vocab_size": f"{arch}.vocab_size",
            "max_seq_len": f"{arch}.context_length", "head_dim": f"{arch}.attention.key_length",
            "norm_eps": f"{arch}.attention.layer_norm_rms_epsilon", "rope_theta": f"{arch}.rope.freq_base",
            "sliding_window": f"{arch}.attention.sliding_window"}
    if arch in ARCHITECTURES and ARCHITECTURES[arch].moe:
        keys.update({k: f"{arch}.{v}" for k, v in MOE_GGUF_KEYS.items()})
    return keys


# Mixture-of-experts fields -> their GGUF key after `{arch}.` and their HF config.json key
# (hidden_dim: each expert's FFN width; the dense feed_forward_length / intermediate_size is unused).
MOE_GGUF_KEYS = {"hidden_dim": "expert_feed_forward_length", "n_experts": "expert_count",
                 "n_experts_used": "expert_used_count"}
MOE_HF_KEYS = {"hidden_dim": "moe_intermediate_size", "n_experts": "num_experts",
               "n_experts_used": "num_experts_per_tok"}

GGUF_KEYS = gguf_keys("llama")
HF_KEYS = {"dim": "hidden_size", "hidden_dim": "intermediate_size", "n_layers": "num_hidden_layers",
           "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads", "vocab_size": "vocab_size",
           "max_seq_len": "max_position_embeddings", "head_dim": "head_dim", "norm_eps": "rms_norm_eps",
           "rope_theta": "rope_theta", "sliding_window": "sliding_window"}
LLAMA2C_KEYS = {"dim": "header dim", "hidden_dim": "header hidden_dim", "n_layers": "header n_layers",
                "n_heads": "header n_heads", "n_kv_heads": "header n_kv_heads", "vocab_size": "header vocab_size",
                "max_seq_len": "header seq_len"}


def whole_number(value, key: str, where: str) -> int:
    """An integer config value (a float is accepted when it is whole); else a one-line error naming key."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or (isinstance(value, (float, np.floating)) and not (math.isfinite(value) and value == int(value))):
        raise ModelFormatError(f"{where}: {key} is {_show(value)}, expected a whole number")
    return int(value)


def real_number(value, key: str, where: str) -> float:
    """A finite real config value; else a one-line error naming key."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(value)):
        raise ModelFormatError(f"{where}: {key} is {_show(value)}, expected a finite number")
    return float(value)


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


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
    sliding_window: int = 0    # > 0: a position attends only to itself and the window - 1 before it (Mistral)
    arch: str = "llama"        # a key of ARCHITECTURES
    n_experts: int = 0         # mixture of experts (ARCHITECTURES[arch].moe): experts per layer; 0: dense
    n_experts_used: int = 0    # experts each token is routed to (top-k)
    expert_weights_norm: bool = False  # the top-k router weights are renormalised to sum to 1
    name: str = ""
    extra: dict = field(default_factory=dict, compare=False, repr=False)
    source: str = field(default="", compare=False, repr=False)  # the file it came from, for error messages

    def __post_init__(self):
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads if self.n_heads > 0 else 0)
        problems = self._problems()
        if problems:
            where = self.source or f"model config {self.name}"
            raise ModelFormatError(f"{where}: not a valid Llama config: {'; '.join(problems)}")

    def _problems(self) -> list:
        """What makes this config unusable, each naming the source's key (extra["keys"]) if known."""
        keys = self.extra.get("keys", {})
        problems = [f"{keys.get(k, k)} is {getattr(self, k)}, expected 1 to {limit}"
                    for k, limit in LIMITS.items() if not 0 < getattr(self, k) <= limit]
        if not (math.isfinite(self.norm_eps) and 0 <= self.norm_eps < 1):
            problems.append(f"{keys.get('norm_eps', 'norm_eps')} is {self.norm_eps}, expected 0 to 1")
        if not (math.isfinite(self.rope_theta) and self.rope_theta > 0):
            problems.append(f"{keys.get('rope_theta', 'rope_theta')} is {self.rope_theta}, expected a positive number")
        if self.sliding_window < 0:
            problems.append(f"{keys.get('sliding_window', 'sliding_window')} is {self.sliding_window}, "
                            "expected 0 (none) or a positive number")
        if problems:
            return problems
        if self.arch not in ARCHITECTURES:
            return [f"architecture {self.arch!r} is not supported (supported: {SUPPORTED})"]
        if self.n_heads % self.n_kv_heads:
            return [f"{self.n_heads} query heads are not a multiple of {self.n_kv_heads} kv heads"]
        if self.head_dim % 2:
            return [f"head size {self.head_dim} is odd"]
        return self._expert_problems(keys)

    def _expert_problems(self, keys: dict) -> list:
        """A mixture-of-experts architecture needs experts and a top-k within them; a dense one none."""
        if not ARCHITECTURES[self.arch].moe:
            return [] if self.n_experts == 0 else [f"{self.arch} models have no experts (got {self.n_experts})"]
        if not 0 < self.n_experts <= MAX_EXPERTS:
            return [f"{keys.get('n_experts', 'n_experts')} is {self.n_experts}, expected 1 to {MAX_EXPERTS}"]
        if not 0 < self.n_experts_used <= self.n_experts:
            return [f"{keys.get('n_experts_used', 'n_experts_used')} is {self.n_experts_used}, "
                    f"expected 1 to {self.n_experts} (the expert count)"]
        return []

    @property
    def moe(self) -> bool:
        """Every layer's FFN is a mixture of n_experts experts, each of width hidden_dim."""
        return self.n_experts > 0

    @property
    def qkv_bias(self) -> bool:
        """q, k and v get a bias after their matmuls (Qwen2)."""
        return ARCHITECTURES[self.arch].qkv_bias

    @property
    def qk_norm(self) -> bool:
        """Each head of q and k is RMS-normed (weights of head_dim) before rope (Qwen3)."""
        return ARCHITECTURES[self.arch].qk_norm

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
        if arch not in ARCHITECTURES:
            raise ModelFormatError(f"{where}: GGUF architecture {_show(arch)} is not supported (supported: {SUPPORTED})")

        def key(k, default=None, kind=whole_number):
            v = kv.get(f"{arch}.{k}", default)
            if v is None:
                raise ModelFormatError(f"{where}: GGUF key '{arch}.{k}' is missing")
            return kind(v, f"GGUF key '{arch}.{k}'", where)

        experts = _gguf_experts(arch, key, where)

        n_heads = key("attention.head_count")
        dim = key("embedding_length")
        if n_heads <= 0:
            raise ModelFormatError(f"{where}: GGUF key '{arch}.attention.head_count' is {n_heads}, expected a positive number")
        vocab = kv.get(f"{arch}.vocab_size")
        if vocab is None:
            tokens = kv.get("tokenizer.ggml.tokens")
            vocab = len(tokens) if tokens is not None else 0
        if f"{arch}.attention.key_length" not in kv and dim % n_heads:
            raise ModelFormatError(f"{where}: GGUF key '{arch}.embedding_length' is {dim}, not a multiple of "
                                   f"'{arch}.attention.head_count' {n_heads} (and no key_length gives the head size)")
        head_dim = key("attention.key_length", dim // n_heads)
        if key("attention.value_length", head_dim) != head_dim:
            raise ModelFormatError(f"{where}: value heads of {kv[f'{arch}.attention.value_length']} with key heads of "
                                   f"{head_dim} are not supported (expected equal sizes)")
        rope_dim = key("rope.dimension_count", head_dim)
        if rope_dim != head_dim:
            raise ModelFormatError(f"{where}: partial rotary embeddings (rope dimension {rope_dim} of head size {head_dim}) are not supported")
        scaling = None
        if kv.get(f"{arch}.rope.scaling.type") not in (None, "none"):
            raise ModelFormatError(f"{where}: rope scaling {kv.get(f'{arch}.rope.scaling.type')!r} is not supported")
        return cls(
            dim=dim,
            hidden_dim=key("expert_feed_forward_length" if experts else "feed_forward_length"),
            n_layers=key("block_count"),
            n_heads=n_heads,
            n_kv_heads=key("attention.head_count_kv", n_heads),
            vocab_size=whole_number(vocab, f"GGUF key '{arch}.vocab_size'", where),
            max_seq_len=key("context_length", 2048),
            norm_eps=key("attention.layer_norm_rms_epsilon", 1e-5, real_number),
            rope_theta=key("rope.freq_base", 10000.0, real_number),
            rope_scaling=scaling,
            head_dim=head_dim,
            sliding_window=key("attention.sliding_window", 0),   # llama.cpp's converters do not write it for llama
            arch=arch,
            **experts,
            name=str(kv.get("general.name", name)),
            source=source,
            extra={"keys": gguf_keys(arch)},
        )

    @classmethod
    def from_hf(cls, cfg: dict, name: str = "", source: str = "") -> "ModelConfig":
        """From a Hugging Face config.json (LlamaForCausalLM keys). source: the file, named in errors."""
        where = source or name
        if not isinstance(cfg, dict):
            raise ModelFormatError(f"{where}: config.json holds a JSON {type(cfg).__name__}, expected an object")

        def number(k, default=None, kind=whole_number):
            v = cfg.get(k)
            v = default if v is None else v
            return None if v is None else kind(v, k, where)

        arch = _hf_architecture(cfg, where)
        experts = _hf_experts(arch, cfg, number, where)
        ffn_key = "moe_intermediate_size" if arch.moe else "intermediate_size"
        for k in ("hidden_size", ffn_key, "num_hidden_layers", "num_attention_heads", "vocab_size"):
            if cfg.get(k) is None:
                raise ModelFormatError(f"{where}: config.json has no {k!r}")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ModelFormatError(f"{where}: hidden_act {cfg['hidden_act']!r} is not supported (expected 'silu')")
        if cfg.get("mlp_bias") or (cfg.get("attention_bias") and arch.name != "qwen2"):
            # Qwen2 always has its q/k/v biases; elsewhere attention_bias also biases o_proj
            raise ModelFormatError(f"{where}: attention_bias/mlp_bias are not supported for {arch.name}")
        if cfg.get("use_sliding_window"):
            raise ModelFormatError(f"{where}: sliding-window attention (use_sliding_window) is not supported")
        n_heads = number("num_attention_heads")
        dim = number("hidden_size")
        if n_heads <= 0:
            raise ModelFormatError(f"{where}: num_attention_heads is {n_heads}, expected a positive number")
        rope_theta = number("rope_theta", kind=real_number)
        scaling = None
        rs = cfg.get("rope_scaling") or cfg.get("rope_parameters")
        if rs is not None and not isinstance(rs, dict):
            raise ModelFormatError(f"{where}: rope_scaling is {_show(rs)}, expected an object or null")
        if rs:
            rtype = rs.get("rope_type", rs.get("type", "default"))
            if rope_theta is None and rs.get("rope_theta") is not None:
                rope_theta = real_number(rs["rope_theta"], "rope_scaling.rope_theta", where)
            if rtype == "llama3":
                scaling = _llama3_scaling(rs, where)
            elif rtype != "default":
                raise ModelFormatError(f"{where}: rope_scaling type {_show(rtype)} is not supported (only 'llama3')")
        return cls(
            dim=dim,
            hidden_dim=number(ffn_key),
            n_layers=number("num_hidden_layers"),
            n_heads=n_heads,
            n_kv_heads=number("num_key_value_heads") or n_heads,
            vocab_size=number("vocab_size"),
            max_seq_len=number("max_position_embeddings", 2048),
            norm_eps=number("rms_norm_eps", 1e-6, real_number),
            rope_theta=rope_theta if rope_theta is not None else 10000.0,
            rope_scaling=scaling,
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            head_dim=number("head_dim") or dim // n_heads,
            sliding_window=number("sliding_window", 0) if _is_mistral(cfg) else 0,   # null: none
            arch=arch.name,
            **experts,
            name=name,
            source=source,
            extra={"keys": {**HF_KEYS, **MOE_HF_KEYS} if arch.moe else HF_KEYS},
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
            extra={"keys": LLAMA2C_KEYS},
        )


def _gguf_experts(arch: str, key, where: str) -> dict:
    """The expert fields of a GGUF file's config ({} for a dense architecture, whose files with
    experts are refused); key(k, default) reads `{arch}.k`."""
    if not ARCHITECTURES[arch].moe:
        if key("expert_count", 0) > 0:
            raise ModelFormatError(f"{where}: mixture-of-experts models ({arch}.expert_count = "
                                   f"{key('expert_count')}) are not supported for {arch} (expected a dense model)")
        return {}
    if key("expert_shared_count", 0) > 0:
        raise ModelFormatError(f"{where}: shared experts ({arch}.expert_shared_count = {key('expert_shared_count')}) "
                               "are not supported")
    if key("expert_gating_func", GATING_SOFTMAX) != GATING_SOFTMAX:
        raise ModelFormatError(f"{where}: expert gating function {key('expert_gating_func')} ({arch}.expert_gating_func) "
                               f"is not supported (only softmax, {GATING_SOFTMAX})")
    # llama.cpp's qwen3moe graph always renormalises the top-k weights (build_moe_ffn with norm_w true)
    return {"n_experts": key("expert_count"), "n_experts_used": key("expert_used_count"), "expert_weights_norm": True}


GATING_SOFTMAX = 1   # llama.cpp LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX


def _hf_experts(arch: Architecture, cfg: dict, number, where: str) -> dict:
    """The expert fields of a config.json ({} for a dense architecture). Every layer must be a
    mixture-of-experts layer: dense layers among them (decoder_sparse_step, mlp_only_layers) are refused."""
    if not arch.moe:
        return {}
    experts_key = "num_experts" if cfg.get("num_experts") is not None else "num_local_experts"  # transformers 5 writes the latter
    for k in (experts_key, "num_experts_per_tok", "moe_intermediate_size"):
        if cfg.get(k) is None:
            raise ModelFormatError(f"{where}: config.json has no {k!r} (a {arch.hf_class} needs it)")
    step, dense = cfg.get("decoder_sparse_step", 1), cfg.get("mlp_only_layers") or []
    if step != 1 or dense:
        raise ModelFormatError(f"{where}: dense FFN layers among the expert layers (decoder_sparse_step {_show(step)}, "
                               f"mlp_only_layers {_show(dense)}) are not supported; expected decoder_sparse_step 1 "
                               "and no mlp_only_layers")
    if cfg.get("shared_expert_intermediate_size"):
        raise ModelFormatError(f"{where}: shared experts (shared_expert_intermediate_size) are not supported")
    return {"n_experts": number(experts_key), "n_experts_used": number("num_experts_per_tok"),
            "expert_weights_norm": bool(cfg.get("norm_topk_prob", False))}


def _hf_classes(cfg: dict) -> list:
    archs = cfg.get("architectures") or []
    return archs if isinstance(archs, list) else [archs]


def _is_mistral(cfg: dict) -> bool:
    return "MistralForCausalLM" in _hf_classes(cfg) or cfg.get("model_type") == "mistral"


def _hf_architecture(cfg: dict, where: str) -> Architecture:
    """The architecture of a config.json: by its class name (architectures), else its model_type
    (either may be an alias in HF_ALIASES)."""
    archs = _hf_classes(cfg)
    for a in ARCHITECTURES.values():
        if a.hf_class in archs:
            return a
    alias = next((HF_ALIASES[a] for a in archs if isinstance(a, str) and a in HF_ALIASES), None)
    if alias:
        return ARCHITECTURES[alias]
    model_type = cfg.get("model_type", "llama")
    if isinstance(model_type, str) and model_type.replace("_", "") in ARCHITECTURES:   # HF qwen3_moe: qwen3moe
        return ARCHITECTURES[model_type.replace("_", "")]
    if isinstance(model_type, str) and model_type in HF_ALIASES:
        return ARCHITECTURES[HF_ALIASES[model_type]]
    raise ModelFormatError(f"{where}: model_type {_show(model_type)} ({', '.join(map(str, archs)) or 'no architectures'}) "
                           f"is not supported (supported: {SUPPORTED})")


def _llama3_scaling(rs: dict, where: str) -> Llama3RopeScaling:
    """rope_scaling of type llama3: every key present, factors positive, low below high."""
    missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
               if rs.get(k) is None]
    if missing:
        raise ModelFormatError(f"{where}: rope_scaling of type 'llama3' has no {', '.join(missing)}")
    s = Llama3RopeScaling(
        factor=real_number(rs["factor"], "rope_scaling.factor", where),
        low_freq_factor=real_number(rs["low_freq_factor"], "rope_scaling.low_freq_factor", where),
        high_freq_factor=real_number(rs["high_freq_factor"], "rope_scaling.high_freq_factor", where),
        original_max_position_embeddings=whole_number(rs["original_max_position_embeddings"],
                                                      "rope_scaling.original_max_position_embeddings", where))
    if not (s.factor > 0 and 0 < s.low_freq_factor < s.high_freq_factor and s.original_max_position_embeddings > 0):
        raise ModelFormatError(f"{where}: rope_scaling of type 'llama3' needs factor > 0, 0 < low_freq_factor < "
                               f"high_freq_factor and original_max_position_embeddings > 0 (got {s.factor}, "
                               f"{s.low_freq_factor}, {s.high_freq_factor}, {s.original_max_position_embeddings})")
    return s

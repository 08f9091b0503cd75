"""GGUF files written by the tests: a tiny HF Llama converted the way llama.cpp does it, and
tensors of hand-made K-quant blocks; and a minimal GGUF tensor-table parser written from the
spec (ggml/docs/gguf.md), independent of both the `gguf` package's reader and tpllama's.

The conversion follows llama.cpp's convert_hf_to_gguf.py (LlamaModel, Qwen2Model, Qwen3Model,
Qwen3MoeModel: each layer's experts stacked into 3-D ffn_{gate,up,down}_exps, the router
mlp.gate as ffn_gate_inp, and the expert_* keys):
HF names -> GGUF names, q_proj/k_proj rows permuted into GGUF's interleaved rotary order by
`LlamaModel.permute` for llama only (Qwen2Model/Qwen3Model keep HF's rows: llama.cpp runs them
with NEOX rope; MistralForCausalLM is converted by LlamaModel, as arch llama, with no sliding-window key), the `{arch}.*` keys (attention.key_length/value_length when config.json has
head_dim), 1-D tensors (norms, biases) kept F32, every 2-D tensor stored in the asked-for type
(quantized with gguf.quants), lm_head dropped when the embeddings are tied.
"""
from __future__ import annotations

import struct
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, quants

T = GGMLQuantizationType

HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
GGUF_ARCH = {"mistral": "llama", "qwen3_moe": "qwen3moe"}   # HF model_type -> general.architecture, where they differ
HF_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
}


HF_EXPERT = {"gate_proj.weight": "ffn_gate_exps.weight", "up_proj.weight": "ffn_up_exps.weight",
             "down_proj.weight": "ffn_down_exps.weight"}


def stack_experts(state: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Per-expert HF tensors (model.layers.{i}.mlp.experts.{e}.{part}) -> one (n_experts, rows, cols)
    tensor per layer and part, named by GGUF; the other tensors as they are."""
    out, experts = {}, {}
    for name, w in state.items():
        parts = name.split(".")
        if parts[3:5] == ["mlp", "experts"] and parts[5].isdigit():
            key = f"blk.{parts[2]}.{HF_EXPERT['.'.join(parts[6:])]}"
            experts.setdefault(key, {})[int(parts[5])] = w
        else:
            out[name] = w
    for key, by_expert in experts.items():
        out[key] = np.stack([by_expert[e] for e in range(len(by_expert))])
    return out


def gguf_name(hf_name: str) -> str:
    if hf_name.startswith("blk."):       # already GGUF's (stacked experts)
        return hf_name
    if hf_name in HF_TO_GGUF:
        return HF_TO_GGUF[hf_name]
    parts = hf_name.split(".")
    assert parts[:2] == ["model", "layers"], hf_name
    return f"blk.{parts[2]}.{HF_LAYER['.'.join(parts[3:])]}"


def llama_permute(w: np.ndarray, n_head: int, n_head_kv: Optional[int] = None) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute: HF rotate-half rows -> GGUF interleaved rows."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape))


def llama_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of llama_permute (GGUF interleaved rows -> HF rotate-half rows)."""
    return (w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape))


def hf_to_gguf_tensors(state: Dict[str, np.ndarray], hf_cfg: dict) -> Dict[str, np.ndarray]:
    """float32 HF state dict -> {GGUF name: float32 array in GGUF row order}."""
    n_head, n_kv = hf_cfg["num_attention_heads"], hf_cfg["num_key_value_heads"]
    permute = gguf_arch(hf_cfg) == "llama"
    out = {}
    for hf, w in stack_experts(state).items():
        if hf == "lm_head.weight" and hf_cfg.get("tie_word_embeddings"):
            continue
        if "rotary_emb" in hf:
            continue
        w = np.asarray(w, dtype=np.float32)
        if permute and hf.endswith("q_proj.weight"):
            w = llama_permute(w, n_head, n_head)
        elif permute and hf.endswith("k_proj.weight"):
            w = llama_permute(w, n_head, n_kv)
        out[gguf_name(hf)] = np.ascontiguousarray(w)
    return out


def gguf_arch(hf_cfg: dict) -> str:
    model_type = hf_cfg.get("model_type", "llama")
    return GGUF_ARCH.get(model_type, model_type)


def encode(w: np.ndarray, qtype: T) -> Tuple[np.ndarray, Optional[T]]:
    """(data, raw_dtype) for GGUFWriter.add_tensor: 1-D tensors stay F32 like llama.cpp does."""
    if w.ndim == 1 or qtype == T.F32:
        return w.astype(np.float32), None
    if qtype == T.F16:
        return w.astype(np.float16), None
    return quants.quantize(w, qtype), qtype


def round_trip(w: np.ndarray, qtype: T) -> np.ndarray:
    """The float32 weights a reader of `qtype` data should give back (1-D tensors are F32)."""
    if w.ndim == 1 or qtype == T.F32:
        return w
    return quants.dequantize(quants.quantize(w, qtype), qtype).astype(np.float32).reshape(w.shape)


def write_gguf(path: Path, tensors: Dict[str, Tuple[np.ndarray, Optional[T]]], *, dim: int, hidden: int,
               layers: int, heads: int, kv_heads: int, vocab: int, context: int = 256,
               rope_theta: float = 10000.0, eps: float = 1e-5, arch: str = "llama",
               extra: Optional[dict] = None, name: str = "tiny", alignment: Optional[int] = None,
               head_dim: Optional[int] = None) -> Path:
    """A GGUF with the `{arch}.*` keys of convert_hf_to_gguf.py and the given (data, raw_dtype) tensors.

    extra: more keys, {key: value} (str, int, float, bool or list of str); alignment: general.alignment;
    head_dim: config.json's head_dim, written as attention.key_length and value_length."""
    w = GGUFWriter(str(path), arch)
    if alignment:
        w.add_custom_alignment(alignment)
    w.add_name(name)
    w.add_context_length(context)
    w.add_embedding_length(dim)
    w.add_block_count(layers)
    w.add_feed_forward_length(hidden)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    if head_dim:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim or dim // heads)
    w.add_rope_freq_base(rope_theta)
    w.add_layer_norm_rms_eps(eps)
    w.add_vocab_size(vocab)
    w.add_file_type(0)
    for key, value in (extra or {}).items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, list(value))
    for tname, (data, raw_dtype) in tensors.items():
        w.add_tensor(tname, data, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def moe_keys(hf_cfg: dict) -> dict:
    """The expert keys convert_hf_to_gguf.py writes for a Qwen3-MoE config (none for a dense one)."""
    experts = hf_cfg.get("num_experts", hf_cfg.get("num_local_experts"))   # transformers 5 writes the latter
    if experts is None:
        return {}
    arch = gguf_arch(hf_cfg)
    return {f"{arch}.expert_count": experts, f"{arch}.expert_used_count": hf_cfg["num_experts_per_tok"],
            f"{arch}.expert_feed_forward_length": hf_cfg["moe_intermediate_size"]}


def hf_model_to_gguf(path: Path, state: Dict[str, np.ndarray], hf_cfg: dict, qtype: T,
                     tensors_extra: Optional[Dict[str, np.ndarray]] = None, **kw) -> Path:
    """Convert a float32 HF state dict into a GGUF of `qtype` (norms F32; a MoE router F32, as
    llama-quantize keeps ffn_gate_inp); tensors_extra: more tensors stored F32 under their GGUF
    names (rope_freqs.weight)."""
    tensors = {n: encode(w, T.F32 if n.endswith("ffn_gate_inp.weight") else qtype)
               for n, w in hf_to_gguf_tensors(state, hf_cfg).items()}
    tensors.update({n: (np.asarray(w, np.float32), None) for n, w in (tensors_extra or {}).items()})
    kw["extra"] = {**moe_keys(hf_cfg), **kw.get("extra", {})}
    return write_gguf(path, tensors, dim=hf_cfg["hidden_size"], hidden=hf_cfg["intermediate_size"],
                      layers=hf_cfg["num_hidden_layers"], heads=hf_cfg["num_attention_heads"],
                      kv_heads=hf_cfg["num_key_value_heads"], vocab=hf_cfg["vocab_size"],
                      context=hf_cfg["max_position_embeddings"], rope_theta=hf_cfg["rope_theta"],
                      eps=hf_cfg["rms_norm_eps"], arch=gguf_arch(hf_cfg),
                      head_dim=hf_cfg.get("head_dim"), **kw)


# ------------------------------------------------------------------------------ K-quant blocks

# Byte offsets of the fp16 scale fields in one 256-element block (ggml-common.h block_q*_K).
K_SCALE_FIELDS = {
    T.Q4_K: (0, 2),        # d, dmin, scales[12], qs[128]                 (144 bytes)
    T.Q5_K: (0, 2),        # d, dmin, scales[12], qh[32], qs[128]         (176 bytes)
    T.Q6_K: (208,),        # ql[128], qh[64], scales[16] (int8), d        (210 bytes)
    T.Q2_K: (80, 82),      # scales[16], qs[64], d, dmin                  (84 bytes)
    T.Q3_K: (108,),        # hmask[32], qs[64], scales[12], d             (110 bytes)
}


def random_kquant(rows: int, cols: int, qtype: T, rng: np.random.Generator, scale: float = 1e-2) -> np.ndarray:
    """uint8 (rows, cols/256*block_bytes) of valid random blocks: random quants and sub-scales,
    the fp16 super-block scales set to small finite values (uniform in [scale/4, scale])."""
    block_size, block_bytes = quants.GGML_QUANT_SIZES[qtype]
    assert cols % block_size == 0
    nb = cols // block_size
    data = rng.integers(0, 256, size=(rows, nb, block_bytes), dtype=np.uint8)
    for off in K_SCALE_FIELDS[qtype]:
        d = rng.uniform(scale / 4, scale, size=(rows, nb)).astype(np.float16)
        data[:, :, off:off + 2] = d.view(np.uint8).reshape(rows, nb, 2)
    return data.reshape(rows, nb * block_bytes)


# ------------------------------------------------------------------------------ spec reader

_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}   # GGUF value type -> bytes
_STRING, _ARRAY = 8, 9


def gguf_tensor_table(path) -> Dict[str, Tuple[Tuple[int, ...], str, int, int]]:
    """{name: (ne (GGUF order), type name, absolute data offset, nbytes)} straight from the file's bytes."""
    with open(path, "rb") as f:
        buf = f.read(64 << 20)       # the header of any test file fits; tensor data is not needed
    pos = 0

    def take(fmt):
        nonlocal pos
        vals = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return vals if len(vals) > 1 else vals[0]

    def string():
        nonlocal pos
        n = take("Q")
        pos += n
        return buf[pos - n:pos].decode("utf-8")

    def value(vtype):
        nonlocal pos
        if vtype == _STRING:
            return string()
        if vtype == _ARRAY:
            itype, count = take("I"), take("Q")
            if itype in _SCALAR:
                pos += _SCALAR[itype] * count
                return None
            return [value(itype) for _ in range(count)]
        fmt = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}[vtype]
        return take(fmt)

    assert buf[:4] == b"GGUF", path
    pos = 4
    version, n_tensors, n_kv = take("I"), take("Q"), take("Q")
    assert version in (2, 3), version
    alignment = 32
    for _ in range(n_kv):
        key = string()
        v = value(take("I"))
        if key == "general.alignment":
            alignment = v
    infos = []
    for _ in range(n_tensors):
        name = string()
        n_dims = take("I")
        ne = tuple(take("Q") for _ in range(n_dims))
        ttype, offset = take("I"), take("Q")
        infos.append((name, ne, ttype, offset))
    start = -(-pos // alignment) * alignment
    table = {}
    for name, ne, ttype, offset in infos:
        qt = GGMLQuantizationType(ttype)
        block_size, block_bytes = quants.GGML_QUANT_SIZES[qt]
        nbytes = int(np.prod(ne)) // block_size * block_bytes
        table[name] = (ne, qt.name, start + offset, nbytes)
    return table


def gguf_tensor_bytes(path, name) -> np.ndarray:
    """A tensor's bytes as stored, uint8 (rows, bytes per row), via gguf_tensor_table."""
    ne, _, offset, nbytes = gguf_tensor_table(path)[name]
    rows = int(np.prod(ne[1:])) if len(ne) > 1 else 1
    return np.fromfile(path, dtype=np.uint8, count=nbytes, offset=offset).reshape(rows, -1)


# ------------------------------------------------------------------------------ a Qwen GGUF that always says one token

CHATML = ("{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def write_one_token_qwen(path: Path, answer: str) -> Path:
    """A 1-layer qwen2 GGUF with a byte-level vocabulary and Qwen's special tokens, keyed as
    llama.cpp writes Qwen2.5-Instruct (eos <|im_end|>, bos and padding <|endoftext|>, no BOS added,
    a ChatML template), whose greedy next token is always `answer`: every layer adds nothing
    (zero matrices and biases), every embedding row is the same, and only answer's output row
    is non-zero."""
    from tokenizers import pre_tokenizers
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = sorted(pre_tokenizers.ByteLevel.alphabet()) + ["\u0120t"] + specials
    types = [1] * (len(tokens) - len(specials)) + [3] * len(specials)
    dim, hidden, heads, kv_heads, vocab = 64, 128, 4, 2, len(tokens)
    kv = kv_heads * dim // heads
    zeros = {"attn_q": (dim, dim), "attn_k": (kv, dim), "attn_v": (kv, dim), "attn_output": (dim, dim),
             "ffn_gate": (hidden, dim), "ffn_up": (hidden, dim), "ffn_down": (dim, hidden)}
    tensors = {f"blk.0.{name}.weight": np.zeros(shape, np.float32) for name, shape in zeros.items()}
    tensors.update({f"blk.0.{n}.bias": np.zeros(size, np.float32) for n, size in (("attn_q", dim), ("attn_k", kv),
                                                                                  ("attn_v", kv))})
    tensors.update({"blk.0.attn_norm.weight": np.ones(dim, np.float32), "blk.0.ffn_norm.weight": np.ones(dim, np.float32),
                    "output_norm.weight": np.ones(dim, np.float32), "token_embd.weight": np.ones((vocab, dim), np.float32)})
    output = np.zeros((vocab, dim), np.float32)
    output[tokens.index(answer)] = 0.05
    tensors["output.weight"] = output
    keys = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": ["\u0120 t"],
            "tokenizer.ggml.eos_token_id": tokens.index("<|im_end|>"),
            "tokenizer.ggml.bos_token_id": tokens.index("<|endoftext|>"),
            "tokenizer.ggml.padding_token_id": tokens.index("<|endoftext|>"),
            "tokenizer.ggml.add_bos_token": False, "tokenizer.chat_template": CHATML}
    return write_gguf(path, {n: (w, None) for n, w in tensors.items()}, dim=dim, hidden=hidden, layers=1, heads=heads,
                      kv_heads=kv_heads, vocab=vocab, arch="qwen2", extra=keys, name="one-token-qwen")

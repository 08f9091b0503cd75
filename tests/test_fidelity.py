"""Fidelity against an independent reader: Hugging Face transformers loads the default model's
GGUF itself (dequantizing every tensor with gguf-py, so its floats are exactly the file's
weights) and tpllama, at its default weight type, must give the same logits.

32 prompt tokens + 16 greedy decode steps of HF's, teacher-forced: both read the same 48 tokens.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import tpllama
from mpi_util import REPO, run_script

PROMPT_TOKENS = 32
DECODE_STEPS = 16
PROMPT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
          "combined movable metal type, oil-based ink and a wooden screw press. Within fifty years, "
          "printers in more than two hundred cities had produced millions of books")

pytestmark = pytest.mark.slow


def logit_agreement(ours: np.ndarray, ref: np.ndarray):
    """(mean cosine over positions, fraction of positions whose top-1 token agrees)."""
    cos = np.sum(ours * ref, -1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(ref, axis=-1))
    return float(cos.mean()), float(np.mean(ours.argmax(-1) == ref.argmax(-1)))


def _fast_gguf_parsing(monkeypatch):
    """Make transformers' GGUF loading take seconds instead of minutes, changing no value it reads:
    gguf-py's reader over a plain view of its memory map (np.memmap's per-slice bookkeeping
    dominates a 49k-token vocabulary), and one tensor-name map instead of one per module."""
    import functools
    import gguf

    class PlainViewReader(gguf.GGUFReader):
        @property
        def data(self):
            return self._data

        @data.setter
        def data(self, value):
            self._mapped, self._data = value, value.view(np.ndarray)

    monkeypatch.setattr(gguf, "GGUFReader", PlainViewReader)
    monkeypatch.setattr(gguf, "get_tensor_name_map", functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map))


@pytest.fixture(scope="module")
def hf_reference(smollm2):
    """(48 token ids, HF's logits at each of them) for the default model's GGUF."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from tpllama.formats import open_model
    from tpllama.tokenizer import load_tokenizer
    prompt = load_tokenizer(open_model(smollm2)).encode(PROMPT)[:PROMPT_TOKENS]
    assert len(prompt) == PROMPT_TOKENS
    torch.set_num_threads(1)
    patch = pytest.MonkeyPatch()
    _fast_gguf_parsing(patch)
    try:
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            os.path.dirname(smollm2), gguf_file=os.path.basename(smollm2), dtype=torch.float32).eval()
    finally:
        patch.undo()
    with torch.no_grad():
        tokens = list(prompt)
        for _ in range(DECODE_STEPS):       # HF's own greedy continuation
            tokens.append(int(hf(torch.tensor([tokens])).logits[0, -1].argmax()))
        ref = hf(torch.tensor([tokens])).logits[0].numpy()
    return tokens, ref


def test_default_weight_type_matches_hf_on_one_rank(smollm2, hf_reference):
    tokens, ref = hf_reference
    model = tpllama.load(smollm2, tokenizer="none", ctx_size=64, threads=1)     # the default: --weight-type auto
    cos, top1 = logit_agreement(model.forward(tokens, 0), ref)
    print(f"SmolLM2 Q4_1 at auto, 1 rank: mean cosine {cos:.5f}, top-1 {top1:.1%}")
    assert cos >= 0.998 and top1 >= 0.95, f"mean logit cosine {cos:.5f}, top-1 agreement {top1:.1%}"


def test_default_weight_type_matches_hf_on_three_ranks(smollm2, hf_reference, tmp_path):
    tokens, ref = hf_reference
    (tmp_path / "tokens.json").write_text(json.dumps(tokens))
    run_script(3, "forward_logits.py", smollm2, "auto", tmp_path / "tokens.json", tmp_path / "three.npy", timeout=400)
    cos, top1 = logit_agreement(np.load(tmp_path / "three.npy"), ref)
    print(f"SmolLM2 Q4_1 at auto, 3 ranks: mean cosine {cos:.5f}, top-1 {top1:.1%}")
    assert cos >= 0.998 and top1 >= 0.95, f"mean logit cosine {cos:.5f}, top-1 agreement {top1:.1%}"


def test_capital_of_france_is_paris_at_the_default(smollm2):
    """The issue's one-liner: q40 re-quantization continued "approximately 315 kilometres"."""
    proc = subprocess.run([sys.executable, "-m", "tpllama.generate", "-m", smollm2, "--raw", "-q", "-t", "1",
                           "-p", "The capital of France is", "--temp", "0", "-n", "6"],
                          capture_output=True, text=True, timeout=300, cwd=str(REPO),
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Paris" in proc.stdout, proc.stdout

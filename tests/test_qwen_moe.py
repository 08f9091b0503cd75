"""Qwen3-MoE (mixture-of-experts FFN) against the reference: HF transformers' Qwen3MoeForCausalLM.

A tiny model (tiny_models.QWEN_MOE_SPEC: 2 layers, 8 experts of FFN width 128, top 2 renormalised)
is written by the test as an HF directory (every expert its own tensor, as real checkpoints) and
the same weights as GGUF the way llama.cpp's convert_hf_to_gguf.py writes them (experts stacked
into 3-D ffn_*_exps, the router as ffn_gate_inp). tpllama's f32 logits over a prompt and decode
steps must match HF's within 1e-4 x the logit scale at 1 rank, and at 2 and 3 ranks (each expert's
4 units of 32 split 1, 2, 1; 4 heads split 2, 1, 1); greedy tokens are HF's at every rank count.
"""
import json
from dataclasses import replace

import numpy as np
import pytest

from gguf_writer import T, hf_model_to_gguf
from mpi_util import run_script
from test_qwen import TOLERANCE, _hf_config, assert_matches, load_f32, load_with_config_changes, reference, run_calls
from tiny_models import QWEN_MOE_SPEC, reference_logits, rule_prompt, write_hf_model

PROMPT_TOKENS = 12
DECODE_STEPS = 6


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """(HF directory, GGUF path, HF config, saved tensors, reference calls) of the tiny Qwen3-MoE."""
    from safetensors.numpy import load_file
    directory = tmp_path_factory.mktemp("qwen3moe")
    torch_model = write_hf_model(QWEN_MOE_SPEC, directory)
    cfg, state = _hf_config(directory), load_file(directory / "model.safetensors")   # experts one by one
    gguf = hf_model_to_gguf(directory.parent / "qwen3moe.gguf", state, cfg, T.F32)
    calls = reference_logits(torch_model, rule_prompt(QWEN_MOE_SPEC, PROMPT_TOKENS), DECODE_STEPS)
    return directory, gguf, cfg, state, calls


def hf_greedy(calls) -> list:
    """The reference's greedy tokens after the prompt: each decode call's input, then the last argmax."""
    return [ids[0] for ids, _, _ in calls[1:]] + [int(np.argmax(calls[-1][2][-1]))]


def test_hf_directory_and_gguf_logits_match_reference(moe):
    directory, gguf, _, _, calls = moe
    for what, path in (("HF directory", directory), ("GGUF", gguf)):
        model = load_f32(path)
        c = model.config
        assert (c.arch, c.n_experts, c.n_experts_used, c.hidden_dim, c.expert_weights_norm) == ("qwen3moe", 8, 2, 128, True)
        assert_matches(run_calls(model, calls), calls, f"qwen3moe ({what})")


def test_logits_and_greedy_tokens_match_reference_at_2_and_3_ranks(moe, tmp_path):
    """From the HF directory and the GGUF, on 2 and 3 ranks (uneven heads and expert units): one
    mpirun per rank count; the greedy tokens of the runtime's generate are HF's at every count."""
    directory, gguf, _, _, calls = moe
    replay = [[list(map(int, ids)), start] for ids, start, _ in calls]
    want = hf_greedy(calls)
    for ranks in (2, 3):
        jobs = [[str(path), str(tmp_path / f"{source}-{ranks}.npy"), replay, len(want)]
                for source, path in (("hf", directory), ("gguf", gguf))]
        (tmp_path / f"jobs-{ranks}.json").write_text(json.dumps(jobs))
        assert run_script(ranks, "logits_of_calls.py", "f32", tmp_path / f"jobs-{ranks}.json", timeout=300) == \
            {"ranks": ranks, "models": len(jobs)}
        for source in ("hf", "gguf"):
            out = tmp_path / f"{source}-{ranks}.npy"
            assert_matches(np.load(out), calls, f"qwen3moe ({source}, {ranks} ranks)")
            assert json.loads(out.with_suffix(".npy.json").read_text()) == want, (source, ranks)
    one = load_f32(gguf)
    assert one.generate(calls[0][0], len(want), temperature=0.0, chat=False).tokens == want


def _far_off(model, calls) -> bool:
    ref = reference(calls)
    return np.abs(run_calls(model, calls) - ref).max() > 10 * TOLERANCE * np.abs(ref).max()


def test_the_reference_test_catches_wrong_routing(moe):
    """Top-k weights not renormalised, or the experts in another order (a reader that mixed up
    which expert is which), give logits off by far more than the tolerance."""
    directory, _, _, _, calls = moe
    model = load_f32(directory)
    rm = model.rank_model
    rm.config = replace(rm.config, expert_weights_norm=False)
    assert _far_off(model, calls), "without renormalisation"
    model = load_f32(directory)
    for layer in model.rank_model.w.layers:
        layer.experts = layer.experts[1:] + layer.experts[:1]
    assert _far_off(model, calls), "experts rotated"


def test_quantized_experts_stay_in_the_files_type(moe, tmp_path):
    """A Q8_0 GGUF: every expert's slice is a q80 matrix holding exactly the file's values
    (gguf-py's dequantizer of the stacked 3-D tensor), at each rank's slice of a 3-rank plan;
    and the plan's weight bytes are what the rank holds (experts and router counted)."""
    from gguf import quants
    from tpllama.plan import weight_bytes
    _, _, cfg, state, _ = moe
    path = hf_model_to_gguf(tmp_path / "q8.gguf", state, cfg, T.Q8_0)
    stacked = {n: quants.dequantize(quants.quantize(w, T.Q8_0), T.Q8_0)
               for n, w in _stacked(state, cfg, layer=1).items()}
    from tpllama.formats import open_model
    from tpllama.loader import load_rank_weights
    from tpllama.plan import make_plan
    reader = open_model(str(path))
    plan = make_plan(reader.config, 3)
    assert [len(s.ffn) for s in plan.ranks] == [32, 64, 32]     # rank 0 has two heads: fewer expert units
    for shard in plan.ranks:
        w = load_rank_weights(reader, shard, "auto")
        f = slice(shard.ffn.start, shard.ffn.stop)
        for e, ex in enumerate(w.layers[1].experts):
            assert {ex.w1.wtype, ex.w3.wtype, ex.w2.wtype} == {"q80"}
            np.testing.assert_array_equal(ex.w1.dequantized(), stacked["gate"][e][f])
            np.testing.assert_array_equal(ex.w3.dequantized(), stacked["up"][e][f])
            np.testing.assert_array_equal(ex.w2.dequantized(), stacked["down"][e][:, f])
        np.testing.assert_array_equal(w.layers[1].router.data, state["model.layers.1.mlp.gate.weight"])
        assert w.nbytes == weight_bytes(reader.config, shard, "q80")


def _stacked(state, cfg, layer: int) -> dict:
    n = cfg["num_local_experts"]
    return {part: np.stack([state[f"model.layers.{layer}.mlp.experts.{e}.{part}_proj.weight"] for e in range(n)])
            for part in ("gate", "up", "down")}


def test_shard_file_keeps_experts_read_and_mapped(moe, tmp_path):
    """A shard file written and read back, or run memory-mapped, holds the router and every
    expert: the logits still match."""
    directory, _, _, _, calls = moe
    assert not load_f32(directory, shard_cache=str(tmp_path)).shard_file.hit     # writes the shard file
    for mapped in (False, True):
        model = load_f32(directory, shard_cache=str(tmp_path), mmap=mapped)
        assert model.shard_file.hit, model.shard_file.note
        assert_matches(run_calls(model, calls), calls, f"qwen3moe (from its shard file, mapped={mapped})")


def test_plan_shows_the_expert_split(moe, capsys):
    from tpllama.plan import main
    _, gguf, _, _, _ = moe
    assert main(["-m", str(gguf), "-n", "3", "--host-memory", "1G"]) == 0
    out = capsys.readouterr().out
    assert "2 layers, dim 64, 8 experts of FFN 128, 2 per token" in out
    assert "every rank holds the router (8 x 64, float32) and the FFN units below of each of the 8 experts" in out
    assert "expert units" in out
    assert [line.split()[4] for line in out.splitlines()[3:6]] == ["0-31", "32-95", "96-127"]   # of every expert


@pytest.mark.parametrize("changes, message", [
    ({"decoder_sparse_step": 2}, r"dense FFN layers among the expert layers \(decoder_sparse_step 2, mlp_only_layers \[\]\)"),
    ({"mlp_only_layers": [1]}, r"dense FFN layers among the expert layers \(decoder_sparse_step 1, mlp_only_layers \[1\]\)"),
    ({"num_experts_per_tok": 9}, r"num_experts_per_tok is 9, expected 1 to 8 \(the expert count\)"),
])
def test_moe_options_not_supported_are_refused(moe, tmp_path, changes, message):
    from tpllama.errors import ModelFormatError
    with pytest.raises(ModelFormatError, match=message):
        load_with_config_changes(moe[0], tmp_path, changes)


def test_whole_expert_split_benchmark_counts_the_busiest_rank():
    """benchmarks/moe_split.py (the figures docs/formats.md gives for not splitting by whole
    experts) against a case counted by hand: 2 of 4 experts, 2 per rank: of the 6 pairs, 2 sit
    on one rank (busiest runs 2), 4 straddle (busiest runs 1): 8/6 on average."""
    from benchmarks.moe_split import busiest_rank_load
    assert busiest_rank_load(4, 2, 2, 200_000) == pytest.approx(8 / 6, abs=0.01)
    assert busiest_rank_load(128, 8, 1, 1000) == 8.0


@pytest.mark.parametrize("extra, message", [
    ({"qwen3moe.expert_shared_count": 1}, r"shared experts \(qwen3moe.expert_shared_count = 1\) are not supported"),
    ({"qwen3moe.expert_gating_func": 2}, r"expert gating function 2 \(qwen3moe.expert_gating_func\) is not supported"),
    ({"qwen3moe.expert_count": 16}, r"tensor 'blk.0.ffn_gate_inp.weight' has shape \(8, 64\), expected \(16, 64\)"),
])
def test_moe_gguf_not_supported_or_inconsistent_is_refused(moe, tmp_path, extra, message):
    from tpllama.errors import ModelFormatError
    _, _, cfg, state, _ = moe
    with pytest.raises(ModelFormatError, match=message):
        load_f32(hf_model_to_gguf(tmp_path / "bad.gguf", state, cfg, T.F32, extra=extra))

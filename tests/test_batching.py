"""Continuous batching (tpllama.batching, Model.generate_batch): each sequence's tokens equal the
same prompt generated alone, at 1 and 2 ranks, greedy and seeded; one forward pass per step makes
exactly two all-reduces per layer whatever the number of sequences; slots are freed and reused."""
import numpy as np
import pytest

from mpi_util import run_script
from tpllama.errors import TpllamaError


@pytest.fixture(scope="module")
def runs(stories_gguf):
    return {ranks: run_script(ranks, "batch_generate.py", stories_gguf, ranks, timeout=300) for ranks in (1, 2)}


@pytest.mark.mpi
@pytest.mark.parametrize("ranks", [1, 2])
@pytest.mark.parametrize("kind", ["greedy", "seeded"])
def test_each_batched_sequence_equals_its_solo_generation(runs, ranks, kind):
    r = runs[ranks]
    assert r["batch"][kind] == r["solo"][kind]
    assert all(len(t) > 0 for t in r["solo"][kind])


@pytest.mark.mpi
def test_batched_tokens_are_the_same_at_one_and_two_ranks(runs):
    assert runs[1]["batch"] == runs[2]["batch"]
    assert runs[1]["generate_batch"] == runs[2]["generate_batch"] == runs[1]["solo"]["greedy"]


@pytest.mark.mpi
def test_every_step_makes_two_allreduces_per_layer_whatever_the_batch(runs):
    r = runs[2]
    steps = np.array(r["steps"])                     # (all-reduces, sequences, rows) per step
    assert (steps[:, 0] == 2 * r["n_layers"]).all()
    assert steps[:, 1].max() == 3                    # the three slots ran together
    assert steps[:, 2].max() <= 5                    # chunked prefill: a step holds at most step_tokens rows
    assert set(steps[:, 1]) >= {1, 2, 3}


def test_generate_batch_checks_its_arguments(stories_gguf):
    import tpllama
    from tpllama.sampler import SamplingParams
    with pytest.raises(TpllamaError, match="parallel"):
        tpllama.load(stories_gguf, ctx_size=64, threads=1, parallel=0)
    model = tpllama.load(stories_gguf, ctx_size=64, threads=1, parallel=2)
    with pytest.raises(TpllamaError, match="prompts"):
        model.generate_batch([], 4)
    with pytest.raises(TpllamaError, match="sampling"):
        model.generate_batch(["a", "b"], 4, sampling=[SamplingParams()])
    with pytest.raises(TpllamaError, match=r"prompts\[1\] has \d+ tokens but the context holds 64"):
        model.generate_batch(["a", "word " * 80], 4)
    assert [g.finish_reason for g in model.generate_batch(["One day", "A cat"], 0)] == ["length", "length"]
    assert tpllama.load(stories_gguf, ctx_size=64, threads=1, parallel=None).slots == 8   # what fits, at most 8


def test_the_memory_plan_holds_a_cache_per_slot():
    from tpllama.config import ModelConfig
    from tpllama.plan import format_memory_table, kv_bytes_per_token, make_plan, rank_memory
    c = ModelConfig(dim=64, hidden_dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100, max_seq_len=512)
    plan = make_plan(c, 2)
    one, four = (rank_memory(plan, "f32", 512, ["h", "h"], [2**30] * 2, slots=s) for s in (1, 4))
    assert [m.kv_cache for m in four] == [4 * m.kv_cache for m in one] == [4 * 512 * kv_bytes_per_token(c, s)
                                                                           for s in plan.ranks]
    assert "kv cache for 4 sequences" in format_memory_table(four, 512, slots=4)


def test_a_sequence_reuses_the_prefix_an_earlier_one_left_in_its_slot(stories_gguf):
    import tpllama
    from tpllama.batching import Batch, Request, run_to_end
    from tpllama.sampler import SamplingParams
    model = tpllama.load(stories_gguf, ctx_size=128, threads=1, parallel=2)
    greedy = SamplingParams(temperature=0)
    first, other = model.encode_prompt("Once upon a time"), model.encode_prompt("The dog ran")
    batch = Batch(model)
    a, b = run_to_end(batch, [Request(first, 12, greedy), Request(other, 12, greedy)])
    follow_up = first + a.tokens + model.encode_prompt(" Then")
    c, = run_to_end(batch, [Request(follow_up, 12, greedy)])
    assert c.slot == a.slot and c.reused == len(first) + len(a.tokens) - 1   # the last token was never fed
    model.reset()
    alone = model.generate(follow_up, 12, temperature=0).tokens
    assert c.tokens == alone
    model.generate(other, 12, temperature=0)           # the one-conversation API overwrote slot 0
    d, = run_to_end(batch, [Request(follow_up, 12, greedy)])
    assert d.reused <= 1 and d.tokens == alone           # at most the shared BOS of the other slot


def test_cancel_ends_a_running_or_waiting_sequence_and_frees_its_slot(stories_gguf):
    import tpllama
    from tpllama.batching import Batch, Request
    from tpllama.sampler import SamplingParams
    model = tpllama.load(stories_gguf, ctx_size=128, threads=1, parallel=1)
    greedy = SamplingParams(temperature=0)
    batch = Batch(model)
    running, waiting = (batch.add(Request(model.encode_prompt(p), 50, greedy)) for p in ("Once upon", "A dog"))
    batch.step()
    assert list(batch.running) == [running] and len(batch.waiting) == 1   # one slot: the second waits
    assert batch.cancel(waiting).finish_reason == batch.cancel(running).finish_reason == "cancelled"
    assert batch.idle and batch.cancel(running) is None
    assert batch.take(waiting).tokens == [] and len(batch.take(running).tokens) == 1
    third = batch.add(Request(model.encode_prompt("The sun"), 5, greedy))
    batch.step()
    assert list(batch.running) == [third]

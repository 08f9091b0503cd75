"""Sampling: the distributed candidate exchange decides exactly what the full logits would,
and each filter keeps the distribution it promises (checked against exact probabilities)."""
import numpy as np
import pytest

from tpllama.errors import TpllamaError
from tpllama.sampler import Sampler, SamplingParams, local_candidates


def split_pick(logits, params, ranks, seed=0):
    """What root decides from `ranks` vocab shards' candidates (None: it would ask for full logits)."""
    sampler = Sampler(SamplingParams(**{**params.__dict__, "seed": seed}))
    parts = np.array_split(np.arange(len(logits)), ranks)
    got = [local_candidates(logits[p], int(p[0]), params.candidates_per_rank) for p in parts]
    values = np.concatenate([g[0] for g in got])
    ids = np.concatenate([g[1] for g in got])
    extras = np.stack([g[2] for g in got])
    token = sampler.pick(values, ids, extras)
    return token if token is not None else Sampler(SamplingParams(**{**params.__dict__, "seed": seed})).pick_full(logits)


def frequencies(logits, params, draws=20000, ranks=1):
    sampler = Sampler(SamplingParams(**{**params.__dict__, "seed": 123}))
    counts = np.zeros(len(logits))
    for _ in range(draws):
        counts[sampler.pick_full(logits)] += 1
    return counts / draws


def test_greedy_is_argmax_and_ties_go_to_the_lowest_id():
    logits = np.array([0.1, 3.0, 3.0, -1.0, 3.0], dtype=np.float32)
    for ranks in (1, 2, 3, 5):
        assert split_pick(logits, SamplingParams(temperature=0.0), ranks) == 1


@pytest.mark.parametrize("params", [
    SamplingParams(), SamplingParams(temperature=1.3, top_k=5, top_p=1.0, min_p=0.0),
    SamplingParams(temperature=0.7, top_k=0, top_p=0.9, min_p=0.0),
    SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.2),
    SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0),
])
def test_shards_decide_exactly_what_the_full_logits_decide(params):
    rng = np.random.default_rng(7)
    for trial in range(30):
        logits = (rng.standard_normal(600) * rng.uniform(0.5, 6)).astype(np.float32)
        full = Sampler(SamplingParams(**{**params.__dict__, "seed": trial})).pick_full(logits)
        for ranks in (2, 3, 4):
            assert split_pick(logits, params, ranks, seed=trial) == full


def exact(logits, keep, temperature):
    p = np.zeros(len(logits))
    z = np.exp((logits[keep] - logits[keep].max()) / temperature)
    p[keep] = z / z.sum()
    return p


def test_temperature_alone_samples_the_softmax():
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    f = frequencies(logits, SamplingParams(temperature=0.8, top_k=0, top_p=1.0, min_p=0.0))
    assert np.abs(f - exact(logits, np.arange(6), 0.8)).max() < 0.015


def test_top_k_keeps_the_k_best():
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    f = frequencies(logits, SamplingParams(temperature=1.0, top_k=3, top_p=1.0, min_p=0.0))
    assert np.abs(f - exact(logits, np.arange(3), 1.0)).max() < 0.015


def test_top_p_keeps_the_nucleus():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    # 0.5 + 0.3 = 0.8 < 0.85 -> the nucleus needs the third token too
    f = frequencies(logits, SamplingParams(temperature=1.0, top_k=0, top_p=0.85, min_p=0.0))
    assert f[3] == 0 and np.abs(f - exact(logits, np.arange(3), 1.0)).max() < 0.015


def test_min_p_drops_unlikely_tokens():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    f = frequencies(logits, SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.35))  # keeps p >= 0.175
    assert f[2] == 0 and f[3] == 0 and np.abs(f - exact(logits, np.arange(2), 1.0)).max() < 0.015


def test_same_seed_same_tokens_other_seed_other_tokens():
    logits = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.95, min_p=0.0)
    a = [Sampler(SamplingParams(**{**params.__dict__, "seed": 42})) for _ in range(2)]
    seq = [[s.pick_full(logits) for _ in range(20)] for s in a]
    assert seq[0] == seq[1]
    b = Sampler(SamplingParams(**{**params.__dict__, "seed": 43}))
    assert [b.pick_full(logits) for _ in range(20)] != seq[0]


@pytest.mark.parametrize("bad,param,flag", [({"top_k": -1}, "top_k=-1", "--top-k -1"),
                                            ({"top_p": 0.0}, "top_p=0.0", "--top-p 0.0"),
                                            ({"top_p": 1.5}, "top_p=1.5", "--top-p 1.5"),
                                            ({"min_p": -0.1}, "min_p=-0.1", "--min-p -0.1"),
                                            ({"temperature": float("nan")}, "temperature=nan", "--temp nan")])
def test_bad_parameters_name_the_parameter_and_the_cli_the_flag(bad, param, flag):
    with pytest.raises(TpllamaError) as e:
        SamplingParams(**bad)
    assert str(e.value).startswith(param + ": ")
    assert e.value.flag_message().startswith(flag + ": ")

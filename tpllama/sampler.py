"""Sampling the next token from vocab-parallel logits without gathering them.

Each rank sends root its top-n candidates (value, global id) and the log-sum-exp of its
slice; root merges them and samples. This is exact: candidates a rank did not send are
no larger than its last sent value, so the merged list is the true ranking above that
floor. When the filters (top-k, top-p, min-p) reach below it, root asks for the full
logits once (only top-k = 0 with a flat distribution does that).

The filter chain follows llama.cpp's flags: top-k, top-p, min-p on the raw logits, then
temperature, then a draw. temperature <= 0 is greedy (lowest id wins a tie).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields, replace
from typing import Any, Dict, Optional, Tuple

import numpy as np

from . import checks

WIDE_CANDIDATES = 64  # sent per rank when top-k does not bound the set
DEFAULT_MAX_NEW_TOKENS = 256   # tokens a generation makes at most unless told (the library and `generate -n`)
RANDOM_SEED = -1       # llama.cpp's meaning: draw a seed at random
MAX_SEED = 2**64 - 1


@dataclass(frozen=True)
class Setting:
    """What one sampling setting accepts, its command-line flags and its one-line help.

    Every check of a sampling value (the library, the command line, the server's requests) and
    every help text reads it from here, through SamplingParams' field metadata."""
    flags: Tuple[str, ...]       # the first one names the setting in command-line errors
    help: str                    # --help text; "(default X)" is added when the default is not None
    rule: str                    # what an error says the value must be
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False       # low itself is refused
    whole: bool = False          # a whole number (int), not a float
    random: Optional[int] = None  # a value meaning "no value": None (the seed's -1)

    @property
    def type(self) -> type:
        return int if self.whole else float

    def check(self, name: str, value: Any) -> Any:
        """The value as the sampler keeps it, or ParameterError naming `name` (and the flag)."""
        if self.random is not None and (value is None or (checks.is_int(value) and value == self.random)):
            return None
        try:
            if self.whole:
                checks.integer(name, value, int(self.low), self.rule, maximum=self.high)
            else:
                checks.number(name, value, self.low, self.high, self.rule, low_open=self.low_open)
        except checks.ParameterError as e:
            e.flag = self.flags[0]
            raise
        return int(value) if self.whole else value


def _setting(default, **setting) -> Any:
    return field(default=default, metadata={"setting": Setting(**setting)})


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen: the one home of the sampling defaults, their accepted
    values and their help texts (the command-line flags and the server's request defaults are
    made from these fields)."""
    temperature: float = _setting(0.8, flags=("--temp",), help="temperature; 0 is greedy",
                                  rule="expected a finite number >= 0 (0 is greedy)", low=0.0)
    top_k: int = _setting(40, flags=("--top-k",), help="keep the k most likely tokens, 0 = off",
                          rule="expected a whole number >= 0 (0 turns it off)", low=0, whole=True)
    top_p: float = _setting(0.95, flags=("--top-p",), help="nucleus sampling mass, 1 = off",
                            rule="expected a number above 0 and at most 1 (1 turns it off)", low=0.0, high=1.0,
                            low_open=True)
    min_p: float = _setting(0.05, flags=("--min-p",),
                            help="drop tokens below min-p times the top probability, 0 = off",
                            rule="expected a number from 0 to 1 (0 turns it off)", low=0.0, high=1.0)
    seed: Optional[int] = _setting(None, flags=("-s", "--seed"),
                                   help="random seed, 0 to 2^64-1 (same seed, same text); -1 or none: random",
                                   rule="expected a whole number from 0 to 2^64-1, or -1 for a random seed",
                                   low=0, high=MAX_SEED, whole=True, random=RANDOM_SEED)

    def __post_init__(self):
        """Refuse what the filters cannot mean (NaN, negatives, top_p outside (0, 1]); seed -1 is random."""
        for f, setting in settings():
            checked = setting.check(f.name, getattr(self, f.name))
            if f.name == "seed":
                object.__setattr__(self, "seed", checked)

    def with_values(self, **values) -> "SamplingParams":
        """A copy with the given fields replaced; a None value keeps this one's (checked again)."""
        given = {k: v for k, v in values.items() if v is not None}
        return replace(self, **given) if given else self

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0 or self.top_k == 1

    @property
    def candidates_per_rank(self) -> int:
        if self.greedy:
            return 1
        return self.top_k if self.top_k > 0 else WIDE_CANDIDATES


def settings():
    """(field, Setting) of each sampling setting, in SamplingParams' order."""
    return [(f, f.metadata["setting"]) for f in fields(SamplingParams)]


def setting(name: str) -> Setting:
    """The Setting of one SamplingParams field."""
    return SamplingParams.__dataclass_fields__[name].metadata["setting"]


def defaults() -> Dict[str, Any]:
    """SamplingParams' defaults by field name."""
    return {f.name: f.default for f in fields(SamplingParams)}


def local_candidates(logits: np.ndarray, offset: int, n: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """This rank's top n of its (V_r,) logits: values (desc), global ids, extras [lse, complete, last value]."""
    n = min(n, logits.shape[0])
    if n == 1:
        idx = np.array([int(np.argmax(logits))])
    else:
        idx = np.argpartition(-logits, n - 1)[:n]
        idx = idx[np.lexsort((idx, -logits[idx]))]
    values = logits[idx].astype(np.float32)
    complete = 1.0 if n == logits.shape[0] else 0.0
    return values, (idx + offset).astype(np.int64), np.array([_lse(logits), complete, float(values[-1])])


class Sampler:
    """Root's sampler: holds the random stream (same seed, same text)."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "little")
        self._rng = None

    @property
    def rng(self) -> np.random.Generator:
        """The random stream of this seed, made on the first draw (greedy decoding never draws,
        and importing numpy.random costs a start about 13 ms)."""
        if self._rng is None:
            self._rng = np.random.default_rng(self.seed)
        return self._rng

    def pick(self, values: np.ndarray, ids: np.ndarray, extras: np.ndarray) -> Optional[int]:
        """Token from the ranks' merged candidates (extras: one row per rank), or None if they
        cannot decide it exactly and the full logits are needed."""
        order = np.lexsort((ids, -values.astype(np.float64)))
        values, ids = values[order].astype(np.float64), ids[order]
        if self.params.greedy:
            return int(ids[0])
        p = self.params
        if p.top_k > 0:   # each rank sent its top_k, so the merged top_k is exact
            values, ids = values[:p.top_k], ids[:p.top_k]
            logp = values - _lse(values)
            exact = len(values)
        else:             # probabilities over the whole vocabulary; exact above the floor
            logp = values - _lse(extras[:, 0])
            incomplete = extras[:, 1] == 0.0
            floor = float(np.max(extras[incomplete, 2])) if incomplete.any() else -np.inf
            exact = int(np.sum(values > floor))
        keep = self._survivors(logp, values)
        if keep is None and exact == len(values):   # every rank sent its whole slice
            keep = exact
        if keep is None or keep > exact:
            return None
        return self._draw(values[:keep], ids[:keep])

    def pick_full(self, logits: np.ndarray) -> int:
        """Token from the whole (V,) logits."""
        values, ids, extras = local_candidates(logits, 0, logits.shape[0])
        return self.pick(values, ids, extras[None, :])

    def _survivors(self, logp: np.ndarray, values: np.ndarray) -> Optional[int]:
        """How many sorted candidates pass top-p and min-p; None if the set may extend past them."""
        p = self.params
        keep, bounded = len(values), p.top_k > 0
        if p.top_p < 1.0:
            reached = np.nonzero(np.cumsum(np.exp(logp)) >= p.top_p)[0]
            if len(reached):
                keep, bounded = int(reached[0]) + 1, True
        if p.min_p > 0.0:
            above = int(np.sum(values[:keep] >= values[0] + np.log(p.min_p)))
            if above < keep:
                keep, bounded = max(1, above), True
        return keep if bounded else None

    def _draw(self, values: np.ndarray, ids: np.ndarray) -> int:
        probs = np.exp((values - values[0]) / self.params.temperature)
        cdf = np.cumsum(probs / probs.sum())
        return int(ids[min(int(np.searchsorted(cdf, self.rng.random(), side="right")), len(ids) - 1)])


def _lse(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    m = float(np.max(x))
    return m + float(np.log(np.sum(np.exp(x - m))))

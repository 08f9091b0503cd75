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

import os
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from . import checks

WIDE_CANDIDATES = 64  # sent per rank when top-k does not bound the set


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    seed: Optional[int] = None

    def __post_init__(self):
        """Refuse what the filters cannot mean (NaN, negatives, top_p outside (0, 1]); seed -1 is random."""
        checks.sampling(self.temperature, self.top_k, self.top_p, self.min_p)
        object.__setattr__(self, "seed", checks.seed(self.seed))

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0 or self.top_k == 1

    @property
    def candidates_per_rank(self) -> int:
        if self.greedy:
            return 1
        return self.top_k if self.top_k > 0 else WIDE_CANDIDATES


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
        self.rng = np.random.default_rng(self.seed)

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

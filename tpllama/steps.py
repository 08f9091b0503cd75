"""What the model's forward steps and the generation loop share on every rank: a failure held
until the ranks agree (`LocalFailure`), a step's clock (`StepClock`), and the error for
non-finite logits.

A rank whose step fails must not leave the others waiting in a collective: it keeps the error,
makes the same collectives as the others (with zeros), and every rank learns the error at the
next agreement, where every rank raises it.
"""
from __future__ import annotations

import time
from typing import Callable, List, Optional

from .errors import TpllamaError
from .stats import RunStats, StepStats


class LocalFailure:
    """An exception on this rank alone during a forward or a generation, held until the next
    collective where every rank learns of it (the candidate gather, or the agreement that ends
    the call); meanwhile the rank makes the same collectives as the others. When the ranks agree
    on an error, the cache positions the call added are dropped (a failed rank's are not valid):
    `history` is the model's list of cached tokens, of which the first `valid` stay."""

    def __init__(self, history: List[int], valid: int):
        self.error: Optional[BaseException] = None
        self._history, self._valid = history, valid

    @property
    def flag(self) -> float:
        return 0.0 if self.error is None else 1.0

    def keep(self, error: BaseException):
        if self.error is None:
            self.error = error

    def attempt(self, fn: Callable[[], object], on_error=None):
        """fn(), or on_error after keeping what it raised."""
        try:
            return fn()
        except Exception as e:
            self.keep(e)
            return on_error

    def agree(self, par, value=None):
        """Collective: every rank's value, or every rank raises the first error any rank kept."""
        try:
            return par.allgather_checked(value, self.error, self.error)
        except Exception:
            del self._history[self._valid:]
            raise


class StepClock:
    """Wall time and the communicator's counters from creation to record()."""

    def __init__(self, par):
        self.par = par
        self.t0 = time.perf_counter()
        self.counters = par.counters.snapshot()

    def record(self, stats: RunStats, phase: str = "decode", tokens: int = 1):
        s0, b0, r0 = self.counters
        s1, b1, r1 = self.par.counters.snapshot()
        stats.steps.append(StepStats(phase, tokens, 1000 * (time.perf_counter() - self.t0), 1000 * (s1 - s0), b1 - b0, r1 - r0))


def non_finite_logits(path: str, position: int, shard_file: Optional[str] = None) -> TpllamaError:
    """shard_file: where this rank's weights were read from, when not converted from the model file
    at this start (a shard file damaged after it was written is used as it is)."""
    cause = (f"check the model file, and the shard file {shard_file} it was converted to (delete it, or run with "
             "--no-shard-cache)" if shard_file else "check the model file")
    return TpllamaError(f"{path}: the model produced non-finite logits at position {position} (NaN or Inf in "
                        f"its weights or activations); {cause}", collective=True)

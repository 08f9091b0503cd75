"""Argument checks shared by the library and the command line, made before any work starts.

Each check raises `ParameterError`, whose message names the library's parameter
(`temperature=nan: ...`); the command line re-words it with its flag (`--temp nan: ...`):
the flag the raiser names, else `FLAGS`'. The sampling settings' ranges and flags live in
`tpllama.sampler.SamplingParams`' field metadata, which applies these checks. Every check is
pure and cheap, so every rank can make it on its own arguments and every rank fails the same way.
"""
from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any, Callable, List, Optional, Sequence

from .errors import TpllamaError

# library parameter -> command-line flag (the sampling settings name theirs: tpllama.sampler)
FLAGS = {
    "max_new_tokens": "-n", "ctx_size": "-c", "threads": "-t", "weight_type": "--weight-type",
    "sync_type": "--sync-type", "kv_type": "--kv-type", "rank_weights": "--rank-weights", "shard_cache": "--shard-cache", "mmap": "--mmap", "weights_from_root": "--weights-from-root",
    "prefetch": "--prefetch",
}


class ParameterError(TpllamaError):
    """A parameter outside its accepted range: names the parameter, its value and the range."""

    def __init__(self, param: str, value: Any, rule: str, collective: bool = False):
        super().__init__(f"{param}={value!r}: {rule}", collective)
        self.param, self.value, self.rule = param, value, rule
        self.flag: Optional[str] = None   # the command-line flag, when the raiser knows it

    def flag_message(self) -> str:
        """The same message in the command line's words (the flag instead of the parameter)."""
        flag = self.flag or FLAGS.get(self.param)
        if flag is None:
            return str(self)
        return f"{flag} {_show(self.value)}: {self.rule}"


def _show(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return repr(value)
    return str(value)


def is_int(value: Any) -> bool:
    """A whole number, and not a bool."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def integer(name: str, value: Any, minimum: int, rule: str, maximum: float = math.inf) -> int:
    if not is_int(value) or value < minimum or value > maximum:
        raise ParameterError(name, value, rule)
    return int(value)


def optional_positive(name: str, value: Any, default_meaning: str) -> Optional[int]:
    """None (the default) or an integer >= 1."""
    if value is None:
        return None
    return integer(name, value, 1, f"expected a whole number >= 1, or leave it out for {default_meaning}")


def optional_flag(name: str, value: Any, none_meaning: str) -> Optional[bool]:
    """None (the default: tpllama decides), True or False."""
    if value not in (None, True, False):
        raise ParameterError(name, value, f"expected True, False or None ({none_meaning})")
    return value


def number(name: str, value: Any, low: float, high: float, rule: str, low_open: bool = False) -> float:
    if not _is_number(value) or not math.isfinite(value):
        raise ParameterError(name, value, rule)
    if value < low or value > high or (low_open and value == low):
        raise ParameterError(name, value, rule)
    return float(value)


def max_new_tokens(value: Any) -> int:
    return integer("max_new_tokens", value, 0, "expected a whole number of tokens >= 0")


def token_ids(name: str, ids: Any, vocab_size: Optional[int] = None, allow_empty: bool = False) -> List[int]:
    """A list of token ids: whole numbers inside the vocabulary (floats and bools refused)."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence) and not hasattr(ids, "__len__"):
        raise ParameterError(name, ids, "expected a list of token ids (whole numbers)")
    values = list(ids.tolist() if hasattr(ids, "tolist") else ids)
    if not values and not allow_empty:
        raise ParameterError(name, values, "expected at least one token id")
    for i, t in enumerate(values):
        if not is_int(t):
            raise ParameterError(f"{name}[{i}]", t, "expected a whole-number token id")
        if t < 0 or (vocab_size is not None and t >= vocab_size):
            top = f"{vocab_size - 1}" if vocab_size is not None else "the vocabulary size - 1"
            raise ParameterError(f"{name}[{i}]", t, f"expected a token id from 0 to {top}")
    return [int(t) for t in values]


def text(name: str, value: str) -> str:
    """Text that can be encoded (a lone surrogate, from undecodable bytes in argv, cannot)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = value[e.start]
        raw = f"byte 0x{ord(bad) - 0xDC00:02x}" if 0xDC80 <= ord(bad) <= 0xDCFF else f"U+{ord(bad):04X}"
        raise TpllamaError(f"{name}: not valid UTF-8 text ({raw} at character {e.start}); "
                           "save it as UTF-8") from None
    return value


def choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ParameterError(name, value, f"expected one of {', '.join(choices)}")
    return value


def collective(check: Callable[[], Any]) -> Any:
    """check(), for arguments every rank passes alike: its error is every rank's (reported once)."""
    try:
        return check()
    except TpllamaError as e:
        e.collective = True
        raise

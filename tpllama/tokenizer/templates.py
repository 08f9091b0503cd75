"""Chat templates: Jinja code from a model file, rendered in a sandbox with limits on time and size.

A chat template comes with the model file, so it is untrusted code that every chat request runs.
It renders in jinja2's ImmutableSandboxedEnvironment (as transformers' apply_chat_template does:
no access to Python internals, no mutation of the arguments) with limits on top:

* time: a trace function checks a deadline on every line the compiled template runs;
* size: the output, and every value the template builds with `~`, `+`, `*`, `%`, `**`, a filter,
  a method call, a macro or a `set` block, may hold at most `max_chars` characters (or items);
  the arguments that would make a C-level call build more (a width, a count, a repeat) are
  refused before the call.

Whatever goes wrong (a syntax error, raise_exception(), a division by zero, a limit) becomes one
`ChatTemplateError` for that render; nothing else is affected.
"""
from __future__ import annotations

import functools
import json
import re
import sys
import time
from datetime import datetime
from typing import Any, Iterable

from ..errors import TpllamaError

MAX_SECONDS = 5.0          # a real template renders in milliseconds, even on a Raspberry Pi
MAX_CHARS = 8 << 20        # longest text (or list) a template may build: far above any context's prompt
MAX_POWER_BITS = 1 << 16   # `**` results above this many bits are refused (big-integer arithmetic is slow)
MAX_JSON_INDENT = 64

_DIGITS = re.compile(r"\d+")


class ChatTemplateError(TpllamaError):
    """A chat template that cannot be rendered (syntax error, it raised, or it hit a limit)."""


class _LimitExceeded(Exception):
    """Raised inside a render that passed its time or size limit."""


class ChatTemplate:
    """One compiled chat template; `render` is safe to call from several threads at once."""

    def __init__(self, source: str, where: str, max_seconds: float = MAX_SECONDS, max_chars: int = MAX_CHARS):
        import jinja2
        self.source, self.where, self.max_seconds, self.max_chars = source, where, max_seconds, max_chars
        env = _limited_environment(max_chars)
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"{where}: chat template does not parse: {e}") from None
        except Exception as e:   # e.g. RecursionError from a deeply nested expression
            raise ChatTemplateError(f"{where}: chat template does not parse: {type(e).__name__}: {e}") from None

    def render(self, **context: Any) -> str:
        deadline = time.monotonic() + self.max_seconds
        previous = sys.gettrace()
        sys.settrace(_deadline_tracer(deadline, self.max_seconds))
        try:
            return self._collect(self._template.generate(**context))
        except _LimitExceeded as e:
            raise ChatTemplateError(f"{self.where}: chat template stopped: {e}") from None
        except Exception as e:   # the template's own code failed (raise_exception, 1/0, a bad key ...)
            raise ChatTemplateError(f"{self.where}: chat template failed: {_describe(e)}") from None
        finally:
            sys.settrace(previous)

    def _collect(self, pieces: Iterable[str]) -> str:
        out, size = [], 0
        for piece in pieces:
            size += len(piece)
            if size > self.max_chars:
                raise _LimitExceeded(f"its output passed {self.max_chars} characters")
            out.append(piece)
        return "".join(out)


def _describe(e: Exception) -> str:
    import jinja2
    return str(e) if isinstance(e, jinja2.TemplateError) else f"{type(e).__name__}: {e}"


def _deadline_tracer(deadline: float, seconds: float):
    """A trace function (for this thread only) that stops the render once the deadline passes."""
    def trace(frame, event, arg):
        if time.monotonic() > deadline:
            raise _LimitExceeded(f"it ran longer than {seconds:g} s")
        return trace
    return trace


# ------------------------------------------------------------------ the environment


def _limited_environment(max_chars: int):
    from jinja2.compiler import CodeGenerator
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class CheckedConcat(CodeGenerator):
        """`a ~ b` goes through the environment's size check (jinja2 otherwise joins in C)."""

        def visit_Concat(self, node, frame):
            self.write("environment.checked_concat((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

    class LimitedEnvironment(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "%", "+"})
        code_generator_class = CheckedConcat

        def checked_concat(self, parts) -> str:
            texts = [str(p) for p in parts]
            _check_total(sum(len(t) for t in texts), max_chars)
            return "".join(texts)

        def call_binop(self, context, operator, left, right):
            _check_binop(operator, left, right, max_chars)
            return _checked(super().call_binop(context, operator, left, right), max_chars)

        def wrap_str_format(self, value):   # str.format is wrapped when the template reads it
            if isinstance(getattr(value, "__self__", None), str) and getattr(value, "__name__", "") in _FORMAT_METHODS:
                _check_format_widths(value.__self__, max_chars)
            return super().wrap_str_format(value)

        def call(__self, __context, __obj, *args, **kwargs):   # noqa: N805 (jinja2's signature)
            _check_method(__obj, args, kwargs, max_chars)
            return _checked(super().call(__context, __obj, *args, **kwargs), max_chars)

    env = LimitedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.concat = env.checked_concat      # macro bodies, {% set %} blocks, {% filter %} blocks
    env.globals.pop("lipsum", None)      # lipsum(n=10**9) would build a huge text in one call
    env.globals["raise_exception"] = _raise_template_exception
    env.globals["strftime_now"] = _strftime_now(max_chars)
    env.filters["tojson"] = _tojson
    env.filters = {name: _checked_filter(f, name, max_chars) for name, f in env.filters.items()}
    return env


def _raise_template_exception(message):
    import jinja2
    raise jinja2.TemplateError(message)


def _strftime_now(max_chars: int):
    def strftime_now(fmt):
        _check_format_widths(str(fmt), max_chars)
        return datetime.now().strftime(fmt)
    return strftime_now


def _tojson(value, indent=None, ensure_ascii=False, sort_keys=False, separators=None):
    # like transformers: templates expect non-ASCII text to stay as it is
    if isinstance(indent, int) and indent > MAX_JSON_INDENT:
        raise _LimitExceeded(f"tojson(indent={indent}) is above {MAX_JSON_INDENT}")
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys, separators=separators)


# ------------------------------------------------------------------ size checks


def _checked(value, max_chars: int):
    _check_total(_deep_size(value, max_chars), max_chars)
    return value


def _check_total(size: int, max_chars: int) -> None:
    if size > max_chars:
        raise _LimitExceeded(f"it builds a value of more than {max_chars} characters")


def _deep_size(value, budget: int) -> int:
    """Characters and items in value, nested containers included; stops counting past budget."""
    if isinstance(value, (str, bytes)):
        return len(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value.bit_length() // 8
    if isinstance(value, dict):
        value = [*value.keys(), *value.values()]
    if isinstance(value, (list, tuple, set, frozenset)):
        total = len(value)
        for item in value:
            if total > budget:
                break
            total += _deep_size(item, budget - total)
        return total
    return 0


def _check_binop(operator: str, left, right, max_chars: int) -> None:
    if operator == "*":
        for seq, n in ((left, right), (right, left)):
            if isinstance(n, int) and isinstance(seq, (str, bytes, list, tuple)):
                _check_total(_deep_size(seq, max_chars) * max(n, 0), max_chars)
    elif operator == "**":
        if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
            if right * abs(left).bit_length() > MAX_POWER_BITS:
                raise _LimitExceeded(f"{left} ** {right} has more than {MAX_POWER_BITS} bits")
    elif operator == "%" and isinstance(left, str):
        _check_format_widths(left, max_chars)


def _check_format_widths(fmt: str, max_chars: int) -> None:
    """A %-format, str.format or strftime text pads to its widths: their sum must stay in bounds."""
    _check_total(sum(int(d) for d in _DIGITS.findall(fmt) if len(d) < 20) +
                 sum(max_chars + 1 for d in _DIGITS.findall(fmt) if len(d) >= 20), max_chars)


def _check_arguments(args, kwargs, max_chars: int) -> None:
    """A width or count above the limit is refused before the call builds anything."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool) and value > max_chars:
            raise _LimitExceeded(f"an argument of {value} is above the limit of {max_chars}")


_PADDING_METHODS = {"ljust", "rjust", "center", "zfill"}   # their first argument is the result's width
_PADDING_FILTERS = {"center", "batch", "slice"}           # a width, or a count of lists to fill
_FORMAT_METHODS = {"format", "format_map"}


def _check_method(method, args, kwargs, max_chars: int) -> None:
    """str methods whose result can be much longer than their inputs."""
    owner, name = getattr(method, "__self__", None), getattr(method, "__name__", "")
    if not isinstance(owner, str):
        return
    if name in _PADDING_METHODS:
        _check_arguments(args, kwargs, max_chars)
    elif name in _FORMAT_METHODS:
        _check_format_widths(owner, max_chars)
    elif name == "expandtabs":
        tab = args[0] if args else kwargs.get("tabsize", 8)
        if isinstance(tab, int):
            _check_total(len(owner) + owner.count("\t") * tab, max_chars)
    elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        _check_total(_replaced_size(owner, args[0], args[1], args[2] if len(args) > 2 else -1), max_chars)


def _replaced_size(text: str, old: str, new: str, count) -> int:
    hits = len(text) + 1 if old == "" else text.count(old)
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    return len(text) + hits * len(new)


def _checked_filter(f, name: str, max_chars: int):
    """A filter that refuses arguments that would build too much, and checks its result."""
    @functools.wraps(f)    # keeps jinja2's pass_context / pass_environment markers
    def checked(*args, **kwargs):
        if name in _PADDING_FILTERS:
            _check_arguments(args, kwargs, max_chars)
        _check_filter(name, args, kwargs, max_chars)
        return _checked(f(*args, **kwargs), max_chars)
    return checked


def _check_filter(name: str, args, kwargs, max_chars: int) -> None:
    texts = [a for a in args if isinstance(a, str)]
    if name == "indent" and texts:       # the width goes in front of every line
        text = texts[0]
        width = next((a for a in args[args.index(text) + 1:]), kwargs.get("width", 4))
        pad = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
        _check_total(len(text) + (text.count("\n") + 1) * pad, max_chars)
    elif name == "format" and texts:
        _check_format_widths(texts[0], max_chars)
    elif name == "replace" and len(texts) >= 3:
        rest = args[args.index(texts[0]) + 3:]
        _check_total(_replaced_size(texts[0], texts[1], texts[2], rest[0] if rest else kwargs.get("count", -1)),
                     max_chars)
    elif name == "wordwrap" and texts:   # the wrap string goes between every pair of words
        wrap = kwargs.get("wrapstring") or next((a for a in args[args.index(texts[0]) + 1:] if isinstance(a, str)), "\n")
        _check_total(len(texts[0]) * (1 + len(wrap)), max_chars)

"""Text generation over a loaded model: the loop behind `Model.stream`, `generate` and `chat`.

It drives an `engine.Model` through its public, collective methods only: `prefill` and
`decode_step` give this rank's logits over its vocabulary slice, and the ranks agree on each
next token by sending rank 0 their top candidates (tpllama.sampler), so the logits are never
gathered whole. Rank 0 samples and decides when to stop (a stop token, a stop string, the
token limit, a full context, or its caller's cancel); the others follow the token it
broadcasts. Here too: the checks of generation arguments and chat messages, and the
`Generation` a generate() call returns.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Sequence

import numpy as np

from . import checks
from .errors import TpllamaError
from .sampler import Sampler, SamplingParams, local_candidates
from .stats import RunStats, peak_rss_bytes
from .steps import LocalFailure, StepClock

NEED_FULL_LOGITS = -2
CANCELLED = -3          # rank 0 ends the generation (e.g. its client went away)
FAILED = -4             # some rank failed: every rank learns the error (LocalFailure.agree) and raises it

CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass
class Generation:
    text: str
    tokens: List[int]
    prompt_tokens: List[int]
    finish_reason: str                # "stop" | "length" | "cancelled"
    stats: RunStats = field(default_factory=RunStats)


def stream(model, prompt, max_new_tokens: int, sampling: Optional[SamplingParams], overrides: dict,
           stop: Sequence[str], chat: bool, system: Optional[str], stats: Optional[RunStats],
           on_token: Optional[Callable[[int], None]], cancel: Optional[Callable[[], bool]], ignore_eos: bool,
           finished: Callable[[str], None]) -> Iterator[str]:
    """Model.stream: check the arguments and the prompt now (every rank alike), then return the
    generator of text pieces. overrides: sampling fields given as keywords (None: sampling's).
    finished(reason) is told the finish reason as the generation ends."""
    stats = stats if stats is not None else RunStats()

    def checked_call():
        params = sampling_params(sampling, overrides)
        checks.max_new_tokens(max_new_tokens)
        return max_new_tokens, params, stop_strings(stop), ignore_eos
    call = model.par.checked_together(checked_call)
    # rank 0's call is every rank's, as its prompt is: ranks whose token limits or sampling differed
    # would leave the loop at other steps (a hang)
    max_new_tokens, params, stop, ignore_eos = model.par.bcast_object(call)
    if stop and model.tokenizer is None:
        raise checks.ParameterError("stop", stop, "needs text: this model was loaded with tokenizer='none'",
                                    collective=True)
    ids = root_encode(model, lambda: model.encode_prompt(prompt, chat, system))
    if not ids:
        raise TpllamaError("the prompt is empty", collective=True)
    if len(ids) >= model.ctx:
        raise TpllamaError(f"the prompt has {len(ids)} tokens but the context holds {model.ctx}; shorten it or "
                           "raise ctx_size (-c)", collective=True)
    return _pieces(model, ids, max_new_tokens, params, stop, stats, on_token, cancel, ignore_eos, finished)


def sampling_params(sampling: Optional[SamplingParams], overrides: dict) -> SamplingParams:
    """`sampling` (default SamplingParams()) with the fields given as keywords replaced."""
    if sampling is None:
        sampling = SamplingParams()
    elif not isinstance(sampling, SamplingParams):
        raise checks.ParameterError("sampling", sampling, "expected a tpllama.sampler.SamplingParams")
    return sampling.with_values(**overrides)


def _pieces(model, ids: List[int], max_new_tokens: int, params: SamplingParams, stop: Sequence[str],
            stats: RunStats, on_token, cancel, ignore_eos: bool, finished: Callable[[str], None]) -> Iterator[str]:
    """The generation loop behind stream(), its arguments checked."""
    par = model.par
    reuse = reusable_prefix(model.history, ids)
    stats.prompt_tokens, stats.cached_tokens = len(ids), reuse
    failure = LocalFailure(model.history, reuse)
    local = model.prefill(ids[reuse:], start_pos=reuse, stats=stats, failure=failure)
    sampler = failure.attempt(lambda: Sampler(params)) if par.is_root else None
    if model.tokenizer is None:    # tokenizer="none": token ids in, token ids out, no text and no stop tokens
        decoder, eos = _NoText(), frozenset()
    else:
        decoder = model.tokenizer.stream_decoder(at_start=False)   # a continuation keeps its leading space
        eos = frozenset() if ignore_eos else model.tokenizer.eos_ids
    text, emitted, cut = "", 0, None
    finished("length")
    clock = None     # a decode step: forward the previous token, sample the next
    reader_gone = False
    for n in range(max_new_tokens):
        token = next_token(model, local, sampler, params, _always if reader_gone else cancel, failure)
        if clock is not None:
            clock.record(stats)
        if token == CANCELLED or token in eos:
            finished("cancelled" if token == CANCELLED else "stop")
            break
        stats.generated_tokens += 1
        if on_token and failure.error is None:
            failure.attempt(lambda: on_token(token))   # a callback that fails on one rank only
        text += decoder.add(token)
        cut = find_stop(text, stop)
        if cut is not None:
            text = text[:cut]
            finished("stop")
            break
        safe = len(text) - held_back(text, stop)
        if safe > emitted and failure.error is None and not reader_gone:
            try:
                yield text[emitted:safe]
            except GeneratorExit:   # the caller stopped reading here, but the other ranks go on
                reader_gone = True
            emitted = safe
        if n + 1 == max_new_tokens or len(model.history) + 1 > model.ctx:
            break
        clock = StepClock(par)
        local = model.decode_step(token, failure=failure)
    if cut is None:   # else what the decoder holds comes after the stop string's cut
        text += decoder.flush()
    stats.peak_rss = failure.agree(par, peak_rss_bytes())
    if len(text) > emitted and not reader_gone:
        yield text[emitted:]


def next_token(model, local: np.ndarray, sampler: Optional[Sampler], params: SamplingParams,
               cancel: Optional[Callable[[], bool]], failure: LocalFailure) -> int:
    """Collective: every rank gets the same next token from its vocab-parallel logits (V_r,),
    or CANCELLED when rank 0's cancel() says to stop. If any rank has failed (its flag rides
    with its candidates; NaN/Inf logits count as a failure) or root's sampling fails, every
    rank raises that error."""
    par = model.par
    if not np.isfinite(local).all():
        failure.keep(model.non_finite_logits(len(model.history) - 1))
        local = np.zeros_like(local)
    values, ids, extras = local_candidates(local, model.vocab_slice.start, params.candidates_per_rank)
    merged = par.gather_candidates(values, ids, np.append(extras, failure.flag))
    token = None
    if par.is_root:
        values, ids, extras = merged
        token = FAILED if extras[:, -1].any() or failure.error else failure.attempt(
            lambda: CANCELLED if cancel is not None and cancel() else sampler.pick(values, ids, extras[:, :-1]),
            FAILED)
    token = int(par.bcast_ints(np.array([NEED_FULL_LOGITS if token is None else token]), 1)[0])
    if token == NEED_FULL_LOGITS:
        full = model.gather_vocab(local[None, :], root_only=True)
        if par.is_root:
            token = failure.attempt(lambda: sampler.pick_full(full[0]), FAILED)
        token = int(par.bcast_ints(np.array([token if par.is_root else 0]), 1)[0])
    if token == FAILED:
        failure.agree(par)   # raises on every rank: some rank kept an error
        raise TpllamaError("a rank reported a failure without its reason", collective=True)
    return token


def generate(model, prompt, max_new_tokens: int, on_token: Optional[Callable[[int], None]], kwargs: dict) -> Generation:
    """Model.generate: stream() collected into a Generation."""
    stats = kwargs.pop("stats", None) or RunStats()
    tokens: List[int] = []

    def collect(token: int):
        tokens.append(token)
        if on_token:
            on_token(token)

    text = "".join(model.stream(prompt, max_new_tokens, stats=stats, on_token=collect, **kwargs))
    prompt_ids = model.history[:stats.prompt_tokens]
    return Generation(text=text, tokens=tokens, prompt_tokens=prompt_ids, finish_reason=model.last_finish_reason,
                      stats=stats)


def chat(model, messages: Sequence[dict], max_new_tokens: int, kwargs: dict) -> Generation:
    """Model.chat: the messages in the chat template (rank 0 encodes), then generate()."""
    ids = root_encode(model, lambda: model.encode_messages(messages))
    return model.generate(ids, max_new_tokens, **kwargs)


def root_encode(model, encode: Callable[[], List[int]]) -> List[int]:
    """Rank 0 encodes; every rank gets the ids, or the same error."""
    ids = model.par.from_root(encode)
    vocab_size = model.config.vocab_size
    outside = next((t for t in ids if not 0 <= t < vocab_size), None)
    if outside is not None:   # every rank sees the same ids: every rank stops here, before any collective
        raise TpllamaError(f"token id {outside} is outside the model's vocabulary (0..{vocab_size - 1})",
                           collective=True)
    return ids


def reusable_prefix(history: Sequence[int], ids: Sequence[int]) -> int:
    """Cached positions that the new prompt can keep (at least its last token is recomputed)."""
    n = 0
    limit = min(len(history), len(ids) - 1)
    while n < limit and history[n] == ids[n]:
        n += 1
    return n


def check_messages(messages) -> List[dict]:
    """OpenAI-style messages checked: a non-empty list of {role, content} with text content."""
    if isinstance(messages, (str, bytes, dict)) or not isinstance(messages, Sequence) or not messages:
        raise checks.ParameterError("messages", messages, "expected a non-empty list of {'role': ..., 'content': ...}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES or not isinstance(m.get("content"), str):
            raise checks.ParameterError(f"messages[{i}]", m, "expected {'role': one of "
                                        f"{', '.join(CHAT_ROLES)}, 'content': a string}}")
        out.append({"role": CHAT_ROLES[m["role"]], "content": checks.text(f"messages[{i}].content", m["content"])})
    return out


def stop_strings(stop) -> List[str]:
    if isinstance(stop, str):
        return [stop]
    stops = list(stop or ())
    for i, s in enumerate(stops):
        if not isinstance(s, str):
            raise checks.ParameterError(f"stop[{i}]", s, "expected a string")
    return stops


def find_stop(text: str, stops: Sequence[str]) -> Optional[int]:
    cuts = [text.find(s) for s in stops if s and s in text]
    return min(cuts) if cuts else None


def held_back(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of text that could begin a stop string (not shown yet)."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return hold


def _always() -> bool:
    return True


class _NoText:
    """The stream decoder of a model loaded without a tokenizer: no text, only token ids."""

    def add(self, token_id: int) -> str:
        return ""

    def flush(self) -> str:
        return ""

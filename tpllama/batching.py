"""Continuous batching: many sequences advanced by one forward pass per step, each in a KV cache
slot of its own, with the same tokens as each would get generated alone.

`Batch` is a collective scheduler over a loaded `engine.Model`: every rank makes the same calls
in the same order (`add`, `cancel`, `step`). It holds up to `model.slots` running sequences and
a queue of waiting ones. One `step`:

  1. admits waiting sequences into free slots (any step: a newcomer joins a running batch),
     each into the free slot whose earlier tokens share the longest prefix with its prompt
     (a conversation's next turn reads only its new tokens);
  2. lays out the step's rows: one row per decoding sequence (its last token), then chunks of
     the prompts being read, up to `step_tokens` rows in all, so a long prompt is spread over
     steps and cannot stall the others (chunked prefill);
  3. runs ONE forward pass over all rows (model.RankModel.forward with Segments): the matmuls
     take the rows together (the kernels compute each row on its own, bit-identical for any
     number of rows), attention runs per sequence over its own slot's positions, and each rank
     makes exactly two all-reduces per layer, whatever the number of sequences;
  4. the ranks agree on each sequence's next token in one gather of every sequence's candidates
     and one broadcast of the tokens (as tpllama.generation does for one), each sequence with
     its own sampler, so a seed gives the same text as alone;
  5. retires the sequences that finished (a stop token or string, their token limit, a full
     context, or `cancel`), freeing their slots for the next step.

Rows are independent through the whole pass, so at temperature 0 (or with a seed) a sequence's
tokens are those `Model.generate` gives for the same prompt alone, at any rank count.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import TpllamaError
from .generation import FAILED, NEED_FULL_LOGITS, find_stop, held_back, reusable_prefix
from .model import Segment
from .plan import PREFILL_CHUNK
from .sampler import Sampler, SamplingParams, local_candidates
from .steps import LocalFailure


@dataclass
class Request:
    """One sequence to generate (every rank passes the same): what a Model.stream call takes."""
    prompt_ids: List[int]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: Tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass
class Update:
    """What a step did for one sequence: a new token (None when it only read prompt), the text
    that became safe to show, and its finish reason once it has ended."""
    seq_id: int
    token: Optional[int] = None
    text: str = ""
    finish_reason: Optional[str] = None


@dataclass
class StepReport:
    """The last step's shape and time (for the server's /metrics)."""
    sequences: int = 0       # sequences that had rows in the step
    rows: int = 0            # rows of the forward pass (decoded tokens + prompt tokens read)
    seconds: float = 0.0


class Running:
    """One sequence in its slot: the tokens still to feed, its positions, its text so far."""

    def __init__(self, seq_id: int, request: Request, slot: int, model, sampler: Optional[Sampler]):
        self.id, self.request, self.slot = seq_id, request, slot
        self.pending: List[int] = list(request.prompt_ids)   # prompt not yet read, or the last token
        self.cached = 0                                       # positions of its slot that hold keys/values
        self.reused = 0                                       # prompt positions an earlier sequence left in the slot
        self.tokens: List[int] = []
        self.sampler = sampler                                # rank 0 only
        tok = model.tokenizer
        self.decoder = tok.stream_decoder(at_start=False) if tok is not None else None
        self.eos = frozenset() if tok is None or request.ignore_eos else tok.eos_ids
        self.text, self.emitted = "", 0
        self.reason: Optional[str] = None                     # the finish reason, once ended

    @property
    def decoding(self) -> bool:
        return self.cached >= len(self.request.prompt_ids)

    def accept(self, token: int, ctx: int) -> Update:
        """The sampled token, judged as tpllama.generation judges it for one sequence."""
        if token in self.eos:
            return self.finish("stop")
        self.tokens.append(token)
        if self.decoder is not None:
            self.text += self.decoder.add(token)
        cut = find_stop(self.text, self.request.stop)
        if cut is not None:
            self.text = self.text[:cut]
            return self.finish("stop", token, flush=False)   # what the decoder holds comes after the cut
        if len(self.tokens) == self.request.max_new_tokens or self.cached + 1 > ctx:
            return self.finish("length", token)
        self.pending = [token]
        safe = len(self.text) - held_back(self.text, self.request.stop)
        piece = self.text[self.emitted:safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return Update(self.id, token, piece)

    def finish(self, reason: str, token: Optional[int] = None, flush: bool = True) -> Update:
        self.reason = reason
        if self.decoder is not None and flush:   # a character cut off by the end, as U+FFFD
            self.text += self.decoder.flush()
        piece = self.text[self.emitted:]
        self.emitted = len(self.text)
        return Update(self.id, token, piece, reason)


class Batch:
    """The collective scheduler (see the module's docstring). model: an engine.Model whose KV
    cache has `slots` sequences (load(..., parallel=N)); the one-conversation cache (history)
    shares slot 0 and is forgotten when the batch starts."""

    def __init__(self, model, step_tokens: int = PREFILL_CHUNK):
        self.model, self.par = model, model.par
        self.step_tokens = max(1, int(step_tokens))
        self.waiting: Deque[Tuple[int, Request]] = deque()
        self.running: Dict[int, Running] = {}
        self.finished: Dict[int, Running] = {}     # retired sequences, until taken with take()
        self.slot_tokens: List[List[int]] = [[] for _ in range(self.slots)]   # whose keys/values each slot holds
        self.last = StepReport()
        self._next_id = 0
        model.reset()

    # ------------------------------------------------------------ the queue

    @property
    def slots(self) -> int:
        return self.model.slots

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def add(self, request: Request) -> int:
        """Collective: queue a sequence; it starts at the next step with a free slot. Its id."""
        seq_id = self._next_id
        self._next_id += 1
        self.waiting.append((seq_id, request))
        return seq_id

    def cancel(self, seq_id: int) -> Optional[Update]:
        """Collective: end a waiting or running sequence now (its slot is free for the next step);
        None if it had already ended."""
        seq = self.running.pop(seq_id, None)
        waiting = [r for i, r in self.waiting if i == seq_id]
        if waiting:
            self.waiting = deque((i, r) for i, r in self.waiting if i != seq_id)
            seq = Running(seq_id, waiting[0], -1, self.model, None)   # never had a slot
        if seq is None:
            return None
        self.finished[seq_id] = seq
        return seq.finish("cancelled")

    def take(self, seq_id: int) -> Running:
        """A retired sequence's record (its tokens and text), forgotten here."""
        return self.finished.pop(seq_id)

    # ------------------------------------------------------------ one step

    def step(self) -> List[Update]:
        """Collective: admit, forward every running sequence once, sample, retire."""
        t0 = time.perf_counter()
        self._reclaim_slot_zero()
        updates = self._admit()
        rows = self._layout()
        if not rows:
            return updates
        failure = LocalFailure([], 0)
        tokens = np.array([t for seq, n in rows for t in seq.pending[:n]], dtype=np.int64)
        segments = [Segment(seq.slot, seq.cached, n) for seq, n in rows]
        sampled = [i for i, (seq, n) in enumerate(rows) if n == len(seq.pending)]   # their last row has logits
        local = self._forward(tokens, segments, sampled, failure)
        for seq, n in rows:
            self.slot_tokens[seq.slot] += seq.pending[:n]
            seq.pending, seq.cached = seq.pending[n:], seq.cached + n
        ending = [rows[i][0] for i in sampled]
        try:
            for seq, token in zip(ending, self._choose(ending, local, failure)):
                update = seq.accept(token, self.model.ctx)    # decoding the text can fail too (on every rank)
                if update.finish_reason is not None:
                    self._retire(seq)
                updates.append(update)
        except BaseException:   # every rank raises here alike: no sequence can go on
            self._drop_all()
            raise
        self.last = StepReport(len(rows), len(tokens), time.perf_counter() - t0)
        return updates

    def _reclaim_slot_zero(self) -> None:
        """The one-conversation API (generate, stream, prefill, forward) writes slot 0: if it ran
        since the last step, slot 0 no longer holds this batch's tokens."""
        if not self.model.history:
            return
        self.model.reset()
        self.slot_tokens[0] = []
        if any(s.slot == 0 for s in self.running.values()):
            self._drop_all()
            raise TpllamaError("Model.generate, stream, prefill or forward ran while a batch sequence was in the KV "
                               "cache's slot 0; finish the batch first", collective=True)

    def _admit(self) -> List[Update]:
        """Waiting sequences into free slots, each into the slot whose earlier tokens share the
        longest prefix with its prompt (those positions are not read again)."""
        updates = []
        free = sorted(set(range(self.slots)) - {s.slot for s in self.running.values()})
        while self.waiting and free:
            seq_id, request = self.waiting.popleft()
            sampler = Sampler(request.sampling) if self.par.is_root else None
            reuse = {slot: reusable_prefix(self.slot_tokens[slot], request.prompt_ids) for slot in free}
            slot = max(free, key=lambda f: (reuse[f], -f))
            seq = Running(seq_id, request, slot, self.model, sampler)
            if request.max_new_tokens == 0:       # as generate(): nothing to make
                self.finished[seq_id] = seq
                updates.append(seq.finish("length"))
                continue
            free.remove(slot)
            seq.cached = seq.reused = reuse[slot]
            seq.pending = seq.pending[seq.cached:]
            self.slot_tokens[slot] = list(request.prompt_ids[:seq.cached])
            self.running[seq_id] = seq
        return updates

    def _layout(self) -> List[Tuple[Running, int]]:
        """(sequence, rows it feeds this step): decoding sequences first (one row each), then
        prompt chunks in admission order while the step has room."""
        running = list(self.running.values())
        rows = [(s, 1) for s in running if s.decoding]
        room = max(self.step_tokens - len(rows), 0)
        for s in running:
            if not s.decoding and room > 0:
                n = min(room, len(s.pending))
                rows.append((s, n))
                room -= n
        return rows

    def _retire(self, seq: Running) -> None:
        del self.running[seq.id]
        self.finished[seq.id] = seq

    def _drop_all(self) -> None:
        """After a failure every rank agreed on: no sequence can go on, no slot is trusted."""
        self.running.clear()
        self.waiting.clear()
        self.slot_tokens = [[] for _ in range(self.slots)]

    # ------------------------------------------------------------ the collectives of a step

    def _forward(self, tokens: np.ndarray, segments: List[Segment], wanted: Sequence[int],
                 failure: LocalFailure) -> np.ndarray:
        """This rank's logits (len(wanted), V_r) of the last row of the wanted segments. A
        failure on this rank alone is kept; the rank still makes the others' all-reduces."""
        model, par = self.model, self.par
        last_rows = np.cumsum([s.length for s in segments])[list(wanted)] - 1
        reduces_before = par.counters.calls.get("allreduce", 0)
        try:
            hidden = model.rank_model.forward(tokens, segments, par.allreduce_sum)
            return model.rank_model.logits(hidden[last_rows])
        except Exception as e:
            if par.size == 1:
                self._drop_all()
                raise
            failure.keep(e)
        done = par.counters.calls.get("allreduce", 0) - reduces_before
        zeros = np.zeros((len(tokens), model.config.dim), dtype=np.float64)
        for _ in range(2 * model.config.n_layers - done):
            par.allreduce_sum(zeros)
        return np.zeros((len(wanted), len(model.vocab_slice)), dtype=np.float32)

    def _choose(self, seqs: List[Running], local: np.ndarray, failure: LocalFailure) -> List[int]:
        """Collective: every sequence's next token, the same on every rank. One gather carries
        every sequence's top candidates (each as many as its sampling needs), one broadcast the
        tokens; a sequence whose filters reach below the candidates gets the full logits row."""
        if not seqs:
            return []
        par, offset = self.par, self.model.vocab_slice.start
        parts = []
        for seq, row in zip(seqs, local):
            if not np.isfinite(row).all():
                failure.keep(self.model.non_finite_logits(seq.cached - 1))
                row = np.zeros_like(row)
            parts.append(local_candidates(row, offset, seq.request.sampling.candidates_per_rank))
        widths = [len(v) for v, _, _ in parts]
        merged = par.gather_candidates(np.concatenate([v for v, _, _ in parts]), np.concatenate([i for _, i, _ in parts]),
                                       np.append(np.concatenate([e for _, _, e in parts]), failure.flag))
        picks = None
        if par.is_root:
            picks = self._pick(seqs, widths, merged, failure)
        tokens = [int(t) for t in par.bcast_ints(None if picks is None else np.array(picks), len(seqs))]
        need = [i for i, t in enumerate(tokens) if t == NEED_FULL_LOGITS]
        if need:
            full = self.model.gather_vocab(local[need], root_only=True)
            fixed = None
            if par.is_root:
                fixed = [failure.attempt(lambda: seqs[i].sampler.pick_full(full[k]), FAILED) for k, i in enumerate(need)]
            for i, t in zip(need, par.bcast_ints(None if fixed is None else np.array(fixed), len(need))):
                tokens[i] = int(t)
        if FAILED in tokens:
            failure.agree(par)   # raises on every rank: some rank kept an error
            raise TpllamaError("a rank reported a failure without its reason", collective=True)
        return tokens

    def _pick(self, seqs: List[Running], widths: List[int], merged, failure: LocalFailure) -> List[int]:
        """Rank 0: each sequence's token from the ranks' merged candidates (NEED_FULL_LOGITS when
        its sampler cannot decide from them)."""
        values, ids, extras = merged
        ranks = extras.shape[0]
        if extras[:, -1].any() or failure.error is not None:
            return [FAILED] * len(seqs)
        values, ids = values.reshape(ranks, -1), ids.reshape(ranks, -1)
        picks, col = [], 0
        for k, (seq, n) in enumerate(zip(seqs, widths)):
            v, i, e = values[:, col:col + n].reshape(-1), ids[:, col:col + n].reshape(-1), extras[:, 3 * k:3 * k + 3]
            token = failure.attempt(lambda: seq.sampler.pick(v, i, e), FAILED)
            picks.append(NEED_FULL_LOGITS if token is None else token)
            col += n
        return picks


def run_to_end(batch: Batch, requests: Sequence[Request],
               on_update: Optional[Callable[[Update], None]] = None) -> List[Running]:
    """Collective: add the requests, step until all have ended; their records in order."""
    ids = [batch.add(r) for r in requests]
    while not batch.idle:
        for update in batch.step():
            if on_update is not None:
                on_update(update)
    return [batch.take(i) for i in ids]


def generate_batch(model, prompts, max_new_tokens: int, sampling, overrides: dict, stop, chat: bool,
                   system: Optional[str], ignore_eos: bool) -> list:
    """Model.generate_batch: check every argument (every rank alike), encode the prompts on rank
    0, run them through a Batch and return one generation.Generation per prompt, in order."""
    from . import checks, generation

    def checked_call():
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
            raise checks.ParameterError("prompts", prompts, "expected a non-empty list of prompts (texts or token-id "
                                        "lists)")
        per_prompt = list(sampling) if isinstance(sampling, (list, tuple)) else [sampling] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise checks.ParameterError("sampling", sampling, f"expected one SamplingParams or {len(prompts)} of "
                                        "them, one per prompt")
        checks.max_new_tokens(max_new_tokens)
        return (list(prompts), [generation.sampling_params(s, overrides) for s in per_prompt], max_new_tokens,
                tuple(generation.stop_strings(stop)), chat, system, ignore_eos)
    call = model.par.checked_together(checked_call)
    # rank 0's call is every rank's (as generation.stream): other prompt counts or limits would hang
    prompts, params, max_new_tokens, stop, chat, system, ignore_eos = model.par.bcast_object(call)
    requests = []
    for k, (prompt, p) in enumerate(zip(prompts, params)):
        ids = generation.root_encode(model, lambda: model.encode_prompt(prompt, chat, system))
        if not ids:
            raise TpllamaError(f"prompts[{k}] is empty", collective=True)
        if len(ids) >= model.ctx:
            raise TpllamaError(f"prompts[{k}] has {len(ids)} tokens but the context holds {model.ctx}; shorten it "
                               "or raise ctx_size (-c)", collective=True)
        requests.append(Request(ids, max_new_tokens, p, stop, ignore_eos))
    return [_generation(s) for s in run_to_end(Batch(model), requests)]


def _generation(seq: Running):
    from .generation import Generation
    from .stats import RunStats
    stats = RunStats(prompt_tokens=len(seq.request.prompt_ids), generated_tokens=len(seq.tokens))
    return Generation(text=seq.text, tokens=seq.tokens, prompt_tokens=list(seq.request.prompt_ids),
                      finish_reason=seq.reason, stats=stats)

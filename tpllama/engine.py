"""The library's model object: load a model over a communicator, then forward, generate, stream.

Every public method is collective: all ranks of the communicator call it with the same
arguments (prompts are taken from rank 0 and broadcast). Rank 0 samples and decides when
to stop; the others follow the token it broadcasts. Text comes back on every rank.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Sequence, Union

import numpy as np

from .errors import TpllamaError
from .formats import open_model
from .loader import load_rank_weights
from .model import RankModel
from .parallel import Parallel
from .plan import (PREFILL_CHUNK, format_memory_table, host_shortfalls, make_plan, max_context,
                   parse_rank_weights, rank_memory)
from .sampler import Sampler, SamplingParams, local_candidates
from .stats import RunStats, StepStats, peak_rss_bytes, resident_anon_bytes

NEED_FULL_LOGITS = -2
CANCELLED = -3          # rank 0 ends the generation (e.g. its client went away)


@dataclass
class LoadOptions:
    weight_type: str = "q40"          # q40 | q80 | f32 runtime matrices
    ctx_size: int = 0                 # KV cache positions; 0: the model's context, capped to fit memory
    threads: int = 0                  # kernel threads per rank; 0: this host's cores / its ranks
    rank_weights: Optional[Union[str, Sequence[float]]] = None   # e.g. "2,1,1": shares of the work
    sync_type: str = "f64"            # payload of the per-layer all-reduces: f64 (same text at any rank count) | f32 | bf16 | q80
    tokenizer: Optional[str] = None   # tokenizer file when the model has none; "none": load no tokenizer
    verbose: bool = False             # progress and the memory plan on rank 0's stderr


@dataclass
class Generation:
    text: str
    tokens: List[int]
    prompt_tokens: List[int]
    finish_reason: str                # "stop" | "length"
    stats: RunStats = field(default_factory=RunStats)


def _log(par: Parallel, verbose: bool, msg: str, end: str = "\n"):
    if verbose and par.is_root:
        print(msg, file=sys.stderr, end=end, flush=True)


class Model:
    """A model sharded over a communicator's ranks (see `load`)."""

    def __init__(self, path: str, comm=None, options: Optional[LoadOptions] = None, **kwargs):
        opts = options or LoadOptions(**kwargs)
        self.options = opts
        self.par = par = Parallel(comm, opts.sync_type)
        self.reader = reader = par.together(lambda: open_model(path))
        self.config = c = reader.config
        self.tokenizer = None
        if opts.tokenizer != "none":   # "none": logits only (forward), no text in or out; before the weights, to fail fast
            from .tokenizer import load_tokenizer
            self.tokenizer = par.together(lambda: _check_special_ids(load_tokenizer(reader, opts.tokenizer),
                                                                     c.vocab_size))
        self.plan = par.together(lambda: make_plan(c, par.size, _rank_weights(opts.rank_weights, par.size)))
        self.shard = self.plan[par.rank]
        _log(par, opts.verbose, f"tpllama: {os.path.basename(path)} ({reader.format_name}, {c.n_layers} layers, dim {c.dim}, "
                                f"{c.n_heads}/{c.n_kv_heads} heads, vocab {c.vocab_size}) on {par.size} rank(s), "
                                f"{opts.weight_type} weights")
        self.ctx = par.together(self._choose_context)
        self.threads = self._choose_threads()
        progress = None
        if opts.verbose and sys.stderr.isatty():   # redraw one line on a terminal; logs get one line at the end
            progress = lambda i, n: _log(par, True, f"\rtpllama: loading weights {i}/{n}", end="")
        resident_before, t_load = resident_anon_bytes(), time.perf_counter()
        weights = par.together(lambda: load_rank_weights(reader, self.shard, opts.weight_type, self.threads, progress))
        # what loading cost this rank: the weights it holds, and the resident memory that grew
        self.load_report = {"weight_bytes": weights.nbytes, "resident_growth": resident_anon_bytes() - resident_before}
        _log(par, opts.verbose, ("\n" if progress else "") + f"tpllama: rank 0 loaded {weights.nbytes / 2**20:,.1f} MiB of weights "
                                f"in {time.perf_counter() - t_load:.1f} s; context {self.ctx}, {self.threads} thread(s) per rank")
        self.rank_model = par.together(lambda: RankModel(weights, self.ctx))
        self.history: List[int] = []      # tokens whose keys and values are in the cache, in order
        self._vocab_counts = [len(s.vocab) for s in self.plan.ranks]
        self._finish_reason = "stop"

    # ------------------------------------------------------------ setup

    def _host_facts(self):
        import psutil
        facts = (self.par.hostname(), int(psutil.virtual_memory().available))
        everyone = self.par.comm.allgather(facts) if self.par.size > 1 else [facts]
        return [h for h, _ in everyone], [a for _, a in everyone]

    def _choose_context(self) -> int:
        """The asked-for context if it fits every host, else stop before loading; default: the
        model's context capped to what fits, saying so."""
        opts, par, c = self.options, self.par, self.config
        hosts, available = self._host_facts()
        wtype = opts.weight_type
        if opts.ctx_size and opts.ctx_size > 0:
            ctx = opts.ctx_size
        else:
            # below 256 positions nothing useful fits: plan for 256 and let the shortfall report say what is missing
            ctx = max(min(c.max_seq_len, max_context(self.plan, wtype, hosts, available)), min(256, c.max_seq_len))
            if ctx < c.max_seq_len:
                _log(par, True, f"tpllama: context capped to {ctx} of the model's {c.max_seq_len} so the KV cache fits "
                                "in memory (set it with -c)")
        mem = rank_memory(self.plan, wtype, ctx, hosts, available)
        if opts.verbose:
            _log(par, True, format_memory_table(mem, ctx))
        short = host_shortfalls(mem)
        if short:
            host, ranks, missing = short[0]
            raise TpllamaError(
                f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} on host {host} need "
                f"{missing / 2**20:,.0f} MiB more than the host has available at context {ctx}; "
                f"lower -c, spread over more ranks or hosts, or shift work with --rank-weights")
        return ctx

    def _choose_threads(self) -> int:
        if self.options.threads and self.options.threads > 0:
            return self.options.threads
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        ranks_here = self.par.host_comm().Get_size() if self.par.size > 1 else 1
        return max(1, cores // ranks_here)

    # ------------------------------------------------------------ forward

    def _run(self, tokens: Sequence[int], phase: str, stats: Optional[RunStats],
             every_position: bool = False) -> np.ndarray:
        """Forward tokens at the end of the cache, a prefill chunk at a time; this rank's logits
        (T, V_r) of the last position, or of every position."""
        if len(self.history) + len(tokens) > self.ctx:
            raise TpllamaError(f"context full: {len(self.history) + len(tokens)} tokens exceed the context of {self.ctx} (-c)")
        logits = []
        for i in range(0, len(tokens), PREFILL_CHUNK):
            chunk = np.asarray(tokens[i:i + PREFILL_CHUNK], dtype=np.int64)
            clock = _StepClock(self.par)
            hidden = self.rank_model.forward(chunk, len(self.history), self.par.allreduce_sum)
            self.history.extend(int(t) for t in chunk)
            if every_position:
                logits.append(self.rank_model.logits(hidden))
            elif i + PREFILL_CHUNK >= len(tokens):
                logits.append(self.rank_model.logits(hidden[-1:]))
            if stats is not None:
                clock.record(stats, phase, len(chunk))
        return np.concatenate(logits, axis=0)

    def forward(self, token_ids: Sequence[int], start_pos: int) -> np.ndarray:
        """Logits (len(token_ids), vocab) float32, the same on every rank, for tokens placed at
        positions start_pos.. (the cache keeps positions before start_pos)."""
        if start_pos > len(self.history):
            raise TpllamaError(f"start_pos {start_pos} is past the {len(self.history)} cached positions")
        del self.history[start_pos:]
        local = self._run(list(token_ids), "prefill", None, every_position=True)
        return self.par.gather_vocab(local, self._vocab_counts, root_only=False)

    def reset(self):
        """Forget the cached conversation."""
        self.history = []

    # ------------------------------------------------------------ sampling

    def _next_token(self, local: np.ndarray, sampler: Optional[Sampler], params: SamplingParams,
                    cancel: Optional[Callable[[], bool]] = None) -> int:
        """Collective: every rank gets the same next token from vocab-parallel logits (V_r,),
        or CANCELLED when rank 0's cancel() says to stop."""
        values, ids, extras = local_candidates(local, self.shard.vocab.start, params.candidates_per_rank)
        merged = self.par.gather_candidates(values, ids, extras)
        token = None
        if self.par.is_root:
            token = CANCELLED if cancel is not None and cancel() else sampler.pick(*merged)
        token = int(self.par.bcast_ints(np.array([NEED_FULL_LOGITS if token is None else token]), 1)[0])
        if token == NEED_FULL_LOGITS:
            full = self.par.gather_vocab(local[None, :], self._vocab_counts, root_only=True)
            if self.par.is_root:
                token = sampler.pick_full(full[0])
            token = int(self.par.bcast_ints(np.array([token if self.par.is_root else 0]), 1)[0])
        return token

    # ------------------------------------------------------------ generation

    def encode_prompt(self, prompt: Union[str, Sequence[int]], chat: bool = False, system: Optional[str] = None) -> List[int]:
        """Token ids of a prompt (rank 0's value counts): raw text, or a user turn in the chat template."""
        if not isinstance(prompt, str):
            return [int(t) for t in prompt]
        tok = self.tokenizer
        if chat:
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            return tok.encode_chat(messages, add_generation_prompt=True)   # the message is plain text
        return tok.encode(prompt)

    def stream(self, prompt: Union[str, Sequence[int]], max_new_tokens: int = 256, temperature: float = 0.8,
               top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05, seed: Optional[int] = None,
               stop: Sequence[str] = (), chat: bool = False, system: Optional[str] = None,
               stats: Optional[RunStats] = None, on_token: Optional[Callable[[int], None]] = None,
               cancel: Optional[Callable[[], bool]] = None, ignore_eos: bool = False) -> Iterator[str]:
        """Yield text pieces as they are generated (the same on every rank). Collective.

        cancel: checked on rank 0 before each token; True ends the generation on every rank
        (finish reason "cancelled"). The finish reason of the last call is `last_finish_reason`.
        ignore_eos: keep going through stop tokens (benchmarks measure a fixed token count)."""
        stats = stats if stats is not None else RunStats()
        params = self.par.together(lambda: SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p,
                                                          min_p=min_p, seed=seed))
        ids = self._root_encode(prompt, chat, system)
        if not ids:
            raise TpllamaError("the prompt is empty", collective=True)
        if len(ids) >= self.ctx:
            raise TpllamaError(f"the prompt has {len(ids)} tokens but the context holds {self.ctx}; shorten it or raise -c",
                               collective=True)
        reuse = self._common_prefix(ids)
        del self.history[reuse:]
        stats.prompt_tokens, stats.cached_tokens = len(ids), reuse
        local = self._run(ids[reuse:], "prefill", stats)
        sampler = Sampler(params) if self.par.is_root else None
        decoder = self.tokenizer.stream_decoder(at_start=False)   # a continuation keeps its leading space
        eos = frozenset() if ignore_eos else self.tokenizer.eos_ids
        text, emitted = "", 0
        self._finish_reason = "length"
        clock = None     # a decode step: forward the previous token, sample the next
        for n in range(max_new_tokens):
            token = self._next_token(local[-1], sampler, params, cancel)
            if clock is not None:
                clock.record(stats)
            if token == CANCELLED or token in eos:
                self._finish_reason = "cancelled" if token == CANCELLED else "stop"
                break
            stats.generated_tokens += 1
            if on_token:
                on_token(token)
            text += decoder.add(token)
            cut = _find_stop(text, stop)
            if cut is not None:
                text = text[:cut]
                self._finish_reason = "stop"
                break
            safe = len(text) - _held_back(text, stop)
            if safe > emitted:
                yield text[emitted:safe]
                emitted = safe
            if n + 1 == max_new_tokens or len(self.history) + 1 > self.ctx:
                break
            clock = _StepClock(self.par)
            local = self._run([token], "decode", None)
        text += decoder.flush()
        if len(text) > emitted:
            yield text[emitted:]
        stats.peak_rss = self.par.comm.allgather(peak_rss_bytes()) if self.par.size > 1 else [peak_rss_bytes()]

    def generate(self, prompt: Union[str, Sequence[int]], max_new_tokens: int = 256,
                 on_token: Optional[Callable[[int], None]] = None, **kwargs) -> Generation:
        """Generate a completion; returns its text, token ids and statistics. Collective.
        Takes stream()'s arguments."""
        stats = kwargs.pop("stats", None) or RunStats()
        tokens: List[int] = []

        def collect(token: int):
            tokens.append(token)
            if on_token:
                on_token(token)

        text = "".join(self.stream(prompt, max_new_tokens, stats=stats, on_token=collect, **kwargs))
        prompt_ids = self.history[:stats.prompt_tokens]
        return Generation(text=text, tokens=tokens, prompt_tokens=prompt_ids, finish_reason=self._finish_reason,
                          stats=stats)

    def _root_encode(self, prompt, chat, system) -> List[int]:
        """Rank 0 tokenizes; every rank gets the ids, or the error."""
        ids, error = None, None
        if self.par.is_root:
            try:
                ids = self.encode_prompt(prompt, chat, system)
            except TpllamaError as e:
                error = str(e)
        ids, error = self.par.bcast_object((ids, error))
        if error:
            raise TpllamaError(error, collective=True)
        outside = next((t for t in ids if not 0 <= t < self.config.vocab_size), None)
        if outside is not None:   # every rank sees the same ids: every rank stops here, before any collective
            raise TpllamaError(f"token id {outside} is outside the model's vocabulary (0..{self.config.vocab_size - 1})",
                               collective=True)
        return ids

    def _common_prefix(self, ids: Sequence[int]) -> int:
        """Cached positions that the new prompt can keep (at least its last token is recomputed)."""
        n = 0
        limit = min(len(self.history), len(ids) - 1)
        while n < limit and self.history[n] == ids[n]:
            n += 1
        return n

    @property
    def last_finish_reason(self) -> str:
        """"stop" (a stop token or string), "length" (max tokens or a full context) or "cancelled"."""
        return self._finish_reason

    def close(self):
        self.reader.close()


class _StepClock:
    """Wall time and the communicator's counters from creation to record()."""

    def __init__(self, par: Parallel):
        self.par = par
        self.t0 = time.perf_counter()
        self.counters = par.counters.snapshot()

    def record(self, stats: RunStats, phase: str = "decode", tokens: int = 1):
        s0, b0, r0 = self.counters
        s1, b1, r1 = self.par.counters.snapshot()
        stats.steps.append(StepStats(phase, tokens, 1000 * (time.perf_counter() - self.t0), 1000 * (s1 - s0), b1 - b0, r1 - r0))


def _check_special_ids(tokenizer, vocab_size: int):
    """The tokenizer, once its BOS and EOS ids are known to be in the model's vocabulary (a bad
    bos_token_id in config.json would otherwise fail the first prompt deep inside the model)."""
    for name, token_id in (("bos_token_id", tokenizer.bos_id), ("eos_token_id", tokenizer.eos_id)):
        if token_id is not None and not 0 <= token_id < min(vocab_size, tokenizer.vocab_size):
            raise TpllamaError(f"{tokenizer.source}: {name} {token_id} is outside the vocabulary "
                               f"(0..{min(vocab_size, tokenizer.vocab_size) - 1}); correct it in the model's "
                               "config.json / tokenizer_config.json")
    return tokenizer


def _rank_weights(value, world_size: int):
    if value is None or isinstance(value, str):
        return parse_rank_weights(value, world_size)
    return tuple(float(w) for w in value)


def _find_stop(text: str, stops: Sequence[str]) -> Optional[int]:
    cuts = [text.find(s) for s in stops if s and s in text]
    return min(cuts) if cuts else None


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of text that could begin a stop string (not shown yet)."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return hold


def load(path: Optional[str] = None, comm=None, **options) -> Model:
    """Load a model over `comm` (default MPI.COMM_WORLD); collective. path None: the default model.

    Options are LoadOptions' fields: weight_type, ctx_size, threads, rank_weights, sync_type,
    tokenizer, verbose."""
    if path is None:
        from .fetch import default_model_path
        path = default_model_path(comm, quiet=not options.get("verbose", False))
    return Model(path, comm, LoadOptions(**options))

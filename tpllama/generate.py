"""Generate text from a prompt, on one rank or across an MPI job.

    python -m tpllama.generate -p "Tell me about llamas"                # default model, one rank
    mpirun -n 2 python -m tpllama.generate -m model.gguf -p "..."      # two ranks, tensor-parallel
    mpirun -hostfile pis.txt python -m tpllama.generate -m model.gguf -p "..."

Text streams to stdout on rank 0; the timing summary goes to stderr.
"""
from __future__ import annotations

import sys

from . import cli
from .console import Console


def build_parser():
    p = cli.RankAwareParser(
        prog="python -m tpllama.generate",
        description="Generate text with a Llama-family model, tensor-parallel over the ranks of an MPI job "
                    "(run it under mpirun for more than one rank).",
        epilog="examples:\n"
               "  python -m tpllama.generate -p 'What is a llama?'\n"
               "  mpirun -n 2 python -m tpllama.generate -m model.gguf -p 'Once upon a time' --temp 0 -n 64\n"
               "  mpirun -hostfile hostfiles/pis.txt python -m tpllama.generate -m model.gguf --stats -p '...'",
        formatter_class=cli.argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-p", "--prompt", default=None, help="prompt text (default: read from -f, else 'Once upon a time')")
    p.add_argument("-f", "--file", default=None, help="read the prompt from this file")
    p.add_argument("-sys", "--system-prompt", dest="system", default=None,
                   help="system prompt (implies the chat template)")
    chat = p.add_mutually_exclusive_group()
    chat.add_argument("--chat", dest="chat", action="store_true", default=None,
                      help="wrap the prompt in the model's chat template (default when the model has one)")
    chat.add_argument("--raw", dest="chat", action="store_false", help="use the prompt as it is, no chat template")
    p.add_argument("--no-echo", action="store_true", help="do not print a raw prompt before its continuation")
    p.add_argument("--stats", action="store_true",
                   help="per-token timings (total, compute, sync ms; kB sent/received) and a summary on stderr")
    cli.add_model_args(p)
    cli.add_sampling_args(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    prompt = args.prompt
    if args.file:
        try:
            with open(args.file, encoding="utf-8", errors="surrogateescape") as f:
                prompt = f.read()
        except OSError as e:
            raise cli.TpllamaError(f"-f {args.file}: cannot read the prompt file ({e.strerror})", collective=True)
    if prompt is None:
        prompt = "Once upon a time"
    _check_text(args, prompt)
    cli.check_args(args)
    cli.show_log(args)

    import tpllama
    model = tpllama.load(args.model, **cli.load_options(args))
    root = model.par.is_root
    use_chat = args.chat if args.chat is not None else (args.system is not None or model.tokenizer.chat_template is not None)
    if use_chat and model.tokenizer.chat_template is None and root:
        print(f"tpllama: the model has no chat template; {'-sys' if args.system is not None else '--chat'} uses a "
              "generic one for its family (--raw continues the prompt as it is)", file=sys.stderr, flush=True)
    from .stats import RunStats
    stats = RunStats()
    # stream() checks the prompt against the context before anything is printed
    pieces = model.stream(prompt, args.n_predict, chat=use_chat, system=args.system, stats=stats,
                          sampling=cli.sampling_params(args))
    console = Console.open() if root else None
    if root and not use_chat and not args.no_echo:
        console.write(prompt)   # a raw prompt reads on into its continuation
    for piece in pieces:
        if root:
            console.write(piece)
    if root:
        console.write("\n")
        if _context_filled(model, stats, args.n_predict):
            print(f"tpllama: the context is full ({model.ctx} tokens): the text was cut after "
                  f"{stats.generated_tokens} tokens; raise -c for more", file=sys.stderr, flush=True)
    _report(model, stats, args.stats)
    return 0


def _check_text(args, prompt: str) -> None:
    """Text from argv that is not UTF-8 arrives with lone surrogates: refuse it by its flag."""
    from .checks import text
    where = f"-f {args.file}" if args.file else "-p"
    text(where, prompt)
    if args.system is not None:
        text("-sys", args.system)


def _context_filled(model, stats, n_predict: int) -> bool:
    """The generation stopped because the context had no room left, not at -n or a stop token."""
    return (model.last_finish_reason == "length" and stats.generated_tokens < n_predict
            and stats.prompt_tokens + stats.generated_tokens >= model.ctx)


def _report(model, stats, per_token: bool):
    """Summary on rank 0's stderr; with --stats every rank's per-token lines too, gathered to rank 0."""
    par = model.par
    lines = [s.line(i) for i, s in enumerate(stats.steps)] if per_token else []
    everyone = par.gather_object(lines)
    if not par.is_root:
        return
    if per_token:
        for rank, rank_lines in enumerate(everyone):
            for line in rank_lines:
                print(f"rank {rank} {line}", file=sys.stderr)
    print(stats.summary(), file=sys.stderr)


if __name__ == "__main__":
    cli.run(main)

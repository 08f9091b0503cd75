"""Chat with a model in the terminal, on one rank or across an MPI job.

    python -m tpllama.chat                                  # default model, one rank
    mpirun -n 2 python -m tpllama.chat -m model.gguf -sys "You are terse."

Rank 0 reads stdin and prints the answers as they are generated; it sends each message (or the
end of the chat) to the other ranks, which follow it (see tpllama.follow). Each turn reuses the
KV cache of the conversation so far: only the new message is read (see tpllama.conversation).
"""
from __future__ import annotations

import os
import signal
import sys
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

from . import cli
from .follow import GENERATE, STOP, Command, StreamCall, check_sampling_flags, exchange, follow

# Tokens kept free for an answer when the context fills up and old turns are dropped (without -n).
ANSWER_ROOM = 256

HELP = ("/reset forgets the conversation, /exit (or Ctrl-D) quits, Ctrl-C stops an answer; "
        "end a line with \\ to continue the message on the next line")


def build_parser():
    p = cli.RankAwareParser(
        prog="python -m tpllama.chat",
        description="Chat with a Llama-family model in the terminal, tensor-parallel over the ranks of an MPI job. "
                    "The model's own chat template frames the conversation; each turn reuses the KV cache of the "
                    "turns before it. When the context fills up, the oldest turns are dropped (the system prompt "
                    "stays).",
        epilog="commands while chatting:\n"
               "  /reset      forget the conversation (the system prompt stays)\n"
               "  /exit       quit (also /quit, Ctrl-D)\n"
               "  Ctrl-C      stop the answer being written; at the prompt, quit. Under mpirun, Ctrl-C reaches\n"
               "              mpirun, which ends the whole job: to stop one answer send SIGINT to rank 0\n"
               "              (kill -INT PID, the pid the banner shows)\n"
               "  line\\       a line ending in a backslash continues on the next line\n"
               "\n"
               "examples:\n"
               "  python -m tpllama.chat\n"
               "  mpirun -n 2 python -m tpllama.chat -m model.gguf -sys 'You are a terse assistant.' --temp 0.7\n",
        formatter_class=cli.argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-sys", "--system-prompt", dest="system", default=None, help="system prompt of the conversation")
    p.add_argument("--stats", action="store_true",
                   help="after each answer, print on stderr the prompt tokens read and reused from the cache, "
                        "tokens generated and speed")
    cli.add_model_args(p)
    cli.add_sampling_args(p, n_default=-1)
    _set_help(p, "n_predict", "tokens per answer at most; -1: until the model ends its turn or the context is full "
                              "(default -1)")
    return p



def _set_help(parser, dest: str, text: str) -> None:
    for action in parser._actions:
        if action.dest == dest:
            action.help = text


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.n_predict == 0 or args.n_predict < -1:
        raise cli.TpllamaError(f"-n {args.n_predict}: expected a positive number of tokens, or -1", collective=True)
    check_sampling_flags(cli.sampling_options(args))
    import tpllama
    model = tpllama.load(args.model, **cli.load_options(args))
    if model.par.is_root:
        lead(model, args)
    else:
        follow(model)
    return 0


# ------------------------------------------------------------------ rank 0


def lead(model, args) -> None:
    """Rank 0: read messages, answer them with every rank, tell the others when the chat ends."""
    from .conversation import Conversation
    conversation = Conversation(model.tokenizer, args.system)
    sys.stdin.reconfigure(errors="replace")   # a stray non-UTF-8 byte must not end the chat
    console = Console.open()
    interrupts = Interrupts()
    interrupts.install()
    _banner(model, console)
    for line in read_messages(console, interrupts):
        command = line.strip()
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            conversation.reset()
            console.note("conversation forgotten")
        elif command == "/help":
            console.note(HELP)
        elif command:
            answer(model, conversation, line, args, console, interrupts)
    # not in a finally: after a failure cli.run ends the job, and the others may be mid-generation
    exchange(model.par, Command(STOP))


def answer(model, conversation, text: str, args, console: "Console", interrupts: "Interrupts") -> None:
    """Generate and print the answer to one message, on every rank; keep the turn."""
    from .errors import TpllamaError
    from .stats import RunStats
    n = args.n_predict
    room = min(n if n > 0 else ANSWER_ROOM, model.ctx // 2)
    try:
        ids, dropped = conversation.prompt_within(text, model.ctx, room)
    except TpllamaError as e:   # too long even alone, or a template error: no other rank has started
        console.note(f"error: {e}")
        return
    if dropped:
        console.note(f"context full: dropped the {dropped} oldest turn(s); {conversation.turns} left")
    room_left = model.ctx - len(ids)
    call = StreamCall(ids, min(n, room_left) if n > 0 else room_left, **cli.sampling_options(args))
    exchange(model.par, Command(GENERATE, call))
    tokens, pieces, stats = [], [], RunStats()
    try:
        with interrupts.during_answer() as stop_requested:
            for piece in model.stream(**call.kwargs(), stats=stats, on_token=tokens.append, cancel=stop_requested):
                pieces.append(piece)
                console.write(piece)
    except TpllamaError as e:
        if not e.collective:
            raise
        console.write("\n")
        console.note(f"error: {e}")
        return
    console.write("\n")
    reason = model.last_finish_reason
    conversation.add_turn(text, ids, tokens, "".join(pieces))
    if reason == "cancelled":
        console.note("answer stopped")
    elif reason == "length" and len(ids) + len(tokens) >= model.ctx:
        console.note("context full: the answer was cut; the oldest turns will be dropped to make room")
    if args.stats:
        console.note(f"prompt {stats.prompt_tokens} tokens ({stats.cached_tokens} reused from cache), "
              f"{stats.generated_tokens} generated, {stats.decode_tokens_per_s:.1f} tokens/s, finish: {reason}")


def read_messages(console: "Console", interrupts: "Interrupts") -> Iterator[str]:
    """User messages from stdin until EOF or Ctrl-C at the prompt; a trailing backslash joins lines."""
    interactive = sys.stdin.isatty()
    parts = []
    while True:
        prompt = "" if parts else "> "
        try:
            line = _read_line(console, prompt, interactive)
        except KeyboardInterrupt:
            console.write("\n")
            return
        if line is None:
            if not interactive:
                console.write("\n")
            return
        if line.endswith("\\"):
            parts.append(line[:-1])
            continue
        yield "\n".join(parts + [line])
        parts = []


def _read_line(console: "Console", prompt: str, interactive: bool) -> Optional[str]:
    """One line without its newline, or None at end of input."""
    if interactive:   # input() gives line editing at a terminal
        try:
            return input(prompt)
        except EOFError:
            return None
    console.write(prompt)
    line = sys.stdin.readline()
    return line.rstrip("\n").rstrip("\r") if line else None


class Interrupts:
    """Rank 0's Ctrl-C: during an answer it stops the answer at the next token (every rank stops
    together, through the engine's cancel); at the prompt it ends the chat."""

    def __init__(self):
        self._answering = False
        self._stop = False

    def install(self) -> None:
        signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum, frame):
        if self._answering:
            self._stop = True
        else:
            raise KeyboardInterrupt

    @contextmanager
    def during_answer(self) -> Iterator[Callable[[], bool]]:
        self._answering, self._stop = True, False
        try:
            yield lambda: self._stop
        finally:
            self._answering = False


def _banner(model, console: "Console") -> None:
    name = os.path.basename(os.path.normpath(model.reader.path))
    console.note(f"tpllama chat: {name} ({model.par.size} rank(s); rank 0 is pid {os.getpid()}), "
                 f"context {model.ctx} tokens. {HELP}")


class Console:
    """Where rank 0 shows the chat: answers as they stream, and notes about the chat in brackets.

    Under mpirun, rank 0's stdout reaches the terminal through mpirun, which (Open MPI 5) passes
    on whole lines only: an answer would appear at its end, the "> " prompt after it. So when
    rank 0 runs beside an mpirun whose stdout is a terminal, it writes to that terminal itself.
    Otherwise answers go to stdout and notes to stderr."""

    def __init__(self, out, notes):
        self.out, self.notes = out, notes

    @classmethod
    def open(cls) -> "Console":
        terminal = _launcher_terminal()
        if terminal is not None:
            return cls(terminal, terminal)
        return cls(sys.stdout, sys.stderr)

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def note(self, text: str) -> None:
        self.out.flush()
        self.notes.write(f"[{text}]\n")
        self.notes.flush()


def _launcher_terminal():
    """The terminal our parent writes to, opened for writing, when we run under mpirun on its
    host (mpirun then gives us a terminal of its own, whose lines it copies to its stdout)."""
    if "OMPI_COMM_WORLD_SIZE" not in os.environ:
        return None
    try:
        path = os.path.realpath(f"/proc/{os.getppid()}/fd/1")
        if not path.startswith("/dev/"):
            return None
        fd = os.open(path, os.O_WRONLY | os.O_NOCTTY)
    except OSError:
        return None
    if not os.isatty(fd):
        os.close(fd)
        return None
    return os.fdopen(fd, "w", encoding="utf-8", errors="replace")


if __name__ == "__main__":
    cli.run(main)

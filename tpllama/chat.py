"""Chat with a model in the terminal, on one rank or across an MPI job.

    python -m tpllama.chat                                  # default model, one rank
    mpirun -n 2 python -m tpllama.chat -m model.gguf -sys "You are terse."

Rank 0 reads the terminal (under mpirun too: see tpllama.console) and prints the answers as they
are generated; it sends each message (or the end of the chat) to the other ranks, which follow
it (see tpllama.follow). Each turn reuses the KV cache of the conversation so far: only the new
message is read (see tpllama.conversation). Every answer stops after -n tokens at most.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

from . import cli
from .console import Console, InputLines, Terminal
from .follow import GENERATE, STOP, Command, StreamCall, exchange, follow

# Tokens an answer may have at most, unless -n says otherwise: a few paragraphs, so that a model
# that never ends its turn (sampling at a high temperature) gives the prompt back in time.
ANSWER_LIMIT = 512
# A second Ctrl-C within this many seconds of the first quits the chat.
QUIT_WINDOW = 1.0

HELP = ("/reset forgets the conversation, /exit (or Ctrl-D) quits, Ctrl-C stops an answer (twice within "
        "a second, or at the prompt: quits); end a line with \\ to continue the message on the next line")


def build_parser():
    p = cli.RankAwareParser(
        prog="python -m tpllama.chat",
        description="Chat with a Llama-family model in the terminal, tensor-parallel over the ranks of an MPI job. "
                    "The model's own chat template frames the conversation; each turn reuses the KV cache of the "
                    "turns before it. When the context fills up, the oldest turns are dropped (the system prompt "
                    "stays).",
        epilog="commands while chatting:\n"
               "  /reset      forget the conversation (the system prompt stays)\n"
               "  /exit       quit (also /quit, Ctrl-D at the prompt)\n"
               "  Ctrl-C      stop the answer being written; twice within a second, or at the prompt: quit\n"
               "              (under mpirun too: rank 0 takes mpirun's terminal while the chat runs)\n"
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
    cli.add_sampling_args(p, n_default=ANSWER_LIMIT)
    _set_help(p, "n_predict", f"tokens per answer at most (default {ANSWER_LIMIT}); an answer also ends when the "
                              "model ends its turn")
    return p



def _set_help(parser, dest: str, text: str) -> None:
    for action in parser._actions:
        if action.dest == dest:
            action.help = text


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.system is not None:
        from .checks import text
        text("-sys", args.system)
    cli.check_args(args, n_minimum=1)
    cli.show_log(args)
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
    terminal = Terminal.take()
    try:
        console = Console(sys.stdout, sys.stdout) if terminal else Console.open()
        interrupts = Interrupts()
        interrupts.install()
        _banner(model, args, console)
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
                if interrupts.quit_requested:
                    break
        # not in a finally: after a failure cli.run ends the job, and the others may be mid-generation
        exchange(model.par, Command(STOP))
    finally:
        if terminal:
            terminal.give_back()


def answer(model, conversation, text: str, args, console: Console, interrupts: "Interrupts") -> None:
    """Generate and print the answer to one message, on every rank; keep the turn."""
    from .errors import TpllamaError
    from .stats import RunStats
    n = args.n_predict
    room = min(n, model.ctx // 2)
    try:
        ids, dropped = conversation.prompt_within(text, model.ctx, room)
    except TpllamaError as e:   # too long even alone, or a template error: no other rank has started
        console.note(f"error: {e}")
        return
    if dropped:
        console.note(f"context full: dropped the {dropped} oldest turn(s); {conversation.turns} left")
    call = StreamCall(ids, min(n, model.ctx - len(ids)), cli.sampling_params(args))
    tokens, pieces, stats = [], [], RunStats()
    try:
        # from the command to the others on, Ctrl-C must stop the answer, not interrupt the exchange
        with interrupts.during_answer() as stop_requested:
            exchange(model.par, Command(GENERATE, call))
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
        console.note("answer stopped" + ("; quitting" if interrupts.quit_requested else ""))
    elif reason == "length" and len(tokens) >= n:
        console.note(f"answer cut at {n} tokens (-n)")
    elif reason == "length" and len(ids) + len(tokens) >= model.ctx:
        console.note("context full: the answer was cut; the oldest turns will be dropped to make room")
    if args.stats:
        console.note(f"prompt {stats.prompt_tokens} tokens ({stats.cached_tokens} reused from cache), "
              f"{stats.generated_tokens} generated, {stats.decode_tokens_per_s:.1f} tokens/s, finish: {reason}")


def read_messages(console: Console, interrupts: "Interrupts") -> Iterator[str]:
    """User messages until the input ends (Ctrl-D) or Ctrl-C at the prompt; a trailing backslash
    joins lines (a message the input's end cuts off is sent as it stands)."""
    interactive = sys.stdin.isatty()
    lines = None if interactive else InputLines()
    parts = []
    while not interrupts.quit_requested:
        prompt = "" if parts else "> "
        try:
            with interrupts.at_prompt():
                line = _read_line(console, prompt, lines)
        except KeyboardInterrupt:
            console.write("\n")
            return
        if line is None:
            console.write("\n")   # the shell's prompt then starts on a line of its own
            if parts:   # the input ended inside a continued message: send it as it stands
                yield "\n".join(parts)
            return
        if line.endswith("\\"):
            parts.append(line[:-1])
            continue
        yield "\n".join(parts + [line])
        parts = []


def _read_line(console: Console, prompt: str, lines: Optional[InputLines]) -> Optional[str]:
    """One line without its newline, or None at end of input."""
    if lines is None:   # a terminal: input() gives line editing
        import readline  # noqa: F401  (input() uses it once imported)
        try:
            return input(prompt)
        except EOFError:
            return None
    console.write(prompt)
    return lines.readline()


class Interrupts:
    """Rank 0's Ctrl-C: during an answer it stops the answer at the next token (every rank stops
    together, through the engine's cancel), and a second one within QUIT_WINDOW seconds also ends
    the chat; at the prompt it ends the chat at once; anywhere else the chat ends at the next
    prompt. It never interrupts rank 0 in the middle of work the other ranks share."""

    def __init__(self):
        self._answering = False
        self._prompting = False
        self._stop = False
        self._last = -QUIT_WINDOW
        self.quit_requested = False

    def install(self) -> None:
        signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum, frame):
        if self._prompting:
            raise KeyboardInterrupt
        now = time.monotonic()
        if not self._answering or (self._stop and now - self._last <= QUIT_WINDOW):
            self.quit_requested = True
        self._stop, self._last = True, now

    @contextmanager
    def at_prompt(self) -> Iterator[None]:
        self._prompting = True
        try:
            yield
        finally:
            self._prompting = False

    @contextmanager
    def during_answer(self) -> Iterator[Callable[[], bool]]:
        self._answering, self._stop = True, False
        try:
            yield lambda: self._stop
        finally:
            self._answering = False


def _banner(model, args, console: Console) -> None:
    name = os.path.basename(os.path.normpath(model.reader.path))
    console.note(f"tpllama chat: {name} ({model.par.size} rank(s); rank 0 is pid {os.getpid()}), "
                 f"context {model.ctx} tokens, answers of at most {args.n_predict} tokens (-n). {HELP}")


if __name__ == "__main__":
    cli.run(main)

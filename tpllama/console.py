"""Where rank 0 writes text that streams: the terminal, even under mpirun.

Under mpirun, a rank's stdout reaches the terminal through mpirun, which (Open MPI 5) passes
on whole lines only, so streamed tokens would appear a line at a time. When rank 0 runs on
mpirun's host and mpirun writes to a terminal, rank 0 writes to that terminal itself.
"""
from __future__ import annotations

import os
import sys


class Console:
    """Rank 0's text as it streams (answers, generated text), and notes in brackets: to mpirun's
    terminal when rank 0 runs beside it, otherwise to stdout (text) and stderr (notes)."""

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

"""Rank 0's terminal, even under mpirun: where streamed text goes, and where a chat reads.

Under mpirun, a rank's stdout reaches the terminal through mpirun, which (Open MPI 5) passes
on whole lines only, so streamed tokens would appear a line at a time. When rank 0 runs on
mpirun's host and mpirun writes to a terminal, rank 0 writes to that terminal itself.

Input is worse: mpirun owns the terminal, so Ctrl-C (SIGINT to the terminal's foreground
process group, mpirun's) ends the whole job, and Open MPI 5 never passes the end of its stdin
(Ctrl-D, a closed pipe) on to rank 0. So a chat's rank 0 beside a foreground mpirun takes the
terminal: it makes its own process group the terminal's foreground group (Ctrl-C and Ctrl-D
then reach rank 0 alone; mpirun, now in the background, stops reading the terminal) and gives
it back when it is done (`Terminal`). When mpirun reads a pipe or a file instead, rank 0
reads what mpirun forwards and ends when mpirun's own input has ended (`InputLines`).
"""
from __future__ import annotations

import os
import select
import signal
import stat
import sys
from typing import Optional


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


class Terminal:
    """Rank 0 holding mpirun's terminal: its stdin and stdout are the terminal, and it is the
    terminal's foreground process group until give_back()."""

    def __init__(self, fd: int, launcher_group: int):
        self.fd, self.launcher_group = fd, launcher_group

    @classmethod
    def take(cls) -> Optional["Terminal"]:
        """Take mpirun's terminal when mpirun runs in its foreground and reads it; else None."""
        if "OMPI_COMM_WORLD_SIZE" not in os.environ or not _parent_is_mpirun():
            return None
        launcher = os.getppid()
        path = os.path.realpath(f"/proc/{launcher}/fd/0")   # mpirun's stdin, when rank 0 is its child
        if not path.startswith("/dev/"):
            return None           # mpirun reads a pipe or a file, or rank 0 runs on another host
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
        except OSError:
            return None
        try:
            # tcgetpgrp fails unless this terminal is our session's (mpirun's) controlling terminal
            launcher_group = os.tcgetpgrp(fd) if os.isatty(fd) else -1
            if launcher_group != os.getpgid(launcher):
                os.close(fd)      # not a terminal, or mpirun runs in the background
                return None
            signal.signal(signal.SIGTTOU, signal.SIG_IGN)   # a background group may then set the foreground
            os.tcsetpgrp(fd, os.getpgrp())
        except OSError:
            os.close(fd)
            return None
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os.dup2(fd, 0)
        os.dup2(fd, 1)
        return cls(fd, launcher_group)

    def give_back(self) -> None:
        """mpirun's group is the foreground again (it ends the job and returns to the shell)."""
        if self.fd < 0:
            return
        try:
            sys.stdout.flush()
            os.tcsetpgrp(self.fd, self.launcher_group)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = -1


class InputLines:
    """Lines from stdin when it is not a terminal. Under mpirun, rank 0's stdin never ends, so
    it also watches mpirun's own stdin: once that has ended (a pipe with no writer left, a file
    read to its end, /dev/null) and nothing more arrives, the input has ended."""

    POLL_SECONDS = 0.25
    QUIET_POLLS = 2      # polls with mpirun's input ended and nothing arriving before we call it the end

    def __init__(self, fd: int = 0):
        self.fd = fd
        self.buffer = b""
        self.launcher_input = _launcher_input() if "OMPI_COMM_WORLD_SIZE" in os.environ else None

    def readline(self) -> Optional[str]:
        """The next line without its newline, or None at the end of the input."""
        quiet = 0
        while b"\n" not in self.buffer:
            ready, _, _ = select.select([self.fd], [], [], self.POLL_SECONDS)
            if ready:
                data = os.read(self.fd, 65536)
                if not data:
                    break
                self.buffer += data
                quiet = 0
            elif self.launcher_input is not None and self.launcher_input.ended():
                quiet += 1
                if quiet >= self.QUIET_POLLS:
                    break
        if not self.buffer:
            return None
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode("utf-8", errors="replace").rstrip("\r")


class _LauncherInput:
    """mpirun's stdin, seen from rank 0 without reading from it."""

    def __init__(self, path: str, fd: Optional[int]):
        self.path, self.fd = path, fd

    def ended(self) -> bool:
        if self.fd is None:            # /dev/null and the like: nothing ever comes
            return True
        mode = os.fstat(self.fd).st_mode
        if stat.S_ISFIFO(mode):        # a pipe: no writer left and nothing left in it
            poller = select.poll()
            poller.register(self.fd, select.POLLIN | select.POLLHUP)
            events = dict(poller.poll(0)).get(self.fd, 0)
            return bool(events & select.POLLHUP) and not events & select.POLLIN
        if stat.S_ISREG(mode):         # a file: mpirun has read it to its end
            return _launcher_position(self.path) >= os.fstat(self.fd).st_size
        return False


LAUNCHERS = ("prterun", "mpirun", "mpiexec")   # Open MPI 5's mpirun runs as prterun


def _parent_is_mpirun() -> bool:
    try:
        with open(f"/proc/{os.getppid()}/comm") as f:
            return f.read().strip() in LAUNCHERS
    except OSError:
        return False


def _launcher_input() -> Optional[_LauncherInput]:
    """mpirun's stdin when rank 0 is its child and it is a pipe, a file or /dev/null."""
    if not _parent_is_mpirun():      # rank 0 on another host: its parent is a daemon, not mpirun
        return None
    path = f"/proc/{os.getppid()}/fd/0"
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISCHR(mode) and os.path.realpath(path) == "/dev/null":
        return _LauncherInput(path, None)
    if not (stat.S_ISFIFO(mode) or stat.S_ISREG(mode)):
        return None
    try:
        return _LauncherInput(path, os.open(path, os.O_RDONLY | os.O_NONBLOCK))
    except OSError:
        return None


def _launcher_position(path: str) -> int:
    """How far mpirun has read its stdin file."""
    try:
        with open(path.replace("/fd/", "/fdinfo/")) as f:
            return int(f.readline().split()[1])
    except (OSError, ValueError, IndexError):
        return -1

"""Driving a long-running tpllama command (chat, serve) from a test: read its output while it runs,
wait for what it prints with a deadline, and always end its whole process group."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from typing import Callable, List, Optional, Sequence

from mpi_util import REPO, launcher_failed, mpi_env, mpirun_cmd


def command(ranks: int, module: str, args: Sequence[str]) -> List[str]:
    """python -m MODULE ARGS on one rank (no mpirun) or under mpirun."""
    import sys
    if ranks == 1:
        return [sys.executable, "-m", module, *args]
    return mpirun_cmd(ranks, ["-m", module, *args])


def _pseudo_terminal():
    """(parent's end, child's end) of a new pseudo-terminal that does not echo input."""
    import pty
    import termios
    parent, child = pty.openpty()
    attrs = termios.tcgetattr(child)
    attrs[3] &= ~termios.ECHO
    termios.tcsetattr(child, termios.TCSANOW, attrs)
    return parent, child


def _take_terminal():
    """In the child, after setsid: make stdin (the pseudo-terminal) the controlling terminal, so the
    child is in the terminal's foreground (mpirun reads stdin only then)."""
    import fcntl
    import termios
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _read_terminal(fd: int) -> bytes:
    try:
        return os.read(fd, 4096)
    except OSError:   # EIO: every process holding the child's end has exited
        return b""


def kill_tree(pid: int) -> None:
    """Kill a process that leads its own session and everything it started: mpirun puts each rank
    in a process group of its own, and a rank whose mpirun was killed lives on, so every
    descendant is killed by pid, then the process's own group."""
    import psutil
    try:
        descendants = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    for child in descendants:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def start_until_launched(start: Callable[[], "Running"], ready: Callable[["Running"], None],
                         attempts: int = 3) -> "Running":
    """start(), then ready(process), which raises AssertionError unless the process gets ready in
    time; started again (up to `attempts` times) when Open MPI's launcher itself failed to start
    (mpi_util.LAUNCHER_FAILURES: a few launches per thousand on a busy machine, before any rank
    runs). Any other failure kills the process and raises at once."""
    import sys
    for attempt in range(attempts):
        proc = start()
        try:
            ready(proc)
            return proc
        except BaseException:
            proc.kill()
            if attempt == attempts - 1 or not launcher_failed(proc.stdout + proc.stderr):
                raise
            print(f"interactive: the launcher failed to start (attempt {attempt + 1}); launching again", file=sys.stderr)
    raise AssertionError("unreachable")


class Running:
    """A started process (its own session, so the group can be killed) whose stdout and stderr
    are collected by threads; feed it stdin lines and wait for text."""

    def __init__(self, argv: Sequence[str], stdin: bool = True, env: Optional[dict] = None, tty: bool = False):
        """tty: run it in a pseudo-terminal (stdin, stdout and stderr all on it, no echo), as at a
        terminal; its output then appears as stdout."""
        self.argv = list(argv)
        self._out: List[bytes] = []
        self._err: List[bytes] = []
        self._lock = threading.Lock()
        self._terminal = None
        if tty:
            self._terminal, child = _pseudo_terminal()
            self.proc = subprocess.Popen(self.argv, stdin=child, stdout=child, stderr=child, env=mpi_env(env),
                                         cwd=str(REPO), start_new_session=True, preexec_fn=_take_terminal)
            os.close(child)
            readers = ((lambda: _read_terminal(self._terminal), self._out),)
        else:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=mpi_env(env),
                                         cwd=str(REPO), start_new_session=True)
            readers = ((lambda: self.proc.stdout.read1(4096), self._out),
                       (lambda: self.proc.stderr.read1(4096), self._err))
        for read, sink in readers:
            threading.Thread(target=self._collect, args=(read, sink), daemon=True).start()

    def _collect(self, read, sink):
        while True:
            data = read()
            if not data:
                return
            with self._lock:
                sink.append(data)

    @property
    def stdout(self) -> str:
        with self._lock:
            return b"".join(self._out).decode("utf-8", errors="replace")

    @property
    def stderr(self) -> str:
        with self._lock:
            return b"".join(self._err).decode("utf-8", errors="replace")

    def send(self, text: str) -> None:
        if self._terminal is not None:
            os.write(self._terminal, text.encode("utf-8"))
            return
        self.proc.stdin.write(text.encode("utf-8"))
        self.proc.stdin.flush()

    def close_stdin(self) -> None:
        self.proc.stdin.close()

    def wait_for(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            if self.proc.poll() is not None and not condition():
                raise AssertionError(f"{what}: the process exited ({self.proc.returncode}) first\n{self.report()}")
            time.sleep(0.05)
        raise AssertionError(f"{what}: not within {timeout} s\n{self.report()}")

    def wait_for_text(self, pattern: str, timeout: float, stream: str = "stderr") -> re.Match:
        found = []

        def seen():
            m = re.search(pattern, getattr(self, stream))
            if m:
                found.append(m)
            return bool(m)
        self.wait_for(seen, timeout, f"{pattern!r} on {stream}")
        return found[0]

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout} s\n{self.report()}") from None

    def rank0_pid(self) -> int:
        """The pid of rank 0 (the process itself on one rank), from what the command printed."""
        m = self.wait_for_text(r"rank 0 is pid (\d+)", 120)
        return int(m.group(1))

    def kill(self) -> None:
        """End the process and everything it started, whatever state they are in. mpirun puts each
        rank in a process group of its own, and a rank whose mpirun was killed lives on: so every
        descendant is killed by pid, then the process's own group."""
        if self.proc.poll() is None:
            kill_tree(self.proc.pid)
            self.proc.wait(timeout=30)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                if stream:
                    stream.close()
            except OSError:
                pass
        if self._terminal is not None:
            os.close(self._terminal)
            self._terminal = None

    def report(self) -> str:
        return f"$ {' '.join(self.argv)}\n--- stdout\n{self.stdout[-3000:]}\n--- stderr\n{self.stderr[-5000:]}"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()

"""Rank 0 leads, the other ranks follow: how the interactive commands (chat, serve) drive a job.

Only rank 0 talks to the user (stdin, HTTP). Each time it has work it sends a `Command` to every
rank with `exchange`; then all ranks make the same collective call: `Model.stream` (chat's
GENERATE), or one step of the server's batch (STEP, run by tpllama.serve). Between
commands the followers wait asleep (polling a non-blocking barrier), not spinning in a blocking
broadcast: a chat or a server may sit idle for hours.
"""
from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from .errors import TpllamaError
from .parallel import SideChannel
from .sampler import SamplingParams

GENERATE = "generate"
STEP = "step"           # the server: requests join the batch, cancelled ones end, one batch step runs
STOP = "stop"

# Followers poll for the next command with a growing sleep, up to this many seconds: the delay
# it adds to the start of a request is below what one token takes on the machines we target.
MAX_POLL_SLEEP = 0.02


@dataclass
class StreamCall:
    """The arguments of one collective `Model.stream` call (every rank passes the same)."""
    prompt_ids: List[int]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)   # checked when made, on rank 0
    stop: Tuple[str, ...] = field(default_factory=tuple)

    def kwargs(self) -> dict:
        return dict(prompt=self.prompt_ids, max_new_tokens=self.max_new_tokens, sampling=self.sampling,
                    stop=self.stop)


@dataclass
class Command:
    kind: str                           # GENERATE | STEP | STOP
    call: Optional[StreamCall] = None   # GENERATE
    calls: List[StreamCall] = field(default_factory=list)   # STEP: requests joining the batch
    cancel: List[int] = field(default_factory=list)         # STEP: sequences whose clients went away


def exchange(par, command: Optional[Command] = None) -> Command:
    """Collective: rank 0's command (the others pass None) arrives on every rank."""
    if par.size == 1:
        return command
    request = par.ibarrier()
    if par.is_root:
        request.Wait()
    else:
        sleep = 0.0005
        while not request.Test():
            time.sleep(sleep)
            sleep = min(2 * sleep, MAX_POLL_SLEEP)
    return par.bcast_object(command)


class StopNotice:
    """How a follower that gets SIGTERM or SIGINT asks rank 0 to end the job cleanly (rank 0 alone
    talks to the clients): a message on a communicator of its own, which rank 0 polls for.

    Collective to create. Under mpirun every rank gets the signal; a follower that died of it
    would leave rank 0 waiting in a collective, so followers keep going until rank 0 says stop."""

    def __init__(self, par):
        self.channel = SideChannel(par)

    def send(self) -> None:
        """A follower: ask rank 0 to shut down (once)."""
        self.channel.notify_root()

    def arrived(self) -> bool:
        """Rank 0: whether some follower asked to shut down (the messages are taken)."""
        return self.channel.take_notices()

    def install_follower_signals(self) -> None:
        def on_signal(signum, frame):
            self.send()
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)


class OutOfStep(TpllamaError):
    """A rank did not finish a generation with the others: the job cannot go on."""


class Outcomes:
    """After each generation every rank meets the others on a communicator of its own and says
    how its generation ended, so that a failure inside a generation ends that request only.

    If every rank arrives, every collective of the generation was matched (whichever ranks
    failed, and wherever), so the job can go on: the failures are reported, and the next request
    is served. A rank that does not arrive within `timeout` seconds is stuck in a collective the
    failed rank never entered: the ranks are out of step and the job must end (OutOfStep)."""

    def __init__(self, par, timeout: float = 20.0):
        self.channel = SideChannel(par)   # collective
        self.timeout = timeout

    def agree(self, error: Optional[BaseException]) -> Optional[str]:
        """Collective: the first rank's failure ("rank R: message"), or None when all succeeded."""
        mine = describe_failure(error)
        if not self.channel.meet(self.timeout, MAX_POLL_SLEEP):
            raise OutOfStep(f"{mine or 'a generation ended on this rank'}, and the other ranks did not "
                            f"finish it within {self.timeout:g} s: ending the job")
        failures = self.channel.allgather_object(mine)
        return next((f"rank {rank}: {f}" if rank else f for rank, f in enumerate(failures) if f), None)


def describe_failure(error: Optional[BaseException]) -> Optional[str]:
    if error is None:
        return None
    if isinstance(error, TpllamaError):
        return str(error)
    return f"internal error: {type(error).__name__}: {error}"


def follow(model, outcomes: Optional[Outcomes] = None) -> None:
    """What every rank but 0 does: run rank 0's commands until it says stop. With outcomes (the
    server), every generation ends with Outcomes.agree, and a failure inside one is survived."""
    while True:
        command = exchange(model.par)
        if command.kind == STOP:
            return
        error = None
        try:
            for _ in model.stream(**command.call.kwargs()):
                pass
        except Exception as e:   # judged below
            error = e
        if outcomes is not None:
            outcomes.agree(error)
        elif error is not None and not getattr(error, "collective", False):
            raise error   # this rank alone failed: let cli.run abort the job
                          # (a collective one rank 0 reports to its user and goes on)

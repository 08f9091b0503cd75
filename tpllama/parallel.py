"""The communicator: every MPI call tpllama makes, with byte and time accounting, and the
agreement on errors that keeps ranks in step.

The model math calls only `allreduce_sum`; the engine uses the token broadcast and the
candidate gather. At world size 1 every collective is a no-op or a copy. No other module
touches the communicator.

A section that can fail runs in `together` (or `from_root`): an exception of any class on any
rank reaches every rank, which all raise it, so no rank moves on while others wait.

Bytes are payload bytes: what this rank hands to MPI and gets back. Between hosts, large
float64 sums go as a split sum (_split_sum: float64 partials to the rank that totals each
1/K, float32 totals back), 12 bytes per value instead of 16; otherwise MPI's all-reduce, whose
algorithm MPI picks.
"""
from __future__ import annotations

import queue
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from .errors import TpllamaError

SYNC_TYPES = ("f64", "f32", "bf16", "q80")


@dataclass
class CommCounters:
    """Running totals; take differences around a step to get per-step numbers."""
    seconds: float = 0.0
    sent: int = 0
    received: int = 0
    calls: Dict[str, int] = field(default_factory=dict)
    weight_bytes_sent: int = 0       # weights sent to / received from ranks without the model file
    weight_bytes_received: int = 0

    def snapshot(self) -> Tuple[float, int, int]:
        return self.seconds, self.sent, self.received


class Finished:
    """A sum that is already complete (one rank, or a payload that is reduced at once)."""

    def __init__(self, total: np.ndarray):
        self.total = total

    def wait(self) -> np.ndarray:
        return self.total


# Between hosts, payloads from this size on are summed as a reduce-scatter of float64 chunks and
# an all-gather of their float32 totals (_split_sum): each rank sends 3/4 of the bytes of a ring
# all-reduce in float64. Below it MPI's own all-reduce is faster (fewer round trips); decode (one
# row per sequence) stays below it. Within one host MPI's all-reduce through shared memory is
# faster at every size. Measured: docs/performance.md, "Prefill over slow links".
SPLIT_MIN_BYTES = 256 * 1024
SPLIT_TAG = 12


def _wait_all(MPI, requests, poll_s: Optional[float]) -> None:
    """Wait for the requests; with poll_s, by testing them every poll_s seconds, so that a thread
    waiting beside the compute threads does not spin a core (a blocking MPI wait polls)."""
    if poll_s is None:
        MPI.Request.Waitall(requests)
        return
    while not MPI.Request.Testall(requests):
        time.sleep(poll_s)


def _exchange(comm, MPI, outgoing: Callable[[int], np.ndarray], incoming: Callable[[int], np.ndarray],
              tag: int, poll_s: Optional[float]) -> None:
    """All at once, every rank sends outgoing(dest) to each other rank and receives that rank's
    message into incoming(source); returns when all have arrived."""
    n, me = comm.Get_size(), comm.Get_rank()
    requests = []
    for step in range(1, n):
        source, dest = (me - step) % n, (me + step) % n
        requests.append(comm.Irecv(incoming(source), source=source, tag=tag))
        requests.append(comm.Isend(outgoing(dest), dest=dest, tag=tag))
    _wait_all(MPI, requests, poll_s)


def _split_sum(comm, MPI, partial: np.ndarray, poll_s: Optional[float] = None) -> Tuple[np.ndarray, int, int]:
    """Sum float64 partials over comm: each rank gets every rank's float64 values of its 1/K of
    the elements, adds them in rank order and rounds the total to float32, then sends that to
    every rank. The same total as a float64 all-reduce rounded to float32 (two ranks: bit for
    bit; more: in rank order, on every rank alike), for 12 bytes per value on the wire instead of
    16. Point-to-point messages only, all posted at once. Returns (totals, bytes sent, received)."""
    n, me = comm.Get_size(), comm.Get_rank()
    flat = np.ascontiguousarray(partial, dtype=np.float64).reshape(-1)
    bounds = [flat.size * r // n for r in range(n + 1)]
    chunk = [slice(bounds[r], bounds[r + 1]) for r in range(n)]
    parts = np.empty((n, bounds[me + 1] - bounds[me]), dtype=np.float64)
    parts[me] = flat[chunk[me]]
    _exchange(comm, MPI, lambda dest: flat[chunk[dest]], lambda source: parts[source], SPLIT_TAG, poll_s)
    total = parts[0].copy()
    for r in range(1, n):
        total += parts[r]
    totals = np.empty(flat.size, dtype=np.float32)
    totals[chunk[me]] = total
    _exchange(comm, MPI, lambda dest: totals[chunk[me]], lambda source: totals[chunk[source]], SPLIT_TAG + 1, poll_s)
    own = parts.shape[1]
    return totals.reshape(partial.shape), 8 * (flat.size - own) + 4 * own, 8 * (n - 1) * own + 4 * (flat.size - own)


def _sum_partials(comm, MPI, partial: np.ndarray, sync_type: str, split: bool,
                  poll_s: Optional[float] = None) -> Tuple[np.ndarray, int, int]:
    """The float32 total of f64/f32 partials over comm (split: by _split_sum), with the bytes
    sent and received."""
    if split:
        return _split_sum(comm, MPI, partial, poll_s)
    x = np.ascontiguousarray(partial, dtype=np.float64 if sync_type == "f64" else np.float32)
    if poll_s is None:
        comm.Allreduce(MPI.IN_PLACE, x, op=MPI.SUM)
    else:
        _wait_all(MPI, [comm.Iallreduce(MPI.IN_PLACE, x, op=MPI.SUM)], poll_s)
    return x.astype(np.float32, copy=False), x.nbytes, x.nbytes


class PendingSum:
    """An all-reduce on its way on the courier thread; wait() gives the float32 total."""

    def __init__(self, par: "Parallel", partial: np.ndarray, split: bool):
        self.par, self.partial, self.split = par, partial, split
        self.done = threading.Event()
        self.result: Optional[Tuple[np.ndarray, int, int]] = None
        self.error: Optional[BaseException] = None

    def wait(self) -> np.ndarray:
        t0 = time.perf_counter()
        self.done.wait()
        if self.error is not None:
            raise self.error
        total, sent, received = self.result
        self.par._count("allreduce", t0, sent, received)   # seconds: only the time waited
        return total


class _Courier:
    """Carries the all-reduces that prefill starts (Parallel.start_allreduce_sum) on a thread of
    its own while the rank computes, in the order they were started, over a duplicate of the
    communicator (so they never meet the main thread's collectives). Every rank starts the same
    all-reduces in the same order, so the couriers meet. It waits by polling every PAUSE_S
    (_wait_all), leaving the cores to the compute threads; PAUSE_S = 0 waits inside MPI."""

    PAUSE_S = 1e-4

    def __init__(self, comm, MPI, sync_type: str):
        self.comm = comm.Dup()        # collective: every rank makes its courier at the same start
        self.MPI, self.sync_type = MPI, sync_type
        self.jobs: "queue.SimpleQueue[PendingSum]" = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="tpllama-mpi-courier", daemon=True)
        self.thread.start()

    def start(self, pending: PendingSum) -> PendingSum:
        self.jobs.put(pending)
        return pending

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            try:
                job.result = _sum_partials(self.comm, self.MPI, job.partial, self.sync_type, job.split,
                                          self.PAUSE_S or None)
            except BaseException as e:    # reaches the rank's main thread at wait()
                job.error = e
            job.done.set()


def _to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounding to nearest even."""
    bits = x.astype(np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + 0x7FFF
    return ((bits + rounding) >> 16).astype(np.uint16)


def _from_bf16(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << 16).view(np.float32)


class Parallel:
    """A communicator (default MPI.COMM_WORLD) and tpllama's collectives over it."""

    def __init__(self, comm=None, sync_type: str = "f64"):
        from mpi4py import MPI
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        if sync_type not in SYNC_TYPES:
            raise TpllamaError(f"--sync-type {sync_type!r}: expected one of {', '.join(SYNC_TYPES)}")
        self.sync_type = sync_type
        self.counters = CommCounters()
        self._host_comm = None
        self._courier: Optional[_Courier] = None
        # large f64 sums by _split_sum: None = when the ranks are on more than one host (decided
        # at the first such sum, a collective every rank reaches alike); True/False to force
        self.split_sums: Optional[bool] = None

    @property
    def can_overlap(self) -> bool:
        """Non-blocking all-reduces can travel while this rank computes: a payload that MPI sums
        (f64, f32), and an MPI that lets the courier thread call it (MPI_THREAD_MULTIPLE)."""
        return self.size > 1 and self.sync_type in ("f64", "f32") and \
            self.MPI.Query_thread() == self.MPI.THREAD_MULTIPLE

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------ accounting

    def _count(self, kind: str, t0: float, sent: int, received: int):
        c = self.counters
        c.seconds += time.perf_counter() - t0
        c.sent += sent
        c.received += received
        c.calls[kind] = c.calls.get(kind, 0) + 1

    # ------------------------------------------------------------ the model's one collective

    def allreduce_sum(self, partial: np.ndarray) -> np.ndarray:
        """Sum (T, dim) float64 partial results over ranks; every rank gets the float32 total.

        f64 (default) sums the float64 partials, so the rounded total is the same at every
        rank count; f32, bf16 and q80 send 2x, 4x and 7.5x fewer bytes, but rounding each
        rank's partial first makes results depend (slightly) on the rank count."""
        if self.size == 1:
            return partial.astype(np.float32)
        t0 = time.perf_counter()
        if self.sync_type in ("f64", "f32"):
            total, sent, received = _sum_partials(self.comm, self.MPI, partial, self.sync_type, self._split(partial))
            self._count("allreduce", t0, sent, received)
            return total
        x = np.ascontiguousarray(partial, dtype=np.float32)
        # Compressed payload: gather every rank's compressed partial and sum in rank order,
        # so the total is bitwise the same on every rank.
        packed = self._compress(x)
        gathered = np.empty((self.size,) + packed.shape, dtype=packed.dtype)
        self.comm.Allgather(packed, gathered)
        self._count("allreduce", t0, packed.nbytes, gathered.nbytes - packed.nbytes)
        total = self._decompress(gathered[0], x.shape)
        for r in range(1, self.size):
            total += self._decompress(gathered[r], x.shape)
        return total

    def start_allreduce_sum(self, partial: np.ndarray, overlap: bool = True):
        """allreduce_sum that returns at once with a pending sum (.wait() gives the total) when
        `overlap` and can_overlap, so the payload travels while the caller computes the next
        micro-batch; otherwise the finished sum. The same arithmetic either way."""
        if not (overlap and self.can_overlap):
            return Finished(self.allreduce_sum(partial))
        if self._courier is None:
            self._courier = _Courier(self.comm, self.MPI, self.sync_type)
        return self._courier.start(PendingSum(self, np.ascontiguousarray(partial), self._split(partial)))

    def _split(self, partial: np.ndarray) -> bool:
        """Whether this sum goes by _split_sum (see SPLIT_MIN_BYTES)."""
        if self.sync_type != "f64" or partial.size * 8 < SPLIT_MIN_BYTES:
            return False
        if self.split_sums is None:
            self.split_sums = self.ranks_on_host() < self.size
        return self.split_sums

    def _compress(self, x: np.ndarray) -> np.ndarray:
        if self.sync_type == "bf16":
            return _to_bf16(x)
        from . import _kernels as K
        return K.quantize_q80(x) if x.shape[-1] % K.QK == 0 else x

    def _decompress(self, packed: np.ndarray, shape) -> np.ndarray:
        if self.sync_type == "bf16":
            return _from_bf16(packed).reshape(shape)
        if packed.dtype == np.float32:
            return packed.copy()
        from . import _kernels as K
        return K.dequantize_q80(np.ascontiguousarray(packed)).reshape(shape)

    # ------------------------------------------------------------ control and sampling

    def bcast_ints(self, values: Optional[np.ndarray], n: int) -> np.ndarray:
        """Root's n int32 values to every rank (token ids, control words)."""
        buf = np.ascontiguousarray(values, dtype=np.int32) if self.is_root else np.empty(n, dtype=np.int32)
        if self.size > 1:
            t0 = time.perf_counter()
            self.comm.Bcast(buf, root=0)
            self._count("bcast", t0, buf.nbytes if self.is_root else 0, 0 if self.is_root else buf.nbytes)
        return buf

    def bcast_object(self, obj: Any) -> Any:
        """A small Python object from root (a prompt's ids, a request); pickled."""
        if self.size == 1:
            return obj
        t0 = time.perf_counter()
        obj = self.comm.bcast(obj, root=0)
        self._count("bcast", t0, 0, 0)
        return obj

    def gather_candidates(self, values: np.ndarray, ids: np.ndarray, extra: np.ndarray):
        """Each rank's top candidates (n values, n global ids, a few float64 extras) to root.

        Returns (values (K*n,), ids (K*n,), extras (K, m)) on root, None elsewhere."""
        n = len(values)
        if self.size == 1:
            return values, ids, extra[None, :]
        send = np.concatenate([values.astype(np.float64), ids.astype(np.float64), extra.astype(np.float64)])
        recv = np.empty((self.size, send.size), dtype=np.float64) if self.is_root else None
        t0 = time.perf_counter()
        self.comm.Gather(send, recv, root=0)
        self._count("gather", t0, send.nbytes, recv.nbytes - send.nbytes if self.is_root else 0)
        if not self.is_root:
            return None
        return (recv[:, :n].reshape(-1).astype(np.float32), recv[:, n:2 * n].reshape(-1).astype(np.int64),
                recv[:, 2 * n:])

    def gather_vocab(self, local: np.ndarray, counts: List[int], root_only: bool) -> Optional[np.ndarray]:
        """Concatenate each rank's (T, V_r) logits into (T, V): on root, or on every rank."""
        if self.size == 1:
            return local
        T = local.shape[0]
        local_t = np.ascontiguousarray(local.T, dtype=np.float32)   # (V_r, T): vocab-major rows concatenate
        sizes = [c * T for c in counts]
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist()
        full = np.empty(sum(sizes), dtype=np.float32) if (self.is_root or not root_only) else None
        t0 = time.perf_counter()
        if root_only:
            self.comm.Gatherv(local_t, [full, sizes, offsets, self.MPI.FLOAT] if self.is_root else None, root=0)
        else:
            self.comm.Allgatherv(local_t, [full, sizes, offsets, self.MPI.FLOAT])
        got = (full.nbytes - local_t.nbytes) if full is not None else 0
        self._count("gather_vocab", t0, local_t.nbytes, got)
        return None if full is None else full.reshape(-1, T).T.copy()

    # ------------------------------------------------------------ job-level helpers

    def host_comm(self):
        """The ranks that share this rank's host (memory and cores are per host)."""
        if self._host_comm is None:
            self._host_comm = self.comm.Split_type(self.MPI.COMM_TYPE_SHARED, key=self.rank)
        return self._host_comm

    def ranks_on_host(self) -> int:
        return self.host_comm().Get_size() if self.size > 1 else 1

    def hostname(self) -> str:
        return socket.gethostname()

    def allgather_object(self, obj: Any) -> List[Any]:
        """Every rank's small Python object, on every rank, in rank order."""
        if self.size == 1:
            return [obj]
        t0 = time.perf_counter()
        everyone = self.comm.allgather(obj)
        self._count("allgather", t0, 0, 0)
        return everyone

    def gather_object(self, obj: Any) -> Optional[List[Any]]:
        """Every rank's small Python object on root, in rank order (None elsewhere)."""
        if self.size == 1:
            return [obj]
        t0 = time.perf_counter()
        everyone = self.comm.gather(obj, root=0)
        self._count("gather", t0, 0, 0)
        return everyone

    # ------------------------------------------------------------ one rank to another (weights for a node without the file)

    WEIGHTS_TAG = 11

    def send_object(self, obj: Any, dest: int) -> None:
        t0 = time.perf_counter()
        self.comm.send(obj, dest=dest, tag=self.WEIGHTS_TAG)
        self._count("send", t0, 0, 0)

    def recv_object(self, source: int) -> Any:
        t0 = time.perf_counter()
        obj = self.comm.recv(source=source, tag=self.WEIGHTS_TAG)
        self._count("recv", t0, 0, 0)
        return obj

    def send_bytes(self, data: np.ndarray, dest: int) -> None:
        """A contiguous uint8 array to one rank (the receiver knows its size)."""
        t0 = time.perf_counter()
        self.comm.Send([data, self.MPI.BYTE], dest=dest, tag=self.WEIGHTS_TAG)
        self.counters.weight_bytes_sent += data.nbytes
        self._count("send", t0, data.nbytes, 0)

    def recv_bytes(self, out: np.ndarray, source: int) -> None:
        t0 = time.perf_counter()
        self.comm.Recv([out, self.MPI.BYTE], source=source, tag=self.WEIGHTS_TAG)
        self.counters.weight_bytes_received += out.nbytes
        self._count("recv", t0, 0, out.nbytes)

    def ibarrier(self):
        """A non-blocking barrier (followers poll it while they sleep between commands)."""
        t0 = time.perf_counter()
        request = self.comm.Ibarrier()
        self._count("ibarrier", t0, 0, 0)
        return request

    def on_host_leader(self, fn: Callable[[], Any]) -> Any:
        """Run fn on one rank per host (the others wait); every rank of that host gets its result,
        or every rank of the job raises a host's error (a download into a host's shared cache)."""
        if self.size == 1:
            return fn()
        host = self.host_comm()
        outcome = _attempt(fn) if host.Get_rank() == 0 else None
        t0 = time.perf_counter()
        result, error = host.bcast(outcome[:2] if outcome else None, root=0)
        self._count("bcast", t0, 0, 0)
        self.agree(error, outcome[2] if outcome else None)   # a failure on one host stops every host
        return result

    def from_root(self, fn: Callable[[], Any]) -> Any:
        """Run fn on root only; every rank gets its result, or raises its error (any class)."""
        outcome = _attempt(fn) if self.is_root else None
        result, error = self.bcast_object(outcome[:2] if outcome else None)
        if error is not None:
            raise _rebuild(error, cause=outcome[2] if outcome else None)
        return result

    def together(self, fn: Callable[[], Any]) -> Any:
        """Run fn on every rank; if it fails on any, every rank raises the failure (see agree).
        Any exception class counts: a rank that raised alone would leave the others waiting."""
        result, error, cause = _attempt(fn)
        self.agree(error, cause)
        return result

    def checked_together(self, check: Callable[[], Any]) -> Any:
        """Collective, as `together` for a call's argument checks: a rank whose own check fails
        raises its own TpllamaError as it is (a ParameterError keeps its parameter, for the command
        line's flag wording, which `together`'s rebuilt error loses); a rank whose check passed
        raises the first failing rank's message, naming that rank. So no rank goes on alone."""
        try:
            result, mine = check(), None
        except TpllamaError as e:
            e.collective = True
            result, mine = None, e
        errors = self.allgather_object(None if mine is None else str(mine))
        if mine is not None:
            raise mine
        failed = next((r for r, e in enumerate(errors) if e is not None), None)
        if failed is not None:
            raise TpllamaError(f"rank {failed}: {errors[failed]}", collective=True)
        return result

    def everyones(self, fn: Callable[[], Any]) -> List[Any]:
        """fn() of every rank, on every rank in rank order; if it fails on any, every rank raises."""
        result, error, cause = _attempt(fn)
        return self.allgather_checked(result, error, cause)

    def agree(self, error=None, cause: Optional[BaseException] = None) -> None:
        """Collective check: if any rank has an error, every rank raises it (see allgather_checked)."""
        self.allgather_checked(None, error, cause)

    def allgather_checked(self, value: Any, error=None, cause: Optional[BaseException] = None) -> List[Any]:
        """Every rank's value on every rank, unless a rank has an error: then every rank raises it.

        error: None, a message, a (class, message) pair or an exception. Every rank raises the same
        class (marked collective): root's error if it failed, else the lowest failing rank's,
        prefixed with that rank and host when the ranks disagree. So a bad path on one node stops
        the whole job with one message, and a library caller sees the same exception everywhere."""
        mine = _describe(error) if error is not None else None
        everyone = self.allgather_object((value, mine, self.hostname()))
        errors = [e for _, e, _ in everyone]
        for r, e in enumerate(errors):
            if e is not None:
                same_everywhere = self.size == 1 or all(x == e for x in errors)
                prefix = "" if same_everywhere else f"rank {r} ({everyone[r][2]}): "
                raise _rebuild((e[0], prefix + e[1]), cause=cause)
        return [v for v, _, _ in everyone]

    def abort(self, code: int = 1):
        """End the whole job now (every rank, on every host)."""
        sys.stdout.flush()
        sys.stderr.flush()
        if self.size > 1:
            self.comm.Abort(code)
        sys.exit(code)


# ------------------------------------------------------------ errors that cross ranks

OUT_OF_MEMORY = "out of memory; lower -c, use more ranks, or --weight-type q40"


class SideChannel:
    """A duplicate of a Parallel's communicator for messages outside the lock-step of its
    collectives: a follower's notice to rank 0, and a meeting that may time out. Collective to
    create; at world size 1 every call is a no-op."""

    TAG = 7

    def __init__(self, par: "Parallel"):
        self.comm = par.comm.Dup() if par.size > 1 else None
        self._sent = None

    def notify_root(self) -> None:
        """A follower: leave rank 0 a notice (once)."""
        if self.comm is not None and self._sent is None:
            self._sent = self.comm.isend(None, dest=0, tag=self.TAG)

    def take_notices(self) -> bool:
        """Rank 0: whether any notice arrived (they are taken)."""
        if self.comm is None:
            return False
        from mpi4py import MPI
        taken = False
        while self.comm.iprobe(source=MPI.ANY_SOURCE, tag=self.TAG):
            self.comm.recv(source=MPI.ANY_SOURCE, tag=self.TAG)
            taken = True
        return taken

    def meet(self, timeout: float, max_sleep: float = 0.02) -> bool:
        """A barrier that gives up after `timeout` seconds (False: some rank never came)."""
        if self.comm is None:
            return True
        request, deadline, sleep = self.comm.Ibarrier(), time.monotonic() + timeout, 0.0005
        while not request.Test():
            if time.monotonic() > deadline:
                return False
            time.sleep(sleep)
            sleep = min(2 * sleep, max_sleep)
        return True

    def allgather_object(self, obj: Any) -> List[Any]:
        return [obj] if self.comm is None else self.comm.allgather(obj)


def world_size(comm=None) -> int:
    """Ranks in `comm` (default MPI.COMM_WORLD), before any Parallel is made."""
    if comm is None:
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
    return comm.Get_size()


def _attempt(fn: Callable[[], Any]):
    """(result, None, None), or (None, shareable error, the exception) if fn raised."""
    try:
        return fn(), None, None
    except Exception as e:   # any class: the other ranks must hear of it, or they wait forever
        return None, _describe(e), e


def _describe(error) -> Tuple[type, str]:
    """(class, message) of an error, in a form every rank can unpickle and rebuild."""
    if isinstance(error, tuple):
        return error
    if isinstance(error, str):
        return TpllamaError, error
    if isinstance(error, MemoryError):
        return TpllamaError, OUT_OF_MEMORY
    cls = type(error)
    args = error.args
    message = args[0] if len(args) == 1 and isinstance(args[0], str) else str(error)   # KeyError's str() quotes
    if _importable(cls):
        return cls, message
    return TpllamaError, message if isinstance(error, TpllamaError) else f"{cls.__name__}: {message}"


def _importable(cls: type) -> bool:
    """Whether another process can unpickle the class by name (not a local or __main__ class)."""
    module = sys.modules.get(cls.__module__)
    return cls.__module__ != "__main__" and getattr(module, cls.__qualname__, None) is cls


def _rebuild(error: Tuple[type, str], cause: Optional[BaseException] = None) -> BaseException:
    """The exception every rank raises for an agreed error, marked collective; this rank's own
    exception (if it is where the error began) stays attached as the cause for tracebacks."""
    cls, message = error
    try:
        exc = cls(message, collective=True) if issubclass(cls, TpllamaError) else cls(message)
        exc.collective = True
    except Exception:   # a class that needs other arguments: keep its name in the message
        exc = TpllamaError(f"{cls.__name__}: {message}", collective=True)
    exc.__cause__ = cause
    return exc

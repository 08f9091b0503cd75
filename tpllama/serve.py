"""An OpenAI-compatible HTTP API server, on one rank or across an MPI job.

    python -m tpllama.serve                                          # default model, 127.0.0.1:8080
    mpirun -n 2 python -m tpllama.serve -m model.gguf --host 127.0.0.1 --port 8080

Rank 0 serves HTTP (stdlib ThreadingHTTPServer: one thread per connection). A handler thread
checks and tokenizes its request (tpllama.api) and queues it. Rank 0's main thread runs a
continuous batch (tpllama.batching.Batch, up to --parallel sequences): before each step it sends
the other ranks the requests that arrived and the ones whose clients went away (tpllama.follow),
then every rank runs the same step, one forward pass for every running sequence; the text goes
back to each waiting handler piece by piece. A client that goes away frees its slot at the next
step. A failure inside a step ends the requests of that step with an error (an error event when
streaming) and the server goes on, unless the ranks are out of step (follow.Outcomes), which
ends the job. GET /metrics reports the load in Prometheus' text format.

SIGTERM or SIGINT to rank 0, to any other rank or to mpirun (which sends SIGTERM to every rank
and SIGKILL about 0.2 s later) shuts down cleanly: the answers being streamed end with an error
event, queued requests get 503, and every rank exits. Rank 0 tells its clients from a thread
woken by the signal itself (its main thread may be inside a collective); a follower passes the
signal on to rank 0 (follow.StopNotice) and keeps following until rank 0 says stop.
"""
from __future__ import annotations

import hmac
import json
import os
import queue
import select
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, Iterator, List, Optional, Tuple
from urllib.parse import unquote, urlsplit

from . import cli
from .api import (ApiError, ApiRequest, Defaults, RequestReader, completion_response, error_body, model_object,
                  new_id, now, parse_body, stream_chunk, usage, usage_chunk)
from .batching import Batch, Request
from .follow import STEP, STOP, Command, Outcomes, StopNotice, describe_failure, exchange

DEFAULT_MAX_BODY = 4 << 20
DRAIN_LIMIT = 64 << 20       # an over-long body up to this size is read and dropped so that the 400 arrives
CLIENT_POLL = 0.1            # seconds between checks that a waiting client is still connected
DELIVERY_GRACE = 2.0         # seconds given at shutdown to handlers telling their clients
ALIAS = "tpllama"


class ClientGone(Exception):
    """The client closed its connection."""


# ------------------------------------------------------------------ jobs


@dataclass
class Event:
    """What the generation loop hands a waiting handler: text, the end, or a failure."""
    kind: str                       # "text" | "done" | "error"
    text: str = ""
    finish_reason: str = ""
    counts: Optional[dict] = None
    status: int = 500


class Job:
    """One accepted request on its way through the queue and the batch."""

    def __init__(self, request: ApiRequest):
        self.request = request
        self.t0 = time.perf_counter()
        self.events: "queue.Queue[Event]" = queue.Queue()
        self.cancelled = threading.Event()   # set by the handler: its client is gone
        self.delivered = threading.Event()   # set by the handler: it has answered (or given up)

    def fail(self, status: int, message: str):
        self.events.put(Event("error", text=message, status=status))


# ------------------------------------------------------------------ rank 0


class Metrics:
    """The server's counters for GET /metrics (written by the main thread, read by handlers)."""

    def __init__(self, slots: int):
        self.lock = threading.Lock()
        self.slots = slots
        self.requests = {"finished": 0, "cancelled": 0, "failed": 0}
        self.prompt_tokens = self.generated_tokens = self.cached_tokens = 0
        self.steps = self.step_rows = self.step_sequences = 0
        self.step_seconds = 0.0
        self.last_batch = 0

    def step(self, report) -> None:
        with self.lock:
            self.steps += 1
            self.step_rows += report.rows
            self.step_sequences += report.sequences
            self.step_seconds += report.seconds
            self.last_batch = report.sequences

    def ended(self, outcome: str, prompt: int = 0, generated: int = 0, cached: int = 0) -> None:
        with self.lock:
            self.requests[outcome] += 1
            self.prompt_tokens += prompt - cached
            self.cached_tokens += cached
            self.generated_tokens += generated

    def text(self, queued: int, running: int) -> str:
        """Prometheus' text exposition format (version 0.0.4)."""
        with self.lock:
            rows = [
                ("tpllama_requests_total", "counter", "requests ended, by outcome",
                 [(f'{{outcome="{k}"}}', v) for k, v in self.requests.items()]),
                ("tpllama_prompt_tokens_total", "counter", "prompt tokens read (not counting cached ones)",
                 [("", self.prompt_tokens)]),
                ("tpllama_cached_prompt_tokens_total", "counter", "prompt tokens found in a slot's cache",
                 [("", self.cached_tokens)]),
                ("tpllama_generated_tokens_total", "counter", "tokens generated", [("", self.generated_tokens)]),
                ("tpllama_queue_length", "gauge", "requests waiting for a slot", [("", queued)]),
                ("tpllama_batch_size", "gauge", "sequences running (prefilling or decoding)", [("", running)]),
                ("tpllama_slots", "gauge", "sequences that can run at once (--parallel)", [("", self.slots)]),
                ("tpllama_last_step_batch_size", "gauge", "sequences in the last step", [("", self.last_batch)]),
                ("tpllama_step_seconds", "summary", "time of a batch step (forward pass and sampling)",
                 [("_sum", round(self.step_seconds, 6)), ("_count", self.steps)]),
                ("tpllama_step_sequences_total", "counter", "sequences summed over steps (/ steps: mean batch size)",
                 [("", self.step_sequences)]),
                ("tpllama_step_rows_total", "counter", "forward-pass rows summed over steps (tokens decoded and "
                 "prompt tokens read)", [("", self.step_rows)]),
            ]
        lines = []
        for name, kind, help_text, samples in rows:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
            lines += [f"{name}{suffix} {value}" for suffix, value in samples]   # suffix: labels, _sum, _count
        return "\n".join(lines) + "\n"


class Server:
    """Rank 0: HTTP in threads; the batch on the main thread, up to model.slots requests at once."""

    def __init__(self, model, reader: RequestReader, api_key: Optional[str], max_body: int):
        self.model = model
        self.reader = reader
        self.api_key = api_key
        self.max_body = max_body
        self.created = now()
        self.jobs: "queue.Queue[Job]" = queue.Queue()
        self.stopping = threading.Event()
        self.httpd: Optional[ApiHttpServer] = None
        self.notice = None                   # follow.StopNotice: followers asking to shut down
        self.outcomes = None                 # follow.Outcomes: how a failed step ended on every rank
        self.batch: Optional[Batch] = None   # made by run(), as every rank makes its own
        self.metrics = Metrics(model.slots)
        self._failed: list = []              # jobs failed at shutdown: their clients are being told
        self._active: Dict[int, Job] = {}    # the batch's sequences (waiting or running) by id
        self._signals = 0
        self._shutdown_lock = threading.Lock()

    def listen(self, host: str, port: int) -> None:
        try:
            self.httpd = ApiHttpServer((host, port), self)
        except OSError as e:
            raise cli.TpllamaError(f"cannot listen on {host}:{port}: {e.strerror or e}; pick another --port or --host")
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="http",
                         daemon=True).start()
        host, port = self.httpd.server_address[:2]
        self.log(f"listening on http://{host}:{port} (model {self.reader.model_name}, "
                 f"{self.model.par.size} rank(s), context {self.model.ctx}, {self.model.slots} at once; "
                 f"rank 0 is pid {os.getpid()})")

    def submit(self, request: ApiRequest) -> Job:
        if self.stopping.is_set():
            raise ApiError(503, "the server is shutting down", type="server_error")
        job = Job(request)
        self.jobs.put(job)
        return job

    def queued(self) -> int:
        """Requests waiting for a slot."""
        batch = self.batch
        return self.jobs.qsize() + (len(batch.waiting) if batch is not None else 0)

    def running(self) -> int:
        batch = self.batch
        return len(batch.running) if batch is not None else 0

    def run(self) -> None:
        """The batch loop, until SIGINT or SIGTERM; then every rank is told to stop."""
        self.batch = Batch(self.model)
        while not self.stopping.is_set():
            arrived = self._take_arrivals(wait=self.batch.idle)
            gone = [seq_id for seq_id, job in self._active.items() if job.cancelled.is_set()]
            if not arrived and not gone and self.batch.idle:
                continue
            command = Command(STEP, calls=[job.request.call for job in arrived], cancel=gone)
            exchange(self.model.par, command)
            try:
                ids, updates, records = batch_step(self.batch, command)
            except Exception as e:   # judged with the other ranks: only ranks out of step end the job
                self._step_failed(e, arrived)
                continue
            self._active.update(zip(ids, arrived))
            self.metrics.step(self.batch.last)
            self._deliver(updates, records)
        self._close()

    def _take_arrivals(self, wait: bool) -> list:
        """The queued jobs whose clients are still there (waiting up to 0.2 s for one when idle)."""
        jobs = []
        try:
            if wait:
                jobs.append(self.jobs.get(timeout=0.2))
            while True:
                jobs.append(self.jobs.get_nowait())
        except queue.Empty:
            pass
        self._check_notice()
        return [job for job in jobs if not job.cancelled.is_set()]   # a client that left while it waited

    def _deliver(self, updates, records) -> None:
        for update in updates:
            job = self._active.get(update.seq_id)
            if job is None:
                continue
            if update.text:
                job.events.put(Event("text", text=update.text))
            if update.finish_reason is not None:
                del self._active[update.seq_id]
                self._finished(job, records[update.seq_id])

    def _finished(self, job: Job, seq) -> None:
        prompt, generated, reason = len(seq.request.prompt_ids), len(seq.tokens), seq.reason
        self.log(f"{'chat' if job.request.chat else 'completion'}: prompt {prompt} tokens ({seq.reused} from cache), "
                 f"{generated} generated in {time.perf_counter() - job.t0:.2f} s, {reason}")
        self.metrics.ended("cancelled" if reason == "cancelled" else "finished", prompt, generated, seq.reused)
        if reason != "cancelled":     # cancelled: its client has gone
            job.events.put(Event("done", finish_reason=reason, counts=usage(prompt, generated, seq.reused)))

    def _step_failed(self, error: Exception, arrived: list) -> None:
        """Every request of the batch fails (the ranks dropped them); the server goes on."""
        failure = self.outcomes.agree(error) if self.outcomes else describe_failure(error)
        self.log(f"generation failed: {failure}")
        for job in list(self._active.values()) + arrived:
            job.fail(500, failure)
            self.metrics.ended("failed")
        self._active.clear()

    def _check_notice(self) -> bool:
        if self.notice is not None and self.notice.arrived():
            self.log("a rank was asked to stop")
            self.begin_shutdown()
        return self.stopping.is_set()

    def begin_shutdown(self) -> None:
        """Refuse new requests, fail the queued ones (503) and the ones being answered (an error
        event); the main thread then ends the ranks after its current step."""
        with self._shutdown_lock:
            if self.stopping.is_set():
                return
            self.stopping.set()
        for job in list(self._active.values()):
            job.fail(503, "the server is shutting down")
            self._failed.append(job)
        self._fail_queued()

    def _fail_queued(self) -> None:
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                return
            job.fail(503, "the server is shutting down")
            self._failed.append(job)

    def _close(self) -> None:
        self.log("shutting down")
        for job in list(self._active.values()):   # joined the batch after begin_shutdown looked
            if job not in self._failed:
                job.fail(503, "the server is shutting down")
                self._failed.append(job)
        if self.httpd is not None:
            self.httpd.shutdown()
        self._fail_queued()
        exchange(self.model.par, Command(STOP))
        deadline = time.monotonic() + DELIVERY_GRACE
        for job in self._failed:
            job.delivered.wait(max(0.0, deadline - time.monotonic()))
        if self.httpd is not None:
            self.httpd.server_close()

    def install_signals(self) -> None:
        def stop(signum, frame):
            self._signals += 1
            if self._signals > 1:   # a second signal: do not wait any longer
                raise KeyboardInterrupt
            self.begin_shutdown()
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        # The handler above runs only when the main thread is back in Python, which a collective
        # can delay past mpirun's SIGKILL: the wakeup fd wakes a thread at once.
        wake, woken = socket.socketpair()
        wake.setblocking(False)
        signal.set_wakeup_fd(wake.fileno(), warn_on_full_buffer=False)
        threading.Thread(target=self._on_wakeup, args=(woken, wake), name="signals", daemon=True).start()

    def _on_wakeup(self, woken: socket.socket, wake: socket.socket) -> None:
        while woken.recv(64):   # wake is kept referenced here so that its fd stays open
            self.begin_shutdown()

    @staticmethod
    def log(message: str) -> None:
        print(f"tpllama.serve: {message}", file=sys.stderr, flush=True)


def batch_step(batch: Batch, command: Command) -> Tuple[List[int], list, dict]:
    """Collective, on every rank alike: the command's requests join the batch, its cancelled
    sequences end, one step runs. (ids of the new sequences, the step's updates, the records of
    the sequences that ended, by id)."""
    ids = [batch.add(Request(c.prompt_ids, c.max_new_tokens, c.sampling, tuple(c.stop))) for c in command.calls]
    updates = [u for u in (batch.cancel(i) for i in command.cancel) if u is not None]
    updates += batch.step()
    records = {u.seq_id: batch.take(u.seq_id) for u in updates if u.finish_reason is not None}
    return ids, updates, records


def follow_batch(model, outcomes: Outcomes) -> None:
    """What every rank but 0 does: rank 0's steps, until it says stop. A step that fails on
    every rank (rank 0 fails its requests) is survived; follow.Outcomes ends a job out of step."""
    batch = Batch(model)
    while True:
        command = exchange(model.par)
        if command.kind == STOP:
            return
        try:
            batch_step(batch, command)
        except Exception as e:   # judged with the other ranks
            outcomes.agree(e)


class ApiHttpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, app: Server):
        self.app = app
        super().__init__(address, ApiHandler)


# ------------------------------------------------------------------ HTTP


class ApiHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"      # keep-alive for clients that reuse connections (the openai package)
    server_version = "tpllama"
    timeout = 120                       # seconds a silent client may hold a connection and its thread

    ROUTES = {
        "/health": ("GET", "_health"),
        "/metrics": ("GET", "_metrics"),
        "/v1/models": ("GET", "_models"),
        "/v1/chat/completions": ("POST", "_chat"),
        "/v1/completions": ("POST", "_completions"),
    }

    @property
    def app(self) -> Server:
        return self.server.app

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def do_PATCH(self):
        self._dispatch("PATCH")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_OPTIONS(self):
        self._dispatch("OPTIONS")

    def _dispatch(self, method: str) -> None:
        try:
            path = unquote(urlsplit(self.path).path).rstrip("/") or "/"
            if path not in ("/health", "/metrics"):   # before routing: without the key, not even which paths exist is told
                self._check_api_key()
            self._route(method, path)()
        except ApiError as e:
            self._send_error(e)
        except (ClientGone, ConnectionError, socket.timeout):
            self.close_connection = True
        except Exception as e:   # a bug: say so to the client and in the log, and keep serving
            self.app.log(f"internal error: {traceback.format_exc() if os.environ.get('TPLLAMA_DEBUG') else repr(e)}")
            self._send_error(ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"))

    def _route(self, method: str, path: str):
        if path.startswith("/v1/models/"):
            allowed, name = "GET", "_one_model"
        elif path in self.ROUTES:
            allowed, name = self.ROUTES[path]
        else:
            raise ApiError(404, f"no such endpoint: {method} {path}", code="not_found")
        if method != allowed:
            raise ApiError(405, f"{path} takes {allowed}, not {method}", code="method_not_allowed",
                           headers={"Allow": allowed})
        return getattr(self, name)

    def _check_api_key(self) -> None:
        key = self.app.api_key
        if key is None:
            return
        scheme, _, given = self.headers.get("Authorization", "").strip().partition(" ")
        if scheme.lower() != "bearer":   # auth schemes are case-insensitive (RFC 9110)
            raise ApiError(401, "an API key is required: send 'Authorization: Bearer KEY'", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise ApiError(401, "incorrect API key provided", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    # ------------------------------------------------------------ endpoints

    def _health(self) -> None:
        app = self.app
        self._send_json(200, {"status": "ok", "queued": app.queued(), "running": app.running(),
                              "slots": app.model.slots})

    def _metrics(self) -> None:
        data = self.app.metrics.text(self.app.queued(), self.app.running()).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self._send_raw(data)

    def _models(self) -> None:
        self._send_json(200, {"object": "list", "data": [model_object(self.app.reader.model_name, self.app.created)]})

    def _one_model(self) -> None:
        name = unquote(urlsplit(self.path).path).rstrip("/")[len("/v1/models/"):]
        if name not in self.app.reader.names:
            raise ApiError(404, f"The model `{name}` does not exist", "model", "model_not_found")
        self._send_json(200, model_object(name, self.app.created))

    def _chat(self) -> None:
        self._generate(self.app.reader.chat(self._read_json()))

    def _completions(self) -> None:
        self._generate(self.app.reader.completion(self._read_json()))

    def _generate(self, request: ApiRequest) -> None:
        job = self.app.submit(request)
        try:
            if request.stream:
                self._stream_answer(job)
            else:
                self._whole_answer(job)
        except ApiError as e:   # answered here, before the job counts as delivered
            self._send_error(e)
        except (ClientGone, ConnectionError, socket.timeout):
            job.cancelled.set()
            self.close_connection = True
        except BaseException:
            job.cancelled.set()   # nobody will read the answer
            raise
        finally:
            job.delivered.set()

    def _whole_answer(self, job: Job) -> None:
        request, pieces = job.request, []
        for event in self._events(job):
            if event.kind == "text":
                pieces.append(event.text)
            elif event.kind == "done":
                body = completion_response(request, new_id(request.id_prefix), now(), "".join(pieces),
                                           event.finish_reason, event.counts)
                self._send_json(200, body)
            else:
                raise ApiError(event.status, event.text, type="server_error")

    def _stream_answer(self, job: Job) -> None:
        request, response_id, created = job.request, new_id(job.request.id_prefix), now()
        started = False
        for event in self._events(job):
            if not started:
                if event.kind == "error":   # nothing sent yet: a plain HTTP error
                    raise ApiError(event.status, event.text, type="server_error")
                self._start_event_stream()
                started = True
                if request.chat:
                    self._send_event(stream_chunk(request, response_id, created, text="", role=True))
            if event.kind == "text":
                self._send_event(stream_chunk(request, response_id, created, text=event.text))
            elif event.kind == "done":
                self._send_event(stream_chunk(request, response_id, created, finish_reason=event.finish_reason))
                if request.include_usage:
                    self._send_event(usage_chunk(request, response_id, created, event.counts))
                self._send_raw(b"data: [DONE]\n\n")
            else:
                self._send_event(error_body(event.text, type="server_error"))

    def _events(self, job: Job) -> Iterator[Event]:
        """The job's events until its end; a client that goes away meanwhile cancels the job."""
        while True:
            try:
                event = job.events.get(timeout=CLIENT_POLL)
            except queue.Empty:
                event = None
            if self._client_gone():
                raise ClientGone()
            if event is None:
                continue
            yield event
            if event.kind != "text":
                return

    def _client_gone(self) -> bool:
        """True when the client has closed its side (readable, yet nothing to read)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    # ------------------------------------------------------------ reading and writing

    def _read_json(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise ApiError(411, "chunked request bodies are not supported; send Content-Length",
                           code="length_required")
        length = self.headers.get("Content-Length")
        if length is None:
            raise ApiError(411, "a JSON body with Content-Length is required", code="length_required")
        try:
            size = int(length)
            if size < 0:
                raise ValueError
        except ValueError:
            raise ApiError(400, f"bad Content-Length {length!r}") from None
        if size > self.app.max_body:
            if size <= DRAIN_LIMIT:
                self._read_exactly(size)
            raise ApiError(400, f"the request body has {size} bytes; this server takes at most {self.app.max_body} "
                                f"(--max-body)", code="request_too_large")
        return parse_body(self._read_exactly(size))

    def _read_exactly(self, size: int) -> bytes:
        data = self.rfile.read(size)
        if len(data) < size:
            raise ClientGone()
        return data

    def _send_json(self, status: int, body: dict, headers: Optional[dict] = None, close: bool = False) -> None:
        data = json.dumps(body).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self._send_raw(data)

    def _send_error(self, error: ApiError) -> None:
        # close after an error: the body may be unread, and the connection cannot be trusted
        try:
            self._send_json(error.status, error.body(), error.headers, close=True)
        except (ConnectionError, socket.timeout):
            self.close_connection = True

    def _start_event_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")   # the stream's end is the connection's end
        self.close_connection = True
        self.end_headers()

    def _send_event(self, body: dict) -> None:
        self._send_raw(b"data: " + json.dumps(body).encode("utf-8") + b"\n\n")

    def _send_raw(self, data: bytes) -> None:
        try:
            self.wfile.write(data)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError) as e:
            raise ClientGone() from e

    def log_message(self, format, *args):
        self.app.log(f"{self.address_string()} {format % args}")


# ------------------------------------------------------------------ command line


def build_parser():
    p = cli.RankAwareParser(
        prog="python -m tpllama.serve",
        description="Serve a Llama-family model over an OpenAI-compatible HTTP API (GET /v1/models, "
                    "POST /v1/chat/completions, POST /v1/completions, GET /health, GET /metrics), tensor-parallel "
                    "over the ranks of an MPI job. Rank 0 listens; up to --parallel requests are answered at once "
                    "(continuous batching), the others wait in order. "
                    "Sampling flags give the defaults of requests that leave those fields out.",
        epilog="examples:\n"
               "  python -m tpllama.serve\n"
               "  mpirun -n 2 python -m tpllama.serve -m model.gguf --port 8080 --api-key secret\n"
               "  curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\\n"
               "       -d '{\"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}]}'\n",
        formatter_class=cli.argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for every interface)")
    g.add_argument("--port", type=int, default=8080, help="TCP port (default 8080; 0 picks a free one)")
    g.add_argument("--api-key", default=os.environ.get("TPLLAMA_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/ requests (default: $TPLLAMA_API_KEY; "
                        "none: open)")
    g.add_argument("-a", "--alias", action="append", default=[],
                   help=f"another name requests may give as 'model' (the model file's name and '{ALIAS}' always work)")
    g.add_argument("--parallel", "-np", type=int, default=None, metavar="N",
                   help="requests answered at once, each with a KV cache slot of the full context (default: as "
                        "many as the memory plan allows, at most 8)")
    g.add_argument("--max-body", type=int, default=DEFAULT_MAX_BODY,
                   help=f"largest request body in bytes (default {DEFAULT_MAX_BODY})")
    cli.add_model_args(p)
    cli.add_sampling_args(p, n_default=-1)
    for action in p._actions:
        if action.dest == "n_predict":
            action.help = ("max_tokens of requests that give none; -1: until a stop token or the end of the "
                           "context (default -1)")
    return p


def check_args(args) -> None:
    if args.n_predict == 0 or args.n_predict < -1:
        raise cli.TpllamaError(f"-n {args.n_predict}: expected a positive number of tokens, or -1", collective=True)
    if not 0 <= args.port <= 65535:
        raise cli.TpllamaError(f"--port {args.port}: expected 0..65535", collective=True)
    if args.parallel is not None and args.parallel < 1:
        raise cli.TpllamaError(f"--parallel {args.parallel}: expected a number of requests >= 1, or leave it out "
                               "for as many as fit in memory", collective=True)
    if args.max_body < 1:
        raise cli.TpllamaError(f"--max-body {args.max_body}: expected a positive number of bytes", collective=True)
    cli.sampling_params(args)   # a value it refuses ends the job, named by its flag


def model_name(model) -> str:
    return os.path.basename(os.path.normpath(model.reader.path))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    import tpllama
    model = tpllama.load(args.model, parallel=args.parallel, **cli.load_options(args))
    par = model.par
    server = None
    if par.is_root:
        defaults = Defaults(sampling=cli.sampling_params(args), max_tokens=args.n_predict)
        reader = RequestReader(model.tokenizer, model.ctx, model_name(model), [ALIAS, *args.alias], defaults,
                               model.config.vocab_size)
        server = Server(model, reader, args.api_key or None, args.max_body)
    par.together(lambda: server.listen(args.host, args.port) if server else None)
    notice, outcomes = StopNotice(par), Outcomes(par)
    if server:
        server.notice, server.outcomes = notice, outcomes
        server.install_signals()
        server.run()
    else:
        notice.install_follower_signals()
        follow_batch(model, outcomes)
    return 0


if __name__ == "__main__":
    cli.run(main)

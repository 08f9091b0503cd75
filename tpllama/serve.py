"""An OpenAI-compatible HTTP API server, on one rank or across an MPI job.

    python -m tpllama.serve                                          # default model, 127.0.0.1:8080
    mpirun -n 2 python -m tpllama.serve -m model.gguf --host 127.0.0.1 --port 8080

Rank 0 serves HTTP (stdlib ThreadingHTTPServer: one thread per connection). A handler thread
checks and tokenizes its request (tpllama.api) and queues it; rank 0's main thread takes the
queue in order, sends each request's generation call to the other ranks (tpllama.follow) and
runs it with them, handing the text back to the waiting handler piece by piece. A client that
goes away cancels its generation at the next token. A failure inside a generation ends that
request with an error (an error event when streaming) and the server goes on, unless the ranks
are out of step (follow.Outcomes), which ends the job.

SIGTERM or SIGINT to rank 0, to any other rank or to mpirun (which sends SIGTERM to every rank
and SIGKILL about 0.2 s later) shuts down cleanly: the answer being streamed ends with an error
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
from typing import Iterator, Optional
from urllib.parse import unquote, urlsplit

from . import cli
from .api import (ApiError, ApiRequest, Defaults, RequestReader, completion_response, error_body, model_object,
                  new_id, now, parse_body, stream_chunk, usage, usage_chunk)
from .follow import GENERATE, STOP, Command, Outcomes, StopNotice, describe_failure, exchange, follow

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
    """One accepted request on its way through the queue."""

    def __init__(self, request: ApiRequest):
        self.request = request
        self.events: "queue.Queue[Event]" = queue.Queue()
        self.cancelled = threading.Event()   # set by the handler: its client is gone
        self.delivered = threading.Event()   # set by the handler: it has answered (or given up)

    def fail(self, status: int, message: str):
        self.events.put(Event("error", text=message, status=status))


# ------------------------------------------------------------------ rank 0


class Server:
    """Rank 0: HTTP in threads, generation on the main thread, one request at a time in order."""

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
        self.outcomes = None                 # follow.Outcomes: how each generation ended on every rank
        self._failed: list = []              # jobs failed at shutdown: their clients are being told
        self._running: Optional[Job] = None  # the job being generated
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
                 f"{self.model.par.size} rank(s), context {self.model.ctx}; rank 0 is pid {os.getpid()})")

    def submit(self, request: ApiRequest) -> Job:
        if self.stopping.is_set():
            raise ApiError(503, "the server is shutting down", type="server_error")
        job = Job(request)
        self.jobs.put(job)
        return job

    def queued(self) -> int:
        return self.jobs.qsize()

    def run(self) -> None:
        """The generation loop, until SIGINT or SIGTERM; then every rank is told to stop."""
        while not self.stopping.is_set():
            try:
                job = self.jobs.get(timeout=0.2)
            except queue.Empty:
                self._check_notice()
                continue
            if not job.cancelled.is_set():   # its client left while it waited: skip it
                self._running = job
                self._run_job(job)
                self._running = None
        self._close()

    def _check_notice(self) -> bool:
        if self.notice is not None and self.notice.arrived():
            self.log("a rank was asked to stop")
            self.begin_shutdown()
        return self.stopping.is_set()

    def begin_shutdown(self) -> None:
        """Refuse new requests, fail the queued ones (503) and the one being answered (an error
        event); the main thread then stops the generation at its next token and ends the ranks."""
        with self._shutdown_lock:
            if self.stopping.is_set():
                return
            self.stopping.set()
        running = self._running
        if running is not None:
            running.fail(503, "the server is shutting down")
            self._failed.append(running)
        self._fail_queued()

    def _fail_queued(self) -> None:
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                return
            job.fail(503, "the server is shutting down")
            self._failed.append(job)

    def _run_job(self, job: Job) -> None:
        from .stats import RunStats
        call, stats, t0 = job.request.call, RunStats(), time.perf_counter()

        def stop_now() -> bool:   # checked on rank 0 before each token
            return job.cancelled.is_set() or self._check_notice()

        exchange(self.model.par, Command(GENERATE, call))
        error = None
        try:
            for piece in self.model.stream(**call.kwargs(), stats=stats, cancel=stop_now):
                job.events.put(Event("text", text=piece))
        except Exception as e:   # judged with the other ranks: only ranks out of step end the job
            error = e
            job.fail(500, describe_failure(e))   # told at once: if the ranks are out of step, the job ends next
        failure = self.outcomes.agree(error) if self.outcomes else describe_failure(error)
        if failure:
            self.log(f"generation failed: {failure}")
            job.fail(500, failure)   # a follower's failure (the client reads only the first error)
            return
        reason = self.model.last_finish_reason
        self.log(f"{'chat' if job.request.chat else 'completion'}: prompt {stats.prompt_tokens} tokens "
                 f"({stats.cached_tokens} from cache), {stats.generated_tokens} generated in "
                 f"{time.perf_counter() - t0:.2f} s, {reason}")
        if reason == "cancelled":   # by its client, or by the shutdown (told again here: it may have come
            if not job.cancelled.is_set():   # between taking the job and marking it running)
                job.fail(503, "the server is shutting down")
                self._failed.append(job)
            return
        counts = usage(stats.prompt_tokens, stats.generated_tokens, stats.cached_tokens)
        job.events.put(Event("done", finish_reason=reason, counts=counts))

    def _close(self) -> None:
        self.log("shutting down")
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
            if path != "/health":   # before routing: without the key, not even which paths exist is told
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
        self._send_json(200, {"status": "ok", "queued": self.app.queued()})

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
                    "POST /v1/chat/completions, POST /v1/completions, GET /health), tensor-parallel over the "
                    "ranks of an MPI job. Rank 0 listens; requests are answered one at a time, in order. "
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
    if args.max_body < 1:
        raise cli.TpllamaError(f"--max-body {args.max_body}: expected a positive number of bytes", collective=True)
    cli.sampling_params(args)   # a value it refuses ends the job, named by its flag


def model_name(model) -> str:
    return os.path.basename(os.path.normpath(model.reader.path))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    import tpllama
    model = tpllama.load(args.model, **cli.load_options(args))
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
        follow(model, outcomes)
    return 0


if __name__ == "__main__":
    cli.run(main)

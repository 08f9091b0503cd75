"""The OpenAI-compatible API's requests and responses, apart from HTTP and MPI (see tpllama.serve).

`RequestReader` checks a decoded JSON body field by field and turns it into the one collective
generation call the ranks will make (`StreamCall`): the prompt is rendered and tokenized here,
on rank 0, so that every bad request is answered before it can reach the other ranks. Limits
keep one request from stalling the others (stop strings, messages; the body size is the HTTP
layer's), and message contents are tokenized as plain text, so that only the chat template's own
markup becomes special tokens. The `*_response` and `*_chunk` functions build the JSON objects
OpenAI's clients expect.
"""
from __future__ import annotations

import json
import time
import uuid
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .errors import TpllamaError
from .follow import StreamCall
from .sampler import SamplingParams, settings

CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOP_STRINGS = 4          # as OpenAI: the stop check runs over every stop string at every token
MAX_STOP_CHARS = 256
MAX_MESSAGES = 2048           # as OpenAI
OPENAI_MAXIMA = {"temperature": 2.0}   # OpenAI's own bounds, tighter than the library's


class ApiError(Exception):
    """A request the server refuses: HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type: str = "invalid_request_error", headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.param, self.code, self.type)


def error_body(message: str, param: Optional[str] = None, code: Optional[str] = None,
               type: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass
class Defaults:
    """What a request gets for the fields it leaves out (the server's command-line flags)."""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = -1          # -1: until a stop token or the end of the context


@dataclass
class ApiRequest:
    """One accepted request: how to answer it (chat or text, streamed or not) and the call to make."""
    chat: bool
    model: str
    call: StreamCall
    stream: bool = False
    include_usage: bool = False   # stream_options.include_usage: a last chunk with the token counts

    @property
    def id_prefix(self) -> str:
        return "chatcmpl" if self.chat else "cmpl"


class RequestReader:
    """Turns request bodies into `ApiRequest`s, or raises ApiError (rank 0, HTTP handler threads)."""

    def __init__(self, tokenizer, ctx: int, model_name: str, aliases: Sequence[str] = (),
                 defaults: Optional[Defaults] = None, vocab_size: Optional[int] = None):
        self.tokenizer = tokenizer
        self.vocab_size = min(tokenizer.vocab_size, vocab_size or tokenizer.vocab_size)   # the model's may be smaller
        self.ctx = ctx
        self.model_name = model_name
        self.names = {model_name, *aliases}
        self.defaults = defaults or Defaults()

    # ------------------------------------------------------------ the two endpoints

    def chat(self, payload: Any) -> ApiRequest:
        body = _object(payload)
        model = self._model(body)
        messages = _messages(body)
        try:   # the template renders in a sandbox with limits (tpllama.tokenizer.templates); the tokenizer is thread-safe
            ids = self.tokenizer.encode_chat(messages, add_generation_prompt=True)
        except TpllamaError as e:
            raise ApiError(400, f"the messages do not fit the model's chat template: {e}", "messages") from None
        return self._request(body, model, ids, "messages", chat=True)

    def completion(self, payload: Any) -> ApiRequest:
        body = _object(payload)
        model = self._model(body)
        prompt = _prompt(body, self.vocab_size)
        if isinstance(prompt, str):   # like llama.cpp's server: special-token texts in the prompt become those tokens
            ids = self.tokenizer.encode(prompt, parse_special=True)
        else:
            ids = prompt
        return self._request(body, model, ids, "prompt", chat=False)

    # ------------------------------------------------------------ shared fields

    def _model(self, body: dict) -> str:
        name = body.get("model")
        if name is None:
            return self.model_name
        if not isinstance(name, str):
            raise ApiError(400, "'model' must be a string", "model", "invalid_type")
        if name not in self.names:
            raise ApiError(404, f"The model `{name}` does not exist; this server has `{self.model_name}`",
                           "model", "model_not_found")
        return name

    def _request(self, body: dict, model: str, ids: List[int], prompt_field: str, chat: bool) -> ApiRequest:
        _refuse_unsupported(body)
        if not ids:
            raise ApiError(400, "the prompt is empty", prompt_field)
        outside = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if outside is not None:
            raise ApiError(400, f"the prompt holds token id {outside}, outside the model's vocabulary "
                                f"(0..{self.vocab_size - 1})", prompt_field, "invalid_value")
        if len(ids) >= self.ctx:
            raise ApiError(400, f"the prompt has {len(ids)} tokens but the model's context holds {self.ctx}",
                           prompt_field, "context_length_exceeded")
        d = self.defaults
        # newer clients send max_completion_tokens, older ones max_tokens
        name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _integer(body, name, None, minimum=1)
        if max_tokens is None:
            room = self.ctx - len(ids)
            max_tokens = min(d.max_tokens, room) if d.max_tokens > 0 else room
        elif len(ids) + max_tokens > self.ctx:
            raise ApiError(400, f"the context holds {self.ctx} tokens, but {len(ids) + max_tokens} were asked for "
                                f"({len(ids)} in the prompt, {name} {max_tokens})", name,
                           "context_length_exceeded")
        call = StreamCall(prompt_ids=list(ids), max_new_tokens=max_tokens, sampling=_sampling(body, d.sampling),
                          stop=_stop(body))
        stream = _boolean(body, "stream", False)
        return ApiRequest(chat=chat, model=model, call=call, stream=stream,
                          include_usage=stream and _include_usage(body))


# ------------------------------------------------------------------ field checks


def parse_body(raw: bytes) -> Any:
    """A request body's JSON, or ApiError 400: invalid UTF-8 or JSON, nesting too deep for the
    parser, or a lone surrogate escape (which no tokenizer can encode)."""
    try:
        payload = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, "the request body's JSON is nested too deeply", code="invalid_json") from None
    try:
        json.dumps(payload, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(400, f"the request body holds a lone surrogate escape (\\u{ord(e.object[e.start]):04x}), "
                            "which is not text", code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, "the request body's JSON is nested too deeply", code="invalid_json") from None
    return payload


def _object(payload: Any) -> dict:
    if not isinstance(payload, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return payload


def _wrong_type(name: str, expected: str) -> ApiError:
    return ApiError(400, f"'{name}' must be {expected}", name, "invalid_type")


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _wrong_type(name, "a number")
    if not low <= value <= high:
        bounds = f"between {low:g} and {high:g}" if high < math.inf else f"at least {low:g}"
        raise ApiError(400, f"'{name}' must be {bounds}, not {value}", name, "invalid_value")
    if low_open and value == low:
        raise ApiError(400, f"'{name}' must be above {low:g}", name, "invalid_value")
    return float(value)


def _integer(body: dict, name: str, default: Optional[int], minimum: Optional[int] = None) -> Optional[int]:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _wrong_type(name, "an integer")
    if minimum is not None and value < minimum:
        raise ApiError(400, f"'{name}' must be at least {minimum}, not {value}", name, "invalid_value")
    return value


def _sampling(body: dict, defaults: SamplingParams) -> SamplingParams:
    """The request's sampling fields over the server's defaults, within the ranges SamplingParams'
    fields give (and OpenAI's tighter ones); checked here, so that a value the engine refuses
    never reaches the other ranks."""
    values = {}
    for f, setting in settings():
        default = getattr(defaults, f.name)
        if setting.random is not None:     # like llama.cpp: a negative seed asks for a random one
            value = _integer(body, f.name, default)
            values[f.name] = None if value is None or value < 0 else value
        elif setting.whole:
            values[f.name] = _integer(body, f.name, default, minimum=int(setting.low))
        else:
            high = min(setting.high, OPENAI_MAXIMA.get(f.name, math.inf))
            values[f.name] = _number(body, f.name, default, setting.low, high, setting.low_open)
    try:
        return SamplingParams(**values)
    except TpllamaError as e:
        raise ApiError(400, str(e).lstrip("-"), None, "invalid_value") from None


def _boolean(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _wrong_type(name, "true or false")
    return value


def _stop(body: dict) -> Tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise _wrong_type("stop", "a string or a list of strings")
    if len(value) > MAX_STOP_STRINGS:
        raise ApiError(400, f"'stop' holds {len(value)} strings; at most {MAX_STOP_STRINGS} are allowed", "stop",
                       "invalid_value")
    longest = max(value, key=len, default="")
    if len(longest) > MAX_STOP_CHARS:
        raise ApiError(400, f"a stop string has {len(longest)} characters; at most {MAX_STOP_CHARS} are allowed",
                       "stop", "invalid_value")
    return tuple(s for s in value if s)


def _include_usage(body: dict) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise _wrong_type("stream_options", "an object")
    return _boolean(options, "include_usage", False)


def _refuse_unsupported(body: dict) -> None:
    """Fields whose answer we cannot give: better a clear 400 than a response without them."""
    if _integer(body, "n", 1, minimum=1) != 1:
        raise ApiError(400, "only n=1 is supported", "n", "unsupported_value")
    if body.get("best_of") not in (None, 1):
        raise ApiError(400, "only best_of=1 is supported", "best_of", "unsupported_value")
    for name in ("logprobs", "echo", "tools", "functions"):
        if body.get(name) not in (None, False, [], 0):
            raise ApiError(400, f"'{name}' is not supported by this server", name, "unsupported_value")


def _messages(body: dict) -> List[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", "messages",
                       "invalid_type" if messages is not None else "missing_required_parameter")
    if len(messages) > MAX_MESSAGES:
        raise ApiError(400, f"'messages' holds {len(messages)} messages; at most {MAX_MESSAGES} are allowed",
                       "messages", "invalid_value")
    return [_message(m, i) for i, m in enumerate(messages)]


def _message(message: Any, index: int) -> dict:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise _wrong_type(where, "an object with 'role' and 'content'")
    role = message.get("role")
    if role not in CHAT_ROLES:
        raise ApiError(400, f"{where}.role must be one of {', '.join(CHAT_ROLES)}, not {role!r}",
                       f"{where}.role", "invalid_value")
    return {"role": CHAT_ROLES[role], "content": _content(message.get("content"), where)}


def _content(content: Any, where: str) -> str:
    """A message's text: a string, or a list of text parts (as newer clients send)."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ApiError(400, f"{where}.content: only text parts are supported", f"{where}.content",
                               "unsupported_value")
            texts.append(part["text"])
        return "".join(texts)
    raise _wrong_type(f"{where}.content", "a string or a list of text parts")


def _prompt(body: dict, vocab_size: int):
    """A completion's prompt: a string, a list of one string, or a list of token ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise ApiError(400, f"token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})", "prompt",
                           "invalid_value")
        return list(prompt)
    if prompt is None:
        raise ApiError(400, "'prompt' is required", "prompt", "missing_required_parameter")
    raise ApiError(400, "'prompt' must be a string or a list of token ids (one prompt per request)", "prompt",
                   "invalid_type")


# ------------------------------------------------------------------ responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """Token counts; cached_tokens: prompt tokens whose KV cache a previous request left (not read again)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def completion_response(req: ApiRequest, response_id: str, created: int, text: str, finish_reason: str,
                        counts: dict) -> dict:
    if req.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish_reason}
        kind = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        kind = "text_completion"
    return {"id": response_id, "object": kind, "created": created, "model": req.model, "choices": [choice],
            "usage": counts}


def stream_chunk(req: ApiRequest, response_id: str, created: int, text: Optional[str] = None,
                 finish_reason: Optional[str] = None, role: bool = False) -> dict:
    """One server-sent event of a streamed answer: some text, or (at the end) the finish reason."""
    if req.chat:
        delta: Dict[str, str] = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        kind = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        kind = "text_completion"
    chunk = {"id": response_id, "object": kind, "created": created, "model": req.model, "choices": [choice]}
    if req.include_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(req: ApiRequest, response_id: str, created: int, counts: dict) -> dict:
    """The last event with stream_options.include_usage: no choices, the token counts."""
    kind = "chat.completion.chunk" if req.chat else "text_completion"
    return {"id": response_id, "object": kind, "created": created, "model": req.model, "choices": [],
            "usage": counts}


def model_object(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "tpllama"}


def now() -> int:
    return int(time.time())

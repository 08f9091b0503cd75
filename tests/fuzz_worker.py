"""A worker process for tests/test_fuzz.py: loads one (possibly malformed) file per request.

Run as `python tests/fuzz_worker.py HEADROOM_BYTES`. Each stdin line is a JSON request
{"kind": "model" | "tokenizer", "path": ..., "tokenizer": ...}; each answer is one JSON line
{"outcome": "ok" | "error" | "bug", "detail": ..., "cpu_seconds": ...}: "error" is one of the project's error classes
(the one-line message a user sees), "bug" any other exception with its traceback. A crash or a
hang shows as no answer: the parent kills and restarts the worker. The address space is capped
(RLIMIT_AS, HEADROOM_BYTES above what the imports mapped) so a file that makes the loader allocate without bound fails fast with MemoryError,
which counts as a bug too: sizes must be checked before allocating.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback
import warnings

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"


def load_model(path: str, tokenizer):
    """Everything a user's first command does: open, tokenize, load the weights, decode two tokens."""
    import tpllama
    model = tpllama.load(path, tokenizer=tokenizer, weight_type="f32", ctx_size=16, threads=1)
    if model.tokenizer is not None:
        ids = model.tokenizer.encode("Once upon a time")
        model.tokenizer.decode(ids)
    else:
        ids = [1]
    model.generate(ids[:8] or [0], max_new_tokens=2, temperature=0.0)


def load_tokenizer(path: str):
    from tpllama.tokenizer import load_tokenizer_file
    tok = load_tokenizer_file(path)
    ids = tok.encode("Hello world, <s> héllo 🦙 \n\t 123", add_bos=True)
    tok.decode(ids)


def handle(request: dict) -> dict:
    before = time.process_time()
    answer = _outcome(request)
    answer["cpu_seconds"] = time.process_time() - before   # contention-proof, unlike the parent's clock
    return answer


def _outcome(request: dict) -> dict:
    from tpllama.errors import TpllamaError
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if request["kind"] == "model":
                load_model(request["path"], request.get("tokenizer"))
            else:
                load_tokenizer(request["path"])
    except TpllamaError as e:
        message = str(e)
        if "\n" in message.strip():
            return {"outcome": "bug", "detail": f"error message is not one line: {message!r}"}
        return {"outcome": "error", "detail": message}
    except BaseException:     # noqa: B902 - any other class is a parser bug, MemoryError included
        return {"outcome": "bug", "detail": traceback.format_exc(limit=-6)}
    return {"outcome": "ok", "detail": ""}


def _mapped_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * resource.getpagesize()


def main():
    headroom = int(sys.argv[1])
    import numpy  # noqa: F401  - the imports first, then the cap: it is meant for what a file makes us allocate
    import tpllama.engine  # noqa: F401
    import tpllama.tokenizer  # noqa: F401
    import sentencepiece  # noqa: F401
    import tokenizers  # noqa: F401
    from mpi4py import MPI  # noqa: F401
    cap = _mapped_bytes() + headroom
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        print(json.dumps(handle(json.loads(line))), flush=True)


if __name__ == "__main__":
    main()

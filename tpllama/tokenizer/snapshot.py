"""Tokenizer snapshots: a tokenizer built from a GGUF file's vocabulary, kept beside the shard
files, so that the next start reads it back instead of building it again.

Building a 32k SentencePiece vocabulary's tokenizer (reading the pieces, laying out its model
proto, loading it) costs a start 0.05-0.1 s per rank here and several times that on a Raspberry
Pi; reading a snapshot back costs about 10 ms. Only SentencePiece tokenizers are kept: a byte-level
BPE tokenizer (the `tokenizers` library) loads from its own serialized form more slowly than it
builds from the vocabulary.

A snapshot is a NumPy .npz file (no pickles): the processor's model proto, the pieces' bytes and
a JSON record of the rest (special tokens, BOS/EOS ids, chat template) with the key. The key
names what the tokenizer depends on: the model file (its fingerprint, size and modification
time) and the code that builds tokenizers (a hash of its sources), so an edited model or an
upgraded tpllama never reads an old snapshot. A snapshot that does not load or whose key differs
is ignored and written again.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
import zipfile
from typing import Optional

import numpy as np

from .base import Tokenizer, cut_at
from .sentencepiece import SentencePieceTokenizer

FORMAT = 1
SUFFIX = ".tptok"


@functools.lru_cache(maxsize=1)
def _code_id() -> str:
    """A hash of the sources that read a GGUF vocabulary and build its tokenizer."""
    here = os.path.dirname(os.path.abspath(__file__))
    files = sorted(os.path.join(here, n) for n in os.listdir(here) if n.endswith(".py"))
    files.append(os.path.join(os.path.dirname(here), "formats", "gguf.py"))
    h = hashlib.sha256()
    for path in files:
        try:
            with open(path, "rb") as f:
                h.update(os.path.basename(path).encode() + b"\0" + f.read())
        except OSError:
            h.update(path.encode())
    return h.hexdigest()[:16]


def snapshot_key(model_identity) -> str:
    facts = {"format": FORMAT, "model": [str(part) for part in model_identity], "code": _code_id()}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()


def snapshot_path(folder: str, model_path: str, key: str) -> str:
    return os.path.join(folder, f"{os.path.basename(os.path.normpath(str(model_path)))}.{key[:16]}{SUFFIX}")


def can_keep(tok: Tokenizer) -> bool:
    return isinstance(tok, SentencePieceTokenizer)


def save(tok: Tokenizer, path: str, key: str) -> bool:
    """Write tok's snapshot to path (atomically: a reader sees the whole file or none); False
    when this kind of tokenizer is not kept or the folder cannot be written."""
    if not can_keep(tok):
        return False
    fields = dict(tok.fields)
    pieces = fields.pop("pieces")
    record = dict(fields, key=key, kind=tok.kind, format=FORMAT)
    arrays = {
        "proto": np.frombuffer(tok.serialized_model_proto(), dtype=np.uint8),
        "pieces": np.frombuffer(b"".join(pieces), dtype=np.uint8),
        "piece_ends": np.cumsum(np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))),
        "record": np.frombuffer(json.dumps(record).encode("utf-8"), dtype=np.uint8),
    }
    folder = os.path.dirname(path) or "."
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=SUFFIX, dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError:
        return False
    return True


def load(path: str, key: str) -> Optional[Tokenizer]:
    """The tokenizer kept at path under this key; None when there is none, or it is damaged,
    stale or of another kind (the caller builds the tokenizer again)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            record = json.loads(z["record"].tobytes().decode("utf-8"))
            if record.pop("key", None) != key or record.pop("format", None) != FORMAT \
                    or record.pop("kind", None) != SentencePieceTokenizer.kind:
                return None
            joined, ends, proto = z["pieces"].tobytes(), z["piece_ends"].tolist(), z["proto"].tobytes()
        import sentencepiece as spm
        processor = spm.SentencePieceProcessor(model_proto=proto)
        pieces = cut_at(joined, ends)
        if len(pieces) != processor.get_piece_size():
            return None
        tok = SentencePieceTokenizer.restored(processor, dict(record, pieces=pieces))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, EOFError, zipfile.BadZipFile,
            UnicodeDecodeError):
        return None
    try:
        os.utime(path)            # used now: the folder keeps the most recently used (retire_replaced)
    except OSError:
        pass
    return tok

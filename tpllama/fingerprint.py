"""Do all ranks hold the same model? A fingerprint of what a rank opened, compared at load.

Each rank opens its own copy of the model (its own disk, its own path); a stale or different
copy on one node would hang the job (fewer layers, fewer collectives) or garble the text
silently (same shapes, other weights). The fingerprint has three parts, so the message can say
what differs: the config, the tensor table (names, types, shapes, sizes) and a hash of a few
sampled KiB of every tensor's bytes. Sampling reads a few pages per tensor (about 1 MiB in
all), cheap enough to be always on; it tells different weights apart, not a flipped bit.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import List, NamedTuple

import numpy as np

from .errors import TpllamaError

SAMPLED_ROWS = 4          # rows sampled per tensor, spread over it
SAMPLE_BYTES = 1024       # bytes sampled per row


class Fingerprint(NamedTuple):
    config: str
    table: str
    weights: str


def fingerprint(reader) -> Fingerprint:
    """The fingerprint of an open model (formats.ModelReader); reads only the sampled bytes.
    A rank without the model file (remote.RemoteModel) has rank 0's."""
    known = getattr(reader, "known_fingerprint", None)
    if known is not None:
        return Fingerprint(*known)
    config, table, weights = hashlib.sha256(), hashlib.sha256(), hashlib.sha256()
    config.update(repr(_config_fields(reader.config)).encode())
    for name in sorted(reader.tensors):
        t = reader.tensors[name]
        table.update(f"{name}|{t.dtype.name}|{tuple(t.shape)}|{t.raw.nbytes}|{t.row_permutation is not None};".encode())
        for sample in _samples(t.raw):
            weights.update(sample)
    return Fingerprint(config.hexdigest()[:16], table.hexdigest()[:16], weights.hexdigest()[:16])


def model_identity(reader) -> str:
    """A hash of the size and modification time of each file the model consists of (a GGUF or
    llama2.c file, an HF directory's weights and JSON files). The fingerprint samples a few rows
    per tensor, enough to tell models apart but not an edit of a few rows; a shard file's key
    adds this, so a shard file converted before the model file changed is never used. A rank
    without the model file has rank 0's (remote.RemoteModel)."""
    known = getattr(reader, "known_identity", None)
    if known is not None:
        return known
    path = os.path.expanduser(str(reader.path))
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith((".safetensors", ".json", ".model")))
    else:
        files = [path]
    facts = []
    for f in files:
        st = os.stat(f)
        facts.append((os.path.basename(f), st.st_size, st.st_mtime_ns))
    return hashlib.sha256(repr(facts).encode()).hexdigest()[:16]


def _config_fields(config) -> tuple:
    """The config's compared fields (not the file it came from)."""
    return tuple((f.name, getattr(config, f.name)) for f in dataclasses.fields(config) if f.compare)


def _samples(raw: np.ndarray):
    """SAMPLE_BYTES from each of SAMPLED_ROWS rows spread over the tensor, at offsets that move
    across the row (any strides: nothing but the samples is read or copied)."""
    rows = raw.reshape(1, -1) if raw.ndim == 1 else raw.reshape(raw.shape[0], -1)
    n_rows, row_bytes = rows.shape
    for k in range(min(SAMPLED_ROWS, n_rows)):
        r = k * (n_rows - 1) // max(1, SAMPLED_ROWS - 1)
        width = min(SAMPLE_BYTES, row_bytes)
        start = (row_bytes - width) * k // max(1, SAMPLED_ROWS - 1)
        yield np.ascontiguousarray(rows[r, start:start + width]).tobytes()


def check_same_model(par, reader, path: str) -> Fingerprint:
    """Collective: the model's fingerprint, the same on every rank; else every rank raises the
    same error naming the ranks and hosts whose model differs."""
    mine = par.together(lambda: fingerprint(reader))
    everyone = par.allgather_object((mine, par.hostname(), str(path), _config_fields(reader.config)))
    if all(fp == everyone[0][0] for fp, *_ in everyone):
        return mine
    raise TpllamaError(describe_mismatch(everyone), collective=True)


def describe_mismatch(everyone: List[tuple]) -> str:
    """One line: what differs, and which ranks (host, path) hold which model."""
    groups, configs = {}, {}
    for rank, (fp, host, path, fields) in enumerate(everyone):
        groups.setdefault(fp, []).append(f"rank {rank} on {host}: {path} ({dict(fields)['n_layers']} layers)")
        configs.setdefault(fp, dict(fields))
    first, other = list(groups)[:2]
    differ = [name for name, value in configs[first].items() if configs[other].get(name) != value]
    what = (f"different configs: {', '.join(f'{n} {configs[first][n]!r} against {configs[other][n]!r}' for n in differ[:3])}"
            if first.config != other.config else
            "different tensors" if first.table != other.table else "the same shapes but different weights")
    listing = "; ".join(f"[{', '.join(ranks)}]" for ranks in groups.values())
    return (f"the ranks opened different models ({what}): {listing}; "
            "give every rank the same model file")

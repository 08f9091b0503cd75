"""Per-rank shard files: a rank's converted weights, written once, read back at the next start.

Converting a rank's slice of the model into the runtime layout (reading the file's blocks,
repacking or quantizing them) costs seconds on a laptop and minutes on a Raspberry Pi, at every
start. After a rank has converted its slice it writes the result, in the runtime's packed
layout, to one file under the shard cache folder; the next start with the same key reads that
file straight into the weight arena instead of converting.

The key names everything the bytes depend on: the model's fingerprint (config, tensor table,
sampled weights), the plan (rank count, this rank's heads, kv heads, FFN units and vocab rows),
the runtime type of every matrix, and the build of the kernels (their packed layout). A file
is used only if its header (magic, version, a SHA-256 of the header itself, the key) checks
and its size is what the header says; anything else is rebuilt, never used.

File layout: b"TPLSHARD", u32 version, u32 header length, the header (JSON), its SHA-256
(32 bytes), zeros up to a 4 KiB boundary, then every array's bytes at the offsets the header
lists (64-byte aligned). The token embedding is not in it: a step reads those rows from the
model file, as without the cache.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from .matrix import Matrix, _ARENA
from .plan import RankSlice
from .weights import LayerWeights, RankWeights

MAGIC = b"TPLSHARD"
VERSION = 1
ALIGN = 64
DATA_START_ALIGN = 4096
SUFFIX = ".tpshard"
LAYER_FIELDS = ("attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w3", "w2")


def default_dir() -> str:
    """~/.cache/tpllama/shards, or $TPLLAMA_CACHE/shards."""
    from .fetch import cache_dir
    return os.path.join(cache_dir(), "shards")


def shard_folder(shard_cache) -> Optional[str]:
    """The folder of the shard_cache option (True: the default folder; a path; False: none)."""
    from .checks import ParameterError
    if shard_cache is True:
        return default_dir()
    if shard_cache is False or shard_cache is None:
        return None
    if isinstance(shard_cache, (str, os.PathLike)) and str(shard_cache).strip():
        return os.path.expanduser(str(shard_cache))
    raise ParameterError("shard_cache", shard_cache, "expected True (the default folder), False (off) or a folder")


def _kernels_build_id() -> str:
    """A hash of the compiled kernels: a rebuild may change the packed layout."""
    from . import _kernels
    h = hashlib.sha256()
    with open(_kernels.__file__, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def shard_key(fingerprint, world_size: int, shard: RankSlice, types) -> str:
    """The key of this rank's shard file: what its bytes depend on, hashed."""
    facts = {
        "version": VERSION,
        "fingerprint": list(fingerprint),
        "world_size": world_size,
        "shard": {k: [v.start, v.stop] for k, v in asdict(shard).items() if isinstance(v, range)},
        "rank": shard.rank,
        "types": sorted((name, c.runtime) for name, c in types.choices.items()),
        "kernels": _kernels_build_id(),
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()


def shard_path(folder: str, model_path: str, world_size: int, rank: int, key: str) -> str:
    name = os.path.basename(os.path.normpath(model_path))
    return os.path.join(folder, f"{name}.{world_size}r{rank}.{key[:16]}{SUFFIX}")


# ------------------------------------------------------------ writing

def _arrays(weights: RankWeights) -> List[Tuple[str, object]]:
    """(name, Matrix or float32 vector) of everything the shard file holds, in a fixed order."""
    out = []
    for i, layer in enumerate(weights.layers):
        out += [(f"{i}.{f}", getattr(layer, f)) for f in LAYER_FIELDS]
    out += [("output_norm", weights.output_norm), ("output", weights.output)]
    return out


def _entry(name: str, value) -> Tuple[dict, np.ndarray]:
    if isinstance(value, Matrix):
        data = value.data
        return {"name": name, "wtype": value.wtype, "rows": value.rows, "cols": value.cols,
                "nbytes": int(data.nbytes)}, data
    return {"name": name, "wtype": "vector", "rows": 1, "cols": int(value.shape[0]), "nbytes": int(value.nbytes)}, value


def save(path: str, weights: RankWeights, key: str) -> None:
    """Write the shard file (through a temporary file renamed into place: a reader never sees
    half a file). Raises OSError when it cannot be written."""
    entries, arrays, offset = [], [], 0
    for name, value in _arrays(weights):
        entry, data = _entry(name, value)
        entry["offset"] = offset
        entries.append(entry)
        arrays.append(data)
        offset = -(-(offset + entry["nbytes"]) // ALIGN) * ALIGN
    header = json.dumps({"key": key, "entries": entries, "data_bytes": offset}).encode()
    head = MAGIC + struct.pack("<II", VERSION, len(header)) + header + hashlib.sha256(header).digest()
    data_start = -(-len(head) // DATA_START_ALIGN) * DATA_START_ALIGN
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=SUFFIX, dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(head.ljust(data_start, b"\0"))
            for entry, data in zip(entries, arrays):
                f.seek(data_start + entry["offset"])
                f.write(memoryview(np.ascontiguousarray(data)).cast("B"))
            f.truncate(data_start + offset)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# ------------------------------------------------------------ reading

def _read_header(f, path: str, key: str, file_size: int) -> Optional[Tuple[dict, int]]:
    """(header, data start), or None when the file is not a sound shard file of this key."""
    head = f.read(len(MAGIC) + 8)
    if len(head) < len(MAGIC) + 8 or head[:len(MAGIC)] != MAGIC:
        return None
    version, length = struct.unpack("<II", head[len(MAGIC):])
    if version != VERSION or length > file_size:
        return None
    header = f.read(length)
    if len(header) != length or f.read(32) != hashlib.sha256(header).digest():
        return None
    try:
        meta = json.loads(header)
    except ValueError:
        return None
    data_start = -(-(len(head) + length + 32) // DATA_START_ALIGN) * DATA_START_ALIGN
    if meta.get("key") != key or file_size != data_start + meta.get("data_bytes", -1):
        return None
    return meta, data_start


def _read_into(f, data_start: int, entry: dict, out: np.ndarray) -> None:
    f.seek(data_start + entry["offset"])
    view = memoryview(out.reshape(-1).view(np.uint8))
    if f.readinto(view) != entry["nbytes"]:
        raise EOFError


def _load_entry(f, data_start: int, entry: dict, threads: int):
    wtype, rows, cols = entry["wtype"], entry["rows"], entry["cols"]
    if wtype == "vector":
        out = np.empty(cols, dtype=np.float32)
    elif wtype == "f32":
        out = np.empty((rows, cols), dtype=np.float32)
    else:
        out = _ARENA.empty(entry["nbytes"])
    if out.nbytes != entry["nbytes"]:
        raise ValueError
    _read_into(f, data_start, entry, out)
    if wtype == "vector":
        return out
    return Matrix(wtype, rows, cols, out, threads, packed=True)


def load(path: str, key: str, template: "RankWeights") -> Optional[RankWeights]:
    """The weights of a sound shard file of this key, read into memory (config, shard, embedding
    and threads from the template); None when the file is absent, stale or damaged."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            found = _read_header(f, path, key, size)
            if found is None:
                return None
            meta, data_start = found
            values = {e["name"]: _load_entry(f, data_start, e, template.threads) for e in meta["entries"]}
        return _assemble(values, template)
    except (OSError, ValueError, KeyError, TypeError, EOFError):
        return None


def _assemble(values: Dict[str, object], template: RankWeights) -> RankWeights:
    layers = [LayerWeights(**{f: values[f"{i}.{f}"] for f in LAYER_FIELDS}) for i in range(template.config.n_layers)]
    if len(values) != len(LAYER_FIELDS) * len(layers) + 2:
        raise ValueError("the shard file holds other arrays than the model's")
    return RankWeights(config=template.config, shard=template.shard, embedding=template.embedding, layers=layers,
                       output_norm=values["output_norm"], output=values["output"], threads=template.threads)


@dataclass
class Cached:
    weights: RankWeights
    path: str
    hit: bool                 # read from the shard file
    note: str                 # what happened, for the log


def cached_rank_weights(reader, shard: RankSlice, types, threads: int, folder: str, fingerprint, world_size: int,
                        progress=None) -> Cached:
    """This rank's weights from its shard file when a sound one exists; else converted from the
    model file (loader.load_rank_weights) and written to the shard file for the next start. A
    shard file that cannot be written costs only the next start's time: the note says why."""
    from .loader import embedding_table, load_rank_weights
    key = shard_key(fingerprint, world_size, shard, types)
    path = shard_path(folder, reader.path, world_size, shard.rank, key)
    template = RankWeights(config=reader.config, shard=shard, embedding=embedding_table(reader), layers=[],
                           output_norm=None, output=None, threads=threads)
    existed = os.path.exists(path)
    weights = load(path, key, template) if existed else None
    if weights is not None:
        return Cached(weights, path, True, f"read the converted weights from {path}")
    weights = load_rank_weights(reader, shard, types, threads, progress)
    need = weights.nbytes + DATA_START_ALIGN + ALIGN * 16 * (len(weights.layers) + 1)
    try:
        os.makedirs(folder, exist_ok=True)
        free = shutil.disk_usage(folder).free
        if free < need + 2**28:     # keep 256 MiB free for everyone else
            return Cached(weights, path, False, f"did not write the shard file {path}: it needs "
                                                f"{need / 2**20:,.0f} MiB and {free / 2**20:,.0f} MiB are free")
        save(path, weights, key)
        note = f"{'rebuilt the stale or damaged' if existed else 'wrote the'} shard file {path}"
    except OSError as e:
        note = f"could not write the shard file {path} ({e.strerror or e}); the next start converts again"
    return Cached(weights, path, False, note)

"""Per-rank shard files: a rank's converted weights, written once, read back at the next start.

Converting a rank's slice of the model into the runtime layout (reading the file's blocks,
repacking or quantizing them) costs seconds on a laptop and minutes on a Raspberry Pi, at every
start. After a rank has converted its slice it writes the result, in the runtime's packed
layout, to one file under the shard cache folder; the next start with the same key maps (or
reads) that file instead of converting.

The key names everything the bytes depend on: the model's fingerprint (config, tensor table,
sampled weights) and its file's size and modification time (fingerprint.model_identity), the
plan (rank count, this rank's heads, kv heads, FFN units and vocab rows), the runtime type of every matrix, and the build of the kernels (their packed layout). A file
is used only if its header (magic, version, a SHA-256 of the header itself, the key) checks
and its size is what the header says; anything else is rebuilt, never used. Writing a file
retires older ones of the same model file name, rank count and rank beyond the two most
recently used (retire_replaced), so the folder does not grow at every change of plan or build.

File layout: b"TPLSHARD", u32 version, zeros up to 4 KiB; every array's bytes from there, in
model order, each 64-byte aligned; then the header (JSON: the key and each array's name, type,
shape, offset and size), its SHA-256 (32 bytes), u64 header offset, u32 header length and
b"TPLSHARD" again. The header comes last so a rank can write its slice a layer at a time and
never hold more than one layer (mapped mode, models larger than memory). The token embedding is
not in it: a step reads those rows from the model file, as without the cache.

A shard file found at start is memory-mapped, not read: its pages are the page cache's (still
there from the last start, or read ahead at once), so the start copies nothing. Mapped mode
(`mapped=True`, a model larger than memory) runs from the map layer by layer: the OS pages
weights in as the layers run, and while layer i computes, layer i+1 is advised WILLNEED so its
pages are on their way (MappedLayers).
"""
from __future__ import annotations

import functools
import hashlib
import json
import mmap
import os
import shutil
import struct
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np

from .matrix import Matrix, _ARENA
from .memory import advise
from .plan import RankSlice
from .filetypes import DTYPES
from .weights import EmbeddingTable, ExpertWeights, LayerWeights, RankWeights

MAGIC = b"TPLSHARD"
VERSION = 3
ALIGN = 64
DATA_START_ALIGN = 4096
SUFFIX = ".tpshard"
LAYER_FIELDS = ("attn_norm", "wq", "wk", "wv", "wo", "ffn_norm")
OPTIONAL_LAYER_FIELDS = ("w1", "w3", "w2", "bq", "bk", "bv", "q_norm", "k_norm", "router")   # stored when present
EXPERT_FIELDS = ("w1", "w3", "w2")    # of each expert of a mixture-of-experts layer: {layer}.experts.{e}.{field}


def default_dir() -> str:
    """$TPLLAMA_SHARD_CACHE, else ~/.cache/tpllama/shards (or $TPLLAMA_CACHE/shards)."""
    from .fetch import shard_cache_dir
    return shard_cache_dir()


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


@functools.lru_cache(maxsize=1)
def _kernels_build_id() -> str:
    """A hash of the compiled kernels (a rebuild may change the packed layout); read once per process."""
    from . import _kernels
    from .fetch import sha256_of
    return sha256_of(_kernels.__file__)[:16]


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


def retire_replaced(path: str, keep: int = 2, tmp_age_s: float = 86400.0, suffix: str = SUFFIX) -> List[str]:
    """Bound the folder: of the shard files with `path`'s model file name, rank count and rank
    (other keys: another plan or weight type, an edited model, a rebuilt tpllama), keep the `keep`
    most recently used (a hit touches its file) and remove the rest, which would otherwise pile
    up a model's size at every change; remove temporary files a killed writer left over a day
    ago. Returns the paths removed. (Tokenizer snapshots, suffix .tptok, are retired alike.)"""
    folder, name = os.path.split(path)
    stem = name[:-len(suffix)].rsplit(".", 1)[0] + "."        # "<model file>.<world>r<rank>."
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    siblings, stale_tmp, now = [], [], time.time()
    for other in names:
        full = os.path.join(folder, other)
        try:
            if other.startswith(stem) and other.endswith(suffix) and len(other) == len(name):   # same pattern
                siblings.append((os.path.getmtime(full), full))
            elif other.startswith(".tmp-") and other.endswith(suffix) and now - os.path.getmtime(full) > tmp_age_s:
                stale_tmp.append(full)
        except OSError:
            pass
    siblings.sort(reverse=True)
    doomed = [p for _, p in siblings if p != path][max(keep - 1, 0):] + stale_tmp
    removed = []
    for p in doomed:
        try:
            os.unlink(p)              # a process that still maps it keeps its pages until it exits
            removed.append(p)
        except OSError:
            pass
    return removed


def read_bandwidth(path: str, nbytes: int = 64 * 2**20, streams: int = 4) -> Optional[float]:
    """Bytes per second this disk reads from `path`, as mapped weights are read: up to nbytes from
    the middle of the file, first dropped from the page cache (POSIX_FADV_DONTNEED), then read by
    `streams` threads at once (a layer's pages fault in from several kernel threads while the next
    layer is prefetched: a disk, virtual ones above all, reads faster with requests in parallel).
    None where the page cache cannot be dropped."""
    import time
    from concurrent.futures import ThreadPoolExecutor
    if not hasattr(os, "posix_fadvise"):
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        size = os.fstat(fd).st_size
        nbytes = min(nbytes, size) // (streams * 4096) * (streams * 4096)
        start = max(0, size // 2 - nbytes // 2) // 4096 * 4096
        os.posix_fadvise(fd, start, nbytes, os.POSIX_FADV_DONTNEED)
        part = nbytes // streams

        def read_part(k: int) -> int:
            done, chunk = 0, 4 * 2**20
            while done < part:
                got = len(os.pread(fd, min(chunk, part - done), start + k * part + done))   # releases the GIL
                if not got:
                    break
                done += got
            return done

        t0 = time.perf_counter()
        with ThreadPoolExecutor(streams) as pool:
            done = sum(pool.map(read_part, range(streams)))
        seconds = time.perf_counter() - t0
        return done / seconds if done >= 4 * 2**20 and seconds > 0 else None
    except OSError:
        return None
    finally:
        os.close(fd)


# ------------------------------------------------------------ writing

def _parts(weights: RankWeights) -> List[Tuple[object, object]]:
    """The parts of loaded weights, as loader.rank_weight_parts yields them."""
    return [*enumerate(weights.layers), ("output_norm", weights.output_norm), ("output", weights.output)]


def _arrays(key, value) -> List[Tuple[str, object]]:
    """(name, Matrix or float32 vector) of one part, in file order."""
    if isinstance(value, LayerWeights):
        return [(f"{key}.{f}", getattr(value, f)) for f in LAYER_FIELDS + OPTIONAL_LAYER_FIELDS
                if getattr(value, f) is not None] + [
            (f"{key}.experts.{e}.{f}", getattr(expert, f)) for e, expert in enumerate(value.experts or ())
            for f in EXPERT_FIELDS]
    return [(str(key), value)]


def _entry(name: str, value) -> Tuple[dict, np.ndarray]:
    if isinstance(value, Matrix):
        data = value.data
        return {"name": name, "wtype": value.wtype, "rows": value.rows, "cols": value.cols,
                "nbytes": int(data.nbytes)}, data
    return {"name": name, "wtype": "vector", "rows": 1, "cols": int(value.shape[0]), "nbytes": int(value.nbytes)}, value


FOOTER = struct.Struct("<QI8s")     # header offset, header length, MAGIC


class _ChunkedFile:
    """A file written front to back in whole 2 MiB pieces at 2 MiB offsets (the tail at close).
    The page cache then holds it in 2 MiB folios where the filesystem keeps large folios (ext4
    and xfs on recent kernels), so the next start that maps the file gets its weights in 2 MiB
    pages: written in smaller pieces, 4 KiB pages mapped most of the file and the kernels read it
    5-12% slower than converted weights (docs/performance.md, "Starting"). Seeks go forward only;
    the gap reads as zeros."""

    CHUNK = 2 << 20

    def __init__(self, fd: int):
        self.fd, self.pos = fd, 0             # pos: bytes written or staged so far
        self.staged = bytearray()             # the part of the current 2 MiB piece not yet written

    def seek(self, at: int) -> None:
        if at < self.pos:
            raise ValueError("a shard file is written front to back")
        if at > self.pos:
            self.write(bytes(at - self.pos))

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        self.pos += len(view)
        if self.staged or len(view) < self.CHUNK:
            room = self.CHUNK - len(self.staged)
            self.staged += view[:room]
            view = view[room:]
            if len(self.staged) < self.CHUNK:
                return
            self._write_all(self.staged)
            self.staged = bytearray()
        whole = len(view) // self.CHUNK * self.CHUNK   # straight from the caller's buffer: no copy
        self._write_all(view[:whole])
        self.staged += view[whole:]

    def _write_all(self, view) -> None:
        view = memoryview(view)
        while len(view):
            view = view[os.write(self.fd, view):]

    def close(self) -> None:
        try:
            self._write_all(self.staged)
        finally:
            self.discard()

    def discard(self) -> None:
        """Close without writing what is staged (the file is being thrown away)."""
        fd, self.fd = self.fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass


class ShardWriter:
    """Writes a shard file part by part, through a temporary file renamed into place at the
    end (a reader never sees half a file); `abort` removes the temporary file."""

    def __init__(self, path: str, key: str):
        self.path, self.key = path, key
        self.entries: List[dict] = []
        self.offset = 0
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix=".tmp-", suffix=SUFFIX, dir=folder)
        self.f = _ChunkedFile(fd)
        self.f.write((MAGIC + struct.pack("<I", VERSION)).ljust(DATA_START_ALIGN, b"\0"))

    def add(self, key, value) -> None:
        for name, array in _arrays(key, value):
            entry, data = _entry(name, array)
            entry["offset"] = self.offset
            self.f.seek(DATA_START_ALIGN + self.offset)
            self.f.write(memoryview(np.ascontiguousarray(data)).cast("B"))
            self.entries.append(entry)
            self.offset = -(-(self.offset + entry["nbytes"]) // ALIGN) * ALIGN

    def begin(self, entry: dict) -> None:
        """Start an array whose bytes come in pieces (write), e.g. as they arrive from another rank."""
        entry = dict(entry, offset=self.offset)
        self.f.seek(DATA_START_ALIGN + self.offset)
        self._open, self._written = entry, 0

    def write(self, data: np.ndarray) -> None:
        self.f.write(memoryview(np.ascontiguousarray(data)).cast("B"))
        self._written += data.nbytes

    def end(self) -> None:
        entry = self._open
        if self._written != entry["nbytes"]:
            raise ValueError(f"array {entry['name']}: {self._written} bytes written, {entry['nbytes']} announced")
        self.entries.append(entry)
        self.offset = -(-(self.offset + entry["nbytes"]) // ALIGN) * ALIGN

    def finish(self) -> None:
        header = json.dumps({"key": self.key, "entries": self.entries, "data_bytes": self.offset}).encode()
        at = DATA_START_ALIGN + self.offset
        self.f.seek(at)
        self.f.write(header + hashlib.sha256(header).digest() + FOOTER.pack(at, len(header), MAGIC))
        self.f.close()
        os.replace(self.tmp, self.path)
        retire_replaced(self.path)

    def abort(self) -> None:
        self.f.discard()
        try:
            os.unlink(self.tmp)
        except OSError:
            pass


def save(path: str, parts: Iterable[Tuple[object, object]], key: str) -> None:
    """Write the parts (loader.rank_weight_parts, or _parts of loaded weights) to the shard
    file. Raises OSError when it cannot be written."""
    writer = ShardWriter(path, key)
    try:
        for k, value in parts:
            writer.add(k, value)
        writer.finish()
    except BaseException:
        writer.abort()
        raise


# ------------------------------------------------------------ reading

def read_header(f, key: str, file_size: int) -> Optional[dict]:
    """The header of a sound shard file of this key, or None (wrong magic or version, a header
    whose hash does not check, another key, a size that is not what the header says)."""
    f.seek(0)
    start = f.read(len(MAGIC) + 4)
    if file_size < DATA_START_ALIGN + FOOTER.size + 32 or start != MAGIC + struct.pack("<I", VERSION):
        return None
    f.seek(file_size - FOOTER.size)
    at, length, magic = FOOTER.unpack(f.read(FOOTER.size))
    if magic != MAGIC or at + length + 32 + FOOTER.size != file_size:
        return None
    f.seek(at)
    header = f.read(length)
    if f.read(32) != hashlib.sha256(header).digest():
        return None
    try:
        meta = json.loads(header)
    except ValueError:
        return None
    if not isinstance(meta, dict) or meta.get("key") != key or DATA_START_ALIGN + meta.get("data_bytes", -1) != at:
        return None
    return meta


def has_sound_shard(path: str, key: str) -> bool:
    """A sound shard file of this key is at path (read_header), without reading its data."""
    try:
        with open(path, "rb") as f:
            return read_header(f, key, os.path.getsize(path)) is not None
    except OSError:
        return False


@dataclass
class RawRows:
    """Rows of a model file's tensor as they are in the file (the token embedding of a rank
    without the model file), and their element type."""
    rows: np.ndarray      # uint8 (rows, bytes_per_row)
    dtype: str


def _array(entry: dict, raw: np.ndarray, threads: int):
    """A vector, Matrix or RawRows over raw (the entry's bytes, read into memory or mapped)."""
    wtype, rows, cols = entry["wtype"], entry["rows"], entry["cols"]
    if wtype == "raw":
        return RawRows(raw.reshape(rows, cols), str(entry["dtype"]))
    if wtype == "vector":
        return raw.view(np.float32).reshape(cols)
    if wtype == "f32":
        return Matrix("f32", rows, cols, raw.view(np.float32).reshape(rows, cols), threads)
    return Matrix(wtype, rows, cols, raw, threads, packed=True)


def _read_entry(f, entry: dict, threads: int):
    raw = _ARENA.empty(entry["nbytes"]) if entry["wtype"] not in ("vector", "f32", "raw") else \
        np.empty(entry["nbytes"], dtype=np.uint8)
    f.seek(DATA_START_ALIGN + entry["offset"])
    if f.readinto(memoryview(raw)) != entry["nbytes"]:
        raise EOFError
    return _array(entry, raw, threads)


class MappedLayers(list):
    """The layers of a mapped shard file: iterating them advises the kernel to read layer i+1's
    pages (WILLNEED) while layer i computes."""

    def __init__(self, layers, mapping: mmap.mmap, spans: List[Tuple[int, int]]):
        super().__init__(layers)
        self.mapping, self.spans = mapping, spans     # (start, end) byte range of each layer in the file

    def prefetch(self, i: int) -> None:
        if 0 <= i < len(self.spans):
            advise(self.mapping, "MADV_WILLNEED", *self.spans[i])

    def __iter__(self):
        for i in range(len(self)):
            self.prefetch(i + 1)
            yield self[i]


def load(path: str, key: str, template: RankWeights, how: str = "read") -> Optional[RankWeights]:
    """The weights of a sound shard file of this key (config, shard, embedding and threads from
    the template); None when the file is absent, stale or damaged. how: "read" into memory;
    "resident": memory-mapped, all of it asked for at once and kept by the page cache (no copy,
    so a warm start skips the read); "mapped": memory-mapped, each layer asked for just before it
    runs (a model larger than memory)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            meta = read_header(f, key, size)
            if meta is None:
                return None
            entries = meta["entries"]
            if how == "read":
                values = {e["name"]: _read_entry(f, e, template.threads) for e in entries}
                return _assemble(values, template, path)
            mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        # 2 MiB pages where the page cache has them (or reads them so): fewer TLB misses in decode
        advise(mapping, "MADV_HUGEPAGE", 0, len(mapping))
        buf = np.frombuffer(mapping, dtype=np.uint8)
        values = {e["name"]: _array(e, buf[DATA_START_ALIGN + e["offset"]:DATA_START_ALIGN + e["offset"] + e["nbytes"]],
                                    template.threads) for e in entries}
        weights = _assemble(values, template, path)
        if how == "resident":
            advise(mapping, "MADV_WILLNEED", 0, len(mapping))   # after a reboot: read it all ahead
            return weights
        weights.layers = MappedLayers(weights.layers, mapping, _layer_spans(entries, len(weights.layers)))
        weights.layers.prefetch(0)
        return weights
    except (OSError, ValueError, KeyError, TypeError, EOFError):
        return None


def _layer_spans(entries: List[dict], n_layers: int) -> List[Tuple[int, int]]:
    spans = []
    for i in range(n_layers):
        mine = [e for e in entries if e["name"].split(".")[0] == str(i)]
        spans.append((DATA_START_ALIGN + min(e["offset"] for e in mine),
                      DATA_START_ALIGN + max(e["offset"] + e["nbytes"] for e in mine)))
    return spans


def _assemble(values: Dict[str, object], template: RankWeights, path: str) -> RankWeights:
    values = dict(values)
    layers = [LayerWeights(**{f: values.pop(f"{i}.{f}") for f in LAYER_FIELDS},
                           **{f: values.pop(f"{i}.{f}", None) for f in OPTIONAL_LAYER_FIELDS},
                           experts=_experts_of(values, i, template.config.n_experts))
              for i in range(template.config.n_layers)]
    if any((lw.w1 is None or lw.w3 is None or lw.w2 is None) if lw.experts is None else lw.router is None
           for lw in layers):
        raise ValueError("the shard file lacks a layer's FFN")
    embedding = template.embedding
    if "embedding" in values:      # a rank without the model file keeps the embedding here
        rows = values.pop("embedding")
        embedding = EmbeddingTable(rows=rows.rows, widen=DTYPES[rows.dtype].dequantize, source=f"{path}: embedding")
    if set(values) != {"output_norm", "output"} or embedding is None:
        raise ValueError("the shard file holds other arrays than the model's")
    return RankWeights(config=template.config, shard=template.shard, embedding=embedding, layers=layers,
                       output_norm=values["output_norm"], output=values["output"], threads=template.threads)


def _experts_of(values: Dict[str, object], layer: int, n_experts: int) -> Optional[List[ExpertWeights]]:
    """The experts of a mixture-of-experts layer, taken out of values (None for a dense model)."""
    if not n_experts:
        return None
    return [ExpertWeights(**{f: values.pop(f"{layer}.experts.{e}.{f}") for f in EXPERT_FIELDS})
            for e in range(n_experts)]


@dataclass
class Cached:
    weights: RankWeights
    path: str
    hit: bool                 # read from the shard file
    note: str                 # what happened, for the log


def cached_rank_weights(reader, shard: RankSlice, types, threads: int, folder: str, fingerprint, world_size: int,
                        progress=None, mapped: bool = False, map_found: bool = True) -> Cached:
    """This rank's weights from its shard file when a sound one exists (mapped whole and kept by
    the page cache when map_found, else read into memory); else converted from the model file and
    written to the shard file for the next start. Mapped: the weights stay in the file
    (memory-mapped, each layer asked for as it runs); a missing file is written a layer at a
    time, never holding more than one layer. A shard file that cannot be written costs the next start its time (not mapped: the
    note says why) or fails the load (mapped: there is no other place for the weights)."""
    from .loader import embedding_table, load_rank_weights, rank_weight_parts
    from .errors import TpllamaError
    key = shard_key(fingerprint, world_size, shard, types)
    path = shard_path(folder, reader.path, world_size, shard.rank, key)
    remote = getattr(reader, "remote", False)      # no model file here: the shard file holds everything
    template = RankWeights(config=reader.config, shard=shard, embedding=None if remote else embedding_table(reader),
                           layers=[], output_norm=None, output=None, threads=threads)
    existed = os.path.exists(path)
    how = "mapped" if mapped else "resident" if map_found else "read"
    weights = load(path, key, template, how) if existed else None
    if weights is not None:
        _touch(path)
        return Cached(weights, path, True, f"{'read' if how == 'read' else 'mapped'} the converted weights from {path}")
    if remote:
        raise TpllamaError(f"{path}: this rank has neither the model file nor a sound shard file of it "
                           "(the weights rank 0 sent did not arrive whole)")
    what = "rebuilt the stale or damaged" if existed else "wrote the"
    if mapped:
        try:
            _check_space(folder, None)
            save(path, rank_weight_parts(reader, shard, types, threads, progress), key)
        except OSError as e:
            raise TpllamaError(f"{path}: cannot write the shard file that mapped mode runs from ({e.strerror or e}); "
                               "free space there, or choose another folder with --shard-cache") from None
        weights = load(path, key, template, "mapped")
        if weights is None:
            raise TpllamaError(f"{path}: the shard file just written does not read back; check the disk")
        return Cached(weights, path, False, f"{what} shard file {path} and mapped it")
    weights = load_rank_weights(reader, shard, types, threads, progress)
    try:
        short = _check_space(folder, weights.nbytes)
        if short:
            return Cached(weights, path, False, f"did not write the shard file {path}: {short}")
        save(path, _parts(weights), key)
        note = f"{what} shard file {path}"
    except OSError as e:
        note = f"could not write the shard file {path} ({e.strerror or e}); the next start converts again"
    return Cached(weights, path, False, note)


def _touch(path: str) -> None:
    """Mark a shard file used now (retire_replaced keeps the most recently used)."""
    try:
        os.utime(path)
    except OSError:
        pass


def _check_space(folder: str, nbytes: Optional[int]) -> str:
    """Why the folder cannot take nbytes more (keeping 256 MiB free for everyone else); "" if it can.
    Creates the folder (OSError when it cannot)."""
    os.makedirs(folder, exist_ok=True)
    if nbytes is None:
        return ""
    if not os.access(folder, os.W_OK):
        return "the folder is not writable"
    free = shutil.disk_usage(folder).free
    need = nbytes + DATA_START_ALIGN + 2**20
    if free < need + 2**28:
        return (f"it needs {need / 2**20:,.0f} MiB and 256 MiB left free for everything else, and "
                f"{free / 2**20:,.0f} MiB are free")
    return ""

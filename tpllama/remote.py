"""Nodes without the model file: rank 0 converts their slices and sends them, once.

Copying a 40 GB model to eight SD cards, for an eighth of it each, is what a cluster of small
machines should not need. When some ranks cannot open the model path but rank 0 can, rank 0
describes the model to them (config, tensor table, fingerprint, and the tokenizer, which a
GGUF file carries in its keys), and each such rank stands in a `RemoteModel` for the reader.
Before loading, every rank without a sound shard file of its slice gets one: rank 0 converts
that rank's slice a layer at a time and sends each array in chunks of CHUNK bytes (bounded
memory on both sides), with the token embedding's rows as they are in the file; the receiving
rank writes them straight into its shard file (tpllama.shardcache). The next start finds the
shard file and sends no weight bytes.

A failure on either side never leaves the other waiting: rank 0 announces its error in place
of the next array, a receiver that cannot write keeps receiving (and drops the bytes), and
every rank then raises the error at the agreement that ends the transfer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np

from .errors import TpllamaError
from .fingerprint import model_identity
from .shardcache import ShardWriter, _arrays, _entry
from .tensors import EMBEDDING

CHUNK = 16 * 2**20        # bytes per message


@dataclass
class ModelDescription:
    """What a rank without the model file needs to know of it (sent by rank 0, pickled)."""
    path: str
    format_name: str
    config: object
    tensors: Dict[str, Tuple[str, tuple]]     # name -> (element type name, shape)
    fingerprint: tuple
    tokenizer_source: object
    identity: str = ""                        # rank 0's model_identity: its file's size and modification time


def describe(reader, fingerprint) -> ModelDescription:
    if reader.format_name != "GGUF":
        raise TpllamaError(f"{reader.path}: only a GGUF model can be sent to ranks without the file (it carries "
                           "its tokenizer); copy the model to every node, or convert it to GGUF")
    tensors = {name: (t.dtype.name, tuple(t.shape)) for name, t in reader.tensors.items()}
    return ModelDescription(reader.path, reader.format_name, reader.config, tensors, tuple(fingerprint),
                            reader.tokenizer_source(), model_identity(reader))


class RemoteModel:
    """The reader's face, for a rank without the model file: what the plan, the type choice,
    the tokenizer and the fingerprint check ask of a reader. It reads no tensor: this rank's
    weights come from its shard file."""

    remote = True

    def __init__(self, d: ModelDescription):
        self.path, self.config = d.path, d.config
        self.format_name = f"{d.format_name}, sent by rank 0"
        self._tensors, self._tokenizer_source = d.tensors, d.tokenizer_source
        self.known_fingerprint = d.fingerprint
        self.known_identity = d.identity

    def has(self, name: str) -> bool:
        return name in self._tensors

    def dtype(self, name: str) -> str:
        return self._tensors[name][0]

    def shape(self, name: str) -> tuple:
        return self._tensors[name][1]

    def tokenizer_source(self):
        return self._tokenizer_source

    def check_tensors(self) -> None:
        """Rank 0 checked them in the file."""

    def close(self) -> None:
        pass


# ------------------------------------------------------------ rank 0

def _send_array(par, entry: dict, data: np.ndarray, dest: int) -> None:
    par.send_object(entry, dest)
    flat = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    for at in range(0, flat.nbytes, CHUNK):
        par.send_bytes(flat[at:at + CHUNK], dest)


def send_shard(par, reader, shard, types, threads: int, dest: int) -> Optional[BaseException]:
    """Rank 0: convert rank `dest`'s slice a layer at a time and send it, then the embedding's
    rows. Returns the error that stopped it (announced to the receiver), or None."""
    from .loader import rank_weight_parts
    try:
        for key, value in rank_weight_parts(reader, shard, types, threads):
            for name, array in _arrays(key, value):
                entry, data = _entry(name, array)
                _send_array(par, entry, data, dest)
        t = reader.tensor(EMBEDDING)
        entry = {"name": "embedding", "wtype": "raw", "dtype": t.dtype.name, "rows": t.raw.shape[0],
                 "cols": t.raw.shape[1], "nbytes": int(t.raw.nbytes)}
        _send_array(par, entry, t.raw, dest)
        par.send_object({"end": True}, dest)
        return None
    except Exception as e:       # any failure: the receiver must not wait for the next array forever
        par.send_object({"error": f"{type(e).__name__}: {e}"}, dest)
        return e


# ------------------------------------------------------------ the rank without the file

def receive_shard(par, path: str, key: str) -> Optional[BaseException]:
    """Write what rank 0 sends into the shard file at path. Returns this rank's error (the
    transfer is drained to its end either way), or None."""
    error: Optional[BaseException] = None
    writer = None
    try:
        writer = ShardWriter(path, key)
    except OSError as e:
        error = TpllamaError(f"{path}: cannot write the shard file of the weights rank 0 sends "
                             f"({e.strerror or e}); free space there, or choose another folder with --shard-cache")
    buf = np.empty(CHUNK, dtype=np.uint8)
    while True:
        entry = par.recv_object(0)
        if "end" in entry or "error" in entry:
            break
        if error is None:
            writer.begin(entry)
        for at in range(0, entry["nbytes"], CHUNK):
            piece = buf[:min(CHUNK, entry["nbytes"] - at)]
            par.recv_bytes(piece, 0)
            if error is None:
                try:
                    writer.write(piece)
                except OSError as e:
                    error = TpllamaError(f"{path}: writing the weights rank 0 sends failed ({e.strerror or e})")
        if error is None:
            writer.end()
    if writer is not None:
        if error is None and "end" in entry:
            try:
                writer.finish()
            except OSError as e:
                error = TpllamaError(f"{path}: writing the weights rank 0 sends failed ({e.strerror or e})")
        else:
            writer.abort()
    return error

"""GGUF files (architectures llama, qwen2, qwen3, qwen3moe): the header parsed here by the spec, the tensors over a memory map.

The `gguf` package's reader trusts the counts and lengths in a file (a huge array count loops for
minutes, a bad byte in a string raises from deep inside); this parser checks each against the
file's size and sane limits first, so a malformed file gives one error naming the field."""
from __future__ import annotations

import math
import os
import struct
from typing import Optional

import numpy as np

from ..config import ARCHITECTURES, ModelConfig
from ..errors import ModelFormatError
from ..filetypes import ggml_type_name
from ..tensors import EMBEDDING, OUTPUT, ROPE_FREQS
from .base import ModelReader, make_tensor
from .tokenizer_source import TokenizerSource


GGUF_VERSIONS = (2, 3)
MAX_COUNT = 1 << 24          # keys, tensors or array items: far above any real file (a 256k vocab)
MAX_DIMS = 4
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "B", 10: "Q", 11: "q", 12: "d"}  # struct codes
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
          12: "<f8"}
_STRING, _ARRAY, _BOOL = 8, 9, 7


class GGUFHeader:
    """A GGUF header read by the spec (ggml/docs/gguf.md) with every count, length and type checked
    against the file's size before it is used: metadata {key: value} and the tensor table.

    Values: int, float, bool, str; arrays of numbers as numpy arrays, of strings as lists."""

    def __init__(self, buf: np.ndarray, path: str):
        self.mv, self.path, self.pos = memoryview(buf), path, 0   # memoryview: cheap slices, struct reads
        self.size = int(buf.shape[0])
        if self.size < 24 or bytes(self.mv[:4]) != b"GGUF":
            self._truncated(24)
        self.pos = 4
        version = self._int("I")
        if version not in GGUF_VERSIONS and int.from_bytes(version.to_bytes(4, "little"), "big") in GGUF_VERSIONS:
            raise ModelFormatError(f"{path}: a big-endian GGUF file; tpllama reads little-endian GGUF only")
        if version not in GGUF_VERSIONS:
            raise ModelFormatError(f"{path}: GGUF version {version} is not supported (expected 2 or 3)")
        n_tensors, n_kv = self._count("tensor count"), self._count("key count")
        self.metadata = {}
        for _ in range(n_kv):
            key = self._string("a key name")
            if key in self.metadata:
                raise ModelFormatError(f"{path}: GGUF key {key!r} appears twice")
            self.metadata[key] = self._value(self._int("I"), key)
        self.tensors = [self._tensor_info() for _ in range(n_tensors)]
        names = [t[0] for t in self.tensors]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ModelFormatError(f"{path}: GGUF tensor {dup!r} appears twice")
        alignment = self.metadata.get("general.alignment", 32)
        if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or alignment & (alignment - 1):
            raise ModelFormatError(f"{path}: GGUF key 'general.alignment' is {alignment!r}, expected a power of two")
        self.data_start = -(-self.pos // alignment) * alignment

    # -- reading, each step bounded by the file's size

    def _truncated(self, needed: int):
        raise ModelFormatError(f"{self.path}: GGUF file is truncated (it needs at least {needed} bytes, "
                               f"it has {self.size}); download it again")

    def _take(self, nbytes: int) -> memoryview:
        end = self.pos + nbytes
        if end > self.size:
            self._truncated(end)
        out = self.mv[self.pos:end]
        self.pos = end
        return out

    def _int(self, code: str):
        """One little-endian scalar of struct type code."""
        return struct.unpack("<" + code, self._take(struct.calcsize(code)))[0]

    def _count(self, what: str, item_bytes: int = 1) -> int:
        n = self._int("Q")
        if n > MAX_COUNT or n * item_bytes > self.size - self.pos:
            raise ModelFormatError(f"{self.path}: GGUF {what} {n} does not fit in the file "
                                   f"({self.size} bytes); not a GGUF file tpllama can read")
        return n

    def _string(self, what: str) -> str:
        n = self._count(f"length of {what}")
        return self._utf8(self._take(n), what)

    def _utf8(self, raw: memoryview, what: str) -> str:
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError:
            raise ModelFormatError(f"{self.path}: GGUF {what} is not valid UTF-8 ({bytes(raw[:40])!r})") from None

    def _value(self, vtype: int, key: str):
        if vtype == _STRING:
            return self._string(f"value of {key!r}")
        if vtype == _ARRAY:
            return self._array(key)
        if vtype not in _SCALARS:
            raise ModelFormatError(f"{self.path}: GGUF key {key!r} has value type {vtype}, which is not a GGUF type")
        value = self._int(_SCALARS[vtype])
        return bool(value) if vtype == _BOOL else value

    def _array(self, key: str):
        itype = self._int("I")
        if itype == _STRING:
            return self._strings(self._count(f"item count of {key!r}", 8), key)
        if itype not in _SCALARS:
            what = "nested arrays" if itype == _ARRAY else f"items of type {itype}, which is not a GGUF type"
            raise ModelFormatError(f"{self.path}: GGUF key {key!r} holds {what}; not supported")
        item = struct.calcsize(_SCALARS[itype])
        n = self._count(f"item count of {key!r}", item)
        values = np.frombuffer(self._take(n * item), dtype=_NUMPY[itype])
        return values.astype(bool) if itype == _BOOL else values

    def _strings(self, n: int, key: str) -> list:
        """n strings (a vocabulary: 100k-400k of them with its merges). The lengths are walked in
        a lean loop; then every length field becomes a NUL and all the bytes are decoded at once
        and split there. Where that cannot be right (a length beyond the file, a string holding a
        NUL, invalid UTF-8), `_strings_checked` reads them one by one and names the bad item."""
        start = self.pos
        heads = self._string_heads(n)
        if heads is None:
            return self._strings_checked(n, key)
        if not n:
            return []
        region = np.frombuffer(self.mv[start:self.pos], dtype=np.uint8).copy()
        heads = np.asarray(heads, dtype=np.int64) - start
        keep = np.ones(region.size, dtype=bool)
        for k in range(7):                       # a length field's first 7 bytes go, its 8th is the NUL
            keep[heads + k] = False
        region[heads + 7] = 0
        joined = region[keep]
        if np.count_nonzero(joined == 0) == n:
            try:
                return joined[1:].tobytes().decode("utf-8").split("\x00")
            except UnicodeDecodeError:
                pass
        self.pos = start
        return self._strings_checked(n, key)

    def _string_heads(self, n: int) -> Optional[list]:
        """The offsets of n consecutive strings' length fields, moving past them; None (and not
        moved) when a length runs beyond the file."""
        mv, pos = self.mv, self.pos
        length_of = struct.Struct("<Q").unpack_from
        heads = [0] * n
        try:
            for i in range(n):
                heads[i] = pos
                pos += 8 + length_of(mv, pos)[0]
        except (struct.error, OverflowError):    # a length field, or a length, past the end of the file
            return None
        if pos > self.size:
            return None
        self.pos = pos
        return heads

    def _strings_checked(self, n: int, key: str) -> list:
        """`_strings`, one check at a time: raises the error that names the first bad item."""
        mv, size, pos, out = self.mv, self.size, self.pos, []
        length_of = struct.Struct("<Q").unpack_from
        for i in range(n):
            if pos + 8 > size:
                self._truncated(pos + 8)
            (length,) = length_of(mv, pos)
            pos += 8
            if length > size - pos:
                raise ModelFormatError(f"{self.path}: GGUF length of {key}[{i}] {length} does not fit in the file "
                                       f"({size} bytes); not a GGUF file tpllama can read")
            out.append(self._utf8(mv[pos:pos + length], f"value of {key}[{i}]"))
            pos += length
        self.pos = pos
        return out

    def _tensor_info(self):
        name = self._string("tensor name")
        n_dims = self._int("I")
        if not 1 <= n_dims <= MAX_DIMS:
            raise ModelFormatError(f"{self.path}: GGUF tensor {name!r} has {n_dims} dimensions, expected 1 to {MAX_DIMS}")
        ne = [self._int("Q") for _ in range(n_dims)]
        if min(ne) <= 0 or math.prod(ne) > 8 * self.size:
            raise ModelFormatError(f"{self.path}: GGUF tensor {name!r} has dimensions {ne}, "
                                   f"which do not fit in the file ({self.size} bytes)")
        type_number = self._int("I")
        try:
            type_name = ggml_type_name(type_number)
        except ValueError:
            raise ModelFormatError(f"{self.path}: GGUF tensor {name!r} has type number {type_number}, "
                                   "which is not a GGML type") from None
        return name, ne, type_name, self._int("Q")


class GGUFModel(ModelReader):
    format_name = "GGUF"

    def __init__(self, path: str):
        super().__init__(path)
        buf = self.map_file(path)
        header = GGUFHeader(buf, path)
        self.metadata = kv = header.metadata
        vocab_key = f"{kv.get('general.architecture')}.vocab_size"
        if vocab_key not in kv and "tokenizer.ggml.tokens" not in kv:
            # no vocabulary in the file: the embedding's rows are the vocabulary
            embd = [ne for name, ne, _, _ in header.tensors if name == EMBEDDING and len(ne) >= 2]
            if embd:
                kv = dict(kv, **{vocab_key: int(embd[0][1])})
        self.config = ModelConfig.from_gguf(kv, name=os.path.basename(path), source=path)
        for name, ne, type_name, offset in header.tensors:
            # GGUF order: ne[0] is the row length; trailing dimensions of 1 are dropped
            shape = (ne[1], ne[0]) if len(ne) >= 2 and all(n == 1 for n in ne[2:]) else tuple(ne[::-1])
            self.tensors[name] = make_tensor(name, shape, type_name, buf, header.data_start + offset, path)
        self.config = self._with_file_facts(self.config)
        if ARCHITECTURES[self.config.arch].gguf_rotate_half:
            self.interleave_rotary_rows()   # llama.cpp's converter leaves qwen2/qwen3 q/k rows as HF has them
        if self.tensors:    # a vocab-only GGUF (no tensors) still opens for its keys; loading its weights fails
            self.check_tensors()

    def tokenizer_source(self) -> TokenizerSource:
        """The embedded vocabulary when the file has one, else files beside it; and the file's chat
        template, for a tokenizer given without one."""
        template = self.metadata.get("tokenizer.chat_template")
        template = template if isinstance(template, str) and template else None
        if "tokenizer.ggml.model" in self.metadata:
            return TokenizerSource(self.path, self.config.vocab_size, gguf_vocabulary=self.metadata,
                                   chat_template=template)
        return TokenizerSource.beside_file(self.path, self.config.vocab_size, chat_template=template)

    def _with_file_facts(self, cfg: ModelConfig) -> ModelConfig:
        """Facts the GGUF keys leave to the tensors: tied output and rope frequency factors."""
        from dataclasses import replace
        changes = {"tie_embeddings": OUTPUT not in self.tensors}
        if ROPE_FREQS in self.tensors:
            factors = self.read(ROPE_FREQS)
            if factors.size != cfg.head_dim // 2:
                raise ModelFormatError(f"{self.path}: tensor 'rope_freqs.weight' has {factors.size} values, expected "
                                       f"{cfg.head_dim // 2} (half the head size {cfg.head_dim})")
            if not (np.isfinite(factors).all() and (factors > 0).all()):
                raise ModelFormatError(f"{self.path}: tensor 'rope_freqs.weight' holds values that are not "
                                       "positive finite numbers")
            changes["rope_freq_factors"] = tuple(float(v) for v in factors)
        return replace(cfg, **changes)


def read_gguf_metadata(path: str) -> dict:
    """The keys of a GGUF file (for its vocabulary: no model config needed)."""
    return GGUFHeader(np.memmap(path, dtype=np.uint8, mode="r").view(np.ndarray), path).metadata

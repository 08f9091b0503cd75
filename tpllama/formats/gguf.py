"""GGUF files (architecture llama), read with the `gguf` package over a memory map."""
from __future__ import annotations

import os

import numpy as np
from gguf import GGUFReader, GGUFValueType

from ..config import ModelConfig
from ..errors import ModelFormatError
from .base import ModelReader, make_tensor


class _PlainArrayGGUFReader(GGUFReader):
    """GGUFReader over a plain ndarray view of its memory map.

    np.memmap's per-slice bookkeeping made parsing a 50k-token vocab take seconds;
    a plain view of the same mapping reads the same bytes four times faster."""

    @property
    def data(self):
        return self._data

    @data.setter
    def data(self, value):
        self.mapped = value
        self._data = value.view(np.ndarray)

    def _get(self, offset, dtype, count=1, override_order=None):
        # The package slices past the end of a short file without noticing and then fails with
        # an unrelated numpy message (or not at all); say what happened instead.
        end = int(offset) + np.dtype(dtype).itemsize * int(count)
        if end > self._data.shape[0]:
            raise GGUFTruncated(end, self._data.shape[0])
        return super()._get(offset, dtype, count, override_order)


class GGUFTruncated(ValueError):
    """The GGUF header or a tensor's data runs past the end of the file."""

    def __init__(self, needed: int, size: int):
        super().__init__(f"file is truncated (it needs at least {needed} bytes, it has {size})")
        self.needed, self.size = needed, size


def _field_value(field):
    if field.types and field.types[0] == GGUFValueType.ARRAY and len(field.types) > 1 \
            and field.types[1] not in (GGUFValueType.STRING, GGUFValueType.ARRAY):
        # numeric arrays (scores, token types) as one numpy array, not a list of scalars
        return np.concatenate([field.parts[i] for i in field.data]) if field.data else np.array([])
    return field.contents()


def read_gguf_metadata(reader: GGUFReader) -> dict:
    return {name: _field_value(f) for name, f in reader.fields.items()}


class GGUFModel(ModelReader):
    format_name = "GGUF"

    def __init__(self, path: str):
        super().__init__(path)
        try:
            reader = _PlainArrayGGUFReader(path)
        except GGUFTruncated as e:
            raise ModelFormatError(f"{path}: GGUF {e}; download it again") from None
        except ValueError as e:
            raise ModelFormatError(f"{path}: not a readable GGUF file ({e})") from None
        except (IndexError, EOFError):
            raise ModelFormatError(f"{path}: GGUF header is truncated; download the file again") from None
        self.metadata = read_gguf_metadata(reader)
        kv = self.metadata
        if "llama.vocab_size" not in kv and "tokenizer.ggml.tokens" not in kv:
            # no vocabulary in the file: the embedding's rows are the vocabulary
            embd = [t for t in reader.tensors if t.name == "token_embd.weight" and len(t.shape) >= 2]
            if embd:
                kv = dict(kv, **{"llama.vocab_size": int(embd[0].shape[1])})
        self.config = ModelConfig.from_gguf(kv, name=os.path.basename(path), source=path)
        self.add_mapping(reader.mapped)
        buf = reader.data.reshape(-1)
        for t in reader.tensors:
            ne = [int(n) for n in t.shape]            # GGUF order: ne[0] is the row length
            shape = (ne[1], ne[0]) if len(ne) == 2 else (ne[0],)
            if len(ne) > 2 and all(n == 1 for n in ne[2:]):
                shape = (ne[1], ne[0])
            self.tensors[t.name] = make_tensor(t.name, shape, t.tensor_type.name, buf, int(t.data_offset), path)
        self.config = self._with_file_facts(self.config)
        if self.tensors:    # a vocab-only GGUF (no tensors) still opens for its keys; loading its weights fails
            self.check_tensors()
        # The reader's per-element field objects (~40 MB for a 50k vocab) are not needed any more;
        # the tensor views keep the memory map alive.
        del reader

    def _with_file_facts(self, cfg: ModelConfig) -> ModelConfig:
        """Facts the GGUF keys leave to the tensors: tied output and rope frequency factors."""
        from dataclasses import replace
        changes = {"tie_embeddings": "output.weight" not in self.tensors}
        if "rope_freqs.weight" in self.tensors:
            factors = self.read("rope_freqs.weight")
            if factors.size != cfg.head_dim // 2:
                raise ModelFormatError(f"{self.path}: tensor 'rope_freqs.weight' has {factors.size} values, expected "
                                       f"{cfg.head_dim // 2} (half the head size {cfg.head_dim})")
            changes["rope_freq_factors"] = tuple(float(v) for v in factors)
        return replace(cfg, **changes)

"""Hugging Face model directories: config.json + model.safetensors or sharded safetensors.

The safetensors header is read by the spec (8-byte length + JSON) and the data memory-mapped
directly: the `safetensors` package's numpy framework cannot hand out bfloat16, and a
memory map gives row slices of every dtype without reading the rest of the file.
"""
from __future__ import annotations

import math
import os
import struct

from ..config import ModelConfig
from ..errors import ModelFormatError
from ..tensors import EMBEDDING, HF_EMBEDDING, OUTPUT, from_hf_name
from .base import ModelReader, make_tensor
from .tokenizer_source import TokenizerSource
from .jsonfile import parse_json_object, read_json_object

SAFETENSORS_DTYPES = {"F32": "F32", "F16": "F16", "BF16": "BF16"}


def _read_safetensors_header(path: str):
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelFormatError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 * 2**20):
            raise ModelFormatError(f"{path}: not a safetensors file (bad header length {n})")
        header = parse_json_object(f.read(n), path, "safetensors header")
    return header, 8 + n, size


def _entry(meta, file: str, hf_name: str):
    """(dtype or None, begin, end, shape) of one header entry, each checked for its JSON type."""
    def whole(v):
        return isinstance(v, int) and not isinstance(v, bool)
    ok = (isinstance(meta, dict) and isinstance(meta.get("dtype"), str)
          and isinstance(meta.get("data_offsets"), list) and len(meta["data_offsets"]) == 2
          and all(whole(v) for v in meta["data_offsets"])
          and isinstance(meta.get("shape"), list) and all(whole(v) for v in meta["shape"]))
    if not ok:
        raise ModelFormatError(f"{file}: not a valid safetensors header (entry {hf_name!r} is {meta!r:.80})")
    begin, end = meta["data_offsets"]
    return SAFETENSORS_DTYPES.get(meta["dtype"]), begin, end, list(meta["shape"])


class HFModel(ModelReader):
    format_name = "Hugging Face"

    def __init__(self, path: str):
        super().__init__(path)
        cfg_path = os.path.join(path, "config.json")
        hf_config = read_json_object(cfg_path, "config.json")
        self.hf_config = hf_config
        self.config = ModelConfig.from_hf(hf_config, name=os.path.basename(os.path.abspath(path)), source=cfg_path)
        for file in self._weight_files():
            self._add_file(file)
        if EMBEDDING not in self.tensors:
            raise ModelFormatError(f"{path}: no {HF_EMBEDDING} in the safetensors files")
        if not self.config.tie_embeddings and OUTPUT not in self.tensors:
            raise ModelFormatError(f"{path}: config.json says tie_word_embeddings=false but there is no lm_head.weight")
        self.interleave_rotary_rows()    # HF stores q/k rows in rotate-half order, every architecture
        self.check_tensors()

    def tokenizer_source(self) -> TokenizerSource:
        return TokenizerSource.hf_directory(self.path, self.config.vocab_size)

    def _weight_files(self):
        index = os.path.join(self.path, "model.safetensors.index.json")
        single = os.path.join(self.path, "model.safetensors")
        if os.path.exists(index):
            weight_map = read_json_object(index, "safetensors index").get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) and v for v in weight_map.values()):
                raise ModelFormatError(f"{index}: not a safetensors index (expected \"weight_map\": "
                                       "{tensor name: file name})")
            files = sorted({os.path.join(self.path, v) for v in weight_map.values()})
            for file in files:
                if not os.path.exists(file):
                    raise ModelFormatError(f"{file}: missing (model.safetensors.index.json lists it); "
                                           "download every shard of the model")
            return files
        if os.path.exists(single):
            return [single]
        raise ModelFormatError(f"{self.path}: no model.safetensors or model.safetensors.index.json")

    def _add_file(self, file: str):
        if not os.path.exists(file):
            raise ModelFormatError(f"{file}: listed in the index but missing")
        header, data_start, size = _read_safetensors_header(file)
        buf = self.map_file(file)
        for hf_name, meta in header.items():
            if hf_name == "__metadata__":
                continue
            name = from_hf_name(hf_name)
            if name is None:
                continue
            dtype, begin, end, shape = _entry(meta, file, hf_name)
            if dtype is None:
                raise ModelFormatError(f"{file}: tensor {hf_name!r} has dtype {meta['dtype']}, expected F32, F16 or BF16")
            if not 0 <= begin <= end or len(shape) not in (1, 2) or min(shape) <= 0:
                raise ModelFormatError(f"{file}: tensor {hf_name!r} has data_offsets [{begin}, {end}] and shape {shape}; "
                                       "expected a 1-D or 2-D tensor with positive sizes")
            if data_start + end > size:
                raise ModelFormatError(f"{file}: file is truncated (tensor {hf_name!r} ends at byte {data_start + end}, file has {size})")
            nbytes = math.prod(shape) * (4 if dtype == "F32" else 2)
            if end - begin != nbytes:
                raise ModelFormatError(f"{file}: tensor {hf_name!r} spans {end - begin} bytes but its shape {shape} "
                                       f"in {meta['dtype']} needs {nbytes}; not a valid safetensors file")
            self.tensors[name] = make_tensor(name, shape, dtype, buf, data_start + begin, file)

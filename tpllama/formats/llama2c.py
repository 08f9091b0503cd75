"""llama2.c checkpoints (legacy format): a 7-int32 header followed by float32 tensors.

Layout (karpathy/llama2.c run.c, memory_map_weights): token embedding, then each layer tensor
stacked over the layers in tensors.LLAMA2C_ORDER (rows = outputs), final norm, two unused
RoPE tables, and the classifier when it is not shared.
"""
from __future__ import annotations

import os

import numpy as np

from ..config import ModelConfig
from ..errors import ModelFormatError
from ..tensors import EMBEDDING, LLAMA2C_ORDER, OUTPUT, OUTPUT_NORM, layer_names, layer_shapes
from .base import ModelReader, make_tensor

HEADER_BYTES = 7 * 4


class Llama2cModel(ModelReader):
    format_name = "llama2.c"

    def __init__(self, path: str):
        super().__init__(path)
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
        if head[:4] == b"ak42":
            raise ModelFormatError(f"{path}: llama2.c export version 1/2 (magic 'ak42') is not supported; export with the legacy format (version 0)")
        if len(head) < HEADER_BYTES:
            raise ModelFormatError(f"{path}: too short for a llama2.c checkpoint")
        header = np.frombuffer(head, dtype="<i4")
        dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = (int(v) for v in header)
        if not (0 < dim <= 65536 and 0 < hidden <= 1 << 20 and 0 < n_layers <= 1024 and 0 < n_heads <= dim
                and 0 < n_kv <= n_heads and 0 < abs(vocab) <= 1 << 22 and 0 < seq_len <= 1 << 24
                and dim % n_heads == 0):
            raise ModelFormatError(f"{path}: not a llama2.c checkpoint (implausible header {header.tolist()}); "
                                   "expected GGUF, a Hugging Face directory or a llama2.c .bin")
        self.config = ModelConfig.from_llama2c(header, name=os.path.basename(path), source=path)
        self._map = self.map_file(path)
        self._layout(size)

    def _layout(self, size: int):
        c = self.config
        L, d, hd = c.n_layers, c.dim, c.head_dim
        offset = HEADER_BYTES
        shapes = layer_shapes(c)
        entries = [(EMBEDDING, None, (c.vocab_size, d))]
        entries += [(role, L, shapes[role]) for role in LLAMA2C_ORDER]   # each stacked over the layers
        entries.append((OUTPUT_NORM, None, (d,)))
        entries.append(("<rope tables>", None, (c.max_seq_len * hd,)))  # freq_cis_real and _imag, unused
        if not c.tie_embeddings:
            entries.append((OUTPUT, None, (c.vocab_size, d)))
        expected = HEADER_BYTES + 4 * sum(int(np.prod(s)) * (n or 1) for _, n, s in entries)
        header = (f"the llama2.c header (dim {c.dim}, {c.n_layers} layers, FFN {c.hidden_dim}, vocab {c.vocab_size}, "
                  f"{'shared' if c.tie_embeddings else 'separate'} classifier)")
        if size < expected:
            raise ModelFormatError(f"{self.path}: file is truncated ({size} bytes, {header} needs {expected}); "
                                   "download it again")
        if size > expected:
            raise ModelFormatError(f"{self.path}: {size - expected} bytes more than {header} describes "
                                   f"({size}, expected {expected}); not a legacy (version 0) llama2.c checkpoint")
        for name, n_stack, shape in entries:
            for i in range(n_stack or 1):
                full = layer_names(i)[name] if n_stack else name
                if not full.startswith("<"):
                    self.tensors[full] = make_tensor(full, shape, "F32", self._map, offset, self.path)
                offset += 4 * int(np.prod(shape))

    def close(self):
        super().close()
        self._map = None

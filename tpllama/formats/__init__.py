"""Model file readers: open_model(path) picks the reader from what the path holds."""
from __future__ import annotations

import os

from ..errors import ModelFormatError
from .base import ModelReader, RawTensor

__all__ = ["open_model", "ModelReader", "RawTensor"]

EXPECTED = "expected a GGUF file, a Hugging Face directory (config.json + safetensors) or a llama2.c .bin checkpoint"


def open_model(path: str) -> ModelReader:
    """Open a model for lazy, sliced tensor reads. Raises ModelFormatError with a one-line reason."""
    path = os.path.expanduser(str(path))
    if not os.path.exists(path):
        raise ModelFormatError(f"{path}: no such file or directory; {EXPECTED}")
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "config.json")):
            raise ModelFormatError(f"{path}: directory has no config.json; {EXPECTED}")
        from .hf import HFModel
        return HFModel(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if not magic:
        raise ModelFormatError(f"{path}: file is empty; {EXPECTED}")
    if magic == b"GGUF":
        from .gguf import GGUFModel
        return GGUFModel(path)
    if magic in (b"GGML", b"GGJT", b"GGLA", b"lmgg", b"tjgg"):
        raise ModelFormatError(f"{path}: old GGML/GGJT file; convert it to GGUF with llama.cpp's tools")
    if magic == b"PK\x03\x04":
        raise ModelFormatError(f"{path}: a zip archive (a PyTorch checkpoint?), not a model file tpllama reads; {EXPECTED}")
    if path.endswith(".bin") or magic == b"ak42":
        from .llama2c import Llama2cModel
        return Llama2cModel(path)
    raise ModelFormatError(f"{path}: unrecognised file (starts with {magic!r}); {EXPECTED}")

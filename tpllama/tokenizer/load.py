"""Choosing and loading the tokenizer for a model: `load_tokenizer(reader, path)` from what the
model's reader says (`ModelReader.tokenizer_source()`: an embedded GGUF vocabulary, or tokenizer
files to look for, and the model's chat template), `load_tokenizer_file(path)` by what a file holds.
The loaded tokenizer must fit the model's embedding."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Optional

from ..errors import ModelFormatError
from .base import MAX_TOKENIZER_FILE_BYTES, TOKENIZER_FLAG_HINT, Tokenizer
from .bpe import is_tiktoken, load_tiktoken, load_tokenizer_json
from .gguf_vocab import tokenizer_from_gguf
from .sentencepiece import load_llama2c_file, load_sentencepiece_file

if TYPE_CHECKING:
    from ..formats.tokenizer_source import TokenizerSource


def load_tokenizer_file(path: str) -> Tokenizer:
    """A tokenizer from one file (or a Hugging Face directory), by what the file holds."""
    path = os.path.expanduser(str(path))
    if os.path.isdir(path):
        return _load_hf_dir(path)
    if not os.path.isfile(path):
        raise ModelFormatError(f"{path}: tokenizer file not found")
    with open(path, "rb") as f:
        head = f.read(4)
    if head != b"GGUF" and os.path.getsize(path) > MAX_TOKENIZER_FILE_BYTES:
        raise ModelFormatError(f"{path}: {os.path.getsize(path) >> 20} MiB is too big for a tokenizer file "
                               f"(at most {MAX_TOKENIZER_FILE_BYTES >> 20} MiB); {TOKENIZER_FLAG_HINT}")
    if head == b"GGUF":
        return tokenizer_from_gguf(_read_gguf_metadata(path), path)
    if path.endswith(".json"):
        return load_tokenizer_json(path)
    if path.endswith(".bin"):
        return load_llama2c_file(path)
    if is_tiktoken(path):
        return load_tiktoken(path)
    return load_sentencepiece_file(path)


def _read_gguf_metadata(path: str) -> dict:
    """The keys of a GGUF used only for its vocabulary: no model config needed (vocab-only files)."""
    from ..formats.gguf import read_gguf_metadata
    return read_gguf_metadata(path)


def _load_hf_dir(directory: str) -> Tokenizer:
    for name in ("tokenizer.json", "tokenizer.model"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return load_tokenizer_file(path)
    raise ModelFormatError(f"{directory}: no tokenizer.json or tokenizer.model; {TOKENIZER_FLAG_HINT}")


def load_tokenizer(reader, tokenizer_path: Optional[str] = None) -> Tokenizer:
    """The tokenizer for a model reader: `tokenizer_path` when given, else the GGUF's embedded
    vocabulary, the HF directory's tokenizer files, or tokenizer.bin / tok{N}.bin beside a
    llama2.c checkpoint. Raises ModelFormatError when none is found or its size does not fit."""
    source = reader.tokenizer_source() if reader is not None else None
    if tokenizer_path:
        tok = load_tokenizer_file(tokenizer_path)
    elif source is not None and source.gguf_vocabulary is not None:
        tok = tokenizer_from_gguf(source.gguf_vocabulary, source.model_path)
    elif source is not None:
        found = [p for p in source.files if os.path.isfile(p)]
        if not found:
            looked = ", ".join(source.files)
            raise ModelFormatError(f"{source.model_path}: no tokenizer found (looked for {looked}); "
                                   f"{TOKENIZER_FLAG_HINT}")
        tok = load_tokenizer_file(found[0])
    else:
        raise ValueError("load_tokenizer needs a model reader or a tokenizer_path")
    if source is not None:
        if tok.chat_template is None:   # a tokenizer given by --tokenizer has none; the model file may have one
            tok.chat_template = source.chat_template
        _check_vocab_size(tok, source)
    return tok


def _check_vocab_size(tok: Tokenizer, source: "TokenizerSource"):
    # HF embeddings are often padded past the tokenizer (e.g. to a multiple of 64); elsewhere the
    # vocabulary and the embedding rows come from one conversion and must match exactly
    fits = tok.vocab_size <= source.vocab_size if source.padded_vocab else tok.vocab_size == source.vocab_size
    if not fits:
        raise ModelFormatError(f"{tok.source}: tokenizer has {tok.vocab_size} tokens but the model {source.model_path} "
                               f"has vocab_size {source.vocab_size}; {TOKENIZER_FLAG_HINT}")

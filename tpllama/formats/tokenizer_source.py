"""What a model reader tells the tokenizer package: where the model's tokenizer is.

`ModelReader.tokenizer_source()` returns a `TokenizerSource`; `tpllama.tokenizer.load_tokenizer`
reads only that, never a reader's class or format name. Each reader knows its own layout: a GGUF
file may embed its vocabulary, a Hugging Face directory holds tokenizer.json / tokenizer.model,
a llama2.c checkpoint has tokenizer.bin or tok{N}.bin beside it."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Tuple


@dataclass(frozen=True)
class TokenizerSource:
    """A model's tokenizer: a vocabulary inside the model file, or the files to look for; and what
    the loaded tokenizer must fit (the embedding's rows)."""

    model_path: str                          # the model, as errors name it
    vocab_size: int                          # rows of the model's token embedding
    gguf_vocabulary: Optional[dict] = None   # GGUF keys of a vocabulary embedded in the model (tokenizer.ggml.*)
    files: Tuple[str, ...] = ()              # else tokenizer files to look for, best first
    chat_template: Optional[str] = None      # the model file's own template, for a tokenizer file without one
    padded_vocab: bool = False               # the embedding may have more rows than the tokenizer has tokens

    @classmethod
    def beside_file(cls, model_path: str, vocab_size: int, **kw) -> "TokenizerSource":
        """A single-file model: llama2.c's tok{N}.bin or tokenizer.bin, or HF tokenizer files, next to it."""
        directory = os.path.dirname(os.path.abspath(model_path))
        names = (f"tok{vocab_size}.bin", "tokenizer.bin", "tokenizer.json", "tokenizer.model")
        return cls(model_path, vocab_size, files=tuple(os.path.join(directory, n) for n in names), **kw)

    @classmethod
    def hf_directory(cls, directory: str, vocab_size: int) -> "TokenizerSource":
        """A Hugging Face directory: its tokenizer files; its embedding is often padded past the
        tokenizer (e.g. to a multiple of 64)."""
        names = ("tokenizer.json", "tokenizer.model")
        return cls(directory, vocab_size, files=tuple(os.path.join(directory, n) for n in names), padded_vocab=True)

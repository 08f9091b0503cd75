"""Tokenizers: text <-> token ids for every model source tpllama reads, and chat encoding.

Three implementations behind one `Tokenizer` interface (base.py, with `StreamDecoder`):

* SentencePiece and llama2.c (sentencepiece.py): Llama 2 style `.model` files, GGUF `llama`
  vocabularies rebuilt as a SentencePiece model, and llama2.c's `tokenizer.bin` / `tok{N}.bin`.
* Byte-level BPE on the `tokenizers` library (bpe.py): `tokenizer.json`, GGUF `gpt2` vocabularies
  (gguf_vocab.py: merges + llama.cpp's pre-tokenizer regexes) and Llama 3's tiktoken `tokenizer.model`.

`load_tokenizer(reader, tokenizer_path)` (load.py) picks one from what the model's reader says
(`ModelReader.tokenizer_source()`). Chat templates render in a sandbox (templates.py); chat.py
keeps message text apart from the template's special tokens. specials.py and sidecar.py hold
what the others share: token types and special-token splitting, and the JSON files beside an HF
tokenizer. snapshot.py keeps a GGUF SentencePiece vocabulary's built tokenizer beside the shard
files, for the next start to read back.
"""
from .base import MAX_TOKENIZER_FILE_BYTES, TOKENIZER_FLAG_HINT, StreamDecoder, Tokenizer
from .bpe import HFTokenizer
from .chat import CHATML_TEMPLATE, LLAMA2_TEMPLATE, LLAMA3_TEMPLATE
from .load import load_tokenizer, load_tokenizer_file
from .sentencepiece import Llama2cTokenizer, SentencePieceTokenizer
from .specials import BYTE, CONTROL, END_OF_TURN_TOKENS, NORMAL, UNKNOWN, UNUSED, USER_DEFINED
from .templates import ChatTemplate, ChatTemplateError

__all__ = [
    "Tokenizer", "StreamDecoder", "SentencePieceTokenizer", "Llama2cTokenizer", "HFTokenizer",
    "load_tokenizer", "load_tokenizer_file", "ChatTemplate", "ChatTemplateError",
    "END_OF_TURN_TOKENS", "TOKENIZER_FLAG_HINT", "MAX_TOKENIZER_FILE_BYTES",
    "LLAMA3_TEMPLATE", "CHATML_TEMPLATE", "LLAMA2_TEMPLATE",
    "NORMAL", "UNKNOWN", "CONTROL", "USER_DEFINED", "UNUSED", "BYTE",
]

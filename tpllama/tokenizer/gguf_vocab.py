"""Tokenizers from a GGUF file's embedded vocabulary (the `tokenizer.ggml.*` keys): a `llama`
vocabulary becomes a SentencePiece model, a `gpt2` one a byte-level BPE pipeline. Every key is
checked for its type first, so a malformed file gives one error naming the key."""
from __future__ import annotations

import warnings
from typing import List, Optional, Sequence

import numpy as np

from ..errors import ModelFormatError
from .base import TOKENIZER_FLAG_HINT, Tokenizer
from .bpe import NFC_PRE, PRE_ALIASES, PRE_TOKENIZERS, HFTokenizer, add_special_tokens, bytelevel_pipeline, bytelevel_tokenizer
from .sentencepiece import SentencePieceTokenizer, spm_model_proto
from .specials import BYTE, CONTROL, END_OF_TURN_TOKENS, NORMAL, UNKNOWN, UNUSED, USER_DEFINED


def _gguf_strings(meta: dict, key: str, path: str) -> Optional[List[str]]:
    """A GGUF key that must hold an array of strings (None when absent)."""
    value = meta.get(key)
    if value is not None and not (isinstance(value, list) and set(map(type, value)) <= {str}):
        raise ModelFormatError(f"{path}: GGUF key {key!r} is not an array of strings")
    return value


def _gguf_flag(meta: dict, key: str, default: bool, path: str) -> bool:
    """A GGUF key that must hold a bool (or a 0/1 number) when present."""
    value = meta.get(key, default)
    if not isinstance(value, (bool, int, np.bool_, np.integer)):
        raise ModelFormatError(f"{path}: GGUF key {key!r} is not a bool")
    return bool(value)


def _gguf_text(meta: dict, key: str, path: str) -> Optional[str]:
    """A GGUF key that must hold a string when present."""
    value = meta.get(key)
    if value is not None and not isinstance(value, str):
        raise ModelFormatError(f"{path}: GGUF key {key!r} is not a string")
    return value


def _gguf_numbers(meta: dict, key: str, path: str, count: int):
    """A GGUF key that must hold an array of `count` numbers (None when absent)."""
    value = meta.get(key)
    if value is None:
        return None
    if not (hasattr(value, "dtype") and value.ndim == 1 and value.dtype.kind in "iuf"):
        raise ModelFormatError(f"{path}: GGUF key {key!r} is not an array of numbers")
    if len(value) != count:
        raise ModelFormatError(f"{path}: GGUF key {key!r} has {len(value)} entries for {count} tokens")
    if not np.isfinite(value).all():
        raise ModelFormatError(f"{path}: GGUF key {key!r} holds a NaN or infinite value")
    return value


def _gguf_special_ids(meta: dict, tokens: Sequence[str], types: Sequence[int], bos_default, eos_default):
    def get(key, default=None):
        v = meta.get(f"tokenizer.ggml.{key}", default)
        whole = isinstance(v, (int, np.integer)) and not isinstance(v, bool)
        return int(v) if whole and 0 <= int(v) < len(tokens) else None
    bos, eos = get("bos_token_id", bos_default), get("eos_token_id", eos_default)
    stop = {eos, get("eot_token_id"), get("eom_token_id")}
    stop |= {i for i, t in enumerate(types) if (t == CONTROL or t == USER_DEFINED) and tokens[i] in END_OF_TURN_TOKENS}
    return bos, eos, stop - {None}


def tokenizer_from_gguf(meta: dict, path: str) -> Tokenizer:
    """The tokenizer of a GGUF file's keys `meta` (path names the file in errors)."""
    model = meta.get("tokenizer.ggml.model")
    if model is None:
        raise ModelFormatError(f"{path}: GGUF file has no embedded tokenizer (no tokenizer.ggml.model); "
                               f"{TOKENIZER_FLAG_HINT}")
    tokens = _gguf_strings(meta, "tokenizer.ggml.tokens", path)
    if not tokens:
        raise ModelFormatError(f"{path}: GGUF tokenizer has no tokenizer.ggml.tokens list")
    types = _gguf_numbers(meta, "tokenizer.ggml.token_type", path, len(tokens))
    types = [NORMAL] * len(tokens) if types is None else types.astype(np.int64).tolist()
    if model == "llama":
        return _gguf_spm(meta, path, tokens, types)
    if model == "gpt2":
        return _gguf_bpe(meta, path, tokens, types)
    raise ModelFormatError(f"{path}: tokenizer.ggml.model '{model}' is not supported; expected 'llama' "
                           f"(SentencePiece) or 'gpt2' (BPE); {TOKENIZER_FLAG_HINT}")


def _gguf_spm(meta: dict, path: str, tokens: Sequence[str], types: List[int]) -> SentencePieceTokenizer:
    import sentencepiece as spm
    scores = _gguf_numbers(meta, "tokenizer.ggml.scores", path, len(tokens))
    scores = [0.0] * len(tokens) if scores is None else scores.astype(np.float64).tolist()
    types = [NORMAL if t not in (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE) else t for t in types]
    bos, eos, stop = _gguf_special_ids(meta, tokens, types, 1, 2)
    add_prefix = _gguf_flag(meta, "tokenizer.ggml.add_space_prefix", True, path)
    proto = spm_model_proto(tokens, scores, types, bos=bos, eos=eos, add_dummy_prefix=add_prefix,
                            remove_extra_whitespaces=_gguf_flag(meta, "tokenizer.ggml.remove_extra_whitespaces", False, path))
    try:
        sp = spm.SentencePieceProcessor(model_proto=proto)
    except (RuntimeError, OSError) as e:
        raise ModelFormatError(f"{path}: GGUF 'llama' vocabulary is not a valid SentencePiece model ({e})") from None
    return SentencePieceTokenizer(sp, pieces=list(tokens), types=types, source=path, bos_id=bos, eos_ids=stop,
                                  eos_id=eos, add_bos=_gguf_flag(meta, "tokenizer.ggml.add_bos_token", True, path),
                                  chat_template=_gguf_text(meta, "tokenizer.chat_template", path),
                                  add_dummy_prefix=add_prefix)


def _gguf_bpe(meta: dict, path: str, tokens: Sequence[str], types: List[int]) -> HFTokenizer:
    pre = _gguf_text(meta, "tokenizer.ggml.pre", path) or "default"
    name = PRE_ALIASES.get(pre, pre)
    if name not in PRE_TOKENIZERS:
        warnings.warn(f"{path}: unknown tokenizer.ggml.pre '{pre}', using llama.cpp's 'default' pre-tokenizer")
        name = "default"
    regexes, ignore_merges, add_bos_default = PRE_TOKENIZERS[name]
    merges = _gguf_strings(meta, "tokenizer.ggml.merges", path)
    if merges is None:
        raise ModelFormatError(f"{path}: GGUF 'gpt2' tokenizer has no tokenizer.ggml.merges")
    vocab = dict(zip(reversed(tokens), range(len(tokens) - 1, -1, -1)))   # a repeated token: its first id
    # like llama.cpp: a pair may start with a space
    pairs = [(m[:k], m[k + 1:]) for m in merges if (k := m.find(" ", 1)) > 0]
    tok = bytelevel_pipeline(vocab, pairs, regexes, ignore_merges, path, nfc=pre in NFC_PRE)
    add_special_tokens(tok, tokens, types)
    bos, eos, stop = _gguf_special_ids(meta, tokens, types, None, None)
    add_bos = _gguf_flag(meta, "tokenizer.ggml.add_bos_token", add_bos_default, path)
    return bytelevel_tokenizer(tok, tokens, types, source=path, bos_id=bos, eos_ids=stop, eos_id=eos,
                               add_bos=add_bos, chat_template=_gguf_text(meta, "tokenizer.chat_template", path))


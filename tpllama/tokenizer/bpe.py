"""Byte-level BPE on the `tokenizers` library (`HFTokenizer`): tokenizer.json files, Llama 3's
tiktoken-format tokenizer.model, and the pipeline that GGUF `gpt2` vocabularies are built into
(GPT-2's byte map, llama.cpp's pre-tokenizer regexes by `tokenizer.ggml.pre`, special tokens)."""
from __future__ import annotations

import base64
import itertools
import os
import re
import threading
from typing import Dict, List, Sequence, Tuple

import numpy as np

from ..errors import ModelFormatError
from .base import Tokenizer, cut_at
from .sidecar import SideFiles
from .specials import BYTE_PIECE, CONTROL, NORMAL, UNKNOWN, USER_DEFINED


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` pipeline: tokenizer.json, a GGUF `gpt2` vocabulary or tiktoken ranks."""

    kind = "BPE"

    def __init__(self, tok, **kw):
        self._tok = tok
        self._lock = threading.Lock()            # encode_special_tokens is state on the shared object
        super().__init__(**kw)

    def _encode_text(self, text: str, parse_special: bool) -> List[int]:
        with self._lock:
            self._tok.encode_special_tokens = not parse_special
            return self._tok.encode(text, add_special_tokens=False).ids


def _bytelevel_tables():
    """GPT-2's map of the 256 bytes to printable characters (bytes_to_unicode), both ways, as
    str.translate tables over latin-1 text (where character code == byte value)."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    to_char, extra = {}, 0
    for b in range(256):
        if b in printable:
            to_char[b] = chr(b)
        else:
            to_char[b] = chr(256 + extra)
            extra += 1
    return to_char, {ord(c): chr(b) for b, c in to_char.items()}


_BYTE_TO_CHAR, _CHAR_TO_BYTE = _bytelevel_tables()


def bytelevel_to_bytes(token: str) -> bytes:
    try:
        return token.translate(_CHAR_TO_BYTE).encode("latin-1")
    except UnicodeEncodeError:                   # characters outside the byte map stay UTF-8, as in llama.cpp
        return b"".join(_CHAR_TO_BYTE[ord(c)].encode("latin-1") if ord(c) in _CHAR_TO_BYTE else c.encode("utf-8")
                        for c in token)


def _bytelevel_byte_of() -> np.ndarray:
    """The byte of each code point below 256 + 68 (the map's top), as str.translate over
    _CHAR_TO_BYTE followed by a latin-1 encode gives it: mapped characters become their byte,
    the others below 256 stay themselves."""
    table = np.arange(256 + 68, dtype=np.int64)
    for code, char in _CHAR_TO_BYTE.items():
        table[code] = ord(char)
    return table.astype(np.uint8)


def bytelevel_pieces(tokens: Sequence[str]) -> List[bytes]:
    """bytelevel_to_bytes of every token, the whole vocabulary at once: each character is one
    byte, so the vocabulary's code points go through a table and are cut at the tokens' lengths;
    token by token where some character is outside the byte map."""
    code_points = np.frombuffer("".join(tokens).encode("utf-32-le"), dtype=np.uint32)
    if code_points.size and code_points.max() >= len(_BYTE_OF):
        return [bytelevel_to_bytes(t) for t in tokens]
    return cut_at(_BYTE_OF[code_points].tobytes(), list(itertools.accumulate(map(len, tokens))))


def bytes_to_bytelevel(b: bytes) -> str:
    return b.decode("latin-1").translate(_BYTE_TO_CHAR)


_BYTE_OF = _bytelevel_byte_of()


# llama.cpp's pre-tokenizer regexes (llama-vocab.cpp) by `tokenizer.ggml.pre`; each regex splits the
# pieces of the one before, keeping matches and the text between them. smollm/starcoder: these models'
# tokenizer.json has HF's Digits(individual_digits) before ByteLevel, which isolates every numeric
# character (Rust's char::is_numeric: \p{N}, so "½" and "٣" too), as llama.cpp does.
_GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_RE = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
              r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_RE = _LLAMA3_RE.replace(r"\p{N}{1,3}", r"\p{N}")
PRE_TOKENIZERS = {
    # name: (regexes, ignore_merges, default add_bos)
    "default": ((r"[\p{P}\$\+<=>\^~\|]+", _GPT2_RE, r"\p{N}+", r"[0-9][0-9][0-9]"), False, False),
    "llama3": ((_LLAMA3_RE,), True, True),
    "smollm": ((r"\p{N}", _GPT2_RE), False, False),
    "gpt2": ((_GPT2_RE,), False, False),
    "qwen2": ((_QWEN2_RE,), False, False),
    "falcon": ((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2_RE, r"[0-9][0-9][0-9]"), False, False),
}
PRE_ALIASES = {
    "llama-bpe": "llama3", "llama-v3": "llama3", "falcon3": "llama3", "dbrx": "llama3", "smaug-bpe": "llama3",
    "starcoder": "smollm", "refact": "smollm", "command-r": "smollm", "codeshell": "smollm",
    "exaone": "smollm", "minerva-7b": "smollm",
    "gpt-2": "gpt2", "phi-2": "gpt2", "mpt": "gpt2", "olmo": "gpt2", "jais": "gpt2",
    "deepseek-r1-qwen": "qwen2", "stablelm2": "qwen2",
}
# `tokenizer.ggml.pre` values whose tokenizer.json normalizes text to NFC first (Qwen2, Qwen2.5,
# Qwen3): llama.cpp skips that step, so a decomposed "e\u0301" would give other ids than the model's own.
NFC_PRE = ("qwen2",)


def bytelevel_pipeline(vocab: Dict[str, int], merges: List[Tuple[str, str]], regexes: Sequence[str],
                       ignore_merges: bool, path: str, nfc: bool = False):
    from tokenizers import Regex, Tokenizer as HFTok, decoders, models, normalizers, pre_tokenizers
    try:
        tok = HFTok(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
    except Exception as e:                       # the library raises plain Exception for a bad vocabulary
        raise ModelFormatError(f"{path}: the BPE vocabulary and merges do not fit together ({e})") from None
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.pre_tokenizer = pre_tokenizers.Sequence(splits + [byte_level])
    tok.decoder = decoders.ByteLevel()
    if nfc:
        tok.normalizer = normalizers.NFC()
    return tok


def add_special_tokens(tok, tokens: Sequence[str], types: Sequence[int]):
    """Control tokens become special tokens (matched only with parse_special); user-defined ones
    are matched always, as llama.cpp does."""
    from tokenizers import AddedToken
    control = [AddedToken(tokens[i], special=True, normalized=False)
               for i, t in enumerate(types) if t in (CONTROL, UNKNOWN) and tokens[i]]
    user = [AddedToken(tokens[i], special=False, normalized=False)
            for i, t in enumerate(types) if t == USER_DEFINED and tokens[i]]
    if control:
        tok.add_special_tokens(control)
    if user:
        tok.add_tokens(user)


def bytelevel_tokenizer(tok, tokens: Sequence[str], types: Sequence[int], **kw) -> HFTokenizer:
    """An HFTokenizer over a byte-level vocabulary whose control/user-defined tokens are raw text."""
    pieces, hidden, specials = bytelevel_pieces(tokens), [], {}
    for i, ttype in enumerate(types):
        if ttype in (CONTROL, UNKNOWN, USER_DEFINED):
            pieces[i] = tokens[i].encode("utf-8")
            specials.setdefault(tokens[i], i)
            if ttype != USER_DEFINED:
                hidden.append(i)
    return HFTokenizer(tok, pieces=pieces, hidden=hidden, specials=specials, **kw)


# -- tokenizer.json -----------------------------------------------------------------------------

def load_tokenizer_json(path: str) -> HFTokenizer:
    """A tokenizer.json, with BOS/EOS, stop ids and chat template from the files beside it."""
    from tokenizers import Tokenizer as HFTok
    try:
        tok = HFTok.from_file(path)
    except Exception as e:                       # the library raises plain Exception subclasses
        raise ModelFormatError(f"{path}: not a readable tokenizer.json ({' '.join(str(e).split())[:300]})") from None
    side = SideFiles(os.path.dirname(os.path.abspath(path)))
    added = tok.get_added_tokens_decoder()
    vocab = tok.get_vocab(with_added_tokens=True)
    n = max(vocab.values(), default=-1) + 1
    if not vocab or n > 2 * len(vocab) + 1024:   # ids far past the number of tokens: not a real vocabulary
        raise ModelFormatError(f"{path}: tokenizer.json has {len(vocab)} tokens with ids up to {n - 1}; "
                               "expected ids 0..N-1")
    tokens = [""] * n
    for t, i in vocab.items():
        tokens[i] = t
    pieces, strip = _hf_pieces(tok, tokens, added)
    specials = {a.content: i for i, a in added.items()}
    hidden = [i for i, a in added.items() if a.special]
    bos, eos, stop = side.special_ids({**vocab, **specials}, hidden, n)
    add_bos = side.tokenizer_config.get("add_bos_token")
    if add_bos is None:                          # e.g. Llama 3: the post-processor adds BOS
        add_bos = bos is not None and tok.encode("a", add_special_tokens=True).ids[:1] == [bos]
    return HFTokenizer(tok, source=path, pieces=pieces, hidden=hidden, specials=specials, bos_id=bos,
                       eos_ids=stop, eos_id=eos, add_bos=bool(add_bos), chat_template=side.chat_template,
                       strip_leading_space=strip)


def _hf_pieces(tok, tokens: List[str], added) -> Tuple[List[bytes], bool]:
    """Raw bytes per id, read the way the tokenizer's decoder reads them, and whether the decoder
    drops a leading space (SentencePiece-style tokenizer.json)."""
    decoder = tok.decoder.__getstate__().decode() if tok.decoder is not None else ""
    if '"ByteLevel"' in decoder:
        to_bytes = bytelevel_to_bytes
        strip = False
    elif any(k in decoder for k in ('"Metaspace"', '"ByteFallback"', '"\u2581"', '"\\u2581"')):
        def to_bytes(t):
            m = BYTE_PIECE.fullmatch(t)
            return bytes([int(m.group(1), 16)]) if m else t.replace("\u2581", " ").encode("utf-8")
        strip = any(k in decoder for k in ('"Strip"', '"prepend_scheme":"first"', '"prepend_scheme":"always"'))
    else:
        def to_bytes(t):
            return tok.decode([tok.token_to_id(t)], skip_special_tokens=False).encode("utf-8") if t else b""
        strip = False
    pieces = [added[i].content.encode("utf-8") if i in added else to_bytes(t) for i, t in enumerate(tokens)]
    return pieces, strip


# -- tiktoken (Llama 3 tokenizer.model) ---------------------------------------------------------

_TIKTOKEN_MAX_LINE = 1024                       # Llama 3's longest token is 128 bytes (~180 in base64)
_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} \d+\r?\n")

# Llama 3.1+ names of the 256 special tokens after the 128000 ranks (Llama 3.0 called 128004,
# 128008 and 128010 reserved tokens; the ids of the tokens that matter are the same).
_LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
_LLAMA3_N_SPECIAL = 256                          # ids reserved after the ranks (128000 + 256 = 128256)


def is_tiktoken(path: str) -> bool:
    """Whether a tokenizer.model is tiktoken's text format ('base64 rank' lines), not SentencePiece."""
    with open(path, "rb") as f:
        line = f.readline(_TIKTOKEN_MAX_LINE + 1)
    if len(line) > _TIKTOKEN_MAX_LINE:           # too long to be one, but read as one to say so
        return re.fullmatch(rb"[A-Za-z0-9+/]+", line[:_TIKTOKEN_MAX_LINE]) is not None
    return _TIKTOKEN_LINE.match(line) is not None


def _read_tiktoken_ranks(path: str) -> List[bytes]:
    ranks: List[bytes] = []
    with open(path, "rb") as f:
        for lineno, line in enumerate(iter(lambda: f.readline(_TIKTOKEN_MAX_LINE + 1), b""), 1):
            if len(line) > _TIKTOKEN_MAX_LINE:   # merges are found by splitting each token at every byte
                raise ModelFormatError(f"{path}: line {lineno} is over {_TIKTOKEN_MAX_LINE} bytes; a tiktoken "
                                       "tokenizer.model has one short 'base64 rank' per line")
            if not line.strip():
                continue
            try:
                b64, rank = line.split()
                token, rank = base64.b64decode(b64, validate=True), int(rank)
            except ValueError:
                raise ModelFormatError(f"{path}: line {lineno} is not 'base64 rank' "
                                       "(tiktoken tokenizer.model)") from None
            if rank != len(ranks):
                raise ModelFormatError(f"{path}: line {lineno} has rank {rank}, expected {len(ranks)}")
            ranks.append(token)
    return ranks


def _tiktoken_merges(ranks: List[bytes], strs: List[str]) -> List[Tuple[str, str]]:
    """BPE merges equivalent to tiktoken's rank order: every split of a token into two tokens,
    ordered by the merged token's rank (as transformers' tiktoken converter does)."""
    rank_of = {b: i for i, b in enumerate(ranks)}
    merges = []
    for b in ranks:
        local = []
        for k in range(1, len(b)):
            left = rank_of.get(b[:k])
            if left is not None:
                right = rank_of.get(b[k:])
                if right is not None:
                    local.append((left, right))
        local.sort()
        merges += [(strs[a], strs[c]) for a, c in local]
    return merges


def load_tiktoken(path: str) -> HFTokenizer:
    """Llama 3's tiktoken tokenizer.model as a byte-level BPE, with its 256 special tokens after the ranks."""
    ranks = _read_tiktoken_ranks(path)
    if len(ranks) < 256:
        raise ModelFormatError(f"{path}: only {len(ranks)} tiktoken ranks; expected a Llama 3 tokenizer.model")
    side = SideFiles(os.path.dirname(os.path.abspath(path)))
    strs = [bytes_to_bytelevel(b) for b in ranks]
    n_special = _LLAMA3_N_SPECIAL
    names = _LLAMA3_SPECIALS + [f"<|reserved_special_token_{k}|>" for k in range(3, 3 + n_special)]
    specials = names[:n_special]
    decoder = side.tokenizer_config.get("added_tokens_decoder")
    for i_str, entry in (decoder.items() if isinstance(decoder, dict) else ()):
        if not i_str.isdigit():
            continue
        k = int(i_str) - len(ranks)               # names from tokenizer_config.json win
        if 0 <= k < n_special and isinstance(entry, dict) and isinstance(entry.get("content"), str) and entry["content"]:
            specials[k] = entry["content"]
    tokens = strs + specials
    types = [NORMAL] * len(ranks) + [CONTROL] * n_special
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = bytelevel_pipeline(vocab, _tiktoken_merges(ranks, strs), (_LLAMA3_RE,), ignore_merges=True, path=path)
    add_special_tokens(tok, tokens, types)
    bos, eos, stop = side.special_ids(vocab, range(len(ranks), len(tokens)), len(tokens),
                                      bos_default=vocab.get("<|begin_of_text|>"),
                                      eos_default=vocab.get("<|end_of_text|>"))
    add_bos = side.tokenizer_config.get("add_bos_token", True)
    return bytelevel_tokenizer(tok, tokens, types, source=path, bos_id=bos, eos_ids=stop, eos_id=eos,
                               add_bos=bool(add_bos), chat_template=side.chat_template)


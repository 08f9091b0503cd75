"""Tokenizers: text <-> token ids for every model source tpllama reads.

Four implementations behind one `Tokenizer` interface:

* SentencePiece (`SentencePieceTokenizer`): Llama 2 style `.model` files, and the `llama` vocabularies
  embedded in GGUF files, which are turned back into a SentencePiece model (BPE, byte fallback).
* Byte-level BPE (`HFTokenizer`, on the `tokenizers` library): `tokenizer.json` files, the `gpt2`
  vocabularies embedded in GGUF files (merges + llama.cpp's pre-tokenizer regexes) and Llama 3's
  tiktoken-format `tokenizer.model`.
* llama2.c (`Llama2cTokenizer`): `tokenizer.bin` / `tok{N}.bin`, encoded like run.c's encode().

`load_tokenizer(reader, tokenizer_path)` picks one. Decoding is shared: every token has its raw
bytes (`token_bytes`), so a `StreamDecoder` can print text while tokens arrive without breaking
multi-byte characters.
"""
from __future__ import annotations

import base64
import codecs
import os
import re
import struct
import threading
import warnings
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from .chat_template import ChatTemplate, ChatTemplateError
from .errors import ModelFormatError

# Token types; GGUF and SentencePiece number them the same way.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Texts of end-of-turn tokens that stop generation wherever they are special tokens (llama.cpp's list).
END_OF_TURN_TOKENS = (
    "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>", "<|end|>",
    "<end_of_turn>", "<|return|>", "<|call|>", "<EOT>", "_<EOT>", "<end_of_utterance>",
)

TOKENIZER_FLAG_HINT = ("pass the model's tokenizer with --tokenizer PATH "
                       "(tokenizer.json, tokenizer.model or tokenizer.bin)")

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


# ----------------------------------------------------------------------------------------------
# The shared interface
# ----------------------------------------------------------------------------------------------

class Tokenizer:
    """Text <-> token ids for one model, plus what generation needs: BOS, stop ids, chat template.

    Subclasses implement `_encode_text`; decoding works from the per-token bytes given here."""

    kind = "?"

    def __init__(self, *, source: str, pieces: List[bytes], hidden: Iterable[int], specials: Dict[str, int],
                 bos_id: Optional[int], eos_ids: Iterable[int], eos_id: Optional[int], add_bos: bool,
                 chat_template: Optional[str], strip_leading_space: bool = False,
                 byte_ids: Iterable[int] = ()):
        self.source = source
        self.vocab_size = len(pieces)
        self.bos_id = bos_id
        self.eos_id = eos_id                        # the model's own EOS (the template's eos_token)
        self.eos_ids = frozenset(i for i in eos_ids if i is not None)
        self.add_bos = bool(add_bos) and bos_id is not None
        self.chat_template = chat_template or None
        self.specials = dict(specials)              # text -> id of control / user-defined tokens
        self._pieces = pieces
        self._hidden = frozenset(hidden)            # decode to "" (control and unknown tokens)
        self._byte_ids = frozenset(byte_ids)        # byte-fallback pieces: never lose a leading space
        # SentencePiece adds a space before the text; its decoder drops it again from the first piece.
        self.strip_leading_space = strip_leading_space
        self._template = None

    def __repr__(self):
        return f"<{type(self).__name__} {self.kind} vocab={self.vocab_size} source={self.source!r}>"

    # -- encoding ------------------------------------------------------------------------------

    def encode(self, text: str, add_bos: Optional[bool] = None, parse_special: bool = False) -> List[int]:
        """Token ids of `text`; add_bos=None uses the model's default. With parse_special, texts of
        special tokens (e.g. `<|im_start|>` in a rendered chat template) become their ids."""
        ids = self._encode_text(text, parse_special) if text else []
        if add_bos is None:
            add_bos = self.add_bos
        # a rendered chat template often starts with bos_token already: never send two
        if add_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids.insert(0, self.bos_id)
        return ids

    def _encode_text(self, text: str, parse_special: bool) -> List[int]:
        raise NotImplementedError

    def token_to_id(self, text: str) -> Optional[int]:
        """Id of a special token given by its text (None when the vocabulary has no such token)."""
        return self.specials.get(text)

    # -- decoding ------------------------------------------------------------------------------

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one piece (a byte-fallback token gives its byte; control tokens their text)."""
        self._check_id(token_id)
        return self._pieces[token_id]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of a whole sequence; special tokens (BOS, EOS, ...) give no text."""
        out, expect_prefix = [], self.strip_leading_space
        for token_id in ids:
            piece, expect_prefix = self._piece_for_text(int(token_id), expect_prefix)
            out.append(piece)
        return b"".join(out).decode("utf-8", errors="replace")

    def stream_decoder(self, at_start: bool = True) -> "StreamDecoder":
        """A decoder for tokens that arrive one by one. at_start=False when the tokens continue
        earlier text (generated after a prompt): SentencePiece's leading space is then kept."""
        return StreamDecoder(self, at_start)

    def _piece_for_text(self, token_id: int, expect_prefix: bool) -> Tuple[bytes, bool]:
        """Bytes a token adds to decoded text, and whether the SentencePiece prefix space is still due."""
        self._check_id(token_id)
        if token_id in self._hidden:
            return b"", expect_prefix
        piece = self._pieces[token_id]
        if expect_prefix and piece[:1] == b" " and token_id not in self._byte_ids:
            piece = piece[1:]
        return piece, False

    def _check_id(self, token_id: int):
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})")

    # -- chat ----------------------------------------------------------------------------------

    @property
    def bos_token(self) -> str:
        return self._special_text(self.bos_id)

    @property
    def eos_token(self) -> str:
        return self._special_text(self.eos_id)

    def _special_text(self, token_id: Optional[int]) -> str:
        return "" if token_id is None else self._pieces[token_id].decode("utf-8", errors="replace")

    def render_chat(self, messages: List[dict], add_generation_prompt: bool = True, **extra) -> str:
        """The prompt text for a conversation, from the model's chat template (or a fallback for
        its family), rendered in a sandbox with limits on time and size (tpllama.chat_template).
        To tokenize a conversation use encode_chat: it keeps message text from becoming special tokens."""
        source = self.chat_template or self.fallback_chat_template()
        template = self._template
        if template is None or template.source != source:
            template = self._template = ChatTemplate(source, self.source)
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=self.bos_token, eos_token=self.eos_token, **extra)

    def encode_chat(self, messages: List[dict], add_generation_prompt: bool = True, **extra) -> List[int]:
        """Token ids of a rendered conversation (with its BOS if the template writes one): special
        tokens come only from the template's own markup; message contents are plain text."""
        return self.encode_chat_parts(self.chat_parts(messages, add_generation_prompt, **extra))

    def chat_parts(self, messages: List[dict], add_generation_prompt: bool = True,
                   **extra) -> List[Tuple[str, bool]]:
        """The rendered conversation as (text, from the template) parts, in order.

        The template is rendered twice: as is, and with every message content replaced by a
        unique marker. Between the markers lies the template's own text; the rendered text then
        shows what stands where each marker was (the content, or the content trimmed)."""
        text = self.render_chat(messages, add_generation_prompt, **extra)
        contents = [m.get("content") if isinstance(m.get("content"), str) else "" for m in messages]
        markers = _content_markers(len(messages), text)
        marked = [dict(m, content=markers[i]) if contents[i] else m for i, m in enumerate(messages)]
        shape = self.render_chat(marked, add_generation_prompt, **extra)
        parts = _align_parts(text, shape, {markers[i]: contents[i] for i in range(len(messages)) if contents[i]})
        if parts is not None:
            return parts
        # the template rewrites contents beyond trimming: safe as one text only if no content holds a special token
        splitter = _special_splitter(self.specials)
        if splitter is not None and any(splitter.search(c) for c in contents):
            raise ChatTemplateError(f"{self.source}: a message holds special-token text, and the chat template "
                                    "changes message contents so that it cannot be kept apart from its markup")
        return [(text, True)]

    def encode_chat_parts(self, parts: Sequence[Tuple[str, bool]]) -> List[int]:
        """Token ids of chat_parts(): special-token texts count only in template parts. Plain text
        between two special tokens is encoded in one piece, as encode(parse_special=True) would."""
        splitter = _special_splitter(self.specials)
        whole = "".join(text for text, _ in parts)
        if splitter is None or len(splitter.findall(whole)) == sum(
                len(splitter.findall(text)) for text, from_template in parts if from_template):
            # no special-token text in the messages (nor across a boundary): the whole text
            # encodes exactly as it always did (tokenizers that prefix only the text's start agree)
            return self._encode_text(whole, True) if whole else []
        runs: List[object] = []          # plain text (str) and special token ids (int), in order
        for text, from_template in parts:
            pieces = _split_specials(text, splitter, self.specials) if from_template and splitter else [(text, None)]
            for fragment, special_id in pieces:
                if special_id is not None:
                    runs.append(special_id)
                elif runs and isinstance(runs[-1], str):
                    runs[-1] += fragment
                else:
                    runs.append(fragment)
        ids: List[int] = []
        for run in runs:
            ids.extend([run] if isinstance(run, int) else self._encode_text(run, False) if run else [])
        return ids

    def fallback_chat_template(self) -> str:
        """A template for models that ship none, chosen by the special tokens of the vocabulary."""
        if "<|start_header_id|>" in self.specials:
            return LLAMA3_TEMPLATE
        if "<|im_start|>" in self.specials:
            return CHATML_TEMPLATE
        return LLAMA2_TEMPLATE


class StreamDecoder:
    """Turns token ids into text as they arrive: add(id) returns only complete UTF-8 text, holding
    back the first bytes of a character split over byte-fallback tokens; flush() ends the stream."""

    def __init__(self, tokenizer: Tokenizer, at_start: bool = True):
        self._tok = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._expect_prefix = at_start and tokenizer.strip_leading_space

    def add(self, token_id: int) -> str:
        piece, self._expect_prefix = self._tok._piece_for_text(int(token_id), self._expect_prefix)
        return self._utf8.decode(piece) if piece else ""

    def flush(self) -> str:
        """Whatever is held back (an unfinished character comes out as U+FFFD)."""
        return self._utf8.decode(b"", final=True)


# ----------------------------------------------------------------------------------------------
# SentencePiece-style tokenizers (SentencePiece library, llama2.c)
# ----------------------------------------------------------------------------------------------

class _SpmLike(Tokenizer):
    """Shared by SentencePiece and llama2.c: special tokens are cut out of the text first (like
    llama.cpp), and every remaining fragment is encoded on its own with a dummy prefix space."""

    def __init__(self, *, parse_only: Dict[str, int], **kw):
        super().__init__(**kw)
        always = {t: i for t, i in self.specials.items() if t not in parse_only}
        self._split_always = _special_splitter(always)           # user-defined tokens
        self._split_parse = _special_splitter(self.specials)     # + control tokens with parse_special

    def _encode_text(self, text: str, parse_special: bool) -> List[int]:
        splitter = self._split_parse if parse_special else self._split_always
        if splitter is None:
            return self._encode_fragment(text)
        ids: List[int] = []
        for fragment, special_id in _split_specials(text, splitter, self.specials):
            ids.extend([special_id] if special_id is not None else self._encode_fragment(fragment))
        return ids

    def _encode_fragment(self, text: str) -> List[int]:
        raise NotImplementedError


class SentencePieceTokenizer(_SpmLike):
    """A SentencePiece model: a `.model` file or a GGUF `llama` vocabulary rebuilt as one."""

    kind = "SentencePiece"

    def __init__(self, processor, *, pieces: List[str], types: Sequence[int], source: str,
                 bos_id: Optional[int], eos_ids: Iterable[int], eos_id: Optional[int], add_bos: bool,
                 chat_template: Optional[str], add_dummy_prefix: bool):
        self._sp = processor
        raw, hidden, specials, parse_only, byte_ids = [], [], {}, {}, []
        for i, (piece, ttype) in enumerate(zip(pieces, types)):
            if ttype == BYTE and _BYTE_PIECE.fullmatch(piece):
                raw.append(bytes([int(piece[3:5], 16)]))
                byte_ids.append(i)
            elif ttype in (CONTROL, UNKNOWN):
                raw.append(piece.encode("utf-8"))
                hidden.append(i)
                if piece:
                    specials.setdefault(piece, i)
                    parse_only.setdefault(piece, i)
            else:
                raw.append(piece.replace("\u2581", " ").encode("utf-8"))
                if ttype == USER_DEFINED and piece:
                    specials.setdefault(piece, i)
        super().__init__(source=source, pieces=raw, hidden=hidden, specials=specials, bos_id=bos_id,
                         eos_ids=eos_ids, eos_id=eos_id, add_bos=add_bos, chat_template=chat_template,
                         strip_leading_space=add_dummy_prefix, byte_ids=byte_ids, parse_only=parse_only)

    def _encode_fragment(self, text: str) -> List[int]:
        # the processor adds the dummy prefix itself; every fragment starts the text or follows a
        # special token, which is where llama.cpp adds the prefix space too
        return self._sp.encode(text)


class Llama2cTokenizer(_SpmLike):
    """llama2.c's tokenizer.bin: pieces with scores, encoded like run.c's encode(): one token per
    UTF-8 character (bytes as <0xXX> tokens when absent), then greedy merges by piece score."""

    kind = "llama2.c"

    def __init__(self, pieces: List[bytes], scores: List[float], *, source: str):
        self._lookup: Dict[bytes, int] = {}
        for i, p in enumerate(pieces):
            self._lookup.setdefault(p, i)
        self._scores = scores
        self._merge_pieces = pieces                 # run.c merges by concatenating these strings
        raw, byte_ids = list(pieces), []
        for i, p in enumerate(pieces):
            m = _BYTE_PIECE.fullmatch(p.decode("latin-1"))
            if m:
                raw[i] = bytes([int(m.group(1), 16)])
                byte_ids.append(i)
        # llama2.c's export writes <unk>, "\n<s>\n", "\n</s>\n" at ids 0, 1, 2
        specials = {"<unk>": 0, "<s>": 1, "</s>": 2}
        for name, i in specials.items():
            raw[i] = name.encode()
        super().__init__(source=source, pieces=raw, hidden=(0, 1, 2), specials=specials, bos_id=1,
                         eos_ids=(2,), eos_id=2, add_bos=True, chat_template=None,
                         strip_leading_space=True, byte_ids=byte_ids, parse_only=specials)

    def _encode_fragment(self, text: str) -> List[int]:
        ids = []
        for ch in " " + text:                    # the dummy prefix, as run.c adds it
            b = ch.encode("utf-8", errors="surrogatepass")
            i = self._lookup.get(b)
            if i is not None:
                ids.append(i)
            else:                                # byte fallback: <0xXX> is id byte + 3 in llama2.c vocabularies
                ids.extend(self._lookup.get(b"<0x%02X>" % c, c + 3) for c in b)
        return self._merge(ids)

    def _merge(self, ids: List[int]) -> List[int]:
        """run.c's loop (merge the adjacent pair whose concatenation scores best, leftmost on ties),
        with a heap of candidate pairs instead of rescanning the whole sequence after each merge."""
        import heapq
        n = len(ids)
        nxt, prv = list(range(1, n + 1)), list(range(-1, n - 1))
        nxt[-1] = -1
        heap: list = []

        def push(i):
            j = nxt[i] if i >= 0 else -1
            if j >= 0:
                m = self._lookup.get(self._merge_pieces[ids[i]] + self._merge_pieces[ids[j]])
                if m is not None:
                    heapq.heappush(heap, (-self._scores[m], i, ids[i], ids[j], m))

        for i in range(n - 1):
            push(i)
        while heap:
            _, i, left, right, merged = heapq.heappop(heap)
            j = nxt[i]
            if ids[i] != left or j < 0 or ids[j] != right:
                continue                         # stale: one side has merged since
            ids[i], ids[j] = merged, -1
            nxt[i] = nxt[j]
            if nxt[i] >= 0:
                prv[nxt[i]] = i
            push(prv[i])
            push(i)
        return [t for t in ids if t >= 0]


# ----------------------------------------------------------------------------------------------
# `tokenizers`-backed BPE (tokenizer.json, GGUF gpt2 vocabularies, tiktoken)
# ----------------------------------------------------------------------------------------------

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


def _bytelevel_to_bytes(token: str) -> bytes:
    try:
        return token.translate(_CHAR_TO_BYTE).encode("latin-1")
    except UnicodeEncodeError:                   # characters outside the byte map stay UTF-8, as in llama.cpp
        return b"".join(_CHAR_TO_BYTE[ord(c)].encode("latin-1") if ord(c) in _CHAR_TO_BYTE else c.encode("utf-8")
                        for c in token)


def _bytes_to_bytelevel(b: bytes) -> str:
    return b.decode("latin-1").translate(_BYTE_TO_CHAR)


# llama.cpp's pre-tokenizer regexes (llama-vocab.cpp) by `tokenizer.ggml.pre`; each regex splits the
# pieces of the one before, keeping matches and the text between them. One deliberate difference:
# for smollm/starcoder llama.cpp isolates every \p{N}, but these models were trained with HF's
# Digits(individual_digits) pre-tokenizer, which isolates ASCII digits only ("½" stays with its space).
_GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_RE = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
              r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_RE = _LLAMA3_RE.replace(r"\p{N}{1,3}", r"\p{N}")
_PRE_TOKENIZERS = {
    # name: (regexes, ignore_merges, default add_bos)
    "default": ((r"[\p{P}\$\+<=>\^~\|]+", _GPT2_RE, r"\p{N}+", r"[0-9][0-9][0-9]"), False, False),
    "llama3": ((_LLAMA3_RE,), True, True),
    "smollm": ((r"[0-9]", _GPT2_RE), False, False),
    "gpt2": ((_GPT2_RE,), False, False),
    "qwen2": ((_QWEN2_RE,), False, False),
    "falcon": ((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2_RE, r"[0-9][0-9][0-9]"), False, False),
}
_PRE_ALIASES = {
    "llama-bpe": "llama3", "llama-v3": "llama3", "falcon3": "llama3", "dbrx": "llama3", "smaug-bpe": "llama3",
    "starcoder": "smollm", "refact": "smollm", "command-r": "smollm", "codeshell": "smollm",
    "exaone": "smollm", "minerva-7b": "smollm",
    "gpt-2": "gpt2", "phi-2": "gpt2", "mpt": "gpt2", "olmo": "gpt2", "jais": "gpt2",
    "deepseek-r1-qwen": "qwen2", "stablelm2": "qwen2",
}


def _bytelevel_pipeline(vocab: Dict[str, int], merges: List[Tuple[str, str]], regexes: Sequence[str],
                        ignore_merges: bool, path: str):
    from tokenizers import Regex, Tokenizer as HFTok, decoders, models, pre_tokenizers
    try:
        tok = HFTok(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
    except Exception as e:                       # the library raises plain Exception for a bad vocabulary
        raise ModelFormatError(f"{path}: the BPE vocabulary and merges do not fit together ({e})") from None
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.pre_tokenizer = pre_tokenizers.Sequence(splits + [byte_level])
    tok.decoder = decoders.ByteLevel()
    return tok


def _add_special_tokens(tok, tokens: Sequence[str], types: Sequence[int]):
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


def _bytelevel_tokenizer(tok, tokens: Sequence[str], types: Sequence[int], **kw) -> HFTokenizer:
    """An HFTokenizer over a byte-level vocabulary whose control/user-defined tokens are raw text."""
    pieces, hidden, specials = [], [], {}
    for i, (t, ttype) in enumerate(zip(tokens, types)):
        if ttype in (CONTROL, UNKNOWN, USER_DEFINED):
            pieces.append(t.encode("utf-8"))
            specials.setdefault(t, i)
            if ttype != USER_DEFINED:
                hidden.append(i)
        else:
            pieces.append(_bytelevel_to_bytes(t))
    return HFTokenizer(tok, pieces=pieces, hidden=hidden, specials=specials, **kw)


# ----------------------------------------------------------------------------------------------
# GGUF vocabularies
# ----------------------------------------------------------------------------------------------

def _gguf_strings(meta: dict, key: str, path: str) -> Optional[List[str]]:
    """A GGUF key that must hold an array of strings (None when absent)."""
    value = meta.get(key)
    if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
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
    stop |= {i for i, t in enumerate(tokens) if t in END_OF_TURN_TOKENS and types[i] in (CONTROL, USER_DEFINED)}
    return bos, eos, stop - {None}


def _from_gguf_metadata(meta: dict, path: str) -> Tokenizer:
    model = meta.get("tokenizer.ggml.model")
    if model is None:
        raise ModelFormatError(f"{path}: GGUF file has no embedded tokenizer (no tokenizer.ggml.model); "
                               f"{TOKENIZER_FLAG_HINT}")
    tokens = _gguf_strings(meta, "tokenizer.ggml.tokens", path)
    if not tokens:
        raise ModelFormatError(f"{path}: GGUF tokenizer has no tokenizer.ggml.tokens list")
    types = _gguf_numbers(meta, "tokenizer.ggml.token_type", path, len(tokens))
    types = [NORMAL] * len(tokens) if types is None else [int(t) for t in types]
    if model == "llama":
        return _gguf_spm(meta, path, tokens, types)
    if model == "gpt2":
        return _gguf_bpe(meta, path, tokens, types)
    raise ModelFormatError(f"{path}: tokenizer.ggml.model '{model}' is not supported; expected 'llama' "
                           f"(SentencePiece) or 'gpt2' (BPE); {TOKENIZER_FLAG_HINT}")


def _gguf_spm(meta: dict, path: str, tokens: Sequence[str], types: List[int]) -> SentencePieceTokenizer:
    import sentencepiece as spm
    scores = _gguf_numbers(meta, "tokenizer.ggml.scores", path, len(tokens))
    scores = [0.0] * len(tokens) if scores is None else [float(s) for s in scores]
    types = [NORMAL if t not in (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE) else t for t in types]
    bos, eos, stop = _gguf_special_ids(meta, tokens, types, 1, 2)
    add_prefix = _gguf_flag(meta, "tokenizer.ggml.add_space_prefix", True, path)
    proto = _spm_model_proto(tokens, scores, types, bos=bos, eos=eos, add_dummy_prefix=add_prefix,
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
    name = _PRE_ALIASES.get(pre, pre)
    if name not in _PRE_TOKENIZERS:
        warnings.warn(f"{path}: unknown tokenizer.ggml.pre '{pre}', using llama.cpp's 'default' pre-tokenizer")
        name = "default"
    regexes, ignore_merges, add_bos_default = _PRE_TOKENIZERS[name]
    merges = _gguf_strings(meta, "tokenizer.ggml.merges", path)
    if merges is None:
        raise ModelFormatError(f"{path}: GGUF 'gpt2' tokenizer has no tokenizer.ggml.merges")
    vocab: Dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    pairs = []
    for m in merges:
        k = m.find(" ", 1)                        # like llama.cpp: a pair may start with a space
        if k > 0:
            pairs.append((m[:k], m[k + 1:]))
    tok = _bytelevel_pipeline(vocab, pairs, regexes, ignore_merges, path)
    _add_special_tokens(tok, tokens, types)
    bos, eos, stop = _gguf_special_ids(meta, tokens, types, None, None)
    add_bos = _gguf_flag(meta, "tokenizer.ggml.add_bos_token", add_bos_default, path)
    return _bytelevel_tokenizer(tok, tokens, types, source=path, bos_id=bos, eos_ids=stop, eos_id=eos,
                                add_bos=add_bos, chat_template=_gguf_text(meta, "tokenizer.chat_template", path))


# -- SentencePiece ModelProto, written by hand: the protobuf package is not a dependency ---------

def _pb_varint(n: int) -> bytes:
    n &= (1 << 64) - 1                            # negative int32 fields are 10-byte two's complement
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _pb_int(field: int, value: int) -> bytes:
    return _pb_varint(field << 3) + _pb_varint(int(value))


def _pb_bytes(field: int, data: bytes) -> bytes:
    return _pb_varint(field << 3 | 2) + _pb_varint(len(data)) + data


def _spm_model_proto(tokens: Sequence[str], scores: Sequence[float], types: Sequence[int], *, bos, eos,
                     add_dummy_prefix: bool, remove_extra_whitespaces: bool) -> bytes:
    """sentencepiece_model.proto ModelProto: pieces (1), trainer_spec (2), normalizer_spec (3)."""
    out = bytearray()
    for piece, score, ttype in zip(tokens, scores, types):
        body = _pb_bytes(1, piece.encode("utf-8")) + _pb_varint(2 << 3 | 5) + struct.pack("<f", score)
        out += _pb_bytes(1, body + _pb_int(3, ttype))
    unk = next((i for i, t in enumerate(types) if t == UNKNOWN), 0)
    trainer = (_pb_int(3, 2)                      # model_type = BPE
               + _pb_int(4, len(tokens))          # vocab_size
               + _pb_int(35, int(BYTE in types))  # byte_fallback
               + _pb_int(40, unk) + _pb_int(41, -1 if bos is None else bos)
               + _pb_int(42, -1 if eos is None else eos) + _pb_int(43, -1))
    normalizer = (_pb_bytes(1, b"identity") + _pb_int(3, add_dummy_prefix)
                  + _pb_int(4, remove_extra_whitespaces) + _pb_int(5, 1))  # escape spaces as U+2581
    out += _pb_bytes(2, trainer) + _pb_bytes(3, normalizer)
    return bytes(out)


# ----------------------------------------------------------------------------------------------
# Tokenizer files
# ----------------------------------------------------------------------------------------------

def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    from .formats.jsonfile import read_json_object
    return read_json_object(path, os.path.basename(path))


class _HFSide:
    """What the JSON files next to a Hugging Face tokenizer add: template, BOS/EOS, stop ids."""

    def __init__(self, directory: str):
        self.tokenizer_config = _read_json(os.path.join(directory, "tokenizer_config.json"))
        self.generation_config = _read_json(os.path.join(directory, "generation_config.json"))
        self.config = _read_json(os.path.join(directory, "config.json"))
        self.chat_template = self._template(directory)

    def _template(self, directory: str) -> Optional[str]:
        jinja_file = os.path.join(directory, "chat_template.jinja")
        if os.path.isfile(jinja_file):
            with open(jinja_file, "rb") as f:
                raw = f.read(MAX_TOKENIZER_FILE_BYTES + 1)
            try:
                if len(raw) > MAX_TOKENIZER_FILE_BYTES:
                    raise ValueError(f"over {MAX_TOKENIZER_FILE_BYTES >> 20} MiB")
                return raw.decode("utf-8")
            except ValueError as e:
                raise ModelFormatError(f"{jinja_file}: not a readable chat template ({e})") from None
        t = self.tokenizer_config.get("chat_template") or _read_json(
            os.path.join(directory, "chat_template.json")).get("chat_template")
        if isinstance(t, list):                   # named templates: [{"name": "default", "template": ...}]
            named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
            t = named.get("default") or next(iter(named.values()), None)
        return t if isinstance(t, str) else None

    def token_name(self, key: str) -> Optional[str]:
        v = self.tokenizer_config.get(key)
        return v.get("content") if isinstance(v, dict) else v if isinstance(v, str) else None

    def config_ids(self, key: str) -> List[int]:
        out = []
        for cfg in (self.generation_config, self.config):
            v = cfg.get(key)
            out += [int(x) for x in (v if isinstance(v, list) else [v]) if isinstance(x, int)]
        return out

    def special_ids(self, name_to_id: Dict[str, int], special_ids: Iterable[int], vocab_size: int,
                    bos_default=None, eos_default=None):
        """bos id, primary eos id and all stop ids: the named tokens, the configs' ids, and the
        well-known end-of-turn tokens among the special ones."""
        def by_name(key):
            name = self.token_name(key)
            return name_to_id.get(name) if name else None
        bos = by_name("bos_token")
        if bos is None:
            bos = next(iter(self.config_ids("bos_token_id")), bos_default)
        eos_list = self.config_ids("eos_token_id")
        eos = by_name("eos_token")
        if eos is None:
            eos = next(iter(eos_list), eos_default)
        special_ids = set(special_ids)
        stop = {i for i in [eos, *eos_list] if i is not None and 0 <= i < vocab_size}
        stop |= {name_to_id[t] for t in END_OF_TURN_TOKENS if name_to_id.get(t) in special_ids}
        return bos, eos, stop


def _load_tokenizer_json(path: str) -> HFTokenizer:
    from tokenizers import Tokenizer as HFTok
    try:
        tok = HFTok.from_file(path)
    except Exception as e:                       # the library raises plain Exception subclasses
        raise ModelFormatError(f"{path}: not a readable tokenizer.json ({' '.join(str(e).split())[:300]})") from None
    side = _HFSide(os.path.dirname(os.path.abspath(path)))
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
        to_bytes = _bytelevel_to_bytes
        strip = False
    elif any(k in decoder for k in ('"Metaspace"', '"ByteFallback"', '"\u2581"', '"\\u2581"')):
        def to_bytes(t):
            m = _BYTE_PIECE.fullmatch(t)
            return bytes([int(m.group(1), 16)]) if m else t.replace("\u2581", " ").encode("utf-8")
        strip = any(k in decoder for k in ('"Strip"', '"prepend_scheme":"first"', '"prepend_scheme":"always"'))
    else:
        def to_bytes(t):
            return tok.decode([tok.token_to_id(t)], skip_special_tokens=False).encode("utf-8") if t else b""
        strip = False
    pieces = [added[i].content.encode("utf-8") if i in added else to_bytes(t) for i, t in enumerate(tokens)]
    return pieces, strip


def _load_sentencepiece_file(path: str) -> SentencePieceTokenizer:
    import sentencepiece as spm
    try:
        sp = spm.SentencePieceProcessor(model_file=path)
    except (RuntimeError, OSError) as e:
        raise ModelFormatError(f"{path}: not a SentencePiece model ({e})") from None
    n = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    types = [UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i) else BYTE if sp.is_byte(i)
             else UNUSED if sp.is_unused(i) else NORMAL for i in range(n)]
    first = sp.encode("a", out_type=str)
    add_dummy_prefix = bool(first) and first[0].startswith("\u2581")
    side = _HFSide(os.path.dirname(os.path.abspath(path)))
    index = {p: i for i, p in reversed(list(enumerate(pieces)))}
    control = [i for i, t in enumerate(types) if t == CONTROL]
    bos, eos, stop = side.special_ids(index, control, n, bos_default=_nonneg(sp.bos_id()),
                                      eos_default=_nonneg(sp.eos_id()))
    add_bos = side.tokenizer_config.get("add_bos_token", True)
    return SentencePieceTokenizer(sp, pieces=pieces, types=types, source=path, bos_id=bos, eos_ids=stop, eos_id=eos,
                                  add_bos=bool(add_bos), chat_template=side.chat_template,
                                  add_dummy_prefix=add_dummy_prefix)


def _nonneg(i: int) -> Optional[int]:
    return i if i >= 0 else None


MAX_TOKENIZER_FILE_BYTES = 512 * 2**20         # tokenizer.json/.model/.bin: the largest real ones are ~30 MiB
_TIKTOKEN_MAX_LINE = 1024                       # Llama 3's longest token is 128 bytes (~180 in base64)
_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} \d+\r?\n")

# Llama 3.1+ names of the 256 special tokens after the 128000 ranks (Llama 3.0 called 128004,
# 128008 and 128010 reserved tokens; the ids of the tokens that matter are the same).
_LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
_LLAMA3_N_SPECIAL = 256                          # ids reserved after the ranks (128000 + 256 = 128256)


def _is_tiktoken(path: str) -> bool:
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


def _load_tiktoken(path: str) -> HFTokenizer:
    ranks = _read_tiktoken_ranks(path)
    if len(ranks) < 256:
        raise ModelFormatError(f"{path}: only {len(ranks)} tiktoken ranks; expected a Llama 3 tokenizer.model")
    side = _HFSide(os.path.dirname(os.path.abspath(path)))
    strs = [_bytes_to_bytelevel(b) for b in ranks]
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
    tok = _bytelevel_pipeline(vocab, _tiktoken_merges(ranks, strs), (_LLAMA3_RE,), ignore_merges=True, path=path)
    _add_special_tokens(tok, tokens, types)
    bos, eos, stop = side.special_ids(vocab, range(len(ranks), len(tokens)), len(tokens),
                                      bos_default=vocab.get("<|begin_of_text|>"),
                                      eos_default=vocab.get("<|end_of_text|>"))
    add_bos = side.tokenizer_config.get("add_bos_token", True)
    return _bytelevel_tokenizer(tok, tokens, types, source=path, bos_id=bos, eos_ids=stop, eos_id=eos,
                                add_bos=bool(add_bos), chat_template=side.chat_template)


def _load_llama2c(path: str) -> Llama2cTokenizer:
    """tokenizer.bin: int32 max_token_length, then per token float32 score, int32 length, bytes."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 4:
        raise ModelFormatError(f"{path}: too short for a llama2.c tokenizer.bin")
    (max_len,) = struct.unpack_from("<i", data, 0)
    pieces, scores, off = [], [], 4
    while off < len(data):
        if off + 8 > len(data):
            raise ModelFormatError(f"{path}: truncated after token {len(pieces)} (llama2.c tokenizer.bin); "
                                   "download it again")
        score, n = struct.unpack_from("<fi", data, off)
        if not 0 <= n <= max(max_len, 0) or off + 8 + n > len(data):
            raise ModelFormatError(f"{path}: token {len(pieces)} has bad length {n} (max {max_len}) or is truncated; "
                                   "expected a llama2.c tokenizer.bin")
        pieces.append(data[off + 8: off + 8 + n])
        scores.append(score)
        off += 8 + n
    if len(pieces) < 259:
        raise ModelFormatError(f"{path}: only {len(pieces)} tokens; a llama2.c tokenizer.bin has "
                               "<unk>, <s>, </s> and 256 byte tokens")
    return Llama2cTokenizer(pieces, scores, source=path)


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
        return _from_gguf_metadata(_read_gguf_metadata(path), path)
    if path.endswith(".json"):
        return _load_tokenizer_json(path)
    if path.endswith(".bin"):
        return _load_llama2c(path)
    if _is_tiktoken(path):
        return _load_tiktoken(path)
    return _load_sentencepiece_file(path)


def _read_gguf_metadata(path: str) -> dict:
    """The keys of a GGUF used only for its vocabulary: no model config needed (vocab-only files)."""
    from .formats.gguf import read_gguf_metadata
    return read_gguf_metadata(path)


def _load_hf_dir(directory: str) -> Tokenizer:
    for name in ("tokenizer.json", "tokenizer.model"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return load_tokenizer_file(path)
    raise ModelFormatError(f"{directory}: no tokenizer.json or tokenizer.model; {TOKENIZER_FLAG_HINT}")


def _candidates(reader) -> List[str]:
    """Tokenizer files to look for next to a model without an embedded vocabulary."""
    if reader.format_name == "Hugging Face":
        directory = reader.path
        names = ["tokenizer.json", "tokenizer.model"]
    else:
        directory = os.path.dirname(os.path.abspath(reader.path))
        names = [f"tok{reader.config.vocab_size}.bin", "tokenizer.bin", "tokenizer.json", "tokenizer.model"]
    return [os.path.join(directory, n) for n in names]


def load_tokenizer(reader, tokenizer_path: Optional[str] = None) -> Tokenizer:
    """The tokenizer for a model reader: `tokenizer_path` when given, else the GGUF's embedded
    vocabulary, the HF directory's tokenizer files, or tokenizer.bin / tok{N}.bin beside a
    llama2.c checkpoint. Raises ModelFormatError when none is found or its size does not fit."""
    if tokenizer_path:
        tok = load_tokenizer_file(tokenizer_path)
    elif reader is not None and reader.format_name == "GGUF" and "tokenizer.ggml.model" in reader.metadata:
        tok = _from_gguf_metadata(reader.metadata, reader.path)
    elif reader is not None:
        found = [p for p in _candidates(reader) if os.path.isfile(p)]
        if not found:
            looked = ", ".join(_candidates(reader))
            raise ModelFormatError(f"{reader.path}: no tokenizer found (looked for {looked}); {TOKENIZER_FLAG_HINT}")
        tok = load_tokenizer_file(found[0])
    else:
        raise ValueError("load_tokenizer needs a model reader or a tokenizer_path")
    if reader is not None:
        _adopt_model_template(tok, reader)
        _check_vocab_size(tok, reader)
    return tok


def _adopt_model_template(tok: Tokenizer, reader):
    """A tokenizer given by --tokenizer has no chat template of its own; the model file may have one."""
    if tok.chat_template is None:
        meta = getattr(reader, "metadata", None) or {}
        template = meta.get("tokenizer.chat_template")
        tok.chat_template = template if isinstance(template, str) and template else None


def _check_vocab_size(tok: Tokenizer, reader):
    model_vocab = reader.config.vocab_size
    # HF embeddings are often padded past the tokenizer (e.g. to a multiple of 64); elsewhere the
    # vocabulary and the embedding rows come from one conversion and must match exactly
    fits = tok.vocab_size <= model_vocab if reader.format_name == "Hugging Face" else tok.vocab_size == model_vocab
    if not fits:
        raise ModelFormatError(f"{tok.source}: tokenizer has {tok.vocab_size} tokens but the model {reader.path} "
                               f"has vocab_size {model_vocab}; {TOKENIZER_FLAG_HINT}")


# ----------------------------------------------------------------------------------------------
# Special-token splitting and chat templates
# ----------------------------------------------------------------------------------------------

def _special_splitter(specials: Dict[str, int]):
    if not specials:
        return None
    # longest first, so that e.g. "<|end|>" cannot cut "<|end_of_text|>" short
    return re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)))


def _split_specials(text: str, splitter, specials: Dict[str, int]):
    """(fragment, None) for plain text and ("", id) for each special token found, in order."""
    pos = 0
    for m in splitter.finditer(text):
        if m.start() > pos:
            yield text[pos:m.start()], None
        yield "", specials[m.group()]
        pos = m.end()
    if pos < len(text):
        yield text[pos:], None


LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + (message['content'] | trim) + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA2_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set system = messages[0]['content'] %}{%- set turns = messages[1:] %}"
    "{%- else %}{%- set system = '' %}{%- set turns = messages %}{%- endif %}"
    "{%- for message in turns %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- set content = message['content'] %}"
    "{%- if loop.first and system %}{%- set content = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + content %}{%- endif %}"
    "{{- bos_token + '[INST] ' + (content | trim) + ' [/INST]' }}"
    "{%- else %}{{- ' ' + (message['content'] | trim) + ' ' + eos_token }}{%- endif %}"
    "{%- endfor %}"
)


def _content_markers(n: int, rendered: str) -> List[str]:
    """n texts that stand for message contents: unlike any text a template writes, no whitespace
    (so that trimming keeps them), and absent from the rendered conversation."""
    import secrets
    while True:
        tag = secrets.token_hex(6)
        if tag not in rendered:
            return [f"\ue000{tag}{i}\ue001" for i in range(n)]


def _align_parts(text: str, shape: str, contents: Dict[str, str]) -> Optional[List[Tuple[str, bool]]]:
    """Cut the rendered text where the marked render (shape) has its markers: (text, from the
    template) parts, or None when the two renders do not line up."""
    if not contents:
        return [(text, True)]
    pieces = re.split("(" + "|".join(map(re.escape, contents)) + ")", shape)   # template, marker, template, ...
    parts: List[Tuple[str, bool]] = []
    pos = 0
    for k in range(0, len(pieces), 2):
        template_text = pieces[k]
        if not text.startswith(template_text, pos):
            return None
        parts.append((template_text, True))
        pos += len(template_text)
        if k + 1 == len(pieces):
            break
        content, following, last = contents[pieces[k + 1]], pieces[k + 2], k + 3 == len(pieces)
        for candidate in dict.fromkeys((content, content.strip(), content.lstrip(), content.rstrip())):
            end = pos + len(candidate)
            if text.startswith(candidate, pos) and text.startswith(following, end) and \
                    (not last or end + len(following) == len(text)):
                parts.append((candidate, False))
                pos = end
                break
        else:
            return None
    return parts if pos == len(text) else None

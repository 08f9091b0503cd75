"""The tokenizer interface: `Tokenizer` (text <-> token ids, BOS, stop ids, chat template) and
`StreamDecoder` (text from tokens as they arrive, never splitting a multi-byte character).

Each implementation (sentencepiece.py, bpe.py) supplies only `_encode_text`; decoding works for
all from the raw bytes of every token, and chat rendering and encoding from `chat.py`. Also the
limits and the hint that every loader shares."""
from __future__ import annotations

import codecs
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from . import chat
from .templates import ChatTemplate

TOKENIZER_FLAG_HINT = ("pass the model's tokenizer with --tokenizer PATH "
                       "(tokenizer.json, tokenizer.model or tokenizer.bin)")

MAX_TOKENIZER_FILE_BYTES = 512 * 2**20         # tokenizer.json/.model/.bin: the largest real ones are ~30 MiB


def cut_at(raw: bytes, ends: Sequence[int]) -> List[bytes]:
    """The consecutive pieces of `raw` that end at `ends` (a whole vocabulary's bytes, encoded
    at once, back into one bytes object per token)."""
    return [raw[start:end] for start, end in zip([0, *ends], ends)]


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
        its family), rendered in a sandbox with limits on time and size (tokenizer/templates.py).
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
        """The rendered conversation as (text, from the template) parts, in order (see chat.chat_parts)."""
        return chat.chat_parts(lambda msgs: self.render_chat(msgs, add_generation_prompt, **extra),
                               messages, self.specials, self.source)

    def encode_chat_parts(self, parts: Sequence[Tuple[str, bool]]) -> List[int]:
        """Token ids of chat_parts(): special-token texts count only in template parts. Plain text
        between two special tokens is encoded in one piece, as encode(parse_special=True) would."""
        return chat.encode_chat_parts(parts, self.specials, self._encode_text)

    def fallback_chat_template(self) -> str:
        """A template for models that ship none, chosen by the special tokens of the vocabulary."""
        return chat.fallback_chat_template(self.specials)


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


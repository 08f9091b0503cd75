"""SentencePiece-style tokenizers: `SentencePieceTokenizer` (a `.model` file, or a GGUF `llama`
vocabulary rebuilt as a SentencePiece model by `spm_model_proto`) and `Llama2cTokenizer`
(llama2.c's tokenizer.bin, encoded like run.c's encode()), with the loaders of their files.

Both cut special tokens out of the text first (like llama.cpp) and encode each fragment with a
dummy prefix space."""
from __future__ import annotations

import os
import struct
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np

from ..errors import ModelFormatError
from .base import Tokenizer, cut_at
from .sidecar import SideFiles
from .specials import BYTE, BYTE_PIECE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED, special_splitter, split_specials


class _SpmLike(Tokenizer):
    """Shared by SentencePiece and llama2.c: special tokens are cut out of the text first (like
    llama.cpp), and every remaining fragment is encoded on its own with a dummy prefix space."""

    def __init__(self, *, parse_only: Dict[str, int], **kw):
        super().__init__(**kw)
        always = {t: i for t, i in self.specials.items() if t not in parse_only}
        self._split_always = special_splitter(always)           # user-defined tokens
        self._split_parse = special_splitter(self.specials)     # + control tokens with parse_special

    def _encode_text(self, text: str, parse_special: bool) -> List[int]:
        splitter = self._split_parse if parse_special else self._split_always
        if splitter is None:
            return self._encode_fragment(text)
        ids: List[int] = []
        for fragment, special_id in split_specials(text, splitter, self.specials):
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
        raw, hidden, specials, parse_only, byte_ids = _text_pieces(pieces), [], {}, {}, []
        for i, ttype in enumerate(types):
            if ttype == NORMAL:
                continue
            piece = pieces[i]
            if ttype == BYTE and BYTE_PIECE.fullmatch(piece):
                raw[i] = bytes([int(piece[3:5], 16)])
                byte_ids.append(i)
            elif ttype in (CONTROL, UNKNOWN):
                raw[i] = piece.encode("utf-8")
                hidden.append(i)
                if piece:
                    specials.setdefault(piece, i)
                    parse_only.setdefault(piece, i)
            elif ttype == USER_DEFINED and piece:
                specials.setdefault(piece, i)
        self._restore(processor, dict(source=source, pieces=raw, hidden=hidden, specials=specials, bos_id=bos_id,
                                      eos_ids=sorted(i for i in eos_ids if i is not None), eos_id=eos_id,
                                      add_bos=add_bos, chat_template=chat_template,
                                      strip_leading_space=add_dummy_prefix, byte_ids=byte_ids, parse_only=parse_only))

    def _restore(self, processor, fields: dict) -> None:
        self._sp = processor
        self.fields = fields            # everything but the processor: what a snapshot keeps (snapshot.py)
        _SpmLike.__init__(self, **fields)

    @classmethod
    def restored(cls, processor, fields: dict) -> "SentencePieceTokenizer":
        """The tokenizer a snapshot kept: its processor and `fields` as they were, nothing rebuilt."""
        tok = cls.__new__(cls)
        tok._restore(processor, fields)
        return tok

    def serialized_model_proto(self) -> bytes:
        return self._sp.serialized_model_proto()

    def _encode_fragment(self, text: str) -> List[int]:
        # the processor adds the dummy prefix itself; every fragment starts the text or follows a
        # special token, which is where llama.cpp adds the prefix space too
        return self._sp.encode(text)


def _text_pieces(pieces: Sequence[str]) -> List[bytes]:
    """The UTF-8 text of every piece, its U+2581 as spaces: one replace and one encode of the
    whole vocabulary, cut at each piece's byte length (a vocabulary has 32k-256k pieces)."""
    text = "".join(pieces).replace("\u2581", " ")        # one character for one: lengths stay
    lengths = _utf8_lengths(text, np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces)))
    return cut_at(text.encode("utf-8"), np.cumsum(lengths).tolist())


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
            m = BYTE_PIECE.fullmatch(p.decode("latin-1"))
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



# -- loading the files --------------------------------------------------------------------------

def load_sentencepiece_file(path: str) -> SentencePieceTokenizer:
    """A SentencePiece .model file, with BOS/EOS, stop ids and chat template from the files beside it."""
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
    side = SideFiles(os.path.dirname(os.path.abspath(path)))
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


def load_llama2c_file(path: str) -> Llama2cTokenizer:
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


# -- SentencePiece ModelProto, written by hand: the protobuf package is not a dependency ---------

_ONE_BYTE = [bytes((i,)) for i in range(128)]   # the varints of 0..127, most of a vocabulary's numbers


def _pb_varint(n: int) -> bytes:
    if 0 <= n < 128:
        return _ONE_BYTE[n]
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


def _varints(x: np.ndarray):
    """Protobuf varints of non-negative ints x (each < 2**28): their lengths (N,) and bytes (N, 4)."""
    if x.size and (x.min() < 0 or x.max() >= 1 << 28):
        raise ValueError("a SentencePiece field is negative or 256 MiB or more")
    length = 1 + (x >= 1 << 7) + (x >= 1 << 14) + (x >= 1 << 21)
    digits = (x[:, None] >> np.array([0, 7, 14, 21])) & 0x7F
    more = np.arange(4) < length[:, None] - 1           # every byte but a varint's last has the top bit
    return length, (digits | more << 7).astype(np.uint8)


def _put_varints(out: np.ndarray, at: np.ndarray, varints) -> None:
    length, data = varints
    for k in range(data.shape[1]):
        some = length > k
        out[at[some] + k] = data[some, k]


def _utf8_lengths(text: str, chars: np.ndarray) -> np.ndarray:
    """The UTF-8 byte lengths of the consecutive pieces of `text` that are chars[i] characters long."""
    code_points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    width = 1 + (code_points >= 0x80).astype(np.int64) + (code_points >= 0x800) + (code_points >= 0x10000)
    first = np.cumsum(chars) - chars
    sums = np.add.reduceat(np.append(width, 0), first) if chars.size else chars
    return np.where(chars > 0, sums, 0)


def _pieces_field(tokens: Sequence[str], scores: Sequence[float], types: Sequence[int]) -> bytes:
    """The repeated SentencePiece pieces of ModelProto (field 1), each { piece (1, bytes), score
    (2, fixed32), type (3, varint) }, laid out with numpy: a vocabulary has 32k-256k of them."""
    text = "".join(tokens)
    joined = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    n = _utf8_lengths(text, np.fromiter(map(len, tokens), dtype=np.int64, count=len(tokens)))
    ttype = np.asarray(types, dtype=np.int64).reshape(-1)
    if ttype.size and (ttype.min() < 0 or ttype.max() > 127):
        raise ValueError("SentencePiece piece types are 1..6")
    n_varints = _varints(n)
    body = 1 + n_varints[0] + n + 1 + 4 + 1 + 1
    body_varints = _varints(body)
    record = 1 + body_varints[0] + body
    start = np.cumsum(record) - record
    out = np.empty(int(record.sum()), dtype=np.uint8)
    out[start] = 0x0A                                    # field 1 (pieces), length-delimited
    _put_varints(out, start + 1, body_varints)
    at = start + 1 + body_varints[0]
    out[at] = 0x0A                                       # piece: field 1, length-delimited
    _put_varints(out, at + 1, n_varints)
    at = at + 1 + n_varints[0]
    out[np.repeat(at - (np.cumsum(n) - n), n) + np.arange(joined.size)] = joined
    at = at + n
    out[at] = 0x15                                       # score: field 2, fixed32
    out[at[:, None] + 1 + np.arange(4)] = np.asarray(scores, dtype="<f4").view(np.uint8).reshape(-1, 4)
    out[at + 5] = 0x18                                   # type: field 3, varint
    out[at + 6] = ttype
    return out.tobytes()


def spm_model_proto(tokens: Sequence[str], scores: Sequence[float], types: Sequence[int], *, bos, eos,
                    add_dummy_prefix: bool, remove_extra_whitespaces: bool) -> bytes:
    """sentencepiece_model.proto ModelProto: pieces (1), trainer_spec (2), normalizer_spec (3)."""
    out = bytearray(_pieces_field(tokens, scores, types))
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

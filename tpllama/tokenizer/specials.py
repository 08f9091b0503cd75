"""Special tokens: the token-type numbers, the end-of-turn token texts, and cutting the texts of
special tokens out of a string (longest match first), as every tokenizer here and chat encoding do."""
from __future__ import annotations

import re
from typing import Dict

# Token types; GGUF and SentencePiece number them the same way.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Texts of end-of-turn tokens that stop generation wherever they are special tokens (llama.cpp's list).
END_OF_TURN_TOKENS = (
    "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>", "<|end|>",
    "<end_of_turn>", "<|return|>", "<|call|>", "<EOT>", "_<EOT>", "<end_of_utterance>",
)

# A byte-fallback piece: <0x0A> stands for the byte 0x0A.
BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def special_splitter(specials: Dict[str, int]):
    """A regex matching the text of any of the special tokens (None when there are none)."""
    if not specials:
        return None
    # longest first, so that e.g. "<|end|>" cannot cut "<|end_of_text|>" short
    return re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)))


def split_specials(text: str, splitter, specials: Dict[str, int]):
    """(fragment, None) for plain text and ("", id) for each special token found, in order."""
    pos = 0
    for m in splitter.finditer(text):
        if m.start() > pos:
            yield text[pos:m.start()], None
        yield "", specials[m.group()]
        pos = m.end()
    if pos < len(text):
        yield text[pos:], None

"""Chat encoding: fallback chat templates per model family, and a rendered conversation cut into
template markup and message contents, so that text a user writes never becomes a special token.

The functions here work on what a tokenizer hands them (its render, its special tokens, its
plain-text encoder); `Tokenizer.chat_parts` / `encode_chat` are the public entry points. The
templates themselves render in the sandbox of `templates.py`."""
from __future__ import annotations

import re
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .specials import special_splitter, split_specials
from .templates import ChatTemplateError

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



def fallback_chat_template(specials: Dict[str, int]) -> str:
    """A template for models that ship none, chosen by the special tokens of the vocabulary."""
    if "<|start_header_id|>" in specials:
        return LLAMA3_TEMPLATE
    if "<|im_start|>" in specials:
        return CHATML_TEMPLATE
    return LLAMA2_TEMPLATE


def chat_parts(render: Callable[[List[dict]], str], messages: List[dict], specials: Dict[str, int],
               where: str) -> List[Tuple[str, bool]]:
    """The conversation as `render` writes it, cut into (text, from the template) parts, in order.

    The template is rendered twice: as is, and with every message content replaced by a
    unique marker. Between the markers lies the template's own text; the rendered text then
    shows what stands where each marker was (the content, or the content trimmed)."""
    text = render(messages)
    contents = [m.get("content") if isinstance(m.get("content"), str) else "" for m in messages]
    markers = _content_markers(len(messages), text)
    marked = [dict(m, content=markers[i]) if contents[i] else m for i, m in enumerate(messages)]
    shape = render(marked)
    parts = _align_parts(text, shape, {markers[i]: contents[i] for i in range(len(messages)) if contents[i]})
    if parts is not None:
        return parts
    # the template rewrites contents beyond trimming: safe as one text only if no content holds a special token
    splitter = special_splitter(specials)
    if splitter is not None and any(splitter.search(c) for c in contents):
        raise ChatTemplateError(f"{where}: a message holds special-token text, and the chat template "
                                "changes message contents so that it cannot be kept apart from its markup")
    return [(text, True)]


def encode_chat_parts(parts: Sequence[Tuple[str, bool]], specials: Dict[str, int],
                      encode_text: Callable[[str, bool], List[int]]) -> List[int]:
    """Token ids of chat_parts(): special-token texts count only in template parts. Plain text
    between two special tokens is encoded in one piece, as encode(parse_special=True) would.
    encode_text(text, parse_special) is the tokenizer's encoder without BOS."""
    splitter = special_splitter(specials)
    whole = "".join(text for text, _ in parts)
    if splitter is None or len(splitter.findall(whole)) == sum(
            len(splitter.findall(text)) for text, from_template in parts if from_template):
        # no special-token text in the messages (nor across a boundary): the whole text
        # encodes exactly as it always did (tokenizers that prefix only the text's start agree)
        return encode_text(whole, True) if whole else []
    runs: List[object] = []          # plain text (str) and special token ids (int), in order
    for text, from_template in parts:
        pieces = split_specials(text, splitter, specials) if from_template and splitter else [(text, None)]
        for fragment, special_id in pieces:
            if special_id is not None:
                runs.append(special_id)
            elif runs and isinstance(runs[-1], str):
                runs[-1] += fragment
            else:
                runs.append(fragment)
    ids: List[int] = []
    for run in runs:
        ids.extend([run] if isinstance(run, int) else encode_text(run, False) if run else [])
    return ids


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

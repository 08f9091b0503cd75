"""A chat's turns and the token ids the model has already read for them (kept on rank 0).

Each new prompt is the conversation's ids so far plus the new turn, so the engine finds them
in its KV cache and prefills only the new turn. Re-rendering the whole conversation and
tokenizing it again would not do: a generated answer need not tokenize back into the ids the
model produced, and the cache would be reused only up to the first difference.

The new turn's text is the difference between two renders of the model's chat template (with
and without it), so any template works; where a template rewrites earlier text (e.g. trims an
answer), the conversation is tokenized afresh, which costs cache reuse but nothing else.
Message texts are tokenized as plain text: a message holding `<|im_start|>` gets no control
token from it; only the template's own markup does (Tokenizer.chat_parts).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

from .errors import TpllamaError


class MessageTooLong(TpllamaError):
    """A message that does not fit in the context even with every earlier turn dropped."""


class Conversation:
    """User and assistant turns, an optional system prompt, and the ids that stand for them."""

    def __init__(self, tokenizer, system: Optional[str] = None):
        self.tokenizer = tokenizer
        self.system = system
        self.messages: List[dict] = []   # alternating user / assistant messages (the system prompt apart)
        self.ids: List[int] = []         # the conversation so far, as the model read and wrote it

    @property
    def turns(self) -> int:
        return len(self.messages) // 2

    def reset(self) -> None:
        """Forget every turn (the system prompt stays)."""
        self.messages, self.ids = [], []

    # ------------------------------------------------------------ prompts

    def prompt_for(self, user_text: str) -> List[int]:
        """Token ids that ask for the answer to a new user message: the conversation's ids, then the turn."""
        messages = self.messages + [_message("user", user_text)]
        if self.ids:
            turn = _parts_after(self._render(self.messages, False), self._parts(messages, True))
            if turn is not None:
                return self.ids + self.tokenizer.encode_chat_parts(turn)
        return self._encode(messages, True)

    def prompt_within(self, user_text: str, ctx: int, room: int) -> Tuple[List[int], int]:
        """The prompt for a new user message, dropping the oldest turns until it leaves `room`
        tokens for the answer in a context of `ctx`. Returns (ids, turns dropped)."""
        alone = len(self._encode([_message("user", user_text)], True))
        if alone >= ctx:   # checked first, so that such a message costs no turns
            raise MessageTooLong(f"the message needs {alone} tokens with the chat template and the system prompt, "
                                 f"but the context holds {ctx}; shorten it or raise -c")
        ids, dropped = self.prompt_for(user_text), 0
        while len(ids) + room > ctx and self.messages:
            self._drop_oldest_turn()
            dropped += 1
            ids = self.prompt_for(user_text)
        return ids, dropped

    def add_turn(self, user_text: str, prompt_ids: List[int], answer_ids: List[int], answer_text: str) -> None:
        """Record a finished (or stopped) turn: its prompt's ids, the answer's ids as generated, and
        the template's end of turn after them."""
        asked = self._render(self.messages + [_message("user", user_text)], True)
        self.messages += [_message("user", user_text), _message("assistant", answer_text)]
        end_of_turn = _parts_after(asked + answer_text, self._parts(self.messages, False))
        if end_of_turn is None:
            self.ids = self._encode(self.messages, False)
        else:
            self.ids = list(prompt_ids) + list(answer_ids) + self.tokenizer.encode_chat_parts(end_of_turn)

    # ------------------------------------------------------------ helpers

    def _drop_oldest_turn(self) -> None:
        self.messages = self.messages[2:]
        self.ids = self._encode(self.messages, False) if self.messages else []

    def _with_system(self, messages: List[dict]) -> List[dict]:
        return ([_message("system", self.system)] if self.system else []) + messages

    def _render(self, messages: List[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.render_chat(self._with_system(messages), add_generation_prompt=add_generation_prompt)

    def _parts(self, messages: List[dict], add_generation_prompt: bool) -> List[Tuple[str, bool]]:
        return self.tokenizer.chat_parts(self._with_system(messages), add_generation_prompt=add_generation_prompt)

    def _encode(self, messages: List[dict], add_generation_prompt: bool) -> List[int]:
        # like Model.encode_prompt: a rendered template carries its own BOS and special tokens
        return self.tokenizer.encode_chat(self._with_system(messages), add_generation_prompt=add_generation_prompt)


def _message(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def _parts_after(prefix: str, parts: Sequence[Tuple[str, bool]]) -> Optional[List[Tuple[str, bool]]]:
    """The (text, from the template) parts that follow prefix, or None when they do not start with it."""
    if not "".join(text for text, _ in parts).startswith(prefix):
        return None
    after, skip = [], len(prefix)
    for text, from_template in parts:
        if skip >= len(text):
            skip -= len(text)
            continue
        after.append((text[skip:], from_template))
        skip = 0
    return after

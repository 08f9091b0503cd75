"""The Hugging Face files beside a tokenizer file (tokenizer_config.json, generation_config.json,
config.json, chat_template.jinja / .json): its chat template, BOS/EOS tokens and stop ids."""
from __future__ import annotations

import os
from typing import Dict, Iterable, List, Optional

from ..errors import ModelFormatError
from .base import MAX_TOKENIZER_FILE_BYTES
from .specials import END_OF_TURN_TOKENS


def read_json(path: str) -> dict:
    """A JSON object file ({} when absent), read with the size and type checks of the model readers."""
    if not os.path.isfile(path):
        return {}
    from ..formats.jsonfile import read_json_object
    return read_json_object(path, os.path.basename(path))


class SideFiles:
    """What the JSON files next to a Hugging Face tokenizer add: template, BOS/EOS, stop ids."""

    def __init__(self, directory: str):
        self.tokenizer_config = read_json(os.path.join(directory, "tokenizer_config.json"))
        self.generation_config = read_json(os.path.join(directory, "generation_config.json"))
        self.config = read_json(os.path.join(directory, "config.json"))
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
        t = self.tokenizer_config.get("chat_template") or read_json(
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

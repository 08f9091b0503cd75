"""JSON files of a model directory (config.json, safetensors headers and index, tokenizer configs),
read so that any malformed content gives one ModelFormatError naming the file."""
from __future__ import annotations

import json

from ..errors import ModelFormatError

MAX_JSON_BYTES = 100 * 2**20      # far above any config or index; a bigger "JSON" file is not one


def parse_json_object(text, where: str, what: str) -> dict:
    """text (str or bytes) as a JSON object; where names the file, what says what it should be."""
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise ModelFormatError(f"{where}: {what} is nested too deeply to be read") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelFormatError(f"{where}: {what} is not valid JSON ({_one_line(e)})") from None
    if not isinstance(value, dict):
        raise ModelFormatError(f"{where}: {what} holds a JSON {type(value).__name__}, expected an object")
    return value


def read_json_object(path: str, what: str) -> dict:
    """The JSON object in the file at path (at most MAX_JSON_BYTES)."""
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_JSON_BYTES + 1)
    except OSError as e:
        raise ModelFormatError(f"{path}: cannot read {what} ({e.strerror})") from None
    if len(text) > MAX_JSON_BYTES:
        raise ModelFormatError(f"{path}: {what} is over {MAX_JSON_BYTES >> 20} MiB; not a real one")
    return parse_json_object(text, path, what)


def _no_duplicates(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice")
        out[key] = value
    return out


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:200]

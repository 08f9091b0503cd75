"""Seeded, bounded fuzzing of every file parser: mutated models and tokenizers load or fail cleanly.

Seeds are the shared test models (stories260K GGUF and llama2.c checkpoint, tok512.bin, the
vocab-test GGUFs, the Llama 2 / Llama 3 tokenizer.model files) and small Hugging Face directories
written here. Each mutation (bit flips, byte overwrites in the header, truncation, integer header
fields set to 0 / -1 / 2^31 / 2^32-1 / 2^63, NaN/Inf in weights) is loaded in a worker process
(tests/fuzz_worker.py) with a capped address space and a time limit per case. Every case must
end in success or one of the project's error classes with a one-line message: never another
exception, never a crash, never a hang, never an allocation past the cap.

CI runs TPLLAMA_FUZZ cases (default 240); set TPLLAMA_FUZZ=5000 for a deeper run (the big
vocabularies are then fuzzed too, TPLLAMA_FUZZ_SEED picks another sequence).
"""
from __future__ import annotations

import json
import os
import select
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import pytest

from conftest import REPO, SHARED_MODELS

CASES = int(os.environ.get("TPLLAMA_FUZZ", "240"))
SEED = int(os.environ.get("TPLLAMA_FUZZ_SEED", "20261128"))
DEEP = CASES > 1000
CASE_SECONDS = 60.0 if DEEP else 10.0   # a case over this is a hang (small seeds take well under a second)
FULL_SIZE_SEEDS = ("ggml-vocab-", "llama2-tokenizer", "llama3-tokenizer")  # 32k-128k vocabularies: seconds each
HEADROOM = 1 << 30             # address space a case may map beyond the worker's imports
SPECIAL_INTS = (0, -1, 1 << 31, (1 << 32) - 1, 1 << 63, (1 << 64) - 1, 1 << 40, 1, 2, 3)


# ------------------------------------------------------------------------------- workers

class Worker:
    """A tests/fuzz_worker.py process: one request at a time, killed and restarted on a hang or crash."""

    def __init__(self):
        self.proc = None

    def _start(self):
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.pop("TPLLAMA_DEBUG", None)
        self.proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "fuzz_worker.py"), str(HEADROOM)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env, cwd=str(REPO))
        ready = self._answer(120.0)
        assert ready == {"ready": True}, f"fuzz worker did not start: {ready}"

    def _answer(self, timeout: float):
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.proc.stdout.readline()
        return json.loads(line) if line else None

    def submit(self, request: dict):
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.started = time.monotonic()
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()

    def result(self, timeout: float) -> dict:
        answer = self._answer(max(0.0, timeout - (time.monotonic() - self.started)))
        elapsed = time.monotonic() - self.started
        if answer is None:
            if self.proc.poll() is None:
                outcome = {"outcome": "hang", "detail": f"no answer in {timeout:.0f} s"}
            else:
                outcome = {"outcome": "crash", "detail": f"worker died with {self.proc.returncode}: "
                                                         f"{self.proc.stderr.read()[-2000:]}"}
            self.stop()
            return outcome
        answer["seconds"] = elapsed
        return answer

    def stop(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def run_cases(cases: List["Case"], workers: int = 2, timeout: float = CASE_SECONDS) -> List[Tuple["Case", dict]]:
    pool = [Worker() for _ in range(workers)]
    results = []
    try:
        pending = list(cases)
        busy = {}
        while pending or busy:
            for w in pool:
                if w not in busy and pending:
                    case = pending.pop(0)
                    w.submit(case.request())
                    busy[w] = case
            waiting = [w.proc.stdout for w in busy]
            select.select(waiting, [], [], 0.5)
            for w in list(busy):
                elapsed = time.monotonic() - w.started
                ready, _, _ = select.select([w.proc.stdout], [], [], 0)
                if ready or elapsed > timeout or w.proc.poll() is not None:
                    results.append((busy.pop(w), w.result(timeout)))
    finally:
        for w in pool:
            w.stop()
    return results


# ------------------------------------------------------------------------------- seeds

@dataclass
class Case:
    name: str
    kind: str                  # "model" | "tokenizer"
    path: Path
    tokenizer: Optional[Path] = None

    def request(self) -> dict:
        return {"kind": self.kind, "path": str(self.path),
                "tokenizer": str(self.tokenizer) if self.tokenizer else None}


_GGUF_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def gguf_fields(data: bytes, max_items: int = 8) -> Tuple[List[Tuple[int, int, str]], int]:
    """(offset, size, label) of the integer fields of a GGUF header, from the spec: counts, lengths,
    types, integer values, tensor dims and offsets (only the first max_items of each array);
    and where the header ends."""
    fields, pos = [], 0

    def take(fmt, label):
        nonlocal pos
        size = struct.calcsize("<" + fmt)
        value = struct.unpack_from("<" + fmt, data, pos)[0]
        if fmt in "BbHhIiQq":
            fields.append((pos, size, label))
        pos += size
        return value

    def string(label):
        nonlocal pos
        n = take("Q", label + " length")
        pos += n
        return data[pos - n:pos].decode("utf-8", "replace")

    def value(vtype, label, record=True):
        nonlocal pos
        if vtype == 8:
            return string(label)
        if vtype == 9:
            itype, count = take("I", label + " item type"), take("Q", label + " count")
            for i in range(count):
                if i < max_items:
                    value(itype, f"{label}[{i}]")
                elif itype in _GGUF_SCALAR:
                    pos += struct.calcsize("<" + _GGUF_SCALAR[itype]) * (count - i)
                    break
                else:
                    value(itype, label, record=False) if itype != 8 else _skip_string()
            return None
        return take(_GGUF_SCALAR[vtype], label)

    def _skip_string():
        nonlocal pos
        (n,) = struct.unpack_from("<Q", data, pos)
        pos += 8 + n

    pos = 4
    take("I", "version")
    n_tensors, n_kv = take("Q", "tensor count"), take("Q", "kv count")
    for _ in range(n_kv):
        key = string("key")
        value(take("I", key + " type"), key)
    for _ in range(n_tensors):
        name = string("tensor name")
        n_dims = take("I", name + " n_dims")
        for d in range(n_dims):
            take("Q", f"{name} ne[{d}]")
        take("I", name + " type")
        take("Q", name + " offset")
    return fields, pos


def llama2c_fields(data: bytes) -> List[Tuple[int, int, str]]:
    names = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
    return [(4 * i, 4, n) for i, n in enumerate(names)]


def tokbin_fields(data: bytes, max_items: int = 40) -> List[Tuple[int, int, str]]:
    fields, pos = [(0, 4, "max_token_length")], 4
    for i in range(max_items):
        if pos + 8 > len(data):
            break
        (n,) = struct.unpack_from("<i", data, pos + 4)
        fields.append((pos + 4, 4, f"token {i} length"))
        pos += 8 + n
    return fields


# ------------------------------------------------------------------------------- mutations

def _put_int(data: bytearray, offset: int, size: int, value: int):
    data[offset:offset + size] = (value % (1 << (8 * size))).to_bytes(size, "little")


def mutate(data: bytes, fields, header_end: int, floats: Optional[Tuple[int, int]], rng) -> Tuple[bytes, str]:
    """One random mutation of data; returns (mutated bytes, what was done)."""
    out = bytearray(data)
    choice = rng.integers(6)
    if choice == 0 and fields:
        offset, size, label = fields[rng.integers(len(fields))]
        v = SPECIAL_INTS[rng.integers(len(SPECIAL_INTS))]
        if label.endswith((" type", "n_dims")) and rng.integers(2):
            v = int(rng.integers(0, 14))       # another valid type (or dimension count) than the file's
        _put_int(out, offset, size, v)
        return bytes(out), f"{label} = {v}"
    if choice == 1:
        n = int(rng.integers(1, 9))
        spots = rng.integers(0, max(1, min(header_end, len(out))), n)
        for p in spots:
            out[p] ^= 1 << int(rng.integers(8))
        return bytes(out), f"{n} bit flips in the header"
    if choice == 2:
        p = int(rng.integers(0, max(1, min(header_end, len(out)))))
        n = int(rng.integers(1, 9))
        out[p:p + n] = rng.bytes(n)
        return bytes(out), f"{n} random bytes at {p}"
    if choice == 3:
        cut = int(rng.integers(0, len(out)))
        return bytes(out[:cut]), f"truncated to {cut}"
    if choice == 4 and floats is not None:
        start, end = floats
        p = start + 4 * int(rng.integers(0, (end - start) // 4))
        v = (np.nan, np.inf, -np.inf, 3e38)[rng.integers(4)]
        out[p:p + 4] = struct.pack("<f", v)
        return bytes(out), f"float at {p} = {v}"
    n = int(rng.integers(1, 33))
    for p in rng.integers(0, len(out), n):
        out[p] ^= 1 << int(rng.integers(8))
    return bytes(out), f"{n} bit flips anywhere"


@dataclass
class Seed:
    name: str
    kind: str
    data: bytes
    suffix: str
    fields: list
    header_end: int
    floats: Optional[Tuple[int, int]] = None   # byte range of float32 weights
    weight: int = 1                            # share of the cases


def shared_seeds() -> List[Seed]:
    seeds = []
    sm = SHARED_MODELS
    gguf = sm / "stories260K" / "stories260K.gguf"
    if gguf.exists():
        data = gguf.read_bytes()
        fields, header_end = gguf_fields(data)
        seeds.append(Seed("stories260K.gguf", "model", data, ".gguf", fields, header_end,
                          (header_end, len(data)), weight=4))
    bin_ = sm / "stories260K" / "stories260K.bin"
    if bin_.exists():
        data = bin_.read_bytes()
        seeds.append(Seed("stories260K.bin", "model", data, ".bin", llama2c_fields(data), 28, (28, len(data)), weight=3))
    tok = sm / "stories260K" / "tok512.bin"
    if tok.exists():
        data = tok.read_bytes()
        seeds.append(Seed("tok512.bin", "tokenizer", data, ".bin", tokbin_fields(data), len(data), weight=2))
    for name in ("ggml-vocab-llama-spm.gguf", "ggml-vocab-llama-bpe.gguf"):
        f = sm / "vocab-tests" / name
        if f.exists() and DEEP:
            data = f.read_bytes()
            seeds.append(Seed(name, "tokenizer", data, ".gguf", gguf_fields(data)[0], 4096))
    for d in ("llama2-tokenizer", "llama3-tokenizer"):
        f = sm / d / "tokenizer.model"
        if f.exists() and DEEP:
            data = f.read_bytes()
            seeds.append(Seed(d, "tokenizer", data, ".model", [], 4096))
    return seeds


def _bytes_to_unicode():
    """GPT-2's byte -> printable character table (openai/gpt-2 encoder.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_small_bpe_gguf(path: Path) -> Path:
    """A vocab-only GGUF with a byte-level `gpt2` tokenizer (like ggml-vocab-llama-bpe.gguf, smaller)."""
    from gguf import GGUFWriter
    table = _bytes_to_unicode()
    tokens = [table[b] for b in range(256)]
    merges = []
    for left, right in (("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "a"), ("i", "n"), ("Ġ", "w"), ("o", "r"),
                        ("Ġw", "or"), ("l", "d"), ("Ġwor", "ld"), ("e", "l"), ("el", "l"), ("H", "ell"), ("Hell", "o")):
        merges.append(f"{left} {right}")
        tokens.append(left + right)
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    types = [1] * len(tokens) + [3] * len(specials)
    tokens += specials
    w = GGUFWriter(str(path), "llama")
    for key, v in (("block_count", 1), ("context_length", 64), ("embedding_length", 64),
                   ("feed_forward_length", 128), ("attention.head_count", 4), ("vocab_size", len(tokens))):
        w.add_uint32(f"llama.{key}", v)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "llama-bpe")
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.token_type", types)
    w.add_array("tokenizer.ggml.merges", merges)
    w.add_uint32("tokenizer.ggml.bos_token_id", len(tokens) - 3)
    w.add_uint32("tokenizer.ggml.eos_token_id", len(tokens) - 2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def small_hf_files(vocab: int = 512, sharded: bool = False) -> dict:
    """{file name: bytes} of a 1-layer HF Llama directory (config.json + safetensors)."""
    from safetensors.numpy import save
    from test_formats import small_hf_state
    cfg, state = small_hf_state(vocab=vocab)
    files = {"config.json": json.dumps(cfg).encode()}
    if not sharded:
        files["model.safetensors"] = save(state)
        return files
    names = sorted(state)
    parts = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for fname, part in parts.items():
        files[fname] = save({n: state[n] for n in part})
    files["model.safetensors.index.json"] = json.dumps(
        {"metadata": {}, "weight_map": {n: f for f, part in parts.items() for n in part}}).encode()
    return files


def small_tokenizer_json_files() -> dict:
    """{file name: bytes} of a directory with a small byte-level BPE tokenizer.json and its config."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    table = _bytes_to_unicode()
    vocab = {table[b]: b for b in range(256)}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("H", "e"), ("He", "l"), ("Hel", "l"), ("Hell", "o")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|begin_of_text|>", "<|eot_id|>"])
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "add_bos_token": True,
              "chat_template": "{% for m in messages %}{{ m['content'] }}<|eot_id|>{% endfor %}"}
    return {"tokenizer.json": tok.to_str().encode(), "tokenizer_config.json": json.dumps(config).encode()}


JSON_VALUES = (0, -1, 1 << 31, (1 << 32) - 1, 1 << 63, None, "x", [], {}, 1e308, -0.5, True, [1, 2])


def mutate_json(data: bytes, rng) -> Tuple[bytes, str]:
    """Replace or delete one value of a JSON object (recursing into nested objects), or break its shape."""
    obj = json.loads(data)
    choice = rng.integers(8)
    if choice == 0:
        return json.dumps(list(obj) if isinstance(obj, dict) else {"a": obj}).encode(), "wrong top-level type"
    if choice == 1:
        return (b"[" * 100000) + (b"]" * 100000), "100k-deep JSON"
    parent = obj
    while isinstance(parent, dict) and parent:
        key = list(parent)[rng.integers(len(parent))]
        if isinstance(parent[key], dict) and parent[key] and rng.integers(2):
            parent = parent[key]
            continue
        if choice == 2:
            del parent[key]
            return json.dumps(obj).encode(), f"deleted {key!r}"
        v = JSON_VALUES[rng.integers(len(JSON_VALUES))]
        parent[key] = v
        return json.dumps(obj).encode(), f"{key!r} = {v!r}"
    return json.dumps(obj).encode(), "unchanged"


def mutate_safetensors(data: bytes, rng) -> Tuple[bytes, str]:
    (n,) = struct.unpack_from("<Q", data, 0)
    if rng.integers(2):
        header, what = mutate_json(data[8:8 + n], rng)
        return struct.pack("<Q", len(header)) + header + data[8 + n:], "header: " + what
    return mutate(data, [(0, 8, "header length")], 8 + n, (8 + n, len(data)), rng)


def make_cases(directory: Path, count: int, seed: int) -> List[Case]:
    """count mutated files under directory, spread over every seed by its weight."""
    rng = np.random.default_rng(seed)
    seeds = shared_seeds()
    bpe = write_small_bpe_gguf(directory / "small-bpe.gguf").read_bytes()
    seeds.append(Seed("small-bpe.gguf", "tokenizer", bpe, ".gguf", gguf_fields(bpe)[0], len(bpe), weight=2))
    tiktoken = SHARED_MODELS / "llama3-tokenizer" / "tokenizer.model"
    if tiktoken.exists():
        head = b"".join(tiktoken.open("rb").readlines()[:600])
        seeds.append(Seed("tiktoken-600", "tokenizer", head, ".model", [], len(head), weight=1))
    dir_kinds = [("tokenizer-json", "tokenizer", small_tokenizer_json_files)]
    tok512 = SHARED_MODELS / "stories260K" / "tok512.bin"
    if tok512.exists():
        dir_kinds += [("hf", "model", small_hf_files), ("hf-sharded", "model", lambda: small_hf_files(sharded=True))]
    weights = [s.weight for s in seeds] + [2, 2, 1][:len(dir_kinds)]
    p = np.array(weights, dtype=float) / sum(weights)
    cases = []
    for i in range(count):
        k = int(rng.choice(len(p), p=p))
        if k < len(seeds):
            s = seeds[k]
            data, what = mutate(s.data, s.fields, s.header_end, s.floats, rng)
            path = directory / f"{i:05d}-{s.name}{s.suffix}"
            path.write_bytes(data)
            cases.append(Case(f"{s.name}: {what}", s.kind, path))
        else:
            name, kind, make_files = dir_kinds[k - len(seeds)]
            files = make_files()
            target = sorted(files)[rng.integers(len(files))]
            if target.endswith(".json") and rng.integers(4):
                files[target], what = mutate_json(files[target], rng)
            elif target.endswith(".json"):
                files[target], what = mutate(files[target], [], len(files[target]), None, rng)
            else:
                files[target], what = mutate_safetensors(files[target], rng)
            d = directory / f"{i:05d}-{name}"
            d.mkdir()
            for fname, data in files.items():
                (d / fname).write_bytes(data)
            cases.append(Case(f"{name} {target}: {what}", kind, d, tokenizer=tok512 if kind == "model" else None))
    return cases


def _report(results) -> str:
    bad = [(c, r) for c, r in results if r["outcome"] not in ("ok", "error")]
    lines = [f"{len(bad)} of {len(results)} cases failed:"]
    for c, r in bad[:12]:
        lines.append(f"--- {c.name} ({c.path.name}): {r['outcome']}\n{r['detail'][-1500:]}")
    return "\n".join(lines)


def test_mutated_files_load_or_fail_cleanly(tmp_path):
    if not (SHARED_MODELS / "stories260K").exists():
        pytest.skip(f"{SHARED_MODELS} is absent")
    cases = make_cases(tmp_path, CASES, SEED)
    results = run_cases(cases)
    assert len(results) == len(cases)
    assert all(r["outcome"] in ("ok", "error") for _, r in results), _report(results)
    slow = [(c.name, round(r["cpu_seconds"], 1)) for c, r in results
            if r["cpu_seconds"] > 3.0 and not c.name.startswith(FULL_SIZE_SEEDS)]
    assert not slow, f"cases over 3 s of CPU time: {slow}"
    # the mutations reach the parsers: most fail, with a message naming the file
    errors = [(c, r["detail"]) for c, r in results if r["outcome"] == "error"]
    assert len(errors) > len(cases) // 4
    unnamed = [(c.name, m) for c, m in errors if c.path.name not in m]
    assert not unnamed, f"messages that do not name the file: {unnamed[:5]}"


# ------------------------------------------------------------------------------- each reported bug

def _stories_gguf() -> bytes:
    return (SHARED_MODELS / "stories260K" / "stories260K.gguf").read_bytes()


def patch_gguf(d: Path, label: str, value, vtype: Optional[int] = None, fmt: str = None) -> Path:
    """stories260K.gguf with the header field `label` (as gguf_fields names it) set to value; vtype
    changes the key's value type first (same width), fmt packs the value (default: the field's width)."""
    data = bytearray(_stories_gguf())
    fields = {lab: (off, size) for off, size, lab in gguf_fields(bytes(data))[0]}
    if vtype is not None:
        off, size = fields[label + " type"]
        _put_int(data, off, size, vtype)
    off, size = fields[label]
    if fmt:
        data[off:off + size] = struct.pack(fmt, value)
    else:
        _put_int(data, off, size, value)
    path = d / f"patched-{label.replace(' ', '_')}.gguf"
    path.write_bytes(bytes(data))
    return path


def gguf_with_float(d: Path, tensor: str, index: int, value: float, *more) -> Path:
    """stories260K.gguf (F32 tensors) with float `index` of `tensor` set to value (more: further triples)."""
    from gguf_writer import gguf_tensor_table
    src = SHARED_MODELS / "stories260K" / "stories260K.gguf"
    table = gguf_tensor_table(src)
    data = bytearray(src.read_bytes())
    for name, i, v in [(tensor, index, value), *zip(more[::3], more[1::3], more[2::3])]:
        offset = table[name][2]
        data[offset + 4 * i:offset + 4 * i + 4] = struct.pack("<f", v)
    path = d / f"{tensor}-{index}-{value}.gguf"
    path.write_bytes(bytes(data))
    return path


def gguf_renamed_key(d: Path, old: bytes, new: bytes) -> Path:
    data = _stories_gguf()
    assert len(old) == len(new) and data.count(old) == 1
    path = d / "renamed.gguf"
    path.write_bytes(data.replace(old, new))
    return path


def gguf_bad_utf8_token(d: Path) -> Path:
    data = bytearray(_stories_gguf())
    fields = {lab: off for off, _, lab in gguf_fields(bytes(data))[0]}
    data[fields["tokenizer.ggml.tokens[3] length"] + 8] = 0xFF
    path = d / "bad-utf8.gguf"
    path.write_bytes(bytes(data))
    return path


def hf_dir(d: Path, edit_config=None, files=None) -> Path:
    files = dict(files or small_hf_files())
    if edit_config is not None:
        cfg = json.loads(files["config.json"])
        edit_config(cfg)
        files["config.json"] = json.dumps(cfg).encode()
    d.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (d / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    return d


def hf_with_header(d: Path, header: bytes) -> Path:
    files = small_hf_files()
    files["model.safetensors"] = struct.pack("<Q", len(header)) + header
    return hf_dir(d, files=files)


def hf_sharded_with_index(d: Path, index: bytes) -> Path:
    files = small_hf_files(sharded=True)
    files["model.safetensors.index.json"] = index
    return hf_dir(d, files=files)


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


def tiktoken_long_line(d: Path) -> Path:
    import base64
    head = b"".join((SHARED_MODELS / "llama3-tokenizer" / "tokenizer.model").open("rb").readlines()[:300])
    path = d / "tokenizer.model"
    path.write_bytes(base64.b64encode(b"a" * 300_000) + b" 0\n" + head)
    return path


# name -> (kind, builder(dir) -> path, regex of the one-line message); every one of these ended in a
# traceback, a hang or a model loaded with a zero context or NaN logits before the parsers were total
REGRESSIONS = {
    "gguf duplicate key": ("model", lambda d: gguf_renamed_key(d, b"tokenizer.ggml.bos_token_id",
                                                               b"tokenizer.ggml.eos_token_id"),
                           r"'tokenizer\.ggml\.eos_token_id' appears twice"),
    "gguf invalid UTF-8 token": ("model", gguf_bad_utf8_token, r"tokenizer\.ggml\.tokens\[3\].*not valid UTF-8"),
    "gguf n_dims 0": ("model", lambda d: patch_gguf(d, "blk.0.attn_q.weight n_dims", 0),
                      r"blk\.0\.attn_q\.weight.*0 dimensions"),
    "gguf dim 0": ("model", lambda d: patch_gguf(d, "blk.0.attn_q.weight ne[1]", 0),
                   r"blk\.0\.attn_q\.weight.*dimensions \[64, 0\]"),
    "gguf NaN in an int key": ("model", lambda d: patch_gguf(d, "llama.block_count", float("nan"), vtype=6, fmt="<f"),
                               r"llama\.block_count.*nan.*whole number"),
    "gguf negative context length": ("model", lambda d: patch_gguf(d, "llama.context_length", -5, vtype=5),
                                     r"llama\.context_length is -5"),
    "gguf context length 0": ("model", lambda d: patch_gguf(d, "llama.context_length", 0),
                              r"llama\.context_length is 0"),
    "gguf block_count 2^32-1": ("model", lambda d: patch_gguf(d, "llama.block_count", (1 << 32) - 1),
                                r"llama\.block_count is 4294967295"),
    "gguf scores count 2^31": ("model", lambda d: patch_gguf(d, "tokenizer.ggml.scores count", 1 << 31),
                               r"item count of 'tokenizer\.ggml\.scores' 2147483648 does not fit"),
    "gguf NaN in a norm": ("model", lambda d: gguf_with_float(d, "blk.2.ffn_norm.weight", 5, float("nan")),
                           r"'blk\.2\.ffn_norm\.weight'.*non-finite"),
    "gguf Inf in a weight": ("model", lambda d: gguf_with_float(d, "blk.1.ffn_down.weight", 172 + 5, float("inf")),
                             r"'blk\.1\.ffn_down\.weight' row 1 .*non-finite"),
    "gguf NaN in the embedding": ("model", lambda d: gguf_with_float(d, "token_embd.weight", 64 + 3, float("nan")),
                                  r"'token_embd\.weight' row 1 .*non-finite"),
    "gguf NaN in the classifier": ("model", lambda d: gguf_with_float(d, "output.weight", 64 * 300, float("nan")),
                                   r"'output\.weight' row 300 .*non-finite"),
    "gguf weight that overflows": ("model", lambda d: gguf_with_float(d, "output_norm.weight", 0, 3e38,
                                                                         "output.weight", 64 * 5, 3e38),
                                   r"non-finite logits at position \d+"),
    "hf config.json is a list": ("model", lambda d: hf_dir(d, files={**small_hf_files(), "config.json": b"[1, 2]"}),
                                 r"config\.json holds a JSON list, expected an object"),
    "hf config.json 100k deep": ("model", lambda d: hf_dir(d, files={**small_hf_files(),
                                                                     "config.json": b"[" * 100_000 + b"]" * 100_000}),
                                 r"config\.json.*nested too deeply"),
    "hf safetensors header is a list": ("model", lambda d: hf_with_header(d, b"[1]     "),
                                        r"model\.safetensors: safetensors header holds a JSON list"),
    "hf index is a string": ("model", lambda d: hf_sharded_with_index(d, b'"weights"'),
                             r"model\.safetensors\.index\.json: safetensors index holds a JSON str"),
    "hf llama3 rope keys missing": ("model", lambda d: hf_dir(d, lambda c: c.update(rope_scaling={"rope_type": "llama3",
                                                                                                   "factor": 8.0})),
                                    r"config\.json: rope_scaling.*llama3.*low_freq_factor"),
    "hf llama3 rope factor 0": ("model", lambda d: hf_dir(d, lambda c: c.update(rope_scaling=dict(LLAMA3_ROPE, factor=0))),
                                r"config\.json: rope_scaling.*factor > 0"),
    "hf num_hidden_layers 2^31": ("model", lambda d: hf_dir(d, lambda c: c.update(num_hidden_layers=1 << 31)),
                                  r"config\.json: .*num_hidden_layers is 2147483648"),
    "hf hidden_size text": ("model", lambda d: hf_dir(d, lambda c: c.update(hidden_size="64")),
                            r"config\.json: hidden_size is '64', expected a whole number"),
    "tiktoken 300 KB line": ("tokenizer", tiktoken_long_line, r"tokenizer\.model: line 1 is over 1024 bytes"),
    "gguf BPE merge of unknown tokens": ("tokenizer", lambda d: _bpe_with_bad_merge(d),
                                         r"small-bpe\.gguf: the BPE vocabulary and merges do not fit"),
}


def _bpe_with_bad_merge(d: Path) -> Path:
    path = write_small_bpe_gguf(d / "small-bpe.gguf")
    data = path.read_bytes()
    path.write_bytes(data.replace(b"\x03\x00\x00\x00\x00\x00\x00\x00o r", b"\x03\x00\x00\x00\x00\x00\x00\x00q r", 1))
    return path


@pytest.fixture(scope="module")
def regression_results(tmp_path_factory):
    if not (SHARED_MODELS / "stories260K").exists():
        pytest.skip(f"{SHARED_MODELS} is absent")
    root = tmp_path_factory.mktemp("regressions")
    tok512 = SHARED_MODELS / "stories260K" / "tok512.bin"
    cases = []
    for i, (name, (kind, build, _)) in enumerate(REGRESSIONS.items()):
        d = root / f"case{i}"
        d.mkdir()
        path = build(d)
        cases.append(Case(name, kind, path, tokenizer=tok512 if path.is_dir() else None))
    return {c.name: (c, r) for c, r in run_cases(cases)}


@pytest.mark.parametrize("name", list(REGRESSIONS))
def test_reported_bug_gives_one_error_line(regression_results, name):
    import re
    case, result = regression_results[name]
    assert result["outcome"] == "error", f"{name}: {result['outcome']}: {result['detail'][-1500:]}"
    message = result["detail"]
    assert re.search(REGRESSIONS[name][2], message), f"{message!r} does not match {REGRESSIONS[name][2]!r}"
    assert str(case.path) in message or case.path.name in message, f"{message!r} does not name the file"


# ------------------------------------------------------------------------------- non-finite values on two ranks

@pytest.mark.slow
@pytest.mark.parametrize("case, pattern", [
    # row 300 of the classifier belongs to rank 1 of 2 (vocab 512): only that rank reads it at load
    ("nan-in-rank-1-classifier", r"'output\.weight' row 300 .*non-finite"),
    # finite weights whose product overflows only in rank 1's logits shard, at the first step
    ("overflow-in-rank-1-logits", r"non-finite logits at position \d+"),
])
def test_non_finite_values_stop_both_ranks_with_one_line(tmp_path, case, pattern):
    import re
    from mpi_util import mpirun
    if not (SHARED_MODELS / "stories260K").exists():
        pytest.skip(f"{SHARED_MODELS} is absent")
    if case.startswith("nan"):
        path = gguf_with_float(tmp_path, "output.weight", 64 * 300, float("nan"))
    else:
        path = gguf_with_float(tmp_path, "output_norm.weight", 0, 3e38, "output.weight", 64 * 300, 3e38)
    proc = mpirun(2, ["-m", "tpllama.generate", "-m", str(path), "-p", "Once", "-n", "2", "-c", "16",
                      "--temp", "0", "-t", "1"], timeout=180, check=False)
    # tpllama's own lines (Open MPI adds a "PMIX ERROR" notice when ranks exit with status 1)
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower() and "PMIX" not in line]
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith("error: ") and str(path) in errors[0], errors[0]
    assert re.search(pattern, errors[0]), errors[0]


def test_forward_reports_non_finite_logits_with_their_position(tmp_path):
    """The library's forward() checks the logits it returns, naming the first bad position."""
    import tpllama
    from tpllama.errors import TpllamaError
    if not (SHARED_MODELS / "stories260K").exists():
        pytest.skip(f"{SHARED_MODELS} is absent")
    ok = tpllama.load(str(SHARED_MODELS / "stories260K" / "stories260K.gguf"), tokenizer="none",
                      weight_type="f32", ctx_size=16, threads=1)
    assert np.isfinite(ok.forward([1, 2, 3], 0)).all()
    # output_norm[0] * output[5, 0] = 9e76 overflows float32: only logit 5 becomes infinite
    path = gguf_with_float(tmp_path, "output_norm.weight", 0, 3e38, "output.weight", 64 * 5, 3e38)
    model = tpllama.load(str(path), tokenizer="none", weight_type="f32", ctx_size=16, threads=1)
    with pytest.raises(TpllamaError, match=r"non-finite logits at position 0"):
        model.forward([1, 2, 3], 0)

"""Per-rank shard files: a rank writes its converted weights once and reads them back at the
next start; a stale or damaged file is rebuilt, never used; a folder that cannot be written
costs only time."""
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import tpllama
from conftest import cgroup_or_skip
from mpi_util import run_script
from test_generate import STORIES_TEXT


def _load(path, folder, **kw):
    return tpllama.load(str(path), weight_type="f32", threads=1, shard_cache=str(folder), **kw)


def _shard_files(folder):
    return sorted(f for f in os.listdir(folder) if f.endswith(".tpshard")) if os.path.isdir(folder) else []


def test_second_start_reads_the_shard_file_and_gives_the_known_text(stories_gguf, tmp_path):
    cold = _load(stories_gguf, tmp_path)
    assert not cold.shard_file.hit and _shard_files(tmp_path) == [os.path.basename(cold.shard_file.path)]
    warm = _load(stories_gguf, tmp_path)
    assert warm.shard_file.hit, warm.shard_file.note
    # the known greedy text of ../shared/models/README.md, from the weights read back
    assert warm.generate("Once upon a time", 60, temperature=0.0).text == STORIES_TEXT[len("Once upon a time"):]
    assert np.array_equal(warm.forward([1, 403, 407], 0), cold.forward([1, 403, 407], 0))


def _mapped_files():
    with open("/proc/self/maps") as f:
        return {line.split(None, 5)[5].strip() for line in f if len(line.split(None, 5)) == 6}


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's /proc/self/maps")
def test_a_warm_start_maps_its_shard_file_instead_of_copying_it(stories_gguf, tmp_path):
    cold = _load(stories_gguf, tmp_path)
    weights = cold.load_report["weight_bytes"]
    read = _load(stories_gguf, tmp_path, mmap=False)                # --no-mmap: read into memory, as before
    assert read.shard_file.hit and read.shard_file.path not in _mapped_files()
    assert np.array_equal(read.forward([1, 403, 407], 0), cold.forward([1, 403, 407], 0))
    gc.collect()       # no earlier test's model freed during the load below, which would hide a copy
    warm = _load(stories_gguf, tmp_path)
    assert warm.shard_file.hit and warm.shard_file.path in _mapped_files(), warm.shard_file.note
    assert warm.load_report["resident_growth"] < weights / 4      # no copy of the weights in anonymous memory
    assert np.array_equal(warm.forward([1, 403, 407], 0), cold.forward([1, 403, 407], 0))


def test_another_weight_type_gets_its_own_file(stories_gguf, tmp_path):
    _load(stories_gguf, tmp_path)
    q40 = tpllama.load(str(stories_gguf), weight_type="q40", threads=1, shard_cache=str(tmp_path))
    assert not q40.shard_file.hit and len(_shard_files(tmp_path)) == 2


@pytest.mark.parametrize("damage", ["header byte", "data truncated", "data appended", "not a shard file"])
def test_a_damaged_shard_file_is_rebuilt_not_used(stories_gguf, tmp_path, damage):
    path = _load(stories_gguf, tmp_path).shard_file.path
    raw = bytearray(open(path, "rb").read())
    if damage == "header byte":
        raw[-100] ^= 0x01      # inside the JSON header, at the end of the file
    elif damage == "data truncated":
        raw = raw[:-100]
    elif damage == "data appended":
        raw += b"\0" * 64
    else:
        raw = b"GGUF" + bytes(raw[4:])
    open(path, "wb").write(raw)
    again = _load(stories_gguf, tmp_path)
    assert not again.shard_file.hit and "rebuilt" in again.shard_file.note
    assert again.generate("Once upon a time", 60, temperature=0.0).text == STORIES_TEXT[len("Once upon a time"):]
    assert _load(stories_gguf, tmp_path).shard_file.hit      # the rebuilt file is sound


def test_non_finite_weights_from_a_shard_file_name_it(stories_gguf, tmp_path):
    """A shard file's weights are not checksummed at each start (its header, size and key are): NaN
    written into them after the fact once ended in an error naming only the model file, which was
    sound. The error names the shard file too, and what to do."""
    path = _load(stories_gguf, tmp_path).shard_file.path
    with open(path, "r+b") as f:
        f.seek(4096)
        f.write(b"\xff" * 65536)      # float32 NaN over the first weights after the file's start
    damaged = _load(stories_gguf, tmp_path, mmap=False)
    assert damaged.shard_file.hit
    from tpllama.errors import TpllamaError
    with pytest.raises(TpllamaError) as e:
        damaged.forward([1, 403, 407], 0)
    assert "non-finite logits" in str(e.value) and path in str(e.value) and "--no-shard-cache" in str(e.value)


def test_a_folder_that_cannot_be_written_costs_only_time(stories_gguf, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    model = _load(stories_gguf, blocker / "shards")
    assert not model.shard_file.hit and "could not write" in model.shard_file.note
    assert model.generate("Once upon a time", 60, temperature=0.0).text == STORIES_TEXT[len("Once upon a time"):]


def test_a_folder_short_of_space_says_what_it_keeps_free(stories_gguf, tmp_path, monkeypatch):
    """The note once said 'it needs 1 MiB and 1 MiB are free': the 256 MiB kept free went unsaid."""
    import collections
    import tpllama.shardcache as sc
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(sc.shutil, "disk_usage", lambda folder: usage(2**30, 2**30 - 100 * 2**20, 100 * 2**20))
    model = _load(stories_gguf, tmp_path)
    assert not model.shard_file.hit and "did not write" in model.shard_file.note
    assert "256 MiB left free" in model.shard_file.note and "100 MiB are free" in model.shard_file.note
    assert _shard_files(tmp_path) == []


def test_off_means_no_file(stories_gguf, tmp_path, monkeypatch):
    monkeypatch.delenv("TPLLAMA_SHARD_CACHE")
    monkeypatch.setenv("TPLLAMA_CACHE", str(tmp_path))
    tpllama.load(str(stories_gguf), weight_type="f32", threads=1, shard_cache=False)
    assert not (tmp_path / "shards").exists()
    tpllama.load(str(stories_gguf), weight_type="f32", threads=1)        # default: on, under $TPLLAMA_CACHE
    assert len(_shard_files(tmp_path / "shards")) == 1
    monkeypatch.setenv("TPLLAMA_SHARD_CACHE", str(tmp_path / "mine"))
    tpllama.load(str(stories_gguf), weight_type="f32", threads=1)        # $TPLLAMA_SHARD_CACHE comes first
    assert len(_shard_files(tmp_path / "mine")) == 1


def test_the_folder_keeps_the_two_most_recently_used_files_of_a_model_and_rank(stories_gguf, tmp_path):
    """Every change of type, split or build wrote another file of the model's size, forever."""
    others = ["other.gguf.1r0.0123456789abcdef.tpshard", "stories260K.gguf.2r0.0123456789abcdef.tpshard"]
    for name in others + [".tmp-old.tpshard", ".tmp-new.tpshard"]:
        (tmp_path / name).write_bytes(b"x")
    os.utime(tmp_path / ".tmp-old.tpshard", (time.time() - 2 * 86400,) * 2)   # a killed writer's, two days ago
    paths = {t: tpllama.load(str(stories_gguf), weight_type=t, threads=1, shard_cache=str(tmp_path)).shard_file.path
             for t in ("f32", "q40", "q80")}
    files = set(_shard_files(tmp_path))
    assert os.path.basename(paths["f32"]) not in files                        # the least recently used went
    assert {os.path.basename(paths["q40"]), os.path.basename(paths["q80"])} <= files
    assert tpllama.load(str(stories_gguf), weight_type="q40", threads=1, shard_cache=str(tmp_path)).shard_file.hit
    tpllama.load(str(stories_gguf), weight_type="f32", threads=1, shard_cache=str(tmp_path))   # q40 was used last
    assert set(_shard_files(tmp_path)) - {".tmp-new.tpshard"} == \
        {os.path.basename(paths["q40"]), os.path.basename(paths["f32"])} | set(others)
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith(".tmp-")) == [".tmp-new.tpshard"]


@pytest.mark.parametrize("value", ["", "  ", 3])
def test_a_bad_shard_cache_value_is_one_error(stories_gguf, value):
    from tpllama.checks import ParameterError
    with pytest.raises(ParameterError, match="shard_cache"):
        tpllama.load(str(stories_gguf), shard_cache=value)


@pytest.mark.mpi
def test_each_rank_writes_its_own_file_and_reads_it_back(stories_gguf, tmp_path):
    first = run_script(2, "shard_cache.py", stories_gguf, tmp_path)
    second = run_script(2, "shard_cache.py", stories_gguf, tmp_path)
    assert [r["hit"] for r in first["ranks"]] == [False, False]
    assert [r["hit"] for r in second["ranks"]] == [True, True]
    assert len({r["file"] for r in first["ranks"]}) == 2 and len(_shard_files(tmp_path)) == 2
    assert second["text"] == first["text"] and len(first["text"]) > 20


# ------------------------------------------------------------ mapped mode: weights beyond memory

MAPPED_SHAPE = dict(name="mapped-test", dim=1024, ffn=2816, layers=8, heads=16, kv_heads=4, vocab=4096, ctx=256)


@pytest.fixture(scope="module")
def mapped_model(tmp_path_factory):
    """A q40 file of 100 MiB whose f32 shard file is 360 MiB."""
    from tpllama.bench.make_model import Shape, write_model
    path = tmp_path_factory.mktemp("mapped") / "mapped-test.gguf"
    write_model(str(path), Shape(**MAPPED_SHAPE), "q40", quiet=True)
    return path


def test_weights_twice_the_memory_limit_give_the_unconstrained_text(mapped_model, tmp_path):
    reference = tpllama.load(str(mapped_model), weight_type="f32", threads=2, ctx_size=64, shard_cache=False)
    want = reference.generate([1, 300, 400, 500], 4, temperature=0.0).tokens
    del reference
    folder = tmp_path / "shards"
    limit = 180 * 2**20
    with cgroup_or_skip("memory", {"memory.limit_in_bytes": limit}) as group:
        cmd = ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$0" "$@"', sys.executable,
               str(Path(__file__).parent / "mapped_worker.py"), str(mapped_model), str(folder)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        peak = int((group / "memory.max_usage_in_bytes").read_text())
    assert proc.returncode == 0, f"exit {proc.returncode} (killed for memory?)\n{proc.stderr[-2000:]}"
    shard_bytes = sum(f.stat().st_size for f in folder.iterdir())
    assert shard_bytes >= 2 * limit, "the test model's weights should be twice the memory limit"
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == want
    assert peak <= limit


def test_the_mapped_memory_plan_holds_two_layers_and_the_output_slice():
    from tpllama.config import ModelConfig
    from tpllama.plan import make_plan, output_bytes, weight_bytes
    c = ModelConfig(dim=1024, hidden_dim=2816, n_layers=8, n_heads=16, n_kv_heads=4, vocab_size=4096, max_seq_len=256)
    shard = make_plan(c, 2)[1]
    whole, out = weight_bytes(c, shard, "f32"), output_bytes(c, shard, "f32")
    assert out == 2048 * 1024 * 4
    assert weight_bytes(c, shard, "f32", mapped=True) == out + 2 * (whole - out) // 8


def test_weights_that_do_not_fit_run_mapped_by_themselves(stories_gguf, tmp_path, monkeypatch, caplog):
    """The memory plan finds the weights too big for the free memory but not mapped: the load
    switches to mapped shard files, says so, and gives the known text."""
    import logging
    import tpllama.memory
    from tpllama.formats import open_model
    from tpllama.plan import make_plan, rank_memory
    from tpllama.typeplan import choose_types
    reader = open_model(str(stories_gguf))
    plan, types = make_plan(reader.config, 1), choose_types(reader, "f32")
    full = rank_memory(plan, types, 64, ["h"], [0])[0].total
    mapped = rank_memory(plan, types, 64, ["h"], [0], mapped=True)[0].total
    assert mapped < full
    monkeypatch.setattr(tpllama.memory, "available_bytes", lambda: (full + mapped) // 2)
    with caplog.at_level(logging.WARNING, logger="tpllama"):
        model = _load(stories_gguf, tmp_path, ctx_size=64)
    assert model.mapped and "do not fit in memory" in caplog.text
    assert model.generate("Once upon a time", 60, temperature=0.0).text == STORIES_TEXT[len("Once upon a time"):]
    with pytest.raises(tpllama.errors.TpllamaError, match="needs .* MiB more"):
        _load(stories_gguf, tmp_path, ctx_size=64, mmap=False)


def test_an_edited_model_file_is_converted_again(stories_gguf, tmp_path):
    """The fingerprint samples 4 rows per tensor: a model edited in another row (a patched
    token, a small merge) got the old model's shard file and ran the old weights."""
    import shutil
    from gguf import GGUFReader
    model = tmp_path / "model.gguf"
    shutil.copy(stories_gguf, model)
    _load(model, tmp_path / "shards")
    tensor = next(t for t in GGUFReader(str(model)).tensors if t.name == "blk.2.ffn_down.weight")
    row_bytes = int(tensor.n_bytes) // int(tensor.shape[-1])      # GGUF shapes run innermost first
    with open(model, "r+b") as f:                                  # row 1: between the sampled rows
        f.seek(int(tensor.data_offset) + row_bytes)
        row = np.frombuffer(f.read(row_bytes), dtype=np.float32) * np.float32(3.0)
        f.seek(int(tensor.data_offset) + row_bytes)
        f.write(row.tobytes())
    edited = _load(model, tmp_path / "shards")
    assert not edited.shard_file.hit, edited.shard_file.note
    fresh = tpllama.load(str(model), weight_type="f32", threads=1, shard_cache=False)
    ids = [1, 403, 407, 261, 300]
    assert np.array_equal(edited.forward(ids, 0), fresh.forward(ids, 0))


def test_a_warm_start_reads_its_tokenizer_back_instead_of_building_it(stories_gguf, tmp_path, monkeypatch, caplog):
    """The GGUF vocabulary's tokenizer is kept beside the shard files: the next start reads it
    (the builder is not called) and gives the known text; an edited model file builds it again."""
    import shutil
    import tpllama.tokenizer.load as tokenizer_load
    model = tmp_path / "stories260K.gguf"
    shutil.copy(stories_gguf, model)
    cache = tmp_path / "cache"
    cold = _load(model, cache)
    assert cold.tokenizer_snapshot == "written"
    built = []
    real = tokenizer_load.tokenizer_from_gguf
    monkeypatch.setattr(tokenizer_load, "tokenizer_from_gguf", lambda *a: built.append(a) or real(*a))
    with caplog.at_level("INFO", logger="tpllama"):
        warm = _load(model, cache)
    assert warm.tokenizer_snapshot == "read" and not built
    assert "rank 0 read the tokenizer back from " in caplog.text          # the log says so, beside the shard line
    assert warm.generate("Once upon a time", 60, temperature=0.0).text == STORIES_TEXT[len("Once upon a time"):]
    assert warm.tokenizer.encode("Once upon a time") == cold.tokenizer.encode("Once upon a time")
    os.utime(model, ns=(os.stat(model).st_atime_ns, os.stat(model).st_mtime_ns + 10**9))   # an edited file
    edited = _load(model, cache)
    assert edited.tokenizer_snapshot == "written" and len(built) == 1
    snapshots = [f for f in os.listdir(cache) if f.endswith(".tptok")]
    assert len(snapshots) == 2          # the edited file's and the one before it (retire_replaced keeps two)


def test_shard_files_are_written_in_whole_2mib_pieces_at_2mib_offsets(tmp_path, monkeypatch):
    """So that the page cache keeps them in 2 MiB folios and a warm start maps 2 MiB pages
    (tpllama/shardcache.py, _ChunkedFile): every write but the last is whole 2 MiB pieces at a 2 MiB offset,
    and the bytes are those written, with zeros over the gaps seeks leave."""
    from tpllama import shardcache
    chunk = shardcache._ChunkedFile.CHUNK
    writes, real_write = [], os.write
    monkeypatch.setattr(shardcache.os, "write", lambda fd, data: writes.append(len(data)) or real_write(fd, data))
    rng = np.random.default_rng(5)
    path = tmp_path / "f.bin"
    f = shardcache._ChunkedFile(os.open(path, os.O_WRONLY | os.O_CREAT))
    want = bytearray()
    for size in [4096, 100, 3 * chunk + 17, 5, chunk, chunk - 3, 70000, 0, 2 * chunk]:
        gap = int(rng.integers(0, 64))
        f.seek(len(want) + gap)
        want += bytes(gap)
        data = rng.integers(0, 256, size, dtype=np.uint8)
        f.write(data)
        want += data.tobytes()
    f.close()
    assert path.read_bytes() == bytes(want)
    assert writes[:-1] and set(writes[:-1]) <= {chunk, 2 * chunk, 3 * chunk} and sum(writes) == len(want)
    with pytest.raises(ValueError):
        shardcache._ChunkedFile(os.open(tmp_path / "g.bin", os.O_WRONLY | os.O_CREAT)).seek(-1)

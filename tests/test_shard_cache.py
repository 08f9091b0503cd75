"""Per-rank shard files: a rank writes its converted weights once and reads them back at the
next start; a stale or damaged file is rebuilt, never used; a folder that cannot be written
costs only time."""
import os

import numpy as np
import pytest

import tpllama
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


def test_another_weight_type_gets_its_own_file(stories_gguf, tmp_path):
    _load(stories_gguf, tmp_path)
    q40 = tpllama.load(str(stories_gguf), weight_type="q40", threads=1, shard_cache=str(tmp_path))
    assert not q40.shard_file.hit and len(_shard_files(tmp_path)) == 2


@pytest.mark.parametrize("damage", ["header byte", "data truncated", "data appended", "not a shard file"])
def test_a_damaged_shard_file_is_rebuilt_not_used(stories_gguf, tmp_path, damage):
    path = _load(stories_gguf, tmp_path).shard_file.path
    raw = bytearray(open(path, "rb").read())
    if damage == "header byte":
        raw[40] ^= 0x01
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


def test_a_folder_that_cannot_be_written_costs_only_time(stories_gguf, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    model = _load(stories_gguf, blocker / "shards")
    assert not model.shard_file.hit and "could not write" in model.shard_file.note
    assert model.generate("Once upon a time", 60, temperature=0.0).text == STORIES_TEXT[len("Once upon a time"):]


def test_off_means_no_file(stories_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("TPLLAMA_CACHE", str(tmp_path))
    tpllama.load(str(stories_gguf), weight_type="f32", threads=1, shard_cache=False)
    assert not (tmp_path / "shards").exists()
    tpllama.load(str(stories_gguf), weight_type="f32", threads=1)        # default: on, under $TPLLAMA_CACHE
    assert len(_shard_files(tmp_path / "shards")) == 1


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

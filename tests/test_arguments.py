"""Arguments are checked before any work: the library names its parameters, the command line its
flags, and both refuse what cannot mean anything (NaN, negatives, zero contexts, float token ids)
before a model is loaded. The library reports through logger "tpllama" and prints nothing."""
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tpllama
from tpllama.checks import ParameterError
from tpllama.errors import TpllamaError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def stories(stories_bin):
    return tpllama.load(str(stories_bin), weight_type="f32", threads=1, ctx_size=64)


def cli(module, *args, stdin=None, timeout=120):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, input=stdin,
                          timeout=timeout, env=env, cwd=str(REPO))


# ---------------------------------------------------------------- the library


@pytest.mark.parametrize("kwargs,needle", [
    (dict(temperature=math.nan), "temperature=nan"),
    (dict(temperature=math.inf), "temperature=inf"),
    (dict(temperature=-1.0), "temperature=-1.0"),
    (dict(top_p=math.nan), "top_p=nan"),
    (dict(top_p=2.0), "top_p=2.0"),
    (dict(min_p=-0.1), "min_p=-0.1"),
    (dict(top_k=-3), "top_k=-3"),
    (dict(top_k=2.5), "top_k=2.5"),
    (dict(seed=-7), "seed=-7"),
    (dict(seed=1.5), "seed=1.5"),
    (dict(max_new_tokens=-1), "max_new_tokens=-1"),
    (dict(stop=[3]), "stop[0]=3"),
])
def test_library_sampling_arguments_are_refused_by_name(stories, kwargs, needle):
    args = dict(dict(max_new_tokens=4), **kwargs)
    with pytest.raises(ParameterError) as e:
        stories.generate("Once", **args)
    assert needle in str(e.value) and e.value.collective


def test_stream_checks_its_arguments_when_called_not_when_iterated(stories):
    with pytest.raises(ParameterError, match="temperature=nan"):
        stories.stream("Once", 4, temperature=math.nan)   # no iteration: refused at the call
    with pytest.raises(TpllamaError, match="the prompt has 7[0-9] tokens but the context holds 64"):
        stories.stream("Once upon a time " * 18, 4)


def test_seed_minus_one_is_a_random_seed(stories):
    texts = {stories.generate("Once", 12, temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=-1).text for _ in range(4)}
    assert len(texts) > 1, "seed -1 draws a new seed each time (llama.cpp's meaning)"
    same = {stories.generate("Once", 12, temperature=1.0, seed=5).text for _ in range(2)}
    assert len(same) == 1


@pytest.mark.parametrize("ids,needle", [
    ([], "token_ids=[]"),
    ([1.0, 2.0], "token_ids[0]=1.0"),
    ([1, True], "token_ids[1]=True"),
    ([1, 512], "token_ids[1]=512: expected a token id from 0 to 511"),
    ([-1], "token_ids[0]=-1"),
    ("Once", "token_ids='Once'"),
])
def test_forward_refuses_bad_token_lists(stories, ids, needle):
    with pytest.raises(ParameterError) as e:
        stories.forward(ids, start_pos=0)
    assert needle in str(e.value)


def test_forward_refuses_a_negative_or_future_start_pos(stories):
    stories.reset()
    stories.forward([1, 403, 407], start_pos=0)
    with pytest.raises(ParameterError, match="start_pos=-1"):
        stories.forward([261], start_pos=-1)
    assert len(stories.history) == 3, "a refused call leaves the cache as it was"
    with pytest.raises(ParameterError, match="start_pos=9"):
        stories.forward([261], start_pos=9)
    with pytest.raises(ParameterError, match="start_pos=1.0"):
        stories.forward([261], start_pos=1.0)


def test_generate_refuses_float_prompt_ids(stories):
    with pytest.raises(TpllamaError, match=r"prompt\[1\]=403.5: expected a whole-number token id"):
        stories.generate([1, 403.5], 4)


@pytest.mark.parametrize("options,needle", [
    (dict(ctx_size=0), "ctx_size=0"),
    (dict(ctx_size=-4), "ctx_size=-4"),
    (dict(threads=0), "threads=0"),
    (dict(weight_type="q3"), "weight_type='q3': expected one of auto, "),
    (dict(sync_type="f16"), "sync_type='f16'"),
    (dict(kv_type="q8"), "kv_type='q8': expected one of f32, f16"),
    (dict(rank_weights=[1.0, 2.0]), "rank_weights=[1.0, 2.0]: expected 1 numbers"),
    (dict(rank_weights=[math.nan]), "rank_weights=nan"),
    (dict(shard_cache=""), "shard_cache=''"),
    (dict(mmap="yes"), "mmap='yes'"),
    (dict(mmap=True, shard_cache=False), "mmap=True: runs from the shard files"),
    (dict(weights_from_root="yes"), "weights_from_root='yes'"),
    (dict(prefetch=-1), "prefetch=-1: expected auto or whole bytes from 0 (none) to 65536"),
    (dict(prefetch=70000), "prefetch=70000"),
    (dict(prefetch="fast"), "prefetch='fast'"),
])
def test_load_options_are_checked_before_the_file_is_opened(options, needle):
    t0 = time.perf_counter()
    with pytest.raises(ParameterError) as e:
        tpllama.load("/nonexistent/model.gguf", **options)   # the option, not the missing file, is reported
    assert needle in str(e.value)
    assert time.perf_counter() - t0 < 5


def test_the_library_prints_nothing_and_logs_on_tpllama(stories_bin, capfd, caplog):
    with caplog.at_level("INFO", logger="tpllama"):
        model = tpllama.load(str(stories_bin), weight_type="f32", threads=1, ctx_size=64)
        model.generate("Once", 4, temperature=0)
    assert capfd.readouterr() == ("", "")
    assert "memory plan" in caplog.text   # what verbose=True shows goes through the logger


@pytest.fixture
def tpllama_logger():
    """The "tpllama" logger, put back as it was after the test."""
    import logging
    log = logging.getLogger("tpllama")
    handlers, propagate, level = list(log.handlers), log.propagate, log.level
    yield log
    log.handlers[:] = handlers
    log.propagate, log.level = propagate, level


@pytest.fixture
def kernel_prefetch():
    """The kernels' prefetch distance, put back after the test (a model load may set it)."""
    from tpllama import _kernels as K
    before = K.prefetch()
    yield K
    K.set_prefetch(before)


def test_the_prefetch_option_sets_the_kernels_distance(stories_bin, kernel_prefetch, monkeypatch, caplog):
    """A number of bytes is used as given; auto measures only where the weights are large (a model
    of under 64 MiB a rank is not probed), and then uses the fastest distance and logs each rank's."""
    from tpllama import engine
    K = kernel_prefetch
    for value, expected in ((0, 0), ("2048", 2048), (512, 512)):
        model = tpllama.load(str(stories_bin), weight_type="f32", threads=1, ctx_size=16, prefetch=value)
        assert K.prefetch() == expected and model.prefetch_speeds is None
    model = tpllama.load(str(stories_bin), weight_type="f32", threads=1, ctx_size=16)
    assert model.prefetch_speeds is None and K.prefetch() == 512      # too small to probe: left as it was
    monkeypatch.setattr(engine, "PREFETCH_PROBE_MIN_BYTES", 0)
    with caplog.at_level("INFO", logger="tpllama"):
        model = tpllama.load(str(stories_bin), weight_type="f32", threads=1, ctx_size=16)
    (speeds,) = model.prefetch_speeds
    assert set(speeds) == {0, 1024} and K.prefetch() == max(speeds, key=speeds.get)
    assert "prefetch per rank" in caplog.text and "(used)" in caplog.text


def test_verbose_shows_the_log_on_stderr(stories_bin, capfd, tpllama_logger):
    tpllama.load(str(stories_bin), weight_type="f32", threads=1, ctx_size=64, verbose=True)
    assert "memory plan at context 64" in capfd.readouterr().err


# ---------------------------------------------------------------- the command line


@pytest.mark.parametrize("args,needle", [
    (["--temp", "-1"], "--temp -1.0: expected a finite number >= 0"),
    (["--temp", "nan"], "--temp nan"),
    (["-c", "0"], "-c 0: expected a whole number >= 1"),
    (["-c", "-4"], "-c -4"),
    (["-t", "0"], "-t 0: expected a whole number >= 1"),
    (["--top-p", "2"], "--top-p 2.0: expected a number above 0 and at most 1"),
    (["--min-p", "1.5"], "--min-p 1.5"),
    (["--top-k", "-1"], "--top-k -1"),
    (["-s", "-5"], "-s -5: expected a whole number from 0 to 2^64-1, or -1 for a random seed"),
    (["-n", "-3"], "-n -3"),
    (["--shard-cache", ""], "--shard-cache : expected True (the default folder), False (off) or a folder"),
    (["--mmap", "--no-shard-cache"], "--mmap True: runs from the shard files"),
    (["--prefetch", "fast"], "--prefetch fast: expected auto or whole bytes"),
])
def test_generate_flags_are_checked_before_loading(stories_bin, args, needle):
    out = cli("tpllama.generate", "-m", str(stories_bin), "-p", "hi", *args)
    assert out.returncode != 0
    assert needle in out.stderr, out.stderr
    assert out.stderr.strip().splitlines() == [f"error: {out.stderr.strip().split('error: ', 1)[1]}"], \
        "one line, and nothing printed before it (no model loaded, no memory plan)"
    assert out.stdout == ""


def test_a_prompt_longer_than_the_context_is_not_echoed(stories_bin):
    prompt = "Once upon a time " * 40
    out = cli("tpllama.generate", "-m", str(stories_bin), "-q", "-p", prompt, "-c", "64", "--raw")
    assert out.returncode == 1
    assert out.stdout == "", "the prompt is refused before anything is echoed"
    assert "error: the prompt has" in out.stderr and "context holds 64" in out.stderr


def test_a_generation_cut_by_the_context_says_so(stories_bin):
    out = cli("tpllama.generate", "-m", str(stories_bin), "-q", "-p", "Once upon a time", "-c", "64", "-n", "100",
              "--temp", "0", "--weight-type", "f32")
    assert out.returncode == 0, out.stderr
    assert "the context is full (64 tokens): the text was cut after 60 tokens" in out.stderr


def test_a_generation_that_reaches_n_says_nothing_about_the_context(stories_bin):
    out = cli("tpllama.generate", "-m", str(stories_bin), "-q", "-p", "Once upon a time", "-c", "64", "-n", "10",
              "--temp", "0")
    assert out.returncode == 0 and "context is full" not in out.stderr


def test_finish_reason_is_length_when_the_context_fills(stories_bin):
    model = tpllama.load(str(stories_bin), weight_type="f32", threads=1, ctx_size=64)
    g = model.generate("Once upon a time", 100, temperature=0)
    assert g.finish_reason == "length" and len(g.prompt_tokens) + len(g.tokens) == 64 + 1   # the last token is sampled from position 64


def test_non_utf8_prompt_bytes_are_one_clear_line(stories_bin, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-m", "tpllama.generate", "-m", str(stories_bin), "-p".encode(),
                          b"Once \xff upon"], capture_output=True, env=env, cwd=str(REPO), timeout=120)
    assert out.returncode == 1
    assert out.stderr.decode().strip() == "error: -p: not valid UTF-8 text (byte 0xff at character 5); save it as UTF-8"
    bad = tmp_path / "prompt.txt"
    bad.write_bytes(b"Once \xfe upon")
    out = cli("tpllama.generate", "-m", str(stories_bin), "-f", str(bad))
    assert f"error: -f {bad}: not valid UTF-8 text (byte 0xfe" in out.stderr


def test_system_prompt_without_a_chat_template_says_what_it_uses(stories_bin):
    out = cli("tpllama.generate", "-m", str(stories_bin), "-q", "-p", "hi", "-sys", "Be terse.", "-n", "2",
              "--temp", "0")
    assert out.returncode == 0, out.stderr
    assert "the model has no chat template; -sys uses a generic one" in out.stderr


@pytest.mark.parametrize("args,needle", [
    (["-n", "0"], "-n 0: expected a whole number of tokens >= 1"),
    (["-n", "-1"], "-n -1"),
    (["--temp", "inf"], "--temp inf"),
])
def test_chat_flags_are_checked_before_loading(stories_bin, args, needle):
    out = cli("tpllama.chat", "-m", str(stories_bin), *args, stdin="")
    assert out.returncode != 0
    assert needle in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


@pytest.mark.mpi
def test_on_two_ranks_seed_minus_one_and_bad_arguments_keep_the_ranks_in_step(stories_bin):
    from mpi_util import run_script
    ranks = run_script(2, "bad_arguments.py", stories_bin, timeout=120)["ranks"]
    (texts0, errors0, after0), (texts1, errors1, after1) = ranks
    assert texts0 == texts1, "rank 0's random seed drives every rank: the same text everywhere"
    assert len(set(texts0)) > 1
    assert len(errors0) == 6 and errors0 == errors1
    assert errors0[0].startswith("temperature=nan") and errors0[5].startswith("start_pos=-1")
    assert after0 == after1 and after0


@pytest.mark.mpi
def test_cli_seed_minus_one_under_mpirun(stories_bin):
    from mpi_util import mpirun
    out = mpirun(2, ["-m", "tpllama.generate", "-m", str(stories_bin), "-q", "-p", "Once", "-n", "8", "-s", "-1",
                     "-t", "1"])
    assert out.stdout.strip().startswith("Once") and "error" not in out.stderr


def test_a_model_file_with_a_zero_context_is_a_clear_error(tmp_path):
    from test_formats import small_gguf
    path = small_gguf(tmp_path / "zero-context.gguf", context=0)
    for ctx in (None, 16):    # the file's config is invalid, whatever context is asked for
        with pytest.raises(TpllamaError, match=r"zero-context\.gguf: .*llama\.context_length is 0"):
            tpllama.load(str(path), tokenizer="none", weight_type="f32", threads=1, ctx_size=ctx)


# llama.cpp's sampling defaults (common/common.h: temp 0.80, top_k 40, top_p 0.95, min_p 0.05, seed random),
# which tpllama follows (docs/usage.md)
LLAMA_CPP_SAMPLING = dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, seed=None)


@pytest.mark.parametrize("module", ["tpllama.generate", "tpllama.chat", "tpllama.serve"])
def test_sampling_flags_take_their_defaults_and_help_from_sampling_params(module):
    """One home for the sampling defaults: every command's flags parse to SamplingParams()' values,
    their --help shows those values, and the server's request defaults are the same."""
    import dataclasses
    import importlib
    from tpllama import cli as cli_module
    from tpllama.api import Defaults
    from tpllama.sampler import SamplingParams
    defaults = SamplingParams()
    assert dataclasses.asdict(defaults) == LLAMA_CPP_SAMPLING
    parser = importlib.import_module(module).build_parser()
    args = parser.parse_args([])
    assert cli_module.sampling_params(args) == defaults and Defaults().sampling == defaults
    for field in dataclasses.fields(SamplingParams):
        value = getattr(defaults, field.name)
        assert getattr(args, field.name) == value, field.name
        flag = field.metadata["setting"].flags[0]
        action = next(a for a in parser._actions if flag in a.option_strings)
        assert (f"(default {value})" in action.help) == (value is not None), (flag, action.help)
        help_text = " ".join(parser.format_help().split())
        assert action.help in help_text, flag


def test_the_help_shows_each_sampling_flags_default():
    out = cli("tpllama.generate", "--help")
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    for flag, value in (("--temp", 0.8), ("--top-k", 40), ("--top-p", 0.95), ("--min-p", 0.05)):
        after = text[text.index(flag + " ", text.index("sampling:")):]   # the flag's line in the sampling group
        assert f"(default {value})" in after[:200], flag


def test_the_usage_docs_give_the_sampling_defaults_of_sampling_params():
    from tpllama.sampler import DEFAULT_MAX_NEW_TOKENS, SamplingParams
    lines = (REPO / "docs" / "usage.md").read_text().splitlines()
    row = next(line for line in lines if line.startswith("| `--temp`"))
    d = SamplingParams()
    for shown in (f"0 = greedy; {d.temperature})", f"({d.top_k}; 0 = off)", f"({d.top_p}; 1 = off)",
                  f"({d.min_p}; 0 = off)", "(-1 or none: random)"):
        assert shown in row, shown
    assert f"({DEFAULT_MAX_NEW_TOKENS})" in next(line for line in lines if line.startswith("| `-n`"))


@pytest.mark.parametrize("preset, expected", [(None, "^ofi"), ("self,tcp", "self,tcp")])
def test_the_command_line_skips_open_mpis_libfabric_probe_unless_told_otherwise(preset, expected):
    """Open MPI's btl ofi spent about a second of every start in MPI_Init probing for HPC fabrics;
    the entry points leave it out before MPI starts, and a user's own OMPI_MCA_btl wins."""
    env = {k: v for k, v in os.environ.items() if k != "OMPI_MCA_btl"}
    if preset:
        env["OMPI_MCA_btl"] = preset
    out = subprocess.run([sys.executable, "-c", "import os, tpllama.generate; print(os.environ['OMPI_MCA_btl'])"],
                         capture_output=True, text=True, timeout=60, env=dict(env, PYTHONPATH=str(REPO)), cwd=str(REPO))
    assert out.returncode == 0 and out.stdout.strip() == expected, out.stderr


@pytest.mark.mpi
def test_ranks_called_with_different_arguments_neither_hang_nor_garble(stories_gguf):
    """Once: different token limits, sampling, prompt counts or start positions hung the job, a
    different --rank-weights garbled the text, a different context hung it. Now a load option that
    differs is one error on every rank, and a call's arguments are rank 0's on every rank."""
    from mpi_util import run_script
    rank0, rank1 = run_script(2, "mismatched_calls.py", stories_gguf, timeout=180)["ranks"]
    for name in ("ctx_size", "rank_weights", "kv_type"):
        case = f"load {name}"
        assert rank0[case] == rank1[case] and rank0[case][0] == "error", (case, rank0[case], rank1[case])
        assert rank0[case][1].startswith(f"{name}=") and "the ranks were given different values" in rank0[case][1]
    greedy = rank0["greedy"]
    assert greedy[0] == "ok" and len(greedy[1]) == 6
    assert rank0["max_new_tokens"] == rank1["max_new_tokens"] == greedy           # rank 0's limit
    assert rank0["temperature"] == rank1["temperature"] == greedy                 # rank 0's sampling
    assert rank0["start_pos"] == rank1["start_pos"] == ["ok", 3]
    assert rank0["token_ids"] == rank1["token_ids"] == ["ok", 3]
    assert rank0["prompts"] == rank1["prompts"] and len(rank0["prompts"][1]) == 2
    assert rank0["bad temperature on rank 1"] == ["error", "rank 1: temperature=-1: expected a finite number >= 0 "
                                                           "(0 is greedy)"]
    assert rank1["bad temperature on rank 1"][0] == "error" and rank1["bad temperature on rank 1"][1].startswith(
        "temperature=-1")
    assert rank1["greedy"] == greedy

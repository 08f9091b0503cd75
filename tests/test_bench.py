"""Smoke tests of the benchmark tools, so they cannot silently rot (they time nothing)."""
import json
import os
import subprocess
import sys

import pytest

from mpi_util import REPO, mpi_env
from benchmarks.hosts import unavailable_reason

pytestmark = pytest.mark.mpi


def sweep(tmp_path, model, *extra):
    cmd = [sys.executable, str(REPO / "benchmarks" / "sweep.py"), "--model", str(model), "--ranks", "1,2",
           "--threads", "1", "--reps", "1", "--pp", "8", "--tg", "8", "--oversubscribe", "--out", str(tmp_path), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=mpi_env(), cwd=str(REPO))


def test_sweep_writes_table_json_and_plot(tmp_path, stories_gguf):
    proc = sweep(tmp_path, stories_gguf)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(next(tmp_path.glob("*.json")).read_text())
    rows = result["rows"]
    assert [(r["ranks"], r["threads"]) for r in rows] == [(1, 1), (2, 1)]
    for r in rows:
        assert r["tg_median"] > 0 and r["pp_median"] > 0 and len(r["peak_rss_mib"]) == r["ranks"]
    two = rows[1]
    # 2 ranks exchange 2 x layers x dim float64 partial sums per token (stories260K: 5 layers, dim 64)
    assert two["sent_kb_per_token"][0] == pytest.approx(2 * 5 * 64 * 8 / 1024, abs=0.1)
    assert result["meta"]["cpu"] and "sweep.py" in result["meta"]["command"]
    table = next(tmp_path.glob("*.md")).read_text()
    assert "| 2 | 1 |" in table and "sync ms" in table
    pytest.importorskip("matplotlib")
    assert next(tmp_path.glob("*.png")).stat().st_size > 1000


def test_sweep_netem_hosts(tmp_path, stories_gguf):
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"cannot make hosts with network namespaces here: {reason}")
    proc = sweep(tmp_path, stories_gguf, "--netem")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(next(tmp_path.glob("*.json")).read_text())["rows"]
    assert rows[1]["modelled_latency_ms"] == pytest.approx(0.2 * 2 * 5 * 2 * 1)


def test_benchmarks_use_only_the_models_public_steps():
    """The benchmarks time Model.prefill and Model.decode_step; they used to drive the private
    Model._run (and engine._LocalFailure), which a change inside the engine would break silently."""
    import re
    from tpllama.engine import Model
    private = {name for name in vars(Model) if name.startswith("_") and not name.startswith("__")}
    assert "_forward_tokens" in private   # the step the public methods wrap
    for path in sorted((REPO / "benchmarks").glob("*.py")):
        text = path.read_text()
        used = {m for m in re.findall(r"\.(_[A-Za-z]\w*)", text) if m in private} | set(re.findall(r"\b_run\(", text))
        assert not used, f"{path.name} uses the model's private {sorted(used)}"
        assert "_LocalFailure" not in text and "from tpllama.engine import _" not in text, path.name


def test_the_benchmark_runners_step_the_model_through_its_cache(stories_gguf):
    """compare_llamacpp's and model_speed's tpllama side, on a tiny model (no timing asserted)."""
    sys.path.insert(0, str(REPO))
    from benchmarks._common import Quiet
    from benchmarks.compare_llamacpp import TpllamaRunner
    from benchmarks.model_speed import fused_against_steps, measure, profile_decode
    runner = TpllamaRunner(str(stories_gguf), 1, 64)
    runner.prompt([1, 403, 407])
    runner.decode([261, 378])
    assert runner.model.history == [1, 403, 407, 261, 378]
    pp, dec, _, _ = measure(runner.model, [1, 403, 407, 261], 3, 1, Quiet(enabled=False))
    assert pp > 0 and dec > 0
    profile = profile_decode(runner.model, [1, 403], 2, Quiet(enabled=False))
    assert profile["step_ms"] > 0 and profile["kernel_ms"] >= profile["per_phase_ms"]["matmuls"] > 0
    against = fused_against_steps(runner.model, [1, 403], 2, 2, Quiet(enabled=False))
    assert len(against["fused"]) == len(against["steps"]) == 2


def _plain_install(tmp_path):
    """(site folder holding the installed tpllama, checkout whose tpllama/ has no built kernels),
    as after `pip install .` from a fresh clone: the build writes the kernels into the install only."""
    import shutil
    site, checkout = tmp_path / "site", tmp_path / "checkout"
    shutil.copytree(REPO / "tpllama", site / "tpllama", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "tpllama", checkout / "tpllama",
                    ignore=shutil.ignore_patterns("__pycache__", "_kernels*.so", "_kernels*.pyd"))
    shutil.copytree(REPO / "benchmarks", checkout / "benchmarks", ignore=shutil.ignore_patterns("__pycache__", "results"))
    return site, checkout


def test_benchmarks_run_after_a_plain_install_from_any_folder(tmp_path, stories_gguf):
    """The scripts put the checkout first on the import path, so after `pip install .` they imported
    the checkout's tpllama without its C kernels: ModuleNotFoundError: tpllama._kernels."""
    site, checkout = _plain_install(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(mpi_env(), PYTHONPATH=str(site), OMP_NUM_THREADS="1")
    scripts = sorted(p for p in (checkout / "benchmarks").glob("*.py") if p.name not in ("_common.py", "hosts.py"))
    assert len(scripts) >= 9
    helps = {p.name: subprocess.Popen([sys.executable, str(p), "--help"], stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, env=env, cwd=str(elsewhere))
             for p in scripts}
    for name, proc in helps.items():
        out = proc.communicate(timeout=120)[0]
        assert proc.returncode == 0 and "usage:" in out, f"{name} --help:\n{out}"
    run = subprocess.run([sys.executable, str(checkout / "benchmarks" / "model_speed.py"), "--model", str(stories_gguf),
                          "--threads", "1", "--reps", "1", "--steps", "2", "--prompt", "4", "--ctx", "32",
                          "--no-quiet", "--json", str(tmp_path / "speed.json")],
                         capture_output=True, text=True, env=env, cwd=str(elsewhere), timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    header = run.stdout.splitlines()[0]
    assert "SIMD" in header and "GB/s at 1 thread(s)" in header and f"tpllama from {site / 'tpllama'}" in header
    result = json.loads((tmp_path / "speed.json").read_text())
    assert result["machine"]["bandwidth_GBps"]["1"] > 0 and result["machine"]["cpu"]
    r = result["results"]["1"]
    assert 0 < r["decode_fraction_of_bandwidth"]
    # the streaming read is measured again after the decode; the higher one is the reference
    assert r["bandwidth_after_GBps"] > 0 and r["bandwidth_GBps"] == max(r["bandwidth_before_GBps"], r["bandwidth_after_GBps"])


def test_benchmarks_say_how_to_get_the_kernels_when_there_are_none(tmp_path):
    """Installed without kernels and none built in the checkout: one line naming both ways, no traceback."""
    import shutil
    _, checkout = _plain_install(tmp_path)
    broken = tmp_path / "broken-site"
    shutil.copytree(checkout / "tpllama", broken / "tpllama")
    # -S: no .pth files, so no development install elsewhere can lend its kernels; numpy from site-packages
    import sysconfig
    env = dict(mpi_env(), PYTHONPATH=os.pathsep.join([str(broken), sysconfig.get_paths()["purelib"]]))
    run = subprocess.run([sys.executable, "-S", str(checkout / "benchmarks" / "kernels.py"), "--help"], capture_output=True,
                         text=True, env=env, cwd=str(tmp_path), timeout=60)
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert run.stderr.startswith("error: cannot import tpllama") and "pip install ." in run.stderr


def test_sweep_long_context_reports_decode_positions_and_attention_share(tmp_path, stories_gguf):
    proc = sweep(tmp_path, stories_gguf, "--ctx", "300", "--prompt-len", "160")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(next(tmp_path.glob("*.json")).read_text())["rows"]
    assert [(r["ranks"], r["threads"]) for r in rows] == [(1, 1), (2, 1)]
    for r in rows:
        positions = [d["position"] for d in r["decode"]]
        assert positions == [100, 160, 300], positions     # decode starts after that many cached positions
        shares = [r["pp_attention_share"]] + [d["attention_share"] for d in r["decode"]]
        assert all(0 < s < 1 for s in shares) and r["pp_tokens_per_s"] > 0
    table = next(tmp_path.glob("*.md")).read_text()
    assert "decode at 300 tok/s (attention %)" in table and "attention's slowdown at the last" in table


def test_sweep_counts_the_attention_inside_fused_layers(tmp_path, smollm2):
    """A model whose sublayers run as one C call each (SmolLM2's packed matrices, unlike
    stories260K's f32 FFN) still reports attention's share: it once read 0% at every position."""
    proc = sweep(tmp_path, smollm2, "--ctx", "300", "--prompt-len", "160")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(next(tmp_path.glob("*.json")).read_text())["rows"]
    for r in rows:
        shares = [d["attention_share"] for d in r["decode"]]
        assert all(0 < s < 1 for s in shares), (r["ranks"], shares)
        assert shares[-1] > shares[0], shares     # more cached positions: a larger share


def test_attention_slowdown_takes_the_rest_of_the_step_from_the_long_step_itself():
    """A step of 0.1 s at 100 positions (3% attention) and of 0.2 s at 4,000 (50%): without its
    extra attention the long step would take 0.1 + 0.003 s, so attention makes it 1.94x slower.
    With the same 0.1 s of attention in a long step of 0.22 s (the rest of it 20% slower: a busier
    machine), attention makes it 0.22 / 0.123 = 1.79x slower, where the speed ratio says 2.2x."""
    from benchmarks.sweep import attention_slowdown
    short = {"tokens_per_s": 10.0, "attention_share": 0.03}
    assert attention_slowdown(short, {"tokens_per_s": 5.0, "attention_share": 0.5}) == pytest.approx(0.2 / 0.103)
    busier = {"tokens_per_s": 1 / 0.22, "attention_share": 0.1 / 0.22}
    assert attention_slowdown(short, busier) == pytest.approx(0.22 / 0.123)


def test_cluster_model_predicts_namespace_runs_from_measured_inputs(tmp_path):
    """cluster_model.py --here on made-up inputs, checked against the arithmetic by hand: TinyLlama
    shape, even split over 2 ranks (each exactly half of every sublayer's weights), 1 rank alone
    80 ms/token and 40 tok/s over 64 prompt tokens on an idle machine; all-reduces 0.1 ms at 1 KiB
    after a barrier, 1 ms at 16 KiB after work, 10 ms at 1 MiB; other work keeps 1 core busy
    during the 2-rank run, so each rank gets 2/3 of a core (x1.5)."""
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"rows": [{"ranks": 1, "threads": 1, "pp": 64, "tg": 64, "simd_levels": ["avx2"],
                                         "decode_ms": 80.0, "pp_median": 40.0, "others_cores": 0.0}]}))
    allreduce = tmp_path / "allreduce.json"
    times = {"1024": 1e-4, "16384": 5e-4, "1048576": 0.01}
    allreduce.write_text(json.dumps({"2": {"seconds": times, "seconds_between": dict(times, **{"16384": 1e-3})}}))
    measured = tmp_path / "netem.json"
    measured.write_text(json.dumps({"rows": [{"ranks": 2, "threads": 1, "pp": 64, "tg": 64, "decode_ms": 100.0,
                                              "pp_median": 40.0, "others_cores": 1.0}]}))
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "cluster_model.py"), "--here", "--cores", "2",
                           "--shape", "tinyllama-1.1b", "--one-rank", str(one), "--allreduce", str(allreduce),
                           "--measured", str(measured)], capture_output=True, text=True, timeout=120, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr
    row = next(l for l in proc.stdout.splitlines() if l.startswith("| 2 ranks"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    decode = 80 / 2 * 1.5 + 44 * 1.0 + 2 * 0.1              # compute, 2 x 22 all-reduces, broadcast + gather
    prefill_ms = 64 / 40 * 1e3 / 2 * 1.5 + 44 * 10.0 + 2 * 0.1
    assert float(cells[1]) == pytest.approx(decode, abs=0.06) and cells[2] == "100.0"
    assert cells[3] == f"{100 * (decode - 100) / 100:+.0f}%"
    assert float(cells[4]) == pytest.approx(64e3 / prefill_ms, abs=0.06) and cells[5] == "40.0"


def test_batch_ceiling_times_steps_of_several_sequences(tmp_path, stories_gguf):
    out = tmp_path / "ceiling.json"
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "batch_ceiling.py"), "--model", str(stories_gguf),
                          "--threads", "1", "--batch", "1,2", "--reps", "1", "--no-quiet", "--out", str(out)],
                         capture_output=True, text=True, env=dict(mpi_env(), OMP_NUM_THREADS="1"), timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = json.loads(out.read_text())["results"]["1"]
    assert [r["batch"] for r in rows] == [1, 2] and all(r["median_s"] > 0 for r in rows)
    assert rows[0]["ceiling"] == 1.0 and rows[1]["ceiling"] > 0


def test_attention_benchmark_alternates_layouts_and_builds(tmp_path):
    """attention.py --layout blocked,rows --against a checkout (here this one): every layout of
    both builds timed in turns, each with its ratio to the first (the runtime's blocked cache)."""
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "attention.py"), "--positions", "300",
                          "--prompt-len", "0", "--ranks", "2", "--threads", "1", "--reps", "1", "--no-quiet",
                          "--layout", "blocked,rows", "--against", str(REPO), "--json", str(tmp_path / "a.json")],
                         capture_output=True, text=True, timeout=300, env=mpi_env())
    assert out.returncode == 0, out.stdout + out.stderr
    results = json.loads((tmp_path / "a.json").read_text())["results"]
    assert [r["variant"] for r in results] == ["f32 blocked", "f32 rows", "f32 blocked, other build",
                                               "f32 rows, other build"]
    assert all(r["ms"][0] > 0 for r in results)
    assert "decode at 300: f32 rows, other build / f32 blocked time" in out.stdout


def test_call_overhead_times_two_builds_in_one_process(tmp_path):
    """call_overhead.py --against a checkout: both builds' kernels timed side by side (here this
    checkout against itself, so both columns are there and a step's saving is near 0)."""
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "call_overhead.py"), "--against", str(REPO),
                          "--reps", "1", "--json", str(tmp_path / "calls.json")],
                         capture_output=True, text=True, timeout=120, env=mpi_env())
    assert out.returncode == 0, out.stdout + out.stderr
    assert "| rmsnorm | 2 |" in out.stdout and "ms saved" in out.stdout
    result = json.loads((tmp_path / "calls.json").read_text())
    assert set(result["ms_per_step"]) == {"this", "other"} and result["ms_per_step"]["this"] > 0
    assert set(result["us_per_call"]["other"]) == set(result["per_layer"])


def test_sitting_lists_its_steps_and_refuses_an_unknown_one():
    script = str(REPO / "benchmarks" / "sitting.py")
    listed = subprocess.run([sys.executable, script, "--list"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and "model_speed" in listed.stdout and "benchmarks/warm_start.py" in listed.stdout
    bad = subprocess.run([sys.executable, script, "--only", "nosuchstep"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "no step named nosuchstep" in bad.stderr

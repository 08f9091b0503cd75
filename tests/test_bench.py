"""Smoke tests of the benchmark tools, so they cannot silently rot (they time nothing)."""
import json
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
    from benchmarks.model_speed import measure, profile_decode
    runner = TpllamaRunner(str(stories_gguf), 1, 64)
    runner.prompt([1, 403, 407])
    runner.decode([261, 378])
    assert runner.model.history == [1, 403, 407, 261, 378]
    pp, dec, _, _ = measure(runner.model, [1, 403, 407, 261], 3, 1, Quiet(enabled=False))
    assert pp > 0 and dec > 0
    assert profile_decode(runner.model, [1, 403], 2, Quiet(enabled=False))["step_ms"] > 0

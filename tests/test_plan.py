"""The sharding plan (pure functions, no MPI): coverage, proportions, kv-head replication, memory."""
import itertools

import pytest

from tpllama.config import ModelConfig
from tpllama.errors import TpllamaError
from tpllama.plan import (kv_bytes_per_token, make_plan, matrix_bytes, max_context, parse_rank_weights,
                          parse_size, rank_memory, host_shortfalls, split_proportional, weight_bytes)

SMOLLM2 = ModelConfig(dim=576, hidden_dim=1536, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152,
                      max_seq_len=8192, tie_embeddings=True)
LLAMA2_7B = ModelConfig(dim=4096, hidden_dim=11008, n_layers=32, n_heads=32, n_kv_heads=32, vocab_size=32000,
                        max_seq_len=4096)
LLAMA3_8B = ModelConfig(dim=4096, hidden_dim=14336, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256,
                        max_seq_len=8192)
STORIES = ModelConfig(dim=64, hidden_dim=172, n_layers=5, n_heads=8, n_kv_heads=4, vocab_size=512, max_seq_len=512)


def covers(ranges, total):
    """Contiguous, in order, no gaps or overlaps, union == range(total)."""
    pos = 0
    for r in ranges:
        assert r.start == pos, ranges
        pos = r.stop
    return pos == total


@pytest.mark.parametrize("config", [SMOLLM2, LLAMA2_7B, LLAMA3_8B, STORIES], ids=["smollm2", "llama2", "llama3", "stories"])
def test_every_rank_count_covers_the_model(config):
    for k in range(1, config.n_heads + 1):
        plan = make_plan(config, k)
        assert covers([s.heads for s in plan.ranks], config.n_heads)
        assert covers([s.ffn for s in plan.ranks], config.hidden_dim)
        assert covers([s.vocab for s in plan.ranks], config.vocab_size)
        for s in plan.ranks:
            assert len(s.heads) >= 1
            # a rank holds exactly the kv heads its query heads read
            needed = {h // config.kv_group for h in s.heads}
            assert set(s.kv_heads) == needed
            if config.hidden_dim % 32 == 0:   # FFN slices are whole q40 blocks
                assert s.ffn.start % 32 == 0 and s.ffn.stop % 32 == 0
        sizes = [len(s.heads) for s in plan.ranks]
        assert max(sizes) - min(sizes) <= 1, f"equal weights but uneven heads {sizes}"


def test_smollm2_on_two_and_four_ranks():
    two = make_plan(SMOLLM2, 2)
    assert [len(s.heads) for s in two.ranks] == [5, 4]
    assert [list(s.kv_heads) for s in two.ranks] == [[0, 1], [1, 2]]   # kv head 1 is held by both
    four = make_plan(SMOLLM2, 4)
    assert [len(s.heads) for s in four.ranks] == [3, 2, 2, 2]
    assert [list(s.kv_heads) for s in four.ranks] == [[0], [1], [1, 2], [2]]
    # the rank with a third head gets fewer FFN blocks, so every rank holds about as much
    assert [len(s.ffn) for s in four.ranks] == [352, 416, 352, 416]


@pytest.mark.parametrize("config", [SMOLLM2, LLAMA2_7B, LLAMA3_8B], ids=["smollm2", "llama2", "llama3"])
def test_each_rank_holds_its_share(config):
    """Equal weights: each rank holds at most W/K + the replicated kv heads + 5% of W/K."""
    W = weight_bytes(config, make_plan(config, 1)[0], "q40")
    for k in (2, 3, 4):
        plan = make_plan(config, k)
        held = [weight_bytes(config, s, "q40") for s in plan.ranks]
        replicated = sum(held) - W
        for b in held:
            assert b <= W / k + replicated + 0.05 * W / k, (k, [h / (W / k) for h in held])


def test_rank_weights_shift_work_to_faster_ranks():
    plan = make_plan(LLAMA2_7B, 3, parse_rank_weights("2,1,1", 3))
    heads = [len(s.heads) for s in plan.ranks]
    ffn = [len(s.ffn) for s in plan.ranks]
    assert heads == [16, 8, 8]
    assert abs(ffn[0] - 2 * ffn[1]) <= 32 and sum(ffn) == 11008
    assert len(plan.ranks[0].vocab) == 16000
    w = [weight_bytes(LLAMA2_7B, s, "q40") for s in plan.ranks]
    assert 1.9 < w[0] / w[1] < 2.1


@pytest.mark.parametrize("config", [SMOLLM2, STORIES, LLAMA3_8B], ids=["smollm2", "stories", "llama3"])
@pytest.mark.parametrize("weights", [(20, 1), (1, 1e9), (1e-300, 1), (1e6, 1, 1)])
def test_a_lopsided_split_still_gives_every_rank_a_slice_of_every_matrix(config, weights):
    """--rank-weights 20,1 once gave SmolLM2's rank 1 no FFN units (and stories260K's no vocab
    rows), and the rank then failed to load; a rank's share now rounds up to one unit of each."""
    plan = make_plan(config, len(weights), weights)
    for part in ("heads", "ffn", "vocab"):
        ranges = [getattr(s, part) for s in plan.ranks]
        assert all(len(r) > 0 for r in ranges), (part, ranges)
        assert covers(ranges, {"heads": config.n_heads, "ffn": config.hidden_dim, "vocab": config.vocab_size}[part])
    small, big = (plan.ranks[-1], plan.ranks[0]) if weights[-1] < weights[0] else (plan.ranks[0], plan.ranks[-1])
    assert len(small.ffn) < len(big.ffn) and len(small.vocab) < len(big.vocab)   # still lopsided


@pytest.mark.parametrize("text", ["nan", "inf", "1,nan", "inf,1", "-inf,1", "1e400,1"])
def test_rank_weights_that_are_not_finite_numbers_are_refused(text):
    with pytest.raises(TpllamaError, match="--rank-weights"):
        parse_rank_weights(text, len(text.split(",")))


def test_auto_rank_weights_follow_the_measured_speeds():
    """--rank-weights auto: speeds 6.0 and 1.5 GB/s (4:1) become weights 1 and 1/4 on a 1/16 grid
    (a 1% change of a speed keeps the split), and each rank then holds its share of the layers,
    up to a head's and an FFN block's granularity, with the kv heads its query heads read."""
    from tpllama.speedprobe import weights_from_speeds
    weights = weights_from_speeds([6.0, 1.5])
    assert weights == (1.0, 0.25) and weights_from_speeds([6.0, 1.52]) == weights
    assert weights_from_speeds([5.0, 0.01]) == (1.0, 1 / 16)          # a crawling rank still gets work
    plan = make_plan(LLAMA3_8B, 2, weights)
    assert [len(s.heads) for s in plan.ranks] == [25, 7]               # one head each, 30 more split 4:1
    for s in plan.ranks:
        assert set(s.kv_heads) == {h // LLAMA3_8B.kv_group for h in s.heads}
    assert [len(s.vocab) for s in plan.ranks] == [102605, 25651]      # 128256 x 4/5, rounded
    held = [weight_bytes(LLAMA3_8B, s, "q40") for s in plan.ranks]
    share = held[0] / sum(held)
    assert abs(share - 0.8) < 0.01, share


def test_the_probe_matrix_is_finite_and_the_probe_is_bounded():
    """The probe's random blocks have finite scales (a NaN would time a different path), its
    copies fill the footprint, and a probe of a tiny footprint returns a speed after about its time."""
    import time
    import numpy as np
    from tpllama.speedprobe import matvec_speed, probe_matrices
    for wtype in ("q40", "q41", "q4k", "q6k", "q80", "f32"):
        mats = probe_matrices(wtype, 32, 256, threads=1, footprint=2**20)
        assert all(m.wtype == wtype for m in mats) and np.isfinite(mats[-1].dequantized()).all()
        assert np.array_equal(mats[0].dequantized(), mats[-1].dequantized())
        assert wtype == "f32" or sum(m.nbytes for m in mats) > 2**20 - mats[0].nbytes
    t0 = time.perf_counter()
    assert matvec_speed(SMOLLM2, "q40", 1, seconds=0.02, footprint=2**20) > 0
    assert time.perf_counter() - t0 < 2


def test_the_prefetch_probe_times_every_distance_and_puts_the_kernels_back():
    """--prefetch auto: a speed for each candidate distance, the kernels' own distance unchanged
    after it, and the fastest chosen (the first of equals)."""
    from tpllama import _kernels as K
    from tpllama.speedprobe import fastest_prefetch, prefetch_speeds
    before = K.prefetch()
    speeds = prefetch_speeds(SMOLLM2, "q40", 1, choices=(0, 1024, 4096), seconds=0.02, footprint=2**20)
    assert set(speeds) == {0, 1024, 4096} and all(v > 0 for v in speeds.values())
    assert K.prefetch() == before
    assert fastest_prefetch({0: 20.0, 1024: 25.0}) == 1024
    assert fastest_prefetch({0: 25.0, 1024: 20.0}) == 0 and fastest_prefetch({0: 5.0, 1024: 5.0}) == 0


def test_split_proportional_is_largest_remainder():
    assert [len(r) for r in split_proportional(10, [1, 1, 1])] == [4, 3, 3]
    assert [len(r) for r in split_proportional(7, [3, 1], minimum=1)] == [5, 2]
    for total, n in itertools.product([1, 5, 9, 48, 172], [1, 2, 3, 4]):
        if total >= n:
            assert covers(split_proportional(total, [1.0] * n, minimum=1), total)


def test_bad_requests_say_what_to_do():
    with pytest.raises(TpllamaError, match="at most 9 ranks"):
        make_plan(SMOLLM2, 10)
    with pytest.raises(TpllamaError, match="has 2 values but the job has 3 ranks"):
        parse_rank_weights("1,2", 3)
    with pytest.raises(TpllamaError, match="positive"):
        parse_rank_weights("1,0", 2)
    with pytest.raises(TpllamaError, match="comma-separated"):
        parse_rank_weights("fast,slow", 2)
    with pytest.raises(TpllamaError, match="8G"):
        parse_size("lots")


def test_weight_bytes_add_up_to_the_model():
    """Summed over ranks, weights are the model's q40 bytes plus only the replicated kv heads."""
    full = weight_bytes(LLAMA3_8B, make_plan(LLAMA3_8B, 1)[0], "q40")
    layer_q40 = (4096 * 4096 * 2 + 1024 * 4096 * 2 + 14336 * 4096 * 3) * 18 // 32
    assert full == 32 * (layer_q40 + 2 * 4 * 4096) + 128256 * 4096 * 18 // 32 + 4 * 4096
    for k in (2, 4, 8):
        plan = make_plan(LLAMA3_8B, k)
        assert sum(weight_bytes(LLAMA3_8B, s, "q40") for s in plan.ranks) == pytest.approx(full + (k - 1) * 32 * 8 * 4096, rel=0.001)


def test_qwen_biases_and_qk_norms_are_counted_per_rank():
    """Qwen2 adds this rank's part of the q, k, v biases to every layer, Qwen3 two whole q/k norms
    of head_dim (Qwen2.5-7B's and Qwen3-8B's shapes, 3 ranks: 28 and 32 heads split unevenly)."""
    from dataclasses import replace
    qwen25_7b = ModelConfig(dim=3584, hidden_dim=18944, n_layers=28, n_heads=28, n_kv_heads=4, vocab_size=152064,
                            max_seq_len=32768, arch="qwen2")
    qwen3_8b = ModelConfig(dim=4096, hidden_dim=12288, n_layers=36, n_heads=32, n_kv_heads=8, vocab_size=151936,
                           max_seq_len=40960, head_dim=128, arch="qwen3")
    for c in (qwen25_7b, qwen3_8b):
        for s in make_plan(c, 3).ranks:
            added = weight_bytes(c, s, "q40") - weight_bytes(replace(c, arch="llama"), s, "q40")
            per_layer = (len(s.heads) + 2 * len(s.kv_heads)) * 128 if c.arch == "qwen2" else 2 * 128
            assert added == c.n_layers * 4 * per_layer, (c.arch, s.rank)


def test_plan_command_shows_the_architecture_and_its_vectors_per_rank(tmp_path):
    """The vectors per layer the plan prints are the bytes the loaded model holds (1 rank), and
    each rank's share of the biases at 3 ranks (4 heads: 2, 1, 1; 2 kv heads: 1, 1, 1)."""
    import tpllama
    from gguf_writer import write_one_token_qwen
    path = write_one_token_qwen(tmp_path / "qwen.gguf", "A")
    layer = tpllama.load(str(path), ctx_size=16, threads=1, shard_cache=False, verbose=False).rank_model.w.layers[0]
    held = sum(getattr(layer, v).nbytes for v in ("attn_norm", "ffn_norm", "bq", "bk", "bv"))
    out = run_plan_cli("-m", str(path), "-n", "3", "-c", "64", "--host-memory", "1G")
    assert out.returncode == 0, out.stderr
    assert f"{path}: qwen2 (q/k/v biases), 1 layers, dim 64" in out.stdout
    assert "4 heads / 2 kv heads of 16" in out.stdout and "vectors/layer" in out.stdout
    split = [line.split() for line in out.stdout.splitlines()[2:5]]
    assert [int(row[-2]) for row in split] == [4 * (2 * 64 + (h + 2) * 16) for h in (2, 1, 1)]
    one = run_plan_cli("-m", str(path), "-n", "1", "-c", "64", "--host-memory", "1G")
    assert int(one.stdout.splitlines()[2].split()[-2]) == held


def test_stories_ffn_is_not_blockable_and_stays_f32():
    assert matrix_bytes(64, 172, "q40") == 64 * 172 * 4
    assert matrix_bytes(172, 64, "q40") == 176 * 64 * 18 // 32   # rows packed 16 at a time (kernels/tpk.h)


def test_memory_plan_finds_the_host_that_does_not_fit():
    plan = make_plan(LLAMA2_7B, 4)
    hosts = ["pi1", "pi2", "pi3", "pi4"]
    mem = rank_memory(plan, "q40", 4096, hosts, [8 * 2**30, 8 * 2**30, 4 * 2**30, 1 * 2**30])
    short = host_shortfalls(mem)
    assert [(h, r) for h, r, _ in short] == [("pi4", [3])]
    assert short[0][2] == mem[3].total - 2**30
    # the KV cache of a 7B model at 131072 positions is the famous ~64 GiB; 4 ranks each hold a quarter
    assert kv_bytes_per_token(LLAMA2_7B, plan[0]) * 131072 == 2 * 4 * 32 * 8 * 128 * 131072
    ctx = max_context(plan, "q40", hosts, [8 * 2**30] * 4)
    assert 256 <= ctx <= LLAMA2_7B.max_seq_len and ctx % 256 == 0 or ctx == LLAMA2_7B.max_seq_len


def test_a_float16_kv_cache_needs_half_the_memory_and_fits_twice_the_context():
    """--kv-type f16: 2 bytes a value instead of 4, by the formula (not by the code's own table)."""
    plan = make_plan(LLAMA2_7B, 4)
    hosts = ["pi1", "pi2", "pi3", "pi4"]
    assert kv_bytes_per_token(LLAMA2_7B, plan[0], "f16") * 131072 == 2 * 2 * 32 * 8 * 128 * 131072
    f32, f16 = (rank_memory(plan, "q40", 8192, hosts, [8 * 2**30] * 4, kv_type=t) for t in ("f32", "f16"))
    assert [m.kv_cache for m in f32] == [2 * m.kv_cache for m in f16]
    small = [int(1.6 * 2**30)] * 4     # room for a little over a thousand positions beside the weights
    ctx32, ctx16 = (max_context(plan, "q40", hosts, small, kv_type=t) for t in ("f32", "f16"))
    assert 256 <= ctx32 < LLAMA2_7B.max_seq_len and 1.8 * ctx32 <= ctx16 <= 2 * ctx32 + 256


def run_plan_cli(*args):
    import subprocess
    import sys
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, "-m", "tpllama.plan", *args], capture_output=True, text=True, timeout=60,
                          cwd=str(repo))


def test_plan_command_prints_the_split_and_the_memory_table(stories_bin):
    out = run_plan_cli("-m", str(stories_bin), "-n", "2", "-c", "256", "--host-memory", "1G")
    assert out.returncode == 0, out.stderr
    assert "memory plan at context 256" in out.stdout
    rows = [line.split() for line in out.stdout.splitlines() if line.strip().startswith(("0 ", "1 "))]
    assert len(rows) >= 4                              # two split rows and two memory rows
    assert "2 x 5 layers x 64 values x 8 bytes" in out.stdout   # per-token traffic formula (f64 sync)


def test_plan_command_plans_a_float16_kv_cache(smollm2):
    """The default model at 4096 positions: 30 layers x 3 kv heads x 64 values x 4096, keys and
    values: 180 MiB in float32, 90 MiB in float16."""
    outs = [run_plan_cli("-m", str(smollm2), "-c", "4096", "--host-memory", "4G", *extra)
            for extra in ((), ("--kv-type", "f16"))]
    assert all(o.returncode == 0 for o in outs), [o.stderr for o in outs]
    assert "f16 kv cache" in outs[1].stdout and "f16 kv cache" not in outs[0].stdout
    kv = [next(line.split()[3] for line in o.stdout.splitlines() if line.split()[:2] == ["0", "host0"]) for o in outs]
    assert kv == ["180", "90"]


def test_plan_command_says_which_host_does_not_fit(smollm2):
    out = run_plan_cli("-m", smollm2, "-n", "2", "-c", "8192", "--host-memory", "4G,200M")
    assert out.returncode == 1
    assert "does not fit: rank 1" in out.stdout and "lower -c" in out.stdout


@pytest.mark.parametrize("args,needle", [
    (["-c", "-5"], "error: -c -5: expected a context of at least 1 position"),
    (["-c", "0"], "error: -c 0:"),
    (["-n", "0"], "error: -n 0: expected a number of ranks >= 1"),
    (["--host-memory", "100M"], "error: --host-memory 100M: too small for even a context of 256: rank 0 needs"),
    (["--host-memory=-4G"], "error: --host-memory -4G: expected positive sizes"),
])
def test_plan_command_rejects_nonsense_in_one_line(smollm2, args, needle):
    out = run_plan_cli("-m", smollm2, *args)
    assert out.returncode == 1
    assert out.stdout == "" and out.stderr.strip() == out.stderr.strip().splitlines()[0], out.stderr
    assert out.stderr.startswith(needle), out.stderr


def test_plan_command_refuses_bad_rank_weights_and_remote_ranks_before_printing(smollm2):
    """--rank-weights nan,1 once ended in a traceback, and --remote-ranks 5,6 was refused only after
    the whole plan had been printed."""
    for args, needle in ((["--rank-weights", "nan,1"], "error: --rank-weights 'nan,1'"),
                         (["--remote-ranks", "5,6"], "error: --remote-ranks 5,6: expected ranks between 1 and 1")):
        out = run_plan_cli("-m", smollm2, "-n", "2", *args)
        assert out.returncode == 1 and out.stdout == "", out.stdout
        assert out.stderr.startswith(needle) and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_plan_command_piped_into_head_ends_quietly(smollm2):
    """`python -m tpllama.plan ... | head -1` once printed a BrokenPipeError traceback."""
    import subprocess
    import sys
    out = subprocess.run(f"{sys.executable} -m tpllama.plan -m {smollm2} -n 2 | head -1", shell=True,
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.count("\n") == 1 and "Traceback" not in out.stderr and out.stderr == "", out.stderr


@pytest.mark.mpi
@pytest.mark.parametrize("sync", ["f64", "bf16"])
def test_plan_traffic_is_what_stats_measures(stories_bin, sync):
    """The plan's per-token traffic, labelled with the sync type (f64 by default), against the bytes
    --stats counts on two ranks (greedy: the candidates and the token add under 0.1 kB)."""
    import re
    from mpi_util import mpirun
    sync_args = [] if sync == "f64" else ["--sync-type", sync]
    plan = run_plan_cli("-m", str(stories_bin), "-n", "2", "-c", "256", "--host-memory", "1G", *sync_args)
    label = "f64 sync, the default" if sync == "f64" else f"{sync} sync"
    m = re.search(rf"traffic per token and rank \({label}\): sent ([\d.]+) kB, received ([\d.]+) kB", plan.stdout)
    assert m, plan.stdout
    planned = float(m.group(1)), float(m.group(2))
    run = mpirun(2, ["-m", "tpllama.generate", "-m", str(stories_bin), "-q", "-p", "Once upon a time", "-n", "5",
                     "--temp", "0", "-c", "256", "-t", "1", "--stats", *sync_args])
    steps = re.findall(r"rank 1 \[decode +\d+\] .* sent +([\d.]+) kB +recv +([\d.]+) kB", run.stderr)
    assert len(steps) >= 3, run.stderr
    for sent, received in steps:
        assert abs(float(sent) - planned[0]) <= 0.15 and abs(float(received) - planned[1]) <= 0.15, (steps, planned)


def _start_rows(stdout):
    """{rank: (shard file MiB, resident in memory, mapped, what it does)} from the plan's start table."""
    lines = stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("start ("))
    rows = {}
    for line in lines[at + 2:]:
        parts = line.split(None, 4)
        if len(parts) < 5 or not parts[0].isdigit():
            break
        rows[int(parts[0])] = (parts[1], float(parts[2].replace(",", "")), float(parts[3].replace(",", "")), parts[4])
    return rows


def test_plan_command_says_what_each_rank_does_at_start(smollm2, tmp_path):
    """Issue 11: per rank, convert / read or map its shard file / receive it, the disk its shard
    file takes (against the file a real load writes) and the resident memory in each mode."""
    import os
    import tpllama
    from gguf import GGUFReader
    written = tpllama.load(smollm2, shard_cache=str(tmp_path), ctx_size=512, threads=1).shard_file.path
    warm = _start_rows(run_plan_cli("-m", smollm2, "--shard-cache", str(tmp_path), "-c", "512").stdout)[0]
    assert warm[3] == "map its shard file (found here)"      # mapped whole: the start copies nothing
    assert abs(float(warm[0]) - os.path.getsize(written) / 2**20) <= 1.0, (warm, os.path.getsize(written))
    assert warm[2] < warm[1]                                  # mapped holds two layers, not all of them

    two = run_plan_cli("-m", smollm2, "-n", "2", "-c", "512", "--shard-cache", str(tmp_path), "--remote-ranks", "1")
    rows = _start_rows(two.stdout)
    assert rows[0][3] == "convert its slice, write its shard file"
    assert rows[1][3] == "receive its slice from rank 0 into its shard file, then map it"
    embedding = next(t for t in GGUFReader(smollm2).tensors if t.name == "token_embd.weight").n_bytes
    assert abs(float(rows[1][0]) - float(rows[0][0]) - embedding / 2**20) <= 2.0   # it also keeps the embedding

    small = run_plan_cli("-m", smollm2, "-n", "2", "-c", "512", "--shard-cache", str(tmp_path), "--host-memory", "220M")
    assert small.returncode == 0, small.stdout + small.stderr
    assert "they run mapped from the shard files (as --mmap)" in small.stdout
    assert _start_rows(small.stdout)[1][3] == "convert its slice into its shard file, then map it"
    assert "SD card (90 MB/s)" in small.stdout
    off = run_plan_cli("-m", smollm2, "-n", "2", "-c", "512", "--no-shard-cache", "--host-memory", "220M")
    assert off.returncode == 1 and "does not fit" in off.stdout and "no shard cache" in off.stdout

"""The sharding plan: which heads, FFN units and vocab rows each rank owns, and the memory each
rank needs against its host's. Pure functions, no MPI; `python -m tpllama.plan` prints them.

Megatron-style tensor parallelism with one all-reduce after attention and one after the FFN:
  wq/wk/wv   ColwiseParallel: rows of this rank's query heads / the kv heads they read
  wo         RowwiseParallel: columns of this rank's query heads (partial sums)
  w1/w3      ColwiseParallel: rows of this rank's FFN units
  w2         RowwiseParallel: columns of this rank's FFN units (partial sums)
  output     vocab-parallel: rows of this rank's vocab slice (tied embeddings too)

Splits are contiguous and follow per-rank weights (--rank-weights, given or measured at start
by tpllama.speedprobe), so a faster node gets more heads and FFN blocks, and any rank count from 1 to n_heads works, also counts that
divide nothing evenly. Heads are split first; FFN blocks then even out each rank's whole
layer (attention + FFN) to its share, so a rank that got an extra head gets fewer FFN
blocks. When ranks outnumber kv heads, a kv head is held by every rank whose query heads
read it.

Mixture-of-experts models (Qwen3-MoE): every rank holds its slice of EVERY expert (the same FFN
units of each, w1/w3 rows and w2 columns) and the whole router, so each rank routes a token
itself, runs its slice of the token's k experts, and the FFN still ends in one all-reduce; the
work of a token is split evenly whichever experts it picks. (Whole experts per rank would leave
the ranks whose experts a token did not pick idle, and need the token's routing known across
ranks.) For these models `ffn` is a range of units of each expert's FFN.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

from .config import ModelConfig
from .errors import TpllamaError
from .tensors import slice_shapes
from .typeplan import TypePlan, choose_types, ffn_unit, uniform_types
from .wtypes import WEIGHT_TYPE_CHOICES, runtime_bytes, weight_type


# --kv-type: how the KV cache keeps keys and values -> the numpy dtype it is. f32 (the default)
# keeps what the model computes; f16 halves the cache's memory and the bytes long contexts read.
KV_TYPES = {"f32": "float32", "f16": "float16"}
DEFAULT_KV_TYPE = "f32"


def kv_value_bytes(kv_type: str) -> int:
    return int(KV_TYPES[kv_type].removeprefix("float")) // 8


@dataclass(frozen=True)
class RankSlice:
    rank: int
    heads: range       # query heads
    kv_heads: range    # kv heads read by those query heads
    ffn: range         # FFN hidden units (rows of w1/w3, columns of w2; of every expert in a MoE model)
    vocab: range       # rows of the output matrix


@dataclass(frozen=True)
class ShardPlan:
    config: ModelConfig
    weights: Tuple[float, ...]
    ranks: Tuple[RankSlice, ...]

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    def __getitem__(self, rank: int) -> RankSlice:
        return self.ranks[rank]


def split_to_targets(total: int, targets: Sequence[float]) -> List[range]:
    """Contiguous ranges covering range(total) whose sizes come closest to real-valued targets
    (negative targets count as 0; the targets are rescaled to sum to total), none empty."""
    t = [max(0.0, x) for x in targets]
    if sum(t) <= 0:
        t = [1.0] * len(t)
    return split_nonempty(total, [x + 1e-12 for x in t])


def split_nonempty(total: int, weights: Sequence[float]) -> List[range]:
    """split_proportional, except that a rank whose share rounds to nothing gets one unit: a rank
    with an empty slice of a matrix could not load it (--rank-weights 20,1 left SmolLM2's rank 1
    no FFN units). Splits that leave no range empty are unchanged."""
    ranges = split_proportional(total, weights)
    return ranges if all(ranges) else split_proportional(total, weights, minimum=1)


def split_proportional(total: int, weights: Sequence[float], minimum: int = 0) -> List[range]:
    """Contiguous ranges covering range(total), sized in proportion to weights (largest remainder).

    Every range gets at least `minimum` units; raises if total cannot give that."""
    n = len(weights)
    if n == 0 or not all(0 < w < math.inf for w in weights):
        raise TpllamaError(f"rank weights must be positive finite numbers, got {list(weights)}")
    if total < minimum * n:
        raise TpllamaError(f"cannot split {total} units over {n} ranks with at least {minimum} each")
    spare = total - minimum * n
    wsum = float(sum(weights))
    exact = [spare * w / wsum for w in weights]
    sizes = [int(e) for e in exact]
    # hand the leftover units to the largest remainders; ties go to the lower rank
    order = sorted(range(n), key=lambda i: (-(exact[i] - sizes[i]), i))
    for i in order[: spare - sum(sizes)]:
        sizes[i] += 1
    ranges, start = [], 0
    for s in sizes:
        ranges.append(range(start, start + s + minimum))
        start += s + minimum
    return ranges


def parse_rank_weights(text: Optional[str], world_size: int) -> Tuple[float, ...]:
    """'2,1,1' -> (2.0, 1.0, 1.0); None or '' -> equal weights. ('auto' is measured by the
    running ranks: tpllama.speedprobe.)"""
    if not text:
        return tuple([1.0] * world_size)
    if text.strip() == "auto":
        raise TpllamaError("--rank-weights auto is measured by the ranks when they start; here give the "
                           "relative speeds as numbers, e.g. 2,1")
    try:
        weights = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise TpllamaError(f"--rank-weights {text!r}: expected comma-separated numbers such as 2,1,1") from None
    if len(weights) != world_size:
        raise TpllamaError(f"--rank-weights {text!r} has {len(weights)} values but the job has {world_size} ranks")
    if not all(0 < w < math.inf for w in weights):   # NaN fails every comparison
        raise TpllamaError(f"--rank-weights {text!r}: every weight must be a positive finite number")
    return weights


def make_plan(config: ModelConfig, world_size: int, weights: Optional[Sequence[float]] = None) -> ShardPlan:
    """Split the model over world_size ranks in proportion to weights (equal by default)."""
    weights = tuple(float(w) for w in (weights or [1.0] * world_size))
    if len(weights) != world_size:
        raise TpllamaError(f"{len(weights)} rank weights given for {world_size} ranks")
    if world_size > config.n_heads:
        raise TpllamaError(f"{world_size} ranks but the model has only {config.n_heads} attention heads; "
                           f"use at most {config.n_heads} ranks")
    group = config.kv_group
    heads = split_proportional(config.n_heads, weights, minimum=1)
    kv_heads = [range(h.start // group, (h.stop - 1) // group + 1) for h in heads]
    ffn = _balanced_ffn(config, weights, heads, kv_heads)
    vocab = split_nonempty(config.vocab_size, weights)
    ranks = tuple(RankSlice(rank=i, heads=h, kv_heads=kv, ffn=f, vocab=v)
                  for i, (h, kv, f, v) in enumerate(zip(heads, kv_heads, ffn, vocab)))
    return ShardPlan(config=config, weights=weights, ranks=ranks)


def _balanced_ffn(config: ModelConfig, weights, heads, kv_heads) -> List[range]:
    """FFN ranges (whole units of 32 when the width allows, so a quantized w2 is cut between
    blocks) that bring each rank's layer weights (its q/k/v/o rows and columns plus w1/w2/w3)
    closest to its share."""
    d, hd = config.dim, config.head_dim
    unit = ffn_unit(config)
    attention = [2 * len(h) * hd * d + 2 * len(kv) * hd * d for h, kv in zip(heads, kv_heads)]
    # a token streams the unit's w1/w3/w2 values once, of each of its k experts in a MoE model
    ffn_per_unit = 3 * d * unit * (config.n_experts_used if config.moe else 1)
    layer_total = sum(attention) + ffn_per_unit * (config.hidden_dim // unit)
    share = [w / sum(weights) for w in weights]
    targets = [(s * layer_total - a) / ffn_per_unit for s, a in zip(share, attention)]
    return [range(r.start * unit, r.stop * unit) for r in split_to_targets(config.hidden_dim // unit, targets)]


def format_split(plan: ShardPlan, speeds: Optional[Sequence[float]] = None) -> str:
    """The table of who holds what (of a mixture-of-experts model, each expert's FFN units), with
    each rank's float32 vector bytes per layer; with `speeds` (--rank-weights auto), each rank's
    measured matvec GB/s beside the weight the split followed."""
    c = plan.config
    speed_head = f" {'GB/s':>6}" if speeds else ""
    lines = [f"{'rank':>4}{speed_head} {'weight':>6} {'heads':>9} {'kv heads':>9} "
             f"{'expert units' if c.moe else 'FFN units':>11} {'vocab rows':>13} {'vectors/layer':>14}"]
    for i, (s, w) in enumerate(zip(plan.ranks, plan.weights)):
        speed = f" {speeds[i]:>6.2f}" if speeds else ""
        lines.append(f"{s.rank:>4}{speed} {w:>6g} {s.heads.start:>4}-{s.heads.stop - 1:<4} "
                     f"{s.kv_heads.start:>4}-{s.kv_heads.stop - 1:<4} "
                     f"{s.ffn.start:>5}-{s.ffn.stop - 1:<5} {s.vocab.start:>6}-{s.vocab.stop - 1:<6} "
                     f"{layer_vector_bytes(c, s):>12} B")
    return "\n".join(lines)


# ---------------------------------------------------------------- memory per rank

RUNTIME_OVERHEAD = 160 * 2**20   # Python, numpy, MPI and the mapped tokenizer, measured roughly
PREFILL_CHUNK = 128              # prompt tokens per forward pass

Types = Union[TypePlan, str]     # a model's TypePlan, or one runtime type for every matrix


def matrix_bytes(rows: int, cols: int, wtype: str) -> int:
    """Bytes of a (rows, cols) runtime matrix (wtypes.runtime_bytes: packed quantized types are
    stored 16 rows interleaved, kernels/tpk.h); input widths that are not whole units stay f32."""
    t = wtype if cols % weight_type(wtype).unit == 0 else "f32"
    return runtime_bytes(t, rows, cols)


def _type_plan(config: ModelConfig, types: Types) -> TypePlan:
    return uniform_types(config, types) if isinstance(types, str) else types


def weight_bytes(config: ModelConfig, shard: RankSlice, types: Types, mapped: bool = False) -> int:
    """Bytes of weights a rank holds, each matrix in its runtime type (the token embedding
    stays in the file, read by rows). Mapped (the weights stay in the shard file): what must be
    in memory at once to run at the disk's speed, two layers and the output slice."""
    if mapped:
        whole, output = weight_bytes(config, shard, types), output_bytes(config, shard, types)
        return min(whole, output + 2 * (whole - output) // config.n_layers)
    tp = _type_plan(config, types)
    shapes = slice_shapes(config, len(shard.heads), len(shard.kv_heads), len(shard.ffn), len(shard.vocab))
    total = config.n_layers * layer_vector_bytes(config, shard) + 4 * config.dim   # + the output norm
    total += config.n_layers * matrix_bytes(*shapes["router"], "f32") if config.moe else 0   # whole on every rank
    for name, kind in tp.kinds.items():
        total += matrix_bytes(*shapes[kind], tp.runtime(name))
    return total


def layer_vector_bytes(config: ModelConfig, shard: RankSlice) -> int:
    """Bytes of one layer's float32 vectors on a rank: its two norms, and what the architecture
    adds: Qwen2's q, k and v biases (this rank's heads of them), Qwen3's q/k norms (whole, head_dim each)."""
    values = 2 * config.dim
    if config.qkv_bias:
        values += (len(shard.heads) + 2 * len(shard.kv_heads)) * config.head_dim
    if config.qk_norm:
        values += 2 * config.head_dim
    return 4 * values


def architecture_note(config: ModelConfig) -> str:
    """What this model's architecture adds to Llama's math, for the plan's first line."""
    parts = (["q/k/v biases"] if config.qkv_bias else []) + (["q/k norms"] if config.qk_norm else [])
    parts += [f"sliding window {config.sliding_window}"] if config.sliding_window else []
    return config.arch + (f" ({', '.join(parts)})" if parts else "")


def output_bytes(config: ModelConfig, shard: RankSlice, types: Types) -> int:
    """Bytes of the rank's slice of the output matrix."""
    tp = _type_plan(config, types)
    name = next(n for n, kind in tp.kinds.items() if kind == "output")
    return matrix_bytes(len(shard.vocab), config.dim, tp.runtime(name))


def kv_bytes_per_token(config: ModelConfig, shard: RankSlice, kv_type: str = DEFAULT_KV_TYPE) -> int:
    """KV cache bytes per context position on this rank (keys and values of kv_type)."""
    return 2 * kv_value_bytes(kv_type) * config.n_layers * len(shard.kv_heads) * config.head_dim


def buffer_bytes(config: ModelConfig, shard: RankSlice, ctx: int) -> int:
    """Working buffers of one prefill chunk: activations, attention scores, the logits row."""
    T, hd = PREFILL_CHUNK, config.head_dim
    acts = T * (6 * config.dim + 3 * len(shard.ffn) + 2 * len(shard.heads) * hd + 2 * len(shard.kv_heads) * hd)
    scores = 2 * config.kv_group * T * ctx
    return 4 * (acts + scores + len(shard.vocab))


@dataclass(frozen=True)
class RankMemory:
    rank: int
    host: str
    weights: int
    kv_cache: int
    buffers: int
    overhead: int
    host_available: int      # memory the host has available, shared by its ranks

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.buffers + self.overhead


def rank_memory(plan: ShardPlan, types: Types, ctx: int, hosts: Sequence[str], available: Sequence[int],
                mapped: bool = False, slots: int = 1, kv_type: str = DEFAULT_KV_TYPE) -> List[RankMemory]:
    """Each rank's memory at context ctx; slots: sequences the KV cache holds at once (each ctx long)."""
    c = plan.config
    return [RankMemory(rank=s.rank, host=hosts[s.rank], weights=weight_bytes(c, s, types, mapped),
                       kv_cache=slots * ctx * kv_bytes_per_token(c, s, kv_type), buffers=buffer_bytes(c, s, ctx),
                       overhead=RUNTIME_OVERHEAD, host_available=available[s.rank])
            for s in plan.ranks]


def host_shortfalls(mem: Sequence[RankMemory]) -> List[Tuple[str, List[int], int]]:
    """(host, its ranks, bytes missing) for every host whose ranks need more than it has."""
    out = []
    for host in dict.fromkeys(m.host for m in mem):
        ranks = [m for m in mem if m.host == host]
        need = sum(m.total for m in ranks)
        if need > ranks[0].host_available:
            out.append((host, [m.rank for m in ranks], need - ranks[0].host_available))
    return out


def max_context(plan: ShardPlan, types: Types, hosts: Sequence[str], available: Sequence[int],
                fraction: float = 0.9, mapped: bool = False, slots: int = 1, kv_type: str = DEFAULT_KV_TYPE) -> int:
    """The longest context (a multiple of 256, at most the model's) whose KV caches (of `slots`
    sequences) fit every host."""
    c = plan.config
    best = c.max_seq_len
    for host in dict.fromkeys(hosts):
        ranks = [s for s in plan.ranks if hosts[s.rank] == host]
        budget = fraction * available[ranks[0].rank] - sum(
            weight_bytes(c, s, types, mapped) + RUNTIME_OVERHEAD + buffer_bytes(c, s, 0) for s in ranks)
        per_token = sum(slots * kv_bytes_per_token(c, s, kv_type) + 4 * 2 * c.kv_group * PREFILL_CHUNK for s in ranks)
        best = min(best, int(budget // per_token) if budget > 0 else 0)
    return best if best >= c.max_seq_len else (best // 256) * 256


def format_memory_table(mem: Sequence[RankMemory], ctx: int, types: Optional[TypePlan] = None,
                        mapped: bool = False, slots: int = 1, kv_type: str = DEFAULT_KV_TYPE) -> str:
    """The per-rank memory table; with `types`, a first line says the runtime type of each kind of matrix."""
    mib = lambda b: f"{b / 2**20:,.0f}"
    lines = [types.summary()] if types is not None else []
    where = "; weights: two layers and the output slice of the mapped shard files" if mapped else ""
    sequences = f", kv cache for {slots} sequences" if slots > 1 else ""
    sequences += f", {kv_type} kv cache" if kv_type != DEFAULT_KV_TYPE else ""
    lines += [f"memory plan at context {ctx}{sequences} (MiB{where}):",
             f"{'rank':>4} {'host':<16} {'weights':>9} {'kv cache':>9} {'buffers':>8} {'runtime':>8} {'total':>9} {'host free':>10}"]
    for m in mem:
        lines.append(f"{m.rank:>4} {m.host[:16]:<16} {mib(m.weights):>9} {mib(m.kv_cache):>9} {mib(m.buffers):>8} "
                     f"{mib(m.overhead):>8} {mib(m.total):>9} {mib(m.host_available):>10}")
    if len(mem) > 1:
        lines.append(f"{'all':>4} {'':<16} {mib(sum(m.weights for m in mem)):>9} {mib(sum(m.kv_cache for m in mem)):>9} "
                     f"{mib(sum(m.buffers for m in mem)):>8} {mib(sum(m.overhead for m in mem)):>8} "
                     f"{mib(sum(m.total for m in mem)):>9}")
    return "\n".join(lines)


# ---------------------------------------------------------------- command line: the plan without MPI

def parse_size(text: str) -> int:
    """'8G', '512M', '4096' (MiB) -> bytes."""
    t = text.strip().upper().rstrip("B").rstrip("I")
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(float(t) * 2**20)
    except ValueError:
        raise TpllamaError(f"memory size {text!r}: expected a number with a unit, e.g. 8G or 512M") from None


# bytes per all-reduced value for each --sync-type (q80: blocks of 32 int8 values and an fp16 scale)
SYNC_VALUE_BYTES = {"f64": 8.0, "f32": 4.0, "bf16": 2.0, "q80": 34 / 32}
DEFAULT_SYNC_TYPE = "f64"   # the runtime's default (tpllama.engine.LoadOptions)


def allreduce_bytes_per_token(config: ModelConfig, sync_type: str, world_size: int) -> Tuple[int, int]:
    """Payload bytes one rank sends and receives in the two all-reduces per layer of one decoded
    token, counted as --stats counts them (tpllama.parallel.Parallel.allreduce_sum): f64/f32 go
    through MPI_Allreduce (sent = received = the vector); bf16/q80 are gathered from every rank."""
    if world_size == 1:
        return 0, 0
    calls, d = 2 * config.n_layers, config.dim
    if sync_type in ("f64", "f32"):
        vector = int(d * SYNC_VALUE_BYTES[sync_type])
        return calls * vector, calls * vector
    if sync_type == "q80" and d % weight_type("q80").block != 0:   # rows that are not whole blocks are sent as f32
        vector = d * 4
    else:
        vector = int(d * SYNC_VALUE_BYTES[sync_type])
    return calls * vector, calls * vector * (world_size - 1)


def _positive(flag: str, value: Optional[int], what: str) -> None:
    if value is not None and value < 1:
        raise TpllamaError(f"{flag} {value}: expected {what}")


def _host_sizes(text: Optional[str], ranks: int) -> List[int]:
    """--host-memory: one size for every host, or one per rank; positive sizes only."""
    if not text:
        from . import memory
        return [memory.available_bytes()] * ranks
    sizes = [parse_size(s) for s in text.split(",")]
    if any(not size > 0 for size in sizes):
        raise TpllamaError(f"--host-memory {text}: expected positive sizes, e.g. 8G or 8G,4G")
    if len(sizes) == 1:
        sizes *= ranks
    if len(sizes) != ranks:
        raise TpllamaError(f"--host-memory has {len(sizes)} values for {ranks} ranks")
    return sizes


def main(argv=None) -> int:
    import argparse
    from .formats import open_model
    from .fetch import shard_cache_dir
    from .startplan import choose_mapped, mapped_speed_lines, rank_starts, startplan_table
    from .parallel import SYNC_TYPES
    p = argparse.ArgumentParser(
        prog="python -m tpllama.plan",
        description="Show how a model splits over K ranks and what each rank needs in memory, before running "
                    "anything (no MPI). Each rank is assumed to be its own host.")
    p.add_argument("-m", "--model", required=True, help="GGUF file, Hugging Face directory or llama2.c .bin")
    p.add_argument("-n", "--ranks", type=int, default=1, help="number of ranks, at least 1 (default 1)")
    p.add_argument("-c", "--ctx-size", type=int, default=None,
                   help="context length, at least 1 (default: the model's, capped to fit)")
    p.add_argument("--parallel", type=int, default=1,
                   help="sequences whose KV caches are held at once, as the server's --parallel (default 1)")
    p.add_argument("--weight-type", choices=WEIGHT_TYPE_CHOICES, default="auto",
                   help="runtime type of the weight matrices (default auto: each in its file's own type where "
                        "tpllama has kernels for it, else a finer one)")
    p.add_argument("--sync-type", choices=SYNC_TYPES, default=DEFAULT_SYNC_TYPE,
                   help=f"payload of the all-reduces, as the runtime's --sync-type (default {DEFAULT_SYNC_TYPE})")
    p.add_argument("--kv-type", choices=list(KV_TYPES), default=DEFAULT_KV_TYPE,
                   help=f"KV cache values, as the runtime's --kv-type (default {DEFAULT_KV_TYPE})")
    p.add_argument("--rank-weights", default=None, help="relative speeds, e.g. 2,1,1")
    p.add_argument("--host-memory", default=None,
                   help="memory available on each rank's host, e.g. 8G or 8G,4G,4G,4G (default: this machine's available memory)")
    p.add_argument("--shard-cache", metavar="DIR", default=None,
                   help="shard file folder, as the runtime's (default: $TPLLAMA_SHARD_CACHE, else ~/.cache/tpllama/shards or $TPLLAMA_CACHE/shards); "
                        "the plan says which ranks' shard files are found in it on this machine")
    p.add_argument("--no-shard-cache", action="store_true", help="plan as the runtime's --no-shard-cache")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--mmap", dest="mmap", action="store_const", const=True, default=None,
                      help="plan the weights mapped from the shard files (default: only when they do not fit in memory)")
    mode.add_argument("--no-mmap", dest="mmap", action="store_const", const=False, help="plan the weights in memory (shard files read, not mapped)")
    p.add_argument("--remote-ranks", default="", metavar="R,R",
                   help="ranks whose hosts lack the model file (they receive their slices from rank 0), e.g. 1,2,3")
    args = p.parse_args(argv)
    _positive("-n", args.ranks, "a number of ranks >= 1")
    _positive("-c", args.ctx_size, "a context of at least 1 position")
    _positive("--parallel", args.parallel, "a number of sequences >= 1")
    sizes = _host_sizes(args.host_memory, args.ranks)
    weights = parse_rank_weights(args.rank_weights, args.ranks)
    remote = _remote_ranks(args.remote_ranks, args.ranks)
    reader = open_model(args.model)
    c = reader.config
    plan = make_plan(c, args.ranks, weights)
    hosts = [f"host{r}" for r in range(args.ranks)]
    types = choose_types(reader, args.weight_type)
    folder = None if args.no_shard_cache else os.path.expanduser(args.shard_cache) if args.shard_cache else shard_cache_dir()
    mapped, why_mapped = choose_mapped(plan, types, args.ctx_size or min(256, c.max_seq_len), hosts, sizes,
                                       args.mmap, folder is not None, args.kv_type)
    ctx = args.ctx_size or min(c.max_seq_len, max_context(plan, types, hosts, sizes, mapped=mapped, slots=args.parallel,
                                                          kv_type=args.kv_type))
    if ctx < 1:
        _too_little_memory(plan, types, args, hosts, sizes)
    ffn = f"{c.n_experts} experts of FFN {c.hidden_dim}, {c.n_experts_used} per token" if c.moe else f"FFN {c.hidden_dim}"
    print(f"{args.model}: {architecture_note(c)}, {c.n_layers} layers, dim {c.dim}, {ffn}, "
          f"{c.n_heads} heads / {c.n_kv_heads} kv heads of {c.head_dim}, vocab {c.vocab_size}, context {c.max_seq_len}")
    if c.moe:
        print(_expert_split_line(c))
    print(format_split(plan))
    mem = rank_memory(plan, types, ctx, hosts, sizes, mapped, slots=args.parallel, kv_type=args.kv_type)
    if types.lowered():
        print(types.lowered())
    if why_mapped:
        print(f"the weights do not fit in memory ({why_mapped[0]} is {why_mapped[1] / 2**20:,.0f} MiB short): "
              "they run mapped from the shard files (as --mmap)")
    print(format_memory_table(mem, ctx, types, mapped, slots=args.parallel, kv_type=args.kv_type))
    print(startplan_table(rank_starts(reader, plan, types, ctx, hosts, sizes, folder, mapped,
                                      remote, map_found=args.mmap is not False),
                          folder, mapped))
    if mapped:
        print(mapped_speed_lines(plan, types))
    print(_traffic_line(c, args.sync_type, args.ranks))
    short = host_shortfalls(mem)
    for host, ranks, missing in short:
        print(f"does not fit: rank {ranks[0]} needs {missing / 2**20:,.0f} MiB more than {host} has; "
              "lower -c, add ranks, or change --rank-weights" + ("" if mapped or folder is None else ", or --mmap"))
    return 1 if short else 0


def _remote_ranks(text: str, ranks: int) -> List[int]:
    try:
        out = [int(r) for r in text.split(",") if r.strip()]
    except ValueError:
        out = [-1]
    if any(not 0 < r < ranks for r in out):
        which = f"ranks between 1 and {ranks - 1}, comma-separated" if ranks > 1 else "nothing: one rank has the file"
        raise TpllamaError(f"--remote-ranks {text}: expected {which} (rank 0 reads the model file)")
    return out


def _expert_split_line(c: ModelConfig) -> str:
    return (f"experts: every rank holds the router ({c.n_experts} x {c.dim}, float32) and the FFN units below of "
            f"each of the {c.n_experts} experts; a token runs its {c.n_experts_used} experts' units on every rank")


def _traffic_line(c: ModelConfig, sync_type: str, ranks: int) -> str:
    if ranks == 1:
        return "traffic per token: none (one rank)"
    moe = " (experts included: each rank routes for itself, nothing more is sent)" if c.moe else ""
    sent, received = allreduce_bytes_per_token(c, sync_type, ranks)
    label = f"{sync_type} sync" + (", the default" if sync_type == DEFAULT_SYNC_TYPE else "")
    return (f"traffic per token and rank ({label}): sent {sent / 1024:.1f} kB, received {received / 1024:.1f} kB "
            f"of all-reduce payload (2 x {c.n_layers} layers x {c.dim} values x {SYNC_VALUE_BYTES[sync_type]:g} bytes"
            f"{'' if sync_type in ('f64', 'f32') else f', from each of the {ranks - 1} other ranks'}) "
            f"+ a few bytes of token and candidates{moe}; --stats measures it")


def _too_little_memory(plan: ShardPlan, types: TypePlan, args, hosts: List[str], sizes: List[int]) -> None:
    """No context fits: say which host falls short at the smallest context the runtime plans."""
    smallest = min(256, plan.config.max_seq_len)
    short = host_shortfalls(rank_memory(plan, types, smallest, hosts, sizes, slots=args.parallel, kv_type=args.kv_type))
    host, ranks, missing = short[0] if short else (hosts[0], [0], 0)
    raise TpllamaError(f"--host-memory {args.host_memory or '(this machine)'}: too small for even a context of "
                       f"{smallest}: rank {ranks[0]} needs {missing / 2**20:,.0f} MiB more than {host} has; "
                       "add ranks, or use a smaller --weight-type")


if __name__ == "__main__":
    import sys
    try:
        sys.exit(main())
    except TpllamaError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except BrokenPipeError:   # the reader went away (`| head`): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # no second error at exit's flush
        sys.exit(0)

"""What each rank does at start, before anything runs: convert its slice from the model file,
read or map its shard file, or receive its slice from rank 0; the disk its shard file takes,
and the resident memory with the weights in memory and mapped. `python -m tpllama.plan` prints
it (startplan_table); the runtime makes the same choice of mode (choose_mapped).

Only this machine's shard folder can be looked at, so "found" means found here: on a cluster
each host looks in its own folder when the job starts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from .plan import DEFAULT_KV_TYPE, ShardPlan, host_shortfalls, rank_memory, weight_bytes
from .tensors import EMBEDDING

# Sequential read speeds users' nodes typically reach (MB/s), for the mapped mode's speed bound.
TYPICAL_DISKS = (("SD card", 90e6), ("USB 3 SSD", 350e6), ("NVMe SSD", 2000e6))


@dataclass(frozen=True)
class RankStart:
    rank: int
    action: str                  # what the rank does, in words
    shard_file_bytes: int        # disk its shard file takes (0: no shard file)
    found: Optional[bool]        # a sound shard file of its key is in the folder here (None: not looked)
    resident_in_memory: int      # resident memory with the weights read into memory
    resident_mapped: int         # ... with the weights mapped from the shard file


def choose_mapped(plan: ShardPlan, types, ctx: int, hosts: Sequence[str], available: Sequence[int],
                  mmap: Optional[bool], cache_on: bool, kv_type: str = DEFAULT_KV_TYPE) -> Tuple[bool, Optional[Tuple[str, int]]]:
    """Whether the weights run mapped: as asked (mmap True/False), or by default when they do not
    fit in memory but would mapped; with the (host, bytes missing) that made it so."""
    if mmap is not None or not cache_on:
        return bool(mmap), None
    short = host_shortfalls(rank_memory(plan, types, ctx, hosts, available, kv_type=kv_type))
    if not short or host_shortfalls(rank_memory(plan, types, ctx, hosts, available, mapped=True, kv_type=kv_type)):
        return False, None
    host, _, missing = short[0]
    return True, (host, missing)


def shard_file_bytes(plan: ShardPlan, rank: int, types, reader, remote: bool) -> int:
    """Bytes of a rank's shard file: its weights in runtime layout, plus the token embedding when
    the rank has no model file to read its rows from."""
    nbytes = weight_bytes(plan.config, plan[rank], types) + 4096 + 2**16      # + data start, header
    if remote and EMBEDDING in reader.tensors:
        nbytes += reader.tensors[EMBEDDING].raw.nbytes
    return nbytes


def _model_identity(reader) -> Optional[tuple]:
    """What a shard file's key holds of the model (engine's shard_identity); None where the
    kernels, whose build the key also names, are not built."""
    import importlib.util
    if importlib.util.find_spec(f"{__package__}._kernels") is None:
        return None
    from .fingerprint import fingerprint, model_identity
    return (*fingerprint(reader), model_identity(reader))


def _found_here(reader, plan: ShardPlan, rank: int, types, folder: str, identity: Optional[tuple]) -> Optional[bool]:
    """A sound shard file of this rank's key is in the folder (None: the key is unknown)."""
    if identity is None:
        return None
    from .shardcache import has_sound_shard, shard_key, shard_path
    key = shard_key(identity, plan.world_size, plan[rank], types)
    return has_sound_shard(shard_path(folder, reader.path, plan.world_size, rank, key), key)


def rank_starts(reader, plan: ShardPlan, types, ctx: int, hosts: Sequence[str], available: Sequence[int],
                folder: Optional[str], mapped: bool, remote_ranks: Sequence[int] = (),
                map_found: bool = True) -> List[RankStart]:
    """Each rank's start: what it does, its shard file's size and the resident memory in each mode.
    map_found: a shard file that is there at start is mapped whole (the default), not read."""
    in_memory = rank_memory(plan, types, ctx, hosts, available)
    as_mapped = rank_memory(plan, types, ctx, hosts, available, mapped=True)
    identity = _model_identity(reader) if folder else None     # read once, not per rank
    out = []
    for s in plan.ranks:
        remote = s.rank in remote_ranks
        found = _found_here(reader, plan, s.rank, types, folder, identity) if folder else None
        verb = "map" if mapped or map_found else "read"
        if folder is None:
            action = "convert its slice from the model file (no shard cache)"
        elif found:
            action = f"{verb} its shard file (found here)"
        elif remote:
            action = f"receive its slice from rank 0 into its shard file, then {verb} it"
        else:
            action = f"convert its slice into its shard file, then {verb} it" if mapped else \
                "convert its slice, write its shard file"
        size = shard_file_bytes(plan, s.rank, types, reader, remote) if folder else 0
        out.append(RankStart(s.rank, action, size, found, in_memory[s.rank].total, as_mapped[s.rank].total))
    return out


def startplan_table(starts: Sequence[RankStart], folder: Optional[str], mapped: bool) -> str:
    mib = lambda b: f"{b / 2**20:,.0f}"
    where = f"shard files in {folder} on this machine" if folder else "no shard cache"
    lines = [f"start ({where}; weights {'mapped from the shard files' if mapped else 'in memory'}):",
             f"{'rank':>4} {'shard file MiB':>14} {'resident MiB in memory':>22} {'mapped':>7}  start"]
    for s in starts:
        lines.append(f"{s.rank:>4} {mib(s.shard_file_bytes) if s.shard_file_bytes else '-':>14} "
                     f"{mib(s.resident_in_memory):>22} {mib(s.resident_mapped):>7}  {s.action}")
    return "\n".join(lines)


def mapped_speed_lines(plan: ShardPlan, types) -> str:
    """Mapped, every token reads each rank's weights from its disk (what the page cache does not
    hold): the bound that puts on decode, for typical disks."""
    per_token = max(weight_bytes(plan.config, s, types) for s in plan.ranks)
    bounds = ", ".join(f"{name} ({speed / 1e6:,.0f} MB/s) {speed / per_token:.2g}" for name, speed in TYPICAL_DISKS)
    return (f"mapped: when the page cache cannot hold the shard file, each token reads up to "
            f"{per_token / 2**20:,.0f} MiB per rank from its disk, so decode runs at most at (tokens/s): {bounds}; "
            "the runtime measures its own disk and says")

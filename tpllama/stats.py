"""Per-step and per-run statistics: time split into compute and sync, bytes exchanged, memory."""
from __future__ import annotations

import resource
import sys
from dataclasses import dataclass, field
from typing import List

from .memory import proc_kib_field


@dataclass
class StepStats:
    """One forward step of this rank: a prefill chunk or one decoded token."""
    phase: str          # "prefill" | "decode"
    tokens: int         # tokens processed by the step
    total_ms: float
    sync_ms: float      # waiting in collectives
    sent_bytes: int
    recv_bytes: int

    @property
    def compute_ms(self) -> float:
        return self.total_ms - self.sync_ms

    def line(self, index: int) -> str:
        return (f"[{self.phase} {index:>4}] {self.tokens:>4} tok  total {self.total_ms:8.2f} ms  compute {self.compute_ms:8.2f} ms  "
                f"sync {self.sync_ms:7.2f} ms  sent {self.sent_bytes / 1024:8.1f} kB  recv {self.recv_bytes / 1024:8.1f} kB")


def peak_rss_bytes() -> int:
    """This process's peak resident memory."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def resident_anon_bytes() -> int:
    """Anonymous resident memory of this process (Linux): what it holds, not the mapped model file's
    page cache, which the kernel can drop at will."""
    return proc_kib_field("/proc/self/status", "RssAnon") or 0


@dataclass
class RunStats:
    """One generate() call on this rank."""
    steps: List[StepStats] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0       # prompt tokens whose KV was reused from the previous call
    generated_tokens: int = 0
    peak_rss: List[int] = field(default_factory=list)   # per rank, filled on root at the end

    def _phase(self, phase: str) -> List[StepStats]:
        return [s for s in self.steps if s.phase == phase]

    def _rate(self, phase: str) -> float:
        steps = self._phase(phase)
        ms = sum(s.total_ms for s in steps)
        return 1000.0 * sum(s.tokens for s in steps) / ms if ms > 0 else 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self._rate("prefill")

    @property
    def decode_tokens_per_s(self) -> float:
        return self._rate("decode")

    def mean(self, phase: str, attr: str) -> float:
        steps = self._phase(phase)
        return sum(getattr(s, attr) for s in steps) / len(steps) if steps else 0.0

    def summary(self) -> str:
        lines = [f"prompt: {self.prompt_tokens} tokens ({self.cached_tokens} reused from cache), "
                 f"{self.prefill_tokens_per_s:.1f} tokens/s",
                 f"generated: {self.generated_tokens} tokens, {self.decode_tokens_per_s:.2f} tokens/s"]
        if self._phase("decode"):
            lines.append(f"per decoded token: {self.mean('decode', 'total_ms'):.2f} ms "
                         f"(compute {self.mean('decode', 'compute_ms'):.2f} ms, sync {self.mean('decode', 'sync_ms'):.2f} ms), "
                         f"sent {self.mean('decode', 'sent_bytes') / 1024:.1f} kB, recv {self.mean('decode', 'recv_bytes') / 1024:.1f} kB")
        if self.peak_rss:
            lines.append("peak RSS per rank: " + ", ".join(f"{r / 2**20:.0f} MiB" for r in self.peak_rss)
                         + f" (total {sum(self.peak_rss) / 2**20:.0f} MiB)")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens, "cached_tokens": self.cached_tokens,
            "generated_tokens": self.generated_tokens,
            "prefill_tokens_per_s": self.prefill_tokens_per_s, "decode_tokens_per_s": self.decode_tokens_per_s,
            "decode_ms": self.mean("decode", "total_ms"), "decode_compute_ms": self.mean("decode", "compute_ms"),
            "decode_sync_ms": self.mean("decode", "sync_ms"),
            "decode_sent_bytes": self.mean("decode", "sent_bytes"), "decode_recv_bytes": self.mean("decode", "recv_bytes"),
            "peak_rss": list(self.peak_rss),
            "steps": [s.__dict__ for s in self.steps],
        }

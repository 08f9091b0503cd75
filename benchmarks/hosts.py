"""Several MPI "hosts" on one machine: network namespaces joined by a bridge, for tests and
benchmarks that need real TCP between hosts and a real hostfile; and cgroups that make a
process a small or slow node (cgroup_v1).

Each host is a namespace with its own address, loopback and hostname (so Open MPI sees
separate nodes); mpirun in the root namespace reaches them through a launch agent that
runs PRRTE's remote command with `ip netns exec` where it would use ssh. Links can be
shaped with `tc` (token bucket for bandwidth; the kernel here has no netem for delay).
Needs root and iproute2; everything created is removed on exit, also on failure.
"""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional

SUBNET = "10.231.0"
BRIDGE = "tplbr0"


@dataclass(frozen=True)
class Host:
    name: str        # hostname inside the namespace
    netns: str       # namespace name
    address: str     # its address on the bridge


@dataclass(frozen=True)
class Cluster:
    hosts: List[Host]
    hostfile: str    # Open MPI hostfile listing the hosts' addresses
    agent: str       # launch agent script (stands in for ssh)

    def mpirun_args(self, slots_used: Optional[int] = None) -> List[str]:
        """mpirun options that launch on these hosts over TCP on the bridge."""
        subnet = f"{SUBNET}.0/24"
        return ["--hostfile", self.hostfile, "--prtemca", "plm_ssh_agent", self.agent,
                "--mca", "btl_tcp_if_include", subnet, "--mca", "oob_tcp_if_include", subnet,
                "--mca", "btl", "self,tcp", "--mca", "mpi_yield_when_idle", "1", "--bind-to", "none"]


class CgroupUnavailable(Exception):
    """Why a cgroup cannot be made here (not root, no such v1 controller, no permission)."""


@contextmanager
def cgroup_v1(controller: str, settings: Dict[str, str], name: str = "tpllama") -> Iterator[Path]:
    """A cgroup v1 group of `controller` (memory, cpu) with its files set (e.g.
    {"memory.limit_in_bytes": "190000000"}), removed at the end; CgroupUnavailable (with why)
    where one cannot be made. Processes join it by writing their pid to its `tasks` file."""
    base = Path("/sys/fs/cgroup") / controller
    if os.geteuid() != 0 or not base.is_dir():
        raise CgroupUnavailable(f"needs root and the cgroup v1 {controller} controller ({base})")
    group = base / f"{name}-{os.getpid()}"
    try:
        group.mkdir()
        for key, value in settings.items():
            (group / key).write_text(str(value))
    except OSError as e:
        try:
            group.rmdir()
        except OSError:
            pass
        raise CgroupUnavailable(f"cannot make a {controller} cgroup here: {e}") from None
    try:
        yield group
    finally:
        for _ in range(50):          # its processes may take a moment to leave
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def unavailable_reason() -> Optional[str]:
    """Why hosts cannot be made here, or None if they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not shutil.which("ip") or not shutil.which("unshare"):
        return "iproute2 (ip) or util-linux (unshare) is missing"
    probe = "tplprobe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str, netns: Optional[str] = None):
    cmd = (["ip", "netns", "exec", netns] if netns else []) + ["ip", *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()}")


def _agent_script(hosts: List[Host]) -> str:
    cases = "\n".join(f'  {h.address}|{h.name}) ns={h.netns}; name={h.name} ;;' for h in hosts)
    return f"""#!/bin/bash
# Launch agent for mpirun (replaces ssh): AGENT [ssh options] HOST COMMAND...
while [[ "$1" == -* ]]; do shift; done
host="$1"; shift
case "$host" in
{cases}
  *) echo "agent: unknown host $host" >&2; exit 255 ;;
esac
exec ip netns exec "$ns" unshare --uts /bin/bash -c "hostname $name; $*"
"""


@contextmanager
def namespace_hosts(n: int, rate: Optional[str] = None, prefix: str = "tpl", burst: str = "128kb") -> Iterator[Cluster]:
    """n hosts on a bridge; rate (e.g. '1gbit') shapes each host's outgoing link with a token bucket.

    The bucket must hold about a millisecond of traffic (125 kB at 1 Gbit/s): a few kB, as
    small buckets go, hold TCP to a fraction of the rate."""
    hosts = [Host(name=f"{prefix}-node{i + 1}", netns=f"{prefix}-ns{i + 1}", address=f"{SUBNET}.{11 + i}")
             for i in range(n)]
    workdir = tempfile.mkdtemp(prefix="tpllama-hosts-")
    made: List[str] = []
    try:
        _ip("link", "add", BRIDGE, "type", "bridge")
        made.append("bridge")
        _ip("addr", "add", f"{SUBNET}.1/24", "dev", BRIDGE)
        _ip("link", "set", BRIDGE, "up")
        for i, h in enumerate(hosts):
            _ip("netns", "add", h.netns)
            made.append(h.netns)
            outside, inside = f"{prefix}v{i}a", f"{prefix}v{i}b"
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            _ip("link", "set", inside, "netns", h.netns)
            _ip("link", "set", outside, "master", BRIDGE)
            _ip("link", "set", outside, "up")
            _ip("addr", "add", f"{h.address}/24", "dev", inside, netns=h.netns)
            _ip("link", "set", inside, "up", netns=h.netns)
            _ip("link", "set", "lo", "up", netns=h.netns)
            if rate:
                subprocess.run(["ip", "netns", "exec", h.netns, "tc", "qdisc", "add", "dev", inside, "root", "tbf",
                                "rate", rate, "burst", burst, "latency", "50ms"], check=True, capture_output=True)
        hostfile = os.path.join(workdir, "hostfile")
        with open(hostfile, "w") as f:
            f.write("".join(f"{h.address} slots=1\n" for h in hosts))
        agent = os.path.join(workdir, "agent.sh")
        with open(agent, "w") as f:
            f.write(_agent_script(hosts))
        os.chmod(agent, os.stat(agent).st_mode | stat.S_IXUSR)
        yield Cluster(hosts=hosts, hostfile=hostfile, agent=agent)
    finally:
        for i, h in enumerate(hosts):
            if h.netns in made:
                # the outer end first: a deleted namespace frees its end of the link only later,
                # and hosts made right after would find the name taken
                subprocess.run(["ip", "link", "del", f"{prefix}v{i}a"], capture_output=True)
                subprocess.run(["ip", "netns", "del", h.netns], capture_output=True)
        if "bridge" in made:
            subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)
        shutil.rmtree(workdir, ignore_errors=True)

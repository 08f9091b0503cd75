"""One sitting: the benchmarks behind docs/performance.md's figures, one after another on one machine.

    python benchmarks/sitting.py [--only NAME,NAME] [--list] [--out DIR]

Figures from different sittings of a shared machine do not compare (the streaming bandwidth
alone moves by 10-20% between them), so docs/performance.md takes each figure from one run of
this script per CPU. It runs every step below as its own process (each with a time limit),
keeps each step's full output in DIR/<name>.txt and its JSON results where the step writes them
(benchmarks/results/), and writes DIR/sitting.json: the machine header, each step's command,
start and end time, exit status and the load average before it. A failed step is reported and
the sitting goes on. docs/sittings/ keeps the outputs of the sitting behind docs/performance.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO))      # `benchmarks`, after any installed tpllama: _common picks which one runs
from benchmarks._common import child_env, machine_header, machine_info  # noqa: E402

# name, arguments of `python benchmarks/<script>`, time limit in seconds
STEPS = [
    ("kernels", ["kernels.py", "--reps", "3"], 900),
    ("model_speed", ["model_speed.py", "--threads", "1,2", "--reps", "3"], 900),
    ("llamacpp_q40", ["compare_llamacpp.py", "--shape", "tinyllama-1.1b", "--threads", "1,2"], 1200),
    ("llamacpp_q4km", ["compare_llamacpp.py", "--shape", "tinyllama-1.1b", "--type", "q4km", "--threads", "1,2"], 1200),
    ("llamacpp_smollm2", ["compare_llamacpp.py", "--model", "DEFAULT_MODEL", "--threads", "1,2"], 900),
    ("long_context", ["sweep.py", "--shape", "tinyllama-1.1b", "--ranks", "1,2", "--threads", "1", "--prompt-len", "2048",
                      "--ctx", "4000", "--tg", "16"], 1800),
    ("attention", ["attention.py", "--positions", "100,4000", "--prompt-len", "0", "--ranks", "1,2", "--threads", "1"], 600),
    ("warm_start_q40", ["warm_start.py", "--type", "q40"], 900),
    ("warm_start_q4km", ["warm_start.py", "--type", "q4km"], 900),
    ("warm_start_f16", ["warm_start.py", "--type", "f16"], 1200),
    ("batch_ceiling", ["batch_ceiling.py"], 900),
    ("serve_load", ["serve_load.py", "--ranks", "1,2", "--clients", "1,2,4,8"], 1800),
]


def resolved(args):
    """DEFAULT_MODEL -> the README's model where tpllama caches it"""
    from tpllama.fetch import cached_path
    return [cached_path() if a == "DEFAULT_MODEL" else a for a in args]


def run_step(name: str, args, limit: int, out: Path) -> dict:
    args = resolved(args)
    cmd = [sys.executable, str(REPO / "benchmarks" / args[0]), *args[1:]]
    record = {"name": name, "command": " ".join(["python", "benchmarks/" + args[0], *args[1:]]),
              "load_average_before": os.getloadavg()[0], "start": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    t = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, env=child_env(), cwd=str(REPO))
        text, record["exit"] = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        text = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        text, record["exit"] = text + f"\n(stopped after {limit} s)\n", "timeout"
    record["seconds"] = round(time.time() - t, 1)
    (out / f"{name}.txt").write_text(text)
    return record


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default="", help="comma-separated step names (default: all)")
    p.add_argument("--list", action="store_true", help="print the steps and their commands, run nothing")
    p.add_argument("--out", default=None, help="folder (default benchmarks/results/sitting-<time>)")
    args = p.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - {s[0] for s in STEPS})
    if unknown:
        p.error(f"--only: no step named {', '.join(unknown)}; the steps are {', '.join(s[0] for s in STEPS)}")
    steps = [s for s in STEPS if not names or s[0] in names]
    if args.list:
        for name, a, limit in steps:
            print(f"{name:16} python benchmarks/{' '.join(resolved(a))}   (limit {limit} s)")
        return 0
    out = Path(args.out or REPO / "benchmarks" / "results" / time.strftime("sitting-%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    print(machine_header(info), flush=True)
    records = []
    for name, a, limit in steps:
        print(f"{time.strftime('%H:%M:%S')} {name}: python benchmarks/{' '.join(a)}", flush=True)
        records.append(run_step(name, a, limit, out))
        r = records[-1]
        print(f"{time.strftime('%H:%M:%S')} {name}: exit {r['exit']} in {r['seconds']} s -> {out / (name + '.txt')}",
              flush=True)
        (out / "sitting.json").write_text(json.dumps({"machine": info, "steps": records}, indent=1))
    failed = [r["name"] for r in records if r["exit"] != 0]
    print(f"sitting done: {len(records) - len(failed)} of {len(records)} steps ran" +
          (f"; failed: {', '.join(failed)}" if failed else "") + f"; outputs in {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

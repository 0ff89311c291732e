"""How to run many tiny runs fastest on this machine: eager or compiled, threads per run, runs at once.

Each setting trains the study's model (the `study-pilot` suite's config) for a fixed number of steps
in fresh `scalevec train` subprocesses and reports wall time and aggregate training tokens per
second over the whole machine, compile time and evaluation included, as a sweep would see them.
Run it alone (no sweep running), side by side in one invocation:

    .venv/bin/python benchmarks/sweep_throughput.py [--steps 150] [--json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scalevec.config import to_toml
from scalevec.experiments.sweep import load_suite, overrides

SETTINGS = [  # (name, runs at once, threads per run, compile)
    ("1 run x 1 thread, eager", 1, 1, False),
    ("1 run x 2 threads, eager", 1, 2, False),
    ("1 run x 1 thread, compiled", 1, 1, True),
    ("2 runs x 1 thread, eager", 2, 1, False),
    ("2 runs x 1 thread, compiled", 2, 1, True),
]


def measure(base: Path, sets: list[str], out: Path, runs: int, threads: int, compile: bool, steps: int) -> float:
    """Wall seconds for `runs` concurrent runs of `steps` steps."""
    commands = [[sys.executable, "-m", "scalevec", "train", str(base), "--out", str(out / f"run{i}"),
                 *[x for o in [*sets, f"seed={i}", f"train.threads={threads}", f"train.compile={str(compile).lower()}",
                               f"train.steps={steps}", f"train.eval_every={steps}",
                               f"train.checkpoint_every={steps}"] for x in ("--set", o)]] for i in range(runs)]
    started = time.perf_counter()
    processes = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for c in commands]
    for process in processes:
        _, err = process.communicate()
        if process.returncode:
            raise SystemExit(f"a run failed: {err.strip().splitlines()[-1] if err.strip() else process.returncode}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    suite = load_suite("study-pilot", "cpu")
    arm = suite.arms()[0]
    config = suite.base_config()
    tokens = args.steps * config.train.batch_size * config.train.seq_len
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "suite.toml"
        base.write_text(to_toml(config))
        sets = [s for s in overrides(suite, arm, suite.lrs[0], 0) if not s.startswith("seed=")]
        for name, runs, threads, compile in SETTINGS:
            seconds = measure(base, sets, Path(tmp) / name.replace(" ", "_"), runs, threads, compile, args.steps)
            rows.append({"setting": name, "seconds": seconds, "tokens_per_s": runs * tokens / seconds})
    best = max(r["tokens_per_s"] for r in rows)
    for row in rows:
        row["relative"] = row["tokens_per_s"] / best
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{suite.name} model, {args.steps} steps per run ({tokens:,} tokens), startup, compile and evaluation "
          "included\n\n| setting | wall s | machine tokens/s | relative |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['setting']} | {row['seconds']:.1f} | {row['tokens_per_s']:,.0f} | {row['relative']:.2f} |")


if __name__ == "__main__":
    main()

"""`scalevec sweep`: a suite's grid of runs, resumable, failures recorded, progress over the sweep.

A suite (TOML, shipped in `suites/` or the user's) crosses strategies x sizes x optimizers x
schedules ("arms") with learning rates and seeds at a `cpu` or `gpu` scale. The sweep first runs
every arm at every learning rate with one seed, then at least the remaining seeds at each arm's
own best learning rate (a single shared LR would favour whichever strategy it happens to suit).
Same seed, same initial matrices and batch order in every arm: comparisons are paired.

Each run is a `scalevec train` subprocess with its own run directory; a finished run is skipped,
a partial one resumed, a failed one recorded in its `failed.txt` and retried on the next sweep.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from ..config import ConfigError, load_config, to_toml
from .compare import read_metrics

SUITE_DIR = Path(__file__).parent / "suites"


@dataclass(frozen=True)
class Arm:
    strategy: str
    size: str
    optimizer: str
    schedule: str

    @property
    def path(self) -> str:
        return f"{self.strategy}/{self.size}/{self.optimizer}-{self.schedule}"


@dataclass
class Suite:
    name: str
    description: str
    baseline: str
    scale: str
    strategies: list[str]
    sizes: list[str]
    optimizers: list[str]
    schedules: list[str]
    lrs: list[float]
    muon_lrs: list[float]
    lr_seed: int
    seeds: list[int]
    cpu_hours: float = 0.0
    config: dict = field(default_factory=dict)

    def arms(self) -> list[Arm]:
        return [Arm(st, si, o, sc) for si in self.sizes for o in self.optimizers for sc in self.schedules
                for st in self.strategies]

    def lrs_for(self, arm: Arm) -> list[float]:
        return self.muon_lrs if arm.optimizer == "muon" else self.lrs

    def steps(self) -> int:
        return load_config(self.config).train.steps


def load_suite(name_or_path: str, scale: str, seeds: int | None = None) -> Suite:
    path = Path(name_or_path)
    if not path.is_file():
        path = SUITE_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in SUITE_DIR.glob("*.toml")))
        raise ConfigError(f"unknown suite {name_or_path!r}; choose from {known} or give a suite .toml file")
    raw = tomllib.loads(path.read_text())
    if scale not in raw:
        raise ConfigError(f"suite {path.stem} has no [{scale}] scale; choose one of "
                          f"{', '.join(k for k in raw if isinstance(raw[k], dict))}")
    grid = dict(raw[scale])
    try:
        suite = Suite(name=path.stem, description=raw.get("description", ""), baseline=raw["baseline"], scale=scale,
                      config=grid.pop("config", {}), **grid)
    except TypeError as err:
        raise ConfigError(f"suite {path}: {err}; see the shipped suites for the fields") from None
    if seeds is not None:
        suite.seeds = list(range(seeds))
    if suite.baseline not in suite.strategies:
        raise ConfigError(f"suite {suite.name}: baseline {suite.baseline!r} is not among its strategies")
    for arm in suite.arms():  # every arm's config is checked now, not when its run starts
        load_config(suite.config, overrides(arm, suite.lrs_for(arm)[0], suite.lr_seed))
    return suite


def run_dir(out: Path, arm: Arm, lr: float, seed: int) -> Path:
    return out / arm.path / f"lr{lr:g}" / f"seed{seed}"


CONFIG_SIZE = "config"  # a size that keeps the [model] section of the suite's config


def overrides(arm: Arm, lr: float, seed: int) -> list[str]:
    lr_key = "optim.muon_lr" if arm.optimizer == "muon" else "optim.lr"
    size = [] if arm.size == CONFIG_SIZE else [f"model.preset={arm.size}"]
    return [*size, f"strategy.preset={arm.strategy}", f"optim.name={arm.optimizer}", f"schedule.name={arm.schedule}",
            f"{lr_key}={lr}", f"seed={seed}"]


def final_val_loss(path: Path, steps: int) -> float | None:
    rows = read_metrics(path)
    if rows and rows[-1]["step"] == steps and "val_loss" in rows[-1]:
        return rows[-1]["val_loss"]
    return None


def best_lr(out: Path, suite: Suite, arm: Arm) -> float | None:
    losses = {lr: final_val_loss(run_dir(out, arm, lr, suite.lr_seed), suite.steps()) for lr in suite.lrs_for(arm)}
    finished = {lr: loss for lr, loss in losses.items() if loss is not None}
    return min(finished, key=finished.get) if finished else None


def _run(spec: tuple[Arm, float, int], out: Path, base: Path, threads: int) -> tuple[Path, str | None]:
    arm, lr, seed = spec
    path = run_dir(out, arm, lr, seed)
    command = [sys.executable, "-m", "scalevec", "train", str(base), "--out", str(path),
               *[x for o in [*overrides(arm, lr, seed), f"train.threads={threads}"] for x in ("--set", o)]]
    if path.exists():
        command.append("--resume")
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        path.mkdir(parents=True, exist_ok=True)
        (path / "failed.txt").write_text(result.stderr[-4000:])
        return path, result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"exit {result.returncode}"
    (path / "failed.txt").unlink(missing_ok=True)
    return path, None


def run_sweep(suite: Suite, out: Path, jobs: int = 1, log=print) -> dict:
    from ..data.prepare import prepare

    out.mkdir(parents=True, exist_ok=True)
    base = out / "suite.toml"
    config = load_config(suite.config)
    base.write_text(to_toml(config))
    (out / "suite.json").write_text(json.dumps(asdict(suite), indent=1) + "\n")
    data_dir = prepare(config.data, log=log)
    if suite.scale == "gpu":
        meta = json.loads((data_dir / "meta.json").read_text())
        t = config.train
        needed = t.steps * t.batch_size * t.grad_accum * t.seq_len
        if meta["train"]["tokens"] < needed:
            raise ConfigError(f"gpu suites need your own data: {data_dir} has {meta['train']['tokens']:,} training "
                              f"tokens, a run needs {needed:,}; prepare more data and set data.* in the suite")
    threads = max(1, (os.cpu_count() or 1) // jobs)
    steps = suite.steps()
    failures: dict[str, str] = {}
    arms = suite.arms()
    lr_phase = [(arm, lr, suite.lr_seed) for arm in arms for lr in suite.lrs_for(arm)]
    total = len(lr_phase) + len(arms) * len([s for s in suite.seeds if s != suite.lr_seed])
    with tqdm(total=total, unit="run", desc=f"sweep {suite.name}", disable=None) as bar:
        def execute(specs):
            todo = [s for s in specs if final_val_loss(run_dir(out, *s), steps) is None]
            bar.update(len(specs) - len(todo))
            with ThreadPoolExecutor(jobs) as pool:
                for path, error in pool.map(lambda spec: _run(spec, out, base, threads), todo):
                    if error:
                        failures[str(path)] = error
                        log(f"run {path} failed: {error}")
                    bar.update(1)

        execute(lr_phase)
        best = {arm: best_lr(out, suite, arm) for arm in arms}
        execute([(arm, lr, seed) for arm, lr in best.items() if lr is not None
                 for seed in suite.seeds if seed != suite.lr_seed])
    return {"runs": total, "failed": failures, "best_lr": {arm.path: lr for arm, lr in best.items()}}

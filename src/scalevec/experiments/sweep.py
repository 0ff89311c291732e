"""`scalevec sweep`: a suite's grid of runs, resumable, failures recorded, progress over the sweep.

A suite (TOML, shipped in `suites/` or the user's) crosses strategies x sizes x optimizers x
schedules ("arms") with learning rates and seeds at a `cpu` or `gpu` scale. The sweep first runs
every arm at every learning rate with one seed, then at least the remaining seeds at each arm's
own best learning rate (a single shared LR would favour whichever strategy it happens to suit).
Same seed, same initial matrices and batch order in every arm: comparisons are paired.

Each run is a `scalevec train` subprocess with its own run directory; a finished run is skipped,
a partial one resumed, a failed one recorded in its `failed.txt` and retried on the next sweep.

Records: each finished run leaves a small JSON record (resolved config, final metrics, the validation
curve, wall time) under `RESULTS/records/`, the same tree as the runs. The report reads only the
records and `suite.json`, so RESULTS (e.g. a folder of `results/` in the repository) regenerates its
report without the runs, and a sweep on another machine skips every recorded run.

Study options of a suite scale: `variants` (named arms that are a strategy plus config overrides,
e.g. another init), `analyses` (families of arm-vs-baseline claims with the paper's effect, for
verdicts: see stats.py), `extend_lrs` (extend an LR grid whose best value is at an edge, by a
factor of `lr_ratio`, default 2, up to this many times; an extension is rounded to 4 significant
digits, so its record path stays short: lr0.01131), `lrs_by_size` and `seeds_by_size` (a size's own
LR grid or test seeds instead of `lrs` or `seeds`), `tokens_per_parameter` (each size trains this
many tokens per non-embedding parameter; a size named `PRESET@N`, e.g. `cpu-0.5m@40`, trains N
instead: a tokens ladder is a list of such sizes), `compute_fit` (`{ baseline = ..., arm = ... }`:
the report fits loss against training FLOPs per arm and gives the compute multiplier, see
report.py), `ood_source` (every final model also scored on a bundled source outside the training
mix), and [config.model] fields kept on top of every size preset. `scalevec sweep --set KEY=VALUE`
applies an override to every run (e.g. train.device=cuda), never to a key the suite sets per run.

WSD studies (`wsd_decays`): a WSD run's stable phase is a constant-LR run, so its checkpoints there
launch extra decays (`train.branch_from`) at fractions of the stable phase; the report then shows
the gap to the baseline during the stable phase and after each decay.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import tomllib
import typing
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..config import BUNDLED_SOURCES, ConfigError, load_config, to_toml
from ..outputs import first_line, write_text_atomic
from ..rundir import final_eval, read_metrics
from ..train.preempt import EXIT_STOPPED, StoppedEarly, StopRequests

SUITE_DIR = Path(__file__).parent / "suites"
CONFIG_SIZE = "config"  # a size that keeps the [model] section of the suite's config
CONTROL = "control"  # an analysis arm the paper makes no claim about
LR_DIGITS = 4  # significant digits of an extended learning rate (its record path is lr{lr:g})


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
    wsd_decays: list[float] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    variants: dict[str, list[str]] = field(default_factory=dict)
    analyses: list[dict] = field(default_factory=list)
    extend_lrs: int = 0
    tokens_per_parameter: float = 0.0  # > 0: each size trains this many tokens per non-embedding parameter
    ood_source: str = ""  # a bundled source outside the training mix: every run's final model is scored on it
    ood_tokens: int = 131072  # how many of its tokens (evenly spaced windows of train.seq_len)
    lr_ratio: float = 2.0  # the factor between an edge of the LR grid and its extension
    lrs_by_size: dict[str, list[float]] = field(default_factory=dict)  # a size's LR grid instead of lrs
    seeds_by_size: dict[str, list[int]] = field(default_factory=dict)  # a size's test seeds instead of seeds
    compute_fit: dict[str, str] = field(default_factory=dict)  # {baseline, arm}: the report's loss-vs-FLOPs fit
    sets: list[str] = field(default_factory=list)  # `scalevec sweep --set` overrides, applied to every run

    def arms(self) -> list[Arm]:
        return [Arm(st, si, o, sc) for si in self.sizes for o in self.optimizers for sc in self.schedules
                for st in self.strategies]

    def lrs_for(self, arm: Arm) -> list[float]:
        return self.muon_lrs if arm.optimizer == "muon" else self.lrs_by_size.get(arm.size, self.lrs)

    def seeds_for(self, size: str) -> list[int]:
        """The test seeds of a size (seeds_by_size, else seeds)."""
        return self.seeds_by_size.get(size, self.seeds)

    def tokens_per_parameter_of(self, size: str) -> float:
        """A size's training length in tokens per non-embedding parameter (0: the config's train.steps)."""
        return split_size(size)[1] or self.tokens_per_parameter

    def base_config(self):
        """The suite's config with its first size (every run overrides the size anyway)."""
        return self.arm_config(Arm(self.strategies[0], self.sizes[0], self.optimizers[0], self.schedules[0]))

    def arm_config(self, arm: Arm):
        """The suite's config at `arm`'s size (its steps, with tokens_per_parameter, depend on the size)."""
        return load_config(self.config, [*size_overrides(self, arm.size), *self.sets])

    def steps(self, arm: Arm | None = None) -> int:
        """Steps of a run of `arm` (of the first size if None)."""
        return (self.base_config() if arm is None else self.arm_config(arm)).train.steps

    def decay_points(self, arm: Arm) -> list[int]:
        """Stable-phase checkpoint steps of a WSD arm's runs that launch extra decays."""
        if arm.schedule != "wsd" or not self.wsd_decays:
            return []
        config = self.arm_config(arm)
        stable = config.train.steps - round(config.schedule.decay_fraction * config.train.steps)
        every = config.train.checkpoint_every
        return sorted({int(f * stable) // every * every for f in self.wsd_decays} - {0})

    def decay_steps(self, point: int) -> int:
        """Total steps of a decay launched at `point`: the same stable/decay proportion as the full run."""
        return round(point / (1 - self.base_config().schedule.decay_fraction))


def split_size(size: str) -> tuple[str, float]:
    """`PRESET@N` -> (PRESET, N tokens per non-embedding parameter); a plain size -> (size, 0)."""
    preset, at, length = size.partition("@")
    if not at:
        return size, 0.0
    try:
        value = float(length)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"size {size!r}: after @ comes the training length in tokens per non-embedding "
                          f"parameter, a positive number (e.g. {preset or 'cpu-0.5m'}@40)")
    return preset, value


def round_lr(lr: float) -> float:
    """An extended learning rate at LR_DIGITS significant digits (a short, stable record path)."""
    return float(f"{lr:.{LR_DIGITS}g}")


def extension(grid: list[float], best: float, up: bool, ratio: float) -> float:
    """The next learning rate above (`up`) or below `best`, the top or bottom of the tried LRs: one more step of
    the grid's geometric ladder from the grid's edge as written (edge·ratio^k, so rounding does not accumulate over
    extensions: at ratio √2 a grid ending at 0.008 goes on 0.01131, 0.016; one ending at 0.01131 goes on 0.01599),
    rounded to LR_DIGITS significant digits."""
    edge = max(grid) if up else min(grid)
    steps = round(math.log(best / edge) / math.log(ratio)) + (1 if up else -1)
    return round_lr(edge * ratio ** steps)


# keys a suite sets per run, and the suite option that sets them (`--set` may not)
SUITE_KEYS = {"model.preset": "sizes", "optim.lr": "lrs (or lrs_by_size)", "optim.muon_lr": "muon_lrs",
              "seed": "seeds (or seeds_by_size, --seeds)", "strategy.preset": "strategies (or variants)",
              "optim.name": "optimizers", "schedule.name": "schedules",
              "train.steps": "tokens_per_parameter, a size's @N, or train.steps in the suite's [config]",
              "train.branch_from": "wsd_decays", "schedule.decay_start": "wsd_decays"}


def check_sets(sets: list[str]) -> None:
    """Refuse a `sweep --set` of a key the suite sets per run, naming the suite option to use instead."""
    from ..config import MODEL_PRESETS

    shape = {f"model.{key}" for preset in MODEL_PRESETS.values() for key in preset}
    for item in sets:
        key = item.partition("=")[0].strip()
        if key in SUITE_KEYS or key in shape:
            option = SUITE_KEYS.get(key, "sizes (or the suite's [config.model])")
            raise ConfigError(f"--set {key}: the suite sets it per run; use the suite's {option} instead")


def _holds(value, hint) -> bool:
    """Whether a value read from TOML or JSON is of a suite field's annotated type (an int passes for a float)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        return isinstance(value, list) and all(_holds(item, args[0]) for item in value)
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) and _holds(v, args[1]) for k, v in value.items())
    return isinstance(value, origin or hint)


def check_suite_fields(suite: Suite, where: str, fix: str) -> None:
    """Every field of a suite read from a file holds its type, so nothing downstream meets a string for a list."""
    for name, hint in typing.get_type_hints(Suite).items():
        if not _holds(getattr(suite, name), hint):
            expected = hint.__name__ if isinstance(hint, type) else str(hint)
            raise ConfigError(f"{where}: {name} = {getattr(suite, name)!r} is not of type {expected}; {fix}")


def read_suite(folder: Path, flag: str) -> Suite:
    """The suite a sweep recorded in `folder`/suite.json; a scrambled record is one ConfigError naming `flag`."""
    where, fix = f"{flag} {folder}: its suite.json", "restore it from the sweep that wrote it, or choose another folder"
    try:
        suite = Suite(**json.loads((folder / "suite.json").read_text()))
    except (ValueError, TypeError) as err:  # ValueError: not JSON, or not UTF-8
        raise ConfigError(f"{where} is not the record of a sweep ({type(err).__name__}: {first_line(err)}); {fix}"
                          ) from None
    check_suite_fields(suite, where, fix)
    return suite


def load_suite(name_or_path: str, scale: str, seeds: int | None = None, sets: list[str] | None = None) -> Suite:
    """A suite's scale; `seeds` (a count) and `sets` (overrides for every run) replace the suite's own."""
    path = Path(name_or_path)
    if not path.is_file():
        path = SUITE_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in SUITE_DIR.glob("*.toml")))
        raise ConfigError(f"unknown suite {name_or_path!r}; choose from {known} or give a suite .toml file")
    fix = "see the shipped suites for the fields (src/scalevec/experiments/suites)"
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"suite {path} is not a TOML file ({first_line(err)}); {fix}") from None
    if not isinstance(raw.get(scale), dict):
        raise ConfigError(f"suite {path.stem} has no [{scale}] scale; choose one of "
                          f"{', '.join(k for k in raw if isinstance(raw[k], dict))}")
    grid = dict(raw[scale])
    try:
        suite = Suite(name=path.stem, description=raw.get("description", ""), baseline=raw.get("baseline"),
                      scale=scale, config=grid.pop("config", {}), **grid)
    except TypeError as err:
        raise ConfigError(f"suite {path}: {err}; {fix}") from None
    check_suite_fields(suite, f"suite {path}", fix)
    if seeds is not None:
        suite.seeds, suite.seeds_by_size = list(range(seeds)), {}
    if sets:
        check_sets(sets)
        suite.sets = list(sets)
    _check_study_options(suite)
    if suite.baseline not in suite.strategies:
        raise ConfigError(f"suite {suite.name}: baseline {suite.baseline!r} is not among its strategies")
    for analysis in suite.analyses:
        if not isinstance(analysis.get("arms"), dict) or not analysis["arms"]:
            raise ConfigError(f"suite {suite.name}: analysis {analysis.get('name')!r}: give its arms as a table of "
                              "strategy = the paper's effect")
        names = [analysis.get("baseline"), *analysis["arms"]]
        missing = [n for n in names if n not in suite.strategies]
        if missing or not analysis.get("name"):
            raise ConfigError(f"suite {suite.name}: analysis {analysis.get('name')!r} needs a name, and its baseline "
                              f"and arms among the strategies (not: {', '.join(map(str, missing))})")
        for arm, expected in analysis["arms"].items():
            if expected != CONTROL and (isinstance(expected, bool) or not isinstance(expected, (int, float))):
                raise ConfigError(f"suite {suite.name}: analysis {analysis['name']!r} arm {arm!r}: give the paper's "
                                  f"effect in nats (negative = lower loss) or \"{CONTROL}\", not {expected!r}")
    for arm in suite.arms():  # every arm's config is checked now, not when its run starts
        load_config(suite.config, overrides(suite, arm, suite.lrs_for(arm)[0], suite.lr_seed))
    if suite.ood_source:
        trained_on = suite.base_config().data.sources
        if suite.ood_source not in BUNDLED_SOURCES or suite.ood_source in trained_on:
            raise ConfigError(f"suite {suite.name}: ood_source {suite.ood_source!r} must be a bundled source outside "
                              f"the training mix ({', '.join(trained_on)}); choose from "
                              f"{', '.join(s for s in BUNDLED_SOURCES if s not in trained_on)}")
    return suite


def _check_study_options(suite: Suite) -> None:
    """Sizes' training lengths, per-size tables, the LR ratio, grid values and compute_fit, each refused in one
    line naming the fix."""
    for size in suite.sizes:
        try:
            split_size(size)
        except ConfigError as err:
            raise ConfigError(f"suite {suite.name}: {err}") from None
    for option in ("lrs_by_size", "seeds_by_size"):  # their types are checked with every field's
        unknown = [size for size in getattr(suite, option) if size not in suite.sizes]
        if unknown:
            raise ConfigError(f"suite {suite.name}: {option} names {', '.join(unknown)}, not among its sizes "
                              f"({', '.join(suite.sizes)}); add it to sizes or remove it from {option}")
        for size, values in getattr(suite, option).items():
            if not values or min(values) < 0:
                raise ConfigError(f"suite {suite.name}: {option} {size!r} = {values!r}; give a non-empty list of "
                                  + ("learning rates" if option == "lrs_by_size" else "integer seeds"))
    if not suite.lr_ratio > 1:
        raise ConfigError(f"suite {suite.name}: lr_ratio {suite.lr_ratio} must be above 1 (e.g. 1.41421356 for a grid "
                          "with √2 spacing)")
    for lr in [*suite.lrs, *suite.muon_lrs, *(lr for grid in suite.lrs_by_size.values() for lr in grid)]:
        if float(f"{lr:g}") != lr:  # a record path lr{lr:g} would name another learning rate
            raise ConfigError(f"suite {suite.name}: learning rate {lr!r} has more significant digits than its "
                              f"record path lr{lr:g} keeps; give it as {lr:g} (6 digits at most)")
    fit = suite.compute_fit
    if fit and (set(fit) != {"baseline", "arm"} or not set(fit.values()) <= set(suite.strategies)):
        raise ConfigError(f"suite {suite.name}: compute_fit {fit!r} needs exactly a baseline and an arm among the "
                          f"strategies ({', '.join(suite.strategies)}), e.g. {{ baseline = \"standard\", "
                          "arm = \"unified\" }")


def run_dir(out: Path, arm: Arm, lr: float, seed: int, decay_from: int = 0) -> Path:
    return out / arm.path / f"lr{lr:g}" / (f"seed{seed}-decay{decay_from}" if decay_from else f"seed{seed}")


@dataclass(frozen=True)
class RunSpec:
    arm: Arm
    lr: float
    seed: int
    decay_from: int = 0  # > 0: a WSD decay launched from this stable-phase step of the (arm, lr, seed) run

    def path(self, out: Path) -> Path:
        return run_dir(out, self.arm, self.lr, self.seed, self.decay_from)

    def overrides(self, out: Path, suite: Suite) -> list[str]:
        sets = overrides(suite, self.arm, self.lr, self.seed)
        if suite.decay_points(self.arm):
            sets.append("train.keep_checkpoints=1000000")  # the decays branch from stable-phase checkpoints
        if self.decay_from:
            source = run_dir(out, self.arm, self.lr, self.seed) / "checkpoints" / f"step_{self.decay_from:08d}"
            sets += [f"train.branch_from={source}", f"schedule.decay_start={self.decay_from}",
                     f"train.steps={suite.decay_steps(self.decay_from)}"]
        return sets

    def steps(self, suite: Suite) -> int:
        return suite.decay_steps(self.decay_from) if self.decay_from else suite.steps(self.arm)


def size_overrides(suite: Suite, size: str) -> list[str]:
    """A size preset replaces the [model] section: the suite's own [model] fields are set again on top; with
    tokens_per_parameter (or a size's @N), the size also sets train.steps."""
    preset, _ = split_size(size)
    if preset == CONFIG_SIZE:
        sets = []
    else:
        model = {k: v for k, v in suite.config.get("model", {}).items() if k != "preset"}
        sets = [f"model.preset={preset}", *(f"model.{key}={json.dumps(value)}" for key, value in model.items())]
    tokens_per_parameter = suite.tokens_per_parameter_of(size)
    if tokens_per_parameter > 0:
        config = load_config(suite.config, [*sets, *suite.sets])
        t = config.train
        steps = math.ceil(tokens_per_parameter * non_embedding_parameters(config.model)
                          / (t.batch_size * t.seq_len * t.grad_accum))
        sets.append(f"train.steps={steps}")
    return sets


def non_embedding_parameters(model) -> int:
    """Parameters of a standard model of this shape, less the token embedding and output head."""
    import torch

    from ..model import Decoder
    from ..strategy import Strategy

    with torch.device("meta"):
        decoder = Decoder(model, Strategy())
    return sum(p.numel() for n, p in decoder.named_parameters() if n not in ("tok_emb.weight", "head.weight"))


def overrides(suite: Suite, arm: Arm, lr: float, seed: int) -> list[str]:
    lr_key = "optim.muon_lr" if arm.optimizer == "muon" else "optim.lr"
    strategy = suite.variants.get(arm.strategy, [f"strategy.preset={arm.strategy}"])
    return [*size_overrides(suite, arm.size), *suite.sets, *strategy, f"optim.name={arm.optimizer}",
            f"schedule.name={arm.schedule}", f"{lr_key}={lr}", f"seed={seed}"]


def record_path(results: Path, arm: Arm, lr: float, seed: int, decay_from: int = 0) -> Path:
    run = run_dir(results / "records", arm, lr, seed, decay_from)
    return run.parent / f"{run.name}.json"


def make_record(path: Path, wall_seconds: float | None, ood: tuple[str, np.ndarray] | None = None) -> dict:
    """What the report needs of a finished run: resolved config, the device and dtype it ran in, final metrics,
    validation curve, time, how many scale entries decayed per role and kind, and with `ood` (a source's name and
    windows) the final model's loss out of domain."""
    import torch

    from ..model import Decoder
    from ..optim import decay_counts
    from ..train.preflight import resolve_device

    rows = read_metrics(path)
    seconds, previous = 0.0, 0
    for row in rows:
        if "tokens_per_s" in row:
            seconds += (row["tokens"] - previous) / row["tokens_per_s"]
            previous = row["tokens"]
    keep = ("step", "tokens", "train_loss", "val_loss", "val_bpb", "val_loss_by_source")
    raw = tomllib.loads((path / "config.toml").read_text())
    config = load_config(raw, resolved=True)
    with torch.device("meta"):
        model = Decoder(config.model, config.strategy, config.moe)
    # where the run computed, as it logged it; runs from before that log ran on the machine making the record
    device = next((row["device"] for row in reversed(rows) if "device" in row), None) or \
        resolve_device(config.train.device).type
    record = {"config": raw, "device": device, "dtype": "bfloat16" if device == "cuda" else "float32",
              "final": {key: rows[-1][key] for key in keep if key in rows[-1]},
              "scale_decay": decay_counts(model, config.strategy.scale_decay, config.optim),
              "train_seconds": seconds, "wall_seconds": wall_seconds,
              "curve": [{key: row[key] for key in ("tokens", "val_loss", "val_loss_by_source") if key in row}
                        for row in rows if "val_loss" in row]}
    if ood is not None:
        from ..checkpoint import load_run_model
        from ..evaluate import windows_loss

        _, trained = load_run_model(path)
        record["ood"] = {ood[0]: windows_loss(trained.eval(), ood[1], config.train.eval_batch_size)}
    return record


def ood_windows(tokenizer: Path, source: str, tokens: int, seq_len: int) -> np.ndarray:
    """`tokens // seq_len` windows of seq_len + 1 tokens, evenly spaced over bundled `source`'s documents joined
    with the end-of-text token, encoded with the study's tokenizer: the same out-of-domain text for every run."""
    from ..data.prepare import END_OF_TEXT, load_tokenizer
    from ..data.sources import CORPUS_DIR, SourceFile, read_documents

    encoder = load_tokenizer(tokenizer)
    documents = [text for text in read_documents(SourceFile(CORPUS_DIR / f"{source}.jsonl.xz", source)) if text]
    eos = encoder.token_to_id(END_OF_TEXT)
    stream = np.concatenate([np.asarray([eos, *e.ids], dtype=np.int64)
                             for e in encoder.encode_batch_fast(documents, add_special_tokens=False)])
    count = tokens // seq_len
    if len(stream) < count * (seq_len + 1):
        raise ConfigError(f"ood_source {source} has {len(stream):,} tokens, fewer than ood_tokens={tokens:,} needs; "
                          "lower ood_tokens")
    starts = np.linspace(0, len(stream) - seq_len - 1, count).round().astype(np.int64)
    return np.stack([stream[start:start + seq_len + 1] for start in starts])


def read_record(results: Path, arm: Arm, lr: float, seed: int, decay_from: int = 0) -> dict | None:
    path = record_path(results, arm, lr, seed, decay_from)
    return json.loads(path.read_text()) if path.is_file() else None


def final_val_loss(results: Path, arm: Arm, lr: float, seed: int, decay_from: int = 0) -> float | None:
    record = read_record(results, arm, lr, seed, decay_from)
    return None if record is None else record["final"]["val_loss"]


def tried_lrs(results: Path, suite: Suite, arm: Arm) -> dict[float, float]:
    """Final validation loss of every recorded learning rate of an arm with the LR seed (the grid and any
    extension of it)."""
    losses = {}
    for path in (results / "records" / arm.path).glob(f"lr*/seed{suite.lr_seed}.json"):
        lr = float(path.parent.name[2:])
        losses[lr] = json.loads(path.read_text())["final"]["val_loss"]
    return losses


def best_lr(results: Path, suite: Suite, arm: Arm) -> float | None:
    losses = tried_lrs(results, suite, arm)
    return min(losses, key=losses.get) if losses else None


def _run(spec: RunSpec, suite: Suite, out: Path, results: Path, base: Path, threads: int, ood, stops: StopRequests
         ) -> tuple[Path, str | None]:
    path = spec.path(out)
    if stops.requested():  # the sweep was asked to stop: no run starts after that
        raise StoppedEarly(f"stopped on request ({stops.reason}) before {path}; run the sweep again to continue")
    command = [sys.executable, "-m", "scalevec", "train", str(base), "--out", str(path),
               *[x for o in [*spec.overrides(out, suite), f"train.threads={threads}"] for x in ("--set", o)]]
    if path.exists():
        command.append("--resume")
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode == EXIT_STOPPED:  # a signal or time limit reached the run too: it saved its step
        raise StoppedEarly(f"run {path} stopped at a checkpoint; the sweep stops with it (run it again to continue)")
    if result.returncode != 0:
        path.mkdir(parents=True, exist_ok=True)
        (path / "failed.txt").write_text(result.stderr[-4000:])
        return path, result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"exit {result.returncode}"
    (path / "failed.txt").unlink(missing_ok=True)
    _write_record(spec, suite, out, results, time.perf_counter() - started, ood)
    return path, None


def _progress_line(spec: RunSpec, out: Path, suite: Suite, done: int, total: int, ran: int, elapsed: float) -> str:
    """`[done/total] run: val_loss, elapsed, ETA` (the ETA from the runs this sweep ran, not skipped ones)."""
    final = final_eval(spec.path(out), spec.steps(suite)) or {}
    eta = elapsed / ran * (total - done)
    return (f"[{done}/{total}] {spec.path(out).relative_to(out)}: val_loss {final.get('val_loss', float('nan')):.4f}; "
            f"elapsed {elapsed / 60:.1f} min, ETA {eta / 60:.0f} min")


def _write_record(spec: RunSpec, suite: Suite, out: Path, results: Path, wall_seconds: float | None, ood) -> bool:
    """Record a finished run (False if it has not finished)."""
    if final_eval(spec.path(out), spec.steps(suite)) is None:
        return False
    target = record_path(results, spec.arm, spec.lr, spec.seed, spec.decay_from)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(target, json.dumps(make_record(spec.path(out), wall_seconds, ood), indent=1) + "\n")
    return True


def arms_at(suite: Suite, sizes: list[str] | None) -> list[Arm]:
    """The suite's arms at `sizes` (every arm when None); a size the suite does not have is refused."""
    if sizes is None:
        return suite.arms()
    unknown = [size for size in sizes if size not in suite.sizes]
    if unknown:
        raise ConfigError(f"--sizes {', '.join(unknown)}: not among suite {suite.name}'s sizes; choose from "
                          f"{', '.join(suite.sizes)}")
    return [arm for arm in suite.arms() if arm.size in sizes]


def _keep_recorded_seeds(suite: Suite, results: Path) -> None:
    """Refuse a plan that leaves out a test seed `results` already records (e.g. `--seeds 2` over a 3-seed study):
    suite.json would take the smaller plan and the report would silently drop that seed."""
    for arm in suite.arms():
        recorded = {int(path.stem[4:]) for path in (results / "records" / arm.path).glob("lr*/seed*.json")
                    if path.stem[4:].isdigit()} - {suite.lr_seed}
        dropped = sorted(recorded - set(suite.seeds_for(arm.size)))
        if dropped:
            raise ConfigError(f"{results} records seed {', '.join(map(str, dropped))} of {arm.path}, which this "
                              f"sweep's seeds ({', '.join(map(str, suite.seeds_for(arm.size)))}) leave out of its "
                              "report; keep the suite's seeds (drop --seeds) or give another --results")


def run_sweep(suite: Suite, out: Path, jobs: int = 1, log=print, results: Path | None = None,
              sizes: list[str] | None = None) -> dict:
    """Run what `results` has no record of yet (results defaults to out) at `sizes` (default: all), recording each
    run as it ends. `suite.json` keeps the whole suite, so the report of a sweep run size by size (several
    machines, or the largest size on a GPU) pairs every size recorded and names the ones still pending."""
    from ..data.prepare import prepare
    from ..data.references import reference_losses

    arms = arms_at(suite, sizes)
    results = out if results is None else results
    _keep_recorded_seeds(suite, results)
    out.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    base = out / "suite.toml"
    config = suite.base_config()
    base.write_text(to_toml(config))
    for folder in {out, results}:
        write_text_atomic(folder / "suite.json", json.dumps(asdict(suite), indent=1) + "\n")
    data_dir = prepare(config.data, log=log)
    if not (results / "references.json").is_file():  # and the validation sources' sizes, for bits per byte
        references = reference_losses(data_dir, config.train.seq_len, config.data.val_tokens)
        references["val_split"] = json.loads((data_dir / "meta.json").read_text())["val"].get("sources", [])
        write_text_atomic(results / "references.json", json.dumps(references, indent=1) + "\n")
    if suite.scale == "gpu":
        meta = json.loads((data_dir / "meta.json").read_text())
        t = config.train
        needed = t.steps * t.batch_size * t.grad_accum * t.seq_len
        if meta["train"]["tokens"] < needed:
            raise ConfigError(f"gpu suites need your own data: {data_dir} has {meta['train']['tokens']:,} training "
                              f"tokens, a run needs {needed:,}; prepare more data and set data.* in the suite")
    threads = config.train.threads or max(1, (os.cpu_count() or 1) // jobs)
    ood = None
    if suite.ood_source:
        ood = suite.ood_source, ood_windows(data_dir / "tokenizer.json", suite.ood_source, suite.ood_tokens,
                                            config.train.seq_len)
    failures: dict[str, str] = {}
    lr_phase = [RunSpec(arm, lr, suite.lr_seed) for arm in arms for lr in suite.lrs_for(arm)]
    total = len(lr_phase) + sum(len([s for s in suite.seeds_for(arm.size) if s != suite.lr_seed])
                                + len(suite.seeds_for(arm.size)) * len(suite.decay_points(arm)) for arm in arms)
    # a stop request (a scheduler's signal) reaches the runs too: they checkpoint and exit 75, and the sweep, which
    # waits for them instead of dying first, starts no other run and exits 75 as well
    stops = StopRequests(config.train.stop_signals, 0)
    with stops, tqdm(total=total, unit="run", desc=f"sweep {suite.name}", disable=None) as bar:
        def recorded(spec: RunSpec) -> bool:  # a run finished before records existed is recorded now
            return record_path(results, spec.arm, spec.lr, spec.seed, spec.decay_from).is_file() or \
                _write_record(spec, suite, out, results, None, ood)

        started, done, ran = time.perf_counter(), 0, 0  # (a disabled bar counts nothing)

        def execute(specs: list[RunSpec]) -> None:
            nonlocal done, ran
            todo = [s for s in specs if not recorded(s)]
            bar.update(len(specs) - len(todo))
            done += len(specs) - len(todo)
            with ThreadPoolExecutor(jobs) as pool:
                for spec, (path, error) in zip(todo, pool.map(
                        lambda spec: _run(spec, suite, out, results, base, threads, ood, stops), todo)):
                    done, ran = done + 1, ran + 1
                    bar.update(1)
                    if error:
                        failures[str(path)] = error
                        log(f"run {path} failed: {error}")
                    elif bar.disable:  # no progress bar (output is not a terminal): one plain line per run
                        log(_progress_line(spec, out, suite, done, bar.total, ran, time.perf_counter() - started))

        execute(lr_phase)
        for _ in range(suite.extend_lrs):  # until every arm's best learning rate is inside its grid
            extra = []
            for arm in arms:
                losses = tried_lrs(results, suite, arm)
                best = min(losses, key=losses.get) if len(losses) > 1 else None
                extended = len(set(losses) - set(suite.lrs_for(arm)))
                if best is not None and best in (min(losses), max(losses)) and extended < suite.extend_lrs:
                    lr = extension(suite.lrs_for(arm), best, best == max(losses), suite.lr_ratio)
                    extra.append(RunSpec(arm, lr, suite.lr_seed))
            if not extra:
                break
            bar.total += len(extra)
            execute(extra)
        best = {arm: best_lr(results, suite, arm) for arm in arms}
        # seed-major, so a sweep stopped part-way leaves every arm with the same seeds to pair
        seeds = dict.fromkeys([*suite.seeds, *(s for size in suite.seeds_by_size.values() for s in size)])
        execute([RunSpec(arm, lr, seed) for seed in seeds if seed != suite.lr_seed
                 for arm, lr in best.items() if lr is not None and seed in suite.seeds_for(arm.size)])
        execute([RunSpec(arm, lr, seed, point) for arm, lr in best.items() if lr is not None
                 for seed in suite.seeds_for(arm.size) if final_val_loss(results, arm, lr, seed) is not None
                 for point in suite.decay_points(arm)])
    return {"runs": total, "failed": failures, "best_lr": {arm.path: lr for arm, lr in best.items()}}

"""`scalevec compare`: train several strategies with the same seed, data and budget, then report.

Each strategy is one run directory under OUT; a finished run is reused, a partial one resumed. With
`jobs` > 1 the strategies train side by side, each a `scalevec train` process (its log in OUT/NAME.log).

With a `reference` study (a sweep's results, e.g. `results/study-iwd-cpu`) the comparison is one seed of
that study: each strategy trains at the study's best learning rate for its arm, its resolved config must
equal the study's run record for that seed, and the report puts its final loss beside the record's and its
Δ beside the study's paired Δ over all seeds, with the gap over training. On the machine that wrote a record
the rerun equals it bit for bit (same code and config, fp32 on CPU, one thread per run); another CPU rounds
its BLAS kernels differently, which 750 steps amplify: measured, the same run on two machines ended 5.7e-4
apart, so a rerun within RECORD_TOLERANCE (about 3x that) reproduces the record.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..checkpoint import list_checkpoints
from ..config import ConfigError, load_config, to_dict, to_toml
from ..data.prepare import prepare
from ..outputs import first_line, write_atomic, write_text_atomic
from ..rundir import TrainError, final_eval, first_difference, read_metrics
from ..train.preempt import EXIT_STOPPED, StoppedEarly, StopRequests
from ..train.trainer import Trainer
from .sweep import best_lr, read_record, read_suite

RECORD_TOLERANCE = 2e-3  # nats: a rerun on another CPU (see above); on the record's own machine Δ is 0
PRESET_DIR = Path(__file__).parent / "presets"


def preset_path(name: str) -> Path:
    path = PRESET_DIR / f"{name}.toml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.toml")))
        raise ConfigError(f"unknown compare preset {name!r}; choose from {known} or pass --config FILE")
    return path


def run_comparison(source: Path, strategies: list[str], out: Path, overrides: list[str], command: str,
                   progress=None, log=print, jobs: int = 1, reference: Path | None = None) -> dict:
    study = _study(reference, source, strategies, overrides) if reference else None
    configs = {name: load_config(source, [*overrides, f"strategy.preset={name}",
                                          *([f"optim.lr={study['lr'][name]}"] if study and study["lr"][name] else [])])
               for name in strategies}
    if study:
        _check_reproduces(configs, study)
    prepare(next(iter(configs.values())).data, progress=progress, log=log, protect=out)  # one [data] for all
    todo = {}
    for name, config in configs.items():
        run_dir = out / name
        if final_eval(run_dir, config.train.steps) is not None:
            difference = first_difference(to_dict(load_config(run_dir / "config.toml", resolved=True)),
                                          to_dict(config))
            if difference:
                raise ConfigError(f"{run_dir} is a finished run of another config ({difference} differs); choose "
                                  "another --out, or remove that run to train this comparison")
            log(f"{name}: finished run found in {run_dir}")
            continue
        todo[name] = bool(list_checkpoints(run_dir / "checkpoints"))
        log(f"{name}: {'resuming' if todo[name] else 'training'} in {run_dir}")
    if jobs > 1:  # a stop request reaches the runs too: this process waits for their exit 75 instead of dying first
        signals = next(iter(configs.values())).train.stop_signals
        with StopRequests(signals, 0), ThreadPoolExecutor(jobs) as pool:
            list(pool.map(lambda name: _train_process(source, name, configs[name], out, todo[name], log), todo))
    else:
        for name, resume in todo.items():
            Trainer(configs[name], out / name, resume=resume, overwrite=not resume, progress=progress, log=log).run()
    summary = summarize_runs(out, configs)
    if study:
        summary["reference"] = _reference_rows(summary, study)
    write_report(out, summary, command)
    return summary


def _train_process(source: Path, name: str, config, out: Path, resume: bool, log) -> None:
    """One strategy's run as its own `scalevec train` process, at the config resolved here."""
    run_dir = out / name
    out.mkdir(parents=True, exist_ok=True)
    resolved = out / f"{name}.toml"
    write_text_atomic(resolved, to_toml(config))
    command = [sys.executable, "-m", "scalevec", "train", str(resolved), "--out", str(run_dir),
               "--resume" if resume else "--overwrite"]
    with open(out / f"{name}.log", "w") as output:
        result = subprocess.run(command, stdout=output, stderr=subprocess.STDOUT, text=True)
    if result.returncode == EXIT_STOPPED:
        raise StoppedEarly(f"{name} stopped at a checkpoint (a signal or time limit); run the comparison again to "
                           "continue it")
    if result.returncode != 0:
        last = (out / f"{name}.log").read_text().strip().splitlines()[-1:] or [f"exit {result.returncode}"]
        raise TrainError(f"{name} stopped: {last[0]} (its log: {out / name}.log)")
    log(f"{name}: finished in {run_dir}")


def _study(reference: Path, source: Path, strategies: list[str], overrides: list[str]) -> dict:
    """The reference study's suite, summary and, per strategy, its best learning rate and the arm it ran as."""
    if not (reference / "suite.json").is_file():
        raise ConfigError(f"--reference {reference} is not a study's results (no suite.json); give a folder under "
                          "results/ such as results/study-iwd-cpu")
    suite = read_suite(reference, "--reference")
    summary_path = reference / "summary.json"
    try:
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {"analyses": []}
        if not isinstance(summary.get("analyses"), list):
            raise TypeError("no list of analyses")
    except (ValueError, TypeError, AttributeError) as err:  # ValueError: not JSON, or not UTF-8
        raise ConfigError(f"--reference {reference}: its summary.json is not a study's summary ({first_line(err)}); "
                          f"regenerate it with `scalevec report {reference}`") from None
    config = load_config(source, overrides)
    arms, lrs = {}, {}
    for name in strategies:
        matches = [arm for arm in suite.arms() if arm.strategy == name and arm.optimizer == config.optim.name
                   and arm.schedule == config.schedule.name and arm.size in (config.model.preset, "config")]
        if not matches:
            raise ConfigError(f"--reference {reference} has no arm {name!r} with optim.name={config.optim.name} and "
                              f"schedule.name={config.schedule.name} at model.preset={config.model.preset}; choose "
                              "--strategies among "
                              f"{', '.join(suite.strategies)}")
        arms[name] = matches[0]
        lrs[name] = best_lr(reference, suite, matches[0])  # None while the study has not run it: the config's lr
    return {"path": reference, "suite": suite, "summary": summary, "arm": arms, "lr": lrs}


def _check_reproduces(configs: dict, study: dict) -> None:
    """Each strategy's config equals the study's: refused, naming the first differing key, if not."""
    suite = study["suite"]
    for name, config in configs.items():
        arm, lr = study["arm"][name], study["lr"][name]
        record = lr and (read_record(study["path"], arm, lr, config.seed) or read_record(study["path"], arm, lr,
                                                                                         suite.lr_seed))
        if record is None:
            continue
        recorded = load_config(record["config"], resolved=True)
        recorded.seed = config.seed  # the LR seed's record stands for the study's config when the seed has none
        difference = first_difference(to_dict(recorded), to_dict(config))
        if difference:
            raise ConfigError(f"{name}: {difference} differs from the study's run record in {study['path']}; the "
                              "comparison would not reproduce it (drop --reference, or --set it as the study has it)")


def _reference_rows(summary: dict, study: dict) -> dict:
    """Per strategy, the study's record of this seed; per non-baseline strategy, the study's paired Δ to the
    baseline over all its seeds (its analysis row) and Δ over training."""
    rows = {}
    baseline = summary["baseline"]
    for name, row in summary["strategies"].items():
        lr = study["lr"][name]
        record = lr and read_record(study["path"], study["arm"][name], lr, summary["seed"])
        recorded = record["final"]["val_loss"] if record else None
        rows[name] = {"lr": lr, "record_val_loss": recorded,
                      "matches": None if recorded is None else abs(recorded - row["final_val_loss"]) < RECORD_TOLERANCE}
        arm = study["arm"][name]
        setting = f"{arm.size}/{arm.optimizer}-{arm.schedule}"
        analysis = next((a for a in study["summary"]["analyses"] if a["baseline"] == baseline
                         and a["setting"] == setting for r in a["arms"] if r["arm"] == name), None)
        result = None if analysis is None else next(r for r in analysis["arms"] if r["arm"] == name)
        if result is not None:
            rows[name]["study"] = {key: result[key] for key in ("n", "delta", "ci95", "verdict", "delta_curve")}
            rows[name]["study"]["analysis"] = analysis["name"]
    return rows


def summarize_runs(out: Path, configs: dict) -> dict:
    baseline = next(iter(configs))
    rows = {}
    for name in configs:
        metrics = read_metrics(out / name)
        evals = [r for r in metrics if "val_loss" in r]
        speeds = [r["tokens_per_s"] for r in metrics if "tokens_per_s" in r]
        rows[name] = {"final_val_loss": evals[-1]["val_loss"], "final_train_loss": evals[-1]["train_loss"],
                      "tokens": evals[-1]["tokens"], "tokens_per_s": statistics.median(speeds),
                      "curve": [(r["tokens"], r["val_loss"]) for r in evals]}
    for row in rows.values():
        row["val_loss_minus_baseline"] = row["final_val_loss"] - rows[baseline]["final_val_loss"]
    first = configs[baseline]
    return {"baseline": baseline, "seed": first.seed, "model": first.model.preset, "steps": first.train.steps,
            "strategies": rows}


def table(summary: dict) -> str:
    reference = summary.get("reference")
    lines = [f"| strategy | final val loss | vs {summary['baseline']} | tokens/s |"
             + (f" the study's record (seed {summary['seed']}) |" if reference else ""),
             "|---|---|---|---|" + ("---|" if reference else "")]
    for name, row in summary["strategies"].items():
        line = (f"| {name} | {row['final_val_loss']:.4f} | {row['val_loss_minus_baseline']:+.4f} | "
                f"{row['tokens_per_s']:,.0f} |")
        if reference:
            ref = reference[name]
            line += (" none yet |" if ref["record_val_loss"] is None else
                     f" {ref['record_val_loss']:.4f} ({'equal' if ref['matches'] else 'DIFFERENT'}, Δ "
                     f"{row['final_val_loss'] - ref['record_val_loss']:+.1e}) |")
        lines.append(line)
    for name, ref in (reference or {}).items():
        study = ref.get("study")
        if study is None:
            continue
        interval = "" if study["ci95"] is None else f" [{study['ci95'][0]:+.4f}, {study['ci95'][1]:+.4f}]"
        lines.append(f"\n{name} − {summary['baseline']}: {summary['strategies'][name]['val_loss_minus_baseline']:+.4f} "
                     f"here (one seed); the study's {study['n']} paired seed{'s' if study['n'] > 1 else ''}: "
                     f"{study['delta']:+.4f}{interval}, "
                     f"{study['verdict']} ({study['analysis']}).")
    return "\n".join(lines)


def write_report(out: Path, summary: dict, command: str) -> None:
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    plot_curves(out, summary)
    names = list(summary["strategies"])
    config_text = (out / names[0] / "config.toml").read_text()
    reference = ""
    if summary.get("reference"):
        plot_gap(out, summary)
        reference = ("\nThe study's run records of this seed are beside it: `equal` within "
                     f"{RECORD_TOLERANCE:g} nats. On the machine that wrote a record a rerun equals it bit for bit "
                     "(same code and config, fp32 on CPU, one thread per run); another CPU rounds its BLAS kernels "
                     "differently, which 750 steps amplify (measured: 5.7e-4 between two machines).\n\n"
                     "![gap over training](gap.png)\n")
    write_text_atomic(out / "report.md", f"""# Comparison: {', '.join(names)}

Model `{summary['model']}`, seed {summary['seed']}, {summary['steps']} steps, the same data and
budget for every strategy. Validation loss on the fixed validation budget at the end of training;
tokens/s is the median over logged intervals (evaluation excluded). One seed: differences of the
order of run-to-run noise are not evidence (the sweep runner gives error bars).

{table(summary)}
{reference}
![validation loss](loss.png)

Reproduce: `{command}`

Resolved config of `{names[0]}` (the others differ only in `[strategy]`{' and `optim.lr`' if reference else ''}):

```toml
{config_text}```
""")


def plot_gap(out: Path, summary: dict) -> None:
    """Δ validation loss to the baseline over training: this run's, and the study's mean with its 95% band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = dict(summary["strategies"][summary["baseline"]]["curve"])
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (name, ref) in enumerate(summary["reference"].items()):
        if name == summary["baseline"]:
            continue
        colour = plt.get_cmap("tab10").colors[i % 10]
        points = [(t, loss - base[t]) for t, loss in summary["strategies"][name]["curve"][1:] if t in base]
        ax.plot([t / 1e6 for t, _ in points], [d for _, d in points], color=colour, marker="o", markersize=3,
                label=f"{name}, this run")
        study = (ref.get("study") or {}).get("delta_curve", [])[1:]
        if study:
            tokens = [p["tokens"] / 1e6 for p in study]
            ax.plot(tokens, [p["delta"] for p in study], color=colour, linestyle="--",
                    label=f"{name}, the study's mean ({ref['study']['n']} seed{'s' if ref['study']['n'] > 1 else ''})")
            if all(p["ci95"] for p in study):
                ax.fill_between(tokens, [p["ci95"][0] for p in study], [p["ci95"][1] for p in study], color=colour,
                                alpha=0.15)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set(xlabel="training tokens (M)", ylabel=f"Δ val loss vs {summary['baseline']}", title="gap over training")
    ax.legend(fontsize=8)
    fig.tight_layout()
    write_atomic(out / "gap.png", lambda path: fig.savefig(path, dpi=110, format="png"))
    plt.close(fig)


def plot_curves(out: Path, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, row in summary["strategies"].items():
        tokens, losses = zip(*row["curve"][1:] or row["curve"])  # the step-0 loss would flatten the plot
        ax.plot([t / 1e6 for t in tokens], losses, marker="o", markersize=3, label=f"{name} "
                                                                                   f"({row['final_val_loss']:.3f})")
    ax.set(xlabel="training tokens (M)", ylabel="validation loss", title=f"{summary['model']}, seed {summary['seed']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    write_atomic(out / "loss.png", lambda path: fig.savefig(path, dpi=110, format="png"))
    plt.close(fig)

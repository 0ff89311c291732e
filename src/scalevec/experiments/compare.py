"""`scalevec compare`: train several strategies with the same seed, data and budget, then report.

Each strategy is one run directory under OUT; a finished run is reused, a partial one resumed.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from ..checkpoint import list_checkpoints
from ..config import ConfigError, load_config
from ..data.prepare import prepare
from ..outputs import write_atomic, write_text_atomic
from ..rundir import final_eval, read_metrics
from ..train.trainer import Trainer

PRESET_DIR = Path(__file__).parent / "presets"


def preset_path(name: str) -> Path:
    path = PRESET_DIR / f"{name}.toml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.toml")))
        raise ConfigError(f"unknown compare preset {name!r}; choose from {known} or pass --config FILE")
    return path


def run_comparison(source: Path, strategies: list[str], out: Path, overrides: list[str], command: str,
                   progress=None, log=print) -> dict:
    configs = {name: load_config(source, [*overrides, f"strategy.preset={name}"]) for name in strategies}
    prepare(next(iter(configs.values())).data, progress=progress, log=log, protect=out)  # one [data] for all
    for name, config in configs.items():
        run_dir = out / name
        if final_eval(run_dir, config.train.steps) is not None:
            log(f"{name}: finished run found in {run_dir}")
            continue
        resume = bool(list_checkpoints(run_dir / "checkpoints"))
        log(f"{name}: {'resuming' if resume else 'training'} in {run_dir}")
        Trainer(config, run_dir, resume=resume, overwrite=not resume, progress=progress, log=log).run()
    summary = summarize_runs(out, configs)
    write_report(out, summary, command)
    return summary


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
    lines = [f"| strategy | final val loss | vs {summary['baseline']} | tokens/s |", "|---|---|---|---|"]
    for name, row in summary["strategies"].items():
        lines.append(f"| {name} | {row['final_val_loss']:.4f} | {row['val_loss_minus_baseline']:+.4f} | "
                     f"{row['tokens_per_s']:,.0f} |")
    return "\n".join(lines)


def write_report(out: Path, summary: dict, command: str) -> None:
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    plot_curves(out, summary)
    names = list(summary["strategies"])
    config_text = (out / names[0] / "config.toml").read_text()
    write_text_atomic(out / "report.md", f"""# Comparison: {', '.join(names)}

Model `{summary['model']}`, seed {summary['seed']}, {summary['steps']} steps, the same data and
budget for every strategy. Validation loss on the fixed validation budget at the end of training;
tokens/s is the median over logged intervals (evaluation excluded). One seed: differences of the
order of run-to-run noise are not evidence (the sweep runner gives error bars).

{table(summary)}

![validation loss](loss.png)

Reproduce: `{command}`

Resolved config of `{names[0]}` (the others differ only in `[strategy]`):

```toml
{config_text}```
""")


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

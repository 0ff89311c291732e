"""`scalevec report DIR`: a sweep's table (mean ± std over seeds, paired difference to the baseline
with a t-test), learning-rate curves, loss curves, loss against wall clock, and for a size ladder
a fit of loss against compute with the compute-efficiency multiplier of each strategy."""

from __future__ import annotations

import json
import math
import statistics
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import load_config
from ..outputs import write_atomic, write_text_atomic
from ..rundir import read_metrics
from .sweep import Arm, Suite, final_val_loss, run_dir

MIN_SIZES_FOR_FIT = 5
BOOTSTRAP = 200  # seed resamples for the multiplier's interval


@dataclass
class Run:
    val_loss: float
    curve: list[tuple[int, float]]
    train_seconds: float
    tokens: int


def read_run(path: Path, steps: int) -> Run | None:
    if final_val_loss(path, steps) is None:
        return None
    rows = read_metrics(path)
    seconds, previous = 0.0, 0
    for row in rows:
        if "tokens_per_s" in row:
            seconds += (row["tokens"] - previous) / row["tokens_per_s"]
            previous = row["tokens"]
    return Run(rows[-1]["val_loss"], [(r["tokens"], r["val_loss"]) for r in rows if "val_loss" in r], seconds,
               rows[-1]["tokens"])


def bits_per_byte(out: Path) -> float | None:
    """Validation tokens per byte of the sweep's data, to turn nats per token into bits per byte."""
    config = load_config(out / "suite.toml")
    meta_path = Path(config.data.dir) / "meta.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    if not meta["val"].get("bytes"):
        return None
    return meta["val"]["tokens"] / meta["val"]["bytes"] / math.log(2)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def analyse(out: Path) -> dict:
    from scipy import stats

    suite = Suite(**json.loads((out / "suite.json").read_text()))
    steps = suite.steps()
    per_byte = bits_per_byte(out)
    arms = {}
    for arm in suite.arms():
        lrs = suite.lrs_for(arm)
        lr_curve = {lr: read_run(run_dir(out, arm, lr, suite.lr_seed), steps) for lr in lrs}
        finished = {lr: run.val_loss for lr, run in lr_curve.items() if run is not None}
        if not finished:
            continue
        best = min(finished, key=finished.get)
        seeds = {s: read_run(run_dir(out, arm, best, s), steps) for s in suite.seeds}
        seeds = {s: run for s, run in seeds.items() if run is not None}
        mean, std = _mean_std([r.val_loss for r in seeds.values()])
        arms[arm] = {"arm": arm.path, "best_lr": best, "best_lr_at_edge": len(lrs) > 1 and best in (min(lrs), max(lrs)),
                     "lr_curve": {str(lr): loss for lr, loss in finished.items()},
                     "seeds": {str(s): r.val_loss for s, r in seeds.items()}, "mean": mean, "std": std,
                     "bits_per_byte": mean * per_byte if per_byte else None,
                     "train_seconds": statistics.mean(r.train_seconds for r in seeds.values()),
                     "tokens": next(iter(seeds.values())).tokens,
                     "curve": _mean_curve([r.curve for r in seeds.values()])}
    for arm, row in arms.items():
        row["wsd"] = wsd_study(out, suite, arm, row)
    for arm, row in arms.items():
        base = arms.get(Arm(suite.baseline, arm.size, arm.optimizer, arm.schedule))
        for point, base_point in zip(row["wsd"], base["wsd"] if base else []):
            point["stable_gap"] = point["stable"] - base_point["stable"]
            point["decayed_gap"] = point["decayed"] - base_point["decayed"]
        common = sorted(set(row["seeds"]) & set(base["seeds"])) if base else []
        diffs = [row["seeds"][s] - base["seeds"][s] for s in common]
        row["paired_seeds"] = len(diffs)
        row["diff_mean"], row["diff_std"] = _mean_std(diffs) if diffs else (None, None)
        row["p_value"] = None
        if len(diffs) >= 2 and arm.strategy != suite.baseline:
            row["p_value"] = float(stats.ttest_rel([row["seeds"][s] for s in common],
                                                   [base["seeds"][s] for s in common]).pvalue)
    return {"suite": suite.name, "description": suite.description, "baseline": suite.baseline, "scale": suite.scale,
            "cpu_hours": suite.cpu_hours, "steps": steps, "arms": list(arms.values()),
            "scaling": scaling_fit(suite, arms)}


def wsd_study(out: Path, suite: Suite, arm: Arm, row: dict) -> list[dict]:
    """Per decay point: validation loss in the stable phase there, and after the decay launched from it."""
    points = []
    for point in suite.decay_points(arm):
        stable, decayed = [], []
        for seed in row["seeds"]:
            main = read_run(run_dir(out, arm, row["best_lr"], int(seed)), suite.steps())
            branch = read_run(run_dir(out, arm, row["best_lr"], int(seed), point), suite.decay_steps(point))
            if main is None or branch is None:
                continue
            at = main.tokens * point / suite.steps()
            stable.append([loss for tokens, loss in main.curve if tokens <= at][-1])
            decayed.append(branch.val_loss)
        if stable:
            points.append({"decay_from": point, "stable": statistics.mean(stable), "decayed": statistics.mean(decayed),
                           "seeds": len(stable)})
    return points


def _mean_curve(curves: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
    length = min(len(c) for c in curves)
    return [(curves[0][i][0], statistics.mean(c[i][1] for c in curves)) for i in range(length)]


def _fit_law(points: list[tuple[float, float]]):
    """L(C) = a·(C/C0)^(−b) + floor through (compute, loss) points; (a, b, floor, C0), or None if it fails."""
    from scipy.optimize import OptimizeWarning, curve_fit

    c, loss = np.array([p[0] for p in points]), np.array([p[1] for p in points])
    try:
        with warnings.catch_warnings():  # 3 parameters from 5 points: no covariance is expected
            warnings.simplefilter("ignore", OptimizeWarning)
            fitted = curve_fit(lambda x, a, b, floor: a * np.power(x, -b) + floor, c / c.min(), loss,
                               p0=(1.0, 0.3, loss.min() * 0.9), maxfev=20000)[0]
    except RuntimeError:  # no convergence
        return None
    return (*fitted, c.min())


def _multiplier(base, points: list[tuple[float, float]]) -> float | None:
    """Baseline compute to reach the strategy's loss at its largest size, over the strategy's compute there."""
    if base is None:
        return None
    a, b, floor, c0 = base
    compute, loss = max(points)
    if loss <= floor or a <= 0 or b <= 0:  # the baseline law never reaches that loss
        return None
    return float(c0 * ((loss - floor) / a) ** (-1 / b) / compute)


def scaling_fit(suite: Suite, arms: dict) -> dict:
    """Fit L(C) = a·C^(−b) + c per (strategy, optimizer, schedule) over sizes, on the seed means; the
    multiplier of a strategy is the baseline's compute to reach its loss over its own compute, at its
    largest size. Uncertainty: a paired bootstrap over seeds (the same resampled seeds in every arm)."""
    if len(suite.sizes) < MIN_SIZES_FOR_FIT:
        return {"estimable": False, "reason": f"{len(suite.sizes)} size(s); a scaling fit needs at least "
                                             f"{MIN_SIZES_FOR_FIT}, so no compute multiplier is estimated"}
    import torch

    from ..model import Decoder
    from ..strategy import strategy as make_strategy
    from ..summary import flops_per_token
    from .sweep import overrides

    groups: dict[tuple, list] = {}
    tokens_per_parameter = {}  # how far from compute-optimal the ladder trains, for the report to say
    for arm, row in arms.items():
        config = load_config(suite.config, overrides(arm, suite.lrs_for(arm)[0], 0))
        with torch.device("meta"):
            model = Decoder(config.model, make_strategy(arm.strategy), config.moe)
        row["compute"] = flops_per_token(model) * row["tokens"]
        groups.setdefault((arm.strategy, arm.optimizer, arm.schedule), []).append(row)
        if arm.strategy == suite.baseline:
            tokens_per_parameter[arm.size] = row["tokens"] / sum(p.numel() for p in model.parameters())
    seeds = sorted(set.intersection(*(set(row["seeds"]) for row in arms.values()))) if arms else []
    if not seeds:
        return {"estimable": False, "reason": "no seed has finished in every arm"}

    def multipliers(draw: list[str]) -> dict[str, float | None]:
        points = {key: [(row["compute"], statistics.mean(row["seeds"][s] for s in draw)) for row in rows]
                  for key, rows in groups.items() if len(rows) >= MIN_SIZES_FOR_FIT}
        fits = {key: _fit_law(p) for key, p in points.items()}
        return {f"{strategy}/{optimizer}-{schedule}": _multiplier(fits.get((suite.baseline, optimizer, schedule)), p)
                for (strategy, optimizer, schedule), p in points.items() if strategy != suite.baseline}

    estimate = multipliers(seeds)
    if not estimate:
        return {"estimable": False, "reason": f"fewer than {MIN_SIZES_FOR_FIT} sizes have finished runs in every arm"}
    rng = np.random.default_rng(0)
    replicates = [multipliers([seeds[i] for i in rng.integers(len(seeds), size=len(seeds))]) for _ in range(BOOTSTRAP)]
    result = {"estimable": True, "seeds": len(seeds), "bootstrap": BOOTSTRAP, "multipliers": {},
              "tokens_per_parameter": tokens_per_parameter}
    for name, value in estimate.items():
        draws = [r[name] for r in replicates if r[name] is not None]
        low, high = [float(q) for q in np.percentile(draws, [16, 84])] if draws else (None, None)
        result["multipliers"][name] = {"value": value, "low": low, "high": high, "defined": len(draws)}
    return result


def write_report(out: Path) -> dict:
    summary = analyse(out)
    _plots(out, summary)
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    lines = [f"# Suite `{summary['suite']}` ({summary['scale']} scale)", "", summary["description"], "",
             f"{summary['steps']} steps per run; each arm at its own best learning rate (swept with one seed), then "
             f"paired seeds at that rate. Declared budget: {summary['cpu_hours']} CPU-hours on 2 cores. Runs stay "
             "within one epoch of the training data.", "",
             "| arm | best lr | seeds | final val loss | Δ vs baseline (paired) | p (paired t) | bits/byte | train s |",
             "|---|---|---|---|---|---|---|---|"]
    for row in summary["arms"]:
        edge = " (edge)" if row["best_lr_at_edge"] else ""
        diff = "—" if row["diff_mean"] is None or row["arm"].startswith(summary["baseline"] + "/") else \
            f"{row['diff_mean']:+.4f} ± {row['diff_std']:.4f}"
        p = "—" if row["p_value"] is None else f"{row['p_value']:.3f}{' *' if row['p_value'] < 0.05 else ''}"
        bpb = "—" if row["bits_per_byte"] is None else f"{row['bits_per_byte']:.4f}"
        lines.append(f"| {row['arm']} | {row['best_lr']:g}{edge} | {len(row['seeds'])} | {row['mean']:.4f} ± "
                     f"{row['std']:.4f} | {diff} | {p} | {bpb} | {row['train_seconds']:.0f} |")
    lines += ["", "± is the standard deviation over seeds; * marks p < 0.05. `(edge)`: the best learning rate is at "
              "the edge of the grid, so a better one may lie outside it.", "",
              "![loss curves](curves.png)", "", "![learning rates](lr.png)", ""]
    wsd_rows = [(row["arm"], p) for row in summary["arms"] for p in row["wsd"]]
    if wsd_rows:
        lines += ["WSD: decays launched from stable-phase checkpoints (validation loss in the stable phase at the "
                  "launch step, and after that decay; gaps to the baseline arm):", "",
                  "| arm | launch step | stable | gap | after decay | gap |", "|---|---|---|---|---|---|"]
        lines += [f"| {arm} | {p['decay_from']} | {p['stable']:.4f} | {p.get('stable_gap', 0):+.4f} | "
                  f"{p['decayed']:.4f} | {p.get('decayed_gap', 0):+.4f} |" for arm, p in wsd_rows]
        lines.append("")
    scaling = summary["scaling"]
    if scaling["estimable"]:
        ratios = scaling["tokens_per_parameter"]
        lines += ["Compute-efficiency multipliers: the baseline's compute to reach the strategy's final loss at its "
                  "largest size, over the strategy's compute (fits of L(C) = a·C^-b + c over sizes); interval: "
                  f"16th-84th percentile of {scaling['bootstrap']} paired resamples of the {scaling['seeds']} seeds. "
                  "Training tokens per parameter: " + ", ".join(f"{r:.2g} ({size})" for size, r in ratios.items())
                  + " (the paper: about 100); far below that, a larger model need not reach a lower loss, so the "
                  "fit describes this ladder rather than a compute-optimal frontier.", ""]
        for name, m in scaling["multipliers"].items():
            value = "undefined (the baseline's fit never reaches that loss)" if m["value"] is None else \
                f"{m['value']:.2f}x"
            interval = "" if m["low"] is None else f" [{m['low']:.2f}, {m['high']:.2f}]"
            lines.append(f"- {name}: {value}{interval} ({m['defined']}/{scaling['bootstrap']} resamples defined)")
    else:
        lines += [f"Scaling fit: not estimable here ({scaling['reason']})."]
    write_text_atomic(out / "report.md", "\n".join(lines) + "\n")
    return summary


def _plots(out: Path, summary: dict) -> None:
    """One panel per setting (size, optimizer, schedule), one colour per strategy across panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[str, list[dict]] = {}
    for row in summary["arms"]:
        panels.setdefault(row["arm"].split("/", 1)[1], []).append(row)
    strategies = list(dict.fromkeys(row["arm"].split("/", 1)[0] for row in summary["arms"]))
    # the default cycle repeats after 10 colours; suites like `improvements` have more strategies
    palette = plt.get_cmap("tab10" if len(strategies) <= 10 else "tab20").colors
    colour = {name: palette[i % len(palette)] for i, name in enumerate(strategies)}
    columns = min(4, len(panels))
    rows = -(-len(panels) // columns)

    def draw(name: str, title: str, plot, **axes) -> None:
        fig, grid = plt.subplots(rows, columns, figsize=(7 if columns == 1 else 3.2 * columns, 4 if rows == 1
                                 else 2.6 * rows), squeeze=False)
        for ax, (setting, arms) in zip(grid.flat, panels.items()):
            for row in arms:
                plot(ax, row, colour[row["arm"].split("/", 1)[0]])
            ax.set(title=setting if len(panels) > 1 else title, **axes)
            ax.title.set_fontsize(8)
        for ax in list(grid.flat)[len(panels):]:
            ax.set_visible(False)
        handles = [plt.Line2D([], [], color=colour[s], label=s) for s in strategies]
        grid.flat[0].legend(handles=handles, fontsize=7)
        fig.suptitle(title if len(panels) > 1 else "")
        fig.tight_layout()
        write_atomic(out / name, lambda path: fig.savefig(path, dpi=100, format="png"))
        plt.close(fig)

    def curve(ax, row, c) -> None:
        tokens, losses = zip(*row["curve"][1:] or row["curve"])
        ax.plot([t / 1e6 for t in tokens], losses, color=c)

    def lr_curve(ax, row, c) -> None:
        lrs = sorted(row["lr_curve"], key=float)
        ax.plot([float(lr) for lr in lrs], [row["lr_curve"][lr] for lr in lrs], marker="o", color=c)

    draw("curves.png", summary["suite"], curve, xlabel="training tokens (M)", ylabel="validation loss (seed mean)")
    draw("lr.png", "LR sensitivity", lr_curve, xscale="log", xlabel="learning rate",
         ylabel="final validation loss (one seed)")

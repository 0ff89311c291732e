"""`scalevec report DIR`: a sweep's table (mean ± std over seeds, paired difference to the baseline
with a t-test), learning-rate curves, loss curves, loss against wall clock, and for a size ladder
a fit of loss against compute with the compute-efficiency multiplier of each strategy (with the
suite's `compute_fit`: of one arm over its baseline at matched loss, with 95% bootstrap intervals
and the reason when the fit is degenerate; `compute_fit()`)."""

from __future__ import annotations

import json
import statistics
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import load_config
from ..data.references import bits_per_byte
from ..outputs import write_atomic, write_text_atomic
from .stats import VERDICT_RULE, holm, paired, verdict
from .sweep import (
    CONTROL,
    Arm,
    Suite,
    non_embedding_parameters,
    overrides,
    read_record,
    read_suite,
    split_size,
    tried_lrs,
)

MIN_SIZES_FOR_FIT = 5
BOOTSTRAP = 200  # seed resamples for the multiplier's interval
MIN_EXPONENT, MAX_EXPONENT = 0.01, 2.0  # outside: the fit is degenerate (e.g. an exponent of 20), not reported
TARGET_EFFECT = 0.02  # nats: the difference the seed count is planned to detect (power is reported for it)
FIT_DRAWS = 1000  # bootstrap draws of the compute fit's interval
PAPER_MULTIPLIER = (1.22, 1.25)  # the paper's compute multiplier of unified over the standard model
ERRATIC_NATS = 0.1  # a seed this far from the mean of its arm's other seeds is flagged (the ladders' replacement rule)


@dataclass
class Run:
    val_loss: float
    curve: list[tuple[int, float]]
    train_seconds: float
    tokens: int
    val_bpb: float | None
    by_source: dict[str, float]
    ood: dict[str, float]  # out-of-domain loss per source (suites with an ood_source)
    device: str  # where it trained (records before 0.2: all cpu); runs are paired on one device only


def read_run(results: Path, arm: Arm, lr: float, seed: int, decay_from: int = 0) -> Run | None:
    record = read_record(results, arm, lr, seed, decay_from)
    if record is None:
        return None
    final = record["final"]
    return Run(final["val_loss"], [(r["tokens"], r["val_loss"]) for r in record["curve"]], record["train_seconds"],
               final["tokens"], final.get("val_bpb"), final.get("val_loss_by_source", {}), record.get("ood", {}),
               record.get("device", "cpu"))


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def analyse(results: Path) -> dict:
    """Everything the report shows, from `suite.json` and the run records under `results`."""
    from scipy import stats

    suite = read_suite(results, "report")
    arms = {}
    for arm in suite.arms():
        finished = tried_lrs(results, suite, arm)
        if not finished:
            continue
        best = min(finished, key=finished.get)
        grid = sorted(finished)
        seeds = {s: read_run(results, arm, best, s) for s in suite.seeds_for(arm.size)}
        seeds = {s: run for s, run in seeds.items() if run is not None}
        if not seeds:
            continue
        mean, std = _mean_std([r.val_loss for r in seeds.values()])
        bpb = [r.val_bpb for r in seeds.values() if r.val_bpb is not None]
        arms[arm] = {"arm": arm.path, "best_lr": best, "best_lr_at_edge": len(grid) > 1 and best in (grid[0], grid[-1]),
                     "lr_curve": {str(lr): finished[lr] for lr in grid},
                     "seeds": {str(s): r.val_loss for s, r in seeds.items()}, "mean": mean, "std": std,
                     "bits_per_byte": statistics.mean(bpb) if bpb else None,
                     "train_seconds": statistics.mean(r.train_seconds for r in seeds.values()),
                     "tokens": next(iter(seeds.values())).tokens,
                     "curves": {str(s): r.curve for s, r in seeds.items()},
                     "curve": _mean_curve([r.curve for r in seeds.values()]),
                     "by_source": {name: statistics.mean(r.by_source[name] for r in seeds.values())
                                   for name in next(iter(seeds.values())).by_source}}
        arms[arm]["devices"] = {str(s): r.device for s, r in seeds.items()}
        if suite.ood_source:
            arms[arm]["ood"] = {str(s): r.ood[suite.ood_source] for s, r in seeds.items() if suite.ood_source in r.ood}
    for arm, row in arms.items():
        row["wsd"] = wsd_study(results, suite, arm, row)
    for arm, row in arms.items():
        base = arms.get(Arm(suite.baseline, arm.size, arm.optimizer, arm.schedule))
        for point, base_point in zip(row["wsd"], base["wsd"] if base else []):
            point["stable_gap"] = point["stable"] - base_point["stable"]
            point["decayed_gap"] = point["decayed"] - base_point["decayed"]
        common = sorted(_paired(row, base)) if base else []
        diffs = [row["seeds"][s] - base["seeds"][s] for s in common]
        row["paired_seeds"] = len(diffs)
        row["diff_mean"], row["diff_std"] = _mean_std(diffs) if diffs else (None, None)
        row["p_value"] = None
        if len(diffs) >= 2 and arm.strategy != suite.baseline:
            row["p_value"] = float(stats.ttest_rel([row["seeds"][s] for s in common],
                                                   [base["seeds"][s] for s in common]).pvalue)
    records = _all_records(results)
    cpu_seconds = [r["wall_seconds"] * r["config"]["train"]["threads"] for r in records if r.get("wall_seconds")]
    found = analyses(suite, arms)
    return {"suite": suite.name, "description": suite.description, "baseline": suite.baseline, "scale": suite.scale,
            "cpu_hours": suite.cpu_hours, "steps": {arm.size: suite.steps(arm) for arm in suite.arms()},
            "runs_recorded": len(records),
            "seeds_planned": len(suite.seeds), "arms_pending": [a.path for a in suite.arms() if a not in arms],
            **({"seeds_planned_by_size": {size: len(suite.seeds_for(size)) for size in suite.sizes}}
               if suite.seeds_by_size else {}),
            "cpu_hours_measured": sum(cpu_seconds) / 3600 if cpu_seconds else None,
            **({"ood_source": suite.ood_source, "ood_tokens": suite.ood_tokens} if suite.ood_source else {}),
            **study_facts(results, suite, arms), "erratic_seeds": erratic_seeds(arms),
            "analyses": found, "trends": trends(suite, arms, found),
            "arms": [{k: v for k, v in row.items() if k not in ("curves", "devices")} for row in arms.values()],
            **({"compute_fit": compute_fit(suite, arms)} if suite.compute_fit else
               {} if any(split_size(size)[1] for size in suite.sizes) else {"scaling": scaling_fit(suite, arms)})}


def erratic_seeds(arms: dict) -> list[dict]:
    """Seeds more than ERRATIC_NATS from the mean of their arm's other seeds (a ladder replaces a size whose
    baseline has one before reading its verdicts)."""
    flagged = []
    for row in arms.values():
        for seed, loss in row["seeds"].items():
            others = [other for s, other in row["seeds"].items() if s != seed]
            if others and abs(loss - statistics.mean(others)) > ERRATIC_NATS:
                flagged.append({"arm": row["arm"], "seed": int(seed), "gap": loss - statistics.mean(others)})
    return flagged


def trends(suite: Suite, arms: dict, found: list[dict]) -> list[dict]:
    """Whether a gap grows: per family and arm over 3 or more settings of one optimizer-schedule (a size ladder or
    a tokens ladder), the least-squares slope of each paired seed's Δ against log10 of its training FLOPs, with
    its 95% t-interval (scipy's linregress; the seeds of different settings are different runs). Descriptive:
    no verdict rides on it."""
    from scipy import stats

    points: dict[tuple, list[tuple[float, float]]] = {}
    for analysis in found:
        size, schedule = analysis["setting"].split("/")
        optimizer_schedule = schedule.split("-", 1)
        base = arms[Arm(analysis["baseline"], size, *optimizer_schedule)]
        for row in analysis["arms"]:
            key = Arm(row["arm"], size, *optimizer_schedule)
            arm, flops = arms[key], _training_flops(suite, key, arms[key]["tokens"])
            points.setdefault((analysis["name"], row["arm"], analysis["baseline"], schedule), []).extend(
                (np.log10(flops), arm["seeds"][s] - base["seeds"][s]) for s in sorted(_paired(arm, base), key=int))
    out = []
    for (name, arm, baseline, schedule), xy in points.items():
        x, y = np.array([p[0] for p in xy]), np.array([p[1] for p in xy])
        if len(set(x)) < 3 or len(xy) < 4:
            continue
        fit = stats.linregress(x, y)
        half = stats.t.ppf(0.975, len(xy) - 2) * fit.stderr
        low, high = fit.slope - half, fit.slope + half
        out.append({"name": name, "arm": arm, "baseline": baseline, "setting": schedule, "settings": len(set(x)),
                    "n": len(xy), "slope_per_decade": float(fit.slope), "ci95": [float(low), float(high)],
                    "p": float(fit.pvalue), "reading": "the gap grows (Δ falls with compute)" if high < 0 else
                    "the gap shrinks (Δ rises with compute)" if low > 0 else "no trend detected"})
    return out


def _all_records(results: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((results / "records").rglob("*.json"))]


def study_facts(results: Path, suite: Suite, arms: dict) -> dict:
    """What a reader needs to judge the runs: tokens per non-embedding parameter, the count-based references
    on the same validation windows, the validation sources, and how much weight decay acted (Σ lr·wd)."""
    from ..schedule import lr_factor

    facts: dict = {"tokens_per_non_embedding_parameter": {}, "lr_wd_sum": {}}
    for arm, row in arms.items():
        record = read_record(results, arm, row["best_lr"], suite.lr_seed)  # what ran, in its release's meaning
        config = load_config(record["config"], resolved=True) if record else \
            load_config(suite.config, overrides(suite, arm, row["best_lr"], 0))
        if arm.size not in facts["tokens_per_non_embedding_parameter"]:
            facts["tokens_per_non_embedding_parameter"][arm.size] = row["tokens"] / non_embedding_parameters(
                config.model)
        o, steps = config.optim, config.train.steps
        lr_sum = sum(lr_factor(config.schedule, step, steps) for step in range(steps))
        matrix_lr = o.muon_lr if o.name == "muon" else o.lr
        facts["lr_wd_sum"][arm.path] = {"matrices": lr_sum * matrix_lr * o.weight_decay,
                                        "scales": lr_sum * o.lr * o.scale_lr_mult * o.scale_weight_decay,
                                        "embedding": lr_sum * o.lr * o.embedding_lr_mult * o.embedding_weight_decay}
    path = results / "references.json"
    references = json.loads(path.read_text()) if path.is_file() else None
    facts["bigram_val_loss"] = references["bigram"]["loss"] if references else None
    facts["unigram_val_loss"] = references["unigram"]["loss"] if references else None
    facts["references"] = references
    facts["val_sources"] = sorted(references["bigram"]["by_source"]) if references else None
    return facts


def analyses(suite: Suite, arms: dict) -> list[dict]:
    """Each analysis of the suite (a family of claims, arm against baseline) in each setting (size, optimizer,
    schedule): paired Δ with intervals, Holm over the family, verdict, power, and Δ over training."""
    families = suite.analyses or [{"name": "all", "baseline": suite.baseline, "claim": suite.description,
                                   "arms": {s: None for s in suite.strategies if s != suite.baseline}}]
    settings = dict.fromkeys((a.size, a.optimizer, a.schedule) for a in arms)
    out = []
    for family in families:
        for size, optimizer, schedule in settings:
            base = arms.get(Arm(family["baseline"], size, optimizer, schedule))
            if base is None or f"{optimizer}-{schedule}" not in family.get("settings", [f"{optimizer}-{schedule}"]):
                continue
            members = {name: expected for name, expected in family["arms"].items()
                       if Arm(name, size, optimizer, schedule) in arms}
            rows = []
            for name, expected in members.items():
                row = arms[Arm(name, size, optimizer, schedule)]
                common = sorted(_paired(row, base), key=int)
                if not common:
                    continue
                result = paired([row["seeds"][s] - base["seeds"][s] for s in common], len(members), TARGET_EFFECT)
                rows.append({"arm": name, "expected": None if expected == CONTROL else expected, **result,
                             **(_ood_delta(row, base, len(members)) if suite.ood_source else {}),
                             "delta_curve": _delta_curve(row["curves"], base["curves"], common)})
            for row, adjusted in zip(rows, holm([r["p"] for r in rows])):
                row["p_holm"] = adjusted
                row["verdict"] = verdict(row, row["expected"])
            out.append({"name": family["name"], "claim": family.get("claim", ""), "baseline": family["baseline"],
                        "setting": f"{size}/{optimizer}-{schedule}", "baseline_mean": base["mean"], "arms": rows})
    return out


def _paired(row: dict, base: dict) -> set[str]:
    """The seeds both arms ran, on the same device (a GPU's bf16 run is never paired with a CPU's fp32 one)."""
    return {s for s in set(row["seeds"]) & set(base["seeds"]) if row["devices"][s] == base["devices"][s]}


def _ood_delta(row: dict, base: dict, family: int) -> dict:
    """The paired Δ out of domain (the suite's ood_source) over the seeds both arms have a score for."""
    common = sorted((s for s in _paired(row, base) if s in row["ood"] and s in base["ood"]), key=int)
    if not common:
        return {"ood_n": 0, "ood_delta": None, "ood_ci95": None}
    result = paired([row["ood"][s] - base["ood"][s] for s in common], family, TARGET_EFFECT)
    return {"ood_n": result["n"], "ood_delta": result["delta"], "ood_ci95": result["ci95"]}


def _delta_curve(curves: dict, base: dict, seeds: list[str]) -> list[dict]:
    """Paired Δ of validation loss at each evaluation, with its 95% interval over seeds."""
    length = min(min(len(curves[s]), len(base[s])) for s in seeds)
    points = []
    for i in range(length):
        result = paired([curves[s][i][1] - base[s][i][1] for s in seeds], 1, TARGET_EFFECT)
        points.append({"tokens": curves[seeds[0]][i][0], "delta": result["delta"], "ci95": result["ci95"]})
    return points


def wsd_study(results: Path, suite: Suite, arm: Arm, row: dict) -> list[dict]:
    """Per decay point: validation loss in the stable phase there, and after the decay launched from it."""
    points = []
    for point in suite.decay_points(arm):
        stable, decayed = [], []
        for seed in row["seeds"]:
            main = read_run(results, arm, row["best_lr"], int(seed))
            branch = read_run(results, arm, row["best_lr"], int(seed), point)
            if main is None or branch is None:
                continue
            at = main.tokens * point / suite.steps(arm)
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
    """L(C) = a·(C/C0)^(−b) + floor through (compute, loss) points (scipy's curve_fit, C over the smallest C0);
    (a, b, floor, C0), or the reason there is none."""
    from scipy.optimize import OptimizeWarning, curve_fit

    c, loss = np.array([p[0] for p in points]), np.array([p[1] for p in points])
    try:
        with warnings.catch_warnings():  # 3 parameters from 5 points: no covariance is expected
            warnings.simplefilter("ignore", OptimizeWarning)
            fitted = curve_fit(lambda x, a, b, floor: a * np.power(x, -b) + floor, c / c.min(), loss,
                               p0=(1.0, 0.3, loss.min() * 0.9), maxfev=20000)[0]
    except RuntimeError:  # no convergence
        return "curve_fit did not converge"
    a, b, floor = fitted
    # degenerate: a multiplier from it would mean nothing
    if not np.all(np.isfinite(fitted)):
        return "curve_fit gave non-finite parameters"
    if not a > 0:
        return f"A = {a:.3g} is not positive"
    if not MIN_EXPONENT <= b <= MAX_EXPONENT:
        return f"alpha = {b:.3g}, " + ("not positive" if b <= 0 else f"outside [{MIN_EXPONENT}, {MAX_EXPONENT}]")
    return (*fitted, c.min())


def _law(fit: tuple, compute: float) -> float:
    a, b, floor, c0 = fit
    return float(a * (compute / c0) ** -b + floor)


def _compute_to_reach(fit: tuple, loss: float) -> float | None:
    """The compute at which a fitted law reaches `loss` (None: at or below its floor, never)."""
    a, b, floor, c0 = fit
    return float(c0 * ((loss - floor) / a) ** (-1 / b)) if loss > floor else None


def _multiplier(base, points: list[tuple[float, float]]) -> float | None:
    """Baseline compute to reach the strategy's loss at its largest size, over the strategy's compute there."""
    if not isinstance(base, tuple):
        return None
    compute, loss = max(points)
    reached = _compute_to_reach(base, loss)
    return None if reached is None else reached / compute


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
    groups: dict[tuple, list] = {}
    tokens_per_parameter = {}  # how far from compute-optimal the ladder trains, for the report to say
    for arm, row in arms.items():
        config = load_config(suite.config, overrides(suite, arm, suite.lrs_for(arm)[0], 0))
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


def compute_fit(suite: Suite, arms: dict) -> dict:
    """The suite's `compute_fit` (a baseline and an arm), per optimizer-schedule setting: final loss against
    training FLOPs (summary.flops_per_token at train.seq_len, times the tokens trained) at the sizes trained on one
    length (the length most sizes share), seed means over each size's paired seeds; per arm a fit of
    L(C) = E + A·C^-alpha (scipy's curve_fit, C over the smallest C); at each size the compute multiplier, the
    baseline's compute to reach the arm's fitted loss over the arm's compute, given at the largest size and as the
    geometric mean over sizes, each with a 95% interval from FIT_DRAWS bootstrap draws (each size's paired seeds
    resampled with replacement, both arms refitted; seeded). A degenerate fit gives its reason, not a number."""
    names = (suite.compute_fit["baseline"], suite.compute_fit["arm"])
    settings = dict.fromkeys((arm.optimizer, arm.schedule) for arm in arms)
    return {**suite.compute_fit, "paper": list(PAPER_MULTIPLIER), "draws": FIT_DRAWS, "method": "curve_fit",
            "settings": {f"{o}-{s}": _compute_fit_setting(suite, arms, names, o, s) for o, s in settings}}


def _training_flops(suite: Suite, arm: Arm, tokens: int) -> float:
    import torch

    from ..model import Decoder
    from ..summary import flops_per_token

    config = load_config(suite.config, overrides(suite, arm, suite.lrs_for(arm)[0], 0))
    with torch.device("meta"):
        model = Decoder(config.model, config.strategy, config.moe)
    return float(flops_per_token(model, config.train.seq_len) * tokens)


def _compute_fit_setting(suite: Suite, arms: dict, names: tuple[str, str], optimizer: str, schedule: str) -> dict:
    paired_rows = {}  # size -> the baseline's row, the arm's row, their paired seeds
    for size in suite.sizes:
        base, row = (arms.get(Arm(name, size, optimizer, schedule)) for name in names)
        seeds = sorted(_paired(row, base), key=int) if base and row else []
        if seeds:
            paired_rows[size] = base, row, seeds
    lengths: dict[float, list[str]] = {}
    for size in paired_rows:
        lengths.setdefault(suite.tokens_per_parameter_of(size), []).append(size)
    length, sizes = max(lengths.items(), key=lambda item: len(item[1])) if lengths else (0.0, [])
    compute = {(name, size): _training_flops(suite, Arm(name, size, optimizer, schedule),
                                             paired_rows[size][i]["tokens"]) for size in sizes
               for i, name in enumerate(names)}
    sizes.sort(key=lambda size: compute[names[0], size])

    def points(draw: dict[str, list[str]]) -> dict[str, list[tuple[float, float, str]]]:
        return {name: [(compute[name, size], statistics.mean(paired_rows[size][i]["seeds"][s] for s in draw[size]),
                        size) for size in sizes] for i, name in enumerate(names)}

    seeds = {size: paired_rows[size][2] for size in sizes}
    result: dict = {"tokens_per_parameter": length or None, "sizes": {size: {"seeds": len(seeds[size])}
                                                                      for size in sizes}}
    for name, means in points(seeds).items():
        for c, loss, size in means:
            result["sizes"][size][name] = {"compute": c, "loss": loss}
    if len(sizes) < MIN_SIZES_FOR_FIT:
        at = f" at {length:g} tokens per parameter" if length else ""
        return {**result, "estimable": False, "reason": f"{len(sizes)} size(s) with both arms{at}; a compute fit "
                                                         f"needs at least {MIN_SIZES_FOR_FIT}"}
    estimate = _fit_multipliers(points(seeds), names)
    if isinstance(estimate, str):
        return {**result, "estimable": False, "reason": estimate}
    rng = np.random.default_rng(0)
    draws = [_fit_multipliers(points({size: [s[i] for i in rng.integers(len(s), size=len(s))]
                                      for size, s in seeds.items()}), names) for _ in range(FIT_DRAWS)]
    draws = [d for d in draws if isinstance(d, dict)]
    for size, multiplier in estimate["multipliers"].items():
        result["sizes"][size]["multiplier"] = multiplier
    interval = {key: [float(q) for q in np.percentile([d[key] for d in draws], [2.5, 97.5])] if draws else None
                for key in ("largest", "geomean")}
    return {**result, "estimable": True, "fits": estimate["fits"], "defined": len(draws),
            "largest": {"size": sizes[-1], "value": estimate["largest"], "ci95": interval["largest"],
                        "verdict": fit_verdict(interval["largest"])},
            "geomean": {"value": estimate["geomean"], "ci95": interval["geomean"],
                        "verdict": fit_verdict(interval["geomean"])}}


def fit_verdict(ci95: list[float] | None) -> str:
    """The ladder's rule for a multiplier's 95% interval against the paper's 1.22-1.25x: `consistent` if they
    overlap, `contradicts` if the interval lies wholly below or wholly above, `inconclusive` without one."""
    if ci95 is None:
        return "inconclusive"
    low, high = PAPER_MULTIPLIER
    return "contradicts" if ci95[1] < low or ci95[0] > high else "consistent"


def _fit_multipliers(points: dict[str, list[tuple[float, float, str]]], names: tuple[str, str]) -> dict | str:
    """Both arms' laws and the multiplier at each of the arm's sizes, or why there is none."""
    fits = {}
    for name in names:
        for (_, low, small), (_, high, large) in zip(points[name], points[name][1:]):
            if high >= low:
                return f"{name}'s loss does not fall with compute from {small} to {large} ({low:.4f} to {high:.4f})"
        fit = _fit_law([(c, loss) for c, loss, _ in points[name]])
        if isinstance(fit, str):
            return f"{name}: {fit}"
        fits[name] = fit
    base, arm = names
    multipliers = {}
    for compute, _, size in points[arm]:
        loss = _law(fits[arm], compute)
        reached = _compute_to_reach(fits[base], loss)
        if reached is None:
            return (f"at {size} {arm}'s fitted loss {loss:.4f} is below {base}'s fitted floor E = "
                    f"{fits[base][2]:.4f}, which the baseline never reaches")
        multipliers[size] = reached / compute
    return {"fits": {name: dict(zip(("A", "alpha", "E", "C0"), map(float, fit))) for name, fit in fits.items()},
            "multipliers": multipliers, "largest": multipliers[points[arm][-1][2]],
            "geomean": float(np.exp(np.mean(np.log(list(multipliers.values())))))}


def _steps_text(steps: dict[str, int]) -> str:
    if len(set(steps.values())) == 1:
        return f"{next(iter(steps.values()))} steps per run"
    return "Steps per run: " + ", ".join(f"{n} ({size})" for size, n in steps.items())


def write_report(out: Path) -> dict:
    summary = analyse(out)
    _plots(out, summary)
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    lines = [f"# Suite `{summary['suite']}` ({summary['scale']} scale)", "", summary["description"], "",
             f"{_steps_text(summary['steps'])}; each arm at its own best learning rate (swept with the LR seed), then "
             f"paired seeds at that rate. Runs recorded: {summary['runs_recorded']}"
             + (f", {summary['cpu_hours_measured']:.2f} CPU-hours measured" if summary["cpu_hours_measured"] else "")
             + f" (declared budget {summary['cpu_hours']} CPU-hours).", ""]
    if summary.get("arms_pending"):
        lines += [f"**Interim**: no test seed recorded yet for {', '.join(summary['arms_pending'])}; the sweep has "
                  "not finished, and the analyses below leave those arms out.", ""]
    lines += _facts_lines(summary)
    lines += ["| arm | best lr | seeds | final val loss | Δ vs baseline (paired) | p (paired t) | bits/byte "
              "| train s |", "|---|---|---|---|---|---|---|---|"]
    for row in summary["arms"]:
        edge = " (edge)" if row["best_lr_at_edge"] else ""
        diff = "—" if row["diff_mean"] is None or row["arm"].startswith(summary["baseline"] + "/") else \
            f"{row['diff_mean']:+.4f} ± {row['diff_std']:.4f}"
        p = "—" if row["p_value"] is None else f"{row['p_value']:.3f}{' *' if row['p_value'] < 0.05 else ''}"
        bpb = "—" if row["bits_per_byte"] is None else f"{row['bits_per_byte']:.4f}"
        lines.append(f"| {row['arm']} | {row['best_lr']:g}{edge} | {_seeds(len(row['seeds']), summary, row['arm'])} | "
                     f"{row['mean']:.4f} ± "
                     f"{row['std']:.4f} | {diff} | {p} | {bpb} | {row['train_seconds']:.0f} |")
    lines += ["", "± is the standard deviation over seeds; * marks p < 0.05 (uncorrected). `(edge)`: the best learning "
              "rate is at the edge of the grid, so a better one may lie outside it.", ""]
    lines += _source_lines(summary)
    lines += _analysis_lines(summary)
    lines += ["![loss curves](curves.png)", "", "![learning rates](lr.png)", ""]
    wsd_rows = [(row["arm"], p) for row in summary["arms"] for p in row["wsd"]]
    if wsd_rows:
        lines += ["WSD: decays launched from stable-phase checkpoints (validation loss in the stable phase at the "
                  "launch step, and after that decay; gaps to the baseline arm):", "",
                  "| arm | launch step | stable | gap | after decay | gap |", "|---|---|---|---|---|---|"]
        lines += [f"| {arm} | {p['decay_from']} | {p['stable']:.4f} | {p.get('stable_gap', 0):+.4f} | "
                  f"{p['decayed']:.4f} | {p.get('decayed_gap', 0):+.4f} |" for arm, p in wsd_rows]
        lines.append("")
    lines += _trend_lines(summary["trends"])
    scaling = summary.get("scaling")
    if "compute_fit" in summary:
        lines += _compute_fit_lines(summary["compute_fit"])
    elif scaling is None:
        pass  # a tokens ladder: one size at several lengths, nothing to fit across sizes
    elif scaling["estimable"]:
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


def _trend_lines(found: list[dict]) -> list[str]:
    if not found:
        return []
    lines = ["## Does the gap grow with compute?", "",
             "Per family and arm, the slope of each paired seed's Δ against log10 of its training FLOPs (over "
             "sizes in a size ladder, over training lengths in a tokens ladder), with its 95% t-interval. Negative: "
             "the arm's advantage grows with compute. Descriptive; no verdict rides on it.", "",
             "| family | arm − baseline | setting | settings | seeds | slope per 10x compute | 95% interval | p | "
             "reading |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {t['name']} | {t['arm']} − {t['baseline']} | {t['setting']} | {t['settings']} | {t['n']} | "
              f"{t['slope_per_decade']:+.4f} | {_interval(t['ci95'])} | {t['p']:.3g} | {t['reading']} |"
              for t in found]
    return [*lines, ""]


def _compute_fit_lines(fit: dict) -> list[str]:
    base, arm = fit["baseline"], fit["arm"]
    paper = "-".join(f"{m:.2f}" for m in fit["paper"])

    def times(value: float, ci: list[float] | None) -> str:
        return f"{value:.2f}x" + ("" if ci is None else f" [{ci[0]:.2f}, {ci[1]:.2f}]")

    lines = [f"## Compute fit: {arm} over {base}", "",
             "Final validation loss against training compute C (FLOPs per token × tokens trained; seed means over each "
             "size's paired seeds) at the sizes trained on one length, per arm a fit of L(C) = E + A·(C/C0)^-α "
             f"(scipy's curve_fit); the multiplier at a size is the compute {base} needs to reach {arm}'s fitted loss "
             f"there, over {arm}'s compute. 95% intervals: 2.5-97.5 percentiles of {fit['draws']} bootstrap draws "
             f"(each size's paired seeds resampled with replacement, both arms refitted). The paper: {paper}x.", ""]
    for setting, result in fit["settings"].items():
        length = result["tokens_per_parameter"]
        lines += [f"{setting}" + (f", {length:g} tokens per non-embedding parameter" if length else "") + ":", "",
                  f"| size | seeds | {base} FLOPs | {base} loss | {arm} FLOPs | {arm} loss | multiplier |",
                  "|---|---|---|---|---|---|---|"]
        for size, row in result["sizes"].items():
            lines.append(f"| {size} | {row['seeds']} | {row[base]['compute']:.3g} | {row[base]['loss']:.4f} | "
                         f"{row[arm]['compute']:.3g} | {row[arm]['loss']:.4f} | "
                         f"{_number(row.get('multiplier'), '.3f')} |")
        lines.append("")
        if result["estimable"]:
            largest, geomean = result["largest"], result["geomean"]
            laws = "; ".join(f"{name}: E = {f['E']:.4f}, A = {f['A']:.4f}, α = {f['alpha']:.3f}"
                             for name, f in result["fits"].items())
            lines += [f"**{arm} over {base}: {times(largest['value'], largest['ci95'])} at {largest['size']} "
                      f"({largest['verdict']}), {times(geomean['value'], geomean['ci95'])} as the geometric mean "
                      f"over sizes ({geomean['verdict']})** "
                      f"({result['defined']} of {fit['draws']} draws gave a fit); the paper: {paper}x. Fits: "
                      f"{laws}. Verdicts: `consistent` if the 95% interval overlaps the paper's range, "
                      "`contradicts` if it lies wholly outside it.", ""]
        else:
            lines += [f"No compute multiplier: {result['reason']}.", ""]
    return [*lines, "![loss against compute](compute.png)", ""]


def _facts_lines(summary: dict) -> list[str]:
    lines = []
    ratios = summary["tokens_per_non_embedding_parameter"]
    if ratios:
        lines.append("Training tokens per non-embedding parameter: " + ", ".join(f"{r:.1f} ({size})"
                                                                                for size, r in ratios.items()) + ".")
    if summary["bigram_val_loss"] is not None:
        lines.append(f"Count-based references on the same validation windows ({', '.join(summary['val_sources'])}): "
                     f"unigram {summary['unigram_val_loss']:.4f}, bigram {summary['bigram_val_loss']:.4f} nats per "
                     "token (tables of the training split).")
        above = [f"{row['arm']} seed {seed}" for row in summary["arms"] for seed, loss in row["seeds"].items()
                 if loss >= summary["bigram_val_loss"]]
        lines.append("Every run is below the bigram reference." if not above else
                     f"Not below the bigram reference: {', '.join(above)}; differences there say little.")
    erratic = summary.get("erratic_seeds", [])
    if erratic:
        lines.append(f"Erratic seeds (more than {ERRATIC_NATS} nats from the mean of their arm's other seeds): "
                     + ", ".join(f"{e['arm']} seed {e['seed']} ({e['gap']:+.3f})" for e in erratic) + ".")
    sums = summary["lr_wd_sum"]
    if sums:
        scales = [v["scales"] for v in sums.values()]
        lines.append(f"Weight decay that can act, Σ lr·wd over a run at each arm's best LR, on the parameters a policy "
                     f"decays (which scales: the strategy's scale_decay): scales {min(scales):.2f}-"
                     f"{max(scales):.2f}, matrices {min(v['matrices'] for v in sums.values()):.2f}-"
                     f"{max(v['matrices'] for v in sums.values()):.2f} (an undriven parameter shrinks by 1 − e^-Σ).")
    return [*lines, ""] if lines else []


def _source_lines(summary: dict) -> list[str]:
    """Final validation loss per source (seed mean), in nats per token and bits per byte, beside the bigram."""
    references = summary["references"]
    sources = sorted({name for row in summary["arms"] for name in row["by_source"]})
    if not sources or not references:
        return []
    sizes = {s["name"]: s for s in references.get("val_split", [])}

    def cell(loss: float | None, name: str) -> str:
        if loss is None:
            return "—"
        size = sizes.get(name)
        return f"{loss:.3f}" + (f" ({bits_per_byte(loss, size['tokens'], size['bytes']):.3f})" if size else "")

    lines = ["Per source (nats per token, and bits per byte in brackets; seed means):", "",
             "| arm | " + " | ".join(sources) + " |", "|---|" + "---|" * len(sources)]
    for row in [*summary["arms"], {"arm": "bigram (count-based)", "by_source": references["bigram"]["by_source"]}]:
        lines.append(f"| {row['arm']} | " + " | ".join(cell(row["by_source"].get(s), s) for s in sources) + " |")
    return [*lines, ""]


def _interval(ci: list[float] | None) -> str:
    return "—" if ci is None else f"[{ci[0]:+.4f}, {ci[1]:+.4f}]"


def _number(value, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def _planned(summary: dict, setting: str) -> int:
    """Test seeds planned at a setting's ("size/..." or "strategy/size/...") size."""
    by_size = summary.get("seeds_planned_by_size", {})
    size = next((part for part in setting.split("/") if part in by_size), None)
    return by_size[size] if size else summary.get("seeds_planned", 0)


def _seeds(n: int, summary: dict, setting: str) -> str:
    """A seed count, with the planned one beside it while the sweep has not run them all."""
    planned = _planned(summary, setting)
    return f"{n} of {planned}" if planned and n < planned else str(n)


def _analysis_lines(summary: dict) -> list[str]:
    lines = []
    for analysis in summary["analyses"]:
        if not analysis["arms"]:
            continue
        lines += [f"## {analysis['name']} ({analysis['setting']}, baseline `{analysis['baseline']}` "
                  f"{analysis['baseline_mean']:.4f})", "", analysis["claim"], ""]
        if any(row["n"] < _planned(summary, analysis["setting"]) for row in analysis["arms"]):
            lines += ["**Interim**: the test seeds are still running, so these verdicts and intervals are not the "
                      "study's; the rule applies to the planned seeds.", ""]
        ood = "ood_source" in summary
        lines += ["| arm | seeds | Δ | 95% interval | p | p (Holm) | paper | verdict | power at 0.02 | MDE (80%) |"
                  + (" Δ out of domain | its 95% interval |" if ood else ""),
                  "|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if ood else "")]
        for row in analysis["arms"]:
            lines.append(f"| {row['arm']} | {_seeds(row['n'], summary, analysis['setting'])} | {row['delta']:+.4f} "
                         f"| {_interval(row['ci95'])} | {_number(row['p'], '.3g')} "
                         f"| {_number(row['p_holm'], '.3g')} | {_number(row['expected'], '+.3f')} | {row['verdict']} | "
                         f"{_number(row['power'], '.2f')} | {_number(row['mde'], '.4f')} |"
                         + (f" {_number(row['ood_delta'], '+.4f')} | {_interval(row['ood_ci95'])} |" if ood else ""))
        lines.append("")
    if lines:
        lines += [VERDICT_RULE, ""]
        if "ood_source" in summary:
            lines += [f"Out of domain: every final model scored on {summary['ood_tokens']:,} tokens of "
                      f"`{summary['ood_source']}` (a bundled source outside the training mix, evenly spaced "
                      "windows), paired over the same seeds; the verdicts are the in-domain ones.", ""]
        lines += ["![gap over training](gap.png)", ""]
    return lines


def _plots(out: Path, summary: dict) -> None:
    """One panel per setting (size, optimizer, schedule), one colour per strategy across panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not summary["arms"]:
        return
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
    if "compute_fit" in summary:
        _compute_plot(out, summary["compute_fit"], colour, plt)
    families: dict[str, list[dict]] = {}  # one row of panels per family, one panel per setting
    for analysis in summary["analyses"]:
        if any(row["delta_curve"] for row in analysis["arms"]):
            families.setdefault(analysis["name"], []).append(analysis)
    if families:
        columns = max(len(settings) for settings in families.values())
        fig, grid = plt.subplots(len(families), columns, figsize=(4.2 * columns, 3.4 * len(families)), squeeze=False)
        for ax in grid.flat:
            ax.set_visible(False)
        for ax, analysis in ((grid[i, j], analysis) for i, settings in enumerate(families.values())
                             for j, analysis in enumerate(settings)):
            ax.set_visible(True)
            for row in analysis["arms"]:
                points = row["delta_curve"][1:]  # step 0 is identical in a pair only if the init is
                if not points:
                    continue
                tokens = [p["tokens"] / 1e6 for p in points]
                line = ax.plot(tokens, [p["delta"] for p in points], label=row["arm"],
                               color=colour.get(row["arm"]))[0]
                if all(p["ci95"] for p in points):
                    ax.fill_between(tokens, [p["ci95"][0] for p in points], [p["ci95"][1] for p in points],
                                    color=line.get_color(), alpha=0.15)
            ax.axhline(0, color="black", linewidth=0.8)
            ax.set(title=f"{analysis['name']} ({analysis['setting']})", xlabel="training tokens (M)",
                   ylabel=f"Δ val loss vs {analysis['baseline']}")
            ax.title.set_fontsize(8)
            ax.legend(fontsize=6)
        fig.tight_layout()
        write_atomic(out / "gap.png", lambda path: fig.savefig(path, dpi=100, format="png"))
        plt.close(fig)


def _compute_plot(out: Path, fit: dict, colour: dict, plt) -> None:
    """compute.png: each arm's seed-mean final loss against training FLOPs (log x), with its fitted law."""
    settings = fit["settings"]
    fig, grid = plt.subplots(1, len(settings), figsize=(5 * len(settings), 3.8), squeeze=False)
    for ax, (setting, result) in zip(grid.flat, settings.items()):
        for name in (fit["baseline"], fit["arm"]):
            compute = [row[name]["compute"] for row in result["sizes"].values()]
            ax.plot(compute, [row[name]["loss"] for row in result["sizes"].values()], "o", color=colour.get(name),
                    label=name)
            law = result.get("fits", {}).get(name)
            if law and compute:
                x = np.geomspace(min(compute), max(compute), 100)
                ax.plot(x, law["A"] * (x / law["C0"]) ** -law["alpha"] + law["E"], color=colour.get(name),
                        linewidth=0.8)
        ax.set(xscale="log", xlabel="training FLOPs", ylabel="final validation loss (seed mean)",
               title=setting if result["estimable"] else f"{setting} (no fit)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    write_atomic(out / "compute.png", lambda path: fig.savefig(path, dpi=100, format="png"))
    plt.close(fig)

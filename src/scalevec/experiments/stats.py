"""Paired comparisons of an arm against its baseline over seeds, and the three-verdict rule.

Every number here is a function of the per-seed differences d_s = loss(arm, s) − loss(baseline, s):

- Δ: their mean; ci95: the two-sided 95% t-interval of that mean; p: the paired t-test of Δ = 0.
- p_holm: Holm's step-down adjustment over the arms of one analysis (one family of claims).
- The verdict compares the interval with 0 and with the effect the paper reports (`expected`):
  `consistent` if Δ differs from 0 (p_holm < 0.05) on the paper's side; `contradicts` if it differs
  from 0 on the other side, or if the family-wise interval (Bonferroni, 1 − 0.05/m) excludes the
  paper's effect; `inconclusive` otherwise: the data cannot tell the paper's effect from none.
- Power: the chance that a true difference of `target` would give p < 0.05/m with these many
  seeds and this spread (noncentral t), and the minimal detectable effect at 80% power.
"""

from __future__ import annotations

import math
import statistics

ALPHA = 0.05
POWER = 0.8


def holm(pvalues: list[float | None]) -> list[float | None]:
    """Holm-adjusted p-values (None stays None and does not count in the family)."""
    ranked = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    adjusted: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(ranked):
        running = max(running, min(1.0, (len(ranked) - rank) * p))
        adjusted[i] = running
    return adjusted


def paired(diffs: list[float], family: int, target: float) -> dict:
    """Δ, its 95% interval and p, the family-wise interval, power and MDE of paired differences."""
    from scipy import stats

    n = len(diffs)
    delta = statistics.mean(diffs)
    if n < 2:
        return {"n": n, "delta": delta, "sd": None, "ci95": None, "ci_family": None, "p": None, "power": None,
                "mde": None}
    sd = statistics.stdev(diffs)
    se = sd / math.sqrt(n)
    t95, t_family = float(stats.t.ppf(1 - ALPHA / 2, n - 1)), float(stats.t.ppf(1 - ALPHA / family / 2, n - 1))
    p = 1.0 if se == 0 and delta == 0 else 0.0 if se == 0 else float(2 * stats.t.sf(abs(delta) / se, n - 1))
    if se == 0:
        power, mde = 1.0, 0.0
    else:
        shift = abs(target) / se
        power = float(stats.nct.sf(t_family, n - 1, shift) + stats.nct.cdf(-t_family, n - 1, shift))
        power = 1.0 if math.isnan(power) else min(1.0, power)  # nct loses precision far in the tail
        mde = float((t_family + stats.t.ppf(POWER, n - 1)) * se)
    return {"n": n, "delta": delta, "sd": sd, "ci95": [delta - t95 * se, delta + t95 * se],
            "ci_family": [delta - t_family * se, delta + t_family * se], "p": p, "power": power, "mde": mde}


def verdict(result: dict, expected: float | None) -> str:
    """`consistent`, `contradicts` or `inconclusive` (module docstring); `control` without a paper effect."""
    if expected is None:
        return "control"
    if result["p_holm"] is None:
        return "inconclusive"
    if result["p_holm"] < ALPHA:
        return "consistent" if math.copysign(1, result["delta"]) == math.copysign(1, expected) else "contradicts"
    low, high = result["ci_family"]
    return "contradicts" if not low <= expected <= high else "inconclusive"


VERDICT_RULE = (
    "Δ is the mean over seeds of the paired difference (arm − baseline; negative = lower loss). "
    "`consistent`: Δ differs from 0 after Holm's correction over the arms of the analysis (p_holm < 0.05) in "
    "the paper's direction; `contradicts`: it differs in the other direction, or the family-wise interval "
    "(Bonferroni, 1 − 0.05/m) excludes the paper's effect; `inconclusive`: neither, so the interval covers both "
    "0 and the paper's effect. `control`: an arm the paper makes no claim about (it separates causes).")

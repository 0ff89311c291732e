"""Theorem 3.1: dual placement γa ⊙ (W (γb ⊙ x̂)), effective weight diag(u) W diag(v), descends at least
as fast as column-only placement W' diag(v) at the same effective weight (W' = diag(u) W) when u ≥ 1.

Under gradient descent −dL/dt = ||∇θ L||². The difference between the two is
Σ_ij (u_i² − 1) v_j² G_ij² + ||∇_u L||², non-negative when every u_i ≥ 1; with u_i < 1 it can be negative.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .common import figure, finish, regression_problem, single_threaded


def _loss(a, x, y):
    return 0.5 * (x @ a.T - y).pow(2).sum(-1).mean()


def rates(u: torch.Tensor, w: torch.Tensor, v: torch.Tensor, x, y) -> tuple[float, float]:
    """(−dL/dt for row+column scaling, −dL/dt for column-only) at the same effective weight."""
    u, w, v = (t.clone().requires_grad_() for t in (u, w, v))
    dual = sum(g.pow(2).sum() for g in torch.autograd.grad(_loss(u[:, None] * w * v, x, y), (u, w, v)))
    w_col = (u[:, None] * w).detach().requires_grad_()
    v_col = v.detach().clone().requires_grad_()
    column = sum(g.pow(2).sum() for g in torch.autograd.grad(_loss(w_col * v_col, x, y), (w_col, v_col)))
    return dual.item(), column.item()


def descent(u0, w0, v0, x, y, dual: bool, steps: int, lr: float) -> list[float]:
    params = [u0.clone(), w0.clone(), v0.clone()] if dual else [u0[:, None] * w0, v0.clone()]
    params = [p.requires_grad_() for p in params]
    losses = []
    for _ in range(steps + 1):
        a = params[0][:, None] * params[1] * params[2] if dual else params[0] * params[1]
        loss = _loss(a, x, y)
        losses.append(loss.item())
        with torch.no_grad():
            for p, g in zip(params, torch.autograd.grad(loss, params)):
                p -= lr * g
    return losses


@single_threaded
def run(out: Path, fast: bool = False) -> dict:
    x, y = regression_problem(256, 16, 8, seed=0)
    gen = torch.Generator().manual_seed(5)
    samples = 50 if fast else 500
    held, violated_hypothesis = [], []
    for i in range(samples):
        w = torch.randn(8, 16, generator=gen, dtype=torch.float64) * 0.3
        v = 0.5 + torch.rand(16, generator=gen, dtype=torch.float64)
        if i % 2 == 0:  # hypothesis: every u_i ≥ 1
            u = 1 + torch.rand(8, generator=gen, dtype=torch.float64)
            held.append(rates(u, w, v, x, y))
        else:  # outside it: some u_i < 1
            u = 0.2 + 0.6 * torch.rand(8, generator=gen, dtype=torch.float64)
            violated_hypothesis.append(rates(u, w, v, x, y))
    u0 = 1 + torch.rand(8, generator=gen, dtype=torch.float64)
    w0 = torch.randn(8, 16, generator=gen, dtype=torch.float64) * 0.3
    v0 = 1 + torch.rand(16, generator=gen, dtype=torch.float64)
    steps = 100 if fast else 400
    dual_curve = descent(u0, w0, v0, x, y, True, steps, 0.01)
    column_curve = descent(u0, w0, v0, x, y, False, steps, 0.01)
    ratios_held = [d / c for d, c in held]
    ratios_other = [d / c for d, c in violated_hypothesis]
    summary = {
        "claim": "with u ≥ 1, row+column scaling descends at least as fast as column-only at the same effective weight",
        "setup": f"linear regression 16 → 8, float64, {samples} random points (u, W, v), plain gradient descent",
        "measured": {
            "samples_with_u_ge_1": len(held),
            "min_rate_ratio_dual_over_column": min(ratios_held),
            "gd_final_loss": {"dual": dual_curve[-1], "column_only": column_curve[-1]},
            "claim_holds": all(r >= 1 - 1e-12 for r in ratios_held),
        },
        "control": {  # the theorem's hypothesis broken: some u_i < 1
            "samples_with_u_lt_1": len(violated_hypothesis),
            "fraction_slower": sum(r < 1 for r in ratios_other) / len(ratios_other),
            "min_rate_ratio_dual_over_column": min(ratios_other),
            "claim_holds": all(r >= 1 - 1e-12 for r in ratios_other),
        },
    }
    summary["holds"] = summary["measured"]["claim_holds"] and not summary["control"]["claim_holds"]
    fig, axes = figure(2, width=4.5)
    axes[0].hist(ratios_held, bins=30, alpha=0.7, label="u ≥ 1")
    axes[0].hist(ratios_other, bins=30, alpha=0.7, label="u < 1")
    axes[0].axvline(1.0, color="k", linewidth=1)
    axes[0].set(xlabel="descent rate ratio dual / column-only", ylabel="points", title="instantaneous rates")
    axes[0].legend()
    axes[1].plot(dual_curve, label="row + column")
    axes[1].plot(column_curve, label="column only", linestyle="--")
    axes[1].set(yscale="log", xlabel="GD step", ylabel="loss", title="same start, same learning rate")
    axes[1].legend()
    return finish(fig, out, "dual-placement", summary)

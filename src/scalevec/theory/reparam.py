"""Theorem 3.2: magnitude-direction reparameterizations precondition γ anisotropically.

Gradient descent on the parameters θ of γ(θ) moves γ by −lr·J Jᵀ g (J = ∂γ/∂θ). At init
(OR: β = 1, α = 1; ER: β = 0, α = 0), J Jᵀ = 1 1ᵀ + (I − 1 1ᵀ/d): eigenvalue d along the magnitude
direction 1/√d and 1 on its complement, so the magnitude moves d times faster than with plain γ.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..scales import Role, Scale
from .common import figure, finish, single_threaded


def preconditioner(parameterization: str, d: int) -> torch.Tensor:
    """J Jᵀ of γ with respect to the scale's parameters, at init, float64."""
    scale = Scale(d, parameterization, Role.INPUT).double()
    params = list(scale.parameters())
    jac = torch.autograd.functional.jacobian(
        lambda *ps: torch.func.functional_call(scale, dict(zip([n for n, _ in scale.named_parameters()], ps)), ()),
        tuple(p.detach() for p in params))
    j = torch.cat([t.reshape(d, -1) for t in jac], dim=1)
    return j @ j.T


def measured_rates(parameterization: str, d: int) -> dict:
    """Rate of γ's change along the magnitude direction and orthogonal to it, per unit gradient, from one small
    GD step."""
    gen = torch.Generator().manual_seed(d)
    g = torch.randn(d, generator=gen, dtype=torch.float64)
    ones = torch.ones(d, dtype=torch.float64) / d**0.5
    lr = 1e-6
    scale = Scale(d, parameterization, Role.INPUT).double()
    gamma0 = scale().detach().clone()
    (scale() @ g).backward()
    with torch.no_grad():
        for p in scale.parameters():
            p -= lr * p.grad
        delta = (scale() - gamma0) / -lr
    g_par, g_perp = (g @ ones) * ones, g - (g @ ones) * ones
    return {"magnitude_rate": (delta @ ones / (g_par @ ones)).item(),
            "orthogonal_rate": ((delta - (delta @ ones) * ones) @ g_perp / (g_perp @ g_perp)).item()}


@single_threaded
def run(out: Path, fast: bool = False) -> dict:
    dims = [4, 16, 64] if fast else [4, 16, 64, 256, 1024]
    results = {}
    for param in ("plain", "or", "er"):
        results[param] = {}
        for d in dims:
            eig = torch.linalg.eigvalsh(preconditioner(param, d))
            results[param][d] = {"eigen_max": eig.max().item(), "eigen_min": eig.min().item(),
                                 **measured_rates(param, d)}
    def d_fold(param: str) -> bool:
        return all(abs(results[param][d]["magnitude_rate"] / d - 1) < 1e-3
                   and abs(results[param][d]["orthogonal_rate"] - 1) < 1e-3 for d in dims)

    by_dim = {p: {str(d): v for d, v in r.items()} for p, r in results.items()}
    summary = {"claim": "OR and ER move γ's magnitude d times faster than plain γ at init, its direction equally fast",
               "setup": f"one scale vector of size d in {dims}, at init, float64; J Jᵀ's eigenvalues and one "
                        "small plain gradient-descent step",
               "measured": {p: by_dim[p] | {"claim_holds": d_fold(p)} for p in ("or", "er")},
               "control": {"plain": by_dim["plain"] | {"claim_holds": d_fold("plain")}}}
    summary["holds"] = d_fold("or") and d_fold("er") and not d_fold("plain")
    fig, (ax,) = figure(width=5.5)
    for param, marker in (("plain", "o"), ("or", "s"), ("er", "^")):
        ax.loglog(dims, [results[param][d]["magnitude_rate"] for d in dims], marker=marker, label=f"{param}: magnitude")
    ax.loglog(dims, [results["or"][d]["orthogonal_rate"] for d in dims], linestyle="--", label="or/er: orthogonal")
    ax.loglog(dims, dims, color="k", linewidth=0.8, label="d")
    ax.set(xlabel="d", ylabel="rate per unit gradient", title="preconditioning of γ at init")
    ax.legend()
    return finish(fig, out, "reparam", summary)

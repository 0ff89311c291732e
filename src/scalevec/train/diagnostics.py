"""Scale-vector diagnostics, per role: effective γ, and for Input-Norm scales the balance
γ_j² − Σ_f ||w_{f,j}||² over the matrices f the scale multiplies (conserved under gradient flow;
weight decay drives it toward 0, docs/paper-notes.md section 2)."""

from __future__ import annotations

import torch

from ..scales import ParamInfo, Role


def _summary(values: list[torch.Tensor]) -> dict:
    flat = torch.cat([v.flatten() for v in values]).double()
    return {"mean": flat.mean().item(), "min": flat.min().item(), "max": flat.max().item()}


def _column_norms(matrix: torch.Tensor, start: int, stop: int, ndim: int) -> torch.Tensor:
    """Σ over rows [start, stop) of ||w_row||² per column, of a matrix (out, in) or stacked experts (E, out, in),
    summed over the experts a γ of `ndim` dimensions is shared by (one γ per expert: ndim 2)."""
    norms = matrix[..., start:stop, :].float().pow(2).sum(-2)
    return norms.sum(0) if norms.ndim > ndim else norms


@torch.no_grad()
def scale_diagnostics(model: torch.nn.Module, infos: dict[str, ParamInfo]) -> dict:
    scales: dict[str, tuple[Role, tuple]] = {}
    for name, info in infos.items():
        if info.kind.is_scale:
            scales.setdefault(name.rsplit(".", 1)[0], (info.role, info.feeds))
    gammas: dict[Role, list] = {Role.INPUT: [], Role.OUTPUT: []}
    balances = []
    for prefix, (role, feeds) in scales.items():
        gamma = model.get_submodule(prefix)().float()
        gammas[role].append(gamma)
        if feeds:
            balances.append(gamma.pow(2) - sum(_column_norms(model.get_parameter(matrix), start, stop, gamma.ndim)
                                               for matrix, start, stop in feeds))
    result = {role.value: {"gamma": _summary(values)} for role, values in gammas.items() if values}
    if balances:
        result[Role.INPUT.value]["balance"] = _summary(balances)
    return result

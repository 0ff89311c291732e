"""Scale vectors: the learnable gains that follow a normalization, and their parameterizations.

A scale vector γ multiplies a normalized activation elementwise. Every parameterization below
starts at effective γ = 1 and exposes its parameters with a `Kind`, so the optimizer can treat a
magnitude differently from a direction. Where γ sits decides its `Role` (docs/paper-notes.md section 3):
an Input-Norm scale is read by a linear map and could be folded into it; an Output-Norm scale
sets a scale nothing downstream can absorb.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import torch
from torch import nn


class Role(StrEnum):
    INPUT = "input"  # a scale followed by a linear map (foldable into it)
    OUTPUT = "output"  # a scale not followed by a linear map (QK-norm, post-branch, DNP output)
    NONE = "none"  # not a scale vector


class Kind(StrEnum):
    MATRIX = "matrix"
    EMBEDDING = "embedding"
    HEAD = "head"
    ROUTER = "router"
    BIAS = "bias"  # of q, k, v in Qwen2-style attention
    GAIN = "gain"  # plain γ
    OR_MAGNITUDE = "or_magnitude"  # β of γ = β·α/RMS(α)
    OR_DIRECTION = "or_direction"  # α of γ = β·α/RMS(α)
    ER_MAGNITUDE = "er_magnitude"  # β of γ = exp(β)·exp(α - mean α)
    ER_DIRECTION = "er_direction"  # α of γ = exp(β)·exp(α - mean α)

    @property
    def is_scale(self) -> bool:
        return self not in (Kind.MATRIX, Kind.EMBEDDING, Kind.HEAD, Kind.ROUTER, Kind.BIAS)


@dataclass(frozen=True)
class ParamInfo:
    """What a parameter is, for the optimizer table, diagnostics and export."""

    role: Role
    kind: Kind
    # rows [start, stop) of the named matrices whose columns this scale multiplies (Input-Norm only)
    feeds: tuple[tuple[str, int, int], ...] = ()
    # the loss does not depend on this parameter (a magnitude behind a DNP norm); never decayed
    invariant: bool = False
    # row counts of the logical matrices stored fused in this matrix (q, k, v; gate, up); () = one
    blocks: tuple[int, ...] = ()
    # a matrix that writes into the residual stream (o, down; routed and shared experts' down): its init is
    # scaled by 1/sqrt(2·layers), GPT-2's rule
    residual_output: bool = False


def er_gamma_problem(gamma: torch.Tensor) -> str | None:
    """Why ER (which stores log γ) cannot hold `gamma`, or None: every entry must be positive."""
    return f"ER needs every γ > 0, got min γ = {gamma.min().item():.4g}" if (gamma <= 0).any() else None


class Scale(nn.Module):
    """A scale vector of `size` entries in one parameterization; `size=(n, d)` stacks n vectors
    (one per MoE expert), each with its own magnitude.

    `with_magnitude=False` drops OR's and ER's magnitude β: used where a following norm makes the
    overall size of γ irrelevant, so β would only random-walk (docs/paper-notes.md section 4).
    """

    def __init__(self, size: int | tuple[int, ...], parameterization: str, role: Role, with_magnitude: bool = True):
        super().__init__()
        if parameterization not in ("plain", "or", "er"):
            raise ValueError(f"no scale parameters for parameterization {parameterization!r}")
        shape = (size,) if isinstance(size, int) else tuple(size)
        self.parameterization = parameterization
        self.role = role
        if parameterization == "plain":
            self.weight = nn.Parameter(torch.ones(shape))
            return
        start = 1.0 if parameterization == "or" else 0.0
        self.direction = nn.Parameter(torch.full(shape, start))
        # shape (..., 1), never a scalar: FSDP2 shards every parameter along dim 0
        self.magnitude = nn.Parameter(torch.full((*shape[:-1], 1), start)) if with_magnitude else None

    def forward(self) -> torch.Tensor:
        """The effective γ."""
        if self.parameterization == "plain":
            return self.weight
        if self.parameterization == "or":
            gamma = self.direction * torch.rsqrt(self.direction.pow(2).mean(-1, keepdim=True))
            return gamma if self.magnitude is None else self.magnitude * gamma
        log_gamma = self.direction - self.direction.mean(-1, keepdim=True)
        if self.magnitude is not None:
            log_gamma = log_gamma + self.magnitude
        return log_gamma.exp()

    def kinds(self) -> dict[str, Kind]:
        """Local parameter name -> kind."""
        if self.parameterization == "plain":
            return {"weight": Kind.GAIN}
        magnitude, direction = (
            (Kind.OR_MAGNITUDE, Kind.OR_DIRECTION)
            if self.parameterization == "or"
            else (Kind.ER_MAGNITUDE, Kind.ER_DIRECTION)
        )
        kinds = {"direction": direction}
        if self.magnitude is not None:
            kinds["magnitude"] = magnitude
        return kinds

    @torch.no_grad()
    def set_gamma(self, gamma: torch.Tensor) -> None:
        """Take the effective value `gamma` (exactly; without a magnitude β, up to the overall factor that the
        following norm removes); a stacked scale (one per expert) takes one magnitude per vector. ER needs every
        entry positive: ValueError otherwise."""
        gamma = gamma.float()
        if self.parameterization == "plain":
            self.weight.copy_(gamma)
        elif self.parameterization == "or":
            self.direction.copy_(gamma)
            if self.magnitude is not None:
                self.magnitude.copy_(gamma.pow(2).mean(-1, keepdim=True).sqrt())
        else:
            if problem := er_gamma_problem(gamma):
                raise ValueError(problem)
            self.direction.copy_(gamma.log())
            if self.magnitude is not None:
                self.magnitude.copy_(gamma.log().mean(-1, keepdim=True))

    @torch.no_grad()
    def reset_to_identity(self) -> None:
        """Set effective γ to exactly 1 (after its value was folded elsewhere)."""
        if self.parameterization == "plain":
            self.weight.fill_(1.0)
            return
        start = 1.0 if self.parameterization == "or" else 0.0
        self.direction.fill_(start)
        if self.magnitude is not None:
            self.magnitude.fill_(start)


def make_scale(size: int | tuple[int, ...], parameterization: str, role: Role, with_magnitude: bool = True
               ) -> Scale | None:
    """A `Scale`, or None when the parameterization is `fixed` (no scale vector at all)."""
    if parameterization == "fixed":
        return None
    return Scale(size, parameterization, role, with_magnitude)


def scale_param_info(prefix: str, scale: Scale, feeds=(), invariant_magnitude: bool = False) -> dict[str, ParamInfo]:
    """ParamInfo for each parameter of `scale`, named `prefix.local`."""
    return {
        f"{prefix}.{local}": ParamInfo(
            scale.role,
            kind,
            feeds if scale.role is Role.INPUT else (),
            invariant=invariant_magnitude and kind in (Kind.OR_MAGNITUDE, Kind.ER_MAGNITUDE),
        )
        for local, kind in scale.kinds().items()
    }

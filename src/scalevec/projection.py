"""The unit between a normalized input and the branches that read it.

    x̂ ─► per-branch input scale γb ─► linear W ─► [DP: row scale γa] or [DNP: Norm, then γa] ─► branch

Several branches (q, k, v or gate, up) share one fused weight. Input-side scales and DP's output
scale are applied to the weight, not to activations: `diag(γa) W diag(γb)` costs O(weights) per
step where scaling activations costs O(tokens·width) per branch, and it lets the branches share
one matmul. DNP's norm sits between W and γa, so γa acts on activations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .scales import Kind, ParamInfo, Role, Scale, make_scale, scale_param_info
from .strategy import Strategy


def normalize(x: torch.Tensor, group: int, kind: str, eps: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Parameter-free RMSNorm/LayerNorm over trailing groups of `group` features, times `weight`."""
    if group != x.shape[-1]:
        shape = x.shape
        x = x.unflatten(-1, (-1, group))
        return normalize(x, group, kind, eps, weight).reshape(shape)
    if weight is not None:
        weight = weight.to(x.dtype)  # a bf16 input with an fp32 weight misses the fused kernel under autocast
    if kind == "rms":
        return F.rms_norm(x, (group,), weight, eps)
    return F.layer_norm(x, (group,), weight, None, eps)


ACTIVATIONS = {"silu": F.silu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}
"""Gate nonlinearities of gated FFNs (model.activation): SwiGLU's and GeGLU's."""


@dataclass(frozen=True)
class Branch:
    """One logical linear map inside a fused projection."""

    name: str  # q, k, v, o, gate, up or down
    out_features: int
    norm_group: int  # DNP normalizes over groups of this many outputs (head_dim for q, k, v)
    out_scale_size: int  # size of DNP's output scale: head_dim (`head` shape) or out_features

    @classmethod
    def whole(cls, name: str, out_features: int) -> Branch:
        """A branch normalized and scaled over all its outputs (gate, up, down, o)."""
        return cls(name=name, out_features=out_features, norm_group=out_features, out_scale_size=out_features)

    @classmethod
    def attention(cls, name: str, out_features: int, head_dim: int, strategy: Strategy) -> Branch:
        """q, k or v: DNP normalizes each head (or all at once: strategy.qk_norm_group), and its output scale is
        head-shaped (or full width: strategy.qk_scale_shape)."""
        return cls(name=name, out_features=out_features,
                   norm_group=head_dim if strategy.qk_norm_group == "head" else out_features,
                   out_scale_size=head_dim if strategy.qk_scale_shape == "head" else out_features)


class Projection(nn.Module):
    """Fused linear maps reading one input, with the strategy's scale vectors around them.

    `reads_norm`: the input is a block norm's output, so an input-side scale always exists
    (shared across branches, or one per branch under HG); otherwise only DP/DNP branches get one.
    `reader_scaled`: the norm's one shared γ belongs to the module that calls this one, which passes it to
    `forward` (an MoE block's shared expert reads the block's γ, as the router and routed experts do).
    `residual_output`: the output is added to the residual stream (o, down), which its init scaling reads.
    """

    def __init__(self, d_in: int, branches: list[Branch], strategy: Strategy, reads_norm: bool,
                 norm: str, eps: float, bias: bool = False, reader_scaled: bool = False, residual_output: bool = False):
        super().__init__()
        self.residual_output = residual_output
        self.branches = branches
        self.sizes = [b.out_features for b in branches]
        self.placements = [strategy.placement(b.name) for b in branches]
        self.norm, self.eps = norm, eps
        self.weight = nn.Parameter(torch.empty(sum(self.sizes), d_in))
        # the linear map's own bias: DP's row scale scales it with the rows, DNP's norm comes after it
        self.bias = nn.Parameter(torch.zeros(sum(self.sizes))) if bias else None

        param = strategy.scale
        self.shared_scale: Scale | None = None
        self.in_scales = nn.ModuleDict()
        if reads_norm and not strategy.heterogeneous:
            if not reader_scaled:
                self.shared_scale = make_scale(d_in, param, Role.INPUT, strategy.input_magnitude(self.placements))
        else:
            for b, placement in zip(branches, self.placements):
                if reads_norm or placement != "standard":
                    scale = make_scale(d_in, param, Role.INPUT, strategy.input_magnitude([placement]))
                    if scale is not None:
                        self.in_scales[b.name] = scale
        dp_role = Role(strategy.dual_placement_role)
        self.out_scales = nn.ModuleDict()
        for b, placement in zip(branches, self.placements):
            if placement == "dp":
                scale = make_scale(b.out_features, param, dp_role)
            elif placement == "dnp":
                scale = make_scale(b.out_scale_size, param, Role.OUTPUT)
            else:
                continue
            if scale is not None:
                self.out_scales[b.name] = scale
        # magnitudes behind a DNP norm exist only on request, and then the loss ignores them
        self._invariant_inputs = strategy.magnitude_on_dnp_inputs

    def in_scale(self, branch: str) -> Scale | None:
        if self.shared_scale is not None:
            return self.shared_scale
        return self.in_scales[branch] if branch in self.in_scales else None

    def effective_weight(self, reader_scale: torch.Tensor | None = None, without: Scale | None = None
                         ) -> torch.Tensor:
        """diag(γa) W diag(γb), per branch, as one fused matrix. `reader_scale`: the caller's γb (reader_scaled);
        `without`: a scale left out of the product (a norm's weight that stays where it is, e.g. on export)."""
        weight = self._scaled_weight(without)
        return weight if reader_scale is None else weight * reader_scale

    def _scaled_weight(self, without: Scale | None) -> torch.Tensor:
        shared = None if self.shared_scale is without else self.shared_scale
        if not any(p == "dp" for p in self.placements) and (shared is not None or not self.in_scales):
            return self.weight if shared is None else self.weight * shared()
        pieces = []
        for b, placement, w in zip(self.branches, self.placements, self.weight.split(self.sizes)):
            scale = self.in_scale(b.name)
            if scale is not None and scale is not without:
                w = w * scale()
            if placement == "dp" and b.name in self.out_scales:
                w = w * self.out_scales[b.name]().unsqueeze(1)
            pieces.append(w)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    @torch.no_grad()
    def fold(self, keep_shared: bool = False, reader_scale: torch.Tensor | None = None) -> None:
        """Fold every scale that a weight absorbs (input-side, DP's output-side, the caller's γb) into the weight
        and bias, exactly: the scales become 1 and the outputs stay. `keep_shared` leaves the shared input scale
        (the weight of the norm before it) as it is; DNP's output scales sit behind a norm and stay."""
        kept = self.shared_scale if keep_shared else None
        weight, bias = self.effective_weight(reader_scale, without=kept), self.effective_bias()
        self.weight.copy_(weight)
        if bias is not None:
            self.bias.copy_(bias)
        dual = [self.out_scales[b.name] for b, p in zip(self.branches, self.placements)
                if p == "dp" and b.name in self.out_scales]
        for scale in (self.shared_scale, *self.in_scales.values(), *dual):
            if scale is not None and scale is not kept:
                scale.reset_to_identity()

    def effective_bias(self) -> torch.Tensor | None:
        """The bias with DP's row scale applied, per branch."""
        if self.bias is None or not any(p == "dp" for p in self.placements):
            return self.bias
        pieces = []
        for b, placement, bias in zip(self.branches, self.placements, self.bias.split(self.sizes)):
            pieces.append(bias * self.out_scales[b.name]() if placement == "dp" and b.name in self.out_scales
                          else bias)
        return torch.cat(pieces)

    def forward(self, x: torch.Tensor, reader_scale: torch.Tensor | None = None) -> list[torch.Tensor]:
        return self.branch_outputs(self.linear(x, reader_scale))

    def linear(self, x: torch.Tensor, reader_scale: torch.Tensor | None = None) -> torch.Tensor:
        """Every branch's output before DNP's norms, concatenated: one matmul with the effective weight."""
        return F.linear(x, self.effective_weight(reader_scale), self.effective_bias())

    def dnp_scale(self, branch: str) -> torch.Tensor | None:
        """The effective γa after a DNP branch's norm, or None where the strategy gives it none."""
        return self.out_scales[branch]() if branch in self.out_scales else None

    def branch_outputs(self, y: torch.Tensor) -> list[torch.Tensor]:
        """`linear`'s output split per branch, each DNP branch normalized and scaled."""
        outputs = list(y.split(self.sizes, dim=-1)) if len(self.sizes) > 1 else [y]
        for i, (b, placement) in enumerate(zip(self.branches, self.placements)):
            if placement != "dnp":
                continue
            scale = self.dnp_scale(b.name)
            if scale is not None and scale.shape[0] != b.norm_group:  # a `full` scale over several groups
                outputs[i] = normalize(outputs[i], b.norm_group, self.norm, self.eps) * scale
            else:
                outputs[i] = normalize(outputs[i], b.norm_group, self.norm, self.eps, scale)
        return outputs

    def param_info(self, prefix: str) -> dict[str, ParamInfo]:
        infos = {f"{prefix}.weight": ParamInfo(Role.NONE, Kind.MATRIX, blocks=tuple(self.sizes),
                                               residual_output=self.residual_output)}
        if self.bias is not None:
            infos[f"{prefix}.bias"] = ParamInfo(Role.NONE, Kind.BIAS)
        rows, start = {}, 0
        for b in self.branches:
            rows[b.name] = (f"{prefix}.weight", start, start + b.out_features)
            start += b.out_features
        if self.shared_scale is not None:
            all_dnp = all(p == "dnp" for p in self.placements)
            infos |= scale_param_info(f"{prefix}.shared_scale", self.shared_scale, tuple(rows.values()),
                                      invariant_magnitude=all_dnp and self._invariant_inputs)
        for name, scale in self.in_scales.items():
            is_dnp = self.placements[[b.name for b in self.branches].index(name)] == "dnp"
            infos |= scale_param_info(f"{prefix}.in_scales.{name}", scale, (rows[name],),
                                      invariant_magnitude=is_dnp and self._invariant_inputs)
        for name, scale in self.out_scales.items():
            infos |= scale_param_info(f"{prefix}.out_scales.{name}", scale)
        return infos

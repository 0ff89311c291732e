"""Mixture-of-experts FFN with scale vectors.

    x̂ ─► router (its own input scale under HG) ─► top-k experts ─► Σ weight · expert(x̂)  [+ shared expert]
    expert e: down_e(act(gate_e) ⊙ up_e), gate_e/up_e reading x̂ through per-expert (or shared) scales,
              with DP or DNP on gate/up as the strategy says

Experts are stacked 3-D tensors. Dispatch is dropless and has no Python loop over experts:
assignments are sorted by expert, then either (grouped) each expert's rows multiply its matrices
in one grouped GEMM (`F.grouped_mm`: CUTLASS kernels for bf16 on Hopper/Blackwell; shapes do not
depend on the routing, so the layer compiles once), or (padded) the rows are copied into an
(experts, busiest expert's count, d) buffer for batched matmuls, the CPU path: torch compiles
grouped_mm for bf16 only. Balancing: a Switch-style auxiliary loss, or the aux-loss-free expert
bias (a buffer the optimizer never sees, updated by an optimizer step hook from the load summed over
ranks, as torchtitan does).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, MoEConfig
from .projection import ACTIVATIONS, normalize
from .scales import Kind, ParamInfo, Role, Scale, make_scale, scale_param_info
from .strategy import Strategy


def grouped_mm(rows: torch.Tensor, weights: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """rows[ends[e-1]:ends[e]] @ weights[e] for every expert e, in autocast's dtype as F.linear would be
    (autocast does not cover grouped_mm, and its fast kernels take bf16 only)."""
    if torch.is_autocast_enabled(rows.device.type):
        dtype = torch.get_autocast_dtype(rows.device.type)
        rows, weights = rows.to(dtype), weights.to(dtype)
    return F.grouped_mm(rows, weights, offs=ends)


class MoEFeedForward(nn.Module):
    """`shared_expert`: a dense FFN every token goes through (model.moe_shared_expert), or None; without HG it
    reads the block norm's one γ (`shared_scale`), as the router and the routed experts do."""

    def __init__(self, m: ModelConfig, s: Strategy, moe: MoEConfig, shared_expert: nn.Module | None = None):
        super().__init__()
        E, d = m.moe_experts, m.d_model
        de = m.moe_d_expert or m.d_ff
        self.experts, self.top_k, self.d_expert, self.moe = E, m.moe_top_k, de, moe
        self.norm, self.eps, self.activation = m.norm, m.norm_eps, ACTIVATIONS[m.activation]
        self.router = nn.Parameter(torch.empty(E, d))
        self.gate_up = nn.Parameter(torch.empty(E, 2 * de, d))
        self.down = nn.Parameter(torch.empty(E, d, de))
        self.register_buffer("expert_bias", torch.zeros(E))
        self.register_buffer("step_load", torch.zeros(E), persistent=False)  # since the last bias update
        self.register_buffer("log_load", torch.zeros(E), persistent=False)  # since the last metrics record
        self.placements = {name: s.placement(name) for name in ("gate", "up")}
        param, per_expert = s.scale, s.expert_scales == "per_expert"
        # standard: the block norm's one scale feeds router and experts; HG: router and gate/up own theirs
        self.shared_scale = None if s.heterogeneous else make_scale(d, param, Role.INPUT)
        self.router_scale = make_scale(d, param, Role.INPUT) if s.heterogeneous else None
        self.in_scales, self.out_scales = nn.ModuleDict(), nn.ModuleDict()
        for name, placement in self.placements.items():
            if s.heterogeneous:
                scale = make_scale((E, d) if per_expert else d, param, Role.INPUT, s.input_magnitude([placement]))
                if scale is not None:
                    self.in_scales[name] = scale
            if placement != "standard":
                role = Role(s.dual_placement_role) if placement == "dp" else Role.OUTPUT
                scale = make_scale((E, de) if per_expert else de, param, role)
                if scale is not None:
                    self.out_scales[name] = scale
        self._invariant_inputs = s.magnitude_on_dnp_inputs
        self.shared_expert = shared_expert
        self.aux_loss = None  # this forward's balancing losses, added to the objective by the trainer

    def expert_parameters(self) -> list[nn.Parameter]:
        """The parameters stacked one slice per routed expert: gate_up, down and per-expert scales (the router
        and the shared scales serve every token)."""
        scales = (*self.in_scales.values(), *self.out_scales.values())
        return [self.gate_up, self.down, *(p for scale in scales for p in scale.parameters() if p.ndim == 2)]

    def _column_scale(self, scale: Scale | None) -> torch.Tensor | None:
        if scale is None:
            return None
        gamma = scale()
        return gamma.unsqueeze(-2)  # (E, 1, d) or (1, d): broadcast over each expert's rows

    def effective_gate_up(self, without: Scale | None = None) -> torch.Tensor:
        """diag(γa) W diag(γb) per expert, (E, 2·d_expert, d); `without`: a scale left out (a kept norm weight)."""
        pieces = []
        for name, w in zip(("gate", "up"), self.gate_up.split(self.d_expert, dim=1)):
            scale = self.shared_scale if self.shared_scale is not None else self.in_scales[name] \
                if name in self.in_scales else None
            column = self._column_scale(None if scale is without else scale)
            if column is not None:
                w = w * column
            if self.placements[name] == "dp" and name in self.out_scales:
                w = w * self.out_scales[name]().unsqueeze(-1)
            pieces.append(w)
        return torch.cat(pieces, dim=1)

    def effective_router(self, without: Scale | None = None) -> torch.Tensor:
        """The router matrix times its input scale's columns (the block's γ, or its own under HG)."""
        scale = self.shared_scale if self.shared_scale is not None else self.router_scale
        column = self._column_scale(None if scale is without else scale)
        return self.router if column is None else self.router * column

    @torch.no_grad()
    def fold(self, keep_shared: bool = False) -> None:
        """Fold the router's and experts' input scales and DP's output scales into their matrices, the shared
        expert's included (`Projection.fold`); `keep_shared` keeps the block norm's one γ as it is."""
        kept = self.shared_scale if keep_shared else None
        if self.shared_expert is not None:
            reader = None if self.shared_scale is None or keep_shared else self.shared_scale()
            self.shared_expert.gate_up.fold(keep_shared, reader)
            self.shared_expert.down.fold(keep_shared)
        self.router.copy_(self.effective_router(without=kept))
        self.gate_up.copy_(self.effective_gate_up(without=kept))
        dual = [self.out_scales[name] for name, p in self.placements.items() if p == "dp" and name in self.out_scales]
        for scale in (self.shared_scale, self.router_scale, *self.in_scales.values(), *dual):
            if scale is not None and scale is not kept:
                scale.reset_to_identity()

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(router logits, scores, top-k expert indices, top-k weights) for tokens x (N, d)."""
        logits = F.linear(x, self.effective_router())
        scores = logits.softmax(-1) if self.moe.router == "softmax" else logits.sigmoid()
        chooser = scores + self.expert_bias if self.moe.balance == "bias" else scores
        indices = chooser.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, indices)
        if self.moe.normalize_top_k:
            weights = weights / weights.sum(-1, keepdim=True)
        return logits, scores, indices, weights

    def gated(self, gate_up: torch.Tensor, per_expert) -> torch.Tensor:
        """act(gate) ⊙ up after DNP; `per_expert` lays an (E, d_expert) scale out like gate_up's rows."""
        acts = []
        for name, h in zip(("gate", "up"), gate_up.split(self.d_expert, dim=-1)):
            if self.placements[name] == "dnp":
                h = normalize(h, self.d_expert, self.norm, self.eps)
                if name in self.out_scales:
                    gamma = self.out_scales[name]()
                    h = h * (per_expert(gamma) if gamma.ndim == 2 else gamma)
            acts.append(h)
        return self.activation(acts[0]) * acts[1]

    def grouped_experts(self, rows: torch.Tensor, expert_of: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        ends = counts.cumsum(0).to(torch.int32)
        gate_up = grouped_mm(rows, self.effective_gate_up().transpose(1, 2), ends)
        # a one-hot matmul, not gamma[expert_of], whose backward is a slow scatter (benchmarks/README.md, MoE)
        one_hot = F.one_hot(expert_of, self.experts).to(gate_up.dtype)
        act = self.gated(gate_up, lambda gamma: one_hot @ gamma.to(gate_up.dtype))
        return grouped_mm(act, self.down.transpose(1, 2), ends)

    def padded_experts(self, rows: torch.Tensor, expert_of: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        largest = counts.max()
        if torch.compiler.is_compiling():  # a graph per capacity: rounded up to a power of two, a run compiles a few
            largest = torch.exp2(torch.ceil(torch.log2(largest.float()))).to(largest.dtype)  # (zero rows past a count)
        capacity = int(largest)
        starts = counts.cumsum(0) - counts
        slot = expert_of * capacity + torch.arange(len(rows), device=rows.device) - starts[expert_of]
        buffer = rows.new_zeros(self.experts * capacity, rows.shape[-1]).index_copy(0, slot, rows)
        gate_up = torch.bmm(buffer.view(self.experts, capacity, -1), self.effective_gate_up().transpose(1, 2))
        act = self.gated(gate_up, lambda gamma: gamma.unsqueeze(1))
        return torch.bmm(act, self.down.transpose(1, 2)).reshape(self.experts * capacity, -1)[slot]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        logits, scores, indices, weights = self.route(tokens)
        assigned = indices.reshape(-1)  # N·k assignments, token-major
        order = assigned.argsort(stable=True)
        token_of = order // self.top_k
        counts = assigned.new_zeros(self.experts).scatter_add_(0, assigned, torch.ones_like(assigned))
        grouped = self.moe.dispatch == "grouped" or (self.moe.dispatch == "auto" and x.is_cuda)
        experts = self.grouped_experts if grouped else self.padded_experts
        outputs = experts(tokens[token_of], assigned[order], counts)
        weighted = outputs.to(tokens.dtype) * weights.reshape(-1)[order, None]
        combined = torch.zeros_like(tokens).index_add(0, token_of, weighted)
        if self.shared_expert is not None:
            gamma = None if self.shared_scale is None else self.shared_scale()
            combined = combined + self.shared_expert(tokens, gamma)
        self._balance_losses(logits, scores, counts)
        return combined.reshape(shape)

    def _balance_losses(self, logits, scores, counts) -> None:
        if self.training:
            self.step_load += counts.detach().float()
            self.log_load += counts.detach().float()
        aux = logits.new_zeros(())
        if self.moe.balance == "aux" and self.moe.aux_loss:
            fraction = counts.float() / counts.sum()
            probability = (scores / scores.sum(-1, keepdim=True)).mean(0)
            aux = aux + self.moe.aux_loss * self.experts * (fraction * probability).sum()
        if self.moe.router_z_loss:
            aux = aux + self.moe.router_z_loss * torch.logsumexp(logits, -1).pow(2).mean()
        self.aux_loss = aux

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor) -> None:
        """Aux-loss-free balancing: raise the bias of under-loaded experts, lower over-loaded, re-centre."""
        self.expert_bias += self.moe.bias_rate * torch.sign(load.mean() - load)
        self.expert_bias -= self.expert_bias.mean()

    def param_info(self, prefix: str) -> dict[str, ParamInfo]:
        """Every scale's `feeds` names each matrix it multiplies: an input scale's rows [start, stop) of the
        router, of every routed expert's gate_up (stacked: the rows of each expert) and of the shared expert."""
        de = self.d_expert
        infos = {f"{prefix}.router": ParamInfo(Role.NONE, Kind.ROUTER),
                 f"{prefix}.gate_up": ParamInfo(Role.NONE, Kind.MATRIX, blocks=(de, de)),
                 f"{prefix}.down": ParamInfo(Role.NONE, Kind.MATRIX, residual_output=True)}
        router = ((f"{prefix}.router", 0, self.experts),)
        routed = {"gate": (f"{prefix}.gate_up", 0, de), "up": (f"{prefix}.gate_up", de, 2 * de)}  # of every expert
        shared = ()  # without HG the shared expert reads the block's γ too
        if self.shared_expert is not None:
            infos |= self.shared_expert.gate_up.param_info(f"{prefix}.shared_expert.gate_up")
            infos |= self.shared_expert.down.param_info(f"{prefix}.shared_expert.down")
            shared = ((f"{prefix}.shared_expert.gate_up.weight", 0, sum(self.shared_expert.gate_up.sizes)),)
        if self.shared_scale is not None:
            feeds = (*router, *routed.values(), *shared)
            infos |= scale_param_info(f"{prefix}.shared_scale", self.shared_scale, feeds)
        if self.router_scale is not None:
            infos |= scale_param_info(f"{prefix}.router_scale", self.router_scale, router)
        for name, scale in self.in_scales.items():
            infos |= scale_param_info(f"{prefix}.in_scales.{name}", scale, (routed[name],),
                                      invariant_magnitude=self._invariant_inputs and self.placements[name] == "dnp")
        for name, scale in self.out_scales.items():
            infos |= scale_param_info(f"{prefix}.out_scales.{name}", scale)
        return infos


def expert_balancing_hook(layers: list[MoEFeedForward], sum_over_ranks: Callable[[torch.Tensor], torch.Tensor]
                          ) -> Callable:
    """An optimizer step hook (`optimizer.register_step_post_hook(...)`): after every optimizer step, the
    layers' expert loads since the last one, summed over ranks in one collective on their device (no host
    sync), move each `bias`-balanced layer's expert bias; the loads start again from zero."""
    @torch.no_grad()
    def balance(optimizer, args, kwargs) -> None:
        loads = sum_over_ranks(torch.stack([moe.step_load for moe in layers]))
        for moe, load in zip(layers, loads):
            if moe.moe.balance == "bias":
                moe.update_bias(load)
            moe.step_load.zero_()

    return balance

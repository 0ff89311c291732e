"""The role table's optimizer: one `torch.optim.Optimizer` over every group of the table, stepping
AdamW on its AdamW groups and Muon on its Muon groups.

Being one standard optimizer, it goes wherever one does: a plain loop, torch LR schedulers (each
group's `lr` is scaled, so the table's ratios are kept), transformers' `Trainer(optimizers=(opt,
scheduler))`, Lightning's `configure_optimizers`. Its `state_dict` is the standard format; the inner
AdamW and Muon share its groups and its state, so there is one copy of each.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from ..config import OptimConfig
from ..scales import ParamInfo
from .muon import Muon, is_dtensor
from .policy import param_groups

KINDS = ("adamw", "muon")  # group order: every AdamW group, then every Muon group


class Optimizers(torch.optim.Optimizer):
    """AdamW and (in Muon runs) Muon over one table's groups (optim/policy.py), as one optimizer.

    `Optimizers(model)` uses the default OptimConfig and the model's own scale-decay policy; each group
    carries `names`, `optimizer` (adamw or muon), `lr_mult`, `weight_decay` and `base_lr`, the peak rate
    that `set_lr_factor` (scalevec's schedules) multiplies; torch schedulers scale `lr` instead.
    """

    def __init__(self, model: nn.Module, optim: OptimConfig | None = None, scale_decay: str | None = None,
                 infos: dict[str, ParamInfo] | None = None):
        optim = OptimConfig() if optim is None else optim
        groups = param_groups(model, scale_decay, optim, infos)
        groups = [g for kind in KINDS for g in groups if g["optimizer"] == kind]
        for group in groups:
            group["base_lr"] = (optim.muon_lr if group["optimizer"] == "muon" else optim.lr) * group["lr_mult"]
            group["lr"] = group["base_lr"]
        super().__init__(groups, {"lr": optim.lr})
        adamw = [g for g in self.param_groups if g["optimizer"] == "adamw"]
        muon = [g for g in self.param_groups if g["optimizer"] == "muon"]
        self.inner: dict[str, torch.optim.Optimizer] = {}
        if adamw:  # the inner optimizers fill in their defaults on these same group dicts
            self.inner["adamw"] = torch.optim.AdamW(adamw, lr=optim.lr, betas=(optim.beta1, optim.beta2),
                                                    eps=optim.eps, fused=optim.fused and _fused_ok(adamw))
        if muon:
            self.inner["muon"] = Muon(muon, lr=optim.muon_lr, momentum=optim.muon_momentum,
                                      nesterov=optim.muon_nesterov, ns_steps=optim.muon_ns_steps,
                                      ns_dtype=optim.muon_ns_dtype, update_scale=optim.muon_update_scale)
        self._link()

    def _link(self) -> None:
        """Point the inner optimizers at this optimizer's groups and state (after init and every load)."""
        for kind, inner in self.inner.items():
            inner.param_groups = [g for g in self.param_groups if g["optimizer"] == kind]
            inner.state = self.state

    def set_lr_factor(self, factor: float) -> None:
        for group in self.param_groups:
            group["lr"] = group["base_lr"] * factor

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for inner in self.inner.values():
            inner.step()
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        if set(state_dict) <= set(KINDS):  # checkpoints of scalevec 0.1: one state dict per inner optimizer
            if sorted(state_dict) != sorted(self.inner):
                raise ValueError(f"checkpoint has optimizers {sorted(state_dict)}, this run {sorted(self.inner)}")
            for kind, inner in self.inner.items():
                inner.load_state_dict(state_dict[kind])
            self.param_groups = [g for inner in self.inner.values() for g in inner.param_groups]
            self.state = defaultdict(dict)
            for inner in self.inner.values():
                self.state.update(inner.state)
        else:
            super().load_state_dict(state_dict)
        self._link()


def _fused_ok(groups: list[dict]) -> bool:
    params = [p for g in groups for p in g["params"]]
    return all(p.is_floating_point() and p.device.type in ("cpu", "cuda") and not is_dtensor(p) for p in params)

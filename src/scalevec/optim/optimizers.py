"""The run's optimizers: AdamW for the AdamW groups, Muon for the Muon groups, stepped together."""

from __future__ import annotations

import torch
from torch import nn

from ..config import OptimConfig
from ..scales import ParamInfo
from .muon import Muon, is_dtensor
from .policy import param_groups


class Optimizers:
    """AdamW and (in Muon runs) Muon over one table's groups; `set_lr_factor` applies the schedule."""

    def __init__(self, model: nn.Module, optim: OptimConfig, scale_decay: str,
                 infos: dict[str, ParamInfo] | None = None):
        groups = param_groups(model, scale_decay, optim, infos)
        for group in groups:
            group["base_lr"] = (optim.muon_lr if group["optimizer"] == "muon" else optim.lr) * group["lr_mult"]
            group["lr"] = group["base_lr"]
        adamw = [g for g in groups if g["optimizer"] == "adamw"]
        muon = [g for g in groups if g["optimizer"] == "muon"]
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        if adamw:
            self.optimizers["adamw"] = torch.optim.AdamW(
                adamw, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps,
                fused=optim.fused and _fused_ok(adamw))
        if muon:
            self.optimizers["muon"] = Muon(muon, lr=optim.muon_lr, momentum=optim.muon_momentum,
                                           nesterov=optim.muon_nesterov, ns_steps=optim.muon_ns_steps,
                                           ns_dtype=optim.muon_ns_dtype, update_scale=optim.muon_update_scale)

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    def set_lr_factor(self, factor: float) -> None:
        for group in self.param_groups:
            group["lr"] = group["base_lr"] * factor

    def step(self) -> None:
        for opt in self.optimizers.values():
            opt.step()

    def zero_grad(self) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict) -> None:
        if sorted(state) != sorted(self.optimizers):
            raise ValueError(f"checkpoint has optimizers {sorted(state)}, this run {sorted(self.optimizers)}")
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])


def _fused_ok(groups: list[dict]) -> bool:
    params = [p for g in groups for p in g["params"]]
    return all(p.is_floating_point() and p.device.type in ("cpu", "cuda") and not is_dtensor(p) for p in params)

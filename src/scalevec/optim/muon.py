"""Muon for matrices, orthogonalized per logical matrix.

Written here because torch 2.13's `torch.optim.Muon` takes only 2-D tensors and hard-codes a
bf16 Newton-Schulz (bf16 math is far slower than fp32 on CPU). Ours: the same update (momentum as an
EMA, optional Nesterov, decoupled decay, the same update-RMS scalings), a selectable Newton-Schulz
dtype, fused storage split into its logical matrices (group key `blocks`: row counts, e.g. q, k, v),
and stacked 3-D tensors (MoE experts) orthogonalized per matrix in one batched iteration.
"""

from __future__ import annotations

import math
import sys

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic
NS_EPS = 1e-7


def orthogonalize(update: torch.Tensor, steps: int, dtype: torch.dtype) -> torch.Tensor:
    """Quintic Newton-Schulz approximation of U·Vᵀ for each trailing matrix of `update`."""
    a, b, c = NS_COEFFICIENTS
    x = update.to(dtype)
    tall = update.size(-2) > update.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=NS_EPS)
    for _ in range(steps):
        if x.ndim == 2:  # addmm keeps 2-D results bit-identical to torch.optim.Muon
            gram = x @ x.T
            x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
        else:
            gram = x @ x.mT
            x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    if tall:
        x = x.mT
    return x.to(update.dtype)


def update_scale(rows: int, cols: int, kind: str) -> float:
    if kind == "original":
        return math.sqrt(max(1.0, rows / cols))
    return 0.2 * math.sqrt(max(rows, cols))


def is_dtensor(tensor: torch.Tensor) -> bool:
    """isinstance(tensor, DTensor) without importing torch.distributed.tensor (0.65 s at start-up): no DTensor
    can exist before that module is imported."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 0.02, weight_decay: float = 0.0, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5, ns_dtype: str = "float32",
                 update_scale: str = "original"):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        ns_dtype=ns_dtype, update_scale=update_scale, blocks=None)
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["blocks"] is None:
                group["blocks"] = [()] * len(group["params"])
            for p, blocks in zip(group["params"], group["blocks"]):
                if p.ndim not in (2, 3):
                    raise ValueError(f"Muon takes matrices or stacks of matrices, got shape {tuple(p.shape)}")
                if blocks and sum(blocks) != p.shape[-2]:
                    raise ValueError(f"blocks {blocks} do not add up to the {p.shape[-2]} rows of a matrix")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum, dtype = group["lr"], group["momentum"], getattr(torch, group["ns_dtype"])
            for p, blocks in zip(group["params"], group["blocks"]):
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                p.mul_(1 - lr * group["weight_decay"])
                sizes = list(blocks) or [p.shape[-2]]
                if is_dtensor(p):
                    from torch.distributed.tensor import distribute_tensor

                    # FSDP2 shards rows: orthogonalize the gathered full matrices, keep this rank's rows
                    full = update.full_tensor()
                    step = torch.cat([orthogonalize(u, group["ns_steps"], dtype)
                                      * update_scale(u.shape[-2], u.shape[-1], group["update_scale"])
                                      for u in full.split(sizes, dim=-2)], dim=-2)
                    local = distribute_tensor(step, p.device_mesh, p.placements, src_data_rank=None).to_local()
                    p.to_local().add_(local, alpha=-lr)
                    continue
                for p_block, u_block in zip(p.split(sizes, dim=-2), update.split(sizes, dim=-2)):
                    scale = update_scale(p_block.shape[-2], p_block.shape[-1], group["update_scale"])
                    p_block.add_(orthogonalize(u_block, group["ns_steps"], dtype), alpha=-lr * scale)
        return loss

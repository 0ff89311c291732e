"""Weight decay by norm role (docs/paper-notes.md section 3).

- Input-Norm, y = W (γ ⊙ x̂): with decoupled decay on γ and W, the gradient terms of
  d(γ_j² − ||w_j||²)/dt cancel and decay shrinks the imbalance geometrically, so γ and w balance;
  a balanced factorization of the same effective weight has a flatter loss (lower top Hessian
  eigenvalue, measured by power iteration on Hessian-vector products).
- Output-Norm, logits = γ ⊙ Norm(W x): γ alone sets how peaked the output can be; decaying it
  raises the loss the model can reach.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .common import figure, finish, regression_problem


def _regression_loss(params, x, y):
    w, gamma = params
    return 0.5 * (x @ (w * gamma).T - y).pow(2).sum(-1).mean()


def top_hessian_eigenvalue(loss_fn, params: list[torch.Tensor], iters: int = 100) -> float:
    params = [p.detach().clone().requires_grad_() for p in params]
    gen = torch.Generator().manual_seed(0)
    vec = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    value = 0.0
    for _ in range(iters):
        norm = torch.sqrt(sum((v * v).sum() for v in vec))
        vec = [v / norm for v in vec]
        grads = torch.autograd.grad(loss_fn(params), params, create_graph=True)
        hv = torch.autograd.grad(grads, params, grad_outputs=vec)
        value = sum((h * v).sum() for h, v in zip(hv, vec)).item()
        vec = [h.detach() for h in hv]
    return value


LR_INPUT = 0.05


def train_input_norm(decay: float, steps: int, lr: float = LR_INPUT):
    """GD with decoupled decay from an imbalanced start (large γ, small w)."""
    x, y = regression_problem(256, 16, 8, seed=0)
    gen = torch.Generator().manual_seed(1)
    params = [(torch.randn(8, 16, generator=gen, dtype=torch.float64) * 0.05).requires_grad_(),
              torch.full((16,), 3.0, dtype=torch.float64).requires_grad_()]
    imbalance = []
    for _ in range(steps):
        imbalance.append((params[1] ** 2 - params[0].pow(2).sum(0)).abs().mean().item())
        grads = torch.autograd.grad(_regression_loss(params, x, y), params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.mul_(1 - lr * decay).sub_(lr * g)
    loss = _regression_loss(params, x, y).item()
    sharpness = top_hessian_eigenvalue(lambda ps: _regression_loss(ps, x, y), params)
    return imbalance, loss, sharpness


def train_output_norm(decay: float, steps: int, lr: float = 0.5) -> list[float]:
    """logits = γ ⊙ RMSNorm(W x) on a separable 8-class problem; decay on γ only (its Output scale)."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(512, 16, generator=gen, dtype=torch.float64)
    labels = (x @ torch.randn(16, 8, generator=gen, dtype=torch.float64)).argmax(-1)
    w = (torch.randn(8, 16, generator=gen, dtype=torch.float64) * 0.1).requires_grad_()
    gamma = torch.ones(8, dtype=torch.float64, requires_grad=True)
    losses = []
    for _ in range(steps):
        z = x @ w.T
        loss = F.cross_entropy(gamma * z / z.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt(), labels)
        losses.append(loss.item())
        gw, gg = torch.autograd.grad(loss, (w, gamma))
        with torch.no_grad():
            w -= lr * gw
            gamma.mul_(1 - lr * decay).sub_(lr * gg)
    return losses


def run(out: Path, fast: bool = False) -> dict:
    steps = 300 if fast else 2000
    decay = 0.05
    imb_decay, loss_decay, sharp_decay = train_input_norm(decay, steps)
    imb_plain, loss_plain, sharp_plain = train_input_norm(0.0, steps)
    out_plain, out_decay = train_output_norm(0.0, steps), train_output_norm(decay, steps)
    summary = {
        "claim": "decay balances γ² and ||w||² and lowers sharpness for an Input-Norm scale; "
                 "it raises the reachable loss for an Output-Norm scale",
        "optimizer": "plain gradient descent with decoupled weight decay, float64",
        "weight_decay": decay,
        "input_norm": {
            "imbalance_start": imb_decay[0],
            "imbalance_end": {"decay": imb_decay[-1], "no_decay": imb_plain[-1]},
            "final_loss": {"decay": loss_decay, "no_decay": loss_plain},
            "top_hessian_eigenvalue": {"decay": sharp_decay, "no_decay": sharp_plain},
        },
        "output_norm": {"final_loss": {"decay": out_decay[-1], "no_decay": out_plain[-1]}},
    }
    # d(γ² − ||w||²)/dt = −2λ(γ² − ||w||²): each GD step multiplies the imbalance by about (1 − lr·λ)²
    predicted = (1 - LR_INPUT * decay) ** (2 * (steps - 1))
    measured = imb_decay[-1] / imb_decay[0]
    summary["input_norm"]["imbalance_ratio"] = {"measured": measured, "predicted_exp_minus_2_lr_decay_t": predicted,
                                                "no_decay": imb_plain[-1] / imb_plain[0]}
    summary["holds"] = (abs(measured / predicted - 1) < 0.1 and abs(imb_plain[-1] / imb_plain[0] - 1) < 0.05
                        and sharp_decay < sharp_plain and out_decay[-1] > out_plain[-1])
    fig, axes = figure(2, width=4.5)
    axes[0].plot(imb_decay, label=f"decay {decay}")
    axes[0].plot(imb_plain, label="no decay", linestyle="--")
    axes[0].set(yscale="log", xlabel="GD step", ylabel="mean |γ² − ||w||²|",
                title=f"Input-Norm balance (λmax {sharp_decay:.2f} vs {sharp_plain:.2f})")
    axes[0].legend()
    axes[1].plot(out_decay, label=f"decay {decay} on γ")
    axes[1].plot(out_plain, label="no decay", linestyle="--")
    axes[1].set(yscale="log", xlabel="GD step", ylabel="cross-entropy", title="Output-Norm: logits = γ ⊙ Norm(Wx)")
    axes[1].legend()
    return finish(fig, out, "weight-decay", summary)

"""Weight decay by norm role (docs/paper-notes.md section 3), one test run on both roles.

The same noisy 8-class task is fitted by two models that differ only in where γ sits:
- Input-Norm:  logits = W (γ ⊙ Norm(x)), the effective weight A = W diag γ;
- Output-Norm: logits = γ ⊙ Norm(W x), where Norm removes any scale of W.

Each model is trained four times by gradient descent with decoupled decay λ on: nothing, the matrix only,
the matrix and γ (IWD's choice for an Input-Norm), γ only. From those runs the test of a role measures:
- absorbed: decaying γ alone leaves the reachable loss where no decay leaves it (the matrix absorbs the
  scale: A = (W/c) diag(cγ));
- loss cost under IWD: with the matrix decayed either way, decaying γ too raises the reachable loss;
- flatter: the end point of the γ-decayed run is flatter (top Hessian eigenvalue of the loss in all
  parameters) than the same function written in the factorization the matrix-only run ended with.

The paper: an Input-Norm γ passes all three (decay on it is free and flattens); an Output-Norm γ is not
absorbed (decay on it raises the loss). Each role's test, run on the other role, is the control.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .common import figure, finish, single_threaded

ROLES = ("input", "output")
POLICIES = {"none": (False, False), "matrix": (True, False), "matrix+gamma": (True, True), "gamma": (False, True)}
TOLERANCE = 0.02  # a relative loss change below 2% of what training gained counts as "not raised"
FLATTER = 0.9  # "flatter" means the top Hessian eigenvalue falls by at least 10%


def rms_norm(z: torch.Tensor) -> torch.Tensor:
    return z / z.pow(2).mean(-1, keepdim=True).add(1e-12).sqrt()


def classification_task(n: int = 512, d: int = 16, k: int = 8, temperature: float = 3.0, seed: int = 0):
    """Inputs and labels drawn from a softmax teacher, so the cross-entropy has a finite minimum, float64."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    teacher = torch.randn(k, d, generator=gen, dtype=torch.float64) * temperature / d**0.5
    labels = torch.multinomial(F.softmax(rms_norm(x) @ teacher.T, -1), 1, generator=gen).squeeze(-1)
    return x, labels


def logits(role: str, w: torch.Tensor, gamma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return rms_norm(x) @ (w * gamma).T if role == "input" else gamma * rms_norm(x @ w.T)


def loss(role: str, w: torch.Tensor, gamma: torch.Tensor, task) -> torch.Tensor:
    x, labels = task
    return F.cross_entropy(logits(role, w, gamma, x), labels)


def initial_params(role: str, task, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    x, labels = task
    k, d = int(labels.max()) + 1, x.shape[1]
    w = torch.randn(k, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 0.1
    return w, torch.ones(d if role == "input" else k, dtype=torch.float64)


@single_threaded
def train(role: str, task, decay_matrix: float, decay_gamma: float, steps: int, lr: float, sharpness_every: int = 0):
    """GD with decoupled decay (p ← (1 − lr·λ)p − lr·∇p L); returns (w, γ, losses, [(step, top Hessian eigenvalue)])."""
    w, gamma = (p.requires_grad_() for p in initial_params(role, task))
    losses, sharpness_curve = [], []
    for step in range(steps):
        value = loss(role, w, gamma, task)
        losses.append(value.item())
        if sharpness_every and step % sharpness_every == 0:
            sharpness_curve.append((step, sharpness(lambda w_, g_: loss(role, w_, g_, task), [w, gamma])))
        grad_w, grad_gamma = torch.autograd.grad(value, (w, gamma))
        with torch.no_grad():
            w.mul_(1 - lr * decay_matrix).sub_(lr * grad_w)
            gamma.mul_(1 - lr * decay_gamma).sub_(lr * grad_gamma)
    losses.append(loss(role, w, gamma, task).item())
    return w.detach(), gamma.detach(), losses, sharpness_curve


def sharpness(loss_fn, params: list[torch.Tensor]) -> float:
    """Top eigenvalue of the Hessian of loss_fn in all its parameters, exact (small toys only)."""
    sizes = [p.numel() for p in params]
    flat = torch.cat([p.detach().reshape(-1) for p in params])

    def flat_loss(v: torch.Tensor) -> torch.Tensor:
        return loss_fn(*[part.view_as(p) for part, p in zip(v.split(sizes), params)])

    return torch.linalg.eigvalsh(torch.autograd.functional.hessian(flat_loss, flat)).max().item()


def refactor(role: str, w: torch.Tensor, gamma: torch.Tensor, like_w: torch.Tensor, like_gamma: torch.Tensor):
    """The same function as (w, γ), written with the free part of the factorization taken from (like_w, like_γ).

    Input-Norm: column j of A = W diag γ is fixed; its split γ_j / ||w_j|| is copied. Output-Norm: γ and the
    direction of W are fixed; only ||W|| is free (Norm removes it), and it is copied."""
    if role == "input":
        column_norms = (w * gamma).norm(dim=0)
        new_gamma = (column_norms * like_gamma.abs() / like_w.norm(dim=0)).sqrt()
        return w * gamma / new_gamma, new_gamma
    return w * (like_w.norm() / w.norm()), gamma.clone()


def imbalance(w: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """γ_j² − ||w_j||² per input channel of an Input-Norm (conserved by gradient flow, shrunk by decay)."""
    return gamma**2 - w.pow(2).sum(0)


@single_threaded
def role_test(role: str, task, decay: float, steps: int, lr: float) -> tuple[dict, dict]:
    """The four runs of one role and the readings of both roles' claims on them; returns (result, runs)."""
    every = max(1, steps // 10)
    runs = {name: train(role, task, decay * m, decay * g, steps, lr, every if m else 0)
            for name, (m, g) in POLICIES.items()}
    start = runs["none"][2][0]
    final = {name: run[2][-1] for name, run in runs.items()}
    # rises relative to what training gained, so "not raised" means the same thing in both models
    absorbed_rise = (final["gamma"] - final["none"]) / (start - final["none"])
    iwd_rise = (final["matrix+gamma"] - final["matrix"]) / (start - final["matrix"])
    w, gamma = runs["matrix+gamma"][:2]
    own = sharpness(lambda w_, g_: loss(role, w_, g_, task), [w, gamma])
    as_matrix_only = sharpness(lambda w_, g_: loss(role, w_, g_, task),
                               list(refactor(role, w, gamma, *runs["matrix"][:2])))
    result = {
        "final_loss": final,
        "loss_rise_decaying_gamma_alone": absorbed_rise,
        "loss_rise_decaying_gamma_with_its_matrix": iwd_rise,
        "top_hessian_eigenvalue_at_matrix+gamma_end": {
            "own_factorization": own, "matrix_only_factorization": as_matrix_only, "ratio": own / as_matrix_only},
        "top_hessian_eigenvalue_max_during_training": {name: max(v for _, v in runs[name][3])
                                                       for name in ("matrix", "matrix+gamma")},
        "gamma_mean_end": {name: run[1].mean().item() for name, run in runs.items()},
        "absorbed": abs(absorbed_rise) < TOLERANCE,
        "no_loss_cost_with_matrix_decayed": iwd_rise < TOLERANCE,
        "flatter_at_same_function": own / as_matrix_only < FLATTER,
    }
    result["input_claim_holds"] = (result["absorbed"] and result["no_loss_cost_with_matrix_decayed"]
                                   and result["flatter_at_same_function"])
    result["output_claim_holds"] = absorbed_rise > TOLERANCE  # decay on γ raises the loss, nothing absorbs it
    return result, runs


@single_threaded
def run(out: Path, fast: bool = False) -> dict:
    steps, lr, decay = (2000 if fast else 4000), 0.5, 0.05
    task = classification_task()
    results, runs = {}, {}
    for role in ROLES:
        results[role], runs[role] = role_test(role, task, decay, steps, lr)
    # the balancing identity: with γ and W decayed, γ_j² − ||w_j||² shrinks by (1 − lr·λ)² per step
    balance_steps = 100
    w, gamma = initial_params("input", task)
    w_end, gamma_end = train("input", task, decay, decay, balance_steps, lr)[:2]
    results["input"]["imbalance_ratio_after_100_steps"] = {
        "measured": (imbalance(w_end, gamma_end).abs().sum() / imbalance(w, gamma).abs().sum()).item(),
        "gradient_flow": (1 - lr * decay) ** (2 * balance_steps)}
    summary = {
        "claim": "decay on an Input-Norm γ is absorbed by its matrix, costs no loss when the matrix decays too, "
                 "and flattens the loss at the same function; decay on an Output-Norm γ raises the reachable loss",
        "setup": f"one noisy 8-class softmax task (512 points, 16 features), cross-entropy, γ before W (Input-Norm) "
                 f"or after Norm(W x) (Output-Norm); gradient descent lr {lr}, {steps} steps, decoupled weight decay "
                 f"{decay} on nothing, the matrix, the matrix and γ, or γ alone; float64",
        "tolerance": {"loss_rise_relative_to_training_gain": TOLERANCE, "flatter_eigenvalue_ratio": FLATTER},
        "measured": {"input_norm": results["input"], "output_norm": results["output"]},
        "control": {
            "input_norm_claim_on_output_norm": results["output"]["input_claim_holds"],
            "output_norm_claim_on_input_norm": results["input"]["output_claim_holds"],
        },
    }
    summary["holds"] = (results["input"]["input_claim_holds"] and results["output"]["output_claim_holds"]
                        and not results["output"]["input_claim_holds"]
                        and not results["input"]["output_claim_holds"])
    fig, axes = figure(3, width=4.2)
    for ax, role in zip(axes, ROLES):
        for name, curve in runs[role].items():
            ax.plot(curve[2], label=name)
        ax.set(xlabel="GD step", ylabel="cross-entropy", title=f"{role}-norm γ: decay on ...")
        ax.legend()
    for role, style in zip(ROLES, ("-", "--")):
        for name in ("matrix", "matrix+gamma"):
            steps_, values = zip(*runs[role][name][3])
            axes[2].plot(steps_, values, linestyle=style, label=f"{role}: {name}")
    axes[2].axhline(2 / lr, color="k", linewidth=0.8, label="2 / lr")
    axes[2].set(yscale="log", xlabel="GD step", ylabel="top Hessian eigenvalue", title="sharpness during training")
    axes[2].legend(fontsize=7)
    return finish(fig, out, "weight-decay", summary)

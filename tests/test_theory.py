"""Theory lab: the building blocks against analytic values, and each claim against its control (fast versions)."""

import json

import pytest
import torch

from scalevec import ModelConfig, fold_scales
from scalevec.cli import main
from scalevec.theory import EXPERIMENTS, describe, dual_placement, fold, preconditioning
from scalevec.theory import weight_decay as wd
from scalevec.theory.common import regression_problem


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    out = tmp_path_factory.mktemp("theory")
    return out, {name: run(out, fast=True) for name, run in EXPERIMENTS.items()}


def test_every_experiment_writes_png_and_summary_with_claim_and_control(lab):
    out, summaries = lab
    for name, summary in summaries.items():
        assert (out / f"{name}.png").stat().st_size > 1000
        assert json.loads((out / f"{name}.json").read_text()) == json.loads(json.dumps(summary))
        assert {"claim", "setup", "measured", "control", "holds"} <= set(summary), name


# --- analytic building blocks -------------------------------------------------------------------------------


def test_sharpness_of_known_quadratics():
    # scalar factorization a = γ·w at the minimum of ½h(γw − a*)²: the Hessian is h [[w², γw], [γw, γ²]],
    # top eigenvalue h(γ² + w²); balanced γ = w = √a* is the flattest split of the same a*
    h, target = 3.0, 4.0

    def loss(gamma, w):
        return 0.5 * h * (gamma * w - target).pow(2).sum()

    for gamma in (2.0, 4.0, 0.5):
        w = target / gamma
        value = wd.sharpness(loss, [torch.tensor([gamma], dtype=torch.float64), torch.tensor([w], dtype=torch.float64)])
        assert value == pytest.approx(h * (gamma**2 + w**2), rel=1e-12)
    matrix = torch.tensor([[2.0, 1.0], [1.0, 5.0]], dtype=torch.float64)
    value = wd.sharpness(lambda v: 0.5 * v @ matrix @ v, [torch.zeros(2, dtype=torch.float64)])
    assert value == pytest.approx((7 + 13**0.5) / 2, rel=1e-12)


def test_decoupled_decay_step_shrinks_the_imbalance_exactly():
    # one GD step with decoupled decay: the gradient cross terms cancel (γ_j ∂L/∂γ_j = w_j·∂L/∂w_j), leaving
    # imbalance' = (1 − lr·λ)² imbalance + lr² (g_γj² − ||g_wj||²)
    task, lr, decay = wd.classification_task(), 0.3, 0.2
    w, gamma = (p.requires_grad_() for p in wd.initial_params("input", task))
    grad_w, grad_gamma = torch.autograd.grad(wd.loss("input", w, gamma, task), (w, gamma))
    w_end, gamma_end = wd.train("input", task, decay, decay, 1, lr)[:2]
    expected = ((1 - lr * decay) ** 2 * wd.imbalance(w.detach(), gamma.detach())
                + lr**2 * (grad_gamma**2 - grad_w.pow(2).sum(0)))
    assert torch.allclose(wd.imbalance(w_end, gamma_end), expected, rtol=0, atol=1e-13)
    # decay on W alone grows the imbalance instead: γ is left free to outgrow the matrix
    w_m, gamma_m = wd.train("input", task, decay, 0.0, 1, lr)[:2]
    assert (wd.imbalance(w_m, gamma_m) > wd.imbalance(w.detach(), gamma.detach())).all()


def test_imbalance_follows_gradient_flow_as_lr_shrinks():
    # over the same time lr·t, the ratio approaches (1 − lr·λ)^{2t} ≈ exp(−2λ·lr·t) as the GD step shrinks
    task, decay = wd.classification_task(), 0.05
    w0, gamma0 = wd.initial_params("input", task)
    errors = []
    for lr, steps in ((0.5, 40), (0.05, 400)):
        w, gamma = wd.train("input", task, decay, decay, steps, lr)[:2]
        ratio = wd.imbalance(w, gamma).abs().sum() / wd.imbalance(w0, gamma0).abs().sum()
        errors.append(abs(ratio.item() / (1 - lr * decay) ** (2 * steps) - 1))
    assert errors[1] < 0.2 * errors[0] and errors[1] < 0.01


@pytest.mark.parametrize("role", wd.ROLES)
def test_refactor_keeps_the_function_and_copies_the_free_part(role):
    task = wd.classification_task()
    gen = torch.Generator().manual_seed(3)
    w, gamma = wd.initial_params(role, task)
    w, gamma = w * 5, gamma + torch.rand(gamma.shape, generator=gen, dtype=torch.float64)
    like_w = torch.randn(w.shape, generator=gen, dtype=torch.float64)
    like_gamma = 0.5 + torch.rand(gamma.shape, generator=gen, dtype=torch.float64)
    new_w, new_gamma = wd.refactor(role, w, gamma, like_w, like_gamma)
    x = task[0]
    assert torch.allclose(wd.logits(role, new_w, new_gamma, x), wd.logits(role, w, gamma, x), rtol=1e-10, atol=0)
    if role == "input":
        assert torch.allclose(new_gamma / new_w.norm(dim=0), like_gamma / like_w.norm(dim=0), rtol=1e-12)
    else:
        assert new_w.norm().item() == pytest.approx(like_w.norm().item(), rel=1e-12)
        assert torch.equal(new_gamma, gamma)


def _gradients(seed: int = 0):
    x, y = regression_problem(256, 16, 8, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    w = (torch.randn(8, 16, generator=gen, dtype=torch.float64) * 0.5).requires_grad_()
    gamma = (1 + 0.5 * torch.rand(16, generator=gen, dtype=torch.float64)).requires_grad_()
    a = (w * gamma).detach().requires_grad_()
    g = torch.autograd.grad(preconditioning._loss(a, x, y), a)[0]
    grad_w, grad_gamma = torch.autograd.grad(preconditioning._loss(w * gamma, x, y), (w, gamma))
    return x, y, w.detach(), gamma.detach(), g, grad_w, grad_gamma


def test_first_order_error_is_exactly_the_second_order_term():
    # (w − lr g_w)(γ − lr g_γ) − wγ = −lr·P·g + lr² g_w g_γ, so the relative error is lr·||g_w g_γ|| / ||P g||
    _, _, w, gamma, g, grad_w, grad_gamma = _gradients()
    slope = ((grad_w * grad_gamma).norm() / preconditioning.preconditioned_step(w, gamma, g, 1.0).norm()).item()
    for lr in (1e-2, 1e-3, 1e-4):
        assert preconditioning.first_order_check(lr) == pytest.approx(lr * slope, rel=1e-8)


def test_descent_rate_is_g_p_g():
    # −dL/dt under gradient descent on (W, γ) is ||∇L||² = Σ_j g_jᵀ P_j g_j ≥ min γ² ||g||² (Theorem 2.2)
    _, _, w, gamma, g, grad_w, grad_gamma = _gradients()
    rate = (grad_w.pow(2).sum() + grad_gamma.pow(2).sum()).item()
    assert rate == pytest.approx(-(preconditioning.preconditioned_step(w, gamma, g, 1.0) * g).sum().item(), rel=1e-12)
    assert rate >= gamma.min().item() ** 2 * g.pow(2).sum().item()


def test_matched_lr_equalizes_the_first_step():
    # the step size matched at A0 makes the first loss decrease equal to first order: the mismatch shrinks with lr
    x, y = regression_problem(256, 16, 8, seed=0, teacher_scale=3.0)
    w0, gamma0 = preconditioning.start()
    mismatch = []
    for lr in (1e-2, 1e-3):
        lr_without = preconditioning.matched_lr(w0, gamma0, x, y, lr)
        drop_with = -torch.tensor(preconditioning.train(x, y, lr, 1, True, w0, gamma0)[0]).diff().item()
        drop_without = -torch.tensor(preconditioning.train(x, y, lr_without, 1, False, w0, gamma0)[0]).diff().item()
        mismatch.append(abs(drop_with / drop_without - 1))
    assert 8 < mismatch[0] / mismatch[1] < 12


def test_one_step_moves_the_balance_by_lr_squared_only():
    # γ_j² − ||w_j||² is conserved by gradient flow; one GD step moves it by exactly lr² (g_γj² − ||g_wj||²)
    x, y, w, gamma, _, grad_w, grad_gamma = _gradients()
    lr = 0.05
    _, history = preconditioning.train(x, y, lr, 1, True, w, gamma)
    (gamma_sq0, w_sq0), (gamma_sq1, w_sq1) = history
    expected = lr**2 * (grad_gamma**2 - grad_w.pow(2).sum(0))
    assert torch.allclose((gamma_sq1 - w_sq1) - (gamma_sq0 - w_sq0), expected, rtol=0, atol=1e-14)


def test_dual_placement_rate_difference_is_the_closed_form():
    # rate(dual) − rate(column only) = Σ_ij (u_i² − 1) v_j² G_ij² + ||∇_u L||², G = ∂L/∂A
    x, y = regression_problem(256, 16, 8, seed=0)
    gen = torch.Generator().manual_seed(9)
    u = 0.5 + torch.rand(8, generator=gen, dtype=torch.float64)
    w = torch.randn(8, 16, generator=gen, dtype=torch.float64) * 0.3
    v = 0.5 + torch.rand(16, generator=gen, dtype=torch.float64)
    a = (u[:, None] * w * v).requires_grad_()
    big_g = torch.autograd.grad(dual_placement._loss(a, x, y), a)[0]
    grad_u = (big_g * w * v).sum(1)
    dual, column = dual_placement.rates(u, w, v, x, y)
    expected = ((u[:, None] ** 2 - 1) * v**2 * big_g**2).sum() + grad_u.pow(2).sum()
    assert dual - column == pytest.approx(expected.item(), rel=1e-10)


# --- each claim against its control ---------------------------------------------------------------------------


def test_weight_decay_absorbed_and_flatter_for_input_norm_only(lab):
    s = lab[1]["weight-decay"]
    inp, outp = s["measured"]["input_norm"], s["measured"]["output_norm"]
    # decay on γ alone: the Input-Norm's matrix absorbs it, the Output-Norm's cannot
    assert abs(inp["loss_rise_decaying_gamma_alone"]) < 0.02
    assert outp["loss_rise_decaying_gamma_alone"] > 0.1
    # at the same function, the γ-decayed run's factorization is flatter for the Input-Norm, not for the Output-Norm
    assert inp["top_hessian_eigenvalue_at_matrix+gamma_end"]["ratio"] < 0.5
    assert outp["top_hessian_eigenvalue_at_matrix+gamma_end"]["ratio"] > 1
    # without decay on γ, the Input-Norm's γ outgrows its matrix and the loss sharpens toward 2/lr
    assert inp["top_hessian_eigenvalue_max_during_training"]["matrix"] > 5 * inp[
        "top_hessian_eigenvalue_max_during_training"]["matrix+gamma"]
    # the controls: each role's claim does not hold on the other role
    assert s["control"] == {"input_norm_claim_on_output_norm": False, "output_norm_claim_on_input_norm": False}
    assert outp["output_claim_holds"] and not outp["input_claim_holds"]
    # what this toy does not reproduce: with the matrix decayed too, decaying the Input-Norm γ raises the loss
    # (more than decaying the Output-Norm γ does), so the paper's statement as a whole does not hold here
    assert inp["loss_rise_decaying_gamma_with_its_matrix"] > outp["loss_rise_decaying_gamma_with_its_matrix"] > 0.05
    assert not inp["input_claim_holds"] and s["holds"] is False


def test_weight_decay_claim_reading_on_a_role_is_the_tolerance():
    # the control run through the claim's own reading: a run where nothing absorbs γ's decay fails the Input test
    task = wd.classification_task()
    result, _ = wd.role_test("output", task, 0.05, 300, 0.5)
    assert result["loss_rise_decaying_gamma_alone"] > wd.TOLERANCE and not result["absorbed"]
    assert not result["input_claim_holds"] and result["output_claim_holds"]


def test_self_amplification_only_where_the_weights_grow(lab):
    s = lab[1]["preconditioning"]
    grow, shrink = s["measured"]["weights_grow"], s["control"]["weights_shrink"]
    assert grow["channels_where_gamma_grew"] == grow["channels"] == 16
    assert grow["gamma_squared_mean"]["end"] > 2 * grow["gamma_squared_mean"]["start"]
    for reached in grow["steps_to_relative_excess_loss"].values():
        assert reached["with_gamma"] < reached["without_gamma"]
    # the control: the same start with a small teacher, γ falls and the matched model without γ wins
    assert shrink["channels_where_gamma_grew"] == 0
    assert shrink["gamma_squared_mean"]["end"] < 0.5 * shrink["gamma_squared_mean"]["start"]
    for reached in shrink["steps_to_relative_excess_loss"].values():
        assert reached["with_gamma"] is None or reached["with_gamma"] > reached["without_gamma"]
    assert grow["claim_holds"] and not shrink["claim_holds"] and s["holds"]
    # the steps are matched: the model without γ starts with a step size no smaller than lr (P ≥ I at γ0 = 1)
    assert grow["lr_without_gamma_matched"] >= grow["lr_with_gamma"]


def test_fold_adds_no_expressivity_except_behind_a_norm(lab):
    s = lab[1]["fold"]
    for name, r in s["measured"].items():
        assert r["max_abs_logit_change"] < 1e-5 * max(1.0, r["logit_scale"]), name
    assert s["measured"]["standard"]["unfolded_scale_entries"] == 0
    assert s["measured"]["unified"]["unfolded_scale_entries"] > 0  # DNP output scales sit behind a norm
    control = s["control"]["unified_dnp_output_scales_folded_as_rows"]
    assert control["scale_entries_moved"] > 0 and control["max_abs_logit_change"] > 0.1 * control["logit_scale"]
    assert s["holds"]


@pytest.mark.parametrize("name, shape", [("gemma+hg", {"norm": "layer"}), ("unified", {"moe_experts": 3}),
                                         ("dnp+er", {"tie_embeddings": True, "n_kv_heads": 1})])
def test_fold_claim_and_control_on_other_models(name, shape):
    # the lab's building blocks called directly (grad mode on), on shapes the lab does not use
    config = ModelConfig(**{"vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 48,
                            "max_seq_len": 16, **shape})
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(4))
    model = fold.perturbed_model(config, name)
    with torch.no_grad():
        before = model(tokens)
        fold_scales(model)
        assert (model(tokens) - before).abs().max() < 1e-5 * before.abs().max()
    model = fold.perturbed_model(config, name)
    assert fold.fold_behind_norm_as_rows(model) > 0
    with torch.no_grad():
        assert (model(tokens) - before).abs().max() > 0.1 * before.abs().max()


def test_dual_placement_needs_u_ge_1(lab):
    s = lab[1]["dual-placement"]
    assert s["measured"]["min_rate_ratio_dual_over_column"] >= 1.0
    assert s["control"]["fraction_slower"] > 0.5 and s["control"]["min_rate_ratio_dual_over_column"] < 1
    assert s["measured"]["gd_final_loss"]["dual"] <= s["measured"]["gd_final_loss"]["column_only"]


def test_reparam_gives_d_fold_magnitude_rate(lab):
    s = lab[1]["reparam"]
    for r in s["control"]["plain"].values():
        if isinstance(r, dict):
            assert r["magnitude_rate"] == pytest.approx(1.0, rel=1e-6)
    for param in ("or", "er"):
        for d, r in s["measured"][param].items():
            if d == "claim_holds":
                continue
            assert r["magnitude_rate"] == pytest.approx(int(d), rel=1e-3)
            assert r["orthogonal_rate"] == pytest.approx(1.0, rel=1e-3)
            assert r["eigen_max"] == pytest.approx(int(d), rel=1e-9)
            assert r["eigen_min"] == pytest.approx(1.0, rel=1e-9)
    assert s["control"]["plain"]["claim_holds"] is False and s["holds"]


def test_describe_prints_measured_control_and_a_failed_claim():
    lines = describe({"claim": "c", "measured": {"a": {"b": 0.123456}, "r": [1.0, 2.5]}, "control": {"x": True},
                      "holds": False})
    assert lines[0] == "claim: c"
    assert "  measured: a.b = 0.1235" in lines and "  measured: r = [1, 2.5]" in lines
    assert "  control: x = true" in lines and lines[-1].startswith("holds: false")


def test_cli(tmp_path, capsys):
    assert main(["theory", "reparam", "--fast", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("reparam: claim: OR and ER") and "  control: plain.4.magnitude_rate = 1" in out
    assert "holds: true" in out and (tmp_path / "reparam.png").exists()

"""Issue "Theory lab": each claim measured (fast versions), with explicit tolerances."""

import json

import pytest

from scalevec.cli import main
from scalevec.theory import EXPERIMENTS


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    out = tmp_path_factory.mktemp("theory")
    return out, {name: run(out, fast=True) for name, run in EXPERIMENTS.items()}


@pytest.mark.slow
def test_every_experiment_writes_png_and_summary(lab):
    out, summaries = lab
    for name, summary in summaries.items():
        assert (out / f"{name}.png").stat().st_size > 1000
        assert json.loads((out / f"{name}.json").read_text()) == json.loads(json.dumps(summary))


def test_fold_adds_no_expressivity(lab):
    results = lab[1]["fold"]["strategies"]
    for name, r in results.items():
        assert r["max_abs_logit_change"] < 1e-5 * max(1.0, r["logit_scale"]), name
    assert results["standard"]["unfolded_scale_entries"] == 0
    assert results["unified"]["unfolded_scale_entries"] > 0  # DNP output scales sit behind a norm


def test_preconditioning(lab):
    s = lab[1]["preconditioning"]
    errors = {float(k): v for k, v in s["first_order_relative_error"].items()}
    assert errors[1e-4] < 1e-3  # Δa = −lr·P·g up to O(lr²)
    assert 8 < errors[1e-3] / errors[1e-4] < 12 and 8 < errors[1e-2] / errors[1e-3] < 12
    assert s["balance_drift_relative_to_gamma_squared_change"] < 0.05  # γ² − ||w||² conserved, γ² is not
    assert s["hypothesis_gamma_ge_1_held"] and s["descent_rate_gamma_min"] >= 1
    assert s["descent_rate_with_gamma"] >= s["descent_rate_without_gamma"]
    assert s["loss_with_gamma_le_without_at_every_step"]
    assert s["tiny_lm_final_loss"]["standard"] < s["tiny_lm_final_loss"]["none"]


def test_weight_decay_by_role(lab):
    s = lab[1]["weight-decay"]
    ratio = s["input_norm"]["imbalance_ratio"]
    assert ratio["measured"] == pytest.approx(ratio["predicted_exp_minus_2_lr_decay_t"], rel=0.1)
    assert ratio["no_decay"] == pytest.approx(1.0, abs=0.05)
    sharp = s["input_norm"]["top_hessian_eigenvalue"]
    assert sharp["decay"] < 0.5 * sharp["no_decay"]
    loss = s["output_norm"]["final_loss"]
    assert loss["decay"] > loss["no_decay"] + 0.1
    assert s["holds"]


def test_dual_placement(lab):
    s = lab[1]["dual-placement"]
    assert s["holds"] and s["min_rate_ratio_dual_over_column_u_ge_1"] >= 1.0
    assert s["fraction_slower_when_u_lt_1"] > 0  # the hypothesis u >= 1 matters
    assert s["gd_final_loss"]["dual"] <= s["gd_final_loss"]["column_only"]


def test_reparam_gives_d_fold_magnitude_rate(lab):
    results = lab[1]["reparam"]["results"]
    for r in results["plain"].values():
        assert r["magnitude_rate"] == pytest.approx(1.0, rel=1e-6)
    for param in ("or", "er"):
        for d, r in results[param].items():
            assert r["magnitude_rate"] == pytest.approx(int(d), rel=1e-3)
            assert r["orthogonal_rate"] == pytest.approx(1.0, rel=1e-3)
            assert r["eigen_max"] == pytest.approx(int(d), rel=1e-9)
            assert r["eigen_min"] == pytest.approx(1.0, rel=1e-9)


def test_cli(tmp_path, capsys):
    assert main(["theory", "reparam", "--fast", "--out", str(tmp_path)]) == 0
    assert "reparam: OR and ER" in capsys.readouterr().out and (tmp_path / "reparam.png").exists()

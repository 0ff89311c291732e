"""Issue 28's suite options, fast: LR-grid ratio, per-size grids and seeds, `PRESET@N` training lengths, the compute
fit, `sweep --set`. The runs are replaced by records of a known loss law (no training), so every number the sweep and
the report derive from them is checked against that law."""

import json
import math
import statistics
import tomllib
from dataclasses import astuple

import numpy as np
import pytest

from scalevec.config import ConfigError, load_config, to_toml
from scalevec.experiments import sweep
from scalevec.experiments.report import FIT_DRAWS, compute_fit, write_report
from scalevec.experiments.sweep import Arm, Suite, load_suite, non_embedding_parameters, overrides, run_sweep
from scalevec.train.preempt import StopRequests

LADDER = ["cpu-d48", "cpu-0.5m", "cpu-d80", "cpu-1m", "cpu-2m"]
CONFIG = {"model": {"vocab_size": 512}, "data": {"vocab_size": 512},
          "train": {"batch_size": 4, "seq_len": 32, "eval_every": 10, "checkpoint_every": 10}}


def write_suite(tmp_path, **options) -> str:
    grid = {"strategies": ["standard", "unified"], "sizes": ["cpu-0.5m"], "optimizers": ["adamw"],
            "schedules": ["cosine"], "lrs": [0.004, 0.008], "muon_lrs": [0.02], "lr_seed": 100, "seeds": [0, 1],
            "tokens_per_parameter": 0.01, **options}
    lines = ['description = "test ladder"', 'baseline = "standard"', "[cpu]",
             *(f"{key} = {toml_value(value)}" for key, value in {**grid, "config": CONFIG}.items())]
    path = tmp_path / "ladder.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def toml_value(value) -> str:
    """A value as TOML (tables inline): JSON's literals, and `{ "key" = value }` for a table."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(map(toml_value, value)) + "]"
    return json.dumps(value)


def flops(suite: Suite, arm: Arm) -> float:
    """Training FLOPs of an arm's run, computed here from the model and the steps (not by the report)."""
    import torch

    from scalevec.model import Decoder
    from scalevec.summary import flops_per_token

    config = load_config(suite.config, overrides(suite, arm, 0.004, 0))
    with torch.device("meta"):
        model = Decoder(config.model, config.strategy, config.moe)
    t = config.train
    return flops_per_token(model, t.seq_len) * t.steps * t.batch_size * t.seq_len


def law(suite: Suite, arm: Arm, lr: float, seed: int, multiplier: float = 1.3, noise: float = 0.0) -> float:
    """L = 3 + 2·(m·C/1e9)^-0.3 (m = `multiplier` for unified, 1 for standard), a quadratic penalty in log-LR around
    the size's best LR (0.011 above cpu-0.5m, 0.006 below and at it), and per-seed noise."""
    m = multiplier if arm.strategy == "unified" else 1.0
    best = 0.011 if arm.size.split("@")[0] in ("cpu-d80", "cpu-1m", "cpu-2m") else 0.006
    jitter = noise * math.sin(7.1 * seed + len(arm.size) + (arm.strategy == "unified"))  # same seed, same jitter
    return 3 + 2 * (m * flops(suite, arm) / 1e9) ** -0.3 + 0.05 * math.log(lr / best) ** 2 + jitter


class Runs(list):
    options: dict


@pytest.fixture
def fake_runs(monkeypatch, tmp_path):
    """run_sweep with each run replaced by a record of `law` (its resolved config, final loss, a two-point curve);
    returns the runs made, and in .options the law's multiplier and noise."""
    ran = Runs()
    options = {"multiplier": 1.3, "noise": 0.005}

    def fake_run(spec, suite, out, results, base, threads, ood, stops):
        ran.append(spec)
        config = load_config(suite.config, spec.overrides(out, suite))
        tokens = config.train.steps * config.train.batch_size * config.train.seq_len
        loss = law(suite, spec.arm, spec.lr, spec.seed, **options)
        record = {"config": tomllib.loads(to_toml(config)), "device": "cpu", "dtype": "float32",
                  "final": {"step": config.train.steps, "tokens": tokens, "val_loss": loss}, "train_seconds": 1.0,
                  "wall_seconds": None, "curve": [{"tokens": 0, "val_loss": 6.0}, {"tokens": tokens, "val_loss": loss}]}
        if ood is not None:  # out of domain: 1.5 nats above, half the in-domain gap to the baseline
            record["ood"] = {ood[0]: 1.5 + loss - 0.5 * (loss - law(suite, Arm("standard", *astuple(spec.arm)[1:]),
                                                                    spec.lr, spec.seed, **options))}
        path = sweep.record_path(results, spec.arm, spec.lr, spec.seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record))
        return spec.path(out), None

    monkeypatch.setattr(sweep, "_run", fake_run)
    monkeypatch.setattr(sweep, "ood_windows", lambda *args: None)  # the fake runs score no windows
    monkeypatch.setattr("scalevec.data.prepare.prepare", lambda data, log: tmp_path)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "references.json").write_text("null")  # no count-based references in a fake sweep
    ran.options = options
    return ran


def sweep_fake(tmp_path, **options) -> tuple[Suite, dict]:
    suite = load_suite(write_suite(tmp_path, **options), "cpu")
    result = run_sweep(suite, tmp_path / "runs", log=lambda *_: None, results=tmp_path / "results")
    return suite, result


def test_an_edge_lr_is_extended_by_lr_ratio_and_rounded(fake_runs, tmp_path):
    """cpu-1m's best LR (0.011) lies above a √2 grid: it is extended by lr_ratio, rounded to 4 digits, until the
    best is inside; the default ratio keeps today's factor of 2 and today's record paths."""
    suite, result = sweep_fake(tmp_path, sizes=["cpu-1m"], lrs=[0.004, 0.005657, 0.008], lr_ratio=1.41421356,
                               extend_lrs=3)
    lr_runs = sorted(spec.lr for spec in fake_runs if spec.seed == 100 and spec.arm.strategy == "standard")
    assert lr_runs == [0.004, 0.005657, 0.008, 0.01131, 0.016]  # 0.008·√2 = 0.0113137, 0.01131·√2 = 0.015995
    assert result["best_lr"] == {"standard/cpu-1m/adamw-cosine": 0.01131, "unified/cpu-1m/adamw-cosine": 0.01131}
    assert (tmp_path / "results" / "records" / "standard" / "cpu-1m" / "adamw-cosine" / "lr0.01131" /
            "seed0.json").is_file()
    assert Suite.lr_ratio == 2.0
    # today's factor-2 extensions, and an edge run that failed (no record): its grid value is tried again
    assert [sweep.extension([0.004, 0.008, 0.016], best, up, 2.0) for best, up in (
        (0.016, True), (0.032, True), (0.004, False), (0.002, False), (0.008, True))] == [0.032, 0.064, 0.002, 0.001,
                                                                                         0.016]


def test_bad_lr_options_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"lr_ratio 1.0 must be above 1"):
        load_suite(write_suite(tmp_path, lr_ratio=1.0), "cpu")
    with pytest.raises(ConfigError, match=r"learning rate 0.0056568542 .* give it as 0.00565685"):
        load_suite(write_suite(tmp_path, lrs=[0.004, 0.0056568542]), "cpu")


def test_per_size_grids_and_seeds(fake_runs, tmp_path):
    """lrs_by_size and seeds_by_size replace lrs and seeds at their size only; the report pairs each size's own
    seeds and counts them against that size's plan."""
    suite, _ = sweep_fake(tmp_path, sizes=["cpu-0.5m", "cpu-1m"], lrs_by_size={"cpu-1m": [0.008, 0.011, 0.016]},
                          seeds_by_size={"cpu-1m": [0, 1, 2, 3]},
                          analyses=[{"name": "u", "baseline": "standard", "arms": {"unified": -0.04}}])
    runs = {(spec.arm.size, spec.lr, spec.seed) for spec in fake_runs if spec.arm.strategy == "unified"}
    assert {(lr, seed) for size, lr, seed in runs if size == "cpu-0.5m"} == {(0.004, 100), (0.008, 100),
                                                                          (0.008, 0), (0.008, 1)}
    assert {(lr, seed) for size, lr, seed in runs if size == "cpu-1m"} == {
        (0.008, 100), (0.011, 100), (0.016, 100), *((0.011, s) for s in range(4))}
    summary = write_report(tmp_path / "results")
    by_setting = {a["setting"]: a["arms"][0] for a in summary["analyses"]}
    assert by_setting["cpu-0.5m/adamw-cosine"]["n"] == 2 and by_setting["cpu-1m/adamw-cosine"]["n"] == 4
    expected = statistics.mean(law(suite, Arm("unified", "cpu-1m", "adamw", "cosine"), 0.011, s, **fake_runs.options)
                               - law(suite, Arm("standard", "cpu-1m", "adamw", "cosine"), 0.011, s, **fake_runs.options)
                               for s in range(4))
    assert by_setting["cpu-1m/adamw-cosine"]["delta"] == pytest.approx(expected, abs=1e-12)
    assert summary["seeds_planned_by_size"] == {"cpu-0.5m": 2, "cpu-1m": 4}
    assert "Interim" not in (tmp_path / "results" / "report.md").read_text()
    next((tmp_path / "results" / "records" / "unified" / "cpu-1m").rglob("seed3.json")).unlink()
    write_report(tmp_path / "results")
    report = (tmp_path / "results" / "report.md").read_text()
    assert "| unified | 3 of 4 |" in report and "| unified/cpu-0.5m/adamw-cosine | 0.008 (edge) | 2 |" in report


def test_a_sweep_size_by_size_keeps_the_whole_suite(fake_runs, tmp_path):
    """--sizes runs only those sizes, but suite.json keeps every size: the report of a ladder run size by size
    pairs each size recorded so far and names the others pending, and the last size's sweep completes it."""
    options = dict(sizes=["cpu-0.5m", "cpu-1m"], lrs_by_size={"cpu-1m": [0.008, 0.011, 0.016]},
                   seeds_by_size={"cpu-1m": [0, 1, 2]},
                   analyses=[{"name": "u", "baseline": "standard", "arms": {"unified": -0.04}}])
    suite = load_suite(write_suite(tmp_path, **options), "cpu")
    run_sweep(suite, tmp_path / "runs", log=lambda *_: None, results=tmp_path / "results", sizes=["cpu-1m"])
    assert {spec.arm.size for spec in fake_runs} == {"cpu-1m"} and len(fake_runs) == 2 * (3 + 3)
    saved = json.loads((tmp_path / "results" / "suite.json").read_text())
    assert saved["sizes"] == ["cpu-0.5m", "cpu-1m"] and saved["lrs_by_size"] == options["lrs_by_size"]
    summary = write_report(tmp_path / "results")
    assert [a["setting"] for a in summary["analyses"]] == ["cpu-1m/adamw-cosine"]
    assert summary["arms_pending"] == ["standard/cpu-0.5m/adamw-cosine", "unified/cpu-0.5m/adamw-cosine"]
    fake_runs.clear()
    run_sweep(suite, tmp_path / "runs", log=lambda *_: None, results=tmp_path / "results", sizes=["cpu-0.5m"])
    assert {spec.arm.size for spec in fake_runs} == {"cpu-0.5m"}
    summary = write_report(tmp_path / "results")
    assert len(summary["analyses"]) == 2 and not summary["arms_pending"]
    with pytest.raises(ConfigError, match=r"--sizes cpu-9m: not among suite ladder's sizes"):
        run_sweep(suite, tmp_path / "elsewhere", results=tmp_path / "elsewhere", sizes=["cpu-9m"])
    assert not (tmp_path / "elsewhere").exists()


def test_a_smaller_seed_plan_never_drops_recorded_seeds(fake_runs, tmp_path):
    """--seeds 2 over a results folder that records seed 2 is refused before anything is written: suite.json
    would take the smaller plan and the report would silently leave seed 2 out."""
    path = write_suite(tmp_path, seeds=[0, 1, 2])
    run_sweep(load_suite(path, "cpu"), tmp_path / "runs", log=lambda *_: None, results=tmp_path / "results")
    saved = (tmp_path / "results" / "suite.json").read_text()
    with pytest.raises(ConfigError, match=r"records seed 2 of standard/cpu-0.5m/adamw-cosine, which this sweep's "
                                          r"seeds \(0, 1\) leave out of its report; keep the suite's seeds"):
        run_sweep(load_suite(path, "cpu", seeds=2), tmp_path / "runs", results=tmp_path / "results")
    assert (tmp_path / "results" / "suite.json").read_text() == saved
    run_sweep(load_suite(path, "cpu", seeds=4), tmp_path / "runs", log=lambda *_: None, results=tmp_path / "results")
    assert json.loads((tmp_path / "results" / "suite.json").read_text())["seeds"] == [0, 1, 2, 3]


@pytest.mark.parametrize("option", ["lrs_by_size", "seeds_by_size"])
def test_per_size_tables_name_known_sizes(tmp_path, option):
    with pytest.raises(ConfigError, match=rf"{option} names cpu-d96, not among its sizes \(cpu-0.5m\); add it to "
                                          rf"sizes or remove it from {option}"):
        load_suite(write_suite(tmp_path, **{option: {"cpu-d96": [1]}}), "cpu")
    for values in ([], [-1]):
        with pytest.raises(ConfigError, match=rf"{option} 'cpu-0.5m' = \{values}; give a non-empty list of"):
            load_suite(write_suite(tmp_path, **{option: {"cpu-0.5m": values}}), "cpu")
    with pytest.raises(ConfigError, match=rf"{option} = {{'cpu-0.5m': \['x'\]}} is not of type dict\[str, list"):
        load_suite(write_suite(tmp_path, **{option: {"cpu-0.5m": ["x"]}}), "cpu")


def test_a_size_carries_its_training_length(tmp_path):
    """`cpu-0.5m@40` is preset cpu-0.5m trained on 40 tokens per non-embedding parameter, whatever the suite's
    tokens_per_parameter; its runs live under the size's own name."""
    suite = load_suite(write_suite(tmp_path, sizes=["cpu-0.5m@20", "cpu-0.5m@40"], tokens_per_parameter=7), "cpu")
    params = non_embedding_parameters(load_config(CONFIG, ["model.preset=cpu-0.5m"]).model)
    for length in (20, 40):
        arm = Arm("unified", f"cpu-0.5m@{length}", "adamw", "cosine")
        config = load_config(suite.config, overrides(suite, arm, 0.004, 0))
        assert config.model.preset == "cpu-0.5m" and config.train.steps == math.ceil(length * params / (4 * 32))
        path = sweep.run_dir(tmp_path, arm, 0.004, 0)
        assert path == tmp_path / f"unified/cpu-0.5m@{length}/adamw-cosine/lr0.004/seed0"
    for bad in ("cpu-0.5m@", "cpu-0.5m@forty", "cpu-0.5m@-5", "cpu-0.5m@0"):
        with pytest.raises(ConfigError, match=rf"size '{bad}': after @ comes the training length .* \(e.g. "
                                              r"cpu-0.5m@40\)"):
            load_suite(write_suite(tmp_path, sizes=[bad]), "cpu")


def test_tokens_ladder_reports_each_length(fake_runs, tmp_path):
    suite, _ = sweep_fake(tmp_path, sizes=["cpu-0.5m@20", "cpu-0.5m@40", "cpu-0.5m@80"], lrs=[0.006],
               analyses=[{"name": "u", "baseline": "standard", "arms": {"unified": -0.04}}], seeds=[0, 1, 2],
               ood_source="python_docs")
    summary = write_report(tmp_path / "results")
    deltas = {a["setting"]: a["arms"][0]["delta"] for a in summary["analyses"]}
    for analysis in summary["analyses"]:  # what the closing note quotes per length, in and out of domain
        row = analysis["arms"][0]
        assert {"delta", "ci95", "p_holm", "verdict"} <= set(row)
        assert row["ood_n"] == 3 and row["ood_delta"] == pytest.approx(row["delta"] / 2, abs=1e-12)
    assert list(deltas) == [f"cpu-0.5m@{n}/adamw-cosine" for n in (20, 40, 80)]
    assert all(d < 0 for d in deltas.values())  # unified is 1.3x the compute in the law
    ratios = summary["tokens_per_non_embedding_parameter"]
    assert [round(ratios[f"cpu-0.5m@{n}"]) for n in (20, 40, 80)] == [20, 40, 80]
    report = (tmp_path / "results" / "report.md").read_text()
    assert "## u (cpu-0.5m@40/adamw-cosine, baseline `standard`" in report
    assert "scaling" not in summary and "Scaling fit" not in report  # lengths of one size: no fit across sizes
    # does the gap grow with training length? the slope of every paired seed's Δ against log10 FLOPs
    x, y = [], []
    for n in (20, 40, 80):
        arms = {name: Arm(name, f"cpu-0.5m@{n}", "adamw", "cosine") for name in ("standard", "unified")}
        for seed in range(3):
            x.append(math.log10(flops(suite, arms["unified"])))
            y.append(law(suite, arms["unified"], 0.006, seed, **fake_runs.options)
                     - law(suite, arms["standard"], 0.006, seed, **fake_runs.options))
    (trend,) = summary["trends"]
    assert trend["settings"] == 3 and trend["n"] == 9 and trend["arm"] == "unified"
    assert trend["slope_per_decade"] == pytest.approx(np.polyfit(x, y, 1)[0], abs=1e-9)
    assert trend["ci95"][0] < trend["slope_per_decade"] < trend["ci95"][1]
    assert "## Does the gap grow with compute?" in report


@pytest.mark.filterwarnings("ignore:Precision loss")  # noise 0: every paired difference is equal
def test_compute_fit_recovers_the_multiplier_of_the_law(fake_runs, tmp_path):
    """Five sizes at one length: both arms' fits recover L = 3 + 2·(m·C/1e9)^-0.3, so the multiplier is m = 1.3
    at every size; with per-seed noise the 95% interval is a real interval around it."""
    fake_runs.options["noise"] = 0.0
    suite, _ = sweep_fake(tmp_path, sizes=[*LADDER, "cpu-0.5m@40"], lrs=[0.006, 0.011], seeds=[0, 1, 2],
                          compute_fit={"baseline": "standard", "arm": "unified"})
    summary = write_report(tmp_path / "results")
    assert "scaling" not in summary
    fit = summary["compute_fit"]
    (result,) = fit["settings"].values()
    assert result["estimable"], result.get("reason")
    assert list(result["sizes"]) == LADDER and result["tokens_per_parameter"] == 0.01  # the @40 size is left out
    for size in LADDER:
        row = result["sizes"][size]
        assert row["standard"]["compute"] == pytest.approx(flops(suite, Arm("standard", size, "adamw", "cosine")))
        assert row["multiplier"] == pytest.approx(1.3, rel=1e-3)
    assert result["largest"]["size"] == "cpu-2m" and result["largest"]["value"] == pytest.approx(1.3, rel=1e-3)
    assert result["geomean"]["ci95"] == pytest.approx([1.3, 1.3], rel=1e-3) and result["defined"] == FIT_DRAWS
    assert result["fits"]["unified"]["alpha"] == pytest.approx(0.3, rel=1e-3)
    report = (tmp_path / "results" / "report.md").read_text()
    assert "## Compute fit: unified over standard" in report and "The paper: 1.22-1.25x." in report
    assert "**unified over standard: 1.30x [1.30, 1.30] at cpu-2m (contradicts)" in report
    assert (tmp_path / "results" / "compute.png").stat().st_size > 5000

    arms = _rows(suite, multiplier=1.3, noise=0.01)
    noisy = compute_fit(suite, arms)["settings"]["adamw-cosine"]
    low, high = noisy["geomean"]["ci95"]
    assert noisy["estimable"] and low < noisy["geomean"]["value"] < high and low < 1.3 < high
    assert noisy["defined"] > 0.9 * FIT_DRAWS


def _rows(suite: Suite, multiplier: float, noise: float, sizes=LADDER, seeds=range(4)) -> dict:
    """The report's rows (what `analyse` hands the fit) straight from `law`."""
    rows = {}
    for size in sizes:
        for name in ("standard", "unified"):
            arm = Arm(name, size, "adamw", "cosine")
            config = load_config(suite.config, overrides(suite, arm, 0.006, 0))
            rows[arm] = {"tokens": config.train.steps * 4 * 32, "devices": {str(s): "cpu" for s in seeds},
                         "seeds": {str(s): law(suite, arm, 0.006, s, multiplier, noise) for s in seeds}}
    return rows


def test_a_degenerate_compute_fit_gives_its_reason(tmp_path):
    suite = load_suite(write_suite(tmp_path, sizes=LADDER, compute_fit={"baseline": "standard", "arm": "unified"}),
                       "cpu")
    four = compute_fit(suite, _rows(suite, 1.3, 0.0, LADDER[:4]))["settings"]["adamw-cosine"]
    assert not four["estimable"] and four["reason"] == ("4 size(s) with both arms at 0.01 tokens per parameter; a "
                                                        "compute fit needs at least 5")
    rows = _rows(suite, 1.3, 0.0)
    rows[Arm("unified", "cpu-1m", "adamw", "cosine")]["seeds"] = {str(s): 9.0 for s in range(4)}
    rising = compute_fit(suite, rows)["settings"]["adamw-cosine"]
    assert not rising["estimable"] and rising["reason"].startswith("unified's loss does not fall with compute from "
                                                                    "cpu-d80 to cpu-1m")
    below = _rows(suite, 1.3, 0.0)
    for arm, row in below.items():  # unified far below standard's floor of 3
        if arm.strategy == "unified":
            row["seeds"] = {s: loss - 2.0 for s, loss in row["seeds"].items()}
    reason = compute_fit(suite, below)["settings"]["adamw-cosine"]["reason"]
    assert "which the baseline never reaches" in reason and reason.startswith("at cpu-")
    assert "unified's fitted loss" in reason
    flat = _rows(suite, 1.3, 0.0)
    for arm, row in flat.items():  # losses that rise with compute: alpha < 0 cannot be fitted as a fall
        row["seeds"] = {s: 5.0 + 0.001 * LADDER.index(arm.size) ** 2 for s in row["seeds"]}
    assert "does not fall with compute" in compute_fit(suite, flat)["settings"]["adamw-cosine"]["reason"]
    (tmp_path / "bad").mkdir()
    with pytest.raises(ConfigError, match="compute_fit .* needs exactly a baseline and an arm among the strategies"):
        load_suite(write_suite(tmp_path / "bad", compute_fit={"baseline": "standard", "arm": "hg"}), "cpu")


def test_the_compute_fit_verdict_against_the_papers_range():
    from scalevec.experiments.report import fit_verdict

    assert [fit_verdict(ci) for ci in ([1.1, 1.21], [1.1, 1.22], [1.23, 1.24], [1.25, 2.0], [1.26, 2.0], None)] == [
        "contradicts", "consistent", "consistent", "consistent", "contradicts", "inconclusive"]


def test_an_erratic_seed_is_flagged():
    from scalevec.experiments.report import erratic_seeds

    rows = {"a": {"arm": "standard/cpu-d56/adamw-cosine", "seeds": {"0": 3.80, "1": 3.85, "2": 3.83}},
            "b": {"arm": "unified/cpu-d56/adamw-cosine", "seeds": {"0": 3.80, "1": 3.81, "2": 3.98}}}
    (flagged,) = erratic_seeds(rows)  # seed 2 is 0.175 above the others; they are 0.095 and 0.08 below theirs
    assert flagged["arm"].startswith("unified/") and flagged["seed"] == 2
    assert flagged["gap"] == pytest.approx(3.98 - 3.805)


def test_a_fit_law_with_a_bad_exponent_is_named():
    from scalevec.experiments.report import _fit_law

    points = [(c, 3 + 2 * c ** -3.0) for c in (1.0, 2.0, 4.0, 8.0, 16.0)]  # alpha 3: outside [0.01, 2]
    assert _fit_law(points).startswith("alpha = 3, outside [0.01, 2.0]")
    assert isinstance(_fit_law([(c, 3 + 2 * c ** -0.5) for c, _ in points]), tuple)


def test_sweep_set_applies_to_every_run_and_refuses_suite_keys(tmp_path, capsys, monkeypatch):
    import subprocess

    from scalevec.cli import main

    path = write_suite(tmp_path)
    suite = load_suite(path, "cpu", sets=["train.eval_batch_size=3"])
    arm = suite.arms()[1]
    assert load_config(suite.config, overrides(suite, arm, 0.004, 1)).train.eval_batch_size == 3
    assert suite.base_config().train.eval_batch_size == 3 and suite.sets == ["train.eval_batch_size=3"]
    # every run's `scalevec train` gets it (its resolved config.toml, and so its record, carries it)
    commands = []
    monkeypatch.setattr(subprocess, "run", lambda command, **_: commands.append(command) or
                        subprocess.CompletedProcess(command, 1, "", "stopped here"))
    spec = sweep.RunSpec(arm, 0.004, 1)
    not_stopped = StopRequests([], 0)
    assert sweep._run(spec, suite, tmp_path / "runs", tmp_path, tmp_path / "base.toml", 1, None, not_stopped)[1] == \
        "stopped here"
    (command,) = commands
    assert command[command.index("train.eval_batch_size=3") - 1] == "--set"
    monkeypatch.undo()
    for key, option in (("optim.lr", "lrs (or lrs_by_size)"), ("model.d_model", "sizes"), ("seed", "seeds"),
                        ("train.steps", "tokens_per_parameter"), ("model.preset", "sizes")):
        assert main(["sweep", path, "--out", str(tmp_path / "out"), "--set", f"{key}=1"]) == 2
        err = capsys.readouterr().err
        assert f"--set {key}: the suite sets it per run; use the suite's {option}" in err and err.count("\n") == 1
    assert main(["sweep", path, "--out", str(tmp_path / "out"), "--sizes", "cpu-9m"]) == 2
    assert "--sizes cpu-9m: not among suite ladder's sizes; choose from cpu-0.5m" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

"""Issue "Reproduce the paper": resumable sweeps, failures recorded, report equal to a recomputation."""

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest

from scalevec.config import ConfigError, load_config, to_toml
from scalevec.experiments.compare import preset_path
from scalevec.experiments.report import write_report
from scalevec.experiments.sweep import SUITE_DIR, load_suite, overrides, run_sweep

pytestmark = pytest.mark.slow  # subprocesses and many short training runs

SUITE = """
description = "tiny test suite"
baseline = "standard"

[cpu]
strategies = {strategies}
sizes = ["config"]
optimizers = ["adamw"]
schedules = ["cosine"]
lrs = [0.003, 0.01]
muon_lrs = [0.02]
lr_seed = 0
seeds = [0, 1, 2]

[cpu.config]
data = {{ dir = "{data}", sources = ["moby_dick", "milton"], vocab_size = 512, val_tokens = 1024 }}
schedule = {{ warmup_steps = 2 }}

[cpu.config.model]
{model}

[cpu.config.train]
steps = 8
batch_size = 4
seq_len = 32
eval_every = 4
log_every = 2
checkpoint_every = 4
eval_batch_size = 8

[gpu]
strategies = ["standard"]
sizes = ["config"]
optimizers = ["adamw"]
schedules = ["cosine"]
lrs = [0.003]
muon_lrs = [0.02]
lr_seed = 0
seeds = [0]

[gpu.config]
data = {{ dir = "{data}", sources = ["moby_dick", "milton"], vocab_size = 512 }}
train = {{ steps = 100000, batch_size = 64, seq_len = 32 }}

[gpu.config.model]
{model}
"""


TINY_MODEL = """preset = ""
vocab_size = 512
d_model = 32
n_layers = 1
n_heads = 4
n_kv_heads = 2
d_ff = 64
max_seq_len = 32"""


def write_suite(tmp_path, small_data, strategies=("standard", "hg"), lrs="[0.003, 0.01]"):
    path = tmp_path / "tiny.toml"
    path.write_text(SUITE.format(strategies=json.dumps(list(strategies)), data=small_data, model=TINY_MODEL).replace(
        "lrs = [0.003, 0.01]", f"lrs = {lrs}"))
    return path


def finished_runs(out):
    done = {}
    for metrics in out.rglob("metrics.jsonl"):
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        if rows and rows[-1]["step"] == 8 and "val_loss" in rows[-1]:
            done[metrics.parent] = metrics.stat().st_mtime_ns
    return done


def test_interrupted_sweep_completes_without_redoing_finished_runs(small_data, tmp_path):
    suite = write_suite(tmp_path, small_data)
    out = tmp_path / "sweep"
    command = [sys.executable, "-m", "scalevec", "sweep", str(suite), "--out", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while len(finished_runs(out)) < 2:
        assert process.poll() is None and time.time() < deadline, "sweep ended before it could be interrupted"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    before = finished_runs(out)
    assert 2 <= len(before) < 8
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    after = finished_runs(out)
    assert len(after) == 2 * 2 + 2 * 2  # every arm at every lr with seed 0, then seeds 1 and 2 at the best lr
    # output is not a terminal: one plain progress line per run this sweep ran, none for the skipped ones
    lines = re.findall(r"^\[(\d)/8\] \S+: val_loss \d+\.\d{4}; elapsed [\d.]+ min, ETA \d+ min$", result.stdout, re.M)
    assert len(lines) == 8 - len(before) and lines[-1] == "8"
    for path, mtime in before.items():
        assert after[path] == mtime, f"{path} was run again"
    assert (out / "report.md").is_file() and (out / "curves.png").is_file() and (out / "lr.png").is_file()


def recompute(out, strategies, lrs=(0.003, 0.01), seeds=(0, 1, 2)):
    """Best lr, mean and std over seeds, and paired differences, straight from metrics.jsonl."""
    def final(strategy, lr, seed):
        path = out / strategy / "config" / "adamw-cosine" / f"lr{lr:g}" / f"seed{seed}" / "metrics.jsonl"
        return json.loads(path.read_text().splitlines()[-1])["val_loss"]

    result = {}
    for strategy in strategies:
        best = min(lrs, key=lambda lr: final(strategy, lr, 0))
        losses = [final(strategy, best, s) for s in seeds]
        result[strategy] = {"best_lr": best, "losses": losses}
    for strategy in strategies:
        diffs = [a - b for a, b in zip(result[strategy]["losses"], result["standard"]["losses"])]
        result[strategy]["diff_mean"] = statistics.mean(diffs)
        result[strategy]["diff_std"] = statistics.stdev(diffs)
    return result


def test_report_equals_independent_recomputation(small_data, tmp_path):
    out = tmp_path / "sweep"
    run_sweep(load_suite(str(write_suite(tmp_path, small_data)), "cpu"), out, jobs=2, log=lambda *_: None)
    summary = write_report(out)
    expected = recompute(out, ["standard", "hg"])
    rows = {row["arm"].split("/")[0]: row for row in summary["arms"]}
    for strategy, e in expected.items():
        row = rows[strategy]
        assert row["best_lr"] == e["best_lr"]
        assert row["mean"] == pytest.approx(statistics.mean(e["losses"]), abs=1e-12)
        assert row["std"] == pytest.approx(statistics.stdev(e["losses"]), abs=1e-12)
        assert row["diff_mean"] == pytest.approx(e["diff_mean"], abs=1e-12)
        assert row["diff_std"] == pytest.approx(e["diff_std"], abs=1e-12)
    assert rows["standard"]["p_value"] is None and 0 <= rows["hg"]["p_value"] <= 1
    assert summary["scaling"]["estimable"] is False and "at least 5" in summary["scaling"]["reason"]
    text = (out / "report.md").read_text()
    assert f"{rows['hg']['mean']:.4f}" in text and "not estimable" in text
    assert rows["hg"]["bits_per_byte"] == pytest.approx(
        rows["hg"]["mean"] * _tokens_per_byte(small_data) / 0.6931471805599453)


def _tokens_per_byte(data_dir):
    meta = json.loads((data_dir / "meta.json").read_text())
    return meta["val"]["tokens"] / meta["val"]["bytes"]


def test_failed_run_is_recorded_and_others_finish(small_data, tmp_path):
    out = tmp_path / "sweep"
    path = write_suite(tmp_path, small_data, lrs="[0.003, 1e6]")
    # undecayed, so lr 1e6 is a valid config that diverges (decay at that rate is refused before the run starts)
    path.write_text(path.read_text().replace("[cpu.config]\n", "[cpu.config]\noptim = { weight_decay = 0.0 }\n"))
    suite = load_suite(str(path), "cpu")
    result = run_sweep(suite, out, log=lambda *_: None)
    assert len(result["failed"]) == 2  # lr 1e6 diverges in both arms
    for path, error in result["failed"].items():
        assert "lr1e+06" in path and "non-finite" in error
        assert "non-finite" in (Path(path) / "failed.txt").read_text()
    assert len(finished_runs(out)) == 2 + 2 * 2  # both arms at lr 0.003, then seeds 1 and 2 there


def test_bad_arm_is_refused_before_any_run(small_data, tmp_path):
    with pytest.raises(ConfigError, match="unknown strategy preset 'nonexistent'"):
        load_suite(str(write_suite(tmp_path, small_data, ("standard", "nonexistent"))), "cpu")


def test_gpu_scale_refuses_small_data(small_data, tmp_path):
    with pytest.raises(ConfigError, match="gpu suites need your own data"):
        run_sweep(load_suite(str(write_suite(tmp_path, small_data)), "gpu"), tmp_path / "g", log=lambda *_: None)


def test_shipped_suites_load_at_both_scales():
    for name in ("removal", "weight-decay", "improvements", "scaling", "moe"):
        for scale in ("cpu", "gpu"):
            suite = load_suite(name, scale)
            assert suite.baseline in suite.strategies and suite.arms()
    for name in ("study-pilot", "study-improvements", "study-weight-decay", "study-optimizers", "study-ladder"):
        suite = load_suite(name, "cpu")
        assert suite.lr_seed not in suite.seeds and suite.extend_lrs > 0  # the LR seed is not a test seed
        assert suite.base_config().model.init == "fan_in"
    improvements = load_suite("improvements", "cpu")
    assert {"qknorm", "dnp+none", "unified", "or+iwd", "dnp+or"} <= set(improvements.strategies)


def test_wsd_decays_from_stable_checkpoints(small_data, tmp_path):
    text = SUITE.format(strategies='["standard", "hg"]', data=small_data, model=TINY_MODEL)
    text = text.replace('schedules = ["cosine"]', 'schedules = ["wsd"]', 1)
    text = text.replace("lrs = [0.003, 0.01]", "lrs = [0.003]")
    text = text.replace("seeds = [0, 1, 2]", "seeds = [0, 1]\nwsd_decays = [0.5]", 1)
    for old, new in (("steps = 8\n", "steps = 10\n"), ("eval_every = 4", "eval_every = 2"),
                     ("checkpoint_every = 4", "checkpoint_every = 2")):
        text = text.replace(old, new, 1)
    path = tmp_path / "wsd.toml"
    path.write_text(text)
    suite = load_suite(str(path), "cpu")
    out = tmp_path / "sweep"
    run_sweep(suite, out, log=lambda *_: None)
    summary = write_report(out)

    def val_at(metrics, step):
        return [json.loads(line)["val_loss"] for line in metrics.read_text().splitlines()
                if json.loads(line)["step"] == step][0]

    rows = {row["arm"].split("/")[0]: row for row in summary["arms"]}
    for strategy in ("standard", "hg"):
        seeds = out / strategy / "config" / "adamw-wsd" / "lr0.003"
        stable = statistics.mean(val_at(seeds / f"seed{s}" / "metrics.jsonl", 4) for s in (0, 1))
        decayed = statistics.mean(val_at(seeds / f"seed{s}-decay4" / "metrics.jsonl", 5) for s in (0, 1))
        (point,) = rows[strategy]["wsd"]
        assert point["decay_from"] == 4 and point["seeds"] == 2
        assert point["stable"] == pytest.approx(stable, abs=1e-12)
        assert point["decayed"] == pytest.approx(decayed, abs=1e-12)
    assert rows["hg"]["wsd"][0]["decayed_gap"] == pytest.approx(
        rows["hg"]["wsd"][0]["decayed"] - rows["standard"]["wsd"][0]["decayed"])
    assert "WSD: decays launched from stable-phase checkpoints" in (out / "report.md").read_text()


def synthetic_scaling(multiplier: float, noise: float) -> tuple:
    """A suite over five cpu sizes and its arms: baseline losses on L(C) = 2·(C/C_min)^-0.3 + 3, the
    other arm on the same law at `multiplier` times the compute, plus per-seed noise."""
    import random

    import torch

    from scalevec.experiments.sweep import Arm, Suite
    from scalevec.model import Decoder
    from scalevec.strategy import strategy
    from scalevec.summary import flops_per_token

    sizes = ["cpu-0.5m", "cpu-1m", "cpu-2m", "cpu-3m", "cpu-7m"]
    suite = Suite(name="s", description="", baseline="standard", scale="cpu", strategies=["standard", "hg"],
                  sizes=sizes, optimizers=["adamw"], schedules=["cosine"], lrs=[0.003], muon_lrs=[0.02], lr_seed=0,
                  seeds=[0, 1, 2])
    tokens, gen = 10_000, random.Random(0)
    with torch.device("meta"):
        compute = {size: flops_per_token(Decoder(load_config({"model": {"preset": size}}).model, strategy("standard")))
                   * tokens for size in sizes}
    smallest = min(compute.values())
    arms = {}
    for name, factor in (("standard", 1.0), ("hg", multiplier)):
        for size in sizes:
            law = 2 * (factor * compute[size] / smallest) ** -0.3 + 3
            arms[Arm(name, size, "adamw", "cosine")] = {
                "tokens": tokens, "seeds": {str(s): law + noise * gen.gauss(0, 1) for s in range(3)}}
    return suite, arms


def test_scaling_fit_recovers_a_known_compute_multiplier():
    import torch

    from scalevec.experiments.report import scaling_fit
    from scalevec.model import Decoder
    from scalevec.strategy import strategy

    fit = scaling_fit(*synthetic_scaling(1.5, noise=0.0))
    exact = fit["multipliers"]["hg/adamw-cosine"]
    with torch.device("meta"):
        params = sum(p.numel() for p in Decoder(load_config({"model": {"preset": "cpu-7m"}}).model,
                                                strategy("standard")).parameters())
    assert fit["tokens_per_parameter"]["cpu-7m"] == pytest.approx(10_000 / params)
    assert exact["value"] == pytest.approx(1.5, rel=1e-3)
    assert exact["low"] == pytest.approx(1.5, rel=1e-3) and exact["high"] == pytest.approx(1.5, rel=1e-3)
    noisy = scaling_fit(*synthetic_scaling(1.5, noise=0.01))["multipliers"]["hg/adamw-cosine"]
    assert noisy["low"] < noisy["high"] and noisy["defined"] > 150 and 1.0 < noisy["value"] < 2.5


def test_scaling_fit_needs_every_size_finished():
    from scalevec.experiments.report import scaling_fit

    suite, arms = synthetic_scaling(1.5, noise=0.0)
    partial = scaling_fit(suite, {arm: row for arm, row in arms.items() if arm.size != "cpu-7m"})
    assert not partial["estimable"] and "fewer than 5 sizes" in partial["reason"]


STUDY = """
[cpu.variants]
"standard-normal" = ["strategy.preset=standard", "model.init=normal"]

[[cpu.analyses]]
name = "paper"
claim = "hg helps"
baseline = "standard"
arms = {{ hg = -0.02, "standard-normal" = "control" }}
"""


def test_records_regenerate_the_report_and_a_new_machine_skips_recorded_runs(small_data, tmp_path):
    text = SUITE.format(strategies='["standard", "hg", "standard-normal"]', data=small_data, model=TINY_MODEL)
    text = text.replace("lrs = [0.003, 0.01]", "lrs = [0.003, 0.01]\nextend_lrs = 1", 1)
    text = text.replace("lr_seed = 0\nseeds = [0, 1, 2]", 'lr_seed = 7\nseeds = [0, 1, 2]\nood_source = "python_docs"\n'
                        "ood_tokens = 1024", 1)
    text = text.replace("[cpu.config]", STUDY.format() + "\n[cpu.config]", 1)
    (tmp_path / "trained_on.toml").write_text(text.replace('ood_source = "python_docs"', 'ood_source = "milton"'))
    with pytest.raises(ConfigError, match="ood_source 'milton' must be a bundled source outside the training mix"):
        load_suite(str(tmp_path / "trained_on.toml"), "cpu")
    path = tmp_path / "study.toml"
    path.write_text(text)
    suite = load_suite(str(path), "cpu")
    out, results = tmp_path / "runs", tmp_path / "results"
    run_sweep(suite, out, log=lambda *_: None, results=results)
    records = sorted(p.relative_to(results) for p in (results / "records").rglob("*.json"))
    lr_runs = [p for p in records if p.name == "seed7.json"]
    assert len(lr_runs) >= 2 * 3 and len(records) == len(lr_runs) + 3 * 3  # 3 test seeds per arm, none is seed 7
    record = json.loads((results / records[0]).read_text())
    assert record["config"]["model"]["d_model"] == 32 and record["final"]["step"] == 8
    assert set(record["final"]["val_loss_by_source"]) <= {"moby_dick", "milton"} and record["curve"][-1]["val_loss"]
    # out of domain: the record's score equals the loss of each window scored on its own by `scalevec eval`'s path
    from scalevec.checkpoint import load_run_model
    from scalevec.evaluate import stream_loss
    from scalevec.experiments.sweep import ood_windows
    windows = ood_windows(small_data / "tokenizer.json", "python_docs", 1024, 32)
    assert windows.shape == (32, 33) and len({w.tobytes() for w in windows}) == 32
    run = out / records[0].relative_to("records").with_suffix("")
    _, model = load_run_model(run)
    nats, count = map(sum, zip(*(stream_loss(model.eval(), w, 32, 32, 1) for w in windows)))
    assert json.loads((results / records[0]).read_text())["ood"]["python_docs"] == pytest.approx(nats / count,
                                                                                                 rel=1e-6)
    variant = json.loads(next((results / "records" / "standard-normal").rglob("seed0.json")).read_text())
    assert variant["config"]["model"]["init"] == "normal" and variant["config"]["strategy"]["preset"] == "standard"
    # a best LR at the edge of the grid was extended once, by a factor of 2
    for arm in ("standard", "hg", "standard-normal"):
        losses = {float(p.parent.name[2:]): json.loads(p.read_text())["final"]["val_loss"]
                  for p in (results / "records" / arm).rglob("seed7.json")}
        grid = sorted(losses)
        assert grid in ([0.003, 0.01], [0.0015, 0.003, 0.01], [0.003, 0.01, 0.02]), grid
        if len(grid) == 2:
            assert min(losses, key=losses.get) not in grid, "an edge best was not extended"

    summary = write_report(results)
    (analysis,) = summary["analyses"]
    rows = {row["arm"]: row for row in analysis["arms"]}
    arms = {row["arm"].split("/")[0]: row for row in summary["arms"]}
    diffs = [arms["hg"]["seeds"][s] - arms["standard"]["seeds"][s] for s in ("0", "1", "2")]
    assert rows["hg"]["delta"] == pytest.approx(statistics.mean(diffs), abs=1e-12)
    from scipy import stats
    t = stats.t.ppf(0.975, 2) * statistics.stdev(diffs) / 3 ** 0.5
    assert rows["hg"]["ci95"] == pytest.approx([statistics.mean(diffs) - t, statistics.mean(diffs) + t])
    ood = {arm: {s: json.loads(next((results / "records" / arm).rglob(f"seed{s}.json")).read_text())["ood"]
                 ["python_docs"] for s in range(3)} for arm in ("standard", "hg")}
    assert rows["hg"]["ood_delta"] == pytest.approx(statistics.mean(ood["hg"][s] - ood["standard"][s]
                                                                    for s in range(3)), abs=1e-12)
    assert rows["hg"]["ood_n"] == 3 and rows["hg"]["ood_ci95"][0] < rows["hg"]["ood_delta"] < rows["hg"]["ood_ci95"][1]
    low, high = sorted([rows["hg"]["p"], rows["standard-normal"]["p"]])
    holm = {low: min(1.0, 2 * low), high: max(min(1.0, 2 * low), high)}  # Holm over a family of two
    assert rows["hg"]["p_holm"] == pytest.approx(holm[rows["hg"]["p"]])
    assert rows["standard-normal"]["verdict"] == "control"
    assert rows["hg"]["verdict"] in ("consistent", "contradicts", "inconclusive")
    assert 0 < summary["bigram_val_loss"] < summary["unigram_val_loss"]
    assert set(summary["val_sources"]) <= {"moby_dick", "milton"}
    assert summary["tokens_per_non_embedding_parameter"]["config"] == pytest.approx(8 * 4 * 32 / _non_embedding())
    assert summary["steps"] == {"config": 8}
    report = (results / "report.md").read_text()
    assert "8 steps per run;" in report
    assert "## paper" in report and "inconclusive" in report and (results / "gap.png").is_file()
    assert "Δ out of domain" in report and "1,024 tokens of `python_docs`" in report
    assert "Interim" not in report and " of 3 |" not in report  # every planned seed ran

    # a sweep stopped part-way: its report says so, arm by arm
    moved = next((results / "records" / "hg").rglob("seed2.json"))
    kept = moved.read_text()
    moved.unlink()
    interim = write_report(results)
    report = (results / "report.md").read_text()
    assert "**Interim**" in report and "| hg | 2 of 3 |" in report and "| standard-normal | 3 |" in report
    assert {row["arm"]: row["n"] for row in interim["analyses"][0]["arms"]}["hg"] == 2
    # an arm with no test seed yet is named as pending, not silently left out
    tested = {p: p.read_text() for p in (results / "records" / "hg").rglob("seed[0-2].json")}
    for p in tested:
        p.unlink()
    pending = write_report(results)["arms_pending"]
    assert len(pending) == 1 and pending[0].startswith("hg/")
    assert f"**Interim**: no test seed recorded yet for {pending[0]};" in (results / "report.md").read_text()
    for p, content in tested.items():
        p.write_text(content)
    moved.write_text(kept)
    summary = write_report(results)
    assert summary["arms_pending"] == []

    # a new machine: nothing but the results folder
    import shutil
    shutil.rmtree(out)
    before = {p: p.stat().st_mtime_ns for p in (results / "records").rglob("*.json")}
    assert write_report(results)["analyses"][0]["arms"] == summary["analyses"][0]["arms"]
    run_sweep(suite, tmp_path / "elsewhere", log=lambda *_: None, results=results)
    assert not any((tmp_path / "elsewhere").rglob("metrics.jsonl")), "a recorded run was run again"
    assert {p: p.stat().st_mtime_ns for p in (results / "records").rglob("*.json")} == before


def _non_embedding():
    d, layers, heads, kv, ff = 32, 1, 4, 2, 64
    head = d // heads
    return layers * (d * (heads + 2 * kv) * head + d * d + 3 * d * ff + 2 * d) + d  # matrices and plain γs


def test_analysis_arms_must_name_an_effect_or_control(small_data, tmp_path):
    text = SUITE.format(strategies='["standard", "hg"]', data=small_data, model=TINY_MODEL)
    bad = text.replace("[cpu.config]", '[[cpu.analyses]]\nname = "x"\nbaseline = "standard"\narms = { hg = "better" }'
                                       "\n\n[cpu.config]", 1)
    (tmp_path / "bad.toml").write_text(bad)
    with pytest.raises(ConfigError, match="give the paper's effect in nats"):
        load_suite(str(tmp_path / "bad.toml"), "cpu")
    missing = bad.replace('hg = "better"', "dp = -0.02")
    (tmp_path / "missing.toml").write_text(missing)
    with pytest.raises(ConfigError, match="among the strategies"):
        load_suite(str(tmp_path / "missing.toml"), "cpu")


def test_shipped_suites_and_demo_are_coherent_with_their_own_defaults():
    """Every suite arm at both scales and both demo arms resolve to a config whose scale-decay policy warns about
    itself only as the paper's rule says it must: a decayed final norm before a tied, undecayed embedding."""
    import torch

    from scalevec.model import build_model
    from scalevec.optim import param_groups

    configs = [load_config(preset_path("demo"), [f"strategy.preset={name}"]) for name in ("standard", "unified")]
    for path in SUITE_DIR.glob("*.toml"):
        for scale in ("cpu", "gpu"):
            if f"[{scale}]" not in path.read_text():  # the study suites have a cpu scale only
                continue
            suite = load_suite(path.stem, scale)
            configs += [load_config(suite.config, overrides(suite, arm, suite.lrs_for(arm)[0], seed=0))
                        for arm in suite.arms()]
    assert len(configs) > 100
    for config in configs:
        with torch.device("meta"), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = build_model(config.model, config.strategy, config.seed, config.moe)
            param_groups(model, config.strategy.scale_decay, config.optim)
        s, m = config.strategy, config.model
        tied_and_decayed = s.scale_decay in ("iwd", "all") and s.scale != "fixed" and m.tie_embeddings \
            and config.optim.embedding_weight_decay == 0
        pairs = [re.findall(r"(\S+ feeds \S+) \(set", str(w.message)) for w in caught]
        assert pairs == ([["final_scale feeds tok_emb.weight"]] if tied_and_decayed else []), (s.preset, pairs)


def test_wsd_decay_points_follow_each_size_of_a_ladder():
    """With tokens_per_parameter every size trains its own number of steps, so its decays launch from its own
    stable phase (not the first size's)."""
    from scalevec.experiments.sweep import Arm, Suite

    suite = Suite(name="s", description="", baseline="standard", scale="cpu", strategies=["standard"],
                  sizes=["cpu-0.5m", "cpu-1m"], optimizers=["adamw"], schedules=["wsd"], lrs=[0.003], muon_lrs=[0.02],
                  lr_seed=0, seeds=[0], wsd_decays=[0.5], tokens_per_parameter=20.0,
                  config={"train": {"batch_size": 4, "seq_len": 64, "checkpoint_every": 10},
                          "schedule": {"decay_fraction": 0.2}})
    for size in suite.sizes:
        arm = Arm("standard", size, "adamw", "wsd")
        steps = suite.steps(arm)
        stable = steps - round(0.2 * steps)
        assert suite.decay_points(arm) == [stable // 2 // 10 * 10]
    small, large = (suite.decay_points(Arm("standard", size, "adamw", "wsd"))[0] for size in suite.sizes)
    assert large > small


def test_compare_reproduces_one_seed_of_a_study(small_data, tmp_path, capsys):
    """`compare --reference STUDY`: each strategy at the study's best LR; its final loss equals the study's record
    of that seed (same code and config, CPU, one thread per run); its Δ is shown beside the study's interval; a
    config that differs from the study's is refused before anything trains."""
    from scalevec.cli import main

    text = SUITE.format(strategies='["standard", "hg"]', data=small_data, model=TINY_MODEL)
    text = text.replace("lr_seed = 0\nseeds = [0, 1, 2]", "lr_seed = 7\nseeds = [0, 1]", 1).replace(
        "eval_batch_size = 8", "eval_batch_size = 8\nthreads = 1", 1)
    (tmp_path / "study.toml").write_text(text)
    suite = load_suite(str(tmp_path / "study.toml"), "cpu")
    results = tmp_path / "results"
    run_sweep(suite, tmp_path / "runs", jobs=2, log=lambda *_: None, results=results)
    write_report(results)
    config = tmp_path / "demo.toml"
    config.write_text(to_toml(load_config(suite.config)))  # the study's setting; compare sets strategy and lr
    out = tmp_path / "demo"
    args = ["compare", "--config", str(config), "--strategies", "standard,hg", "--jobs", "2", "--reference",
            str(results), "--out", str(out)]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    best = {row["arm"].split("/")[0]: row["best_lr"] for row in json.loads((results / "summary.json").read_text())
            ["arms"]}
    for name in ("standard", "hg"):
        ref = summary["reference"][name]
        assert ref["lr"] == best[name] and ref["matches"] is True, ref
        assert ref["record_val_loss"] == summary["strategies"][name]["final_val_loss"]  # bitwise, same machine
    study = summary["reference"]["hg"]["study"]
    assert study["n"] == 2 and study["verdict"] == "control"  # the suite names no paper claim: one family, "all"
    printed = capsys.readouterr().out
    assert f"the study's 2 paired seeds: {study['delta']:+.4f}" in printed and "(equal, Δ +0.0e+00) |" in printed
    assert (out / "gap.png").stat().st_size > 1000 and (out / "standard.log").is_file()
    # a setting the study did not run is refused before any training, naming the key
    assert main([*args[:-1], str(tmp_path / "other"), "--set", "train.batch_size=2"]) == 2
    assert "train.batch_size differs from the study's run record" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_a_preempted_run_stops_the_sweep_without_a_failure(small_data, tmp_path, monkeypatch):
    """A run that a signal or time limit stopped (exit 75, its step checkpointed) is not a failure: the sweep stops
    with it, exit 75 too, and the next sweep resumes that run."""
    import subprocess as sp

    from scalevec.train.preempt import EXIT_STOPPED, StoppedEarly

    suite = load_suite(str(write_suite(tmp_path, small_data)), "cpu")
    monkeypatch.setattr(sp, "run", lambda *a, **k: sp.CompletedProcess(a, EXIT_STOPPED, "", "stopped"))
    with pytest.raises(StoppedEarly, match="the sweep stops with it"):
        run_sweep(suite, tmp_path / "runs", log=lambda *_: None)
    assert not list((tmp_path / "runs").rglob("failed.txt"))


def test_a_stop_request_to_the_sweep_starts_no_other_run(small_data, tmp_path, monkeypatch):
    """A signal to the sweep itself (a scheduler's SIGTERM) is noted, not fatal: the sweep waits for the run it is
    in (which gets the signal too and checkpoints), starts no other run, and stops with exit 75."""
    import subprocess as sp

    from scalevec.train.preempt import StoppedEarly

    suite = load_suite(str(write_suite(tmp_path, small_data)), "cpu")
    started = []

    def one_run(command, **kwargs):
        started.append(command)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)  # the handler runs in the main thread meanwhile
        return sp.CompletedProcess(command, 1, "", "a run that failed on its own")

    monkeypatch.setattr(sp, "run", one_run)
    with pytest.raises(StoppedEarly, match=r"stopped on request \(SIGTERM\)"):
        run_sweep(suite, tmp_path / "runs", log=lambda *_: None)
    assert len(started) == 1
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the sweep's handler is gone with it


def test_a_stop_request_to_compare_waits_for_its_runs(small_data, tmp_path, monkeypatch):
    """`compare --jobs 2` under a scheduler's SIGTERM: the runs get it too and exit 75 at a checkpoint; compare
    notes it instead of dying first (exit 143), and stops with their 75."""
    import subprocess as sp

    from test_train import tiny_config

    from scalevec.config import to_toml
    from scalevec.experiments.compare import run_comparison
    from scalevec.train.preempt import EXIT_STOPPED, StoppedEarly

    source = tmp_path / "tiny.toml"
    source.write_text(to_toml(tiny_config(small_data)))

    signalled, lock = [], threading.Lock()

    def preempted_run(command, **kwargs):  # the scheduler signals compare once, and each run (exit 75)
        with lock:
            if not signalled:
                signalled.append(os.kill(os.getpid(), signal.SIGTERM))  # without a handler: this process ends
        time.sleep(0.3)
        return sp.CompletedProcess(command, EXIT_STOPPED)

    monkeypatch.setattr(sp, "run", preempted_run)
    with pytest.raises(StoppedEarly, match="stopped at a checkpoint"):
        run_comparison(source, ["standard", "unified"], tmp_path / "out", [], "test", log=lambda *_: None, jobs=2)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_record_says_where_its_run_computed(small_data, tmp_path):
    """The device comes from the run's own metrics (a GPU run recorded later by a sweep on a CPU machine stays a GPU
    run); a run logged before that is taken to have run where the record is made."""
    from test_train import tiny_config

    from scalevec.config import to_toml
    from scalevec.experiments.sweep import make_record

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(to_toml(tiny_config(small_data)))
    rows = [{"step": 0, "tokens": 0, "val_loss": 6.0, "device": "cuda"},
            {"step": 40, "tokens": 5120, "train_loss": 5.0, "tokens_per_s": 512.0, "val_loss": 5.5, "device": "cuda"}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    record = make_record(run, None)
    assert (record["device"], record["dtype"], record["final"]["val_loss"]) == ("cuda", "bfloat16", 5.5)
    (run / "metrics.jsonl").write_text("".join(json.dumps({k: v for k, v in row.items() if k != "device"}) + "\n"
                                               for row in rows))
    assert (make_record(run, None)["device"], make_record(run, None)["dtype"]) == ("cpu", "float32")

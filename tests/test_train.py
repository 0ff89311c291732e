"""Issue "Trainer": exact resume after SIGKILL, corrupt checkpoints, NaN, full disk, run directories."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from scalevec import checkpoint as checkpoint_module
from scalevec.checkpoint import list_checkpoints, verify_checkpoint
from scalevec.cli import main
from scalevec.config import ConfigError, load_config, to_toml
from scalevec.train.trainer import Trainer, TrainError


def tiny_config(data_dir, *overrides):
    return load_config({
        "model": {"vocab_size": 512, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64,
                  "max_seq_len": 32},
        "strategy": {"preset": "unified"},
        "data": {"dir": str(data_dir), "sources": ["moby_dick", "milton"], "vocab_size": 512, "val_tokens": 2048},
        "schedule": {"warmup_steps": 5},
        "train": {"steps": 40, "batch_size": 4, "seq_len": 32, "eval_every": 10, "log_every": 5,
                  "checkpoint_every": 10, "keep_checkpoints": 5, "eval_batch_size": 8, "threads": 1},
    }, overrides)


def quiet(*_):
    pass


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def comparable(record):
    return {k: v for k, v in record.items() if k not in ("tokens_per_s", "mfu")}


def final_weights(run_dir):
    return load_file(list_checkpoints(run_dir / "checkpoints")[-1] / "model.safetensors")


@pytest.mark.slow
def test_sigkill_and_resume_is_bitwise_equal(small_data, tmp_path):
    config = tiny_config(small_data, "train.steps=300", "train.checkpoint_every=20", "train.eval_every=50")
    path = tmp_path / "run.toml"
    path.write_text(to_toml(config))
    command = [sys.executable, "-m", "scalevec", "train", str(path)]
    subprocess.run(command + ["--out", str(tmp_path / "straight")], check=True, capture_output=True)

    killed = tmp_path / "killed"
    process = subprocess.Popen(command + ["--out", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "step_00000040").exists():
        assert process.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    newest = list_checkpoints(killed / "checkpoints")[-1].name
    assert newest < "step_00000300", "the kill must land before the end"
    subprocess.run(command + ["--out", str(killed), "--resume"], check=True, capture_output=True)

    expected, got = final_weights(tmp_path / "straight"), final_weights(killed)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert [comparable(r) for r in records(killed)] == [comparable(r) for r in records(tmp_path / "straight")]


def test_corrupt_newest_checkpoint_falls_back(small_data, tmp_path):
    config = tiny_config(small_data)
    Trainer(config, tmp_path / "straight", progress=False, log=quiet).run()
    shutil.copytree(tmp_path / "straight", tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_00000040")  # as if killed before the last save
    newest = list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    assert newest.name == "step_00000030"
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    lines = []
    with pytest.warns(UserWarning, match="skipping unusable checkpoint.*step_00000030"):
        Trainer(config, tmp_path / "run", resume=True, progress=False, log=lines.append).run()
    assert "resumed from step 20" in lines
    expected, got = final_weights(tmp_path / "straight"), final_weights(tmp_path / "run")
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_a_moe_resume_between_records_writes_the_metrics_of_an_uninterrupted_run(small_data, tmp_path):
    """The expert load counted since the last record is part of the checkpoint: a resume from a checkpoint that is
    not a log step (10 with log_every=3) records the same expert_imbalance at step 12 as a run never stopped."""
    config = tiny_config(small_data, "train.steps=12", "train.log_every=3", "train.eval_every=6",
                         "model.moe_experts=4", "model.moe_top_k=2", "moe.balance=bias")
    Trainer(config, tmp_path / "straight", progress=False, log=quiet).run()
    shutil.copytree(tmp_path / "straight", tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_00000012")  # as if killed right after step 10's save
    Trainer(config, tmp_path / "run", resume=True, progress=False, log=quiet).run()
    expected, got = records(tmp_path / "straight"), records(tmp_path / "run")
    assert [r["step"] for r in got] == [0, 3, 6, 9, 12] and "expert_imbalance" in got[-1]
    assert [comparable(r) for r in got] == [comparable(r) for r in expected]
    resumed = final_weights(tmp_path / "run")
    assert all(torch.equal(t, resumed[k]) for k, t in final_weights(tmp_path / "straight").items())


def test_flipped_byte_is_detected(small_data, tmp_path):
    Trainer(tiny_config(small_data, "train.steps=10"), tmp_path / "run", progress=False, log=quiet).run()
    path = list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    data = bytearray((path / "trainer.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / "trainer.pt").write_bytes(bytes(data))
    with pytest.raises(checkpoint_module.CheckpointError, match="SHA-256"):
        verify_checkpoint(path)


def test_nan_loss_stops_with_one_line_and_keeps_last_checkpoint(small_data, tmp_path):
    trainer = Trainer(tiny_config(small_data), tmp_path / "run", progress=False, log=quiet)
    calls = {"n": 0}

    def poison(module, args, output):
        calls["n"] += module.training
        return output * float("nan") if calls["n"] > 23 else output

    trainer.model.register_forward_hook(poison)
    with pytest.raises(TrainError) as caught:
        trainer.run()
    message = str(caught.value)
    assert "\n" not in message and "non-finite loss at step" in message
    newest = list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    state, model_state = verify_checkpoint(newest), load_file(newest / "model.safetensors")
    assert state["step"] == 20 and all(torch.isfinite(t).all() for t in model_state.values())


def test_nonfinite_skip_counts_and_continues(small_data, tmp_path):
    trainer = Trainer(tiny_config(small_data, "train.nonfinite=skip", "train.steps=20"), tmp_path / "run",
                      progress=False, log=quiet)
    calls = {"n": 0}

    def poison(module, args, output):
        if module.training:
            calls["n"] += 1
            if calls["n"] in (3, 7):
                return output * float("nan")
        return output

    trainer.model.register_forward_hook(poison)
    result = trainer.run()
    assert result["step"] == 20 and result["skipped"] == 2
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_full_disk_keeps_previous_checkpoint(small_data, tmp_path, monkeypatch):
    trainer = Trainer(tiny_config(small_data), tmp_path / "run", progress=False, log=quiet)
    real_save, saves = torch.save, {"n": 0}

    def failing_save(obj, path, *args, **kwargs):
        saves["n"] += 1
        if saves["n"] == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(TrainError, match="step 20 failed \\(No space left on device\\)") as caught:
        trainer.run()
    assert "\n" not in str(caught.value)
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in root.iterdir()] == ["step_00000010"]
    assert verify_checkpoint(root / "step_00000010")["step"] == 10


def test_loss_decreases_on_bundled_corpus(small_data, tmp_path):
    config = tiny_config(small_data, "strategy.preset=standard", "train.steps=60", "train.eval_every=60",
                         "optim.lr=0.01")
    Trainer(config, tmp_path / "run", progress=False, log=quiet).run()
    evals = [r["val_loss"] for r in records(tmp_path / "run") if "val_loss" in r]
    assert evals[0] > 6.0  # about ln(512) = 6.24 at init
    assert evals[-1] < evals[0] - 0.7, evals


def test_run_dir_is_never_overwritten_silently(small_data, tmp_path, capsys):
    path = tmp_path / "run.toml"
    path.write_text(to_toml(tiny_config(small_data, "train.steps=5")))
    out = tmp_path / "run"
    assert main(["train", str(path), "--out", str(out)]) == 0
    before = (out / "metrics.jsonl").read_bytes()
    assert main(["train", str(path), "--out", str(out)]) == 2
    assert "exists; pass --resume" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_bytes() == before
    assert main(["train", str(path), "--out", str(out), "--resume", "--set", "train.steps=6"]) == 2
    assert "train.steps differs" in capsys.readouterr().err
    assert main(["train", "--out", str(out), "--resume"]) == 0
    assert "already complete" in capsys.readouterr().out
    assert main(["train", str(path), "--out", str(out), "--overwrite"]) == 0


def test_metrics_and_diagnostics(small_data, tmp_path):
    Trainer(tiny_config(small_data, "train.steps=20"), tmp_path / "run", progress=False, log=quiet).run()
    rows = records(tmp_path / "run")
    assert [r["step"] for r in rows] == [0, 5, 10, 15, 20]
    for row in rows[1:]:
        assert {"step", "tokens", "lr", "train_loss", "grad_norm", "tokens_per_s"} <= row.keys()
        assert row["tokens"] == row["step"] * 4 * 32
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 10, 20]
    scales = evals[-1]["scales"]
    assert {"input", "output"} <= scales.keys() and "balance" in scales["input"]
    assert evals[0]["scales"]["input"]["gamma"] == {"mean": 1.0, "min": 1.0, "max": 1.0}
    assert scales["input"]["gamma"]["max"] > scales["input"]["gamma"]["min"]


def test_compare_writes_report_and_reuses_finished_runs(small_data, tmp_path, capsys):
    path = tmp_path / "tiny.toml"
    path.write_text(to_toml(tiny_config(small_data, "train.steps=20")))
    out = tmp_path / "cmp"
    args = ["compare", "--config", str(path), "--strategies", "standard,unified", "--out", str(out)]
    assert main(args) == 0
    for name in ("report.md", "summary.json", "loss.png"):
        assert (out / name).stat().st_size > 0
    summary = json.loads((out / "summary.json").read_text())
    for name in ("standard", "unified"):
        final = records(out / name)[-1]
        assert summary["strategies"][name]["final_val_loss"] == final["val_loss"]
    assert summary["strategies"]["unified"]["val_loss_minus_baseline"] == pytest.approx(
        records(out / "unified")[-1]["val_loss"] - records(out / "standard")[-1]["val_loss"])
    assert "| unified |" in (out / "report.md").read_text()
    mtime = (out / "standard" / "metrics.jsonl").stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0
    assert "finished run found" in capsys.readouterr().out
    assert (out / "standard" / "metrics.jsonl").stat().st_mtime_ns == mtime
    assert main([*args, "--set", "optim.lr=0.5"]) == 2  # a finished run of another config is never reused
    assert "is a finished run of another config (optim.lr differs)" in capsys.readouterr().err
    assert main(["compare", "--preset", "nope"]) == 2


def test_wsd_decay_launched_from_a_stable_checkpoint(small_data, tmp_path):
    """A branch from the stable-phase checkpoint at the decay start reproduces the full WSD run; an earlier
    branch decays from its own point."""
    sets = ("schedule.name=wsd", "schedule.decay_fraction=0.25", "train.steps=40", "train.checkpoint_every=10",
            "train.keep_checkpoints=10")
    Trainer(tiny_config(small_data, *sets), tmp_path / "main", progress=False, log=quiet).run()
    stable = tmp_path / "main" / "checkpoints"
    late = tiny_config(small_data, *sets, f"train.branch_from={stable / 'step_00000030'}", "schedule.decay_start=30")
    Trainer(late, tmp_path / "late", progress=False, log=quiet).run()
    expected, got = final_weights(tmp_path / "main"), final_weights(tmp_path / "late")
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    early = tiny_config(small_data, *sets, f"train.branch_from={stable / 'step_00000020'}", "schedule.decay_start=20",
                        "train.steps=27")
    lines = []
    Trainer(early, tmp_path / "early", progress=False, log=lines.append).run()
    assert f"branched from {stable / 'step_00000020'} at step 20" in lines
    rows = records(tmp_path / "early")
    assert rows[0]["step"] == 25 and rows[-1]["step"] == 27 and "val_loss" in rows[-1]
    assert rows[-1]["lr"] == pytest.approx(early.optim.lr * 0.1)  # the last of its 7 decay steps runs at the floor
    with pytest.raises(ConfigError, match="branch_from"):
        Trainer(tiny_config(small_data, *sets, f"train.branch_from={tmp_path}"), tmp_path / "bad", progress=False,
                log=quiet)


def test_a_branch_trains_with_its_own_optimizer_settings_and_the_checkpoints_state(small_data, tmp_path):
    """A branch's config sets the learning rate and betas (its records say so); the checkpoint gives the moments.
    It took the checkpoint's base_lr and betas while its metrics reported its own lr."""
    Trainer(tiny_config(small_data, "train.steps=10"), tmp_path / "main", progress=False, log=quiet).run()
    source = tmp_path / "main" / "checkpoints" / "step_00000010"
    config = tiny_config(small_data, "train.steps=12", "optim.lr=0.02", "optim.beta2=0.9",
                         f"train.branch_from={source}")
    trainer = Trainer(config, tmp_path / "branch", progress=False, log=quiet)
    with trainer._run_directory():
        groups = trainer.optimizers.param_groups
        assert all(g["base_lr"] == pytest.approx(0.02 * g["lr_mult"]) and g["betas"] == (0.9, 0.9) for g in groups)
        saved = torch.load(source / "trainer.pt", weights_only=True)["optimizers"]["state"]
        assert all(torch.equal(trainer.optimizers.state[p]["exp_avg"], saved[i]["exp_avg"])
                   for i, p in enumerate(p for g in groups for p in g["params"]))

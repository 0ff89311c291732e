"""Issue "The house, second pass": a Trainer takes its run directory (lock, config) only while `run()` runs.
Issue "Negligible overhead": MFU in the training log line where the GPU's peak is known, and nowhere else."""

import hashlib
import shutil

import pytest
import torch
from test_train import quiet, records, tiny_config

from scalevec import build_model
from scalevec.outputs import DirectoryLock, OutputError
from scalevec.summary import flops_per_token
from scalevec.train import loggers
from scalevec.train.trainer import Trainer
from scalevec.train.utilization import mfu, peak_tflops


def snapshot(root) -> dict:
    """Every path under root with its content hash (directories as None)."""
    return {str(p.relative_to(root)): None if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def is_free(run_dir) -> bool:
    """Whether no process (this one included: flock belongs to the open file) holds the run directory's lock."""
    try:
        DirectoryLock(run_dir, "run directory").release()
    except OutputError:
        return False
    return True


def test_constructing_a_trainer_writes_nothing_and_takes_no_lock(small_data, tmp_path):
    config = tiny_config(small_data, "train.steps=10", "train.checkpoint_every=5", "train.loggers=csv")
    Trainer(config, tmp_path / "fresh", progress=False, log=quiet)
    assert not (tmp_path / "fresh").exists()

    Trainer(config, tmp_path / "run", progress=False, log=quiet).run()
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_00000010")  # as if stopped after step 5
    before = snapshot(tmp_path / "run")
    assert "metrics.csv" in before and ".lock" not in before
    resumed = Trainer(config, tmp_path / "run", resume=True, progress=False, log=quiet)
    assert snapshot(tmp_path / "run") == before and is_free(tmp_path / "run")
    assert resumed.step == 0  # the checkpoint is read when the run starts, under the lock
    assert resumed.run()["step"] == 10 and resumed.step == 10


def test_the_run_directory_is_held_while_running_and_released_however_the_run_ends(small_data, tmp_path):
    run, held = tmp_path / "run", []
    trainer = Trainer(tiny_config(small_data, "train.steps=10"), run, progress=False, log=quiet)
    trainer.model.register_forward_hook(lambda *_: held.append(not is_free(run)))
    assert trainer.run()["step"] == 10
    assert held and all(held) and is_free(run)

    calls = {"n": 0}

    def fail_at_the_third_step(module, args, output):
        calls["n"] += module.training
        if calls["n"] == 3:
            raise RuntimeError("injected failure")
        return output

    trainer = Trainer(tiny_config(small_data, "train.steps=10"), tmp_path / "failed", progress=False, log=quiet)
    trainer.model.register_forward_hook(fail_at_the_third_step)
    with pytest.raises(RuntimeError, match="injected failure"):
        trainer.run()
    assert is_free(tmp_path / "failed") and (tmp_path / "failed" / "config.toml").is_file()  # a started run stays


def test_a_start_that_fails_under_the_lock_leaves_nothing(small_data, tmp_path, monkeypatch):
    class Refusing:
        def __init__(self, *args):
            raise OSError("injected: the logger cannot open")

    monkeypatch.setitem(loggers.LOGGERS, "csv", Refusing)
    trainer = Trainer(tiny_config(small_data, "train.loggers=csv"), tmp_path / "run", progress=False, log=quiet)
    with pytest.raises(OSError, match="injected"):
        trainer.run()
    assert not (tmp_path / "run").exists()


def test_mfu_is_model_flops_over_the_gpus_peak(monkeypatch):
    # 1 GFLOP per token at 200,000 tokens/s is 200 TFLOP/s: half of a 400 TFLOP/s card, a quarter of two
    assert mfu(10**9, 2e5, 400.0) == pytest.approx(0.5)
    assert mfu(10**9, 2e5, 400.0, devices=2) == pytest.approx(0.25)
    assert peak_tflops(torch.device("cpu")) is None and peak_tflops(torch.device("cpu"), 123.0) == 123.0
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA H100 80GB HBM3")
    assert peak_tflops(torch.device("cuda")) == 989.4
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Tesla T4")
    assert peak_tflops(torch.device("cuda")) is None


def test_the_log_line_has_mfu_only_where_the_peak_is_known(small_data, tmp_path, monkeypatch, capsys):
    config = tiny_config(small_data, "train.steps=10", "train.device=cpu")
    Trainer(config, tmp_path / "cpu", log=quiet).run()  # stderr is captured, not a terminal: plain lines
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step ")]
    assert len(lines) == 2 and not any("MFU" in line for line in lines)
    assert not any("mfu" in row for row in records(tmp_path / "cpu"))

    monkeypatch.setattr("scalevec.train.trainer.peak_tflops", lambda device: 1e-3)  # a card of 1 GFLOP/s
    Trainer(config, tmp_path / "peak", log=quiet).run()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step ")]
    rows = [row for row in records(tmp_path / "peak") if "train_loss" in row]
    flops = flops_per_token(build_model(config.model, config.strategy), 32)
    for line, row in zip(lines, rows, strict=True):
        assert row["mfu"] == pytest.approx(flops * row["tokens_per_s"] / 1e9)
        assert f" tok/s | MFU {row['mfu']:.1%} | elapsed " in line

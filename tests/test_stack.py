"""Issue "Fits the user's own stack": logs where users look, version and environment, dry runs."""

import csv
import json
import shutil
import subprocess
import sys
import types

import pytest
from test_train import quiet, records, tiny_config

from scalevec._version import __version__
from scalevec.cli import main
from scalevec.config import load_config, to_toml
from scalevec.train.trainer import Trainer


def test_csv_logger_mirrors_metrics_and_follows_a_resume(small_data, tmp_path):
    config = tiny_config(small_data, "train.steps=20", "train.loggers=csv")
    Trainer(config, tmp_path / "run", progress=False, log=quiet).run()
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    logged = records(tmp_path / "run")
    assert [int(r["step"]) for r in rows] == [r["step"] for r in logged]
    assert [float(r["train_loss"]) for r in rows[1:]] == pytest.approx([r["train_loss"] for r in logged[1:]],
                                                                        rel=1e-12)
    assert [r["val_loss"] != "" for r in rows] == ["val_loss" in r for r in logged]
    # a crash after step 15: resuming from step 10 truncates metrics.jsonl, and the CSV follows it
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_00000020")
    Trainer(config, tmp_path / "run", resume=True, progress=False, log=quiet).run()
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == [r["step"] for r in records(tmp_path / "run")] == [0, 5, 10, 15, 20]


def test_wandb_logger_is_offline_by_default_and_one_run_per_directory(small_data, tmp_path, monkeypatch):
    calls = []

    class FakeRun:
        def log(self, values, step):
            calls.append(("log", step, values))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    monkeypatch.setattr("importlib.util.find_spec", lambda name: object())
    config = tiny_config(small_data, "train.steps=10", "train.checkpoint_every=5", "train.loggers=wandb",
                         "train.wandb_project=p")
    Trainer(config, tmp_path / "run", progress=False, log=quiet).run()
    (start, kwargs), *logs, end = calls
    assert start == "init" and kwargs["mode"] == "offline" and kwargs["project"] == "p"
    assert kwargs["config"]["model"]["d_model"] == 32 and kwargs["dir"] == str(tmp_path / "run")
    assert [step for _, step, _ in logs] == [0, 5, 10] and "train_loss" in logs[1][2] and "val_loss" in logs[2][2]
    assert end == ("finish",)
    first_id = kwargs["id"]
    calls.clear()
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_00000010")
    Trainer(config, tmp_path / "run", resume=True, progress=False, log=quiet).run()
    assert calls[0][1]["id"] == first_id and calls[0][1]["resume"] == "allow"


def test_missing_logger_package_is_refused_before_anything_is_written(small_data, tmp_path, monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(Exception, match=r"train.loggers has tensorboard, which is not installed; pip install"):
        Trainer(tiny_config(small_data, "train.loggers=tensorboard"), tmp_path / "run", progress=False, log=quiet)
    assert not (tmp_path / "run").exists()


def test_plain_progress_lines_when_stderr_is_not_a_terminal(small_data, tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(to_toml(tiny_config(small_data, "train.steps=20")))
    result = subprocess.run([sys.executable, "-m", "scalevec", "train", str(path), "--out", str(tmp_path / "run")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in lines] == ["step 5/20", "step 10/20", "step 15/20", "step 20/20"]
    for line in lines:
        assert all(part in line for part in (" | loss ", " | lr ", " tok/s", " | elapsed ", " | eta "))
    assert "val_loss" in lines[1] and "val_loss" not in lines[0]


def test_version_env_print_config_and_dry_run(small_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        from scalevec.cli import build_parser
        build_parser().parse_args(["--version"])
    assert exit.value.code == 0 and capsys.readouterr().out.strip() == f"scalevec {__version__}"

    assert main(["env", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    import torch
    assert report["scalevec"] == __version__ and report["torch"] == torch.__version__ and report["cpu_count"] >= 1

    config = tiny_config(small_data)
    path = tmp_path / "run.toml"
    path.write_text(to_toml(config))
    assert main(["train", str(path), "--set", "optim.lr=0.0123", "--print-config"]) == 0
    printed = tmp_path / "printed.toml"
    printed.write_text(capsys.readouterr().out)
    assert load_config(printed) == load_config(path, ["optim.lr=0.0123"])

    out = tmp_path / "never"
    assert main(["train", str(path), "--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert not out.exists() and "nothing written" in text and "is prepared" in text
    assert f"{40 * 4 * 32:,} tokens" in text
    assert main(["train", str(path), "--out", str(out), "--dry-run", "--set", "model.n_heads=3"]) == 2
    assert not out.exists()

"""Issue "The house, second pass": one preflight for the dry run and the start. Every refusal of a start is met by
`train --dry-run` with the same exit code and line, and neither writes anything."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_train import tiny_config

from scalevec.cli import main
from scalevec.config import to_toml


@pytest.fixture()
def sandbox(small_data, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(to_toml(tiny_config(small_data, "train.steps=4")))
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    (tmp_path / "a_file").write_text("not a directory")
    (tmp_path / "garbage.safetensors").write_bytes(b"not safetensors at all")
    model = tiny_config(small_data)
    from scalevec.model import build_model
    state = build_model(model.model, model.strategy).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "init.safetensors")
    bad = {k: v.contiguous().clone() for k, v in state.items()}
    next(iter(bad.values())).fill_(float("nan"))
    save_file(bad, tmp_path / "nan.safetensors")
    save_file({"tok_emb.weight": torch.zeros(3, 3)}, tmp_path / "small.safetensors")
    run = tmp_path / "done"  # a finished run: its checkpoint is a branch_from source at step 4
    assert main(["train", str(config), "--out", str(run)]) == 0
    import shutil
    shutil.copytree(run, tmp_path / "corrupt")  # its only checkpoint does not verify
    next((tmp_path / "corrupt" / "checkpoints").iterdir()).joinpath("model.safetensors").write_bytes(b"torn")
    shutil.copytree(run, tmp_path / "scribbled")  # a line of metrics.jsonl that is no record
    (tmp_path / "scribbled" / "metrics.jsonl").write_text("not json\n" + (run / "metrics.jsonl").read_text())
    shutil.copytree(run, tmp_path / "listed")  # a line that is JSON but no record of a step
    (tmp_path / "listed" / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text() + "[1, 2]\n")
    shutil.copytree(run, tmp_path / "blocked")  # a file where the checkpoints go
    shutil.rmtree(tmp_path / "blocked" / "checkpoints")
    (tmp_path / "blocked" / "checkpoints").write_text("a user's file")
    shutil.copytree(run, tmp_path / "edited")  # a config.toml edited since its checkpoint was written
    edited = tmp_path / "edited" / "config.toml"
    edited.write_text(edited.read_text().replace("d_model = 32", "d_model = 48"))
    tiny_dir(tmp_path, small_data)
    return tmp_path, config, small_data


def tiny_data(tmp: Path, data: Path) -> list[str]:
    """--set arguments for 201 training windows of 33 tokens (prepared by tiny_dir)."""
    return ["--set", f"data.dir={tmp / 'tiny'}", "--set", "data.sources=[]", "--set",
            f"data.inputs=[\"{tmp / 'texts'}\"]", "--set", f"data.tokenizer={data / 'tokenizer.json'}"]


def tiny_dir(tmp: Path, data: Path) -> None:
    import random

    from scalevec.config import DataConfig
    from scalevec.data.prepare import prepare

    (tmp / "texts").mkdir()
    words = random.Random(0).choices(["the", "whale", "sea", "ship", "paradise", "lost", "night", "light"], k=1800)
    for i in range(12):
        (tmp / "texts" / f"doc{i}.txt").write_text(" ".join(words[150 * i:150 * (i + 1)]))
    prepare(DataConfig(dir=str(tmp / "tiny"), sources=[], inputs=[str(tmp / "texts")],
                       tokenizer=str(data / "tokenizer.json"), vocab_size=512), progress=False, log=lambda *_: None)


def refusals(tmp: Path, config: Path, data: Path) -> list[tuple[list[str], str]]:
    """(arguments after `train`, a phrase of the one line it is refused with)."""
    c, out = str(config), str(tmp / "new")
    tok = f"data.tokenizer={data / 'tokenizer.json'}"
    checkpoint = next((tmp / "done" / "checkpoints").iterdir())
    return [
        ([c, "--out", str(tmp / "existing")], "holds no scalevec run"),  # the user's notes.txt alone
        ([c, "--out", str(tmp / "existing"), "--resume"], "so there is nothing to resume"),
        ([c, "--out", out, "--set", f"data.dir={tmp / 'existing'}"], "is a non-empty directory scalevec did not write"),
        ([c, "--out", str(tmp / "done")], "exists; pass --resume"),
        ([c, "--out", out, "--resume", "--overwrite"], "contradict each other"),
        ([c, "--out", str(tmp / "a_file")], "a_file"),
        ([c, "--out", str(tmp / "a_file" / "run")], "a_file"),
        ([c, "--out", str(tmp / "done"), "--resume", "--set", "optim.lr=0.5"], "optim.lr differs"),
        ([c, "--out", out, "--set", "model.d_model=1048576", "--set", "model.n_heads=1", "--set", "model.n_kv_heads=1"],
         "GiB"),
        ([c, "--out", out, "--set", "train.loggers=[\"wandb\"]"], "wandb"),
        ([c, "--out", out, "--set", "train.loggers=[\"tensorboard\"]"], "tensorboard"),
        ([c, "--out", out, "--set", f"train.init_from={tmp / 'init.safetensors'}"], "data.tokenizer is empty"),
        ([c, "--out", out, "--set", f"train.init_from={tmp / 'missing.safetensors'}", "--set", tok], "not found"),
        ([c, "--out", out, "--set", f"train.init_from={tmp / 'garbage.safetensors'}", "--set", tok],
         "train.init_from"),
        ([c, "--out", out, "--set", f"train.init_from={tmp / 'nan.safetensors'}", "--set", tok], "NaN"),
        ([c, "--out", out, "--set", f"train.init_from={tmp / 'small.safetensors'}", "--set", tok],
         "does not fit this model"),
        ([c, "--out", out, "--set", f"train.branch_from={tmp / 'nowhere'}"], "train.branch_from"),
        ([c, "--out", out, "--set", f"train.branch_from={checkpoint}", "--set", "train.steps=3"],
         "not below train.steps"),
        ([c, "--out", out, "--set", "model.moe_experts=2", "--set", "model.moe_top_k=1",
          "--set", "moe.dispatch=grouped", "--set", "train.compile=true"], "grouped cannot compile"),
        ([c, "--out", str(data / "run")], "is or contains the run directory"),
        ([c, "--out", out, "--set", "model.vocab_size=256"], "larger than"),
        ([c, "--out", out, "--set", "train.device=cuda"], "no CUDA device"),
        ([c, "--out", out, "--set", "train.time_limit=soon"], "not a duration"),
        ([c, "--out", out, "--set", "train.steps=0"], "train.steps"),
        ([c, "--out", out, "--set", "model.nope=1"], "unknown key model.nope"),
        (["--resume", "--out", str(tmp / "existing")], "not a run directory"),
        (["--resume", "--out", str(tmp / "corrupt")], "no usable checkpoint"),
        (["--resume", "--out", str(tmp / "scribbled")], "is not a JSON record"),
        (["--resume", "--out", str(tmp / "listed")], "is not a metrics record"),
        (["--resume", "--out", str(tmp / "blocked")], "checkpoints is not a directory"),
        ([c, "--out", out, "--set", f"data.dir={tmp / 'nodata'}", "--set", "data.inputs=[\"/nonexistent.txt\"]"],
         "matches no file"),
        ([c, "--out", out, "--set", f"data.dir={tmp / 'nodata'}", "--set", "data.val_fraction=0"],
         "data.val_fraction=0 prepares no validation split"),  # was refused after preparing all of it
        # the dry run passed these four, which only the start's data loader and checkpoint loading refused (and the
        # fifth, OR scales read as ER, neither refused)
        ([c, "--out", out, *tiny_data(tmp, data), "--set", "train.batch_size=300"], "too few for batches of 300"),
        ([c, "--out", out, "--set", f"train.branch_from={checkpoint}", "--set", "train.steps=8", "--set",
          "model.d_model=48"], "does not fit this run's model (tensor blocks.0.attn.o.weight: shape (32, 32)"),
        ([c, "--out", out, "--set", f"train.branch_from={checkpoint}", "--set", "train.steps=8", "--set", "seed=3"],
         "data loader had seed=0"),
        (["--resume", "--out", str(tmp / "edited")], "does not fit this run's model (tensor"),
        ([c, "--out", out, "--set", f"train.branch_from={checkpoint}", "--set", "train.steps=8", "--set",
          "strategy.scale=er"], "holds strategy.scale=or scales"),  # the same tensors: it loaded them silently
    ]


def snapshot(tmp: Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in tmp.rglob("*") if ".lock" not in p.name}


def test_dry_run_and_start_refuse_alike_and_write_nothing(sandbox, capsys):
    tmp, config, data = sandbox
    cases = refusals(tmp, config, data)
    assert len(cases) >= 20
    if torch.cuda.is_available():
        cases = [case for case in cases if "no CUDA device" not in case[1]]
    for args, phrase in cases:
        before = snapshot(tmp)
        lines = {}
        for mode in ("--dry-run", None):
            code = main(["train", *args, *([mode] if mode else [])])
            err = capsys.readouterr().err
            assert code == 2, (args, mode, err)
            assert err.count("\n") == 1 and phrase in err, (args, mode, err)
            lines[mode] = err
        assert lines["--dry-run"] == lines[None], args
        assert snapshot(tmp) == before, f"{args}: something was written"


def test_the_dry_run_reports_the_plan_of_a_start_that_would_go(sandbox, capsys):
    tmp, config, data = sandbox
    checkpoint = next((tmp / "done" / "checkpoints").iterdir())
    args = ["train", str(config), "--out", str(tmp / "branched"), "--set", f"train.branch_from={checkpoint}",
            "--set", "train.steps=8", "--dry-run"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"start {tmp / 'branched'} on cpu" in out and "branches from" in out and "at step 4" in out
    assert "is prepared" in out and "epochs" in out and not (tmp / "branched").exists()
    assert json.loads((data / "meta.json").read_text())["train"]["tokens"] > 0


def test_a_run_directory_another_process_holds_is_refused_by_the_dry_run_too(sandbox, capsys):
    """The lock a running training holds (flock: another open file description, as another process has) refuses
    the start, and the dry run, which takes no lock itself, with the same line."""
    from scalevec.outputs import DirectoryLock

    tmp, _, _ = sandbox
    run = tmp / "done"
    with DirectoryLock(run, "run directory"):
        before = snapshot(tmp)
        lines = {}
        for mode in ("--dry-run", None):
            assert main(["train", "--resume", "--out", str(run), *([mode] if mode else [])]) == 2
            lines[mode] = capsys.readouterr().err
        assert lines["--dry-run"] == lines[None] and "is in use by another scalevec process" in lines[None]
        assert snapshot(tmp) == before
    assert main(["train", "--resume", "--out", str(run), "--dry-run"]) == 0  # free again

"""Issue "Fits the user's own stack": logs where users look, version and environment, dry runs."""

import csv
import importlib.util
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


def _pretend_installed(monkeypatch, package: str) -> None:
    """check_loggers finds `package`; every other lookup (torch's own imports among them) stays real."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: object() if name == package else
                        find_spec(name, *a))


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
    _pretend_installed(monkeypatch, "wandb")
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


def test_tensorboard_resume_purges_the_steps_after_the_checkpoint(small_data, tmp_path, monkeypatch):
    writers = []

    class FakeWriter:
        def __init__(self, log_dir, purge_step=None):
            self.log_dir, self.purge_step, self.steps = log_dir, purge_step, []
            writers.append(self)

        def add_scalar(self, key, value, step):
            self.steps.append(step)

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    _pretend_installed(monkeypatch, "tensorboard")
    config = tiny_config(small_data, "train.steps=10", "train.checkpoint_every=5", "train.log_every=3",
                         "train.loggers=tensorboard")
    Trainer(config, tmp_path / "run", progress=False, log=quiet).run()
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_00000010")
    Trainer(config, tmp_path / "run", resume=True, progress=False, log=quiet).run()
    first, resumed = writers
    assert first.purge_step is None and first.log_dir == str(tmp_path / "run" / "tensorboard")
    assert sorted(set(first.steps)) == [0, 3, 6, 9, 10]  # a record every 3 steps, and the last step
    assert resumed.purge_step == 4 and min(resumed.steps) == 6  # step 6's record, and later, are written again


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


@pytest.fixture(scope="module")
def eval_run(small_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("eval") / "run"
    Trainer(tiny_config(small_data, "train.steps=10"), run, progress=False, log=quiet).run()
    return run


def reference_losses(model, tokens, seq_len, stride):
    """Each target j scored from the first window that reaches it: start b = smallest multiple of stride
    with b + seq_len >= j, one forward pass per target (independent of the batched implementation)."""
    import math

    import torch
    total = 0.0
    with torch.no_grad():
        for j in range(1, len(tokens)):
            start = max(0, math.ceil((j - seq_len) / stride)) * stride
            logits = model(torch.tensor([tokens[start:j]]))[0, -1].double()
            total -= torch.log_softmax(logits, -1)[tokens[j]].item()
    return total, len(tokens) - 1


def test_eval_matches_a_hand_written_reference(eval_run, small_data, tmp_path):
    import math

    import pyarrow as pa
    import pyarrow.parquet as pq
    from tokenizers import Tokenizer

    from scalevec.evaluate import evaluate, load_model

    texts = ["Call me Ishmael. Some years ago, never mind how long precisely.", "Of Man's first disobedience, and the "
             "fruit of that forbidden tree", "It is a truth universally acknowledged."]
    (tmp_path / "a.txt").write_text(texts[0])
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"body": t}) for t in texts[1:]) + "\n")
    pq.write_table(pa.table({"content": texts}), tmp_path / "c.parquet")
    model, tokenizer_path = load_model(eval_run)
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    eos = tokenizer.token_to_id("<|endoftext|>")

    def stream(docs):
        ids = [eos]
        for doc in docs:
            ids += tokenizer.encode(doc).ids + [eos]
        return ids[:-1]

    inputs = [(tmp_path / "a.txt", texts[:1]), (tmp_path / "b.jsonl", texts[1:]), (tmp_path / "c.parquet", texts)]
    for seq_len, stride in ((16, 16), (16, 5), (7, 1)):
        result = evaluate(eval_run, [p for p, _ in inputs], seq_len=seq_len, stride=stride, jsonl_field="body",
                          parquet_column="content", progress=False)
        total, count, num_bytes = 0.0, 0, 0
        for row, (path, docs) in zip(result["inputs"], inputs):
            nats, targets = reference_losses(model, stream(docs), seq_len, stride)
            assert row["input"] == str(path) and row["documents"] == len(docs) and row["tokens"] == targets
            assert row["loss"] == pytest.approx(nats / targets, abs=1e-6)
            assert row["perplexity"] == pytest.approx(math.exp(nats / targets), rel=1e-6)
            assert row["bytes"] == sum(len(d.encode()) for d in docs)
            assert row["bits_per_byte"] == pytest.approx(nats / math.log(2) / row["bytes"], abs=1e-6)
            total, count, num_bytes = total + nats, count + targets, num_bytes + row["bytes"]
        assert result["overall"]["loss"] == pytest.approx(total / count, abs=1e-6)
        assert result["overall"]["bits_per_byte"] == pytest.approx(total / math.log(2) / num_bytes, abs=1e-6)
    # a prepared data directory built with the run's tokenizer: its validation split as stored
    meta = json.loads((small_data / "meta.json").read_text())
    (row,) = evaluate(eval_run, [small_data], progress=False)["inputs"]
    assert row["tokens"] == meta["val"]["tokens"] - 1 and row["bytes"] == meta["val"]["bytes"]


def test_eval_refuses_bad_input_in_one_line(eval_run, tmp_path, capsys):
    from scalevec.config import DataConfig
    from scalevec.data.prepare import prepare

    (tmp_path / "a.txt").write_text("some text to score, long enough for a window or two")
    (tmp_path / "a.csv").write_text("x")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\nnot json\n')
    other = prepare(DataConfig(dir=str(tmp_path / "other"), sources=["milton"], vocab_size=300), progress=False,
                    log=quiet)
    cases = [([str(tmp_path / "missing.txt")], [], "not found"), ([str(tmp_path / "a.csv")], [], "unsupported type"),
             ([str(tmp_path / "empty.txt")], [], "no text to score"), ([str(other)], [], "another tokenizer"),
             ([str(tmp_path / "latin1.txt")], [], "latin1.txt is not valid UTF-8 (byte 3); convert it to UTF-8 first"),
             ([str(tmp_path / "bad.jsonl")], [], "bad.jsonl:2 is not valid JSON; fix the line or remove it"),
             ([str(tmp_path / "a.txt")], ["--stride", "40", "--seq-len", "16"], "--stride 40"),
             ([str(tmp_path / "a.txt")], ["--seq-len", "33"], "max_seq_len 32"),
             ([str(tmp_path / "a.txt")], ["--batch-size", "0"], "--batch-size 0")]
    for data, extra, message in cases:
        argv = ["eval", str(eval_run), *[x for d in data for x in ("--data", d)], *extra]
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (argv, err)
        assert "on_bad_record" not in err[0], err  # a training option: eval cannot skip a bad record
    assert main(["eval", str(tmp_path), "--data", str(tmp_path / "a.txt")]) == 2
    assert "neither a run directory" in capsys.readouterr().err
    assert main(["eval", str(eval_run), "--data", str(tmp_path / "a.txt"), "--json", "--seq-len", "8"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["seq_len"] == 8 and result["stride"] == 8 and result["overall"]["tokens"] > 0


def test_eval_joins_documents_with_an_export_s_eos_when_its_tokenizer_has_no_endoftext(eval_run, tmp_path, capsys):
    # a user's own tokenizer (Llama 3's <|end_of_text|>, Mistral's </s>): the export's eos_token_id joins the
    # documents, or --eos-id; with neither, one line naming the option
    from scalevec.evaluate import evaluate

    export, text = tmp_path / "export", tmp_path / "a.jsonl"
    text.write_text(json.dumps({"text": "Call me Ishmael."}) + "\n" + json.dumps({"text": "Some years ago."}) + "\n")
    assert main(["export", str(eval_run), "--to", str(export)]) == 0
    capsys.readouterr()
    expected = evaluate(export, [text], progress=False)["overall"]
    tokenizer = json.loads((export / "tokenizer.json").read_text())
    (token,) = [t for t in tokenizer["added_tokens"] if t["content"] == "<|endoftext|>"]
    token["content"] = "</s>"
    tokenizer["model"]["vocab"]["</s>"] = tokenizer["model"]["vocab"].pop("<|endoftext|>")
    (export / "tokenizer.json").write_text(json.dumps(tokenizer))
    assert evaluate(export, [text], progress=False)["overall"] == expected
    config = json.loads((export / "config.json").read_text())
    eos = config.pop("eos_token_id")
    assert eos == token["id"]
    (export / "config.json").write_text(json.dumps(config))
    assert main(["eval", str(export), "--data", str(text)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no <|endoftext|> token" in err[0] and "--eos-id" in err[0], err
    assert main(["eval", str(export), "--data", str(text), "--eos-id", str(eos), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["overall"] == expected
    assert main(["eval", str(export), "--data", str(text), "--eos-id", "100000"]) == 2
    assert "--eos-id 100000 is outside the model's vocabulary (0..511)" in capsys.readouterr().err


def test_a_hand_edited_meta_json_is_one_line_for_eval_and_training(eval_run, small_data, tmp_path, capsys):
    from scalevec.data.loader import TokenWindows
    from scalevec.data.sources import DataError

    meta = json.loads((small_data / "meta.json").read_text())
    shard = {**meta["val"]["shards"][0]}
    cases = {"garbage": b"\x89PNG\x00\xff", "list": b"[]", "dtype": {**meta, "dtype": "float7"},
             "vocab": {**meta, "vocab_size": "big"}, "sha": {k: v for k, v in meta.items() if k != "tokenizer_sha256"},
             "split": {**meta, "val": 3}, "shard": {**meta, "val": {**meta["val"], "shards": [5]}},
             "tokens": {**meta, "val": {**meta["val"], "shards": [{**shard, "tokens": "many"}]}},
             "negative": {**meta, "train": {**meta["train"], "shards": [{**shard, "tokens": -1}]}}}
    for name, content in cases.items():
        data = tmp_path / name
        data.mkdir()
        (data / "meta.json").write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
        assert main(["eval", str(eval_run), "--data", str(data)]) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is not a valid scalevec data record" in err[0] and "data prepare" in err[0], err
        with pytest.raises(DataError, match="not a valid scalevec data record"):
            TokenWindows(data, "train", 8)
        assert sorted(p.name for p in data.iterdir()) == ["meta.json"]


def _toy_model():
    from scalevec import ModelConfig, build_model, strategy
    return build_model(ModelConfig(preset="", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                   d_ff=48, max_seq_len=16), strategy("unified"), seed=1)


def _train(model, opt, steps, scheduler=None, seed=0):
    import torch
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        tokens = torch.randint(0, 64, (4, 17), generator=gen)
        logits = model(tokens[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
        if scheduler is not None:
            scheduler.step()


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_role_optimizer_is_one_torch_optimizer_equal_to_its_parts(name):
    import copy

    import torch

    from scalevec import OptimConfig, Optimizers
    from scalevec.optim import Muon, param_groups

    optim = OptimConfig(name=name, lr=0.01, muon_lr=0.03)
    model, reference = _toy_model(), _toy_model()
    opt = Optimizers(model, optim)
    assert isinstance(opt, torch.optim.Optimizer) and {g["optimizer"] for g in opt.param_groups} == (
        {"adamw", "muon"} if name == "muon" else {"adamw"})
    # the same update as separate AdamW and Muon over the table's groups
    groups = param_groups(reference, None, optim)
    for g in groups:
        g["lr"] = (optim.muon_lr if g["optimizer"] == "muon" else optim.lr) * g["lr_mult"]
    parts = [torch.optim.AdamW([g for g in groups if g["optimizer"] == "adamw"], betas=(optim.beta1, optim.beta2),
                               eps=optim.eps, fused=True)]
    if name == "muon":
        parts.append(Muon([g for g in groups if g["optimizer"] == "muon"], lr=optim.muon_lr))

    class Both:
        def step(self):
            for part in parts:
                part.step()

        def zero_grad(self):
            for part in parts:
                part.zero_grad()

    _train(model, opt, 3)
    _train(reference, Both(), 3)
    for (n, a), b in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(a, b), n
    # state_dict round trip: a fresh optimizer continues exactly
    resumed_model = copy.deepcopy(model)
    resumed = Optimizers(resumed_model, optim)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    _train(model, opt, 2, seed=1)
    _train(resumed_model, resumed, 2, seed=1)
    for (n, a), b in zip(model.named_parameters(), resumed_model.parameters()):
        assert torch.equal(a, b), n


def test_role_optimizer_reads_scalevec_0_1_checkpoints_and_keeps_lr_ratios_under_schedulers():
    import copy
    from collections import defaultdict

    import torch

    from scalevec import OptimConfig, Optimizers

    optim = OptimConfig(name="muon", lr=0.01, muon_lr=0.03, scale_lr_mult=0.5)
    model = _toy_model()
    opt = Optimizers(model, optim)
    _train(model, opt, 2)
    legacy = {}  # scalevec 0.1's format: one state dict per optimizer, each holding its own parameters' state
    for kind, inner in opt.inner.items():
        own, shared = {p for g in inner.param_groups for p in g["params"]}, inner.state
        inner.state = defaultdict(dict, {p: s for p, s in shared.items() if p in own})
        legacy[kind] = copy.deepcopy(inner.state_dict())
        inner.state = shared
    twin = copy.deepcopy(model)
    loaded = Optimizers(twin, optim)
    loaded.load_state_dict(legacy)
    _train(model, opt, 2, seed=3)
    _train(twin, loaded, 2, seed=3)
    for (n, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), n

    fresh = Optimizers(_toy_model(), optim)
    peaks = [g["lr"] for g in fresh.param_groups]
    scheduler = torch.optim.lr_scheduler.LambdaLR(fresh, lambda step: 1 / (1 + step))
    for _ in range(3):
        fresh.step()
        scheduler.step()
    assert [g["lr"] for g in fresh.param_groups] == pytest.approx([p / 4 for p in peaks])
    assert len(set(peaks)) > 1  # the groups keep their own rates (AdamW, Muon, scale multiplier)


def test_trainer_example_in_the_docs_runs_and_resumes(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    import re
    from pathlib import Path

    import torch

    text = (Path(__file__).parent.parent / "docs" / "trainer.md").read_text()
    code = re.findall(r"```python\n(.*?)```", text, re.S)[1]
    scope = {"OUT": str(tmp_path / "out")}
    exec(compile(code, "docs/trainer.md", "exec"), scope)
    trainer, model = scope["trainer"], scope["model"]
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 6 and all(map(lambda x: x == x, losses))
    assert (tmp_path / "out" / "checkpoint-3" / "optimizer.pt").is_file()
    # resuming from the step-3 checkpoint reaches the same weights as the straight run
    straight = {n: p.detach().clone() for n, p in model.named_parameters()}
    scope2 = {"OUT": str(tmp_path / "out")}
    checkpoint = str(tmp_path / "out" / "checkpoint-3")
    code2 = code.replace("trainer.train()", f"trainer.train(resume_from_checkpoint={checkpoint!r})")
    exec(compile(code2, "docs/trainer.md", "exec"), scope2)
    for name, p in scope2["model"].named_parameters():
        torch.testing.assert_close(p.detach(), straight[name], rtol=1e-5, atol=1e-6, msg=name)

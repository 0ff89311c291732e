"""Issue "Foundation": config files, overrides, validation, and the CLI's one-line errors."""

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from scalevec.cli import main
from scalevec.config import ConfigError, ModelConfig, OptimConfig, load_config, to_toml


def test_presets_fill_fields_and_explicit_fields_override(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('seed = 5\n[model]\npreset = "cpu-3m"\nd_ff = 640\n'
                    '[strategy]\npreset = "dnp+or"\nqk_scale_shape = "full"\n')
    config = load_config(path, ["model.n_layers=3", "strategy.dnp=q,k"])
    assert (config.model.d_model, config.model.d_ff, config.model.n_layers) == (192, 640, 3)
    assert (config.strategy.scale, config.strategy.dnp, config.strategy.qk_scale_shape) == ("or", ["q", "k"], "full")
    assert config.seed == 5


def test_a_whole_number_where_text_is_expected_is_that_text():
    """`--set data.dir=2024` reads as TOML's integer; a folder may be named so, and the field's own check speaks."""
    assert load_config(None, ["data.dir=2024"]).data.dir == "2024"
    with pytest.raises(ConfigError, match="train.time_limit='10' is not a duration"):
        load_config(None, ["train.time_limit=10"])
    with pytest.raises(ConfigError, match="data.dir: expected str, got 1.5"):
        load_config(None, ["data.dir=1.5"])


def test_resolved_toml_round_trips(tmp_path):
    config = load_config(None, ["strategy.preset=unified", "model.preset=cpu-7m", "model.tie_embeddings=false"])
    path = tmp_path / "resolved.toml"
    path.write_text(to_toml(config))
    assert load_config(path) == config


@pytest.mark.parametrize("overrides, message", [
    (["model.d_modle=256"], "unknown key model.d_modle"),
    (["modle.d_model=256"], "unknown key modle"),
    (["model.d_model=abc"], "model.d_model: expected int"),
    (["model.tie_embeddings=3"], "model.tie_embeddings: expected bool"),
    (["model.d_model=100", "model.n_heads=3"], "model.d_model=100 is not divisible by model.n_heads=3"),
    (["model.n_kv_heads=3"], "model.n_heads=4 is not divisible by model.n_kv_heads=3"),
    (["model.d_model=36", "model.n_heads=4"], "RoPE needs an even head size"),
    (["strategy.preset=unifed"], "unknown strategy preset 'unifed'"),
    (["model.preset=cpu-moe", "moe.dispatch=bmm"], "moe.dispatch='bmm'; choose auto, grouped or padded"),
    (["model.preset=cpu-moe", "model.moe_d_expert=100"], "the expert width 100 must be multiples of 8"),
    (["model.preset=cpu-9m"], "unknown size preset 'cpu-9m'"),
    (["strategy.dnp=q,x"], "strategy.dnp has unknown 'x'"),
    (["strategy.dual_placement=q", "strategy.dnp=q"], "'q' is in both dual_placement and dnp"),
    (["strategy.scale=exp"], "strategy.scale='exp'"),
    (["model.d_model"], "expected section.field=value"),
    (["train.grad_accum=1180591620717411303424"], "train.grad_accum=1180591620717411303424 does not fit in 64 bits"),
    (["model.sliding_window=-9223372036854775809"], "does not fit in 64 bits"),
    (["train.threads=4611686018427387904"], "train.threads=4611686018427387904 must be in 0..4096"),
    (["model.vocab_size=4611686018427387904"], "is beyond what a tensor can hold"),
    (["model.d_model=64\nmodel.n_layers=2"], "model.d_model: expected int, got '64"),  # not two keys
    (["train.loggers=csv,csv"], "train.loggers names 'csv' twice"),
    (["data.sources=milton,austen,milton"], "data.sources names 'milton' twice"),
    (["optim.weight_decay=1000"], "optim.weight_decay=1000.0 at learning rate 0.003 multiplies the weights by"),
    (["optim.name=muon", "optim.weight_decay=50"], "optim.weight_decay=50.0 at learning rate 0.02"),
    (["strategy.preset=unified", "optim.scale_lr_mult=10", "optim.scale_weight_decay=40"],
     "optim.scale_weight_decay=40.0 at learning rate 0.03"),
])
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(None, overrides)


def test_bad_toml_file_is_a_config_error(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[model\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="is a directory; pass a .toml file"):
        load_config(tmp_path)


@pytest.mark.parametrize("args, message", [
    (["info", "cpu-1m", "--set", "model.widht=3"], "unknown key model.widht"),
    (["info", "cpu-1m", "--set", "model.d_model=x"], "model.d_model: expected int"),
    (["info", "cpu-1m", "--set", "model.d_model=100", "--set", "model.n_heads=3"], "not divisible"),
    (["info", "cpu-moe", "--set", "model.moe_every=99"], "model.moe_every=99 is above model.n_layers"),
    (["info", "nonsense"], "neither a config file nor a model preset"),
])
def test_cli_config_errors_are_one_line_exit_2(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and err.startswith("scalevec: error: ")


def test_cli_entry_point_exit_code():
    result = subprocess.run([sys.executable, "-m", "scalevec", "info", "cpu-1m", "--set", "model.bogus=1"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    keys = ", ".join(f.name for f in dataclasses.fields(ModelConfig))
    assert keys.startswith("preset, vocab_size, d_model, n_layers, n_heads, n_kv_heads, head_dim, qkv_bias, d_ff")
    expected = f"scalevec: error: unknown key model.bogus; valid keys of model: {keys}"
    assert result.stderr.strip().splitlines() == [expected]


def test_output_cut_short_by_its_reader_is_no_traceback():
    # 400 blocks' JSON (about 250 kB) outgrows the pipe's buffer, so writes after the reader left fail
    argv = [sys.executable, "-m", "scalevec", "info", "cpu-0.5m", "--json", "--set", "model.n_layers=400"]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        assert process.stdout.read(10).startswith(b"{")
        process.stdout.close()
        error = process.stderr.read().decode()
    assert process.returncode == 1 and error == "", error


def test_info_reports_counts(capsys):
    assert main(["info", "cpu-1m", "--json", "--set", "strategy.preset=unified"]) == 0
    summary = json.loads(capsys.readouterr().out)
    by_kind = summary["by_kind"]
    assert summary["parameters"] == sum(by_kind.values()) == sum(summary["by_role"].values())
    assert by_kind["embedding"] == 8192 * 128
    assert 0 < summary["scale_fraction"] < 0.01
    # d=128, 4 layers: q,k,v,o = 128*(128+64+64) + 128*128; ffn 3*128*384; head tied 8192*128
    matmul = 4 * (128 * 256 + 128 * 128 + 3 * 128 * 384) + 8192 * 128
    assert summary["flops_per_token"] == 6 * matmul + 12 * 4 * 128 * 256


def test_setting_a_preset_replaces_the_section_of_a_resolved_file(tmp_path):
    path = tmp_path / "resolved.toml"
    path.write_text(to_toml(load_config(None, ["strategy.preset=unified"])))
    config = load_config(path, ["strategy.preset=hg", "strategy.scale=er"])
    assert (config.strategy.preset, config.strategy.heterogeneous, config.strategy.dnp, config.strategy.scale) == \
        ("hg", True, [], "er")


def test_configs_of_scalevec_0_1_still_load():
    old = {"train": {"tensorboard": True, "steps": 10}}
    assert load_config(old).train.loggers == ["tensorboard"]
    assert load_config({"train": {"tensorboard": False}}).train.loggers == []
    with pytest.raises(ConfigError, match="train.tensorboard: expected bool"):
        load_config({"train": {"tensorboard": "maybe"}})


def test_choices_are_typed_and_checked_for_configs_built_in_code():
    import typing

    from scalevec.config import Config, LoggerName, ModelConfig, TrainConfig, validate
    from scalevec.strategy import Strategy
    from scalevec.train.loggers import LOGGERS

    assert set(LOGGERS) == set(typing.get_args(LoggerName))
    cases = [(Config(model=ModelConfig(norm="batch")), "model.norm='batch'; choose rms or layer"),
             (Config(strategy=Strategy(scale="xx")), "strategy.scale='xx'; choose fixed, plain, or or er"),
             (Config(train=TrainConfig(loggers=["csv", "mlflow"])), "train.loggers has unknown 'mlflow'")]
    for config, message in cases:
        with pytest.raises(ConfigError, match=re.escape(message)):
            validate(config)


def test_renamed_strategy_keys_still_load_from_files_and_overrides(tmp_path):
    path = tmp_path / "old.toml"
    path.write_text('[strategy]\ndp = ["q", "v"]\ndp_output_role = "output"\n')
    config = load_config(path)
    assert (config.strategy.dual_placement, config.strategy.dual_placement_role) == (["q", "v"], "output")
    assert load_config(path, ["strategy.dp=gate"]).strategy.dual_placement == ["gate"]
    assert load_config(None, ["strategy.dp=k,up"]).strategy.dual_placement == ["k", "up"]
    assert "dual_placement = [" in to_toml(config) and "\ndp =" not in to_toml(config)


def test_runs_written_before_format_2_keep_their_iwd_rule(tmp_path, capsys):
    """A run or study record of scalevec < 0.2 (no `format`) ran IWD as `iwd-balanced` and undecayed routers; it
    resumes and reports as such. A hand-written config without `format` means the current rule."""
    import tomli_w

    from scalevec.rundir import RunDirError, check_run_dir

    committed = Path(__file__).resolve().parents[1] / "results/study-improvements-cpu/records/unified"
    record = json.loads(next(committed.rglob("seed0.json")).read_text())["config"]
    assert "format" not in record and record["strategy"]["scale_decay"] == "iwd"
    old = load_config(record, resolved=True)
    assert (old.format, old.strategy.scale_decay, old.strategy.preset) == (2, "iwd-balanced", "unified")
    assert load_config(record).strategy.scale_decay == "iwd"  # read as a hand-written file: today's rule
    moe = {**record, "model": {**record["model"], "moe_experts": 4}}
    assert load_config(moe, resolved=True).optim.router_weight_decay == 0.0
    assert load_config(moe).optim.router_weight_decay == OptimConfig().router_weight_decay == 0.1
    assert load_config(None, ["strategy.preset=or+iwd", "format=1"]).strategy.scale_decay == "iwd-balanced"
    assert (old.schedule.floor_at_end, load_config(record).schedule.floor_at_end) == (False, True)
    with pytest.raises(ConfigError, match="format=3 is not a config format this scalevec reads"):
        load_config(None, ["format=3"])

    run = tmp_path / "old-run"
    (run / "checkpoints" / "step_00000010").mkdir(parents=True)
    (run / "config.toml").write_text(tomli_w.dumps(record))  # the old run's own file, as it wrote it
    assert main(["train", "--resume", "--out", str(run), "--print-config"]) == 0
    assert 'scale_decay = "iwd-balanced"' in capsys.readouterr().out
    check_run_dir(run, old, resume=True, overwrite=False)  # the saved config and the migrated one agree
    today = load_config(record, resolved=True)
    today.strategy.scale_decay = "iwd"  # resuming it under today's rule would change what it runs
    with pytest.raises(RunDirError, match="strategy.scale_decay differs"):
        check_run_dir(run, today, resume=True, overwrite=False)


def test_info_counts_the_decayed_scale_entries_per_role_and_kind(capsys):
    assert main(["info", "cpu-0.5m", "--json", "--set", "strategy.preset=unified"]) == 0
    counts = json.loads(capsys.readouterr().out)["scale_decay"]
    # cpu-0.5m: 3 blocks; OR β of each v-input scale and of the final norm; no DNP-input β, no α, no Output
    assert counts["input/or_magnitude"] == {"decayed": 4, "entries": 4}
    assert counts["input/or_direction"] == {"decayed": 0, "entries": 3 * 5 * 64 + 64}
    assert counts["output/or_direction"]["decayed"] == counts["output/or_magnitude"]["decayed"] == 0
    assert main(["info", "cpu-0.5m", "--json", "--set", "strategy.preset=unified",
                 "--set", "optim.decay_or_direction=true"]) == 0
    assert json.loads(capsys.readouterr().out)["scale_decay"]["input/or_direction"]["decayed"] == 3 * 5 * 64 + 64
    assert main(["info", "cpu-0.5m", "--set", "strategy.preset=iwd"]) == 0
    out = capsys.readouterr().out
    assert "scale entries decayed (strategy.scale_decay=iwd): input/gain 448 of 448" in out
    assert "final_scale feeds tok_emb.weight" in out

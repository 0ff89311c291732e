"""Issue "Export and import": transformers parity, exact imports, refusals, generation."""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file
from test_model import randomize_scales

from scalevec import ModelConfig, build_model, strategy
from scalevec.checkpoint import save_checkpoint
from scalevec.cli import main
from scalevec.config import Config, DataConfig, MoEConfig, TrainConfig, to_toml
from scalevec.convert import ConvertError
from scalevec.export.hf import export_run
from scalevec.generate import generate
from scalevec.hf_import import HFImportError, import_hf

transformers = pytest.importorskip("transformers")

SHAPE = ModelConfig(preset="", vocab_size=512, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=64)


def quiet(*_):
    pass


def make_run(run_dir, small_data, strat, tie=True, model=None, moe=None):
    """A run directory with one checkpoint of random weights and scales; `model`: ModelConfig fields to set,
    `moe`: the MoEConfig."""
    config = Config(model=ModelConfig(**{**SHAPE.__dict__, "tie_embeddings": tie, **(model or {})}), strategy=strat,
                    data=DataConfig(dir=str(small_data)), train=TrainConfig(seq_len=64), moe=moe or MoEConfig())
    model = build_model(config.model, strat, seed=4, moe=config.moe)
    randomize_scales(model)
    run_dir.mkdir(parents=True)
    (run_dir / "config.toml").write_text(to_toml(config))
    save_checkpoint(run_dir / "checkpoints", 1, lambda tmp: save_file(model.state_dict(), tmp / "model.safetensors"),
                    {}, keep=1)
    return model


def hf_logits(path, tokens):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(tokens).logits


EXACT = ["standard", "hg", "dp", "or", "er", "hg+dp+er", "qknorm", "hg+qknorm+or", "none"]


@pytest.mark.parametrize("name", EXACT)
@pytest.mark.parametrize("tie", [True, False])
def test_export_loads_in_transformers_with_equal_logits(small_data, tmp_path, name, tie):
    model = make_run(tmp_path / "run", small_data, strategy(name), tie)
    architecture = export_run(tmp_path / "run", tmp_path / "hf", log=quiet)
    assert architecture == ("qwen3" if "qknorm" in name else "llama")
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(tokens)
    torch.testing.assert_close(hf_logits(tmp_path / "hf", tokens), ours, atol=1e-4, rtol=1e-4)
    files = {p.name for p in (tmp_path / "hf").iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= files


def test_exported_tokenizer_loads_offline(small_data, tmp_path):
    make_run(tmp_path / "run", small_data, strategy("standard"))
    export_run(tmp_path / "run", tmp_path / "hf", log=quiet)
    from tokenizers import Tokenizer

    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = Tokenizer.from_file(str(small_data / "tokenizer.json"))
    text = "Call me Ishmael. Some years ago"
    assert hf_tok(text)["input_ids"] == ours.encode(text).ids
    assert hf_tok.eos_token == "<|endoftext|>"


@pytest.mark.parametrize("name, reason", [("unified", "no transformers form"), ("dnp", "no transformers form"),
                                          ("gemma", "needs model.embedding_scale"),
                                          ("qknorm", "with a full-width scale has no transformers form"),
                                          ("gemma+dnp", "DNP on gate, k, q, up with post-branch norms has no")])
def test_what_no_family_expresses_leaves_as_remote_code_and_a_forced_family_is_refused(small_data, tmp_path, name,
                                                                                         reason, capsys):
    strat = strategy(name, qk_scale_shape="full") if name == "qknorm" else strategy(name)
    model = make_run(tmp_path / "run", small_data, strat)
    assert main(["export", str(tmp_path / "run"), "--to", str(tmp_path / "hf"), "--family", "llama"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and reason in err and "--family llama" in err and "remote-code form" in err
    assert not (tmp_path / "hf").exists()
    assert main(["export", str(tmp_path / "run"), "--to", str(tmp_path / "hf")]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "as remote code" in out and reason.split(" has no")[0] in out
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model(tokens), atol=1e-4, rtol=1e-4)


def test_a_forced_family_must_compute_the_same_function(small_data, tmp_path, capsys):
    make_run(tmp_path / "run", small_data, strategy("qknorm"))
    assert main(["export", str(tmp_path / "run"), "--to", str(tmp_path / "hf"), "--family", "llama"]) == 2
    assert "this model is exactly Qwen3ForCausalLM (--family qwen3), not llama" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "run"), "--to", str(tmp_path / "hf"), "--family", "remote"]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "scalevec"
    assert main(["export", str(tmp_path / "run"), "--to", str(tmp_path / "x"), "--family", "lama"]) == 2
    assert "--family 'lama'; choose one of llama, mistral" in capsys.readouterr().err


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # 64: every band of head_dim 8


def random_hf(tmp_path, architecture="llama", tie=False, head_dim=8, rope=None):
    from test_apply import CLASSES

    cls, config_cls = (getattr(transformers, name) for name in CLASSES[architecture])
    config = config_cls(vocab_size=512, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
                        max_position_embeddings=256 if rope else 64, tie_word_embeddings=tie, rms_norm_eps=1e-6,
                        **({"rope_parameters": rope} if rope else {}))
    torch.manual_seed(0)
    model = cls(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):  # Qwen2's q, k, v biases start at 0: make them matter
                p.normal_(0, 0.5)
    path = tmp_path / f"hf-{architecture}"
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("architecture, head_dim, rope", [("llama", 8, None), ("qwen3", 16, None), ("llama", 12, None),
                                                          ("llama", 8, LLAMA3_ROPE), ("qwen3", 16, LLAMA3_ROPE),
                                                          ("qwen2", 8, None), ("qwen2", 16, LLAMA3_ROPE)])
def test_import_export_round_trips_identical_tensors(tmp_path, architecture, head_dim, rope):
    from safetensors.torch import load_file

    from scalevec.checkpoint import load_run_model

    # Qwen3's real layouts (head_dim apart from width/heads) and Llama 3.1's RoPE scaling
    source = random_hf(tmp_path, architecture, head_dim=head_dim, rope=rope)
    import_hf(source, "standard", tmp_path / "run", warm_start=False, log=quiet)
    export_run(tmp_path / "run", tmp_path / "again", log=quiet)
    before, after = load_file(source / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert config["head_dim"] == head_dim and config["hidden_size"] == 32
    assert config["rope_parameters"]["rope_type"] == (rope or {"rope_type": "default"})["rope_type"]
    tokens = torch.randint(0, 512, (2, 200 if rope else 20), generator=torch.Generator().manual_seed(2))
    expected = hf_logits(source, tokens)
    torch.testing.assert_close(hf_logits(tmp_path / "again", tokens), expected, atol=1e-5, rtol=1e-5)
    _, ours = load_run_model(tmp_path / "run")
    assert ours.config.rope_scaling == ("llama3" if rope else "none")
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("architecture", ["llama", "qwen3", "mistral", "qwen2"])
@pytest.mark.parametrize("name", ["standard", "hg", "dp", "or", "er", "hg+or", "hg+dp+er"])
def test_exact_imports_keep_logits(tmp_path, architecture, name):
    source = random_hf(tmp_path, architecture, tie=name == "hg+or")  # a Mistral imports (and exports) as Llama
    difference = import_hf(source, name, tmp_path / "run", warm_start=False, log=quiet)
    assert difference < 1e-4
    from scalevec.checkpoint import load_run_model

    _, model = load_run_model(tmp_path / "run")
    tokens = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf_logits(source, tokens), atol=1e-4, rtol=1e-4)


def test_function_changing_import_needs_warm_start(tmp_path, capsys):
    source = random_hf(tmp_path)
    capsys.readouterr()
    assert main(["import", str(source), "--strategy", "unified", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "changes the model's function" in err and "--warm-start" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()
    assert main(["import", str(source), "--strategy", "unified", "--out", str(tmp_path / "run"), "--warm-start"]) == 0
    assert "max |Δ logit|" in capsys.readouterr().out
    from scalevec.config import load_config

    config = load_config(tmp_path / "run" / "config.toml")
    assert config.strategy.dnp == ["q", "k", "gate", "up"] and config.train.init_from.endswith("model.safetensors")


def test_import_checks_names_shapes_and_er_sign(tmp_path):
    from safetensors.torch import load_file, save_file

    source = random_hf(tmp_path)
    state = load_file(source / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"] = state["model.layers.1.mlp.up_proj.weight"][:, :16].contiguous()
    save_file(state, source / "model.safetensors")
    expected = r"tensor model.layers.1.mlp.up_proj.weight has shape \(48, 16\), expected \(48, 32\)"
    with pytest.raises(HFImportError, match=expected):
        import_hf(source, "standard", tmp_path / "a", warm_start=False, log=quiet)
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, source / "model.safetensors")
    with pytest.raises(HFImportError, match="lacks tensor model.layers.1.mlp.up_proj.weight"):
        import_hf(source, "standard", tmp_path / "b", warm_start=False, log=quiet)
    negative = random_hf(tmp_path / "neg")
    state = load_file(negative / "model.safetensors")
    state["model.norm.weight"][0] = -0.5
    save_file(state, negative / "model.safetensors")
    with pytest.raises(ConvertError, match="ER needs every γ > 0"):
        import_hf(negative, "er", tmp_path / "c", warm_start=False, log=quiet)
    (tmp_path / "pickle").mkdir()
    (tmp_path / "pickle" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "pickle" / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(HFImportError, match="pickled .bin checkpoints are not read"):
        import_hf(tmp_path / "pickle", "standard", tmp_path / "d", warm_start=False, log=quiet)


def test_imported_run_trains_from_its_weights(tmp_path, small_data):
    from safetensors.torch import load_file

    from scalevec.config import load_config
    from scalevec.data.prepare import prepare
    from scalevec.train.trainer import Trainer

    source = random_hf(tmp_path)
    import_hf(source, "hg+or", tmp_path / "run", warm_start=False, log=quiet, tokenizer=small_data / "tokenizer.json")
    config = load_config(tmp_path / "run" / "config.toml",
                         ["data.sources=moby_dick,milton", "train.steps=1", "train.seq_len=32", "train.batch_size=2"])
    prepare(config.data, progress=False, log=quiet)  # with the checkpoint's tokenizer, into the run's data folder
    trainer = Trainer(config, tmp_path / "fresh", progress=False, log=quiet)
    init = load_file(tmp_path / "run" / "init" / "model.safetensors")
    assert all(torch.equal(trainer.model.state_dict()[k], v) for k, v in init.items())


@pytest.mark.parametrize("name", ["standard", "unified", "gemma"])
def test_generation_with_cache_equals_without(name):
    model = build_model(SHAPE, strategy(name), seed=3)
    prompt = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(0))
    with_cache = generate(model, prompt, 25, use_cache=True)
    without = generate(model, prompt, 25, use_cache=False)
    assert with_cache.shape == (2, 32) and torch.equal(with_cache, without)
    sampled = [generate(model, prompt, 10, temperature=0.9, top_k=20, top_p=0.9, seed=5, use_cache=c) for c in (1, 0)]
    assert torch.equal(*sampled)


def test_generate_cli(small_data, tmp_path, capsys):
    make_run(tmp_path / "run", small_data, strategy("unified"))
    assert main(["generate", str(tmp_path / "run"), "--prompt", "Call me", "--max-new-tokens", "5",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("Call me")


def test_generate_stops_at_an_export_s_eos_when_its_tokenizer_has_no_endoftext(small_data, tmp_path, capsys,
                                                                                monkeypatch):
    """A user's tokenizer (Llama 3's <|end_of_text|>, Mistral's </s>): generation ends at the export's
    eos_token_id, or at --eos-id; an id outside the vocabulary is one line."""
    import scalevec.generate

    make_run(tmp_path / "run", small_data, strategy("standard"))
    export = tmp_path / "export"
    assert main(["export", str(tmp_path / "run"), "--to", str(export)]) == 0
    tokenizer = json.loads((export / "tokenizer.json").read_text())
    (token,) = [t for t in tokenizer["added_tokens"] if t["content"] == "<|endoftext|>"]
    token["content"] = "</s>"
    tokenizer["model"]["vocab"]["</s>"] = tokenizer["model"]["vocab"].pop("<|endoftext|>")
    (export / "tokenizer.json").write_text(json.dumps(tokenizer))
    stops = []
    real = scalevec.generate.generate
    monkeypatch.setattr(scalevec.generate, "generate", lambda *a, eos_id, **k: stops.append(eos_id) or real(*a, **k))
    argv = ["generate", str(export), "--prompt", "Call me", "--max-new-tokens", "3", "--temperature", "0"]
    assert main(argv) == 0 and main(argv + ["--eos-id", "7"]) == 0
    assert stops == [json.loads((export / "config.json").read_text())["eos_token_id"], 7] and stops[0] == token["id"]
    capsys.readouterr()
    assert main(argv + ["--eos-id", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--eos-id -1 is outside the model's vocabulary" in err[0], err


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_export_dtype_stores_the_rounded_fp32_export(small_data, tmp_path, dtype):
    from safetensors.torch import load_file

    make_run(tmp_path / "run", small_data, strategy("hg+or"))
    export_run(tmp_path / "run", tmp_path / "fp32", log=quiet)
    assert main(["export", str(tmp_path / "run"), "--to", str(tmp_path / "low"), "--dtype", dtype]) == 0
    full, low = load_file(tmp_path / "fp32" / "model.safetensors"), load_file(tmp_path / "low" / "model.safetensors")
    assert full.keys() == low.keys()
    for name in full:  # folded in fp32, then rounded once
        assert low[name].dtype == getattr(torch, dtype) and torch.equal(low[name], full[name].to(low[name].dtype))
    config = json.loads((tmp_path / "low" / "config.json").read_text())
    assert config["torch_dtype"] == dtype
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "low")
    assert model.dtype == getattr(torch, dtype)


def test_import_takes_the_run_options_and_resumes_from_anywhere(tmp_path, small_data, capsys, monkeypatch):
    import os

    from scalevec.config import load_config

    source = random_hf(tmp_path)
    (tmp_path / "text").mkdir()
    for i in range(3):
        (tmp_path / "text" / f"{i}.txt").write_text(f"Call me Ishmael, part {i}. " * 300)
    monkeypatch.chdir(tmp_path)
    assert main(["import", str(source), "--out", "imported", "--tokenizer", str(small_data / "tokenizer.json"),
                 "--set", "data.sources=[]", "--set", "data.inputs=text", "--set", "data.dir=mydata",
                 "--set", "data.val_fraction=0.3",
                 "--set", "train.steps=50", "--set", "train.seq_len=32", "--set", "train.batch_size=2"]) == 0
    config = load_config(tmp_path / "imported" / "config.toml")
    for path in (config.train.init_from, config.data.tokenizer, config.data.dir, *config.data.inputs):
        assert os.path.isabs(path), path
    assert config.data.inputs == [str(tmp_path / "text")] and config.train.steps == 50
    monkeypatch.chdir(small_data)  # another directory; and a fresh import can still be shortened
    run = str(tmp_path / "imported")
    assert main(["train", "--resume", "--out", run, "--set", "train.steps=2", "--set", "train.log_every=1"]) == 0
    assert "step 2:" in capsys.readouterr().out
    assert load_config(tmp_path / "imported" / "config.toml").train.steps == 2  # the run's config now
    assert main(["train", "--resume", "--out", run, "--set", "train.steps=3"]) == 2  # started: fixed
    assert "train.steps differs" in capsys.readouterr().err


def test_import_refuses_what_would_train_nonsense(tmp_path, small_data, capsys):
    source = random_hf(tmp_path)  # no tokenizer.json beside the weights
    assert main(["import", str(source), "--out", str(tmp_path / "a")]) == 0
    assert "no tokenizer.json" in capsys.readouterr().out
    data = tmp_path / "never"
    assert main(["train", "--resume", "--out", str(tmp_path / "a"), "--set", f"data.dir={data}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.tokenizer is empty" in err[0] and not data.exists()
    assert main(["import", str(source), "--out", str(tmp_path / "b"), "--set", "model.d_ff=64"]) == 2
    assert "changes the shape of the imported weights" in capsys.readouterr().err and not (tmp_path / "b").exists()
    big = tmp_path / "big"
    from scalevec.config import DataConfig
    from scalevec.data.prepare import prepare
    prepare(DataConfig(dir=str(big), sources=["milton"], vocab_size=600), progress=False, log=quiet)
    assert main(["import", str(source), "--out", str(tmp_path / "c"), "--tokenizer", str(big / "tokenizer.json")]) == 2
    assert "more than the checkpoint's vocab_size 512" in capsys.readouterr().err and not (tmp_path / "c").exists()


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "qwen3", "gemma2", "gemma3", "olmo2"])
def test_the_part_map_writes_every_parameter_and_reads_back_what_it_wrote(architecture):
    """Import and export are mirrored loops over one map: writing every checkpoint tensor of an architecture into
    its own strategy's Decoder sets every parameter (none keeps its NaN), and reading the parts returns them."""
    from dataclasses import replace

    from scalevec.hf_keys import (
        GLOBAL_PARTS,
        LAYER_PARTS,
        NORM_OFFSET,
        global_keys,
        hf_shapes,
        layer_keys,
        read_part,
        source_strategy,
        write_part,
    )
    from scalevec.model import Decoder

    m = replace(ModelConfig(preset="", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                            max_seq_len=16, tie_embeddings=False), qkv_bias=architecture == "qwen2",
                pre_norm=architecture != "olmo2")
    model = Decoder(m, source_strategy(architecture))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    gen, offset = torch.Generator().manual_seed(0), NORM_OFFSET.get(architecture, 0.0)
    shapes = hf_shapes(m, architecture)
    state = {name: torch.rand(shape, generator=gen) + 0.5 for name, shape in shapes.items()}
    parts = [(model, GLOBAL_PARTS[key], name) for key, name in global_keys(m).items()]
    parts += [(block, LAYER_PARTS[key], name) for i, block in enumerate(model.blocks)
              for key, name in layer_keys(i, architecture).items()]
    assert sorted(name for _, _, name in parts) == sorted(shapes)
    for root, part, name in parts:
        write_part(root, part, state[name], offset)
    unset = [name for name, p in model.named_parameters() if p.isnan().any()]
    # OLMo 2 has no pre-norm, so the γ its own strategy puts before a QK-norm'd projection is no checkpoint tensor:
    # it starts at 1, as in the checkpoint's function
    assert unset == ([f"blocks.{i}.attn.qkv.in_scales.{n}.weight" for i in range(2) for n in "qk"]
                     if architecture == "olmo2" else []), "a parameter no checkpoint tensor sets"
    for root, part, name in parts:
        torch.testing.assert_close(read_part(root, part, shapes[name], offset), state[name], rtol=1e-6, atol=1e-6)


def test_an_fsdp2_checkpoint_is_read_at_its_own_shapes(small_data, tmp_path, capsys):
    """Export reads an FSDP2 run's shards (dcp/) whole, quietly, and a config.toml edited since training is named in
    one line, as for whole-tensor checkpoints (it was a traceback from torch.distributed.checkpoint)."""
    import warnings

    from torch.distributed.checkpoint import save

    from scalevec.checkpoint import load_run_model

    model = make_run(tmp_path / "run", small_data, strategy("hg+or"))
    shutil.rmtree(tmp_path / "run" / "checkpoints")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one process
        save_checkpoint(tmp_path / "run" / "checkpoints", 1,
                        lambda tmp: save({"model": model.state_dict()}, checkpoint_id=tmp / "dcp"), {}, keep=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, loaded = load_run_model(tmp_path / "run")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    config = tmp_path / "run" / "config.toml"
    config.write_text(config.read_text().replace("d_ff = 48", "d_ff = 64"))
    assert main(["export", str(tmp_path / "run"), "--to", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "has shape (32, 48), but its config.toml describes (32, 64)" in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()

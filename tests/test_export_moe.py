"""Issue "Every model leaves": MoE models convert between strategies, and every export comes back in."""

import shutil

import pytest
import torch
from test_export_remote import SHAPES, load, scalevec_model, tokens

from scalevec import apply_strategy
from scalevec.evaluate import load_model
from scalevec.export.remote import save_remote
from scalevec.hf_import import HFImportError, hf_model, import_hf, read_hf_dir

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("shape", ["moe", "moe-shared"])
@pytest.mark.parametrize("source, target", [("standard", "hg+or"), ("unified", "er"), ("hg+dp+er", "standard"),
                                            ("dnp", "hg+dp+or"), ("gemma", "hg")])
def test_apply_strategy_converts_moe_models_exactly(shape, source, target):
    """Router, per-expert and shared-expert scales go where the target holds them (one per expert under HG), DNP
    scales of every expert keep their values under OR/ER (one magnitude per expert)."""
    model = scalevec_model(shape, source)
    x = tokens()
    with torch.no_grad():
        before = model(x)
        apply_strategy(model, target)
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
    assert model.strategy.heterogeneous == ("hg" in target)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_remote_export_imports_back_exactly_and_evaluates(tmp_path, small_data, shape):
    model = scalevec_model(shape, "unified")
    save_remote(model, tmp_path / "export")
    shutil.copyfile(small_data / "tokenizer.json", tmp_path / "export" / "tokenizer.json")
    x = tokens()
    with torch.no_grad():
        expected = model(x)
        back, form = hf_model(*read_hf_dir(tmp_path / "export"))
        assert form == "remote"
        torch.testing.assert_close(back(x), expected, atol=1e-5, rtol=1e-5)
        loaded, _ = load_model(tmp_path / "export")  # what scalevec eval and generate read
        torch.testing.assert_close(loaded(x), expected, atol=1e-5, rtol=1e-5)
    (tmp_path / "export" / "tokenizer.json").unlink()  # a 512-token tokenizer: too many for this model to train
    difference = import_hf(tmp_path / "export", "unified", tmp_path / "run", warm_start=False, log=lambda *_: None)
    assert difference < 1e-4
    save_remote(back, tmp_path / "again")  # the round trip writes the same checkpoint's function
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path / "again")(x).logits, expected, atol=1e-4, rtol=1e-4)


NATIVE = {  # family: two shapes (strategy, ModelConfig fields, MoEConfig fields)
    "qwen3_moe": [("qknorm", dict(moe_every=2, moe_d_expert=24), dict(normalize_top_k=False)),
                  ("hg+qknorm+or", dict(n_kv_heads=1), {})],
    "olmoe": [(("qknorm", dict(qk_scale_shape="full", qk_norm_group="full")), {}, dict(normalize_top_k=False)),
              (("hg+qknorm+er", dict(qk_scale_shape="full", qk_norm_group="full", dual_placement=["gate", "up"])),
               dict(moe_top_k=1), {})],
    "mixtral": [("standard", {}, {}), ("hg+or", dict(moe_d_expert=16, moe_top_k=3), {})],
    "qwen2_moe": [("standard", dict(moe_shared_expert=True, moe_every=2), dict(normalize_top_k=False)),
                  ("hg+dp+or", dict(moe_shared_expert=True, qkv_bias=True), {})]}
CLASSES = {"qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM", "mixtral": "MixtralForCausalLM",
           "qwen2_moe": "Qwen2MoeForCausalLM"}


def make_moe_run(tmp_path, small_data, name, fields, moe, tie=False):
    from test_export import make_run

    from scalevec import strategy
    from scalevec.config import MoEConfig

    s = strategy(*name[:1], **name[1]) if isinstance(name, tuple) else strategy(name)
    model = make_run(tmp_path / "run", small_data, s, tie=tie, model={"moe_experts": 4, "moe_top_k": 2, **fields},
                     moe=MoEConfig(**moe))
    if model.config.qkv_bias:  # make_run's biases are zero: rewrite the checkpoint with biases that matter
        from safetensors.torch import save_file

        from scalevec.checkpoint import save_checkpoint

        with torch.no_grad():
            for block in model.blocks:
                block.attn.qkv.bias.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
        save_checkpoint(tmp_path / "run" / "checkpoints", 2,
                        lambda tmp: save_file(model.state_dict(), tmp / "model.safetensors"), {}, keep=1)
    return model.eval()


@pytest.mark.parametrize("family", list(NATIVE))
@pytest.mark.parametrize("shape", [0, 1])
def test_moe_models_export_as_the_family_that_computes_them(tmp_path, small_data, family, shape):
    from scalevec.export.hf import export_run
    from scalevec.generate import generate

    name, fields, moe = NATIVE[family][shape]
    model = make_moe_run(tmp_path, small_data, name, fields, moe, tie=shape == 0)
    lines = []
    assert export_run(tmp_path / "run", tmp_path / "hf", log=lines.append) == family
    assert len(lines) == 1 and f"as {family}" in lines[0]
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert type(hf).__name__ == CLASSES[family] and not info["missing_keys"] and not info["unexpected_keys"]
    x = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(x).logits, model(x), atol=1e-4, rtol=1e-4)
    prompt = x[:, :5]
    out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                      pad_token_id=0)
    assert torch.equal(out, generate(model, prompt, 6))
    back, form = hf_model(*read_hf_dir(tmp_path / "hf"))  # and back in, exactly
    assert form == family
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("moe, fields, reason", [
    (dict(router="sigmoid"), {}, "a sigmoid router"), (dict(balance="bias"), {}, "expert-bias routing"),
    (dict(normalize_top_k=False), {}, "top-k weights not renormalized (Mixtral renormalizes them)"),
    ({}, dict(moe_every=2), "dense layers between routed ones")])
def test_moe_models_no_family_computes_leave_as_remote_code(tmp_path, small_data, capsys, moe, fields, reason):
    from scalevec.cli import main

    model = make_moe_run(tmp_path, small_data, "standard", fields, moe)
    assert main(["export", str(tmp_path / "run"), "--to", str(tmp_path / "hf"), "--family", "mixtral"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and reason in err and not (tmp_path / "hf").exists()
    assert main(["export", str(tmp_path / "run"), "--to", str(tmp_path / "hf")]) == 0
    assert "as remote code" in capsys.readouterr().out
    x = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path / "hf")(x).logits, model(x), atol=1e-4, rtol=1e-4)


def random_moe_checkpoint(path, family, vocab=512, **fields):
    config_class = {"qwen3_moe": "Qwen3MoeConfig", "olmoe": "OlmoeConfig", "mixtral": "MixtralConfig",
                    "qwen2_moe": "Qwen2MoeConfig"}[family]
    own = {"qwen3_moe": dict(moe_intermediate_size=24, decoder_sparse_step=2, norm_topk_prob=True),
           "olmoe": dict(norm_topk_prob=False), "mixtral": {},
           "qwen2_moe": dict(moe_intermediate_size=24, shared_expert_intermediate_size=48)}[family]
    config = getattr(transformers, config_class)(
        vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, num_experts_per_tok=2, bos_token_id=None,
        eos_token_id=None, pad_token_id=None, **{"num_local_experts" if family == "mixtral" else "num_experts": 4},
        **{**own, **fields})
    torch.manual_seed(0)
    model = getattr(transformers, CLASSES[family])(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p).clamp(-3, 3))
            elif name.endswith("shared_expert_gate.weight"):  # scalevec's shared expert has no gate: exact at 0
                p.zero_()
            elif name.endswith("bias"):
                p.normal_(0, 0.5)
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("family", list(NATIVE))
def test_moe_checkpoints_import_exactly_and_convert(tmp_path, family):
    reference = random_moe_checkpoint(tmp_path / "hf", family)
    x = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(x).logits
        ours, form = hf_model(*read_hf_dir(tmp_path / "hf"))
        assert form == family
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)
        apply_strategy(ours, "hg+or")  # the imported model converts to a strategy, exactly
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)
    assert import_hf(tmp_path / "hf", "hg+dp+er", tmp_path / "run", warm_start=False, log=lambda *_: None) < 1e-4


def test_an_imported_moe_checkpoint_continues_pretraining(tmp_path, small_data):
    from safetensors.torch import load_file

    from scalevec.config import load_config
    from scalevec.data.prepare import prepare
    from scalevec.train.trainer import Trainer

    random_moe_checkpoint(tmp_path / "hf", "qwen3_moe")
    import_hf(tmp_path / "hf", "unified", tmp_path / "run", warm_start=True, log=lambda *_: None,
              tokenizer=small_data / "tokenizer.json")
    config = load_config(tmp_path / "run" / "config.toml",
                         ["data.sources=moby_dick", "train.steps=1", "train.seq_len=32", "train.batch_size=2"])
    assert config.model.moe_experts == 4 and config.moe.normalize_top_k and config.train.init_from
    prepare(config.data, progress=False, log=lambda *_: None)
    trainer = Trainer(config, tmp_path / "fresh", progress=False, log=lambda *_: None)
    init = load_file(tmp_path / "run" / "init" / "model.safetensors")
    assert all(torch.equal(trainer.model.state_dict()[k], v) for k, v in init.items())


def test_a_gated_shared_expert_is_refused_by_name(tmp_path):
    reference = random_moe_checkpoint(tmp_path / "hf", "qwen2_moe")
    with torch.no_grad():
        reference.model.layers[1].mlp.shared_expert_gate.weight.normal_()
    reference.save_pretrained(tmp_path / "hf")
    with pytest.raises(HFImportError, match="shared_expert_gate is not zero"):
        hf_model(*read_hf_dir(tmp_path / "hf"))


@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe", "mixtral"])
@pytest.mark.parametrize("name, form", [("hg+dp+or+iwd", "native"), ("unified", "remote")])
def test_apply_strategy_converts_transformers_moe_models_and_saves_what_they_compute(tmp_path, family, name, form):
    from scalevec import param_groups, strategy

    model = random_moe_checkpoint(tmp_path / "hf", family)
    x = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(x).logits
        apply_strategy(model, name)
        if form == "native":  # an exact strategy keeps the logits
            torch.testing.assert_close(model(x).logits, before, atol=1e-4, rtol=1e-4)
        for p in model.parameters():  # a random perturbation, so that every scale matters
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        trained = model(x).logits
    grouped = [n for group in param_groups(model, strategy(name).scale_decay) for n in group["names"]]
    assert sorted(grouped) == sorted(n for n, _ in model.named_parameters())
    model.save_pretrained(tmp_path / "out")
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True,
                                                                       output_loading_info=True)
    assert type(reloaded).__name__ == (CLASSES[family] if form == "native" else "ScalevecForCausalLM")
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(x).logits, trained, atol=1e-4, rtol=1e-4)


def test_apply_strategy_refuses_routed_layers_without_a_pattern_before_changing_anything(tmp_path):
    """Only layer 0 of 2 routed (mlp_only_layers = [1]; every n-th would route the last): refused up front (the
    first layer's attention used to be converted already when its routed block was refused)."""
    from scalevec.apply import ApplyError

    model = random_moe_checkpoint(tmp_path / "hf", "qwen3_moe", decoder_sparse_step=1, mlp_only_layers=[1])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ApplyError, match="routed blocks of this qwen3_moe model have no scalevec MoE form .*routed "
                                         "layers follow no pattern"):
        apply_strategy(model, "hg+or")
    assert not hasattr(model, "scalevec_strategy")
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)

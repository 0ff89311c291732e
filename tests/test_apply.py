"""Issue "Export and import", library API: apply_strategy on transformers models, role-aware groups."""

import dataclasses

import pytest
import torch
from test_export import SHAPE
from test_model import randomize_scales

from scalevec import OptimConfig, Optimizers, apply_strategy, build_model, param_groups, param_info, strategy
from scalevec.scales import Scale

transformers = pytest.importorskip("transformers")


CLASSES = {"llama": ("LlamaForCausalLM", "LlamaConfig"), "qwen3": ("Qwen3ForCausalLM", "Qwen3Config"),
           "mistral": ("MistralForCausalLM", "MistralConfig"), "qwen2": ("Qwen2ForCausalLM", "Qwen2Config")}


def hf_model(architecture: str, tie: bool, head_dim: int = 8, **fields):
    cls, config_cls = (getattr(transformers, name) for name in CLASSES[architecture])
    config = config_cls(vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=64,
                        tie_word_embeddings=tie, **fields)
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p).clamp(-3, 3))  # γ > 0, as ER needs
            elif name.endswith("bias"):  # Qwen2's q, k, v biases start at 0: make them matter
                p.normal_(0, 0.5)
    return model


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("architecture", ["llama", "qwen3", "mistral", "qwen2"])
@pytest.mark.parametrize("name", ["standard", "hg", "dp", "or", "er", "hg+or", "hg+dp+er+iwd"])
@pytest.mark.parametrize("tie, head_dim", [(False, 8), (True, 8), (False, 16)])
def test_apply_strategy_keeps_logits_and_covers_parameters(architecture, name, tie, head_dim):
    model = hf_model(architecture, tie, head_dim)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    before = logits(model, tokens)
    apply_strategy(model, name)
    torch.testing.assert_close(logits(model, tokens), before, atol=1e-4, rtol=1e-4)
    groups = param_groups(model, strategy(name).scale_decay)
    grouped = [n for g in groups for n in g["names"]]
    assert sorted(grouped) == sorted(n for n, _ in model.named_parameters())
    infos = param_info(model)
    kinds = {info.kind for info in infos.values()}
    expected_scale_kind = {"or": "or_direction", "er": "er_direction"}.get(strategy(name).scale, "gain")
    assert any(k.value == expected_scale_kind for k in kinds)
    if not strategy(name).heterogeneous:  # one shared scale feeds q, k and v
        feeds = infos["model.layers.0.self_attn.q_proj.projection.in_scales.q." +
                      ("weight" if strategy(name).scale == "plain" else "direction")].feeds
        assert {f[0].split(".")[-3] for f in feeds} == {"q_proj", "k_proj", "v_proj"}


def test_function_changing_strategy_applies_and_trains():
    model = hf_model("llama", tie=False)
    apply_strategy(model, "unified")
    assert "dnp" in repr(model.scalevec_strategy)
    opt = Optimizers(model, OptimConfig(lr=3e-3), "iwd")
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (4, 33), generator=gen)
    losses = []
    for _ in range(15):
        loss = model(tokens[:, :-1], labels=tokens[:, :-1]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def decoder_logits(model, tokens):
    with torch.no_grad():
        return model(tokens)


@pytest.mark.parametrize("source", ["standard", "hg+dp+er", "unified", "gemma", "dnp+or", "none", "dnp-ffn+er"])
@pytest.mark.parametrize("target", ["standard", "hg", "dp", "or", "hg+dp+or+iwd", "er"])
def test_apply_strategy_on_our_decoder_keeps_logits_and_the_source_norms(source, target):
    """Built directly (no transformers tensors), from any source strategy: exact targets keep the logits, and the
    source's norms stay with their scales (a DNP source used to fail)."""
    model = build_model(dataclasses.replace(SHAPE, tie_embeddings=source == "gemma"), strategy(source), seed=2)
    randomize_scales(model)
    if target == "er":  # ER holds positive γ only: DNP output scales of OR sources may have crossed zero
        for scale in (m for m in model.modules() if isinstance(m, Scale)):
            scale.set_gamma(scale().detach().abs() + 0.1)
    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    before = decoder_logits(model, tokens)
    apply_strategy(model, target)
    s, src = model.strategy, strategy(source)
    assert set(s.dnp) == set(src.dnp) and s.post_norms == src.post_norms
    assert not set(s.dual_placement) & set(s.dnp)
    assert (s.heterogeneous, s.scale) == (strategy(target).heterogeneous, strategy(target).scale)
    torch.testing.assert_close(decoder_logits(model, tokens), before, atol=1e-4, rtol=1e-4)
    assert sorted(param_info(model)) == sorted(n for n, _ in model.named_parameters())


def test_apply_strategy_on_our_decoder_folds_into_weights_what_no_scale_holds():
    # `none` has no scales: untied, every norm γ goes into a matrix's columns and the logits stay
    model = build_model(dataclasses.replace(SHAPE, tie_embeddings=False), strategy("hg+dp"), seed=2)
    randomize_scales(model)
    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    before = decoder_logits(model, tokens)
    apply_strategy(model, "none")
    assert not any(isinstance(m, Scale) for m in model.modules())
    torch.testing.assert_close(decoder_logits(model, tokens), before, atol=1e-5, rtol=1e-5)
    # a head-shaped QK scale becomes a full-width one, exactly
    model = build_model(SHAPE, strategy("qknorm"), seed=2)
    randomize_scales(model)
    before = decoder_logits(model, tokens)
    apply_strategy(model, strategy("hg", qk_scale_shape="full"))
    assert model.blocks[0].attn.qkv.out_scales["q"]().shape == (32,)
    torch.testing.assert_close(decoder_logits(model, tokens), before, atol=1e-5, rtol=1e-5)


def test_apply_strategy_on_our_decoder_refuses_before_changing_anything():
    from scalevec.convert import ConvertError

    model = build_model(SHAPE, strategy("dnp"), seed=2)
    randomize_scales(model)
    with torch.no_grad():
        model.blocks[1].ffn.gate_up.out_scales["up"].weight[0] = -0.5
    state = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ConvertError, match=r"blocks.1.ffn.gate_up.out_scales.up: ER needs every γ > 0"):
        apply_strategy(model, "er")
    assert model.strategy == strategy("dnp")
    assert all(torch.equal(p, state[n]) for n, p in model.state_dict().items())


@pytest.mark.parametrize("architecture", ["llama", "qwen3", "mistral", "qwen2"])
@pytest.mark.parametrize("name", ["standard", "hg", "dp", "or", "er", "hg+dp+er+iwd", "dp+or"])
def test_unapply_saves_a_plain_model_that_reloads_with_the_same_logits(tmp_path, architecture, name):
    from scalevec import OptimConfig, Optimizers, unapply

    model = hf_model(architecture, tie=name == "or")
    apply_strategy(model, name)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    opt = Optimizers(model, OptimConfig(lr=0.02))  # train a little, so every scale differs from its init
    for _ in range(3):
        model(tokens, labels=tokens).loss.backward()
        opt.step()
        opt.zero_grad()
    trained = logits(model, tokens)
    unapply(model)
    assert not hasattr(model, "scalevec_strategy")
    torch.testing.assert_close(logits(model, tokens), trained, atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path / "plain")
    reloaded = type(model).from_pretrained(tmp_path / "plain", output_loading_info=True)
    reloaded, info = reloaded
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(logits(reloaded.eval(), tokens), trained, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("architecture, name", [("llama", "unified"), ("llama", "qknorm"), ("qwen3", "dnp"),
                                                ("qwen2", "qknorm")])
def test_unapply_and_fold_refuse_before_changing_anything(architecture, name):
    from scalevec import fold_scales, unapply
    from scalevec.apply import ApplyError

    model = hf_model(architecture, tie=False)
    apply_strategy(model, name)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = logits(model, tokens)
    with pytest.raises(ApplyError, match="unapply: DNP on"):
        unapply(model)
    with pytest.raises(TypeError, match="use scalevec.unapply"):
        fold_scales(model)
    assert {n: p for n, p in model.named_parameters()}.keys() == before.keys()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    torch.testing.assert_close(logits(model, tokens), out)
    with pytest.raises(ApplyError, match="not a transformers model converted"):
        unapply(hf_model(architecture, tie=False))


@pytest.mark.parametrize("architecture, name, bias, reason", [
    ("llama", "gemma", False, "post-branch norms .* which a llama layer has no place for"),
    ("qwen3", "hg+or+gemma", False, "which a qwen3 layer has no place for"),
    ("llama", "unified", True, "remote-code form.*cannot hold this model .*attention_bias"),
])
def test_apply_strategy_refuses_what_the_model_could_not_compute_or_save(architecture, name, bias, reason):
    """A Llama layer has no slot for post-branch norms (the strategy's norms were silently left out, and
    save_pretrained then wrote a model with them); a Llama with attention biases has no remote-code form (its
    save_pretrained failed after training). Both refused before anything changes."""
    from scalevec.apply import ApplyError

    model = hf_model(architecture, tie=False, attention_bias=bias)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ApplyError, match=reason):
        apply_strategy(model, name)
    assert not hasattr(model, "scalevec_strategy")
    assert {n: p for n, p in model.named_parameters()}.keys() == before.keys()


def test_fixed_scales_on_a_model_with_a_qk_norm_save_as_its_architecture(tmp_path):
    """`none` keeps a Qwen3's QK-norm without a scale (γ = 1): save_pretrained writes the plain Qwen3 (it raised
    KeyError looking for the scale)."""
    model = hf_model("qwen3", tie=False)
    apply_strategy(model, "none")
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    model.save_pretrained(tmp_path)
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert type(reloaded).__name__ == "Qwen3ForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(logits(reloaded.eval(), tokens), logits(model, tokens), atol=1e-5, rtol=1e-5)


def test_er_refuses_a_non_positive_gamma_anywhere_before_changing_anything():
    """A γ ≤ 0 in the second layer: refused with the model untouched (the first layer was already converted)."""
    from scalevec.convert import ConvertError

    model = hf_model("qwen3", tie=False)
    with torch.no_grad():
        model.model.layers[1].self_attn.k_norm.weight[2] = -0.5
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    out, names = logits(model, tokens), sorted(n for n, _ in model.named_parameters())
    with pytest.raises(ConvertError, match=r"model.layers.1.self_attn.k_norm: ER needs every γ > 0, got min γ = -0.5"):
        apply_strategy(model, "hg+er")
    assert sorted(n for n, _ in model.named_parameters()) == names and not hasattr(model, "scalevec_strategy")
    torch.testing.assert_close(logits(model, tokens), out)

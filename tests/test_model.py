"""Issue "Foundation": every strategy against a naive reference, seeds, folding, QK-norm, roles."""

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from reference import reference_logits

from scalevec import ModelConfig, build_model, fold_scales, strategy
from scalevec.config import MODEL_PRESETS
from scalevec.model import Decoder
from scalevec.scales import Kind
from scalevec.strategy import PRESETS

TINY = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=16,
                   init="normal")

STRATEGIES = [
    *[strategy(name) for name in PRESETS],
    strategy("dnp+or"),
    strategy("hg+dp+er", dual_placement=["q", "k", "v", "o", "gate", "up", "down"]),
    strategy("hg+or", dnp=["q", "k", "v", "o", "gate", "up", "down"], qk_scale_shape="full"),
    strategy("unified", magnitude_on_dnp_inputs=True),
    strategy("gemma+er", qk_scale_shape="full"),
    strategy("dnp+none"),
]
MODELS = [TINY, replace(TINY, tie_embeddings=False, norm="layer")]


def ids(value):
    if hasattr(value, "preset") and hasattr(value, "scale"):
        return value.preset
    return f"{value.norm}-tied{value.tie_embeddings}"


@torch.no_grad()
def randomize_scales(model: Decoder, seed: int = 1) -> None:
    """Non-unit scales, so that a scale applied in the wrong place shows."""
    gen = torch.Generator().manual_seed(seed)
    for name, info in model.param_info().items():
        if info.kind.is_scale:
            p = model.get_parameter(name)
            noise = torch.randn(p.shape, generator=gen)
            if info.kind in (Kind.GAIN, Kind.OR_DIRECTION):
                p.copy_(1 + 0.3 * noise)
            elif info.kind is Kind.OR_MAGNITUDE:
                p.copy_(1.5 + 0.2 * noise)
            else:
                p.copy_(0.3 * noise)


def loss_of(logits, tokens):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())


@pytest.mark.parametrize("cfg", MODELS, ids=ids)
@pytest.mark.parametrize("strat", STRATEGIES, ids=ids)
def test_logits_and_gradients_match_naive_reference(cfg, strat):
    model = build_model(cfg, strat, seed=3)
    randomize_scales(model)
    tokens = torch.randint(0, cfg.vocab_size, (2, 12))
    logits = model(tokens)
    loss_of(logits, tokens).backward()

    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    ref = reference_logits(params, cfg, strat, tokens)
    loss_of(ref, tokens).backward()

    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
    infos = model.param_info()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, params[name].grad, atol=1e-5, rtol=1e-4, msg=name)
        if infos[name].kind.is_scale:
            size = p.grad.abs().max().item()
            if infos[name].invariant:
                assert size < 1e-5, f"{name} is documented invariant but has gradient {size}"
            else:
                assert size > 1e-7, f"{name} got no gradient"


def test_invariant_magnitudes_exist_only_on_request():
    default = build_model(TINY, strategy("unified"))
    requested = build_model(TINY, strategy("unified", magnitude_on_dnp_inputs=True))
    assert not any(i.invariant for i in default.param_info().values())
    invariant = [n for n, i in requested.param_info().items() if i.invariant]
    # q, k, gate, up feed DNP; v does not, so its magnitude is not invariant
    assert sorted(n.split(".", 2)[2] for n in invariant if n.startswith("blocks.0.")) == [
        "attn.qkv.in_scales.k.magnitude", "attn.qkv.in_scales.q.magnitude",
        "ffn.gate_up.in_scales.gate.magnitude", "ffn.gate_up.in_scales.up.magnitude"]
    assert "blocks.0.attn.qkv.in_scales.v.magnitude" in requested.param_info()
    assert "blocks.0.attn.qkv.in_scales.q.magnitude" not in default.param_info()


def test_same_seed_same_matrices_for_every_strategy():
    base = build_model(TINY, strategy("standard"), seed=7)
    matrices = {n: p for n, p in base.named_parameters() if not base.param_info()[n].kind.is_scale}
    for strat in STRATEGIES:
        model = build_model(TINY, strat, seed=7)
        for name, p in model.named_parameters():
            if not model.param_info()[name].kind.is_scale:
                assert torch.equal(p, matrices[name]), (strat.preset, name)
    other = build_model(TINY, strategy("standard"), seed=8)
    assert not torch.equal(other.tok_emb.weight, base.tok_emb.weight)


def test_every_scale_starts_at_one():
    for strat in STRATEGIES:
        model = build_model(TINY, strat)
        for module in model.modules():
            if hasattr(module, "reset_to_identity"):
                assert torch.allclose(module(), torch.ones(())), strat.preset


@pytest.mark.parametrize("cfg", MODELS, ids=ids)
@pytest.mark.parametrize("strat", STRATEGIES, ids=ids)
@pytest.mark.parametrize("untie", [False, True])
def test_fold_scales_reproduces_logits(cfg, strat, untie):
    model = build_model(cfg, strat, seed=2)
    randomize_scales(model)
    tokens = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        before = model(tokens)
        oracle = reference_logits(dict(model.named_parameters()), cfg, strat, tokens)  # written apart from fold
        embedding = model.tok_emb.weight.clone()
        fold_scales(model, untie=untie)
        after = model(tokens)
        oracle_after = reference_logits(dict(model.named_parameters()), model.config, strat, tokens)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(oracle_after, oracle, atol=1e-5, rtol=1e-5)
    assert torch.equal(model.tok_emb.weight, embedding), "folding must never rescale the input embedding"
    # every input-side and DP output-side scale is now exactly the identity
    for module in model.modules():
        for name in ("shared_scale",):
            scale = getattr(module, name, None)
            if scale is not None:
                assert torch.allclose(scale(), torch.ones(())), name
        for scale in getattr(module, "in_scales", {}).values():
            assert torch.allclose(scale(), torch.ones(()))
    folded_final = model.final_scale is None or torch.allclose(model.final_scale(), torch.ones(()))
    kept_for_tied_head = cfg.tie_embeddings and not untie
    if strat.scale != "fixed":
        assert folded_final != kept_for_tied_head


def explicit_qk_norm(y, n_heads, head_dim, gamma, eps):
    """Qwen3's q_norm/k_norm (head shape) or a full-width variant: RMS over head_dim, then γ."""
    y = y.reshape(*y.shape[:-1], n_heads, head_dim)
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
    if gamma.numel() == head_dim:
        return (y * gamma).flatten(-2)
    return y.flatten(-2) * gamma


@pytest.mark.parametrize("shape", ["head", "full"])
def test_dnp_on_qk_is_qk_norm(shape):
    model = build_model(TINY, strategy("dnp", qk_scale_shape=shape))
    randomize_scales(model)
    qkv = model.blocks[0].attn.qkv
    x = torch.randn(2, 5, TINY.d_model)
    q, k, _ = qkv(x)
    gamma_in = qkv.shared_scale()
    H, Hkv, hd = TINY.n_heads, TINY.n_kv_heads, TINY.head_size
    W = qkv.weight.detach()
    q_ref = explicit_qk_norm((x * gamma_in) @ W[: H * hd].t(), H, hd, qkv.out_scales["q"](), TINY.norm_eps)
    k_ref = explicit_qk_norm((x * gamma_in) @ W[H * hd: (H + Hkv) * hd].t(), Hkv, hd, qkv.out_scales["k"](),
                             TINY.norm_eps)
    expected_size = hd if shape == "head" else H * hd
    assert qkv.out_scales["q"]().shape == (expected_size,)
    torch.testing.assert_close(q, q_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k, k_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("preset", list(MODEL_PRESETS))
@pytest.mark.parametrize("strat", ["standard", "none", "unified", "gemma+iwd", "hg+dp+er"])
def test_every_parameter_has_exactly_one_role_and_kind(preset, strat):
    cfg = replace(ModelConfig(), **MODEL_PRESETS[preset])
    with torch.device("meta"):
        model = Decoder(cfg, strategy(strat))
    infos = model.param_info()
    # under every name it is registered by: a module registered twice (one tensor, two names) would fail here
    assert sorted(infos) == sorted(n for n, _ in model.named_parameters(remove_duplicate=False))


def test_llama3_rope_scaling_matches_the_bands_of_llama_3_1():
    from scalevec.rope import rope_frequencies

    m = replace(TINY, d_model=32, n_heads=4, rope_theta=10000.0, rope_scaling="llama3", rope_factor=8.0,
                rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_seq_len=64)
    plain = rope_frequencies(replace(m, rope_scaling="none"))
    scaled = rope_frequencies(m)
    wavelength = 2 * math.pi / plain
    assert torch.equal(plain, 1.0 / 10000.0 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8))
    short, long = wavelength < 64 / 4, wavelength > 64 / 1
    assert torch.equal(scaled[short], plain[short])  # high frequencies kept
    torch.testing.assert_close(scaled[long], plain[long] / 8)  # low frequencies stretched 8x
    middle = ~short & ~long
    ratio = 64 / wavelength[middle]
    smooth = (ratio - 1) / 3
    torch.testing.assert_close(scaled[middle], (1 - smooth) * plain[middle] / 8 + smooth * plain[middle])
    assert middle.any() and short.any() and long.any()


@pytest.mark.parametrize("name", ["standard", "dp", "hg+dp+or", "unified"])
def test_qkv_biases_fold_and_are_never_decayed(name):
    from scalevec import OptimConfig, param_groups

    m = replace(TINY, qkv_bias=True)
    model = build_model(m, strategy(name), seed=2)
    assert all(torch.equal(b.bias, torch.zeros_like(b.bias)) for b in (blk.attn.qkv for blk in model.blocks))
    randomize_scales(model)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.bias.normal_(0, 0.5)
    tokens = torch.randint(0, m.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(tokens)
        without = build_model(m, strategy(name), seed=2)
        without.load_state_dict(model.state_dict())
        for block in without.blocks:
            block.attn.qkv.bias.zero_()
        assert (without(tokens) - before).abs().max() > 1e-3  # the biases matter
        if "dnp" not in strategy(name).dnp and name != "unified":
            torch.testing.assert_close(fold_scales(model)(tokens), before, atol=1e-5, rtol=1e-5)
    (group,) = [g for g in param_groups(model, None, OptimConfig()) if any(n.endswith("qkv.bias") for n in g["names"])]
    assert group["weight_decay"] == 0.0 and group["optimizer"] == "adamw"
    assert len([n for n in group["names"] if n.endswith("qkv.bias")]) == m.n_layers


@pytest.mark.parametrize("shape", ["dense", "moe", "moe+shared", "moe every 2nd"])
def test_every_residual_output_is_declared_and_depth_scaled(shape):
    """The matrices that write into the residual stream, listed by the block's structure (not by ParamInfo):
    exactly these are declared residual outputs and start with std init_gain/sqrt(fan_in)/sqrt(2·layers)."""
    from dataclasses import replace

    moe = {"dense": {}, "moe": {"moe_experts": 4}, "moe+shared": {"moe_experts": 4, "moe_shared_expert": True},
           "moe every 2nd": {"moe_experts": 4, "moe_every": 2, "moe_shared_expert": True}}[shape]
    cfg = replace(ModelConfig(preset="", vocab_size=64, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=256,
                              max_seq_len=16, init="fan_in", init_gain=1.0), **moe)
    model = build_model(cfg, strategy("hg"), seed=5)
    expected = set()
    for i, block in enumerate(model.blocks):
        expected.add(f"blocks.{i}.attn.o.weight")
        if hasattr(block.ffn, "experts"):
            expected.add(f"blocks.{i}.ffn.down")
            if block.ffn.shared_expert is not None:
                expected.add(f"blocks.{i}.ffn.shared_expert.down.weight")
        else:
            expected.add(f"blocks.{i}.ffn.down.weight")
    infos = model.param_info()
    assert {name for name, info in infos.items() if info.residual_output} == expected
    for name, info in infos.items():
        if info.kind.is_scale or info.kind.value in ("embedding", "bias"):
            continue
        p = model.get_parameter(name)
        sigma = 1.0 / p.shape[-1] ** 0.5 / ((2 * cfg.n_layers) ** 0.5 if name in expected else 1.0)
        assert p.std().item() == pytest.approx(sigma, rel=0.1), name

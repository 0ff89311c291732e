"""Issue "Optimizers": the policy table, decoupled decay, AdamW/Muon steps, schedules, state round trip."""

import io
import math
import warnings
from dataclasses import replace

import pytest
import torch
from torch import nn

from scalevec import ModelConfig, build_model, strategy
from scalevec.config import MODEL_PRESETS, OptimConfig, ScheduleConfig
from scalevec.model import Decoder
from scalevec.optim import Muon, Optimizers, PolicyError, param_groups
from scalevec.optim.policy import assign
from scalevec.scales import Kind, Role
from scalevec.schedule import lr_factor
from scalevec.strategy import PRESETS

TINY = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=16)
PRESET_NAMES = ["standard", "none", "gemma", "hg", "dp", "dnp", "or", "er", "unified", "hg+dp+er+wd-all"]


@pytest.mark.parametrize("name", PRESET_NAMES)
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
@pytest.mark.parametrize("size", ["cpu-1m", "gpu-1b"])
def test_every_parameter_in_exactly_one_group(name, optimizer, size):
    with torch.device("meta"):
        model = Decoder(replace(ModelConfig(), **MODEL_PRESETS[size]), strategy(name))
    groups = param_groups(model, strategy(name).scale_decay, OptimConfig(name=optimizer))
    grouped = [n for g in groups for n in g["names"]]
    assert sorted(grouped) == sorted(n for n, _ in model.named_parameters())
    for g in groups:
        for n, p in zip(g["names"], g["params"]):
            assert g["optimizer"] == ("muon" if optimizer == "muon" and p.ndim == 2 and "tok_emb" not in n
                                      and not n.startswith("head") else "adamw"), n


def test_unmatched_and_doubly_matched_parameters_are_errors():
    model = build_model(TINY, strategy("standard"))
    model.stray = nn.Parameter(torch.zeros(3))
    with pytest.raises(PolicyError, match="stray has no role"):
        param_groups(model, "iwd", OptimConfig())
    model = build_model(TINY, strategy("standard"))
    infos = model.param_info()
    infos["blocks.1.attn.o.weight"] = infos["blocks.0.attn.o.weight"]
    model.blocks[1].attn.o.weight = model.blocks[0].attn.o.weight
    with pytest.raises(PolicyError, match="same tensor"):
        param_groups(model, "iwd", OptimConfig(), infos=infos)


def expected_decay(info, policy: str, optim: OptimConfig) -> float:
    """The documented rule, written out independently of the table."""
    if info.invariant:
        return 0.0
    if info.kind is Kind.MATRIX:
        return optim.weight_decay
    if info.kind is Kind.EMBEDDING:
        return optim.embedding_weight_decay
    if info.kind is Kind.HEAD:
        return optim.head_weight_decay
    decays_role = policy == "all" or (policy == "iwd" and info.role is Role.INPUT)
    if info.kind is Kind.OR_DIRECTION:
        return optim.scale_weight_decay if decays_role and optim.decay_or_direction else 0.0
    return optim.scale_weight_decay if decays_role else 0.0


@pytest.mark.parametrize("policy", ["iwd", "all", "none"])
@pytest.mark.parametrize("scale", ["plain", "or", "er"])
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
@pytest.mark.parametrize("decay_direction", [False, True])
def test_zero_gradient_step_is_exactly_decoupled_decay(policy, scale, optimizer, decay_direction):
    strat = strategy("gemma+hg", scale=scale, dual_placement=["v"], dnp=["q", "k", "gate", "up"],
                     magnitude_on_dnp_inputs=True, scale_decay=policy)
    model = build_model(replace(TINY, tie_embeddings=False), strat)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    optim = OptimConfig(name=optimizer, lr=0.01, muon_lr=0.05, weight_decay=0.3, scale_weight_decay=0.2,
                        embedding_weight_decay=0.05, head_weight_decay=0.4, decay_or_direction=decay_direction)
    with warnings.catch_warnings(action="error"):  # untied, every matrix decayed: IWD's balance argument holds
        opt = Optimizers(model, optim, policy)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    infos = model.param_info()
    decayed = set()
    for name, p in model.named_parameters():
        wd = expected_decay(infos[name], policy, optim)
        lr = optim.muon_lr if optimizer == "muon" and infos[name].kind is Kind.MATRIX else optim.lr
        # p <- p - lr·wd·p, to float32 rounding of p itself
        torch.testing.assert_close(p.detach(), before[name] * (1 - lr * wd), rtol=2e-7, atol=0, msg=name)
        if wd:
            assert not torch.equal(p, before[name]), name
        if wd:
            decayed.add(name)
    kinds = {(infos[n].role, infos[n].kind) for n in decayed}
    if policy == "none":
        assert not any(k.is_scale for _, k in kinds)
    if policy == "iwd":
        assert any(r is Role.INPUT and k.is_scale for r, k in kinds)
        assert not any(r is Role.OUTPUT for r, _ in kinds)
    if policy == "all":
        assert any(r is Role.OUTPUT for r, _ in kinds)
    assert not any(infos[n].invariant for n in decayed)


def test_iwd_decays_the_tied_final_norm_with_one_warning_and_iwd_balanced_does_not():
    model = build_model(TINY, strategy("iwd"))  # tied head, embedding undecayed by default
    with pytest.warns(UserWarning) as caught:
        rules = assign(model.param_info(), model, OptimConfig(), "iwd")
    assert len(caught) == 1
    assert "final_scale feeds tok_emb.weight (set optim.embedding_weight_decay > 0)" in str(caught[0].message)
    assert rules["final_scale.weight"].weight_decay == OptimConfig().scale_weight_decay
    with warnings.catch_warnings(action="error"):
        balanced = assign(model.param_info(), model, OptimConfig(), "iwd-balanced")
    assert balanced["final_scale.weight"].weight_decay == 0.0
    assert balanced["blocks.0.attn.qkv.shared_scale.weight"].weight_decay == OptimConfig().scale_weight_decay
    for policy in ("iwd", "iwd-balanced"):  # a decayed embedding restores the balance: both decay, no warning
        with warnings.catch_warnings(action="error"):
            rules = assign(model.param_info(), model, OptimConfig(embedding_weight_decay=0.1), policy)
        assert rules["final_scale.weight"].weight_decay == OptimConfig().scale_weight_decay
    with pytest.warns(UserWarning, match="final_scale feeds tok_emb.weight"):
        param_groups(model, "all", OptimConfig())
    with warnings.catch_warnings(action="error"):
        param_groups(model, "none", OptimConfig())


def test_the_warning_names_every_unbalanced_pair_once_with_its_option():
    model = build_model(replace(TINY, moe_experts=3, moe_top_k=2), strategy("iwd"))
    with pytest.warns(UserWarning) as caught:
        param_groups(model, "iwd", OptimConfig(router_weight_decay=0.0))
    (message,) = [str(w.message) for w in caught]
    assert message.count("final_scale feeds tok_emb.weight (set optim.embedding_weight_decay > 0)") == 1
    assert message.count("blocks.*.ffn.shared_scale feeds blocks.*.ffn.router (set optim.router_weight_decay > 0)") \
        == 1  # both blocks, folded into one entry


SHAPES = {"tied": TINY, "untied": replace(TINY, tie_embeddings=False),
          "moe": replace(TINY, moe_experts=3, moe_top_k=2),
          "moe+shared": replace(TINY, moe_experts=3, moe_top_k=2, moe_shared_expert=True, tie_embeddings=False)}
MAGNITUDES = (Kind.GAIN, Kind.OR_MAGNITUDE, Kind.ER_MAGNITUDE)


@pytest.mark.parametrize("preset", [*PRESETS, "hg+dp+er", "dnp+or", "gemma+hg", "unified+iwd-balanced"])
@pytest.mark.parametrize("shape", SHAPES)
def test_iwd_decays_every_input_norm_magnitude_and_iwd_balanced_none_feeding_an_undecayed_matrix(preset, shape):
    infos, named = None, None
    for policy, optim in (("iwd", OptimConfig()), ("iwd", OptimConfig(router_weight_decay=0.0)),
                          ("iwd-balanced", OptimConfig()), ("iwd-balanced", OptimConfig(router_weight_decay=0.0))):
        with torch.device("meta"):
            model = Decoder(SHAPES[shape], strategy(preset, scale_decay=policy))
        infos, named = model.param_info(), dict(model.named_parameters())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rules = assign(infos, model, optim, policy)
        decays = {name: rules[name].weight_decay > 0 for name in infos}
        assert not any(decays[n] for n, i in infos.items() if i.role is Role.OUTPUT), "an Output-Norm scale decays"
        loose = [n for n, i in infos.items() if i.role is Role.INPUT and i.kind.is_scale and decays[n]
                 and any(not decays[matrix] for matrix, _, _ in i.feeds)]
        if policy == "iwd":
            undecayed = [n for n, i in infos.items() if i.role is Role.INPUT and i.kind in MAGNITUDES
                         and not i.invariant and not decays[n]]
            assert not undecayed, f"{preset} on {shape}: Input-Norm magnitudes left undecayed: {undecayed}"
            # the tied final norm, the MoE FFN norm, the router's γ
            for name in ("final_scale.weight", "final_scale.magnitude", "blocks.0.ffn.shared_scale.weight",
                         "blocks.0.ffn.router_scale.weight", "blocks.0.ffn.router_scale.magnitude"):
                assert decays.get(name, name not in named), name
        else:
            assert not loose, f"{preset} on {shape}: decayed under iwd-balanced, feeding an undecayed matrix: {loose}"
    assert "blocks.0.ffn.shared_expert.gate_up.shared_scale.weight" not in named  # one γ per norm


FEED_PRESETS = ["standard", "hg", "dp", "dnp", "gemma", "qknorm", "hg+dp", "dnp-ffn"]


def _zero_columns(model, feeds, column, keep=None):
    with torch.no_grad():
        for k, (matrix, start, stop) in enumerate(feeds):
            if k != keep:
                model.get_parameter(matrix)[..., start:stop, column] = 0.0


@pytest.mark.parametrize("preset", FEED_PRESETS)
@pytest.mark.parametrize("shape", SHAPES)
def test_feeds_name_every_matrix_an_input_scale_multiplies(preset, shape):
    """With column j of every matrix a scale feeds set to 0, the loss no longer depends on γ_j; with any one of
    them kept, it does: `feeds` lists exactly the matrices the scale multiplies (experts and shared expert too)."""
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    model = build_model(SHAPES[shape], strategy(preset), seed=3)
    scales = {n.rsplit(".", 1)[0]: i.feeds for n, i in model.param_info().items()
              if i.role is Role.INPUT and i.feeds and not n.startswith("blocks.1.")}
    assert scales and all(model.get_submodule(prefix).parameterization == "plain" for prefix in scales)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def gradient(prefix):
        model.zero_grad()
        logits = model(tokens[:, :-1])
        torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, 1:]).backward()
        return model.get_submodule(prefix).weight.grad[..., 5].abs().max().item()

    for prefix, feeds in scales.items():
        model.load_state_dict(state)
        _zero_columns(model, feeds, 5)
        assert gradient(prefix) < 1e-9, f"{prefix}: γ still acts after zeroing {feeds}"
        for keep in range(len(feeds)):
            model.load_state_dict(state)
            _zero_columns(model, feeds, 5, keep)
            assert gradient(prefix) > 1e-7, f"{prefix} is said to feed {feeds[keep][0]}, which it does not"


def test_adamw_step_matches_closed_form():
    model = build_model(TINY, strategy("standard"))
    optim = OptimConfig(lr=0.01, beta1=0.8, beta2=0.9, eps=1e-6, weight_decay=0.5)
    opt = Optimizers(model, optim, "none")
    w = model.blocks[0].attn.o.weight
    p0, g = w.detach().clone(), torch.randn_like(w)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    w.grad = g.clone()
    opt.step()
    m_hat = (1 - 0.8) * g / (1 - 0.8)
    v_hat = (1 - 0.9) * g * g / (1 - 0.9)
    expected = p0 * (1 - 0.01 * 0.5) - 0.01 * m_hat / (v_hat.sqrt() + 1e-6)
    torch.testing.assert_close(w.detach(), expected, rtol=1e-6, atol=1e-7)


def reference_newton_schulz(g: torch.Tensor, steps: int) -> torch.Tensor:
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.T if g.shape[0] > g.shape[1] else g
    x = x / x.norm().clamp(min=1e-7)
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return x.T if g.shape[0] > g.shape[1] else x


@pytest.mark.parametrize("shape", [(6, 10), (12, 5)])
@pytest.mark.parametrize("update_scale", ["original", "match_rms_adamw"])
def test_muon_step_matches_reference(shape, update_scale):
    p = nn.Parameter(torch.randn(shape))
    p0, g1, g2 = p.detach().clone(), torch.randn(shape), torch.randn(shape)
    opt = Muon([p], lr=0.1, weight_decay=0.2, momentum=0.9, nesterov=True, update_scale=update_scale)
    buf = torch.zeros(shape)
    expected = p0
    for g in (g1, g2):
        p.grad = g.clone()
        opt.step()
        buf = 0.9 * buf + 0.1 * g
        update = 0.1 * g + 0.9 * buf
        rows, cols = shape
        scale = math.sqrt(max(1, rows / cols)) if update_scale == "original" else 0.2 * math.sqrt(max(rows, cols))
        expected = expected * (1 - 0.1 * 0.2) - 0.1 * scale * reference_newton_schulz(update, 5)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-4, atol=1e-5)
    # Newton-Schulz drives the singular values toward 1 (the quintic lands in about [0.5, 1.5])
    sv = torch.linalg.svdvals(reference_newton_schulz(torch.randn(shape), 5))
    assert sv.min() > 0.3 and sv.max() < 1.6


@pytest.mark.parametrize("update_scale", ["original", "match_rms_adamw"])
def test_muon_equals_torch_muon_in_bf16(update_scale):
    ours, theirs = nn.Parameter(torch.randn(16, 24)), nn.Parameter(torch.randn(40, 24))
    ref_a, ref_b = nn.Parameter(ours.detach().clone()), nn.Parameter(theirs.detach().clone())
    opt = Muon([ours, theirs], lr=0.05, weight_decay=0.1, ns_dtype="bfloat16", update_scale=update_scale)
    ref = torch.optim.Muon([ref_a, ref_b], lr=0.05, weight_decay=0.1, adjust_lr_fn=update_scale)
    for _ in range(3):
        grads = (torch.randn(16, 24), torch.randn(40, 24))
        for p, q, g in zip((ours, theirs), (ref_a, ref_b), grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    assert torch.equal(ours, ref_a) and torch.equal(theirs, ref_b)


def test_muon_on_fused_storage_equals_separate_matrices():
    q, k, v = torch.randn(8, 12), torch.randn(4, 12), torch.randn(4, 12)
    fused = nn.Parameter(torch.cat([q, k, v]))
    separate = [nn.Parameter(t.clone()) for t in (q, k, v)]
    opt_fused = Muon([{"params": [fused], "blocks": [(8, 4, 4)]}], lr=0.05, weight_decay=0.1)
    opt_separate = Muon(separate, lr=0.05, weight_decay=0.1)
    for _ in range(3):
        g = torch.randn(16, 12)
        fused.grad = g.clone()
        for p, piece in zip(separate, g.split([8, 4, 4])):
            p.grad = piece.clone()
        opt_fused.step()
        opt_separate.step()
    torch.testing.assert_close(fused.detach(), torch.cat([p.detach() for p in separate]), rtol=0, atol=0)
    # and it differs from orthogonalizing the fused matrix as one
    whole = nn.Parameter(torch.cat([q, k, v]))
    opt_whole = Muon([whole], lr=0.05, weight_decay=0.1)
    whole.grad = torch.randn(16, 12)
    opt_whole.step()
    assert not torch.allclose(whole, fused)


def test_muon_stacked_experts_are_per_matrix():
    experts = nn.Parameter(torch.randn(3, 8, 6))
    singles = [nn.Parameter(experts[i].detach().clone()) for i in range(3)]
    opt3, opt2 = Muon([experts], lr=0.05), Muon(singles, lr=0.05)
    g = torch.randn(3, 8, 6)
    experts.grad = g.clone()
    for i, p in enumerate(singles):
        p.grad = g[i].clone()
    opt3.step()
    opt2.step()
    torch.testing.assert_close(experts.detach(), torch.stack([p.detach() for p in singles]), rtol=1e-5, atol=1e-6)


def test_muon_groups_use_logical_blocks_of_the_model():
    model = build_model(TINY, strategy("unified"))
    opt = Optimizers(model, OptimConfig(name="muon"), "iwd")
    muon_group = opt.inner["muon"].param_groups[0]
    blocks = dict(zip(muon_group["names"], muon_group["blocks"]))
    assert blocks["blocks.0.attn.qkv.weight"] == (32, 16, 16)
    assert blocks["blocks.0.ffn.gate_up.weight"] == (48, 48)
    assert blocks["blocks.0.attn.o.weight"] == (32,)


def test_schedule_values():
    cos = ScheduleConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(cos, 0, 110) == pytest.approx(0.1)
    assert lr_factor(cos, 9, 110) == pytest.approx(1.0)
    assert lr_factor(cos, 10, 110) == pytest.approx(1.0)
    assert lr_factor(cos, 60, 110) == pytest.approx(0.55)
    assert lr_factor(cos, 110, 110) == pytest.approx(0.1)
    for shape, mid in (("linear", 1 - 0.9 * 0.5), ("cosine", 0.55), ("1-sqrt", 1 - 0.9 * math.sqrt(0.5))):
        wsd = ScheduleConfig(name="wsd", warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.2, decay_shape=shape)
        assert lr_factor(wsd, 9, 100) == pytest.approx(1.0)
        assert lr_factor(wsd, 50, 100) == 1.0  # stable phase
        assert lr_factor(wsd, 79, 100) == 1.0
        assert lr_factor(wsd, 80, 100) < 1.0  # the first decay step already decays
        assert lr_factor(wsd, 89, 100) == pytest.approx(mid)  # half of the 20 decay steps done
        assert lr_factor(wsd, 99, 100) == pytest.approx(0.1)  # the last step runs at the floor
        before_0_2 = replace(wsd, floor_at_end=False)  # what a WSD run of scalevec < 0.2 ran, and resumes with
        assert lr_factor(before_0_2, 80, 100) == 1.0 and lr_factor(before_0_2, 99, 100) > 0.1
        if shape == "linear":
            assert lr_factor(before_0_2, 99, 100) == pytest.approx(0.1 + 0.9 / 20)
    for fraction, total in ((0.04, 10), (0.05, 10), (0.01, 7)):  # under half a step, rounded: still one decay step
        short = ScheduleConfig(name="wsd", warmup_steps=2, min_lr_ratio=0.1, decay_fraction=fraction)
        assert [lr_factor(short, s, total) for s in range(total - 2, total)] == [1.0, pytest.approx(0.1)]
    assert lr_factor(replace(wsd, decay_fraction=0.0), 99, 100) == 1.0  # no decay asked, none given
    const = ScheduleConfig(name="constant", warmup_steps=4)
    assert [lr_factor(const, s, 10) for s in (0, 3, 9)] == [0.25, 1.0, 1.0]


def test_schedule_command_replaces_only_a_plot(tmp_path, capsys):
    import time

    from scalevec.cli import main

    notes, plot = tmp_path / "notes.txt", tmp_path / "lr.png"
    notes.write_text("a user's file\n")
    assert main(["schedule", "--out", str(notes)]) == 2  # a plot at that path would lose the user's file
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a PNG image" in err and notes.read_text() == "a user's file\n"
    assert main(["schedule", "--out", "/dev/null"]) == 2 and "not a regular file" in capsys.readouterr().err
    started = time.perf_counter()
    assert main(["schedule", "--out", str(plot), "--steps", str(10**12)]) == 0  # plotted from a sample of steps
    assert time.perf_counter() - started < 20 and plot.read_bytes().startswith(b"\x89PNG")
    assert main(["schedule", "--out", str(plot), "--steps", "10"]) == 0  # an earlier plot is replaced


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_optimizer_state_round_trips_exactly(optimizer):
    def run(model, opt, steps, start):
        gen = torch.Generator().manual_seed(start)
        for step in range(start, start + steps):
            opt.set_lr_factor(lr_factor(ScheduleConfig(warmup_steps=3), step, 10))
            tokens = torch.randint(0, 64, (2, 8), generator=gen)
            model(tokens).logsumexp(-1).mean().backward()
            opt.step()
            opt.zero_grad()

    config = OptimConfig(name=optimizer)
    a = build_model(TINY, strategy("unified"))
    opt_a = Optimizers(a, config, "iwd")
    run(a, opt_a, 3, 0)
    buffer = io.BytesIO()
    torch.save({"model": a.state_dict(), "optim": opt_a.state_dict()}, buffer)
    run(a, opt_a, 3, 3)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    b = build_model(TINY, strategy("unified"))
    b.load_state_dict(saved["model"])
    opt_b = Optimizers(b, config, "iwd")
    opt_b.load_state_dict(saved["optim"])
    run(b, opt_b, 3, 3)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name

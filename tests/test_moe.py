"""Issue "MoE": dense equivalence, dispatch against a per-token loop, balancing, folding, counts."""

import json
import statistics
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from test_model import randomize_scales

from scalevec import ModelConfig, build_model, fold_scales, strategy
from scalevec.cli import main
from scalevec.config import ConfigError, MoEConfig, OptimConfig, load_config
from scalevec.model import FeedForward
from scalevec.moe import MoEFeedForward
from scalevec.optim import Optimizers

TINY = ModelConfig(preset="", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=16,
                   moe_experts=4, moe_top_k=2, moe_d_expert=24)


def gamma(scale):
    return None if scale is None else scale()


@pytest.mark.parametrize("name", ["standard", "hg", "hg+dnp+or", "unified", "dp+er"])
def test_one_expert_top1_equals_dense_ffn(name):
    strat = strategy(name)
    m = replace(TINY, moe_experts=1, moe_top_k=1, moe_d_expert=TINY.d_ff)
    moe = build_model(m, strat, seed=1).blocks[0].ffn
    dense = build_model(replace(TINY, moe_experts=0), strat, seed=1).blocks[0].ffn
    assert isinstance(moe, MoEFeedForward) and isinstance(dense, FeedForward)
    for module in (moe, dense):
        randomize_scales_module(module)
    with torch.no_grad():
        dense.gate_up.weight.copy_(moe.gate_up[0])
        dense.down.weight.copy_(moe.down[0])
        gu = dense.gate_up
        for target, source in ((gu.shared_scale, moe.shared_scale),
                               *[(gu.in_scales[n] if n in gu.in_scales else None,
                                  moe.in_scales[n] if n in moe.in_scales else None) for n in ("gate", "up")],
                               *[(gu.out_scales[n] if n in gu.out_scales else None,
                                  moe.out_scales[n] if n in moe.out_scales else None) for n in ("gate", "up")]):
            if target is not None:
                for (_, t), (_, s) in zip(target.named_parameters(), source.named_parameters()):
                    t.copy_(s.reshape(t.shape))
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(moe(x), dense(x), atol=1e-5, rtol=1e-5)


def randomize_scales_module(module):
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(("weight", "direction", "magnitude")) and "gate_up.weight" not in name \
                    and "down.weight" not in name:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))


def naive_moe(moe: MoEFeedForward, x: torch.Tensor, strat) -> torch.Tensor:
    """Token by token, expert by expert, with the scales written out."""
    de, out = moe.d_expert, []
    logits, scores, indices, weights = moe.route(x)
    for n in range(x.shape[0]):
        total = torch.zeros(x.shape[1])
        for j in range(moe.top_k):
            e = indices[n, j].item()
            branches = {}
            for name, rows in (("gate", slice(0, de)), ("up", slice(de, 2 * de))):
                scale = moe.shared_scale if moe.shared_scale is not None else moe.in_scales[name]
                g_in = scale()
                g_in = g_in[e] if g_in.ndim == 2 else g_in
                h = (x[n] * g_in) @ moe.gate_up[e, rows].T
                if name in strat.dnp:
                    h = h / torch.sqrt(h.pow(2).mean() + moe.eps)
                if name in strat.dual_placement + strat.dnp:
                    g_out = moe.out_scales[name]()
                    h = h * (g_out[e] if g_out.ndim == 2 else g_out)
                branches[name] = h
            act = branches["gate"] * torch.sigmoid(branches["gate"]) * branches["up"]
            total = total + weights[n, j] * (act @ moe.down[e].T)
        out.append(total)
    return torch.stack(out)


@pytest.mark.parametrize("dispatch", ["grouped", "padded"])
@pytest.mark.parametrize("name, expert_scales, experts, tokens", [
    ("standard", "per_expert", 4, 13), ("unified", "per_expert", 4, 13), ("hg+dp", "shared", 4, 13),
    ("hg+dp+er", "per_expert", 4, 13), ("unified", "per_expert", 8, 2)])  # the last leaves experts empty
def test_batched_dispatch_equals_per_token_loop(name, expert_scales, experts, tokens, dispatch):
    strat = strategy(name, expert_scales=expert_scales)
    model = build_model(replace(TINY, moe_experts=experts), strat, seed=2, moe=MoEConfig(dispatch=dispatch))
    randomize_scales(model)
    moe = model.blocks[0].ffn
    x = torch.randn(tokens, 32)
    batched = moe(x)
    batched.pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in moe.named_parameters()}
    moe.zero_grad()
    naive = naive_moe(moe, x, strat)
    naive.pow(2).sum().backward()
    torch.testing.assert_close(batched, naive, atol=1e-5, rtol=1e-5)
    for n, p in moe.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-4, rtol=1e-4, msg=n)


@pytest.mark.parametrize("shared_expert", [False, True])
def test_fold_reproduces_moe_logits(shared_expert):
    for name, expert_scales in (("standard", "per_expert"), ("hg", "per_expert"), ("hg+dp", "shared"),
                                ("unified", "per_expert"), ("hg+dp+er", "per_expert"), ("dp+or", "per_expert")):
        model = build_model(replace(TINY, moe_shared_expert=shared_expert), strategy(name, expert_scales=expert_scales),
                            seed=2)
        randomize_scales(model)
        tokens = torch.randint(0, 64, (2, 12))
        with torch.no_grad():
            before = model(tokens)
            fold_scales(model)
            after = model(tokens)
        torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
        moe = model.blocks[0].ffn
        for scale in (moe.router_scale, moe.shared_scale, *moe.in_scales.values()):
            if scale is not None:
                assert torch.allclose(scale(), torch.ones(())), name


def test_roles_kinds_and_muon_per_expert():
    model = build_model(TINY, strategy("unified"))
    infos = model.param_info()
    assert sorted(infos) == sorted(n for n, _ in model.named_parameters())
    assert infos["blocks.0.ffn.router"].kind.value == "router"
    assert infos["blocks.0.ffn.router_scale.direction"].role.value == "input"
    assert infos["blocks.0.ffn.in_scales.gate.direction"].role.value == "input"
    assert infos["blocks.0.ffn.out_scales.up.direction"].role.value == "output"
    opt = Optimizers(model, OptimConfig(name="muon"), "iwd")
    muon = opt.inner["muon"].param_groups[0]
    blocks = dict(zip(muon["names"], muon["blocks"]))
    assert blocks["blocks.0.ffn.gate_up"] == (24, 24)
    assert "blocks.0.ffn.router" not in blocks  # routers stay on AdamW
    tokens = torch.randint(0, 64, (2, 12))
    before = model.blocks[0].ffn.gate_up.detach().clone()
    F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten()).backward()
    opt.step()
    assert not torch.equal(before, model.blocks[0].ffn.gate_up)


def test_info_reports_total_and_active_parameters(capsys):
    assert main(["info", "cpu-moe", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    per_expert = 3 * 128 * 192
    assert summary["parameters"] - summary["active_parameters"] == 4 * (4 - 2) * per_expert
    # per-expert scales belong to their expert: unified's OR input scales (α of d 128 on gate and up, no β behind
    # DNP) and DNP output scales (α of 192 and β on each); shared across experts, every token uses them
    for strategy_sets, scales in ((["strategy.preset=unified"], 2 * 128 + 2 * (192 + 1)),
                                  (["strategy.preset=unified", "strategy.expert_scales=shared"], 0)):
        assert main(["info", "cpu-moe", "--json", *(x for s in strategy_sets for x in ("--set", s))]) == 0
        unified = json.loads(capsys.readouterr().out)
        assert unified["parameters"] - unified["active_parameters"] == 4 * (4 - 2) * (per_expert + scales)
        assert unified["flops_per_token"] == summary["flops_per_token"]  # the same matrices


def imbalance_after_training(small_data, tmp_path, balance):
    from scalevec.train.trainer import Trainer

    config = load_config({
        "model": {"preset": "", "vocab_size": 512, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                  "d_ff": 64, "max_seq_len": 32, "moe_experts": 8, "moe_top_k": 1, "moe_d_expert": 32},
        "moe": {"balance": balance, "aux_loss": 0.05, "bias_rate": 0.02},
        "data": {"dir": str(small_data), "sources": ["moby_dick", "milton"], "vocab_size": 512, "val_tokens": 1024},
        "optim": {"lr": 0.01},
        "train": {"steps": 60, "batch_size": 8, "seq_len": 32, "eval_every": 60, "log_every": 10,
                  "checkpoint_every": 60, "threads": 1},
    })
    Trainer(config, tmp_path / balance, progress=False, log=lambda *_: None).run()
    rows = [json.loads(line) for line in (tmp_path / balance / "metrics.jsonl").read_text().splitlines()]
    return [r["expert_imbalance"] for r in rows if "expert_imbalance" in r]


def test_balancing_lowers_expert_imbalance(small_data, tmp_path):
    none = imbalance_after_training(small_data, tmp_path, "none")
    aux = imbalance_after_training(small_data, tmp_path, "aux")
    bias = imbalance_after_training(small_data, tmp_path, "bias")
    late_none, late_aux, late_bias = (statistics.mean(values[-3:]) for values in (none, aux, bias))
    assert late_aux < late_none - 2.0, (none, aux)
    assert late_bias < late_none - 2.0, (none, bias)


def test_bias_update_recentres_and_moves_toward_balance():
    moe = build_model(TINY, strategy("standard"), moe=MoEConfig(balance="bias", bias_rate=0.1)).blocks[0].ffn
    moe.update_bias(torch.tensor([10.0, 0.0, 5.0, 5.0]))
    assert moe.expert_bias.sum().abs() < 1e-6
    assert moe.expert_bias[0] < moe.expert_bias[2] < moe.expert_bias[1]


def test_shared_expert_adds_a_dense_ffn():
    model = build_model(replace(TINY, moe_shared_expert=True), strategy("hg"), seed=2)
    randomize_scales(model)
    moe = model.blocks[0].ffn
    x = torch.randn(9, 32)
    routed = naive_moe(moe, x, strategy("hg"))
    torch.testing.assert_close(moe(x), routed + moe.shared_expert(x), atol=1e-5, rtol=1e-5)
    assert "blocks.0.ffn.shared_expert.gate_up.weight" in model.param_info()


def test_grouped_dispatch_refuses_to_compile_on_cpu(tmp_path):
    from scalevec.train.trainer import Trainer

    config = load_config({"model": {"preset": "cpu-moe"}, "moe": {"dispatch": "grouped"},
                          "train": {"compile": True, "device": "cpu"}})
    with pytest.raises(ConfigError, match="moe.dispatch=grouped cannot compile in fp32 on CPU"):
        Trainer(config, tmp_path / "run", progress=False, log=lambda *_: None)
    assert not (tmp_path / "run").exists()


def test_expert_bias_moves_in_an_optimizer_step_hook_from_the_summed_load():
    from scalevec.moe import expert_balancing_hook
    from scalevec.optim import Optimizers

    model = build_model(replace(TINY, n_layers=2, moe_every=1), strategy("standard"),
                        moe=MoEConfig(balance="bias", bias_rate=0.1))
    layers = model.moe_layers()
    summed = []

    def sum_over_ranks(loads):  # two ranks that routed alike
        summed.append(loads.clone())
        return 2 * loads

    optimizer = Optimizers(model, OptimConfig(lr=0.01))
    optimizer.register_step_post_hook(expert_balancing_hook(layers, sum_over_ranks))
    model(torch.randint(0, TINY.vocab_size, (2, 16))).sum().backward()
    loads = [moe.step_load.clone() for moe in layers]
    assert all(load.sum() == 2 * 16 * TINY.moe_top_k for load in loads)
    assert all(torch.equal(moe.expert_bias, torch.zeros(4)) for moe in layers)  # not before the step
    optimizer.step()
    assert len(summed) == 1 and torch.equal(summed[0], torch.stack(loads))  # one collective for every layer
    for moe, load in zip(layers, loads):
        expected = 0.1 * torch.sign(2 * load.mean() - 2 * load)
        torch.testing.assert_close(moe.expert_bias, expected - expected.mean())
        assert torch.equal(moe.step_load, torch.zeros(4))


@pytest.mark.parametrize("name", ["standard", "hg"])
def test_balance_diagnostic_sums_every_matrix_a_scale_feeds(name):
    """γ_j² − Σ_f ||w_{f,j}||² over the router, every routed expert and the shared expert (standard), or per expert
    for an HG per-expert scale, written out by hand."""
    from scalevec.train.diagnostics import scale_diagnostics

    model = build_model(replace(TINY, n_layers=1, moe_shared_expert=True), strategy(name), seed=4)
    randomize_scales(model)
    moe = model.blocks[0].ffn
    de = moe.d_expert
    if name == "standard":
        columns = (moe.router.pow(2).sum(0) + moe.gate_up.pow(2).sum((0, 1))
                   + moe.shared_expert.gate_up.weight.pow(2).sum(0))
        balances = [moe.shared_scale().pow(2) - columns]
    else:
        balances = [moe.router_scale().pow(2) - moe.router.pow(2).sum(0),
                    moe.in_scales["gate"]().pow(2) - moe.gate_up[:, :de].pow(2).sum(1),
                    moe.in_scales["up"]().pow(2) - moe.gate_up[:, de:].pow(2).sum(1)]
        shared = moe.shared_expert.gate_up  # HG: the shared expert's branches have their own scales
        for branch, rows in zip(("gate", "up"), shared.weight.split(shared.sizes)):
            balances.append(shared.in_scales[branch]().pow(2) - rows.pow(2).sum(0))
    infos = {n: i for n, i in model.param_info().items() if "ffn" in n}
    expected = torch.cat([b.detach().flatten() for b in balances]).double()
    balance = scale_diagnostics(model, infos)["input"]["balance"]
    assert balance == pytest.approx({"mean": expected.mean().item(), "min": expected.min().item(),
                                     "max": expected.max().item()}, rel=1e-5)


@pytest.mark.parametrize("parameterization", ["or", "er"])
def test_a_stacked_scale_takes_one_magnitude_per_expert(parameterization):
    from scalevec.scales import Role, Scale

    scale = Scale((3, 5), parameterization, Role.INPUT)
    gamma = torch.rand(3, 5, generator=torch.Generator().manual_seed(0)) * torch.tensor([[0.5], [2.0], [7.0]]) + 0.1
    scale.set_gamma(gamma)
    torch.testing.assert_close(scale(), gamma, rtol=1e-6, atol=1e-6)


def test_compiled_padded_dispatch_compiles_a_few_graphs_for_any_routing():
    """CPU's padded dispatch sizes its buffers by the largest expert's load, which changes with every routing:
    compiled, that size is rounded up to a power of two (zero rows past each count), so a run compiles one graph
    per power of two instead of one per load (which hit dynamo's recompile limit and fell back to eager), and the
    outputs stay those of the exact size."""
    m = ModelConfig(preset="", vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=48,
                    max_seq_len=64, moe_experts=4, moe_top_k=2, moe_d_expert=16)
    model = build_model(m, strategy("unified"), seed=0, moe=MoEConfig(dispatch="padded"))
    graphs = []

    def counting(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    compiled = torch.compile(model, backend=counting, dynamic=False)
    ffn, loads = model.blocks[0].ffn, set()
    exact = ffn.padded_experts

    def recording(rows, expert_of, counts):  # the eager model's largest load
        loads.add(int(counts.max()))
        return exact(rows, expert_of, counts)

    for seed in range(12):  # routers drawn anew: the largest load moves with each
        generator = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, 64, (2, 32), generator=generator)
        with torch.no_grad():
            ffn.router.copy_(torch.randn(4, 32, generator=generator) * 3)
            got = compiled(tokens)
            ffn.padded_experts = recording
            assert torch.allclose(got, model(tokens), atol=1e-5)
            del ffn.padded_experts
    assert len(loads) >= 6 and len(graphs) <= 8, (sorted(loads), len(graphs))

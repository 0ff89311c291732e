"""Issue "Performance": the bench's bookkeeping, activation checkpointing, one compile smoke test."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from scalevec import bench, build_model, kernels, strategy
from scalevec.bench import format_bench, run_bench
from scalevec.config import load_config
from scalevec.train.trainer import lm_objective

TINY = {"model": {"vocab_size": 128, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64,
                  "max_seq_len": 32},
        "train": {"batch_size": 2, "seq_len": 32}}


def test_bench_reports_medians_and_ratios_to_first_arm(monkeypatch):
    # given step times (a warm-up step, then three timed ones per arm, in ABAB order): known medians and ratios
    times = {"standard": iter([9.0, 0.4, 0.2, 0.3]), "unified": iter([9.0, 0.33, 0.6, 0.36])}
    monkeypatch.setattr(bench, "_step", lambda arm, *args: next(times[arm.name]))
    report = run_bench(load_config(TINY, ["train.fused_kernels=false"]), ["standard", "unified"], repeats=3, warmup=1)
    results = report["results"]
    assert list(results) == ["standard", "unified"]
    standard, unified = results["standard"], results["unified"]
    assert (standard["step_s"], unified["step_s"]) == (0.3, 0.36)  # medians, the warm-up left out
    assert standard["step_ratio"] == 1.0 and unified["step_ratio"] == pytest.approx(1.2)
    assert unified["tokens_per_s"] == pytest.approx(2 * 32 / 0.36)
    assert standard["memory_ratio"] == 1.0 and unified["memory_ratio"] > 1.0  # the scales and their activations
    assert unified["parameters"] > standard["parameters"]
    assert "| unified | 360.0 | 178 | 1.200 |" in format_bench(report)
    assert unified["mfu"] is None  # no peak known on CPU


def test_a_step_ratio_comes_with_the_interval_its_repeats_allow(monkeypatch):
    """The ratio's 95% interval is a paired bootstrap over repeats: it holds the ratio, lies within the repeats'
    own ratios, narrows with more repeats of the same spread, stays tight where both arms drift together (the
    repeats are paired), and is absent for the first arm and below INTERVAL_REPEATS repeats."""
    def bench_with(unified_times: list[float], standard_times: list[float] | None = None) -> dict:
        times = {"standard": iter(standard_times or [1.0] * len(unified_times)), "unified": iter(unified_times)}
        monkeypatch.setattr(bench, "_step", lambda arm, *args: next(times[arm.name]))
        config = load_config(TINY, ["train.fused_kernels=false"])
        return run_bench(config, ["standard", "unified"], repeats=len(unified_times), warmup=0)

    spread = [1.02, 1.08, 1.04, 1.10, 1.06, 1.06]
    few, many = bench_with(spread)["results"], bench_with(spread * 8)["results"]
    for results in (few, many):
        low, high = results["unified"]["step_ratio_ci95"]
        assert results["unified"]["step_ratio"] == pytest.approx(1.06) and 1.02 <= low <= 1.06 <= high <= 1.10
        assert results["standard"]["step_ratio_ci95"] is None
    assert few["unified"]["step_ratio_ci95"][0] < few["unified"]["step_ratio_ci95"][1]
    assert many["unified"]["step_ratio_ci95"][1] - many["unified"]["step_ratio_ci95"][0] < (
        few["unified"]["step_ratio_ci95"][1] - few["unified"]["step_ratio_ci95"][0])
    drifting = [1.0, 2.0, 1.2, 1.8, 1.4, 1.6] * 4  # the machine's speed moves; unified is 1.05x in every repeat
    low, high = bench_with([1.05 * s for s in drifting], drifting)["results"]["unified"]["step_ratio_ci95"]
    assert 1.04 < low <= 1.05 <= high < 1.06
    report = bench_with(spread)
    assert "| standard | 1000.0 | 64 | 1.000 | - |" in format_bench(report)
    interval = "[{:.3f}, {:.3f}]".format(*report["results"]["unified"]["step_ratio_ci95"])
    assert f"| unified | 1060.0 | 60 | 1.060 | {interval} |" in format_bench(report)
    assert bench_with(spread[:bench.INTERVAL_REPEATS - 1])["results"]["unified"]["step_ratio_ci95"] is None


@pytest.mark.skipif(kernels.library() is None, reason="no C compiler builds the fused kernels")
def test_an_arm_with_fused_kernels_is_timed_beside_its_torch_ops_form(monkeypatch):
    monkeypatch.setattr(bench, "_step", lambda *args: 0.5)
    report = run_bench(load_config(TINY), ["standard", "unified", "dnp-ffn"], repeats=1, warmup=0)
    assert list(report["results"]) == ["standard", "unified", "unified (torch ops)", "dnp-ffn", "dnp-ffn (torch ops)"]
    report = run_bench(load_config(TINY, ["train.fused_kernels=false"]), ["unified"], repeats=1, warmup=0)
    assert list(report["results"]) == ["unified"]


def test_every_compiled_arm_stays_compiled(monkeypatch):
    """Each arm's compiled objective is one more graph of one code object to dynamo: while the bench steps them,
    dynamo's recompile limit covers every arm (past the default 8 the later arms would silently run eager), and
    the limit is restored after."""
    limits = []

    def compile(objective, **_):
        return lambda *args: (limits.append(torch._dynamo.config.recompile_limit), objective(*args))[1]

    monkeypatch.setattr(torch, "compile", compile)
    before = torch._dynamo.config.recompile_limit
    strategies = ["standard", "hg", "or", "dnp", "dnp-ffn", "unified", "none", "qknorm"]
    report = run_bench(load_config(TINY), strategies, repeats=1, warmup=0, compile=True)
    arms = len(report["results"])
    assert arms == len(strategies) + 4 > before  # dnp, dnp-ffn, unified and qknorm beside their torch-ops forms
    assert limits and min(limits) >= arms and torch._dynamo.config.recompile_limit == before


@pytest.mark.parametrize("profile_steps,users_setting", [(1, False), (0, False), (0, True)])
def test_a_compiled_profile_names_inductors_kernels_and_a_timing_alone_is_compiled_as_ever(
        profile_steps, users_setting, monkeypatch):
    """Compiled on CPU, a profile's rows include Inductor's own kernels: the graphs are compiled with a profiler
    record per kernel while the bench steps them (both arms alike). Without a profile the user's setting is left
    as it is, and after either it is what it was; the report's header says when the records were on."""
    import torch._inductor.config as inductor

    seen = []

    def compile(objective, **_):
        return lambda *args: (seen.append(inductor.cpp.enable_kernel_profile), objective(*args))[1]

    monkeypatch.setattr(torch, "compile", compile)
    with inductor.patch({"cpp.enable_kernel_profile": users_setting}):
        report = run_bench(load_config(TINY), ["standard", "hg"], repeats=1, warmup=0, compile=True,
                           profile_steps=profile_steps)
        assert inductor.cpp.enable_kernel_profile == users_setting
    assert seen and set(seen) == {bool(profile_steps) or users_setting}
    assert report["kernel_records"] == bool(profile_steps)
    assert ("(Inductor kernels with profiler records)" in format_bench(report)) == bool(profile_steps)


def counted_matmul_flops(forward, vocab: int, batch: int, seq: int) -> int:
    """Matmul FLOPs of one forward and backward, counted by torch's FlopCounterMode (independent of summary.py)."""
    from torch.utils.flop_counter import FlopCounterMode

    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        lm_objective(forward, tokens[:, :-1], tokens[:, 1:])[0].backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("name", ["standard", "unified"])
def test_bench_flops_are_the_counted_matmuls_plus_attention(name, monkeypatch):
    """The bench's FLOPs per token: torch's count of every matmul, forward and backward (the scales add none), plus
    PaLM's attention term 12·layers·d·seq (CPU attention kernels have no count); MFU is that over the peak."""
    config = load_config(TINY)
    monkeypatch.setattr(bench, "_step", lambda *args: 0.5)  # 64 tokens a step: 128 tokens/s
    report = run_bench(config, [name], repeats=1, warmup=1, peak=1e-3)
    model = build_model(config.model, strategy(name))
    m, tokens = config.model, 2 * 32
    counted = counted_matmul_flops(model, 128, 2, 32) // tokens + 12 * m.n_layers * m.d_model * 32
    assert report["flops_per_token"] == counted
    assert report["results"][name]["mfu"] == pytest.approx(counted * 128 / 1e9)  # over a peak of 1 GFLOP/s


def test_bench_against_transformers():
    """transformers' Llama arm is the standard model's function class: the same parameters and the same matmul
    FLOPs, counted by torch, per step."""
    pytest.importorskip("transformers")
    from scalevec.bench import _hf_arm

    config = load_config(TINY)
    report = run_bench(config, ["standard"], repeats=1, warmup=1, hf=True)
    ours, theirs = report["results"]["standard"], report["results"]["transformers-llama"]
    assert ours["parameters"] == theirs["parameters"]
    hf = _hf_arm(config, torch.device("cpu")).model
    assert counted_matmul_flops(lambda x: hf(x).logits, 128, 2, 32) == counted_matmul_flops(
        build_model(config.model, strategy("standard")), 128, 2, 32)


def test_activation_checkpointing_same_gradients_less_memory():
    config = load_config(TINY)
    tokens = torch.randint(0, 128, (2, 33))
    grads = []
    for flag in (False, True):
        model = build_model(config.model, strategy("unified"), seed=1)
        model.checkpoint_blocks = flag
        F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    plain = run_bench(config, ["unified"], repeats=1, warmup=1)["results"]["unified"]["memory_bytes"]
    saved = run_bench(config, ["unified"], repeats=1, warmup=1, activation_checkpointing=True)
    assert saved["results"]["unified"]["memory_bytes"] < plain


@pytest.mark.slow
def test_compile_smoke():
    """The only torch.compile test (compiling costs tens of seconds on 2 cores): the trainer's compiled unit,
    model and loss in one graph, equals eager in loss and gradients."""
    config = load_config(TINY)
    tokens = torch.randint(0, 128, (2, 17))
    results = []
    for compiled in (False, True):
        model = build_model(config.model, strategy("unified"), seed=1)
        objective = partial(lm_objective, model, z_loss=1e-3)
        loss, ce = (torch.compile(objective, dynamic=False) if compiled else objective)(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        results.append((loss, ce, [p.grad for p in model.parameters()]))
    (loss, ce, grads), (compiled_loss, compiled_ce, compiled_grads) = results
    assert loss > ce  # the z-loss term is in
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled_ce, ce, rtol=1e-4, atol=1e-5)
    for a, b in zip(compiled_grads, grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_profile_tables_each_arm_and_what_it_adds():
    from scalevec.bench import format_profile

    report = run_bench(load_config(TINY), ["standard", "unified"], repeats=1, warmup=1, profile_steps=2)
    profiles = {name: {op["name"]: op for op in row["profile"]} for name, row in report["results"].items()}
    for profile in profiles.values():
        assert sum(op["share"] for op in profile.values()) == pytest.approx(1.0)
        assert all(op["calls"] > 0 and op["self_ms"] > 0 for op in profile.values())
    # call counts are deterministic: unified multiplies by its many scales (HG, OR, DNP's γa) and normalizes q, k,
    # gate and up, so it calls elementwise products and norms more often per step
    assert profiles["unified"]["aten::mul"]["calls"] > profiles["standard"]["aten::mul"]["calls"]
    assert profiles["unified"]["aten::mm"]["calls"] == profiles["standard"]["aten::mm"]["calls"]  # no matmul added
    text = format_profile(report)
    assert "standard: self time per step by operator (CPU op)" in text and "| aten::mm |" in text
    assert "unified over standard:" in text


def test_a_profile_row_is_named_alike_in_every_arm():
    from scalevec.bench import operator_name

    assert operator_name("graph_1_cpp_fused_add_mul_3") == operator_name("graph_0_cpp_fused_add_mul_3") == \
        "cpp_fused_add_mul_3"
    assert operator_name("## Call CompiledFxGraph fx3kq2 ##") == "## Call CompiledFxGraph ##"
    assert operator_name("Torch-Compiled Region: 0/3") == "Torch-Compiled Region"
    assert operator_name("aten::mm") == "aten::mm" and operator_name("graph_2_other") == "graph_2_other"


def test_what_an_arm_adds_lists_the_kernels_it_replaces_beside_its_new_ones():
    """Inductor names a fused kernel by the ops it fuses, so an arm's extra norm inside the first arm's RoPE
    kernel is a new kernel while the first arm's is gone: both are listed, each with its Δ, and the total is
    the difference of the profiled steps."""
    from scalevec.bench import format_profile

    def row(ops: dict[str, float]) -> dict:
        total = sum(ops.values())
        return {"profile": [{"name": n, "calls": 8, "self_ms": ms, "share": ms / total} for n, ms in ops.items()]}

    report = {"device": "cpu", "results": {"standard": row({"aten::mm": 300.0, "cpp_fused_rope_5": 6.0}),
                                           "unified": row({"aten::mm": 301.0, "cpp_fused_norm_rope_5": 15.0})}}
    added = format_profile(report).split("unified over standard: ")[1].splitlines()
    assert added[0].startswith("+10.00 ms per step (+3.3% of standard's profiled step)")
    assert added[3:] == ["| cpp_fused_norm_rope_5 | +15.00 | new |", "| aten::mm | +1.00 |  |",
                         "| cpp_fused_rope_5 | -6.00 | gone |"]


def test_gpu_script_fits_one_device_call():
    """benchmarks/gpu.sh time-boxes every step; together they fit the 9 minutes of one call on a lent machine."""
    import re
    from pathlib import Path

    script = (Path(__file__).parent.parent / "benchmarks" / "gpu.sh").read_text()
    limits = [int(seconds) for seconds in re.findall(r"^step \w+ (\d+) ", script, re.MULTILINE)]
    assert len(limits) >= 9 and sum(limits) <= 540


def test_gpu_study_script_fits_one_device_call():
    """benchmarks/gpu_study.sh runs a ladder suite's largest size on the GPU within one call's 9 minutes; its sweep
    line is one `scalevec sweep` accepts."""
    import re
    from pathlib import Path

    from scalevec.experiments.sweep import arms_at, load_suite

    script = (Path(__file__).parent.parent / "benchmarks" / "gpu_study.sh").read_text()
    limits = [int(seconds) for seconds in re.findall(r"^step \w+ (\d+) ", script, re.MULTILINE)]
    assert len(limits) == 3 and sum(limits) <= 540
    assert '--sizes "$SIZE" --set train.device=cuda --jobs "$JOBS"' in script
    suite_name = re.search(r"^SUITE=\$\{SUITE:-([\w-]+)\}", script, re.MULTILINE).group(1)
    suite = load_suite(suite_name, "cpu", sets=["train.device=cuda"])
    arms = arms_at(suite, [suite.sizes[-1]])
    assert len(arms) == len(suite.strategies) and all(suite.arm_config(arm).train.device == "cuda" for arm in arms)

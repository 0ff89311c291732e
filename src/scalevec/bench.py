"""`scalevec bench`: training-step throughput and memory per strategy, measured side by side.

Strategies (and optionally `transformers`' LlamaForCausalLM at the same shape) are timed in
alternation within one process (A B A B ...) after a warm-up, so drifts in machine speed hit all
of them alike; medians and ratios to the first strategy are reported, each step ratio with a 95% interval
from a paired bootstrap over the repeats (from 6 repeats). The interval covers the noise within one run only:
on 2 shared cores two runs of 12 repeats have differed by 0.04, so compare runs too. An arm that uses the fused CPU
kernels (train.fused_kernels, kernels.py) is timed beside its torch-ops form, `name (torch ops)`.

MFU (CUDA only; train/utilization.py): model FLOPs per token (`flops_per_token`, PaLM's accounting, the
same for every strategy: scale vectors add no matmul) x tokens/s over the GPU's dense bf16 peak.

Memory: on CUDA the allocator's peak; on CPU, where torch keeps no allocator statistics, the bytes
of parameters, gradients and optimizer state plus the activations saved for backward in one step
(counted by storage through saved-tensor hooks), which is what differs between strategies.

Profile (`profile_steps`): each arm's steps under torch.profiler, every operator (CPU) or kernel (CUDA)
with its calls and self time per step and its share of the step; then what each arm adds over the first.
Compiled on CPU, Inductor's own kernels are rows too (`cpp_fused_...`): where unified's extra norms
run, which the one row of a whole compiled graph would hide.
"""

from __future__ import annotations

import contextlib
import re
import statistics
import time
from dataclasses import dataclass
from functools import partial

import torch

from .config import Config, ConfigError
from .model import build_model
from .optim import Optimizers
from .strategy import strategy as make_strategy
from .summary import flops_per_token
from .train.preflight import check_memory, resolve_device
from .train.trainer import lm_objective
from .train.utilization import mfu, peak_tflops

COMPILED_GRAPH = re.compile(r"## Call CompiledFxGraph \w+ ##")
COMPILED_REGION = re.compile(r"Torch-Compiled Region: \d+/\d+")
KERNEL_GRAPH = re.compile(r"^graph_\d+_(?=cpp_)")
INTERVAL_REPEATS = 6  # the fewest timed repeats a step ratio's interval is computed from


@dataclass
class TimedArm:
    name: str
    model: torch.nn.Module
    objective: object  # (inputs, targets) -> (objective, cross-entropy), as the trainer computes it
    optimizer: object


def _saved_activation_bytes(arm: TimedArm, tokens: torch.Tensor) -> int:
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = _loss(arm, tokens)
    loss.backward()
    arm.optimizer.zero_grad()
    params = {p.untyped_storage().data_ptr() for p in arm.model.parameters()}
    return sum(size for ptr, size in storages.items() if ptr not in params)


def _state_bytes(arm: TimedArm) -> int:
    params = sum(p.numel() * p.element_size() for p in arm.model.parameters())
    return 4 * params  # weights, gradients and AdamW's two moments


def _loss(arm: TimedArm, tokens: torch.Tensor) -> torch.Tensor:
    return arm.objective(tokens[:, :-1], tokens[:, 1:])[0]


def _step(arm: TimedArm, tokens: torch.Tensor, device: torch.device, autocast) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with autocast():
        loss = _loss(arm, tokens)
    loss.backward()
    arm.optimizer.step()
    arm.optimizer.zero_grad()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _hf_arm(config: Config, device) -> TimedArm:
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        raise ConfigError("--hf needs transformers; pip install 'scalevec[hf]'") from None
    m = config.model
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.d_ff, num_hidden_layers=m.n_layers,
        num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads, head_dim=m.head_size,
        max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm_eps, tie_word_embeddings=m.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta}, attn_implementation="sdpa",
        use_cache=False)).to(device)
    optimizer = torch.optim.AdamW(hf.parameters(), lr=config.optim.lr, betas=(config.optim.beta1, config.optim.beta2),
                                  fused=config.optim.fused)
    return TimedArm("transformers-llama", hf, partial(lm_objective, lambda inputs: hf(inputs).logits), optimizer)


def operator_name(key: str) -> str:
    """A profiler row's name, the same in every arm: Inductor names its graphs by a hash, and its CPU kernels and
    dynamo its regions by their number in the process (which depends on what was compiled before): all dropped."""
    key = COMPILED_REGION.sub("Torch-Compiled Region", COMPILED_GRAPH.sub("## Call CompiledFxGraph ##", key))
    return KERNEL_GRAPH.sub("", key)


def _profile(arm: TimedArm, tokens: torch.Tensor, device: torch.device, autocast, steps: int) -> list[dict]:
    """Every operator (CPU) or kernel (CUDA) of `steps` steps: calls and self milliseconds per step, share."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            _step(arm, tokens, device, autocast)
    merged: dict[str, list[float]] = {}
    for event in prof.key_averages():
        micros = event.self_device_time_total if cuda else event.self_cpu_time_total
        if micros > 0:
            row = merged.setdefault(operator_name(event.key), [0, 0.0])
            row[0], row[1] = row[0] + event.count, row[1] + micros
    rows = [{"name": name, "calls": calls / steps, "self_ms": micros / 1e3 / steps}
            for name, (calls, micros) in merged.items()]
    total = sum(row["self_ms"] for row in rows)
    for row in rows:
        row["share"] = row["self_ms"] / total
    return sorted(rows, key=lambda row: -row["self_ms"])


def run_bench(config: Config, strategies: list[str], repeats: int = 10, warmup: int = 3, compile: bool = False,
              hf: bool = False, activation_checkpointing: bool = False, peak: float | None = None,
              profile_steps: int = 0) -> dict:
    """`peak`: the device's bf16 TFLOP/s for MFU (default: looked up by GPU name; none on CPU); `profile_steps`:
    also profile that many steps per arm, after the timed ones (profiling slows them, so it never times)."""
    device = resolve_device(config.train.device)  # train.device=cuda without a GPU is refused, not timed on CPU
    check_memory(config, device)  # an absurd size answers at once, before any model is built
    bf16 = device.type == "cuda"

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)

    def arm(name: str, fused: bool) -> tuple[TimedArm, int]:
        strat = make_strategy(name)
        model = build_model(config.model, strat, config.seed, config.moe).to(device)
        model.checkpoint_blocks = activation_checkpointing
        fused_modules = model.use_fused_kernels(fused)
        label = f"{name} (torch ops)" if fused != config.train.fused_kernels else name
        optimizer = Optimizers(model, config.optim, strat.scale_decay)
        return TimedArm(label, model, partial(lm_objective, model), optimizer), fused_modules

    arms = []
    for name in strategies:
        timed, fused_modules = arm(name, config.train.fused_kernels)
        arms.append(timed)
        if fused_modules:  # the fused kernels' effect, side by side
            arms.append(arm(name, False)[0])
    if hf:
        arms.append(_hf_arm(config, device))
    if compile:  # each arm's whole loss, model and cross-entropy, as one graph (as the trainer does)
        for arm in arms:
            arm.objective = torch.compile(arm.objective, dynamic=False)
    t = config.train
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.model.vocab_size, (t.batch_size, t.seq_len + 1), generator=gen).to(device)
    times: dict[str, list[float]] = {arm.name: [] for arm in arms}
    # every arm's objective is one code object to dynamo, so each arm's graph counts as a recompile of it: past
    # dynamo's limit (8) the later arms would silently run eager. A profile names Inductor's CPU kernels: they are
    # compiled with a profiler record each, an idle check when no profiler runs, so every arm's timing carries it
    kernel_records = bool(profile_steps and compile and device.type == "cpu")
    if kernel_records:
        from torch._inductor import config as inductor

        kernel_names = inductor.patch({"cpp.enable_kernel_profile": True})
    else:
        kernel_names = contextlib.nullcontext()
    with torch._dynamo.config.patch(recompile_limit=8 + 2 * len(arms)), kernel_names:
        for _ in range(warmup):
            for arm in arms:
                _step(arm, tokens, device, autocast)
        for _ in range(repeats):
            for arm in arms:
                times[arm.name].append(_step(arm, tokens, device, autocast))
        tokens_per_step = t.batch_size * t.seq_len
        flops = flops_per_token(arms[0].model, t.seq_len)  # transformers' Llama: the standard shape's
        peak = peak_tflops(device, peak)
        results = {}
        for arm in arms:
            median = statistics.median(times[arm.name])
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                _step(arm, tokens, device, autocast)
                memory = torch.cuda.max_memory_allocated()
            else:
                memory = _state_bytes(arm) + _saved_activation_bytes(arm, tokens)
            results[arm.name] = {"step_s": median, "tokens_per_s": tokens_per_step / median, "memory_bytes": memory,
                                 "parameters": sum(p.numel() for p in arm.model.parameters()),
                                 "mfu": mfu(flops, tokens_per_step / median, peak) if peak else None}
        first = strategies[0]
        base = results[first]
        for name, row in results.items():
            row["step_ratio"] = row["step_s"] / base["step_s"]
            row["step_ratio_ci95"] = None if name == first else _ratio_interval(times[name], times[first])
            row["memory_ratio"] = row["memory_bytes"] / base["memory_bytes"]
        if profile_steps:
            for arm in arms:
                results[arm.name]["profile"] = _profile(arm, tokens, device, autocast, profile_steps)
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "peak_tflops": peak, "flops_per_token": flops, "threads": torch.get_num_threads(), "compile": compile,
            "activation_checkpointing": activation_checkpointing, "model": config.model.preset,
            "batch_size": t.batch_size, "seq_len": t.seq_len, "repeats": repeats, "kernel_records": kernel_records,
            "results": results}


def _ratio_interval(times: list[float], base: list[float]) -> list[float] | None:
    """95% interval of median(times) / median(base): a paired bootstrap over the timed repeats (arms alternate, so
    repeat i of each arm ran side by side, under the same machine load); None below INTERVAL_REPEATS repeats, where
    a median's resamples take too few values to mean anything."""
    if len(times) < INTERVAL_REPEATS:
        return None
    import numpy as np
    from scipy.stats import bootstrap

    def ratio(arm, first, axis=-1):
        return np.median(arm, axis=axis) / np.median(first, axis=axis)

    result = bootstrap((np.array(times), np.array(base)), ratio, paired=True, vectorized=True, n_resamples=2000,
                       method="percentile", rng=np.random.default_rng(0))
    return [float(result.confidence_interval.low), float(result.confidence_interval.high)]


def format_bench(report: dict) -> str:
    lines = [f"{report['model']} on {report['device']} ({report['threads']} threads), batch {report['batch_size']}x"
             f"{report['seq_len']}, {'compiled' if report['compile'] else 'eager'}"
             f"{', activation checkpointing' if report['activation_checkpointing'] else ''}, median of "
             f"{report['repeats']}{' (Inductor kernels with profiler records)' if report['kernel_records'] else ''}",
             "| arm | step ms | tokens/s | step ratio | its 95% interval | memory MB | memory ratio | MFU |",
             "|---|---|---|---|---|---|---|---|"]
    for name, row in report["results"].items():
        mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "-"
        interval = "-" if row["step_ratio_ci95"] is None else "[{:.3f}, {:.3f}]".format(*row["step_ratio_ci95"])
        lines.append(f"| {name} | {row['step_s'] * 1e3:.1f} | {row['tokens_per_s']:,.0f} | {row['step_ratio']:.3f} | "
                     f"{interval} | {row['memory_bytes'] / 2**20:.1f} | {row['memory_ratio']:.3f} | {mfu} |")
    return "\n".join(lines)


def format_profile(report: dict, top: int = 15) -> str:
    """Per arm, its `top` operators by self time per step; then, per arm, the operators whose time per step
    grew most over the first arm's (what that arm adds) and those that shrank most or are gone (what it replaces)."""
    results = report["results"]
    first = next(iter(results))
    lines = []
    for name, row in results.items():
        lines += ["", f"{name}: self time per step by operator ({'kernel' if report['device'] != 'cpu' else 'CPU op'})",
                  "| operator | calls | self ms | share |", "|---|---|---|---|"]
        lines += [f"| {op['name']} | {op['calls']:g} | {op['self_ms']:.2f} | {op['share']:.1%} |"
                  for op in row["profile"][:top]]
        rest = row["profile"][top:]
        lines.append(f"| (other {len(rest)}) | | {sum(op['self_ms'] for op in rest):.2f} | "
                     f"{sum(op['share'] for op in rest):.1%} |")
    base = {op["name"]: op["self_ms"] for op in results[first]["profile"]}
    base_total = sum(base.values())
    for name, row in list(results.items())[1:]:
        ms = {op["name"]: op["self_ms"] for op in row["profile"]}
        deltas = sorted(((ms.get(op, 0.0) - base.get(op, 0.0), op) for op in ms.keys() | base.keys()), reverse=True)
        grew, shrank = [d for d in deltas if d[0] > 0][:top], [d for d in reversed(deltas) if d[0] < 0][:top]
        total = sum(ms.values()) - base_total
        # a fused kernel is named by the ops it fuses, so where the arm's extra norms join one of the first arm's
        # kernels, that kernel shows as new and the first arm's as gone: read the two lists together
        lines += ["", f"{name} over {first}: {total:+.2f} ms per step ({total / base_total:+.1%} of {first}'s profiled "
                  "step); the operators that grew most, then those that shrank most:",
                  "| operator | Δ self ms | new or gone |", "|---|---|---|"]
        lines += [f"| {op} | {delta:+.2f} | {'new' if op not in base else 'gone' if op not in ms else ''} |"
                  for delta, op in grew + shrank]
    return "\n".join(lines)

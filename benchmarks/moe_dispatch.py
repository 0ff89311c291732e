"""MoE dispatch: grouped GEMM against padded batched matmuls, one MoE layer, side by side.

Both arms are the same module with `moe.dispatch` switched, so routing, scales and DNP are
identical; the outputs are compared and forward+backward is timed in alternation (medians).

    python benchmarks/moe_dispatch.py                                        # cpu-moe layer, fp32
    python benchmarks/moe_dispatch.py --preset gpu-moe-0.5b --tokens 16384   # bf16 autocast on CUDA
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from scalevec import build_model, load_config, strategy
from scalevec.moe import MoEFeedForward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu-moe")
    parser.add_argument("--strategy", default="unified")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = load_config({"model": {"preset": args.preset}})
    model = build_model(config.model, strategy(args.strategy), seed=0, moe=config.moe).to(device)
    moe = next(m for m in model.modules() if isinstance(m, MoEFeedForward))
    x = torch.randn(args.tokens, config.model.d_model, device=device, requires_grad=True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step(dispatch: str) -> tuple[float, torch.Tensor]:
        moe.moe.dispatch = dispatch
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast:
            out = moe(x)
        out.float().square().mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, out.detach().float()

    arms = ("grouped", "padded")
    outputs = {arm: step(arm)[1] for arm in arms}
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    for _ in range(args.repeats):
        for arm in arms:
            times[arm].append(step(arm)[0])
    difference = (outputs["grouped"] - outputs["padded"]).abs().max() / outputs["padded"].abs().max()
    ms = {arm: 1e3 * statistics.median(t) for arm, t in times.items()}
    print(json.dumps({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                      "dtype": "bf16 autocast" if device.type == "cuda" else "fp32", "preset": args.preset,
                      "strategy": args.strategy, "tokens": args.tokens, "experts": moe.experts, "top_k": moe.top_k,
                      "max_abs_difference_relative": difference.item(), "ms": ms,
                      "grouped_over_padded": ms["grouped"] / ms["padded"]}, indent=1))


if __name__ == "__main__":
    main()

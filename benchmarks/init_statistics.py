"""Signal ratios at initialization: how strong each branch starts relative to the residual stream.

For every block, the RMS of the attention and FFN branch outputs over the RMS of the residual
stream they are added to, averaged over blocks, on one batch of random tokens. The paper-sized
presets (d 768-2048, init std 0.02, close to 1/sqrt(d)) set the reference; a small model whose
ratios are far below it starts with branches the residual stream drowns, and anything that
renormalizes a branch (DNP, QK-norm) then wins for that reason alone (docs/init.md).

    .venv/bin/python benchmarks/init_statistics.py [--gains 0.5,0.75,1] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from scalevec.config import load_config
from scalevec.model import build_model

SMALL = ["cpu-0.5m", "cpu-1m", "cpu-2m", "cpu-3m", "cpu-7m"]
PAPER_SIZED = ["gpu-0.12b", "gpu-0.25b", "gpu-0.5b", "gpu-1b"]
TOKENS = 256


@torch.no_grad()
def branch_ratios(preset: str, strategy: str, sets: list[str]) -> dict[str, float]:
    """Mean over blocks of RMS(branch output) / RMS(residual stream entering the block)."""
    config = load_config(None, [f"model.preset={preset}", f"strategy.preset={strategy}", *sets])
    model = build_model(config.model, config.strategy, seed=0)
    ratios: dict[str, list[float]] = {"attn": [], "ffn": []}
    residual: list[torch.Tensor] = []

    def rms(t: torch.Tensor) -> float:
        return t.float().pow(2).mean().sqrt().item()

    hooks = []
    for block in model.blocks:
        hooks.append(block.register_forward_pre_hook(lambda _, args: residual.append(args[0])))
        for name in ratios:
            hooks.append(getattr(block, name).register_forward_hook(
                lambda _, __, out, name=name: ratios[name].append(rms(out) / rms(residual[-1]))))
    tokens = torch.randint(0, config.model.vocab_size, (1, TOKENS), generator=torch.Generator().manual_seed(0))
    model(tokens)
    for hook in hooks:
        hook.remove()
    return {name: statistics.mean(values) for name, values in ratios.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gains", default="0.5,0.75,1.0", help="fan_in gains to try on the small presets")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for strategy in ("standard", "unified"):
        for preset in PAPER_SIZED:
            rows.append({"preset": preset, "strategy": strategy, "init": "normal 0.02",
                         **branch_ratios(preset, strategy, [])})
        for preset in SMALL:
            rows.append({"preset": preset, "strategy": strategy, "init": "normal 0.02",
                         **branch_ratios(preset, strategy, [])})
            for gain in [float(g) for g in args.gains.split(",")]:
                rows.append({"preset": preset, "strategy": strategy, "init": f"fan_in {gain:g}",
                             **branch_ratios(preset, strategy, ["model.init=fan_in", f"model.init_gain={gain}"])})
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print("| preset | strategy | init | attn / residual | ffn / residual |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['preset']} | {row['strategy']} | {row['init']} | {row['attn']:.3f} | {row['ffn']:.3f} |")


if __name__ == "__main__":
    main()

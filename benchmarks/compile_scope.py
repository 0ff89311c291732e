"""What to compile: the model alone (cross-entropy eager) against model and loss as one graph.

The trainer compiles `lm_objective` over the model, so the fp32 upcast of the logits and the
cross-entropy fuse with it; this times both scopes side by side (A B A B ..., medians), for the
baseline and the unified strategy, one full training step each (AdamW included).

    python benchmarks/compile_scope.py                      # cpu-7m, batch 8 x 256, fp32
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch

from scalevec import build_model, load_config, strategy
from scalevec.optim import Optimizers
from scalevec.train.trainer import lm_objective


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu-7m")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=12)
    args = parser.parse_args()
    config = load_config({"model": {"preset": args.preset}})
    tokens = torch.randint(0, config.model.vocab_size, (args.batch_size, args.seq_len + 1),
                           generator=torch.Generator().manual_seed(0))
    arms = {}
    for name in ("standard", "unified"):
        for scope in ("model", "model+loss"):
            model = build_model(config.model, strategy(name), seed=0)
            if scope == "model":
                objective = partial(lm_objective, torch.compile(model, dynamic=False))
            else:
                objective = torch.compile(partial(lm_objective, model), dynamic=False)
            arms[f"{name}, compiled {scope}"] = (objective, Optimizers(model, config.optim, strategy(name).scale_decay))

    def step(objective, optimizer) -> float:
        start = time.perf_counter()
        objective(tokens[:, :-1], tokens[:, 1:])[0].backward()
        optimizer.step()
        optimizer.zero_grad()
        return time.perf_counter() - start

    for _ in range(3):  # compiles, then warms up
        for arm in arms.values():
            step(*arm)
    times: dict[str, list[float]] = {key: [] for key in arms}
    for _ in range(args.repeats):
        for key, arm in arms.items():
            times[key].append(step(*arm))
    median = {key: statistics.median(t) for key, t in times.items()}
    for key, value in median.items():
        print(f"{key}: {value * 1e3:.1f} ms")
    for name in ("standard", "unified"):
        ratio = median[f"{name}, compiled model+loss"] / median[f"{name}, compiled model"]
        print(f"{name}: model+loss / model = {ratio:.3f}")


if __name__ == "__main__":
    main()

"""Time each fused CPU kernel inside the compiled training step: the C call alone and its whole custom op.

A profile (`scalevec bench --profile`) charges a Python custom op for the profiler's own work on every call, so it
overstates the fused kernels against Inductor's. This times them as the step runs them, without a profiler: each C
call, and each op around it (the allocation of its outputs and the dispatch), per layer and per step.

    python benchmarks/kernel_calls.py                       # unified, cpu-7m, batch 8 x 256, fp32
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from functools import partial

import torch

from scalevec import build_model, kernels, load_config, strategy
from scalevec.optim import Optimizers
from scalevec.train.trainer import lm_objective


class TimedLibrary:
    """The compiled kernels, each call timed into `times` under 'C <function>'."""

    def __init__(self, library, times):
        self.library, self.times = library, times

    def __getattr__(self, name):
        function = getattr(self.library, name)

        def timed(*args):
            start = time.perf_counter()
            result = function(*args)
            self.times[f"C {name}"].append(time.perf_counter() - start)
            return result

        return timed


def time_ops(times) -> None:
    """Re-register each custom op's CPU kernel as itself, timed into `times` under 'op <name>'."""
    for op in (kernels._forward, kernels._backward, kernels._qk_backward):
        def timed(*args, _inner=op._init_fn, _name=op._name):
            start = time.perf_counter()
            result = _inner(*args)
            times[f"op {_name}"].append(time.perf_counter() - start)
            return result

        op.register_kernel("cpu")(timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu-7m")
    parser.add_argument("--strategy", default="unified")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10, help="timed steps, after 5 untimed ones")
    args = parser.parse_args()
    times = defaultdict(list)
    library = kernels.library()
    if library is None:
        raise SystemExit("the fused kernels cannot be built here (see the warning above)")
    kernels.library = lambda: TimedLibrary(library, times)
    time_ops(times)
    config = load_config({"model": {"preset": args.preset}})
    s = strategy(args.strategy)
    model = build_model(config.model, s, seed=0)
    layers = config.model.n_layers
    print(f"{args.strategy} {args.preset}, batch {args.batch_size} x {args.seq_len}, compiled, "
          f"{torch.get_num_threads()} threads; modules using the fused kernels: {model.use_fused_kernels()}")
    optimizer = Optimizers(model, config.optim, s.scale_decay)
    objective = torch.compile(partial(lm_objective, model), dynamic=False)
    tokens = torch.randint(0, config.model.vocab_size, (args.batch_size, args.seq_len + 1),
                           generator=torch.Generator().manual_seed(0))
    steps = []
    for step in range(5 + args.steps):
        if step == 5:
            times.clear()
        start = time.perf_counter()
        objective(tokens[:, :-1], tokens[:, 1:])[0].backward()
        optimizer.step()
        optimizer.zero_grad()
        steps.append(time.perf_counter() - start)
    print(f"step: median {statistics.median(steps[5:]) * 1e3:.1f} ms")
    print("| call | ms per step | median ms per call, in call order within a step |\n|---|---|---|")
    for name in sorted(times):
        calls = times[name]
        per_call = [statistics.median(calls[i::layers]) * 1e3 for i in range(layers)]
        print(f"| {name} | {sum(calls) * 1e3 / args.steps:.2f} | {', '.join(f'{ms:.2f}' for ms in per_call)} |")


if __name__ == "__main__":
    main()

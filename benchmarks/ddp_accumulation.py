"""Gradient accumulation under DDP: all-reduce on every micro-batch against once per optimizer step.

The trainer's step wraps the first grad_accum - 1 backward passes in `gradient_sync(..., False)`
(DDP's no_sync) and keeps the loss on the device until the step's one host sync. This times that
step against the previous one (sync and `.item()` on every micro-batch), side by side in one
launch (A B A B ..., medians), same model, data and optimizer.

    torchrun --standalone --nproc-per-node 2 benchmarks/ddp_accumulation.py   # gloo, cpu-3m, grad_accum 4
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import time

import torch
import torch.distributed as dist

from scalevec import build_model, load_config, strategy
from scalevec.dist import all_reduce, gradient_sync, init_world, wrap
from scalevec.optim import Optimizers
from scalevec.train.trainer import lm_objective


def step(model, objective, optimizer, batches, once: bool, world) -> float:
    ce_sum = torch.zeros(()) if once else 0.0
    for micro, tokens in enumerate(batches):
        sync = gradient_sync(model, micro == len(batches) - 1) if once else contextlib.nullcontext()
        with sync:
            loss, ce = objective(tokens[:, :-1], tokens[:, 1:])
            (loss / len(batches)).backward()
        ce_sum = ce_sum + (ce.detach() if once else ce.item())
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    if once:
        value, _ = torch.stack([all_reduce(ce_sum / len(batches), world) / world.size, norm]).tolist()
    else:
        value, _ = (all_reduce(torch.tensor(ce_sum / len(batches)), world) / world.size).item(), norm.item()
    optimizer.step()
    optimizer.zero_grad()
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu-3m")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per micro-batch per rank")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--grad-accum", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    world = init_world(torch.device("cpu"))
    config = load_config({"model": {"preset": args.preset}})
    gen = torch.Generator().manual_seed(world.rank)
    batches = [torch.randint(0, config.model.vocab_size, (args.batch_size, args.seq_len + 1), generator=gen)
               for _ in range(args.grad_accum)]
    arms = {}
    for name in ("every micro-batch", "once per step"):
        model = build_model(config.model, strategy("standard"), seed=0)
        wrapped = wrap(model, "ddp", False)
        arms[name] = (wrapped, functools.partial(lm_objective, wrapped), Optimizers(model, config.optim, "none"))
    times = {name: [] for name in arms}
    for repeat in range(args.repeats + 1):
        for name, (wrapped, objective, optimizer) in arms.items():
            dist.barrier()
            start = time.perf_counter()
            step(wrapped, objective, optimizer, batches, name == "once per step", world)
            if repeat:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    if world.main:
        base = statistics.median(times["every micro-batch"])
        print(f"{args.preset}, 2 ranks on gloo, grad_accum {args.grad_accum}, {args.batch_size} x {args.seq_len} "
              f"tokens per micro-batch, median of {args.repeats}:")
        for name, samples in times.items():
            median = statistics.median(samples)
            print(f"  sync {name:<18} {median * 1e3:8.1f} ms/step  ratio {median / base:.3f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

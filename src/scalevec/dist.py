"""Data parallelism on torchrun: process group from the environment, DDP or FSDP2 wrapping.

Launch any `scalevec train` under `torchrun --nproc-per-node N` (or a multi-node rendezvous);
`dist.mode` picks DDP (replicated parameters, gradients all-reduced) or FSDP2 (`fully_shard` per
block and at the root, parameters sharded as DTensors). gloo on CPU, NCCL on GPU. Logging and
files come from rank 0 only.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_world(device_type: str) -> World:
    """Join torchrun's process group (once); a single process without torchrun is world size 1."""
    if not launched_by_torchrun():
        return World()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    world = World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    if device_type == "cuda":
        torch.cuda.set_device(world.local_rank)
    return world


def close_world() -> None:
    """Leave the process group, so NCCL frees its communicators before exit."""
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, mode: str, device_type: str, bf16: bool) -> nn.Module:
    """The module to call for training: DDP around `model`, or `model` itself sharded in place by FSDP2."""
    if mode == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    if mode == "fsdp2":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
            MixedPrecisionPolicy()
        for block in model.blocks:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
    return model


@contextlib.contextmanager
def gradient_sync(module: nn.Module, enabled: bool) -> Iterator[None]:
    """Whether backward inside the block all-reduces gradients (DDP's no_sync, FSDP2's
    set_requires_gradient_sync): gradient accumulation syncs on its last micro-batch only."""
    if enabled:
        yield
    elif isinstance(module, nn.parallel.DistributedDataParallel):
        with module.no_sync():
            yield
    elif hasattr(module, "set_requires_gradient_sync"):  # an FSDP2 module
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        yield


def all_reduce_sum(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """Sum of a tensor over ranks, on its device (no host sync)."""
    if world.size == 1:
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor)
    return tensor


def all_mean(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """Mean of a tensor over ranks, on its device (no host sync)."""
    return all_reduce_sum(tensor, world) / world.size


def all_sum(values: list[float], world: World) -> list[float]:
    if world.size == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.tolist()


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()

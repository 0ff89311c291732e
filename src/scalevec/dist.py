"""Data parallelism on torchrun: process group from the environment, DDP or FSDP2 wrapping.

Launch any `scalevec train` under `torchrun --nproc-per-node N` (or a multi-node rendezvous);
`dist.mode` picks DDP (replicated parameters, gradients all-reduced) or FSDP2 (`fully_shard` per
block and at the root, parameters sharded as DTensors). gloo on CPU, NCCL on GPU. Logging and
files come from rank 0 only.
"""

from __future__ import annotations

import os
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


def all_mean(value: float, world: World) -> float:
    """Mean of a Python float over ranks."""
    if world.size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.item() / world.size


def all_sum(values: list[float], world: World) -> list[float]:
    if world.size == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.tolist()


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()

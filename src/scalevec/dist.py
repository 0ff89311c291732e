"""Data parallelism on torchrun: process group from the environment, DDP or FSDP2 wrapping, collectives.

Launch any `scalevec train` under `torchrun --nproc-per-node N` (or a multi-node rendezvous);
`dist.mode` picks DDP (replicated parameters, gradients all-reduced) or FSDP2 (`fully_shard` per
block and at the root, parameters sharded as DTensors). gloo on CPU; on GPU a group that serves
CUDA tensors with NCCL and CPU tensors with gloo. Every collective scalevec makes itself goes
through the helpers below, which put its tensor on the training device (`World.device`), and they
run whenever a process group exists, world size 1 included, so a one-GPU torchrun exercises every
collective a multi-GPU run makes. Logging and files come from rank 0 only.

A rank that fails posts one line to the rendezvous store and exits; the other ranks' next
collective then fails (gloo notices the closed connection at once), and they end with that line
instead of their own (rank 0 prints it): see `fail_together`. A rank waiting in a collective that
never fails (NCCL waits for a dead peer until its timeout, or the failed rank has not exited) is
ended by `watch_failures`, which looks for a posted failure every few seconds.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

# the backend of each training device type: NCCL serves only CUDA tensors, so the CPU ones (an object
# collective, a CPU-offloaded state dict) go to gloo in the same group
BACKENDS = {"cuda": "cuda:nccl,cpu:gloo", "cpu": "gloo"}
SERVED = {"nccl": "cuda", "gloo": "cpu"}  # the tensor device type each backend serves
PEER_WAIT_S = 5.0  # how long a rank whose collective failed waits for the failed rank's message
WATCH_INTERVAL_S = 2.0  # how often a rank looks for another rank's failure
_ending = threading.Lock()  # taken by whichever path ends this rank on a failure first: it alone reports it
_stop_watching = threading.Event()


def served_device_types(backend: str) -> set[str]:
    """Device types a backend string (`"gloo"`, `"cuda:nccl,cpu:gloo"`) serves."""
    if ":" not in backend:
        return {SERVED[backend]}
    return {part.split(":")[0] for part in backend.split(",")}


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    """The training device; every collective's tensors live on it."""
    grouped: bool = False
    """Whether a process group exists (under torchrun, world size 1 included): the collectives run."""

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_world(device: torch.device) -> World:
    """Join torchrun's process group (once); a single process without torchrun is world size 1.
    On CUDA the device becomes this rank's (LOCAL_RANK)."""
    if not launched_by_torchrun():
        return World(device=device)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(BACKENDS[device.type], device_id=device if device.type == "cuda" else None)
    return World(dist.get_rank(), dist.get_world_size(), local_rank, device, grouped=True)


def close_world() -> None:
    """Leave the process group, so NCCL frees its communicators before exit."""
    stop_watching()
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, mode: str, bf16: bool) -> nn.Module:
    """The module to call for training: DDP around `model`, or `model` itself sharded in place by FSDP2."""
    if mode == "ddp":
        # no buffer broadcast: rank 0's would overwrite each rank's own counts of routed tokens (MoE step_load,
        # log_load, summed over ranks where they are read); the other buffers are constants or move alike on all
        return nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
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


# -- collectives: every tensor on the training device -------------------------------------------------------------

def all_reduce(tensor: torch.Tensor, world: World, op: str = "sum") -> torch.Tensor:
    """`tensor` reduced over ranks (`sum` or `max`) as a new tensor on the training device (no host sync)."""
    tensor = tensor.to(world.device, copy=True)  # a copy: all_reduce works in place
    if world.grouped:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return tensor


def all_sum(values: list[float], world: World) -> list[float]:
    """Sums of numbers over ranks (a host sync)."""
    return all_reduce(torch.tensor(values, dtype=torch.float64), world).tolist()


def any_rank(flag: bool, world: World) -> bool:
    """Whether `flag` holds on any rank (a host sync)."""
    return bool(all_reduce(torch.tensor([float(flag)]), world, "max").item())


def barrier(world: World) -> None:
    """Every rank reaches this point before any goes on: an all-reduce on the training device, waited for on
    the host (dist.barrier would pick a device of its own)."""
    if world.grouped:
        all_reduce(torch.zeros(1), world).item()


# -- failing together ---------------------------------------------------------------------------------------------

def _failure_key() -> str:
    # one key per torchrun attempt: the agent's store outlives a restarted worker group
    return f"scalevec/failure/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def _store():
    return dist.distributed_c10d._get_default_store()


def is_collective_failure(err: BaseException) -> bool:
    """An error of a collective (a peer closed its connection, a timeout) rather than of this rank's own work."""
    if isinstance(err, dist.DistError):
        return True
    markers = ("gloo", "NCCL", "Connection closed", "Connection reset")
    return type(err) is RuntimeError and any(m in str(err) for m in markers)


def post_failure(message: str) -> None:
    """Publish this rank's failure (the first posted wins) for the ranks its exit leaves waiting."""
    with contextlib.suppress(Exception):  # no store left: the other ranks still fail, with their own line
        _store().compare_set(_failure_key(), "", f"rank {dist.get_rank()}: {message}")


def posted_failure(wait_s: float) -> str | None:
    """The failure another rank posted, waiting up to `wait_s` for it; None if none came."""
    try:
        store = _store()
        if wait_s > 0:
            store.wait([_failure_key()], timedelta(seconds=wait_s))
        return store.get(_failure_key()).decode() if store.check([_failure_key()]) else None
    except Exception:  # the wait timed out, or the store is gone with the rank that hosted it
        return None


def watch_failures(world: World, end: Callable[[str], None]) -> None:
    """Once per process (until stop_watching), a thread that calls `end(message)` (which must end the process) when
    another rank has posted a failure and this rank is not already ending on one of its own."""
    if not (world.grouped and world.size > 1) or _watcher() is not None:
        return

    def watch() -> None:
        while not _stop_watching.wait(WATCH_INTERVAL_S):
            message = posted_failure(0)
            if message is not None and _ending.acquire(blocking=False):
                end(message)
                return

    _stop_watching.clear()
    threading.Thread(target=watch, name="scalevec-failures", daemon=True).start()
    atexit.register(stop_watching)  # a thread inside a store call when the interpreter ends would abort it


def _watcher() -> threading.Thread | None:
    return next((t for t in threading.enumerate() if t.name == "scalevec-failures"), None)


def stop_watching() -> None:
    """End the watch_failures thread (before the process group or the interpreter goes)."""
    _stop_watching.set()
    watcher = _watcher()
    if watcher is not None and watcher is not threading.current_thread():
        watcher.join()


@contextlib.contextmanager
def fail_together(world: World, peer_failed: type[Exception], passing: tuple[type[Exception], ...] = ()
                  ) -> Iterator[None]:
    """Within the block, an error on one rank ends every rank: this rank's own error is posted and raised; a
    collective that failed because another rank exited raises `peer_failed` with that rank's line, `rank R: ...`.
    Exceptions of `passing` are no failure (the ranks raise them together)."""
    try:
        yield
    except passing:
        raise
    except Exception as err:
        if not (world.grouped and world.size > 1):
            raise
        if not _ending.acquire(blocking=False):  # watch_failures is ending this process already
            time.sleep(3 * WATCH_INTERVAL_S)
        text = " ".join(str(err).split()) or type(err).__name__
        if is_collective_failure(err):
            message = posted_failure(PEER_WAIT_S)
            raise peer_failed(message or f"another rank ended without a message ({text})") from None
        post_failure(text)
        raise

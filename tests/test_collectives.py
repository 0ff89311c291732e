"""Issue "Cluster-grade training": every collective on a device its process group serves.

NCCL serves only CUDA tensors, so a collective on a CPU tensor stops a multi-GPU run (a run on CPU never
notices: gloo serves CPU). Two checks that do not need a GPU:
- each helper of scalevec.dist, given a world whose training device is not the CPU (`meta` stands in for a
  GPU), hands torch.distributed a tensor on that device: a helper that built a CPU tensor fails here;
- a whole training run in a process group (world size 1, as under a one-GPU torchrun: evaluation, metrics, MoE
  load and expert bias, the step's loss and stop flag, checkpoints) makes every collective of its own through
  those helpers, on the training device; torch's own (DDP, FSDP2, checkpointing) on a device the backend serves.
"""

import inspect
import socket

import pytest
import torch
import torch.distributed as dist
from test_train import quiet, tiny_config

from scalevec import dist as scalevec_dist
from scalevec.dist import World, served_device_types
from scalevec.train.trainer import Trainer

COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
               "reduce", "gather", "scatter", "all_to_all_single", "barrier", "all_gather_object",
               "broadcast_object_list", "gather_object", "scatter_object_list")


class Recorded(Exception):
    """Stops a helper after its collective was recorded (a meta tensor has no value to read back)."""


def test_helpers_put_every_collective_on_the_training_device(monkeypatch):
    gpu_like = World(rank=0, size=2, device=torch.device("meta"), grouped=True)
    devices = []

    def record(tensor, *args, **kwargs):
        devices.append(tensor.device)
        raise Recorded

    monkeypatch.setattr(dist, "all_reduce", record)
    monkeypatch.setattr(dist, "broadcast", record)
    calls = {
        "all_reduce": lambda: scalevec_dist.all_reduce(torch.ones(3), gpu_like),
        "all_reduce max": lambda: scalevec_dist.all_reduce(torch.ones(3), gpu_like, "max"),
        "all_sum": lambda: scalevec_dist.all_sum([1.0, 2.0], gpu_like),
        "any_rank": lambda: scalevec_dist.any_rank(True, gpu_like),
        "barrier": lambda: scalevec_dist.barrier(gpu_like),
    }
    for name, call in calls.items():
        devices.clear()
        with pytest.raises(Recorded):
            call()
        assert devices == [torch.device("meta")], name


def test_served_device_types():
    assert served_device_types("gloo") == {"cpu"}
    assert served_device_types("nccl") == {"cuda"}
    assert served_device_types(scalevec_dist.BACKENDS["cuda"]) == {"cuda", "cpu"}
    assert served_device_types(scalevec_dist.BACKENDS["cpu"]) == {"cpu"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def process_group(monkeypatch):
    """This process as rank 0 of a world of one, as torchrun --nproc-per-node 1 starts it."""
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)
    yield
    scalevec_dist.close_world()


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_a_run_makes_its_collectives_on_the_training_device(small_data, tmp_path, monkeypatch, process_group, mode):
    calls = []  # (collective, device, scalevec function that led to it, whether scalevec.dist made it)

    def recording(name, real):
        def collective(*args, **kwargs):
            tensor = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("tensor")
            frames = [f for f in inspect.stack(0)[1:] if "/scalevec/" in f.filename]
            ours = bool(frames) and frames[0].filename.endswith("scalevec/dist.py")
            purpose = next((f.function for f in frames if not f.filename.endswith("scalevec/dist.py")), None)
            calls.append((name, None if tensor is None else tensor.device, purpose, ours))
            return real(*args, **kwargs)
        return collective

    for name in COLLECTIVES:
        monkeypatch.setattr(dist, name, recording(name, getattr(dist, name)))
    config = tiny_config(small_data, f"dist.mode={mode}", "train.steps=4", "train.eval_every=2", "train.log_every=2",
                         "train.checkpoint_every=2", "model.moe_experts=4", "moe.balance=bias")
    trainer = Trainer(config, tmp_path / "run", progress=False, log=quiet)
    assert trainer.world.grouped and trainer.world.size == 1
    trainer.run()

    backend = dist.get_backend_config() if dist.is_initialized() else "gloo"
    ours = [c for c in calls if c[3]]
    assert all(device == trainer.device for _, device, _, _ in ours), ours
    assert all(device is None or device.type in served_device_types(backend) for _, device, _, _ in calls), calls
    # every collective scalevec makes itself comes through scalevec.dist: none made elsewhere in scalevec
    assert not [c for c in calls if not c[3] and c[2] in {"evaluate", "_expert_load", "_train_step", "balance"}]
    purposes = {purpose for _, _, purpose, is_ours in ours}
    expected = {"evaluate", "_expert_load", "_train_step", "balance", "save_checkpoint", "_run_directory"}
    assert expected <= purposes, purposes

"""A run's checkpoint manager: what the trainer saves and restores, in checkpoint.py's atomic, verified format.

A checkpoint holds every component's state: the model and the optimizer (whole tensors in model.safetensors
and trainer.pt, or an FSDP2 run's shards in dcp/ through torch.distributed.checkpoint), the data loader's global
position, the counters (step, skipped steps, global batch) and every RNG (torch, CUDA, NumPy, Python). Written on
any number of ranks, sharded or not, it restores into any layout: DCP reshards, whole tensors are sharded into
FSDP2 (elastic resume).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import random
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .._version import __version__
from ..checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_file_checked,
    newest_usable,
    save_checkpoint,
    sharded_model_tensors,
)
from ..config import Config, to_dict
from ..data.loader import Loader, split_global_batch
from ..dist import World, all_reduce
from ..optim import Optimizers
from ..outputs import first_line, writing
from ..rundir import RunDirError, TrainError


@dataclasses.dataclass
class Counters:
    """The trainer's counters, saved in every checkpoint."""

    step: int = 0
    """Optimizer steps taken."""
    skipped: int = 0
    """Steps whose update was skipped (train.nonfinite = "skip")."""
    global_batch: int = 0
    """Sequences per optimizer step over all ranks: fixed for a run, whatever its world size."""


def recorded_global_batch(state: dict) -> int:
    """Sequences per optimizer step of the run that wrote a checkpoint's state.json (older ones: from its config)."""
    if "global_batch" in state:
        return state["global_batch"]
    train = state["config"]["train"]
    return train["batch_size"] * train.get("grad_accum", 1) * state["loader"]["world_size"]


@contextlib.contextmanager
def dcp_errors():
    """torch.distributed.checkpoint's CheckpointException (a BaseException, raised on every rank alike) as the
    first failed rank's own exception, e.g. its OSError of a full disk."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as err:
        raise next(iter(err.failures.values()))[0] from None


def rng_states() -> tuple[dict, dict]:
    """(tensors for trainer.pt, JSON for state.json) of every RNG."""
    tensors = {"torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda_rng"] = torch.cuda.get_rng_state_all()
    numpy_state, python_state = np.random.get_state(), random.getstate()
    return tensors, {"python_rng": [python_state[0], list(python_state[1]), python_state[2]],
                     "numpy_rng": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]]}


def set_rng_states(tensors: dict, state: dict) -> None:
    """Every RNG from what rng_states() returned (rank 0's: data-parallel ranks draw the same numbers)."""
    torch.set_rng_state(tensors["torch_rng"])
    if "cuda_rng" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(tensors["cuda_rng"])
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, *rest = state["numpy_rng"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))


def read_checkpoint(path: Path, state: dict) -> dict:
    """The files of a verified checkpoint, read into memory; CheckpointError for anything unusable."""
    loaded = {"state": state,
              "trainer": load_file_checked(path / "trainer.pt", functools.partial(torch.load, weights_only=True))}
    if not (path / "dcp").is_dir():
        loaded["model"] = load_file_checked(path / "model.safetensors", load_file)
    counters = (state.get("step"), state.get("skipped"), (state.get("loader") or {}).get("position"))
    if not all(isinstance(n, int) and n >= 0 for n in counters) or not isinstance(loaded["trainer"], dict) \
            or "torch_rng" not in loaded["trainer"] or not {"python_rng", "numpy_rng"} <= state.keys():
        raise CheckpointError(f"{path}/state.json or trainer.pt lacks a field of a checkpoint or has a wrong type")
    return loaded


def stored_shapes(path: Path, loaded: dict) -> dict[str, tuple[int, ...]]:
    """Name and shape of every model tensor of a checkpoint read by read_checkpoint() (an FSDP2 one's from its
    metadata, without reading the shards)."""
    if "model" in loaded:
        return {name: tuple(tensor.shape) for name, tensor in loaded["model"].items()}
    return {name: shape for name, (shape, _) in sharded_model_tensors(path / "dcp").items()}


def check_fits(path: Path, loaded: dict, expected: dict[str, tuple[int, ...]]) -> None:
    """CheckpointError naming the first tensor a checkpoint's model and this run's model (`expected`: name ->
    shape) do not share at one shape: a checkpoint of another model, or a config.toml edited since it was written.
    The start and its preflight (the dry run) both ask this, before anything is loaded."""
    stored = stored_shapes(path, loaded)
    for name in sorted(set(stored) | set(expected)):
        if stored.get(name) != expected.get(name):
            held = f"shape {stored[name]}" if name in stored else "no such tensor"
            wanted = f"shape {expected[name]}" if name in expected else "no such tensor"
            raise CheckpointError(f"{path} does not fit this run's model (tensor {name}: {held} in the checkpoint, "
                                  f"{wanted} in this model)")


def unusable(err: CheckpointError) -> RunDirError:
    """A resume that finds checkpoints but none it can use: refused, nothing changed."""
    return RunDirError(f"{err}; nothing was changed: restore a checkpoint, or start again with --overwrite")


class CheckpointManager:
    """save() and apply() of a run's checkpoints, restore() of its newest usable one; it owns the counters' and the
    RNGs' part of the trainer's state."""

    def __init__(self, run_dir: Path, config: Config, world: World, model: torch.nn.Module, optimizers: Optimizers,
                 loader: Loader, counters: Counters, sharded: bool):
        self.root, self.config, self.world = run_dir / "checkpoints", config, world
        self.model, self.optimizers, self.loader, self.counters, self.sharded = model, optimizers, loader, counters, \
            sharded
        self.skipped: frozenset[Path] = frozenset()  # checkpoints restore() passed over: pruning never keeps them

    def save(self) -> None:
        """A checkpoint of the current step (every rank calls it)."""
        step = self.counters.step
        trainer_state, rng_json = rng_states()
        if moe_layers := self.model.moe_layers():  # the expert load counted since the last metrics record, all ranks
            trainer_state["expert_log_load"] = all_reduce(torch.stack([moe.log_load for moe in moe_layers]),
                                                          self.world).cpu()
        if self.sharded:
            from torch.distributed.checkpoint import save
            from torch.distributed.checkpoint.state_dict import get_state_dict

            model_state, optim_state = get_state_dict(self.model, [self.optimizers])
        else:
            trainer_state["optimizers"] = self.optimizers.state_dict()
        state = {"version": __version__, "config": to_dict(self.config), "loader": self.loader.state_dict(),
                 "global_batch": self.counters.global_batch, "world_size": self.world.size,
                 "skipped": self.counters.skipped, **rng_json}

        def write_files(tmp: Path) -> None:
            if self.sharded:
                with dcp_errors():
                    save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp / "dcp")
            if self.world.main:
                if not self.sharded:
                    save_file({k: v.detach().contiguous().cpu() for k, v in self.model.state_dict().items()},
                              tmp / "model.safetensors")
                torch.save(trainer_state, tmp / "trainer.pt")

        with writing(f"the checkpoint of step {step}", "resume with --resume",
                     kept="earlier checkpoints are intact", error=TrainError):
            save_checkpoint(self.root, step, write_files, state, self.config.train.keep_checkpoints, self.world,
                            self.skipped)

    def restore(self) -> Path | None:
        """Apply the newest usable checkpoint (falling back past any that does not verify, read or fit); None when
        there is none; RunDirError when there are some but none is usable."""
        try:
            found = newest_usable(self.root, lambda path, state: self.apply(path, read_checkpoint(path, state),
                                                                            own=True))
        except CheckpointError as err:
            raise unusable(err) from None
        if found:  # those newer than the one continued from verify or not, but could not be used
            self.skipped = frozenset(p for p in list_checkpoints(self.root) if p > found[0])
        return found[0] if found else None

    def apply(self, path: Path, loaded: dict, own: bool = False) -> None:
        """Model, optimizer, RNG, data position and counters from a checkpoint read by read_checkpoint(), written on
        any number of ranks, sharded or not; the run's `own` checkpoint also sets the global batch (a world size that
        cannot divide it: ConfigError), another run's (train.branch_from) keeps this run's."""
        state, trainer_state = loaded["state"], loaded["trainer"]
        global_batch = recorded_global_batch(state) if own else self.counters.global_batch
        split_global_batch(global_batch, self.world.size, self.config.train.batch_size)  # refused before any change
        check_fits(path, loaded, {name: tuple(t.shape) for name, t in self.model.state_dict().items()})
        # torch's load_state_dict also takes the saved groups' settings (base_lr, betas, weight decay...): this
        # run's config sets them (a branch may change them), the checkpoint gives the state (moments, step counts)
        settings = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizers.param_groups]
        try:
            if (path / "dcp").is_dir():
                self._load_shards(path / "dcp")
            elif self.sharded:
                self._load_full_into_shards(loaded["model"], trainer_state["optimizers"])
            else:
                self.model.load_state_dict(loaded["model"])
                self.optimizers.load_state_dict(trainer_state["optimizers"])
        except (RuntimeError, KeyError, ValueError, OSError) as err:
            raise CheckpointError(f"{path} does not fit this run's model or optimizer ({first_line(err)})") from None
        for group, own in zip(self.optimizers.param_groups, settings, strict=True):
            group.update(own)
        set_rng_states(trainer_state, state)
        self._restore_expert_load(trainer_state.get("expert_log_load"))
        self.loader.load_state_dict(state["loader"])
        self.counters.step, self.counters.skipped, self.counters.global_batch = \
            state["step"], state["skipped"], global_batch

    def _restore_expert_load(self, saved: torch.Tensor | None) -> None:
        """The expert load counted since the last metrics record when the checkpoint was written, on rank 0 (the
        record sums it over ranks), so the first record after a resume is the one of an uninterrupted run; a
        checkpoint written before scalevec saved it counts from the resume."""
        moe_layers = self.model.moe_layers()
        for i, moe in enumerate(moe_layers):
            keep = saved is not None and self.world.main and saved.shape == (len(moe_layers), moe.log_load.numel())
            moe.log_load.copy_(saved[i] if keep else torch.zeros_like(moe.log_load))

    def _load_shards(self, path: Path) -> None:
        """A torch.distributed.checkpoint (an FSDP2 run's) into this layout: DCP reshards to this world's shards,
        or reads whole tensors in one process."""
        from torch.distributed.checkpoint import load
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optim_state = get_state_dict(self.model, [self.optimizers])
        shards = {"model": model_state, "optim": optim_state}
        with warnings.catch_warnings():  # one process: DCP warns that it assumes so
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            with dcp_errors():
                load(shards, checkpoint_id=path)
        set_state_dict(self.model, [self.optimizers], model_state_dict=shards["model"],
                       optim_state_dict=shards["optim"])

    def _load_full_into_shards(self, model_state: dict, optim_state: dict) -> None:
        """Whole tensors (a checkpoint of one process or DDP) into this rank's FSDP2 shards."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        if set(optim_state) != {"state", "param_groups"}:
            raise ValueError("the optimizer state is of scalevec 0.1; resume it with dist.mode=ddp")
        names = {id(p): name for name, p in self.model.named_parameters()}  # torch numbers them group by group
        order = [names[id(p)] for group in self.optimizers.param_groups for p in group["params"]]
        by_name = {"state": {order[int(i)]: value for i, value in optim_state["state"].items()},
                   "param_groups": [{**g, "params": [order[i] for i in g["params"]]}
                                    for g in optim_state["param_groups"]]}
        set_state_dict(self.model, [self.optimizers], model_state_dict=model_state, optim_state_dict=by_name,
                       options=StateDictOptions(full_state_dict=True))

"""Atomic, verifiable checkpoints that never execute code when loaded, and reading a run's weights.

    checkpoints/step_00000100/
        model.safetensors   model weights                       (single process, DDP)
        trainer.pt          optimizer state, torch RNG states   (loaded with weights_only=True)
        dcp/                model and optimizer shards          (FSDP2: torch.distributed.checkpoint)
        state.json          step, loader position, Python/NumPy RNG, config, version, file hashes

A checkpoint is written to a temporary directory, every file fsync'ed, then renamed into place,
so a crash or a full disk leaves the previous checkpoints as they were. `state.json` is written
last and records every other file's SHA-256 and its own (over the rest of its content), so a
truncated, corrupted or edited checkpoint is recognised and skipped. Pruning counts only checkpoints
that verify: a corrupt one never pushes a valid one out. A pruned checkpoint is renamed to .del-NAME
before it is removed, and the next save removes what a killed process left (.del-, .tmp-).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from safetensors.torch import load_file

from .config import Config, load_config
from .dist import World, barrier
from .errors import RunStopped
from .model import Decoder
from .outputs import file_sha256, first_line
from .rundir import RunDirError

PREFIX = "step_"
SINGLE_PROCESS = World()
T = TypeVar("T")


class CheckpointError(RunStopped):
    pass


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _state_digest(state: dict) -> str:
    return hashlib.sha256(json.dumps({k: v for k, v in state.items() if k != "sha256"}, sort_keys=True).encode()
                          ).hexdigest()


def save_checkpoint(root: Path, step: int, write_files: Callable[[Path], None], state: dict, keep: int,
                    world: World = SINGLE_PROCESS, unusable: frozenset[Path] = frozenset()) -> Path:
    """Write checkpoint `step` under `root` atomically, then keep only the newest `keep` (of those not in
    `unusable`: checkpoints a resume skipped although they verify, e.g. a trainer.pt weights_only refuses).

    Every rank calls this; `write_files(tmp_dir)` runs on every rank (a sharded save is collective),
    the rest on rank 0.
    """
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{final.name}"
    if world.main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in [*root.glob(".tmp-*"), *root.glob(".del-*")]:  # of a process killed while writing or deleting
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    barrier(world)
    try:
        write_files(tmp)
        barrier(world)
        if world.main:
            files = sorted(p for p in tmp.rglob("*") if p.is_file())
            state = {**state, "step": step, "files": {str(p.relative_to(tmp)): file_sha256(p) for p in files}}
            state["sha256"] = _state_digest(state)
            (tmp / "state.json").write_text(json.dumps(state, indent=1))
            for path in [*files, tmp / "state.json"]:
                _fsync(path)
            if final.exists():
                _delete(final)
            tmp.rename(final)
            _fsync(root)
            prune(root, keep, final, unusable)
    except BaseException:
        if world.main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier(world)
    return final


def prune(root: Path, keep: int, newest: Path, unusable: frozenset[Path] = frozenset()) -> None:
    """Delete valid checkpoints beyond the newest `keep` valid ones; an invalid or `unusable` one never counts or
    pushes one out."""
    valid = [p for p in list_checkpoints(root) if p == newest or (p not in unusable and is_valid(p))]
    for old in valid[:-keep]:
        _delete(old)


def _delete(checkpoint: Path) -> None:
    """Rename, then remove: a process killed midway leaves a .del- directory that the next save removes, never a
    half-deleted checkpoint, which would look corrupt and so stay (pruning removes only valid ones)."""
    trash = checkpoint.with_name(f".del-{checkpoint.name}")
    checkpoint.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def verify_checkpoint(path: Path) -> dict:
    """The checkpoint's state.json once it and every file it lists match their hashes; CheckpointError otherwise."""
    try:
        state = json.loads((path / "state.json").read_text())
        if state.get("sha256") != _state_digest(state):
            raise CheckpointError(f"{path / 'state.json'} does not match its recorded SHA-256 (edited or corrupt)")
        for name, digest in state["files"].items():
            if file_sha256(path / name) != digest:
                raise CheckpointError(f"{path / name} does not match its recorded SHA-256")
        return state
    except CheckpointError:
        raise
    except Exception as err:  # missing, truncated or unparsable file of any kind
        raise _unusable(path, err) from None


def is_valid(path: Path) -> bool:
    """verify_checkpoint as a yes/no, hashed once per checkpoint directory (by inode and mtime) in a process."""
    try:
        stat = (path / "state.json").stat()
    except OSError:
        return False
    return _verified(str(path), stat.st_ino, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _verified(path: str, inode: int, mtime_ns: int) -> bool:
    try:
        verify_checkpoint(Path(path))
        return True
    except CheckpointError:
        return False


def newest_usable(root: Path, read: Callable[[Path, dict], T]) -> tuple[Path, T] | None:
    """(path, read(path, state)) of the newest checkpoint that verifies and reads, warning one line for each one
    skipped; None when there is no checkpoint at all; CheckpointError naming every failure when none is usable
    (then the one line says it all: no warnings). `read` raises CheckpointError for content it cannot use."""
    reasons = []
    for path in reversed(list_checkpoints(root)):
        try:
            found = path, read(path, verify_checkpoint(path))
        except CheckpointError as err:
            reasons.append(str(err))
            continue
        for reason in reasons:
            warnings.warn(f"skipping unusable checkpoint: {reason}", stacklevel=2)
        return found
    if reasons:
        raise CheckpointError(f"no usable checkpoint in {root} ({'; '.join(reasons)})")
    return None


def load_file_checked(path: Path, load: Callable[[Path], T]) -> T:
    """`load(path)` with any failure (a truncated file, a pickle that weights_only refuses) as one CheckpointError."""
    try:
        return load(path)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path} holds objects other than tensors and plain data (possibly code), which "
                              "torch.load(weights_only=True) refuses; do not load it") from None
    except Exception as err:
        raise _unusable(path, err) from None


def _unusable(path: Path, err: Exception) -> CheckpointError:
    return CheckpointError(f"{path}: {type(err).__name__}: {first_line(err)}")


def sharded_model_tensors(dcp: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of the model tensors a torch.distributed.checkpoint (an FSDP2 run's) holds, from its
    metadata alone; CheckpointError if that cannot be read."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        stored = FileSystemReader(str(dcp)).read_metadata().state_dict_metadata
    except Exception as err:  # a missing or unreadable .metadata
        raise _unusable(dcp, err) from None
    return {key.removeprefix("model."): (tuple(meta.size), meta.properties.dtype) for key, meta in stored.items()
            if key.startswith("model.")}


# -- reading a run's weights (export, generate, evaluation) ------------------------------------------------------

def run_weights(run_dir: Path, config: Config) -> dict[str, torch.Tensor]:
    """The newest valid checkpoint's weights; an FSDP2 checkpoint's shards are gathered into full tensors."""

    def read(path: Path, state: dict) -> dict[str, torch.Tensor]:
        if not (path / "dcp").is_dir():
            return load_file_checked(path / "model.safetensors", load_file)
        from torch.distributed.checkpoint import load
        from torch.distributed.checkpoint.api import CheckpointException

        # tensors of the shapes the checkpoint holds, not the config's: load_run_model names any difference
        full = {"model": {name: torch.empty(shape, dtype=dtype)
                          for name, (shape, dtype) in sharded_model_tensors(path / "dcp").items()}}
        try:
            with warnings.catch_warnings():  # one process: DCP warns that it assumes so
                warnings.filterwarnings("ignore", "torch.distributed is disabled")
                load(full, checkpoint_id=path / "dcp")
        except (CheckpointException, Exception) as err:  # CheckpointException is a BaseException
            raise _unusable(path / "dcp", err) from None
        return full["model"]

    try:
        found = newest_usable(run_dir / "checkpoints", read)
        if found is not None:
            return found[1]
        if config.train.init_from:  # an import not trained yet
            return load_file_checked(Path(config.train.init_from), load_file)
    except CheckpointError as err:
        raise RunDirError(str(err)) from None
    raise RunDirError(f"{run_dir} has no usable checkpoint; train it first (scalevec train --resume --out {run_dir})")


def run_tokenizer(config: Config) -> Path | None:
    path = Path(config.data.tokenizer) if config.data.tokenizer else Path(config.data.dir) / "tokenizer.json"
    return path if path.is_file() else None


def load_run_model(run_dir: Path) -> tuple[Config, Decoder]:
    """The run's config and its model with the newest usable checkpoint's weights."""
    if not (run_dir / "config.toml").is_file():
        raise RunDirError(f"{run_dir} is not a run directory (no config.toml); give the --out of a scalevec run")
    config = load_config(run_dir / "config.toml", resolved=True)
    model = Decoder(config.model, config.strategy, config.moe)
    weights = run_weights(run_dir, config)
    if set(weights) != set(model.state_dict()):
        extra = sorted(set(weights) ^ set(model.state_dict()))[0]
        raise RunDirError(f"{run_dir}: its weights do not fit this scalevec's model (tensor {extra}); a MoE run with "
                          "a shared expert written before 0.2 gave the shared expert a γ of its own, which 0.2 "
                          "removed (docs/paper-notes.md section 8): read it with scalevec 0.1")
    expected = model.state_dict()
    reshaped = sorted(name for name in weights if weights[name].shape != expected[name].shape)
    if reshaped:  # a hand-edited config.toml
        name = reshaped[0]
        raise RunDirError(f"{run_dir}: its checkpoint's tensor {name} has shape {tuple(weights[name].shape)}, but "
                          f"its config.toml describes {tuple(expected[name].shape)}; restore the config.toml the run "
                          "was trained with")
    model.load_state_dict(weights)
    return config, model

"""Atomic, verifiable checkpoints that never execute code when loaded.

    checkpoints/step_00000100/
        model.safetensors   model weights                       (single process, DDP)
        trainer.pt          optimizer state, torch RNG states   (loaded with weights_only=True)
        dcp/                model and optimizer shards          (FSDP2: torch.distributed.checkpoint)
        state.json          step, loader position, Python/NumPy RNG, config, version, file hashes

A checkpoint is written to a temporary directory, every file fsync'ed, then renamed into place,
so a crash or a full disk leaves the previous checkpoints as they were. `state.json` is written
last and records every other file's SHA-256, so a truncated or corrupted checkpoint is recognised
and skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Callable

from ..dist import World, barrier

PREFIX = "step_"


class CheckpointError(RuntimeError):
    pass


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(root: Path, step: int, write_files: Callable[[Path], None], state: dict, keep: int,
                    world: World = World()) -> Path:
    """Write checkpoint `step` under `root` atomically, then keep only the newest `keep`.

    Every rank calls this; `write_files(tmp_dir)` runs on every rank (a sharded save is collective),
    the rest on rank 0.
    """
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{final.name}"
    if world.main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier(world)
    try:
        write_files(tmp)
        barrier(world)
        if world.main:
            files = sorted(p for p in tmp.rglob("*") if p.is_file())
            state = {**state, "step": step, "files": {str(p.relative_to(tmp)): _sha256(p) for p in files}}
            (tmp / "state.json").write_text(json.dumps(state, indent=1))
            for path in [*files, tmp / "state.json"]:
                _fsync(path)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            _fsync(root)
            for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if world.main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier(world)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def verify_checkpoint(path: Path) -> dict:
    """The checkpoint's state.json once every file it lists matches its hash; CheckpointError otherwise."""
    try:
        state = json.loads((path / "state.json").read_text())
        for name, digest in state["files"].items():
            if _sha256(path / name) != digest:
                raise CheckpointError(f"{path / name} does not match its recorded SHA-256")
        return state
    except CheckpointError:
        raise
    except Exception as err:  # missing, truncated or unparsable file of any kind
        raise CheckpointError(f"{path}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None


def newest_valid(root: Path) -> tuple[Path, dict] | None:
    """The newest checkpoint that verifies (and its state), warning about each one skipped."""
    for path in reversed(list_checkpoints(root)):
        try:
            return path, verify_checkpoint(path)
        except CheckpointError as err:
            warnings.warn(f"skipping unusable checkpoint: {err}", stacklevel=2)
    return None

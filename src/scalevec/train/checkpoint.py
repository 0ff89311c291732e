"""Atomic, verifiable checkpoints that never execute code when loaded.

    checkpoints/step_00000100/
        model.safetensors   model weights
        trainer.pt          optimizer state and torch RNG states (loaded with weights_only=True)
        state.json          step, loader position, Python/NumPy RNG, config, version, file hashes

A checkpoint is written to a temporary directory, every file fsync'ed, then renamed into place,
so a crash or a full disk leaves the previous checkpoints as they were. `state.json` records the
other files' SHA-256, so a truncated or corrupted checkpoint is recognised and skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

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


def save_checkpoint(root: Path, step: int, model_state: dict, trainer_state: dict, state: dict, keep: int) -> Path:
    """Write checkpoint `step` under `root` atomically, then keep only the newest `keep`."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, tmp / "model.safetensors")
        torch.save(trainer_state, tmp / "trainer.pt")
        state = {**state, "step": step, "files": {name: _sha256(tmp / name) for name in ("model.safetensors", "trainer.pt")}}
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        for name in ("model.safetensors", "trainer.pt", "state.json"):
            _fsync(tmp / name)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        _fsync(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def load_checkpoint(path: Path) -> tuple[dict, dict, dict]:
    """(model_state, trainer_state, state) of one checkpoint; CheckpointError if it is incomplete or corrupt."""
    try:
        state = json.loads((path / "state.json").read_text())
        for name, digest in state["files"].items():
            if _sha256(path / name) != digest:
                raise CheckpointError(f"{path / name} does not match its recorded SHA-256")
        return load_file(path / "model.safetensors"), torch.load(path / "trainer.pt", weights_only=True), state
    except CheckpointError:
        raise
    except Exception as err:  # missing, truncated or unparsable file of any of the three kinds
        raise CheckpointError(f"{path}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None


def load_newest_valid(root: Path) -> tuple[dict, dict, dict] | None:
    """The newest checkpoint that loads and verifies, warning about each one skipped."""
    for path in reversed(list_checkpoints(root)):
        try:
            return load_checkpoint(path)
        except CheckpointError as err:
            warnings.warn(f"skipping unusable checkpoint: {err}", stacklevel=2)
    return None

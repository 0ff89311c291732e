"""Everything a start checks, before it writes anything, in one place.

`preflight` is what `scalevec train --dry-run` prints and what every start runs first (the Trainer, so `train`,
`compare` and `sweep` alike): the dry run is refused exactly when the start would be, with the same one line.
Only the data may be missing: `scalevec train` prepares it after the preflight, and the Trainer then needs it.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..checkpoint import CheckpointError, load_file_checked, newest_usable, verify_checkpoint
from ..config import Config, ConfigError, DataConfig
from ..data.loader import Loader, TokenWindows, check_compatible, split_global_batch
from ..data.prepare import own_files, require_prepared
from ..data.sources import DataError, resolve_sources
from ..model import Decoder
from ..outputs import DirectoryLock, OutputError, claim_directory, contains
from ..rundir import RunDirError, check_run_dir, has_content, read_metrics
from .checkpointing import check_fits, read_checkpoint, recorded_global_batch, unusable
from .loggers import check_loggers


@dataclass
class Plan:
    """What a start would do; every field was checked."""

    config: Config
    run_dir: Path
    resume: bool
    resume_from: Path | None
    """The newest usable checkpoint a resume continues from (None: it starts from step 0)."""
    device: torch.device
    world_size: int
    """Processes of this start (torchrun's WORLD_SIZE; 1 alone)."""
    data_dir: Path | None
    """The prepared data, or None where `scalevec train` would prepare it first."""
    windows: TokenWindows | None
    val_windows: TokenWindows | None
    branch: tuple[Path, dict] | None
    """train.branch_from's checkpoint, read and verified."""
    init: dict[str, torch.Tensor] | None
    """train.init_from's weights, each a finite floating-point tensor of the model's shape."""


def resolve_device(name: str) -> torch.device:
    """The device of train.device (`auto`: cuda when available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available; use train.device=cpu or auto")
    return torch.device(name)


def check_tokenizer(config: Config) -> None:
    """Refuse to train given weights (train.init_from) on a tokenizer trained afresh: their token ids would
    mean other words. Before any data is prepared."""
    if config.train.init_from and not config.data.tokenizer:
        raise ConfigError("train.init_from starts from trained weights but data.tokenizer is empty, so a new "
                          "tokenizer would be trained that the weights do not know; set data.tokenizer to their "
                          "tokenizer.json (scalevec import --tokenizer FILE)")


def check_memory(config: Config, device: torch.device) -> None:
    """Refuse, before allocating anything, a run whose weights, optimizer state and logits exceed the device.

    A lower bound from the shapes alone (matrices, embeddings, RoPE tables), so even absurd sizes answer at once.
    """
    m, t = config.model, config.train
    d, hd = m.d_model, m.head_size
    moe_layers = m.n_layers // m.moe_every if m.moe_experts else 0
    ffn = 3 * d * (moe_layers * m.moe_experts * (m.moe_d_expert or m.d_ff) + (m.n_layers - moe_layers) * m.d_ff)
    attention = m.n_layers * d * hd * (2 * m.n_heads + 2 * m.n_kv_heads)
    tensors = (1 if m.tie_embeddings else 2) * m.vocab_size * d + attention + ffn + m.max_seq_len * hd
    logits = max(t.batch_size, t.eval_batch_size) * t.seq_len * m.vocab_size
    needed = 4 * (4 * tensors + 3 * logits)  # fp32 weights, gradients, two AdamW moments; logits, softmax, gradient
    if device.type == "cuda":
        available = torch.cuda.get_device_properties(device).total_memory
    else:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > available:
        raise ConfigError(f"this run needs at least {needed / 2**30:.1f} GiB ({tensors:,} weights, {logits:,} logits "
                          f"per batch) but the {device.type} device has {available / 2**30:.1f} GiB; lower "
                          "model.vocab_size, model.max_seq_len, the model's widths or depth, or the batch sizes")


def read_weights(path: Path, key: str) -> dict[str, torch.Tensor]:
    """Floating-point, finite tensors of a safetensors file named by config key `key`; ConfigError otherwise."""
    if not path.is_file():
        raise ConfigError(f"{key} {path} not found; give a safetensors file (e.g. written by `scalevec import`)")
    try:
        state = load_file_checked(path, load_file)
    except CheckpointError as err:
        raise ConfigError(f"{key}: {err}; give a safetensors file written for this config") from None
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            raise ConfigError(f"{key} {path}: tensor {name} has dtype {tensor.dtype}, not floating point")
        if not torch.isfinite(tensor).all():
            raise ConfigError(f"{key} {path}: tensor {name} holds NaN or infinite values")
    return state


def model_shapes(config: Config) -> dict[str, tuple[int, ...]]:
    """Name and shape of every tensor of the config's model (built on the meta device: nothing allocated)."""
    with torch.device("meta"):
        return {name: tuple(t.shape) for name, t in Decoder(config.model, config.strategy, config.moe
                                                            ).state_dict().items()}


def branch_misfit(err: CheckpointError) -> ConfigError:
    """train.branch_from names a checkpoint of another model (the dry run and the start say so alike)."""
    return ConfigError(f"train.branch_from: {err}; branch from a checkpoint of this model")


def _init_weights(config: Config) -> dict[str, torch.Tensor] | None:
    path = Path(config.train.init_from)
    if not config.train.init_from:
        return None
    state = read_weights(path, "train.init_from")
    expected = model_shapes(config)
    for name in sorted(set(expected) | set(state)):
        if name not in state or name not in expected or tuple(state[name].shape) != expected[name]:
            raise ConfigError(f"train.init_from {path} does not fit this model (tensor {name}); "
                              "use weights written for this config")
    return state


def _branch(config: Config) -> tuple[Path, dict] | None:
    if not config.train.branch_from:
        return None
    path = Path(config.train.branch_from)
    try:
        loaded = read_checkpoint(path, verify_checkpoint(path))
    except CheckpointError as err:
        raise ConfigError(f"train.branch_from: {err}; give a valid checkpoint directory of another run") from None
    if loaded["state"]["step"] >= config.train.steps:
        raise ConfigError(f"train.branch_from is at step {loaded['state']['step']}, not below train.steps="
                          f"{config.train.steps}; raise train.steps")
    try:
        check_fits(path, loaded, model_shapes(config))
    except CheckpointError as err:
        raise branch_misfit(err) from None
    theirs = (loaded["state"].get("config") or {}).get("strategy", {}).get("scale", config.strategy.scale)
    if theirs != config.strategy.scale:  # OR and ER scales are tensors of one shape: direction vs log-direction
        raise ConfigError(f"train.branch_from {path} holds strategy.scale={theirs} scales, which this run would read "
                          f"as {config.strategy.scale} (another function of the same tensors); branch with "
                          f"strategy.scale={theirs}")
    return path, loaded


def check_data(data: DataConfig) -> Path | None:
    """data.dir when it holds the shards of this [data] (or imported tokens); else None, once what preparing it
    reads exists (its bundled sources, user files and tokenizer) and data.dir is free for it: absent, empty, or
    written by scalevec."""
    try:
        return require_prepared(data)
    except DataError:
        pass
    resolve_sources(data.sources, data.inputs)
    if not data.val_fraction:  # refused after preparing it, all of it, otherwise
        raise DataError("data.val_fraction=0 prepares no validation split, which training evaluates on; set "
                        "data.val_fraction > 0 (e.g. 0.02)")
    if data.tokenizer and not Path(data.tokenizer).is_file():
        raise DataError(f"data.tokenizer {data.tokenizer} not found; give an existing tokenizer.json or leave it "
                        "empty")
    try:
        claim_directory(Path(data.dir), own_files(Path(data.dir)), False, "data.dir", f"choose another data.dir, or "
                        f"replace it with `scalevec data prepare --out {data.dir} --overwrite`")
    except OutputError as err:
        raise DataError(str(err)) from None
    return None


def preflight(config: Config, run_dir: Path, resume: bool, overwrite: bool) -> Plan:
    """Every check of a start, in the order a start meets them; the first that fails raises its one line."""
    t, run_dir = config.train, Path(run_dir)
    check_run_dir(run_dir, config, resume, overwrite)
    device = resolve_device(t.device)
    check_memory(config, device)
    check_loggers(t.loggers)
    check_tokenizer(config)
    if t.compile and config.model.moe_experts and config.moe.dispatch == "grouped" and device.type == "cpu":
        raise ConfigError("moe.dispatch=grouped cannot compile in fp32 on CPU (grouped_mm compiles for bf16 "
                          "only); use moe.dispatch=auto or padded, or train.compile=false")
    if contains(config.data.dir, run_dir):
        raise DataError(f"data.dir {config.data.dir} is or contains the run directory {run_dir}; "
                        "choose another data.dir")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    found = None  # (the checkpoint a resume continues from, its files read)
    if resume and has_content(run_dir):  # what a resume reads before it changes anything
        if (run_dir / "checkpoints").exists() and not (run_dir / "checkpoints").is_dir():
            raise RunDirError(f"{run_dir / 'checkpoints'} is not a directory, so no checkpoint can be saved there; "
                              "move it away, or start a new --out")
        shapes = model_shapes(config)

        def usable(path: Path, state: dict) -> dict:  # what the start's restore checks before it loads anything
            loaded = read_checkpoint(path, state)
            split_global_batch(recorded_global_batch(state), world_size, t.batch_size)
            check_fits(path, loaded, shapes)
            return loaded

        try:
            with warnings.catch_warnings():  # the start's restore says which ones it skips
                warnings.simplefilter("ignore")
                found = newest_usable(run_dir / "checkpoints", usable)
        except CheckpointError as err:
            raise unusable(err) from None
        read_metrics(run_dir)
    windows = val_windows = None
    data_dir = check_data(config.data)  # None: `scalevec train` prepares it after this (the Trainer needs it)
    if data_dir is not None:
        windows, val_windows = TokenWindows(data_dir, "train", t.seq_len), TokenWindows(data_dir, "val", t.seq_len)
        if len(val_windows) == 0:
            raise DataError(f"{data_dir} has no validation window of {t.seq_len + 1} tokens; set data.val_fraction "
                            "> 0 or use more data")
        check_compatible(windows, config.data.tokenizer, config.model.vocab_size)
    branch = _branch(config)
    if windows is not None:  # built and dropped: the loader position and batch split the start would refuse
        loader = Loader(windows, t.batch_size, config.seed, 0, world_size)
        continued = found[1]["state"] if found else branch[1]["state"] if branch else None
        if continued is not None:
            loader.load_state_dict(continued["loader"])
            global_batch = recorded_global_batch(continued) if found else t.batch_size * t.grad_accum * world_size
            loader.batch_size = split_global_batch(global_batch, world_size, t.batch_size)[0]
    try:  # last, as the start takes the lock last; by rank 0 only, which takes it (the others may start later)
        if os.environ.get("RANK", "0") == "0":
            DirectoryLock.check_free(run_dir, "run directory")
    except OutputError as err:
        raise RunDirError(str(err)) from None
    return Plan(config, run_dir, resume, found[0] if found else None, device, world_size, data_dir, windows,
                val_windows, branch, _init_weights(config))

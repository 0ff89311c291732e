"""Where a run's metrics go besides `metrics.jsonl` (always written: the run's own record, which
resuming truncates to the checkpoint): TensorBoard, a CSV file and Weights & Biases, chosen in
`train.loggers`; and plain progress lines on stderr when it is not a terminal (a log file, a
cluster job), where a progress bar would print nothing until the end.

Every logger gets the same scalar records. The CSV file is rewritten from metrics.jsonl when a run
starts or resumes, and TensorBoard purges the steps after the last record kept, so neither holds steps
that resuming discarded. W&B continues its run (`resume="allow"`), which ignores steps it has already
seen: after a resume, the steps between the checkpoint and the interruption keep their first values there.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import sys
import time
from pathlib import Path

from ..config import Config, ConfigError, to_dict
from ..rundir import read_metrics

CSV_NAME = "metrics.csv"
EXTRAS = ("tensorboard", "wandb")  # loggers that need an optional package
CSV_COLUMNS = ("step", "tokens", "lr", "train_loss", "grad_norm", "tokens_per_s", "skipped", "val_loss", "val_bpb")


def _scalars(record: dict) -> dict[str, float]:
    return {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}


def check_loggers(names: list[str]) -> None:
    """Refuse, before the run directory is written, a logger whose package is not installed."""
    for name in names:
        if name in EXTRAS and importlib.util.find_spec(name) is None:
            raise ConfigError(f"train.loggers has {name}, which is not installed; pip install 'scalevec[{name}]'")


class TensorBoard:
    def __init__(self, run_dir: Path, config: Config, resume: bool):
        from torch.utils.tensorboard import SummaryWriter

        # a resume discards the event files' steps after the checkpoint, as it truncated metrics.jsonl
        kept = read_metrics(run_dir) if resume else []
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=kept[-1]["step"] + 1 if kept else None)

    def log(self, record: dict) -> None:
        for key, value in _scalars(record).items():
            self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self.writer.close()


class CSVFile:
    def __init__(self, run_dir: Path, config: Config, resume: bool):
        self.path = run_dir / CSV_NAME
        with self.path.open("w", newline="") as f:  # a projection of metrics.jsonl, which resuming truncated
            writer = csv.DictWriter(f, CSV_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(read_metrics(run_dir))

    def log(self, record: dict) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, CSV_COLUMNS, extrasaction="ignore").writerow(record)

    def close(self) -> None:
        pass


class WandB:
    """Offline by default (`train.wandb_mode`): runs sync later with `wandb sync RUN_DIR/wandb/...`."""

    def __init__(self, run_dir: Path, config: Config, resume: bool):
        import wandb

        t, where = config.train, str(run_dir.resolve())
        # one W&B run per run directory, so a resumed run continues its own history
        self.run = wandb.init(project=t.wandb_project, name=run_dir.resolve().name, dir=str(run_dir),
                              mode=t.wandb_mode, config=to_dict(config), resume="allow",
                              id=hashlib.sha256(where.encode()).hexdigest()[:16])

    def log(self, record: dict) -> None:
        self.run.log(_scalars(record), step=record["step"])

    def close(self) -> None:
        self.run.finish()


LOGGERS = {"tensorboard": TensorBoard, "csv": CSVFile, "wandb": WandB}  # the names of config.LoggerName


class ProgressLines:
    """One plain line per metrics record on stderr: step, loss, lr, tokens/s, MFU (on GPU), elapsed and ETA."""

    def __init__(self, total_steps: int, first_step: int):
        self.total, self.first, self.started = total_steps, first_step, time.perf_counter()

    def log(self, record: dict) -> None:
        if "train_loss" not in record:  # step 0: the initial evaluation only
            return
        elapsed = time.perf_counter() - self.started
        done = record["step"] - self.first
        eta = elapsed / done * (self.total - record["step"]) if done > 0 else float("nan")
        parts = [f"step {record['step']}/{self.total}", f"loss {record['train_loss']:.4f}", f"lr {record['lr']:.3g}",
                 f"{record['tokens_per_s']:,.0f} tok/s", f"elapsed {_duration(elapsed)}", f"eta {_duration(eta)}"]
        if "mfu" in record:  # CUDA, on a card of known peak
            parts.insert(-2, f"MFU {record['mfu']:.1%}")
        if "val_loss" in record:
            parts.insert(2, f"val_loss {record['val_loss']:.4f}")
        print(" | ".join(parts), file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def _duration(seconds: float) -> str:
    if seconds != seconds:  # nan: no step timed yet
        return "?"
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"

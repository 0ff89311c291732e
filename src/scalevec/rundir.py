"""Run directories: one run = one directory, one writer at a time.

    RUN_DIR/config.toml      the resolved config
    RUN_DIR/metrics.jsonl    one record per logged step, appended in whole lines
    RUN_DIR/checkpoints/     atomic checkpoints (checkpoint.py)
    RUN_DIR/.lock            advisory lock of the process writing the run (holds its pid)

`--overwrite` removes only the entries a run writes (RUN_ENTRIES); anything else in the directory
is left as it was.
"""

from __future__ import annotations

import json
from pathlib import Path

from .config import Config, load_config, to_dict, to_toml
from .errors import BadInput, RunStopped
from .outputs import (
    LOCK_NAME,
    DirectoryLock,
    OutputError,
    check_output_path,
    first_line,
    is_disk_full,
    remove_tree,
    write_text_atomic,
)

CONFIG_NAME = "config.toml"
METRICS_NAME = "metrics.jsonl"
# what training writes in a run directory; --overwrite removes these and nothing else (an import's `init/`,
# `tokenizer.json` and prepared `data/` stay: a new start from the import needs them)
RUN_ENTRIES = (CONFIG_NAME, METRICS_NAME, "metrics.csv", "checkpoints", "tensorboard", "wandb", "failed.txt")


# what a resumed run may set differently from its saved config: how this job stops, and the layout of its ranks
# (a checkpoint resumes on any world size and dist.mode)
RESUME_MAY_CHANGE = {"train": ("time_limit", "stop_signals"), "dist": ("mode",)}


class RunDirError(BadInput):
    """The run directory cannot be used as asked; one line naming the fix (exit 2)."""


class TrainError(RunStopped):
    """The run cannot go on (non-finite loss, failed write); one line, the last good checkpoint kept (exit 1)."""


def first_difference(a: dict, b: dict, path: str = "") -> str | None:
    """The first dotted key at which two nested dicts differ, or None."""
    for key in sorted(set(a) | set(b)):
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            found = first_difference(a[key], b[key], f"{path}{key}.")
            if found:
                return found
        elif a.get(key) != b.get(key):
            return f"{path}{key}"
    return None


def has_content(run_dir: Path) -> bool:
    """Whether the directory holds anything but what a run starting there writes first (its lock, its config.toml
    on the way in): another process's run in its first instant is no directory of the user's files."""
    temporaries = tuple(f".{name}.tmp-" for name in RUN_ENTRIES)
    return run_dir.is_dir() and any(p.name != LOCK_NAME and not p.name.startswith(temporaries)
                                    for p in run_dir.iterdir())


def check_run_dir(run_dir: Path, config: Config, resume: bool, overwrite: bool) -> None:
    """Everything about the run directory that can be refused before anything is written."""
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite contradict each other; pass one of them")
    try:
        check_output_path(run_dir, "--out")
    except OutputError as err:
        raise RunDirError(str(err)) from None
    if not has_content(run_dir):
        return
    if not any((run_dir / name).exists() for name in RUN_ENTRIES):  # only files of the user's
        raise RunDirError(f"--out {run_dir} is a non-empty directory that holds no scalevec run (no config.toml, "
                          "checkpoints or metrics.jsonl)" + (", so there is nothing to resume; choose another --out"
                          if resume else "; choose another --out, or pass --overwrite to start a run in it (its "
                          "files are kept)"))
    if resume:
        saved = run_dir / CONFIG_NAME
        if saved.is_file():
            old, new = to_dict(load_config(saved, resolved=True)), to_dict(config)
            if not started(run_dir):  # e.g. a fresh import: only the weights' shape is fixed yet
                old, new = ({k: d[k] for k in ("model", "strategy", "moe")} for d in (old, new))
            difference = first_difference(*map(_fixed_part, (old, new)))
            if difference:
                raise RunDirError(f"{difference} differs from the run's {saved}; resume with the same config "
                                  "(omit CONFIG to use the saved one) or start a new --out")
    elif not overwrite:
        raise RunDirError(f"run directory {run_dir} exists; pass --resume to continue it or --overwrite to replace it")


def _fixed_part(config: dict) -> dict:
    """A config as a dict without the keys a resume may change."""
    return {section: {k: v for k, v in values.items() if k not in RESUME_MAY_CHANGE.get(section, ())}
            if isinstance(values, dict) else values for section, values in config.items()}


def started(run_dir: Path) -> bool:
    """Whether a run has saved a checkpoint (before that, resuming may still change its training options)."""
    checkpoints = run_dir / "checkpoints"
    return checkpoints.is_dir() and any(p.name.startswith("step_") for p in checkpoints.iterdir())


class RunDir:
    """The open run directory: locked for this process, config written; `close()` releases it."""

    def __init__(self, run_dir: Path, config: Config, resume: bool, overwrite: bool):
        check_run_dir(run_dir, config, resume, overwrite)
        self.path, self.created = run_dir, not run_dir.exists()
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:  # a path no one can create (under /proc), which permission checks cannot tell as root
            if is_disk_full(err):
                raise
            raise RunDirError(f"--out {run_dir} cannot be created ({first_line(err)}); choose a path you can write "
                              "to") from None
        try:
            self.lock = DirectoryLock(run_dir, "run directory")
        except OutputError as err:
            raise RunDirError(str(err)) from None
        try:
            check_run_dir(run_dir, config, resume, overwrite)  # again, now that no other process can change it
            if overwrite:
                for name in RUN_ENTRIES:
                    entry = run_dir / name
                    remove_tree(entry) if entry.is_dir() else entry.unlink(missing_ok=True)
            if not (run_dir / CONFIG_NAME).is_file() or not started(run_dir):
                write_text_atomic(run_dir / CONFIG_NAME, to_toml(config))
        except BaseException:
            self.close(failed=True)
            raise

    def close(self, failed: bool = False) -> None:
        """Release the lock; a start that failed removes the directory it created (only if nothing else is there)."""
        self.lock.release()
        if failed and self.created:
            (self.path / CONFIG_NAME).unlink(missing_ok=True)
            if not any(self.path.iterdir()):
                self.path.rmdir()


def _records(path: Path) -> tuple[list[tuple[str, dict]], bool]:
    """(line, record) pairs of a metrics file and whether its last line was torn (a write cut short by a kill
    or a full disk: dropped); any other unparsable line is a RunDirError."""
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number < len(lines):
                raise RunDirError(f"{path}:{number} is not a JSON record; restore the file or start a new --out"
                                  ) from None
            return records, True
        step = record.get("step") if isinstance(record, dict) else None
        if not isinstance(step, int) or isinstance(step, bool):
            raise RunDirError(f"{path}:{number} is not a metrics record (an object with an integer step); restore "
                              "the file or start a new --out")
        records.append((line, record))
    return records, False


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of metrics.jsonl; a torn last line is ignored."""
    path = run_dir / METRICS_NAME
    return [row for _, row in _records(path)[0]] if path.exists() else []


def truncate_metrics(run_dir: Path, step: int, log=print) -> None:
    """Keep the records up to `step` (the checkpoint resumed from): later ones are written again. A torn last
    line is dropped, and said."""
    path = run_dir / METRICS_NAME
    if not path.exists():
        return
    records, torn = _records(path)
    if torn:
        log(f"dropped the torn last line of {path} (a write cut short)")
    write_text_atomic(path, "".join(line + "\n" for line, row in records if row["step"] <= step))


def final_eval(run_dir: Path, steps: int) -> dict | None:
    """The last record of a run that reached `steps` and wrote its final evaluation; None before that."""
    rows = read_metrics(run_dir)
    return rows[-1] if rows and rows[-1]["step"] == steps and "val_loss" in rows[-1] else None

"""Learning-rate schedules as a factor of the peak rate: linear warmup, then cosine, WSD or constant."""

from __future__ import annotations

import math
from pathlib import Path

from .config import ScheduleConfig
from .outputs import write_atomic


def lr_factor(schedule: ScheduleConfig, step: int, total_steps: int) -> float:
    """Factor at optimizer step `step` (0-based) of a run of `total_steps`."""
    if step < schedule.warmup_steps:
        return (step + 1) / schedule.warmup_steps
    floor = schedule.min_lr_ratio
    if schedule.name == "constant":
        return 1.0
    if schedule.name == "cosine":
        progress = min(1.0, (step - schedule.warmup_steps) / max(1, total_steps - schedule.warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    # a positive fraction decays at least one step, so a short run still ends at the floor
    decay_steps = max(1 if schedule.decay_fraction else 0, round(schedule.decay_fraction * total_steps))
    decay_start = schedule.decay_start or max(schedule.warmup_steps, total_steps - decay_steps)
    if step < decay_start:
        return 1.0
    # every decay step lowers the rate and the last one (step total_steps - 1) runs at the floor
    done = step - decay_start + (1 if schedule.floor_at_end else 0)
    progress = min(1.0, done / max(1, total_steps - decay_start))
    if schedule.decay_shape == "linear":
        return 1 - (1 - floor) * progress
    if schedule.decay_shape == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return 1 - (1 - floor) * math.sqrt(progress)


def plot_schedule(schedule: ScheduleConfig, total_steps: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted({*range(0, total_steps, max(1, total_steps // 4000)), total_steps})  # a long run: a sample
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(steps, [lr_factor(schedule, s, total_steps) for s in steps])
    ax.set(xlabel="step", ylabel="lr factor", title=f"{schedule.name} schedule", ylim=(0, 1.05))
    fig.tight_layout()
    write_atomic(Path(path), lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)

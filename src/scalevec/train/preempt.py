"""Stopping a run early on request: a signal (SIGTERM, SIGINT, SIGUSR1) or a wall-clock budget.

Schedulers preempt with SIGTERM (SLURM can send SIGUSR1 a set time before), and kill a while
later. A request is only noted here; the trainer finishes the optimizer step it is in, agrees
with the other ranks on that step (the flag rides on the step's one all-reduce), writes a
checkpoint there, closes its loggers and lock, and exits with EXIT_STOPPED, which a requeue script
tells from a failure (1) or bad input (2). The first signal puts the default action back, so a
second one ends the process at once.
"""

from __future__ import annotations

import signal
import threading
import time

from ..errors import RunStopped

EXIT_STOPPED = 75  # sysexits.h EX_TEMPFAIL: "a temporary failure; try again", here with --resume


class StoppedEarly(RunStopped):
    """The run stopped before train.steps on request, with a checkpoint at the step reached (exit 75)."""

    exit_code = EXIT_STOPPED


class StopRequests:
    """Notes stop requests while active (a context manager): `reason` is None until one came."""

    def __init__(self, signals: list[str], time_limit_s: float):
        self.signals = [getattr(signal, name) for name in signals]
        self.time_limit_s, self.start = time_limit_s, time.monotonic()
        self.reason: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to it only
            self._previous = {s: signal.signal(s, self._note) for s in self.signals}
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def _note(self, number: int, frame) -> None:
        self.reason = self.reason or signal.Signals(number).name
        for s in self.signals:  # a second signal: the default action, at once
            signal.signal(s, signal.SIG_DFL)

    def requested(self) -> bool:
        """Whether a stop was asked for (a signal, or the time limit reached)."""
        if self.reason is None and self.time_limit_s and time.monotonic() - self.start >= self.time_limit_s:
            self.reason = f"train.time_limit ({self.time_limit_s:.0f} s)"
        return self.reason is not None

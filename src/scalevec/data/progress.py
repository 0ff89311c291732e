"""Progress of a long data pass over all inputs: bytes done of the total, MB/s and ETA.

On a terminal a tqdm bar; otherwise (a log file, a cluster job) one plain line every `every` seconds.
"""

from __future__ import annotations

import sys
import time


def duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    """`update(n)` bytes; `show`: True a bar, False nothing, None a bar on a terminal and plain lines elsewhere."""

    def __init__(self, what: str, total: int, show: bool | None, log=print, every: float = 30.0):
        self.what, self.total, self.log, self.every = what, total, log, every
        self.done, self.started = 0, time.perf_counter()
        self.last = self.started
        self.bar = None
        if show or (show is None and sys.stderr.isatty()):
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, desc=what)
        self.lines = show is None and self.bar is None

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.lines and time.perf_counter() - self.last >= self.every:
            self.last = time.perf_counter()
            self.log(self.line())

    def rate(self) -> float:
        """Bytes per second so far."""
        return self.done / max(time.perf_counter() - self.started, 1e-9)

    def line(self) -> str:
        rate = self.rate()
        eta = duration((self.total - self.done) / rate) if rate > 0 else "?"
        return (f"{self.what}: {self.done / 1e9:.2f} of {self.total / 1e9:.2f} GB "
                f"({100 * self.done / max(self.total, 1):.0f}%), {rate / 1e6:.1f} MB/s, eta {eta}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

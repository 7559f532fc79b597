"""Progress of long encodes: a tqdm bar in a terminal, a periodic one-line message in a log file.

SLURM, nohup and CI logs are not terminals; there a bar would print nothing useful (or hundreds of
carriage-return fragments), so every ``LOG_EVERY_SECONDS`` one plain line says how far it got.
Nothing is shown for encodes that finish within a few seconds.
"""

from __future__ import annotations

import sys
import time

LOG_EVERY_SECONDS = 30.0
BAR_DELAY_SECONDS = 3.0


class _LogLines:
    def __init__(self, total: int, description: str, unit: str, every: float):
        self.total, self.description, self.unit, self.every = total, description, unit, every
        self.done, self.started = 0, time.monotonic()
        self.last = self.started
        self.printed = False

    def update(self, count: int) -> None:
        self.done += count
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last, self.printed = now, True
            elapsed = now - self.started
            left = elapsed * (self.total - self.done) / self.done if self.done else float("nan")
            print(f"{self.description}: {self.done:,}/{self.total:,} {self.unit}s ({100 * self.done / max(self.total, 1):.0f}%), "
                  f"{elapsed:.0f} s elapsed, about {left:.0f} s left", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.printed:
            print(f"{self.description}: {self.done:,} {self.unit}s in {time.monotonic() - self.started:.0f} s",
                  file=sys.stderr, flush=True)


class _Silent:
    def update(self, count: int) -> None:
        pass

    def close(self) -> None:
        pass


def progress(total: int, description: str, unit: str, enabled: bool = True, every: float = LOG_EVERY_SECONDS):
    """An object with ``update(n)`` and ``close()``: a bar on a terminal, log lines elsewhere."""
    if not enabled:
        return _Silent()
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=description, unit=unit, delay=BAR_DELAY_SECONDS, leave=False, file=sys.stderr)
    return _LogLines(total, description, unit, every)

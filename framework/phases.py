"""Where a job's and a sweep's seconds go, by phase: what ``benchmarks/sweep_wall.py`` adds up.

One clock per process, reset at the start of each job. The stages add to it as they run (the
encoder's time, pooling, fitting, metrics, the tracker's calls), and the job writes the totals into
its result file in the sweep folder, so a benchmark can sum them over jobs and set them against the
sweep's wall time. These are harness measurements, not metrics of the evaluation.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter

PHASES = ("registry", "sweep_start", "setup", "data", "finetune", "encode", "cache_read", "pool", "fit", "postprocess_fit", "metrics",
          "tracking", "summary")


class PhaseClock:
    def __init__(self) -> None:
        self.seconds: Counter = Counter()

    def reset(self) -> None:
        self.seconds = Counter()

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] += seconds

    @contextlib.contextmanager
    def measure(self, phase: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - started

    def totals(self) -> dict[str, float]:
        return {phase: float(seconds) for phase, seconds in self.seconds.items()}


CLOCK = PhaseClock()  # this process's current job
DRIVER = PhaseClock()  # the sweep's driver process, around its jobs (saved in the sweep file)

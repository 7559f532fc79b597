"""A third-party plugin for the tests, installed through a real entry point (see conftest).

It adds what a plugin author would: a tracker that appends every call to a JSON-lines file, a
metric (Kendall's tau), a dataset whose schema declares no split/limit, and a pooler that waits
while a gate file exists (so a test can interrupt a sweep in the middle of a job).
"""

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats

from framework.data import PairSet
from framework.errors import LayerprobeError
from framework.hookspecs import hookimpl


@dataclass
class RecorderOptions:
    path: str = "events.jsonl"
    fail_sweep: bool = False
    fail_end_of_job: int | None = None  # this job number's end cannot be recorded (as a lost server)


class Recorder:
    def __init__(self, options):
        self.path = Path(options.path)
        self.fail_sweep = options.fail_sweep
        self.fail_end_of_job = options.fail_end_of_job

    def _write(self, **event):
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(event) + "\n")

    def start_sweep(self, sweep):
        if self.fail_sweep:
            raise LayerprobeError("the recorder cannot record this sweep (fail_sweep=true)")
        self._write(event="start_sweep", sweep=sweep.id)
        return {"token": f"recorded-{sweep.id}"}

    def start_job(self, job):
        self._write(event="start_job", job=job.number, sweep=job.sweep.id if job.sweep else None,
                    token=(job.sweep.trackers.get("recorder") or {}).get("token") if job.sweep else None)

    def end_job(self, job, result, evaluation):
        if job.number == self.fail_end_of_job:
            raise ConnectionError("the recorder's server went away")
        result.run_ref = f"recorded-{job.number}"
        self._write(event="end_job", job=job.number, status=result.status, metrics=sorted(result.metrics),
                    spearman=result.metrics.get("spearman"), has_evaluation=evaluation is not None)

    def end_sweep(self, sweep, results, files, status):
        self._write(event="end_sweep", sweep=sweep.id, status=status, jobs=len(results), files=sorted(files),
                    summary=Path(files["summary.md"]).read_text())


def kendall(scores, labels):
    return float(stats.kendalltau(scores, labels).statistic)


@dataclass
class ToyOptions:
    size: int = 12


class ToyDataset:
    """Pairs made up on the spot: paraphrases repeat a sentence, non-paraphrases do not."""

    splits = ("train", "validation")

    def __init__(self, options):
        self.size = options.size

    def load(self, split, limit):
        words = ["the cat sat", "a dog barked", "stocks fell", "markets rose", "the dog slept", "rain fell today"]
        a, b, labels = [], [], []
        for i in range(self.size):
            first = words[i % len(words)]
            same = i % 2 == 0
            a.append(first)
            b.append(first + " again" if same else words[(i + 3) % len(words)])
            labels.append(1.0 if same else 0.0)
        n = min(limit or self.size, self.size)
        return PairSet("toy", split, [str(i) for i in range(n)], a[:n], b[:n], np.asarray(labels[:n]), n)


@dataclass
class GateOptions:
    gate: str = ""  # while this file exists, pooling waits (up to max_seconds; <gate>.reached says it does) ...
    free: bool = False  # ... unless free
    max_seconds: float = 120.0


class GatedPooler:
    def __init__(self, options):
        self.gate, self.free, self.max_seconds = options.gate, options.free, options.max_seconds

    def pool(self, batch):
        started = time.monotonic()
        if not self.free and self.gate and Path(self.gate).exists():
            Path(self.gate + ".reached").touch()  # a test waits for this, not for a guessed time
        while not self.free and self.gate and Path(self.gate).exists() and time.monotonic() - started < self.max_seconds:
            time.sleep(0.05)
        mask = batch.mask.unsqueeze(-1).to(batch.states.dtype)
        return (batch.states * mask).sum(1) / mask.sum(1).clamp_min(1)


@hookimpl
def register_trackers(register):
    register("recorder", Recorder, RecorderOptions)


@hookimpl
def register_metrics(register):
    register("kendall", kendall)


@hookimpl
def register_datasets(register):
    register("toy", ToyDataset, ToyOptions)


@hookimpl
def register_poolers(register):
    register("gated", GatedPooler, GateOptions)


@dataclass
class RecordingOptions:
    path: str = "fit.json"


class RecordingPostProcessor:
    """Centers, and writes how many vectors it was fit on (to check it never sees the evaluated split)."""

    def __init__(self, options):
        self.path = Path(options.path)
        self.mean = None

    def fit(self, train_vectors, seed):
        self.mean = train_vectors.mean(dim=0)
        self.path.write_text(json.dumps({"rows": int(train_vectors.shape[0])}))
        return {"mean": self.mean}

    def transform(self, vectors):
        return vectors - self.mean


@hookimpl
def register_postprocessors(register):
    register("recording", RecordingPostProcessor, RecordingOptions)

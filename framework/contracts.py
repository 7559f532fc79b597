"""The plain data the harness hands to trackers and reads back: a sweep, a job, a job's evaluation.

Nothing here orchestrates: ``framework.sweep`` and ``framework.job`` create these objects,
``framework.run`` fills an ``Evaluation``, trackers (``framework.stages.Tracker``) receive them.
A sweep's identity lives in a file of its folder (``SweepInfo.save``/``load``), so every worker
process of any launcher finds the same one.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from framework.data import Layer, MetricValue, PairScores, PairSet
from framework.errors import LayerprobeError
from framework.results import JobResult, write_atomic

SWEEP_FILE = "layerprobe-sweep.json"
STOP_FILE = "layerprobe-stop.json"  # written when every remaining job would fail the same way
UNRECORDED = "unrecorded"  # <output folder>/unrecorded/<config hash>.json: results a tracker failed to record


@dataclass
class SweepInfo:
    """A sweep's identity and its trackers' state, as every worker finds it in the sweep directory."""

    id: str
    dir: str
    overrides: list[str]
    created: float
    host: str
    pid: int
    process: str
    trackers: dict[str, dict[str, Any]] = field(default_factory=dict)
    status: str = "RUNNING"
    phases: dict[str, float] = field(default_factory=dict)  # the driver's own seconds (framework.phases)

    @property
    def file(self) -> Path:
        return Path(self.dir) / SWEEP_FILE

    @property
    def results_dir(self) -> Path:
        return Path(self.dir) / "results" / self.id

    def save(self) -> None:
        write_atomic(self.file, json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, folder: str | Path) -> "SweepInfo | None":
        path = Path(folder) / SWEEP_FILE
        try:
            return cls(**json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, TypeError) as error:
            raise LayerprobeError(f"{path}: not a layerprobe sweep file ({error}); remove it or use another hydra.sweep.dir") from None

    def results(self) -> list[JobResult]:
        """Every job result written so far, by job number."""
        found = []
        for path in sorted(self.results_dir.glob("*.json")):
            try:
                found.append(JobResult.from_json(path.read_text(encoding="utf-8")))
            except (json.JSONDecodeError, TypeError, KeyError) as error:
                print(f"layerprobe: warning: unreadable job result {path} ({error}); left out of the summary", file=sys.stderr)
        return sorted(found, key=lambda r: (r.job is None, r.job))

    def stop(self, error: str, job: int | None) -> None:
        """Tell every worker that the remaining jobs need not run (the first writer's reason stays)."""
        if not (Path(self.dir) / STOP_FILE).exists():
            write_atomic(Path(self.dir) / STOP_FILE, json.dumps({"error": error, "job": job}))

    def stopped(self) -> str | None:
        """Why the sweep was stopped, if it was."""
        try:
            return json.loads((Path(self.dir) / STOP_FILE).read_text(encoding="utf-8"))["error"]
        except (OSError, ValueError, KeyError):
            return None

    def claim(self, config_hash: str, job: int | None) -> dict | None:
        """Make ``job`` the one job of this sweep that computes ``config_hash``; returns the holder's
        claim (``job``, ``process``) when another job already holds it, or None when ``job`` got it.
        The claim is written whole under a temporary name and linked into place: creating the link
        is atomic and fails if the claim exists, so a reader never sees half a claim."""
        path = Path(self.dir) / "claims" / self.id / f"{config_hash}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
        temporary.write_text(json.dumps({"job": job, "process": process_identity()}), encoding="utf-8")
        try:
            os.link(temporary, path)
            return None
        except FileExistsError:
            return json.loads(path.read_text(encoding="utf-8"))
        finally:
            temporary.unlink(missing_ok=True)

    def write_result(self, result: JobResult) -> None:
        write_atomic(self.results_dir / f"{result.job if result.job is not None else uuid.uuid4().hex}.json", result.to_json())


@dataclass
class JobInfo:
    """One job as the trackers see it: its config, identity and place in a sweep (if any)."""

    name: str
    config: Any  # the job's resolved DictConfig
    settings: dict[str, Any]
    config_hash: str
    number: int | None = None
    sweep: SweepInfo | None = None
    output_dir: str | None = None  # Hydra's folder of this run or sweep: where unrecorded results are kept
    gpu: int | None = None  # the GPU this job's worker holds (framework.gpus); None: no GPU

    def keep_unrecorded(self, result: JobResult) -> Path | None:
        """A computed result the tracker failed to record, kept whole (scores included) on local disk,
        for ``resume=true`` to replay into the store once it is back."""
        if self.output_dir is None:
            return None
        path = Path(self.output_dir) / UNRECORDED / f"{result.config_hash}.json"
        try:
            write_atomic(path, result.to_json())
        except OSError as error:  # the same full disk: said, never a second traceback over the first
            print(f"layerprobe: warning: could not keep the unrecorded result in {path} ({error.strerror}); "
                  "rerun this job", file=sys.stderr, flush=True)
            return None
        return path

    def unrecorded_results(self) -> list[Path]:
        """Kept results of this job's config, in this output folder and its siblings (Hydra's
        ``<root>/<date>/<time>`` layout; a fixed-depth pattern, never a walk of the disk)."""
        if self.output_dir is None:
            return []
        root = Path(self.output_dir).parent.parent
        return sorted(root.glob(f"*/*/{UNRECORDED}/{self.config_hash}.json"))


def process_identity(pid: int | None = None) -> str:
    """``host:pid:start`` — with the process's start time, so a reused pid is not mistaken for it."""
    pid = pid or os.getpid()
    return f"{socket.gethostname()}:{pid}:{process_start_time(pid)}"


def process_start_time(pid: int) -> str:
    try:  # Linux: field 22 of /proc/<pid>/stat, in clock ticks since boot
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def process_is_alive(identity: str) -> bool | None:
    """Whether the process ``host:pid:start`` still runs; None when it ran on another host."""
    host, _, rest = identity.partition(":")
    pid_text, _, start = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return None
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return not start or process_start_time(pid) == start


@dataclass
class TuneReport:
    """What a finetuner reports about one training: the loss it used, its curve (``loss`` per
    optimizer step, ``heldout_<metric>`` per epoch), and notes (early stopping, pairs dropped)."""

    loss: str
    curve: dict[str, list[float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    train_pairs: int = 0  # the pairs it trained on (after the held-out part was set aside)


@dataclass
class Tuned:
    """The fine-tuning behind a job's encoder: where the weights are, how they were made, and
    whether this job trained them (``computed``) or found them stored (``cache``)."""

    fingerprint: str
    folder: str
    origin: str
    seconds: float  # the training's own time (restored from the store: what it took then)
    report: TuneReport
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class Evaluation:
    """Everything a job produced, for the tracker and the result line."""

    layer: Layer
    scores: PairScores
    metrics: list[MetricValue]
    encoder_counts: Counter
    timings: dict[str, float]
    calibration: PairSet | None = None
    training_curve: dict[str, list[float]] = field(default_factory=dict)
    learned: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    memory: dict[str, float] = field(default_factory=dict)
    mistakes: list[dict[str, Any]] = field(default_factory=list)
    states: str = "computed"  # where the evaluated split's token states came from
    fit: str = ""  # what was fit on the train split came from: computed | cache ("" when nothing is fit)
    tuned: Tuned | None = None  # the fine-tuned model the encoder evaluated (None: the model as published)

    @property
    def pairs(self) -> PairSet:
        return self.scores.pairs

    def metric(self, name: str) -> MetricValue | None:
        return next((m for m in self.metrics if m.name == name), None)

    def logged_metrics(self) -> dict[str, float]:
        """Every number of the job, flat: metrics with CIs and fitted extras, timings, counts, memory."""
        metrics: dict[str, float] = {}
        for value in self.metrics:  # first: MLflow's run page lists metrics in the order they were logged
            metrics[value.name] = value.value
            if value.ci_low is not None:
                metrics[f"{value.name}_ci_low"], metrics[f"{value.name}_ci_high"] = value.ci_low, value.ci_high
            metrics.update({f"{value.name}_{key}": extra for key, extra in value.extras.items()})
        metrics.update({"n_pairs": len(self.pairs), **self.timings, **self.memory})
        if self.layer.index is not None:  # a number, so MLflow's runs table sorts a sweep by layer (params sort as text)
            metrics["layer"] = self.layer.index
        metrics.update({f"encoder.{key}": count for key, count in self.encoder_counts.items()})
        return {key: float(value) for key, value in metrics.items()}

    def logged_params(self) -> dict[str, str]:
        """What the job found out about its input: row accounting, data source, resolved layer."""
        params = {f"data.{key}": value for key, value in self.pairs.counts().items()}
        params["data.source"] = self.pairs.source
        params["data.label_kind"] = self.pairs.label_kind
        params["data.revision"] = self.pairs.revision
        params["states"] = self.states
        if self.fit:
            params["fit"] = self.fit
        if self.tuned is not None:  # which weights: trained by this run (computed) or found stored (cache)
            report = self.tuned.report
            params.update({"tuned.fingerprint": self.tuned.fingerprint, "tuned.origin": self.tuned.origin,
                           "tuned.loss": report.loss, "tuned.train_pairs": report.train_pairs, "tuned.folder": self.tuned.folder})
        if self.calibration is not None:
            params["calibration.split"] = self.calibration.split
            params["calibration.pairs"] = len(self.calibration)
        return {key: str(value) for key, value in params.items()}



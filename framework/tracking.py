"""MLflow tracking: one run per job, a parent run per multirun with its summary.

The default store is SQLite (``sqlite:///mlruns/mlflow.db``): MLflow 3 puts its file store in
maintenance mode and recommends a database backend for local use. Artifacts go to
``mlruns/artifacts/<experiment>/`` beside it, so everything stays under ``tracking.dir``.
"""

from __future__ import annotations

import csv
import importlib.metadata
import os
import resource
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import mlflow
from hydra.experimental.callback import Callback
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from framework.errors import LayerprobeError
from framework.run import Evaluation

PARENT_RUN_ENV = "LAYERPROBE_PARENT_RUN_ID"
VERSIONED_PACKAGES = ("layerprobe", "torch", "transformers", "numpy", "scipy", "gensim", "datasets", "mlflow", "hydra-core")
REPOSITORY = Path(__file__).resolve().parent.parent


def tracking_uri(tracking: DictConfig) -> str:
    """The configured URI, or SQLite under ``tracking.dir`` (created if needed)."""
    if tracking.get("uri"):
        return str(tracking.uri)
    folder = Path(tracking.get("dir") or "mlruns").expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def use_experiment(tracking: DictConfig) -> str:
    """Point MLflow at the store and experiment of ``tracking``; returns the experiment id."""
    mlflow.set_tracking_uri(tracking_uri(tracking))
    name = str(tracking.get("experiment") or "layerprobe")
    try:
        found = mlflow.get_experiment_by_name(name)
        if found is None and not tracking.get("uri"):
            # MLflow would put artifacts under ./mlruns of whatever folder we run in; keep them beside the database.
            folder = Path(tracking.get("dir") or "mlruns").expanduser().resolve() / "artifacts" / name
            mlflow.create_experiment(name, artifact_location=folder.as_uri())
        return mlflow.set_experiment(name).experiment_id
    except mlflow.exceptions.MlflowException as error:
        raise LayerprobeError(f"MLflow store {mlflow.get_tracking_uri()}: {str(error).splitlines()[0]}") from None


@contextmanager
def job_run(cfg: DictConfig, run_name: str) -> Iterator[mlflow.ActiveRun]:
    """A run for one job, nested under the sweep's parent when there is one.

    If the job raises, the run ends FAILED with the error as its ``error`` tag; the exception
    goes on to the caller.
    """
    experiment_id = use_experiment(cfg.tracking)
    parent = os.environ.get(PARENT_RUN_ENV) or None
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, parent_run_id=parent) as run:
        reset_peak_memory()
        try:
            log_job_params(cfg)
            yield run
        except BaseException as error:
            mlflow.set_tag("error", f"{type(error).__name__}: {error}"[:4000])
            raise


def log_job_params(cfg: DictConfig) -> None:
    """What a job was asked to do and with which code: logged first, so failed runs carry it too."""
    params = flatten(OmegaConf.to_container(cfg, resolve=True))
    params.update({f"version.{name}": _version(name) for name in VERSIONED_PACKAGES})
    params.update(git_state())
    mlflow.log_params({key: _param_text(value) for key, value in params.items()})


def log_evaluation(cfg: DictConfig, evaluation: Evaluation) -> None:
    """Params, metrics and artifacts of a finished job, on the active run."""
    params = {f"data.{key}": value for key, value in evaluation.pairs.counts().items()}
    params["data.source"] = evaluation.pairs.source
    params["layer_index"] = evaluation.layer.label  # "-" for encoders without layers
    params["block_index"] = "-" if evaluation.layer.block is None else evaluation.layer.block
    if evaluation.calibration is not None:
        params["calibration.split"] = evaluation.calibration.split
        params["calibration.pairs"] = len(evaluation.calibration)
    mlflow.log_params({key: _param_text(value) for key, value in params.items()})

    metrics = {"n_pairs": len(evaluation.pairs), **evaluation.timings, **peak_memory()}
    for value in evaluation.metrics:
        metrics[value.name] = value.value
        if value.ci_low is not None:
            metrics[f"{value.name}_ci_low"], metrics[f"{value.name}_ci_high"] = value.ci_low, value.ci_high
        metrics.update({f"{value.name}_{key}": extra for key, extra in value.extras.items()})
    metrics.update({f"encoder.{key}": count for key, count in evaluation.encoder_counts.items()})
    mlflow.log_metrics(metrics)
    for name, curve in evaluation.training_curve.items():
        for step, point in enumerate(curve):
            mlflow.log_metric(f"train.{name}", point, step=step)
    if evaluation.notes:
        mlflow.set_tag("notes", " | ".join(evaluation.notes))

    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        write_scores_csv(evaluation, Path(folder, "scores.csv"))
        for name, tensor in evaluation.learned.items():
            import torch

            torch.save(tensor, Path(folder, f"{name}.pt"))
        mlflow.log_artifacts(folder)


def write_scores_csv(evaluation: Evaluation, path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "sentence_a", "sentence_b", "label", "score"])
        for pair_id, a, b, label, score in evaluation.scores.rows():
            writer.writerow([pair_id, a, b, int(label) if float(label).is_integer() else label, f"{score:.8f}"])


def flatten(tree, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if key == "hydra":
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _param_text(value) -> str:
    return "null" if value is None else str(value)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def git_state() -> dict[str, str]:
    """Commit of the layerprobe checkout that ran, and whether it had uncommitted changes."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(REPOSITORY), *args], capture_output=True, text=True, timeout=10)
        return done.stdout.strip() if done.returncode == 0 else ""

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no")) if commit else False
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", False
    return {"git_commit": commit or "unknown", "git_dirty": str(dirty)}


def reset_peak_memory() -> None:
    """Start a job's peak-memory window, so a multirun's jobs do not inherit each other's peaks.

    On Linux, writing 5 to /proc/self/clear_refs resets the process's peak RSS (VmHWM).
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # elsewhere the peak is the process's since start (ru_maxrss)
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> dict[str, float]:
    """Peak resident memory since ``reset_peak_memory``, and peak GPU memory allocated by torch."""
    peak = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peak["peak_rss_mb"] = int(line.split()[1]) / 1024
    except OSError:
        pass
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return peak


class SweepCallback(Callback):
    """Opens a parent MLflow run for a multirun, and writes the sweep summary when it ends."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        experiment_id = use_experiment(config.tracking)
        overrides = " ".join(config.hydra.overrides.task)
        run = MlflowClient().create_run(experiment_id, run_name=f"sweep: {overrides}"[:250],
                                        tags={"layerprobe.sweep": "true", "overrides": overrides})
        os.environ[PARENT_RUN_ENV] = run.info.run_id

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from framework.summary import log_sweep_summary

        parent = os.environ.pop(PARENT_RUN_ENV, None)
        if parent is None:
            return
        failed = log_sweep_summary(MlflowClient(), parent, config.get("summary"))
        MlflowClient().set_terminated(parent, "FINISHED")
        if failed:
            print(f"layerprobe: {failed} job(s) of this sweep failed; their runs are marked FAILED with the error", flush=True)
            raise SystemExit(1)

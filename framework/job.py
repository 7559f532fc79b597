"""One job, in whatever process a launcher runs it: evaluate, hand the outcome to the trackers.

The job finds its sweep in the sweep directory (``framework.sweep``), skips itself when
``resume=true`` and a finished run of the same config exists, and always leaves a result: in the
tracker (FINISHED, FAILED or KILLED) and as a JSON file in the sweep directory for the summary.
"""

from __future__ import annotations

import resource
import sys
import time
import traceback
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from framework.contracts import JobInfo
from framework.errors import LayerprobeError
from framework.phases import CLOCK
from framework.results import JobResult, PairScoreTable, config_hash, flatten, labels_of, run_title, setting_text, swept_keys
from framework.sweep import current_sweep


def run_job(cfg: DictConfig) -> None:
    """Evaluate, track, print the result line. In a multirun a failed job does not stop the sweep."""
    from hydra.core.hydra_config import HydraConfig

    from framework.plugins import registry
    from framework.run import plan, result_line, run_plan

    CLOCK.reset()
    sweep = current_sweep()
    multirun = sweep is not None or _is_multirun()
    number = HydraConfig.get().job.num if multirun else None
    settings = flatten(OmegaConf.to_container(cfg, resolve=True))
    job = JobInfo(run_name(cfg, settings, sweep), cfg, settings, config_hash(settings), number, sweep)
    plugins = registry()
    try:
        tracker = plugins.build("tracker", cfg.tracking)
    except LayerprobeError as error:
        return _fail_before_start(error, multirun)

    stopped = sweep.stopped() if sweep is not None else None
    if stopped is not None:  # another job found an error every job would hit: not run, no run recorded
        sweep.write_result(failed_result(job, "FAILED", f"not run: the sweep stopped ({stopped})"))
        return
    try:
        with CLOCK.measure("tracking"):
            if cfg.get("resume") and _reuse(tracker, job) is not None:
                return
            if not multirun:
                from framework.stages import StaleRecovery

                if isinstance(tracker, StaleRecovery):
                    tracker.recover_stale()
        choose_device(number)
        with CLOCK.measure("setup"):
            job_plan = plan(cfg, plugins)  # every option checked before a run exists: bad input leaves no FAILED run
        with CLOCK.measure("tracking"):
            try:
                tracker.start_job(job)
            except LayerprobeError:
                raise
            except Exception as error:
                if _store_gone(tracker, job, error):
                    return
                raise
        if job.sweep is not None:  # a placeholder until the job's end is written: a worker killed outright
            job.sweep.write_result(failed_result(job, "RUNNING", ""))  # still shows in the sweep's summary
    except LayerprobeError as error:
        if job.sweep is not None:
            job.sweep.write_result(failed_result(job, "FAILED", str(error)))
            if error.settings and not any(_swept(setting, job.sweep) for setting in error.settings):
                return stop_sweep(job, error)
        return _fail_before_start(error, multirun)

    try:
        evaluation = evaluate_tracked(tracker, job, lambda: run_plan(job_plan))
    except LayerprobeError as error:
        print(f"layerprobe: error: {error}", file=sys.stderr, flush=True)
        if not multirun:
            raise SystemExit(2)
        return
    except Exception as error:
        if not multirun:
            raise
        traceback.print_exc()
        print(f"layerprobe: job failed ({job.name}): {type(error).__name__}: {error}", file=sys.stderr, flush=True)
        return
    print(result_line(cfg, evaluation), flush=True)


def evaluate_tracked(tracker, job: JobInfo, evaluate_job):
    """``evaluate_job()`` with its peak memory measured and its outcome recorded, whatever it is.

    The tracker (and the sweep folder) get FINISHED with the results, FAILED with the error, or
    KILLED on SIGINT/SIGTERM; the exception, if any, goes on to the caller.
    """
    reset_peak_memory()
    evaluation, result = None, None
    try:
        evaluation = evaluate_job()
        evaluation.memory = peak_memory()
        result = result_of(job, evaluation)
        job.name = run_name(job.config, job.settings, job.sweep, evaluation.layer.label)  # with the resolved layer
        return evaluation
    except KeyboardInterrupt:
        result = failed_result(job, "KILLED", "interrupted (SIGINT/SIGTERM)")
        raise
    except BaseException as error:
        result = failed_result(job, "FAILED", str(error) if isinstance(error, LayerprobeError) else f"{type(error).__name__}: {error}")
        raise
    finally:
        _record(tracker, job, result, evaluation)


def _record(tracker, job: JobInfo, result: JobResult, evaluation) -> None:
    """End the job with the tracker, and write its result to the sweep folder.

    A tracker that fails to record the end (a server gone, a full disk) leaves no finished run to
    read back or resume from, so the sweep folder gets FAILED with why, not the computed result:
    the summary and the exit code then say what the tracker holds, and resume=true reruns it.
    """
    try:
        with CLOCK.measure("tracking"):
            tracker.end_job(job, result, evaluation)
    except Exception as error:
        if result.status == "FINISHED":
            if job.sweep is not None:
                job.sweep.keep_unrecorded(result)  # the computed result, with its per-pair scores
            result = failed_result(job, "FAILED", f"the tracker could not record this job's end ({type(error).__name__}: {error})")
        _write_result(job, result)
        _store_gone(tracker, job, error)
        raise
    _write_result(job, result)


def _write_result(job: JobInfo, result: JobResult) -> None:
    result.phases = CLOCK.totals()
    if job.sweep is not None:
        job.sweep.write_result(result)


def _store_gone(tracker, job: JobInfo, error: Exception) -> bool:
    """After a failed tracker call: if the store is out of reach (a server that stopped answering),
    every later job would fail the same way, so the sweep stops, in one line. Returns whether it did."""
    from framework.errors import SweepStopped
    from framework.stages import CheckedTracker
    from framework.sweep import is_driver

    reason = tracker.unavailable() if isinstance(tracker, CheckedTracker) else None
    if reason is None or job.sweep is None:
        return False
    message = f"the tracker stopped answering ({reason})"
    job.sweep.stop(message, job.number)
    kept = f"; computed results it did not record are kept in {job.sweep.unrecorded_dir}" if any(job.sweep.unrecorded_dir.glob("*.json")) else ""
    print(f"layerprobe: error: {message}: stopping the sweep{kept}", file=sys.stderr, flush=True)
    if is_driver(job.sweep):
        raise SweepStopped(message) from None
    return True


def _swept(setting: str, sweep) -> bool:
    """Whether the sweep varies ``setting`` (a key, or a group whose keys it varies)."""
    return any(key == setting or key.startswith(setting + ".") or setting.startswith(key + ".")
               for key in swept_keys(sweep.overrides))


def stop_sweep(job: JobInfo, error: LayerprobeError) -> None:
    """An error from settings the sweep does not vary recurs in every job: stop the sweep here.

    Other workers (joblib, submitit, Ray) find the stop file and run nothing; in the driver's own
    process (Hydra's basic launcher) ``SweepStopped`` ends the sweep at once.
    """
    from framework.errors import SweepStopped
    from framework.sweep import is_driver

    job.sweep.stop(str(error), job.number)
    print(f"layerprobe: error: {error} (every job of this sweep would fail the same way: stopping it)", file=sys.stderr, flush=True)
    if is_driver(job.sweep):
        raise SweepStopped(str(error))


def _reuse(tracker, job: JobInfo) -> JobResult | None:
    from framework.stages import ResumingTracker

    if not isinstance(tracker, ResumingTracker):
        raise LayerprobeError(f"resume=true: tracking={job.config.tracking.name} cannot find earlier runs; "
                              "use a tracker that can (tracking=mlflow)")
    previous = tracker.find_finished(job.config_hash)
    if previous is None:
        return None
    previous.job, previous.origin = job.number, "reused"
    if job.sweep is not None:
        job.sweep.write_result(previous)
    print(f"reused {previous.run_ref} (resume=true, same config): {job.name}", flush=True)
    return previous


def _fail_before_start(error: LayerprobeError, multirun: bool) -> None:
    print(f"layerprobe: error: {error}", file=sys.stderr, flush=True)
    if not multirun:
        raise SystemExit(2)


def _is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run_name(cfg: DictConfig, settings: dict, sweep, layer_label: str | None = None) -> str:
    """``rwkv:v6-Finch-1B6 L11 mean · mrpc/validation``, plus the swept settings not in it."""
    return run_title(labels_of(settings, layer_label), settings, swept_keys(sweep.overrides) if sweep else [])


def _texts(job: JobInfo) -> dict[str, str]:
    return {key: setting_text(value) for key, value in job.settings.items()}


def result_of(job: JobInfo, evaluation) -> JobResult:
    scores = evaluation.scores
    table = PairScoreTable([str(i) for i in scores.pairs.ids], [float(l) for l in scores.pairs.labels],
                           [float(s) for s in scores.scores])
    return JobResult("FINISHED", job.config_hash, _texts(job), labels_of(job.settings, evaluation.layer.label),
                     evaluation.logged_metrics(), [m.name for m in evaluation.metrics] or list(job.config.metric.names),
                     job.number, started=time.time(), notes=list(evaluation.notes), states=evaluation.states, scores=table)


def failed_result(job: JobInfo, status: str, error: str) -> JobResult:
    return JobResult(status, job.config_hash, _texts(job), labels_of(job.settings), {},
                     list(job.config.metric.get("names") or []), job.number, error=error[:4000], started=time.time())


def choose_device(number: int | None) -> None:
    """On a host with several GPUs, job n of a sweep uses GPU n mod count (encoders' device=auto).

    A launcher that gives each job its own GPU (Ray's ``num_gpus``, SLURM's ``gpus_per_task``) leaves
    one visible device per job, and this changes nothing.
    """
    import torch

    if number is None or not torch.cuda.is_available():
        return
    count = torch.cuda.device_count()
    if count > 1:
        torch.cuda.set_device(number % count)


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

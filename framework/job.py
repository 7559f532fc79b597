"""One job, in whatever process a launcher runs it: evaluate, hand the outcome to the trackers.

The job finds its sweep in the sweep directory (``framework.sweep``), skips itself when
``resume=true`` and a finished run of the same config exists, and always leaves a result: in the
tracker (FINISHED, FAILED or KILLED) and as a JSON file in the sweep directory for the summary.
"""

from __future__ import annotations

import os
import resource
import sys
import time
import traceback
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from framework.contracts import JobInfo
from framework.errors import LayerprobeError
from framework.phases import CLOCK
from framework.results import JobResult, PairScoreTable, config_hash, flatten, labels_of, run_title, setting_text, swept_keys
from framework.sweep import current_sweep


def run_job(cfg: DictConfig) -> None:
    """Evaluate, track, print the result line. In a multirun a failed job does not stop the sweep."""
    from hydra.core.hydra_config import HydraConfig

    from framework.plugins import registry
    from framework.run import result_line, run_plan

    from framework.__main__ import drop_keys_not_defined

    CLOCK.reset()
    plugins = registry()
    narrowed = drop_keys_not_defined(cfg, plugins)  # a swept option's key that this job's option lacks
    sweep = current_sweep()
    multirun = sweep is not None or _is_multirun()
    number = HydraConfig.get().job.num if multirun else None
    settings = flatten(OmegaConf.to_container(cfg, resolve=True))
    output_dir = sweep.dir if sweep is not None else str(HydraConfig.get().runtime.output_dir)
    job = JobInfo(run_name(cfg, settings, sweep), cfg, settings, config_hash(settings), number, sweep, output_dir)
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
        from framework.gpus import assign_gpu
        from framework.run import from_settings

        with from_settings("gpus"):
            job.gpu = assign_gpu(cfg.get("gpus"), sweep.dir if sweep is not None else None, number)
        with CLOCK.measure("setup"):
            job_plan = plan_in_sweep(job, plugins)  # every option checked before a run exists: bad input leaves no FAILED run
        if sweep is not None and (narrowed or job.config is not cfg):  # a config that several jobs of the sweep
            holder = job.sweep.claim(job.config_hash, job.number)          # may share (no layers, no such option): one runs it
            if holder is not None:
                return _same_config_as(job, holder)
            cfg = job.config
        with CLOCK.measure("tracking"):
            try:
                tracker.start_job(job)
            except LayerprobeError:
                raise
            except Exception as error:
                reason = _out_of_service(tracker, error)
                if reason is None:
                    raise
                _stop_for_tracker(job, reason)
                raise LayerprobeError(f"the tracker could not start this job's run: {reason}") from None
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


def plan_in_sweep(job: JobInfo, plugins):
    """``plan`` of the job's config; in a sweep over ``layer``, an encoder without layers (a GloVe
    baseline beside RWKV's layers) is planned at its only "layer" (null) instead of failing, and the
    job's config and identity say so (``job.config`` is then a new object)."""
    from framework.run import plan

    swept = job.sweep is not None and job.config.get("layer") is not None and _swept("layer", job.sweep)
    try:
        planned = plan(job.config, plugins)
    except LayerprobeError as error:
        if not (swept and error.settings == ("encoder", "layer")):
            raise
        planned = plan(_at_layer_null(job.config), plugins)
        if planned.layer.index is not None:  # the encoder has layers: the requested one is out of its range
            raise error from None
    if swept and planned.layer.index is None:
        job.config = _at_layer_null(job.config)
        job.settings = flatten(OmegaConf.to_container(job.config, resolve=True))
        job.config_hash = config_hash(job.settings)
        job.name = run_name(job.config, job.settings, job.sweep)
    return planned


def _at_layer_null(cfg: DictConfig) -> DictConfig:
    baseline = cfg.copy()
    with open_dict(baseline):
        baseline.layer = None
    return baseline


def _same_config_as(job: JobInfo, holder: dict) -> None:
    """A later job of a sweep with the config of the job that claimed it (a baseline swept over
    layers, an option swept that its pooler or encoder lacks): not run again; its result in the
    sweep folder says whose it is once that job has ended (or that its process died first)."""
    from framework.contracts import process_is_alive

    number, found = holder["job"], None
    while job.sweep.stopped() is None:
        found = next((r for r in job.sweep.results() if r.job == number and r.status != "RUNNING"), None)
        if found is not None or process_is_alive(holder["process"]) is False:
            break
        time.sleep(0.5)
    result = failed_result(job, "KILLED", f"job {number}, which ran this config, ended without a result")
    result.origin = f"same config as job {number}"
    if found is not None:
        result.status, result.metrics, result.label, result.run_ref, result.error = (
            found.status, found.metrics, found.label, found.run_ref, found.error)
    job.sweep.write_result(result)
    print(f"same config as job {number} (what the sweep varies here does not apply to it): {job.name}", flush=True)


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
    read back, so the sweep folder gets FAILED with why; the computed result is kept whole on local
    disk, and ``resume=true`` replays it into the store once the store takes writes again. A store
    out of service (gone, full, read-only) fails every later job the same way: the sweep stops.
    """
    try:
        with CLOCK.measure("tracking"):
            tracker.end_job(job, result, evaluation)
    except Exception as error:
        kept = job.keep_unrecorded(result) if result.status == "FINISHED" else None
        reason = _out_of_service(tracker, error)
        why = reason or f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:300]}"
        if result.status == "FINISHED":
            result = failed_result(job, "FAILED", f"the tracker could not record this job's end ({why})"
                                   + (f"; its result is kept in {kept}" if kept else ""))
        _write_result(job, result)
        if reason is None:
            raise
        _stop_for_tracker(job, reason, kept)
        raise LayerprobeError(f"the tracker could not record this job's end: {reason}"
                              + (f"; the computed result is kept in {kept}: rerun with resume=true once the store takes "
                                 "writes again to record it" if kept else "")) from None
    _write_result(job, result)


def _write_result(job: JobInfo, result: JobResult) -> None:
    result.phases = CLOCK.totals()
    if job.sweep is not None:
        job.sweep.write_result(result)


def _out_of_service(tracker, error: Exception) -> str | None:
    """Why a failed tracker call will fail for every later job too — a full or read-only disk under
    the store, or a tracking server that stopped answering — or None for an error of this job alone."""
    from framework.errors import storage_failure
    from framework.stages import CheckedTracker

    failure = storage_failure(error)
    if failure is not None:
        where = f"{tracker.location()}: " if isinstance(tracker, CheckedTracker) and "(writing " not in failure else ""
        return f"{where}{failure}; free space there or set tracking.dir/tracking.uri elsewhere"
    reason = tracker.unavailable() if isinstance(tracker, CheckedTracker) else None
    return f"the tracker stopped answering ({reason})" if reason else None


def _stop_for_tracker(job: JobInfo, reason: str, kept: Path | None = None) -> None:
    """Stop the sweep (if any) in one line: other workers find the stop file, the driver's own
    process (Hydra's basic launcher) ends the sweep at once."""
    from framework.errors import SweepStopped
    from framework.sweep import is_driver

    if job.sweep is None:
        return
    job.sweep.stop(reason, job.number)
    where = f"; computed results it did not record are kept in {kept.parent}" if kept else ""
    print(f"layerprobe: error: {reason}: stopping the sweep{where}", file=sys.stderr, flush=True)
    if is_driver(job.sweep):
        raise SweepStopped(reason) from None


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
    """The finished run of this config, or a result computed earlier that the tracker failed to
    record (kept on local disk), replayed into the store now; None when neither exists."""
    from framework.stages import ReplayingTracker, ResumingTracker

    if not isinstance(tracker, ResumingTracker):
        raise LayerprobeError(f"resume=true: tracking={job.config.tracking.name} cannot find earlier runs; "
                              "use a tracker that can (tracking=mlflow)")
    previous = tracker.find_finished(job.config_hash)
    if previous is None and isinstance(tracker, ReplayingTracker):
        previous = _replay(tracker, job)
        if previous is not None:
            return previous
    if previous is None:
        return None
    previous.job, previous.origin = job.number, "reused"
    if job.sweep is not None:
        job.sweep.write_result(previous)
    print(f"reused {previous.run_ref} (resume=true, same config): {job.name}", flush=True)
    return previous


def _replay(tracker, job: JobInfo) -> JobResult | None:
    """Record a kept result of this config into the store, once: the file is claimed by a rename
    (concurrent sweeps replay it at most once) and marked ``.replayed`` after."""
    for path in job.unrecorded_results():
        claimed = path.with_name(f"{path.name}.replaying-{os.getpid()}")
        try:
            os.rename(path, claimed)
        except OSError:  # another process claimed it first
            continue
        try:
            result = JobResult.from_json(claimed.read_text(encoding="utf-8"))
        except (OSError, ValueError, TypeError, KeyError) as error:
            print(f"layerprobe: warning: kept result {path} is unreadable ({error}); not replayed", file=sys.stderr, flush=True)
            os.rename(claimed, path.with_name(path.name + ".unreadable"))
            continue
        if result.config_hash != job.config_hash or not result.finished or result.scores is None:
            os.rename(claimed, path)
            continue
        job.name = run_name(job.config, job.settings, job.sweep, result.label.get("layer"))
        result.job, result.origin, result.error = job.number, "replayed", ""
        try:
            tracker.record(job, result, str(path))
        except BaseException:
            os.rename(claimed, path)  # still kept: a later resume tries again
            raise
        os.rename(claimed, path.with_name(path.name + ".replayed"))
        if job.sweep is not None:
            job.sweep.write_result(result)
        print(f"replayed {path} into the store as run {result.run_ref} (resume=true): {job.name}", flush=True)
        return result
    return None


def _fail_before_start(error: LayerprobeError, multirun: bool) -> None:
    print(f"layerprobe: error: {error}", file=sys.stderr, flush=True)
    if not multirun:
        raise SystemExit(2)


def _is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run_name(cfg: DictConfig, settings: dict, sweep, layer_label: str | None = None) -> str:
    """``rwkv:v6-Finch-1B6 L11 mean · mrpc/validation``, plus the swept settings not in it; in a
    sweep ``minilm L6 mean · stsb/val``: the encoder as the command line chose it (encoder=minilm)."""
    choice = None
    if sweep is not None:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            choice = HydraConfig.get().runtime.choices.get("encoder")
    return run_title(labels_of(settings, layer_label), settings, swept_keys(sweep.overrides) if sweep else [], sweep is not None,
                     choice)


def _texts(job: JobInfo) -> dict[str, str]:
    return {key: setting_text(value) for key, value in job.settings.items()}


def result_of(job: JobInfo, evaluation) -> JobResult:
    scores = evaluation.scores
    table = PairScoreTable([str(i) for i in scores.pairs.ids], [float(l) for l in scores.pairs.labels],
                           [float(s) for s in scores.scores])
    return JobResult("FINISHED", job.config_hash, _texts(job), labels_of(job.settings, evaluation.layer.label),
                     evaluation.logged_metrics(), [m.name for m in evaluation.metrics] or list(job.config.metric.names),
                     job.number, started=time.time(), notes=list(evaluation.notes), states=evaluation.states, scores=table,
                     data_revision=evaluation.pairs.revision)


def failed_result(job: JobInfo, status: str, error: str) -> JobResult:
    return JobResult(status, job.config_hash, _texts(job), labels_of(job.settings), {},
                     list(job.config.metric.get("names") or []), job.number, error=error[:4000], started=time.time())


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

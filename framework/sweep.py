"""What a sweep does around its jobs, whatever Hydra launcher runs them.

The driver (the process that runs ``python -m framework -m …``) starts the sweep before any job:
it asks each tracker to record the sweep and writes the sweep's identity and the trackers' state
(e.g. the MLflow parent run id) to ``<hydra.sweep.dir>/layerprobe-sweep.json``. Every job, in
whatever process or machine the launcher puts it (basic, joblib, submitit, Ray), reads that file;
nothing travels in environment variables or in the driver's memory. Each job writes its result to
``<sweep dir>/results/<sweep id>/<job number>.json``; the driver reads them back to write the
summary when the sweep ends, or when it is interrupted (SIGINT/SIGTERM).
"""

from __future__ import annotations

import os
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

# The sweep's and the job's data live in framework.contracts; re-exported for existing imports.
from framework.contracts import SWEEP_FILE, JobInfo, SweepInfo, process_identity, process_is_alive, process_start_time  # noqa: F401
from framework.errors import LayerprobeError
from framework.phases import DRIVER
from framework.results import JobResult

EXIT_INTERRUPTED = 130
EXIT_USAGE = 2


# --- the driver's side ---------------------------------------------------------------------------

_ACTIVE: dict[str, Any] = {}  # the sweep this driver process started and has not finished


def sweep_dir_of(config: DictConfig) -> Path:
    return Path(str(config.hydra.sweep.dir)).expanduser().resolve()


def start_sweep(config: DictConfig) -> SweepInfo:
    """Record the sweep with every tracker and write the sweep file; before any job runs."""
    with DRIVER.measure("sweep_start"):
        sweep = _start_sweep(config)
    sweep.phases = DRIVER.totals()
    sweep.save()
    return sweep


def _start_sweep(config: DictConfig) -> SweepInfo:
    from framework.plugins import registry

    folder = sweep_dir_of(config)
    previous = SweepInfo.load(folder)
    if previous is not None and previous.status == "RUNNING" and process_is_alive(previous.process):
        raise LayerprobeError(f"another sweep (process {previous.process}) is running in {folder}; "
                              "give this one its own hydra.sweep.dir")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise LayerprobeError(f"cannot create the sweep folder {folder} ({error.strerror}); set hydra.sweep.dir or tracking.dir "
                              "to a writable folder") from None
    sweep = SweepInfo(id=uuid.uuid4().hex[:12], dir=str(folder), overrides=list(config.hydra.overrides.task),
                      created=time.time(), host=socket.gethostname(), pid=os.getpid(), process=process_identity())
    tracker = registry().build("tracker", config.tracking)
    from framework.stages import StaleRecovery

    if isinstance(tracker, StaleRecovery):
        stale = tracker.recover_stale()
        if stale:
            print(f"layerprobe: {stale} run(s) left RUNNING by killed processes are now marked KILLED", file=sys.stderr)
    sweep.trackers[str(config.tracking.name)] = tracker.start_sweep(sweep) or {}
    sweep.save()
    _ACTIVE.update(sweep=sweep, config=config, tracker=tracker)
    return sweep


def finish_sweep(status: str | None = None) -> int:
    """Summarise the active sweep from its job results and end it with every tracker.

    ``status`` None: FINISHED, or FAILED if a job did not finish. Returns the exit code: 0,
    1 (jobs failed) or 130 (interrupted).
    """
    from framework.summary import print_summary, write_summary_files

    if not _ACTIVE:
        return 0
    sweep, config, tracker = _ACTIVE["sweep"], _ACTIVE["config"], _ACTIVE["tracker"]
    _ACTIVE.clear()
    summary_started = time.perf_counter()
    results = settled(sweep.results())
    failed = sum(not r.finished for r in results)
    status = status or ("FAILED" if failed else "FINISHED")
    folder = Path(sweep.dir) / "summary"  # kept beside the jobs' results, also when the tracker is gone
    folder.mkdir(parents=True, exist_ok=True)
    files = write_summary_files(results, folder, OmegaConf.to_container(config.get("summary") or {}, resolve=True))
    print_summary(results, files, sweep, status)
    try:
        tracker.end_sweep(sweep, results, files, status)
    except Exception as error:
        print(f"layerprobe: error: the tracker could not record the sweep's end ({type(error).__name__}: "
              f"{(str(error).splitlines() or [''])[0][:200]}); its summary is in {folder}", file=sys.stderr, flush=True)
        sweep.stop(f"the tracker could not record the sweep's end: {error}", None)
    sweep.status = status
    DRIVER.add("summary", time.perf_counter() - summary_started)
    sweep.phases = DRIVER.totals()
    sweep.save()
    if sweep.stopped() is not None:
        return EXIT_USAGE  # the job that stopped it said why, in one line
    if status == "KILLED":
        print(f"layerprobe: sweep interrupted; {sum(r.finished for r in results)} job(s) finished, "
              f"the rest did not run (resume=true reruns only those)", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    if failed:
        print(f"layerprobe: {failed} job(s) of this sweep did not finish; their runs carry the error", file=sys.stderr, flush=True)
        return 1
    return 0


def is_driver(sweep: SweepInfo) -> bool:
    """Whether this process started ``sweep`` (Hydra's basic launcher runs the jobs in it)."""
    active = _ACTIVE.get("sweep")
    return active is not None and active.id == sweep.id


def settled(results: list[JobResult]) -> list[JobResult]:
    """At the sweep's end, a job still RUNNING in the sweep folder was killed before it could write
    its end (a launcher's worker terminated on Ctrl-C, a lost node): it counts as KILLED, as the
    tracker then records its run, never as missing."""
    for result in results:
        if result.status == "RUNNING":
            result.status, result.error = "KILLED", "the sweep ended while this job was still running (interrupted or killed)"
    return results


def interrupted() -> int:
    """After SIGINT/SIGTERM in the driver: end the active sweep (if any) as KILLED."""
    try:
        return finish_sweep("KILLED")
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


class SweepCallback(Callback):
    """Hydra's hooks into a multirun, in the driver: start the sweep, and finish it."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        # Hydra turns a callback's exception into a warning and runs the jobs anyway: a sweep whose
        # parent cannot be recorded must not start, so this exits instead.
        try:
            start_sweep(config)
        except LayerprobeError as error:
            print(f"layerprobe: error: {error}", file=sys.stderr, flush=True)
            raise SystemExit(2)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        code = finish_sweep()
        if code:
            raise SystemExit(code)


def current_sweep() -> SweepInfo | None:
    """In a job of a multirun: the sweep it belongs to, read from the sweep directory."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not (HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN):
        return None
    folder = Path(str(HydraConfig.get().sweep.dir)).expanduser().resolve()
    found = SweepInfo.load(folder)
    if found is None:
        # A worker that does not share the driver's filesystem: trackers find the sweep by its
        # folder's name (the driver recorded it); its result file stays on this machine.
        print(f"layerprobe: warning: no {SWEEP_FILE} in {folder} on this machine; put hydra.sweep.dir on a filesystem "
              "every worker shares, or the sweep summary will lack this job", file=sys.stderr, flush=True)
        found = SweepInfo(id="", dir=str(folder), overrides=[], created=0.0, host="", pid=0, process="")
    return found

"""The MLflow tracker: job runs, the sweep's parent run and its summary, and reading runs back.

Everything goes through ``MlflowClient`` with explicit run ids (no process-global "active run"),
so jobs in any process nest under the parent whose id the sweep file holds.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.metadata
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from framework.results import JobResult, PairScoreTable, config_hash, setting_text
from framework.contracts import JobInfo, SweepInfo, process_identity, process_is_alive
from framework.errors import LayerprobeError
from plugins.mlflow.store import MLflowOptions, check_server, local_folder, store_for, tracking_uri

NAME = "mlflow"
VERSIONED_PACKAGES = ("layerprobe", "torch", "transformers", "numpy", "scipy", "gensim", "datasets", "mlflow", "hydra-core")
REPOSITORY = Path(__file__).resolve().parent.parent.parent
# Params a job logs about its input and code, not about its config (left out when reading settings back).
RESULT_PARAM_PREFIXES = ("version.", "git_", "data.", "calibration.", "tuned.")
RESULT_PARAM_KEYS = {"layer_index", "block_index", "states", "model", "pooler", "dataset", "split", "postprocess", "finetune", "fit"}
TAG_SWEEP, TAG_SWEEP_ID, TAG_HASH, TAG_JOB = "layerprobe.sweep", "layerprobe.sweep_id", "layerprobe.config_hash", "layerprobe.job"
TAG_PROCESS, TAG_METRICS, PARENT = "layerprobe.process", "layerprobe.metrics", "mlflow.parentRunId"
# The layer a job resolved to ("-" without layers) and the model block it reads: tags, so the runs
# table has one layer param (the config's) beside the numeric ``layer`` metric it sorts by.
TAG_LAYER, TAG_BLOCK = "layerprobe.layer", "layerprobe.block"
VIEW_KEY = "layerprobe"  # the saved runs-table view: …/runs?viewStateShareKey=layerprobe


class MLflowTracker:
    def __init__(self, options: MLflowOptions):
        check_experiment_name(options.experiment)
        self.options = options
        self._runs: dict[int, str] = {}
        self._monitors: dict[int, object] = {}

    @property
    def client(self):
        return store_for(self.options)[0]

    @property
    def experiment_id(self) -> str:
        return store_for(self.options)[1]

    # --- sweeps ---------------------------------------------------------------------------------

    def start_sweep(self, sweep: SweepInfo) -> dict[str, Any]:
        overrides = " ".join(sweep.overrides)
        from framework.results import NON_IDENTITY_KEYS, NON_IDENTITY_PREFIXES

        named = " ".join(o.lstrip("+") for o in sweep.overrides  # where results go is not what the sweep is
                         if not o.lstrip("+~").startswith(NON_IDENTITY_PREFIXES) and o.lstrip("+~").split("=")[0] not in NON_IDENTITY_KEYS)
        run = self.client.create_run(self.experiment_id, run_name=f"sweep: {named}"[:250], tags={
            TAG_SWEEP: "true", TAG_SWEEP_ID: sweep.id, "layerprobe.sweep_dir": sweep.dir, "overrides": overrides[:5000],
            TAG_PROCESS: sweep.process})
        return {"parent_run_id": run.info.run_id, "experiment_id": self.experiment_id}

    def end_sweep(self, sweep: SweepInfo, results: list[JobResult], files: dict[str, Path], status: str) -> None:
        parent = self._parent(sweep)
        if parent is None:
            return
        client = self.client
        try:
            self._end_sweep_records(parent, results, files)
        except Exception as error:  # a full disk, say: the parent still ends, with why, when the store takes that much
            from framework.errors import storage_failure

            if storage_failure(error) is not None:
                with contextlib.suppress(Exception):
                    client.set_tag(parent, "error", f"the sweep's summary could not be recorded: {storage_failure(error)}")
                    client.set_terminated(parent, "FAILED")
            raise
        client.set_terminated(parent, status)
        uri = tracking_uri(self.options)
        ui = uri if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
        start = "" if uri.startswith(("http://", "https://")) else f"mlflow ui --backend-store-uri {uri}, then open "
        print(f"MLflow: {start}{self.view_url(ui.rstrip('/'))} (this sweep is run {parent})", flush=True)

    def _end_sweep_records(self, parent: str, results: list[JobResult], files: dict[str, Path]) -> None:
        client = self.client
        for path in files.values():
            client.log_artifact(parent, str(path))
        failed = {str(r.job): r for r in results if r.status == "FAILED" and r.job is not None}
        for run in self._search(f"tags.`{PARENT}` = '{parent}' and attributes.status = 'RUNNING'"):
            # A job whose end could not be recorded (its result says why), else one interrupted or killed.
            result = failed.get(run.data.tags.get(TAG_JOB, ""))
            error = result.error if result else "the sweep ended while this job was still running (interrupted or killed)"
            client.set_tag(run.info.run_id, "error", error[:4000])
            client.set_terminated(run.info.run_id, "FAILED" if result else "KILLED")
        self._save_view(parent)
        self._log_answer(parent, results, files)
        for key, value in {"jobs": len(results), "failed_jobs": sum(r.status == "FAILED" for r in results),
                           "killed_jobs": sum(r.status == "KILLED" for r in results),
                           "reused_jobs": sum(r.origin == "reused" for r in results),
                           "same_config_jobs": sum(r.origin.startswith("same config") for r in results)}.items():
            client.set_tag(parent, key, str(value))

    def _log_answer(self, parent: str, results: list[JobResult], files: dict[str, Path]) -> None:
        """What the sweep found, on its parent run: per dataset/split the best config by the headline
        metric (``best.spearman.mrpc_validation`` with its CI, the winner's encoder, layer, pooler and
        post-process as tags), the settings every job shared as params, and the summary as a table
        MLflow shows (``summary_table.json``, from ``summary.csv``)."""
        from framework.results import identity
        from framework.summary import is_same_config

        results = [r for r in results if not is_same_config(r)]
        finished = [r for r in results if r.finished]
        client = self.client
        metric = "spearman" if any("spearman" in r.metrics for r in finished) else next(
            (name for r in finished for name in r.metric_names if name in r.metrics), None)
        if metric is not None:
            from mlflow.entities import Metric

            now, items, tags = int(time.time() * 1000), [], {}
            for dataset, split in sorted({(r.label["dataset"], r.label["split"]) for r in finished}):
                group = [r for r in finished if (r.label["dataset"], r.label["split"]) == (dataset, split)
                         and r.metrics.get(metric) == r.metrics.get(metric)]  # NaN (undefined) never wins
                if not group:
                    continue
                best = max(group, key=lambda r: r.metrics[metric])
                key = f"best.{metric}.{_metric_key(dataset)}_{_metric_key(split)}"
                items += [Metric(key + suffix, float(best.metrics[name]), now, 0)
                          for suffix, name in (("", metric), (".ci_low", f"{metric}_ci_low"), (".ci_high", f"{metric}_ci_high"))
                          if name in best.metrics]
                tags.update({f"{key}.{part}": best.label[part] for part in ("encoder", "layer", "pooler", "postprocess")})
                tags[f"{key}.run"] = best.run_ref
            for start in range(0, len(items), 1000):
                client.log_batch(parent, metrics=items[start:start + 1000])
            for name, value in tags.items():
                client.set_tag(parent, name, str(value)[:5000])
        identities = [identity(r.settings) for r in results]
        if identities:
            shared = {key: value for key, value in identities[0].items() if all(i.get(key) == value for i in identities[1:])}
            self._log_params(parent, shared)
        table = files.get("summary.csv")
        if table is not None:  # the same numbers as summary.csv, read back (its paired Δ is computed once)
            with open(table, newline="", encoding="utf-8") as handle:
                rows = list(csv.DictReader(handle))
            if rows:
                client.log_table(parent, data={column: [_number_or_text(row[column]) for row in rows] for column in rows[0]},
                                 artifact_file="summary_table.json")

    def _save_view(self, parent: str) -> None:
        """A saved view of the runs table with the columns a researcher reads (MLflow's default table
        shows no params or metrics; which ones is per-browser state): the headline metric and its CI
        first, ordered by layer. MLflow does not
        share which sweeps are expanded: one click on the sweep's run opens its jobs.

        MLflow's UI loads it from the experiment tag ``mlflow.sharedViewState.<key>`` when its URL
        has ``?viewStateShareKey=<key>``; ``view_url`` gives that URL.
        """
        import json

        view = {"selectedColumns": ["metrics.`spearman`", "metrics.`spearman_ci_low`", "metrics.`spearman_ci_high`",
                                    "metrics.`layer`"]  # the resolved layer (the config's may be -1), as a number
                + [f"params.`{key}`" for key in ("model", "pooler", "postprocess", "dataset", "split", "states")]
                + ["attributes.`Dataset`"],
                "orderByKey": "metrics.`layer`", "orderByAsc": True}  # a sweep reads like the paper's table: by layer
        self.client.set_experiment_tag(self.experiment_id, f"mlflow.sharedViewState.{VIEW_KEY}", json.dumps(view))

    def unavailable(self) -> str | None:
        """Why the store cannot be reached now (a tracking server that stopped answering), or None."""
        uri = self.options.uri
        if not uri or not str(uri).startswith(("http://", "https://")):
            return None
        try:
            check_server(str(uri), timeout=5)
        except LayerprobeError as error:
            return str(error)
        return None

    def location(self) -> str:
        uri = tracking_uri(self.options)
        return uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else uri

    def view_url(self, ui: str = "http://127.0.0.1:5000") -> str:
        return f"{ui}/#/experiments/{self.experiment_id}/runs?viewStateShareKey={VIEW_KEY}&workflowType=machine_learning"

    def _parent(self, sweep: SweepInfo | None) -> str | None:
        if sweep is None:
            return None
        state = sweep.trackers.get(NAME) or {}
        if state.get("parent_run_id"):
            return state["parent_run_id"]
        query = f"tags.`{TAG_SWEEP_ID}` = '{sweep.id}'" if sweep.id else f"tags.`layerprobe.sweep_dir` = '{sweep.dir}'"
        found = self._search(f"{query} and tags.`{TAG_SWEEP}` = 'true'", max_results=1, order_by=["attributes.start_time DESC"])
        if found:
            state = sweep.trackers.setdefault(NAME, {})
            state["parent_run_id"] = found[0].info.run_id
            return state["parent_run_id"]
        return None

    # --- jobs -----------------------------------------------------------------------------------

    def start_job(self, job: JobInfo) -> None:
        run_id = self._create_run(job)
        self._runs[id(job)] = run_id
        if self.options.system_metrics:
            self._monitors[id(job)] = start_system_metrics(run_id, tracking_uri(self.options))
        params = {key: setting_text(value) for key, value in job.settings.items()}
        params.update({f"version.{name}": _version(name) for name in VERSIONED_PACKAGES})
        params.update(git_state())
        self._log_params(run_id, params)

    def _create_run(self, job: JobInfo, tags: dict[str, str] | None = None) -> str:
        tags = {TAG_HASH: job.config_hash, TAG_PROCESS: process_identity(),
                TAG_METRICS: ",".join(map(str, job.config.metric.get("names") or [])), **(tags or {})}
        parent = self._parent(job.sweep)
        if parent:
            tags.update({PARENT: parent, TAG_SWEEP_ID: job.sweep.id or self.client.get_run(parent).data.tags.get(TAG_SWEEP_ID, "")})
        if job.number is not None:
            tags[TAG_JOB] = str(job.number)
        if getattr(job, "gpu", None) is not None:
            tags["layerprobe.gpu"] = str(job.gpu)
        return self.client.create_run(self.experiment_id, run_name=job.name, tags=tags).info.run_id

    def end_job(self, job: JobInfo, result: JobResult, evaluation) -> None:
        run_id = self._runs.pop(id(job))
        result.run_ref = run_id  # also when recording fails below: a replay (resume=true) ends this run
        monitor = self._monitors.pop(id(job), None)
        if monitor is not None:
            monitor.finish()
        try:
            if evaluation is not None:
                self._log_outcome(run_id, job, result, lambda path: write_scores_csv(evaluation.scores.rows(), path),
                                  evaluation.logged_params(), evaluation)
            if result.error:
                self.client.set_tag(run_id, "error", result.error[:4000])
            self.client.set_terminated(run_id, result.status)
        except Exception as error:
            self._fail_if_writable(run_id, error)
            raise

    def record(self, job: JobInfo, result: JobResult, origin: str) -> None:
        """A kept result replayed into the store: into its own run when that still exists, else a new one."""
        from mlflow.exceptions import MlflowException

        run_id = None
        if result.run_ref:
            try:
                if self.client.get_run(result.run_ref).info.status != "FINISHED":
                    run_id = result.run_ref
            except MlflowException:  # the run is not in this store (another store, or deleted)
                run_id = None
        if run_id is None:
            run_id = self._create_run(job)
            self._log_params(run_id, {key: setting_text(value) for key, value in job.settings.items()})
        self.client.set_tag(run_id, "layerprobe.replayed_from", origin[:4000])
        self.client.set_tag(run_id, TAG_PROCESS, process_identity())
        with contextlib.suppress(MlflowException):  # the stale-run recovery's "stale: …" no longer holds
            self.client.delete_tag(run_id, "error")
        scores = result.scores
        self._log_outcome(run_id, job, result, lambda path: write_scores_csv(
            ((i, "", "", label, score) for i, label, score in zip(scores.ids, scores.labels, scores.scores)), path),
            {"states": result.states}, None)
        self.client.set_terminated(run_id, "FINISHED")
        result.run_ref = run_id

    def _log_outcome(self, run_id: str, job: JobInfo, result: JobResult, write_scores, params: dict[str, str], evaluation) -> None:
        """A finished job's params, metrics and artifacts (config, per-pair scores, mistakes, what was learned)."""
        client = self.client
        client.update_run(run_id, name=job.name)  # now with the resolved layer
        label = result.label
        client.set_tag(run_id, TAG_LAYER, label.get("layer", "-"))
        if evaluation is not None:
            client.set_tag(run_id, TAG_BLOCK, "-" if evaluation.layer.block is None else str(evaluation.layer.block))
        self._log_params(run_id, {**params, "model": label["encoder"], "pooler": label["pooler"],
                                  "dataset": label["dataset"], "split": label["split"], "postprocess": label["postprocess"],
                                  "finetune": label.get("finetune", "none")})
        if evaluation is not None:
            self._log_dataset_input(run_id, evaluation.pairs)
        self._log_metrics(run_id, result.metrics)
        if evaluation is not None:
            self._log_training_curve(run_id, evaluation.training_curve)
            if evaluation.tuned is not None and evaluation.tuned.origin == "computed":  # on the run that trained it
                self._log_training_curve(run_id, evaluation.tuned.report.curve, "tuned.")
        notes = evaluation.notes if evaluation is not None else result.notes
        if notes:
            client.set_tag(run_id, "notes", " | ".join(notes)[:5000])
        with tempfile.TemporaryDirectory() as folder:
            Path(folder, "config.yaml").write_text(OmegaConf.to_yaml(job.config, resolve=True))
            write_scores(Path(folder, "scores.csv"))
            if evaluation is not None and evaluation.mistakes:
                write_rows_csv(evaluation.mistakes, Path(folder, "mistakes.csv"))
            for name, tensor in (evaluation.learned.items() if evaluation is not None else ()):
                import torch

                torch.save(tensor, Path(folder, f"{name}.pt"))
            if evaluation is not None and evaluation.tuned is not None and evaluation.tuned.origin == "computed":
                import shutil

                shutil.copytree(evaluation.tuned.folder, Path(folder, "finetuned_model"))  # loadable as it is, by path
            self._log_artifacts(run_id, Path(folder))

    def _log_artifacts(self, run_id: str, folder: Path) -> None:
        """Every file of ``folder`` as an artifact of the run, whole or not at all: into a local
        artifact store each goes to a temporary name and is renamed (a full disk leaves no truncated
        ``scores.csv`` behind); other stores get MLflow's own upload."""
        import shutil
        import urllib.parse
        import urllib.request

        location = self.client.get_run(run_id).info.artifact_uri
        parsed = urllib.parse.urlparse(location)
        if parsed.scheme not in ("", "file"):
            self.client.log_artifacts(run_id, str(folder))
            return
        target = Path(urllib.request.url2pathname(parsed.path) if parsed.scheme else location)
        target.mkdir(parents=True, exist_ok=True)
        for source in sorted(p for p in folder.rglob("*") if p.is_file()):  # a tuned model is a folder of files
            final = target / source.relative_to(folder)
            final.parent.mkdir(parents=True, exist_ok=True)
            temporary = final.parent / f".{source.name}.{os.getpid()}.tmp"
            try:
                shutil.copyfile(source, temporary)
                os.replace(temporary, final)
            except OSError as error:  # name the artifact, not the temporary source
                raise OSError(error.errno, error.strerror, str(final)) from error
            finally:
                temporary.unlink(missing_ok=True)

    def _fail_if_writable(self, run_id: str, error: Exception) -> None:
        """After a failed write on a full or read-only disk: end the run FAILED with why, if the store
        still takes that much, so it is not left RUNNING (and later called stale)."""
        from framework.errors import storage_failure

        failure = storage_failure(error)
        if failure is None:
            return
        with contextlib.suppress(Exception):
            self.client.set_tag(run_id, "error", f"the job's end could not be recorded: {failure}"[:4000])
            self.client.set_terminated(run_id, "FAILED")

    def _log_dataset_input(self, run_id: str, pairs) -> None:
        """The evaluated data as an MLflow dataset input (name, split, digest, rows): the runs table's
        Dataset column and its filter."""
        import json

        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(name=f"{pairs.dataset}/{pairs.split}", digest=pairs.revision[:8],  # data.revision, cut
                          source_type="layerprobe", source=json.dumps({"uri": pairs.source}),
                          profile=json.dumps({"num_rows": len(pairs), "rows_read": pairs.rows_read, "label_kind": pairs.label_kind}))
        self.client.log_inputs(run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", pairs.split)])])

    def _log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(key, value[:6000]) for key, value in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start:start + 100])

    def _log_metrics(self, run_id: str, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(key, value, now, 0) for key, value in metrics.items()]
        for start in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[start:start + 1000])

    def _log_training_curve(self, run_id: str, curve: dict[str, list[float]], prefix: str = "train.") -> None:
        """A curve as step metrics: ``train.loss`` per epoch (a learned pooler), ``tuned.loss`` per
        optimizer step and ``tuned.heldout_spearman`` per epoch (fine-tuning)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(f"{prefix}{name}", float(point), now, step) for name, points in curve.items() for step, point in enumerate(points)]
        for start in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[start:start + 1000])

    # --- reading back ---------------------------------------------------------------------------

    def find_finished(self, config_hash: str) -> JobResult | None:
        found = self._search(f"tags.`{TAG_HASH}` = '{config_hash}' and attributes.status = 'FINISHED'",
                             max_results=1, order_by=["attributes.start_time DESC"])
        return result_of_run(found[0], self.client, with_scores=True) if found else None

    def recover_stale(self) -> int:
        """End as KILLED the runs whose process is gone but which are still RUNNING.

        The search is a snapshot: a run's process may end the run and exit between the search and
        the liveness check (sweeps started together). A gone process ends nothing more, so the run
        is read again after the check, and only a run still RUNNING then is stale.
        """
        stale = 0
        for run in self._search("attributes.status = 'RUNNING'"):
            process = run.data.tags.get(TAG_PROCESS)
            if not process or process_is_alive(process) is not False:
                continue
            if self.client.get_run(run.info.run_id).info.status != "RUNNING":
                continue
            self.client.set_tag(run.info.run_id, "error", f"stale: its process ({process}) ended without ending the run")
            self.client.set_terminated(run.info.run_id, "KILLED")
            stale += 1
        return stale

    def load_results(self, parent: str | None = None) -> list[JobResult]:
        """Every job run of the experiment (or of sweep ``parent``); reading never creates a store."""
        from mlflow.exceptions import MlflowException

        self._check_readable()
        if parent:
            try:
                self.client.get_run(parent)
            except MlflowException:
                raise LayerprobeError(f"no run '{parent}' in {tracking_uri(self.options)}; give the id of a sweep's parent run") from None
        query = f"tags.`{PARENT}` = '{parent}'" if parent else ""
        runs = self._search(query)
        return [result_of_run(run, self.client) for run in runs
                if run.data.tags.get(TAG_SWEEP) != "true" and "encoder.name" in run.data.params]

    def scores_of(self, result: JobResult) -> PairScoreTable | None:
        """The run's per-pair scores (its scores.csv), for paired comparisons in reports."""
        return read_scores(self.client, result.run_ref) if result.run_ref else None

    def _check_readable(self) -> None:
        from mlflow.tracking import MlflowClient

        uri = tracking_uri(self.options) if self.options.uri else None
        if uri is not None and uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
            raise LayerprobeError(f"no MLflow store at {uri.removeprefix('sqlite:///')}; a report reads a store, it never creates one")
        if uri is None:
            database = local_folder(self.options) / "mlflow.db"
            if not database.is_file():
                raise LayerprobeError(f"no MLflow store at {database}; run a job first, or set the tracking dir/URI")
            uri = f"sqlite:///{database}"
        elif uri.startswith(("http://", "https://")):
            check_server(uri)
        client = MlflowClient(uri)
        if client.get_experiment_by_name(self.options.experiment) is None:
            known = ", ".join(e.name for e in client.search_experiments()) or "none"
            raise LayerprobeError(f"no MLflow experiment '{self.options.experiment}' in {uri} (experiments there: {known})")

    def _search(self, query: str, max_results: int = 50000, order_by=None):
        from mlflow.entities import ViewType

        runs, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], query, ViewType.ACTIVE_ONLY,
                                           max_results=min(max_results, 1000), order_by=order_by, page_token=token)
            runs.extend(page)
            token = page.token
            if not token or len(runs) >= max_results:
                return runs[:max_results]


def _number_or_text(cell: str):
    """A summary.csv cell as the table shows it: a number where it is one, None where empty."""
    if cell == "":
        return None
    try:
        return float(cell)
    except ValueError:
        return cell


def _metric_key(text: str) -> str:
    """A dataset or split name as part of an MLflow metric key (letters, digits, ``_ - . /`` only)."""
    import re

    return re.sub(r"[^0-9A-Za-z_\-]", "_", str(text))


def check_experiment_name(name: str | None) -> None:
    """An experiment name is a name, never a path: artifacts go under ``<tracking.dir>/artifacts/<name>``."""
    text = str(name or "")
    if not text.strip() or "/" in text or "\\" in text or text in (".", "..") or text.startswith("~") or "\0" in text:
        raise LayerprobeError(f"tracking.experiment={text!r} is not a plain name (it must not be empty or contain '/', '\\', "
                              "'..' or start with '~'); e.g. tracking.experiment=rwkv-layers")


def result_of_run(run, client, with_scores: bool = False) -> JobResult:
    """A run read back as the ``JobResult`` its job produced (scores downloaded on request)."""
    from framework.results import labels_of

    params, tags = run.data.params, run.data.tags
    settings = {key: value for key, value in params.items()
                if not key.startswith(RESULT_PARAM_PREFIXES) and key not in RESULT_PARAM_KEYS}
    names = [n for n in tags.get(TAG_METRICS, "").split(",") if n]
    if not names:  # runs from before the tag: the metrics that have a CI
        names = [key.removesuffix("_ci_low") for key in run.data.metrics if key.endswith("_ci_low")]
    job = tags.get(TAG_JOB, "")
    result = JobResult(run.info.status, tags.get(TAG_HASH) or config_hash(settings), settings,
                       labels_of(settings, tags.get(TAG_LAYER, params.get("layer_index"))), dict(run.data.metrics), names,
                       int(job) if job.isdigit() else None, error=tags.get("error", ""), run_ref=run.info.run_id,
                       started=(run.info.start_time or 0) / 1000, notes=[n for n in tags.get("notes", "").split(" | ") if n],
                       states=params.get("states", ""), data_revision=params.get("data.revision", ""))
    if with_scores:
        result.scores = read_scores(client, run.info.run_id)
    return result


def write_scores_csv(rows, path: Path) -> None:
    """Per pair: id, both sentences, label and score at full precision (``repr``), so every metric
    can be recomputed from the file. ``rows``: ``(id, sentence_a, sentence_b, label, score)``."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "sentence_a", "sentence_b", "label", "score"])
        for pair_id, a, b, label, score in rows:
            label = float(label)
            writer.writerow([pair_id, a, b, int(label) if label.is_integer() else repr(label), repr(float(score))])


def start_system_metrics(run_id: str, uri: str):
    """MLflow's own system-metrics sampler on this run (every second, logged every 3 s); None when
    psutil is missing."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    except ImportError:  # psutil absent: no system metrics, nothing else changes
        return None
    monitor = SystemMetricsMonitor(run_id, sampling_interval=1, samples_before_logging=3, tracking_uri=uri)
    monitor.start()
    return monitor


def write_rows_csv(rows: list[dict], path: Path) -> None:
    """Dict rows (the error analysis) as CSV; the columns are the union of the rows' keys, in order."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()} for row in rows)


def read_scores(client, run_id: str) -> PairScoreTable | None:
    with tempfile.TemporaryDirectory() as folder:
        try:
            path = client.download_artifacts(run_id, "scores.csv", folder)
        except Exception:  # an older or failed run without scores: nothing to compare
            return None
        ids, labels, scores = [], [], []
        with open(path, newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                ids.append(row["id"])
                labels.append(float(row["label"]))
                scores.append(float(row["score"]))
    return PairScoreTable(ids, labels, scores)


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

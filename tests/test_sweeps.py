"""Sweeps beyond one process: trackers as plugins, Hydra launchers, many writers, interruption, resume.

Every launcher, server and database here is started for real; what is not installed is skipped
with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, CliResult, cli_command, free_port
from plugins.mlflow.tracker import read_scores

TINY = ("metric=spearman", "metric.bootstrap_resamples=50")


def tiny_args(tiny_mrpc, tiny_vectors):
    return (f"dataset.data_dir={tiny_mrpc}", f"encoder.vectors={tiny_vectors}", *TINY)


def assert_one_finished_sweep(result: CliResult, jobs: int, experiment: str = "layerprobe"):
    parents = result.parents(experiment)
    assert len(parents) == 1, [p.data.tags for p in parents]
    parent = parents[0]
    children = result.children(parent, experiment)
    assert parent.info.status == "FINISHED"
    assert len(children) == jobs and all(r.info.status == "FINISHED" for r in children), [r.info.status for r in children]
    artifacts = Path(parent.info.artifact_uri.removeprefix("file://"))
    if artifacts.is_dir():  # local store; a server's artifacts are checked through the client
        assert {"summary.md", "summary.csv", "metrics_by_layer.png"} <= {p.name for p in artifacts.iterdir()}
    return parent, children


# --- trackers and other plugins through entry points -------------------------------------------

def test_a_tracker_plugin_sees_every_job_and_the_sweep_end(run_cli, tiny_mrpc, tiny_vectors, testkit_env, tmp_path):
    events_file = tmp_path / "events.jsonl"
    result = run_cli("-m", "tracking=recorder", f"tracking.path={events_file}", "pooler=mean,max,last",
                     *tiny_args(tiny_mrpc, tiny_vectors), env=testkit_env)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in events_file.read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start_sweep" and kinds[-1] == "end_sweep"
    assert sorted(e["job"] for e in events if e["event"] == "end_job") == [0, 1, 2]
    sweep = events[0]["sweep"]
    starts = [e for e in events if e["event"] == "start_job"]
    assert all(e["sweep"] == sweep and e["token"] == f"recorded-{sweep}" for e in starts)  # state from start_sweep reached every job
    end = events[-1]
    assert end["status"] == "FINISHED" and end["jobs"] == 3
    assert end["files"] == ["metrics_by_layer.png", "summary.csv", "summary.md"]
    assert end["summary"].count("| glove |") == 3
    assert not (result.store / "mlflow.db").exists()  # MLflow was not used at all


def test_a_tracker_that_cannot_record_the_sweep_stops_it_before_any_job(run_cli, tiny_mrpc, tiny_vectors, testkit_env, tmp_path):
    events_file = tmp_path / "events.jsonl"
    result = run_cli("-m", "tracking=recorder", f"tracking.path={events_file}", "tracking.fail_sweep=true",
                     "pooler=mean,max", *tiny_args(tiny_mrpc, tiny_vectors), env=testkit_env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.error_lines == ["layerprobe: error: the recorder cannot record this sweep (fail_sweep=true)"]
    assert not events_file.exists()  # no job started


def test_a_job_whose_end_the_tracker_cannot_record_is_failed_in_the_sweep(run_cli, tiny_mrpc, tiny_vectors, testkit_env, tmp_path):
    events_file = tmp_path / "events.jsonl"
    result = run_cli("-m", "tracking=recorder", f"tracking.path={events_file}", "tracking.fail_end_of_job=1",
                     "pooler=mean,max,last", *tiny_args(tiny_mrpc, tiny_vectors), env=testkit_env)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "layerprobe: 1 job(s) of this sweep did not finish; their runs carry the error" in result.error_lines
    events = [json.loads(line) for line in events_file.read_text().splitlines()]
    assert sorted(e["job"] for e in events if e["event"] == "end_job") == [0, 2]  # job 1's end never reached the tracker
    end = events[-1]
    assert end["event"] == "end_sweep" and end["status"] == "FAILED" and end["jobs"] == 3
    failed = [line for line in end["summary"].splitlines() if "FAILED" in line]
    assert len(failed) == 1 and "the tracker could not record this job's end (ConnectionError" in failed[0]
    assert end["summary"].count("| FINISHED |") == 2


def test_plugin_metric_and_a_dataset_without_split_or_limit_reach_summary_plot_and_report(run_cli, testkit_env, tmp_path):
    from framework.report import build_report

    result = run_cli("-m", "dataset=toy", "encoder=glove", "pooler=mean,max", "metric.names=[spearman,kendall]",
                     "metric.calibration_split=null", "metric.bootstrap_resamples=50", env=testkit_env)
    assert result.returncode == 0, result.stderr
    parent, children = assert_one_finished_sweep(result, 2)
    assert all("kendall" in r.data.metrics and "kendall_ci_low" in r.data.metrics for r in children)
    summary = (Path(parent.info.artifact_uri.removeprefix("file://")) / "summary.csv").read_text()  # every column
    import csv

    rows = list(csv.DictReader(summary.splitlines()))  # numbers, one column per value: sortable, plottable
    assert {"spearman", "spearman_ci_low", "spearman_ci_high", "kendall", "kendall_ci_low", "kendall_ci_high"} <= set(rows[0])
    kendall = {r.data.params["pooler.name"]: r.data.metrics for r in children}
    for row in rows:
        logged = kendall[row["pooler"]]
        assert [float(row[k]) for k in ("kendall", "kendall_ci_low", "kendall_ci_high")] == \
            [logged["kendall"], logged["kendall_ci_low"], logged["kendall_ci_high"]]
    table = build_report(result.tracker(), None, "kendall", tmp_path / "report")
    assert f"{kendall['mean']['kendall']:.4f}" in table
    assert (tmp_path / "report" / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_has_a_panel_for_a_plugin_metric(testkit_site):
    from framework.results import JobResult
    from framework.summary import plot_metrics_by_layer

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [JobResult("FINISHED", str(layer), {"layer": str(layer)},
                         {"encoder": "rwkv", "pooler": "mean", "dataset": "toy", "split": "validation", "layer": str(layer)},
                         {"spearman": 0.1 * layer, "kendall": 0.05 * layer}, ["spearman", "kendall"], layer) for layer in range(3)]
    titles = []
    original = plt.Figure.savefig
    plt.Figure.savefig = lambda self, *a, **k: titles.extend(ax.get_ylabel() for ax in self.axes if ax.get_visible())
    try:
        plot_metrics_by_layer(results, Path("unused.png"))
    finally:
        plt.Figure.savefig = original
    assert titles == ["spearman", "kendall"]


def test_a_report_over_many_datasets_wraps_its_panels_into_rows(tmp_path):
    """One metric on seven dataset/splits: rows of three panels, not a strip seven panels wide."""
    from matplotlib.image import imread

    from framework.results import JobResult
    from framework.summary import plot_metrics_by_layer

    results = [JobResult("FINISHED", f"{d}{layer}", {"layer": str(layer), "dataset.name": f"d{d}"},
                         {"encoder": "rwkv", "pooler": "mean", "dataset": f"d{d}", "split": "validation", "layer": str(layer)},
                         {"spearman": 0.1 * layer + 0.01 * d}, ["spearman"], layer) for d in range(7) for layer in range(3)]
    plot_metrics_by_layer(results, tmp_path / "wide.png")
    height, width, _ = imread(tmp_path / "wide.png").shape
    assert width < 2.2 * height, (width, height)  # 3 columns × 3 rows (7 panels), the legend beside them
    plot_metrics_by_layer([r for r in results if r.label["dataset"] in ("d0", "d1")], tmp_path / "two.png")
    height, width, _ = imread(tmp_path / "two.png").shape
    assert width > 2 * height  # two datasets stay side by side in one row


# --- launchers ----------------------------------------------------------------------------------

@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_launchers_nest_every_job_under_the_sweeps_parent(run_cli, tiny_mrpc, tiny_vectors, launcher):
    module = {"joblib": "hydra_plugins.hydra_joblib_launcher", "submitit_local": "hydra_plugins.hydra_submitit_launcher"}[launcher]
    pytest.importorskip(module, reason=f"the {launcher} launcher is not installed (pip install 'layerprobe[{'joblib' if launcher == 'joblib' else 'slurm'}]')")
    extra = ["hydra.launcher.n_jobs=2"] if launcher == "joblib" else ["hydra.launcher.timeout_min=5"]
    result = run_cli("-m", f"hydra/launcher={launcher}", *extra, "pooler=mean,max,last", *tiny_args(tiny_mrpc, tiny_vectors))
    assert result.returncode == 0, result.stderr[-3000:]
    parent, children = assert_one_finished_sweep(result, 3)
    assert len({r.data.tags["layerprobe.process"] for r in children} - {parent.data.tags["layerprobe.process"]}) >= 1  # other processes
    assert "sweep summary (FINISHED; 3 job(s), 3 finished" in result.stdout


def test_ray_launcher_on_a_cluster_started_beforehand(run_cli, tiny_mrpc, tiny_vectors, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_ray_launcher", reason="the Ray launcher is not installed (pip install 'layerprobe[ray]')")
    ray = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
    import tempfile

    port = free_port()
    temp = tempfile.mkdtemp(prefix="lpray", dir="/tmp")  # Ray's socket paths must stay under 108 bytes
    env = {**os.environ, "RAY_DISABLE_USAGE_STATS": "1"}
    start = [ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--include-dashboard=false",
             "--num-cpus=2", "--disable-usage-stats", f"--temp-dir={temp}"]
    started = subprocess.run(start, capture_output=True, text=True, env=env, timeout=180)
    assert started.returncode == 0, started.stderr[-2000:]
    try:
        result = run_cli("-m", "hydra/launcher=ray", f"+hydra.launcher.ray.init.address=127.0.0.1:{port}",
                         "+hydra.launcher.ray.init.object_store_memory=null", "pooler=mean,max",
                         *tiny_args(tiny_mrpc, tiny_vectors), env={"RAY_DISABLE_USAGE_STATS": "1"}, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert_one_finished_sweep(result, 2)  # workers started before the sweep still nest under its parent
    finally:
        subprocess.run([ray, "stop", "--force"], capture_output=True, env=env, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


# --- many writers -------------------------------------------------------------------------------

def start_sweeps(count: int, store_args: list[str], args: list[str], tmp_path: Path) -> list[subprocess.Popen]:
    processes = []
    for index in range(count):
        command, env = cli_command(tmp_path / "unused", "-m", *store_args, *args)
        processes.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return processes


def assert_sweeps_complete(processes, result: CliResult, sweeps: int, jobs: int):
    outputs = [p.communicate(timeout=600) for p in processes]
    for process, (out, err) in zip(processes, outputs):
        assert process.returncode == 0, err[-3000:]
        assert "locked" not in err and "already exists" not in err and "alembic" not in err.lower(), err[-3000:]
    parents = result.parents()
    assert len(parents) == sweeps and all(p.info.status == "FINISHED" for p in parents)
    client = result.client()
    for parent in parents:
        children = result.children(parent)
        assert len(children) == jobs and all(r.info.status == "FINISHED" for r in children), \
            [(r.info.status, r.data.tags.get("error", "")) for r in children]
        for child in children:
            assert "spearman" in child.data.metrics
            assert "scores.csv" in {f.path for f in client.list_artifacts(child.info.run_id)}
        assert "summary.md" in {f.path for f in client.list_artifacts(parent.info.run_id)}


def test_sweeps_started_together_on_a_new_store(tmp_path, tiny_mrpc, tiny_vectors):
    store = tmp_path / "new-store"
    processes = start_sweeps(4, [f"tracking.dir={store}"], ["pooler=mean,max", *tiny_args(tiny_mrpc, tiny_vectors)], tmp_path)
    assert_sweeps_complete(processes, CliResult(0, "", "", store), sweeps=4, jobs=2)


@pytest.fixture
def mlflow_server(tmp_path):
    """A real ``mlflow server`` on a free 127.0.0.1 port, SQLite backend, serving artifacts."""
    yield from serve_mlflow(tmp_path, f"sqlite:///{tmp_path / 'server' / 'mlflow.db'}")


def serve_mlflow(tmp_path: Path, backend: str):
    import urllib.request

    (tmp_path / "server").mkdir(exist_ok=True)
    port = free_port()
    mlflow = shutil.which("mlflow", path=os.path.dirname(sys.executable))
    server = subprocess.Popen([mlflow, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "2",
                               "--backend-store-uri", backend, "--serve-artifacts",
                               "--artifacts-destination", str(tmp_path / "server" / "artifacts")],
                              stdout=subprocess.DEVNULL, stderr=open(tmp_path / "server" / "log", "w"), start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(uri + "/health", timeout=2).read()
                break
            except OSError:
                assert server.poll() is None, (tmp_path / "server" / "log").read_text()[-3000:]
                assert time.monotonic() < deadline, "mlflow server did not answer in 120 s"
                time.sleep(0.5)
        yield uri
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)


class ServerResult(CliResult):
    def __init__(self, uri: str):
        super().__init__(0, "", "", Path("unused"))
        self.uri = uri

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.uri)

    def runs(self, experiment: str = "layerprobe"):
        client = self.client()
        found = client.get_experiment_by_name(experiment)
        return [] if found is None else client.search_runs([found.experiment_id], max_results=1000)


def test_sweeps_started_together_against_an_mlflow_server(mlflow_server, tmp_path, tiny_mrpc, tiny_vectors):
    processes = start_sweeps(4, [f"tracking.uri={mlflow_server}", f"tracking.dir={tmp_path / 'local'}"],
                             ["pooler=mean,max", *tiny_args(tiny_mrpc, tiny_vectors)], tmp_path)
    assert_sweeps_complete(processes, ServerResult(mlflow_server), sweeps=4, jobs=2)
    assert not (tmp_path / "local" / "mlflow.db").exists()  # nothing went to a local store


def test_mlflow_server_on_postgresql(tmp_path, tiny_mrpc, tiny_vectors, run_cli):
    for tool in ("initdb", "pg_ctl"):
        if shutil.which(tool) is None:
            pytest.skip(f"PostgreSQL is not installed ({tool} not on PATH; apt-get install postgresql)")
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install 'layerprobe[postgres]')")
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="layerprobe-pg-", dir="/tmp"))  # reachable by the postgres user
    data, sockets = base / "pgdata", base / "pgsock"
    sockets.mkdir()
    as_user = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: run it as the postgres user
        shutil.chown(base, "postgres")
        shutil.chown(sockets, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()

    def pg(*command):
        done = subprocess.run([*as_user, *command], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]

    pg("initdb", "-D", str(data), "-U", "postgres", "--auth=trust")
    pg("pg_ctl", "-D", str(data), "-l", str(base / "pg.log"), "-w", "start",
       "-o", f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1")
    try:
        pg("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "mlflow")
        server_dir = tmp_path / "srv"
        server_dir.mkdir()
        generator = serve_mlflow(server_dir, f"postgresql://postgres@127.0.0.1:{port}/mlflow")
        uri = next(generator)
        try:
            result = run_cli("-m", f"tracking.uri={uri}", "pooler=mean,max", *tiny_args(tiny_mrpc, tiny_vectors))
            assert result.returncode == 0, result.stderr[-3000:]
            server = ServerResult(uri)
            (parent,) = server.parents()
            assert parent.info.status == "FINISHED"
            assert sorted(r.info.status for r in server.children(parent)) == ["FINISHED", "FINISHED"]
        finally:
            generator.close()
    finally:
        subprocess.run([*as_user, "pg_ctl", "-D", str(data), "-m", "fast", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


# --- interruption and resume --------------------------------------------------------------------

def gated_sweep(store: Path, gate: Path, tiny_mrpc, testkit_env, *extra) -> subprocess.Popen:
    """Four jobs; jobs 0 and 1 finish at once, jobs 2 and 3 wait while ``gate`` exists."""
    command, env = cli_command(store, "-m", "encoder=glove", "dataset=toy", "pooler=gated", "pooler.free=true,false",
                               "dataset.size=8,12", f"pooler.gate={gate}", *TINY, "metric.calibration_split=null",
                               *extra, env=testkit_env)
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=_default_sigint)


def _default_sigint() -> None:
    """A sweep under test takes Ctrl-C as a user's would, also when the suite itself was started in the
    background (a shell's ``cmd &`` leaves SIGINT ignored, and children inherit that)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for(predicate, seconds: float = 120):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def finished_job_results(store: Path) -> list[Path]:
    return list(store.glob("hydra/*/*/results/*/*.json"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_sweep_and_leaves_no_run_running(tmp_path, tiny_mrpc, testkit_env, sig):
    store, gate = tmp_path / "mlruns", tmp_path / "gate"
    gate.touch()
    sweep = gated_sweep(store, gate, tiny_mrpc, testkit_env)
    wait_for(lambda: len(finished_job_results(store)) >= 2)  # jobs 0 and 1 done; job 2 waits at the gate
    wait_for(lambda: gate.with_name(gate.name + ".reached").exists())  # job 2 waits at the gate
    sent = time.monotonic()
    sweep.send_signal(sig)
    out, err = sweep.communicate(timeout=60)
    assert time.monotonic() - sent < 30
    assert sweep.returncode == 130, err[-3000:]
    result = CliResult(0, out, err, store)
    (parent,) = result.parents()
    assert parent.info.status == "KILLED"
    children = result.children(parent)
    assert all(r.info.status != "RUNNING" for r in result.runs())
    assert sorted(r.info.status for r in children) == ["FINISHED", "FINISHED", "KILLED"]  # no further job started
    artifacts = Path(parent.info.artifact_uri.removeprefix("file://"))
    summary = (artifacts / "summary.md").read_text()  # the summary of what finished
    assert summary.count("| FINISHED |") == 2 and "| KILLED: interrupted" in summary


def test_ctrl_c_on_a_joblib_sweep_counts_every_job_in_the_summary_as_the_store_does(tmp_path, tiny_mrpc, testkit_env):
    """Ctrl-C (SIGINT to the whole process group) while two joblib workers wait at the gate: the
    summary and the store agree, job by job: two FINISHED, two KILLED, none missing, none RUNNING."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="the joblib launcher is not installed (pip install 'layerprobe[joblib]')")
    store, gate = tmp_path / "mlruns", tmp_path / "gate"
    gate.touch()
    sweep = gated_sweep(store, gate, tiny_mrpc, testkit_env, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    wait_for(lambda: len(finished_job_results(store)) >= 4)  # two results and two RUNNING placeholders
    wait_for(lambda: gate.with_name(gate.name + ".reached").exists())  # job 2 waits at the gate
    os.killpg(sweep.pid, signal.SIGINT)
    out, err = sweep.communicate(timeout=120)
    assert sweep.returncode == 130, err[-3000:]
    result = CliResult(0, out, err, store)
    (parent,) = result.parents()
    children = result.children(parent)
    assert all(r.info.status != "RUNNING" for r in result.runs())
    assert sorted(r.info.status for r in children) == ["FINISHED", "FINISHED", "KILLED", "KILLED"]
    summary = (Path(parent.info.artifact_uri.removeprefix("file://")) / "summary.md").read_text()
    assert summary.count("| FINISHED |") == 2 and summary.count("| KILLED") == 2, summary
    assert "4 job(s), 2 finished" in out, out[-2000:]


def test_kill_9_then_resume_reruns_only_the_missing_configs(tmp_path, tiny_mrpc, testkit_env):
    store, gate = tmp_path / "mlruns", tmp_path / "gate"
    gate.touch()
    sweep = gated_sweep(store, gate, tiny_mrpc, testkit_env)
    wait_for(lambda: len(finished_job_results(store)) >= 2)
    wait_for(lambda: gate.with_name(gate.name + ".reached").exists())  # job 2 waits at the gate
    os.killpg(sweep.pid, signal.SIGKILL)
    sweep.communicate(timeout=60)
    killed = CliResult(0, "", "", store)
    assert {r.info.status for r in killed.runs()} == {"RUNNING", "FINISHED"}  # what kill -9 leaves behind
    gate.unlink()
    resumed = gated_sweep(store, gate, tiny_mrpc, testkit_env, "resume=true")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert "run(s) left RUNNING by killed processes are now marked KILLED" in err
    runs = killed.runs()
    assert all(r.info.status != "RUNNING" for r in runs)
    assert sum("stale" in r.data.tags.get("error", "") for r in runs) == 2  # the old parent and its running job
    parent = next(p for p in killed.parents() if p.info.status == "FINISHED")
    children = killed.children(parent)
    assert len(children) == 2  # only the missing configs ran
    assert out.count("reused ") == 2
    summary = (Path(parent.info.artifact_uri.removeprefix("file://")) / "summary.md").read_text()
    assert summary.count("| glove |") == 4 and summary.count("FINISHED (reused)") == 2
    assert parent.data.tags["reused_jobs"] == "2"


def test_stale_recovery_leaves_a_run_its_process_ended_after_the_search(tmp_path, monkeypatch):
    """Sweeps started together: one sweep's search still sees another's job RUNNING, which then ends
    FINISHED and its process exits before the liveness check. That run must stay FINISHED."""
    import plugins.mlflow.tracker as tracker_module
    from framework.sweep import process_identity
    from plugins.mlflow.store import MLflowOptions

    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    gone = process_identity(exited.pid)
    exited.wait()
    tracker = tracker_module.MLflowTracker(MLflowOptions(dir=str(tmp_path / "mlruns"), system_metrics=False))
    client = tracker.client
    ended_meanwhile, left_running = (client.create_run(tracker.experiment_id, run_name=name, tags={tracker_module.TAG_PROCESS: gone})
                                     for name in ("ended meanwhile", "left running"))
    real_check = tracker_module.process_is_alive

    def owner_ends_its_run_then_exits(process):
        if client.get_run(ended_meanwhile.info.run_id).info.status == "RUNNING":
            client.set_terminated(ended_meanwhile.info.run_id, "FINISHED")
        return real_check(process)

    monkeypatch.setattr(tracker_module, "process_is_alive", owner_ends_its_run_then_exits)
    assert tracker.recover_stale() == 1
    ended, stale = (client.get_run(r.info.run_id) for r in (ended_meanwhile, left_running))
    assert ended.info.status == "FINISHED" and "error" not in ended.data.tags
    assert stale.info.status == "KILLED" and "stale" in stale.data.tags["error"]


def test_the_sweeps_end_fails_a_job_run_whose_end_went_unrecorded_and_kills_the_interrupted_one(tmp_path, capsys):
    import plugins.mlflow.tracker as tracker_module
    from framework.results import JobResult
    from framework.sweep import SweepInfo, process_identity
    from plugins.mlflow.store import MLflowOptions

    tracker = tracker_module.MLflowTracker(MLflowOptions(dir=str(tmp_path / "mlruns"), system_metrics=False))
    sweep = SweepInfo("s1", str(tmp_path / "sweep"), ["pooler=mean,max"], time.time(), "", os.getpid(), process_identity())
    sweep.trackers["mlflow"] = tracker.start_sweep(sweep)
    client, parent = tracker.client, sweep.trackers["mlflow"]["parent_run_id"]
    runs = [client.create_run(tracker.experiment_id, run_name=f"job {job}",
                              tags={tracker_module.PARENT: parent, tracker_module.TAG_JOB: str(job)}) for job in (0, 1)]
    unrecorded = "the tracker could not record this job's end (ConnectionError: gone)"
    results = [JobResult("FAILED", "h0", {}, {}, job=0, error=unrecorded)]  # job 1 never wrote a result: interrupted
    tracker.end_sweep(sweep, results, {}, "FAILED")
    failed, killed = (client.get_run(r.info.run_id) for r in runs)
    assert (failed.info.status, failed.data.tags["error"]) == ("FAILED", unrecorded)
    assert killed.info.status == "KILLED" and "still running" in killed.data.tags["error"]
    assert client.get_run(parent).info.status == "FAILED"


def test_resume_skips_a_finished_single_job(run_cli, tiny_mrpc, tiny_vectors):
    first = run_cli(*tiny_args(tiny_mrpc, tiny_vectors))
    assert first.returncode == 0, first.stderr
    again = run_cli(*tiny_args(tiny_mrpc, tiny_vectors), "resume=true")
    assert again.returncode == 0 and again.stdout.startswith("reused ")
    assert len(again.runs()) == 1
    other = run_cli(*tiny_args(tiny_mrpc, tiny_vectors), "resume=true", "seed=1")  # another config: runs
    assert len(other.runs()) == 2


# --- reports that keep configs apart ------------------------------------------------------------

def test_report_keeps_runs_that_differ_in_any_setting_apart(run_cli, tiny_mrpc, tiny_vectors, tmp_path):
    from framework.report import build_report

    for tokenizer in ("whitespace", "regex", "regex"):
        assert run_cli(*tiny_args(tiny_mrpc, tiny_vectors), f"encoder.tokenizer={tokenizer}").returncode == 0
    table = build_report(CliResult(0, "", "", tmp_path / "mlruns").tracker(), None, "spearman", tmp_path / "report")
    header, _, *rows = [line for line in table.splitlines() if line.startswith("|")]
    assert "encoder.tokenizer" in header
    assert len(rows) == 2 and any("| regex |" in r for r in rows) and any("| whitespace |" in r for r in rows)
    regex_row = next(r for r in rows if "| regex |" in r)
    assert "(+1 older with the same config)" in regex_row
    assert "1 older run(s) repeat a config shown here" in table


# --- errors and untrusted files -----------------------------------------------------------------

@pytest.mark.parametrize("args, expected", [
    (["pooler.kk=3"], "Could not override 'pooler.kk'"),
    (["-m", "pooler=mean,max", "pooler.kk=3"], "Could not override 'pooler.kk'"),
    (["layer=[1,2"], "malformed override 'layer=[1,2'"),
    (["hydra/launcher=nosuch"], "Hydra launchers are extras"),
    (["tracking.dir={file}/mlruns"], "(hydra.run.dir, under tracking.dir): {file} is not a folder; set tracking.dir"),
    (["-m", "pooler=mean,max", "tracking.dir={file}/mlruns"], "(hydra.sweep.dir, under tracking.dir): {file} is not a folder"),
    (["tracking.uri=http://127.0.0.1:{port}"], "tracking.uri=http://127.0.0.1:{port} is unreachable"),
])
def test_bad_overrides_and_stores_are_one_line_errors(run_cli, tmp_path, tiny_mrpc, tiny_vectors, args, expected):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    port = free_port()
    fill = lambda text: text.format(file=blocker, port=port)  # noqa: E731
    started = time.monotonic()
    result = run_cli(*tiny_args(tiny_mrpc, tiny_vectors), *map(fill, args))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert len(result.error_lines) == 1 and fill(expected) in result.error_lines[0], result.stderr[-2000:]
    assert time.monotonic() - started < 60


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder nobody can write to, root included: a read-only tmpfs (as root), else chmod 555."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"running as root and cannot mount a read-only tmpfs to stand for an unwritable folder: {done.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)


@pytest.mark.parametrize("hydra_elsewhere", [False, True])
def test_unwritable_tracking_dir_is_one_line(run_cli, tmp_path, tiny_mrpc, tiny_vectors, read_only_folder, hydra_elsewhere):
    extra = [f"hydra.run.dir={tmp_path / 'hydra'}", f"cache.dir={tmp_path / 'cache'}"] if hydra_elsewhere else []
    result = run_cli(*tiny_args(tiny_mrpc, tiny_vectors), f"tracking.dir={read_only_folder}", *extra)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    expected = (f"layerprobe: error: tracking.dir={read_only_folder} is not writable; set tracking.dir to a writable folder "
                "or tracking.uri to an MLflow server") if hydra_elsewhere else (
                f"layerprobe: error: cannot create {read_only_folder}/hydra/")
    assert len(result.error_lines) == 1 and result.error_lines[0].startswith(expected), result.stderr[-2000:]


def test_damaged_cache_file_is_reported_and_recomputed(tmp_path, capsys):
    import torch

    from framework.cache import CachedEncoder, TokenStateCache
    from framework.data import Layer, TokenStates

    class Encoder:
        calls = 0

        def fingerprint(self):
            return "f"

        def encode(self, sentences, layer):
            Encoder.calls += 1
            yield TokenStates(torch.ones(len(sentences), 2, 3), torch.ones(len(sentences), 2, dtype=torch.bool),
                              torch.arange(len(sentences)))

    folder = tmp_path / "cache"
    first = CachedEncoder(Encoder(), TokenStateCache(str(folder), 1.0))
    list(first.encode(["a", "b"], Layer()))
    (path,) = folder.glob("*.pt")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated, as by a crash mid-write
    second = CachedEncoder(Encoder(), TokenStateCache(str(folder), 1.0))
    batches = list(second.encode(["a", "b"], Layer()))
    assert Encoder.calls == 2 and second.stats["cache_damaged"] == 1 and second.stats["cache_misses"] == 1
    assert torch.equal(batches[0].states, torch.ones(2, 2, 3))
    assert "is unreadable" in capsys.readouterr().err
    third = CachedEncoder(Encoder(), TokenStateCache(str(folder), 1.0))
    list(third.encode(["a", "b"], Layer()))
    assert third.stats == {"cache_hits": 1}  # rewritten whole


def test_concurrent_workers_compute_a_cache_entry_once(tmp_path):
    """Two processes that need the same states: the second waits for the first and reads its file."""
    script = f'''
import sys, time, torch
sys.path.insert(0, {str(REPO)!r})
from framework.cache import CachedEncoder, TokenStateCache
from framework.data import Layer, TokenStates
class Slow:
    def fingerprint(self): return "f"
    def encode(self, sentences, layer):
        time.sleep(2)
        yield TokenStates(torch.ones(len(sentences), 2, 3), torch.ones(len(sentences), 2, dtype=torch.bool), torch.arange(len(sentences)))
cached = CachedEncoder(Slow(), TokenStateCache({str(tmp_path / "cache")!r}, 1.0))
list(cached.encode(["a", "b"], Layer()))
print(dict(cached.stats))
'''
    processes = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = sorted(p.communicate(timeout=120)[0].strip() for p in processes)
    assert outputs == ["{'cache_hits': 1}", "{'cache_misses': 1}"]


def test_a_worker_without_the_sweep_file_still_finds_the_parent(tmp_path):
    """A job on a machine that does not share the sweep folder looks the parent up by the folder's name."""
    from framework.sweep import SweepInfo
    from plugins.mlflow.store import MLflowOptions
    from plugins.mlflow.tracker import MLflowTracker

    tracker = MLflowTracker(MLflowOptions(dir=str(tmp_path / "mlruns")))
    sweep = SweepInfo("abc123", str(tmp_path / "sweep"), ["pooler=mean,max"], time.time(), "host", 1, "host:1:")
    parent = tracker.start_sweep(sweep)["parent_run_id"]
    stand_in = SweepInfo("", sweep.dir, [], 0.0, "", 0, "")
    assert tracker._parent(stand_in) == parent


def test_a_tracking_server_that_dies_mid_sweep_stops_it_in_seconds_and_keeps_the_result(tmp_path, tiny_mrpc, testkit_env):
    """Bounded retries (seconds, not minutes), one line naming the server, exit 2, and the computed
    result of the job whose end could not be recorded kept on local disk with its per-pair scores."""
    gate, server_dir = tmp_path / "gate", tmp_path / "srv"
    gate.touch()
    server_dir.mkdir()
    server = serve_mlflow(server_dir, f"sqlite:///{server_dir / 'server' / 'mlflow.db'}")
    uri = next(server)
    sweep = gated_sweep(tmp_path / "mlruns", gate, tiny_mrpc, testkit_env, f"tracking.uri={uri}",
                        f"tracking.dir={tmp_path / 'local'}")
    wait_for(lambda: len(list((tmp_path / "local").glob("hydra/*/*/results/*/*.json"))) >= 2)
    wait_for(lambda: gate.with_name(gate.name + ".reached").exists())  # job 2 waits at the gate, its run started
    server.close()  # the server goes away (SIGTERM to its process group) ...
    gate.unlink()  # ... and job 2 finishes its work
    started = time.monotonic()
    out, err = sweep.communicate(timeout=240)
    assert time.monotonic() - started < 90, "retried for too long"
    assert sweep.returncode == 2, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("layerprobe: error:")]
    assert any("the tracker stopped answering" in line and uri in line and "stopping the sweep" in line for line in lines), err[-3000:]
    (kept,) = list((tmp_path / "local").glob("hydra/*/*/unrecorded/*.json"))
    result = json.loads(kept.read_text())
    assert result["status"] == "FINISHED" and len(result["scores"]["scores"]) == result["metrics"]["n_pairs"] > 0
    assert list((tmp_path / "local").glob("hydra/*/*/summary/summary.md"))

    # The server is back (the same store, another port): resume=true replays the kept result into
    # the run that was started for it, and runs only the job that never ran.
    from mlflow.tracking import MlflowClient

    again = serve_mlflow(server_dir, f"sqlite:///{server_dir / 'server' / 'mlflow.db'}")
    uri = next(again)
    try:
        resumed = gated_sweep(tmp_path / "mlruns", gate, tiny_mrpc, testkit_env, f"tracking.uri={uri}",
                              f"tracking.dir={tmp_path / 'local'}", "resume=true")
        out, err = resumed.communicate(timeout=240)
        assert resumed.returncode == 0, err[-3000:]
        assert out.count("reused ") == 2 and out.count("replayed ") == 1, out[-3000:]
        assert not kept.exists() and kept.with_name(kept.name + ".replayed").exists()
        run = MlflowClient(uri).get_run(result["run_ref"])
        assert run.info.status == "FINISHED" and "error" not in run.data.tags
        assert run.data.metrics["spearman"] == result["metrics"]["spearman"]
        assert run.data.tags["layerprobe.replayed_from"] == str(kept)
        scores = read_scores(MlflowClient(uri), run.info.run_id)
        assert (scores.ids, scores.scores) == (result["scores"]["ids"], result["scores"]["scores"])
    finally:
        again.close()


def test_system_metrics_on_request_are_sampled_into_the_run(tmp_path):
    """tracking.system_metrics=true (off by default): MLflow's sampler logs system/* metrics on the run."""
    import plugins.mlflow.tracker as tracker_module
    from plugins.mlflow.store import MLflowOptions, tracking_uri

    options = MLflowOptions(dir=str(tmp_path / "mlruns"), system_metrics=True)
    assert MLflowOptions().system_metrics is False
    tracker = tracker_module.MLflowTracker(options)
    run_id = tracker.client.create_run(tracker.experiment_id, run_name="sampled").info.run_id
    monitor = tracker_module.start_system_metrics(run_id, tracking_uri(options))
    time.sleep(4.0)  # three samples a second apart, then one logging round
    monitor.finish()
    logged = tracker.client.get_run(run_id).data.metrics
    assert "system/cpu_utilization_percentage" in logged and "system/system_memory_usage_megabytes" in logged, sorted(logged)

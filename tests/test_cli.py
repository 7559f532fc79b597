"""The command line, end to end: a job's MLflow run, sweeps, and one-line errors for bad input."""

import csv
import io
import textwrap
from pathlib import Path

import pytest

from conftest import SHARED_GLUE, CliResult, needs_shared_data


def test_single_job_logs_params_metrics_and_per_pair_scores(run_cli, tiny_mrpc, tiny_vectors):
    result = run_cli(f"dataset.data_dir={tiny_mrpc}", f"encoder.vectors={tiny_vectors}")
    assert result.returncode == 0, result.stderr
    line = [l for l in result.stdout.splitlines() if l.startswith("glove mean mrpc/validation")]
    assert len(line) == 1 and " n=8 skipped=0" in line[0] and "spearman=" in line[0]
    (run,) = result.runs()
    params, metrics = run.data.params, run.data.metrics
    assert run.info.status == "FINISHED"
    assert params["encoder.name"] == "glove" and run.data.tags["layerprobe.layer"] == "-" and "layer_index" not in params
    assert params["data.rows_read"] == "8" and params["data.rows_skipped"] == "0"
    assert params["git_commit"] and params["version.torch"]
    assert params["calibration.split"] == "train"
    for name in ("spearman", "spearman_ci_low", "spearman_ci_high", "pearson", "roc_auc", "average_precision",
                 "accuracy", "f1", "accuracy_threshold", "encode_seconds", "pairs_per_second",
                 "tokens_per_second", "peak_rss_mb", "encoder.oov_tokens"):
        assert name in metrics, name
    assert f"spearman={metrics['spearman']:.4f}" in line[0]
    assert "encoder.cache_misses" not in metrics and not (result.store / "cache").exists()  # GloVe opts out
    artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
    rows = list(csv.DictReader(io.StringIO((artifacts / "scores.csv").read_text())))
    assert [r["id"] for r in rows] == [str(i) for i in range(8)]
    assert rows[6]["sentence_a"] == '"quoted start never closed' and rows[6]["label"] == "1"
    assert "encoder:" in (artifacts / "config.yaml").read_text()


@pytest.mark.parametrize("args, expected", [
    (["dataset.data_dir=/no/such/folder"], "dataset.data_dir=/no/such/folder is not a folder"),
    (["pooler=nosuch"], "unknown pooler 'nosuch'; available: attn, cls, last, max"),  # then installed plugins' and mean
    (["-m", "pooler=mean,nosuch"], "unknown pooler 'nosuch'"),
    (["layer=3"], "glove has no layers"),
    (["dataset.data_dir={bad}"], "missing column '#2 String'"),
])
def test_bad_input_is_one_line_and_a_failing_exit(run_cli, tmp_path, tiny_vectors, args, expected):
    bad = tmp_path / "BAD"
    bad.mkdir()
    (bad / "dev.tsv").write_text("Quality\t#1 ID\t#2 ID\t#1 String\n1\t1\t2\thello\n")
    defaults = [f"encoder.vectors={tiny_vectors}", f"dataset.data_dir={tmp_path}"]
    result = run_cli(*defaults, *(a.format(bad=bad) for a in args))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert len(result.error_lines) == 1 and expected in result.error_lines[0], result.stderr


def test_sweep_nests_jobs_under_a_parent_and_a_failing_job_does_not_stop_it(run_cli, tiny_mrpc, tiny_vectors):
    result = run_cli("-m", f"dataset.data_dir={tiny_mrpc}", f"encoder.vectors={tiny_vectors}",
                     "pooler=mean,max", "dataset.split=validation,nosuch")
    assert result.returncode == 1  # two jobs failed
    runs = result.runs()
    parents = [r for r in runs if r.data.tags.get("layerprobe.sweep") == "true"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    # The bad split is rejected before a run exists (no FAILED run clutters the list); the summary
    # still says so for both of its jobs.
    assert sorted(r.info.status for r in children) == ["FINISHED", "FINISHED"]
    artifacts = Path(parents[0].info.artifact_uri.removeprefix("file://"))
    summary = (artifacts / "summary.md").read_text()
    assert summary.count("| glove |") == 4 and summary.count("FAILED: dataset.split=nosuch: this dataset has no such split") == 2
    assert (artifacts / "summary.csv").is_file()
    assert (artifacts / "metrics_by_layer.png").read_bytes()[:4] == b"\x89PNG"
    assert parents[0].data.tags["failed_jobs"] == "2"


THIRD_PARTY_PLUGIN = '''
    from dataclasses import dataclass

    from layerprobe_hooks import hookimpl


    @dataclass
    class Options:
        power: float = 4.0


    class PowerMeanPooler:
        def __init__(self, options):
            self.power = options.power

        def pool(self, batch):
            mask = batch.mask.unsqueeze(-1).float()
            magnitude = (batch.states.abs() ** self.power * mask).sum(1) / mask.sum(1)
            return magnitude ** (1 / self.power)


    @hookimpl
    def register_poolers(register):
        register("powermean", lambda options: PowerMeanPooler(options), Options)
'''


def install_throwaway_plugin(site: Path) -> None:
    """A plugin as pip would install it: a module plus a dist-info with an entry point."""
    site.mkdir()
    (site / "layerprobe_hooks.py").write_text("from framework.hookspecs import hookimpl\n")
    (site / "layerprobe_powermean.py").write_text(textwrap.dedent(THIRD_PARTY_PLUGIN))
    info = site / "layerprobe_powermean-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: layerprobe-powermean\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[layerprobe]\npowermean = layerprobe_powermean\n")


def test_third_party_pooler_joins_a_sweep_through_its_entry_point(run_cli, tmp_path, tiny_mrpc, tiny_vectors):
    install_throwaway_plugin(tmp_path / "site")
    import os

    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])}
    result = run_cli("-m", f"dataset.data_dir={tiny_mrpc}", f"encoder.vectors={tiny_vectors}",
                     "pooler=mean,powermean", env=env)
    assert result.returncode == 0, result.stderr
    finished = {r.data.params["pooler.name"]: r for r in result.runs() if r.info.status == "FINISHED" and "pooler.name" in r.data.params}
    assert set(finished) == {"mean", "powermean"}
    assert finished["powermean"].data.params["pooler.power"] == "4.0"  # its schema's default
    assert "glove powermean mrpc/validation" in result.stdout

    # A plugin's option sweeps like a built-in's, beside a pooler without it: mean runs once.
    swept = run_cli("-m", f"dataset.data_dir={tiny_mrpc}", f"encoder.vectors={tiny_vectors}", "pooler=mean,powermean",
                    "pooler.power=2.0,3.0", "tracking.experiment=options", env=env)
    assert swept.returncode == 0, swept.stderr[-3000:]
    runs = [r for r in swept.runs("options") if "pooler.name" in r.data.params]
    assert sorted((r.data.params["pooler.name"], r.data.params.get("pooler.power")) for r in runs) == [
        ("mean", None), ("powermean", "2.0"), ("powermean", "3.0")]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert "4 job(s), 4 finished, 1 with the config of another job" in swept.stdout


@needs_shared_data
def test_the_papers_glove_baseline_on_real_mrpc(run_cli):
    result = run_cli("encoder=glove", "pooler=mean", "dataset=mrpc", f"dataset.data_dir={SHARED_GLUE / 'MRPC'}")
    assert result.returncode == 0, result.stderr
    (run,) = result.runs()
    assert run.data.metrics["spearman"] == pytest.approx(0.3794, abs=5e-4)
    assert 0.25 < run.data.metrics["spearman_ci_low"] < 0.33 and 0.42 < run.data.metrics["spearman_ci_high"] < 0.50
    assert run.data.params["data.rows_read"] == "408"


@needs_shared_data
def test_logged_ranking_metrics_are_sklearns_on_the_runs_own_scores(run_cli):
    """glove/last on MRPC validation has many tied scores: AP and ROC-AUC recomputed from scores.csv match."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    result = run_cli("encoder=glove", "pooler=last", "dataset=mrpc", f"dataset.data_dir={SHARED_GLUE / 'MRPC'}",
                     "metric.names=[spearman,roc_auc,average_precision]", "metric.bootstrap_resamples=10")
    assert result.returncode == 0, result.stderr
    (run,) = result.runs()
    rows = list(csv.DictReader(io.StringIO((Path(run.info.artifact_uri.removeprefix("file://")) / "scores.csv").read_text())))
    labels = [int(r["label"]) for r in rows]
    scores = [float(r["score"]) for r in rows]
    assert len(set(scores)) < len(scores) - 100  # the ties are there
    assert run.data.metrics["average_precision"] == average_precision_score(labels, scores)
    assert run.data.metrics["roc_auc"] == roc_auc_score(labels, scores)


def test_a_new_store_starts_from_the_empty_template_and_a_damaged_template_is_not_used(run_cli, tmp_path, tiny_mrpc, tiny_vectors):
    """The first new store on a machine is migrated by MLflow and kept as the template; later new
    stores are copies of it: the same schema and revision, the Default experiment placed as MLflow
    would, our experiment and runs as usual. A template that is not a sound empty store is ignored."""
    import sqlite3

    cache = tmp_path / "cache-home"
    env = {"LAYERPROBE_CACHE_DIR": str(cache)}
    args = (f"dataset.data_dir={tiny_mrpc}", f"encoder.vectors={tiny_vectors}", "metric=spearman")
    first = run_cli(*args, "tracking.dir=" + str(tmp_path / "first"), env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    (template,) = cache.glob("mlflow-*-empty.db")
    second = run_cli(*args, "tracking.dir=" + str(tmp_path / "second"), env=env)
    assert second.returncode == 0, second.stderr[-2000:]

    def shape(path):  # tables with their columns, indexes, revision (two migrations order CHECKs differently in the SQL text)
        with sqlite3.connect(path) as db:
            names = sorted(db.execute("SELECT type, name, tbl_name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'").fetchall())
            columns = {table: db.execute(f"PRAGMA table_info('{table}')").fetchall() for kind, table, _ in names if kind == "table"}
            return ((names, columns), db.execute("SELECT version_num FROM alembic_version").fetchall(),
                    db.execute("SELECT experiment_id, name, artifact_location, lifecycle_stage FROM experiments ORDER BY 1").fetchall())

    made, copied = shape(tmp_path / "first" / "mlflow.db"), shape(tmp_path / "second" / "mlflow.db")
    assert made[:2] == copied[:2]
    assert [e[0:2] + e[3:] for e in made[2]] == [e[0:2] + e[3:] for e in copied[2]] == [(0, "Default", "deleted"), (1, "layerprobe", "active")]
    assert copied[2][1][2] == (tmp_path / "second" / "artifacts" / "layerprobe").as_uri()
    (run,) = CliResult(0, "", "", tmp_path / "second").runs()
    assert run.info.status == "FINISHED"
    template.write_bytes(b"not a database")
    third = run_cli(*args, "tracking.dir=" + str(tmp_path / "third"), env=env)
    assert third.returncode == 0, third.stderr[-2000:]
    assert shape(tmp_path / "third" / "mlflow.db")[:2] == made[:2]
    assert shape(template)[2] == [(0, "Default", made[2][0][2], "active")]  # made again, sound and empty

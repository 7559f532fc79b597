"""What a sweep does once, not once per job: a config error every job would hit stops it at the
first job; options are checked before a run exists; phases are recorded for the benchmark."""

import json

from tests.conftest import needs_shared_data, SHARED_GLUE  # noqa: F401


def test_an_error_every_job_would_hit_stops_the_sweep_at_the_first_job(run_cli, tiny_vectors):
    result = run_cli("-m", f"encoder.vectors={tiny_vectors}", "dataset.data_dir=/no/such/folder", "pooler=mean,max,last")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.error_lines if "is not a folder" in line]
    assert len(errors) == 1, result.stderr[-2000:]
    assert "every job of this sweep" in errors[0]
    parents = result.parents()
    assert len(parents) == 1 and parents[0].info.status == "FAILED"
    assert result.children(parents[0]) == []  # no job got as far as a run


def test_an_error_in_a_swept_setting_fails_only_its_jobs(run_cli, tiny_mrpc, tiny_vectors):
    result = run_cli("-m", f"encoder.vectors={tiny_vectors}", f"dataset.data_dir={tiny_mrpc}", "dataset.split=validation,nosuch")
    assert result.returncode == 1
    assert sum("dataset.split=nosuch: this dataset has no such split" in line for line in result.error_lines) == 1
    (parent,) = result.parents()
    children = result.children(parent)
    assert [r.info.status for r in children] == ["FINISHED"]  # the bad split is rejected before a run exists
    summary = (result.store / "artifacts").rglob("summary.md")
    assert any("dataset.split=nosuch: this dataset has no such split" in path.read_text() for path in summary)


def test_jobs_record_where_their_seconds_went(run_cli, tiny_mrpc, tiny_vectors, tmp_path):
    folder = tmp_path / "sweep"
    result = run_cli("-m", f"encoder.vectors={tiny_vectors}", f"dataset.data_dir={tiny_mrpc}", "pooler=mean,max",
                     f"hydra.sweep.dir={folder}")
    assert result.returncode == 0, result.stderr[-2000:]
    driver = json.loads((folder / "layerprobe-sweep.json").read_text())["phases"]
    assert {"registry", "sweep_start", "summary"} <= set(driver)
    jobs = [json.loads(p.read_text()) for p in folder.glob("results/*/*.json")]
    assert len(jobs) == 2
    for job in jobs:
        assert {"setup", "data", "encode", "pool", "metrics", "tracking"} <= set(job["phases"])
        assert all(seconds >= 0 for seconds in job["phases"].values())


def test_a_job_killed_before_writing_its_end_counts_as_killed_in_the_summary(tmp_path):
    """A launcher's worker terminated outright leaves its RUNNING placeholder: KILLED, not missing."""
    from framework.contracts import SweepInfo
    from framework.results import JobResult
    from framework.summary import summary_table
    from framework.sweep import settled

    sweep = SweepInfo("s1", str(tmp_path), ["pooler=mean,max"], 0.0, "host", 1, "host:1:")
    label = {"encoder": "glove", "pooler": "mean", "dataset": "mrpc", "split": "validation", "layer": "-", "postprocess": "none"}
    sweep.write_result(JobResult("FINISHED", "a", {}, label, {"spearman": 0.3}, ["spearman"], 0))
    sweep.write_result(JobResult("RUNNING", "b", {}, {**label, "pooler": "max"}, {}, ["spearman"], 1))
    results = settled(sweep.results())
    assert [r.status for r in results] == ["FINISHED", "KILLED"]
    header, body = summary_table(results)
    assert body[1][-1].startswith("KILLED: the sweep ended while this job was still running")

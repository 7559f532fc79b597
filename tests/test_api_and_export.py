"""The Python API (objects and pairs in memory, with or without tracking) and the MTEB-style export."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from conftest import MRPC_ROWS, CliResult
from framework.api import evaluate
from framework.errors import LayerprobeError
from plugins.glove import GloveEncoder, GloveOptions

PAIRS = [(a, b, int(q)) for q, a, b in MRPC_ROWS]


def test_pairs_and_an_encoder_object_in_memory(tiny_vectors):
    encoder = GloveEncoder(GloveOptions(vectors=str(tiny_vectors)))
    result = evaluate(encoder, "mean", pairs=PAIRS, metrics=["spearman", "roc_auc"])
    assert result.pairs.label_kind == "binary" and len(result.pairs) == 8
    vectors = {}
    for a, b, _ in PAIRS:
        for sentence in (a, b):
            (batch,) = encoder.encode([sentence], encoder.resolve_layer(None))
            vectors[sentence] = batch.states[0][batch.mask[0]].double().mean(0)
    cosines = [float(np.dot(vectors[a], vectors[b]) / np.linalg.norm(vectors[a]) / np.linalg.norm(vectors[b])) for a, b, _ in PAIRS]
    assert result.metric("spearman").value == pytest.approx(stats.spearmanr(cosines, [l for *_, l in PAIRS]).statistic)
    graded = evaluate(encoder, "mean", pairs=[(a, b, l * 4.5 + 0.2) for a, b, l in PAIRS], metrics=["spearman", "roc_auc"])
    assert graded.pairs.label_kind == "graded" and graded.metric("roc_auc") is None  # binary-only, left out


def test_names_and_option_dicts_equal_the_command_line(run_cli, tiny_mrpc, tiny_vectors):
    cli = run_cli(f"dataset.data_dir={tiny_mrpc}", f"encoder.vectors={tiny_vectors}", "pooler=max", "metric=spearman")
    assert cli.returncode == 0, cli.stderr
    result = evaluate({"name": "glove", "vectors": str(tiny_vectors)}, "max", dataset={"name": "mrpc", "data_dir": str(tiny_mrpc)},
                      metrics=["spearman"])
    (run,) = cli.runs()
    assert result.metric("spearman").value == run.data.metrics["spearman"]
    assert result.metric("spearman").ci_low == run.data.metrics["spearman_ci_low"]
    with pytest.raises(LayerprobeError, match="unknown pooler|Could not"):
        evaluate("glove", "nosuch", pairs=PAIRS)


def test_tracked_evaluation_is_a_run(tmp_path, tiny_vectors):
    store = tmp_path / "mlruns"
    train = [(a, b, l) for a, b, l in PAIRS]
    result = evaluate({"name": "glove", "vectors": str(tiny_vectors)}, "mean", pairs=PAIRS, train_pairs=train,
                      postprocess="center", metrics=["spearman"], tracking={"name": "mlflow", "dir": str(store)})
    (run,) = CliResult(0, "", "", store).runs()
    assert run.info.status == "FINISHED" and run.data.metrics["spearman"] == result.metric("spearman").value
    assert run.info.run_name == "glove mean +center · pairs/validation"


def test_mteb_export_of_a_graded_run(run_cli, tmp_path, tiny_vectors, capsys):
    """``--format mteb`` writes MTEB's own layout with MTEB's classes, and MTEB's ResultCache reads it."""
    mteb = pytest.importorskip("mteb", reason="--format mteb needs pip install 'layerprobe[mteb]'")
    from framework.report import main

    from test_graded_and_postprocess import write_stsb

    folder = write_stsb(tmp_path / "STS-B")
    result = run_cli("dataset=stsb", f"dataset.data_dir={folder}", f"encoder.vectors={tiny_vectors}")
    assert result.returncode == 0, result.stderr
    main(["--tracking-dir", str(result.store), "--format", "mteb", "--out", str(tmp_path / "mteb")])
    assert "1 MTEB result file(s)" in capsys.readouterr().out
    (path,) = (tmp_path / "mteb").rglob("STSBenchmark.json")
    assert (path.parent / "model_meta.json").is_file() and "experiments" in path.parts
    document = json.loads(path.read_text())
    (run,) = result.runs()
    assert document["task_name"] == "STSBenchmark"
    (entry,) = document["scores"]["validation"]
    assert entry["main_score"] == entry["cosine_spearman"] == pytest.approx(run.data.metrics["spearman"], abs=1e-6)
    assert "cosine_ap" not in entry and entry["layerprobe"]["run"] == run.info.run_id
    assert entry["confidence_intervals_95"]["cosine_spearman"] == [run.data.metrics["spearman_ci_low"], run.data.metrics["spearman_ci_high"]]
    assert entry["layerprobe"]["bootstrap_resamples"] == 1000
    loaded = mteb.ResultCache(tmp_path / "mteb").load_results(load_experiments="match_name")  # (experiments: the ablation)
    (model,) = [m for m in loaded.model_results if m.model_name.startswith("layerprobe/")]
    assert model.model_name == "layerprobe/glove__L-__mean" and model.task_results[0].task_name == "STSBenchmark"
    document = {"dataset_revision": entry["layerprobe"]["pairs_revision"]}
    # The same config with another metric set is another result (another revision): no file overwritten.
    again = run_cli("dataset=stsb", f"dataset.data_dir={folder}", f"encoder.vectors={tiny_vectors}", "metric=spearman")
    assert again.returncode == 0, again.stderr
    main(["--tracking-dir", str(result.store), "--format", "mteb", "--out", str(tmp_path / "mteb2")])
    assert "2 MTEB result file(s)" in capsys.readouterr().out
    assert len(list((tmp_path / "mteb2").rglob("STSBenchmark.json"))) == 2
    # The revision names the pairs scored: recomputed from the files it read, changed by one label.
    import hashlib

    from plugins.glue import STSB, GlueDataset, GlueOptions

    from test_graded_and_postprocess import GRADED

    pairs = GlueDataset(STSB, GlueOptions(data_dir=str(folder))).load("validation")
    digest = hashlib.sha256(f"stsb|validation|{len(pairs)}".encode())
    for pair_id, a, b in zip(pairs.ids, pairs.sentences_a, pairs.sentences_b):
        digest.update(f"\x1f{pair_id}\x1e{a}\x1e{b}".encode())
    digest.update(pairs.labels.astype("float64").tobytes())
    assert document["dataset_revision"] == run.data.params["data.revision"] == digest.hexdigest()  # the pairs scored
    (a, b, score), *rest = GRADED
    changed = write_stsb(tmp_path / "STS-B-changed", rows=[(a, b, "0.5" if score != "0.5" else "1.0"), *rest])
    assert GlueDataset(STSB, GlueOptions(data_dir=str(changed))).load("validation").revision != document["dataset_revision"]

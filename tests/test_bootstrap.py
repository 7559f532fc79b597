"""The batched bootstrap equals the field's libraries on every materialised resample, and a run's
CIs are the ones the per-resample loop gives for the same seed."""

import numpy as np
import pytest
from omegaconf import OmegaConf
from scipy import stats
from sklearn.metrics import average_precision_score, roc_auc_score

from framework.bootstrap import confusion_at_thresholds, resample_counts, resample_indices
from framework.data import PairScores, PairSet
from framework.metricset import MetricSet, best_threshold
from framework.plugins import registry
from plugins import metrics


def tied_data(n, seed, graded=False):
    """Scores and labels with many ties (rounded scores; binary or graded 0–5 labels)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 6, n).astype(float) if graded else rng.integers(0, 2, n).astype(float)
    scores = np.round(rng.normal(size=n) + 0.3 * labels, 1)
    return scores, labels


def resamples_of(n, count, seed):
    samples = resample_indices(n, count, seed)
    counts = np.concatenate(list(resample_counts(n, count, seed, chunk_elements=7 * n)))  # several chunks
    return samples, counts


def test_counts_are_the_seeded_indices_drawn_in_chunks():
    samples, counts = resamples_of(53, 40, seed=9)
    expected = np.stack([np.bincount(s, minlength=53) for s in samples]).astype(float)
    assert np.array_equal(counts, expected)


@pytest.mark.parametrize("graded", [False, True])
def test_batched_rank_correlations_equal_scipy_on_each_resample(graded):
    scores, labels = tied_data(120, seed=1, graded=graded)
    samples, counts = resamples_of(len(scores), 60, seed=5)
    rho = metrics.spearman_batched(scores, labels)(counts)
    r = metrics.pearson_batched(scores, labels)(counts)
    for k, s in enumerate(samples):
        assert rho[k] == pytest.approx(stats.spearmanr(scores[s], labels[s]).statistic, abs=1e-12)
        assert r[k] == pytest.approx(stats.pearsonr(scores[s], labels[s]).statistic, abs=1e-12)


def test_batched_roc_auc_and_average_precision_equal_scikit_learn_on_each_resample():
    scores, labels = tied_data(90, seed=2)
    samples, counts = resamples_of(len(scores), 80, seed=6)
    auc = metrics.roc_auc_batched(scores, labels)(counts)
    ap = metrics.average_precision_batched(scores, labels)(counts)
    for k, s in enumerate(samples):
        positive = labels[s] > 0.5
        assert auc[k] == pytest.approx(roc_auc_score(positive, scores[s]), abs=1e-12)
        assert ap[k] == pytest.approx(average_precision_score(positive, scores[s]), abs=1e-12)


def test_one_class_resamples_and_nan_scores_are_undefined_as_in_the_scalar_functions():
    scores = np.array([0.1, 0.5, 0.5, 0.9, np.nan])
    labels = np.array([1.0, 0.0, 1.0, 1.0, 0.0])
    counts = np.array([[5, 0, 0, 0, 0], [1, 1, 1, 2, 0], [1, 1, 1, 1, 1], [0, 0, 2, 3, 0]], dtype=float)
    samples = [np.repeat(np.arange(5), c.astype(int)) for c in counts]
    for name in ("spearman", "pearson", "roc_auc", "average_precision"):
        batched = getattr(metrics, f"{name}_batched")(scores, labels)(counts)
        scalar = np.array([getattr(metrics, name)(scores[s], labels[s]) for s in samples])
        assert np.array_equal(np.isnan(batched), np.isnan(scalar)), name
        assert np.allclose(batched[~np.isnan(batched)], scalar[~np.isnan(scalar)], atol=1e-12), name


def test_confusion_forms_equal_the_threshold_functions():
    scores, labels = tied_data(70, seed=3)
    thresholds = np.unique(scores)
    confusion = confusion_at_thresholds(scores, labels > 0.5, thresholds)
    assert np.array_equal(metrics.accuracy_of_confusion(*confusion), [metrics.accuracy(scores, labels, t) for t in thresholds])
    assert np.array_equal(metrics.f1_of_confusion(*confusion), [metrics.f1(scores, labels, t) for t in thresholds])


def scored(scores, labels):
    n = len(scores)
    pairs = PairSet("toy", "validation", [str(i) for i in range(n)], ["a"] * n, ["b"] * n, labels, n)
    return PairScores(pairs, scores)


def slow_copy(metric):
    """The same metric without its array forms: the per-resample loop the batched path replaces."""
    from dataclasses import replace

    return replace(metric, batched=None, confusion=None)


def test_cis_equal_the_per_resample_loop_for_the_same_seed():
    names = ["spearman", "pearson", "roc_auc", "average_precision", "accuracy", "f1"]
    config = OmegaConf.create({"names": names, "bootstrap_resamples": 300, "confidence": 0.95,
                               "calibration_split": "train", "calibration_limit": None})
    fast = MetricSet.from_config(config, registry())
    slow = MetricSet([slow_copy(m) for m in fast.metrics], fast.resamples, fast.confidence, "train", None)
    scores, labels = tied_data(150, seed=4)
    calibration = scored(*tied_data(200, seed=5))
    for a, b in zip(fast.compute(scored(scores, labels), calibration, seed=11),
                    slow.compute(scored(scores, labels), calibration, seed=11)):
        assert a.name == b.name and a.value == b.value and a.extras == b.extras
        assert a.ci_low == pytest.approx(b.ci_low, abs=1e-12) and a.ci_high == pytest.approx(b.ci_high, abs=1e-12), a.name


def test_threshold_search_equals_the_loop():
    accuracy = registry().metric("accuracy")
    scores, labels = tied_data(300, seed=7)
    assert best_threshold(accuracy, scores, labels) == best_threshold(slow_copy(accuracy), scores, labels)


def test_an_undefined_point_value_gets_no_ci():
    """A NaN metric is never shown beside a finite CI (resamples that miss the NaN pair are finite)."""
    scores, labels = tied_data(40, seed=8)
    scores[3] = np.nan
    config = OmegaConf.create({"names": ["spearman"], "bootstrap_resamples": 50, "confidence": 0.95,
                               "calibration_split": None, "calibration_limit": None})
    value = MetricSet.from_config(config, registry()).compute(scored(scores, labels), None, seed=0)[0]
    assert np.isnan(value.value) and value.ci_low is None and value.ci_high is None


def test_a_plugin_metric_without_a_batched_form_still_gets_its_ci():
    """The slow path: a scalar function only, called on each resample."""
    from framework.plugins import Metric

    kendall = Metric("kendall", lambda s, l: float(stats.kendalltau(s, l).statistic), False, "test")
    scores, labels = tied_data(60, seed=10, graded=True)
    value = MetricSet([kendall], 40, 0.95, None, None).compute(scored(scores, labels), None, seed=2)[0]
    samples = resample_indices(60, 40, 2)
    replicates = [stats.kendalltau(scores[s], labels[s]).statistic for s in samples]
    assert [value.ci_low, value.ci_high] == pytest.approx(list(np.percentile(replicates, [2.5, 97.5])), abs=1e-12)


def job_result(job, ids, labels, scores):
    from framework.results import JobResult, PairScoreTable

    label = {"encoder": "e", "pooler": "p", "dataset": "d", "split": "validation", "layer": "-", "postprocess": "none"}
    return JobResult("FINISHED", str(job), {}, label, {}, ["spearman"], job,
                     scores=PairScoreTable([str(i) for i in ids], list(map(float, labels)), list(map(float, scores))))


def test_paired_delta_uses_every_pair_when_ids_repeat():
    """Ids repeated (dataset.id=<a column with repeats>): paired by position over all 100 pairs."""
    from framework.summary import compare_with_reference

    rng = np.random.default_rng(0)
    labels, base, other = rng.normal(size=100), rng.normal(size=100), rng.normal(size=100)
    ids = [i % 10 for i in range(100)]
    texts = compare_with_reference([job_result(0, ids, labels, base), job_result(1, ids, labels, other)], resamples=200)
    expected = stats.spearmanr(other, labels).statistic - stats.spearmanr(base, labels).statistic
    assert texts[1].text.startswith(f"{expected:+.4f} ") and texts[1].delta == pytest.approx(expected, abs=1e-12)


def test_paired_delta_ci_equals_the_per_resample_loop():
    from framework.summary import compare_with_reference

    labels, base = tied_data(80, seed=12, graded=True)
    other = base + np.random.default_rng(1).normal(size=80)
    ids = list(range(80))
    text = compare_with_reference([job_result(0, ids, labels, base), job_result(1, ids, labels, other)], resamples=300, seed=4)[1].text
    order = sorted(range(80), key=str)  # unique ids: matched in sorted id order, as before
    l, b, o = labels[order], base[order], other[order]
    deltas = [stats.spearmanr(o[s], l[s]).statistic - stats.spearmanr(b[s], l[s]).statistic for s in resample_indices(80, 300, 4)]
    low, high = np.nanpercentile(deltas, [2.5, 97.5])
    assert text.split(" [")[1].startswith(f"{low:+.4f}, {high:+.4f}]")

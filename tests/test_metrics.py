"""Metrics agree with their definitions; CIs are seeded; thresholds come from the calibration split."""

import numpy as np
import pytest
from scipy import stats

from framework.data import PairScores, PairSet
from framework.errors import LayerprobeError
from framework.metricset import MetricSet
from framework.plugins import registry
from omegaconf import OmegaConf
from plugins.metrics import accuracy, average_precision, f1, roc_auc, spearman


def scored(scores, labels):
    n = len(scores)
    pairs = PairSet("toy", "validation", [str(i) for i in range(n)], ["a"] * n, ["b"] * n,
                    np.asarray(labels, dtype=float), n)
    return PairScores(pairs, np.asarray(scores, dtype=float))


def random_scores(n=200, seed=1):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n).astype(float)
    return rng.normal(size=n) + labels, labels


def test_rank_metrics_match_their_definitions():
    scores, labels = random_scores()
    assert spearman(scores, labels) == pytest.approx(stats.spearmanr(scores, labels).statistic)
    positive, negative = scores[labels == 1], scores[labels == 0]
    pairwise = (positive[:, None] > negative[None, :]).mean()
    assert roc_auc(scores, labels) == pytest.approx(pairwise)
    order = np.argsort(-scores)
    hits = labels[order] == 1
    precisions = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    assert average_precision(scores, labels) == pytest.approx(precisions[hits].mean())


def test_threshold_metrics():
    scores, labels = np.array([0.1, 0.4, 0.6, 0.9]), np.array([0.0, 1.0, 0.0, 1.0])
    assert accuracy(scores, labels, 0.5) == 0.5
    assert f1(scores, labels, 0.35) == pytest.approx(2 * 2 / (3 + 2))


def metric_set(**overrides):
    config = {"names": ["spearman", "accuracy"], "bootstrap_resamples": 200, "confidence": 0.95,
              "calibration_split": "train", "calibration_limit": None, **overrides}
    return MetricSet.from_config(OmegaConf.create(config), registry())


def test_bootstrap_ci_is_seeded_and_brackets_the_value():
    scores, labels = random_scores()
    first = metric_set().compute(scored(scores, labels), None, seed=3)
    again = metric_set().compute(scored(scores, labels), None, seed=3)
    other = metric_set().compute(scored(scores, labels), None, seed=4)
    rho = first[0]
    assert [m.name for m in first] == ["spearman"]  # accuracy needs a calibration split
    assert rho.ci_low < rho.value < rho.ci_high
    assert (rho.ci_low, rho.ci_high) == (again[0].ci_low, again[0].ci_high) != (other[0].ci_low, other[0].ci_high)


def test_accuracy_uses_the_threshold_best_on_the_calibration_split():
    train = scored([0.1, 0.2, 0.7, 0.8], [0, 0, 1, 1])
    evaluated = scored([0.15, 0.5, 0.75, 0.9], [0, 0, 1, 1])
    values = {m.name: m for m in metric_set(bootstrap_resamples=0).compute(evaluated, train, seed=0)}
    assert values["accuracy"].extras["threshold"] == pytest.approx(0.7)
    assert values["accuracy"].value == 1.0


def test_unknown_metric_lists_the_known_ones():
    with pytest.raises(LayerprobeError, match="unknown metric 'ndcg'; available: accuracy, anisotropy, average_precision"):
        metric_set(names=["spearman", "ndcg"])


def test_our_percentile_bootstrap_agrees_with_scipy():
    """Our CI resamples pairs with seeded indices; scipy.stats.bootstrap draws its own: they must agree."""
    from scipy import stats

    rng = np.random.default_rng(1)
    labels = (rng.random(400) < 0.6).astype(float)
    scores = labels * 0.3 + rng.normal(size=400)
    ours = metric_set(names=["spearman"], bootstrap_resamples=4000).compute(scored(scores, labels), None, seed=0)[0]
    reference = stats.bootstrap((scores, labels), lambda s, l: stats.spearmanr(s, l).statistic, paired=True,
                                vectorized=False, n_resamples=4000, method="percentile", random_state=0).confidence_interval
    assert ours.ci_low == pytest.approx(reference.low, abs=0.01) and ours.ci_high == pytest.approx(reference.high, abs=0.01)

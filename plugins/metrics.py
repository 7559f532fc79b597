"""Metrics of cosine scores against gold labels. Spearman is the paper's metric.

Each is a plain function of numpy arrays; the harness adds the bootstrap CI and, for the
threshold metrics, the threshold calibrated on the train split. ROC-AUC and average precision are
scikit-learn's (ties between equal scores handled as the field computes them); they, accuracy and
F1 need binary labels and are left out on graded data.

Each also has a batched form for the bootstrap (``framework.bootstrap``): the same statistic on
every resample at once, from how often each pair was drawn. Those equal the scalar functions on
the materialised resamples (tested to 1e-12); the point estimate is always the scalar function's.
"""

from __future__ import annotations

import numpy as np

from framework.bootstrap import TieGroups, finite_only, linear_correlation, rank_correlation
from framework.hookspecs import hookimpl


def spearman(scores: np.ndarray, labels: np.ndarray) -> float:
    from scipy import stats

    return float(stats.spearmanr(scores, labels).statistic)


def pearson(scores: np.ndarray, labels: np.ndarray) -> float:
    from scipy import stats

    return float(stats.pearsonr(scores, labels).statistic)


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Probability that a random paraphrase scores above a random non-paraphrase (ties count half)."""
    from sklearn.metrics import roc_auc_score

    positive = labels > 0.5
    if positive.all() or not positive.any() or not np.isfinite(scores).all():
        return float("nan")  # undefined with one class (a bootstrap resample can draw one) or undefined scores
    return float(roc_auc_score(positive, scores))


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the precision-recall curve (scikit-learn's step-wise sum; tied scores form one step)."""
    from sklearn.metrics import average_precision_score

    positive = labels > 0.5
    if not positive.any() or not np.isfinite(scores).all():
        return float("nan")
    return float(average_precision_score(positive, scores))


def accuracy(scores: np.ndarray, labels: np.ndarray, threshold: float) -> float:
    return float(((scores >= threshold) == (labels > 0.5)).mean())


def f1(scores: np.ndarray, labels: np.ndarray, threshold: float) -> float:
    predicted, actual = scores >= threshold, labels > 0.5
    true_positive = float((predicted & actual).sum())
    denominator = float(predicted.sum() + actual.sum())
    return 2 * true_positive / denominator if denominator else 0.0


# --- batched forms: prepare(scores, labels) sorts once, then gives the metric of each resample ---

spearman_batched = finite_only(rank_correlation)


pearson_batched = finite_only(linear_correlation)


@finite_only
def roc_auc_batched(scores: np.ndarray, labels: np.ndarray):
    """Mann-Whitney U from the resample's average ranks: the trapezoidal ROC area, ties counting half."""
    positive = (labels > 0.5).astype(np.float64)
    by_score = TieGroups(scores)

    def of(counts: np.ndarray) -> np.ndarray:
        drawn_positive = counts @ positive
        drawn_negative = counts.sum(axis=1) - drawn_positive
        groups = by_score.totals(counts)
        group_ranks = np.cumsum(groups, axis=1) - (groups - 1) / 2
        rank_sum = (by_score.totals(counts * positive) * group_ranks).sum(axis=1)  # Σ over positives drawn
        with np.errstate(divide="ignore", invalid="ignore"):
            auc = (rank_sum - drawn_positive * (drawn_positive + 1) / 2) / (drawn_positive * drawn_negative)
        auc[(drawn_positive == 0) | (drawn_negative == 0)] = np.nan
        return auc

    return of


@finite_only
def average_precision_batched(scores: np.ndarray, labels: np.ndarray):
    """Σ (recall step) × precision over the resample's distinct scores, highest first."""
    positive = (labels > 0.5).astype(np.float64)
    by_score = TieGroups(scores, descending=True)

    def of(counts: np.ndarray) -> np.ndarray:
        true_step = by_score.totals(counts * positive)
        drawn = np.cumsum(by_score.totals(counts), axis=1)
        precision = np.divide(np.cumsum(true_step, axis=1), drawn, out=np.zeros_like(drawn), where=drawn > 0)
        drawn_positive = true_step.sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            value = (true_step * precision).sum(axis=1) / drawn_positive
        value[drawn_positive == 0] = np.nan
        return value

    return of


def accuracy_of_confusion(tp, fp, fn, tn):
    return (tp + tn) / (tp + fp + fn + tn)


def f1_of_confusion(tp, fp, fn, tn):
    denominator = (tp + fp) + (tp + fn)
    return np.divide(2 * tp, denominator, out=np.zeros_like(np.asarray(denominator, dtype=np.float64)), where=denominator > 0)


@hookimpl
def register_metrics(register):
    register("spearman", spearman, batched=spearman_batched)
    register("pearson", pearson, batched=pearson_batched)
    register("roc_auc", roc_auc, labels="binary", batched=roc_auc_batched)
    register("average_precision", average_precision, labels="binary", batched=average_precision_batched)
    register("accuracy", accuracy, calibrated=True, labels="binary", confusion=accuracy_of_confusion)
    register("f1", f1, calibrated=True, labels="binary", confusion=f1_of_confusion)

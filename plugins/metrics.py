"""Metrics of cosine scores against gold labels. Spearman is the paper's metric.

Each is a plain function of numpy arrays; the harness adds the bootstrap CI and, for the
threshold metrics, the threshold calibrated on the train split. ROC-AUC and average precision are
scikit-learn's (ties between equal scores handled as the field computes them); they, accuracy and
F1 need binary labels and are left out on graded data.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from framework.hookspecs import hookimpl


def spearman(scores: np.ndarray, labels: np.ndarray) -> float:
    return float(stats.spearmanr(scores, labels).statistic)


def pearson(scores: np.ndarray, labels: np.ndarray) -> float:
    return float(stats.pearsonr(scores, labels).statistic)


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Probability that a random paraphrase scores above a random non-paraphrase (ties count half)."""
    from sklearn.metrics import roc_auc_score

    positive = labels > 0.5
    if positive.all() or not positive.any():
        return float("nan")  # undefined with one class (a bootstrap resample can draw one)
    return float(roc_auc_score(positive, scores))


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the precision-recall curve (scikit-learn's step-wise sum; tied scores form one step)."""
    from sklearn.metrics import average_precision_score

    positive = labels > 0.5
    if not positive.any():
        return float("nan")
    return float(average_precision_score(positive, scores))


def accuracy(scores: np.ndarray, labels: np.ndarray, threshold: float) -> float:
    return float(((scores >= threshold) == (labels > 0.5)).mean())


def f1(scores: np.ndarray, labels: np.ndarray, threshold: float) -> float:
    predicted, actual = scores >= threshold, labels > 0.5
    true_positive = float((predicted & actual).sum())
    denominator = float(predicted.sum() + actual.sum())
    return 2 * true_positive / denominator if denominator else 0.0


@hookimpl
def register_metrics(register):
    register("spearman", spearman)
    register("pearson", pearson)
    register("roc_auc", roc_auc, labels="binary")
    register("average_precision", average_precision, labels="binary")
    register("accuracy", accuracy, calibrated=True, labels="binary")
    register("f1", f1, calibrated=True, labels="binary")

"""Metrics of cosine scores against gold labels. Spearman is the paper's metric.

Each is a plain function of numpy arrays; the harness adds the bootstrap CI and, for the
threshold metrics, the threshold calibrated on the train split.
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
    positive = labels > 0.5
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = stats.rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the precision-recall curve, as the mean precision at each paraphrase's rank."""
    positive = labels[np.argsort(-scores, kind="stable")] > 0.5
    if not positive.any():
        return float("nan")
    hits = np.cumsum(positive)
    return float((hits[positive] / (np.flatnonzero(positive) + 1)).mean())


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
    register("roc_auc", roc_auc)
    register("average_precision", average_precision)
    register("accuracy", accuracy, calibrated=True)
    register("f1", f1, calibrated=True)

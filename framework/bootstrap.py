"""The seeded bootstrap at array speed: every resample of a metric at once, in bounded chunks.

A resample draws ``n`` pair indices with replacement; ``rng.integers(0, n, (resamples, n))`` with
the job's seed, drawn here chunk by chunk (the same numbers as one draw: the generator's stream is
consumed in order). A resample is represented by its *counts*: ``counts[r, i]`` is how often
resample ``r`` drew pair ``i``. Statistics of a resample are then weighted statistics of the
original data, so the data is sorted once, not once per resample: the rank of a value in a
resample is the count of draws below its tie group plus half its group's draws (a cumulative sum
over the once-sorted groups). The values equal scipy's and scikit-learn's on the materialised
resample to rounding (the tests check 1e-12).
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

# Elements of one (resamples × pairs) chunk: ~8 float64 arrays of this size are alive at once.
CHUNK_ELEMENTS = 1 << 21


def resample_counts(n: int, resamples: int, seed: int, chunk_elements: int = CHUNK_ELEMENTS) -> Iterator[np.ndarray]:
    """The seeded resamples as float64 count matrices ``[rows, n]``, a chunk of rows at a time."""
    rng = np.random.default_rng(seed)
    rows = max(1, chunk_elements // max(n, 1))
    for start in range(0, resamples, rows):
        r = min(rows, resamples - start)
        drawn = rng.integers(0, n, size=(r, n))
        drawn += np.arange(r)[:, None] * n
        yield np.bincount(drawn.ravel(), minlength=r * n).reshape(r, n).astype(np.float64)


def resample_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """The same resamples as explicit index rows (for metrics that have no batched form)."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


class TieGroups:
    """``values`` sorted once into groups of equal values: the basis of ranks under any weights."""

    def __init__(self, values: np.ndarray, descending: bool = False):
        values = np.asarray(values, dtype=np.float64)
        self.order = np.argsort(-values if descending else values, kind="stable")
        ordered = values[self.order]
        first = np.ones(len(ordered), dtype=bool)
        first[1:] = ordered[1:] != ordered[:-1]
        self.starts = np.flatnonzero(first)
        self.group_of_item = np.empty(len(values), dtype=np.int64)
        self.group_of_item[self.order] = np.cumsum(first) - 1

    def totals(self, weights: np.ndarray) -> np.ndarray:
        """Per resample, the summed weight of each tie group, in sorted order: ``[rows, groups]``."""
        if not len(self.starts):
            return np.zeros((weights.shape[0], 0))
        return np.add.reduceat(weights[:, self.order], self.starts, axis=1)

    def ranks(self, counts: np.ndarray) -> np.ndarray:
        """Average ranks (1-based, ties share their mean rank) of every item within each resample."""
        group = self.totals(counts)
        average = np.cumsum(group, axis=1) - (group - 1) / 2
        return average[:, self.group_of_item]


def weighted_correlation(x: np.ndarray, y: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Pearson correlation of ``x`` and ``y`` (each ``[n]`` or ``[rows, n]``) within each resample."""
    total = counts.sum(axis=1, keepdims=True)
    dx = x - (counts * x).sum(axis=1, keepdims=True) / total
    dy = y - (counts * y).sum(axis=1, keepdims=True) / total
    with np.errstate(divide="ignore", invalid="ignore"):
        r = (counts * dx * dy).sum(axis=1) / np.sqrt((counts * dx * dx).sum(axis=1) * (counts * dy * dy).sum(axis=1))
    return np.clip(r, -1.0, 1.0)


def rank_correlation(scores: np.ndarray, labels: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Spearman's rho of every resample (Pearson of the resample's average ranks), finite data."""
    by_score, by_label = TieGroups(scores), TieGroups(labels)
    return lambda counts: weighted_correlation(by_score.ranks(counts), by_label.ranks(counts), counts)


def finite_only(function: Callable[[np.ndarray, np.ndarray], Callable[[np.ndarray], np.ndarray]]):
    """Wrap a batched metric so that a resample drawing a NaN score or label is NaN, as scipy's and
    scikit-learn's functions give on such a resample, and the others see only finite pairs."""

    def prepare(scores: np.ndarray, labels: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.float64)
        bad = ~(np.isfinite(scores) & np.isfinite(labels))
        if not bad.any():
            return function(scores, labels)
        inner = function(scores[~bad], labels[~bad])

        def of(counts: np.ndarray) -> np.ndarray:
            values = inner(counts[:, ~bad])
            values[(counts[:, bad] > 0).any(axis=1)] = np.nan
            return values

        return of

    return prepare


def confusion_at_thresholds(scores: np.ndarray, positive: np.ndarray, thresholds: np.ndarray):
    """True/false positives and negatives of ``score >= t`` for every threshold ``t`` (exact counts)."""
    ordered = np.sort(scores)
    ordered_positive = np.sort(scores[positive])
    predicted = len(scores) - np.searchsorted(ordered, thresholds, side="left")
    tp = len(ordered_positive) - np.searchsorted(ordered_positive, thresholds, side="left")
    fp = predicted - tp
    fn = len(ordered_positive) - tp
    tn = len(scores) - len(ordered_positive) - fp
    return tuple(np.asarray(v, dtype=np.float64) for v in (tp, fp, fn, tn))


def resampled_confusion(predicted: np.ndarray, positive: np.ndarray, counts: np.ndarray):
    """True/false positives and negatives of fixed predictions within each resample."""
    cells = np.stack([predicted & positive, predicted & ~positive, ~predicted & positive, ~predicted & ~positive], axis=1)
    tp, fp, fn, tn = (counts @ cells.astype(np.float64)).T
    return tp, fp, fn, tn

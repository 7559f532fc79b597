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
CHUNK_ELEMENTS = 1 << 20


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



def rank_correlation(scores: np.ndarray, labels: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Spearman's rho of every resample (Pearson of the resample's average ranks), finite data.

    Ranks are centred on their exact mean, (n + 1) / 2, per tie group; the sums of squares are
    then group sums, and only the cross term visits every pair. Centred average ranks are
    multiples of 1/2, so every sum is exact in float64 for any realistic n.
    """
    by_score, by_label = TieGroups(scores), TieGroups(labels)

    def of(counts: np.ndarray) -> np.ndarray:
        middle = (counts.sum(axis=1, keepdims=True) + 1) / 2
        score_totals, label_totals = by_score.totals(counts), by_label.totals(counts)
        score_ranks = np.cumsum(score_totals, axis=1) - (score_totals - 1) / 2 - middle
        label_ranks = np.cumsum(label_totals, axis=1) - (label_totals - 1) / 2 - middle
        cross = (counts * score_ranks[:, by_score.group_of_item] * label_ranks[:, by_label.group_of_item]).sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            r = cross / np.sqrt((score_totals * score_ranks**2).sum(axis=1) * (label_totals * label_ranks**2).sum(axis=1))
        return np.clip(r, -1.0, 1.0)

    return of


def linear_correlation(x: np.ndarray, y: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Pearson's r of every resample, from count-weighted moments (matrix-vector products).

    The values are shifted by their full-data means first, so the resample's moments are small
    corrections and the subtraction loses nothing that matters at 1e-12.
    """
    x = np.asarray(x, dtype=np.float64) - np.mean(x)
    y = np.asarray(y, dtype=np.float64) - np.mean(y)
    moments = np.stack([x, y, x * x, y * y, x * y], axis=1)

    def of(counts: np.ndarray) -> np.ndarray:
        total = counts.sum(axis=1)
        sx, sy, sxx, syy, sxy = (counts @ moments).T
        with np.errstate(divide="ignore", invalid="ignore"):
            r = (sxy - sx * sy / total) / np.sqrt((sxx - sx * sx / total) * (syy - sy * sy / total))
        return np.clip(r, -1.0, 1.0)

    return of


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
